#!/usr/bin/env bash
# The CPU figures of the README's performance section, on the kernel path and on the pure-JAX
# path (JAXEMBED_KERNELS=0) beside it, under glibc and tcmalloc where the allocator decides much
# of the time. Run it alone on the machine: torch's and FBGEMM's OpenMP threads, and XLA's,
# slow several-fold when another process holds a core. Writes its logs under $OUT (./cpu-out).
#
#   bash benchmarks/run_cpu.sh              # about 12 minutes on 2 cores
#   QUICK=1 bash benchmarks/run_cpu.sh      # the kernel path only, fewer rounds
set -u
out=${OUT:-cpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
tcmalloc=$(python3 -c "from jaxembed.bench import _allocator as a; print(a.resolve('tcmalloc'))" 2>/dev/null)
paths=(1 0)
rounds=5
if [ -n "${QUICK:-}" ]; then paths=(1); rounds=3; fi
python3 -c "import jax, torch, jaxembed; print('jax', jax.__version__, 'torch', torch.__version__, 'kernels', jaxembed.kernels.status())" | tee "$out/versions.txt"
for k in "${paths[@]}"; do
  export JAXEMBED_KERNELS=$k
  tag=$([ "$k" = 1 ] && echo kernels || echo reference)
  python3 benchmarks/bench_core.py 2>&1 | tee "$out/core-$tag.txt"
  python3 benchmarks/bench_bag.py 2>&1 | tee "$out/bag-$tag.txt"
  # every op at the bench's default size, then the large one under both allocators
  python3 -m jaxembed.bench --ids uniform,zipf:1.15 --json "$out/bench-default-$tag.json" 2>&1 \
    | tee "$out/bench-default-$tag.txt"
  python3 -m jaxembed.bench --vocab 1000000 --dim 128 --batch 65536 --repeat 9 \
    --ids uniform,zipf:1.15 \
    --ops lookup,bag-sum,bag-mean,bag-max,train-sparse-sgd,train-sparse-adagrad,train-sparse-rowwise_adagrad,train-sparse-lazy_adam,train-bag-rowwise_adagrad \
    --allocator glibc${tcmalloc:+,tcmalloc} --json "$out/bench-large-$tag.json" 2>&1 \
    | tee "$out/bench-large-$tag.txt"
  python3 benchmarks/bench_quantized.py --rounds "$rounds" 2>&1 | tee "$out/quantized-$tag.txt"
  python3 benchmarks/bench_collection.py --rounds "$rounds" 2>&1 | tee "$out/collection-$tag.txt"
  if [ -n "$tcmalloc" ]; then
    LD_PRELOAD=$tcmalloc python3 benchmarks/bench_collection.py --rounds "$rounds" --skip "one table,separate" 2>&1 \
      | tee "$out/collection-tcmalloc-$tag.txt"
  fi
done
