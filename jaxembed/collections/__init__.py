"""Collections: many tables looked up from jagged keyed features in one step (TorchRec's names).

* :class:`KeyedJagged`: every feature's variable-length ids for a batch, one jit-able pytree;
* :class:`EmbeddingBagConfig` / :class:`EmbeddingConfig`: one table each, with every torch
  option (``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq``);
* :func:`embedding_bag_collection` / :func:`embedding_collection`: the functional forward;
* :func:`lookup` and :func:`optimizer`: sparse training, one fused row-wise update per stack.

Tables that can share a physical table are *stacked* (``_config``): one gather, one renorm
pass and one sparse update per stack, bit for bit the results of separate tables.

What this folder owns, module by module:

* ``_jagged``: :class:`KeyedJagged`;
* ``_config``: the table configs and the stacking plan;
* ``_collection``: the lookups of a collection, through the core's pipeline, and its sparse
  training.

It may import :mod:`jaxembed.core` and :mod:`jaxembed.sparse`. Its nnx modules
(:class:`jaxembed.EmbeddingBagCollection`, :class:`jaxembed.EmbeddingCollection`) are in
:mod:`jaxembed.modules`.
"""

from jaxembed.collections._collection import (
    CollectionLookup,
    CollectionOptimizer,
    Jagged,
    concat_pooled,
    embedding_bag_collection,
    embedding_collection,
    init,
    lookup,
    optimizer,
    stack_tables,
    tables_of,
)
from jaxembed.collections._config import EmbeddingBagConfig, EmbeddingConfig
from jaxembed.collections._jagged import KeyedJagged

__all__ = [
    "CollectionLookup",
    "CollectionOptimizer",
    "EmbeddingBagConfig",
    "EmbeddingConfig",
    "Jagged",
    "KeyedJagged",
    "concat_pooled",
    "embedding_bag_collection",
    "embedding_collection",
    "init",
    "lookup",
    "optimizer",
    "stack_tables",
    "tables_of",
]
