"""The core: torch's ``nn.Embedding`` / ``nn.EmbeddingBag`` as pure, jit-able functions.

What this folder owns, module by module:

* ``_pipeline``: the lookup pipeline, written once (:class:`~jaxembed.core._pipeline.Lookup`);
  every entry point's body runs it;
* ``_layout``: the interface the pipeline runs against, and its trivial case, one device;
* ``_options``: the options as one checked, hashable value (``LookupOptions``, ``TableConfig``);
* ``_index_policy``: what an index may be, and what an out-of-range one does; the gather;
* ``_renorm``: the ``max_norm`` renorm;
* ``_gradient``: torch's table gradient (padding, ``scale_grad_by_freq``);
* ``_bag``: the bag reduction, and :func:`embedding_bag`;
* ``_embedding``: :func:`embedding`;
* ``_init``: :func:`init`, torch's initial table;
* ``_validation``: the argument checks every entry point shares;
* ``_packed``: the interface of a table stored in another form (a quantized one), which the
  gather decodes row by row.

It may import nothing else of jaxembed. Sharding, sparse training and the Flax modules sit above
it; a sharded table reaches the pipeline as a ``Layout``.
"""

from jaxembed.core._bag import embedding_bag, pad_bags
from jaxembed.core._embedding import embedding
from jaxembed.core._init import default_embedding_init, init
from jaxembed.core._options import LookupOptions, LookupStyle
from jaxembed.core._renorm import renorm

__all__ = [
    "LookupOptions",
    "LookupStyle",
    "default_embedding_init",
    "embedding",
    "embedding_bag",
    "init",
    "pad_bags",
    "renorm",
]
