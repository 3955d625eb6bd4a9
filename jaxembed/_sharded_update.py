"""Row-wise optimizers on a sharded table: each device updates only the rows it owns, in place.

:func:`sharded` wraps any :class:`~jaxembed.sparse.SparseOptimizer`. Inside ``jax.shard_map``
every device receives the whole :class:`~jaxembed.sparse.SparseGrad` (its entries, not the
table, are gathered over ``batch``: O(batch x embedding_dim)), maps the indices to its own rows
(another shard's become the local sentinel, which the update drops), and runs the unsharded
update on its block of the table and of the optimizer state. Duplicates are summed in the
gradient's global order, so the result equals the unsharded update. Row-wise Adagrad's mean
square sums over the column shards when the columns are split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxembed import _sharded_lookup, _sharding, _sparse_update, _validation
from jaxembed._sparse_lookup import SparseGrad
from jaxembed._sparse_optimizers import SparseOptimizer


def _state_specs(state: Any, sharding: _sharding.TableSharding) -> Any:
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


def sharded(optimizer: SparseOptimizer, sharding: _sharding.TableSharding) -> SparseOptimizer:
    """``optimizer`` for a table laid out as ``sharding`` says: every device updates its rows.

    ``init`` builds the state on the mesh (each device its own block: a ``(V, D)`` state is never
    materialised on one device); ``update`` takes the :class:`~jaxembed.sparse.SparseGrad` of a
    sharded :func:`jaxembed.sparse.lookup` and returns the table and state with the table's
    sharding. Donate both to the jitted step to update in place.

    Args:
      optimizer: any row-wise optimizer of :mod:`jaxembed.sparse`.
      sharding: the table's :class:`jaxembed.TableSharding`.

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
    if not isinstance(optimizer, SparseOptimizer):
        raise TypeError(
            f"optimizer must be a jaxembed.sparse.SparseOptimizer, got {type(optimizer).__name__}"
        )
    _sharding.check_sharding(sharding)
    if sharding is None:
        raise TypeError("sharding must be a jaxembed.TableSharding, got None")

    def bound(table: Any) -> tuple[Any, _sharding.TableSharding]:
        table = _validation.check_table("table", table)
        return table, _sharding.bind(sharding, table.shape, None)

    def local_state_specs(table, layout):
        rows = table.shape[0] // layout.count("vocab", layout.mesh)
        cols = table.shape[1] // layout.count("dim", layout.mesh)
        local = jax.ShapeDtypeStruct((rows, cols), table.dtype)
        return _state_specs(jax.eval_shape(optimizer.init, local), layout)

    def init(table: Any) -> Any:
        table, layout = bound(table)
        specs = local_state_specs(table, layout)
        return _sharded_lookup.run(optimizer.init, layout, (layout.spec,), specs, table)

    def update(grad: SparseGrad, state: Any, table: Any) -> tuple[jax.Array, Any]:
        table, layout = bound(table)
        if not isinstance(grad, SparseGrad):
            raise TypeError(f"grad must be a jaxembed.sparse.SparseGrad, got {type(grad).__name__}")
        n = grad.indices.shape[0] if grad.indices.ndim else 0
        split = layout.batch is not None and n % layout.count("batch", layout.mesh) == 0
        entries = layout if split else dataclasses.replace(layout, batch=None)
        num_local = table.shape[0] // layout.count("vocab", layout.mesh)
        specs = local_state_specs(table, layout)

        def body(indices, values, state, table):
            indices = _sharded_lookup.everyone(indices, entries)
            values = _sharded_lookup.everyone(values, entries)
            indices = _sharded_lookup.localizer(num_local, layout)(indices)
            if layout.vocab is not None:
                # each vocab shard sums and applies its own entries: the values become its own
                values = jax.lax.pcast(values, layout.vocab, to="varying")
            with _sparse_update.columns_split_over(layout.dim):
                return optimizer.update(SparseGrad(indices, values), state, table)

        in_specs = (P(entries.batch), P(entries.batch, layout.dim), specs, layout.spec)
        return _sharded_lookup.run(
            body, layout, in_specs, (layout.spec, specs), grad.indices, grad.values, state, table
        )

    return SparseOptimizer(init, update)
