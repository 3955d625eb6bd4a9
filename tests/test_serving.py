"""jaxembed.serving: exported forward passes, their artifacts, and the pytrees' serialization.

The oracle is the live function traced on the pure-JAX path (the kernels' reference), with the
same tables: the artifact must equal it bit for bit, at every batch size it serves.
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from jaxembed import serving

TABLES = [
    jaxembed.EmbeddingBagConfig("users", 8, 1000, ["user"]),
    jaxembed.EmbeddingBagConfig("items", 8, 500, ["item", "last_item"], padding_idx=0),
    jaxembed.EmbeddingBagConfig("tags", 4, 50, ["tag"], pooling="mean"),
]
KEYS = ("user", "item", "last_item", "tag")


def forward(tables, values, lengths):
    """A collection's pooled features, concatenated (TorchRec's KeyedTensor.values())."""
    features = jaxembed.KeyedJagged.from_lengths(KEYS, values, lengths)
    pooled, _ = jaxembed.embedding_bag_collection(tables, features, TABLES)
    return jaxembed.collections.concat_pooled(pooled, TABLES)


def batch(b: int, seed: int, capacity: int | None = None):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, (len(KEYS), b))
    rows = {"user": 1000, "item": 500, "last_item": 500, "tag": 50}
    values = np.concatenate(
        [rng.integers(0, rows[k], n.sum()) for k, n in zip(KEYS, lengths, strict=False)]
    )
    capacity = max(len(values), capacity or 1)
    padded = np.zeros(capacity, np.int32)
    padded[: len(values)] = values
    return jnp.asarray(padded), jnp.asarray(lengths.reshape(-1), jnp.int32)


def _params(kind):
    params = jaxembed.collections.init(jax.random.key(0), TABLES)
    if kind == "float32":
        return params
    if kind == "bfloat16":
        return jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    bits, fp8 = {"8bit": (8, None), "4bit": (4, None), "2bit": (2, None), "fp8": (8, "e4m3")}[kind]
    return {name: jaxembed.quantize(p, bits=bits, fp8=fp8) for name, p in params.items()}


def _live(params, *batches):
    """The oracle: the live function, traced anew on the pure-JAX path, on each batch."""
    with jaxembed.kernels.pure_jax():
        live = jax.jit(forward)
        return [np.asarray(live(params, *inputs)) for inputs in batches]


# bfloat16 tables: test_load_gives_back_the_same_artifact. 2-bit rows decode as 4-bit ones do
# (a float16 scale and bias), fp8's scale as 8-bit's (a float32): the README's command runs
# 4-bit (and the kernels' artifact float32), the slow tier the others
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("float32", marks=pytest.mark.slow),
        pytest.param("8bit", marks=pytest.mark.slow),
        "4bit",
        pytest.param("2bit", marks=pytest.mark.slow),
        pytest.param("fp8", marks=pytest.mark.slow),
    ],
)
def test_one_artifact_serves_every_batch_size_bit_for_bit(kind):
    params = _params(kind)
    b, c = serving.symbolic_shape("b, c")
    art = serving.export(
        forward,
        params,
        jax.ShapeDtypeStruct((c,), jnp.int32),
        jax.ShapeDtypeStruct((len(KEYS) * b,), jnp.int32),
    )
    assert next(str(a) for a in art.exported.out_avals).endswith("[b,28]")
    batches = [batch(1, 0, capacity=64), batch(33, 2)]  # padded and exact capacities
    for inputs, live in zip(batches, _live(params, *batches), strict=True):
        np.testing.assert_array_equal(np.asarray(art(*inputs)), live)


def test_the_artifact_holds_no_kernel_and_the_kernels_come_back():
    params = jaxembed.init(jax.random.key(0), 100, 4)
    bag = jax.jit(lambda p, ids: jaxembed.embedding_bag(p, ids, mode="sum")[0])
    ids = jnp.array([[1, 2, 3]])
    before = jaxembed.kernels.available()
    art = serving.export(bag, params, ids)
    assert art.kernels == ()
    assert "custom_call @jaxembed_" not in art.exported.mlir_module()
    assert jaxembed.kernels.available() == before
    if before:  # outside the export, the same jitted function lowers to the kernel again
        assert "jaxembed_bag_sum" in bag.lower(params, ids).as_text()


def test_a_saved_artifact_loads_in_a_process_without_jaxembed(tmp_path):
    params = _params("4bit")
    b, c = serving.symbolic_shape("b, c")
    art = serving.export(
        forward, params, jax.ShapeDtypeStruct((c,), jnp.int32),
        jax.ShapeDtypeStruct((len(KEYS) * b,), jnp.int32),
    )  # fmt: skip
    art.save(tmp_path / "model")
    values, lengths = batch(5, 7)
    np.save(tmp_path / "values.npy", values)
    np.save(tmp_path / "lengths.npy", lengths)
    np.save(tmp_path / "expected.npy", _live(params, (values, lengths))[0])
    code = f"""
import pathlib, sys
import jax, numpy as np
from safetensors.numpy import load_file
d = pathlib.Path({str(tmp_path)!r})
exported = jax.export.deserialize(bytearray((d / "model" / "model.jaxexport").read_bytes()))
tables = load_file(d / "model" / "tables.safetensors")
out = exported.call(tables, np.load(d / "values.npy"), np.load(d / "lengths.npy"))
np.testing.assert_array_equal(np.asarray(out), np.load(d / "expected.npy"))
assert not [m for m in sys.modules if m.startswith("jaxembed")], "jaxembed was imported"
print("served", out.shape)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["served", "(5,", "28)"]


def test_load_gives_back_the_same_artifact(tmp_path):
    params = _params("bfloat16")
    (b,) = serving.symbolic_shape("b", max_size=4096)
    art = serving.export(
        lambda t, ids: jaxembed.embedding_bag(t["tags"], ids, mode="mean")[0],
        params,
        jax.ShapeDtypeStruct((b, 5), jnp.int32),
    )
    art.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["constraints"] == ["b <= 4096"]
    assert manifest["inputs"] == ["int32[b,5]"]
    assert manifest["tables"] == {
        "tags/weight": ["bfloat16", [50, 4]],
        "users+items/weight": ["bfloat16", [1500, 8]],
    }
    loaded = serving.load(tmp_path)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (9, 5)), jnp.int32)
    np.testing.assert_array_equal(loaded(ids), art(ids))
    assert loaded.tables.keys() == art.tables.keys()


def test_a_loaded_artifact_is_called_inside_a_users_jit(tmp_path):
    """The first call of a loaded artifact may be inside the caller's own jit (a server that
    jits its request handler): the tables are placed once, concretely, not kept as a tracer."""
    params = _params("float32")
    b, c = serving.symbolic_shape("b, c")
    specs = (jax.ShapeDtypeStruct((c,), jnp.int32), jax.ShapeDtypeStruct((4 * b,), jnp.int32))
    serving.export(forward, params, *specs).save(tmp_path)
    served = serving.load(tmp_path)
    handler = jax.jit(lambda v, n: served(v, n) * 2)
    one, two = batch(3, seed=1, capacity=16), batch(5, seed=2, capacity=16)
    want = _live(params, one, two)
    np.testing.assert_array_equal(handler(*one), 2 * want[0])
    np.testing.assert_array_equal(served(*two), want[1])  # eagerly after: no leaked tracer
    np.testing.assert_array_equal(handler(*two), 2 * want[1])


def test_calls_at_one_shape_compile_once():
    params = jaxembed.init(jax.random.key(0), 100, 4)
    (b,) = serving.symbolic_shape("b")
    art = serving.export(
        lambda p, ids: jaxembed.embedding(p, ids)[0], params, jax.ShapeDtypeStruct((b,), jnp.int32)
    )
    art(jnp.arange(3))
    art(jnp.arange(3) + 1)
    assert art._call._cache_size() == 1
    art(jnp.arange(5))
    assert art._call._cache_size() == 2


def _saved(tmp_path):
    params = jaxembed.init(jax.random.key(0), 100, 4)
    art = serving.export(lambda p, ids: jaxembed.embedding(p, ids)[0], params, jnp.arange(3))
    art.save(tmp_path)
    return art


@pytest.mark.parametrize("damage", ["truncate_model", "flip_table_byte", "drop_manifest"])
def test_a_damaged_artifact_is_refused_naming_the_file(tmp_path, damage):
    _saved(tmp_path)
    if damage == "truncate_model":
        path = tmp_path / "model.jaxexport"
        path.write_bytes(path.read_bytes()[:-10])
        match, error = "model.jaxexport does not match", ValueError
    elif damage == "flip_table_byte":
        path = tmp_path / "tables.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
        match, error = "tables.safetensors does not match", ValueError
    else:
        (tmp_path / "manifest.json").unlink()
        match, error = "manifest.json is missing", FileNotFoundError
    with pytest.raises(error, match=match):
        serving.load(tmp_path)


def test_a_save_over_an_artifact_first_removes_its_manifest(tmp_path, monkeypatch):
    art = _saved(tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(jaxembed._interop, "write_arrays", fail)
    with pytest.raises(OSError, match="disk full"):
        art.save(tmp_path)
    # the half-written save is never loaded as if whole
    with pytest.raises(FileNotFoundError, match="save did not finish"):
        serving.load(tmp_path)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="max_size"):
        serving.symbolic_shape("b", max_size=2**31)
    with pytest.raises(ValueError, match="max_size"):
        serving.symbolic_shape("b", max_size=0)


@functools.cache
def _pytrees():
    """Each public pytree, built when a test first asks (not at collection, in every worker)."""
    params = jaxembed.init(jax.random.key(0), 10, 4)
    bags, bag_lookup = jaxembed.sparse.lookup_bags(
        params, jnp.array([1, 2, 3]), jnp.array([0, 2]), mode="sum"
    )
    _rows, row_lookup = jaxembed.sparse.lookup(params, jnp.array([1, 1]), max_norm=1.0)
    weight = params["weight"]
    collisions = jaxembed.collisions
    mc = collisions.ManagedCollision("distance_lfu", 1)
    tables = [jaxembed.EmbeddingBagConfig("t", 4, 8, ["u", "v"])]
    mcc = collisions.ManagedCollisionCollection({"t": mc}, tables)
    raw = collisions.RawKeyedJagged.from_lists(
        {"u": [[2**62], []], "v": [[1], [2]]}, weights={"u": [[0.5], []], "v": [[1.0], [2.0]]}
    )
    return {
        "KeyedJagged": jaxembed.KeyedJagged.from_lists({"a": [[1, 2], []], "b": [[3], [4]]}),
        "KeyedJagged with weights": jaxembed.KeyedJagged.from_lists(
            {"a": [[1], [2]]}, weights={"a": [[0.5], [2.0]]}
        ),
        "QuantizedTable 4-bit": jaxembed.quantize(params, bits=4).with_output_dtype(jnp.bfloat16),
        "QuantizedTable fp8": jaxembed.quantize(params, fp8="e5m2"),
        "Jagged": jaxembed.collections.Jagged(jnp.ones((3, 2)), jnp.array([1, 2])),
        "SparseGrad": jaxembed.sparse.SparseGrad(jnp.array([1]), jnp.ones((1, 4))),
        "SparseGrad of bags": bag_lookup.grad(jnp.ones_like(bags)),
        "SparseLookup": row_lookup,
        "BagLookup": bag_lookup,
        "SgdState": jaxembed.sparse.sgd(0.1, momentum=0.9).init(weight),
        "AdagradState": jaxembed.sparse.adagrad(0.1).init(weight),
        "RowwiseAdagradState": jaxembed.sparse.rowwise_adagrad(0.1).init(weight),
        "LazyAdamState": jaxembed.sparse.lazy_adam(0.1).init(weight),
        "RawIds": collisions.raw_ids([2**40 + 3, 7]),
        "CollisionState LFU": collisions.ManagedCollision("lfu").init(4, 2),
        "CollisionState LRU": collisions.ManagedCollision("lru").init(4, 2),
        "Remapped": mc.remap(mc.init(4, 2), [5, 2**40]),
        "RawKeyedJagged": raw,
        "RemappedFeatures": mcc.remap(mcc.init(4), raw),
    }


PYTREES = (
    "KeyedJagged",
    "KeyedJagged with weights",
    "QuantizedTable 4-bit",
    "QuantizedTable fp8",
    "Jagged",
    "SparseGrad",
    "SparseGrad of bags",
    "SparseLookup",
    "BagLookup",
    "SgdState",
    "AdagradState",
    "RowwiseAdagradState",
    "LazyAdamState",
    "RawIds",
    "CollisionState LFU",
    "CollisionState LRU",
    "Remapped",
    "RawKeyedJagged",
    "RemappedFeatures",
)


@pytest.mark.parametrize("name", PYTREES)
def test_public_pytrees_cross_an_exported_boundary(name):
    assert sorted(_pytrees()) == sorted(PYTREES)
    obj = _pytrees()[name]
    exported = jax.export.export(jax.jit(lambda x: x))(obj)
    back = jax.export.deserialize(exported.serialize())
    out = back.call(obj)
    assert jax.tree.structure(out) == jax.tree.structure(obj)
    assert type(out) is type(obj)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(obj), strict=True):
        np.testing.assert_array_equal(a, b)


needs_kernels = pytest.mark.skipif(
    not jaxembed.kernels.available(), reason=f"kernels: {jaxembed.kernels.status()}"
)


@needs_kernels
@pytest.mark.parametrize("kind", ["float32", "8bit", pytest.param("2bit", marks=pytest.mark.slow)])
def test_a_kernels_artifact_equals_the_live_kernels_bit_for_bit(kind, tmp_path):
    params = _params(kind)
    b, c = serving.symbolic_shape("b, c")
    art = serving.export(
        forward, params, jax.ShapeDtypeStruct((c,), jnp.int32),
        jax.ShapeDtypeStruct((len(KEYS) * b,), jnp.int32), kernels=True,
    )  # fmt: skip
    assert art.kernels == ("jaxembed_bag_sum",)
    art.save(tmp_path)
    loaded = serving.load(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["kernels"] == ["jaxembed_bag_sum"]
    live = jax.jit(forward)
    for inputs in (batch(1, 0, capacity=64), batch(33, 2)):
        np.testing.assert_array_equal(loaded(*inputs), live(params, *inputs))


@needs_kernels
def test_a_kernels_artifact_is_refused_where_the_kernels_do_not_run(tmp_path):
    params = jaxembed.init(jax.random.key(0), 100, 4)
    art = serving.export(
        lambda p, ids: jaxembed.embedding_bag(p, ids, mode="sum")[0],
        params,
        jnp.zeros((2, 3), jnp.int32),
        kernels=True,
    )
    art.save(tmp_path)
    code = f"import jaxembed\njaxembed.serving.load({str(tmp_path)!r})\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "JAXEMBED_KERNELS": "0"},
    )
    assert result.returncode != 0
    assert "calls jaxembed's CPU kernels ['jaxembed_bag_sum']" in result.stderr
    assert "export with kernels=False" in result.stderr


def test_kernels_true_needs_the_kernels():
    params = jaxembed.init(jax.random.key(0), 100, 4)
    with jaxembed.kernels.pure_jax(), pytest.raises(RuntimeError, match="runs no kernels"):
        serving.export(
            lambda p, i: jaxembed.embedding(p, i)[0], params, jnp.arange(3), kernels=True
        )
