"""A forward pass on a mesh exported for serving (run via tests/test_sharding.py): a planned
collection and a row-sharded table, saved, loaded in a fresh process with 8 devices, equal the
live function bit for bit; a process with too few devices is refused, naming the mesh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import sharding as S

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through tests/test_sharding.py)", allow_module_level=True)

E = jaxembed.EmbeddingBagConfig
TABLES = [E("a", 16, 40, ["fa"]), E("b", 16, 50, ["fb"], pooling="mean"), E("c", 8, 64, ["fc"])]
KEYS = ("fa", "fb", "fc")


def _plan():
    mesh = jax.make_mesh((8,), ("x",))
    return S.by_hand(
        TABLES, mesh, {"a": S.row_wise(), "b": S.table_wise(3), "c": S.data_parallel()}
    )


def _batch(plan, seed):
    rng = np.random.default_rng(seed)
    blocks = [
        jaxembed.KeyedJagged.from_lists(
            {f: [list(rng.integers(0, 40, rng.integers(0, 4))) for _ in range(4)] for f in KEYS},
            capacity=32,
        )
        for _ in range(8)
    ]
    kj = S.put_features(blocks, plan)
    return kj.values, kj.lengths


def _fresh_process(script, folder, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_planned_collection_exports_and_loads_in_a_fresh_process(tmp_path):
    plan = _plan()
    params = S.init(jax.random.key(0), plan)

    def forward(params, values, lengths):
        kj = jaxembed.KeyedJagged.tree_unflatten(KEYS, (values, lengths, None))
        pooled, _ = S.embedding_bag_collection(params, kj, plan)
        return jaxembed.collections.concat_pooled(pooled, TABLES)

    inputs = _batch(plan, 0)
    art = jaxembed.serving.export(forward, params, *inputs)
    manifest = art.manifest()["mesh"]
    assert manifest["axis_names"] == ["x"] and manifest["devices"] == 8
    art.save(tmp_path / "art")
    with jaxembed.kernels.pure_jax():
        live = [np.asarray(jax.jit(forward)(params, *_batch(plan, s))) for s in range(3)]
    np.testing.assert_array_equal(np.asarray(art(*inputs)), live[0])
    for s in range(3):
        np.save(tmp_path / f"values{s}.npy", np.asarray(_batch(plan, s)[0]))
        np.save(tmp_path / f"lengths{s}.npy", np.asarray(_batch(plan, s)[1]))
        np.save(tmp_path / f"live{s}.npy", live[s])
    # a fresh process with 8 devices: the artifact and its tables, nothing of the model
    script = textwrap.dedent(
        """
        import sys, numpy as np, jax, jaxembed
        folder = sys.argv[1]
        served = jaxembed.serving.load(folder + "/art")
        for s in range(3):
            out = served(np.load(f"{folder}/values{s}.npy"), np.load(f"{folder}/lengths{s}.npy"))
            np.testing.assert_array_equal(np.asarray(out), np.load(f"{folder}/live{s}.npy"))
        placed = served._device_tables.values()  # the tables, placed by the first call
        print("equal", max(len(t.sharding.device_set) for t in placed))
        """
    )
    out = _fresh_process(script, tmp_path, devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["equal", "8"]
    # and a process with 2 devices is refused, naming the mesh it needs
    out = _fresh_process(script, tmp_path, devices=2)
    assert out.returncode != 0
    assert "placed on a mesh of 8 devices (axes {'x': 8}); this process has 2" in out.stderr


def test_a_row_sharded_table_exports_and_mixed_placements_are_refused():
    mesh = jax.make_mesh((1, 8), ("data", "model"))
    weight = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("model", None)))
    sharding = jaxembed.TableSharding(mesh, "model", None, "data")

    def lookup(p, i):
        return jaxembed.embedding(p, i, sharding=sharding)[0]

    ids = jnp.array([[1, 15, 3]])
    art = jaxembed.serving.export(lookup, {"weight": weight}, ids)
    assert art.manifest()["mesh"]["table_specs"] == {"weight": ["model", None]}
    np.testing.assert_array_equal(np.asarray(art(ids)), np.asarray(lookup({"weight": weight}, ids)))
    one = jnp.ones((3, 4))
    with pytest.raises(NotImplementedError, match=r"\['other'\] are on one device"):
        jaxembed.serving.export(lambda p, i: p["weight"][i], {"weight": weight, "other": one}, ids)
