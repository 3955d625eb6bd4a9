"""``flax.nnx`` modules over the functional core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxembed.core import _embedding, _gradient, _layout, _options, _validation
from jaxembed.core._init import Initializer, default_embedding_init
from jaxembed.modules import _table
from jaxembed.quantized import _format as _quantized
from jaxembed.sharding import TableSharding
from jaxembed.sparse import _lookup as _sparse_lookup
from jaxembed.sparse import _nnx as _sparse_nnx


class _FlaxEmbedInit:
    """Flax ``nnx.Embed``'s default initializer (variance scaling, fan-in, normal: a std of about
    ``1/sqrt(features)``), with a readable repr."""

    def __call__(self, key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
        return nnx.nn.linear.default_embed_init(key, shape, dtype)

    def __repr__(self) -> str:
        return "variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)"


_flax_embed_init = _FlaxEmbedInit()


class FrozenWeight(nnx.Variable):
    """A table that gets no gradient (torch's ``requires_grad=False``): not an ``nnx.Param``."""


class RoutingStats(nnx.Variable):
    """A sharded collection's routing stats from its last call, ``(K, 2)`` int32 per routed
    group: per device, the most distinct rows it sent one owner (the capacity it needed) and
    its ids that overflowed (a :class:`~jaxembed.sharding.ShardedLookup`'s ``stats``). Not a
    parameter: it leaves ``nnx.jit`` as state does, for the host to check afterwards
    (:meth:`jaxembed.EmbeddingBagCollection.check_routing`)."""


class QuantizedWeight(nnx.Variable):
    """A quantized table's packed rows, ``(V, row bytes)`` uint8 in torch's layout: frozen."""


class _TableModule(nnx.Module):
    """The table, its checked configuration, and the write-back of the renorm."""

    #: a quantized module's bits (its ``weight`` a :class:`QuantizedWeight`), else None
    bits: int | None = None
    #: a quantized module's fp8 format ("e4m3" / "e5m2"), else None
    fp8: str | None = None
    #: whether the class reads quantized tables (``Embed``, Flax's drop-in, does not)
    _quantizable = True

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        _table.readable_signature(cls)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        padding_idx: int | None,
        max_norm: float | None,
        norm_type: float,
        scale_grad_by_freq: bool,
        dtype: Any,
        param_dtype: Any,
        embedding_init: Initializer,
        rngs: nnx.Rngs,
        sparse: bool = False,
        lookup_style: str = "gather",
        sharding: TableSharding | None = None,
    ):
        self.config = _options.TableConfig.check(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            lookup_style=lookup_style,
        )
        options = self.config.options
        self.num_embeddings = self.config.num_embeddings
        self.embedding_dim = self.config.embedding_dim
        self.padding_idx = options.padding_idx
        self.max_norm = options.max_norm
        self.norm_type = options.norm_type
        self.scale_grad_by_freq = options.scale_grad_by_freq
        self.lookup_style = options.lookup_style
        _table.check_dtypes(dtype, param_dtype)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.sharding = _layout.check(sharding) if sharding is not None else None
        self.sparse = _validation.check_flag("sparse", sparse)
        value = embedding_init(rngs.params(), (num_embeddings, embedding_dim), param_dtype)
        if not isinstance(embedding_init, _Pretrained):  # a given table keeps its padding row
            value = _table.zero_padding_row(value, options.padding_idx)
        kind = _sparse_nnx.SparseParam if self.sparse else nnx.Param
        self.weight = self._table_variable(kind, value)

    def _table_variable(self, kind: type, value: Any) -> nnx.Variable:
        """The table as a ``kind`` variable, with Flax partitioning metadata when sharded.

        The layout comes from ``sharding=`` or from an initializer wrapped in
        ``nnx.with_partitioning`` (whose names become ``vocab`` and ``dim``); given both, they
        must agree. ``nnx.get_partition_spec`` then reports ``P(vocab, dim)``, and under a mesh
        (``jax.set_mesh`` or ``TableSharding(mesh=...)``) the table is created already sharded.
        """
        raw = getattr(value, "raw_value", value)
        metadata = dict(getattr(value, "metadata", None) or {})
        names = metadata.get("out_sharding")
        if names is not None:
            names = tuple(names) + (None,) * (2 - len(names))
            implied = TableSharding(metadata.get("mesh"), vocab=names[0], dim=names[1], batch=None)
            if self.sharding is None:
                self.sharding = implied
            elif (self.sharding.vocab, self.sharding.dim) != names[:2]:
                raise ValueError(
                    f"sharding={self.sharding} disagrees with the partitioning of embedding_init "
                    f"{names}; give one of them"
                )
        if self.sharding is None:
            return kind(raw, **metadata)
        metadata["out_sharding"] = (self.sharding.vocab, self.sharding.dim)
        if self.sharding.available_mesh() is None:
            # no mesh yet: the table is placed later (nnx.get_partition_spec + jax.device_put)
            metadata["eager_sharding"] = False
        else:
            self.sharding.check_table(raw.shape, self.sharding.resolve_mesh())
            if self.sharding.mesh is not None:
                metadata["mesh"] = self.sharding.mesh
        return kind(raw, **metadata)

    @classmethod
    def _pretrained(cls, embeddings: ArrayLike, *, freeze: bool, **kwargs: Any):
        embeddings = _validation.check_table("embeddings", jnp.asarray(embeddings))
        freeze = _validation.check_flag("freeze", freeze)
        self = cls(
            *embeddings.shape,
            param_dtype=embeddings.dtype,
            embedding_init=_Pretrained(embeddings),
            rngs=nnx.Rngs(0),
            **kwargs,
        )
        if freeze:
            self.weight = self._table_variable(FrozenWeight, embeddings)
        return self

    @classmethod
    def _quantized(cls, table: Any, *, dtype: Any, **kwargs: Any):
        """A frozen module over a :class:`jaxembed.QuantizedTable`; ``dtype`` is the output's."""
        if not cls._quantizable:
            raise TypeError(
                f"{cls.__name__} is not built over quantized tables; use "
                "jaxembed.Embedding.from_quantized (or Embedding.quantize)"
            )
        if not isinstance(table, _quantized.QuantizedTable):
            raise TypeError(f"table must be a jaxembed.QuantizedTable, got {type(table).__name__}")
        dtype = _options.check_output_dtype(jnp.float32 if dtype is None else dtype)
        sharding = kwargs.get("sharding")
        if sharding is not None and _layout.check(sharding).splits_columns:
            raise ValueError("a quantized table shards by rows (vocab) only, not by dim")
        self = cls(
            *table.shape,
            dtype=dtype,
            embedding_init=_Pretrained(table.data),
            rngs=nnx.Rngs(0),
            **kwargs,
        )
        self.bits, self.fp8, self.param_dtype = table.bits, table.fp8, table.data.dtype
        self.weight = self._table_variable(QuantizedWeight, table.data)
        return self

    def _lookup_table(self) -> Any:
        """What a call reads: the float table, or the quantized one (then its output dtype)."""
        weight = self.weight.get_value()
        if self.bits is None:
            return weight, None
        table = _quantized.QuantizedTable(weight, self.bits, self.embedding_dim, fp8=self.fp8)
        return table, self.dtype

    def _quantize(self, bits: int, fp8: str | None, extra: dict) -> Any:
        if not self._quantizable:
            raise TypeError(
                f"{type(self).__name__} is not built over quantized tables; quantize its table "
                "into a jaxembed.Embedding: Embedding.from_quantized(jaxembed.quantize(...))"
            )
        if self.max_norm is not None:
            raise ValueError(
                "a module with max_norm renorms its table as it reads it; a quantized table is "
                "frozen: renorm the table first (jaxembed.renorm), then quantize a module without"
            )
        if self.bits is not None:
            raise ValueError(f"the module is already quantized ({self.bits} bits)")
        table = _quantized.quantize(self.weight.get_value(), bits=bits, fp8=fp8)
        return type(self)._quantized(
            table,
            padding_idx=self.padding_idx,
            dtype=self.dtype,
            sharding=self.sharding,
            **extra,
        )

    def _finish(self, out: jax.Array, weight: jax.Array, new_params: Mapping) -> jax.Array:
        """Writes the renormed table back (as torch does in place) and casts the output."""
        if self.config.options.max_norm is not None:
            # a later lookup in the same forward pass must still reach the parameter's gradient
            self.weight.set_value(_gradient.straight_through(weight, new_params["weight"]))
        return _table.cast_output(out, self.dtype)


class _Pretrained:
    """The initializer of ``from_pretrained``: the given table, as it is (padding row kept)."""

    def __init__(self, embeddings: jax.Array):
        self.embeddings = embeddings

    def __call__(self, key: jax.Array, shape: tuple, dtype: Any) -> jax.Array:
        del key, shape, dtype
        return self.embeddings


class Embedding(_TableModule):
    """torch's ``nn.Embedding`` as a ``flax.nnx`` module.

    The table is the ``nnx.Param`` attribute ``weight``, shape ``(num_embeddings, embedding_dim)``.
    Calling the module looks rows up with :func:`jaxembed.embedding`. With ``max_norm`` it writes
    the renormed rows back into ``self.weight``, as torch does in place, so under ``nnx.jit``,
    ``nnx.grad`` and ``nnx.Optimizer`` the gradient is taken at the pre-step table and the
    optimizer updates the renormed one.

    Args:
      num_embeddings: rows of the table (>= 0).
      embedding_dim: width of each row (>= 0).
      padding_idx: a row zeroed at construction whose gradient is always zero.
      max_norm: renorm looked-up rows whose ``norm_type``-norm exceeds it (> 0), or None.
      norm_type: p of the p-norm, > 0 or ``inf``.
      scale_grad_by_freq: divide each row's gradient by its count in the call.
      dtype: the dtype of the output (compute dtype); None keeps ``param_dtype``.
      param_dtype: the dtype the table is stored in.
      embedding_init: ``init(key, shape, dtype)``; torch's N(0, 1) by default. It may be wrapped
        in ``nnx.with_partitioning`` to place the table on a mesh.
      sparse: make the table a :class:`jaxembed.sparse.SparseParam`: under
        :func:`jaxembed.sparse.value_and_grad` its gradient is the looked-up rows only, and
        :class:`jaxembed.sparse.Optimizer` updates just those rows (torch's ``sparse=True``).
        Elsewhere it trains as a dense ``nnx.Param``.
      lookup_style: how rows are read: ``"gather"``, ``"one_hot"`` or ``"auto"`` (see
        :func:`jaxembed.embedding`); :class:`EmbeddingBag` takes it too.
      sharding: a :class:`jaxembed.TableSharding` to split the table (and the batch) over a mesh;
        every call then runs the sharded lookup. Without it, an ``embedding_init`` wrapped in
        ``nnx.with_partitioning(init, (vocab_axis, dim_axis))`` implies one (``batch=None``).
        The table carries the partitioning metadata either way (``nnx.get_partition_spec``).
        :class:`EmbeddingBag` takes it too.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> from flax import nnx
      >>> emb = jaxembed.Embedding(8, 4, padding_idx=2, max_norm=1.0, rngs=nnx.Rngs(0))
      >>> emb(jnp.array([1, 3, 4])).shape
      (3, 4)
      >>> bool(jnp.all(jnp.linalg.norm(emb.weight[...][jnp.array([1, 3, 4])], axis=1) <= 1.0))
      True
    """

    @_options.renamed_lookup
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = default_embedding_init,
        sparse: bool = False,
        lookup_style: str = "gather",
        sharding: TableSharding | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=embedding_init,
            rngs=rngs,
            sparse=sparse,
            lookup_style=lookup_style,
            sharding=sharding,
        )

    @classmethod
    @_options.renamed_lookup
    def from_pretrained(
        cls,
        embeddings: ArrayLike,
        *,
        freeze: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        dtype: Any = None,
        sparse: bool = False,
        lookup_style: str = "gather",
        sharding: TableSharding | None = None,
    ) -> Embedding:
        """A module over a given table (torch's ``nn.Embedding.from_pretrained``).

        The table is used as given (``padding_idx`` does not zero it). With ``freeze=True`` it is
        a :class:`FrozenWeight`, not an ``nnx.Param``: ``nnx.grad`` and
        ``nnx.Optimizer(wrt=nnx.Param)`` leave it alone. ``max_norm`` still renorms it.
        ``sparse=True`` (with ``freeze=False``) makes it a sparse table, as in the constructor.

        Example:
          >>> import jax.numpy as jnp, jaxembed
          >>> emb = jaxembed.Embedding.from_pretrained(jnp.eye(3))
          >>> emb(jnp.array([2]))
          Array([[0., 0., 1.]], dtype=float32)
        """
        return cls._pretrained(
            embeddings,
            freeze=freeze,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            dtype=dtype,
            sparse=sparse,
            lookup_style=lookup_style,
            sharding=sharding,
        )

    @classmethod
    def from_quantized(
        cls,
        table: Any,
        *,
        padding_idx: int | None = None,
        dtype: Any = None,
        sharding: TableSharding | None = None,
    ) -> Embedding:
        """A frozen module over a :class:`jaxembed.QuantizedTable` (torch's quantized
        ``nn.Embedding``).

        Its ``weight`` is a :class:`QuantizedWeight` holding the packed rows; each call decodes
        only the rows it looks up. ``dtype`` is the output's: float32 (default), float16 or
        bfloat16. ``sharding`` may split the rows (``vocab``), not the columns. There is no
        ``max_norm``, ``scale_grad_by_freq`` or ``sparse``: the table takes no update.

        Example:
          >>> import jax.numpy as jnp, jaxembed
          >>> q = jaxembed.quantize(jnp.arange(12.0).reshape(3, 4), bits=8)
          >>> emb = jaxembed.Embedding.from_quantized(q)
          >>> emb(jnp.array([2]))
          Array([[ 8.,  9., 10., 11.]], dtype=float32)
        """
        return cls._quantized(table, padding_idx=padding_idx, dtype=dtype, sharding=sharding)

    def quantize(self, bits: int = 8, *, fp8: str | None = None) -> Embedding:
        """This module's table quantized (:func:`jaxembed.quantize`: ``bits`` 8, 4 or 2, or
        ``fp8="e4m3"`` / ``"e5m2"``), as a new frozen module with its ``padding_idx``,
        ``dtype`` (the output's; float32 if None) and ``sharding``.

        Raises:
          ValueError: the module has ``max_norm`` (a frozen table cannot renorm), or is
            quantized already.
        """
        return self._quantize(bits, fp8, {})

    def __call__(self, indices: ArrayLike) -> jax.Array:
        """Returns the embeddings, ``indices.shape + (embedding_dim,)``, in ``dtype``."""
        if self.bits is not None:
            table, output_dtype = self._lookup_table()
            options = self.config.options
            return _embedding.embed(table, indices, options, self.sharding, output_dtype)[0]
        weight = self.weight.get_value()
        tape = _sparse_nnx.active_tape() if self.sparse else None
        options = self.config.options
        if tape is not None:
            # under jaxembed.sparse.value_and_grad: the rows' gradient is the table's
            rows, lk = _sparse_lookup.lookup_rows(
                {"weight": weight}, indices, options, self.sharding
            )
            if options.max_norm is not None:
                # a later read of the table (attend) must still reach the parameter's gradient
                self.weight.set_value(_gradient.straight_through(weight, lk.params["weight"]))
            return _table.cast_output(tape.record(self.weight, rows, lk), self.dtype)
        out, new_params = _embedding.embed({"weight": weight}, indices, options, self.sharding)
        return self._finish(out, weight, new_params)

    def attend(self, query: ArrayLike) -> jax.Array:
        """``query @ weight.T``: scores over the vocabulary, for a tied output projection.

        A quantized module dequantizes its whole table for the product (a transient ``(V, D)``
        array in ``dtype``): the scores of the table its lookups return.
        """
        table, output_dtype = self._lookup_table()
        if output_dtype is not None:
            table = _quantized.dequantize(table, dtype=output_dtype)["weight"]
        return _table.attend(query, table, self.dtype)


class EmbeddingBag(_TableModule):
    """torch's ``nn.EmbeddingBag`` as a ``flax.nnx`` module, over :func:`jaxembed.embedding_bag`.

    Arguments are :class:`Embedding`'s, plus ``mode`` (``"sum"``, ``"mean"``, ``"max"``) and
    ``include_last_offset``. With ``max_norm`` the renormed rows are written back into
    ``self.weight``. With ``sparse=True``, under :func:`jaxembed.sparse.value_and_grad` the
    table's gradient is its bags' entries (one row per id, each bag's gradient spread back), and
    :class:`jaxembed.sparse.Optimizer` updates only those rows (torch's ``sparse=True``); it does
    not take ``sharding`` yet.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> from flax import nnx
      >>> bag = jaxembed.EmbeddingBag(10, 3, mode="sum", rngs=nnx.Rngs(0))
      >>> bag(jnp.array([1, 2, 4, 5, 4]), jnp.array([0, 2])).shape
      (2, 3)
    """

    @_options.renamed_lookup
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        include_last_offset: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = default_embedding_init,
        sparse: bool = False,
        lookup_style: str = "gather",
        sharding: TableSharding | None = None,
        rngs: nnx.Rngs,
    ):
        self.mode, self.include_last_offset = _options.check_bag_options(
            mode, include_last_offset, scale_grad_by_freq
        )
        if _validation.check_flag("sparse", sparse) and sharding is not None:
            raise ValueError(
                "EmbeddingBag(sparse=True) does not take sharding yet; use a sharded "
                "jaxembed.Embedding(sparse=True) and pool its rows, or a dense sharded bag"
            )
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=embedding_init,
            rngs=rngs,
            sparse=sparse,
            lookup_style=lookup_style,
            sharding=sharding,
        )

    @classmethod
    @_options.renamed_lookup
    def from_pretrained(
        cls,
        embeddings: ArrayLike,
        *,
        freeze: bool = True,
        sparse: bool = False,
        mode: str = "mean",
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        include_last_offset: bool = False,
        dtype: Any = None,
        lookup_style: str = "gather",
        sharding: TableSharding | None = None,
    ) -> EmbeddingBag:
        """A bag module over a given table (torch's ``nn.EmbeddingBag.from_pretrained``)."""
        return cls._pretrained(
            embeddings,
            freeze=freeze,
            sparse=sparse,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            mode=mode,
            include_last_offset=include_last_offset,
            dtype=dtype,
            lookup_style=lookup_style,
            sharding=sharding,
        )

    @classmethod
    def from_quantized(
        cls,
        table: Any,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        dtype: Any = None,
        sharding: TableSharding | None = None,
    ) -> EmbeddingBag:
        """A frozen bag module over a :class:`jaxembed.QuantizedTable` (torch's quantized
        ``nn.EmbeddingBag``), as :meth:`Embedding.from_quantized`: rows are decoded as the
        reduction reads them and reduced in float32, then cast to ``dtype`` (float32 default).

        Example:
          >>> import jax.numpy as jnp, jaxembed
          >>> q = jaxembed.quantize(jnp.array([[0.0, 5, 10, 15], [1, 2, 3, 16]]), bits=4)
          >>> bag = jaxembed.EmbeddingBag.from_quantized(q, mode="sum")
          >>> bag(jnp.array([[0, 1]]))
          Array([[ 1.,  7., 13., 31.]], dtype=float32)
        """
        return cls._quantized(
            table,
            mode=mode,
            padding_idx=padding_idx,
            include_last_offset=include_last_offset,
            dtype=dtype,
            sharding=sharding,
        )

    def quantize(self, bits: int = 8, *, fp8: str | None = None) -> EmbeddingBag:
        """This module's table quantized, as a new frozen bag module with its ``mode``,
        ``include_last_offset``, ``padding_idx``, ``dtype`` and ``sharding`` (see
        :meth:`Embedding.quantize`)."""
        return self._quantize(
            bits, fp8, {"mode": self.mode, "include_last_offset": self.include_last_offset}
        )

    def __call__(
        self,
        indices: ArrayLike,
        offsets: ArrayLike | None = None,
        per_sample_weights: ArrayLike | None = None,
        num_valid: ArrayLike | None = None,
    ) -> jax.Array:
        """Returns one row per bag, ``(num_bags, embedding_dim)``, in ``dtype``.

        ``num_valid``: with offsets, how many indices are real; the rest are in no bag (see
        :func:`jaxembed.embedding_bag` and :func:`jaxembed.pad_bags`).
        """
        if self.bits is not None:
            table, output_dtype = self._lookup_table()
            return _table.bags(
                self, table, indices, offsets, per_sample_weights, num_valid, output_dtype
            )[0]
        weight = self.weight.get_value()
        tape = _sparse_nnx.active_tape() if self.sparse else None
        if tape is not None:
            # under jaxembed.sparse.value_and_grad: the bags' gradient becomes the table's
            bags, lk = _sparse_lookup.lookup_bags_checked(
                {"weight": weight},
                indices,
                offsets,
                self.config.options,
                mode=self.mode,
                per_sample_weights=per_sample_weights,
                include_last_offset=self.include_last_offset,
                num_valid=num_valid,
            )
            if self.config.options.max_norm is not None:
                self.weight.set_value(_gradient.straight_through(weight, lk.params["weight"]))
            return _table.cast_output(tape.record(self.weight, bags, lk), self.dtype)
        out, new_params = _table.bags(self, weight, indices, offsets, per_sample_weights, num_valid)
        return self._finish(out, weight, new_params)


class Embed(Embedding):
    """A drop-in for Flax's ``nnx.Embed``, with torch's options on top.

    It has ``nnx.Embed``'s constructor (``num_embeddings, features``), its parameter
    (``embedding``, so checkpoint paths and code that reads ``.embedding`` stay as they are), its
    default initializer (variance scaling, about N(0, 1/features); torch's N(0, 1) would make a
    tied head's logits about ``sqrt(features)`` times larger) and its ``out_sharding`` on
    ``__call__`` and ``attend``. A model that swaps ``nnx.Embed`` for it gives the same outputs,
    gradients and state paths. Unlike ``nnx.Embed``, a negative or too-large index is an error
    eagerly (and a NaN row under ``jit``, see the index policy), never a wrapped-around row.

    Args:
      num_embeddings: rows of the table.
      features: width of each row.
      dtype: the dtype of the outputs and of ``attend``'s computation; None keeps
        ``param_dtype`` (as ``nnx.Embed``).
      param_dtype: the dtype the table is stored in.
      embedding_init: ``init(key, shape, dtype)``; Flax's ``nnx.Embed`` default.
      padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, lookup_style, sharding:
        as :class:`Embedding`.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> from flax import nnx
      >>> ours = jaxembed.Embed(10, 4, rngs=nnx.Rngs(0))
      >>> flax = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
      >>> bool(jnp.all(ours(jnp.array([3, 7])) == flax(jnp.array([3, 7]))))
      True
      >>> list(nnx.state(ours)) == list(nnx.state(flax)) == ["embedding"]
      True
    """

    _quantizable = False

    @_options.renamed_lookup
    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = _flax_embed_init,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        lookup_style: str = "gather",
        sharding: TableSharding | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_embeddings,
            features,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=embedding_init,
            sparse=sparse,
            lookup_style=lookup_style,
            sharding=sharding,
            rngs=rngs,
        )
        self.features = self.embedding_dim

    # the table is ``embedding``, as in nnx.Embed; ``weight`` is its other name here
    @property
    def weight(self) -> nnx.Variable:
        return self.embedding

    @weight.setter
    def weight(self, variable: nnx.Variable) -> None:
        self.embedding = variable

    def __call__(self, inputs: ArrayLike, out_sharding: Any = None) -> jax.Array:
        """The embeddings, ``inputs.shape + (features,)``; ``out_sharding`` as ``nnx.Embed``'s.

        With a ``dtype`` other than the table's (and no ``max_norm``), the lookup reads the table
        cast to ``dtype``, as ``nnx.Embed`` does, so the gradient is rounded as Flax's is. With
        ``max_norm`` the renorm runs on the stored table, as in :class:`Embedding`.
        """
        weight = self.embedding.get_value()
        cast_first = (
            self.dtype is not None
            and jnp.dtype(self.dtype) != weight.dtype
            and self.config.options.max_norm is None
            and not self.sparse
        )
        if cast_first:
            out, _ = _embedding.embed(
                {"weight": weight.astype(self.dtype)}, inputs, self.config.options, self.sharding
            )
        else:
            out = super().__call__(inputs)
        return out if out_sharding is None else jax.sharding.reshard(out, out_sharding)

    def attend(self, query: ArrayLike, out_sharding: Any = None) -> jax.Array:
        """``query @ embedding.T`` in ``dtype`` (the table's by default), as ``nnx.Embed``."""
        dtype = self.dtype or self.embedding.get_value().dtype
        query = jnp.asarray(query).astype(dtype)
        table = self.embedding.get_value().astype(dtype)
        return jnp.dot(query, table.T, out_sharding=out_sharding)

    @classmethod
    def from_flax(cls, embed: nnx.Embed, **options: Any) -> Embed:
        """An ``Embed`` holding ``embed``'s table (copied) and dtypes, with torch's ``options``
        (``padding_idx`` does not zero the given row).

        Example:
          >>> import jaxembed
          >>> from flax import nnx
          >>> ours = jaxembed.Embed.from_flax(nnx.Embed(6, 2, rngs=nnx.Rngs(0)), max_norm=1.0)
          >>> ours.embedding.shape, ours.max_norm
          ((6, 2), 1.0)
        """
        if not isinstance(embed, nnx.Embed):
            raise TypeError(f"embed must be a flax nnx.Embed, got {type(embed).__name__}")
        table = embed.embedding.get_value()
        dtype = None if embed.dtype == table.dtype else embed.dtype
        return cls._pretrained(table, freeze=False, dtype=dtype, **options)

    def to_flax(self) -> nnx.Embed:
        """An ``nnx.Embed`` holding this table (copied) and dtypes (torch's options are dropped).

        Example:
          >>> import jaxembed
          >>> from flax import nnx
          >>> jaxembed.Embed(6, 2, rngs=nnx.Rngs(0)).to_flax().embedding.shape
          (6, 2)
        """
        table = self.embedding.get_value()
        return nnx.Embed(
            *table.shape,
            dtype=self.dtype,
            param_dtype=table.dtype,
            embedding_init=_Pretrained(jnp.array(table)),
            rngs=nnx.Rngs(0),
        )
