"""The functional collections: many tables looked up from one :class:`KeyedJagged`, per stack.

Each stack (see :mod:`jaxembed.collections._config`) runs the core's one lookup pipeline once:

1. its features' ids are taken from the jagged values (compacted, in order, when the stack does
   not serve every feature) and moved to their table's row offset; an id outside its own table
   goes to the stack's sentinel (a NaN row under ``jit``, never a neighbouring table's row), and
   a table's ``padding_idx`` entries and the padding past ``sum(lengths)`` are kept out of every
   bag;
2. :meth:`~jaxembed.core._pipeline.Lookup.start` renorms (``max_norm``) and counts
   (``scale_grad_by_freq``) over the whole stack: counts are per row, so per table;
3. the core's bag reduction pools every (feature, sample) bag of the stack at once, each bag
   ending at its own end, and its custom gradient is one scatter into the stacked table.

So a stacked collection gives exactly the bags, gradients and renormed rows of separate tables,
one torch ``nn.EmbeddingBag`` call per table over all the bags of its features.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed.collections._config import Plan, Stack
from jaxembed.collections._jagged import KeyedJagged
from jaxembed.core import _bag, _gradient, _layout, _serialization, _validation
from jaxembed.core._packed import is_packed
from jaxembed.core._pipeline import Lookup
from jaxembed.sparse._lookup import BagLookup, SparseGrad, SparseLookup
from jaxembed.sparse._optimizers import RowOptimizer

Params = dict[str, dict[str, jax.Array]]


# -- params ---------------------------------------------------------------------------------------


def init(key: ArrayLike, tables: Any, *, stack: bool = True) -> Params:
    """A collection's initial params: ``{stack name: {"weight": (rows of its tables, D)}}``.

    Each table is drawn with its own ``init`` and key (``fold_in(key, table's position)``), and
    its ``padding_idx`` row zeroed, so stacked and unstacked collections start from the same
    tables.

    Args:
      key: a PRNG key.
      tables: the :class:`EmbeddingBagConfig` (or :class:`EmbeddingConfig`) of every table.
      stack: stack the tables that can share a physical table (default); False: one per table.

    Returns:
      The params; :func:`tables_of` gives the per-table view.

    Example:
      >>> import jax, jaxembed
      >>> tables = [jaxembed.EmbeddingBagConfig(f"t{i}", 4, 10 * (i + 1), [f"f{i}"])
      ...           for i in range(3)]
      >>> {k: v["weight"].shape for k, v in jaxembed.collections.init(jax.random.key(0),
      ...                                                               tables).items()}
      {'t0+t1+t2': (60, 4)}
    """
    plan = _plan(tables, stack)
    weights = {}
    for i, t in enumerate(plan.tables):
        w = t.init(jax.random.fold_in(key, i), (t.num_embeddings, t.embedding_dim), t.param_dtype)
        w = jnp.asarray(w, t.param_dtype)
        if w.shape != (t.num_embeddings, t.embedding_dim):
            raise ValueError(f"table {t.name!r}: init returned shape {w.shape}")
        if t.padding_idx is not None:
            w = w.at[t.padding_idx].set(0)
        weights[t.name] = w
    return stack_tables(weights, plan)


def _plan(tables: Any, stack: bool = True) -> Plan:
    return Plan.of_either(tables, stack=stack)


def stack_tables(weights: Mapping[str, ArrayLike], tables: Any, *, stack: bool = True) -> Params:
    """The params of a collection from one ``(num_embeddings, D)`` array per table name.

    Raises:
      KeyError: a table missing; ValueError: a table of the wrong shape or dtype.
    """
    plan = _plan(tables, stack)
    unknown = set(weights) - {t.name for t in plan.tables}
    if unknown:
        raise KeyError(f"no table named {sorted(unknown)} in this collection")
    params = {}
    for s in plan.stacks:
        parts = []
        for t in s.tables:
            if t.name not in weights:
                raise KeyError(f"no weight given for table {t.name!r}")
            w = _validation.check_table(f"weights[{t.name!r}]", jnp.asarray(weights[t.name]))
            if w.shape != (t.num_embeddings, t.embedding_dim):
                raise ValueError(
                    f"weights[{t.name!r}] has shape {tuple(w.shape)}, the table is "
                    f"({t.num_embeddings}, {t.embedding_dim})"
                )
            parts.append(w.astype(t.param_dtype))
        params[s.name] = {"weight": parts[0] if len(parts) == 1 else jnp.concatenate(parts)}
    return params


def tables_of(params: Mapping[str, Any], tables: Any, *, stack: bool = True) -> dict:
    """The per-table view ``{table name: (num_embeddings, D)}`` of a collection's params."""
    plan = _plan(tables, stack)
    _check_params(params, plan)
    out = {}
    for s in plan.stacks:
        w = params[s.name]["weight"]
        for t, off in zip(s.tables, s.offsets, strict=True):
            out[t.name] = w[off : off + t.num_embeddings]
    return out


def _check_params(
    params: Mapping[str, Any], plan: Plan, packed: bool = False
) -> tuple[jax.Array, ...]:
    shapes = {s.name: (s.num_embeddings, s.embedding_dim) for s in plan.stacks}
    hint = "jaxembed.collections.init or stack_tables for these tables"
    options = {s.name: s.options for s in plan.stacks} if packed else None
    return check_named_tables(params, shapes, hint, options)


def check_named_tables(
    params: Any, shapes: Mapping[str, tuple[int, int]], hint: str, options: Any = None
) -> tuple[jax.Array, ...]:
    """The tables of ``params`` (``{name: {"weight": table}}``), one per name of ``shapes`` and of
    its shape, in its order; else ``TypeError`` / ``ValueError`` (``hint``: how to build them).

    With ``options`` (``{name: LookupOptions}``: a forward lookup) a table may be a quantized
    one (``{"weight": QuantizedTable}`` or the table itself), frozen under those options."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of table name to table, got {type(params)}")
    if set(params) != set(shapes):
        raise ValueError(
            f"params hold the tables {sorted(params)}, these tables are laid out as "
            f"{list(shapes)} (build params with {hint})"
        )
    weights = []
    for name, shape in shapes.items():
        if options is None:
            w = _validation.check_weight(params[name])
        else:
            w = options[name].table_of(params[name])
        if tuple(w.shape) != tuple(shape):
            raise ValueError(
                f"params[{name!r}] has shape {tuple(w.shape)}, expected {tuple(shape)}"
            )
        weights.append(w)
    return tuple(weights)


# -- the features ---------------------------------------------------------------------------------


def _check_features(features: Any, plan: Plan, pooled: bool, ids: bool = True) -> KeyedJagged:
    """The features against the tables; concrete ids are range-checked per feature (unless
    ``ids`` is False: a caller that checks them itself, or cannot read them all)."""
    if not isinstance(features, KeyedJagged):
        raise TypeError(f"features must be a jaxembed.KeyedJagged, got {type(features).__name__}")
    known = set(plan.feature_names)
    unknown = [k for k in features.keys if k not in known]
    if unknown:
        raise ValueError(
            f"features hold keys {unknown} that no table looks up (the tables' features: "
            f"{list(plan.feature_names)})"
        )
    missing = [f for f in plan.feature_names if f not in features.keys]
    if missing:
        raise ValueError(f"features lack {missing}, which the tables look up")
    if features.weights is not None:
        bad = [t.name for t in plan.tables if not pooled or t.pooling != "sum"]
        if bad:
            raise ValueError(
                f"features carry weights, which only sum-pooled bags take; tables {bad} are not"
            )
    if (
        ids
        and not isinstance(features.values, jax.core.Tracer)
        and not isinstance(features.lengths, jax.core.Tracer)
    ):
        values = np.asarray(features.values)
        ends = np.cumsum(np.asarray(features.lengths).reshape(len(features.keys), -1).sum(1))
        for f, key in enumerate(features.keys):
            ids = values[(ends[f - 1] if f else 0) : ends[f]]
            t = plan.table_of(key)
            bad = (ids < 0) | (ids >= t.num_embeddings)
            if bad.any():
                raise IndexError(
                    f"feature {key!r} holds {ids[bad][0]}, out of range for table {t.name!r} "
                    f"of {t.num_embeddings} rows (valid: 0 <= id < {t.num_embeddings})"
                )
    return features


def _prepare(params, features, tables, stack, *, pooled: bool, name: str, packed: bool = False):
    """``(plan, weights, features)`` of an entry point's call, each checked (``packed``: the
    tables may be quantized, for a forward lookup)."""
    plan = _plan(tables, stack)
    if (plan.tables[0].pooling is not None) != pooled:
        kind = "EmbeddingBagConfigs" if pooled else "EmbeddingConfigs (not EmbeddingBagConfigs)"
        raise TypeError(f"{name} takes {kind}")
    weights = _check_params(params, plan, packed)
    return plan, weights, _check_features(features, plan, pooled=pooled)


class _StackIds(NamedTuple):
    """One stack's share of the features, ready for the pipeline."""

    ids: jax.Array  # (C,) stacked rows; out of range, and outside the stack: the sentinel
    keep: jax.Array  # (C,) entries in a bag: in the stack, not padding, before the end
    starts: jax.Array  # (F_s * B,) each bag's start in ``ids``
    ends: jax.Array  # (F_s * B,) each bag's end
    weights: jax.Array | None  # (C,) per-id weights, or None
    features: tuple[int, ...]  # the positions in ``keys`` of the stack's features (static)


def _stack_ids(stack: Stack, keys: tuple[str, ...], features: KeyedJagged, feat) -> _StackIds:
    num_features, capacity = len(keys), features.capacity
    position = dict(stack.features)
    js = stack.positions_in(keys)
    offset = np.full(num_features + 1, -1, np.int32)
    rows = np.zeros(num_features + 1, np.int32)
    pad = np.full(num_features + 1, -1, np.int32)
    for j in js:
        i = position[keys[j]]
        t = stack.tables[i]
        offset[j], rows[j] = stack.offsets[i], t.num_embeddings
        pad[j] = -1 if t.padding_idx is None else t.padding_idx
    values, weights = features.values, features.weights
    if len(js) < num_features:  # the stack's features, compacted (they stay in order)
        (order,) = jnp.nonzero(jnp.asarray(offset >= 0)[feat], size=capacity, fill_value=capacity)
        values = jnp.take(values, order, mode="fill", fill_value=0)
        feat = jnp.take(feat, order, mode="fill", fill_value=num_features)
        if weights is not None:
            weights = jnp.take(weights, order, mode="fill", fill_value=0)
    off, size, padding = (jnp.asarray(a)[feat] for a in (offset, rows, pad))
    valid = off >= 0
    in_range = (values >= 0) & (values < size)
    sentinel = stack.num_embeddings
    ids = jnp.where(valid & in_range, values + off, sentinel).astype(jnp.int32)
    keep = valid & ~((padding >= 0) & (values == padding))
    lengths = features.lengths.reshape(num_features, -1)[np.asarray(js)].reshape(-1)
    ends = jnp.cumsum(lengths, dtype=jnp.int32)
    return _StackIds(ids, keep, ends - lengths, ends, weights, js)


def _feature_of(features: KeyedJagged) -> jax.Array:
    """The feature of each position of ``values`` (``len(keys)`` past ``sum(lengths)``)."""
    ends = jnp.cumsum(features.length_per_key(), dtype=jnp.int32)
    positions = jnp.arange(features.capacity, dtype=jnp.int32)
    # a few dozen features: comparing against every end beats XLA's sort-based search
    return jnp.searchsorted(ends, positions, side="right", method="compare_all").astype(jnp.int32)


def _split(out: jax.Array, keys: tuple[str, ...], js: tuple[int, ...]) -> dict[str, jax.Array]:
    per = out.reshape(len(js), -1, out.shape[-1])
    return {keys[j]: per[i] for i, j in enumerate(js)}


# -- pooled collections ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("plan",))
def _bag_collection(weights, features, *, plan):
    feat = _feature_of(features)
    pooled, new = {}, []
    for stack, weight in zip(plan.stacks, weights, strict=True):
        s = _stack_ids(stack, features.keys, features, feat)
        lookup = Lookup.start(weight, s.ids, stack.options, _layout.LOCAL, stack.num_embeddings)
        w, table, index, keep, _, psw, style = _layout.LOCAL.bag_source(
            lookup, s.keep, None, s.weights
        )
        bags = _bag._bags(
            w, table, index, lookup.scale(), keep, psw, (s.starts, s.ends), stack.pooling, None,
            style,
        )  # fmt: skip
        pooled.update(_split(bags, features.keys, s.features))
        new.append(lookup.new_weight)
    return pooled, new


def _new_params(params, plan, new):
    if all(w is None for w in new):
        return params
    out = dict(params)
    for s, w in zip(plan.stacks, new, strict=True):
        if w is not None:
            out[s.name] = {**params[s.name], "weight": jax.lax.stop_gradient(w)}
    return out


def embedding_bag_collection(
    params: Mapping[str, Any], features: KeyedJagged, tables: Any, *, stack: bool = True
) -> tuple[dict[str, jax.Array], Params]:
    """Pools every feature's bags in its table: TorchRec's ``EmbeddingBagCollection`` forward.

    Args:
      params: the collection's params (:func:`init`, :func:`stack_tables`): one table per stack.
        A stack may be a :class:`jaxembed.QuantizedTable` (``jaxembed.quantize`` of the stack's
        table: rows are quantized one by one, so this is each table quantized), frozen as in
        :func:`jaxembed.embedding_bag`; its bags come in its ``output_dtype`` (float32 unless
        ``q.with_output_dtype(...)``).
      features: a :class:`~jaxembed.KeyedJagged` holding exactly the tables' features (any
        order); with ``weights``, every table must pool by sum.
      tables: the :class:`~jaxembed.EmbeddingBagConfig` of every table.
      stack: how ``params`` were built (stacked, the default, or one table each).

    Returns:
      ``(pooled, new_params)``: ``pooled[feature]`` is ``(B, embedding_dim)`` in the table's
      dtype (empty and all-padding bags are zeros); ``new_params`` holds the renormed stacks
      where a table has ``max_norm``, else is ``params``. :func:`concat_pooled` gives the
      ``(B, sum of D)`` matrix. Differentiable w.r.t. ``params`` (torch's table gradient) and
      ``features.weights``.

    Raises:
      TypeError: ``features`` is not a ``KeyedJagged``; bad ``params``.
      ValueError: a key no table looks up, a table feature missing, weights with a table that
        does not pool by sum, params that do not match the tables.
      IndexError: (concrete ids) an id outside its feature's table. Under ``jit`` the bag holding
        it is NaN.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> ones = jax.nn.initializers.ones
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 2, 4, ["a", "b"], init=ones)]
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)
      >>> kj = jaxembed.KeyedJagged.from_lists({"a": [[1, 2], []], "b": [[3], [0, 0, 1]]})
      >>> pooled, _ = jaxembed.embedding_bag_collection(params, kj, tables)
      >>> pooled["a"][:, 0], pooled["b"][:, 0]
      (Array([2., 0.], dtype=float32), Array([1., 3.], dtype=float32))
    """
    plan, weights, features = _prepare(
        params, features, tables, stack, pooled=True, name="embedding_bag_collection", packed=True
    )
    pooled, new = _bag_collection(weights, features, plan=plan)
    return pooled, _new_params(params, plan, new)


def concat_pooled(pooled: Mapping[str, jax.Array], tables: Any) -> jax.Array:
    """The pooled features side by side, ``(B, sum of D)``, in the tables' feature order
    (TorchRec's ``KeyedTensor.values()``)."""
    plan = _plan(tables)
    return jnp.concatenate([pooled[f] for f in plan.feature_names], axis=1)


# -- sequence (unpooled) collections --------------------------------------------------------------


class Jagged(NamedTuple):
    """One feature's looked-up rows, jagged over the batch (TorchRec's ``JaggedTensor``).

    Attributes:
      values: ``(capacity, D)``: the feature's rows, sample after sample, then zeros.
      lengths: ``(B,)`` rows per sample.
    """

    values: jax.Array
    lengths: jax.Array

    def offsets(self) -> jax.Array:
        """``(B + 1,)`` where each sample's rows start, then the end."""
        return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(self.lengths)])

    def to_padded(self, max_length: int) -> jax.Array:
        """``(B, max_length, D)``, each sample's first ``max_length`` rows, zeros after."""
        starts = self.offsets()[:-1]
        k = jnp.arange(max_length, dtype=jnp.int32)
        at = starts[:, None] + k[None, :]
        rows = jnp.take(self.values, at, axis=0, mode="fill", fill_value=0)
        return jnp.where((k[None, :] < self.lengths[:, None])[..., None], rows, 0)


def _jagged_features(rows, starts, lengths, keys, js) -> dict[str, Jagged]:
    """Each of a stack's features as a :class:`Jagged` of the stack's ``(C, D)`` rows:
    ``starts[i]`` is where feature ``js[i]``'s rows begin, ``lengths`` ``(len(keys), B)``."""
    k = jnp.arange(rows.shape[0], dtype=jnp.int32)
    out = {}
    for i, j in enumerate(js):
        total = jnp.sum(lengths[j])
        values = jnp.take(rows, starts[i] + k, axis=0, mode="fill", fill_value=0)
        out[keys[j]] = Jagged(jnp.where((k < total)[:, None], values, 0), lengths[j])
    return out


def _feature_starts(s: _StackIds) -> jax.Array:
    """Where each of the stack's features begins in its compacted ids."""
    return s.starts.reshape(len(s.features), -1)[:, 0]


@functools.partial(jax.jit, static_argnames=("plan", "sparse"))
def _sequence_collection(weights, features, *, plan, sparse=False):
    """Every stack's rows as jagged features; with ``sparse``, outside autograd, with each
    stack's :class:`~jaxembed.sparse.SparseLookup` (its rows' gradient is the update)."""
    feat = _feature_of(features)
    lengths = features.lengths.reshape(len(features.keys), -1)
    out, new, lookups = {}, [], {}
    for stack, weight in zip(plan.stacks, weights, strict=True):
        s = _stack_ids(stack, features.keys, features, feat)
        if sparse:
            weight = jax.lax.stop_gradient(weight)
        lookup = Lookup.start(weight, s.ids, stack.options, _layout.LOCAL, stack.num_embeddings)
        rows = lookup.rows(gradient=False)
        if sparse:
            table = weight if lookup.new_weight is None else lookup.new_weight
            dropped = jnp.where(s.keep, s.ids, stack.num_embeddings)
            lookups[stack.name] = SparseLookup(
                {"weight": table}, dropped, lookup.scale(padding=False)
            )
            out[stack.name] = (rows, _feature_starts(s))
            continue
        if not is_packed(weight):  # a quantized table is frozen: no gradient
            scale = lookup.scale()
            keep = s.keep.astype(rows.dtype)
            scale = keep if scale is None else scale * keep
            rows = _gradient.with_table_gradient(rows, lookup.weight, lookup.local, scale)
        out.update(_jagged_features(rows, _feature_starts(s), lengths, features.keys, s.features))
        new.append(lookup.new_weight)
    return out, (lookups if sparse else new)


def embedding_collection(
    params: Mapping[str, Any], features: KeyedJagged, tables: Any, *, stack: bool = True
) -> tuple[dict[str, Jagged], Params]:
    """Looks every feature's ids up in its table, unpooled: TorchRec's ``EmbeddingCollection``.

    Args:
      params: the collection's params (:func:`init` over :class:`~jaxembed.EmbeddingConfig`).
      features: a :class:`~jaxembed.KeyedJagged` holding exactly the tables' features.
      tables: the :class:`~jaxembed.EmbeddingConfig` of every table.
      stack: how ``params`` were built.

    Returns:
      ``(rows, new_params)``: ``rows[feature]`` is a :class:`Jagged` of ``(capacity, D)``
      values and ``(B,)`` lengths. Padding entries give their row (zero gradient), as torch's
      ``nn.Embedding``.

    Raises:
      As :func:`embedding_bag_collection`.

    Example:
      >>> import jax, jaxembed
      >>> tables = [jaxembed.EmbeddingConfig("t", 2, 4, ["a"])]
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)
      >>> kj = jaxembed.KeyedJagged.from_lists({"a": [[1, 2], [3]]})
      >>> rows, _ = jaxembed.embedding_collection(params, kj, tables)
      >>> rows["a"].values.shape, rows["a"].lengths
      ((16, 2), Array([2, 1], dtype=int32))
    """
    plan, weights, features = _prepare(
        params, features, tables, stack, pooled=False, name="embedding_collection", packed=True
    )
    rows, new = _sequence_collection(weights, features, plan=plan)
    return rows, _new_params(params, plan, new)


def lookup_sequences(
    params: Mapping[str, Any], features: KeyedJagged, tables: Any, *, stack: bool = True
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, SparseLookup]]:
    """:func:`embedding_collection` for sparse training, by stack: ``{stack: (rows (C, D),
    where each feature starts)}`` outside autograd, and each stack's
    :class:`~jaxembed.sparse.SparseLookup` (the modules' front end; split the rows into
    features with :func:`sequence_features`)."""
    plan, weights, features = _prepare(
        params, features, tables, stack, pooled=False, name="lookup_sequences"
    )
    return _sequence_collection(weights, features, plan=plan, sparse=True)


def sequence_features(
    rows: Mapping[str, tuple[jax.Array, jax.Array]], features: KeyedJagged, tables: Any
) -> dict[str, Jagged]:
    """The jagged features from :func:`lookup_sequences`'s rows (differentiable in the rows)."""
    plan = _plan(tables)
    lengths = features.lengths.reshape(len(features.keys), -1)
    out = {}
    for stack in plan.stacks:
        js = stack.positions_in(features.keys)
        stack_rows, starts = rows[stack.name]
        out.update(_jagged_features(stack_rows, starts, lengths, features.keys, js))
    return out


# -- sparse training ------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class CollectionLookup:
    """What :func:`lookup` keeps: per stack, its :class:`~jaxembed.sparse.BagLookup` (the table
    to update, and how each bag's gradient spreads over its entries).

    Attributes:
      lookups: ``{stack name: BagLookup}``; each ``params["weight"]`` is the (renormed) stack.
    """

    def __init__(self, plan: Plan, keys: tuple[str, ...], lookups: dict):
        self.plan, self.keys, self.lookups = plan, keys, lookups

    def tree_flatten(self):
        return (self.lookups,), (self.plan, self.keys)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)

    @property
    def params(self) -> Params:
        """The params to update, the stacks as given or renormed (``max_norm``)."""
        return {name: lk.params for name, lk in self.lookups.items()}

    def features_of(self, stack: Stack) -> tuple[str, ...]:
        """The stack's features, in the order of its bags (the jagged input's)."""
        return tuple(self.keys[j] for j in stack.positions_in(self.keys))

    def grad(self, pooled_grads: Mapping[str, jax.Array]) -> dict[str, SparseGrad]:
        """``{stack: SparseGrad}`` from the gradient of the loss w.r.t. the pooled features.

        Raises:
          KeyError: a feature's gradient missing.
        """
        out = {}
        for stack in self.plan.stacks:
            feats = self.features_of(stack)
            missing = [f for f in feats if f not in pooled_grads]
            if missing:
                raise KeyError(f"pooled_grads lack the features {missing}")
            cot = jnp.concatenate([jnp.asarray(pooled_grads[f]) for f in feats])
            out[stack.name] = self.lookups[stack.name].grad(cot)
        return out


@functools.partial(jax.jit, static_argnames=("plan",))
def _sparse_bags(weights, features, *, plan):
    feat = _feature_of(features)
    bags, lookups = {}, {}
    for stack, weight in zip(plan.stacks, weights, strict=True):
        s = _stack_ids(stack, features.keys, features, feat)
        weight = jax.lax.stop_gradient(weight)
        lookup = Lookup.start(weight, s.ids, stack.options, _layout.LOCAL, stack.num_embeddings)
        starts = (s.starts, s.ends)
        out, pos = _bag.bags_of_table(
            lookup.table, lookup.local, s.keep, s.weights, starts, stack.pooling, None, "gather"
        )
        table = weight if lookup.new_weight is None else lookup.new_weight
        dropped = jnp.where(s.keep, s.ids, stack.num_embeddings)
        scale = lookup.scale(padding=False)
        bags[stack.name] = out
        lookups[stack.name] = BagLookup(
            {"weight": table}, dropped, s.keep, starts, scale, s.weights, pos, stack.pooling, None
        )
    return bags, lookups


def lookup_stacks(
    params: Mapping[str, Any], features: KeyedJagged, tables: Any, *, stack: bool = True
) -> tuple[dict[str, jax.Array], CollectionLookup]:
    """:func:`lookup` by stack: ``{stack: (bags of its features, D)}`` (the modules' front end,
    which records each stack's bags for :func:`jaxembed.sparse.value_and_grad`)."""
    # (an unpooled table here would be summed silently: the check refuses it)
    plan, weights, features = _prepare(
        params, features, tables, stack, pooled=True, name="collections.lookup"
    )
    bags, lookups = _sparse_bags(weights, features, plan=plan)
    return bags, CollectionLookup(plan, features.keys, lookups)


def split_stacks(bags: Mapping[str, jax.Array], lk: CollectionLookup) -> dict[str, jax.Array]:
    """``{feature: (B, D)}`` from each stack's bags."""
    pooled = {}
    for stack in lk.plan.stacks:
        feats = lk.features_of(stack)
        per = bags[stack.name].reshape(len(feats), -1, bags[stack.name].shape[-1])
        pooled.update({f: per[i] for i, f in enumerate(feats)})
    return pooled


def lookup(
    params: Mapping[str, Any], features: KeyedJagged, tables: Any, *, stack: bool = True
) -> tuple[dict[str, jax.Array], CollectionLookup]:
    """Looks a collection up for sparse training: the pooled features, and how to update.

    The pattern of :func:`jaxembed.sparse.lookup`, for every table at once::

        pooled, lk = jaxembed.collections.lookup(params, features, tables)
        loss, pooled_grads = jax.value_and_grad(loss_fn)(pooled)
        params, state = opt.update(lk.grad(pooled_grads), state, lk.params)

    with ``opt = jaxembed.collections.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), tables)``.
    ``pooled`` equals :func:`embedding_bag_collection`'s bit for bit, computed from the tables
    directly; ``lk.grad`` spreads each bag's gradient over its entries, exactly as the dense
    gradient does. Padding, out-of-bag and out-of-range entries are dropped from the update,
    ``scale_grad_by_freq`` divides by the row's count, and with ``max_norm`` the update applies to
    the renormed stack.

    Args:
      params, features, tables, stack: as :func:`embedding_bag_collection`.

    Returns:
      ``(pooled, lookup)``: ``pooled[feature]`` is ``(B, D)``; a :class:`CollectionLookup`.

    Raises:
      As :func:`embedding_bag_collection`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 2, 5, ["a", "b"])]
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)
      >>> kj = jaxembed.KeyedJagged.from_lists({"a": [[1, 1]], "b": [[4]]})
      >>> pooled, lk = jaxembed.collections.lookup(params, kj, tables)
      >>> grads = lk.grad(jax.grad(lambda p: sum(v.sum() for v in p.values()))(pooled))
      >>> grads["t"].indices[:3], grads["t"].values[:3, 0]
      (Array([1, 1, 4], dtype=int32), Array([1., 1., 1.], dtype=float32))
    """
    bags, lk = lookup_stacks(params, features, tables, stack=stack)
    return split_stacks(bags, lk), lk


class RowScale:
    """Each stacked row's factor on the learning rate: its table's ``lr_scale`` (hashable)."""

    def __init__(self, offsets: tuple[int, ...], scales: tuple[float, ...]):
        self.offsets, self.scales = tuple(offsets), tuple(scales)

    def __call__(self, rows: jax.Array) -> jax.Array:
        offsets = jnp.asarray(self.offsets, jnp.int32)
        table = jnp.searchsorted(offsets, rows, side="right", method="compare_all") - 1
        return jnp.asarray(self.scales, jnp.float32)[jnp.clip(table, 0, len(self.scales) - 1)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowScale) and (self.offsets, self.scales) == (
            other.offsets,
            other.scales,
        )

    def __hash__(self) -> int:
        return hash((self.offsets, self.scales))


def stack_optimizer(tx: RowOptimizer, stack: Stack) -> RowOptimizer:
    """``tx`` for one stack: the tables' ``lr_scale`` applied row by row, in one update."""
    scales = stack.lr_scales()
    if scales is None:
        return tx
    scale = RowScale(stack.offsets, scales)

    def update(grad, state, table, *, column_axis=None):
        try:
            return tx.update(grad, state, table, column_axis=column_axis, lr_scale=scale)
        except TypeError as e:
            if "lr_scale" not in str(e):
                raise
            raise TypeError(
                f"tables of stack {stack.name!r} have per-table lr_scale, and this optimizer's "
                "update takes no lr_scale keyword (jaxembed.sparse's optimizers do)"
            ) from e

    return RowOptimizer(tx.init, update, tx.applies_dense)


class CollectionOptimizer(NamedTuple):
    """A row-wise optimizer over a collection's stacks: ``init(params)``,
    ``update(grads, state, params) -> (params, state)`` with ``{stack: ...}`` dicts."""

    init: Any
    update: Any


def optimizer(tx: RowOptimizer, tables: Any, *, stack: bool = True) -> CollectionOptimizer:
    """A row-wise optimizer for every stack of a collection, with each table's ``lr_scale``.

    Args:
      tx: a :mod:`jaxembed.sparse` optimizer (sgd, adagrad, rowwise_adagrad, lazy_adam).
      tables: the collection's table configs.
      stack: how the params were built.

    Returns:
      ``init(params) -> state`` and ``update(grads, state, params) -> (params, state)``, where
      ``grads`` is :meth:`CollectionLookup.grad`'s ``{stack: SparseGrad}``. A stack without
      a gradient is left alone. Only the rows present are read or written.

    Raises:
      TypeError: ``tx`` is not a ``RowOptimizer``.
    """
    if not isinstance(tx, RowOptimizer):
        raise TypeError(f"tx must be a jaxembed.sparse RowOptimizer, got {type(tx).__name__}")
    plan = _plan(tables, stack)
    txs = {s.name: stack_optimizer(tx, s) for s in plan.stacks}
    return named_optimizer(txs, lambda params: _check_params(params, plan))


def named_optimizer(txs: Mapping[str, RowOptimizer], check: Any) -> CollectionOptimizer:
    """A :class:`CollectionOptimizer` over ``{name: {"weight": table}}`` params: ``txs[name]``
    updates each; ``check(params)`` checks them and returns the tables in ``txs``' order."""

    def init_fn(params):
        weights = check(params)
        return {name: t.init(w) for (name, t), w in zip(txs.items(), weights, strict=True)}

    def update_fn(grads, state, params):
        check(params)
        params, state = dict(params), dict(state)
        for name, grad in grads.items():
            if name not in txs:
                raise ValueError(f"grads hold {name!r}, not a table of this collection")
            if not isinstance(grad, SparseGrad):
                raise TypeError(f"grads[{name!r}] must be a SparseGrad, got {type(grad).__name__}")
            table, state[name] = txs[name].update(grad, state[name], params[name]["weight"])
            params[name] = {**params[name], "weight": table}
        return params, state

    return CollectionOptimizer(init_fn, update_fn)


_serialization.register_namedtuple(Jagged, "collections.Jagged")
