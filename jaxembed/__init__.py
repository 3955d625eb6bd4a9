"""jaxembed: torch's ``nn.Embedding`` semantics for JAX, as pure, jit-able functions."""

from jaxembed._embedding import embedding
from jaxembed._init import default_embedding_init, init
from jaxembed._renorm import renorm

__version__ = "0.1.0"

__all__ = [
    "default_embedding_init",
    "embedding",
    "init",
    "renorm",
]
