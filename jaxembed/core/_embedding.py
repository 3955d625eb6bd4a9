"""``embedding``: torch's ``F.embedding`` / ``nn.Embedding.forward`` as a pure function."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
from jax.typing import ArrayLike

from jaxembed.core import _index_policy, _layout, _options
from jaxembed.core._options import LookupOptions
from jaxembed.core._pipeline import Lookup, new_params


@functools.partial(jax.jit, static_argnames=("options", "layout"))
def _embedding(
    weight: jax.Array, indices: jax.Array, *, options: LookupOptions, layout: _layout.Layout
) -> tuple[jax.Array, jax.Array | None]:
    num_embeddings = weight.shape[0]

    def body(weight, indices):
        lookup = Lookup.start(weight, indices, options, layout, num_embeddings)
        rows = lookup.rows()
        return rows.reshape(indices.shape + rows.shape[-1:]), lookup.new_weight

    return layout.run(
        body, (weight, indices), ("table", "indices"), ("rows", "table"), ndim=indices.ndim
    )


def embed(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    options: LookupOptions,
    sharding: _layout.Layout | None = None,
    output_dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`embedding` with its options already checked (the modules' front end)."""
    weight = options.table_of(params, output_dtype)
    idx = _index_policy.prepare_indices(indices, weight.shape[0])
    layout = _layout.bind(sharding, weight, idx.shape)
    out, new_weight = _embedding(weight, idx, options=options, layout=layout)
    return out, new_params(params, new_weight)


@_options.renamed_lookup
def embedding(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    lookup_style: str = "gather",
    sharding: _layout.Layout | None = None,
    output_dtype: Any = None,
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
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``, any floating dtype; or a
        :class:`jaxembed.QuantizedTable` (itself or as ``"weight"``): frozen, its rows decoded as
        they are read (never the whole table), with no gradient, ``max_norm``,
        ``scale_grad_by_freq`` or ``"one_hot"`` style.
      indices: integer array of any shape (0-d and empty included), NumPy or JAX.
      padding_idx: a row whose gradient is always zero; negative counts from the end. Its values
        are returned as stored (only :func:`jaxembed.init` zeroes it).
      max_norm: renorm referenced rows whose norm exceeds this (> 0), or None.
      norm_type: the p of the p-norm for ``max_norm``: > 0, or ``inf``.
      scale_grad_by_freq: divide each row's gradient by its index's count in ``indices``.
      lookup_style: how rows are read: ``"gather"`` (XLA's gather, the default), ``"one_hot"``
        (``one_hot(indices) @ weight``, a matmul: often faster on TPU for small vocabularies;
        exact for finite tables, but a NaN/inf anywhere in the table reaches every row) or
        ``"auto"`` (one_hot on TPU up to 2,048 rows, else gather). Outputs and gradients are
        the same for every style.
      sharding: a :class:`jaxembed.TableSharding` to run on a mesh: the table split by rows
        (``vocab``) and/or columns (``dim``), the indices' leading dimension by ``batch``. The
        outputs equal the unsharded ones (bit for bit with rows split; see the class for the
        terms); the table is never gathered onto one device.
      output_dtype: a quantized table's output dtype: float32 (default), float16 or bfloat16
        (decoded in float32, then cast). A float table's output is its own dtype.

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
    options = LookupOptions.of_call(
        params, padding_idx, max_norm, norm_type, scale_grad_by_freq, lookup_style
    )
    return embed(params, indices, options, sharding, output_dtype)
