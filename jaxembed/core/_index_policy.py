"""The index policy: how indices are checked, and what an out-of-range index does.

* Concrete indices (NumPy arrays, Python lists, committed JAX arrays) are checked eagerly: any
  index ``< 0`` or ``>= num_embeddings`` raises ``IndexError`` before anything is computed, so a
  failed call changes nothing. Negative indices never wrap, as in torch.
* Traced indices (inside ``jax.jit``, ``vmap``, ...) cannot be checked from Python. There every
  out-of-range index, negative ones included, is mapped to ``num_embeddings``: the gather returns
  a NaN row, the gradient drops it, and the renorm scatter skips it. Those gathers run in XLA's
  "fill or drop" mode, so ``jax.experimental.checkify`` with ``checkify.index_checks`` reports the
  offending index.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.core._packed import is_packed
from jaxembed.core._validation import check_index_dtype
from jaxembed.kernels import _ffi as _kernels


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def prepare_indices(indices: Any, num_embeddings: int, *, name: str = "indices") -> jax.Array:
    """Checks ``indices`` and returns them as a JAX integer array of the same shape.

    Raises:
      TypeError: the indices are not integers.
      IndexError: concrete indices hold a value outside ``[0, num_embeddings)``.
    """
    indices = as_integer_array(indices, name)
    if not _is_traced(indices):
        values = np.asarray(indices)
        if values.size:
            bad = (values < 0) | (values >= num_embeddings)
            if bad.any():
                first = values[bad].flat[0]
                raise IndexError(
                    f"{name} holds {first}, out of range for a table of {num_embeddings} rows "
                    f"(valid: 0 <= index < {num_embeddings}; negative indices do not wrap)"
                )
    return jnp.asarray(indices, dtype=_working_dtype(indices.dtype))


def as_integer_array(x: Any, name: str) -> Any:
    """``x`` as an array (Python lists and scalars included) with an integer dtype, or TypeError."""
    if not hasattr(x, "dtype"):
        arr = np.asarray(x)
        if arr.size == 0 and not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
            arr = arr.astype(np.int32)  # `[]` parses as float64; an empty list is a valid input
        x = arr
    check_index_dtype(name, x.dtype)
    return x


def _working_dtype(dtype: Any) -> Any:
    wide = jax.config.jax_enable_x64 and np.dtype(dtype).itemsize >= 4
    return jnp.int64 if wide and np.dtype(dtype) != np.int32 else jnp.int32


def safe_indices(indices: jax.Array, num_embeddings: int) -> jax.Array:
    """Maps every out-of-range index to ``num_embeddings``, which gathers fill and scatters drop.

    Unsigned indices that did not fit the working dtype wrapped to negatives, so they are caught
    here too.
    """
    valid = (indices >= 0) & (indices < num_embeddings)
    return jnp.where(valid, indices, num_embeddings)


def drop_padding(safe: jax.Array, padding_idx: int | None, num_embeddings: int) -> jax.Array:
    """``safe`` with ``padding_idx`` sent to the sentinel as well, so a sparse update drops it."""
    if padding_idx is None:
        return safe
    return jnp.where(safe == padding_idx, num_embeddings, safe)


# "auto" picks one_hot only where a matmul beats a gather: TPUs with a small vocabulary. On CPU
# jaxembed-bench measured the gather faster at every size (the one-hot matmul costs V times more
# arithmetic than the gather moves bytes), and on GPU XLA's gather is the fast path.
AUTO_ONE_HOT_MAX_VOCAB = 2048


def _one_hot_rows(weight: jax.Array, safe: jax.Array, fill: float = jnp.nan) -> jax.Array:
    """``weight[safe]`` as ``one_hot(safe) @ weight``: one MXU-friendly matmul, exact in float.

    Each output element is ``1 * w + 0 * (every other row)``, so finite tables give the gathered
    values exactly (``HIGHEST`` precision keeps TPUs and GPUs from rounding to bf16/tf32). A NaN
    or inf anywhere in the table spreads to every row (``0 * inf`` is NaN).
    """
    num_embeddings = weight.shape[0]
    wide = jnp.promote_types(weight.dtype, jnp.float32)
    hot = jax.nn.one_hot(safe, num_embeddings, dtype=weight.dtype)  # the sentinel: all zeros
    rows = jnp.dot(
        hot, weight, precision=jax.lax.Precision.HIGHEST, preferred_element_type=wide
    ).astype(weight.dtype)
    return jnp.where((safe < num_embeddings)[..., None], rows, fill)


def _gather(weight: jax.Array, safe: jax.Array, fill: float = jnp.nan) -> jax.Array:
    return jnp.take(weight, safe, axis=0, mode="fill", fill_value=fill)


def gather_rows(
    weight: jax.Array, safe: jax.Array, style: str = "gather", fill: float = jnp.nan
) -> jax.Array:
    """``weight[safe]`` with rows of ``fill`` (NaN) for the out-of-range sentinel.

    ``style`` is how: ``"gather"`` (XLA's gather; on CPU the gather kernel of
    :mod:`jaxembed.kernels` where it is built), ``"one_hot"`` (a matmul) or ``"auto"``.
    A vocab-sharded lookup fills with 0 the rows another shard owns. A packed (quantized) table
    decodes just these rows, as float32 (``style`` is gather's, whatever it says).
    """
    if is_packed(weight):
        if _kernels.bags_apply(weight, safe.shape[0], "gather") and safe.ndim == 1:
            decoded = weight.with_output_dtype(jnp.float32)  # take's rows are float32
            return jax.lax.platform_dependent(
                decoded, safe,
                cpu=lambda w, s: _kernels.gather(w, s, fill),
                default=lambda w, s: w.take(s, fill),
            )  # fmt: skip
        return weight.take(safe, fill)
    if style == "one_hot":
        return _one_hot_rows(weight, safe, fill)
    branches = {}
    if _kernels.bags_apply(weight, safe.shape[0], style) and safe.ndim == 1:
        branches["cpu"] = lambda w, s: _kernels.gather(w, s, fill)
    if style == "auto" and weight.shape[0] <= AUTO_ONE_HOT_MAX_VOCAB:
        branches["tpu"] = lambda w, s: _one_hot_rows(w, s, fill)
    if not branches:
        return _gather(weight, safe, fill)
    return jax.lax.platform_dependent(
        weight, safe, default=lambda w, s: _gather(w, s, fill), **branches
    )


def first_writer(safe: jax.Array, num_embeddings: int) -> jax.Array:
    """Marks exactly one occurrence of each distinct index in the 1-D ``safe``.

    Every position scatters its own number into a ``num_embeddings``-long int32 scratch; the one
    that reads its own number back won. That makes a non-idempotent scatter (multiply) apply once
    per row without a sort: O(n) work plus zeroing the scratch, which is ``embedding_dim`` times
    smaller than the table. Sentinel entries never win.
    """
    k = jnp.arange(safe.shape[0], dtype=jnp.int32)
    scratch = jnp.zeros((num_embeddings,), jnp.int32).at[safe].set(k, mode="drop")
    return jnp.take(scratch, safe, mode="fill", fill_value=-1) == k
