"""The sparse update: sum a :class:`SparseGrad`'s duplicates, then read and write only those rows.

Every row-wise optimizer does the same three things, here:

1. :func:`coalesce` sums the entries of each row into the row's first entry, in the order the
   entries come, which is the order a dense gradient's scatter-add sums them in (so sparse SGD
   equals dense SGD bit for bit on CPU). The first entry is found with a ``num_embeddings``-long
   int32 scratch (``embedding_dim`` times smaller than the table), not a sort. On CPU the
   duplicates are added in place, a chunk of rows at a time, so the work is proportional to the
   number of duplicates and no ``(n, D)`` temporary is made; on GPU and TPU one scatter-add does it.
2. :func:`apply_rows` runs the optimizer's row update over the entries: on CPU a chunk of rows
   at a time, so its temporaries are a few MiB that stay in cache and in the allocator's reused
   memory (a fresh ``(n, D)`` buffer costs more in page faults than the arithmetic on it); on
   GPU and TPU in one piece.
3. Inside it, :func:`read_rows` gathers optimizer-state rows and :func:`write_rows` /
   :func:`add_rows` scatter results back. Entries that are not a row's first (and dropped ones)
   are sent to row ``num_embeddings``, which the scatter drops, so each row is written once.
   With the table and state donated, XLA does all of this in place.
4. With stochastic rounding (a bfloat16 / float16 table), :func:`add_rows` sums in float32 and
   rounds each element up or down at random, in proportion to its distance
   (:func:`stochastic_round`, with counter-based noise from :func:`rounding_key`).

The cost is O(n * D) plus a ``num_embeddings``-long int32 fill: nothing of size ``(V, D)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed.core._numerics import at_run_time, divide
from jaxembed.sparse._lookup import SparseGrad


def row_mean(x: jax.Array, column_axis: Any = None) -> jax.Array:
    """The mean of each row (last axis), over all its columns however they are sharded.

    Args:
      x: ``(n, d)`` rows, or this device's ``d`` columns of them.
      column_axis: inside a sharded update, the mesh axis the columns are split over (the
        ``column_axis`` that :func:`jaxembed.sparse.sharded` gives ``update``); None when the
        rows are whole.

    Returns:
      ``(n,)`` the means, the same on every column shard.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> jaxembed.sparse.row_mean(jnp.array([[1.0, 3.0], [2.0, 2.0]]))
      Array([2., 2.], dtype=float32)
    """
    total, width = jnp.sum(x, -1), x.shape[-1]
    if column_axis is not None:
        total = jax.lax.psum(total, column_axis)
        width = width * jax.lax.axis_size(column_axis)
    return divide(total, max(width, 1))


# duplicates are added in chunks of this many rows on CPU: small enough to stay in cache and in
# the allocator's reused memory, large enough that one chunk usually holds all of them
_CHUNK = 4096


def _owners(indices: jax.Array, num_embeddings: int) -> jax.Array:
    """For each entry, the position of the first entry with the same row (``n`` if dropped)."""
    n = indices.shape[0]
    k = jnp.arange(n, dtype=jnp.int32)
    first = jnp.full((num_embeddings,), n, jnp.int32).at[indices].min(k, mode="drop")
    return jnp.take(first, indices, mode="fill", fill_value=n)


def _add_duplicates_in_chunks(values: jax.Array, owners: jax.Array, extra: jax.Array) -> jax.Array:
    """CPU: ``values[owners[j]] += values[j]`` for each duplicate ``j``, in order, in place."""
    n = values.shape[0]
    chunk = min(_CHUNK, n)
    padded = -(-n // chunk) * chunk
    positions = jnp.nonzero(at_run_time(extra), size=padded, fill_value=n)[0]
    count = jnp.sum(extra, dtype=jnp.int32)

    def body(c, acc):
        src = jax.lax.dynamic_slice(positions, (c * chunk,), (chunk,))
        rows = jnp.take(acc, src, axis=0, mode="fill", fill_value=0)
        dst = jnp.take(owners, src, mode="fill", fill_value=n)
        return acc.at[dst].add(rows, mode="drop")

    return jax.lax.fori_loop(0, (count + chunk - 1) // chunk, body, values)


def _add_duplicates_scatter(values: jax.Array, owners: jax.Array, extra: jax.Array) -> jax.Array:
    """GPU/TPU: one scatter-add of every entry into its row's first entry."""
    del extra
    return jnp.zeros_like(values).at[owners].add(values, mode="drop")


def coalesce(grad: SparseGrad, num_embeddings: int) -> tuple[jax.Array, jax.Array]:
    """Sums each row's entries into its first entry.

    Returns:
      ``(rows, values)``: ``rows[k]`` is the entry's row where ``k`` is that row's first entry and
      ``num_embeddings`` elsewhere (scatters drop it); ``values[k]`` at a first entry is the sum of
      the row's entries, in their order.
    """
    indices, values = grad
    n = indices.shape[0]
    if n == 0:
        return indices, values
    valid = (indices >= 0) & (indices < num_embeddings)
    indices = jnp.where(valid, indices, num_embeddings)
    owners = _owners(indices, num_embeddings)
    first = owners == jnp.arange(n, dtype=owners.dtype)
    extra = valid & ~first
    values = jax.lax.platform_dependent(
        values,
        owners,
        extra,
        cpu=_add_duplicates_in_chunks,
        default=_add_duplicates_scatter,
    )
    return jnp.where(first, indices, num_embeddings), values


def _apply_in_chunks(fn: Callable, rows: jax.Array, values: jax.Array, carry: Any) -> Any:
    n, dim = values.shape
    chunk = min(_CHUNK, n)
    full = n // chunk

    def body(c, carry):
        r = jax.lax.dynamic_slice(rows, (c * chunk,), (chunk,))
        v = jax.lax.dynamic_slice(values, (c * chunk, 0), (chunk, dim))
        return fn(carry, r, v)

    carry = jax.lax.fori_loop(0, full, body, carry)
    tail = n - full * chunk
    if tail:
        carry = fn(carry, rows[n - tail :], values[n - tail :])
    return carry


def apply_rows(fn: Callable, rows: jax.Array, values: jax.Array, carry: Any) -> Any:
    """``carry = fn(carry, rows, values)`` over the coalesced entries, in chunks on CPU.

    ``fn`` must treat every entry independently (each kept row occurs once, so chunks commute).
    """
    if rows.shape[0] == 0:
        return carry
    return jax.lax.platform_dependent(
        rows,
        values,
        carry,
        cpu=functools.partial(_apply_in_chunks, fn),
        default=lambda rows, values, carry: fn(carry, rows, values),
    )


def read_rows(state: jax.Array, rows: jax.Array) -> jax.Array:
    """``state[rows]`` with zeros for dropped entries."""
    return jnp.take(state, rows, axis=0, mode="fill", fill_value=0)


def write_rows(state: jax.Array, rows: jax.Array, new: jax.Array) -> jax.Array:
    """``state[rows] = new``, skipping dropped entries."""
    return state.at[rows].set(new.astype(state.dtype), mode="drop")


def add_rows(
    table: jax.Array, rows: jax.Array, delta: jax.Array, rounding: jax.Array | None = None
) -> jax.Array:
    """``table[rows] += delta``, skipping dropped entries (rows are distinct where kept).

    With ``rounding`` (a uint32 key, :func:`rounding_key`) the sum is taken in float32 and
    rounded to the table's dtype stochastically (:func:`stochastic_round`), else to nearest.
    """
    if rounding is None:
        return table.at[rows].add(delta.astype(table.dtype), mode="drop")
    new = read_rows(table, rows).astype(jnp.float32) + delta.astype(jnp.float32)
    return write_rows(table, rows, stochastic_round(new, table.dtype, _noise(rounding, rows, new)))


_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def rounding_key(seed: int, count: jax.Array, dtype: Any) -> jax.Array | None:
    """The stochastic-rounding key of a step (a uint32), or None for a table of float32 or
    wider, which rounds to nearest (its updates are exact enough)."""
    if jnp.dtype(dtype) not in _LOW_PRECISION:
        return None
    return _mix(jnp.uint32(seed) * jnp.uint32(0x9E3779B1) + count.astype(jnp.uint32))


def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit avalanche (murmur3's finalizer): every input bit flips each output bit with
    probability about 1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _noise(key: jax.Array, rows: jax.Array, like: jax.Array) -> jax.Array:
    """``(n, D)`` uniform numbers in [0, 1), a counter-based hash of (key, row, column): the
    same wherever and however the rows are chunked, cheap enough to draw per element (a few
    integer operations; a rounding needs no cryptographic quality)."""
    columns = jnp.arange(like.shape[-1], dtype=jnp.uint32)
    h = _mix(key ^ _mix(rows.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F))[:, None])
    h = _mix(h + columns[None, :] * jnp.uint32(0x165667B1))
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def stochastic_round(x: jax.Array, dtype: Any, noise: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to ``dtype``: to the neighbour above with probability
    ``(x - below) / (above - below)``, so the rounding is unbiased (``E[round(x)] = x``).

    ``noise``: uniform numbers in [0, 1), the shape of ``x``. Values ``dtype`` holds exactly,
    NaN, infinities and overflows round as round-to-nearest does.
    """
    nearest = x.astype(dtype)
    down = jnp.where(
        nearest.astype(jnp.float32) > x, jnp.nextafter(nearest, jnp.array(-jnp.inf, dtype)), nearest
    )
    up = jnp.nextafter(down, jnp.array(jnp.inf, dtype))
    below, above = down.astype(jnp.float32), up.astype(jnp.float32)
    out = jnp.where(noise < (x - below) / (above - below), up, down)
    return jnp.where(jnp.isfinite(nearest) & jnp.isfinite(out), out, nearest)
