"""``flax.linen`` modules over the functional core.

With ``max_norm`` the renormed table is written back to the ``params`` collection when it is
mutable::

    out, updates = model.apply(variables, idx, mutable=["params"])
    variables = {**variables, **updates}      # the renormed table, as torch keeps it

Without a mutable ``params`` collection the output is still renormed (it equals torch's), but the
stored table cannot change. What then happens is ``on_immutable``'s choice:

* ``"warn"`` (default): a ``UserWarning`` (once per trace) says the table was not updated, so a
  training loop that forgot ``mutable=["params"]`` does not silently train on a stale table;
* ``"ignore"``: nothing, for inference, where the output is all that matters (the renorm is
  idempotent, so repeated calls return the same rows);
* ``"error"``: a ``ValueError``.
"""

from __future__ import annotations

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxembed.core import _embedding, _gradient, _layout, _options
from jaxembed.core._init import Initializer, default_embedding_init
from jaxembed.modules import _table
from jaxembed.sharding import TableSharding

__all__ = ["Embedding", "EmbeddingBag"]

_ON_IMMUTABLE = ("warn", "ignore", "error")


class _TableModule(nn.Module):
    """The table, its checks, and the write-back of the renorm (see the module docstring)."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = default_embedding_init
    on_immutable: str = "warn"
    lookup_style: str = "gather"
    # jaxembed 0.1's name of lookup_style: still read, with a DeprecationWarning
    lookup: str | None = None
    sharding: TableSharding | None = None

    def __post_init__(self):
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        self.config  # noqa: B018 - building the config runs its checks
        _table.check_dtypes(self.dtype, self.param_dtype)
        _layout.check(self.sharding)
        if self.on_immutable not in _ON_IMMUTABLE:
            raise ValueError(
                f"on_immutable must be one of {_ON_IMMUTABLE}, got {self.on_immutable!r}"
            )

    @property
    def config(self) -> _options.TableConfig:
        """The checked configuration (raises ValueError/TypeError naming a bad attribute)."""
        return _options.TableConfig.check(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            lookup_style=self._lookup_style,
        )

    @property
    def _lookup_style(self) -> str:
        if self.lookup is None:
            return self.lookup_style
        warnings.warn(
            "lookup= is now lookup_style= (jaxembed.LookupStyle)", DeprecationWarning, stacklevel=3
        )
        return self.lookup

    def _init_weight(self, key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
        value = self.embedding_init(key, shape, dtype)
        return _table.zero_padding_row(value, self.config.options.padding_idx)

    def setup(self):
        shape = (self.num_embeddings, self.embedding_dim)
        self.weight = self.param("weight", self._init_weight, shape, self.param_dtype)

    def _current_weight(self) -> jax.Array:
        # not the attribute bound in setup: a renorm earlier in this apply may have replaced it
        return self.get_variable("params", "weight")

    def _finish(self, out: jax.Array, weight: jax.Array, new_params) -> jax.Array:
        if self.max_norm is not None and not self.is_initializing():
            if self.is_mutable_collection("params"):
                # a later lookup in the same apply must still reach the parameter's gradient
                new_weight = _gradient.straight_through(weight, new_params["weight"])
                self.put_variable("params", "weight", new_weight)
            elif self.on_immutable == "error":
                raise ValueError(
                    "max_norm renormed the table but the 'params' collection is immutable: "
                    "call apply(..., mutable=['params']), or set on_immutable='ignore'"
                )
            elif self.on_immutable == "warn":
                warnings.warn(
                    f"jaxembed.linen.{type(self).__name__}: max_norm renormed the looked-up "
                    "rows, but the 'params' collection is immutable, so the stored table was not "
                    "updated. Train with apply(..., mutable=['params']); pass "
                    "on_immutable='ignore' for inference.",
                    UserWarning,
                    stacklevel=3,
                )
        return _table.cast_output(out, self.dtype)


class Embedding(_TableModule):
    """torch's ``nn.Embedding`` as a ``flax.linen`` module, with params ``{"weight": ...}``.

    Attributes are those of :class:`jaxembed.Embedding`, plus ``on_immutable`` (see the module
    docstring).

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed.linen
      >>> model = jaxembed.linen.Embedding(8, 4, padding_idx=2, max_norm=1.0)
      >>> variables = model.init(jax.random.key(0), jnp.array([0]))
      >>> out, updates = model.apply(variables, jnp.array([1, 3]), mutable=["params"])
      >>> out.shape, updates["params"]["weight"].shape
      ((2, 4), (8, 4))
    """

    def __call__(self, indices: ArrayLike) -> jax.Array:
        """Returns the embeddings, ``indices.shape + (embedding_dim,)``, in ``dtype``."""
        weight = self._current_weight()
        out, new_params = _embedding.embed(
            {"weight": weight}, indices, self.config.options, self.sharding
        )
        return self._finish(out, weight, new_params)

    def attend(self, query: ArrayLike) -> jax.Array:
        """``query @ weight.T``: scores over the vocabulary, for a tied output projection."""
        return _table.attend(query, self._current_weight(), self.dtype)


class EmbeddingBag(_TableModule):
    """torch's ``nn.EmbeddingBag`` as a ``flax.linen`` module, with params ``{"weight": ...}``.

    Attributes are those of :class:`jaxembed.EmbeddingBag`, plus ``on_immutable``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed.linen
      >>> model = jaxembed.linen.EmbeddingBag(8, 4, mode="max")
      >>> variables = model.init(jax.random.key(0), jnp.array([[0, 1]]))
      >>> model.apply(variables, jnp.array([1, 3, 5]), jnp.array([0, 1])).shape
      (2, 4)
    """

    mode: str = "mean"
    include_last_offset: bool = False

    def _check(self) -> None:
        super()._check()
        _options.check_bag_options(self.mode, self.include_last_offset, self.scale_grad_by_freq)

    def __call__(
        self,
        indices: ArrayLike,
        offsets: ArrayLike | None = None,
        per_sample_weights: ArrayLike | None = None,
        num_valid: ArrayLike | None = None,
    ) -> jax.Array:
        """Returns one row per bag, ``(num_bags, embedding_dim)``, in ``dtype``.

        ``num_valid``: with offsets, how many indices are real; the rest are in no bag (see
        :func:`jaxembed.embedding_bag` and :func:`jaxembed.pad_bags`).
        """
        weight = self._current_weight()
        out, new_params = _table.bags(self, weight, indices, offsets, per_sample_weights, num_valid)
        return self._finish(out, weight, new_params)
