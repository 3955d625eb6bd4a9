"""Argument checks shared by every public entry point.

Each check raises before any computation starts, so a rejected call never leaves anything
half-updated. Configuration errors are ``ValueError`` naming the argument; wrong dtypes or kinds
are ``TypeError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.core._packed import is_packed


def check_size(name: str, value: Any) -> int:
    """Returns ``value`` as a non-negative Python int, or raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_weight(params: Any, *, packed: bool = False) -> Any:
    """Returns ``params["weight"]`` after checking it is a 2-D floating array.

    With ``packed=True`` (the lookups) a :class:`~jaxembed.core._packed.PackedTable` (a quantized
    table) is taken as well, as ``params`` itself or as its ``"weight"``; elsewhere it raises
    ``TypeError``: a quantized table is frozen.
    """
    if is_packed(params) or (isinstance(params, Mapping) and is_packed(params.get("weight"))):
        if not packed:
            raise TypeError(
                "params holds a quantized table, which only the lookups (embedding, "
                "embedding_bag, the collections and modules) read: it is frozen; use "
                "jaxembed.dequantize for a float table"
            )
        return params if is_packed(params) else params["weight"]
    if not isinstance(params, Mapping) or "weight" not in params:
        raise TypeError(
            'params must be a mapping with a "weight" entry (as returned by jaxembed.init), '
            f"got {type(params).__name__}"
        )
    return check_table('params["weight"]', params["weight"])


def check_table(name: str, table: Any) -> jax.Array:
    """Returns ``table`` as an array after checking it is 2-D and floating."""
    if not hasattr(table, "shape") or not hasattr(table, "dtype"):
        table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {tuple(table.shape)}"
        )
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {table.dtype}")
    return table


def check_padding_idx(padding_idx: Any, num_embeddings: int) -> int | None:
    """Normalises ``padding_idx`` to ``[0, num_embeddings)`` (negative counts from the end)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise TypeError(
            f"padding_idx must be an int or None, got {type(padding_idx).__name__}: {padding_idx!r}"
        )
    padding_idx = int(padding_idx)
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx must be within [-num_embeddings, num_embeddings) = "
            f"[{-num_embeddings}, {num_embeddings}), got {padding_idx}"
        )
    return padding_idx % num_embeddings


def _static_float(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, not a traced value")
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}") from None


def check_max_norm(max_norm: Any) -> float | None:
    """``max_norm`` must be None or a number > 0 (``inf`` means "never renorm")."""
    if max_norm is None:
        return None
    value = _static_float("max_norm", max_norm)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"max_norm must be > 0 (or None), got {max_norm!r}")
    return value


def check_norm_type(norm_type: Any) -> float:
    """``norm_type`` is the p of the p-norm: a number > 0, or ``inf``."""
    value = _static_float("norm_type", norm_type)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"norm_type must be > 0 (inf allowed), got {norm_type!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return bool(value)


def check_index_dtype(name: str, dtype: Any) -> None:
    """Indices must be integers (any width, signed or not); bools and floats are rejected."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {dtype}")
