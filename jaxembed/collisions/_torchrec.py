"""TorchRec's managed-collision state dict in and out (``MCHManagedCollisionModule``'s buffers).

TorchRec saves, per table: ``_mch_sorted_raw_ids`` (held ids ascending, ``2**63 - 1`` where
empty), ``_mch_remapped_ids_mapping`` (each entry's slot, plus the shard's offset),
``_mch_counts`` (LFU, distance-LFU), ``_mch_last_access_iter`` (LRU, distance-LFU),
``_current_iter_tensor`` (the calls so far) and ``_output_segments_tensor`` (the shard bounds),
all int64. Its window (the ids since the last eviction) is not saved: a TorchRec module loaded
from a state dict starts a fresh window and counts its next eviction from the loaded call, and
so does the state :func:`from_torchrec` builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxembed.collisions import _ids
from jaxembed.collisions._ids import EMPTY, RawIds
from jaxembed.collisions._remap import _PIN, _SATURATED, CollisionState, ManagedCollision

_INT64_MAX = np.iinfo(np.int64).max


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _no_ttl(mc: ManagedCollision) -> None:
    if mc.ttl is not None:
        raise ValueError(
            f"mc has ttl={mc.ttl}: TorchRec's managed collisions have no time to live, so its "
            "state dict cannot hold this policy"
        )


def to_torchrec(
    mc: ManagedCollision, state: CollisionState, *, offset: int = 0
) -> dict[str, np.ndarray]:
    """The state as TorchRec's ``MCHManagedCollisionModule`` state dict (int64 NumPy arrays).

    Args:
      mc: the policy the state was built with.
      state: a concrete :class:`CollisionState`.
      offset: the module's ``output_global_offset`` (a row-wise shard's first row).

    Returns:
      ``{name: array}`` under TorchRec's buffer names; load it with
      ``module.load_state_dict({k: torch.from_numpy(v) ...})`` into a module of the same
      ``zch_size``, policy and offset.

    Raises:
      ValueError: the id ``2**63 - 1`` is held: TorchRec reads it as its empty marker; or
        ``mc`` has a ``ttl`` (TorchRec has none).

    Example:
      >>> from jaxembed.collisions import ManagedCollision, raw_ids, to_torchrec
      >>> mc = ManagedCollision("lfu", 1)
      >>> state = mc.remap(mc.init(3, 2), raw_ids([8, 8])).state
      >>> sd = to_torchrec(mc, state)
      >>> sd["_mch_sorted_raw_ids"]
      array([                  8, 9223372036854775807, 9223372036854775807])
      >>> sd["_mch_remapped_ids_mapping"], sd["_mch_counts"][:2]
      (array([1, 0, 2]), array([2, 0]))
    """
    mc.check_state(state)
    _no_ttl(mc)
    ids = _ids.to_int64(RawIds(state.hi, state.lo))
    if (ids == _INT64_MAX).any():
        raise ValueError(
            "state holds the id 2**63 - 1, which TorchRec's state dict reads as an empty entry"
        )
    num_slots = state.num_slots
    out = {
        "_output_segments_tensor": np.concatenate(
            [np.array([offset, offset + num_slots]), np.full(1023, -1)]
        ).astype(np.int64),
        "_current_iter_tensor": np.array([int(state.step)], np.int64),
        "_mch_sorted_raw_ids": np.where(ids < 0, _INT64_MAX, ids).astype(np.int64),
        "_mch_remapped_ids_mapping": np.asarray(state.slot).astype(np.int64) + offset,
    }
    if state.counts is not None:
        counts = np.asarray(state.counts).astype(np.int64)
        out["_mch_counts"] = np.where(counts == _PIN, _INT64_MAX, counts)
    if state.last is not None:
        out["_mch_last_access_iter"] = np.asarray(state.last).astype(np.int64)
    return out


def from_torchrec(
    mc: ManagedCollision,
    state_dict: Mapping[str, Any],
    *,
    ids_per_call: int,
    prefix: str = "",
) -> CollisionState:
    """A :class:`CollisionState` from TorchRec's ``MCHManagedCollisionModule`` state dict.

    Args:
      mc: the policy, TorchRec's (``LFU_EvictionPolicy`` -> ``"lfu"``, ...) with its interval.
      state_dict: the module's ``state_dict()`` (torch tensors or arrays), or a bigger one
        holding it under ``prefix`` (for example
        ``"_managed_collision_collection._managed_collision_modules.t1."``).
      ids_per_call: the window's ids a call (see :meth:`ManagedCollision.init`).
      prefix: the module's keys' prefix.

    Returns:
      The state, with an empty window and its next eviction ``eviction_interval`` calls after
      the saved call, as TorchRec resumes.

    Raises:
      KeyError: a buffer the policy needs is missing.
      ValueError: the buffers disagree in size, a count or call number exceeds int32, the
        ids are not sorted, or the mapping is not a permutation of the shard's rows.

    Example:
      >>> from jaxembed.collisions import (ManagedCollision, from_torchrec, held_ids, raw_ids,
      ...                                  to_torchrec)
      >>> mc = ManagedCollision("lru", 2)
      >>> state = mc.init(4, 2)
      >>> for call in ([5, 6], [6, 7]):
      ...     state = mc.remap(state, raw_ids(call)).state
      >>> back = from_torchrec(mc, to_torchrec(mc, state), ids_per_call=2)
      >>> held_ids(back)
      (array([5, 6, 7]), array([2, 0, 1], dtype=int32))
    """

    _no_ttl(mc)

    def get(name: str) -> np.ndarray:
        key = prefix + name
        if key not in state_dict:
            raise KeyError(f"state_dict has no {key!r} (keys: {sorted(state_dict)[:8]}...)")
        return _numpy(state_dict[key]).astype(np.int64).reshape(-1)

    ids = get("_mch_sorted_raw_ids")
    num_slots = ids.shape[0]
    segments = get("_output_segments_tensor")
    offset = int(segments[0])
    mapping = get("_mch_remapped_ids_mapping") - offset
    if mapping.shape != ids.shape or sorted(mapping.tolist()) != list(range(num_slots)):
        raise ValueError(
            "state_dict's _mch_remapped_ids_mapping is not a permutation of the rows "
            f"[{offset}, {offset + num_slots})"
        )
    step = int(get("_current_iter_tensor")[0])
    state = mc.init(num_slots, ids_per_call)
    held = ids != _INT64_MAX
    if (np.diff(ids[held]) <= 0).any() or held[-1] or (held[1:] & ~held[:-1]).any():
        raise ValueError(
            "state_dict's _mch_sorted_raw_ids must hold distinct ids, ascending, before the "
            "empty entries (2**63 - 1), with the last entry empty"
        )
    pairs = _ids.raw_ids(np.where(held, ids, 0), name="_mch_sorted_raw_ids")
    hi = np.where(held, np.asarray(pairs.hi), EMPTY).astype(np.uint32)
    lo = np.where(held, np.asarray(pairs.lo), EMPTY).astype(np.uint32)
    counts = last = None
    if mc.uses_counts:
        raw = get("_mch_counts")
        counts = np.where(raw == _INT64_MAX, _PIN, np.minimum(raw, _SATURATED))
    if mc.uses_last:
        last = get("_mch_last_access_iter")
        if last.max(initial=0) >= 2**31 or step >= 2**31:
            raise ValueError("state_dict's call numbers exceed int32")
    as_i32 = lambda a: None if a is None else jnp.asarray(a.astype(np.int32))  # noqa: E731
    return state._replace(
        hi=jnp.asarray(hi),
        lo=jnp.asarray(lo),
        slot=jnp.asarray(mapping.astype(np.int32)),
        counts=as_i32(counts),
        last=as_i32(last),
        step=jnp.asarray(step, jnp.int32),
        last_eviction=jnp.asarray(step, jnp.int32),
    )
