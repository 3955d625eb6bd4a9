"""``flax.nnx`` managed-collision collections: raw 64-bit ids in, pooled features (or rows) out.

TorchRec's ``ManagedCollisionEmbeddingBagCollection`` and ``ManagedCollisionEmbeddingCollection``:
a collection module and a :class:`jaxembed.collisions.ManagedCollisionCollection`, whose states
the module holds as :class:`ManagedCollisionState` variables (not parameters: no gradient, no
optimizer), updated by every training call, under ``nnx.jit`` and
:func:`jaxembed.sparse.value_and_grad` alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed.collections._config import TorchRecInit
from jaxembed.collections._jagged import KeyedJagged
from jaxembed.collisions import _remap, _torchrec
from jaxembed.collisions._collection import ManagedCollisionCollection, RawKeyedJagged
from jaxembed.core import _validation
from jaxembed.modules import _table
from jaxembed.modules._collection import EmbeddingBagCollection, EmbeddingCollection, _Collection
from jaxembed.sparse import _nnx as _sparse_nnx

_MC_PREFIX = "_managed_collision_collection._managed_collision_modules."
_EMB_PREFIX = "_embedding_module."


def _fresh_rows(table: Any, key: jax.Array, k: int) -> jax.Array:
    """``k`` rows drawn as the table's init draws them: TorchRec's uniform bound is the whole
    table's (``sqrt(1 / num_embeddings)``); any other init draws the whole table and keeps its
    first ``k`` rows (an init may depend on the table's shape)."""
    shape = (table.num_embeddings, table.embedding_dim)
    if isinstance(table.init, TorchRecInit):
        bound = math.sqrt(1.0 / table.num_embeddings)
        return jax.random.uniform(key, (k, shape[1]), jnp.float32, -bound, bound)
    return table.init(key, shape, table.param_dtype)[:k]  # k <= num_embeddings


class ManagedCollisionState(nnx.Variable):
    """A table's :class:`jaxembed.collisions.CollisionState`: state, not a parameter (no
    gradient, and ``nnx.Optimizer`` / :class:`jaxembed.sparse.Optimizer` leave it alone)."""


class _ManagedCollisionCollection(nnx.Module):
    _embedding_type: type = _Collection

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        _table.readable_signature(cls)

    def __init__(
        self,
        embedding_module: Any,
        managed_collision_collection: ManagedCollisionCollection,
        *,
        ids_per_call: int | Mapping[str, int],
        return_remapped_features: bool = False,
        reset_evicted: bool = True,
        rngs: nnx.Rngs | None = None,
        _state: Mapping[str, Any] | None = None,
    ):
        if not isinstance(embedding_module, self._embedding_type):
            raise TypeError(
                f"embedding_module must be a jaxembed.{self._embedding_type.__name__}, got "
                f"{type(embedding_module).__name__}"
            )
        if not isinstance(managed_collision_collection, ManagedCollisionCollection):
            raise TypeError(
                "managed_collision_collection must be a "
                "jaxembed.collisions.ManagedCollisionCollection, got "
                f"{type(managed_collision_collection).__name__}"
            )
        if tuple(managed_collision_collection.tables) != tuple(embedding_module.plan.tables):
            raise ValueError(
                "the embedding module and the managed collision collection must hold the same "
                "table configs (TorchRec asserts the same)"
            )
        if embedding_module.sharding is not None:
            raise NotImplementedError(
                "managed collisions on a mesh (row-wise owners managing their own slots) are "
                "not built yet; use a collection on one device"
            )
        self.reset_evicted = _validation.check_flag("reset_evicted", reset_evicted)
        if self.reset_evicted and not embedding_module.sparse:
            raise ValueError(
                "reset_evicted=True (the default: an evicted row and its optimizer state start "
                "afresh, as TorchRec's sharded module) needs a sparse=True collection, whose "
                "row-wise optimizer state jaxembed.sparse.Optimizer resets with the rows; pass "
                "reset_evicted=False to keep evicted rows (TorchRec's unsharded module)"
            )
        self.rngs = nnx.Rngs(0) if rngs is None else rngs
        self.embedding_module = embedding_module
        self.managed_collision_collection = managed_collision_collection
        self.return_remapped_features = _validation.check_flag(
            "return_remapped_features", return_remapped_features
        )
        state = managed_collision_collection.init(ids_per_call) if _state is None else _state
        self.mc_state = nnx.Dict({k: ManagedCollisionState(v) for k, v in state.items()})
        # False: each call profiles its ids and evicts on schedule (TorchRec's training mode);
        # module.eval() sets it True (only remap), module.train() False again
        self.deterministic = False

    def _tables(self) -> list[str]:
        # by name: ``mc_state.items`` would be the state of a table named "items"
        return list(self.managed_collision_collection.managed_collisions)

    def remap(self, features: RawKeyedJagged) -> KeyedJagged:
        """The features' rows (and, in training, the states profiled and evicted)."""
        state = {k: self.mc_state[k].get_value() for k in self._tables()}
        out = self.managed_collision_collection.remap(state, features, train=not self.deterministic)
        if not self.deterministic:
            if self.reset_evicted:
                self._reset(out.evicted, out.num_evicted)
            for k, v in out.state.items():
                self.mc_state[k].set_value(v)
        return out.features

    def _reset(self, evicted: Mapping[str, jax.Array], num_evicted: Mapping[str, Any]) -> None:
        """The evicted rows drawn afresh from their table's init, each stack written once, and
        marked for :class:`jaxembed.sparse.Optimizer` to reset their state."""
        tape = _sparse_nnx.active_tape()
        if tape is None:
            raise ValueError(
                "a training call (profiling, evicting) of a managed-collision collection with "
                "reset_evicted=True runs under jaxembed.sparse.value_and_grad, so that the "
                "optimizer resets the evicted rows' state with the rows; call module.eval() to "
                "only remap, or pass reset_evicted=False"
            )
        emb = self.embedding_module
        for stack in emb.plan.stacks:
            variable = emb.weights[stack.name]
            table = variable.get_value()
            for t, offset in zip(stack.tables, stack.offsets, strict=True):
                slots = evicted[t.name]
                rows = jnp.where(slots < t.num_embeddings, slots + offset, stack.num_embeddings)
                fresh = jax.lax.cond(
                    num_evicted[t.name] > 0,
                    lambda key, t=t, k=slots.shape[0]: _fresh_rows(t, key, k).astype(t.param_dtype),
                    lambda key, t=t, k=slots.shape[0]: jnp.zeros(
                        (k, t.embedding_dim), t.param_dtype
                    ),
                    self.rngs(),
                )
                table = table.at[rows].set(fresh.astype(table.dtype), mode="drop")
                tape.reset(variable, rows)
            variable.set_value(table)

    def __call__(self, features: RawKeyedJagged) -> Any:
        """The embedding module's output on the remapped features; with
        ``return_remapped_features``, ``(output, remapped KeyedJagged)``. With
        ``reset_evicted``, a training call's evicted rows are drawn afresh before the lookup."""
        remapped = self.remap(features)
        out = self.embedding_module(remapped)
        return (out, remapped) if self.return_remapped_features else out

    def to_torch(self) -> dict[str, Any]:
        """TorchRec's state dict of the managed-collision module: the tables under
        ``_embedding_module.`` and each table's managed-collision buffers under
        ``_managed_collision_collection._managed_collision_modules.<table>.``."""
        import torch

        out = {_EMB_PREFIX + k: v for k, v in self.embedding_module.to_torch().items()}
        mcs = self.managed_collision_collection.managed_collisions
        for name in self._tables():
            sd = _torchrec.to_torchrec(mcs[name], self.mc_state[name].get_value())
            out.update({f"{_MC_PREFIX}{name}.{k}": torch.from_numpy(v) for k, v in sd.items()})
        return out

    @classmethod
    def from_torch(
        cls,
        state_dict: Mapping[str, Any],
        managed_collision_collection: ManagedCollisionCollection,
        *,
        ids_per_call: int | Mapping[str, int],
        return_remapped_features: bool = False,
        sparse: bool = True,
        stack: bool = True,
        reset_evicted: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        """The module over TorchRec's ``ManagedCollisionEmbeddingBagCollection`` (or
        ``...EmbeddingCollection``) state dict: tables, held ids and their counters, resumed
        as TorchRec resumes (an empty window; see :func:`jaxembed.collisions.from_torchrec`).
        The other arguments are the constructor's; ``sparse`` (default True) trains the tables
        row-wise, as TorchRec's fused optimizers do.

        Raises:
          KeyError: a table or buffer missing from ``state_dict``.
          ValueError: a tensor of another shape than its config, or broken buffers.
        """
        tables = managed_collision_collection.tables
        inner = {
            k[len(_EMB_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_EMB_PREFIX)
        }
        emb = cls._embedding_type.from_torch(inner, tables, sparse=sparse, stack=stack)
        per = (
            dict(ids_per_call)
            if isinstance(ids_per_call, Mapping)
            else dict.fromkeys(managed_collision_collection.managed_collisions, ids_per_call)
        )
        state = {
            name: _torchrec.from_torchrec(
                mc, state_dict, ids_per_call=per[name], prefix=f"{_MC_PREFIX}{name}."
            )
            for name, mc in managed_collision_collection.managed_collisions.items()
        }
        return cls(
            emb,
            managed_collision_collection,
            ids_per_call=ids_per_call,
            return_remapped_features=return_remapped_features,
            reset_evicted=reset_evicted,
            rngs=rngs,
            _state=state,
        )

    def held_ids(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{table: (ids, rows)}``: each table's held raw ids (int64) and their rows."""
        return {
            k: _remap.held_ids(jax.device_get(self.mc_state[k].get_value())) for k in self._tables()
        }


class ManagedCollisionEmbeddingBagCollection(_ManagedCollisionCollection):
    """TorchRec's ``ManagedCollisionEmbeddingBagCollection`` as a ``flax.nnx`` module.

    Each call remaps the raw ids of a :class:`jaxembed.collisions.RawKeyedJagged` to rows, one
    :class:`jaxembed.collisions.ManagedCollision` per table, then pools them with the
    :class:`jaxembed.EmbeddingBagCollection`. In training (the default; ``module.eval()`` and
    ``module.train()`` switch) the remap states, variables of type
    :class:`ManagedCollisionState`, are profiled and evicted on schedule, call by call as
    TorchRec's module; under ``nnx.jit`` and :func:`jaxembed.sparse.value_and_grad` alike.

    Args:
      embedding_module: the :class:`jaxembed.EmbeddingBagCollection` (dense or
        ``sparse=True``; on one device).
      managed_collision_collection: the tables' remappers, over the same table configs.
      ids_per_call: the most ids a call brings to a table (all its features), one number or
        ``{table name: n}``; a concrete call with more raises.
      return_remapped_features: return ``(pooled, remapped KeyedJagged)``.
      reset_evicted: draw each evicted row afresh from its table's init, and have
        :class:`jaxembed.sparse.Optimizer` reset its row-wise state (TorchRec's sharded
        semantics, the default). It needs a ``sparse=True`` collection, trained under
        :func:`jaxembed.sparse.value_and_grad`. False keeps evicted rows as they are (TorchRec's
        unsharded module: a new id inherits the old id's trained row).
      rngs: ``nnx.Rngs`` whose default stream draws the fresh rows (default ``nnx.Rngs(0)``).

    Example:
      >>> import jaxembed
      >>> from flax import nnx
      >>> from jaxembed.collisions import (
      ...     ManagedCollision, ManagedCollisionCollection, RawKeyedJagged)
      >>> tables = [jaxembed.EmbeddingBagConfig("users", 8, 100, ["user"])]
      >>> mc_ebc = jaxembed.ManagedCollisionEmbeddingBagCollection(
      ...     jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0)),
      ...     ManagedCollisionCollection({"users": ManagedCollision("lfu", 1)}, tables),
      ...     ids_per_call=64, reset_evicted=False)  # a dense table keeps its evicted rows
      >>> pooled = mc_ebc(RawKeyedJagged.from_lists({"user": [[2**50 + 1], [3, 2**60]]}))
      >>> pooled["user"].shape, len(mc_ebc.held_ids()["users"][0])
      ((2, 8), 3)
    """

    _embedding_type = EmbeddingBagCollection


class ManagedCollisionEmbeddingCollection(_ManagedCollisionCollection):
    """TorchRec's ``ManagedCollisionEmbeddingCollection``: as
    :class:`ManagedCollisionEmbeddingBagCollection`, over a :class:`jaxembed.EmbeddingCollection`
    (unpooled rows, ``{feature: Jagged}``).

    Example:
      >>> import jaxembed
      >>> from flax import nnx
      >>> from jaxembed.collisions import (
      ...     ManagedCollision, ManagedCollisionCollection, RawKeyedJagged)
      >>> tables = [jaxembed.EmbeddingConfig("pages", 4, 50, ["history"])]
      >>> mc_ec = jaxembed.ManagedCollisionEmbeddingCollection(
      ...     jaxembed.EmbeddingCollection(tables, rngs=nnx.Rngs(0)),
      ...     ManagedCollisionCollection({"pages": ManagedCollision("lru", 1)}, tables),
      ...     ids_per_call=16, reset_evicted=False)
      >>> out = mc_ec(RawKeyedJagged.from_lists({"history": [[2**40, 9, 2**40], [9]]}))
      >>> out["history"].to_padded(3).shape
      (2, 3, 4)
    """

    _embedding_type = EmbeddingCollection
