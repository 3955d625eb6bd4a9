"""Sharding: the 8-device suite in its own process, and what one device can check here."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from jax.sharding import PartitionSpec as P

import jaxembed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _multidevice(marks: str, *, files: tuple[str, ...] = ("tests/multidevice",)) -> None:
    """``tests/multidevice`` (or the paths and ``--ignore=`` options of ``files``) with 8 fake
    CPU devices, the tests that ``marks`` selects: XLA_FLAGS must be set before JAX starts, so
    it runs in a fresh process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    # the property tests there run at this run's hypothesis profile (default, ci or deep)
    profile = f"--hypothesis-profile={settings.get_current_profile_name()}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", profile]
        + ["-m", marks, *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-20000:] + _fatal_error(result.stderr)
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


def _fatal_error(stderr: str) -> str:
    """The end of ``stderr``, and where a crash was reported, the start of faulthandler's report
    (the faulting thread comes first there: a report's end holds only the main thread)."""
    at = stderr.find("Fatal Python error")
    head = stderr[at : at + 12000] + "\n[...]\n" if at >= 0 else ""
    return head + stderr[-5000:]


# the mesh properties (random placements and uneven table-wise groups train as on one device:
# the net under the wrong-gradient fix) run in the README's command; the rest of the 8-device
# suite, a 5-minute process, runs with -m slow (CI runs it)
MESH_PROPERTIES = "tests/multidevice/test_mesh_properties.py"


def test_mesh_properties_on_8_fake_cpu_devices():
    _multidevice("not slow", files=(MESH_PROPERTIES,))


@pytest.mark.slow
def test_multidevice_suite_on_8_fake_cpu_devices():
    """The rest of the 8-device suite (``-m slow``: CI runs it, the README's command does not)."""
    _multidevice("not slow", files=("tests/multidevice", f"--ignore={MESH_PROPERTIES}"))


@pytest.mark.slow
def test_multidevice_scale_tests_on_8_fake_cpu_devices():
    """The 8-device tests at scale (``-m slow``: CI runs them, the README's command does not)."""
    _multidevice("slow")


def test_one_device_mesh_equals_unsharded():
    """A 1-device mesh runs the same shard_map program: a quick check in the main process."""
    layout = jaxembed.TableSharding(jax.make_mesh((1, 1), ("data", "model")), "model", None, "data")
    weight = jax.random.normal(jax.random.key(0), (10, 3))
    ids = np.array([[1, 9, 1], [0, 3, 3]])

    def loss(p, sharding):
        out, new = jaxembed.embedding(p, ids, max_norm=1.0, padding_idx=3, sharding=sharding)
        return (out**2).sum(), (out, new)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, (out, new)), grad = grad_fn(layout.put({"weight": weight}), layout)
    (_, (ref, ref_new)), ref_grad = grad_fn({"weight": weight}, None)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(new["weight"], ref_new["weight"])
    np.testing.assert_allclose(grad["weight"], ref_grad["weight"], rtol=1e-6)


def test_table_sharding_specs():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    layout = jaxembed.TableSharding(mesh, vocab="model", dim=None, batch="data")
    assert layout.spec == P("model", None)
    assert layout.indices_spec(2) == P("data", None)
    assert layout.indices_spec(0) == P()
    assert layout.output_spec(2) == P("data", None, None)
    assert layout.count("vocab") == 1
    assert jaxembed.TableSharding(mesh, vocab=("data", "model")).spec == P(("data", "model"), None)
    padded = layout.pad_vocab({"weight": jnp.ones((5, 2))})
    assert padded["weight"].shape == (5, 2)  # one vocab shard: nothing to pad


def test_bad_table_shardings():
    mesh = jax.make_mesh((1,), ("model",))
    with pytest.raises(ValueError, match="distinct mesh axes"):
        jaxembed.TableSharding(mesh, vocab="model", batch="model")
    with pytest.raises(TypeError, match="mesh must be"):
        jaxembed.TableSharding("model", vocab="model")
    with pytest.raises(TypeError, match="batch must be a mesh axis name"):
        jaxembed.TableSharding(mesh, batch=["model", 1])
    with pytest.raises(ValueError, match="dim='cols' names no axis"):
        jaxembed.embedding(
            {"weight": jnp.ones((4, 2))},
            jnp.array([1]),
            sharding=jaxembed.TableSharding(mesh, dim="cols"),
        )
    with pytest.raises(TypeError, match="optimizer must be a jaxembed"):
        jaxembed.sparse.sharded(object(), jaxembed.TableSharding(mesh, vocab="model"))


@pytest.mark.parametrize("kind", ["row_wise", "table_wise", "data_parallel", "column_wise"])
def test_the_bytes_stated_for_one_device_are_the_compiled_ones(kind):
    # one device: XLA drops the all-to-alls, and keeps the all-reduces and all-gathers
    from jaxembed import sharding as S

    e = jaxembed.EmbeddingBagConfig
    tables = [e("a", 16, 40, ["fa"]), e("b", 16, 50, ["fb"], max_norm=1.0),
              e("c", 16, 30, ["fc"], scale_grad_by_freq=True)]  # fmt: skip
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    place = {"row_wise": S.row_wise(), "table_wise": S.table_wise(0),
             "data_parallel": S.data_parallel(), "column_wise": S.column_wise()}[kind]  # fmt: skip
    plan = S.by_hand(tables, mesh, {t.name: place for t in tables})
    block = {"fa": [[1, 2], [3]], "fb": [[4], [5, 6]], "fc": [[1], [1]]}
    features = S.put_features([jaxembed.KeyedJagged.from_lists(block, capacity=16)], plan)
    params = S.init(jax.random.key(0), plan)
    weights = tuple(params[g.name]["weight"] for g in plan.groups)
    lowered = S._collection._collection.lower(weights, features, plan=plan, sparse=True)
    _, lk = S.lookup(params, features, plan)
    cot = {f: jnp.ones((2, 16)) for f in features.keys}
    grad = S._collection._grads.lower(cot, lk.pieces, plan=plan, keys=features.keys)
    stated = S.step_bytes(plan, features)
    assert S.collective_bytes(lowered.compile().as_text()) == stated["lookup"]
    assert S.collective_bytes(grad.compile().as_text()) == stated["grad"]
    assert "all-to-all" not in stated["lookup"]


def test_row_wise_ownership_mod_or_block_places_each_row_once():
    """A row-wise group's rows: ``mod`` puts stacked row ``r`` on device ``r % K``, ``block``
    on device ``r // R`` (TorchRec's contiguous blocks); either way every row of every table
    has one place in the array, and a bad ownership is refused by name."""
    import jax

    from jaxembed import sharding as S

    mesh = jax.make_mesh((1,), ("x",))
    tables = [jaxembed.EmbeddingBagConfig("a", 4, 10, ["fa"]),
              jaxembed.EmbeddingBagConfig("b", 4, 7, ["fb"])]  # fmt: skip
    for own in ("mod", "block"):
        p = S.row_wise(own)
        assert p.ownership == own
        g = S.by_hand(tables, mesh, {t.name: p for t in tables}).groups[0]
        g = dataclasses.replace(g, devices=3, rows=6)  # 17 rows over 3 devices
        rows = np.concatenate([g.rows_of("a"), g.rows_of("b")])
        assert len(set(rows.tolist())) == 17 and rows.max() < 18
        owner, local = g.owner_of(np.arange(17))
        np.testing.assert_array_equal(owner * 6 + local, rows)
        if own == "block":
            np.testing.assert_array_equal(owner, np.arange(17) // 6)
        else:
            np.testing.assert_array_equal(owner, np.arange(17) % 3)
    assert repr(S.row_wise("block")) == "Placement('row_wise', ownership='block')"
    assert repr(S.row_wise()) == "Placement('row_wise')"
    with pytest.raises(ValueError, match="ownership must be one of"):
        S.row_wise("stripes")
    with pytest.raises(ValueError, match="ownership is for row_wise placements only"):
        S.Placement("table_wise", 1, ownership="block")
