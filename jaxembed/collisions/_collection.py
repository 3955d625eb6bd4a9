"""Managed collisions for a collection: raw keyed jagged ids in, each table's rows out.

TorchRec's ``ManagedCollisionCollection``: one :class:`ManagedCollision` per table, and one
remap call per table and step over the ids of every feature that the table serves, in the
order of the table's ``feature_names`` (as TorchRec concatenates them). The result is an
ordinary :class:`jaxembed.KeyedJagged` of rows, which any collection lookup or sparse
training step takes unchanged: stacked tables, quantized tables and sharded collections
included.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxembed.collections import EmbeddingConfig, KeyedJagged
from jaxembed.collections._config import Plan
from jaxembed.collisions import _ids
from jaxembed.collisions._ids import RawIds
from jaxembed.collisions._remap import CollisionState, ManagedCollision
from jaxembed.core import _serialization
from jaxembed.sharding import _collection as _mesh
from jaxembed.sharding._layout import place
from jaxembed.sharding._placement import ShardingPlan


@jax.tree_util.register_pytree_node_class
class RawKeyedJagged:
    """A :class:`jaxembed.KeyedJagged` whose ids are raw 64-bit ids (TorchRec's KJT of hashes).

    The layout is the KeyedJagged's: ``ids`` holds every feature's ids back to back,
    feature-major, and ``lengths[f * B + b]`` counts feature ``f``'s ids for sample ``b``. Its
    lengths and weights are checked as the KeyedJagged's are; concrete ids as
    :func:`jaxembed.collisions.raw_ids` checks them.

    Attributes:
      keys: the feature names (static).
      ids: :class:`RawIds` ``(capacity,)``; those past ``sum(lengths)`` are padding.
      lengths: ``(len(keys) * batch_size,)`` int32.
      weights: ``(capacity,)`` floating per-id weights, or None.

    Example:
      >>> from jaxembed.collisions import RawKeyedJagged
      >>> kj = RawKeyedJagged.from_lists({"user": [[2**40 + 1], [5, 6]]})
      >>> kj.keys, kj.batch_size, kj.capacity
      (('user',), 2, 16)
      >>> kj.lengths
      Array([1, 2], dtype=int32)
    """

    def __init__(
        self,
        keys: Sequence[str],
        ids: Any,
        lengths: ArrayLike,
        weights: ArrayLike | None = None,
    ):
        ids = _ids.raw_ids(ids, name="ids")
        if len(ids.shape) != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        # the layout's checks (keys, lengths against the capacity, weights) are KeyedJagged's
        layout = KeyedJagged(keys, jnp.zeros(ids.shape, jnp.int32), lengths, weights)
        self.keys, self.ids = layout.keys, ids
        self.lengths, self.weights = layout.lengths, layout.weights

    def tree_flatten(self):
        return (self.ids, self.lengths, self.weights), self.keys

    @classmethod
    def tree_unflatten(cls, keys, children):
        new = object.__new__(cls)
        new.keys = keys
        new.ids, new.lengths, new.weights = children
        return new

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0] // len(self.keys)

    @property
    def capacity(self) -> int:
        return int(self.ids.hi.shape[0])

    def with_ids(self, values: ArrayLike) -> KeyedJagged:
        """A :class:`jaxembed.KeyedJagged` of this layout (keys, lengths, weights) with
        ``values`` ``(capacity,)`` for ids."""
        return KeyedJagged(self.keys, values, self.lengths, self.weights)

    def __repr__(self) -> str:
        return (
            f"RawKeyedJagged(keys={self.keys}, batch_size={self.batch_size}, "
            f"capacity={self.capacity}, weighted={self.weights is not None})"
        )

    @classmethod
    def from_lists(
        cls,
        features: Mapping[str, Sequence[Sequence[int]]],
        weights: Mapping[str, Sequence[Sequence[float]]] | None = None,
        *,
        capacity: int | None = None,
        min_capacity: int = 16,
    ) -> RawKeyedJagged:
        """From per-feature host lists of raw ids, as :meth:`jaxembed.KeyedJagged.from_lists`
        (a power-of-two capacity of at least ``min_capacity``, or ``capacity``)."""
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of name to bags, got {type(features)}")
        bags = {k: [_bag(b) for b in v] for k, v in features.items()}
        flat = [b for v in bags.values() for b in v]
        values = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        layout = KeyedJagged.from_lists(
            {k: [np.zeros(b.size, np.int32) for b in v] for k, v in bags.items()},
            weights,
            capacity=capacity,
            min_capacity=min_capacity,
        )
        if values.dtype == np.uint64:
            padded = np.zeros(layout.capacity, np.uint64)
        else:
            padded = np.zeros(layout.capacity, np.int64)
        padded[: values.size] = values
        return cls(
            layout.keys, _ids.raw_ids(padded, name="features"), layout.lengths, layout.weights
        )


def _bag(ids: Any) -> np.ndarray:
    """One bag's raw ids as a 1-D integer array (an empty bag is int64)."""
    bag = np.asarray(ids).reshape(-1)
    if bag.size == 0:
        return bag.astype(np.int64)
    if not np.issubdtype(bag.dtype, np.integer):
        raise TypeError(f"features must hold integer ids, got {bag.dtype}")
    return bag


def put_raw_features(blocks: Sequence[RawKeyedJagged], sharding: ShardingPlan) -> RawKeyedJagged:
    """The batch of raw ids on the mesh from each device's own :class:`RawKeyedJagged` block,
    as :func:`jaxembed.sharding.put_features` puts a :class:`jaxembed.KeyedJagged`'s (what a
    managed-collision collection module on a mesh takes).

    Args:
      blocks: one block per device of this process, in the mesh's order; they share keys,
        capacity, batch size and weightedness.
      sharding: the :class:`jaxembed.sharding.ShardingPlan`.

    Returns:
      A :class:`RawKeyedJagged` whose leaves are the blocks side by side, split over the
      plan's ``batch_axes``.

    Raises:
      TypeError, ValueError: blocks of another type or shape, or not one per local device.

    Example:
      >>> import jax, jaxembed
      >>> from jaxembed import sharding as S
      >>> from jaxembed.collisions import RawKeyedJagged, put_raw_features
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 4, 8, ["f"])]
      >>> plan = S.by_hand(tables, jax.make_mesh((1,), ("x",)), {"t": S.row_wise()})
      >>> raw = put_raw_features([RawKeyedJagged.from_lists({"f": [[2**60, 3]]})], plan)
      >>> raw.capacity, raw.ids.hi.sharding.spec
      (16, P('x',))
    """
    if not isinstance(sharding, ShardingPlan):
        raise TypeError(
            f"sharding must be a jaxembed.sharding.ShardingPlan, got {type(sharding).__name__}"
        )
    return _mesh.put_blocks(blocks, sharding, RawKeyedJagged)


_serialization.register_node(
    RawKeyedJagged, "collisions.RawKeyedJagged", to_json=list, from_json=tuple
)


class RemappedFeatures(NamedTuple):
    """What :meth:`ManagedCollisionCollection.remap` returns.

    Attributes:
      features: the :class:`jaxembed.KeyedJagged` of rows: the raw features' layout, each id
        replaced by its row in its table (``num_embeddings`` of the table, out of range, for an
        id that no call could profile: see :meth:`ManagedCollisionCollection.remap`).
      state: the new states, ``{table name: CollisionState}``.
      evicted: ``{table name: (k,) int32}``, the rows whose id changed in this call's eviction
        (reset them with :func:`jaxembed.collisions.reset_rows`), padded with ``num_embeddings``.
      num_evicted: ``{table name: () int32}``, how many entries of ``evicted`` are rows.

    Example:
      >>> import jaxembed
      >>> from jaxembed.collisions import (
      ...     ManagedCollision, ManagedCollisionCollection, RawKeyedJagged)
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 4, 8, ["a", "b"])]
      >>> mcc = ManagedCollisionCollection({"t": ManagedCollision("lfu", 1)}, tables)
      >>> out = mcc.remap(mcc.init(8), RawKeyedJagged.from_lists({"a": [[2**50]], "b": [[3]]}))
      >>> out.evicted["t"][: out.num_evicted["t"]]  # the first eviction fills two rows
      Array([5, 6], dtype=int32)
    """

    features: KeyedJagged
    state: dict[str, CollisionState]
    evicted: dict[str, jax.Array]
    num_evicted: dict[str, jax.Array]


_serialization.register_namedtuple(RemappedFeatures, "collisions.RemappedFeatures")


class ManagedCollisionCollection:
    """One managed-collision remapper per table of a collection (TorchRec's
    ``ManagedCollisionCollection``).

    Args:
      managed_collisions: ``{table name: ManagedCollision}``, one for every table.
      tables: the collection's :class:`jaxembed.EmbeddingBagConfig` or
        :class:`jaxembed.EmbeddingConfig` list; each table's ``num_embeddings`` is its number
        of slots (the last row is the miss row).

    Example:
      >>> import jax, jaxembed
      >>> from jaxembed.collisions import (
      ...     ManagedCollision, ManagedCollisionCollection, RawKeyedJagged)
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 4, 8, ["user"])]
      >>> mcc = ManagedCollisionCollection({"t": ManagedCollision("lru", 1)}, tables)
      >>> state = mcc.init(ids_per_call=16)
      >>> raw = RawKeyedJagged.from_lists({"user": [[2**40 + 7], [3, 2**40 + 7]]})
      >>> kj, state, evicted, num_evicted = mcc.remap(state, raw)
      >>> [[bag.tolist() for bag in bags] for bags in kj.to_lists().values()]
      [[[5], [6, 5]]]
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)
      >>> jaxembed.embedding_bag_collection(params, kj, tables)[0]["user"].shape
      (2, 4)
    """

    def __init__(self, managed_collisions: Mapping[str, ManagedCollision], tables: Sequence[Any]):
        if not isinstance(managed_collisions, Mapping):
            raise TypeError(
                "managed_collisions must map table names to ManagedCollision, got "
                f"{type(managed_collisions).__name__}"
            )
        if isinstance(tables, EmbeddingConfig) or not isinstance(tables, Sequence) or not tables:
            raise TypeError("tables must be a non-empty list of EmbeddingBagConfig/EmbeddingConfig")
        # the collections' own checks: configs of one kind, distinct names, a feature in one table
        kind = type(tables[0]) if isinstance(tables[0], EmbeddingConfig) else EmbeddingConfig
        self._plan = Plan.of(tables, kind)
        names = [t.name for t in self._plan.tables]
        missing = [n for n in names if n not in managed_collisions]
        extra = [n for n in managed_collisions if n not in names]
        if missing or extra:
            raise ValueError(
                "managed_collisions must name every table once: "
                + (f"no ManagedCollision for {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"{extra} are not tables" if extra else "")
            )
        for n in names:
            if not isinstance(managed_collisions[n], ManagedCollision):
                raise TypeError(
                    f"managed_collisions[{n!r}] must be a ManagedCollision, got "
                    f"{type(managed_collisions[n]).__name__}"
                )
        self.tables = self._plan.tables
        self.managed_collisions = {n: managed_collisions[n] for n in names}

    def init(self, ids_per_call: int | Mapping[str, int]) -> dict[str, CollisionState]:
        """Every table's empty state.

        Args:
          ids_per_call: the most ids one call brings to a table (summed over the table's
            features), one number for every table or ``{table name: n}``.

        Returns:
          ``{table name: CollisionState}``.
        """
        if isinstance(ids_per_call, Mapping):
            unknown = [n for n in ids_per_call if n not in self.managed_collisions]
            missing = [n for n in self.managed_collisions if n not in ids_per_call]
            if unknown or missing:
                raise ValueError(
                    f"ids_per_call must name every table: missing {missing}, unknown {unknown}"
                )
            per = dict(ids_per_call)
        else:
            per = dict.fromkeys(self.managed_collisions, ids_per_call)
        return {
            t.name: self.managed_collisions[t.name].init(t.num_embeddings, per[t.name])
            for t in self.tables
        }

    def remap(
        self,
        state: Mapping[str, CollisionState],
        features: RawKeyedJagged,
        *,
        train: bool = True,
        sharding: ShardingPlan | None = None,
    ) -> RemappedFeatures:
        """Maps each feature's raw ids to rows of its table; in training, profiles and evicts.

        Each table's call takes the ids of its features, concatenated in the order of its
        ``feature_names``, up to its state's ``ids_per_call``. A concrete call with more raises;
        under ``jit`` the ids past ``ids_per_call`` are neither profiled nor remapped: their row
        is the table's ``num_embeddings``, out of range, so a bag holding one reads NaN.

        Args:
          state: ``{table name: CollisionState}`` from :meth:`init`.
          features: the :class:`RawKeyedJagged`; its keys are exactly the tables' features.
          train: profile and evict (TorchRec's training mode); False only remaps.
          sharding: None, or the :class:`jaxembed.sharding.ShardingPlan` whose mesh holds
            ``features`` (:func:`put_raw_features`). Then every device gathers the whole
            batch's ids and runs this one-device remap on them, with the state replicated: the
            states, rows and evictions are exactly those of one device on the whole batch
            (samples block after block), and each device keeps its own block's rows. The
            ``ids_per_call`` are the whole batch's; each device's remap work is the whole
            batch's too (it does not shrink with the mesh).

        Returns:
          :class:`RemappedFeatures` ``(features, state, evicted, num_evicted)``.

        Raises:
          ValueError: keys that no table looks up or that are missing, a state for other tables,
            more ids for a table than its ``ids_per_call`` (concrete lengths), features not
            split into the plan's blocks.
        """
        if not isinstance(features, RawKeyedJagged):
            raise TypeError(
                f"features must be a jaxembed.collisions.RawKeyedJagged, got "
                f"{type(features).__name__}"
            )
        if not isinstance(state, Mapping) or set(state) != set(self.managed_collisions):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"state must hold one CollisionState per table {list(self.managed_collisions)}, "
                f"got {got}"
            )
        keys = features.keys
        wanted = self._plan.feature_names
        unknown = [k for k in keys if k not in wanted]
        missing = [f for f in wanted if f not in keys]
        if unknown or missing:
            raise ValueError(
                f"features must hold exactly the tables' features {wanted}: "
                f"unknown {unknown}, missing {missing}"
            )
        if sharding is not None and not isinstance(sharding, ShardingPlan):
            raise TypeError(
                f"sharding must be a jaxembed.sharding.ShardingPlan, got {type(sharding).__name__}"
            )
        k = 1 if sharding is None else sharding.num_blocks
        _mesh.check_blocks(features, k, "jaxembed.collisions.put_raw_features")
        self._check_ids_per_call(state, features, k)
        if sharding is not None:
            return self._on_mesh(state, features, train, sharding)
        return _remap_on_one_device(self, dict(state), features, train=train)

    def _check_ids_per_call(self, state, features: RawKeyedJagged, k: int) -> None:
        """Concrete lengths of ``k`` device blocks: each table's ids, over every block, within
        its state's ``ids_per_call`` (under ``jit``, the ids past it are not remapped)."""
        lengths = features.lengths
        if isinstance(lengths, jax.core.Tracer) or not getattr(
            lengths, "is_fully_addressable", True
        ):
            return
        keys = features.keys
        per_key = np.asarray(lengths).reshape(k, len(keys), -1).sum((0, 2))
        where = " over the mesh's whole batch" if k > 1 else ""
        for t in self.tables:
            n = self.managed_collisions[t.name].check_state(state[t.name])
            total = sum(int(per_key[keys.index(f)]) for f in t.feature_names)
            if total > n:
                raise ValueError(
                    f"table {t.name!r} gets {total} ids in this call{where} (features "
                    f"{list(t.feature_names)}), more than its state's ids_per_call {n}"
                )

    def _remap(self, state, features: RawKeyedJagged, train: bool) -> RemappedFeatures:
        """:meth:`remap` on one device, the arguments checked."""
        keys = features.keys
        per_key = features.lengths.reshape(len(keys), -1).sum(1, dtype=jnp.int32)
        starts = jnp.cumsum(per_key, dtype=jnp.int32) - per_key
        # every position starts out of range for its table: padding, and ids no call could take
        out_of_range = np.array(
            [self._plan.table_of(k).num_embeddings for k in keys] + [0], np.int32
        )
        feature_of = _feature_of(per_key, features.capacity)
        values = jnp.asarray(out_of_range)[feature_of]
        new_state, evicted, num_evicted = {}, {}, {}
        for t in self.tables:
            mc, st = self.managed_collisions[t.name], state[t.name]
            n = mc.check_state(st)
            js = np.array([keys.index(f) for f in t.feature_names], np.int32)
            counts, begins = per_key[js], starts[js]
            total = jnp.sum(counts)
            # the k-th id of the table's call: feature j = the block holding k, in config order
            k = jnp.arange(n, dtype=jnp.int32)
            ends = jnp.cumsum(counts, dtype=jnp.int32)
            j = jnp.searchsorted(ends, k, side="right", method="compare_all")
            first = (ends - counts)[jnp.minimum(j, len(js) - 1)]
            at = begins[jnp.minimum(j, len(js) - 1)] + k - first
            ok = k < total
            at = jnp.where(ok, at, features.capacity)
            ids = RawIds(
                jnp.take(features.ids.hi, at, mode="fill", fill_value=0),
                jnp.take(features.ids.lo, at, mode="fill", fill_value=0),
            )
            slots, new_state[t.name], evicted[t.name], num_evicted[t.name] = mc.remap(
                st, ids, valid=ok, train=train
            )
            values = values.at[at].set(slots, mode="drop")
        return RemappedFeatures(features.with_ids(values), new_state, evicted, num_evicted)

    def _on_mesh(self, state, features: RawKeyedJagged, train: bool, plan: ShardingPlan):
        """:meth:`remap` of features split over ``plan``'s blocks, the arguments checked: the
        one-device remap of the whole batch on every device (see ``sharding`` there)."""
        # the state replicated on the mesh first: a state from init (on one device) and one
        # from an earlier call (on the mesh) then call the same program
        state = {n: jax.tree.map(lambda x: place(x, plan.mesh, P()), s) for n, s in state.items()}
        values, new_state, evicted, num_evicted = _remap_on_mesh(
            self, state, features.ids, features.lengths,
            keys=features.keys, plan=plan, train=train,
        )  # fmt: skip
        return RemappedFeatures(features.with_ids(values), new_state, evicted, num_evicted)


# Both paths are jitted even when called eagerly, and compiled once per collection (plan),
# keys and shapes: run op by op, each table's eviction lax.cond traced its branches anew and
# compiled them on every call (and an eager shard_map would run the mesh body op by op)
@functools.partial(jax.jit, static_argnums=0, static_argnames=("train",))
def _remap_on_one_device(mcc: ManagedCollisionCollection, state, features: RawKeyedJagged, *,
                         train: bool) -> RemappedFeatures:  # fmt: skip
    """``mcc``'s :meth:`ManagedCollisionCollection.remap` on one device."""
    return mcc._remap(state, features, train)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("keys", "plan", "train"))
def _remap_on_mesh(mcc: ManagedCollisionCollection, state, ids: RawIds, lengths: jax.Array, *,
                   keys: tuple[str, ...], plan: ShardingPlan, train: bool):  # fmt: skip
    """``mcc``'s :meth:`ManagedCollisionCollection.remap` of the batch that ``plan``'s blocks
    hold: ``(values, state, evicted, num_evicted)``, the values split as the blocks are."""
    k, axes, nf = plan.num_blocks, plan.batch_axes, len(keys)
    capacity, b = ids.hi.shape[0] // k, lengths.shape[0] // (k * nf)

    def body(state, ids, lengths):
        ids = jax.tree.map(lambda x: jax.lax.all_gather(x, axes, tiled=True), ids)
        lengths = jax.lax.all_gather(lengths, axes, tiled=True).reshape(k, nf, b)
        dest = _whole_batch_positions(lengths, capacity)
        whole_ids = jax.tree.map(
            lambda x: jnp.zeros_like(x).at[dest.reshape(-1)].set(x, mode="drop"), ids
        )
        whole_lengths = lengths.transpose(1, 0, 2).reshape(-1)
        whole = RawKeyedJagged.tree_unflatten(keys, (whole_ids, whole_lengths, None))
        out = mcc._remap(state, whole, train)
        mine = dest[jax.lax.axis_index(axes)]
        values = jnp.take(out.features.values, mine, mode="fill", fill_value=0)
        return values, out.state, out.evicted, out.num_evicted

    specs = ((P(), P(axes), P(axes)), (P(axes), P(), P(), P()))
    return _mesh._run(body, plan.mesh, *specs, state, ids, lengths)


def _whole_batch_positions(lengths: jax.Array, capacity: int) -> jax.Array:
    """``(k, capacity)`` int32: where each id of ``k`` blocks of ``lengths`` ``(k, F, B)`` goes
    in the whole batch's feature-major layout (feature ``f`` of block 0, of block 1, ..., then
    feature ``f + 1``); ``k * capacity``, past the end, for the blocks' padding."""
    k, nf = lengths.shape[:2]
    counts = lengths.sum(2, dtype=jnp.int32)  # (k, F): each block's ids of each feature
    ends = jnp.cumsum(counts, axis=1, dtype=jnp.int32)
    j = jnp.arange(capacity, dtype=jnp.int32)
    f = jax.vmap(lambda e: jnp.searchsorted(e, j, side="right", method="compare_all"))(ends)
    fc = jnp.minimum(f, nf - 1)
    within = j - jnp.take_along_axis(ends - counts, fc, axis=1)
    totals = counts.sum(0)
    start = jnp.cumsum(totals, dtype=jnp.int32) - totals  # feature f's first id, whole batch
    before = jnp.cumsum(counts, axis=0, dtype=jnp.int32) - counts  # its ids in earlier blocks
    dest = start[fc] + jnp.take_along_axis(before, fc, axis=1) + within
    return jnp.where(f < nf, dest, k * capacity).astype(jnp.int32)


def _feature_of(per_key: jax.Array, capacity: int) -> jax.Array:
    """The feature of each of ``capacity`` positions (``len(per_key)`` past the last id)."""
    ends = jnp.cumsum(per_key, dtype=jnp.int32)
    positions = jnp.arange(capacity, dtype=jnp.int32)
    return jnp.searchsorted(ends, positions, side="right", method="compare_all")
