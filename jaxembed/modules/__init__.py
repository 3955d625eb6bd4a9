"""The Flax modules over the functional core: thin layers that hold the table and call the core.

What this folder owns, module by module:

* ``_nnx``: ``flax.nnx`` :class:`~jaxembed.Embedding`, :class:`~jaxembed.EmbeddingBag`,
  :class:`~jaxembed.FrozenWeight`, :class:`~jaxembed.QuantizedWeight` (a quantized module's
  frozen rows) and :class:`~jaxembed.RoutingStats` (a sharded collection's last routing);
* ``_linen``: the ``flax.linen`` modules (public as :mod:`jaxembed.linen`);
* ``_collection``: the ``flax.nnx`` :class:`~jaxembed.EmbeddingBagCollection` and
  :class:`~jaxembed.EmbeddingCollection` over :mod:`jaxembed.collections`;
* ``_managed``: :class:`~jaxembed.ManagedCollisionEmbeddingBagCollection` and
  :class:`~jaxembed.ManagedCollisionEmbeddingCollection`, a collection behind
  :mod:`jaxembed.collisions`' remappers, their states held as variables (and
  :class:`~jaxembed.ManagedCollisionEmbedding` / :class:`~jaxembed.ManagedCollisionEmbeddingBag`,
  one table behind one);
* ``_table``: what both share (dtype checks, the initial table, the tied head).

It may import :mod:`jaxembed.core`, :mod:`jaxembed.sparse`, :mod:`jaxembed.sharding`,
:mod:`jaxembed.collections`, :mod:`jaxembed.collisions`, :mod:`jaxembed.quantized` and the
torch interop. Each
module builds its :class:`~jaxembed.core.LookupOptions` once, at construction, and hands that
one value to the core on every call.
"""

from jaxembed.modules._collection import EmbeddingBagCollection, EmbeddingCollection
from jaxembed.modules._managed import (
    ManagedCollisionEmbedding,
    ManagedCollisionEmbeddingBag,
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
    ManagedCollisionState,
)
from jaxembed.modules._nnx import (
    Embed,
    Embedding,
    EmbeddingBag,
    FrozenWeight,
    QuantizedWeight,
    RoutingStats,
)

__all__ = [
    "Embed",
    "Embedding",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "EmbeddingCollection",
    "FrozenWeight",
    "ManagedCollisionEmbedding",
    "ManagedCollisionEmbeddingBag",
    "ManagedCollisionEmbeddingBagCollection",
    "ManagedCollisionEmbeddingCollection",
    "ManagedCollisionState",
    "QuantizedWeight",
    "RoutingStats",
]
