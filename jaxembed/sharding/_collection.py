"""A collection of pooled tables on a mesh, placed by a :class:`ShardingPlan`.

The batch is split over the plan's axis: each device holds its own samples' features, one
:class:`~jaxembed.KeyedJagged` block (:func:`put_features`), and gets its samples' pooled
features back. Each group of tables (:mod:`jaxembed.sharding._placement`) runs the core's one
pipeline (:meth:`~jaxembed.core._pipeline.Lookup.start`, then the core's bag reduction) on each
device under ``jax.shard_map``, with the communication TorchRec uses:

``data_parallel``
    no communication forward: each device pools its samples from its replica. The sparse
    update gathers every device's entries, ``O(ids x D)``, and applies them everywhere alike.
``table_wise``
    an ``all_to_all`` of ids: each device sends each owner the ids of the owner's features (a
    block of the local capacity per owner); the owner pools them for every sample; an
    ``all_to_all`` of the pooled ``(features, B_local, D)`` blocks brings them back.
``row_wise``
    the ids are all-gathered; each device pools *partial* bags from the rows it holds (others
    are zeros) and one ``psum_scatter`` of the ``(bags, D)`` partial sums gives each device
    its samples' bags: ``(B, D)`` moves, never ``(ids, D)``. Sum and mean only.
``column_wise``
    the ids are all-gathered; each device pools every bag over its ``D / K`` columns and one
    ``all_to_all`` of ``(bags, D / K)`` gives each device its samples' full rows.

Data-parallel, table-wise and column-wise bags equal the unsharded collection's bit for bit;
row-wise bags add the devices' partial sums (a different order of the same sums: within an
ulp per device). An id outside its table gives a NaN bag under ``jit`` on every placement.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed.collections import _collection as _coll
from jaxembed.collections._jagged import KeyedJagged
from jaxembed.core import _bag, _layout, _renorm
from jaxembed.core._numerics import divide
from jaxembed.core._pipeline import Lookup
from jaxembed.sharding._layout import TableSharding, place
from jaxembed.sharding._placement import Group, Kind, ShardingPlan
from jaxembed.sparse._lookup import SparseGrad
from jaxembed.sparse._optimizers import RowOptimizer

Params = dict[str, dict[str, jax.Array]]


# -- layouts of one group's block, for the core's pipeline ----------------------------------------


class _RowBlock(_layout.Layout):
    """A row-wise block: the (gathered) global rows map to this device's; another device's
    rows, and the sentinel, map past its end (kept out of the partial bags)."""

    def __init__(self, axis: str, num_embeddings: int):
        self.axis, self.num_embeddings = axis, num_embeddings

    def localizer(self, num_local: int):
        offset = jax.lax.axis_index(self.axis) * num_local

        def localize(safe):
            local = safe - offset
            mine = (safe < self.num_embeddings) & (local >= 0) & (local < num_local)
            return jnp.where(mine, local, num_local)

        return localize


def _layout_of(g: Group, mesh: Any, axis: str) -> _layout.Layout:
    """The device steps of the pipeline for a group's block. A replica's renorm and counts see
    every device's ids (``TableSharding``'s ``batch``, gathered as one value on every device,
    so the replicas stay alike); a column block's row norm sums over the devices (its ``dim``);
    table-wise blocks receive every id of their tables, so run as one device."""
    if g.kind is Kind.DATA_PARALLEL:
        return TableSharding(mesh, batch=axis)
    if g.kind is Kind.ROW_WISE:
        return _RowBlock(axis, g.stack.num_embeddings)
    if g.kind is Kind.COLUMN_WISE:
        return TableSharding(mesh, dim=axis)
    return _layout.LOCAL


def spec_of(g: Group, axis: str) -> P:
    """The ``PartitionSpec`` of a group's array, one entry per dimension (as a step's outputs
    come back: a replica placed as ``P()`` would return as ``P(None, None)``)."""
    if g.kind is Kind.DATA_PARALLEL:
        return P(None, None)
    if g.kind is Kind.COLUMN_WISE:
        return P(None, axis)
    return P(axis, None)


def _run(body, mesh, in_specs, out_specs, *args, check_vma: bool = False):
    """``jax.shard_map(body)(*args)``, each argument first laid out as its spec says (a no-op
    where it already is; a user's replicated cotangent is split, say)."""
    args = tuple(
        jax.tree.map(lambda x, spec: place(x, mesh, spec), a, specs_prefix_tree(specs, a))
        for a, specs in zip(args, in_specs, strict=True)
    )
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
    )
    return mapped(*args)


def specs_prefix_tree(specs, tree):
    """``specs`` (a prefix of ``tree``'s structure) broadcast to one spec per leaf of ``tree``."""
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda _: spec, sub),
        specs,
        tree,
        is_leaf=lambda x: isinstance(x, P) or x is None,
    )


# -- params ---------------------------------------------------------------------------------------


def _put(x: np.ndarray, mesh: Any, spec: P) -> jax.Array:
    """A host array placed on the mesh (each process supplies its own devices' blocks)."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) array on the host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_params(weights: Mapping[str, Any], sharding: ShardingPlan) -> Params:
    """The sharded params ``{group: {"weight": array}}`` from one ``(V, D)`` array per table.

    ``weights`` is what :func:`jaxembed.collections.tables_of` returns for an unsharded
    collection (or a torch state dict's tables); the blocks are padded with zero rows as the
    plan says and placed on its mesh.

    Raises:
      KeyError: a table missing; ValueError: a table of the wrong shape.
    """
    plan = _check_plan(sharding)
    unknown = set(weights) - {t.name for t in plan.tables}
    if unknown:
        raise KeyError(f"no table named {sorted(unknown)} in this plan")
    host = {}
    for t in plan.tables:
        if t.name not in weights:
            raise KeyError(f"no weight given for table {t.name!r}")
        w = np.asarray(_host(jnp.asarray(weights[t.name]))).astype(t.param_dtype)
        if w.shape != (t.num_embeddings, t.embedding_dim):
            raise ValueError(
                f"weights[{t.name!r}] has shape {w.shape}, the table is "
                f"({t.num_embeddings}, {t.embedding_dim})"
            )
        host[t.name] = w
    params = {}
    for g in plan.groups:
        full = np.zeros(g.global_shape, g.dtype)
        for t in g.stack.tables:
            device, offset = g.where(t.name)
            row = offset if device is None else device * g.rows + offset
            full[row : row + t.num_embeddings] = host[t.name]
        params[g.name] = {"weight": _put(full, plan.mesh, spec_of(g, plan.axis))}
    return params


def init(key: Any, sharding: ShardingPlan) -> Params:
    """Sharded initial params: the tables :func:`jaxembed.collections.init` draws for the same
    key (so a sharded and an unsharded collection start alike), placed by the plan."""
    plan = _check_plan(sharding)
    params = _coll.init(key, plan.tables, stack=False)
    return shard_params({name: p["weight"] for name, p in params.items()}, plan)


def tables_of(params: Mapping[str, Any], sharding: ShardingPlan) -> dict[str, np.ndarray]:
    """Each table ``(V, D)`` on the host, from sharded params (or optimizer state leaves shaped
    like them: pass ``{group: {"weight": leaf}}``)."""
    plan = _check_plan(sharding)
    weights = _check_params(params, plan)
    out = {}
    for g, w in zip(plan.groups, weights, strict=True):
        w = _host(w)
        for t in g.stack.tables:
            device, offset = g.where(t.name)
            row = offset if device is None else device * g.rows + offset
            out[t.name] = w[row : row + t.num_embeddings]
    return out


def _check_plan(sharding: Any) -> ShardingPlan:
    if not isinstance(sharding, ShardingPlan):
        raise TypeError(
            f"sharding must be a jaxembed.sharding.ShardingPlan (from jaxembed.plan), got "
            f"{type(sharding).__name__}"
        )
    return sharding


def _check_params(params: Any, plan: ShardingPlan) -> tuple[jax.Array, ...]:
    shapes = {g.name: g.global_shape for g in plan.groups}
    hint = "jaxembed.sharding.init or shard_params for this plan"
    return _coll.check_named_tables(params, shapes, hint)


# -- the features ---------------------------------------------------------------------------------


def put_features(blocks: Sequence[KeyedJagged], sharding: ShardingPlan) -> KeyedJagged:
    """The batch on the mesh from each device's own :class:`~jaxembed.KeyedJagged` block.

    Args:
      blocks: one block per device of this process along the plan's axis, in the mesh's order
        (every device, in a single process; its own devices' blocks in each process of a
        multi-host run). The blocks share keys, capacity, batch size and weightedness.
      sharding: the plan.

    Returns:
      A :class:`~jaxembed.KeyedJagged` whose ``values``, ``lengths`` and ``weights`` are the
      blocks side by side, split over the axis; sample ``b`` of device ``k`` is sample
      ``k * B_local + b`` of the pooled outputs.

    Raises:
      ValueError: blocks that differ in keys or shape, or not one per local device.
    """
    plan = _check_plan(sharding)
    blocks = list(blocks)
    local = [d for d in plan.mesh.devices.reshape(-1) if d.process_index == jax.process_index()]
    if len(blocks) != len(local):
        raise ValueError(
            f"blocks must hold one KeyedJagged per device of this process ({len(local)}), "
            f"got {len(blocks)}"
        )
    first = blocks[0]
    for b in blocks:
        if not isinstance(b, KeyedJagged):
            raise TypeError(f"blocks must be KeyedJagged, got {type(b).__name__}")
        same = (b.keys, b.capacity, b.batch_size, b.weights is None)
        if same != (first.keys, first.capacity, first.batch_size, first.weights is None):
            raise ValueError(
                "the blocks must share keys, capacity, batch size and weightedness; got "
                f"{b!r} and {first!r}"
            )
    sharding_ = NamedSharding(plan.mesh, P(plan.axis))
    k = plan.num_devices

    def put(leaves):
        local_data = np.concatenate([np.asarray(x) for x in leaves])
        shape = (local_data.shape[0] * k // len(blocks),)
        return jax.make_array_from_process_local_data(sharding_, local_data, shape)

    weights = None if first.weights is None else put([b.weights for b in blocks])
    children = (put([b.values for b in blocks]), put([b.lengths for b in blocks]), weights)
    return KeyedJagged.tree_unflatten(first.keys, children)


def _check_features(features: Any, plan: ShardingPlan) -> KeyedJagged:
    """The sharded features against the tables; concrete blocks are range-checked."""
    stack_plan = _coll._plan(plan.tables, stack=False)
    if not isinstance(features, KeyedJagged):
        raise TypeError(f"features must be a jaxembed.KeyedJagged, got {type(features).__name__}")
    k = plan.num_devices
    if features.capacity % k or features.lengths.shape[0] % (k * len(features.keys)):
        raise ValueError(
            f"features must hold {k} equal device blocks (jaxembed.sharding.put_features); "
            f"got capacity {features.capacity} and {features.lengths.shape[0]} lengths"
        )
    leaves = jax.tree.leaves(features)
    traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
    addressable = not traced and all(getattr(x, "is_fully_addressable", True) for x in leaves)
    # the keys and the weights; the ids block by block where this process can read them all
    _coll._check_features(features, stack_plan, pooled=True, ids=False)
    if addressable:
        for block in range(k):
            _coll._check_features(_block(features, block, k), stack_plan, pooled=True)
    return features


def _block(features: KeyedJagged, block: int, k: int) -> KeyedJagged:
    """Device ``block``'s own features (host arrays)."""

    def part(x):
        x = np.asarray(x)
        n = x.shape[0] // k
        return x[block * n : (block + 1) * n]

    return KeyedJagged(
        features.keys,
        part(features.values),
        part(features.lengths),
        None if features.weights is None else part(features.weights),
    )


# -- one group on one device ----------------------------------------------------------------------


def _own_bags(s: _coll._StackIds, sentinel: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """This device's own bags: which hold an id outside its table (a kept entry at the
    sentinel), and how many entries each keeps (a mean's divisor)."""
    bounds = (s.starts, s.ends)
    bad = _bag._bag_counts(s.keep & (s.ids == sentinel), bounds, jnp.int32) > 0
    return bad, _bag._bag_counts(s.keep, bounds, dtype)


def _gather(x, axis):
    return None if x is None else jax.lax.all_gather(x, axis, tiled=True)


def _gathered(s: _coll._StackIds, axis: str, capacity: int):
    """Every device's ids of the group, device after device, with their bags' bounds."""
    k = jax.lax.axis_size(axis)
    shift = (jnp.arange(k, dtype=jnp.int32) * capacity)[:, None]
    starts = (_gather(s.starts, axis).reshape(k, -1) + shift).reshape(-1)
    ends = (_gather(s.ends, axis).reshape(k, -1) + shift).reshape(-1)
    return _gather(s.ids, axis), _gather(s.keep, axis), _gather(s.weights, axis), (starts, ends)


class _Routed:
    """A table-wise group's ids as the owner receives them: from each device, in order."""

    def __init__(self, g: Group, keys, features, feat, axis):
        k, capacity = g.devices, features.capacity
        per = _width(g, keys) * features.batch_size
        ids, keep, weights, starts, ends = [], [], [], [], []
        for slot in g.slots:
            if slot is None:
                ids.append(jnp.full(capacity, g.rows, jnp.int32))
                keep.append(jnp.zeros(capacity, bool))
                weights.append(jnp.zeros(capacity, jnp.float32))
                starts.append(jnp.zeros(per, jnp.int32))
                ends.append(jnp.zeros(per, jnp.int32))
                continue
            s = _coll._stack_ids(slot, keys, features, feat)
            # the slot's sentinel becomes the block's (its padding rows are never read)
            ids.append(jnp.where(s.ids >= slot.num_embeddings, g.rows, s.ids))
            keep.append(s.keep)
            if features.weights is not None:
                weights.append(s.weights)
            # a slot of fewer features than the widest: empty bags at its last end. The bags'
            # starts must never decrease (the backward's spread, ``_bag._bag_ids``, counts the
            # starts at or before each entry), so they are not padded with zeros
            pad = per - s.starts.shape[0]
            last = s.ends[-1:]
            starts.append(jnp.concatenate([s.starts, jnp.broadcast_to(last, (pad,))]))
            ends.append(jnp.concatenate([s.ends, jnp.broadcast_to(last, (pad,))]))
        if features.weights is not None:
            dtype = features.weights.dtype
            weights = [w.astype(dtype) for w in weights]

        def route(parts):
            return jax.lax.all_to_all(jnp.concatenate(parts), axis, 0, 0, tiled=True)

        shift = (jnp.arange(k, dtype=jnp.int32) * capacity)[:, None]
        self.ids, self.keep = route(ids), route(keep)
        self.weights = route(weights) if features.weights is not None else None
        self.bounds = tuple((route(b).reshape(k, -1) + shift).reshape(-1) for b in (starts, ends))

    @staticmethod
    def back(bags: jax.Array, axis: str) -> jax.Array:
        """The owner's ``(K * width * B_local, D)`` bags to each sample's device."""
        return jax.lax.all_to_all(bags, axis, 0, 0, tiled=True)


def _group_entries(g: Group, keys, features, feat, axis):
    """``(ids, keep, weights, bounds, own, sentinel)``: the entries this device pools for the
    group, and the rows' sentinel for the pipeline. ``own`` (row-wise) is :func:`_own_bags`:
    partial bags are sums that lose an out-of-range id's NaN, so it, and a mean's divisor, are
    applied after the collective."""
    if g.kind is Kind.TABLE_WISE:
        r = _Routed(g, keys, features, feat, axis)
        return r.ids, r.keep, r.weights, r.bounds, None, g.rows
    s = _coll._stack_ids(g.stack, keys, features, feat)
    if g.kind is Kind.DATA_PARALLEL:
        return s.ids, s.keep, s.weights, (s.starts, s.ends), None, g.stack.num_embeddings
    ids, keep, weights, bounds = _gathered(s, axis, features.capacity)
    own = None
    if g.kind is Kind.ROW_WISE:
        own = _own_bags(s, g.stack.num_embeddings, _renorm.compute_dtype(g.dtype))
    return ids, keep, weights, bounds, own, g.stack.num_embeddings


def _pooling(g: Group) -> str:
    """How the device pools its entries: row-wise partial bags are sums (a mean divides after
    the collective)."""
    return "sum" if g.kind is Kind.ROW_WISE else g.stack.pooling


def _deliver(g: Group, bags: jax.Array, own, axis: str) -> jax.Array:
    """The pooled bags this device pooled, delivered to the devices whose samples they are."""
    if g.kind is Kind.ROW_WISE:
        bad, counts = own
        out = jax.lax.psum_scatter(bags, axis, scatter_dimension=0, tiled=True)
        if g.stack.pooling == "mean":
            out = divide(out, jnp.maximum(counts, 1)[:, None]).astype(out.dtype)
        return jnp.where(bad[:, None], jnp.nan, out)
    if g.kind is Kind.COLUMN_WISE:
        return jax.lax.all_to_all(bags, axis, 0, 1, tiled=True)
    if g.kind is Kind.TABLE_WISE:
        return _Routed.back(bags, axis)
    return bags


def _split(g: Group, out: jax.Array, keys, features: KeyedJagged) -> dict[str, jax.Array]:
    """``{feature: (B_local, D)}`` from the delivered bags."""
    b = features.batch_size
    if g.kind is not Kind.TABLE_WISE:
        js = g.stack.positions_in(keys)
        per = out.reshape(len(js), b, out.shape[-1])
        return {keys[j]: per[i] for i, j in enumerate(js)}
    per = out.reshape(g.devices, _width(g, keys), b, out.shape[-1])
    result = {}
    for d, slot in enumerate(g.slots):
        if slot is not None:
            for i, j in enumerate(slot.positions_in(keys)):
                result[keys[j]] = per[d, i]
    return result


def _forward(g: Group, weight, features, feat, mesh, axis, *, sparse: bool):
    """One group's pooled features on this device, its renormed block, and (``sparse``) what
    its update needs."""
    keys = features.keys
    ids, keep, psw, bounds, own, sentinel = _group_entries(g, keys, features, feat, axis)
    layout = _layout_of(g, mesh, axis)
    if sparse:
        weight = jax.lax.stop_gradient(weight)
    lookup = Lookup.start(weight, ids, g.stack.options, layout, sentinel)
    rows = weight.shape[0]
    if g.kind is Kind.ROW_WISE:  # a partial bag sums the entries of this device's rows
        keep = keep & (lookup.local < rows)
    if g.kind is Kind.DATA_PARALLEL:
        # the replica as this device's copy: the bag loops' carries vary as the ids do, and the
        # gradient of the copy is summed over the devices (the transpose of the cast)
        lookup = dataclasses.replace(
            lookup,
            weight=jax.lax.pcast(lookup.weight, axis, to="varying"),
            table=jax.lax.pcast(lookup.table, axis, to="varying"),
        )
    style, mode = g.stack.options.lookup_style, _pooling(g)
    pieces = None
    if sparse:
        bags, pos = _bag.bags_of_table(lookup.table, lookup.local, keep, psw, bounds, mode, None,
                                       style)  # fmt: skip
        pieces = dict(
            indices=jnp.where(keep & (lookup.local < rows), lookup.local, rows),
            keep=keep,
            bounds=bounds,
            scale=lookup.scale(padding=False),
            weights=None if psw is None else jax.lax.stop_gradient(psw),
            pos=pos,
            counts=None if own is None or g.stack.pooling != "mean" else own[1],
        )
    else:
        bags = _bag._bags(
            lookup.weight, lookup.table, lookup.local, lookup.scale(), keep, psw, bounds, mode,
            None, style,
        )  # fmt: skip
    out = _split(g, _deliver(g, bags, own, axis), keys, features)
    return out, lookup.new_weight, pieces


# -- the forward ----------------------------------------------------------------------------------


def _in_specs(plan: ShardingPlan, features: KeyedJagged):
    specs = tuple(spec_of(g, plan.axis) for g in plan.groups)
    return specs, jax.tree.map(lambda _: P(plan.axis), features)


@functools.partial(jax.jit, static_argnames=("plan", "sparse"))
def _collection(weights, features, *, plan: ShardingPlan, sparse: bool = False):
    axis = plan.axis
    specs, feature_specs = _in_specs(plan, features)

    def body(weights, features):
        feat = _coll._feature_of(features)
        pooled, new, pieces = {}, [], []
        for g, w in zip(plan.groups, weights, strict=True):
            out, new_w, piece = _forward(g, w, features, feat, plan.mesh, axis, sparse=sparse)
            pooled.update(out)
            new.append(new_w)
            pieces.append(piece)
        return pooled, tuple(new), tuple(pieces)

    return _run(body, plan.mesh, (specs, feature_specs), (P(axis), specs, P(axis)), weights,
                features, check_vma=True)  # fmt: skip


def embedding_bag_collection(
    params: Mapping[str, Any], features: KeyedJagged, sharding: ShardingPlan
) -> tuple[dict[str, jax.Array], Params]:
    """:func:`jaxembed.embedding_bag_collection` on a mesh, the tables placed by ``sharding``.

    Args:
      params: the sharded params (:func:`init`, :func:`shard_params`).
      features: the batch, one block per device (:func:`put_features`).
      sharding: a :class:`ShardingPlan` (:func:`jaxembed.plan`).

    Returns:
      ``(pooled, new_params)``: ``pooled[feature]`` is ``(B, D)``, split over the plan's axis
      (sample ``b`` of device ``k`` at ``k * B_local + b``); ``new_params`` holds the renormed
      tables (``max_norm``), laid out as ``params``. Differentiable w.r.t. ``params`` (each
      block's gradient stays on its device; a replica's is summed over the devices) and the
      features' weights.

    Raises:
      As :func:`jaxembed.embedding_bag_collection`, per device block.
    """
    plan = _check_plan(sharding)
    weights = _check_params(params, plan)
    features = _check_features(features, plan)
    pooled, new, _ = _collection(weights, features, plan=plan)
    if all(g.stack.options.max_norm is None for g in plan.groups):
        return pooled, params
    out = dict(params)
    for g, w in zip(plan.groups, new, strict=True):
        if g.stack.options.max_norm is not None:
            out[g.name] = {**params[g.name], "weight": jax.lax.stop_gradient(w)}
    return pooled, out


# -- sparse training ------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class ShardedLookup:
    """What :func:`lookup` keeps for the update: each group's (renormed) block and, per device,
    how each bag's gradient spreads over the entries it pooled.

    Attributes:
      params: ``{group: {"weight": table}}``, the tables to update.
    """

    def __init__(self, plan: ShardingPlan, keys: tuple[str, ...], weights, pieces):
        self.plan, self.keys, self.weights, self.pieces = plan, keys, weights, pieces

    def tree_flatten(self):
        return (self.weights, self.pieces), (self.plan, self.keys)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)

    @property
    def params(self) -> Params:
        return {g.name: {"weight": w} for g, w in zip(self.plan.groups, self.weights, strict=True)}

    def grad(self, pooled_grads: Mapping[str, jax.Array]) -> dict[str, SparseGrad]:
        """``{group: SparseGrad}`` from the loss's gradient w.r.t. the pooled features.

        Each device's block of the :class:`~jaxembed.sparse.SparseGrad` holds the entries that
        update its own block of the table, as rows of that block (others dropped).

        Raises:
          KeyError: a feature's gradient missing.
        """
        missing = [f for f in self.keys if f not in pooled_grads]
        if missing:
            raise KeyError(f"pooled_grads lack the features {missing}")
        cots = {f: jnp.asarray(pooled_grads[f]) for f in self.keys}
        return _grads(cots, self.pieces, plan=self.plan, keys=self.keys)

    def group(self, name: str) -> GroupLookup:
        """One group's share, whose ``grad`` takes the gradient of its features side by side
        (``group_features``' order): what the nnx module records for each group."""
        i = [g.name for g in self.plan.groups].index(name)
        return GroupLookup(self.plan, self.keys, name, self.weights[i], self.pieces[i])


def group_features(g: Group, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The group's features, in the input's order."""
    return tuple(keys[j] for j in g.stack.positions_in(keys))


@jax.tree_util.register_pytree_node_class
class GroupLookup:
    """One group's :class:`ShardedLookup`: ``params`` its table, ``grad(cot)`` its
    :class:`~jaxembed.sparse.SparseGrad` from the gradient of its features side by side,
    ``(F * B, D)`` (``group_features``' order)."""

    def __init__(self, plan, keys, name, weight, piece):
        self.plan, self.keys, self.name, self.weight, self.piece = plan, keys, name, weight, piece

    def tree_flatten(self):
        return (self.weight, self.piece), (self.plan, self.keys, self.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        plan, keys, name = aux
        return cls(plan, keys, name, *children)

    @property
    def params(self) -> dict[str, jax.Array]:
        return {"weight": self.weight}

    def grad(self, cot: jax.Array) -> SparseGrad:
        g = next(g for g in self.plan.groups if g.name == self.name)
        feats = group_features(g, self.keys)
        parts = jnp.split(jnp.asarray(cot), len(feats))
        cots = dict(zip(feats, parts, strict=True))
        out = _grads(cots, (self.piece,), plan=self.plan, keys=self.keys, names=(self.name,))
        return out[self.name]


def _cotangent(g: Group, cots: Mapping[str, jax.Array], keys, axis, counts) -> jax.Array:
    """The cotangent of the bags this device pooled for the group (the transpose of
    :func:`_deliver`)."""
    if g.kind is not Kind.TABLE_WISE:
        js = g.stack.positions_in(keys)
        cot = jnp.concatenate([cots[keys[j]] for j in js])
        if g.kind is Kind.ROW_WISE:
            if counts is not None:  # the mean's division, transposed
                acc = _renorm.compute_dtype(g.dtype)
                cot = divide(cot.astype(acc), jnp.maximum(counts, 1)[:, None])
            return jax.lax.all_gather(cot, axis, tiled=True)
        if g.kind is Kind.COLUMN_WISE:
            return jax.lax.all_to_all(cot, axis, 1, 0, tiled=True)
        return cot
    width = _width(g, keys)
    parts = []
    for slot in g.slots:
        js = () if slot is None else slot.positions_in(keys)
        mine = [cots[keys[j]] for j in js]
        b = next(iter(cots.values())).shape[0]
        mine += [jnp.zeros((b, g.cols), g.dtype)] * (width - len(mine))
        parts.append(jnp.concatenate(mine))
    return _Routed.back(jnp.concatenate(parts), axis)


def _feature_major(indices, values, bounds, k: int, f: int, sentinel: int):
    """Entries of ``k`` devices' blocks, each feature-major over its own samples, reordered
    feature-major over the whole batch: the order of the unsharded collection's entries, so
    that a row's duplicates are summed in the same order (the sparse step is then the same bit
    for bit). ``bounds``: every bag's ``(starts, ends)``, ``(k * f * B,)`` each."""
    n = indices.shape[0]
    starts, ends = (b.reshape(k, f, -1) for b in bounds)
    first, length = starts[:, :, 0].T.reshape(-1), (ends[:, :, -1] - starts[:, :, 0]).T.reshape(-1)
    out_end = jnp.cumsum(length, dtype=jnp.int32)
    at = jnp.arange(n, dtype=jnp.int32)
    run = jnp.searchsorted(out_end, at, side="right", method="compare_all").astype(jnp.int32)
    run = jnp.minimum(run, length.shape[0] - 1)
    src = first[run] + at - (out_end[run] - length[run])
    valid = at < out_end[-1]
    src = jnp.where(valid, src, n)
    indices = jnp.where(valid, jnp.take(indices, src, mode="fill", fill_value=sentinel), sentinel)
    return indices, jnp.take(values, src, axis=0, mode="fill", fill_value=0)


def _width(g: Group, keys) -> int:
    """The features of the group's bags per device block: a table-wise slot's most."""
    if g.kind is Kind.TABLE_WISE:
        return max(len(slot.positions_in(keys)) for slot in g.slots if slot is not None)
    return len(g.stack.positions_in(keys))


@functools.partial(jax.jit, static_argnames=("plan", "keys", "names"))
def _grads(cots, pieces, *, plan: ShardingPlan, keys, names=None):
    """``{group: SparseGrad}`` of the groups ``names`` (default every one), whose ``pieces``
    (in that order) :func:`lookup` kept."""
    axis, k = plan.axis, plan.num_devices
    groups = [g for g in plan.groups if names is None or g.name in names]

    def body(cots, pieces):
        out = {}
        for g, p in zip(groups, pieces, strict=True):
            cot = _cotangent(g, cots, keys, axis, p["counts"])
            values = _bag.spread(
                cot, p["keep"], p["bounds"], p["scale"], p["weights"], p["pos"], _pooling(g),
                None,
            ).astype(g.dtype)  # fmt: skip
            indices, bounds = p["indices"], p["bounds"]
            if g.kind is Kind.DATA_PARALLEL:  # every replica applies every device's entries
                c = indices.shape[0]
                shift = (jnp.arange(k, dtype=jnp.int32) * c)[:, None]
                bounds = tuple((_gather(b, axis).reshape(k, -1) + shift).reshape(-1)
                               for b in bounds)  # fmt: skip
                indices, values = _gather(indices, axis), _gather(values, axis)
            sentinel = g.rows
            indices, values = _feature_major(indices, values, bounds, k, _width(g, keys),
                                             sentinel)  # fmt: skip
            out[g.name] = SparseGrad(indices, values)
        return out

    return _run(body, plan.mesh, (P(axis), P(axis)), P(axis), cots, pieces)


def lookup(
    params: Mapping[str, Any], features: KeyedJagged, sharding: ShardingPlan
) -> tuple[dict[str, jax.Array], ShardedLookup]:
    """:func:`jaxembed.collections.lookup` on a mesh: the pooled features, and how to update.

    The same pattern::

        pooled, lk = jaxembed.sharding.lookup(params, features, plan)
        loss, pooled_grads = jax.value_and_grad(loss_fn)(pooled)
        params, state = opt.update(lk.grad(pooled_grads), state, lk.params)

    with ``opt = jaxembed.sharding.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), plan)``.
    Every device updates only the rows of its own block; a replica's update applies every
    device's entries, alike on every device.

    Returns:
      ``(pooled, lookup)``: as :func:`embedding_bag_collection`'s pooled features, and a
      :class:`ShardedLookup`.
    """
    plan = _check_plan(sharding)
    weights = _check_params(params, plan)
    features = _check_features(features, plan)
    pooled, new, pieces = _collection(weights, features, plan=plan, sparse=True)
    tables = tuple(w if n is None else n for w, n in zip(weights, new, strict=True))
    return pooled, ShardedLookup(plan, features.keys, tables, pieces)


def _state_spec(g: Group, leaf: Any, axis: str) -> P:
    if leaf.ndim == 0:
        return P()
    if leaf.ndim == 1:
        return P(axis) if g.split_rows else P(None)
    if leaf.ndim == 2:
        return spec_of(g, axis)
    raise ValueError(
        f"a sharded optimizer's state holds scalars, (V,) and (V, D) arrays; got {leaf.shape}"
    )


def _row_scale(g: Group, axis: str):
    """Each local row's factor on the learning rate (its table's ``lr_scale``), or None."""
    stacks = [s for s in g.slots if s is not None] if g.kind is Kind.TABLE_WISE else [g.stack]
    if all(t.lr_scale == 1.0 for s in stacks for t in s.tables):
        return None
    if g.kind is Kind.TABLE_WISE:  # the blocks' rows as rows of one (K * R) array
        pairs = sorted(
            (d * g.rows + off, t.lr_scale)
            for d, s in enumerate(g.slots)
            if s is not None
            for t, off in zip(s.tables, s.offsets, strict=True)
        )
        scale = _coll.RowScale(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
    else:
        scale = _coll.RowScale(g.stack.offsets, tuple(t.lr_scale for t in g.stack.tables))
    if not g.split_rows:
        return scale
    return lambda rows: scale(rows + jax.lax.axis_index(axis) * g.rows)


def optimizer(tx: RowOptimizer, sharding: ShardingPlan) -> _coll.CollectionOptimizer:
    """A row-wise optimizer for every group of a sharded collection.

    Each device updates its own block of the table and of the state, in place: the state is
    laid out as its table (a ``(V,)`` statistic split like the rows), the tables' ``lr_scale``
    applies row by row, and a row-wise statistic over split columns (``column_wise``) is summed
    over the devices.

    Args:
      tx: a :mod:`jaxembed.sparse` optimizer.
      sharding: the plan.

    Returns:
      ``init(params) -> state`` and ``update(grads, state, params) -> (params, state)`` over
      ``{group: ...}`` dicts, ``grads`` from :meth:`ShardedLookup.grad`. Jit the step and
      donate the params and the state.
    """
    if not isinstance(tx, RowOptimizer):
        raise TypeError(f"tx must be a jaxembed.sparse RowOptimizer, got {type(tx).__name__}")
    plan = _check_plan(sharding)
    return _coll.named_optimizer(group_optimizers(tx, plan), lambda p: _check_params(p, plan))


def group_optimizers(tx: RowOptimizer, plan: ShardingPlan) -> dict[str, RowOptimizer]:
    """``tx`` for each group's whole array: ``init`` and ``update`` run on every device's block
    (what :func:`optimizer` and the nnx module's ``row_optimizers`` use)."""
    axis = plan.axis
    out = {}
    for g in plan.groups:
        block = jax.ShapeDtypeStruct((g.rows, g.cols), g.dtype)
        specs = jax.tree.map(lambda x, g=g: _state_spec(g, x, axis), jax.eval_shape(tx.init, block))

        def init(w, g=g, specs=specs):
            return _run(tx.init, plan.mesh, (spec_of(g, axis),), specs, w)

        def update(grad, state, table, g=g, specs=specs):
            return _update(g, tx, grad, state, table, axis, plan.mesh, specs)

        out[g.name] = RowOptimizer(init, update, tx.applies_dense)
    return out


def _update(g: Group, tx, grad, state, table, axis, mesh, state_specs):
    scale = _row_scale(g, axis)

    def body(indices, values, state, table):
        kwargs = {}
        if g.kind is Kind.COLUMN_WISE:
            kwargs["column_axis"] = axis
        if scale is not None:
            kwargs["lr_scale"] = scale
        return tx.update(SparseGrad(indices, values), state, table, **kwargs)

    spec = spec_of(g, axis)
    return _run(body, mesh, (P(axis), P(axis), state_specs, spec), (spec, state_specs),
                grad.indices, grad.values, state, table)  # fmt: skip


# -- what a step moves ----------------------------------------------------------------------------


def step_bytes(sharding: ShardingPlan, features: KeyedJagged) -> dict[str, dict[str, int]]:
    """The bytes each device's collectives exchange in one step, by collective, as the plan's
    groups move them: ``{"lookup": {...}, "grad": {...}}`` for :func:`lookup` and
    :meth:`ShardedLookup.grad` (:func:`~jaxembed.sharding.collective_bytes` reads the same
    quantity off a compiled program: each collective's larger buffer).

    For a group of ``F`` features and ``D`` columns of ``s`` bytes, over ``K`` devices each
    holding ``C`` ids and ``B`` samples (``W``: the most features one device owns):

    ==============  =========================================  ==========================
    kind            lookup                                     grad
    ==============  =========================================  ==========================
    data_parallel   ``4KC`` (all-reduce) with ``max_norm`` or  ``KC (4 + D s) + 8KFB``
                    ``scale_grad_by_freq``, else nothing       (all-gather)
    table_wise      ``KC (5 + w) + 8KWB`` and ``KWB D s``      ``KWB D s`` (all-to-all)
                    (all-to-all)
    row_wise        ``KC (5 + w) + 8KFB`` (all-gather) and     ``KFB D s`` (all-gather)
                    ``KFB D s`` (reduce-scatter)
    column_wise     ``KC (5 + w) + 8KFB`` (all-gather),        ``FB D s`` (all-to-all)
                    ``FB D s`` (all-to-all) and, with
                    ``max_norm``, ``4KC`` (all-reduce)
    ==============  =========================================  ==========================

    ``w`` is the weights' bytes per id (0 unweighted).
    """
    plan = _check_plan(sharding)
    k = plan.num_devices
    c, b = features.capacity // k, features.batch_size // k
    w = 0 if features.weights is None else np.dtype(features.weights.dtype).itemsize
    look: dict[str, int] = {}
    grad: dict[str, int] = {}

    def add(d, op, n):
        if n:
            d[op] = d.get(op, 0) + int(n)

    for g in plan.groups:
        s = np.dtype(g.dtype).itemsize
        d = g.cols * (k if g.kind is Kind.COLUMN_WISE else 1)
        if g.kind is Kind.DATA_PARALLEL:
            options = g.stack.options
            if options.max_norm is not None or options.scale_grad_by_freq:
                add(look, "all-reduce", 4 * k * c)
            f = len(g.stack.positions_in(features.keys))
            add(grad, "all-gather", k * c * (4 + d * s) + 8 * k * f * b)
            continue
        ids = k * c * (5 + w)
        if g.kind is Kind.TABLE_WISE:
            width = _width(g, features.keys)
            add(look, "all-to-all", ids + 8 * k * width * b + k * width * b * d * s)
            add(grad, "all-to-all", k * width * b * d * s)
            continue
        f = len(g.stack.positions_in(features.keys))
        add(look, "all-gather", ids + 8 * k * f * b)
        if g.kind is Kind.COLUMN_WISE and g.stack.options.max_norm is not None:
            add(look, "all-reduce", 4 * k * c)  # the referenced rows' norms over the columns
        if g.kind is Kind.ROW_WISE:
            add(look, "reduce-scatter", k * f * b * d * s)
            cot = 4 if g.stack.pooling == "mean" else s
            add(grad, "all-gather", k * f * b * d * cot)
        else:
            add(look, "all-to-all", f * b * d * s)
            add(grad, "all-to-all", f * b * d * s)
    return {"lookup": look, "grad": grad}
