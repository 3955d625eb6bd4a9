"""Ids routed to the devices that own their rows, at a static capacity: one primitive for every
owner-placed group (``row_wise``, ``table_wise``).

TorchRec buckets a device's ids by owner (``block_bucketize_sparse_features``) and exchanges
the buckets (``KJTAllToAll``); the TPU embedding stacks bound each bucket by a static
``max_ids_per_partition``. Here, on each device, under ``jax.shard_map``:

1. **dedup and bucket.** The entries to send, as ``(owner, local row)`` pairs, are sorted (one
   sort of int32 keys), the distinct pairs numbered within their owner, and pair ``r`` of owner
   ``o`` given slot ``o * capacity + r`` of a ``(K * capacity,)`` send buffer. A row referenced
   many times (a hot id) takes one slot. Pairs past an owner's ``capacity`` (its highest local
   rows) overflow: their entries are not served, and counted.
2. **exchange.** One ``all_to_all`` of the ``(K, capacity)`` local rows (and, where the
   gradient needs them, how many entries each slot stands for): each owner receives
   ``K * capacity`` rows to read, source after source.
3. **back.** :func:`back` returns whatever the owner computed per slot (the rows) to the
   source, in the source's own slot order: the inverse ``all_to_all``. The gradient goes back
   through the same slots.

A device's work and bytes are ``O(K * capacity)``: flat in ``K`` when the capacity is about
the device's distinct ids over ``K`` (with slack for skew), which :func:`needed` measures.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxembed.core import _bag
from jaxembed.kernels import _ffi as _kernels


class Route(NamedTuple):
    """One device's routing of its entries (see the module's steps).

    Attributes:
      slot: ``(n,)`` int32, each entry's slot in the ``(K * capacity,)`` buffers; ``K *
        capacity`` (past the end) for an entry not sent or not served.
      served: ``(n,)`` bool, the entries sent and given a slot.
      keys: ``(K * capacity,)`` int32, at the owner: the local rows it received, source after
        source; ``rows`` (the block's sentinel) in empty slots.
      counts: ``(K * capacity,)`` int32, at the owner: how many of the source's entries each
        received slot stands for; None unless asked.
      needed: ``()`` int32, the most distinct rows this device sent any one owner (the
        capacity it needed).
      dropped: ``()`` int32, this device's entries that overflowed.
      refused: ``()`` bool, the same on every device: under the ``error`` policy, some device
        overflowed, so nothing was sent (every slot empty); else False.
      order: ``(n,)`` int32, the entries stably sorted by slot.
      filled: ``(K * capacity,)`` int32, at the source: how many entries each slot stands for
        (zeros where refused).
    """

    slot: jax.Array
    served: jax.Array
    keys: jax.Array
    counts: jax.Array | None
    needed: jax.Array
    dropped: jax.Array
    refused: jax.Array
    order: jax.Array
    filled: jax.Array


def _check(devices: int, rows: int) -> None:
    if devices * rows >= 2**31 - 1:
        raise ValueError(
            f"a routed group's keys are int32: {devices} devices x {rows} rows a block must be "
            "below 2**31 - 1; split the tables into smaller groups"
        )


def buckets(owner, local, send, devices: int, rows: int):
    """Step 1 without the capacity, on the pure-JAX path: ``(sorted keys, rank, per_owner,
    at)``. Each entry to send is the key ``owner * rows + local`` (one sort of int32 keys
    alone: a payload would cost several times the sort); each sorted key's distinct pair's
    rank within its owner; each owner's number of distinct pairs; and each entry's position in
    the sorted keys (its pair's first), by binary search. Unsent entries sort last, as
    ``devices * rows`` (the caller, :func:`bucket`, checked that it fits in int32)."""
    n, big = owner.shape[0], devices * rows
    key = jnp.where(send, owner * rows + local, big).astype(jnp.int32)
    sk = jnp.sort(key)
    sent = sk < big
    head = jnp.ones((min(n, 1),), bool)
    first = jnp.concatenate([head, sk[1:] != sk[:-1]]) & sent
    pair = jnp.cumsum(first, dtype=jnp.int32) - 1  # the distinct pair's number, sorted order
    so = jnp.where(sent, sk // rows, devices)
    per_owner = jnp.zeros((devices,), jnp.int32).at[so].add(first.astype(jnp.int32), mode="drop")
    before = jnp.cumsum(per_owner) - per_owner  # distinct pairs of the owners before
    rank = pair - jnp.take(before, jnp.minimum(so, devices - 1))
    at = jnp.searchsorted(sk, key, side="left", method="scan").astype(jnp.int32)
    return sk, rank, per_owner, at


def bucket(owner, local, send, *, devices: int, rows: int, capacity: int):
    """Step 1: ``(slot, keys, counts, per_owner, order)``.

    ``slot`` ``(n,)``: each entry's slot, ``owner * capacity + rank`` (``rank`` numbers the
    owner's distinct rows, ascending), or ``devices * capacity`` for an entry not sent or past
    its owner's capacity; ``keys`` ``(devices * capacity,)``: the row each slot holds (``rows``
    where empty); ``counts``: how many entries each slot stands for; ``per_owner``
    ``(devices,)``: each owner's distinct rows, served or not; ``order`` ``(n,)``: the
    entries stably sorted by slot (what :func:`into_slots` sums slot by slot). On CPU the kernel
    (``jaxembed_bucket``: a counting sort and one pass) computes it, elsewhere :func:`buckets`.
    """
    _check(devices, rows)
    size = devices * capacity

    def reference(owner, local, send):
        sk, rank, per_owner, at = buckets(owner, local, send, devices, rows)
        ok = (sk < devices * rows) & (rank < capacity)
        slot_sorted = jnp.where(ok, (sk // rows) * capacity + rank, size).astype(jnp.int32)
        # duplicates of a pair write the same local row to its slot
        keys = jnp.full((size,), rows, jnp.int32).at[slot_sorted].set(sk % rows, mode="drop")
        counts = jnp.zeros((size,), jnp.int32).at[slot_sorted].add(1, mode="drop")
        slot = jnp.where(send, jnp.take(slot_sorted, at, mode="clip"), size)
        order = jnp.argsort(slot, stable=True).astype(jnp.int32)
        # inside shard_map jnp.argsort's result varies over no axis: cast it to vary as slot does
        axes = tuple(sorted(_kernels._vma(slot) - _kernels._vma(order)))
        if axes:
            order = jax.lax.pcast(order, axes, to="varying")
        return slot, keys, counts, per_owner, order

    if not _kernels.available() or owner.shape[0] == 0:
        return reference(owner, local, send)
    kernel = functools.partial(_kernels.bucket, devices=devices, rows=rows, capacity=capacity)
    return jax.lax.platform_dependent(owner, local, send, cpu=kernel, default=reference)


def route(
    owner: jax.Array,
    local: jax.Array,
    send: jax.Array,
    *,
    axis: str,
    devices: int,
    rows: int,
    capacity: int,
    counts: bool = False,
    refuse: bool = False,
    everywhere: str | tuple[str, ...] | None = None,
) -> Route:
    """Routes the entries ``send`` selects to ``owner`` (``local``: the row there).

    Args:
      owner: ``(n,)`` int32, each entry's owner along ``axis``.
      local: ``(n,)`` int32, its row in the owner's block, below ``rows``.
      send: ``(n,)`` bool, the entries to route.
      axis: the mesh axis of the exchange.
      devices: its size ``K``.
      rows: the rows of an owner's block (``devices * rows`` must fit in int32); also the
        local row an empty slot holds.
      capacity: the static distinct rows per (source, owner) pair.
      counts: also send how many entries each slot stands for.
      refuse: the ``error`` policy: when any device overflows (one ``psum`` of the counts),
        nothing is sent, so that the step changes nothing.
      everywhere: the axes of that ``psum`` (default ``axis``): on a 2-D mesh, the replica
        axis too, so that every copy of a block refuses alike.
    """
    size = devices * capacity
    slot, keys, filled, per_owner, order = bucket(owner, local, send, devices=devices, rows=rows,
                                                  capacity=capacity)  # fmt: skip
    dropped = jnp.sum(send & (slot == size), dtype=jnp.int32)
    refused = jnp.zeros((), bool)
    if refuse:  # nothing is sent: every slot empty
        refused = jax.lax.psum(dropped, axis if everywhere is None else everywhere) > 0
        slot = jnp.where(refused, size, slot)
        keys = jnp.where(refused, rows, keys)
        filled = jnp.where(refused, 0, filled)
    exchange = jax.lax.all_to_all
    received = exchange(keys, axis, 0, 0, tiled=True)
    many = exchange(filled, axis, 0, 0, tiled=True) if counts else None
    served = slot < size
    return Route(slot, served, received, many, jnp.max(per_owner), dropped, refused, order,
                 filled)  # fmt: skip


def needed(owner, local, send, *, devices: int, rows: int) -> jax.Array:
    """The most distinct rows this device would send any one owner: the capacity it needs."""
    return jnp.max(bucket(owner, local, send, devices=devices, rows=rows, capacity=0)[3])


def into_slots(parts: _bag.Spread, slot: jax.Array, order: jax.Array, filled: jax.Array, *,
               weighted: bool) -> jax.Array:  # fmt: skip
    """The gradient's way back, at the source: each slot's sum of its entries' shares of their
    bags' cotangents (``parts``, the core's :class:`~jaxembed.core._bag.Spread`), in the
    entries' order: ``(K * capacity, D)`` in the cotangent's type. ``slot``, ``order`` and
    ``filled`` are the :class:`Route`'s; ``weighted``: the bags have per-sample weights.

    On CPU the bag kernel sums them, reading the cotangent as its table: slot ``s``'s bag is
    its entries (``order``), each a bag's row times its factor (1, or 0 for an entry not
    kept), added in order from zero as the scatter adds them: bit for bit the same. Max bags
    (their shares are per column) and weighted bags take the pure-JAX path: a share there is a
    rounded product, where the kernel's weighted bag fuses the multiply and the add. Elsewhere
    the ``(n, D)`` shares are spread and scattered into the slots.
    """
    size, n = filled.shape[0], slot.shape[0]

    def reference(cot, factor, starts, pos, slot, order, filled):
        values = _bag.spread_values(_bag.Spread(cot, starts, factor, pos))
        return jnp.zeros((size, cot.shape[1]), cot.dtype).at[slot].add(values, mode="drop")

    def kernel(cot, factor, starts, pos, slot, order, filled):
        bag = jnp.take(_bag._bag_ids(starts, n), order)
        ends = jnp.cumsum(filled, dtype=jnp.int32)
        return _kernels.bag_sum(cot, bag, None, jnp.take(factor, order), ends - filled, ends,
                                mean=False, fill=0.0)  # fmt: skip

    args = (parts.cot, parts.factor, parts.starts, parts.pos, slot, order, filled)
    if weighted or parts.pos is not None or n == 0 or not _kernels.table_applies(parts.cot):
        return reference(*args)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=reference)


def back(x: jax.Array, axis: str) -> jax.Array:
    """Per-slot values (rows, gradients) from the owners to the sources, or the reverse: the
    ``(K * capacity, ...)`` buffer's blocks exchanged (its own inverse)."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def totals(keys: jax.Array, counts: jax.Array, *, replica: str | None = None) -> jax.Array:
    """At the owner: each received slot's row's total count over every source (the row's count
    in the whole batch, for ``scale_grad_by_freq``), on a 2-D mesh over the owner's copies
    along ``replica`` too (one ``all_gather`` of the slots). A sort and two binary searches."""
    every, many = keys, counts
    if replica is not None:
        every = jax.lax.all_gather(keys, replica, tiled=True)
        many = jax.lax.all_gather(counts, replica, tiled=True)
    order = jnp.argsort(every)
    sk = every[order]
    running = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(many[order])])
    left = jnp.searchsorted(sk, keys, side="left", method="scan_unrolled")
    right = jnp.searchsorted(sk, keys, side="right", method="scan_unrolled")
    return running[right] - running[left]
