"""The managed-collision remapper: raw ids in, table rows out, its state an explicit update.

TorchRec's ``MCHManagedCollisionModule`` (zero-collision hashing) as a pure function over a
static number of slots, so it runs inside ``jit``. One call (:meth:`ManagedCollision.remap`):

1. **Profile** (training only): the call counter ``step`` goes up by one and the call's ids are
   written into the window, a static buffer of ``eviction_interval * ids_per_call`` ids.
2. **Evict** (every ``eviction_interval`` calls, counted from the last eviction, in a
   ``lax.cond``): the window's distinct ids are counted and ordered by count (descending; equal
   counts: smaller id first). Held ids add their window count (LFU, distance-LFU) and take
   their last call (LRU, distance-LFU). Held ids and new ids are then ranked by the policy's
   score, one stable sort with held ids first, and the top ``num_slots`` stay or enter; the
   k-th entering id takes the k-th evicted id's slot. The held table is re-sorted by id.
3. **Remap**: a binary search of the held ids. A held id gets its slot; any other id gets the
   miss slot, ``num_slots - 1``, which is never evicted (so at most ``num_slots - 1`` ids are
   held).

This is TorchRec 1.8's order of operations, decision for decision (tested against it call by
call). Where jaxembed differs, by design:

* the empty marker is not a valid id, so ``2**63 - 1`` can be held;
* the window is static and never truncates; a call with more ids than ``ids_per_call`` is a
  shape error at trace time (TorchRec silently drops ids past a buffer sized from its first
  call);
* counts and call numbers are int32 (TorchRec: int64): a count saturates at ``2**31 - 2``;
* bad ids raise where they are concrete (negative, ``>= 2**63``, floats).

Scores (lower is evicted first), at call ``it``, ``d = decay_exponent``:

* ``"lfu"``: ``count``, the hits since admission;
* ``"lru"``: ``-(it - last + 1) ** d`` in float32;
* ``"distance_lfu"``: ``count / (it - last + 1) ** d`` in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.collisions import _ids
from jaxembed.collisions._ids import EMPTY, RawIds
from jaxembed.core import _serialization, _validation
from jaxembed.kernels import _ffi as _kernels
from jaxembed.sparse._update import _mix

POLICIES = ("lfu", "lru", "distance_lfu")
#: admission filters, applied to the window's distinct ids at each eviction
ADMISSIONS = ("average", "dynamic", "count", "probabilistic")
_ADMISSION_DEFAULTS = {"average": None, "dynamic": 10.0, "count": None, "probabilistic": 0.01}
_SATURATED = 2**31 - 2  # a held id's count stops here; the miss slot's pin is above it
_PIN = 2**31 - 1


class CollisionState(NamedTuple):
    """The remapper's state: the held ids, sorted, with their slots and the policy's metadata.

    Every array but the window has one entry per slot; sorted position ``i`` holds id
    ``(hi[i], lo[i])`` in slot ``slot[i]``. Empty entries (``hi == lo == 0xFFFFFFFF``) sort last;
    the last position is the miss slot's, always empty.

    Attributes:
      hi: ``(num_slots,)`` uint32, the held ids' high halves, ascending with ``lo``.
      lo: ``(num_slots,)`` uint32, the low halves.
      slot: ``(num_slots,)`` int32, each held id's row of the table, a permutation of
        ``0..num_slots-1``.
      counts: ``(num_slots,)`` int32, hits since admission (LFU, distance-LFU; updated at each
        eviction, as TorchRec does); None for LRU.
      last: ``(num_slots,)`` int32, the last call that saw the id (LRU, distance-LFU); None for
        LFU.
      step: ``()`` int32, the calls profiled so far (TorchRec's ``_current_iter_tensor``).
      last_eviction: ``()`` int32, the call of the last eviction (or of the state's creation).
      window_hi: ``(eviction_interval * ids_per_call,)`` uint32, the ids seen since the last
        eviction, call by call (``ids_per_call`` entries a call, empty where unused). Each call
        of an interval writes its part before the eviction that ends the interval reads them.
      window_lo: the window's low halves.
    """

    hi: jax.Array
    lo: jax.Array
    slot: jax.Array
    counts: jax.Array | None
    last: jax.Array | None
    step: jax.Array
    last_eviction: jax.Array
    window_hi: jax.Array
    window_lo: jax.Array

    @property
    def num_slots(self) -> int:
        return int(self.hi.shape[0])


class Remapped(NamedTuple):
    """What :meth:`ManagedCollision.remap` returns.

    Attributes:
      slots: int32 in the ids' shape: each id's row, in ``[0, num_slots)``; ``num_slots`` (out of
        range: a lookup reads a NaN row and drops the gradient) for an id that is invalid or
        masked out by ``valid``.
      state: the new :class:`CollisionState`.
      evicted: ``(min(num_slots, window),)`` int32: the slots whose id changed in this call's
        eviction (first fills included, as TorchRec's ``evict()`` reports them), in the policy's
        rank order, then ``num_slots`` as padding. All padding when no eviction ran. Reset these
        rows with :func:`jaxembed.collisions.reset_rows`.
      num_evicted: ``()`` int32, how many entries of ``evicted`` are slots.

    Example:
      >>> import jaxembed
      >>> from jaxembed.collisions import ManagedCollision, raw_ids
      >>> mc = ManagedCollision("lru", eviction_interval=1)
      >>> slots, state, evicted, num_evicted = mc.remap(mc.init(4, 2), raw_ids([7, 9]))
      >>> slots, evicted[:num_evicted]
      (Array([1, 2], dtype=int32), Array([1, 2], dtype=int32))
    """

    slots: jax.Array
    state: CollisionState
    evicted: jax.Array
    num_evicted: jax.Array


_serialization.register_namedtuple(CollisionState, "collisions.CollisionState")
_serialization.register_namedtuple(Remapped, "collisions.Remapped")


def _positive_int(name: str, value: Any) -> int:
    value = _validation.check_size(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class ManagedCollision:
    """Managed collisions for one table: which raw ids hold a row, and when they are evicted.

    A frozen, hashable config (close over it in ``jit``). :meth:`init` builds the state for a
    table of ``num_slots`` rows; :meth:`remap` maps a call's raw ids to rows and returns the new
    state.

    Args:
      eviction: ``"lfu"`` (least frequently used since admission), ``"lru"`` (least recently
        used) or ``"distance_lfu"`` (count over distance to the last use), TorchRec's
        ``LFU_EvictionPolicy``, ``LRU_EvictionPolicy`` and ``DistanceLFU_EvictionPolicy``.
      eviction_interval: evict every this many training calls (>= 1).
      decay_exponent: ``d`` in the LRU and distance-LFU scores (> 0; TorchRec's default 1.0).
        Ignored by LFU.
      admission: which of the window's distinct ids take part in an eviction; the others are
        dropped from it (a new id is not admitted, a held one's count and last use are not
        updated), as TorchRec's ``threshold_filtering_func``. With ``c`` an id's count in the
        window, ``n`` the window's distinct ids and ``C`` their total count:

        * None: every id (TorchRec's default);
        * ``"average"``: ``c > C / n`` (TorchRec's ``average_threshold_filter``);
        * ``"dynamic"``: ``c > admission_value * C / n`` (``dynamic_threshold_filter``, its
          ``threshold_skew_multiplier``, default 10);
        * ``"count"``: ``c >= admission_value`` (an int >= 1);
        * ``"probabilistic"``: with ``p = admission_value`` (default 0.01), an id seen ``c``
          times takes part with probability ``1 - (1 - p) ** c``
          (``probabilistic_threshold_filter``), so a new id is admitted after about ``1 / p``
          sightings, with no counter kept between windows. The draw is a hash of the id and the
          call, not a PRNG stream: the same stream gives the same decisions.
      admission_value: the admission's parameter (see above); None takes its default.
      ttl: None, or a time to live in training calls (>= 1): at each eviction, every held id
        whose last use is more than ``ttl`` calls ago leaves, whether or not a new id takes its
        slot (its row is reported evicted and reset; new ids fill such free slots first). With
        any policy; it keeps each id's last use (LFU then costs 20 bytes a slot, as
        distance-LFU). TorchRec has no TTL (HierarchicalKV's and TFRA's dynamic tables have
        one), so a state with a ``ttl`` does not go to TorchRec's state dict.

    Raises:
      ValueError, TypeError: a bad argument, named.

    Example:
      >>> import numpy as np, jaxembed
      >>> mc = jaxembed.collisions.ManagedCollision(eviction="lfu", eviction_interval=2)
      >>> state = mc.init(num_slots=5, ids_per_call=4)
      >>> ids = jaxembed.collisions.raw_ids
      >>> out = mc.remap(state, ids(np.array([10, 20, 10, 30])))
      >>> out.slots  # nothing held yet: the miss slot
      Array([4, 4, 4, 4], dtype=int32)
      >>> out = mc.remap(out.state, ids(np.array([40, 10, 50, 60])))  # call 2 evicts
      >>> out.slots, out.evicted[: out.num_evicted]
      (Array([3, 0, 4, 4], dtype=int32), Array([0, 1, 2, 3], dtype=int32))
    """

    eviction: str = "lfu"
    eviction_interval: int = 1
    decay_exponent: float = 1.0
    admission: str | None = None
    admission_value: float | None = None
    ttl: int | None = None

    def __post_init__(self):
        if self.eviction not in POLICIES:
            raise ValueError(f"eviction must be one of {POLICIES}, got {self.eviction!r}")
        object.__setattr__(
            self, "eviction_interval", _positive_int("eviction_interval", self.eviction_interval)
        )
        d = self.decay_exponent
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"decay_exponent must be a finite number > 0, got {d!r}")
        object.__setattr__(self, "decay_exponent", float(d))
        self._check_admission()
        if self.ttl is not None:
            object.__setattr__(self, "ttl", _positive_int("ttl", self.ttl))

    def _check_admission(self) -> None:
        kind, value = self.admission, self.admission_value
        if kind is None:
            if value is not None:
                raise ValueError("admission_value is set, but admission is None")
            return
        if kind not in ADMISSIONS:
            raise ValueError(f"admission must be None or one of {ADMISSIONS}, got {kind!r}")
        if value is None:
            value = _ADMISSION_DEFAULTS[kind]
            if kind == "count":
                raise ValueError("admission='count' needs admission_value, the least count (>= 1)")
        if kind == "average":
            if value is not None:
                raise ValueError("admission='average' takes no admission_value")
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"admission_value must be a number, got {type(value).__name__}")
        if kind == "count" and (value != int(value) or value < 1):
            raise ValueError(f"admission_value for 'count' must be an int >= 1, got {value!r}")
        if kind == "dynamic" and not (math.isfinite(value) and value > 0):
            raise ValueError(f"admission_value for 'dynamic' must be > 0, got {value!r}")
        if kind == "probabilistic" and not 0 < value <= 1:
            raise ValueError(
                f"admission_value for 'probabilistic' must be in (0, 1], got {value!r}"
            )
        object.__setattr__(self, "admission_value", float(value))

    def _admits(self, u_hi, u_lo, u_count, u_ok, it) -> jax.Array:
        """Which of the window's distinct ids take part in this eviction (see ``admission``)."""
        if self.admission is None:
            return u_ok
        c = u_count.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(u_ok.astype(jnp.int32)), 1).astype(jnp.float32)
        total = jnp.sum(jnp.where(u_ok, u_count, 0)).astype(jnp.float32)
        if self.admission == "average":
            keep = c > total / n
        elif self.admission == "dynamic":
            keep = c > jnp.float32(self.admission_value) * total / n
        elif self.admission == "count":
            keep = u_count >= int(self.admission_value)
        else:  # probabilistic: a uniform draw from a hash of the id and the call
            h = _mix(_mix(u_hi ^ _mix(u_lo + jnp.uint32(0x9E3779B9))) ^ it.astype(jnp.uint32))
            draw = (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
            score = 1 - jnp.power(jnp.float32(1 - self.admission_value), c)
            keep = score > draw
        return u_ok & keep

    @property
    def uses_counts(self) -> bool:
        return self.eviction in ("lfu", "distance_lfu")

    @property
    def uses_last(self) -> bool:
        return self.eviction in ("lru", "distance_lfu") or self.ttl is not None

    def evicted_size(self, state: CollisionState) -> int:
        """The length of a call's ``evicted`` rows (padded): at most the window's ids enter,
        and with a ``ttl`` every held id may expire."""
        if self.ttl is not None:
            return state.num_slots
        return min(state.num_slots, state.window_hi.shape[0])

    def init(self, num_slots: int, ids_per_call: int) -> CollisionState:
        """An empty state for a table of ``num_slots`` rows.

        Args:
          num_slots: the table's ``num_embeddings`` (>= 2): ``num_slots - 1`` ids can be held,
            and the last row is the miss row.
          ids_per_call: the most ids one call profiles (the window holds ``eviction_interval``
            calls of this many).

        Returns:
          A :class:`CollisionState` with no id held, at step 0.
        """
        num_slots = _positive_int("num_slots", num_slots)
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (one row is the miss row), got {num_slots}")
        if num_slots >= 2**31 - 1:
            raise ValueError(f"num_slots must be < 2**31 - 1, got {num_slots}")
        ids_per_call = _positive_int("ids_per_call", ids_per_call)
        window = self.eviction_interval * ids_per_call
        if window >= 2**31 - num_slots:
            raise ValueError(
                f"eviction_interval * ids_per_call = {window} is too large a window "
                f"(with num_slots it must stay below 2**31)"
            )
        zeros = jnp.zeros((num_slots,), jnp.int32)
        return CollisionState(
            hi=jnp.full((num_slots,), EMPTY, jnp.uint32),
            lo=jnp.full((num_slots,), EMPTY, jnp.uint32),
            slot=jnp.arange(num_slots, dtype=jnp.int32),
            counts=zeros if self.uses_counts else None,
            last=zeros if self.uses_last else None,
            step=jnp.zeros((), jnp.int32),
            last_eviction=jnp.zeros((), jnp.int32),
            window_hi=jnp.full((window,), EMPTY, jnp.uint32),
            window_lo=jnp.full((window,), EMPTY, jnp.uint32),
        )

    def check_state(self, state: CollisionState) -> int:
        """Checks ``state`` fits this policy; returns ``ids_per_call``."""
        if not isinstance(state, CollisionState):
            raise TypeError(f"state must be a CollisionState, got {type(state).__name__}")
        for name, needed in (("counts", self.uses_counts), ("last", self.uses_last)):
            if (getattr(state, name) is None) == needed:
                raise ValueError(
                    f"state.{name} is {'missing' if needed else 'present'}: the state was not "
                    f"built for eviction={self.eviction!r}"
                )
        window = int(state.window_hi.shape[0])
        if window % self.eviction_interval:
            raise ValueError(
                f"state's window of {window} ids is not a multiple of eviction_interval "
                f"{self.eviction_interval}: it was built for another interval"
            )
        return window // self.eviction_interval

    def remap(
        self, state: CollisionState, ids: Any, *, valid: Any = None, train: bool = True
    ) -> Remapped:
        """Maps raw ids to rows; in training, profiles them first and evicts on schedule.

        Args:
          state: the :class:`CollisionState`.
          ids: the call's raw ids, any shape with at most ``ids_per_call`` entries: a
            :class:`RawIds`, or anything :func:`raw_ids` takes.
          valid: optional bool mask in the ids' shape; entries where it is False (padding) are
            neither profiled nor remapped (their slot reads ``num_slots``).
          train: profile and evict (TorchRec's training mode); False only remaps, and the state
            comes back unchanged.

        Returns:
          :class:`Remapped`: ``(slots, state, evicted, num_evicted)``.

        Raises:
          ValueError: more ids than ``ids_per_call``, a mask of another shape, or a concrete
            bad id (named).
        """
        ids_per_call = self.check_state(state)
        ids = _ids.raw_ids(ids)
        shape = ids.shape
        q_hi, q_lo = ids.hi.reshape(-1), ids.lo.reshape(-1)
        n = q_hi.shape[0]
        if n > ids_per_call:
            raise ValueError(
                f"ids holds {n} ids, more than the state's ids_per_call {ids_per_call}"
            )
        ok = _ids.valid(RawIds(q_hi, q_lo))
        if valid is not None:
            mask = jnp.asarray(valid)
            if mask.shape != shape:
                raise ValueError(f"valid has shape {mask.shape}, the ids {shape}")
            if mask.dtype != jnp.bool_:
                raise TypeError(f"valid must be a bool mask, got {mask.dtype}")
            ok = ok & mask.reshape(-1)
        evicted, num_evicted = _no_eviction(state, self.evicted_size(state))
        if train:
            state, evicted, num_evicted = self._profile(state, q_hi, q_lo, ok, ids_per_call)
        slots = search(state, q_hi, q_lo, ok)
        return Remapped(slots.reshape(shape), state, evicted, num_evicted)

    def _profile(self, state, q_hi, q_lo, ok, ids_per_call):
        step = state.step + 1
        pad = ids_per_call - q_hi.shape[0]
        w_hi = jnp.pad(jnp.where(ok, q_hi, EMPTY), (0, pad), constant_values=EMPTY)
        w_lo = jnp.pad(jnp.where(ok, q_lo, EMPTY), (0, pad), constant_values=EMPTY)
        at = (step - state.last_eviction - 1) * ids_per_call
        state = state._replace(
            step=step,
            window_hi=jax.lax.dynamic_update_slice(state.window_hi, w_hi, (at,)),
            window_lo=jax.lax.dynamic_update_slice(state.window_lo, w_lo, (at,)),
        )
        evicting = step - state.last_eviction == self.eviction_interval
        held = (state.hi, state.lo, state.slot, state.counts, state.last)

        def idle(held, window_hi, window_lo):
            return held, *_no_eviction(state, self.evicted_size(state))

        def evict(held, window_hi, window_lo):
            return self._evict(
                state._replace(hi=held[0], lo=held[1], slot=held[2], counts=held[3],
                               last=held[4], window_hi=window_hi, window_lo=window_lo),
                ids_per_call,
            )  # fmt: skip

        # only the held entries pass through the cond: the window is read, never rewritten
        # (every call of the next interval writes its part before the next eviction reads it)
        held, evicted, count = jax.lax.cond(
            evicting, evict, idle, held, state.window_hi, state.window_lo
        )
        hi, lo, slot, counts, last = held
        state = state._replace(
            hi=hi, lo=lo, slot=slot, counts=counts, last=last,
            last_eviction=jnp.where(evicting, step, state.last_eviction),
        )  # fmt: skip
        return state, evicted, count

    def _keys(self, counts, last, it):
        """The policy's scores as uint32 keys, ascending from the best (kept first)."""
        if self.eviction == "lfu":
            return _ids.ordered_key(-counts)
        distance = (it - last + 1).astype(jnp.float32)
        weight = jnp.power(distance, jnp.float32(self.decay_exponent))
        if self.eviction == "lru":
            return _ids.ordered_key(weight)  # the score is -weight
        return _ids.ordered_key(-(counts.astype(jnp.float32) / weight))

    def _evict(self, state: CollisionState, ids_per_call: int):
        num_slots = state.num_slots
        window = state.window_hi.shape[0]
        it = state.step

        # 1. the window's distinct ids, their counts and last calls (ascending ids)
        u_hi, u_lo, u_count, u_last = _kernels.on_cpu(
            functools.partial(_kernels.window, ids_per_call=ids_per_call),
            functools.partial(_distinct, ids_per_call=ids_per_call),
            state.window_hi, state.window_lo, state.last_eviction + 1,
        )  # fmt: skip
        u_ok = self._admits(u_hi, u_lo, u_count, u_count > 0, it)

        # 2. by count, descending; equal counts keep the smaller id first (TorchRec's order F)
        order = jnp.arange(window, dtype=jnp.int32)
        none = jnp.zeros((window,), jnp.uint32)
        by_count = _ids.argsort(_ids.ordered_key(jnp.where(u_ok, -u_count, 1)), none)
        f_hi, f_lo, f_count, f_last, f_ok = (
            a[by_count] for a in (u_hi, u_lo, u_count, u_last, u_ok)
        )

        # 3. the window's held ids update their metadata (searched in id order, which the
        # kernel's search takes as it comes)
        at = _positions(state.hi, state.lo, u_hi, u_lo, u_ok)[by_count]
        held = f_ok & (state.hi[at] == f_hi) & (state.lo[at] == f_lo)
        target = jnp.where(held, at, num_slots)
        counts, last = state.counts, state.last
        if counts is not None:
            added = jnp.minimum(counts[at] + f_count, _SATURATED)
            counts = counts.at[target].set(added, mode="drop").at[num_slots - 1].set(_PIN)
        if last is not None:
            last = last.at[target].set(f_last, mode="drop").at[num_slots - 1].set(it)

        # 4. the new ids, in order F
        new = f_ok & ~held
        put = jnp.where(new, jnp.cumsum(new.astype(jnp.int32)) - 1, window)
        n_hi, n_lo = (
            jnp.full((window,), EMPTY, jnp.uint32).at[put].set(a, mode="drop") for a in (f_hi, f_lo)
        )
        n_count = jnp.zeros((window,), jnp.int32).at[put].set(f_count, mode="drop")
        n_last = jnp.zeros((window,), jnp.int32).at[put].set(f_last, mode="drop")
        num_new = jnp.sum(new.astype(jnp.int32))

        # (ttl) the held ids unused for more than ttl calls leave first: their slots free
        entries = (state.hi, state.lo, state.slot, counts, last)
        expired = None
        if self.ttl is not None:
            entries, expired = _expire(entries, it - self.ttl)
        counts, last = entries[3], entries[4]

        # 5.-7. the ranking and the replacement: the CPU kernel where it runs
        held_key = self._keys(counts, last, it)
        new_key = jnp.where(order < num_new, self._keys(n_count, n_last, it), _ids.WORST)
        new = (n_hi, n_lo, n_count, n_last)
        held, evicted, count = _kernels.on_cpu(
            _kernels.evict, _replace, entries, held_key, new, new_key, num_new
        )
        if expired is None:
            return held, evicted, count
        # every row whose id changed: the expired ones (refilled or not) and those replaced
        changed = jnp.zeros((num_slots + 1,), bool).at[expired].set(True).at[evicted].set(True)
        changed = changed[:num_slots]
        rows = jnp.nonzero(changed, size=num_slots, fill_value=num_slots)[0].astype(jnp.int32)
        return held, rows, jnp.sum(changed, dtype=jnp.int32)


def _expire(entries, oldest):
    """The held entries (sorted by id, empties last, the miss entry at the end) with those last
    used before call ``oldest`` emptied (their rows kept: free slots), still sorted: the
    entries kept in their order, then the emptied ones, then the empties (the miss entry last).
    Returns ``(entries, expired)``: ``expired`` ``(num_slots,)`` their rows, padded with
    ``num_slots``."""
    hi, lo, slot, counts, last = entries
    num_slots = hi.shape[0]
    held = _ids.valid(RawIds(hi, lo))
    expired = held & (last < oldest) & (jnp.arange(num_slots) < num_slots - 1)
    kept = held & ~expired
    n_kept, n_expired = jnp.sum(kept, dtype=jnp.int32), jnp.sum(expired, dtype=jnp.int32)
    rank = lambda m: jnp.cumsum(m.astype(jnp.int32)) - 1  # noqa: E731
    dest = jnp.where(kept, rank(kept), jnp.where(
        expired, n_kept + rank(expired), n_kept + n_expired + rank(~held)))  # fmt: skip

    def moved(values, emptied):
        return jnp.zeros_like(values).at[dest].set(jnp.where(expired, emptied, values))

    out = (moved(hi, EMPTY), moved(lo, EMPTY), moved(slot, slot), None if counts is None
           else moved(counts, 0), moved(last, 0))  # fmt: skip
    at = jnp.where(expired, rank(expired), num_slots)
    rows = jnp.full((num_slots,), num_slots, jnp.int32).at[at].set(slot, mode="drop")
    return out, rows


def _replace(held, held_key, new, new_key, num_new):
    """An eviction's steps 5 to 7 (see :meth:`ManagedCollision._evict`), on XLA's own ops: which
    new ids enter, which held entries leave, and the held table re-sorted by id. Returns
    ``((hi, lo, slot, counts, last), evicted, entering)``."""
    hi, lo, slot, counts, last = held
    n_hi, n_lo, n_count, n_last = new
    num_slots, window = hi.shape[0], n_hi.shape[0]
    size = min(num_slots, window)
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    none = jnp.zeros((window,), jnp.uint32)

    # 5. TorchRec ranks held entries, then new ids, by one stable sort of the scores, and
    # keeps the top num_slots. The same decisions without sorting the held entries: the
    # admitted new ids are a prefix of the new ids by (key, order F), and as many held
    # entries leave, the last by (key, position).
    by_key = _ids.argsort(new_key, none)
    new_key = new_key[by_key]

    def admitted(e):  # new id e (by key) ranks below num_slots
        return jnp.sum(held_key <= new_key[jnp.minimum(e, window - 1)]) + e < num_slots

    entering = _first_false(admitted, num_new, window)
    kept = num_slots - entering
    leaves = _last_ranked(held_key, kept)
    gone = jnp.cumsum(leaves.astype(jnp.int32))  # leaving entries up to each position
    k_out = jnp.where(leaves, gone - 1, size)
    leaving = jnp.full((size,), num_slots, jnp.int32).at[k_out].set(slots, mode="drop")
    leaving_key = jnp.where(
        leaving < num_slots, held_key[jnp.minimum(leaving, num_slots - 1)], _ids.WORST
    )
    leaving = leaving[_ids.argsort(leaving_key, none[:size])]  # rank order

    # 6. the k-th entering id takes the k-th leaving entry's slot
    k = jnp.arange(size)
    live = k < entering
    src = jnp.where(live, by_key[:size], 0)
    out_at = jnp.minimum(leaving, num_slots - 1)
    e_slot = jnp.where(live, slot[out_at], num_slots)
    e_hi = jnp.where(live, n_hi[src], EMPTY)
    e_lo = jnp.where(live, n_lo[src], EMPTY)
    evicted = e_slot

    # 7. the held entries stay sorted by id: the kept ones in their order, the entering ones
    # (sorted by id) merged in
    by_id = _ids.argsort(e_hi, e_lo)
    e_hi, e_lo, e_slot, e_src = (a[by_id] for a in (e_hi, e_lo, e_slot, src))
    # (the entering ids' valid ids sort before the padding: `live` still marks them)
    stays = ~leaves
    compact = slots - gone  # a kept entry's position among the kept
    e_at = _positions(hi, lo, e_hi, e_lo, live)  # among all held
    e_ins = e_at - jnp.where(e_at > 0, gone[jnp.maximum(e_at - 1, 0)], 0)
    inserted = jnp.zeros((num_slots + 1,), jnp.int32).at[jnp.where(live, e_ins, num_slots)].add(1)
    before = jnp.cumsum(inserted)  # entering ids placed at or before each kept position
    dest_kept = jnp.where(stays, compact + before[compact], num_slots)
    dest_new = jnp.where(live, e_ins + k, num_slots)

    def merged(values, incoming):
        out = jnp.zeros_like(values).at[dest_kept].set(values, mode="drop")
        return out.at[dest_new].set(incoming, mode="drop")

    hi, lo, slot = merged(hi, e_hi), merged(lo, e_lo), merged(slot, e_slot)
    if counts is not None:
        counts = merged(counts, n_count[e_src])
    if last is not None:
        last = merged(last, n_last[e_src])
    return (hi, lo, slot, counts, last), evicted, entering


def _distinct(window_hi, window_lo, first_call, *, ids_per_call: int):
    """An eviction's step 1, on XLA's own ops: the window's distinct valid ids, ascending, with
    their counts and last calls, ``(u_hi, u_lo, u_count, u_last)``; past them, empties with
    count 0 (their last calls are not read)."""
    window = window_hi.shape[0]
    call = first_call + jnp.arange(window, dtype=jnp.int32) // ids_per_call
    by_id = _ids.argsort(window_hi, window_lo)
    s_hi, s_lo, s_call = window_hi[by_id], window_lo[by_id], call[by_id]
    first = jnp.concatenate(
        [jnp.ones((1,), bool), (s_hi[1:] != s_hi[:-1]) | (s_lo[1:] != s_lo[:-1])]
    )
    seg = jnp.cumsum(first.astype(jnp.int32)) - 1
    seen = _ids.valid(RawIds(s_hi, s_lo))
    u_count = jax.ops.segment_sum(seen.astype(jnp.int32), seg, num_segments=window)
    u_last = jax.ops.segment_max(s_call, seg, num_segments=window)
    head = jnp.where(first, seg, window)
    u_hi = jnp.full((window,), EMPTY, jnp.uint32).at[head].set(s_hi, mode="drop")
    u_lo = jnp.full((window,), EMPTY, jnp.uint32).at[head].set(s_lo, mode="drop")
    return u_hi, u_lo, u_count, u_last


def _no_eviction(state: CollisionState, size: int) -> tuple[jax.Array, jax.Array]:
    """A call's ``(evicted, num_evicted)`` when it evicts nothing: ``size`` padding, and 0."""
    return jnp.full((size,), state.num_slots, jnp.int32), jnp.zeros((), jnp.int32)


def _first_false(predicate, count, window: int) -> jax.Array:
    """The first ``e`` in ``[0, count)`` where the monotone ``predicate`` (True, then False) is
    False, or ``count``: a bisection."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        go_up = (lo < hi) & predicate(mid)
        return jnp.where(go_up, mid + 1, lo), jnp.where((lo < hi) & ~go_up, mid, hi)

    steps = max(1, int(window).bit_length())
    lo, _ = jax.lax.fori_loop(0, steps, halve, (jnp.zeros((), jnp.int32), count))
    return lo


def _last_ranked(key: jax.Array, kept: jax.Array) -> jax.Array:
    """Which entries rank past the first ``kept`` by ``(key, position)``: a bisection of the
    key's value, then ties broken by position."""

    def halve(_, bounds):  # the smallest t with at least kept + 1 keys <= t
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= mid) >= kept + 1
        active = lo < hi
        return jnp.where(active & ~enough, mid + 1, lo), jnp.where(active & enough, mid, hi)

    t, _ = jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), _ids.WORST))
    below = jnp.sum(key < t)
    tie = key == t
    tie_rank = jnp.cumsum(tie.astype(jnp.int32)) - 1
    leaves = (key > t) | (tie & (tie_rank >= kept - below))
    return leaves & (kept < key.shape[0])  # all kept: none leaves


def _positions(hi, lo, q_hi, q_lo, ok) -> jax.Array:
    """Each query's lower bound among the first ``S - 1`` held ids (``S - 1`` where not ok), by
    the CPU kernel where it runs."""
    num_slots = hi.shape[0]

    def reference(hi, lo, q_hi, q_lo, ok):
        at = _ids.lower_bound(hi, lo, num_slots - 1, q_hi, q_lo)
        return jnp.where(ok, at, num_slots - 1)

    if q_hi.shape[0] == 0:
        return reference(hi, lo, q_hi, q_lo, ok)
    return _kernels.on_cpu(_kernels.search, reference, hi, lo, q_hi, q_lo, ok)


def search(state: CollisionState, q_hi, q_lo, ok) -> jax.Array:
    """Each query's slot: a held id's own, the miss slot for others, ``num_slots`` if not ok; by
    the CPU kernel where it runs."""
    num_slots = state.num_slots

    def reference(hi, lo, slot, q_hi, q_lo, ok):
        at = _positions(hi, lo, q_hi, q_lo, ok)
        hit = (hi[at] == q_hi) & (lo[at] == q_lo)
        slots = jnp.where(hit, slot[at], num_slots - 1)
        return jnp.where(ok, slots, num_slots).astype(jnp.int32)

    args = (state.hi, state.lo, state.slot, q_hi, q_lo, ok)
    if q_hi.shape[0] == 0:
        return reference(*args)
    return _kernels.on_cpu(_kernels.remap, reference, *args)


def held_ids(state: CollisionState) -> tuple[np.ndarray, np.ndarray]:
    """The held ids and their slots, from a concrete state, in id order.

    Args:
      state: a concrete :class:`CollisionState`.

    Returns:
      ``(ids, slots)``: int64 and int32 NumPy arrays, one entry per held id.

    Example:
      >>> from jaxembed.collisions import ManagedCollision, held_ids, raw_ids
      >>> mc = ManagedCollision("lfu", 1)
      >>> held_ids(mc.remap(mc.init(4, 3), raw_ids([2**40, 5, 5])).state)
      (array([            5, 1099511627776]), array([1, 2], dtype=int32))
    """
    ids = _ids.to_int64(RawIds(state.hi, state.lo))
    keep = ids >= 0
    return ids[keep], np.asarray(state.slot)[keep]
