"""A collection of pooled tables on a mesh, placed by a :class:`ShardingPlan`.

The batch is split over the plan's axis: each device holds its own samples' features, one
:class:`~jaxembed.KeyedJagged` block (:func:`put_features`), and gets its samples' pooled
features back. Each group of tables (:mod:`jaxembed.sharding._placement`) runs on each device
under ``jax.shard_map``, with the core's pipeline (:meth:`~jaxembed.core._pipeline.Lookup.start`,
then the core's bag reduction):

``data_parallel``
    no communication forward: each device pools its samples from its replica. The sparse
    update is the same on every device: the devices' per-row sums added by one ``psum`` of
    ``(V, D)`` where the table has at most the batch's ids as rows (:func:`dense_replica`),
    else every device's entries gathered, ``O(K x ids x D)``, in the unsharded order.
``table_wise`` and ``row_wise``
    routed (:mod:`jaxembed.sharding._route`): each device sends each of its distinct rows to
    the device owning it (a table's device; row ``r`` of a row-wise stack on ``r % K``), at most
    ``capacity`` per (device, owner) pair in one ``all_to_all``; each owner renorms and reads
    the rows it was sent, and they come back slot by slot; each device pools its own bags from
    them. The sparse gradient goes back through the same slots, one sum per (device, row), and
    each owner applies only its own rows: ``O(K x capacity)`` per device.
``column_wise``
    the ids are all-gathered; each device pools every bag over its ``D / K`` columns and one
    ``all_to_all`` of ``(bags, D / K)`` gives each device its samples' full rows.

Bags and renormed tables equal the unsharded collection's bit for bit (a column-wise renorm
sums a row's squares per device: within an ulp); a routed group's gradients add each device's
sums (within a few ulp). An id outside its table gives a NaN bag under ``jit`` on every
placement. A routed group whose ids overflow its capacity is refused (``error``: NaN bags, no
update, :class:`CapacityError` on the host) or loses those ids (``drop``), counted in the stats.

On a 2-D mesh (the plan's ``replica`` axis) the batch splits over both axes and each group runs
as above inside its replica group, along ``axis``; the copies of a block stay alike: each
renorms and counts every replica group's rows, and applies every replica group's entries (one
``all_gather`` over ``replica``), and a refusal is decided over every device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed.collections import _collection as _coll
from jaxembed.collections._jagged import KeyedJagged
from jaxembed.core import _bag, _gradient, _index_policy, _layout, _renorm
from jaxembed.core._pipeline import Lookup
from jaxembed.sharding import _route
from jaxembed.sharding._layout import TableSharding, place
from jaxembed.sharding._placement import Group, Kind, ShardingPlan
from jaxembed.sparse._lookup import SparseGrad
from jaxembed.sparse._optimizers import RowOptimizer

Params = dict[str, dict[str, jax.Array]]


# -- layouts of one group's block, for the core's pipeline ----------------------------------------


def _layout_of(g: Group, plan: ShardingPlan) -> _layout.Layout:
    """The device steps of the pipeline for a group's block. A replica's renorm and counts see
    every device's ids (``TableSharding``'s ``batch``, gathered as one value on every device, so
    the replicas stay alike); a column block's row norm sums over the devices (its ``dim``); on
    a 2-D mesh a block's renorm and counts see every replica group's ids (``batch`` over
    ``replica``), so the copies of a block stay alike. A routed owner reads its own block."""
    if g.kind is Kind.DATA_PARALLEL:
        return TableSharding(plan.mesh, batch=plan.batch_axes)
    if g.kind is Kind.COLUMN_WISE:
        return TableSharding(plan.mesh, dim=plan.axis, batch=plan.replica)
    if plan.replica is not None and g.stack.options.max_norm is not None:
        return TableSharding(plan.mesh, batch=plan.replica)
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
            full[g.rows_of(t.name)] = host[t.name]
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
            out[t.name] = w[g.rows_of(t.name)]
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
      blocks: one block per device of this process, in the mesh's order (every device, in a
        single process; its own devices' blocks in each process of a multi-host run; on a 2-D
        mesh, replica group after replica group). The blocks share keys, capacity, batch size
        and weightedness.
      sharding: the plan.

    Returns:
      A :class:`~jaxembed.KeyedJagged` whose ``values``, ``lengths`` and ``weights`` are the
      blocks side by side, split over the plan's ``batch_axes``; sample
      ``b`` of block ``k`` is sample ``k * B_local + b`` of the pooled outputs.

    Raises:
      ValueError: blocks that differ in keys or shape, or not one per local device.
    """
    return put_blocks(blocks, _check_plan(sharding), KeyedJagged)


def put_blocks(blocks: Sequence[Any], plan: ShardingPlan, kind: type) -> Any:
    """:func:`put_features` for blocks of ``kind`` (a KeyedJagged or a layout like it, with
    ``keys``, ``capacity``, ``batch_size`` and ``weights``): every leaf of the blocks side by
    side, split over the plan's ``batch_axes``."""
    blocks = list(blocks)
    local = [d for d in plan.mesh.devices.reshape(-1) if d.process_index == jax.process_index()]
    if len(blocks) != len(local):
        raise ValueError(
            f"blocks must hold one {kind.__name__} per device of this process ({len(local)}), "
            f"got {len(blocks)}"
        )
    for b in blocks:
        if not isinstance(b, kind):
            raise TypeError(f"blocks must be {kind.__name__}, got {type(b).__name__}")
    first = blocks[0]
    for b in blocks:
        same = (b.keys, b.capacity, b.batch_size, b.weights is None)
        if same != (first.keys, first.capacity, first.batch_size, first.weights is None):
            raise ValueError(
                "the blocks must share keys, capacity, batch size and weightedness; got "
                f"{b!r} and {first!r}"
            )
    sharding_ = NamedSharding(plan.mesh, P(plan.batch_axes))
    k = plan.num_blocks

    def put(*leaves):
        local_data = np.concatenate([np.asarray(x) for x in leaves])
        shape = (local_data.shape[0] * k // len(blocks),)
        return jax.make_array_from_process_local_data(sharding_, local_data, shape)

    return jax.tree.map(put, *blocks)


def _check_features(features: Any, plan: ShardingPlan) -> KeyedJagged:
    """The sharded features against the tables; concrete blocks are range-checked."""
    stack_plan = _coll._plan(plan.tables, stack=False)
    if not isinstance(features, KeyedJagged):
        raise TypeError(f"features must be a jaxembed.KeyedJagged, got {type(features).__name__}")
    k = plan.num_blocks
    check_blocks(features, k, "jaxembed.sharding.put_features")
    leaves = jax.tree.leaves(features)
    traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
    addressable = not traced and all(getattr(x, "is_fully_addressable", True) for x in leaves)
    # the keys and the weights; the ids block by block where this process can read them all
    _coll._check_features(features, stack_plan, pooled=plan.pooled, ids=False)
    if addressable:
        for block in range(k):
            _coll._check_features(_block(features, block, k), stack_plan, pooled=plan.pooled)
    return features


def check_blocks(features: Any, k: int, put: str) -> None:
    """Keyed jagged ``features`` (ids or raw ids) that split into ``k`` equal device blocks, as
    ``put`` lays them out: ``ValueError`` otherwise."""
    if features.capacity % k or features.lengths.shape[0] % (k * len(features.keys)):
        raise ValueError(
            f"features must hold {k} equal device blocks ({put}); "
            f"got capacity {features.capacity} and {features.lengths.shape[0]} lengths"
        )


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


def _gather(x, axis):
    return None if x is None else jax.lax.all_gather(x, axis, tiled=True)


def _gathered_bounds(bounds, over, capacity: int):
    """Every device's bags' ``(starts, ends)`` along ``over``, as bounds into its entries
    gathered device after device (``capacity`` each)."""
    n = jax.lax.axis_size(over)
    shift = (jnp.arange(n, dtype=jnp.int32) * capacity)[:, None]
    return tuple((_gather(b, over).reshape(n, -1) + shift).reshape(-1) for b in bounds)


def _gathered(s: _coll._StackIds, axis: str, capacity: int):
    """Every device's ids of the group, device after device, with their bags' bounds."""
    bounds = _gathered_bounds((s.starts, s.ends), axis, capacity)
    return _gather(s.ids, axis), _gather(s.keep, axis), _gather(s.weights, axis), bounds


def _owners(g: Group, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(owner, row in the owner's block)`` of each of the group's stacked rows ``ids``."""
    if g.kind is Kind.ROW_WISE:  # mod (hot low ids spread over the devices) or block ownership
        return g.owner_of(ids)
    firsts = np.asarray(g.stack.offsets, np.int32)
    where = [g.where(t.name) for t in g.stack.tables]
    device = np.asarray([d for d, _ in where], np.int32)
    base = np.asarray([off for _, off in where], np.int32) - firsts
    t = jnp.searchsorted(jnp.asarray(firsts), ids, side="right", method="compare_all") - 1
    t = jnp.clip(t, 0, len(firsts) - 1)
    return jnp.asarray(device)[t], ids + jnp.asarray(base)[t]


def _to_route(g: Group, s: _coll._StackIds):
    """``(owner, local, send)`` of the device's entries of a routed group: an id outside its
    table is not sent (it stays here, a NaN bag or row); nor is a bag's padding entry (an
    unpooled lookup returns the padding row, so sends it)."""
    owner, local = _owners(g, s.ids)
    in_table = s.ids < g.stack.num_embeddings
    return owner, local, (s.keep & in_table) if g.pooled else in_table


def _routed(g: Group, weight, s: _coll._StackIds, plan: ShardingPlan, capacity: int, *,
            sparse: bool):  # fmt: skip
    """A row- or table-wise group on one device (:mod:`jaxembed.sharding._route`): its
    distinct rows go to their owners, each owner renorms and reads the rows it was sent, the
    rows come back, and the device pools its own bags from them as one device does.

    Returns ``(bags, new block, pieces, stats)``."""
    options, k = g.stack.options, plan.num_devices
    size = k * capacity
    owner, local, valid = _to_route(g, s)
    r = _route.route(owner, local, valid, axis=plan.axis, devices=k, rows=g.rows,
                     capacity=capacity, counts=options.scale_grad_by_freq,
                     refuse=plan.overflow == "error", everywhere=plan.batch_axes)  # fmt: skip
    # the owner: its rows, renormed (``max_norm``) where any device (of any replica) reads them
    if sparse:
        weight = jax.lax.stop_gradient(weight)
    lookup = Lookup.start(weight, r.keys, options, _layout_of(g, plan), g.rows)
    scale = None
    if options.scale_grad_by_freq:  # 1 / the row's count in the whole batch
        total = _route.totals(lookup.local, r.counts, replica=plan.replica)
        wide = jnp.promote_types(weight.dtype, jnp.float32)
        scale = (1.0 / jnp.maximum(total, 1).astype(wide)).astype(weight.dtype)
    rows = _index_policy.gather_rows(lookup.table, lookup.local, options.lookup_style, fill=0.0)
    if not sparse:
        rows = _gradient.with_table_gradient(rows, lookup.weight, lookup.local, scale)
    # the source: its rows back, slot by slot, and its own bags
    got = _route.back(rows, plan.axis)
    at = jnp.where(r.served, r.slot, size)  # past the end: an out-of-range id's NaN
    keep = s.keep & (r.served | ~valid)  # an id that overflowed leaves its bag
    style, mode = options.lookup_style, g.stack.pooling
    pieces = None
    if not g.pooled:  # each entry's row: an id outside its table NaN, an overflowed one zeros
        out = jnp.take(got, at, axis=0, mode="fill", fill_value=0)
        out = jnp.where((s.ids >= g.stack.num_embeddings)[:, None], jnp.nan, out)
        if sparse:
            pieces = dict(indices=lookup.local, slot=at, keep=s.keep, scale=scale,
                          refused=r.refused[None], order=r.order, filled=r.filled)  # fmt: skip
        else:  # a padding entry's row gets no gradient, as torch's
            out = jnp.where(s.keep[:, None], out, jax.lax.stop_gradient(out))
        out = jnp.where(r.refused, jnp.nan, out)  # the error policy: never a partial lookup
        return out, lookup.new_weight, pieces, jnp.stack([r.needed, r.dropped])[None]
    if sparse:
        bags, pos = _bag.bags_of_table(got, at, keep, s.weights, (s.starts, s.ends), mode, None,
                                       style)  # fmt: skip
        pieces = dict(
            indices=lookup.local,
            slot=at,
            keep=keep,
            bounds=(s.starts, s.ends),
            scale=scale,
            weights=None if s.weights is None else jax.lax.stop_gradient(s.weights),
            pos=pos,
            refused=r.refused[None],
            order=r.order,
            filled=r.filled,
        )
    else:
        bags = _bag._bags(got, jax.lax.stop_gradient(got), at, None, keep, s.weights,
                          (s.starts, s.ends), mode, None, style)  # fmt: skip
    bags = jnp.where(r.refused, jnp.nan, bags)  # the error policy: never a partial bag
    stats = jnp.stack([r.needed, r.dropped])[None]
    return bags, lookup.new_weight, pieces, stats


class BlockGrad(SparseGrad):
    """A group's :class:`~jaxembed.sparse.SparseGrad` on a mesh (what
    :meth:`ShardedLookup.grad` returns): device ``k``'s entries, rows of its own block, in block
    ``k`` of ``indices`` and ``values`` (split over the plan's axis).

    Attributes:
      indices: ``(K * n,)`` int32, each device's ``n`` rows of its block (its block's rows for
        an entry dropped).
      values: ``(K * n, D)`` (a column-wise group: each device's ``D / K`` columns).
      refused: ``(K,)`` bool, alike on every device, for a routed group: the step overflowed
        under the ``error`` policy, so the group's optimizer drops every entry and leaves its
        step count as it was; None for other groups.
      blocks: ``K``.

    Several lookups' gradients sum block by block (:func:`jaxembed.sparse.sum_grads`, as
    :func:`jaxembed.sparse.value_and_grad` sums a loss's lookups):

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> a = jaxembed.sharding.BlockGrad(jnp.array([0, 5]), jnp.ones((2, 1)), blocks=2)
      >>> b = jaxembed.sharding.BlockGrad(jnp.array([1, 6]), jnp.ones((2, 1)), blocks=2)
      >>> jaxembed.sparse.sum_grads(a, b).indices  # device 0: rows 0, 1; device 1: rows 5, 6
      Array([0, 1, 5, 6], dtype=int32)
    """

    def __new__(cls, indices, values, refused=None, blocks=1):
        self = super().__new__(cls, indices, values)
        self.refused, self.blocks = refused, blocks
        return self

    @staticmethod
    def sum_blocks(grads: Sequence[BlockGrad]) -> BlockGrad:
        """Several lookups' gradients of one group (:func:`jaxembed.sparse.sum_grads`): each
        device's entries of every lookup, side by side in its block; refused where any is."""
        k = grads[0].blocks
        for g in grads:
            _check_block_grad(g, k)
        indices = jnp.concatenate([g.indices.reshape(k, -1) for g in grads], axis=1)
        values = jnp.concatenate([g.values.reshape(k, -1, g.values.shape[-1]) for g in grads],
                                 axis=1)  # fmt: skip
        flags = [g.refused for g in grads if g.refused is not None]
        refused = functools.reduce(jnp.logical_or, flags) if flags else None
        return BlockGrad(indices.reshape(-1), values.reshape(-1, values.shape[-1]), refused, k)


def _check_block_grad(grad: Any, blocks: int, group: str = "") -> None:
    """Refuses a gradient that is not a sharded group's own (a :class:`BlockGrad` of ``blocks``
    device blocks): one of the whole array (a read outside a lookup) cannot be split into the
    devices' blocks here, and applying it as it is would update the wrong rows."""
    if isinstance(grad, BlockGrad) and grad.blocks == blocks:
        return
    where = f" (group {group!r})" if group else ""
    raise NotImplementedError(
        f"a sharded collection's table{where} takes the gradients of its own lookups only; "
        f"got a {type(grad).__name__} of its whole array (was the table read outside a "
        "lookup, e.g. a penalty on its weight?). Applying that block by block is not built: "
        "read the table through its lookups, or train it on one device"
    )


jax.tree_util.register_pytree_node(
    BlockGrad,
    lambda g: ((g.indices, g.values, g.refused), g.blocks),
    lambda blocks, children: BlockGrad(*children, blocks=blocks),
)


def _routed_grad(g: Group, cot: jax.Array, p: dict, plan: ShardingPlan) -> SparseGrad:
    """The owner's :class:`~jaxembed.sparse.SparseGrad` from the cotangent of the bags this
    device pooled: each entry's share summed into its slot, sent back to the owner; on a 2-D
    mesh, every replica group's slots for the owner's block (one ``all_gather`` over
    ``replica``), so that each copy of the block gets the same update."""
    if g.pooled:
        parts = _bag.spread_parts(cot, p["keep"], p["bounds"], None, p["weights"], p["pos"],
                                  g.stack.pooling, None)  # fmt: skip
        weighted = p["weights"] is not None
    else:  # each entry its own bag of one
        n = cot.shape[0]
        parts = _bag.spread_parts(cot, p["keep"], jnp.arange(n, dtype=jnp.int32), None, None,
                                  None, "sum", None)  # fmt: skip
        weighted = False
    slots = _route.into_slots(parts, p["slot"], p["order"], p["filled"], weighted=weighted)
    values = _route.back(slots.astype(g.dtype), plan.axis)
    if p["scale"] is not None:
        values = (values * p["scale"][:, None]).astype(g.dtype)
    indices = p["indices"]
    if plan.replica is not None:
        indices, values = _gather(indices, plan.replica), _gather(values, plan.replica)
    return BlockGrad(indices, values, p["refused"], plan.num_devices)


def _forward(g: Group, weight, features, feat, plan: ShardingPlan, *, sparse: bool):
    """One group's pooled features on this device, its renormed block, what its update needs
    (``sparse``) and its routing stats (``(1, 2)``: needed, dropped; zeros where not routed)."""
    keys, axis = features.keys, plan.axis
    s = _coll._stack_ids(g.stack, keys, features, feat)
    if g.routed:
        capacity = plan.capacity_of(g, features.capacity)
        bags, new_weight, pieces, stats = _routed(g, weight, s, plan, capacity, sparse=sparse)
        return _split(g, bags, keys, features, s, pieces), new_weight, pieces, stats
    stats = jnp.zeros((1, 2), jnp.int32)
    ids, keep, psw, bounds = s.ids, s.keep, s.weights, (s.starts, s.ends)
    if g.kind is Kind.COLUMN_WISE:
        ids, keep, psw, bounds = _gathered(s, axis, features.capacity)
    layout = _layout_of(g, plan)
    if sparse:
        weight = jax.lax.stop_gradient(weight)
    lookup = Lookup.start(weight, ids, g.stack.options, layout, g.stack.num_embeddings)
    rows = weight.shape[0]
    # a replica (or, on a 2-D mesh, a column block's copy) as this device's copy: the bag
    # loops' carries vary as the ids do, and the gradient of the copy is summed over the
    # devices that hold it (the transpose of the cast)
    copies = plan.batch_axes if g.kind is Kind.DATA_PARALLEL else plan.replica
    if copies is not None:
        lookup = dataclasses.replace(
            lookup,
            weight=jax.lax.pcast(lookup.weight, copies, to="varying"),
            table=jax.lax.pcast(lookup.table, copies, to="varying"),
        )
    style, mode = g.stack.options.lookup_style, g.stack.pooling
    pieces = None
    if not g.pooled:  # each entry's row, as the unsharded collection's
        bags = lookup.rows(gradient=False)
        if sparse:
            pieces = dict(
                indices=jnp.where(keep & (lookup.local < rows), lookup.local, rows),
                keep=keep,
                bounds=bounds,
                scale=lookup.scale(padding=False),
            )
        else:
            scale, factor = lookup.scale(), keep.astype(bags.dtype)
            factor = factor if scale is None else scale * factor
            bags = _gradient.with_table_gradient(bags, lookup.weight, lookup.local, factor)
    elif sparse:
        bags, pos = _bag.bags_of_table(lookup.table, lookup.local, keep, psw, bounds, mode, None,
                                       style)  # fmt: skip
        pieces = dict(
            indices=jnp.where(keep & (lookup.local < rows), lookup.local, rows),
            keep=keep,
            bounds=bounds,
            scale=lookup.scale(padding=False),
            weights=None if psw is None else jax.lax.stop_gradient(psw),
            pos=pos,
        )
    else:
        bags = _bag._bags(
            lookup.weight, lookup.table, lookup.local, lookup.scale(), keep, psw, bounds, mode,
            None, style,
        )  # fmt: skip
    if g.kind is Kind.COLUMN_WISE:  # each device's column slice of every bag (row), back
        bags = jax.lax.all_to_all(bags, axis, 0, 1, tiled=True)
    return _split(g, bags, keys, features, s, pieces), lookup.new_weight, pieces, stats


def _split(g: Group, out: jax.Array, keys, features: KeyedJagged, s: _coll._StackIds,
           pieces: dict | None) -> dict[str, Any]:  # fmt: skip
    """``{feature: (B_local, D)}`` from the group's bags on this device; unpooled, ``{feature:
    Jagged}`` from its ``(C, D)`` rows (and where each feature's rows are, into ``pieces``)."""
    js = g.stack.positions_in(keys)
    if not g.pooled:
        starts, lengths = _coll._feature_starts(s), features.lengths.reshape(len(keys), -1)
        if pieces is not None:
            pieces.update(starts=starts, lengths=lengths)
        return _coll._jagged_features(out, starts, lengths, keys, js)
    per = out.reshape(len(js), features.batch_size, out.shape[-1])
    return {keys[j]: per[i] for i, j in enumerate(js)}


# -- the forward ----------------------------------------------------------------------------------


def _in_specs(plan: ShardingPlan, features: KeyedJagged):
    specs = tuple(spec_of(g, plan.axis) for g in plan.groups)
    return specs, jax.tree.map(lambda _: P(plan.batch_axes), features)


@functools.partial(jax.jit, static_argnames=("plan", "sparse"))
def _collection(weights, features, *, plan: ShardingPlan, sparse: bool = False):
    batch = plan.batch_axes
    specs, feature_specs = _in_specs(plan, features)

    def body(weights, features):
        feat = _coll._feature_of(features)
        pooled, new, pieces, stats = {}, [], [], {}
        for g, w in zip(plan.groups, weights, strict=True):
            out, new_w, piece, stat = _forward(g, w, features, feat, plan, sparse=sparse)
            pooled.update(out)
            new.append(new_w)
            pieces.append(piece)
            if g.routed:
                stats[g.name] = stat
        return pooled, tuple(new), tuple(pieces), stats

    out_specs = (P(batch), specs, P(batch), P(batch))
    return _run(body, plan.mesh, (specs, feature_specs), out_specs, weights, features,
                check_vma=True)  # fmt: skip


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
      As :func:`jaxembed.embedding_bag_collection`, per device block; and
      :class:`CapacityError`, called eagerly, where a routed group overflowed its capacity under
      the ``error`` policy (:meth:`ShardingPlan.with_capacity`; under ``jit`` that group's
      bags are NaN instead, and its tables get no gradient).
    """
    pooled, out, _ = forward_and_stats(params, features, _kind(sharding, True))
    return pooled, out


def embedding_collection(
    params: Mapping[str, Any], features: KeyedJagged, sharding: ShardingPlan
) -> tuple[dict[str, _coll.Jagged], Params]:
    """:func:`jaxembed.embedding_collection` on a mesh: every feature's rows, unpooled, the
    tables (:class:`~jaxembed.EmbeddingConfig`) placed by ``sharding``.

    Args:
      params: the sharded params (:func:`init`, :func:`shard_params`).
      features: the batch, one block per device (:func:`put_features`).
      sharding: a :class:`ShardingPlan` of :class:`~jaxembed.EmbeddingConfig` tables.

    Returns:
      ``(rows, new_params)``: ``rows[feature]`` is a :class:`~jaxembed.collections.Jagged`
      laid out as ``features``: its ``values`` ``(K * C, D)`` hold device ``k``'s block of
      ``C`` rows (sample after sample, then zeros) at ``[k * C, (k + 1) * C)``, its
      ``lengths`` ``(B,)`` are split as the samples. Padding entries give their row (no
      gradient), an id outside its table a NaN row under ``jit``, as on one device; under a
      routed group's ``drop`` policy an overflowed id's row is zeros (no gradient).
      Differentiable w.r.t. ``params``, as :func:`embedding_bag_collection`.

    Raises:
      TypeError: a plan of bag configs (use :func:`embedding_bag_collection`); the rest as
        :func:`embedding_bag_collection`.

    Example:
      >>> import jax, jaxembed
      >>> from jaxembed import sharding as S
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> tables = [jaxembed.EmbeddingConfig("t", 4, 10, ["f"])]
      >>> plan = S.by_hand(tables, mesh, {"t": S.row_wise()})
      >>> params = S.init(jax.random.key(0), plan)
      >>> kj = S.put_features([jaxembed.KeyedJagged.from_lists({"f": [[1, 2], [3]]})], plan)
      >>> rows, _ = S.embedding_collection(params, kj, plan)
      >>> rows["f"].values.shape, rows["f"].lengths.tolist()
      ((16, 4), [2, 1])
    """
    rows, out, _ = forward_and_stats(params, features, _kind(sharding, False))
    return rows, out


def _kind(sharding: Any, pooled: bool) -> ShardingPlan:
    """The plan, checked to be of bag configs (``pooled``) or of plain ones."""
    plan = _check_plan(sharding)
    if plan.pooled != pooled:
        has, fn = ("EmbeddingConfig", "embedding_collection") if pooled else (
            "EmbeddingBagConfig", "embedding_bag_collection")  # fmt: skip
        raise TypeError(f"the plan's tables are {has}s: use jaxembed.sharding.{fn}")
    return plan


def forward_and_stats(params, features, sharding):
    """:func:`embedding_bag_collection` (or :func:`embedding_collection`, by the plan's
    tables), and its routing stats (``{group: (K, 2)}``, as :attr:`ShardedLookup.stats`):
    ``(outputs, new_params, stats)``."""
    plan = _check_plan(sharding)
    weights = _check_params(params, plan)
    features = _check_features(features, plan)
    pooled, new, _, stats = _collection(weights, features, plan=plan)
    check_stats(stats, plan, features)
    if all(g.stack.options.max_norm is None for g in plan.groups):
        return pooled, params, stats
    out = dict(params)
    for g, w in zip(plan.groups, new, strict=True):
        if g.stack.options.max_norm is not None:
            out[g.name] = {**params[g.name], "weight": jax.lax.stop_gradient(w)}
    return pooled, out, stats


def no_stats(sharding: ShardingPlan) -> dict[str, jax.Array]:
    """``{group: (K, 2) zeros}`` for every routed group, laid out as a step's stats."""
    plan = _check_plan(sharding)
    k = plan.num_blocks
    return {
        g.name: _put(np.zeros((k, 2), np.int32), plan.mesh, P(plan.batch_axes, None))
        for g in plan.groups
        if g.routed
    }


# -- sparse training ------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class ShardedLookup:
    """What :func:`lookup` keeps for the update: each group's (renormed) block and, per device,
    how each bag's gradient spreads over the entries it pooled.

    Attributes:
      params: ``{group: {"weight": table}}``, the tables to update.
      stats: ``{group: (K, 2) int32}`` for each row- and table-wise group, per device (``R * K``
        rows on a 2-D mesh: ``plan.num_blocks``): the most
        distinct rows it sent one owner (the capacity it needed), and its ids that overflowed
        the capacity (:func:`check_stats` reads them).
    """

    def __init__(self, plan: ShardingPlan, keys: tuple[str, ...], weights, pieces, stats):
        self.plan, self.keys, self.weights, self.pieces = plan, keys, weights, pieces
        self.stats = stats

    def tree_flatten(self):
        return (self.weights, self.pieces, self.stats), (self.plan, self.keys)

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
        # unpooled: a Jagged's gradient, or its values'
        cots = {f: jnp.asarray(getattr(pooled_grads[f], "values", pooled_grads[f]))
                for f in self.keys}  # fmt: skip
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


def _cotangent(g: Group, cots: Mapping[str, jax.Array], keys, axis, p: dict) -> jax.Array:
    """The cotangent of the bags this device pooled for the group (the transpose of the
    column-wise ``all_to_all``); unpooled, of its ``(C, D)`` rows (the transpose of their split
    into features)."""
    js = g.stack.positions_in(keys)
    if g.pooled:
        cot = jnp.concatenate([cots[keys[j]] for j in js])
    else:
        first = cots[keys[js[0]]]

        def split(rows):
            out = _coll._jagged_features(rows, p["starts"], p["lengths"], keys, js)
            return [out[keys[j]].values for j in js]

        rows = jnp.zeros(first.shape, first.dtype)
        cot = jax.vjp(split, rows)[1]([cots[keys[j]] for j in js])[0]
    if g.kind is Kind.COLUMN_WISE:
        return jax.lax.all_to_all(cot, axis, 1, 0, tiled=True)
    return cot


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


def dense_replica(g: Group, ids: int, k: int) -> bool:
    """Whether a replica's sparse gradient is summed densely (one ``psum`` of ``(V, D)``) rather
    than every device's ``ids`` entries gathered onto every device (``(K * ids, D)``): the
    smaller, so dense when ``V <= K * ids``."""
    return g.rows <= k * ids


def _replica_grad(g: Group, indices, values, axis: str) -> SparseGrad:
    """A small replica's gradient, the same on every device: each device sums its entries per
    row, and one ``psum`` adds the devices' sums (with how many entries each row had, so that
    a row is updated exactly where some device looked it up)."""
    v = g.rows
    dense = jnp.zeros((v, values.shape[1]), values.dtype).at[indices].add(values, mode="drop")
    seen = jnp.zeros((v,), jnp.int32).at[indices].add(1, mode="drop")
    dense, seen = jax.lax.psum((dense, seen), axis)
    rows = jnp.arange(v, dtype=jnp.int32)
    return SparseGrad(jnp.where(seen > 0, rows, v), dense.astype(g.dtype))


@functools.partial(jax.jit, static_argnames=("plan", "keys", "names"))
def _grads(cots, pieces, *, plan: ShardingPlan, keys, names=None):
    """``{group: SparseGrad}`` of the groups ``names`` (default every one), whose ``pieces``
    (in that order) :func:`lookup` kept."""
    axis, batch, blocks = plan.axis, plan.batch_axes, plan.num_blocks
    groups = [g for g in plan.groups if names is None or g.name in names]

    def body(cots, pieces):
        out = {}
        for g, p in zip(groups, pieces, strict=True):
            cot = _cotangent(g, cots, keys, axis, p)
            if g.routed:
                out[g.name] = _routed_grad(g, cot, p, plan)
                continue
            if g.pooled:
                values = _bag.spread(
                    cot, p["keep"], p["bounds"], p["scale"], p["weights"], p["pos"],
                    g.stack.pooling, None,
                )  # fmt: skip
            else:  # each entry's row gradient, scaled (padding's dropped by its index)
                values = cot.astype(_renorm.compute_dtype(cot.dtype))
                if p["scale"] is not None:
                    values = values * p["scale"][:, None].astype(values.dtype)
            indices, bounds = p["indices"], p["bounds"]
            if g.kind is Kind.DATA_PARALLEL and dense_replica(g, indices.shape[0], blocks):
                dense = _replica_grad(g, indices, values, batch)
                out[g.name] = BlockGrad(*dense, blocks=plan.num_devices)
                continue
            values = values.astype(g.dtype)
            # a replica applies every device's entries; a copy of a column block (a 2-D mesh),
            # every replica group's (its own group's, the column-wise lookup gathered)
            over = batch if g.kind is Kind.DATA_PARALLEL else plan.replica
            if over is not None:
                indices, values, bounds = _gather_entries(indices, values, bounds, over)
            f = len(g.stack.positions_in(keys))
            indices, values = _feature_major(indices, values, bounds, blocks, f, g.rows)
            out[g.name] = BlockGrad(indices, values, blocks=plan.num_devices)
        return out

    return _run(body, plan.mesh, (P(batch), P(batch)), P(axis), cots, pieces)


def _gather_entries(indices, values, bounds, over):
    """Every device's entries along ``over``, device after device, with their bags' bounds."""
    bounds = _gathered_bounds(bounds, over, indices.shape[0])
    return _gather(indices, over), _gather(values, over), bounds


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
    device's entries, alike on every device. A row- or table-wise group's entries reach their
    owner as one sum per (device, row): the order of a row's sums differs from one device's.

    Returns:
      ``(pooled, lookup)``: as :func:`embedding_bag_collection`'s pooled features, and a
      :class:`ShardedLookup`.

    Raises:
      As :func:`embedding_bag_collection` (a :class:`CapacityError` when called eagerly).
    """
    plan = _check_plan(sharding)
    weights = _check_params(params, plan)
    features = _check_features(features, plan)
    pooled, new, pieces, stats = _collection(weights, features, plan=plan, sparse=True)
    check_stats(stats, plan, features)
    tables = tuple(w if n is None else n for w, n in zip(weights, new, strict=True))
    return pooled, ShardedLookup(plan, features.keys, tables, pieces, stats)


@functools.partial(jax.jit, static_argnames=("plan",))
def _needed(features, *, plan: ShardingPlan):
    """``{group: (K,)}``: the capacity each device needs for each routed group."""

    def body(features):
        feat = _coll._feature_of(features)
        out = {}
        for g in plan.groups:
            if g.routed:
                s = _coll._stack_ids(g.stack, features.keys, features, feat)
                owner, local, send = _to_route(g, s)
                k = plan.num_devices
                out[g.name] = _route.needed(owner, local, send, devices=k, rows=g.rows)[None]
        return out

    return _run(body, plan.mesh, (P(plan.batch_axes),), P(plan.batch_axes), features)


def capacity_for(
    sharding: ShardingPlan, batches: Sequence[KeyedJagged], *, slack: float = 1.25
) -> dict[str, int]:
    """A stats pass: each row- and table-wise group's capacity for batches like these.

    It routes each batch's ids (nothing else moves) and takes, per group, the most distinct
    rows any device had for any one owner, times ``slack``, rounded up. Pass the result to
    :meth:`ShardingPlan.with_capacity`.

    Args:
      sharding: the plan.
      batches: sample batches, as :func:`put_features` places them.
      slack: the margin over the most seen (>= 1).

    Returns:
      ``{group name: capacity}``.

    Raises:
      ValueError: no batches, or ``slack`` below 1.
    """
    plan = _check_plan(sharding)
    if not (isinstance(slack, (int, float)) and slack >= 1):
        raise ValueError(f"slack must be a number >= 1, got {slack!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch")
    most: dict[str, int] = {}
    for features in batches:
        features = _check_features(features, plan)
        for name, n in _needed(features, plan=plan).items():
            most[name] = max(most.get(name, 0), int(_host(n).max()))
    return {name: max(1, math.ceil(n * slack)) for name, n in most.items()}


class CapacityError(ValueError):
    """A routed group had more distinct rows for one owner than its capacity, under the
    ``error`` policy: the step served none of the group's ids, so it changes nothing."""


def check_stats(stats: Mapping[str, Any], sharding: ShardingPlan, features: Any = None) -> None:
    """Raises :class:`CapacityError` (``error`` policy) or warns (``drop``) where a group's ids
    overflowed its capacity, from a step's routing stats (the ``stats`` of a
    :class:`ShardedLookup`; a traced call's, once they come out of ``jit``). A no-op on traced
    stats.

    Args:
      stats: ``{group: (K, 2)}`` per device: the capacity needed, the ids that overflowed.
      sharding: the plan.
      features: the batch, for the capacity its blocks were given (optional).
    """
    plan = _check_plan(sharding)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(stats)):
        return
    k = plan.num_blocks
    ids = None if features is None else features.capacity // k
    for name, stat in stats.items():
        stat = _host(stat).reshape(-1, 2)
        needed, dropped = int(stat[:, 0].max()), int(stat[:, 1].sum())
        if not dropped:
            continue
        g = next(g for g in plan.groups if g.name == name)
        capacity = dict(plan.capacity).get(name) if ids is None else plan.capacity_of(g, ids)
        what = (
            f"group {name!r}: {dropped} ids overflowed its capacity of {capacity} distinct rows "
            f"per (device, owner) pair; this batch needs {needed}. Raise it with "
            "ShardingPlan.with_capacity (jaxembed.sharding.capacity_for measures batches)"
        )
        if plan.overflow == "error":
            raise CapacityError(what + "; nothing was updated")
        warnings.warn(what + "; those ids got no value and no gradient", stacklevel=3)


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
    if g.kind is Kind.ROW_WISE and not g.block:  # local row l of device k: stacked l * K + k
        return lambda rows: scale(rows * g.devices + jax.lax.axis_index(axis))
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
            if w.shape != g.global_shape:  # a row of its own (a reset row's fresh state)
                return tx.init(w)
            return _run(tx.init, plan.mesh, (spec_of(g, axis),), specs, w)

        def update(grad, state, table, g=g, specs=specs):
            _check_block_grad(grad, plan.num_devices, g.name)
            return _update(g, tx, grad, state, table, axis, plan.mesh, specs)

        out[g.name] = RowOptimizer(init, update, tx.applies_dense)
    return out


def _update(g: Group, tx, grad, state, table, axis, mesh, state_specs):
    scale = _row_scale(g, axis)

    refused = getattr(grad, "refused", None)

    def body(indices, values, refused, state, table):
        kwargs = {}
        if g.kind is Kind.COLUMN_WISE:
            kwargs["column_axis"] = axis
        if scale is not None:
            kwargs["lr_scale"] = scale
        if refused is not None:  # a refused step drops every entry (some may be another
            # lookup's, in the same step: the step changes nothing)
            indices = jnp.where(refused[0], table.shape[0], indices)
        new_table, new_state = tx.update(SparseGrad(indices, values), state, table, **kwargs)
        if refused is not None:  # the step count stays too
            new_state = jax.tree.map(
                lambda new, old: jnp.where(refused[0], old, new) if new.ndim == 0 else new,
                new_state,
                state,
            )
        return new_table, new_state

    spec = spec_of(g, axis)
    return _run(body, mesh, (P(axis), P(axis), P(axis), state_specs, spec), (spec, state_specs),
                grad.indices, grad.values, refused, state, table)  # fmt: skip


# -- what a step moves ----------------------------------------------------------------------------


def _acc_bytes(dtype) -> int:
    return np.dtype(_renorm.compute_dtype(dtype)).itemsize


def step_bytes(sharding: ShardingPlan, features: KeyedJagged) -> dict[str, dict[str, int]]:
    """The bytes each device's collectives exchange in one step, by collective, as the plan's
    groups move them: ``{"lookup": {...}, "grad": {...}}`` for :func:`lookup` and
    :meth:`ShardedLookup.grad` (:func:`~jaxembed.sharding.collective_bytes` reads the same
    quantity off a compiled program: each collective's larger buffer).

    For a group of ``F`` features and ``D`` columns of ``s`` bytes, over ``K`` devices each
    holding ``C`` ids and ``B`` samples, a row- or table-wise group of capacity ``c`` per
    (device, owner) pair (:meth:`ShardingPlan.capacity_of`):

    ==============  =========================================  ==========================
    kind            lookup                                     grad
    ==============  =========================================  ==========================
    data_parallel   ``4KC`` (all-reduce) with ``max_norm`` or  ``V (4 + D a)`` (all-reduce)
                    ``scale_grad_by_freq``, else nothing       where ``V <= KC``, else
                                                               ``KC (4 + D s) + 8KFB``
                                                               (all-gather)
    row_wise,       ``Kc (4 + D s)``, and ``4Kc`` more with    ``Kc D s`` (all-to-all)
    table_wise      ``scale_grad_by_freq`` (all-to-all);
                    ``4`` (all-reduce) under ``error``
    column_wise     ``KC (5 + w) + 8KFB`` (all-gather),        ``FB D s`` (all-to-all)
                    ``FB D s`` (all-to-all) and, with
                    ``max_norm``, ``4KC`` (all-reduce)
    ==============  =========================================  ==========================

    On one device XLA leaves out the all-to-alls. ``w`` is the weights' bytes per id (0
    unweighted, and for unpooled tables); an unpooled column-wise group's all-to-alls move
    its ``C`` rows, ``C D s``, in place of ``FB`` bags; ``a`` the accumulator's (4: float32
    for 16-bit tables). A routed group's bytes do not depend on
    ``C``: with ``c`` about ``C / K`` they are flat in ``K``.

    On a 2-D mesh of ``R`` replicas (the plan's ``replica``) a replica's ``K`` above is
    ``RK`` (it spans every device), and a block's copies are kept alike across the replicas:

    ==============  =========================================  ==========================
    kind            lookup, also                               grad, also
    ==============  =========================================  ==========================
    row_wise,       ``4RKc`` (all-reduce) with ``max_norm``;   ``RKc (4 + D s)``
    table_wise      ``8RKc`` (all-gather) with                 (all-gather)
                    ``scale_grad_by_freq``
    column_wise     ``4RKC`` (all-reduce) with ``max_norm``    ``RKC (4 + D s / K) +
                    or ``scale_grad_by_freq``, and the norms'  8RKFB`` (all-gather)
                    all-reduce is ``4RKC``
    ==============  =========================================  ==========================
    """
    plan = _check_plan(sharding)
    k, r = plan.num_devices, plan.num_replicas
    c, b = features.capacity // (r * k), features.batch_size // (r * k)
    weights = 0 if features.weights is None else np.dtype(features.weights.dtype).itemsize
    look: dict[str, int] = {}
    grad: dict[str, int] = {}

    def add(d, op, n):
        if n:
            d[op] = d.get(op, 0) + int(n)

    for g in plan.groups:
        s = np.dtype(g.dtype).itemsize
        d = g.cols * (k if g.kind is Kind.COLUMN_WISE else 1)
        f = len(g.stack.positions_in(features.keys))
        options = g.stack.options
        w = weights if g.pooled else 0  # unpooled rows read no weights
        out = f * b if g.pooled else c  # what a column-wise device returns: bags, or rows
        renorm, counted = options.max_norm is not None, options.scale_grad_by_freq
        if g.kind is Kind.DATA_PARALLEL:
            if renorm or counted:
                add(look, "all-reduce", 4 * r * k * c)
            if dense_replica(g, c, r * k):
                add(grad, "all-reduce", g.rows * (d * _acc_bytes(g.dtype) + 4))
            else:
                add(grad, "all-gather", r * k * c * (4 + d * s) + 8 * r * k * f * b)
        elif g.routed:
            slots = k * plan.capacity_of(g, c)
            add(look, "all-to-all", slots * (4 + d * s + 4 * counted))
            add(look, "all-reduce", 4 * (plan.overflow == "error"))
            add(grad, "all-to-all", slots * d * s)
            if r > 1:  # the copies' renorm sees every replica's rows; counts and the update too
                add(look, "all-reduce", 4 * r * slots * renorm)
                add(look, "all-gather", 8 * r * slots * counted)
                add(grad, "all-gather", r * slots * (4 + d * s))
        else:
            add(look, "all-gather", k * c * (5 + w) + 8 * k * f * b)
            if renorm:  # the referenced rows' norms over the columns (every replica's rows)
                add(look, "all-reduce", 4 * r * k * c)
            if r > 1 and (renorm or counted):  # every replica group's ids
                add(look, "all-reduce", 4 * r * k * c)
            add(look, "all-to-all", out * d * s)
            add(grad, "all-to-all", out * d * s)
            if r > 1:  # each copy of the column block applies every replica group's entries
                add(grad, "all-gather", r * k * c * (4 + g.cols * s) + 8 * r * k * f * b)
    if k == 1:  # XLA drops an all-to-all over one device (its other collectives stay)
        look.pop("all-to-all", None)
        grad.pop("all-to-all", None)
    return {"lookup": look, "grad": grad}
