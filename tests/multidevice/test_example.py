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


@pytest.mark.parametrize("mesh", ["4x2", "1x8"])
def test_sharded_training_example(mesh):
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
