"""What the Flax modules share: the table's construction checks and its initial value."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed import _index_policy, _validation

MODES = ("sum", "mean", "max")


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """The checked configuration of an embedding module (raises at construction)."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None
    max_norm: float | None
    norm_type: float
    scale_grad_by_freq: bool
    lookup: str = "gather"

    @classmethod
    def check(
        cls,
        num_embeddings: Any,
        embedding_dim: Any,
        padding_idx: Any,
        max_norm: Any,
        norm_type: Any,
        scale_grad_by_freq: Any,
        lookup: Any = "gather",
    ) -> TableConfig:
        num_embeddings = _validation.check_size("num_embeddings", num_embeddings)
        return cls(
            num_embeddings=num_embeddings,
            embedding_dim=_validation.check_size("embedding_dim", embedding_dim),
            padding_idx=_validation.check_padding_idx(padding_idx, num_embeddings),
            max_norm=_validation.check_max_norm(max_norm),
            norm_type=_validation.check_norm_type(norm_type),
            scale_grad_by_freq=_validation.check_flag("scale_grad_by_freq", scale_grad_by_freq),
            lookup=_index_policy.check_lookup_style(lookup),
        )

    @property
    def lookup_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxembed.embedding` this configuration stands for."""
        return dict(
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            lookup=self.lookup,
        )


def check_dtypes(dtype: Any, param_dtype: Any) -> None:
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None and not jnp.issubdtype(value, jnp.floating):
            raise TypeError(f"{name} must be a floating dtype, got {jnp.dtype(value)}")


def zero_padding_row(value: Any, padding_idx: int | None) -> Any:
    """Zeroes the padding row of an initializer's result.

    The result may be a plain array or Flax metadata around one (``nnx.with_partitioning``), whose
    metadata is kept.
    """
    if padding_idx is None:
        return value
    if hasattr(value, "raw_value") and dataclasses.is_dataclass(value):
        return dataclasses.replace(value, raw_value=value.raw_value.at[padding_idx].set(0))
    return value.at[padding_idx].set(0)


def cast_output(out: jax.Array, dtype: Any) -> jax.Array:
    return out if dtype is None else out.astype(dtype)


def attend(query: jax.Array, weight: jax.Array, dtype: Any) -> jax.Array:
    """``query @ weight.T`` in the module's compute dtype, for tied output projections."""
    query = jnp.asarray(query)
    dtype = dtype or jnp.result_type(query, weight)
    return jnp.dot(query.astype(dtype), weight.astype(dtype).T)


def check_bag_options(mode: Any, include_last_offset: Any, scale_grad_by_freq: Any) -> tuple:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale_grad_by_freq and mode == "max":
        raise ValueError('scale_grad_by_freq is not supported with mode="max" (as in torch)')
    return mode, _validation.check_flag("include_last_offset", include_last_offset)
