"""The sparse lookup: a table's gradient as the rows it reached, never as a ``(V, D)`` array.

:func:`lookup` returns the looked-up rows as a plain array to differentiate the loss with respect
to, and a :class:`SparseLookup` that turns the rows' cotangent into a :class:`SparseGrad`:
``indices`` and ``values``, one entry per looked-up position. A row-wise optimizer
(:mod:`jaxembed.sparse`) then updates only those rows. This is the pattern of TPU embedding
libraries (activations' gradients in, table update out), with torch's semantics: padding entries
are dropped (no update, no optimizer-state change), ``scale_grad_by_freq`` divides by the count,
and with ``max_norm`` the update applies to the renormed table.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxembed import (
    _embedding,
    _gradient,
    _index_policy,
    _renorm,
    _sharded_lookup,
    _sharding,
    _validation,
)


class SparseGrad(NamedTuple):
    """The gradient of a ``(num_embeddings, embedding_dim)`` table, one entry per looked-up row.

    Entries are summed per row, exactly as a dense gradient sums them; duplicates are allowed.
    An index outside ``[0, num_embeddings)`` (padding and out-of-range lookups become
    ``num_embeddings``) marks an entry that is dropped: its row gets no update and its optimizer
    state does not change.

    Attributes:
      indices: ``(n,)`` integer rows.
      values: ``(n, embedding_dim)`` gradient rows.
    """

    indices: jax.Array
    values: jax.Array


class SparseLookup(NamedTuple):
    """What :func:`lookup` keeps for the update: the table to update and where the rows came from.

    Attributes:
      params: the params to apply the update to: ``params`` as given, or with ``max_norm`` the
        renormed table (torch's optimizer updates the renormed table too).
      indices: ``(n,)`` the looked-up rows, flat; padding and out-of-range entries are
        ``num_embeddings``.
      scale: ``(n,)`` ``1 / count`` per entry with ``scale_grad_by_freq``, else None.
    """

    params: dict[str, jax.Array]
    indices: jax.Array
    scale: jax.Array | None

    def grad(self, row_grads: ArrayLike) -> SparseGrad:
        """The table's :class:`SparseGrad` from the cotangent of the looked-up rows.

        Args:
          row_grads: the gradient of the loss w.r.t. the rows :func:`lookup` returned,
            ``indices.shape + (embedding_dim,)``.
        """
        weight = self.params["weight"]
        row_grads = jnp.asarray(row_grads)
        n, dim = self.indices.shape[0], weight.shape[1]
        if row_grads.size != n * dim or (row_grads.shape[-1:] != (dim,) and n):
            raise ValueError(
                f"row_grads must have {n} rows of {dim} (the looked-up rows' shape), "
                f"got shape {tuple(row_grads.shape)}"
            )
        values = row_grads.reshape(n, dim).astype(weight.dtype)
        if self.scale is not None:
            values = values * self.scale[:, None]
        return SparseGrad(self.indices, values)


@functools.partial(jax.jit, static_argnames=_validation.LOOKUP_OPTIONS)
def _lookup(
    weight: jax.Array,
    indices: jax.Array,
    *,
    padding_idx: int | None,
    max_norm: float | None,
    norm_type: float,
    scale_grad_by_freq: bool,
    lookup: str,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
    num_embeddings, dim = weight.shape
    safe = _index_policy.safe_indices(indices.reshape(-1), num_embeddings)
    table = jax.lax.stop_gradient(weight)
    new_weight = None
    if max_norm is not None:
        table = new_weight = _renorm.renorm_table(table, safe, max_norm, norm_type)
    rows = _index_policy.gather_rows(table, safe, lookup).reshape(indices.shape + (dim,))
    scale = _gradient.gradient_scale(safe, None, scale_grad_by_freq, weight.dtype)
    safe = _index_policy.drop_padding(safe, padding_idx, num_embeddings)
    return rows, new_weight, safe, scale


def lookup(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    lookup: str = "gather",
    sharding: _sharding.TableSharding | None = None,
) -> tuple[jax.Array, SparseLookup]:
    """Looks rows up for sparse training: the rows to differentiate, and how to update the table.

    The rows equal :func:`jaxembed.embedding`'s output (renormed with ``max_norm``), but carry no
    gradient to ``params``: take the loss's gradient w.r.t. the rows, pass it to
    :meth:`SparseLookup.grad`, and give the resulting :class:`SparseGrad` to a row-wise optimizer
    with ``SparseLookup.params["weight"]`` as the table. Nothing of size ``(V, D)`` is created.

    Args:
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``.
      indices: integer array of any shape.
      padding_idx: entries equal to it are dropped from the gradient (no update); negative counts
        from the end.
      max_norm: renorm referenced rows whose norm exceeds this (> 0), or None.
      norm_type: the p of the p-norm for ``max_norm``: > 0, or ``inf``.
      scale_grad_by_freq: divide each entry's gradient by its index's count in ``indices``
        (torch refuses this with ``sparse=True``; here it equals the dense gradient's scaling).
      lookup: ``"gather"``, ``"one_hot"`` or ``"auto"``, as in :func:`jaxembed.embedding`.
      sharding: a :class:`jaxembed.TableSharding`, as in :func:`jaxembed.embedding`. The
        gradient's entries are then split over ``batch``; update the table with an optimizer
        wrapped by :func:`jaxembed.sparse.sharded` for the same sharding.

    Returns:
      ``(rows, sparse_lookup)``: ``rows.shape == indices.shape + (embedding_dim,)``.

    Raises:
      TypeError, ValueError, IndexError: as :func:`jaxembed.embedding`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> params = {"weight": jnp.ones((5, 2))}
      >>> rows, lk = jaxembed.sparse.lookup(params, jnp.array([[1, 1], [4, 0]]), padding_idx=0)
      >>> grad = lk.grad(jax.grad(lambda r: r.sum())(rows))
      >>> grad.indices
      Array([1, 1, 4, 5], dtype=int32)
      >>> opt = jaxembed.sparse.sgd(0.5)
      >>> table, _ = opt.update(grad, opt.init(lk.params["weight"]), lk.params["weight"])
      >>> table[:, 0]
      Array([1. , 0. , 1. , 1. , 0.5], dtype=float32)
    """
    weight, idx, options = _embedding.check_lookup(
        params, indices, padding_idx, max_norm, norm_type, scale_grad_by_freq, lookup
    )
    sharding = _sharding.check_sharding(sharding)
    if sharding is None:
        rows, new_weight, safe, scale = _lookup(weight, idx, **options)
    else:
        sharding = _sharding.bind(sharding, weight.shape, idx.shape)
        rows, new_weight, safe, scale = _sharded_lookup.sparse_lookup(
            weight, idx, sharding=sharding, **options
        )
    new_params: Any = params if new_weight is None else {**params, "weight": new_weight}
    return rows, SparseLookup(dict(new_params), safe, scale)


def concat(*grads: SparseGrad) -> SparseGrad:
    """One :class:`SparseGrad` from several lookups into the same table (their sum)."""
    if not grads:
        raise ValueError("concat needs at least one SparseGrad")
    if len(grads) == 1:
        return grads[0]
    dtype = jnp.result_type(*(g.indices.dtype for g in grads))
    return SparseGrad(
        jnp.concatenate([g.indices.astype(dtype) for g in grads]),
        jnp.concatenate([g.values for g in grads]),
    )
