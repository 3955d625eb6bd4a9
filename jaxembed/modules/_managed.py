"""``flax.nnx`` managed-collision modules: raw 64-bit ids in, pooled features (or rows) out.

TorchRec's ``ManagedCollisionEmbeddingBagCollection`` and ``ManagedCollisionEmbeddingCollection``:
a collection module and a :class:`jaxembed.collisions.ManagedCollisionCollection`, whose states
the module holds as :class:`ManagedCollisionState` variables (not parameters: no gradient, no
optimizer), updated by every training call, under ``nnx.jit`` and
:func:`jaxembed.sparse.value_and_grad` alike. :class:`ManagedCollisionEmbedding` and
:class:`ManagedCollisionEmbeddingBag` put one :class:`jaxembed.collisions.ManagedCollision`
in front of one :class:`jaxembed.Embedding` / :class:`jaxembed.EmbeddingBag`, the same way.
"""

from __future__ import annotations

import functools
import math
import operator
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
from jaxembed.collisions._remap import ManagedCollision
from jaxembed.core import _layout, _validation
from jaxembed.core._init import default_embedding_init
from jaxembed.modules import _table
from jaxembed.modules._collection import EmbeddingBagCollection, EmbeddingCollection, _Collection
from jaxembed.modules._nnx import Embedding, EmbeddingBag
from jaxembed.sparse import _nnx as _sparse_nnx

_MC_PREFIX = "_managed_collision_collection._managed_collision_modules."
_EMB_PREFIX = "_embedding_module."


def _fresh_rows(init: Any, shape: tuple[int, int], dtype: Any, key: jax.Array, k: int):
    """``k`` rows drawn as the ``shape`` table's ``init`` draws them: TorchRec's uniform bound
    is the whole table's (``sqrt(1 / num_embeddings)``); any other init draws the whole table
    and keeps its first ``k`` rows (an init may depend on the table's shape)."""
    if isinstance(init, TorchRecInit):
        bound = math.sqrt(1.0 / shape[0])
        rows = jax.random.uniform(key, (k, shape[1]), jnp.float32, -bound, bound)
    else:
        rows = init(key, shape, dtype)[:k]  # k <= num_embeddings
    return rows.astype(dtype)


def _reset_rows(table, slots, num_evicted, key, *, init, shape, dtype, rows_of=None):
    """``table`` with the evicted ``slots`` (padded with ``shape[0]``) of one table drawn
    afresh, and the array rows they are (the others past the array's end), for the optimizer
    to reset. ``rows_of(slots)``: the array rows of valid slots (default: the slots)."""
    valid = slots < shape[0]
    safe = jnp.where(valid, slots, 0)
    rows = jnp.where(valid, safe if rows_of is None else rows_of(safe), table.shape[0])
    k = slots.shape[0]
    fresh = jax.lax.cond(
        num_evicted > 0,
        lambda key: _fresh_rows(init, shape, dtype, key, k),
        lambda key: jnp.zeros((k, shape[1]), dtype),
        key,
    )
    return _layout.set_rows(table, rows, fresh.astype(table.dtype)), rows


def _active_tape():
    """The sparse tape that a training call with ``reset_evicted`` needs, or a ValueError."""
    tape = _sparse_nnx.active_tape()
    if tape is None:
        raise ValueError(
            "a training call (profiling, evicting) of a managed-collision module with "
            "reset_evicted=True runs under jaxembed.sparse.value_and_grad, so that the "
            "optimizer resets the evicted rows' state with the rows; call module.eval() to "
            "only remap, or pass reset_evicted=False"
        )
    return tape


def _check_reset(reset_evicted: Any, embedding_module: Any, what: str, *, mesh: bool = False):
    """``reset_evicted``, checked against the embedding module it resets rows of (on a mesh
    only where ``mesh``: the collections)."""
    reset_evicted = _validation.check_flag("reset_evicted", reset_evicted)
    if not mesh and embedding_module.sharding is not None:
        raise NotImplementedError(
            f"managed collisions over a sharded {what} are not built; put the table in a "
            "collection (ManagedCollisionEmbeddingBagCollection or "
            "ManagedCollisionEmbeddingCollection), which runs on a mesh"
        )
    if reset_evicted and not embedding_module.sparse:
        raise ValueError(
            "reset_evicted=True (the default: an evicted row and its optimizer state start "
            f"afresh, as TorchRec's sharded module) needs a sparse=True {what}, whose "
            "row-wise optimizer state jaxembed.sparse.Optimizer resets with the rows; pass "
            "reset_evicted=False to keep evicted rows (TorchRec's unsharded module)"
        )
    return reset_evicted


class ManagedCollisionState(nnx.Variable):
    """A table's :class:`jaxembed.collisions.CollisionState`: state, not a parameter (no
    gradient, and ``nnx.Optimizer`` / :class:`jaxembed.sparse.Optimizer` leave it alone)."""


class _Managed(nnx.Module):
    """What the managed-collision modules share: the kind of embedding module they front."""

    _embedding_type: type = nnx.Module

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        _table.readable_signature(cls)

    def _check_embedding_module(self, embedding_module: Any) -> None:
        if not isinstance(embedding_module, self._embedding_type):
            raise TypeError(
                f"embedding_module must be a jaxembed.{self._embedding_type.__name__}, got "
                f"{type(embedding_module).__name__}"
            )


class _ManagedCollisionCollection(_Managed):
    _embedding_type = _Collection

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
        self._check_embedding_module(embedding_module)
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
        self.reset_evicted = _check_reset(reset_evicted, embedding_module, "collection", mesh=True)
        self.rngs = nnx.Rngs(0) if rngs is None else rngs
        self.embedding_module = embedding_module
        self.managed_collision_collection = managed_collision_collection
        self.return_remapped_features = _validation.check_flag(
            "return_remapped_features", return_remapped_features
        )
        state = managed_collision_collection.init(ids_per_call) if _state is None else _state
        if embedding_module.sharding is not None:  # every device remaps the whole batch
            state = jax.tree.map(embedding_module.sharding.replicated, state)
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
        out = self.managed_collision_collection.remap(
            state, features, train=not self.deterministic, sharding=self.embedding_module.sharding
        )
        if not self.deterministic:
            if self.reset_evicted:
                self._reset(out.evicted, out.num_evicted)
            for k, v in out.state.items():
                self.mc_state[k].set_value(v)
        return out.features

    def _reset(self, evicted: Mapping[str, jax.Array], num_evicted: Mapping[str, Any]) -> None:
        """The evicted rows drawn afresh from their table's init, each stack written once, and
        marked for :class:`jaxembed.sparse.Optimizer` to reset their state."""
        tape = _active_tape()
        emb = self.embedding_module
        # one key a table, in the tables' order, wherever the tables are placed
        keys = {t.name: self.rngs() for t in self.managed_collision_collection.tables}
        if emb.sharding is None:  # each stack's tables at their row offsets
            arrays = [(s.name, [(t, functools.partial(operator.add, off))
                                for t, off in zip(s.tables, s.offsets, strict=True)])
                      for s in emb.plan.stacks]  # fmt: skip
        else:  # each group's tables where the plan placed their rows
            arrays = [(g.name, [(t, functools.partial(g.rows_of, t.name)) for t in g.stack.tables])
                      for g in emb.sharding.groups]  # fmt: skip
        for name, tables in arrays:
            variable = emb.weights[name]
            table = variable.get_value()
            for t, rows_of in tables:
                shape = (t.num_embeddings, t.embedding_dim)
                table, rows = _reset_rows(table, evicted[t.name], num_evicted[t.name],
                                          keys[t.name], init=t.init, shape=shape,
                                          dtype=t.param_dtype, rows_of=rows_of)  # fmt: skip
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
        ``sparse=True``; on one device, or on a mesh with ``sharding=``: then each call takes
        :func:`jaxembed.collisions.put_raw_features`' batch, every device remaps the whole
        batch with the states replicated, exactly as one device would, and the lookup runs
        on the plan; see :meth:`jaxembed.collisions.ManagedCollisionCollection.remap`).
      managed_collision_collection: the tables' remappers, over the same table configs.
      ids_per_call: the most ids a call brings to a table (all its features; on a mesh, the
        whole batch's), one number or ``{table name: n}``; a concrete call with more raises.
      return_remapped_features: return ``(pooled, remapped KeyedJagged)``.
      reset_evicted: draw each evicted row afresh from its table's init, and have
        :class:`jaxembed.sparse.Optimizer` reset its row-wise state (TorchRec's sharded
        semantics, the default). It needs a ``sparse=True`` collection, trained under
        :func:`jaxembed.sparse.value_and_grad`. False keeps evicted rows as they are (TorchRec's
        unsharded module: a new id inherits the old id's trained row).
      rngs: ``nnx.Rngs`` whose default stream draws the fresh rows (default ``nnx.Rngs(0)``):
        a key a table, in the tables' order, at every training call.

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


class ManagedCollisionEmbedding(_Managed):
    """One :class:`jaxembed.collisions.ManagedCollision` in front of a
    :class:`jaxembed.Embedding`: raw 64-bit ids in, their rows out.

    What :class:`ManagedCollisionEmbeddingCollection` does for a collection, for one table:
    each call remaps the raw ids to the table's rows (slots), then looks them up; in training
    (the default; ``module.eval()`` and ``module.train()`` switch) the remap state, a
    :class:`ManagedCollisionState` variable, is profiled and evicted on schedule. The table's
    ``num_embeddings`` is the number of slots (its last row the miss row).

    Args:
      embedding_module: the :class:`jaxembed.Embedding` (dense or ``sparse=True``; on one device,
        not quantized, without ``padding_idx``: a slot is any id's row).
      managed_collision: the :class:`jaxembed.collisions.ManagedCollision` policy.
      ids_per_call: the most ids one call brings (a concrete call with more raises).
      reset_evicted: draw each evicted row afresh from ``init`` and have
        :class:`jaxembed.sparse.Optimizer` reset its row-wise state (the default; it needs a
        ``sparse=True`` module trained under :func:`jaxembed.sparse.value_and_grad`). False keeps
        evicted rows as they are.
      init: ``init(key, shape, dtype)``, what evicted rows are drawn from (the module's own
        default, torch's N(0, 1); pass the module's ``embedding_init`` if it was another).
      rngs: ``nnx.Rngs`` whose default stream draws the fresh rows (default ``nnx.Rngs(0)``).

    Raises:
      TypeError, ValueError: a bad argument, named; NotImplementedError: a sharded table.

    Example:
      >>> import numpy as np, jaxembed
      >>> from flax import nnx
      >>> from jaxembed.collisions import ManagedCollision
      >>> users = jaxembed.ManagedCollisionEmbedding(
      ...     jaxembed.Embedding(100, 8, rngs=nnx.Rngs(0)), ManagedCollision("lru", 1),
      ...     ids_per_call=4, reset_evicted=False)
      >>> rows = users(np.array([2**62 + 5, 7, 2**62 + 5], np.int64))  # the miss row, held now
      >>> rows.shape, len(users.held_ids()[0])
      ((3, 8), 2)
      >>> users.remap(np.array([7, 2**62 + 5], np.int64)).tolist()  # their rows, once held
      [98, 97]
    """

    _embedding_type = Embedding

    def __init__(
        self,
        embedding_module: Any,
        managed_collision: ManagedCollision,
        *,
        ids_per_call: int,
        reset_evicted: bool = True,
        init: Any = default_embedding_init,
        rngs: nnx.Rngs | None = None,
    ):
        self._check_embedding_module(embedding_module)
        if not isinstance(managed_collision, ManagedCollision):
            raise TypeError(
                "managed_collision must be a jaxembed.collisions.ManagedCollision, got "
                f"{type(managed_collision).__name__}"
            )
        if embedding_module.bits is not None:
            raise ValueError("embedding_module is quantized (frozen): its rows cannot be managed")
        if embedding_module.padding_idx is not None:
            raise ValueError(
                f"embedding_module has padding_idx={embedding_module.padding_idx}: a managed "
                "table's rows are slots that any id may hold, so no row can be padding"
            )
        if not callable(init):
            raise TypeError(f"init must be callable init(key, shape, dtype), got {init!r}")
        what = self._embedding_type.__name__
        self.reset_evicted = _check_reset(reset_evicted, embedding_module, what)
        self.embedding_module = embedding_module
        self.managed_collision = managed_collision
        self.init = init
        self.rngs = nnx.Rngs(0) if rngs is None else rngs
        state = managed_collision.init(embedding_module.num_embeddings, ids_per_call)
        self.mc_state = ManagedCollisionState(state)
        self.deterministic = False  # module.eval(): only remap; module.train(): profile too

    def remap(self, ids: Any, valid: Any = None) -> jax.Array:
        """The raw ids' rows, in ``ids``' shape (and, in training, the state profiled and
        evicted, the evicted rows reset). ``valid``: a bool mask of ids to leave out (their
        row reads ``num_embeddings``, out of range)."""
        out = self.managed_collision.remap(
            self.mc_state.get_value(), ids, valid=valid, train=not self.deterministic
        )
        if not self.deterministic:
            if self.reset_evicted:
                emb = self.embedding_module
                table, rows = _reset_rows(
                    emb.weight.get_value(), out.evicted, out.num_evicted, self.rngs(),
                    init=self.init, shape=(emb.num_embeddings, emb.embedding_dim),
                    dtype=emb.param_dtype,
                )  # fmt: skip
                _active_tape().reset(emb.weight, rows)
                emb.weight.set_value(table)
            self.mc_state.set_value(out.state)
        return out.slots

    def __call__(self, ids: Any) -> jax.Array:
        """The rows of the raw ``ids`` (any shape): ``ids.shape + (embedding_dim,)``."""
        return self.embedding_module(self.remap(ids))

    def held_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, rows)``: the held raw ids (int64) and their rows."""
        return _remap.held_ids(jax.device_get(self.mc_state.get_value()))


class ManagedCollisionEmbeddingBag(ManagedCollisionEmbedding):
    """One :class:`jaxembed.collisions.ManagedCollision` in front of a
    :class:`jaxembed.EmbeddingBag`: bags of raw 64-bit ids in, pooled rows out.

    As :class:`ManagedCollisionEmbedding` (the same arguments, over an ``EmbeddingBag``); a call
    takes the bag's arguments, with raw ids for ``indices``. With ``offsets`` and
    ``num_valid``, the ids past ``num_valid`` are in no bag and are not profiled.

    Example:
      >>> import numpy as np, jaxembed
      >>> from flax import nnx
      >>> from jaxembed.collisions import ManagedCollision
      >>> items = jaxembed.ManagedCollisionEmbeddingBag(
      ...     jaxembed.EmbeddingBag(50, 4, mode="mean", rngs=nnx.Rngs(0)),
      ...     ManagedCollision("lfu", 2), ids_per_call=6, reset_evicted=False)
      >>> items(np.array([[2**40, 3, 3], [9, 2**40, 1]], np.int64)).shape
      (2, 4)
    """

    _embedding_type = EmbeddingBag

    def __call__(
        self,
        indices: Any,
        offsets: Any = None,
        per_sample_weights: Any = None,
        num_valid: Any = None,
    ) -> jax.Array:
        """The bags' pooled rows, ``(num_bags, embedding_dim)`` (see
        :meth:`jaxembed.EmbeddingBag.__call__`), of the raw ids ``indices``."""
        valid = None
        if num_valid is not None:
            n = int(np.prod(np.shape(getattr(indices, "hi", indices))))
            valid = jnp.arange(n, dtype=jnp.int32) < jnp.asarray(num_valid, jnp.int32)
        slots = self.remap(indices, valid)
        return self.embedding_module(slots, offsets, per_sample_weights, num_valid)
