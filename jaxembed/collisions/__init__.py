"""Managed collisions: unbounded raw ids (64-bit hashes) mapped onto a fixed table, inside jit.

TorchRec's managed-collision modules (``MCHManagedCollisionModule``) the JAX way: the remap
table is a pytree, and a call is ``(state, raw_ids) -> (rows, new_state, evicted)``, so it runs
in a jitted training step beside the table and its optimizer.

* :class:`ManagedCollision`: the policy (LFU, LRU, distance-LFU) and its interval; ``init`` and
  ``remap``;
* :class:`CollisionState`, :class:`Remapped`: the state and a call's result;
* :class:`RawIds`, :func:`raw_ids`, :func:`to_int64`: 64-bit ids as two 32-bit halves, so no
  ``jax_enable_x64`` is needed;
* :func:`reset_rows`, :func:`reset_state`: the evicted rows, and their optimizer state, back to
  the table's init;
* :func:`to_torchrec`, :func:`from_torchrec`: TorchRec's managed-collision state dict;
* :class:`ManagedCollisionCollection`, :class:`RawKeyedJagged`, :class:`RemappedFeatures`: one
  remapper per table of a collection, over keyed jagged raw ids (TorchRec's
  ``ManagedCollisionCollection``); its result feeds any collection lookup.

What this folder owns, module by module:

* ``_ids``: the raw ids' pairs, their order and binary search;
* ``_remap``: the config, the state and a call;
* ``_reset``: evicted rows and optimizer state reset;
* ``_torchrec``: TorchRec's state dict in and out;
* ``_collection``: a collection's remappers, and its raw keyed jagged ids.

It may import :mod:`jaxembed.core`, :mod:`jaxembed.kernels` (the remap's CPU kernel),
:mod:`jaxembed.sparse` (the optimizers' state reset), :mod:`jaxembed.collections` (its
configs and :class:`jaxembed.KeyedJagged`) and :mod:`jaxembed.sharding` (a remap on a
plan's mesh), and nothing else of jaxembed.
"""

from jaxembed.collisions._collection import (
    ManagedCollisionCollection,
    RawKeyedJagged,
    RemappedFeatures,
    put_raw_features,
)
from jaxembed.collisions._ids import RawIds, raw_ids, to_int64
from jaxembed.collisions._remap import (
    CollisionState,
    ManagedCollision,
    Remapped,
    held_ids,
)
from jaxembed.collisions._reset import reset_rows, reset_state
from jaxembed.collisions._torchrec import from_torchrec, to_torchrec

__all__ = [
    "CollisionState",
    "ManagedCollision",
    "ManagedCollisionCollection",
    "RawIds",
    "RawKeyedJagged",
    "Remapped",
    "RemappedFeatures",
    "from_torchrec",
    "held_ids",
    "put_raw_features",
    "raw_ids",
    "reset_rows",
    "reset_state",
    "to_int64",
    "to_torchrec",
]
