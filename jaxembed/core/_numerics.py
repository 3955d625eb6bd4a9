"""Arithmetic that XLA would otherwise round differently from torch: :func:`divide`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def divide(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """``x / divisor``, rounded once per element, with ``divisor`` broadcast against ``x``.

    XLA's algebraic simplifier rewrites a division by a broadcast value (a bag's count, a row's
    width) as a multiplication by its reciprocal, which rounds twice: about one quotient in
    eight then lands an ulp from the true one, and which ones depends on where the value sits
    in its array (a vector's scalar tail is divided exactly), so a mean bag could round
    differently on a mesh than on one device. The divisor is broadcast to ``x``'s shape behind
    an optimization barrier, so XLA divides element by element, as torch does and as jaxembed's
    CPU kernels do.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxembed.core._numerics import divide
      >>> divide(jnp.array([[1.0, 2.0], [3.0, 6.0]]), jnp.array([[1.0], [3.0]]))
      Array([[1., 2.],
             [1., 2.]], dtype=float32)
    """
    divisor = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(divisor)
