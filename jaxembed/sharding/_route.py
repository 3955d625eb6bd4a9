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

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
    """

    slot: jax.Array
    served: jax.Array
    keys: jax.Array
    counts: jax.Array | None
    needed: jax.Array
    dropped: jax.Array
    refused: jax.Array


def buckets(owner, local, send, devices: int, rows: int):
    """Step 1 without the capacity: ``(sorted keys, rank, per_owner, at)``. Each entry to send
    is the key ``owner * rows + local`` (one sort of int32 keys alone: a payload would cost
    several times the sort); each sorted key's distinct pair's rank within its owner; each
    owner's number of distinct pairs; and each entry's position in the sorted keys (its pair's
    first), by binary search. Unsent entries sort last, as ``devices * rows``."""
    n, big = owner.shape[0], devices * rows
    if big >= 2**31 - 1:
        raise ValueError(
            f"a routed group's keys are int32: {devices} devices x {rows} rows a block must be "
            "below 2**31 - 1; split the tables into smaller groups"
        )
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
    """
    size = devices * capacity
    sk, rank, per_owner, at = buckets(owner, local, send, devices, rows)
    sent = sk < devices * rows
    ok = sent & (rank < capacity)
    dropped = jnp.sum(sent & ~ok, dtype=jnp.int32)
    refused = jnp.zeros((), bool)
    if refuse:
        refused = jax.lax.psum(dropped, axis) > 0
        ok = ok & ~refused
    slot_sorted = jnp.where(ok, (sk // rows) * capacity + rank, size).astype(jnp.int32)
    # duplicates of a pair write the same local row to its slot
    keys = jnp.full((size,), rows, jnp.int32).at[slot_sorted].set(sk % rows, mode="drop")
    exchange = jax.lax.all_to_all
    received = exchange(keys, axis, 0, 0, tiled=True)
    many = None
    if counts:
        many = jnp.zeros((size,), jnp.int32).at[slot_sorted].add(1, mode="drop")
        many = exchange(many, axis, 0, 0, tiled=True)
    slot = jnp.take(slot_sorted, at, mode="clip")
    served = send & (slot < size)
    slot = jnp.where(served, slot, size)
    return Route(slot, served, received, many, jnp.max(per_owner), dropped, refused)


def needed(owner, local, send, *, devices: int, rows: int) -> jax.Array:
    """The most distinct rows this device would send any one owner: the capacity it needs."""
    return jnp.max(buckets(owner, local, send, devices, rows)[2])


def back(x: jax.Array, axis: str) -> jax.Array:
    """Per-slot values (rows, gradients) from the owners to the sources, or the reverse: the
    ``(K * capacity, ...)`` buffer's blocks exchanged (its own inverse)."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def totals(keys: jax.Array, counts: jax.Array) -> jax.Array:
    """At the owner: each received slot's row's total count over every source (the row's count
    in the whole batch, for ``scale_grad_by_freq``). A sort and two binary searches."""
    order = jnp.argsort(keys)
    sk = keys[order]
    running = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts[order])])
    left = jnp.searchsorted(sk, keys, side="left", method="scan_unrolled")
    right = jnp.searchsorted(sk, keys, side="right", method="scan_unrolled")
    return running[right] - running[left]
