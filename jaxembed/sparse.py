"""Sparse training of large tables: row-wise optimizer updates that cost O(batch), not O(vocab).

A functional step::

    rows, lk = jaxembed.sparse.lookup(params, ids, padding_idx=0, max_norm=1.0)
    loss, (row_grads, dense_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(rows, dense)
    table, table_state = opt.update(lk.grad(row_grads), table_state, lk.params["weight"])

With ``flax.nnx``, label the table with ``jaxembed.Embedding(..., sparse=True)`` and train the
whole model with :func:`value_and_grad` and :class:`Optimizer`: the sparse tables get the
row-wise optimizer, every other parameter its optax one, in the same jitted step.
"""

from jaxembed._sharded_update import sharded
from jaxembed._sparse_lookup import SparseGrad, SparseLookup, concat, lookup
from jaxembed._sparse_nnx import Optimizer, SparseGrads, SparseParam, value_and_grad
from jaxembed._sparse_optimizers import (
    AdagradState,
    LazyAdamState,
    RowwiseAdagradState,
    SgdState,
    SparseOptimizer,
    adagrad,
    lazy_adam,
    rowwise_adagrad,
    sgd,
)

__all__ = [
    "AdagradState",
    "LazyAdamState",
    "Optimizer",
    "RowwiseAdagradState",
    "SgdState",
    "SparseGrad",
    "SparseGrads",
    "SparseLookup",
    "SparseOptimizer",
    "SparseParam",
    "adagrad",
    "concat",
    "lazy_adam",
    "lookup",
    "rowwise_adagrad",
    "sgd",
    "sharded",
    "value_and_grad",
]
