"""The ``max_norm`` renorm: torch's ``embedding_renorm_`` as a pure function.

torch rewrites, in place and outside autograd, every row of the table that the call references:
where ``||row||_p > max_norm`` the row becomes ``row * max_norm / (||row||_p + 1e-7)``. Here the
referenced rows are gathered once, rescaled, and scattered back, so the work is
O(len(indices) x embedding_dim); with the table donated XLA writes the rows in place.

Norms are computed in at least float32. For bfloat16 and float16 tables, the rescaled rows are
rounded toward zero, so unlike torch (which computes the norm in bf16 and can overshoot to 1.0016)
a renormed row never lands above ``max_norm``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed.core import _index_policy, _validation

_EPS = 1e-7  # torch's constant in embedding_renorm_

# completes a per-row reduction ("sum" or "max") over the row's columns on every device
Columns = Callable[[jax.Array, str], jax.Array]


def compute_dtype(dtype: Any) -> Any:
    """The dtype norms and scales are computed in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def whole_rows(partial: jax.Array, op: str) -> jax.Array:
    """The reduction over a row's columns when this device holds them all: the identity."""
    del op
    return partial


def row_norms(rows: jax.Array, norm_type: float, columns: Columns = whole_rows) -> jax.Array:
    """The p-norm of each row (last axis), in ``compute_dtype(rows.dtype)``.

    ``columns(partial, "sum" | "max")`` completes a per-row sum (or max, for ``inf``) over the
    row's columns on every device: the layout's ``reduce_columns`` when they are split.
    """
    x = jnp.abs(rows.astype(compute_dtype(rows.dtype)))
    if math.isinf(norm_type):
        return columns(jnp.max(x, axis=-1, initial=0), "max")

    def total(y):
        return columns(jnp.sum(y, axis=-1), "sum")

    if norm_type == 1:
        return total(x)
    if norm_type == 2:
        return jnp.sqrt(total(x * x))
    return total(x**norm_type) ** (1.0 / norm_type)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = a * 4097.0  # Dekker's split for float32: 2**12 + 1
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = a * b
    (ah, al), (bh, bl) = _split(a), _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def renorm_scale(norms: jax.Array, max_norm: float) -> jax.Array:
    """``max_norm / (norm + 1e-7)`` as torch computes it: in float64, then rounded.

    torch turns the row's norm into a double, divides in double and multiplies the row by the
    result. Without x64 the float32 formula differs by an ulp or two, which is enough to flip a
    near-tie in a bag's max. Here float32 norms get the division in float-float arithmetic (an
    error-free sum and Dekker products), whose error is far below half a float32 ulp, so the
    rounded result is the double one. Wider norms divide directly.
    """
    if norms.dtype != jnp.float32:
        return max_norm / (norms + _EPS)
    f32 = np.float32
    m_hi, e_hi = f32(max_norm), f32(_EPS)
    m_lo, e_lo = f32(max_norm - float(m_hi)), f32(_EPS - float(e_hi))
    # d = norms + 1e-7 as an unevaluated float-float sum (d_hi + d_lo)
    d_hi = norms + e_hi
    bb = d_hi - norms
    d_lo = (norms - (d_hi - bb)) + (e_hi - bb) + e_lo
    # q = (m_hi + m_lo) / (d_hi + d_lo): one Newton correction of the float32 quotient
    q = m_hi / d_hi
    p, p_err = _two_prod(q, d_hi)
    remainder = ((m_hi - p) - p_err) + m_lo - q * d_lo
    # past ~1e30 the splits overflow; there the quotient is far below float32's ulp of 1 anyway,
    # and an infinite norm gives 0, as torch's double division does
    return jnp.where(norms < 1e30, q + remainder / d_hi, q)


def _toward_zero(x: jax.Array, dtype: Any) -> jax.Array:
    """Casts ``x`` to ``dtype``, never increasing any element's magnitude."""
    y = x.astype(dtype)
    grew = jnp.abs(y.astype(x.dtype)) > jnp.abs(x)
    return jnp.where(grew, jnp.nextafter(y, jnp.zeros_like(y)), y)


def renorm_rows(
    rows: jax.Array, max_norm: float, norm_type: float, columns: Columns = whole_rows
) -> jax.Array:
    """Rescales each row whose norm exceeds ``max_norm``; other rows are returned unchanged.

    NaN rows stay NaN (their norm is not ``> max_norm``); a row holding ``inf`` is scaled by 0,
    so its infinite entries become NaN, as in torch.
    """
    norms = row_norms(rows, norm_type, columns)
    over = norms > max_norm
    scale = renorm_scale(norms, max_norm)
    wide = rows.astype(norms.dtype) * scale[..., None]
    if wide.dtype == rows.dtype:
        scaled = wide
    else:
        scaled = _toward_zero(wide, rows.dtype)
        # Rounding toward zero already keeps the norm <= the wide one, which is max_norm up to
        # float32 rounding; one more ulp toward zero removes that last sliver where it remains.
        still_over = row_norms(scaled, norm_type, columns) > max_norm
        scaled = jnp.where(
            still_over[..., None], jnp.nextafter(scaled, jnp.zeros_like(scaled)), scaled
        )
    return jnp.where(over[..., None], scaled, rows)


def renorm_table(
    weight: jax.Array,
    safe: jax.Array,
    max_norm: float,
    norm_type: float,
    columns: Columns = whole_rows,
) -> jax.Array:
    """Returns ``weight`` with the rows ``safe`` (1-D, sentinel-mapped) references renormed.

    ``columns``: how a row's norm is completed over its columns (see :func:`row_norms`).

    Only rows whose norm exceeds ``max_norm`` are written, each once however often it is
    referenced. For float32/float64 tables the write is a scatter-multiply by the scale, which is
    torch's ``row *= scale`` exactly and needs no ``(n, embedding_dim)`` temporary; lower
    precisions scatter the rows rescaled in float32 and rounded toward zero.
    """
    num_embeddings = weight.shape[0]
    rows = jnp.take(weight, safe, axis=0, mode="clip")
    norms = row_norms(rows, norm_type, columns)
    over = norms > max_norm
    if compute_dtype(weight.dtype) == weight.dtype:
        scale = renorm_scale(norms, max_norm).astype(weight.dtype)
        target = jnp.where(
            over & _index_policy.first_writer(safe, num_embeddings), safe, num_embeddings
        )
        new_weight = weight.at[target].multiply(scale[:, None], mode="drop")
    else:
        target = jnp.where(over, safe, num_embeddings)
        new_weight = weight.at[target].set(
            renorm_rows(rows, max_norm, norm_type, columns), mode="drop"
        )
    return new_weight


@functools.partial(jax.jit, static_argnames=("max_norm", "norm_type"))
def _renorm_weight(
    weight: jax.Array, indices: jax.Array, *, max_norm: float, norm_type: float
) -> jax.Array:
    safe = _index_policy.safe_indices(indices.reshape(-1), weight.shape[0])
    return jax.lax.stop_gradient(renorm_table(weight, safe, max_norm, norm_type))


def renorm(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    *,
    max_norm: float,
    norm_type: float = 2.0,
) -> dict[str, jax.Array]:
    """torch's ``embedding_renorm_`` as a pure function.

    Every row of ``params["weight"]`` that ``indices`` references, and whose ``norm_type``-norm
    exceeds ``max_norm``, is rescaled to ``max_norm / (norm + 1e-7)`` times itself. Other rows are
    untouched. Duplicated indices are renormed once.

    Args:
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``.
      indices: integer array of any shape.
      max_norm: the largest norm a referenced row may keep; must be > 0.
      norm_type: the p of the p-norm, > 0 or ``inf``.

    Returns:
      A new params dict whose weight has the referenced rows renormed. The result carries no
      gradient (the renorm is outside autograd, as in torch).

    Raises:
      TypeError: non-integer indices, or a non-floating table.
      ValueError: a bad ``max_norm``/``norm_type``, or a table that is not 2-D.
      IndexError: concrete indices out of range (under ``jit`` they are skipped instead).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> params = {"weight": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
      >>> jaxembed.renorm(params, jnp.array([0, 1]), max_norm=1.0)["weight"]
      Array([[0.6, 0.8],
             [0.3, 0.4]], dtype=float32)
    """
    weight = _validation.check_weight(params)
    if max_norm is None:
        raise ValueError("max_norm is required by renorm (a number > 0)")
    max_norm = _validation.check_max_norm(max_norm)
    norm_type = _validation.check_norm_type(norm_type)
    idx = _index_policy.prepare_indices(indices, weight.shape[0])
    new_weight = _renorm_weight(weight, idx, max_norm=max_norm, norm_type=norm_type)
    return {**params, "weight": new_weight}
