"""Sparse training of large tables: row-wise optimizer updates that cost O(batch), not O(vocab).

A functional step::

    rows, lk = jaxembed.sparse.lookup(params, ids, padding_idx=0, max_norm=1.0)
    loss, (row_grads, dense_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(rows, dense)
    table, table_state = opt.update(lk.grad(row_grads), table_state, lk.params["weight"])

With ``flax.nnx``, label the table with ``jaxembed.Embedding(..., sparse=True)`` and train the
whole model with :func:`value_and_grad` and :class:`Optimizer`: the sparse tables get the
row-wise optimizer, every other parameter its optax one, in the same jitted step.

What this folder owns, module by module:

* ``_lookup``: :func:`lookup` and :func:`lookup_bags` (the core's pipeline, without the table
  gradient), :class:`SparseGrad`, :class:`SparseLookup` and :class:`BagLookup`;
* ``_update``: the sparse update every optimizer shares: duplicates summed, rows read and
  written once;
* ``_optimizers``: the row-wise optimizers (:class:`RowOptimizer`), and :func:`sharded`, which
  hands one to a sharded table's layout;
* ``_nnx``: sparse tables in ``flax.nnx`` (:class:`SparseParam`, :func:`value_and_grad`,
  :class:`Optimizer`).

It may import :mod:`jaxembed.core`, and nothing else of jaxembed. A table on a mesh gets its
sharded update from its layout (``Layout.rowwise``), never by importing the sharding folder.
"""

import warnings as _warnings

from jaxembed.sparse._lookup import (
    BagLookup,
    SparseGrad,
    SparseLookup,
    lookup,
    lookup_bags,
    sum_grads,
)
from jaxembed.sparse._nnx import ModelGrads, Optimizer, SparseParam, value_and_grad
from jaxembed.sparse._optimizers import (
    AdagradState,
    LazyAdamState,
    RowOptimizer,
    RowwiseAdagradState,
    SgdState,
    adagrad,
    lazy_adam,
    rowwise_adagrad,
    sgd,
    sharded,
)
from jaxembed.sparse._update import row_mean

__all__ = [
    "AdagradState",
    "BagLookup",
    "LazyAdamState",
    "ModelGrads",
    "Optimizer",
    "RowOptimizer",
    "RowwiseAdagradState",
    "SgdState",
    "SparseGrad",
    "SparseLookup",
    "SparseParam",
    "adagrad",
    "lazy_adam",
    "lookup",
    "lookup_bags",
    "row_mean",
    "rowwise_adagrad",
    "sgd",
    "sharded",
    "sum_grads",
    "value_and_grad",
]

# the names of jaxembed 0.1, which misled: kept, with a DeprecationWarning
_RENAMED = {"SparseGrads": "ModelGrads", "SparseOptimizer": "RowOptimizer", "concat": "sum_grads"}


def __getattr__(name: str):
    if name in _RENAMED:
        new = _RENAMED[name]
        _warnings.warn(
            f"jaxembed.sparse.{name} is now jaxembed.sparse.{new}", DeprecationWarning, stacklevel=2
        )
        return globals()[new]
    raise AttributeError(f"module 'jaxembed.sparse' has no attribute {name!r}")
