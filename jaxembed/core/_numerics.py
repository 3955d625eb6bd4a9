"""What XLA would otherwise compute differently: :func:`divide` (rounded as torch rounds it) and
:func:`at_run_time` (not folded at compile time)."""

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


def at_run_time(x: jax.Array) -> jax.Array:
    """``x``, behind an optimization barrier: what depends on it is computed when the step runs.

    Where ``x`` is a constant (a batch closed over by ``jit``, or the 2-D layout's own bag
    starts), XLA would fold a running count over it at compile time, and its CPU folding of a
    long ``cumsum`` (``jnp.nonzero`` holds one) takes seconds: over 1 s for 65,536 entries, where
    running it costs well under a millisecond.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxembed.core._numerics import at_run_time
      >>> jnp.cumsum(at_run_time(jnp.ones(3, jnp.int32)))
      Array([1, 2, 3], dtype=int32)
    """
    return jax.lax.optimization_barrier(x)
