"""``flax.nnx`` collections: :class:`EmbeddingBagCollection` and :class:`EmbeddingCollection`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed import _interop
from jaxembed.collections import _collection
from jaxembed.collections._config import EmbeddingBagConfig, EmbeddingConfig, Plan
from jaxembed.collections._jagged import KeyedJagged
from jaxembed.core import _gradient, _validation
from jaxembed.modules import _table
from jaxembed.modules._nnx import FrozenWeight, QuantizedWeight, RoutingStats
from jaxembed.quantized import _format as _quantized
from jaxembed.sharding import _collection as _mesh
from jaxembed.sharding._placement import ShardingPlan
from jaxembed.sparse import _nnx as _sparse_nnx
from jaxembed.sparse._optimizers import RowOptimizer


class _Collection(nnx.Module):
    """The stacks as variables, the renorm's write-back, and the torch state dict."""

    _kind: type = EmbeddingBagConfig
    _prefix: str = "embedding_bags."

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        _table.readable_signature(cls)

    def __init__(
        self,
        tables: Any,
        *,
        rngs: nnx.Rngs,
        sparse: bool = False,
        stack: bool = True,
        sharding: Any = None,
        _weights: Mapping[str, Any] | None = None,
        _freeze: bool = False,
        _packed: tuple[int, str | None, Mapping[str, Any]] | None = None,
    ):
        self.plan = Plan.of(tables, self._kind, stack=_validation.check_flag("stack", stack))
        self.sparse = _validation.check_flag("sparse", sparse)
        self.sharding = sharding
        if _packed is not None:  # a frozen quantized collection: (bits, fp8, stack rows)
            self.bits, self.fp8, packed = _packed
            self.weights = nnx.Dict({k: QuantizedWeight(v) for k, v in packed.items()})
            return
        if sharding is not None:
            if not isinstance(sharding, ShardingPlan) or sharding.tables != self.plan.tables:
                raise ValueError(
                    "sharding must be a jaxembed.sharding.ShardingPlan of these tables "
                    "(jaxembed.plan(tables, mesh))"
                )
            if _weights is None:
                params = _mesh.init(rngs.params(), sharding)
            else:
                params = _mesh.shard_params(_weights, sharding)
        elif _weights is None:
            params = _collection.init(rngs.params(), self.plan)
        else:
            params = _collection.stack_tables(_weights, self.plan)
        kind = FrozenWeight if _freeze else (_sparse_nnx.SparseParam if sparse else nnx.Param)
        self.weights = nnx.Dict({name: kind(p["weight"]) for name, p in params.items()})
        if sharding is not None:
            self.routing = nnx.Dict(
                {name: RoutingStats(v) for name, v in _mesh.no_stats(sharding).items()}
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every feature, in the tables' order (in a bag collection, the order of
        :meth:`EmbeddingBagCollection.concat`)."""
        return self.plan.feature_names

    def _names(self) -> list[str]:
        """The physical tables: the stacks, or the sharding plan's groups."""
        if self.sharding is not None:
            return [g.name for g in self.sharding.groups]
        return [s.name for s in self.plan.stacks]

    #: a quantized collection's bits (its stacks :class:`QuantizedWeight` rows), else None
    bits: int | None = None
    #: a quantized collection's fp8 format, else None
    fp8: str | None = None

    def _params(self) -> dict[str, dict[str, Any]]:
        if self.bits is not None:  # each stack's packed rows, read as a frozen quantized table
            return {
                s.name: {
                    "weight": _quantized.QuantizedTable(
                        self.weights[s.name].get_value(), self.bits, s.embedding_dim, fp8=self.fp8
                    )
                }
                for s in self.plan.stacks
            }
        return {name: {"weight": self.weights[name].get_value()} for name in self._names()}

    def quantize(self, bits: int = 8, *, fp8: str | None = None) -> _Collection:
        """This collection with every stack quantized row-wise (:func:`jaxembed.quantize` with
        ``bits`` or ``fp8``: each table's rows, as quantizing each table apart), as a new frozen
        module.

        Its pooled features (or rows) are float32: each bag decoded and reduced as
        :func:`jaxembed.embedding_bag` on a quantized table does.

        Raises:
          ValueError: a table with ``max_norm`` (a frozen table cannot renorm); a collection
            already quantized.
          NotImplementedError: a collection on a mesh (``sharding=``).
        """
        if self.sharding is not None:
            raise NotImplementedError("quantizing a collection on a mesh is not built yet")
        if self.bits is not None:
            raise ValueError(f"the collection is already quantized ({self.bits} bits)")
        renormed = [t.name for t in self.plan.tables if t.max_norm is not None]
        if renormed:
            raise ValueError(
                f"tables {renormed} renorm as they are read (max_norm); a quantized table is "
                "frozen: renorm them first, then quantize a collection without max_norm"
            )
        packed = {
            name: _quantized.quantize(p["weight"], bits=bits, fp8=fp8).data
            for name, p in self._params().items()
        }
        return type(self)(self.plan, rngs=nnx.Rngs(0), _packed=(bits, fp8, packed))

    @classmethod
    def from_quantized(
        cls, quantized: Mapping[str, Any], tables: Any, *, stack: bool = True
    ) -> _Collection:
        """A frozen quantized collection over tables already quantized: ``{table name:
        QuantizedTable}``, for example :func:`jaxembed.quantized.from_torchrec` of TorchRec's
        quantized collection (its outputs are then TorchRec's module's).

        Args:
          quantized: one :class:`jaxembed.QuantizedTable` per table, all of one ``bits`` (and
            ``fp8``) format.
          tables: the table configs; each table's rows and width must match its quantized
            table.
          stack: stack the tables that can share a physical table.

        Raises:
          KeyError: a table missing from ``quantized``.
          ValueError: a table of another shape than its config, tables of several formats, or
            a table with ``max_norm``.
        """
        plan = Plan.of(tables, cls._kind, stack=_validation.check_flag("stack", stack))
        missing = [t.name for t in plan.tables if t.name not in quantized]
        if missing:
            raise KeyError(f"quantized has no table {missing}")
        formats = set()
        for t in plan.tables:
            q = quantized[t.name]
            if not isinstance(q, _quantized.QuantizedTable):
                raise TypeError(
                    f"quantized[{t.name!r}] must be a jaxembed.QuantizedTable, got "
                    f"{type(q).__name__}"
                )
            if q.shape != (t.num_embeddings, t.embedding_dim):
                raise ValueError(
                    f"table {t.name!r} is {q.shape} quantized, its config "
                    f"({t.num_embeddings}, {t.embedding_dim})"
                )
            formats.add((q.bits, q.fp8))
        if len(formats) > 1:
            raise ValueError(
                f"the tables are quantized in several formats {sorted(formats, key=str)}; a "
                "quantized collection holds one (build one collection per format)"
            )
        renormed = [t.name for t in plan.tables if t.max_norm is not None]
        if renormed:
            raise ValueError(f"tables {renormed} have max_norm; a quantized table is frozen")
        ((bits, fp8),) = formats
        packed = {
            s.name: jnp.concatenate([quantized[t.name].data for t in s.tables], axis=0)
            for s in plan.stacks
        }
        return cls(plan, rngs=nnx.Rngs(0), _packed=(bits, fp8, packed))

    def _write_back(self, params: Mapping, new_params: Mapping) -> None:
        """The renormed stacks, written back as torch's renorm does in place."""
        for name in self._names():
            new = new_params[name]["weight"]
            if new is not params[name]["weight"]:
                old = params[name]["weight"]
                self.weights[name].set_value(_gradient.straight_through(old, new))

    def _lookup_on_mesh(self, features: KeyedJagged, tape: Any) -> dict[str, Any]:
        """The pooled features (unpooled: ``{feature: Jagged}``) on the plan's mesh; under
        ``sparse.value_and_grad`` each group's features (their rows' values) are recorded side
        by side, and its gradient is its own entries."""
        params = self._params()
        if tape is None:
            out, new_params, stats = _mesh.forward_and_stats(params, features, self.sharding)
            self._write_back(params, new_params)
            self._keep_stats(stats)
            return out
        recorded = {key for key, _ in tape.records}
        again = any(tape.keys.get(id(self.weights[n])) in recorded for n in self._names())
        pooled, lk = _mesh.lookup(params, features, self.sharding)
        self._write_back(params, lk.params)
        # a second lookup in one loss: its gradient joins the first's, device block by device
        # block (``BlockGrad.sum_blocks``), and the stats keep the step's worst
        self._keep_stats(lk.stats, merge=again)
        pooled = dict(pooled)
        jagged = not self.sharding.pooled
        for g in self.sharding.groups:
            feats = _mesh.group_features(g, features.keys)
            values = [pooled[f].values if jagged else pooled[f] for f in feats]
            rows = tape.record(self.weights[g.name], jnp.concatenate(values), lk.group(g.name))
            for f, v in zip(feats, jnp.split(rows, len(feats)), strict=True):
                pooled[f] = pooled[f]._replace(values=v) if jagged else v
        return pooled

    def _keep_stats(self, stats: Mapping[str, jax.Array], *, merge: bool = False) -> None:
        """Keeps a call's routing stats; ``merge``: with this step's earlier lookup's (the most
        any device needed, and the ids overflowed in all)."""
        for name, value in stats.items():
            if merge:
                old = self.routing[name].get_value()
                value = jnp.stack([jnp.maximum(old[:, 0], value[:, 0]),
                                   old[:, 1] + value[:, 1]], axis=1)  # fmt: skip
            self.routing[name].set_value(value)

    def check_routing(self) -> None:
        """Raises where the last call on a mesh overflowed a routed group's capacity.

        Called eagerly, a sharded lookup raises (or warns) at once; under ``nnx.jit`` it cannot,
        so an overflowing step serves none of the group's ids (NaN bags, no update, under the
        ``error`` policy) and keeps its stats in ``routing``. Call this on the host after the
        step.

        Raises:
          jaxembed.sharding.CapacityError: under the plan's ``error`` policy, naming the group,
            its capacity and what the batch needed (``drop``: a warning instead).
          ValueError: a collection on one device (no ``sharding=``).
        """
        if self.sharding is None:
            raise ValueError("check_routing reads a sharded collection's stats (sharding=)")
        _mesh.check_stats({k: v.get_value() for k, v in self.routing.items()}, self.sharding)

    def _lookup(self, fn: Any, features: KeyedJagged) -> Any:
        tape = _sparse_nnx.active_tape() if self.sparse else None
        if self.sharding is not None:
            return self._lookup_on_mesh(features, tape)
        params = self._params()
        if tape is None:
            out, new_params = fn(params, features, self.plan)
            self._write_back(params, new_params)
            return out
        if self.plan.tables[0].pooling is None:  # sequences: the rows carry the gradient
            rows, lookups = _collection.lookup_sequences(params, features, self.plan)
            self._write_back(params, {k: lk.params for k, lk in lookups.items()})
            rows = {
                k: (tape.record(self.weights[k], r, lookups[k]), starts)
                for k, (r, starts) in rows.items()
            }
            return _collection.sequence_features(rows, features, self.plan)
        bags, lk = _collection.lookup_stacks(params, features, self.plan)
        self._write_back(params, lk.params)
        bags = {k: tape.record(self.weights[k], bags[k], lk.lookups[k]) for k in bags}
        return _collection.split_stacks(bags, lk)

    def tables(self) -> dict[str, jax.Array]:
        """The per-table view ``{table name: (num_embeddings, D)}``, for inspection and export
        (host arrays, gathered from every device, on a mesh)."""
        if self.sharding is not None:
            return _mesh.tables_of(self._params(), self.sharding)
        return _collection.tables_of(self._params(), self.plan)

    def row_optimizers(self, sparse_tx: RowOptimizer) -> dict[int, RowOptimizer]:
        """``sparse_tx`` for each stack, with its tables' ``lr_scale`` (for
        :class:`jaxembed.sparse.Optimizer`), by the stack variable's id. On a mesh: each group's,
        updating every device's own block."""
        if self.sharding is not None:
            txs = _mesh.group_optimizers(sparse_tx, self.sharding)
            return {id(self.weights[name]): tx for name, tx in txs.items()}
        return {
            id(self.weights[s.name]): _collection.stack_optimizer(sparse_tx, s)
            for s in self.plan.stacks
        }

    @classmethod
    def from_torch(
        cls,
        state_dict: Mapping[str, Any],
        tables: Any,
        *,
        freeze: bool = False,
        sparse: bool = False,
        stack: bool = True,
        sharding: Any = None,
    ):
        """The collection over a TorchRec state dict (``embedding_bags.<table>.weight`` for
        :class:`EmbeddingBagCollection`, ``embeddings.<table>.weight`` for
        :class:`EmbeddingCollection`; a whole model's state dict works with the keys' prefix
        stripped).

        Args:
          state_dict: the TorchRec module's ``state_dict()``.
          tables: the table configs, with the torch module's names and shapes.
          freeze: the tables get no gradient (``FrozenWeight``).
          sparse: train the tables row-wise (``SparseParam``).
          stack: stack the tables that can share a physical table.
          sharding: a :class:`jaxembed.sharding.ShardingPlan` to place the tables by.

        Raises:
          KeyError: a table missing from ``state_dict``.
          ValueError: a tensor of another shape than its config.
        """
        plan = Plan.of(tables, cls._kind, stack=stack)
        weights = {}
        for t in plan.tables:
            params = _interop.from_torch(state_dict, prefix=f"{cls._prefix}{t.name}.")
            weights[t.name] = params["weight"]
        return cls(
            plan,
            rngs=nnx.Rngs(0),
            sparse=sparse,
            stack=stack,
            sharding=sharding,
            _weights=weights,
            _freeze=_validation.check_flag("freeze", freeze),
        )

    def to_torch(self) -> dict[str, Any]:
        """The TorchRec state dict: ``{"embedding_bags.<table>.weight": torch.Tensor}`` (or
        ``embeddings.`` for :class:`EmbeddingCollection`), for ``load_state_dict``."""
        out = {}
        for name, weight in self.tables().items():
            out.update(_interop.to_torch({"weight": weight}, prefix=f"{self._prefix}{name}."))
        return out


class EmbeddingBagCollection(_Collection):
    """TorchRec's ``EmbeddingBagCollection`` as a ``flax.nnx`` module: pooled features of many
    tables in one call, stacked into few physical tables.

    The tables are the variables ``weights[stack name]`` (``nnx.Param``, or
    :class:`jaxembed.sparse.SparseParam` with ``sparse=True``); :meth:`tables` gives the
    per-table view. Calling the module runs :func:`jaxembed.embedding_bag_collection` (with
    ``max_norm`` the renormed rows are written back). With ``sparse=True``, under
    :func:`jaxembed.sparse.value_and_grad` each stack's gradient is its looked-up rows, and
    :class:`jaxembed.sparse.Optimizer` updates them in one row-wise update per stack, each
    table at its ``lr_scale`` times the learning rate.

    Args:
      tables: the :class:`~jaxembed.EmbeddingBagConfig` of every table.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      sparse: train the tables row-wise (torch's ``sparse=True``).
      stack: stack the tables that can share a physical table (default).
      sharding: a :class:`jaxembed.sharding.ShardingPlan` (:func:`jaxembed.plan`): the tables
        placed on its mesh, the variables ``weights[group name]``, and the module called on
        :func:`jaxembed.sharding.put_features`' batches (see
        :func:`jaxembed.sharding.embedding_bag_collection`); None: one device. Each call
        keeps its routing stats in ``routing[group name]`` (:class:`~jaxembed.RoutingStats`);
        under ``nnx.jit``, call :meth:`check_routing` on the host after the step.

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> from flax import nnx
      >>> tables = [jaxembed.EmbeddingBagConfig("users", 8, 100, ["user"]),
      ...           jaxembed.EmbeddingBagConfig("items", 8, 50, ["item", "last_item"])]
      >>> ebc = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0))
      >>> kj = jaxembed.KeyedJagged.from_lists({"user": [[3], [7]], "item": [[1, 2], []],
      ...                                       "last_item": [[4], [5, 6]]})
      >>> pooled = ebc(kj)
      >>> pooled["item"].shape, ebc.concat(pooled).shape
      ((2, 8), (2, 24))
      >>> list(ebc.weights.keys())
      ['users+items']
    """

    _kind = EmbeddingBagConfig
    _prefix = "embedding_bags."

    def __call__(self, features: KeyedJagged) -> dict[str, jax.Array]:
        """``{feature: (B, D)}`` pooled bags (see :func:`jaxembed.embedding_bag_collection`)."""
        return self._lookup(_collection.embedding_bag_collection, features)

    def concat(self, pooled: Mapping[str, jax.Array]) -> jax.Array:
        """The pooled features side by side, ``(B, sum of D)``, in :attr:`feature_names` order
        (TorchRec's ``KeyedTensor.values()``)."""
        return _collection.concat_pooled(pooled, self.plan)


class EmbeddingCollection(_Collection):
    """TorchRec's ``EmbeddingCollection`` as a ``flax.nnx`` module: unpooled (sequence) features.

    Args are :class:`EmbeddingBagCollection`'s, with :class:`~jaxembed.EmbeddingConfig` tables.
    Calling it returns ``{feature: Jagged}`` (``values`` ``(capacity, D)``, ``lengths`` ``(B,)``),
    see :func:`jaxembed.embedding_collection`. With ``sparse=True`` each stack's gradient is its
    looked-up rows (padding and out-of-range entries dropped), as :class:`jaxembed.Embedding`'s.

    Example:
      >>> import jaxembed
      >>> from flax import nnx
      >>> ec = jaxembed.EmbeddingCollection([jaxembed.EmbeddingConfig("t", 4, 10, ["a"])],
      ...                                   rngs=nnx.Rngs(0))
      >>> out = ec(jaxembed.KeyedJagged.from_lists({"a": [[1, 2, 3], [4]]}))
      >>> out["a"].to_padded(3).shape
      (2, 3, 4)
    """

    _kind = EmbeddingConfig
    _prefix = "embeddings."

    def __call__(self, features: KeyedJagged) -> dict[str, _collection.Jagged]:
        """``{feature: Jagged}`` rows (see :func:`jaxembed.embedding_collection`)."""
        return self._lookup(_collection.embedding_collection, features)
