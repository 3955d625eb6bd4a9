"""``flax.linen`` modules over the functional core: :class:`Embedding` and :class:`EmbeddingBag`.

They live in :mod:`jaxembed.modules`; this is their public name, as ``flax.linen`` is Flax's.
"""

from jaxembed.modules._linen import Embedding, EmbeddingBag

__all__ = ["Embedding", "EmbeddingBag"]
