"""``init``: a fresh embedding table, initialised as torch's ``nn.Embedding`` does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed.core import _validation

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


class Normal:
    """The initializer ``N(0, stddev**2)``, as ``jax.nn.initializers.normal``, with a readable repr.

    Example:
      >>> import jax, jaxembed
      >>> jaxembed.default_embedding_init
      normal(stddev=1.0)
      >>> jaxembed.default_embedding_init(jax.random.key(0), (2, 3), "float32").shape
      (2, 3)
    """

    def __init__(self, stddev: float = 1.0):
        self.stddev = float(stddev)
        self._init = jax.nn.initializers.normal(stddev=self.stddev)

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
        return self._init(key, shape, dtype)

    def __repr__(self) -> str:
        return f"normal(stddev={self.stddev})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Normal) and other.stddev == self.stddev

    def __hash__(self) -> int:
        return hash((Normal, self.stddev))


#: torch's ``nn.Embedding.reset_parameters``: N(0, 1). (Flax's ``Embed`` uses std 1/sqrt(D).)
default_embedding_init: Initializer = Normal(1.0)


def init(
    key: jax.Array,
    num_embeddings: int,
    embedding_dim: int,
    *,
    padding_idx: int | None = None,
    dtype: Any = jnp.float32,
    initializer: Initializer | None = None,
) -> dict[str, jax.Array]:
    """Creates ``{"weight": Array[num_embeddings, embedding_dim]}``.

    Args:
      key: a PRNG key.
      num_embeddings: the number of rows, >= 0.
      embedding_dim: the width of each row, >= 0.
      padding_idx: a row to zero after initialisation (negative counts from the end).
      dtype: a floating dtype for the table.
      initializer: ``initializer(key, shape, dtype)`` as in ``jax.nn.initializers``; defaults to
        torch's N(0, 1).

    Returns:
      The params dict, keyed as torch's ``nn.Embedding.state_dict()``.

    Example:
      >>> import jax, jaxembed
      >>> params = jaxembed.init(jax.random.key(0), 8, 4, padding_idx=2)
      >>> params["weight"].shape
      (8, 4)
      >>> params["weight"][2]
      Array([0., 0., 0., 0.], dtype=float32)
    """
    num_embeddings = _validation.check_size("num_embeddings", num_embeddings)
    embedding_dim = _validation.check_size("embedding_dim", embedding_dim)
    padding_idx = _validation.check_padding_idx(padding_idx, num_embeddings)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    initializer = default_embedding_init if initializer is None else initializer
    weight = jnp.asarray(initializer(key, (num_embeddings, embedding_dim), dtype), dtype)
    if weight.shape != (num_embeddings, embedding_dim):
        raise ValueError(
            f"initializer returned shape {weight.shape}, expected {(num_embeddings, embedding_dim)}"
        )
    if padding_idx is not None:
        weight = weight.at[padding_idx].set(0)
    return {"weight": weight}
