"""What the Flax modules (nnx and linen) share: dtype checks, the initial table, the tied head."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed.core import _bag


def readable_signature(cls: type) -> None:
    """``help()`` and ``inspect.signature`` show an nnx module's constructor arguments (not
    nnx's ``(*args, **kwargs)``, nor the private ones, which start with ``_``)."""
    signature = inspect.signature(cls.__init__)
    public = [p for p in list(signature.parameters.values())[1:] if not p.name.startswith("_")]
    cls.__signature__ = signature.replace(parameters=public)


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


def bags(
    module: Any,
    weight: Any,
    indices: Any,
    offsets: Any,
    per_sample_weights: Any,
    num_valid: Any = None,
    output_dtype: Any = None,
):
    """A bag module's call into the core: its options, mode and layout, then ``(bags, params)``.
    ``weight`` is the float table or a quantized one (then ``output_dtype`` is its bags')."""
    return _bag.embed_bags(
        {"weight": weight},
        indices,
        offsets,
        module.config.options,
        mode=module.mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=module.include_last_offset,
        num_valid=num_valid,
        sharding=module.sharding,
        output_dtype=output_dtype,
    )
