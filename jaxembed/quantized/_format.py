"""Row-wise quantized tables in torch's and FBGEMM's byte layout (:func:`quantize`).

Each row of a ``(V, D)`` float table becomes one ``uint8`` row:

* 8 bits (torch's ``embedding_bag_byte_prepack``, FBGEMM's ``FloatToFused8BitRowwiseQuantized``):
  ``D`` codes, then a float32 ``scale`` and a float32 ``bias``, ``D + 8`` bytes. With the row's
  ``lo = min`` and ``hi = max``: ``scale = (hi - lo) / 255``, ``bias = lo``, and
  ``code = round_half_even((x - lo) * (255 / (hi - lo + 1e-8)))``;
* 4 and 2 bits (``embedding_bag_4bit_prepack`` / ``_2bit_prepack``, FBGEMM's
  ``FloatToFusedNBitRowwiseQuantizedSBHalf``): ``D * bits / 8`` bytes of codes, the first
  element in the lowest bits of each byte, then a float16 ``scale`` and a float16 ``bias``,
  ``D * bits / 8 + 4`` bytes. ``bias = fp16(lo)``; ``scale = fp16((hi - bias) / (2**bits - 1))``
  (1 for a constant row); ``code = clip(round_half_even((x - bias) / scale), 0, 2**bits - 1)``.

* fp8 (``fp8="e4m3"`` or ``"e5m2"``, JAX's ``float8_e4m3fn`` / ``float8_e5m2``; jaxembed's own
  format, as neither torch nor FBGEMM has a scaled one): ``D`` fp8 codes, then a float32
  ``scale``, ``D + 4`` bytes. With the row's ``amax = max |x|`` and the format's largest value
  ``M`` (448 for e4m3, 57344 for e5m2): ``scale = amax / M`` (1 for a zero row) and
  ``code = fp8(x * (M / amax))``, rounded to nearest even (both divisions correctly rounded), so
  the row's largest magnitude maps to ``M``. A row decodes to ``code * scale``. FBGEMM's FP8
  TBE rows (no scale) are these rows with ``scale = 1``, for every code below its top exponent
  (the tests compare them).

A row dequantizes to ``code * scale + bias`` (fp8: ``code * scale``). The arithmetic is float32
and rounds as those references do, so the bytes equal theirs (the tests compare them on random,
constant, zero and huge-range rows; fp8 against a NumPy / ml_dtypes reference). A row holding NaN
or inf has no such encoding: a concrete table holding one is refused (``ValueError`` naming the
row); under ``jit`` its scale is NaN, so it dequantizes to NaN, never a plausible number. On
XLA's CPU subnormal float32 values are flushed to zero (a row whose ``amax`` is below ~1e-38).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed.core import _serialization, _validation
from jaxembed.core._packed import PackedTable

BITS = (8, 4, 2)
#: the fp8 formats: their JAX dtype and their largest finite value
FP8 = {"e4m3": (jnp.float8_e4m3fn, 448.0), "e5m2": (jnp.float8_e5m2, 57344.0)}
#: the fp8 formats' codes in :mod:`jaxembed.kernels` (the core's PackedTable.native_format)
_NATIVE_FP8 = {"e4m3": 10, "e5m2": 11}


@jax.tree_util.register_pytree_node_class
class QuantizedTable(PackedTable):
    """A row-wise quantized table: ``data`` ``(V, row bytes)`` uint8 in torch's layout.

    The lookups (:func:`jaxembed.embedding`, :func:`jaxembed.embedding_bag`, the collections and
    modules) read it as a frozen ``(V, D)`` table, decoding only the rows they reference.

    Attributes:
      data: ``(V, D + 8)`` for 8 bits, ``(V, D * bits / 8 + 4)`` for 4 and 2 bits,
        ``(V, D + 4)`` for fp8.
      bits: 8, 4 or 2 (static).
      embedding_dim: D (static).
      output_dtype: the dtype its lookups return (static): float32 unless a lookup's
        ``output_dtype`` says otherwise.
      fp8: ``"e4m3"`` or ``"e5m2"`` for an fp8 table (``bits`` is then 8), else None (static).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> q = jaxembed.quantize({"weight": jnp.arange(8.0).reshape(2, 4)}, bits=4)
      >>> q.data.shape, q.shape, q.nbytes
      ((2, 6), (2, 4), 12)
    """

    def __init__(
        self,
        data: jax.Array,
        bits: int,
        embedding_dim: int,
        output_dtype: Any = jnp.float32,
        fp8: str | None = None,
    ):
        self.data, self.bits, self.embedding_dim = data, bits, embedding_dim
        self.output_dtype = jnp.dtype(output_dtype)
        self.fp8 = fp8

    def tree_flatten(self):
        return (self.data,), (self.bits, self.embedding_dim, self.output_dtype, self.fp8)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def num_embeddings(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_embeddings, embedding_dim)``: the decoded table's."""
        return (self.data.shape[0], self.embedding_dim)

    @property
    def dtype(self) -> Any:
        return self.output_dtype

    @property
    def stored(self) -> jax.Array:
        return self.data

    @property
    def nbytes(self) -> int:
        """The table's bytes in memory."""
        return int(np.prod(self.data.shape))

    @property
    def native_format(self) -> int:
        """The row format of :mod:`jaxembed.kernels`: the bits, or the fp8 format's code."""
        return _NATIVE_FP8[self.fp8] if self.fp8 else self.bits

    def with_output_dtype(self, dtype: Any) -> QuantizedTable:
        return QuantizedTable(self.data, self.bits, self.embedding_dim, dtype, self.fp8)

    def take(self, safe: jax.Array, fill: float) -> jax.Array:
        # a NaN fill is all-ones bytes: a NaN float32 / float16 scale and bias, so a NaN row
        if not (np.isnan(fill) or fill == 0):
            raise ValueError(f"a quantized row fills with NaN or 0, not {fill}")
        byte = 255 if np.isnan(fill) else 0
        rows = jnp.take(self.data, safe, axis=0, mode="fill", fill_value=byte)
        return unpack_rows(rows, self.bits, self.embedding_dim, fp8=self.fp8)

    @classmethod
    def from_bytes(
        cls, data: ArrayLike, bits: int, embedding_dim: int, *, fp8: str | None = None
    ) -> QuantizedTable:
        """A table from packed rows (torch's prepack output, e.g. ``qtensor.numpy()``).

        Raises:
          ValueError: bits not 8, 4 or 2; an fp8 other than e4m3 / e5m2; rows of another width
            than ``embedding_dim`` packs to.
        """
        bits, fp8 = _check_bits(bits), _check_fp8(fp8, bits)
        data = jnp.asarray(data)
        if data.dtype != jnp.uint8 or data.ndim != 2:
            raise ValueError(f"data must be 2-D uint8, got {data.dtype} of shape {data.shape}")
        width = row_bytes(embedding_dim, bits, fp8)
        if data.shape[1] != width:
            raise ValueError(
                f"rows of {data.shape[1]} bytes; embedding_dim={embedding_dim} at "
                f"{fp8 or bits} {'' if fp8 else 'bits '}packs to {width}"
            )
        return cls(data, bits, int(embedding_dim), fp8=fp8)

    def __repr__(self) -> str:
        return (
            f"QuantizedTable(num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, "
            + (f"fp8={self.fp8!r})" if self.fp8 else f"bits={self.bits})")
        )


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
    return int(bits)


def _check_fp8(fp8: Any, bits: int) -> str | None:
    if fp8 is None:
        return None
    if not isinstance(fp8, str) or fp8 not in FP8:
        raise ValueError(f'fp8 must be "e4m3", "e5m2" or None, got {fp8!r}')
    if bits != 8:
        raise ValueError(f"an fp8 table has 8 bits a value, got bits={bits}")
    return fp8


def row_bytes(embedding_dim: int, bits: int, fp8: str | None = None) -> int:
    """The bytes of one packed row."""
    if fp8 is not None:
        return embedding_dim + 4
    if bits == 8:
        return embedding_dim + 8
    return embedding_dim * bits // 8 + 4


def quantize(params: Any, *, bits: int = 8, fp8: str | None = None) -> QuantizedTable:
    """A float table quantized row-wise, byte for byte as torch's and FBGEMM's prepack ops.

    Args:
      params: ``{"weight": (V, D)}`` or the ``(V, D)`` table itself, float32, float16 or
        bfloat16 (widened to float32 first, as torch's ops take float32).
      bits: 8, 4 or 2. 4- and 2-bit rows need ``D`` a multiple of 2 or 4.
      fp8: ``"e4m3"`` or ``"e5m2"``: an fp8 table with a per-row float32 scale instead of
        8-bit integer codes (see the module's docstring); None (default) for integer codes.

    Returns:
      A :class:`QuantizedTable` (see the module's docstring for the layout).

    Raises:
      ValueError: bits other than 8, 4 or 2; a dim that does not pack; (concrete) a row
        holding NaN or inf. TypeError: a non-float table.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> q = jaxembed.quantize(jnp.array([[0.0, 1.0, 2.0, 3.0]]), bits=8)
      >>> q.data[0, :4]
      Array([  0,  85, 170, 255], dtype=uint8)
    """
    bits = _check_bits(bits)
    fp8 = _check_fp8(fp8, bits)
    weight = params["weight"] if isinstance(params, dict) else params
    weight = jnp.asarray(weight) if not isinstance(weight, jax.Array) else weight
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise TypeError(f"the table must be floating, got {weight.dtype}")
    weight = _validation.check_table("weight", weight)
    d = weight.shape[1]
    per = 8 // bits
    if d % per:
        raise ValueError(f"embedding_dim={d} does not pack at {bits} bits: it must be a multiple "
                         f"of {per}")  # fmt: skip
    if not isinstance(weight, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(weight, np.float32)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"row {int(np.argmax(bad))} holds NaN or inf, which no row-wise scale and bias "
                "encode"
            )
    x = weight.astype(jnp.float32)
    if fp8 is not None:
        return QuantizedTable(_pack_fp8(x, *_fp8_barrier(fp8)), bits, d, fp8=fp8)
    return QuantizedTable(_pack(x, bits), bits, d)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = hi + lo`` with 12 significant bits in each (Veltkamp): their products are exact."""
    c = x * jnp.float32(4097.0)
    hi = c - (c - x)
    return hi, x - hi


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` rounded once to float32 (to nearest, ties to even), as C's division.

    XLA's CPU division of a vector is not always correctly rounded (a reciprocal refined by
    Newton steps), which moves a scale by an ulp from torch's. The quotient is corrected from
    its exact remainder ``a - q * b`` (Dekker's product of the halves of ``q`` and ``b``).
    """
    # tiny numerators are scaled up by 2**64 (exactly) first, so that no partial result below
    # is subnormal (XLA's CPU flushes those to zero, which would break the exact remainder)
    tiny = jnp.abs(a) < jnp.float32(2.0**-60)
    a = jnp.where(tiny, a * jnp.float32(2.0**64), a)
    q = a / b
    qh, ql = _split(q)
    bh, bl = _split(b)
    p = q * b
    err = ((qh * bh - p) + qh * bl + ql * bh) + ql * bl  # q * b = p + err, exactly
    r = (a - p) - err  # the remainder, exact near the quotient
    up = jnp.nextafter(q, jnp.float32(jnp.inf))
    down = jnp.nextafter(q, jnp.float32(-jnp.inf))
    # the nearer of q and its neighbours: compare the remainder with half an ulp times b
    half_up, half_down = (up - q) * b / 2, (q - down) * b / 2
    even = (jax.lax.bitcast_convert_type(q, jnp.int32) & 1) == 0
    q = jnp.where((r > half_up) | ((r == half_up) & ~even), up, q)
    q = jnp.where((-r > half_down) | ((-r == half_down) & ~even), down, q)
    ok = jnp.isfinite(q) & jnp.isfinite(r) & (q != 0)
    q = jnp.where(ok, q, a / b)
    return jnp.where(tiny, q * jnp.float32(2.0**-64), q)


@jax.jit
def _pack8(x: jax.Array, top: jax.Array) -> jax.Array:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    span = hi - lo
    inverse = _divide(jnp.broadcast_to(top, span.shape), span + jnp.float32(1e-8))
    codes = jnp.round((x - lo) * inverse).astype(jnp.uint8)
    scale_bias = jnp.concatenate([_divide(span, jnp.broadcast_to(top, span.shape)), lo], axis=1)
    tail = jax.lax.bitcast_convert_type(scale_bias, jnp.uint8).reshape(x.shape[0], 8)
    return jnp.concatenate([codes, tail], axis=1)


def _pack(x: jax.Array, bits: int) -> jax.Array:
    # ``top`` (2**bits - 1) behind an optimization barrier: XLA turns a division by a constant
    # into a multiplication by its reciprocal (also inside a caller's jit), which rounds the
    # scale differently from torch's division
    top = jax.lax.optimization_barrier(jnp.float32((1 << bits) - 1))
    return _pack8(x, top) if bits == 8 else _pack_n(x, top, bits)


def _fp8_barrier(fp8: str) -> tuple:
    top = FP8[fp8][1]
    # the largest value behind a barrier, as ``top`` in _pack: divisions by it stay divisions
    return jax.lax.optimization_barrier(jnp.float32(top)), fp8


@functools.partial(jax.jit, static_argnames="fp8")
def _pack_fp8(x: jax.Array, top: jax.Array, fp8: str) -> jax.Array:
    amax = jnp.abs(x).max(axis=1, keepdims=True)
    zero = amax == 0
    amax = jnp.where(zero, jnp.float32(1.0), amax)
    top = jnp.broadcast_to(top, amax.shape)
    scale = jnp.where(zero, jnp.float32(1.0), _divide(amax, top))
    inverse = jnp.where(zero, jnp.float32(1.0), _divide(top, amax))
    codes = (x * inverse).astype(FP8[fp8][0])
    codes = jax.lax.bitcast_convert_type(codes, jnp.uint8)
    tail = jax.lax.bitcast_convert_type(scale, jnp.uint8).reshape(x.shape[0], 4)
    return jnp.concatenate([codes, tail], axis=1)


@functools.partial(jax.jit, static_argnames="bits")
def _pack_n(x: jax.Array, top: jax.Array, bits: int) -> jax.Array:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    bias = lo.astype(jnp.float16).astype(jnp.float32)
    span = hi - bias
    scale = jnp.where(span == 0, jnp.float32(1.0), _divide(span, jnp.broadcast_to(top, span.shape)))
    scale = scale.astype(jnp.float16).astype(jnp.float32)
    inverse = _divide(jnp.ones_like(scale), scale)
    degenerate = (scale == 0) | jnp.isinf(inverse)
    scale = jnp.where(degenerate, jnp.float32(1.0), scale)
    inverse = jnp.where(degenerate, jnp.float32(1.0), inverse)
    codes = jnp.clip(jnp.round((x - bias) * inverse), 0, (1 << bits) - 1).astype(jnp.uint8)
    per = 8 // bits
    codes = codes.reshape(x.shape[0], -1, per)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[None, None, :]
    packed = jnp.sum(codes << shifts, axis=2, dtype=jnp.uint8)
    halves = jnp.concatenate([scale, bias], axis=1).astype(jnp.float16)
    tail = jax.lax.bitcast_convert_type(halves, jnp.uint8).reshape(x.shape[0], 4)
    return jnp.concatenate([packed, tail], axis=1)


def _little_endian(tail: jax.Array, dtype: Any) -> jax.Array:
    """The values whose little-endian bytes are ``tail``'s last axis (4 bytes: float32, 2:
    float16), ``tail.shape[:-1]``. The bytes are joined with shifts and then bitcast at the same
    width: a bitcast that changes the width does not hold under ``jax.export``'s symbolic shapes
    (StableHLO cannot refine it)."""
    width = tail.shape[-1]
    word_type = {4: jnp.uint32, 2: jnp.uint16}[width]
    word = tail[..., 0].astype(word_type)
    for k in range(1, width):
        word = word | (tail[..., k].astype(word_type) << (8 * k))
    return jax.lax.bitcast_convert_type(word, dtype)


def unpack_rows(
    rows: jax.Array,
    bits: int,
    embedding_dim: int,
    dtype: Any = jnp.float32,
    fp8: str | None = None,
) -> jax.Array:
    """Packed rows ``(..., row bytes)`` as floats ``(..., D)``: ``code * scale + bias``."""
    lead = rows.shape[:-1]
    if fp8 is not None:
        codes = jax.lax.bitcast_convert_type(rows[..., :embedding_dim], FP8[fp8][0])
        tail = rows[..., embedding_dim : embedding_dim + 4]
        scale = _little_endian(tail, jnp.float32)[..., None]
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    if bits == 8:
        codes = rows[..., :embedding_dim].astype(jnp.float32)
        tail = rows[..., embedding_dim : embedding_dim + 8].reshape(*lead, 2, 4)
        scale_bias = _little_endian(tail, jnp.float32)
    else:
        per = 8 // bits
        width = embedding_dim // per
        packed = rows[..., :width]
        shifts = jnp.arange(per, dtype=jnp.uint8) * bits
        codes = (packed[..., :, None] >> shifts) & jnp.uint8((1 << bits) - 1)
        codes = codes.reshape(*lead, embedding_dim).astype(jnp.float32)
        tail = rows[..., width : width + 4].reshape(*lead, 2, 2)
        scale_bias = _little_endian(tail, jnp.float16).astype(jnp.float32)
    scale, bias = scale_bias[..., 0:1], scale_bias[..., 1:2]
    return (codes * scale + bias).astype(dtype)


def dequantize(table: QuantizedTable, *, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """The float table ``{"weight": (V, D)}`` a :class:`QuantizedTable` encodes.

    Args:
      table: the quantized table.
      dtype: the output dtype: float32 (default), float16 or bfloat16.

    Returns:
      ``{"weight": code * scale + bias}`` row by row, computed in float32, as torch's
      ``embedding_bag_*_unpack`` ops.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> q = jaxembed.quantize(jnp.array([[0.0, 1.0, 2.0, 3.0]]), bits=2)
      >>> jaxembed.dequantize(q)["weight"]
      Array([[0., 1., 2., 3.]], dtype=float32)
    """
    if not isinstance(table, QuantizedTable):
        raise TypeError(f"table must be a jaxembed.QuantizedTable, got {type(table).__name__}")
    if jnp.dtype(dtype) not in (jnp.float32, jnp.float16, jnp.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return {"weight": unpack_rows(table.data, table.bits, table.embedding_dim, dtype, table.fp8)}


_TORCH_BITS = {"torch.quint8": 8, "torch.quint4x2": 4, "torch.quint2x4": 2}


def from_torch(source: Any) -> QuantizedTable:
    """The :class:`QuantizedTable` of torch's quantized ``nn.Embedding`` / ``nn.EmbeddingBag``.

    Args:
      source: a ``torch.ao.nn.quantized.Embedding`` or ``EmbeddingBag`` (8 or 4 bits), or its
        ``weight()``: a row-wise (``per_channel_affine_float_qparams``) quantized tensor.

    Returns:
      The same rows in the prepack layout, torch's codes, ``scale`` and
      ``bias = -(zero_point * scale)`` (float32 at 8 bits, float16 at 4 and 2), so a row decodes
      to ``code * scale + bias``, the value torch's module returns.

    Raises:
      TypeError: neither a quantized module nor a row-wise quantized tensor.

    Example:
      >>> import torch, jaxembed
      >>> from torch.ao.quantization import float_qparams_weight_only_qconfig
      >>> bag = torch.nn.EmbeddingBag(10, 4, mode="sum")
      >>> bag.qconfig = float_qparams_weight_only_qconfig
      >>> q = jaxembed.quantized.from_torch(torch.ao.nn.quantized.EmbeddingBag.from_float(bag))
      >>> q
      QuantizedTable(num_embeddings=10, embedding_dim=4, bits=8)
    """
    import torch

    qweight = source.weight() if callable(getattr(source, "weight", None)) else source
    if not isinstance(qweight, torch.Tensor) or not qweight.is_quantized:
        raise TypeError(
            "source must be a torch quantized Embedding / EmbeddingBag or its weight(), got "
            f"{type(source).__name__}"
        )
    bits = _TORCH_BITS.get(str(qweight.dtype))
    if bits is None or qweight.qscheme() != torch.per_channel_affine_float_qparams:
        raise TypeError(
            f"a row-wise (per_channel_affine_float_qparams) quint8 / quint4x2 / quint2x4 table "
            f"is needed, got {qweight.dtype} ({qweight.qscheme()})"
        )
    rows, dim = qweight.shape
    codes = qweight.int_repr().numpy().reshape(rows, row_bytes(dim, bits) - (8 if bits == 8 else 4))
    scale = qweight.q_per_channel_scales().numpy().astype(np.float32)
    bias = -(qweight.q_per_channel_zero_points().numpy().astype(np.float32) * scale)
    if bits == 8:
        tail = np.stack([scale, bias], axis=1).astype(np.float32)
    else:
        tail = np.stack([scale, bias], axis=1).astype(np.float16)
    data = np.concatenate([codes.astype(np.uint8), tail.view(np.uint8).reshape(rows, -1)], axis=1)
    return QuantizedTable.from_bytes(data, bits, dim)


def from_tbe(rows: Any, bits: int, embedding_dim: int) -> QuantizedTable:
    """A :class:`QuantizedTable` from FBGEMM's TBE rows (TorchRec's quantized collections).

    FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``, under TorchRec's
    quantized ``EmbeddingBagCollection``) stores each row as a float16 ``scale`` and a float16
    ``bias`` *first*, then the codes (8 bits: one byte each; 4 and 2: the first element in the
    lowest bits), then padding to its row alignment (16 bytes). A row decodes to
    ``code * scale + bias``, as in jaxembed's layout, so the codes are kept and the scale and
    bias move behind them (float32 at 8 bits, exactly, float16 at 4 and 2).

    Args:
      rows: ``(V, row bytes)`` uint8: a NumPy array, a torch tensor, or TorchRec's
        ``UInt4Tensor`` / ``UInt2Tensor`` (its ``elem``).
      bits: 8, 4 or 2 (TorchRec's ``DataType.INT8`` / ``INT4`` / ``INT2``).
      embedding_dim: D.

    Returns:
      The table, decoding as TBE decodes.

    Raises:
      ValueError: bits not 8, 4 or 2, rows not 2-D uint8, rows too narrow for ``embedding_dim``
        at ``bits``, a ``D * bits`` that is not whole bytes, or a scale or bias that is not
        finite (naming the row).

    Example:
      >>> import numpy as np, jaxembed
      >>> row = np.zeros((1, 16), np.uint8)
      >>> row[0, :4] = np.array([0.5, -1.0], np.float16).view(np.uint8)  # scale, bias
      >>> row[0, 4:8] = [0, 1, 2, 3]  # codes
      >>> q = jaxembed.quantized.from_tbe(row, bits=8, embedding_dim=4)
      >>> jaxembed.dequantize(q)["weight"]
      Array([[-1. , -0.5,  0. ,  0.5]], dtype=float32)
    """
    bits = _check_bits(bits)
    embedding_dim = _validation.check_size("embedding_dim", embedding_dim)
    if hasattr(rows, "elem"):  # TorchRec's UInt4Tensor / UInt2Tensor wrap the bytes
        rows = rows.elem
    if hasattr(rows, "detach"):
        rows = rows.detach().cpu().numpy()
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise ValueError(f"rows must be 2-D uint8, got {rows.dtype} of shape {rows.shape}")
    if (embedding_dim * bits) % 8:
        raise ValueError(
            f"embedding_dim={embedding_dim} at {bits} bits is not whole bytes (TBE needs it)"
        )
    code_bytes = embedding_dim * bits // 8
    if rows.shape[1] < 4 + code_bytes:
        raise ValueError(
            f"rows of {rows.shape[1]} bytes cannot hold a 4-byte scale and bias and "
            f"{code_bytes} bytes of codes (embedding_dim={embedding_dim} at {bits} bits)"
        )
    scale_bias = np.ascontiguousarray(rows[:, :4]).view(np.float16)
    bad = ~np.isfinite(scale_bias).all(axis=1)
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))} has a scale or bias that is not finite")
    tail = scale_bias.astype(np.float32) if bits == 8 else scale_bias
    data = np.concatenate(
        [rows[:, 4 : 4 + code_bytes], tail.view(np.uint8).reshape(rows.shape[0], -1)], axis=1
    )
    return QuantizedTable.from_bytes(data, bits, embedding_dim)


#: TorchRec's ``DataType`` names of the quantized tables jaxembed reads
_TORCHREC_BITS = {"INT8": 8, "INT4": 4, "INT2": 2}


def from_torchrec(module: Any) -> dict[str, QuantizedTable]:
    """Every table of TorchRec's quantized ``EmbeddingBagCollection`` (or
    ``EmbeddingCollection``), read from its TBE rows (:func:`from_tbe`).

    Args:
      module: a ``torchrec.quant.embedding_modules.EmbeddingBagCollection`` or
        ``EmbeddingCollection`` (anything with ``embedding_bag_configs()`` or
        ``embedding_configs()`` and a ``state_dict()`` of ``embedding_bags.<table>.weight`` /
        ``embeddings.<table>.weight`` TBE rows).

    Returns:
      ``{table name: QuantizedTable}``; pass them to
      :meth:`jaxembed.EmbeddingBagCollection.from_quantized` with the tables' configs.

    Raises:
      TypeError: not a TorchRec quantized collection.
      NotImplementedError: a table of another data type than INT8, INT4 or INT2 (named).
    """
    if hasattr(module, "embedding_bag_configs"):
        configs, prefix = module.embedding_bag_configs(), "embedding_bags."
    elif hasattr(module, "embedding_configs"):
        configs, prefix = module.embedding_configs(), "embeddings."
    else:
        raise TypeError(
            "module must be TorchRec's quantized EmbeddingBagCollection or EmbeddingCollection, "
            f"got {type(module).__name__}"
        )
    state = module.state_dict()
    out = {}
    for config in configs:
        kind = getattr(config.data_type, "name", str(config.data_type))
        bits = _TORCHREC_BITS.get(kind)
        if bits is None:
            raise NotImplementedError(
                f"table {config.name!r} is {kind}; jaxembed reads TorchRec's INT8, INT4 and INT2 "
                "tables (a float table reads with from_torch)"
            )
        key = f"{prefix}{config.name}.weight"
        if key not in state:
            raise KeyError(f"the module's state dict has no {key!r}")
        out[config.name] = from_tbe(state[key], bits, config.embedding_dim)
    return out


_serialization.register_node(
    QuantizedTable,
    "QuantizedTable",
    to_json=lambda aux: [aux[0], aux[1], jnp.dtype(aux[2]).name, aux[3]],
    from_json=lambda v: (v[0], v[1], jnp.dtype(v[2]), v[3]),
)
