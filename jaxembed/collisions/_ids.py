"""Raw 64-bit ids as two 32-bit halves, so they work without ``jax_enable_x64``.

A raw id is a non-negative int64, ``0 <= id <= 2**63 - 1`` (a hash, a user or item id). JAX
without x64 has no 64-bit integers, so an id travels as :class:`RawIds`: its high and low 32-bit
halves, both ``uint32``. Ordering the pairs lexicographically orders the ids, which is what the
sorted remap table needs. :func:`raw_ids` builds the pair from int64 NumPy arrays, Python ints
or (with x64 on) int64 JAX arrays, and checks them; :func:`to_int64` turns pairs back into
NumPy int64.

The pair ``(0xFFFFFFFF, 0xFFFFFFFF)`` (``-1`` as an int64) marks an empty entry. It is not a
valid id, so every valid id, ``2**63 - 1`` included, can be held; TorchRec marks empty entries
with ``2**63 - 1`` itself, which collides with that id.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.core import _serialization
from jaxembed.kernels import _ffi as _kernels

EMPTY = np.uint32(0xFFFFFFFF)
_TOP_BIT = 0x80000000


class RawIds(NamedTuple):
    """Raw int64 ids as their two 32-bit halves: ``id = hi * 2**32 + lo``.

    Attributes:
      hi: ``(...)`` uint32, the high halves (``< 2**31`` for a valid id).
      lo: ``(...)`` uint32, the low halves, the same shape.

    Example:
      >>> import numpy as np
      >>> from jaxembed.collisions import raw_ids, to_int64
      >>> ids = raw_ids(np.array([7, 2**40 + 3, 2**63 - 1]))
      >>> ids.hi
      Array([         0,        256, 2147483647], dtype=uint32)
      >>> to_int64(ids)
      array([                  7,       1099511627779, 9223372036854775807])
    """

    hi: jax.Array
    lo: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hi.shape)


_serialization.register_namedtuple(RawIds, "collisions.RawIds")


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def raw_ids(ids: Any, *, name: str = "ids") -> RawIds:
    """Raw ids as :class:`RawIds`, checked: every id must be ``0 <= id <= 2**63 - 1``.

    Args:
      ids: int64 / uint64 (or narrower integer) NumPy arrays, Python ints or lists of them, a JAX
        integer array (int64 needs ``jax_enable_x64``), or a :class:`RawIds` (returned as it is,
        its halves cast to uint32).
      name: the argument's name in error messages.

    Returns:
      The ids' high and low halves, uint32, in the ids' shape.

    Raises:
      TypeError: the ids are not integers (floats are refused: TorchRec writes ``1.5`` into its
        history as ``1`` but looks it up as ``1.5``).
      ValueError: a concrete id is negative or ``>= 2**63``. Traced ids cannot be checked; an
        invalid one (its top bit set) is never admitted and remaps to the out-of-range slot.

    Example:
      >>> import numpy as np
      >>> from jaxembed.collisions import raw_ids
      >>> raw_ids(np.array([3, 2**33 + 1], np.int64))
      RawIds(hi=Array([0, 2], dtype=uint32), lo=Array([3, 1], dtype=uint32))
      >>> raw_ids([-1])
      Traceback (most recent call last):
      ...
      ValueError: ids holds -1: raw ids must be >= 0
    """
    if isinstance(ids, RawIds):
        hi, lo = jnp.asarray(ids.hi), jnp.asarray(ids.lo)
        for half, part in (("hi", hi), ("lo", lo)):
            if not jnp.issubdtype(part.dtype, jnp.integer):
                raise TypeError(f"{name}.{half} must be an integer array, got {part.dtype}")
        if hi.shape != lo.shape:
            raise ValueError(f"{name}.hi and {name}.lo differ in shape: {hi.shape} vs {lo.shape}")
        if not _is_traced(hi) and hi.size and (np.asarray(hi).astype(np.uint64) >= _TOP_BIT).any():
            raise ValueError(f"{name} holds an id >= 2**63 (its hi half has the top bit set)")
        return RawIds(hi.astype(jnp.uint32), lo.astype(jnp.uint32))
    if isinstance(ids, jax.Array) and _is_traced(ids):
        _check_integer(name, ids.dtype)
        if np.dtype(ids.dtype).itemsize < 8:  # an int32 id fits in the low half
            wide = ids.astype(jnp.int32)
            hi = jnp.where(wide < 0, jnp.uint32(EMPTY), jnp.uint32(0))
            return RawIds(hi, wide.astype(jnp.uint32))
        return RawIds(
            (ids >> 32).astype(jnp.uint32), (ids & 0xFFFFFFFF).astype(jnp.uint32)
        )  # a negative int64 keeps its top bit: never admitted
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        ids = [int(ids)]
        scalar = True
    else:
        scalar = False
    arr = ids if hasattr(ids, "dtype") else np.asarray(ids, dtype=object)
    if arr.dtype == object:
        arr = _from_python(arr, name)
    else:
        _check_integer(name, arr.dtype)
        arr = np.asarray(arr)
    if arr.dtype.kind == "u":
        if arr.size and arr.max() >= 2**63:
            raise ValueError(f"{name} holds {int(arr.max())}, above the largest raw id 2**63 - 1")
        arr = arr.astype(np.uint64)
    else:
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} holds {int(arr.min())}: raw ids must be >= 0")
        arr = arr.astype(np.int64).astype(np.uint64)
    if scalar:
        arr = arr.reshape(())
    hi = (arr >> np.uint64(32)).astype(np.uint32)
    lo = (arr & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return RawIds(jnp.asarray(hi), jnp.asarray(lo))


def _check_integer(name: str, dtype: Any) -> None:
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must hold integer ids (int64 raw ids), got dtype {dtype}")


def _from_python(arr: np.ndarray, name: str) -> np.ndarray:
    flat = arr.reshape(-1)
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold integer ids, got {type(v).__name__}: {v!r}")
        if v < 0:
            raise ValueError(f"{name} holds {v}: raw ids must be >= 0")
        if v >= 2**63:
            raise ValueError(f"{name} holds {v}, above the largest raw id 2**63 - 1")
    return np.array([int(v) for v in flat], dtype=np.int64).reshape(arr.shape)


def to_int64(ids: RawIds) -> np.ndarray:
    """:class:`RawIds` back to NumPy int64 (an empty entry reads ``-1``).

    Args:
      ids: the pairs, concrete.

    Returns:
      An int64 array in the ids' shape.

    Example:
      >>> from jaxembed.collisions import raw_ids, to_int64
      >>> to_int64(raw_ids([2**62, 1]))
      array([4611686018427387904,                   1])
    """
    hi = np.asarray(ids.hi).astype(np.uint64)
    lo = np.asarray(ids.lo).astype(np.uint64)
    return ((hi << np.uint64(32)) | lo).astype(np.int64)


def valid(ids: RawIds) -> jax.Array:
    """Whether each pair is a valid id (its top bit clear): empties and traced bad ids are not."""
    return ids.hi < jnp.uint32(_TOP_BIT)


def less(a_hi: jax.Array, a_lo: jax.Array, b_hi: jax.Array, b_lo: jax.Array) -> jax.Array:
    """``a < b`` for pairs, as int64 ids (empties last)."""
    return (a_hi < b_hi) | ((a_hi == b_hi) & (a_lo < b_lo))


def lower_bound(
    keys_hi: jax.Array, keys_lo: jax.Array, n: int, q_hi: jax.Array, q_lo: jax.Array
) -> jax.Array:
    """For each query, the first position in the sorted ``keys[:n]`` not below it (``<= n``).

    ``jnp.searchsorted(keys[:n], q, side="left")`` for pairs: a fixed ``ceil(log2(n + 1))``
    halvings, each one gather of both halves.
    """
    lo = jnp.zeros(q_hi.shape, jnp.int32)
    hi = jnp.full(q_hi.shape, n, jnp.int32)
    steps = max(1, int(n).bit_length())

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        at = jnp.minimum(mid, max(n - 1, 0))
        below = less(keys_hi[at], keys_lo[at], q_hi, q_lo)
        active = lo < hi
        return jnp.where(active & below, mid + 1, lo), jnp.where(active & ~below, mid, hi)

    lo, _ = jax.lax.fori_loop(0, steps, halve, (lo, hi), unroll=True)
    return lo


#: the largest key of :func:`ordered_key`: ranks after every score
WORST = np.uint32(0xFFFFFFFF)


def ordered_key(score: jax.Array) -> jax.Array:
    """int32 or float32 values as uint32 keys in the same order (``-0.0`` equal to ``0.0``).

    A float's sign bit is flipped for positives and every bit for negatives; an int32's sign bit
    is flipped. The scores here are never NaN.
    """
    if score.dtype == jnp.int32:
        return jax.lax.bitcast_convert_type(score, jnp.uint32) ^ jnp.uint32(0x80000000)
    score = jnp.where(score == 0, jnp.float32(0), score)
    bits = jax.lax.bitcast_convert_type(score, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def argsort(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """The stable order of the uint32 pairs ``(hi, lo)`` as 64-bit keys (equal keys in their
    input order), by the CPU kernel where it runs: XLA's CPU sort is ~30x slower here."""

    def reference(hi, lo):
        order = jnp.arange(hi.shape[0], dtype=jnp.int32)
        return jax.lax.sort((hi, lo, order), num_keys=3)[2]

    if hi.shape[0] < 2:
        return reference(hi, lo)
    return _kernels.on_cpu(_kernels.argsort, reference, hi, lo)
