"""jaxembed: torch's ``nn.Embedding`` semantics for JAX: pure, jit-able functions and Flax modules.

Sparse training of large tables (row-wise optimizers) lives in :mod:`jaxembed.sparse`; the
linen modules in :mod:`jaxembed.linen`. :class:`TableSharding` splits a table (and the batch)
over a JAX mesh for every lookup, bag, sparse update and module.
"""

from jaxembed import sparse
from jaxembed._bag import embedding_bag
from jaxembed._embedding import embedding
from jaxembed._init import default_embedding_init, init
from jaxembed._interop import (
    from_torch,
    load_safetensors,
    safetensors_names,
    save_safetensors,
    to_torch,
)
from jaxembed._nnx import Embedding, EmbeddingBag, FrozenWeight
from jaxembed._renorm import renorm
from jaxembed._sharding import TableSharding

__version__ = "0.1.0"

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "FrozenWeight",
    "TableSharding",
    "default_embedding_init",
    "embedding",
    "embedding_bag",
    "from_torch",
    "init",
    "load_safetensors",
    "renorm",
    "safetensors_names",
    "save_safetensors",
    "sparse",
    "to_torch",
]
