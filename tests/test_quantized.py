"""Row-wise quantized tables against torch's prepack and unpack ops, byte for byte."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jaxembed

OPS = {8: "embedding_bag_byte", 4: "embedding_bag_4bit", 2: "embedding_bag_2bit"}


def _table(rng, rows, dim):
    x = rng.normal(size=(rows, dim)).astype(np.float32)
    x *= rng.uniform(1e-3, 1e3, (rows, 1)).astype(np.float32)  # every range of magnitudes
    x[0] = 0  # a zero row
    x[1] = 3.5  # a constant row
    x[2, : dim // 2], x[2, dim // 2 :] = 1e30, -1e30  # a huge range
    x[3], x[3, 0] = 1e-30, 0  # a range below the 8-bit epsilon
    x[4] = np.linspace(-65504, 65504, dim)  # float16's whole range
    x[5] = -1e-5
    return x


def _torch(bits, kind, x):
    return getattr(torch.ops.quantized, f"{OPS[bits]}_{kind}")(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [4, 16, 68])
def test_packing_equals_torchs_prepack_byte_for_byte(bits, dim, rng):
    x = _table(rng, 500, dim)
    q = jaxembed.quantize({"weight": jnp.asarray(x)}, bits=bits)
    np.testing.assert_array_equal(np.asarray(q.data), _torch(bits, "prepack", x))
    assert q.data.dtype == jnp.uint8 and (q.bits, q.embedding_dim) == (bits, dim)
    # under jit too, and a new table of the same shape does not retrace
    traces = []

    @jax.jit
    def pack(w):
        traces.append(1)
        return jaxembed.quantize(w, bits=bits).data

    np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(x))), _torch(bits, "prepack", x))
    pack(jnp.asarray(x[::-1].copy()))
    assert len(traces) == 1


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dequantize_equals_torchs_unpack(bits, rng):
    x = _table(rng, 500, 16)
    packed = _torch(bits, "prepack", x)
    q = jaxembed.QuantizedTable.from_bytes(packed, bits, 16)  # torch's bytes, read as they are
    ours = np.asarray(jaxembed.dequantize(q)["weight"])
    ref = _torch(bits, "unpack", packed)
    if bits == 8:
        # torch's byte unpack is one fused multiply-add (code * scale + bias rounded once); XLA
        # rounds the product first: at most one ulp of the larger of the product and the bias
        scale, bias = packed[:, 16:20].view(np.float32), packed[:, 20:24].view(np.float32)
        big = np.maximum(np.abs(scale) * 255, np.abs(bias))
        assert np.all(np.abs(ours - ref) <= np.spacing(big.astype(np.float32)) * 2)
    else:  # a 4- or 2-bit code times a float16 scale is exact in float32: bit for bit
        np.testing.assert_array_equal(ours, ref)
    for dtype in (jnp.float16, jnp.bfloat16):
        out = jaxembed.dequantize(q, dtype=dtype)["weight"]
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(ours).astype(dtype)))


def test_memory_per_row_is_the_packed_width():
    for bits, width in ((8, 128 + 8), (4, 64 + 4), (2, 32 + 4)):
        q = jaxembed.quantize(jnp.ones((1000, 128)), bits=bits)
        assert q.nbytes == 1000 * width == q.data.nbytes  # 4-bit: D / 2 + 4 bytes a row


def test_bad_input_is_refused():
    w = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2"):
        jaxembed.quantize(w, bits=3)
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2"):
        jaxembed.quantize(w, bits=True)
    with pytest.raises(ValueError, match="embedding_dim=6 does not pack at 2 bits"):
        jaxembed.quantize(w, bits=2)
    with pytest.raises(TypeError, match="must be floating"):
        jaxembed.quantize(jnp.ones((4, 8), jnp.int32))
    with pytest.raises(ValueError, match="row 2 holds NaN or inf"):
        jaxembed.quantize(w.at[2, 1].set(jnp.inf))
    with pytest.raises(ValueError, match="rows of 7 bytes"):
        jaxembed.QuantizedTable.from_bytes(np.zeros((2, 7), np.uint8), 4, 8)
    with pytest.raises(TypeError, match="QuantizedTable"):
        jaxembed.dequantize(w)
    with pytest.raises(ValueError, match="dtype must be"):
        jaxembed.dequantize(jaxembed.quantize(w), dtype=jnp.int8)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_nan_row_under_jit_dequantizes_to_nan(bits):
    w = jnp.ones((3, 8)).at[1, 2].set(jnp.nan)
    q = jax.jit(lambda w: jaxembed.quantize(w, bits=bits))(w)
    out = np.asarray(jaxembed.dequantize(q)["weight"])
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


FP8 = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}


def _fp8_reference(x, fp8):
    """The documented fp8 format in NumPy and ml_dtypes: ``D`` codes, then a float32 scale."""
    dtype, top = FP8[fp8]
    amax = np.abs(x).max(axis=1, keepdims=True)
    zero = amax == 0
    amax = np.where(zero, np.float32(1), amax).astype(np.float32)
    scale = np.where(zero, np.float32(1), amax / np.float32(top)).astype(np.float32)
    inverse = np.where(zero, np.float32(1), np.float32(top) / amax).astype(np.float32)
    codes = (x * inverse).astype(np.float32).astype(dtype).view(np.uint8)
    return np.concatenate([codes, scale.view(np.uint8).reshape(len(x), 4)], axis=1)


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_fp8_packing_equals_the_numpy_reference(fp8, rng):
    x = _table(rng, 400, 24)
    x[3] = 0  # (row 3's 1e-30 would be subnormal once scaled; XLA's CPU flushes those)
    q = jaxembed.quantize(jnp.asarray(x), fp8=fp8)
    assert (q.bits, q.fp8, q.data.shape) == (8, fp8, (400, 24 + 4))
    np.testing.assert_array_equal(np.asarray(q.data), _fp8_reference(x, fp8))
    packed = jax.jit(lambda w: jaxembed.quantize(w, fp8=fp8).data)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(packed), _fp8_reference(x, fp8))
    # a row decodes to code * scale, and its largest magnitude to the format's top times scale
    ref = _fp8_reference(x, fp8)
    codes = ref[:, :24].view(FP8[fp8][0]).astype(np.float32)
    scale = ref[:, 24:].view(np.float32)
    np.testing.assert_array_equal(
        np.asarray(jaxembed.dequantize(q)["weight"]), (codes * scale).astype(np.float32)
    )
    assert np.all(np.abs(codes).max(axis=1)[np.abs(x).max(axis=1) > 0] == FP8[fp8][1])
    again = jaxembed.QuantizedTable.from_bytes(np.asarray(q.data), 8, 24, fp8=fp8)
    np.testing.assert_array_equal(np.asarray(jaxembed.dequantize(again)["weight"]),
                                  np.asarray(jaxembed.dequantize(q)["weight"]))  # fmt: skip


def test_fp8_bad_input_is_refused():
    w = jnp.ones((4, 8))
    with pytest.raises(ValueError, match='fp8 must be "e4m3", "e5m2" or None'):
        jaxembed.quantize(w, fp8="e3m4")
    with pytest.raises(ValueError, match="an fp8 table has 8 bits"):
        jaxembed.quantize(w, bits=4, fp8="e4m3")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        jaxembed.quantize(w.at[2, 1].set(jnp.inf), fp8="e5m2")
    with pytest.raises(ValueError, match="packs to 12"):
        jaxembed.QuantizedTable.from_bytes(np.zeros((4, 16), np.uint8), 8, 8, fp8="e4m3")
    nan_row = jax.jit(lambda w: jaxembed.dequantize(jaxembed.quantize(w, fp8="e4m3"))["weight"])(
        w.at[1, 0].set(jnp.nan)
    )
    assert np.isnan(np.asarray(nan_row)[1]).all() and np.isfinite(np.asarray(nan_row)[0]).all()
