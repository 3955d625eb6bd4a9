"""Sparse tables in ``flax.nnx``: ``sparse=True``, :func:`value_and_grad` and :class:`Optimizer`.

A table built with ``jaxembed.Embedding(..., sparse=True)`` is a :class:`SparseParam`. Called
under :func:`value_and_grad`, each lookup into it returns its rows plus a zero "probe" of the
rows' shape; the probe's gradient is the rows' gradient, which becomes the table's
:class:`~jaxembed.sparse.SparseGrad`. Every other parameter is differentiated as ``nnx.grad``
would. The probes' shapes are found by tracing the loss once more with ``jax.eval_shape``
(compile time only; nothing extra runs).

Outside :func:`value_and_grad` a sparse table behaves as a dense ``nnx.Param``: ``nnx.grad`` gives
its full ``(V, D)`` gradient, so plain Flax code still trains it, just without the savings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxembed.core._layout import Layout
from jaxembed.sparse._lookup import SparseGrad, SparseLookup, sum_grads
from jaxembed.sparse._optimizers import RowOptimizer, fresh_state


class SparseParam(nnx.Param):
    """A table trained row-wise: an ``nnx.Param`` that :func:`value_and_grad` gives a SparseGrad.

    :class:`Optimizer` gives it the sparse optimizer and leaves it out of the dense one.
    """


def _key(path: tuple[Hashable, ...]) -> str:
    return "/".join(str(p) for p in path)


def sparse_tables(model: Any, wrt: Any = nnx.Param) -> dict[str, SparseParam]:
    """The model's :class:`SparseParam` variables that ``wrt`` (an nnx filter) selects, by path
    (``"embed/weight"``)."""
    selected = nnx.filterlib.to_predicate(wrt)
    return {
        _key(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, SparseParam) and selected(path, node)
    }


def table_optimizers(model: Any, sparse_tx: RowOptimizer) -> dict[str, RowOptimizer]:
    """``sparse_tx`` for each sparse table, as its module's layout (its ``sharding`` attribute)
    wants it: on a :class:`jaxembed.TableSharding`, wrapped by :func:`~jaxembed.sparse.sharded`,
    so each device updates its own rows. A module with a ``row_optimizers(sparse_tx)`` method
    (a collection, whose stacked tables have per-table learning rates) gives its own."""
    layouts, own = {}, {}
    for _, node in nnx.iter_graph(model):
        layout = getattr(node, "sharding", None)
        weight = getattr(node, "weight", None)
        if isinstance(layout, Layout) and isinstance(weight, SparseParam):
            layouts[id(weight)] = layout
        if isinstance(node, nnx.Module) and callable(getattr(node, "row_optimizers", None)):
            own.update(node.row_optimizers(sparse_tx))  # a collection's per-table rates
    return {
        key: own[id(var)]
        if id(var) in own
        else layouts[id(var)].rowwise(sparse_tx)
        if id(var) in layouts
        else sparse_tx
        for key, var in sparse_tables(model).items()
    }


class _Tape:
    """Trace-time record of the sparse lookups in one call of the loss."""

    def __init__(self, model: Any, probes: list[jax.Array] | None):
        self.keys = {id(var): key for key, var in sparse_tables(model).items()}
        self.probes = probes
        self.shapes: list[jax.ShapeDtypeStruct] = []
        self.records: list[tuple[str, SparseLookup]] = []
        self.fresh: list[tuple[str, jax.Array]] = []

    def _key(self, variable: SparseParam) -> str:
        key = self.keys.get(id(variable))
        if key is None:
            raise ValueError(
                "a sparse table was looked up that is not part of the model given to "
                "jaxembed.sparse.value_and_grad; pass the module that owns it"
            )
        return key

    def reset(self, variable: SparseParam, rows: jax.Array) -> None:
        """Marks ``rows`` of ``variable`` (``(k,)`` int32, padded out of range) as reset: their
        optimizer state starts afresh at the update of this call's gradients."""
        self.fresh.append((self._key(variable), rows))

    def record(self, variable: SparseParam, rows: jax.Array, lk: SparseLookup) -> jax.Array:
        key = self._key(variable)
        k = len(self.records)
        self.records.append((key, lk))
        if self.probes is None:
            self.shapes.append(jax.ShapeDtypeStruct(rows.shape, rows.dtype))
            return rows
        if k >= len(self.probes) or self.probes[k].shape != rows.shape:
            raise RuntimeError(
                "the loss looked up sparse tables differently on two traces; "
                "jaxembed.sparse.value_and_grad needs a loss whose lookups depend only on shapes"
            )
        return rows + self.probes[k]


# The tape is the one piece of trace-time context left in jaxembed, and it must stay: a user's
# loss calls the modules (``model(ids)``, deep inside their own code), so there is no argument
# through which value_and_grad could reach each lookup. Flax passes such context the same way
# (its module stacks). It lives only while value_and_grad traces the loss, on this thread.
_state = threading.local()


def active_tape() -> _Tape | None:
    """The tape of the innermost :func:`value_and_grad` being traced, if any."""
    tapes = getattr(_state, "tapes", None)
    return tapes[-1] if tapes else None


def _run(tape: _Tape, fn: Callable, model: Any, args: tuple, kwargs: dict) -> Any:
    tapes = _state.__dict__.setdefault("tapes", [])
    tapes.append(tape)
    try:
        return fn(model, *args, **kwargs)
    finally:
        tapes.pop()


class ModelGrads(NamedTuple):
    """Gradients of a model with sparse tables, for :meth:`Optimizer.update`.

    Attributes:
      dense: ``nnx.State`` of the gradients of every ``nnx.Param`` that is not sparse.
      sparse: ``{"path/to/weight": SparseGrad}`` for each sparse table the loss looked up.
      tables: ``{"path/to/weight": (V, D) array}``: the gradient of the reads of a sparse table
        outside its lookups (a tied ``attend`` head, a penalty on ``weight``), for each table the
        loss read so. The table's whole gradient is that plus its ``sparse`` entries.
      fresh: ``{"path/to/weight": (k,) int32}``: rows that a module reset during the loss (a
        managed-collision collection's evicted rows), padded with ``V``; :meth:`Optimizer.update`
        resets their optimizer state before it applies the gradient.
    """

    dense: Any
    sparse: dict[str, SparseGrad]
    tables: dict[str, jax.Array] = {}  # noqa: RUF012 - a NamedTuple default, never mutated
    fresh: dict[str, jax.Array] = {}  # noqa: RUF012 - a NamedTuple default, never mutated


def _refuse_nnx_optimizer(grads: ModelGrads):
    raise TypeError(
        "these gradients come from jaxembed.sparse.value_and_grad: they hold each sparse table's "
        "looked-up rows (a SparseGrad), which nnx.Optimizer cannot apply. Update with "
        "jaxembed.sparse.Optimizer(model, tx, sparse_tx) instead (it takes the same wrt=); "
        "grads.dense alone is an ordinary nnx.State of the other parameters' gradients"
    )


# nnx's own traversals (nnx.state, nnx.split, and so nnx.Optimizer.update) meet a ModelGrads
# here and get the error above; jax.jit and nnx.jit carry it as the NamedTuple it is
if hasattr(nnx.graphlib, "register_pytree_node_type"):
    nnx.graphlib.register_pytree_node_type(
        ModelGrads, _refuse_nnx_optimizer, lambda values, metadata: None
    )


_DENSE = nnx.All(nnx.Param, nnx.Not(SparseParam))


# what read each sparse table outside a lookup, as the last trace of value_and_grad found: for
# the error of an optimizer that cannot apply the dense gradient (names only, no arrays)
_READ_BY: dict[str, str] = {}


def _tables_at(keys: dict[str, str]) -> Callable:
    """An nnx filter: the sparse tables at ``keys``."""
    return lambda path, x: isinstance(x, SparseParam) and _key(path) in keys


def _is_zero(var: Any, eqns: dict) -> bool:
    """Whether a jaxpr output is a constant zero (a gradient JAX knew to be zero)."""
    if isinstance(var, jax.extend.core.Literal):
        return not np.any(var.val)
    eqn = eqns.get(var)
    if eqn is not None and eqn.primitive.name in ("broadcast_in_dim", "convert_element_type"):
        return _is_zero(eqn.invars[0], eqns)
    return False


def _reads_outside_lookups(graphdef: Any, state: Any, loss: Callable) -> dict[str, str]:
    """``{table: what read it}`` for each sparse table the loss reads other than by a lookup.

    A lookup reads its table outside autograd (its gradient is the rows'), so the gradient of
    the loss w.r.t. a table that is only looked up is a constant zero in the traced program.
    Anything else (``attend``, a penalty on ``weight``) leaves a real gradient there. This traces
    the loss's gradient abstractly once: compile time only.
    """
    table_state, rest = nnx.split_state(state, SparseParam, ...)
    flat = list(nnx.to_flat_state(table_state))
    if not flat:
        return {}

    def of_tables(values, rest):
        tables = nnx.from_flat_state([(p, v.replace(values[_key(p)])) for p, v in flat])
        # the other variables anew, in this trace: a loss may update them (BatchNorm's stats)
        rest = jax.tree.map(lambda x: x, rest)
        return loss(nnx.merge(graphdef, tables, rest))

    values = {_key(p): v.get_value() for p, v in flat}
    grads = jax.make_jaxpr(jax.grad(of_tables))(values, rest).jaxpr
    eqns = {v: e for e in grads.eqns for v in e.outvars}
    out = dict(zip(sorted(values), grads.outvars, strict=True))  # a dict's leaves: sorted keys
    # the traced gradient holds the forward pass too: what reads the table there names the read
    inputs = dict(zip(sorted(values), grads.invars, strict=False))  # the tables come first
    read = {}
    for key, var in out.items():
        if not _is_zero(var, eqns):
            users = sorted(
                {
                    e.params.get("name", e.primitive.name)
                    for e in grads.eqns
                    if inputs[key] in e.invars and e.primitive.name != "stop_gradient"
                }
                - {"_lookup"}
            )
            read[key] = ", ".join(users) or "a read outside a lookup"
    return read


def value_and_grad(fn: Callable, *, has_aux: bool = False) -> Callable:
    """``nnx.value_and_grad`` for a model with sparse tables, w.r.t. its first argument.

    Sparse tables get a :class:`~jaxembed.sparse.SparseGrad` of the rows the loss looked up,
    summed over every lookup of the call; all other ``nnx.Param`` get their ordinary gradient.
    The loss is traced abstractly twice more (compile time only): to find the lookups' shapes,
    and to find reads of a sparse table outside its lookups.

    A read outside a lookup (a tied ``attend`` head, a penalty on ``weight``, any use of the
    table's value) is never dropped: its gradient is the table's dense ``(V, D)`` gradient, in
    ``grads.tables``, and :class:`Optimizer` adds it to the lookups' rows, as torch's gradient
    becomes dense in that case. That step then costs O(V), and an optimizer that cannot apply a
    dense gradient (:func:`~jaxembed.sparse.lazy_adam`, as torch's ``SparseAdam``) raises.

    Args:
      fn: ``fn(model, *args, **kwargs) -> loss`` (``(loss, aux)`` with ``has_aux``), whose
        lookups into sparse tables depend only on shapes.
      has_aux: ``fn`` returns ``(loss, aux)``.

    Returns:
      A function with ``fn``'s signature that returns ``(value, grads)``: ``value`` is ``loss``
      (``(loss, aux)`` with ``has_aux``), ``grads`` a :class:`ModelGrads` for
      :meth:`Optimizer.update` (``nnx.Optimizer`` refuses it with an error naming
      :class:`Optimizer`).

    Raises:
      ValueError: the loss looked up a sparse table of another model.
      RuntimeError: the loss looked up sparse tables differently on its two traces.

    Example:
      >>> import jax.numpy as jnp, jaxembed, optax
      >>> from flax import nnx
      >>> emb = jaxembed.Embedding(100, 4, sparse=True, rngs=nnx.Rngs(0))
      >>> loss, grads = jaxembed.sparse.value_and_grad(lambda m: m(jnp.array([7, 7])).sum())(emb)
      >>> grads.sparse["weight"].indices
      Array([7, 7], dtype=int32)
    """

    def wrapper(model: Any, *args: Any, **kwargs: Any):
        graphdef, state = nnx.split(model)

        def loss_of(m, probes):
            out = _run(_Tape(m, probes), fn, m, args, kwargs)
            return out[0] if has_aux else out

        # the probes' shapes only: ``discover_shapes`` is traced abstractly, never run
        found: list = []

        def discover_shapes(state):
            m = nnx.merge(graphdef, state)
            tape = _Tape(m, None)
            _run(tape, fn, m, args, kwargs)
            found.extend(tape.shapes)

        jax.eval_shape(discover_shapes, state)
        probes = [jnp.zeros(s.shape, s.dtype) for s in found]
        keys: list[str] = []
        read = _reads_outside_lookups(graphdef, state, lambda m: loss_of(m, probes))
        _READ_BY.update(read)
        differentiated = nnx.Any(_DENSE, _tables_at(read))

        def inner(model, probes):
            tape = _Tape(model, probes)
            out = _run(tape, fn, model, args, kwargs)
            if len(tape.records) != len(probes):
                raise RuntimeError(
                    "the loss looked up sparse tables differently on two traces; "
                    "jaxembed.sparse.value_and_grad needs lookups that depend only on shapes"
                )
            loss, aux = out if has_aux else (out, None)
            keys.extend(key for key, _ in tape.records)
            fresh_keys.extend(key for key, _ in tape.fresh)
            return loss, (aux, [lk for _, lk in tape.records], [r for _, r in tape.fresh])

        grad_fn = nnx.value_and_grad(
            inner, argnums=(nnx.DiffState(0, differentiated), 1), has_aux=True
        )
        fresh_keys: list[str] = []
        (loss, (aux, lookups, fresh_rows)), (dense, probe_grads) = grad_fn(model, probes)
        tables = {
            _key(path): g.get_value()
            for path, g in nnx.to_flat_state(nnx.filter_state(dense, _tables_at(read)))
        }
        dense = nnx.filter_state(dense, _DENSE)
        per_table: dict[str, list[SparseGrad]] = {}
        for key, lk, g in zip(keys, lookups, probe_grads, strict=True):
            per_table.setdefault(key, []).append(lk.grad(g))
        sparse = {key: sum_grads(*grads) for key, grads in per_table.items()}
        fresh: dict[str, list[jax.Array]] = {}
        for key, rows in zip(fresh_keys, fresh_rows, strict=True):
            fresh.setdefault(key, []).append(rows)
        value = (loss, aux) if has_aux else loss
        fresh = {key: jnp.concatenate(rows) for key, rows in fresh.items()}
        return value, ModelGrads(dense, sparse, tables, fresh)

    return wrapper


def _whole_gradient(rows: SparseGrad | None, table: jax.Array | None) -> SparseGrad:
    """A table's gradient as one SparseGrad: its lookups' entries, plus every row of the dense
    gradient of its reads outside lookups (the optimizer sums them per row)."""
    if table is None:
        return rows
    everything = SparseGrad(jnp.arange(table.shape[0], dtype=jnp.int32), table)
    return everything if rows is None else sum_grads(rows, everything)


def _place_like_the_tables(model: Any, tree: Any) -> None:
    """Every array of ``tree``'s variables laid out where the model's sharded tables are: each
    module's ``sharding`` (a :class:`~jaxembed.TableSharding` or a collection's plan) places an
    array that is not on its devices yet (a dense layer built outside ``jax.set_mesh``, an
    optimizer's step count) replicated over them, as a jitted step would return it. The step's
    outputs are then laid out as its inputs, and its second call does not compile again."""
    layouts = [getattr(node, "sharding", None) for _, node in nnx.iter_graph(model)]
    placers = [s for s in layouts if callable(getattr(s, "replicated", None))]
    if not placers:
        return
    for _, node in nnx.iter_graph(tree):
        if isinstance(node, nnx.Variable) and isinstance(node.get_value(), jax.Array):
            node.set_value(placers[0].replicated(node.get_value()))


class Optimizer(nnx.Pytree):
    """An ``nnx.Optimizer`` for the dense parameters and a row-wise one for the sparse tables.

    Args:
      model: the model.
      tx: the optax transformation for every parameter ``wrt`` selects that is not a
        :class:`SparseParam`.
      sparse_tx: the row-wise optimizer for the sparse tables ``wrt`` selects
        (:func:`jaxembed.sparse.sgd`, :func:`~jaxembed.sparse.adagrad`,
        :func:`~jaxembed.sparse.rowwise_adagrad`, :func:`~jaxembed.sparse.lazy_adam`, or a
        :class:`~jaxembed.sparse.RowOptimizer` of your own). A table of a module built with
        ``sharding=`` gets it wrapped by :func:`~jaxembed.sparse.sharded`: each device updates
        its own rows. The model's other arrays, and this optimizer's state, that are not on
        that mesh yet (a dense layer built outside ``jax.set_mesh``, the step count) are placed
        on it, replicated, where a jitted step would return them: so the second step does not
        compile again.
      wrt: an nnx filter of the parameters to train, as ``nnx.Optimizer``'s (default: every
        ``nnx.Param``); gradients of the others are ignored.

    Raises:
      TypeError: ``sparse_tx`` is not a ``RowOptimizer``.

    Example:
      >>> import jax.numpy as jnp, jaxembed, optax
      >>> from flax import nnx
      >>> emb = jaxembed.Embedding(100, 4, sparse=True, rngs=nnx.Rngs(0))
      >>> opt = jaxembed.sparse.Optimizer(emb, optax.adam(1e-3), jaxembed.sparse.sgd(0.5))
      >>> before = emb.weight[...]
      >>> _, grads = jaxembed.sparse.value_and_grad(lambda m: m(jnp.array([7])).sum())(emb)
      >>> opt.update(emb, grads)
      >>> bool(jnp.all(emb.weight[...][7] == before[7] - 0.5)), int(opt.step[...])
      (True, 1)
    """

    def __init__(
        self,
        model: Any,
        tx: optax.GradientTransformation,
        sparse_tx: RowOptimizer,
        *,
        wrt: Any = nnx.Param,
    ):
        if not isinstance(sparse_tx, RowOptimizer):
            raise TypeError(
                "sparse_tx must be a jaxembed.sparse optimizer (sgd, adagrad, rowwise_adagrad, "
                f"lazy_adam, or a RowOptimizer), got {type(sparse_tx).__name__}"
            )
        self.wrt = wrt
        self.dense = nnx.Optimizer(model, tx, wrt=nnx.All(wrt, nnx.Not(SparseParam)))
        self.sparse_tx = sparse_tx
        self.step = nnx.training.optimizer.OptState(jnp.array(0, dtype=jnp.uint32))
        txs = table_optimizers(model, sparse_tx)
        self.sparse_state = nnx.data(
            {
                key: jax.tree.map(nnx.training.optimizer.OptArray, txs[key].init(var.get_value()))
                for key, var in sparse_tables(model, wrt).items()
            }
        )
        _place_like_the_tables(model, (model, self))

    def update(self, model: Any, grads: ModelGrads) -> None:
        """Applies ``grads`` (from :func:`value_and_grad`) to ``model`` in place.

        Tables the loss did not look up are left alone, state and step count included, as torch
        skips a parameter without a gradient. A call that raises changes nothing: every new value
        is computed before the first is written.
        """
        if not isinstance(grads, ModelGrads):
            raise TypeError(
                "grads must come from jaxembed.sparse.value_and_grad (a ModelGrads), got "
                f"{type(grads).__name__}"
            )
        tables = sparse_tables(model)
        unknown = set(grads.sparse) - set(tables)
        if unknown:
            raise ValueError(
                f"grads hold sparse tables this optimizer was not built for: {unknown}"
            )
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        txs = table_optimizers(model, self.sparse_tx)
        results = {}
        for key in grads.tables:
            if key in self.sparse_state and not txs[key].applies_dense:
                raise ValueError(
                    f"the sparse table {key!r} was read outside a lookup (by "
                    f"{_READ_BY.get(key, 'a read outside a lookup')}), "
                    "so its gradient is dense, which this row-wise optimizer cannot apply (as "
                    "torch's SparseAdam refuses dense gradients). Use sgd, adagrad or "
                    "rowwise_adagrad, or train that table densely (sparse=False)"
                )
        for key in set(grads.sparse) | set(grads.tables) | set(grads.fresh):
            if key not in self.sparse_state:
                continue  # a table wrt leaves out
            variables = self.sparse_state[key]
            state = jax.tree.map(lambda v: v.get_value(), variables, is_leaf=is_var)
            table = tables[key].get_value()
            if key in grads.fresh:  # rows reset in the loss: their state starts afresh
                state = fresh_state(txs[key], state, table, grads.fresh[key])
            if key not in grads.sparse and key not in grads.tables:
                results[key] = (table, state)
                continue
            grad = _whole_gradient(grads.sparse.get(key), grads.tables.get(key))
            results[key] = txs[key].update(grad, state, table)
        self.dense.update(model, grads.dense)  # computes, then writes: it raises before writing
        for key, (table, state) in results.items():
            tables[key].set_value(table)
            jax.tree.map(lambda v, x: v.set_value(x), self.sparse_state[key], state, is_leaf=is_var)
        self.step[...] += 1
