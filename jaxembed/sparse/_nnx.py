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
import jax.numpy as jnp
import optax
from flax import nnx

from jaxembed.core._layout import Layout
from jaxembed.sparse._lookup import SparseGrad, SparseLookup, sum_grads
from jaxembed.sparse._optimizers import RowOptimizer


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
    so each device updates its own rows."""
    layouts = {}
    for _, node in nnx.iter_graph(model):
        layout = getattr(node, "sharding", None)
        weight = getattr(node, "weight", None)
        if isinstance(layout, Layout) and isinstance(weight, SparseParam):
            layouts[id(weight)] = layout
    return {
        key: layouts[id(var)].rowwise(sparse_tx) if id(var) in layouts else sparse_tx
        for key, var in sparse_tables(model).items()
    }


class _Tape:
    """Trace-time record of the sparse lookups in one call of the loss."""

    def __init__(self, model: Any, probes: list[jax.Array] | None):
        self.keys = {id(var): key for key, var in sparse_tables(model).items()}
        self.probes = probes
        self.shapes: list[jax.ShapeDtypeStruct] = []
        self.records: list[tuple[str, SparseLookup]] = []

    def record(self, variable: SparseParam, rows: jax.Array, lk: SparseLookup) -> jax.Array:
        key = self.keys.get(id(variable))
        if key is None:
            raise ValueError(
                "a sparse table was looked up that is not part of the model given to "
                "jaxembed.sparse.value_and_grad; pass the module that owns it"
            )
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
    """

    dense: Any
    sparse: dict[str, SparseGrad]


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


def value_and_grad(fn: Callable, *, has_aux: bool = False) -> Callable:
    """``nnx.value_and_grad`` for a model with sparse tables, w.r.t. its first argument.

    Sparse tables get a :class:`~jaxembed.sparse.SparseGrad` of the rows the loss looked up,
    summed over every lookup of the call; all other ``nnx.Param`` get their ordinary gradient.
    The loss is traced once more, abstractly (``jax.eval_shape``), to find the lookups' shapes.

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
            return loss, (aux, [lk for _, lk in tape.records])

        grad_fn = nnx.value_and_grad(inner, argnums=(nnx.DiffState(0, _DENSE), 1), has_aux=True)
        (loss, (aux, lookups)), (dense, probe_grads) = grad_fn(model, probes)
        per_table: dict[str, list[SparseGrad]] = {}
        for key, lk, g in zip(keys, lookups, probe_grads, strict=True):
            per_table.setdefault(key, []).append(lk.grad(g))
        sparse = {key: sum_grads(*grads) for key, grads in per_table.items()}
        value = (loss, aux) if has_aux else loss
        return value, ModelGrads(dense, sparse)

    return wrapper


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
        its own rows.
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
        for key, grad in grads.sparse.items():
            if key not in self.sparse_state:
                continue  # a table wrt leaves out
            variables = self.sparse_state[key]
            state = jax.tree.map(lambda v: v.get_value(), variables, is_leaf=is_var)
            results[key] = txs[key].update(grad, state, tables[key].get_value())
        self.dense.update(model, grads.dense)  # computes, then writes: it raises before writing
        for key, (table, state) in results.items():
            tables[key].set_value(table)
            jax.tree.map(lambda v, x: v.set_value(x), self.sparse_state[key], state, is_leaf=is_var)
        self.step[...] += 1
