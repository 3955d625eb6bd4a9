"""``examples/sharded_training.py`` trains on a mesh of 8 (fake) devices."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through tests/test_sharding.py)", allow_module_level=True)

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "sharded_training.py"


def test_sharded_training_example(mesh="4x2"):
    spec = importlib.util.spec_from_file_location("sharded_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--mesh", mesh, "--steps", "80", "--items", "1024", "--batch", "64"])
    losses = result["losses"]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    model_shards = int(mesh.split("x")[1])
    assert result["table_spec"] == P("model", None)
    assert result["shard_shape"] == (1024 // model_shards, 16)


@pytest.mark.slow  # the benchmark script at size: CI runs it (-m slow)
def test_sharded_benchmark_memory_per_device():
    """``benchmarks/bench_sharded.py``: each device holds V*D/shards of the table, and the
    lookup's and the sparse step's temporaries are O(batch) plus int32 row marks, far below a
    table shard."""
    path = EXAMPLE.parents[1] / "benchmarks" / "bench_sharded.py"
    spec = importlib.util.spec_from_file_location("bench_sharded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocab, dim = 65536, 64
    results = module.main(
        ["--vocab", str(vocab), "--dim", str(dim), "--batch", "256", "--repeat", "1"]
    )
    assert len(results) == 4
    for layout, rows in results.items():
        # "vocab/4 x batch/2": the table is split 4 ways (and copied over the 2 data shards)
        shards = 1 if layout.startswith("unsharded") else int(layout.split("/")[1].split()[0])
        for row in rows:
            assert row["table_per_device_mib"] * 2**20 == vocab * dim * 4 / shards
            assert row["ms"] > 0
            if row["program"] != "dense step":  # the dense step holds a (V, D) gradient
                # plus up to two int32 scratches of the local rows (the renorm's and the sparse
                # update's first-occurrence marks): D / 4 times smaller than the shard
                local_rows = vocab // (shards if layout.startswith("vocab") else 1)
                bound = row["table_per_device_mib"] / 4 + 2 * local_rows * 4 / 2**20
                assert row["temp_per_device_mib"] < bound, (layout, row)


@pytest.mark.slow  # test_sharded_training_example and test_dlrm_tiny: the small ones
def test_dlrm_on_8_devices_with_the_planners_layout(capsys):
    path = EXAMPLE.parent / "dlrm_sharded.py"
    spec = importlib.util.spec_from_file_location("dlrm_sharded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags = "--devices 8 --steps 30 --batch 64 --dim 4 --cap 20000 --replicate-below 16"
    result = module.main([*flags.split(), "--eval-every", "15"])
    out = capsys.readouterr().out
    assert "ShardingPlan over 8 devices" in out and "row_wise" in out
    # the planner's cheapest on these devices: every table in one routed row-wise group
    assert {p.kind.value for _, p in result["plan"].placements} == {"row_wise"}
    losses = result["losses"]
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(0 <= a <= 1 for _, a in result["aucs"])
