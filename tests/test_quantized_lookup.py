"""Lookups and bags on quantized tables, against torch's quantized ops and FBGEMM's IntNBit TBE.

References, on the same bytes:

* sum: torch's ``quantized::embedding_bag_{byte,4bit,2bit}_rowwise_offsets`` (FBGEMM's CPU
  kernels) and FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` (4 and 2 bits: its rows are
  torch's with the float16 scale and bias moved to the front);
* mean: FBGEMM's TBE ``PoolingMode.MEAN``; torch's ops ignore ``mode`` and always sum
  (``shared/reference/torch-semantics.md``), so against them mean is their sum over the count;
* max, padding, ``num_valid``: torch's ``F.embedding_bag`` on torch's own unpacked table.

The references round differently from jaxembed (and from each other): FBGEMM accumulates
``fma(w * scale, code, acc + w * bias)``, jaxembed ``acc + w * (code * scale + bias)``, and
torch's float bag sums in its own order. All are float32 sums of the same terms, each within
``n * eps * sum |term|`` of the exact sum, so they are asserted within twice that. Against
jaxembed's own float path on the dequantized table, which decodes each row as the lookup does,
every mode and option is bit for bit.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jaxembed

FP8_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
FP8_TOP = {"e4m3": 448.0, "e5m2": 57344.0}
PRE = {8: "byte", 4: "4bit", 2: "2bit"}
EPS = float(np.finfo(np.float32).eps)


def _packed(rng, rows, dim, bits):
    x = rng.normal(size=(rows, dim)).astype(np.float32) * rng.uniform(0.01, 10, (rows, 1))
    x = x.astype(np.float32)
    x[1] = 0.75  # a constant row
    packed = getattr(torch.ops.quantized, f"embedding_bag_{PRE[bits]}_prepack")(torch.from_numpy(x))
    return packed.numpy(), jaxembed.QuantizedTable.from_bytes(packed.numpy(), bits, dim)


def _terms(packed, bits, dim, ids, psw):
    """``|w| * (|code * scale| + |bias|)`` per entry: what the summation bound scales with."""
    width = dim if bits == 8 else dim * bits // 8
    tail = packed[:, width:]
    sb = tail.view(np.float32) if bits == 8 else tail.view(np.float16).astype(np.float32)
    top = (1 << bits) - 1
    size = np.abs(sb[:, 0]) * top + np.abs(sb[:, 1])
    w = np.ones(len(ids), np.float32) if psw is None else np.abs(psw)
    return w * size[ids]


def _bags(rng, rows, n, num_bags):
    """Skewed ids (Zipf: duplicates), ragged bags with empty ones, as 1-D ids and offsets."""
    ids = (rng.zipf(1.3, n) - 1) % rows
    cuts = np.sort(rng.integers(0, n + 1, num_bags - 1))
    offsets = np.concatenate([[0], cuts]).astype(np.int64)
    return ids.astype(np.int64), offsets


def _bag_of(offsets, n):
    return np.searchsorted(offsets, np.arange(n), side="right") - 1


def _bound(terms, offsets, n):
    bag = _bag_of(offsets, n)
    total = np.bincount(bag, terms, minlength=len(offsets))
    count = np.bincount(bag, minlength=len(offsets))
    return 2 * (count + 1) * EPS * total


@pytest.mark.parametrize("bits,dim", [(8, 72), (4, 72), (2, 8)])  # D = 72: not a multiple of 16
@pytest.mark.parametrize("weighted", [False, True])
def test_sum_equals_torchs_quantized_bag(bits, dim, weighted, rng):
    packed, q = _packed(rng, 300, dim, bits)
    ids, offsets = _bags(rng, 300, 700, 60)
    psw = rng.normal(size=len(ids)).astype(np.float32) if weighted else None
    op = getattr(torch.ops.quantized, f"embedding_bag_{PRE[bits]}_rowwise_offsets")
    for last in (False, True):
        off = np.append(offsets, len(ids)) if last else offsets
        ref = op(torch.from_numpy(packed), torch.from_numpy(ids), torch.from_numpy(off), mode=0,
                 per_sample_weights=None if psw is None else torch.from_numpy(psw),
                 include_last_offset=last).numpy()  # fmt: skip
        bags = jax.jit(
            lambda q, i, o, p, last=last: jaxembed.embedding_bag(
                q, i, o, mode="sum", per_sample_weights=p, include_last_offset=last
            )[0]
        )(q, ids, off, psw)
        assert bags.dtype == jnp.float32 and bags.shape == (60, dim)
        bound = _bound(_terms(packed, bits, dim, ids, psw), offsets, len(ids))
        assert np.all(np.abs(np.asarray(bags) - ref) <= bound[:, None])


def _tbe(packed, bits, dim, mode):
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    ty = {4: SparseType.INT4, 2: SparseType.INT2}[bits]
    pooling = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}[mode]
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [("t", packed.shape[0], dim, ty, EmbeddingLocation.HOST)],
        device="cpu",
        pooling_mode=pooling,
        output_dtype=SparseType.FP32,
    )
    tbe.fill_random_weights()
    codes, scale_shift = tbe.split_embedding_weights()[0]
    width = dim * bits // 8
    codes.copy_(torch.from_numpy(packed[:, :width]))  # the same bytes, the tail to the front
    scale_shift.copy_(torch.from_numpy(packed[:, width:]))
    return tbe


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bags_equal_fbgemms_intnbit_tbe(bits, mode, rng):
    dim = 32
    packed, q = _packed(rng, 400, dim, bits)
    ids, offsets = _bags(rng, 400, 900, 64)
    csr = np.append(offsets, len(ids))
    tbe = _tbe(packed, bits, dim, mode)
    it, ot = torch.from_numpy(ids).int(), torch.from_numpy(csr).int()
    ours = jaxembed.embedding_bag(q, ids, csr, mode=mode, include_last_offset=True)[0]
    bound = _bound(_terms(packed, bits, dim, ids, None), offsets, len(ids))
    if mode == "mean":
        bound = bound / np.maximum(np.diff(csr), 1)
    assert np.all(np.abs(np.asarray(ours) - tbe(it, ot).numpy()) <= bound[:, None])
    if mode == "sum":
        psw = rng.normal(size=len(ids)).astype(np.float32)
        ref = tbe(it, ot, per_sample_weights=torch.from_numpy(psw)).numpy()
        ours = jaxembed.embedding_bag(
            q, ids, csr, mode="sum", per_sample_weights=psw, include_last_offset=True
        )[0]
        bound = _bound(_terms(packed, bits, dim, ids, psw), offsets, len(ids))
        assert np.all(np.abs(np.asarray(ours) - ref) <= bound[:, None])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_mean_is_torchs_sum_over_the_count(bits, rng):
    packed, q = _packed(rng, 200, 16, bits)
    ids, offsets = _bags(rng, 200, 500, 40)
    op = getattr(torch.ops.quantized, f"embedding_bag_{PRE[bits]}_rowwise_offsets")
    total = op(torch.from_numpy(packed), torch.from_numpy(ids), torch.from_numpy(offsets)).numpy()
    count = np.bincount(_bag_of(offsets, len(ids)), minlength=40)
    ours = np.asarray(jaxembed.embedding_bag(q, ids, offsets, mode="mean")[0])
    bound = _bound(_terms(packed, bits, 16, ids, None), offsets, len(ids))
    assert np.all(np.abs(ours - total / np.maximum(count, 1)[:, None]) <= bound[:, None])
    assert np.all(ours[count == 0] == 0)


@pytest.mark.parametrize("bits", [8, 4])  # (2 bits decode through 4 bits' code)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_padding_2d_and_num_valid_follow_torchs_float_bag_on_its_unpacked_table(bits, mode, rng):
    packed, q = _packed(rng, 100, 16, bits)
    table = getattr(torch.ops.quantized, f"embedding_bag_{PRE[bits]}_unpack")(
        torch.from_numpy(packed)
    )
    ids = torch.from_numpy(rng.integers(0, 100, (20, 7)))
    ids[3] = 5  # an all-padding bag
    ref = torch.nn.functional.embedding_bag(ids, table, mode=mode, padding_idx=5).numpy()
    ours = np.asarray(jaxembed.embedding_bag(q, ids.numpy(), mode=mode, padding_idx=5)[0])
    tol = 4 * EPS * np.abs(table.numpy()).max() * 7  # 7 entries a bag, summed in float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    # the same bags from ids with offsets, padded to a capacity: the same numbers exactly
    flat, offsets, n = jaxembed.pad_bags([list(r) for r in ids.numpy()], capacity=256)
    again = jaxembed.embedding_bag(q, flat, offsets, mode=mode, padding_idx=5, num_valid=n)[0]
    np.testing.assert_array_equal(np.asarray(again), ours)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_lookups_equal_the_float_path_on_the_dequantized_table(bits, rng):
    """The rows are decoded as dequantize decodes them, so every mode and option gives the float
    path's numbers (itself checked against torch): bit for bit at 4 and 2 bits. At 8 bits XLA
    may contract a decode's multiply-add into a fused one inside the bag's loop: one rounding
    per entry apart."""
    packed, q = _packed(rng, 150, 24, bits)
    w = jaxembed.dequantize(q)
    ids, offsets = _bags(rng, 150, 400, 30)
    psw = rng.normal(size=len(ids)).astype(np.float32)
    for mode in ("sum", "mean", "max"):
        weights = psw if mode == "sum" else None
        kw = dict(mode=mode, padding_idx=2, per_sample_weights=weights)
        ours = np.asarray(jaxembed.embedding_bag(q, ids, offsets, **kw)[0])
        ref = np.asarray(jaxembed.embedding_bag(w, ids, offsets, **kw)[0])
        if bits == 8:
            bound = _bound(_terms(packed, bits, 24, ids, weights), offsets, len(ids))
            assert np.all(np.abs(ours - ref) <= bound[:, None])
        else:
            np.testing.assert_array_equal(ours, ref)
    two = ids[:392].reshape(56, 7)
    rows = np.asarray(jaxembed.embedding(q, two)[0])
    ref = np.asarray(jaxembed.embedding(w, two)[0])
    if bits == 8:  # one rounding: |error| <= eps * (|code * scale| + |bias|)
        bound = EPS * _terms(packed, 8, 24, two.reshape(-1), None).reshape(56, 7, 1)
        assert np.all(np.abs(rows - ref) <= bound)
    else:
        np.testing.assert_array_equal(rows, ref)

    # the per-sample weights' gradient is the float path's too (the table itself is frozen)
    def loss(table, p):
        return jaxembed.embedding_bag(table, ids, offsets, mode="sum", per_sample_weights=p)[
            0
        ].sum()

    grads = [np.asarray(jax.grad(loss, argnums=1)(t, psw)) for t in (q, w)]
    if bits == 8:  # each weight's gradient is its row's sum over D = 24 columns
        bound = 2 * 25 * EPS * _terms(packed, 8, 24, ids, None)
        assert np.all(np.abs(grads[0] - grads[1]) <= bound)
    else:
        np.testing.assert_array_equal(*grads)


@pytest.mark.parametrize(
    "bits,output_dtype", [(8, None), (4, jnp.float16), (2, jnp.bfloat16), (8, jnp.bfloat16)]
)
def test_embedding_returns_torchs_unpacked_rows(bits, output_dtype, rng):
    packed, q = _packed(rng, 50, 16, bits)
    table = getattr(torch.ops.quantized, f"embedding_bag_{PRE[bits]}_unpack")(
        torch.from_numpy(packed)
    ).numpy()
    ids = rng.integers(0, 50, (4, 9))
    out = jax.jit(lambda q, i: jaxembed.embedding(q, i, output_dtype=output_dtype)[0])(q, ids)
    f32 = np.asarray(jaxembed.embedding(q, ids)[0])
    atol = 0 if bits != 8 else 2 * EPS * np.abs(table).max()  # torch's unpack is an FMA
    np.testing.assert_allclose(f32, table[ids], rtol=0, atol=atol)
    assert out.dtype == (output_dtype or jnp.float32) and out.shape == (4, 9, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(f32).astype(out.dtype)))
    bags = jaxembed.embedding_bag(q, ids, mode="mean", output_dtype=output_dtype)[0]
    ref = np.asarray(jaxembed.embedding_bag(q, ids, mode="mean")[0])
    np.testing.assert_array_equal(np.asarray(bags), np.asarray(jnp.asarray(ref).astype(out.dtype)))


def test_out_of_range_ids_under_jit_give_nan_and_concrete_ones_raise(rng):
    _, q = _packed(rng, 20, 8, 4)
    ids = jnp.array([1, 20, 3, -1])
    bags = jax.jit(
        lambda q, i: jaxembed.embedding_bag(q, i, jnp.array([0, 1, 2, 3]), mode="sum")[0]
    )(q, ids)
    assert np.isnan(np.asarray(bags[1])).all() and np.isnan(np.asarray(bags[3])).all()
    assert np.isfinite(np.asarray(bags)[[0, 2]]).all()
    rows = jax.jit(lambda q, i: jaxembed.embedding(q, i)[0])(q, ids)
    assert np.isnan(np.asarray(rows[1])).all() and np.isfinite(np.asarray(rows[0])).all()
    with pytest.raises(IndexError, match="out of range"):
        jaxembed.embedding(q, np.array([20]))


def test_empty_inputs(rng):
    _, q = _packed(rng, 20, 8, 8)
    empty = np.zeros((0,), np.int64)
    np.testing.assert_array_equal(
        np.asarray(jaxembed.embedding_bag(q, empty, np.array([0, 0]), mode="sum")[0]),
        np.zeros((2, 8), np.float32),
    )
    assert jaxembed.embedding(q, empty)[0].shape == (0, 8)
    assert jaxembed.embedding_bag(q, np.zeros((3, 0), np.int32), mode="max")[0].shape == (3, 8)


def test_jitted_quantized_bags_do_not_retrace(rng):
    _, q = _packed(rng, 40, 8, 4)
    traces = []

    @jax.jit
    def bag(q, ids, offsets, psw):
        traces.append(1)
        return jaxembed.embedding_bag(q, ids, offsets, mode="sum", per_sample_weights=psw)[0]

    for seed in range(3):
        ids = jax.random.randint(jax.random.key(seed), (30,), 0, 40)
        offsets = jnp.sort(jax.random.randint(jax.random.key(seed + 9), (5,), 0, 30)).at[0].set(0)
        bag(jaxembed.QuantizedTable(q.data[::-1], 4, 8), ids, offsets, jnp.ones(30))
    assert len(traces) == 1


def test_a_quantized_table_is_frozen_and_bad_options_are_refused(rng):
    _, q = _packed(rng, 20, 8, 8)
    ids = np.array([[1, 2]])
    for kw, match in (
        (dict(max_norm=1.0), "max_norm needs a trainable table"),
        (dict(scale_grad_by_freq=True), "scale_grad_by_freq needs a trainable table"),
        (dict(lookup_style="one_hot"), "read by gather only"),
        (dict(output_dtype=jnp.int8), "output_dtype must be float32, float16 or bfloat16"),
        (dict(output_dtype="float64"), "output_dtype must be float32, float16 or bfloat16"),
    ):
        with pytest.raises(ValueError, match=match):
            jaxembed.embedding_bag(q, ids, mode="sum", **kw)
        with pytest.raises(ValueError, match=match):
            jaxembed.embedding(q, ids, **kw)
    with pytest.raises(ValueError, match="output_dtype is for quantized tables"):
        jaxembed.embedding({"weight": jnp.ones((3, 2))}, ids, output_dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match=r"quantized table.*frozen"):
        jaxembed.renorm({"weight": q}, ids, max_norm=1.0)
    with pytest.raises(TypeError, match=r"quantized table.*frozen"):
        jaxembed.sparse.lookup({"weight": q}, ids)
    with pytest.raises(TypeError):  # no gradient for the table's integer bytes
        jax.grad(lambda q: jaxembed.embedding(q, ids)[0].sum())(q)
    # lookup_style="auto" reads a quantized table by gather, as "gather" does
    np.testing.assert_array_equal(
        np.asarray(jaxembed.embedding({"weight": q}, ids, lookup_style="auto")[0]),
        np.asarray(jaxembed.embedding(q, ids)[0]),
    )


@pytest.mark.parametrize("fp8,ebits,bias,top", [("e4m3", 4, 7, 0x7E), ("e5m2", 5, 15, 0x7B)])
def test_fp8_bags_equal_fbgemms_fp8_tbe(fp8, ebits, bias, top, rng):
    """FBGEMM's FP8 TBE rows have no scale: they are jaxembed's fp8 rows with scale 1, for every
    code below the top exponent (which FBGEMM reads as numbers, OCP's formats as NaN / inf)."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    rows, dim = 64, 16
    codes = rng.integers(0, 256, (rows, dim)).astype(np.uint8)
    codes = np.where(codes & 0x7F > top, (codes & 0x80) | top, codes).astype(np.uint8)
    for mode, pooling in (("sum", PoolingMode.SUM), ("mean", PoolingMode.MEAN)):
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            [("t", rows, dim, SparseType.FP8, EmbeddingLocation.HOST)],
            device="cpu",
            pooling_mode=pooling,
            output_dtype=SparseType.FP32,
            fp8_exponent_bits=ebits,
            fp8_exponent_bias=bias,
        )
        tbe.fill_random_weights()
        tbe.split_embedding_weights()[0][0].copy_(torch.from_numpy(codes))
        data = np.concatenate([codes, np.ones((rows, 1), np.float32).view(np.uint8)], axis=1)
        q = jaxembed.QuantizedTable.from_bytes(data, 8, dim, fp8=fp8)
        ids, offsets = _bags(rng, rows, 300, 20)
        csr = np.append(offsets, len(ids))
        ref = tbe(torch.from_numpy(ids).int(), torch.from_numpy(csr).int()).numpy()
        ours = np.asarray(
            jaxembed.embedding_bag(q, ids, csr, mode=mode, include_last_offset=True)[0]
        )
        terms = np.abs(codes.view(FP8_DTYPES[fp8]).astype(np.float32)).max(axis=1)[ids]
        bound = _bound(terms, offsets, len(ids))
        if mode == "mean":
            bound = bound / np.maximum(np.diff(csr), 1)
        assert np.all(np.abs(ours - ref) <= bound[:, None])


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_fp8_lookups_follow_the_float_path_on_the_dequantized_table(fp8, rng):
    x = rng.normal(size=(80, 16)).astype(np.float32) * 3
    q = jaxembed.quantize(x, fp8=fp8)
    w = jaxembed.dequantize(q)["weight"]
    ids, offsets = _bags(rng, 80, 300, 25)
    scale = np.asarray(q.data)[:, 16:].view(np.float32)[:, 0]
    terms = FP8_TOP[fp8] * scale[ids]
    for mode in ("sum", "mean", "max"):
        ours = np.asarray(jaxembed.embedding_bag(q, ids, offsets, mode=mode)[0])
        ref = np.asarray(jaxembed.embedding_bag({"weight": w}, ids, offsets, mode=mode)[0])
        bound = _bound(terms, offsets, len(ids))  # a decode may fuse into the sum's multiply-add
        assert np.all(np.abs(ours - ref) <= bound[:, None])
    rows = jax.jit(lambda q, i: jaxembed.embedding(q, i, output_dtype=jnp.bfloat16)[0])(q, ids)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(w[ids].astype(jnp.bfloat16)))


@pytest.mark.parametrize("bits,fp8", [(8, None), (4, None), (2, None), (8, "e4m3"), (8, "e5m2")])
def test_rows_a_table_does_not_hold_decode_to_the_fill(bits, fp8, rng):
    """Past the table (the sentinel), a row is NaN on one device and 0 where a row-sharded
    layout's other device holds it, in every format: so the layouts sum the devices' rows."""
    q = jaxembed.quantize(rng.normal(size=(6, 8)).astype(np.float32), bits=bits, fp8=fp8)
    safe = jnp.array([0, 6, 7])
    nan_fill, zero_fill = np.asarray(q.take(safe, jnp.nan)), np.asarray(q.take(safe, 0.0))
    assert np.isfinite(nan_fill[0]).all() and np.isnan(nan_fill[1:]).all()
    np.testing.assert_array_equal(zero_fill[1:], 0.0)
    np.testing.assert_array_equal(zero_fill[0], nan_fill[0])
