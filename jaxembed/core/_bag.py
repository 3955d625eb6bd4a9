"""``embedding_bag``: torch's ``F.embedding_bag`` / ``nn.EmbeddingBag`` as a pure function.

A bag lookup is the core's lookup over every index (the renorm, the index policy, the gradient
with ``padding_idx`` and ``scale_grad_by_freq`` are :func:`jaxembed.embedding`'s) followed by a
per-bag reduction here:

* 2-D indices ``(B, N)``: one bag per row. The forward pass loops over the N columns, gathering
  ``(B, D)`` rows at a time into a running sum / max, and never materialises the ``(B, N, D)``
  gathered rows: on CPU that is ~5x faster than ``take(...).sum(1)``, whose 32 MB temporary costs
  more in page faults than the gather itself. The tangent (and so the gradient) is the plain
  gather-and-reduce, the transpose of which is one scatter-add.
* 1-D indices with ``offsets``: bag ``b`` holds ``indices[offsets[b]:offsets[b + 1]]``, the last
  bag running to the end; a sorted segment reduction with ``B`` static, taken from ``offsets``'s
  shape, so changing offsets' values never retraces.

Padding entries are left out of every mode and of the mean's count. Empty and all-padding bags
give zeros. ``max`` picks, per bag and column, the first entry holding the maximum, and only that
entry receives the gradient (torch's CPU rule).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed.core import _index_policy, _layout, _options, _renorm, _serialization
from jaxembed.core._numerics import at_run_time, divide
from jaxembed.core._options import LookupOptions
from jaxembed.core._packed import array_of
from jaxembed.core._pipeline import Lookup, new_params
from jaxembed.kernels import _ffi as _kernels

MODES = _options.MODES


def _check_offsets(
    offsets: Any, num_indices: int, include_last_offset: bool, end: Any = None
) -> jax.Array:
    """The offsets, checked where they are concrete; ``end`` is where the last bag ends
    (``num_valid``, or ``len(indices)``)."""
    end = num_indices if end is None or isinstance(end, jax.core.Tracer) else int(end)
    offsets = _index_policy.as_integer_array(offsets, "offsets")
    if offsets.ndim != 1:
        raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
    if include_last_offset and offsets.shape[0] == 0:
        raise ValueError("offsets must hold at least one entry with include_last_offset=True")
    num_bags = offsets.shape[0] - int(include_last_offset)
    if num_bags == 0 and num_indices > 0:
        raise ValueError(
            f"offsets define no bag, so the {num_indices} indices would be dropped; "
            "give at least one offset (the first must be 0)"
        )
    if not isinstance(offsets, jax.core.Tracer) and offsets.shape[0]:
        values = np.asarray(offsets).astype(np.int64)
        if values[0] != 0:
            raise ValueError(f"offsets[0] must be 0, got {values[0]}")
        if np.any(np.diff(values) < 0):
            raise ValueError("offsets must be non-decreasing")
        if values[-1] > end:
            raise ValueError(
                f"offsets hold {values[-1]}, past the end of the {end} indices"
                + ("" if end == num_indices else " num_valid counts")
            )
        if include_last_offset and values[-1] != end:
            raise ValueError(
                "with include_last_offset=True the last offset ends the last bag and must equal "
                + (f"len(indices) = {end}" if end == num_indices else f"num_valid = {end}")
                + f", got {values[-1]} (torch's CPU kernel would silently drop or keep the "
                "trailing indices)"
            )
    return jnp.asarray(offsets, jnp.int32)


def _bounds(starts: Any, n: int) -> tuple[jax.Array, jax.Array]:
    """``(starts, ends)`` of the bags. ``starts`` is either the starts alone (each bag then ends
    where the next starts, the last at ``n``) or a ``(starts, ends)`` pair: bags that end earlier,
    so that the entries between (another table's, or past ``num_valid``) are read by no bag's
    loop. Entries outside every bag must be left out by ``keep`` as well."""
    if isinstance(starts, tuple):
        return starts
    return starts, jnp.concatenate([starts[1:], jnp.full((1,), n, starts.dtype)])


def _bag_ids(starts: Any, num_indices: int) -> jax.Array:
    """The bag of each position: the last bag whose start is at or before it.

    ``starts`` must never decrease (bags in order, an empty bag starting where the previous
    ends): a start below an earlier one would move every later entry to another bag. Callers
    that pad bags (a table-wise slot with fewer features) pad with empty bags at the last end.
    """
    starts = _bounds(starts, num_indices)[0]
    # how many bags start at or before each position, as a running count of the starts: a
    # B-long scatter and an n-long cumsum (XLA's CPU sort-based searchsorted costs ~30x more)
    marks = jnp.zeros(num_indices + 1, jnp.int32).at[starts].add(1, mode="drop")
    return (_running_count(marks[:num_indices]) - 1).astype(starts.dtype)


def _running_count(x: jax.Array) -> jax.Array:
    """``cumsum(x)`` in int32, computed when the step runs (:func:`at_run_time`)."""
    return jnp.cumsum(at_run_time(x), dtype=jnp.int32)


def _first_argmax(vals: jax.Array, keep: jax.Array, bag: jax.Array, num_bags: int) -> jax.Array:
    """Per bag and column, the first kept position holding the maximum; ``len(vals)`` if none."""
    n = vals.shape[0]
    bag_max = jax.ops.segment_max(vals, bag, num_bags, indices_are_sorted=True)
    hit = (vals == jnp.take(bag_max, bag, axis=0, mode="clip")) & keep[:, None]
    positions = jnp.where(hit, jnp.arange(n, dtype=jnp.int32)[:, None], n)
    first = jax.ops.segment_min(positions, bag, num_bags, indices_are_sorted=True)
    return jnp.minimum(first, n)  # bags with nothing kept: the zero row appended at n


def _segment_bags(table, safe, keep, psw, starts, mode, lookup):
    """The general forward pass: gather every row, then sorted segment reductions.

    Returns ``(bags, pos)`` as :func:`_column_bags` does.
    """
    n, num_bags = safe.shape[0], _bounds(starts, 0)[0].shape[0]
    acc = _renorm.compute_dtype(table.dtype)
    rows = _index_policy.gather_rows(table, safe, lookup).astype(acc)
    bag = _bag_ids(starts, n)
    segment = dict(num_segments=num_bags, indices_are_sorted=True)
    if mode == "max":
        vals = jnp.where(keep[:, None], rows, -jnp.inf)
        first = _first_argmax(vals, keep, bag, num_bags)
        padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), acc)])
        out = jnp.take_along_axis(padded, first, axis=0)
        nan = jax.ops.segment_max(jnp.isnan(vals).astype(jnp.int32), bag, **segment) > 0
        # a NaN row (an out-of-range index under jit) makes its bag NaN, never a silent max
        out = jnp.where(nan, jnp.nan, out)
        return out.astype(table.dtype), jnp.where(first < n, first, -1)
    if psw is not None:
        rows = rows * psw.astype(acc)[:, None]
    total = jax.ops.segment_sum(jnp.where(keep[:, None], rows, 0), bag, **segment)
    if mode == "mean":
        total = divide(total, jnp.maximum(_bag_counts(keep, starts, acc), 1)[:, None])
    return total.astype(table.dtype), jnp.zeros(total.shape, jnp.int32)


def _bag_counts(keep, starts, dtype, width=None):
    """How many kept entries each bag holds: with 2-D indices (``width`` entries a bag) a sum
    per row; else differences of a running count (exact, in int32)."""
    if width is not None:
        num_bags = _bounds(starts, 0)[0].shape[0]
        if width == 0:
            return jnp.zeros((num_bags,), dtype)
        return keep.reshape(num_bags, width).sum(axis=1, dtype=jnp.int32).astype(dtype)
    running = jnp.concatenate([jnp.zeros((1,), jnp.int32), _running_count(keep)])
    n = keep.shape[0]
    starts, ends = _bounds(starts, n)
    return (running[jnp.minimum(ends, n)] - running[jnp.minimum(starts, n)]).astype(dtype)


def _column_bags(table, safe, keep, psw, starts, mode, width, lookup):
    """The fast forward pass: the k-th entry of every bag at once, for k < ``width``.

    Each step gathers ``(B, D)`` rows into a running sum or max, so the ``(n, D)`` gathered rows
    never exist. Returns ``(bags, pos)``; for max mode ``pos`` holds the position (in ``safe``) of
    the first maximal entry per bag and feature, -1 where a bag keeps nothing.
    """
    n = safe.shape[0]
    bounds = starts
    starts, ends = _bounds(starts, n)
    num_bags = starts.shape[0]
    acc = _renorm.compute_dtype(table.dtype)
    shape = (num_bags, table.shape[1])

    def column(k):
        at = starts + k
        valid = at < ends
        at = jnp.minimum(at, n - 1)
        rows = _index_policy.gather_rows(table, safe[at], lookup).astype(acc)
        return rows, (valid & keep[at])[:, None], at

    if mode == "max":

        def body(k, carry):
            best, pos, nan = carry
            rows, kept, at = column(k)
            better = kept & (rows > best)  # strict: the first maximal entry wins, as in torch
            return (
                jnp.where(better, rows, best),
                jnp.where(better, at[:, None], pos),
                nan | (kept & jnp.isnan(rows)),
            )

        # carries made "like" the table, so inside shard_map they vary over the same mesh axes
        like = array_of(table)
        init = (
            jnp.full_like(like, -jnp.inf, acc, shape=shape),
            jnp.full_like(like, -1, jnp.int32, shape=shape),
            jnp.zeros_like(like, bool, shape=shape),
        )
        best, pos, nan = jax.lax.fori_loop(0, width, body, init) if n else init
        # a NaN row (an out-of-range index under jit) makes its bag NaN, never a silent max
        out = jnp.where(nan, jnp.nan, jnp.where(pos >= 0, best, 0))
        return out.astype(table.dtype), pos

    def body(k, total):
        rows, kept, at = column(k)
        if psw is not None:
            rows = rows * psw[at].astype(acc)[:, None]
        return total + jnp.where(kept, rows, 0)

    zeros = jnp.zeros_like(array_of(table), acc, shape=shape)
    total = jax.lax.fori_loop(0, width, body, zeros) if n else zeros
    if mode == "mean":
        total = divide(total, jnp.maximum(_bag_counts(keep, bounds, acc), 1)[:, None])
    return total.astype(table.dtype), jnp.zeros(shape, jnp.int32)


def _reshape_bags(table, safe, keep, psw, starts, mode, width, lookup):
    """2-D bags the plain way: gather ``(B, width, D)`` rows and reduce along ``width``.

    Returns ``(bags, pos)`` as :func:`_column_bags` does.
    """
    num_bags, dim = starts.shape[0], table.shape[1]
    if width == 0:
        return jnp.zeros((num_bags, dim), table.dtype), jnp.full((num_bags, dim), -1, jnp.int32)
    acc = _renorm.compute_dtype(table.dtype)
    rows = _index_policy.gather_rows(table, safe, lookup).astype(acc)
    rows = rows.reshape(num_bags, width, dim)
    keep = keep.reshape(num_bags, width, 1)
    if mode == "max":
        vals = jnp.where(keep, rows, -jnp.inf)
        first = jnp.argmax(vals, axis=1)  # the first maximal entry
        found = jnp.any(keep, axis=1)
        picked = jnp.take_along_axis(rows, first[:, None, :], axis=1)[:, 0]
        out = jnp.where(jnp.any(jnp.isnan(vals), axis=1), jnp.nan, jnp.where(found, picked, 0))
        start = (jnp.arange(num_bags, dtype=jnp.int32) * width)[:, None]
        return out.astype(table.dtype), jnp.where(found, start + first, -1).astype(jnp.int32)
    if psw is not None:
        rows = rows * psw.astype(acc).reshape(num_bags, width, 1)
    total = jnp.where(keep, rows, 0).sum(axis=1)
    if mode == "mean":
        total = divide(total, jnp.maximum(keep.sum(axis=1, dtype=acc), 1))
    return total.astype(table.dtype), jnp.zeros(total.shape, jnp.int32)


def _native_bags(table, safe, keep, psw, starts, mode, width):
    """The CPU kernel's bags (:mod:`jaxembed.kernels`): each bag's kept entries read and pooled
    in one pass, its output row kept in registers. Returns ``(bags, pos)`` as
    :func:`_column_bags` does."""
    n = safe.shape[0]
    if width is not None:  # 2-D indices: every bag holds `width` entries
        first = starts
        ends = starts + width
    else:
        first, ends = _bounds(starts, n)
    if mode == "max":
        return _kernels.bag_max(table, safe, keep, first, ends)
    bags = _kernels.bag_sum(table, safe, keep, psw, first, ends, mean=mode == "mean")
    return bags, jnp.zeros(bags.shape, jnp.int32)


def _bags_primal(table, safe, keep, psw, starts, mode, width, lookup):
    """Picks the forward pass by backend: on CPU the fused kernel where it is built
    (:mod:`jaxembed.kernels`), else XLA's: it pays for large temporaries in page faults, so
    there the column loop wins; on GPU and TPU one big gather and reduce does (the loop runs
    ~4x slower than ``take(...).sum(1)`` on an H100)."""

    def cpu():
        if _kernels.bags_apply(table, safe.shape[0], lookup):
            return _native_bags(table, safe, keep, psw, starts, mode, width)
        if width is not None:  # 2-D indices: every bag holds `width` entries
            return _column_bags(table, safe, keep, psw, starts, mode, width, lookup)
        # offsets: the loop runs as long as the largest bag. Where that would gather more than
        # twice the rows there are (a few huge bags), the segment reduction is cheaper.
        first, ends = _bounds(starts, safe.shape[0])
        longest = jnp.max(ends - first, initial=0)
        balanced = longest * first.shape[0] <= 2 * safe.shape[0] + first.shape[0]
        return jax.lax.cond(
            balanced,
            lambda: _column_bags(table, safe, keep, psw, starts, mode, longest, lookup),
            lambda: _segment_bags(table, safe, keep, psw, starts, mode, lookup),
        )

    def accelerator():
        if width is not None:
            return _reshape_bags(table, safe, keep, psw, starts, mode, width, lookup)
        return _segment_bags(table, safe, keep, psw, starts, mode, lookup)

    return jax.lax.platform_dependent(cpu=cpu, default=accelerator)


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8, 9))
def _bags(weight, table, safe, grad_scale, keep, psw, starts, mode, width, lookup):
    """Bags of the rows of ``table`` (the renormed, gradient-free table) with torch's gradient
    to ``weight``. ``safe``, ``grad_scale``, ``keep`` and ``psw`` are flat, one per entry."""
    del weight, grad_scale
    return _bags_primal(table, safe, keep, psw, starts, mode, width, lookup)[0]


def _is_zero(t) -> bool:
    """A symbolic zero tangent (a packed table's is a pytree of them)."""
    zero = jax.custom_derivatives.SymbolicZero
    leaves = jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, zero))
    return t is None or all(isinstance(x, zero) for x in leaves)


def _bags_jvp(mode, width, lookup, primals, tangents):
    """The tangent: gather the table's tangent rows and reduce them the plain way. Its transpose
    (the gradient) is one scatter-add into the table."""
    _, table, safe, grad_scale, keep, psw, starts = primals
    weight_dot, psw_dot = tangents[0], tangents[5]
    out, pos = _bags_primal(table, safe, keep, psw, starts, mode, width, lookup)
    acc = _renorm.compute_dtype(table.dtype)
    n, num_bags = safe.shape[0], _bounds(starts, 0)[0].shape[0]

    def reduce(rows):  # (n, D) -> (B, D) sums
        if width is not None:
            return rows.reshape(num_bags, width, rows.shape[-1]).sum(axis=1)
        bag = _bag_ids(starts, n)
        return jax.ops.segment_sum(rows, bag, num_bags, indices_are_sorted=True)

    out_dot = jnp.zeros(out.shape, acc)
    if not _is_zero(weight_dot):
        factor = keep.astype(acc)
        if grad_scale is not None:
            factor = factor * grad_scale.astype(acc)
        if psw is not None:
            factor = factor * psw.astype(acc)
        rows_dot = jnp.take(weight_dot, safe, axis=0, mode="fill", fill_value=0).astype(acc)
        rows_dot = rows_dot * factor[:, None]
        if mode == "max":
            padded = jnp.concatenate([rows_dot, jnp.zeros((1, rows_dot.shape[1]), acc)])
            out_dot = jnp.take_along_axis(padded, jnp.where(pos >= 0, pos, n), axis=0)
        else:
            out_dot = reduce(rows_dot)
    if psw is not None and not _is_zero(psw_dot):  # sum mode only
        rows = _index_policy.gather_rows(table, safe, lookup).astype(acc)
        # rows left out (padding, past num_valid) are zeroed first, so that their weights'
        # gradient is 0 even where the row holds NaN (the sentinel's)
        rows = jnp.where(keep[:, None], rows, 0)
        out_dot = out_dot + reduce(rows * psw_dot.astype(acc)[:, None])
    if mode == "mean":
        counts = _bag_counts(keep, starts, acc, width)
        out_dot = divide(out_dot, jnp.maximum(counts, 1)[:, None])
    return out, out_dot.astype(out.dtype)


_bags.defjvp(_bags_jvp, symbolic_zeros=True)


def bags_of_table(table, safe, keep, psw, starts, mode, width, style):
    """The bags of the (gradient-free) ``table``, differentiable only in ``psw``: a sparse
    lookup's forward pass. Returns ``(bags, pos)``, ``pos`` as :func:`_column_bags`'s."""
    if psw is None:
        return _bags_primal(table, safe, keep, psw, starts, mode, width, style)
    # sum mode: the weights' gradient is the gathered rows' (the table gets none here)
    table = jax.lax.stop_gradient(table)
    out = _bags(table, table, safe, None, keep, psw, starts, mode, width, style)
    return out, None


class Spread(NamedTuple):
    """The transpose of the bag reduction, before it is applied: entry ``j``'s gradient is
    ``cot[bag[j]] * factor[j]`` (zero for a bag outside ``[0, B)``), where ``bag[j]`` is the
    last bag starting at or before ``j`` (:func:`_bag_ids`), and with ``pos`` (max bags) only
    in the columns ``d`` where ``pos[bag[j], d] == j``. :func:`spread_values` makes the
    ``(n, D)`` values; a row-wise update kernel can read these parts instead.

    Attributes:
      cot: ``(B, D)`` each bag's cotangent, a mean's already divided by its count, in the
        accumulator's dtype.
      starts: ``(B,)`` int32, where each bag starts (never decreasing).
      factor: ``(n,)`` each entry's factor, in the accumulator's dtype: kept (1 or 0), times
        ``scale_grad_by_freq``'s scale, times the per-sample weight.
      pos: ``(B, D)`` int32, the entry holding each max bag's column maximum; None otherwise.
    """

    cot: jax.Array
    starts: jax.Array
    factor: jax.Array
    pos: jax.Array | None


def spread_parts(cot, keep, starts, grad_scale, psw, pos, mode, width) -> Spread:
    """:func:`spread`'s parts, for a kernel to apply without the ``(n, D)`` values."""
    acc = _renorm.compute_dtype(cot.dtype)
    cot = cot.astype(acc)
    if width is not None:
        first = jnp.arange(cot.shape[0], dtype=jnp.int32) * width
    else:
        first = _bounds(starts, keep.shape[0])[0].astype(jnp.int32)
    factor = keep.astype(acc)
    if grad_scale is not None:
        factor = factor * grad_scale.astype(acc)
    if psw is not None:
        factor = factor * psw.astype(acc)
    if mode == "mean":
        cot = divide(cot, jnp.maximum(_bag_counts(keep, starts, acc, width), 1)[:, None])
    return Spread(cot, first, factor, pos if mode == "max" else None)


def spread_values(parts: Spread) -> jax.Array:
    """The ``(n, D)`` entries' gradients :class:`Spread` describes."""
    n = parts.factor.shape[0]
    bag = _bag_ids(parts.starts, n)
    share = jnp.take(parts.cot, bag, axis=0, mode="fill", fill_value=0)
    if parts.pos is not None:  # only the entry holding each column's maximum
        first = jnp.take(parts.pos, bag, axis=0, mode="fill", fill_value=-1)
        share = jnp.where(first == jnp.arange(n, dtype=first.dtype)[:, None], share, 0)
    return share * parts.factor[:, None]


def spread(cot, keep, starts, grad_scale, psw, pos, mode, width):
    """The transpose of the bag reduction: each entry's share of its bag's cotangent, ``(n, D)``.

    It equals, entry by entry, what the dense gradient scatters into the table (the same
    factors, in the same order), so a sparse update over these entries matches the dense one.
    Entries outside ``keep`` get zeros.
    """
    return spread_values(spread_parts(cot, keep, starts, grad_scale, psw, pos, mode, width))


def flat_bags(indices, starts, psw):
    """``(indices, starts, psw, width)`` with the indices (and weights) flat, one start per bag.

    2-D indices hold ``width`` entries per bag (``width`` is None for 1-D indices, whose
    ``starts`` come from the offsets).
    """
    if indices.ndim != 2:
        return indices, starts, psw, None
    num_bags, width = indices.shape
    starts = jnp.arange(num_bags, dtype=jnp.int32) * width
    psw = None if psw is None else psw.reshape(-1)
    return indices.reshape(-1), starts, psw, width


def kept(safe: jax.Array, padding_idx: int | None) -> jax.Array:
    """Which entries the reduction keeps: all but ``padding_idx``'s."""
    return jnp.ones(safe.shape, bool) if padding_idx is None else safe != padding_idx


@functools.partial(jax.jit, static_argnames=("mode", "options", "layout"))
def _embedding_bag(weight, indices, starts, psw, num_valid, *, mode, options, layout):
    """``indices`` 2-D with ``starts`` None, or 1-D with ``starts`` (one per bag).

    ``num_valid``: with offsets, the entries from this position on are in no bag (None: all
    count). They are sent to the sentinel row and left out of the reduction: no value, no
    gradient, no renorm, no count.
    """
    num_embeddings = weight.shape[0]

    def body(weight, indices, starts, psw, num_valid):
        indices, starts, psw, width, valid = bag_entries(
            indices, starts, psw, num_valid, num_embeddings
        )
        lookup = Lookup.start(weight, indices, options, layout, num_embeddings)
        keep = kept(lookup.safe, options.padding_idx)
        if valid is not None:
            keep = keep & valid
        source = layout.bag_source(lookup, keep, starts, psw)
        weight, table, index, keep, starts, psw, style = source
        bags = _bags(weight, table, index, lookup.scale(), keep, psw, starts, mode, width, style)
        return bags, lookup.new_weight

    return layout.run(
        body,
        (weight, indices, starts, psw, num_valid),
        ("table", "indices", "replicated", "indices", "replicated"),
        ("bags", "table"),
        ndim=indices.ndim,
    )


def _check_num_valid(num_valid: Any, ndim: int, num_indices: int) -> jax.Array | None:
    if num_valid is None:
        return None
    if ndim != 1:
        raise ValueError(
            "num_valid is for 1-D indices with offsets; 2-D bags pad with padding_idx instead"
        )
    num_valid = _index_policy.as_integer_array(num_valid, "num_valid")
    if num_valid.ndim != 0:
        raise ValueError(f"num_valid must be a scalar, got shape {tuple(num_valid.shape)}")
    if not isinstance(num_valid, jax.core.Tracer):
        value = int(num_valid)
        if not 0 <= value <= num_indices:
            raise ValueError(
                f"num_valid must be within [0, len(indices)] = [0, {num_indices}], got {value}"
            )
    return jnp.asarray(num_valid, jnp.int32)


def prepare_bags(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    offsets: ArrayLike | None,
    options: LookupOptions,
    *,
    mode: str,
    per_sample_weights: ArrayLike | None,
    include_last_offset: bool,
    num_valid: ArrayLike | None = None,
    output_dtype: Any = None,
) -> tuple:
    """The checks of a bag call: ``(weight, indices, starts, per_sample_weights, num_valid)``
    (``starts`` None for 2-D indices)."""
    weight = options.table_of(params, output_dtype)
    idx = _index_policy.prepare_indices(indices, weight.shape[0])
    if idx.ndim == 2 and offsets is not None:
        raise ValueError("offsets must be None when indices are 2-D (one bag per row)")
    if idx.ndim == 1 and offsets is None:
        raise ValueError("1-D indices need offsets (the start of each bag)")
    if idx.ndim not in (1, 2):
        raise ValueError(f"indices must be 1-D (with offsets) or 2-D, got shape {idx.shape}")
    if per_sample_weights is not None:
        per_sample_weights = _check_per_sample_weights(per_sample_weights, mode, idx.shape)
    num_valid = _check_num_valid(num_valid, idx.ndim, idx.shape[0] if idx.ndim else 0)
    starts = None
    if idx.ndim == 1:
        end = idx.shape[0] if num_valid is None else num_valid
        starts = _check_offsets(offsets, idx.shape[0], include_last_offset, end)
        if include_last_offset:
            starts = starts[:-1]
    return weight, idx, starts, per_sample_weights, num_valid


def bag_entries(indices, starts, psw, num_valid, num_embeddings):
    """The bags' entries, flat: ``(indices, starts, psw, width, valid)``. Entries past
    ``num_valid`` go to the sentinel ``num_embeddings`` (``valid`` marks the others, or is None),
    and the last bag then ends at ``num_valid``, so no loop reads the padding."""
    indices, starts, psw, width = flat_bags(indices, starts, psw)
    valid = None
    if num_valid is not None:
        valid = jnp.arange(indices.shape[0], dtype=jnp.int32) < num_valid
        indices = jnp.where(valid, indices, num_embeddings)
        if starts is not None:
            n = indices.shape[0]
            ends = jnp.concatenate([starts[1:], jnp.full((1,), n, starts.dtype)])
            starts = (starts, jnp.maximum(jnp.minimum(ends, num_valid), starts))
    return indices, starts, psw, width, valid


def embed_bags(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    offsets: ArrayLike | None,
    options: LookupOptions,
    *,
    mode: str,
    per_sample_weights: ArrayLike | None,
    include_last_offset: bool,
    num_valid: ArrayLike | None = None,
    sharding: _layout.Layout | None = None,
    output_dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`embedding_bag` with its options already checked (the modules' front end)."""
    weight, idx, starts, per_sample_weights, num_valid = prepare_bags(
        params,
        indices,
        offsets,
        options,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        num_valid=num_valid,
        output_dtype=output_dtype,
    )
    layout = _layout.bind(sharding, weight, idx.shape, offsets=idx.ndim == 1)
    bags, new_weight = _embedding_bag(
        weight,
        idx,
        starts,
        per_sample_weights,
        num_valid,
        mode=mode,
        options=options,
        layout=layout,
    )
    return bags, new_params(params, new_weight)


def pad_bags(
    bags: Sequence[Sequence[int]],
    *,
    num_bags: int | None = None,
    capacity: int | None = None,
    min_capacity: int = 16,
) -> tuple[np.ndarray, np.ndarray, int]:
    """A batch of variable-length bags as fixed-shape arrays: ``(indices, offsets, num_valid)``.

    For :func:`embedding_bag` / :class:`jaxembed.EmbeddingBag` with ``num_valid``: the flat ids
    are padded to a capacity of a power of two (or ``capacity``), so a data loader whose batches
    vary in length compiles one program per capacity it reaches (a handful), not one per batch.
    The padding (zeros) after ``num_valid`` is in no bag, and the table needs no padding row.

    Args:
      bags: one sequence of ids per bag (lists, NumPy arrays); a bag may be empty.
      num_bags: pad the bags themselves to this many (the extra bags are empty, so zeros);
        default ``len(bags)``.
      capacity: the length of ``indices``; default the smallest power of two (and at least
        ``min_capacity``) that holds every id.
      min_capacity: the least default capacity.

    Returns:
      ``indices`` ``(capacity,)`` int32, ``offsets`` ``(num_bags,)`` int32 (each bag's start),
      and ``num_valid``, the number of real ids.

    Raises:
      ValueError: ``num_bags`` below ``len(bags)``, or ``capacity`` below the number of ids.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> ids, offsets, n = jaxembed.pad_bags([[1, 2, 3], [], [4]])
      >>> ids.shape, offsets, n
      ((16,), array([0, 3, 3], dtype=int32), 4)
      >>> params = {"weight": jnp.arange(10.0)[:, None]}
      >>> jaxembed.embedding_bag(params, ids, offsets, mode="sum", num_valid=n)[0][:, 0]
      Array([6., 0., 4.], dtype=float32)
    """
    lengths = [len(b) for b in bags]
    total = sum(lengths)
    num_bags = len(bags) if num_bags is None else int(num_bags)
    if num_bags < len(bags):
        raise ValueError(f"num_bags={num_bags} is below the {len(bags)} bags given")
    if capacity is None:
        capacity = max(int(min_capacity), 1 << max(total - 1, 0).bit_length())
    if capacity < total:
        raise ValueError(f"capacity={capacity} cannot hold the {total} ids")
    indices = np.zeros(capacity, np.int32)
    if total:
        indices[:total] = np.concatenate([np.asarray(b, np.int64).reshape(-1) for b in bags])
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    offsets = np.concatenate([starts[:-1], np.full(num_bags - len(bags), total, np.int32)])
    return indices, offsets.astype(np.int32), total


def embedding_bag(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mode: str = "mean",
    per_sample_weights: ArrayLike | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    lookup_style: str = "gather",
    num_valid: ArrayLike | None = None,
    sharding: _layout.Layout | None = None,
    output_dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sums, averages or maxes bags of embeddings, with torch's ``nn.EmbeddingBag`` semantics.

    Args:
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``, or a
        :class:`jaxembed.QuantizedTable`, frozen, as in :func:`jaxembed.embedding`: its rows are
        decoded as the reduction reads them and summed in float32 (torch's quantized
        ``embedding_bag_*_rowwise_offsets``).
      indices: 2-D ``(B, N)``, one bag per row (``offsets`` must be None); or 1-D with ``offsets``.
      offsets: 1-D start of each bag in 1-D ``indices``; ``offsets[0]`` must be 0. With
        ``include_last_offset=True`` it has ``B + 1`` entries, the last equal to ``len(indices)``
        (CSR). The number of bags is static, taken from its shape.
      mode: ``"sum"``, ``"mean"`` or ``"max"``.
      per_sample_weights: a floating weight per index, the shape of ``indices``; ``"sum"`` only.
        Differentiable.
      include_last_offset: see ``offsets``.
      padding_idx: entries equal to it are left out of the reduction and of the mean's count,
        and their row gets no gradient.
      max_norm: renorm every referenced row (padding rows too) before the reduction.
      norm_type: the p of the p-norm for ``max_norm``.
      scale_grad_by_freq: the gradient of :func:`jaxembed.embedding` with this option, followed
        by the reduction (torch 2.13's CPU bag kernel divides by the wrong index's count when
        counts are mixed; this follows torch's documented semantics instead).
      lookup_style: how rows are read: ``"gather"``, ``"one_hot"`` or ``"auto"``, as in
        :func:`jaxembed.embedding`. Same bags and gradients for every style.
      num_valid: with offsets, how many of the indices are real (a scalar, traced or not): the
        rest, up to the static length, are in no bag, as if they were not there, for tables with
        or without ``padding_idx``. Feed a data loader's variable-length batches at a fixed
        capacity this way (see :func:`jaxembed.pad_bags`); new lengths never recompile.
      sharding: a :class:`jaxembed.TableSharding`, as in :func:`jaxembed.embedding`. ``batch``
        splits the bags of 2-D indices; 1-D indices with offsets are given to every device whole
        (``batch`` must then be None). The rows are combined over ``vocab`` before the reduction,
        so with only rows split the bags equal the unsharded ones bit for bit (split columns may
        compile the reduction's multiply-adds differently: ulps apart).
      output_dtype: a quantized table's bags' dtype: float32 (default), float16 or bfloat16
        (reduced in float32, then cast).

    Returns:
      ``(bags, new_params)``: ``bags.shape == (B, embedding_dim)`` in the table's dtype; empty
      and all-padding bags are zeros. ``new_params`` as in :func:`jaxembed.embedding`.

    Raises:
      ValueError: an unknown ``mode``; ``per_sample_weights`` with a mode other than sum or of
        another shape; 1-D indices without offsets, 2-D with offsets, other ranks; offsets not 1-D;
        offsets that define no bag for non-empty indices; eagerly, ``offsets[0] != 0``, decreasing
        offsets, offsets past the end, a last offset other than ``len(indices)`` with
        ``include_last_offset``; ``scale_grad_by_freq`` with ``mode="max"``; and the
        configuration errors of :func:`jaxembed.embedding`; ``num_valid`` with 2-D indices, not
        a scalar, or (concrete) outside ``[0, len(indices)]``, and offsets past it.
      TypeError: non-integer indices or offsets, non-floating ``per_sample_weights``.
      IndexError: concrete out-of-range indices. Under ``jit`` their bags come back NaN.

    Under ``jit`` offsets cannot be checked: bags are read as "each position belongs to the last
    bag starting at or before it", so trailing indices always land in the last bag (and, with a
    traced ``offsets[0] > 0``, the entries before it in no bag).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> params = {"weight": jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])}
      >>> bags, _ = jaxembed.embedding_bag(params, jnp.array([0, 1, 2, 2]), jnp.array([0, 3]),
      ...                                  mode="sum")
      >>> bags
      Array([[4., 5.],
             [3., 3.]], dtype=float32)
      >>> jaxembed.embedding_bag(params, jnp.array([[0, 1], [2, 2]]), mode="max")[0]
      Array([[1., 2.],
             [3., 3.]], dtype=float32)
    """
    mode, include_last_offset, options = _options.bag_call_options(
        params,
        mode,
        include_last_offset,
        padding_idx,
        max_norm,
        norm_type,
        scale_grad_by_freq,
        lookup_style,
    )
    return embed_bags(
        params,
        indices,
        offsets,
        options,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        num_valid=num_valid,
        sharding=sharding,
        output_dtype=output_dtype,
    )


def _check_per_sample_weights(per_sample_weights: Any, mode: str, shape: tuple) -> jax.Array:
    if mode != "sum":
        raise ValueError(f'per_sample_weights is only supported with mode="sum", got {mode!r}')
    if not hasattr(per_sample_weights, "dtype"):
        per_sample_weights = jnp.asarray(per_sample_weights)
    if not jnp.issubdtype(per_sample_weights.dtype, jnp.floating):
        raise TypeError(
            f"per_sample_weights must have a floating dtype, got {per_sample_weights.dtype}"
        )
    if tuple(per_sample_weights.shape) != tuple(shape):
        raise ValueError(
            f"per_sample_weights must have the shape of indices {tuple(shape)}, "
            f"got {tuple(per_sample_weights.shape)}"
        )
    return per_sample_weights


_serialization.register_namedtuple(Spread, "core.Spread")
