"""The table gradient of a lookup: torch's ``embedding_backward``, as a linear map.

torch's gradient w.r.t. the table is a scatter-add of the output cotangent into the looked-up
rows, straight through the ``max_norm`` renorm (which runs outside autograd), zero at
``padding_idx``, and divided by each index's count in the call with ``scale_grad_by_freq``.

Here that is a ``jax.custom_jvp``: its tangent is ``grad_scale * weight_dot[indices]``, whose
transpose (reverse mode) is exactly torch's scatter-add. Forward mode (``jax.jvp``,
``jax.jacfwd``) uses the same linear map, so forward and reverse mode agree. (torch's forward AD
ignores ``padding_idx`` and ``scale_grad_by_freq``, so its own two modes disagree there.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def index_counts(safe: jax.Array, among: jax.Array | None = None) -> jax.Array:
    """How often each entry of the 1-D ``safe`` occurs in ``among`` (default ``safe``).

    A sort and two binary searches, with static shapes: O(n log n) in the number of indices,
    never O(vocab). A data-parallel lookup counts its shard's indices among all of them.
    """
    ordered = jnp.sort(safe if among is None else among)
    right = jnp.searchsorted(ordered, safe, side="right", method="scan_unrolled")
    left = jnp.searchsorted(ordered, safe, side="left", method="scan_unrolled")
    return right - left


def gradient_scale(
    safe: jax.Array,
    padding_idx: int | None,
    scale_grad_by_freq: bool,
    dtype,
    among: jax.Array | None = None,
) -> jax.Array | None:
    """Per-index factor on the gradient: 0 at padding, ``1/count`` with frequency scaling.

    Counts are taken in ``among`` (all the call's indices) when ``safe`` is one shard of them.
    Returns None where every factor is 1, so the common path costs nothing extra.
    """
    scale = None
    wide = jnp.promote_types(dtype, jnp.float32)  # 1/3 in float32 is not 1/3 in float64
    if scale_grad_by_freq:
        scale = 1.0 / index_counts(safe, among).astype(wide)
    if padding_idx is not None:
        keep = (safe != padding_idx).astype(wide)
        scale = keep if scale is None else scale * keep
    return None if scale is None else scale.astype(dtype)


@jax.custom_jvp
def with_table_gradient(
    rows: jax.Array, weight: jax.Array, safe: jax.Array, grad_scale: jax.Array | None
) -> jax.Array:
    """Returns ``rows`` (already looked up, outside autograd) with torch's table gradient.

    Args:
      rows: ``safe.shape + (embedding_dim,)``, computed from ``stop_gradient(weight)``.
      weight: the table the gradient flows to.
      safe: indices with out-of-range entries mapped to ``num_embeddings`` (their gradient drops).
      grad_scale: per-index factor from :func:`gradient_scale`, or None.
    """
    del weight, safe, grad_scale
    return rows


@with_table_gradient.defjvp
def _with_table_gradient_jvp(primals, tangents):
    rows, weight, safe, grad_scale = primals
    weight_dot = tangents[1]
    del weight
    rows_dot = jnp.take(weight_dot, safe, axis=0, mode="fill", fill_value=0)
    if grad_scale is not None:
        rows_dot = rows_dot * grad_scale[..., None]
    return rows, rows_dot


@jax.custom_jvp
def straight_through(weight: jax.Array, new_weight: jax.Array) -> jax.Array:
    """``new_weight``'s value with ``weight``'s gradient: the identity, as seen by autodiff.

    A module that writes the renormed table back into its parameter uses this, so a second lookup
    in the same forward pass still sends its gradient to the parameter, as torch's in-place,
    outside-autograd renorm does. The primal is ``new_weight`` itself: no extra pass over the table.
    """
    del weight
    return new_weight


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[1], tangents[0]
