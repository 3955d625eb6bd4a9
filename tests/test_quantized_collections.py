"""Collections over quantized tables: every feature's bags (or rows) are its own table's
quantized lookup, which tests/test_quantized_lookup.py checks against torch and FBGEMM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxembed

TABLES = [
    jaxembed.EmbeddingBagConfig("a", 16, 40, ["f0", "f1"], pooling="sum", padding_idx=3),
    jaxembed.EmbeddingBagConfig("b", 16, 25, ["f2"], pooling="sum"),
    jaxembed.EmbeddingBagConfig("c", 8, 30, ["f3"], pooling="max"),
    jaxembed.EmbeddingBagConfig("d", 8, 10, ["f4"], pooling="mean"),
]


def _features(rng, tables, batch=6):
    lists = {}
    for t in tables:
        for f in t.feature_names:
            lists[f] = [
                list(rng.integers(0, t.num_embeddings, rng.integers(0, 5))) for _ in range(batch)
            ]
    return jaxembed.KeyedJagged.from_lists(lists), lists


# the collection reads its stacks through the core's one quantized path, whose decoding per
# format tests/test_quantized_lookup.py covers: one format here
@pytest.mark.parametrize("bits", [4])
def test_pooled_features_are_each_tables_quantized_bags(bits, rng):
    params = jaxembed.collections.init(jax.random.key(bits), TABLES)
    qparams = {name: jaxembed.quantize(p, bits=bits) for name, p in params.items()}
    kj, lists = _features(rng, TABLES)
    pooled = jax.jit(lambda p, kj: jaxembed.embedding_bag_collection(p, kj, TABLES)[0])(qparams, kj)
    per_table = jaxembed.collections.tables_of(params, TABLES)
    for t in TABLES:
        q = jaxembed.quantize(per_table[t.name], bits=bits)  # row-wise: the stack's own rows
        for f in t.feature_names:
            ids, offsets, n = jaxembed.pad_bags(lists[f])
            ref = jaxembed.embedding_bag(q, ids, offsets, mode=t.pooling, num_valid=n,
                                         padding_idx=t.padding_idx)[0]  # fmt: skip
            assert pooled[f].dtype == jnp.float32
            if (
                bits == 8
            ):  # XLA may fuse an 8-bit decode into a multiply-add in one and not the other
                np.testing.assert_allclose(
                    np.asarray(pooled[f]), np.asarray(ref), rtol=2e-6, atol=2e-6
                )
            else:
                np.testing.assert_array_equal(np.asarray(pooled[f]), np.asarray(ref))
    # the bf16 output, and a stack given as {"weight": q}
    half = {n: {"weight": q.with_output_dtype(jnp.bfloat16)} for n, q in qparams.items()}
    out = jaxembed.embedding_bag_collection(half, kj, TABLES)[0]
    for f in out:
        np.testing.assert_array_equal(
            np.asarray(out[f]), np.asarray(pooled[f].astype(jnp.bfloat16))
        )


def test_sequence_features_are_each_tables_quantized_rows(rng):
    tables = [
        jaxembed.EmbeddingConfig("s", 8, 20, ["u", "v"]),
        jaxembed.EmbeddingConfig("r", 4, 9, ["w"]),
    ]
    params = jaxembed.collections.init(jax.random.key(0), tables)
    qparams = {name: jaxembed.quantize(p, bits=4) for name, p in params.items()}
    kj, lists = _features(rng, tables)
    rows = jaxembed.embedding_collection(qparams, kj, tables)[0]
    per_table = jaxembed.collections.tables_of(params, tables)
    for t in tables:
        q = jaxembed.quantize(per_table[t.name], bits=4)
        for f in t.feature_names:
            flat = np.concatenate(
                [np.asarray(x, np.int64) for x in lists[f]] + [np.zeros(0, np.int64)]
            )
            ref = jaxembed.embedding(q, flat)[0]
            np.testing.assert_array_equal(np.asarray(rows[f].values[: len(flat)]), np.asarray(ref))


def test_quantized_collections_are_frozen(rng):
    params = jaxembed.collections.init(jax.random.key(0), TABLES)
    qparams = {name: jaxembed.quantize(p, bits=4) for name, p in params.items()}
    kj, _ = _features(rng, TABLES)
    with pytest.raises(TypeError, match="frozen"):
        jaxembed.collections.lookup(qparams, kj, TABLES)  # the sparse lookup trains the tables
    renormed = [jaxembed.EmbeddingBagConfig("a", 16, 40, ["f0"], max_norm=1.0)]
    q = {
        n: jaxembed.quantize(p, bits=8)
        for n, p in jaxembed.collections.init(jax.random.key(1), renormed).items()
    }
    kj1 = jaxembed.KeyedJagged.from_lists({"f0": [[1, 2]]})
    with pytest.raises(ValueError, match="max_norm needs a trainable table"):
        jaxembed.embedding_bag_collection(q, kj1, renormed)


@pytest.mark.parametrize("fp8", ["e5m2"])  # (the stacks read as any quantized table does)
def test_a_collection_module_quantizes_to_a_frozen_one(fp8, rng):
    ebc = jaxembed.EmbeddingBagCollection(TABLES, rngs=nnx.Rngs(0))
    bits = 8 if fp8 else 4
    frozen = ebc.quantize(bits, fp8=fp8)
    assert (frozen.bits, frozen.fp8) == (bits, fp8) and not nnx.state(frozen, nnx.Param)
    assert all(isinstance(v, jaxembed.QuantizedWeight) for v in frozen.weights.values())
    kj, _ = _features(rng, TABLES)
    params = {n: {"weight": v.get_value()} for n, v in ebc.weights.items()}
    qparams = {n: jaxembed.quantize(p, bits=bits, fp8=fp8) for n, p in params.items()}
    ref = jaxembed.embedding_bag_collection(qparams, kj, TABLES)[0]
    out = nnx.jit(lambda m, kj: m(kj))(frozen, kj)
    for f in ref:
        np.testing.assert_array_equal(np.asarray(out[f]), np.asarray(ref[f]))
    with pytest.raises(ValueError, match="already quantized"):
        frozen.quantize()


def test_a_sequence_collection_module_quantizes_too(rng):
    tables = [jaxembed.EmbeddingConfig("s", 8, 20, ["u"])]
    frozen = jaxembed.EmbeddingCollection(tables, rngs=nnx.Rngs(0))
    q = jaxembed.quantize(frozen.tables()["s"], bits=2)
    frozen = frozen.quantize(2)
    kj = jaxembed.KeyedJagged.from_lists({"u": [[1, 2], [3]]})
    rows = frozen(kj)["u"].values[:3]
    ref = jaxembed.embedding(q, np.array([1, 2, 3]))[0]
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(ref))
