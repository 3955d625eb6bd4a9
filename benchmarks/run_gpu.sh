#!/usr/bin/env bash
# One prepared GPU run: the core and bag benchmarks (torch on the same GPU), a subset of the
# torch-parity tests with JAX on the GPU, then jaxembed-bench under uniform and Zipf ids. Writes
# its logs under $OUT (or ./gpu-out).
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/bench_core.py --torch-device cuda --repeat 50 2>&1 | tee "$out/core.txt"
python3 benchmarks/bench_bag.py --torch-device cuda --repeat 50 2>&1 | tee "$out/bag.txt"
pt() { timeout "$1" python3 -m pytest -q -p no:cacheprovider -o addopts="" "${@:2}" 2>&1 | tail -6 | tee -a "$out/tests.txt"; }
pt 200 tests/test_embedding.py::test_matches_torch -k "jit and (nonorm or mn1.0p2.0 or mn0.7pinf)"
pt 100 tests/test_index_policy.py tests/test_training.py
pt 150 tests/test_bag.py -k "2d or balanced"
python3 benchmarks/bench_sparse.py --torch-device cuda --repeat 30 2>&1 | tee "$out/sparse.txt"
python3 benchmarks/bench_sparse.py --sweep 10000,100000,1000000,4000000 --optimizers sgd,lazy_adam --repeat 30 2>&1 | tee -a "$out/sparse.txt"
pt 200 tests/test_sparse.py tests/test_sparse_modules.py
# jaxembed-bench on the GPU: every op under uniform and Zipf ids (the sparse steps against the
# dense one, Zipf against uniform, lookup and bag against the copy bandwidth), JSON for the note
python3 -m jaxembed.bench --backend gpu --vocab 1000000 --dim 128 --batch 65536 --repeat 20 \
  --ids uniform,zipf:1.15 --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
# the DLRM-shaped collection step (issue 16) on the GPU: stacked vs one table vs separate tables
# (TorchRec on CUDA needs the CUDA fbgemm-gpu, which this machine may lack: skipped here)
timeout 300 python3 benchmarks/bench_collection.py --rounds 5 --skip torchrec 2>&1 | tee "$out/collection.txt"
# a planned collection on every GPU of the machine (issue 17): memory per device against the
# plan, bytes moved against the plan, and the step against one device
timeout 240 python3 benchmarks/bench_collection_mesh.py --devices 0 --rounds 3 2>&1 | tee "$out/collection_mesh.txt"
# quantized bags (issue 18): 8 / 4 / 2-bit against the f32 bag and the copy bandwidth (torch's
# quantized ops are CPU-only: skipped)
timeout 240 python3 benchmarks/bench_quantized.py --no-torch --rounds 3 2>&1 | tee "$out/quantized.txt"
