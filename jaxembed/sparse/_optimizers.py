"""Row-wise optimizers for :class:`SparseGrad`: SGD, Adagrad, row-wise Adagrad and lazy Adam.

Each is an ``init`` / ``update`` pair in optax's style with a NamedTuple state. One difference
from optax: ``update`` returns the new table, not an update to add, because adding a sparse update
to a dense table *is* the operation; done as one scatter, XLA performs it in place when the step
donates the table and the state. Only the rows present in the gradient are read or written.

Semantics follow torch's optimizers on ``nn.Embedding(sparse=True)`` gradients:

* :func:`sgd` is ``torch.optim.SGD``. Without momentum it costs O(batch). torch's momentum
  buffer for sparse gradients accumulates every row ever touched and moves all of them each
  step, so ``momentum > 0`` keeps a dense ``(V, D)`` buffer and costs O(V) per step, as torch's
  does once most rows were seen. ``weight_decay`` is refused, as torch refuses it.
* :func:`adagrad` is ``torch.optim.Adagrad`` (``lr_decay``, ``initial_accumulator_value``,
  ``eps``); torch refuses ``weight_decay`` with sparse gradients, and so does this.
* :func:`rowwise_adagrad` is FBGEMM's ``EXACT_ROWWISE_ADAGRAD``: one accumulator per row (the
  mean of the squared gradient row), ``embedding_dim`` times less state; ``weight_decay`` is its
  L2 mode (added to the gradient of present rows).
* :func:`lazy_adam` is ``torch.optim.SparseAdam``: moments and parameters change only on rows
  present in the gradient; the step count (bias correction) is global.

A learning rate may be a number or an optax schedule (a function of the step count).

Stochastic rounding (``stochastic_rounding=True``, each optimizer): a bfloat16 / float16 table's
updated rows are summed in float32 and rounded up or down at random, up with probability the
distance from the value below (:func:`jaxembed.sparse._update.stochastic_round`), as FBGEMM's
low-precision training does. The rounding is unbiased, so a long run of updates smaller than
half an ulp still moves the table, where round-to-nearest stalls. The noise is a counter-based
hash of (``seed``, step, row, column): a run is reproducible. float32 and wider tables round to
nearest either way; ``sgd`` with momentum (a dense update) refuses it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxembed.core import _layout, _serialization, _validation
from jaxembed.kernels import _ffi as _kernels
from jaxembed.sparse import _update as _sparse_update
from jaxembed.sparse._lookup import SparseGrad, spread_of

LearningRate = float | Callable[[jax.Array], ArrayLike]


class RowOptimizer(NamedTuple):
    """A row-wise optimizer: ``init(table) -> state``, ``update(grad, state, table)``.

    ``update(grad, state, table, *, column_axis=None)`` returns ``(new_table, new_state)``,
    reading and writing only the rows present in ``grad``. Donate the table and the state to the
    jitted step, and XLA updates them in place. ``column_axis`` is given by
    :func:`jaxembed.sparse.sharded` when the table's columns are split over a mesh axis; an
    optimizer with a row-wise statistic sums it over that axis (:func:`row_mean`). The built-in
    optimizers also take ``lr_scale``: a function of the ``(n,)`` rows being updated that returns
    each row's factor on the learning rate (a collection's per-table ``lr_scale`` over its stacked
    table); without it every row has the same rate. Write your own as
    ``RowOptimizer(init, update)``.

    Attributes:
      init: ``init(table) -> state``, for a ``(V, D)`` table.
      update: ``update(grad, state, table, *, column_axis=None) -> (new_table, new_state)``.
      applies_dense: whether a dense gradient may be given as every row's entry (a table read
        outside its lookups has one, see :func:`jaxembed.sparse.value_and_grad`): True where
        that equals the optimizer on the dense gradient, as for SGD and Adagrad; False for lazy
        Adam, which then raises, as torch's ``SparseAdam`` refuses dense gradients.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> def init(table):
      ...     return ()
      >>> def update(grad, state, table, *, column_axis=None):  # SGD with lr 1, duplicates summed
      ...     return table.at[grad.indices].add(-grad.values, mode="drop"), state
      >>> mine = jaxembed.sparse.RowOptimizer(init, update)
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([1, 1]), jnp.ones((2, 2)))
      >>> mine.update(grad, mine.init(None), jnp.zeros((3, 2)))[0][:, 0]
      Array([ 0., -2.,  0.], dtype=float32)
    """

    init: Callable[[ArrayLike], Any]
    update: Callable[[SparseGrad, Any, ArrayLike], tuple[jax.Array, Any]]
    applies_dense: bool = True


class SgdState(NamedTuple):
    """:func:`sgd`'s state.

    Attributes:
      count: ``()`` int32, the number of updates so far (a schedule's step).
      momentum: ``(V, D)`` in the table's dtype, the momentum buffer; None without momentum.
    """

    count: jax.Array
    momentum: jax.Array | None


class AdagradState(NamedTuple):
    """:func:`adagrad`'s state.

    Attributes:
      count: ``()`` int32, the number of updates so far.
      sum: ``(V, D)`` in the table's dtype, each element's sum of squared gradients.
    """

    count: jax.Array
    sum: jax.Array


class RowwiseAdagradState(NamedTuple):
    """:func:`rowwise_adagrad`'s state.

    Attributes:
      count: ``()`` int32, the number of updates so far.
      sum: ``(V,)`` float32 (float64 for float64 tables), each row's sum of mean squared
        gradients.
    """

    count: jax.Array
    sum: jax.Array


class LazyAdamState(NamedTuple):
    """:func:`lazy_adam`'s state.

    Attributes:
      count: ``()`` int32, the number of updates so far (global: bias correction counts every
        step, as torch's ``SparseAdam`` does).
      mu: ``(V, D)`` in the table's dtype, the first moments.
      nu: ``(V, D)`` in the table's dtype, the second moments.
    """

    count: jax.Array
    mu: jax.Array
    nu: jax.Array


def _check_number(name: str, value: Any, *, low: float = 0.0, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if math.isnan(value) or value < low or (below is not None and value >= below):
        bound = f"in [{low}, {below})" if below is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def _check_learning_rate(learning_rate: Any) -> LearningRate:
    if callable(learning_rate):
        return learning_rate
    return _check_number("learning_rate", learning_rate)


def _scalar_dtype(table: jax.Array) -> Any:
    """Step sizes are computed in float32, or in the table's dtype where that is wider."""
    return jnp.promote_types(table.dtype, jnp.float32)


def _rate(learning_rate: LearningRate, count: jax.Array, dtype: Any) -> jax.Array:
    if callable(learning_rate):
        return jnp.asarray(learning_rate(count), dtype)
    return jnp.asarray(learning_rate, dtype)


def _check_rounding(stochastic_rounding: Any, seed: Any) -> tuple[bool, int]:
    stochastic_rounding = _validation.check_flag("stochastic_rounding", stochastic_rounding)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise TypeError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return stochastic_rounding, int(seed)


def _rounding(on: bool, seed: int, count: jax.Array, table: jax.Array) -> jax.Array | None:
    """The step's stochastic-rounding key, or None (off, or a float32 table)."""
    return _sparse_update.rounding_key(seed, count, table.dtype) if on else None


def _check_weight_decay(name: str, weight_decay: Any) -> None:
    if _check_number("weight_decay", weight_decay) != 0:
        raise ValueError(
            f"weight_decay must be 0 for sparse {name}: torch refuses it with sparse gradients "
            "(it would touch every row each step); use rowwise_adagrad(weight_decay=...) for an "
            "L2 penalty on the rows present, or decay the table yourself"
        )


def _prepare(grad: SparseGrad, table: ArrayLike):
    """Checks the gradient against the table, then sums duplicates: ``(table, rows, values)``."""
    table, indices, values, _ = _checked(grad, table)
    rows, values = _sparse_update.coalesce(SparseGrad(indices, values), table.shape[0])
    return table, rows, values


def _checked(grad: SparseGrad, table: ArrayLike):
    """Checks the gradient against the table: ``(table, indices, values, pooled)``, the values in
    the table's dtype; ``pooled`` is the bags' gradient the values were spread from (the core's
    ``Spread``) where it holds the same numbers in the table's dtype, else None."""
    table = _validation.check_table("table", table)
    if not isinstance(grad, SparseGrad):
        raise TypeError(f"grad must be a jaxembed.sparse.SparseGrad, got {type(grad).__name__}")
    indices, values = jnp.asarray(grad.indices), jnp.asarray(grad.values)
    _validation.check_index_dtype("grad.indices", indices.dtype)
    if indices.ndim != 1 or values.shape != indices.shape + table.shape[1:]:
        raise ValueError(
            f"grad must hold (n,) indices and (n, {table.shape[1]}) values for this table, got "
            f"indices {tuple(indices.shape)} and values {tuple(values.shape)}"
        )
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise TypeError(f"grad.values must have a floating dtype, got {values.dtype}")
    pooled = spread_of(grad)
    if pooled is not None and pooled.cot.dtype != table.dtype:
        pooled = None  # spread in another dtype, then cast: only the values hold those numbers
    return table, indices, values.astype(table.dtype), pooled


def _negated(values: jax.Array, pooled):
    """``-values``, and the pooled gradient they came from negated alike (exact)."""
    return -values, (None if pooled is None else pooled._replace(factor=-pooled.factor))


def _step(
    name, reference, table, states, indices, values, pooled, rate, lr_scale, rounding, **hyper
):
    """One row-wise step: ``reference(table, states, rows, values) -> (table, states)`` on the
    coalesced entries (the pure-JAX path), or on CPU the update kernel of
    :mod:`jaxembed.kernels`, which sums each row's duplicates in their order and updates the
    row in place, where it applies (a float32 / float64 table, no stochastic rounding). Given
    ``pooled`` (the bags' gradient ``values`` were spread from), the kernel spreads it as it
    reads it, and the ``(n, D)`` values are never made."""

    def pure(table, states, indices, values, pooled):
        rows, values = _sparse_update.coalesce(SparseGrad(indices, values), table.shape[0])
        return reference(table, states, rows, values)

    operands = (table, tuple(states), indices, values, pooled)
    applies = _kernels.table_applies(table, _kernels.UPDATE_FLOATS) and rounding is None
    if not applies or indices.shape[0] > _kernels.MAX_ENTRIES or indices.shape[0] == 0:
        return pure(*operands)

    def native(table, states, indices, values, pooled):
        row_rate = None if lr_scale is None else jnp.asarray(lr_scale(indices), table.dtype)
        table, s0, s1 = _kernels.sparse_update(
            name, table, tuple(states) + (None,) * (2 - len(states)), indices,
            values if pooled is None else pooled, rate, row_rate, **hyper,
        )  # fmt: skip
        return table, (s0, s1)[: len(states)]

    return jax.lax.platform_dependent(*operands, cpu=native, default=pure)


def _per_row(rate: jax.Array, r: jax.Array, lr_scale: Callable | None, dtype: Any) -> jax.Array:
    """The learning rate of each of the rows ``r``: ``rate`` itself unless ``lr_scale`` (a
    function of the rows, see :class:`RowOptimizer`) scales it row by row."""
    if lr_scale is None:
        return rate
    return rate * jnp.asarray(lr_scale(r), dtype)


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


def _zeros_like_table(table: ArrayLike, fill: float = 0.0) -> jax.Array:
    table = _validation.check_table("table", table)
    return jnp.full(table.shape, fill, table.dtype)


def sgd(
    learning_rate: LearningRate,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> RowOptimizer:
    """torch's ``optim.SGD`` on sparse gradients: ``table[rows] -= lr * grad_rows``.

    Without momentum only the present rows are touched and the result equals dense SGD on the
    same gradient exactly. With ``momentum`` the buffer is dense, as torch's sparse momentum
    buffer becomes: every row touched before keeps moving (O(V) per step)::

        buf = grad                                  # first step
        buf = momentum * buf + (1 - dampening) * grad
        step = grad + momentum * buf if nesterov else buf
        table -= lr * step

    Args:
      learning_rate: a number >= 0, or an optax schedule (a function of the step count).
      momentum: torch's momentum factor, >= 0. Non-zero makes the state a ``(V, D)`` buffer.
      dampening: torch's dampening for momentum, >= 0.
      nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
      weight_decay: must be 0: torch refuses weight decay with sparse gradients.
      maximize: ascend instead of descend.
      stochastic_rounding: round a bfloat16 / float16 table's updated rows stochastically, an
        unbiased rounding (see the module's docstring). Off by default.
      seed: the stochastic rounding's seed.

    Returns:
      A :class:`RowOptimizer` whose state is a :class:`SgdState`.

    Raises:
      TypeError, ValueError: a bad argument, named; ``weight_decay != 0``; ``nesterov`` without
        momentum or with dampening.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> opt = jaxembed.sparse.sgd(0.1)
      >>> table = jnp.zeros((4, 2))
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([3, 1, 3]), jnp.ones((3, 2)))
      >>> table, state = opt.update(grad, opt.init(table), table)
      >>> table[:, 0]
      Array([ 0. , -0.1,  0. , -0.2], dtype=float32)
    """
    learning_rate = _check_learning_rate(learning_rate)
    momentum = _check_number("momentum", momentum)
    dampening = _check_number("dampening", dampening)
    nesterov = _validation.check_flag("nesterov", nesterov)
    maximize = _validation.check_flag("maximize", maximize)
    stochastic_rounding, seed = _check_rounding(stochastic_rounding, seed)
    _check_weight_decay("sgd", weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0 (as in torch)")
    if stochastic_rounding and momentum:
        raise ValueError(
            "stochastic_rounding rounds the rows an update touches; sgd with momentum moves the "
            "whole table each step (use it without momentum, or rowwise_adagrad)"
        )

    def init(table: ArrayLike) -> SgdState:
        table = _validation.check_table("table", table)
        buf = _zeros_like_table(table) if momentum else None
        return SgdState(jnp.zeros((), jnp.int32), buf)

    def update(
        grad: SparseGrad, state: SgdState, table: ArrayLike, *, column_axis=None, lr_scale=None
    ):
        if not momentum:
            table, indices, values, pooled = _checked(grad, table)
            lr = _rate(learning_rate, state.count, _scalar_dtype(table)).astype(table.dtype)
            if maximize:
                values, pooled = _negated(values, pooled)
            rounding = _rounding(stochastic_rounding, seed, state.count, table)

            def rows_update(table, r, g):
                # ``w + g * -lr`` in one expression, as optax's dense update is compiled (XLA
                # contracts it to a fused multiply-add), so the two agree bit for bit
                rate = lr if lr_scale is None else _per_row(lr, r, lr_scale, lr.dtype)[:, None]
                if rounding is not None:
                    step = g.astype(jnp.float32) * -rate.astype(jnp.float32)
                    return _sparse_update.add_rows(table, r, step, rounding)
                return _sparse_update.write_rows(
                    table, r, _sparse_update.read_rows(table, r) + g * -rate
                )

            def reference(table, states, rows, values):
                return _sparse_update.apply_rows(rows_update, rows, values, table), ()

            table, _ = _step(
                "sgd", reference, table, (), indices, values, pooled, lr, lr_scale, rounding
            )
            return table, state._replace(count=state.count + 1)
        table, rows, values = _prepare(grad, table)
        lr = _rate(learning_rate, state.count, _scalar_dtype(table)).astype(table.dtype)
        if maximize:
            values = -values
        if lr_scale is not None:
            raise ValueError(
                "lr_scale (a per-table learning rate) is not supported with momentum: the "
                "momentum buffer moves every row each step"
            )
        # torch: the first step's buffer is the gradient itself, later ones decay and add
        damp = jnp.where(state.count == 0, 1.0, 1.0 - dampening).astype(table.dtype)
        buf = _sparse_update.add_rows(state.momentum * momentum, rows, values * damp)
        step = buf
        if nesterov:
            step = _sparse_update.add_rows(buf * momentum, rows, values)
        return table + step * -lr, SgdState(state.count + 1, buf)

    return RowOptimizer(init, update)


def adagrad(
    learning_rate: LearningRate = 0.01,
    *,
    lr_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    maximize: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> RowOptimizer:
    """torch's ``optim.Adagrad`` on sparse gradients: a per-element sum of squares, present rows.

    With ``t`` the step number (from 1), for the rows present (duplicates summed first)::

        sum[rows] += g ** 2
        table[rows] -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum[rows]) + eps)

    Args:
      learning_rate: a number >= 0, or an optax schedule (a function of the step count).
      lr_decay: torch's learning-rate decay, >= 0.
      initial_accumulator_value: the initial value of every ``sum`` element, >= 0.
      eps: added to the square root, >= 0.
      weight_decay: must be 0: torch refuses weight decay with sparse gradients.
      maximize: ascend instead of descend.
      stochastic_rounding: round a bfloat16 / float16 table's updated rows stochastically, an
        unbiased rounding (see the module's docstring). Off by default.
      seed: the stochastic rounding's seed.

    Returns:
      A :class:`RowOptimizer` whose state is an :class:`AdagradState` (``sum``: ``(V, D)``).

    Raises:
      TypeError, ValueError: a bad argument, named; ``weight_decay != 0``.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> opt = jaxembed.sparse.adagrad(0.5)
      >>> table = jnp.zeros((3, 1))
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([2]), jnp.array([[4.0]]))
      >>> table, state = opt.update(grad, opt.init(table), table)
      >>> table[:, 0], state.sum[:, 0]
      (Array([ 0. ,  0. , -0.5], dtype=float32), Array([ 0.,  0., 16.], dtype=float32))
    """
    learning_rate = _check_learning_rate(learning_rate)
    lr_decay = _check_number("lr_decay", lr_decay)
    initial_accumulator_value = _check_number(
        "initial_accumulator_value", initial_accumulator_value
    )
    eps = _check_number("eps", eps)
    maximize = _validation.check_flag("maximize", maximize)
    stochastic_rounding, seed = _check_rounding(stochastic_rounding, seed)
    _check_weight_decay("adagrad", weight_decay)

    def init(table: ArrayLike) -> AdagradState:
        return AdagradState(
            jnp.zeros((), jnp.int32), _zeros_like_table(table, initial_accumulator_value)
        )

    def update(
        grad: SparseGrad, state: AdagradState, table: ArrayLike, *, column_axis=None, lr_scale=None
    ):
        table, indices, values, pooled = _checked(grad, table)
        count = state.count.astype(_scalar_dtype(table))
        clr = _rate(learning_rate, state.count, count.dtype) / (1.0 + count * lr_decay)
        clr = clr.astype(table.dtype)
        rounding = _rounding(stochastic_rounding, seed, state.count, table)

        def rows_update(carry, r, g):
            table, acc_table = carry
            g = g * _sign(maximize)
            acc = _sparse_update.read_rows(acc_table, r) + g * g
            std = jnp.sqrt(acc) + eps
            return (
                _sparse_update.add_rows(
                    table, r, g / std * -_per_row(clr, r, lr_scale, clr.dtype)[..., None], rounding
                ),
                _sparse_update.write_rows(acc_table, r, acc),
            )

        def reference(table, states, rows, values):
            table, acc = _sparse_update.apply_rows(rows_update, rows, values, (table, *states))
            return table, (acc,)

        table, (acc,) = _step("adagrad", reference, table, (state.sum,), indices, values, pooled,
                              clr, lr_scale, rounding, eps=eps, maximize=maximize)  # fmt: skip
        return table, AdagradState(state.count + 1, acc)

    return RowOptimizer(init, update)


def rowwise_adagrad(
    learning_rate: LearningRate = 0.01,
    *,
    eps: float = 1e-8,
    initial_accumulator_value: float = 0.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> RowOptimizer:
    """FBGEMM's row-wise Adagrad: one accumulator per row (float32, or float64 for float64 tables).

    For each present row (duplicates summed first), with ``g += weight_decay * table[row]``::

        sum[row] += mean(g ** 2)
        table[row] -= lr / (sqrt(sum[row]) + eps) * g

    Args:
      learning_rate: a number >= 0, or an optax schedule (a function of the step count).
      eps: added to the square root, >= 0.
      initial_accumulator_value: the initial value of every row's ``sum``, >= 0.
      weight_decay: FBGEMM's L2 mode: ``weight_decay * table[row]`` is added to the gradient of
        each present row, >= 0.
      maximize: ascend instead of descend.
      stochastic_rounding: round a bfloat16 / float16 table's updated rows stochastically, an
        unbiased rounding (see the module's docstring). Off by default.
      seed: the stochastic rounding's seed.

    Returns:
      A :class:`RowOptimizer` whose state is a :class:`RowwiseAdagradState` (``sum``: ``(V,)``,
      ``embedding_dim`` times smaller than Adagrad's).

    Raises:
      TypeError, ValueError: a bad argument, named.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> opt = jaxembed.sparse.rowwise_adagrad(1.0, eps=0.0)
      >>> table = jnp.zeros((2, 2))
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([1]), jnp.array([[3.0, 4.0]]))
      >>> table, state = opt.update(grad, opt.init(table), table)
      >>> state.sum
      Array([ 0. , 12.5], dtype=float32)
    """
    learning_rate = _check_learning_rate(learning_rate)
    eps = _check_number("eps", eps)
    initial_accumulator_value = _check_number(
        "initial_accumulator_value", initial_accumulator_value
    )
    weight_decay = _check_number("weight_decay", weight_decay)
    maximize = _validation.check_flag("maximize", maximize)
    stochastic_rounding, seed = _check_rounding(stochastic_rounding, seed)

    def init(table: ArrayLike) -> RowwiseAdagradState:
        table = _validation.check_table("table", table)
        acc = jnp.full(table.shape[:1], initial_accumulator_value, _scalar_dtype(table))
        return RowwiseAdagradState(jnp.zeros((), jnp.int32), acc)

    def update(
        grad: SparseGrad,
        state: RowwiseAdagradState,
        table: ArrayLike,
        *,
        column_axis=None,
        lr_scale=None,
    ):
        table, indices, values, pooled = _checked(grad, table)
        cdt = _scalar_dtype(table)
        lr = _rate(learning_rate, state.count, cdt)
        rounding = _rounding(stochastic_rounding, seed, state.count, table)

        def rows_update(carry, r, g):
            table, acc_table = carry
            g = g.astype(cdt) * _sign(maximize)
            if weight_decay:
                g = g + weight_decay * _sparse_update.read_rows(table, r).astype(cdt)
            acc = _sparse_update.read_rows(acc_table, r) + _sparse_update.row_mean(
                g * g, column_axis
            )
            multiplier = _per_row(lr, r, lr_scale, cdt) / (jnp.sqrt(acc) + eps)
            return (
                _sparse_update.add_rows(table, r, g * -multiplier[:, None], rounding),
                _sparse_update.write_rows(acc_table, r, acc),
            )

        def reference(table, states, rows, values):
            table, acc = _sparse_update.apply_rows(rows_update, rows, values, (table, *states))
            return table, (acc,)

        if column_axis is not None:  # the row statistic sums over the devices' columns
            rows, values = _sparse_update.coalesce(SparseGrad(indices, values), table.shape[0])
            table, (acc,) = reference(table, (state.sum,), rows, values)
        else:
            table, (acc,) = _step("rowwise_adagrad", reference, table, (state.sum,), indices,
                                  values, pooled, lr, lr_scale, rounding, eps=eps,
                                  weight_decay=weight_decay, maximize=maximize)  # fmt: skip
        return table, RowwiseAdagradState(state.count + 1, acc)

    return RowOptimizer(init, update)


def lazy_adam(
    learning_rate: LearningRate = 0.001,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    maximize: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> RowOptimizer:
    """torch's ``optim.SparseAdam``: Adam whose moments update only on the rows present.

    With ``t`` the step number (from 1, global: every call counts for bias correction, as in
    torch), for the rows present (duplicates summed first)::

        mu[rows] += (g - mu[rows]) * (1 - b1)
        nu[rows] += (g ** 2 - nu[rows]) * (1 - b2)
        table[rows] -= lr * sqrt(1 - b2 ** t) / (1 - b1 ** t) * mu / (sqrt(nu) + eps)

    Args:
      learning_rate: a number >= 0, or an optax schedule (a function of the step count).
      b1: the first moment's decay, in [0, 1).
      b2: the second moment's decay, in [0, 1).
      eps: added to the square root, >= 0.
      maximize: ascend instead of descend.
      stochastic_rounding: round a bfloat16 / float16 table's updated rows stochastically, an
        unbiased rounding (see the module's docstring). Off by default.
      seed: the stochastic rounding's seed.

    Returns:
      A :class:`RowOptimizer` whose state is a :class:`LazyAdamState` (``mu``, ``nu``:
      ``(V, D)``).

    Raises:
      TypeError, ValueError: a bad argument, named.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> opt = jaxembed.sparse.lazy_adam(0.1)
      >>> table = jnp.zeros((3, 1))
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([0]), jnp.array([[2.0]]))
      >>> table, state = opt.update(grad, opt.init(table), table)
      >>> table[:, 0]
      Array([-0.1,  0. ,  0. ], dtype=float32)
    """
    learning_rate = _check_learning_rate(learning_rate)
    b1 = _check_number("b1", b1, below=1.0)
    b2 = _check_number("b2", b2, below=1.0)
    eps = _check_number("eps", eps)
    maximize = _validation.check_flag("maximize", maximize)
    stochastic_rounding, seed = _check_rounding(stochastic_rounding, seed)

    def init(table: ArrayLike) -> LazyAdamState:
        return LazyAdamState(
            jnp.zeros((), jnp.int32), _zeros_like_table(table), _zeros_like_table(table)
        )

    def update(
        grad: SparseGrad, state: LazyAdamState, table: ArrayLike, *, column_axis=None, lr_scale=None
    ):
        table, indices, values, pooled = _checked(grad, table)
        step = state.count + 1
        t = step.astype(_scalar_dtype(table))
        step_size = _rate(learning_rate, state.count, t.dtype) * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        step_size = step_size.astype(table.dtype)
        rounding = _rounding(stochastic_rounding, seed, state.count, table)

        def rows_update(carry, r, g):
            table, mu_table, nu_table = carry
            g = g * _sign(maximize)
            mu_old = _sparse_update.read_rows(mu_table, r)
            nu_old = _sparse_update.read_rows(nu_table, r)
            # torch's order of operations: the moment updates first, then the moments
            mu = mu_old + (g - mu_old) * (1 - b1)
            nu = nu_old + (g * g - nu_old) * (1 - b2)
            return (
                _sparse_update.add_rows(
                    table,
                    r,
                    mu
                    / (jnp.sqrt(nu) + eps)
                    * -_per_row(step_size, r, lr_scale, step_size.dtype)[..., None],
                    rounding,
                ),
                _sparse_update.write_rows(mu_table, r, mu),
                _sparse_update.write_rows(nu_table, r, nu),
            )

        def reference(table, states, rows, values):
            table, mu, nu = _sparse_update.apply_rows(rows_update, rows, values, (table, *states))
            return table, (mu, nu)

        table, (mu, nu) = _step("lazy_adam", reference, table, (state.mu, state.nu), indices,
                                values, pooled, step_size, lr_scale, rounding, eps=eps, b1=b1,
                                b2=b2, maximize=maximize)  # fmt: skip
        return table, LazyAdamState(step, mu, nu)

    return RowOptimizer(init, update, applies_dense=False)


def fresh_state(optimizer: RowOptimizer, state: Any, table: jax.Array, rows: jax.Array) -> Any:
    """``state`` with ``rows`` (``(k,)`` int32, padded with any value outside ``[0, V)``) back
    to what ``optimizer.init`` gives a fresh row: every leaf whose leading dimension is the
    table's ``V`` rows; other leaves (the step count) are left alone."""
    num_rows = table.shape[0]
    rows = jnp.where(rows < 0, jnp.iinfo(jnp.int32).max, rows).astype(jnp.int32)
    # a fresh row's state, of a row of zeros (not the table's first row, which a mesh splits)
    fresh = optimizer.init(jnp.zeros((1, *table.shape[1:]), table.dtype))

    def reset(leaf, one):
        if not hasattr(leaf, "shape") or leaf.ndim == 0 or leaf.shape[0] != num_rows:
            return leaf
        value = jnp.broadcast_to(jnp.asarray(one)[0], (rows.shape[0], *leaf.shape[1:]))
        return _layout.set_rows(leaf, rows, value.astype(leaf.dtype))

    return jax.tree.map(reset, state, fresh)


def sharded(optimizer: RowOptimizer, sharding: Any) -> RowOptimizer:
    """``optimizer`` for a table laid out as ``sharding`` says: every device updates its rows.

    ``init`` builds the state on the mesh (each device its own block: a ``(V, D)`` state is never
    materialised on one device); ``update`` takes the :class:`~jaxembed.sparse.SparseGrad` of a
    sharded :func:`jaxembed.sparse.lookup` and returns the table and state with the table's
    sharding. Donate both to the jitted step to update in place.

    Args:
      optimizer: a :class:`~jaxembed.sparse.RowOptimizer`: any of :mod:`jaxembed.sparse`, or
        your own. With the table's columns split (``sharding.dim``), its ``update`` must take a
        ``column_axis`` keyword: the mesh axis a row's columns are split over, which a row-wise
        statistic must sum over (:func:`jaxembed.sparse.row_mean` does).
      sharding: the table's :class:`jaxembed.TableSharding`.

    Returns:
      A :class:`~jaxembed.sparse.RowOptimizer` whose ``init`` and ``update`` run on the mesh.

    Raises:
      TypeError: ``optimizer`` is not a ``RowOptimizer``; ``sharding`` is not a
        ``TableSharding``; the columns are split and ``optimizer.update`` takes no
        ``column_axis``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> layout = jaxembed.TableSharding(mesh, vocab="model")
      >>> opt = jaxembed.sparse.sharded(jaxembed.sparse.sgd(0.5), layout)
      >>> table = layout.put({"weight": jnp.zeros((4, 2))})["weight"]
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([1, 1]), jnp.ones((2, 2)))
      >>> table, state = opt.update(grad, opt.init(table), table)
      >>> table[:, 0]
      Array([ 0., -1.,  0.,  0.], dtype=float32)
    """
    layout = _layout.check(sharding)
    if layout is _layout.LOCAL:
        raise TypeError("sharding must be a jaxembed.TableSharding, got None")
    return layout.rowwise(optimizer)


for _state in (SgdState, AdagradState, RowwiseAdagradState, LazyAdamState):
    _serialization.register_namedtuple(_state, f"sparse.{_state.__name__}")
