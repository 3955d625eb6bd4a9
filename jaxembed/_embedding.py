"""``embedding``: torch's ``F.embedding`` / ``nn.Embedding.forward`` as a pure function."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
from jax.typing import ArrayLike

from jaxembed import _gradient, _index_policy, _renorm, _sharded_lookup, _sharding, _validation


@functools.partial(jax.jit, static_argnames=_validation.LOOKUP_OPTIONS)
def _embedding(
    weight: jax.Array,
    indices: jax.Array,
    *,
    padding_idx: int | None,
    max_norm: float | None,
    norm_type: float,
    scale_grad_by_freq: bool,
    lookup: str,
) -> tuple[jax.Array, jax.Array | None]:
    num_embeddings, dim = weight.shape
    safe = _index_policy.safe_indices(indices.reshape(-1), num_embeddings)
    frozen = jax.lax.stop_gradient(weight)
    new_weight = None
    if max_norm is not None:
        # the output is gathered from the renormed table: duplicates all see the renormed row
        frozen = new_weight = _renorm.renorm_table(frozen, safe, max_norm, norm_type)
    rows = _index_policy.gather_rows(frozen, safe, lookup)
    grad_scale = _gradient.gradient_scale(safe, padding_idx, scale_grad_by_freq, weight.dtype)
    out = _gradient.with_table_gradient(rows, weight, safe, grad_scale)
    return out.reshape(indices.shape + (dim,)), new_weight


def check_lookup(
    params: Any,
    indices: Any,
    padding_idx: Any,
    max_norm: Any,
    norm_type: Any,
    scale_grad_by_freq: Any,
    lookup: Any = "gather",
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """Checks a lookup's arguments: ``(weight, indices, options)`` or a clear error."""
    weight = _validation.check_weight(params)
    num_embeddings = weight.shape[0]
    options = dict(
        padding_idx=_validation.check_padding_idx(padding_idx, num_embeddings),
        max_norm=_validation.check_max_norm(max_norm),
        norm_type=_validation.check_norm_type(norm_type),
        scale_grad_by_freq=_validation.check_flag("scale_grad_by_freq", scale_grad_by_freq),
        lookup=_index_policy.check_lookup_style(lookup),
    )
    return weight, _index_policy.prepare_indices(indices, num_embeddings), options


def embedding(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    lookup: str = "gather",
    sharding: _sharding.TableSharding | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Looks up rows of ``params["weight"]`` with torch's ``nn.Embedding`` semantics.

    With ``max_norm``, every referenced row whose norm exceeds it is renormed first (see
    :func:`jaxembed.renorm`); the lookup returns the renormed rows, and ``new_params`` carries the
    renormed table, the state torch would have written in place. The gradient w.r.t.
    ``params["weight"]`` equals torch's ``weight.grad``: straight through the renorm, zero at
    ``padding_idx``, divided by each index's count with ``scale_grad_by_freq``.

    In a training step take gradients w.r.t. ``params`` and apply the optimizer update to
    ``new_params``, as torch's optimizer updates the renormed table.

    Args:
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``, any floating dtype.
      indices: integer array of any shape (0-d and empty included), NumPy or JAX.
      padding_idx: a row whose gradient is always zero; negative counts from the end. Its values
        are returned as stored (only :func:`jaxembed.init` zeroes it).
      max_norm: renorm referenced rows whose norm exceeds this (> 0), or None.
      norm_type: the p of the p-norm for ``max_norm``: > 0, or ``inf``.
      scale_grad_by_freq: divide each row's gradient by its index's count in ``indices``.
      lookup: how rows are read: ``"gather"`` (XLA's gather, the default), ``"one_hot"``
        (``one_hot(indices) @ weight``, a matmul: often faster on TPU for small vocabularies;
        exact for finite tables, but a NaN/inf anywhere in the table reaches every row) or
        ``"auto"`` (one_hot on TPU up to 2,048 rows, else gather). Outputs and gradients are
        the same for every style.
      sharding: a :class:`jaxembed.TableSharding` to run on a mesh: the table split by rows
        (``vocab``) and/or columns (``dim``), the indices' leading dimension by ``batch``. The
        outputs equal the unsharded ones (bit for bit with rows split; see the class for the
        terms); the table is never gathered onto one device.

    Returns:
      ``(embeddings, new_params)``: ``embeddings.shape == indices.shape + (embedding_dim,)`` in
      the table's dtype. ``new_params`` is ``params`` itself without ``max_norm``; with it, a new
      dict whose weight carries no gradient.

    Raises:
      TypeError: non-integer indices or a non-floating table.
      ValueError: a bad ``padding_idx``, ``max_norm`` or ``norm_type``, or a table not 2-D; with
        ``sharding``, a table or indices that do not split evenly over its mesh axes.
      IndexError: concrete indices outside ``[0, num_embeddings)``. Under ``jit`` such entries
        return NaN rows, get no gradient and leave the table alone; ``checkify.index_checks``
        reports them.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> params = {"weight": jnp.array([[3.0, 4.0], [0.3, 0.4], [1.0, 1.0]])}
      >>> emb, new_params = jaxembed.embedding(params, jnp.array([[0, 1]]), max_norm=1.0)
      >>> emb.shape
      (1, 2, 2)
      >>> new_params["weight"][:2]
      Array([[0.6, 0.8],
             [0.3, 0.4]], dtype=float32)
      >>> def loss(p):
      ...     return jaxembed.embedding(p, jnp.array([0, 0, 2]), padding_idx=2)[0].sum()
      >>> jax.grad(loss)(params)["weight"]
      Array([[2., 2.],
             [0., 0.],
             [0., 0.]], dtype=float32)
    """
    weight, idx, options = check_lookup(
        params, indices, padding_idx, max_norm, norm_type, scale_grad_by_freq, lookup
    )
    sharding = _sharding.check_sharding(sharding)
    if sharding is None:
        out, new_weight = _embedding(weight, idx, **options)
    else:
        sharding = _sharding.bind(sharding, weight.shape, idx.shape)
        out, new_weight = _sharded_lookup.embedding(weight, idx, sharding=sharding, **options)
    if new_weight is None:
        return out, params
    return out, {**params, "weight": jax.lax.stop_gradient(new_weight)}
