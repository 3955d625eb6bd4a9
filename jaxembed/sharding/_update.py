"""Row-wise optimizers on a sharded table: each device updates only the rows it owns, in place.

:func:`shard_optimizer` (public as :func:`jaxembed.sparse.sharded`) wraps any
:class:`~jaxembed.sparse.RowOptimizer`. Inside ``jax.shard_map`` every device receives the whole
:class:`~jaxembed.sparse.SparseGrad` (its entries, not the table, are gathered over ``batch``:
O(batch x embedding_dim)), maps the indices to its own rows (another shard's become the local
sentinel, which the update drops), and runs the unsharded update on its block of the table and
of the optimizer state. Duplicates are summed in the gradient's global order, so the result
equals the unsharded update. When the columns are split, the optimizer's ``update`` is given the
mesh axis as ``column_axis``, so that a row-wise statistic (row-wise Adagrad's mean square) sums
over every column shard.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxembed.core import _validation
from jaxembed.sparse._lookup import SparseGrad
from jaxembed.sparse._optimizers import RowOptimizer


def _state_specs(state: Any, sharding: Any) -> Any:
    """A state leaf's spec from its rank: a scalar is replicated, ``(V,)`` split over ``vocab``,
    ``(V, D)`` laid out as the table."""

    def spec(leaf):
        if leaf.ndim == 0:
            return P()
        if leaf.ndim == 1:
            return P(sharding.vocab)
        if leaf.ndim == 2:
            return sharding.spec
        raise ValueError(
            f"a sharded optimizer's state holds scalars, (V,) and (V, D) arrays; got {leaf.shape}"
        )

    return jax.tree.map(spec, state)


def _takes_column_axis(update: Any) -> bool:
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == "column_axis" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def shard_optimizer(optimizer: RowOptimizer, sharding: Any) -> RowOptimizer:
    """:func:`jaxembed.sparse.sharded` for a :class:`jaxembed.TableSharding` (its ``rowwise``)."""
    if not isinstance(optimizer, RowOptimizer):
        raise TypeError(
            f"optimizer must be a jaxembed.sparse.RowOptimizer, got {type(optimizer).__name__}"
        )
    if sharding.dim is not None and not _takes_column_axis(optimizer.update):
        raise TypeError(
            f"the table's columns are split over {sharding.dim!r}, so optimizer.update must take "
            "a column_axis keyword (the mesh axis a row-wise statistic sums over; see "
            "jaxembed.sparse.row_mean)"
        )

    def bound(table: Any) -> tuple[Any, Any]:
        table = _validation.check_table("table", table)
        return table, sharding.bind(table.shape, None)

    def local_state_specs(table, layout):
        rows = table.shape[0] // layout.count("vocab", layout.mesh)
        cols = table.shape[1] // layout.count("dim", layout.mesh)
        local = jax.ShapeDtypeStruct((rows, cols), table.dtype)
        return _state_specs(jax.eval_shape(optimizer.init, local), layout)

    def init(table: Any) -> Any:
        table, layout = bound(table)
        specs = local_state_specs(table, layout)
        return layout.map(optimizer.init, (layout.spec,), specs, table)

    def update(grad: SparseGrad, state: Any, table: Any) -> tuple[jax.Array, Any]:
        table, layout = bound(table)
        if not isinstance(grad, SparseGrad):
            raise TypeError(f"grad must be a jaxembed.sparse.SparseGrad, got {type(grad).__name__}")
        n = grad.indices.shape[0] if grad.indices.ndim else 0
        entries = layout.entries(n)
        num_local = table.shape[0] // layout.count("vocab", layout.mesh)
        specs = local_state_specs(table, layout)

        def body(indices, values, state, table):
            indices = entries.everyone(indices)
            values = entries.everyone(values)
            indices = layout.localizer(num_local)(indices)
            if layout.vocab is not None:
                # each vocab shard sums and applies its own entries: the values become its own
                values = jax.lax.pcast(values, layout.vocab, to="varying")
            grad = SparseGrad(indices, values)
            if layout.dim is None:
                return optimizer.update(grad, state, table)
            return optimizer.update(grad, state, table, column_axis=layout.dim)

        in_specs = (P(entries.batch), P(entries.batch, layout.dim), specs, layout.spec)
        return layout.map(
            body, in_specs, (layout.spec, specs), grad.indices, grad.values, state, table
        )

    return RowOptimizer(init, update, optimizer.applies_dense)
