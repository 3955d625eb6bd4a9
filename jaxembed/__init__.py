"""jaxembed: torch's ``nn.Embedding`` semantics for JAX: pure, jit-able functions and Flax modules.

The package, folder by folder (each folder's ``__init__`` says what it owns and may import):

* :mod:`jaxembed.core`: the functional core: :func:`embedding`, :func:`embedding_bag`,
  :func:`renorm`, :func:`init`, and the one lookup pipeline under all of them;
* :mod:`jaxembed.sparse`: sparse training of large tables (row-wise optimizers);
* :mod:`jaxembed.collections`: many tables over jagged keyed features (TorchRec's names);
* :mod:`jaxembed.collisions`: managed collisions: raw 64-bit ids mapped onto a fixed table,
  with eviction (TorchRec's ``MCHManagedCollisionModule``), as an explicit state update;
* :mod:`jaxembed.sharding`: :class:`TableSharding`, tables split over a JAX mesh, and
  :func:`plan`, a collection's tables placed on one;
* :mod:`jaxembed.quantized`: 8-, 4- and 2-bit row-wise tables in torch's and FBGEMM's bytes;
* :mod:`jaxembed.modules`: the Flax modules (nnx here as :class:`Embedding` and
  :class:`EmbeddingBag`; linen as :mod:`jaxembed.linen`);
* :mod:`jaxembed.serving`: a forward pass exported with ``jax.export``, its tables beside it;
* :mod:`jaxembed.checkpoint`: delta checkpoints of the rows a step changed, crash-safe saves;
* :mod:`jaxembed.bench`: the ``jaxembed-bench`` command.

``jaxembed.linen``, ``jaxembed.serving``, ``jaxembed.checkpoint`` and ``jaxembed.bench`` are
imported when first used, as ``flax.linen`` is.
"""

import importlib as _importlib

from jaxembed import collections, collisions, quantized, sharding, sparse
from jaxembed._interop import (
    from_torch,
    load_safetensors,
    safetensors_names,
    save_safetensors,
    to_torch,
)
from jaxembed.collections import (
    EmbeddingBagConfig,
    EmbeddingConfig,
    KeyedJagged,
    embedding_bag_collection,
    embedding_collection,
)
from jaxembed.collisions import ManagedCollision
from jaxembed.core import (
    LookupStyle,
    default_embedding_init,
    embedding,
    embedding_bag,
    init,
    pad_bags,
    renorm,
)
from jaxembed.modules import (
    Embed,
    Embedding,
    EmbeddingBag,
    EmbeddingBagCollection,
    EmbeddingCollection,
    FrozenWeight,
    ManagedCollisionEmbedding,
    ManagedCollisionEmbeddingBag,
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
    ManagedCollisionState,
    QuantizedWeight,
    RoutingStats,
)
from jaxembed.quantized import QuantizedTable, dequantize, quantize
from jaxembed.sharding import ShardingPlan, TableSharding, plan

__version__ = "0.1.0"

__all__ = [
    "Embed",
    "Embedding",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "FrozenWeight",
    "KeyedJagged",
    "LookupStyle",
    "ManagedCollision",
    "ManagedCollisionEmbedding",
    "ManagedCollisionEmbeddingBag",
    "ManagedCollisionEmbeddingBagCollection",
    "ManagedCollisionEmbeddingCollection",
    "ManagedCollisionState",
    "QuantizedTable",
    "QuantizedWeight",
    "RoutingStats",
    "ShardingPlan",
    "TableSharding",
    "checkpoint",
    "collections",
    "collisions",
    "default_embedding_init",
    "dequantize",
    "embedding",
    "embedding_bag",
    "embedding_bag_collection",
    "embedding_collection",
    "from_torch",
    "init",
    "linen",
    "load_safetensors",
    "pad_bags",
    "plan",
    "quantize",
    "quantized",
    "renorm",
    "safetensors_names",
    "save_safetensors",
    "serving",
    "sharding",
    "sparse",
    "to_torch",
]

_LAZY = ("linen", "bench", "serving", "checkpoint")


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"jaxembed.{name}")
    raise AttributeError(f"module 'jaxembed' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
