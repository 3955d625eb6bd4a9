"""``flax.nnx`` managed-collision collections: raw 64-bit ids in, pooled features (or rows) out.

TorchRec's ``ManagedCollisionEmbeddingBagCollection`` and ``ManagedCollisionEmbeddingCollection``:
a collection module and a :class:`jaxembed.collisions.ManagedCollisionCollection`, whose states
the module holds as :class:`ManagedCollisionState` variables (not parameters: no gradient, no
optimizer), updated by every training call, under ``nnx.jit`` and
:func:`jaxembed.sparse.value_and_grad` alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxembed.collections._jagged import KeyedJagged
from jaxembed.collisions import _remap, _torchrec
from jaxembed.collisions._collection import ManagedCollisionCollection, RawKeyedJagged
from jaxembed.core import _validation
from jaxembed.modules import _table
from jaxembed.modules._collection import EmbeddingBagCollection, EmbeddingCollection, _Collection

_MC_PREFIX = "_managed_collision_collection._managed_collision_modules."
_EMB_PREFIX = "_embedding_module."


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
        self.embedding_module = embedding_module
        self.managed_collision_collection = managed_collision_collection
        self.return_remapped_features = _validation.check_flag(
            "return_remapped_features", return_remapped_features
        )
        state = managed_collision_collection.init(ids_per_call) if _state is None else _state
        self.mc_state = nnx.Dict({k: ManagedCollisionState(v) for k, v in state.items()})
        #: False: each call profiles its ids and evicts on schedule (TorchRec's training mode);
        #: ``module.eval()`` sets it True (only remap), ``module.train()`` False again.
        self.deterministic = False

    def _tables(self) -> list[str]:
        # by name: ``mc_state.items`` would be the state of a table named "items"
        return list(self.managed_collision_collection.managed_collisions)

    def remap(self, features: RawKeyedJagged) -> KeyedJagged:
        """The features' rows (and, in training, the states profiled and evicted)."""
        state = {k: self.mc_state[k].get_value() for k in self._tables()}
        out = self.managed_collision_collection.remap(state, features, train=not self.deterministic)
        if not self.deterministic:
            for k, v in out.state.items():
                self.mc_state[k].set_value(v)
        return out.features

    def __call__(self, features: RawKeyedJagged) -> Any:
        """The embedding module's output on the remapped features; with
        ``return_remapped_features``, ``(output, remapped KeyedJagged)``. Evicted rows keep
        their values, as TorchRec's unsharded module (see
        :func:`jaxembed.collisions.reset_rows` for the functional reset)."""
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
        sparse: bool = False,
        stack: bool = True,
    ):
        """The module over TorchRec's ``ManagedCollisionEmbeddingBagCollection`` (or
        ``...EmbeddingCollection``) state dict: tables, held ids and their counters, resumed
        as TorchRec resumes (an empty window; see :func:`jaxembed.collisions.from_torchrec`).

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

    Example:
      >>> import jaxembed
      >>> from flax import nnx
      >>> from jaxembed.collisions import (
      ...     ManagedCollision, ManagedCollisionCollection, RawKeyedJagged)
      >>> tables = [jaxembed.EmbeddingBagConfig("users", 8, 100, ["user"])]
      >>> mc_ebc = jaxembed.ManagedCollisionEmbeddingBagCollection(
      ...     jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0)),
      ...     ManagedCollisionCollection({"users": ManagedCollision("lfu", 1)}, tables),
      ...     ids_per_call=64)
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
      ...     ids_per_call=16)
      >>> out = mc_ec(RawKeyedJagged.from_lists({"history": [[2**40, 9, 2**40], [9]]}))
      >>> out["history"].to_padded(3).shape
      (2, 3, 4)
    """

    _embedding_type = EmbeddingCollection
