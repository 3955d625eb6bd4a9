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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxembed.core import _bag, _index_policy, _layout, _options, _serialization, _validation
from jaxembed.core._options import LookupOptions
from jaxembed.core._pipeline import Lookup, new_params


class SparseGrad(NamedTuple):
    """The gradient of a ``(num_embeddings, embedding_dim)`` table, one entry per looked-up row.

    Entries are summed per row, exactly as a dense gradient sums them; duplicates are allowed.
    An index outside ``[0, num_embeddings)`` (padding and out-of-range lookups become
    ``num_embeddings``) marks an entry that is dropped: its row gets no update and its optimizer
    state does not change.

    Attributes:
      indices: ``(n,)`` integer rows.
      values: ``(n, embedding_dim)`` gradient rows.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([2, 0, 2]), jnp.ones((3, 4)))
      >>> opt, table = jaxembed.sparse.sgd(1.0), jnp.zeros((3, 4))
      >>> table, _ = opt.update(grad, opt.init(table), table)
      >>> table[:, 0]
      Array([-1.,  0., -2.], dtype=float32)
    """

    indices: jax.Array
    values: jax.Array


class _SpreadGrad(SparseGrad):
    """A :class:`SparseGrad` of bags (:meth:`BagLookup.grad`): its values are each bag's gradient
    spread over the bag's entries, and it keeps the parts they were made of (the core's
    ``Spread``: ``(B, D)`` bag gradients, each entry's bag and factor) in ``spread``. A row-wise
    optimizer that runs the CPU update kernel reads those instead of the ``(n, D)`` values, which
    XLA then never makes (nothing uses them). Anything else reads the values: they are the same
    numbers. ``_replace`` and friends return one without ``spread``, whose values are then used.
    """

    def __new__(cls, indices, values, spread=None):
        self = super().__new__(cls, indices, values)
        self.spread = spread
        return self


jax.tree_util.register_pytree_node(
    _SpreadGrad,
    lambda g: ((g.indices, g.values, getattr(g, "spread", None)), None),
    lambda _, children: _SpreadGrad(*children),
)


def spread_of(grad: SparseGrad) -> _bag.Spread | None:
    """The pooled gradient a :class:`SparseGrad` of bags was spread from, if it still is one."""
    return getattr(grad, "spread", None) if isinstance(grad, _SpreadGrad) else None


class SparseLookup(NamedTuple):
    """What :func:`lookup` keeps for the update: the table to update and where the rows came from.

    Attributes:
      params: the params to apply the update to: ``params`` as given, or with ``max_norm`` the
        renormed table (torch's optimizer updates the renormed table too).
      indices: ``(n,)`` the looked-up rows, flat; padding and out-of-range entries are
        ``num_embeddings``.
      scale: ``(n,)`` ``1 / count`` per entry with ``scale_grad_by_freq``, else None.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> rows, lk = jaxembed.sparse.lookup({"weight": jnp.ones((4, 2))}, jnp.array([3, 3]),
      ...                                   scale_grad_by_freq=True)
      >>> lk.indices, lk.scale
      (Array([3, 3], dtype=int32), Array([0.5, 0.5], dtype=float32))
      >>> lk.grad(jnp.ones((2, 2))).values
      Array([[0.5, 0.5],
             [0.5, 0.5]], dtype=float32)
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


@functools.partial(jax.jit, static_argnames=("options", "layout"))
def _lookup(
    weight: jax.Array, indices: jax.Array, *, options: LookupOptions, layout: _layout.Layout
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
    num_embeddings = weight.shape[0]

    def body(weight, indices):
        lookup = Lookup.start(
            jax.lax.stop_gradient(weight), indices, options, layout, num_embeddings
        )
        rows = lookup.rows(gradient=False)
        safe = _index_policy.drop_padding(lookup.safe, options.padding_idx, num_embeddings)
        rows = rows.reshape(indices.shape + rows.shape[-1:])
        return rows, lookup.new_weight, safe, lookup.scale(padding=False)

    return layout.run(
        body,
        (weight, indices),
        ("table", "indices"),
        ("rows", "table", "entries", "entries"),
        ndim=indices.ndim,
    )


def lookup_rows(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    options: LookupOptions,
    sharding: _layout.Layout | None = None,
) -> tuple[jax.Array, SparseLookup]:
    """:func:`lookup` with its options already checked (the modules' front end)."""
    weight = _validation.check_weight(params)
    options.check_table(weight.shape[0])
    idx = _index_policy.prepare_indices(indices, weight.shape[0])
    layout = _layout.bind(sharding, weight, idx.shape)
    rows, new_weight, safe, scale = _lookup(weight, idx, options=options, layout=layout)
    return rows, SparseLookup(dict(new_params(params, new_weight)), safe, scale)


@_options.renamed_lookup
def lookup(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    lookup_style: str = "gather",
    sharding: _layout.Layout | None = None,
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
      lookup_style: ``"gather"``, ``"one_hot"`` or ``"auto"``, as in :func:`jaxembed.embedding`.
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
    options = LookupOptions.of_call(
        params, padding_idx, max_norm, norm_type, scale_grad_by_freq, lookup_style
    )
    return lookup_rows(params, indices, options, sharding)


@jax.tree_util.register_pytree_node_class
class BagLookup:
    """What :func:`lookup_bags` keeps: the table to update, and how each bag's gradient spreads
    back over its entries.

    Attributes:
      params: the params to apply the update to (renormed with ``max_norm``).
      indices: ``(n,)`` each entry's row; entries in no bag are ``num_embeddings`` (dropped).
      mode: ``"sum"``, ``"mean"`` or ``"max"``.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> params = {"weight": jnp.arange(8.0).reshape(4, 2)}
      >>> bags, lk = jaxembed.sparse.lookup_bags(params, jnp.array([[0, 3]]), mode="max")
      >>> lk.grad(jnp.ones((1, 2))).values
      Array([[0., 0.],
             [1., 1.]], dtype=float32)
    """

    def __init__(self, params, indices, keep, starts, scale, psw, pos, mode, width):
        self.params, self.indices, self.keep, self.starts = params, indices, keep, starts
        self.scale, self.psw, self.pos, self.mode, self.width = scale, psw, pos, mode, width

    def tree_flatten(self):
        children = (self.params, self.indices, self.keep, self.starts, self.scale, self.psw,
                    self.pos)  # fmt: skip
        return children, (self.mode, self.width)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def grad(self, bag_grads: ArrayLike) -> SparseGrad:
        """The table's :class:`SparseGrad` from the gradient of the loss w.r.t. the bags
        ``(B, D)``: each bag's gradient spread over its entries, as the dense gradient is.

        It also keeps the bags' gradient it was spread from: on CPU, with the kernels
        (:mod:`jaxembed.kernels`), a row-wise optimizer spreads that as it updates, so a jitted
        step never makes the ``(n, D)`` values (the same numbers, bit for bit)."""
        weight = self.params["weight"]
        bag_grads = jnp.asarray(bag_grads)
        num_bags = (self.starts[0] if isinstance(self.starts, tuple) else self.starts).shape[0]
        if bag_grads.shape != (num_bags, weight.shape[1]):
            raise ValueError(
                f"bag_grads must be the bags' shape {(num_bags, weight.shape[1])}, "
                f"got {tuple(bag_grads.shape)}"
            )
        parts = _spread(bag_grads, self.keep, self.starts, self.scale, self.psw, self.pos,
                        self.mode, self.width)  # fmt: skip
        values = _spread_values(parts).astype(weight.dtype)
        return _SpreadGrad(self.indices, values, parts)


_spread = jax.jit(_bag.spread_parts, static_argnames=("mode", "width"))
_spread_values = jax.jit(_bag.spread_values)


@functools.partial(jax.jit, static_argnames=("options", "mode", "width"))
def _lookup_bags(weight, indices, starts, psw, num_valid, *, options, mode, width):
    num_embeddings = weight.shape[0]
    indices, starts, psw, _, valid = _bag.bag_entries(
        indices, starts, psw, num_valid, num_embeddings
    )
    lookup = Lookup.start(
        jax.lax.stop_gradient(weight), indices, options, _layout.LOCAL, num_embeddings
    )
    keep = _bag.kept(lookup.safe, options.padding_idx)
    if valid is not None:
        keep = keep & valid
    bags, pos = _bag.bags_of_table(
        lookup.table, lookup.local, keep, psw, starts, mode, width, options.lookup_style
    )
    dropped = jnp.where(keep, lookup.safe, num_embeddings)
    return bags, lookup.new_weight, dropped, keep, starts, lookup.scale(padding=False), psw, pos


def lookup_bags_checked(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    offsets: ArrayLike | None,
    options: LookupOptions,
    *,
    mode: str,
    per_sample_weights: ArrayLike | None = None,
    include_last_offset: bool = False,
    num_valid: ArrayLike | None = None,
) -> tuple[jax.Array, BagLookup]:
    """:func:`lookup_bags` with its options already checked (the modules' front end)."""
    weight, idx, starts, psw, num_valid = _bag.prepare_bags(
        params,
        indices,
        offsets,
        options,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        num_valid=num_valid,
    )
    width = idx.shape[1] if idx.ndim == 2 else None
    bags, new_weight, dropped, keep, starts, scale, psw, pos = _lookup_bags(
        weight, idx, starts, psw, num_valid, options=options, mode=mode, width=width
    )
    params = dict(new_params(params, new_weight))
    return bags, BagLookup(params, dropped, keep, starts, scale, psw, pos, mode, width)


def lookup_bags(
    params: Mapping[str, ArrayLike],
    indices: ArrayLike,
    offsets: ArrayLike | None = None,
    *,
    mode: str = "mean",
    per_sample_weights: ArrayLike | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    lookup_style: str = "gather",
    num_valid: ArrayLike | None = None,
) -> tuple[jax.Array, BagLookup]:
    """Bags for sparse training (``EmbeddingBag(sparse=True)``): the bags to differentiate, and
    how their gradient becomes the table's row-wise update.

    The pattern of :func:`lookup`, on bags::

        bags, lk = jaxembed.sparse.lookup_bags(params, ids, offsets, mode="sum")
        loss, bag_grads = jax.value_and_grad(loss_fn)(bags)
        table, state = opt.update(lk.grad(bag_grads), state, lk.params["weight"])

    The bags equal :func:`jaxembed.embedding_bag`'s bit for bit and are reduced from the table
    directly (no ``(n, D)`` rows in the forward pass). ``lk.grad`` spreads each bag's gradient
    over its entries, the same values the dense gradient scatters: one entry of the update per
    id. Entries in no bag (padding, past ``num_valid``) get no update, ``scale_grad_by_freq``
    divides by the count, and ``per_sample_weights`` stay differentiable.

    Args:
      params: the table; it and every other argument are as in :func:`jaxembed.embedding_bag`
        (one device: no ``sharding``): ``indices``, ``offsets``, ``mode``,
        ``per_sample_weights``, ``include_last_offset``, ``padding_idx``, ``max_norm``,
        ``norm_type``, ``scale_grad_by_freq``, ``lookup_style``, ``num_valid``.

    Returns:
      ``(bags, bag_lookup)``: ``bags`` is ``(B, D)``; a :class:`BagLookup`.

    Raises:
      As :func:`jaxembed.embedding_bag`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> params = {"weight": jnp.ones((5, 2))}
      >>> bags, lk = jaxembed.sparse.lookup_bags(params, jnp.array([1, 1, 4]), jnp.array([0, 2]),
      ...                                        mode="mean")
      >>> grad = lk.grad(jnp.ones_like(bags))
      >>> grad.indices, grad.values[:, 0]
      (Array([1, 1, 4], dtype=int32), Array([0.5, 0.5, 1. ], dtype=float32))
    """
    mode, include_last_offset, options = _options.bag_call_options(
        params,
        mode,
        include_last_offset,
        padding_idx,
        max_norm,
        norm_type,
        scale_grad_by_freq,
        lookup_style,
    )
    return lookup_bags_checked(
        params,
        indices,
        offsets,
        options,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        num_valid=num_valid,
    )


def sum_grads(*grads: SparseGrad) -> SparseGrad:
    """The sum of several :class:`SparseGrad` of one table (e.g. from several lookups into it).

    A ``SparseGrad``'s entries are summed per row, so the sum of two is their entries together.

    Args:
      *grads: one or more ``SparseGrad`` of the same table.

    Returns:
      A ``SparseGrad`` with every entry of ``grads``, in order.

    Raises:
      ValueError: no ``grads``.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> a = jaxembed.sparse.SparseGrad(jnp.array([1]), jnp.ones((1, 2)))
      >>> b = jaxembed.sparse.SparseGrad(jnp.array([3, 1]), jnp.ones((2, 2)))
      >>> jaxembed.sparse.sum_grads(a, b).indices
      Array([1, 3, 1], dtype=int32)
    """
    if not grads:
        raise ValueError("sum_grads needs at least one SparseGrad")
    if len(grads) == 1:
        return grads[0]
    # a sharded collection's gradient holds each device's entries in a block of its own: such
    # gradients are summed block by block (``jaxembed.sharding``'s ``BlockGrad``)
    blockwise = getattr(grads[0], "sum_blocks", None)
    if blockwise is not None:
        return blockwise(grads)
    dtype = jnp.result_type(*(g.indices.dtype for g in grads))
    return SparseGrad(
        jnp.concatenate([g.indices.astype(dtype) for g in grads]),
        jnp.concatenate([g.values for g in grads]),
    )


_serialization.register_namedtuple(SparseGrad, "sparse.SparseGrad")
_serialization.register_node(_SpreadGrad, "sparse.SparseGrad.spread")
_serialization.register_namedtuple(SparseLookup, "sparse.SparseLookup")
_serialization.register_node(BagLookup, "sparse.BagLookup", to_json=list, from_json=tuple)
