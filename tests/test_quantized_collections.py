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


# -- TorchRec's quantized EmbeddingBagCollection (FBGEMM's TBE rows) ---------------------------


def _torchrec_quantized(tables, dtype, seed=0):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    import torch.ao.quantization as tq
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.quant.embedding_modules import QuantConfig

    from tests.torch_ref import torchrec_bag_configs

    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=torchrec_bag_configs(tables))
    with torch.no_grad():  # rows with a wide range, a constant row, a zero row
        for t in tables:
            w = ebc.embedding_bags[t.name].weight
            w.normal_(0, 3.0)
            w[0] = 0.25
            w[1] = 0.0
    ebc.qconfig = QuantConfig(
        activation=tq.PlaceholderObserver.with_args(dtype=torch.float),
        weight=tq.PlaceholderObserver.with_args(dtype=getattr(torch, dtype)),
    )
    return QuantEBC.from_float(ebc)


QUANT_TABLES = [
    jaxembed.EmbeddingBagConfig("a", 16, 30, ["fa", "fa2"]),
    jaxembed.EmbeddingBagConfig("b", 16, 7, ["fb"]),
    jaxembed.EmbeddingBagConfig("c", 8, 12, ["fc"], pooling="mean"),
]


@pytest.mark.parametrize("dtype,bits", [("qint8", 8), ("quint4x2", 4), ("quint2x4", 2)])
def test_torchrecs_quantized_collection_reads_in_and_pools_as_torchrec(dtype, bits):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    theirs = _torchrec_quantized(QUANT_TABLES, dtype)
    quantized = jaxembed.quantized.from_torchrec(theirs)
    assert {q.bits for q in quantized.values()} == {bits}
    ours = jaxembed.EmbeddingBagCollection.from_quantized(quantized, QUANT_TABLES)
    assert ours.bits == bits and set(ours.weights) == {"a+b", "c"}  # a and b stacked
    rng = np.random.default_rng(bits)
    keys = ["fa", "fa2", "fb", "fc"]
    rows = {"fa": 30, "fa2": 30, "fb": 7, "fc": 12}
    lists = {
        k: [rng.integers(0, rows[k], size=n).tolist() for n in rng.integers(0, 5, size=5)]
        for k in keys
    }
    lists["fc"][0] = []  # an empty mean bag: zeros in both
    lists["fa"][1] = [0, 0, 1]  # the constant row twice and the zero row
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor([i for k in keys for bag in lists[k] for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for k in keys for bag in lists[k]], dtype=torch.int64),
    )
    want = theirs(kjt).to_dict()
    got = nnx.jit(lambda m, kj: m(kj))(ours, jaxembed.KeyedJagged.from_lists(lists))
    for key in keys:
        np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-6, atol=1e-6)
    # every row decodes to TorchRec's own row
    for name, q in quantized.items():
        ids = torch.arange(q.num_embeddings)
        feature = next(t for t in QUANT_TABLES if t.name == name).feature_names[0]
        one = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=ids,
            lengths=torch.tensor(
                [1 if k == feature else 0 for k in keys for _ in range(q.num_embeddings)]
            ),
        )
        np.testing.assert_array_equal(
            jaxembed.dequantize(q)["weight"], theirs(one).to_dict()[feature].numpy()
        )


def test_tbe_rows_that_cannot_be_read_raise_naming_the_problem():
    rows = np.zeros((2, 16), np.uint8)
    with pytest.raises(ValueError, match="rows must be 2-D uint8"):
        jaxembed.quantized.from_tbe(rows.astype(np.int32), 8, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        jaxembed.quantized.from_tbe(rows, 8, 16)
    with pytest.raises(ValueError, match="not whole bytes"):
        jaxembed.quantized.from_tbe(rows, 4, 3)
    with pytest.raises(ValueError, match="bits"):
        jaxembed.quantized.from_tbe(rows, 3, 4)
    bad = rows.copy()
    bad[1, :2] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="row 1 has a scale or bias that is not finite"):
        jaxembed.quantized.from_tbe(bad, 8, 4)
    with pytest.raises(TypeError, match="TorchRec's quantized"):
        jaxembed.quantized.from_torchrec(object())
    q8 = jaxembed.quantized.from_tbe(rows, 8, 4)
    q4 = jaxembed.quantized.from_tbe(rows, 4, 4)
    tables = [
        jaxembed.EmbeddingBagConfig("x", 4, 2, ["fx"]),
        jaxembed.EmbeddingBagConfig("y", 4, 2, ["fy"]),
    ]
    with pytest.raises(ValueError, match="several formats"):
        jaxembed.EmbeddingBagCollection.from_quantized({"x": q8, "y": q4}, tables)
    with pytest.raises(KeyError, match="no table"):
        jaxembed.EmbeddingBagCollection.from_quantized({"x": q8}, tables)
    with pytest.raises(ValueError, match="its config"):
        jaxembed.EmbeddingBagCollection.from_quantized(
            {"x": q8, "y": jaxembed.quantized.from_tbe(np.zeros((3, 16), np.uint8), 8, 4)}, tables
        )
