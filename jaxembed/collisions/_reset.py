"""Evicted rows back to the table's init, and their optimizer state with them.

An evicted slot is taken by a new id. TorchRec's sharded managed-collision collection resets the
slot's row (its ``init_fn``) and its row-wise Adagrad state before the lookup of the same call;
its unsharded module leaves both as they were, so the new id inherits the old id's trained row.
jaxembed follows the sharded semantics: call :func:`reset_rows` and :func:`reset_state` with
:attr:`Remapped.evicted <jaxembed.collisions.Remapped>` between the remap and the lookup. Not
calling them keeps the rows, TorchRec's unsharded behaviour.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxembed.core import _init, _validation
from jaxembed.sparse import _optimizers


def reset_rows(
    evicted: ArrayLike,
    table: ArrayLike,
    key: jax.Array,
    *,
    init: _init.Initializer = _init.default_embedding_init,
) -> jax.Array:
    """``table`` with the rows in ``evicted`` drawn afresh from ``init``.

    Args:
      evicted: ``(k,)`` int32 slots, padded with any value outside ``[0, V)`` (as
        :class:`~jaxembed.collisions.Remapped` pads with ``num_slots``).
      table: ``(V, D)`` floats.
      key: the random key of the fresh rows.
      init: ``init(key, (k, D), dtype)``, the table's initializer (torch's ``N(0, 1)`` by
        default; TorchRec's configs use ``uniform(-sqrt(1 / V), sqrt(1 / V))``).

    Returns:
      The table, other rows untouched. Donate it, and XLA writes the rows in place.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxembed.collisions import reset_rows
      >>> table = jnp.ones((4, 2))
      >>> zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)
      >>> reset_rows(jnp.array([2, 4]), table, jax.random.key(0), init=zeros)[:, 0]
      Array([1., 1., 0., 1.], dtype=float32)
    """
    table = _validation.check_table("table", table)
    evicted = _evicted(evicted)
    rows = init(key, (evicted.shape[0], table.shape[1]), table.dtype)
    return table.at[evicted].set(rows.astype(table.dtype), mode="drop")


def reset_state(evicted: ArrayLike, state: Any, optimizer: Any, table: ArrayLike) -> Any:
    """A row-wise optimizer's ``state`` with the rows in ``evicted`` back to ``optimizer.init``.

    Every leaf of the state whose leading dimension is the table's ``V`` rows (Adagrad's sum,
    momentum, Adam's moments) gets, at each evicted row, the value ``optimizer.init`` gives a
    fresh row; other leaves (the step count) are left alone.

    Args:
      evicted: ``(k,)`` int32 slots, padded with any value outside ``[0, V)``.
      state: the optimizer's state for ``table``.
      optimizer: a :class:`jaxembed.sparse.RowOptimizer` (its ``init`` is called on one row).
      table: the ``(V, D)`` table the state is for.

    Returns:
      The state.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> from jaxembed.collisions import reset_state
      >>> opt = jaxembed.sparse.rowwise_adagrad(0.1)
      >>> table = jnp.zeros((3, 2))
      >>> state = opt.init(table)._replace(sum=jnp.array([5.0, 6.0, 7.0]))
      >>> reset_state(jnp.array([1, 3]), state, opt, table).sum
      Array([5., 0., 7.], dtype=float32)
    """
    table = _validation.check_table("table", table)
    return _optimizers.fresh_state(optimizer, state, table, _evicted(evicted))


def _evicted(evicted: ArrayLike) -> jax.Array:
    evicted = jnp.asarray(evicted)
    if evicted.ndim != 1 or not jnp.issubdtype(evicted.dtype, jnp.integer):
        raise ValueError(
            f"evicted must be a 1-D integer array of slots, got {evicted.dtype} {evicted.shape}"
        )
    # a negative entry would wrap: every padding entry is sent past the table
    return jnp.where(evicted < 0, jnp.iinfo(jnp.int32).max, evicted).astype(jnp.int32)
