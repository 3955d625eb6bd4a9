"""Tables on a JAX mesh: one table by :class:`TableSharding`, a collection by a planned layout.

What this folder owns, module by module:

* ``_layout``: :class:`TableSharding`, a :class:`~jaxembed.core._layout.Layout`: the specs of a
  table and its lookups, their checks, the placement of arrays, and the device steps the core's
  one lookup body calls (localize, gather the indices over ``batch``, combine over ``vocab``);
* ``_update``: a row-wise optimizer on a sharded table (public as
  :func:`jaxembed.sparse.sharded`, which reaches it through ``TableSharding.rowwise``);
* ``_placement``: a collection's layout: a :class:`Placement` per table (data-parallel,
  table-wise, row-wise, column-wise), the :class:`ShardingPlan` holding them, and the groups of
  tables that share one physical array;
* ``_planner``: :func:`plan`, which chooses the placements from table sizes, device memory and
  a documented cost model, and :func:`collective_bytes`, what a compiled step moves;
* ``_route``: ids routed to the device owning their rows at a static capacity per (device,
  owner) pair (TorchRec's bucketized all-to-all), and what comes back through the same slots;
* ``_collection``: a collection's lookups, sparse lookups and row-wise updates on the mesh
  under ``jax.shard_map``, row- and table-wise groups through ``_route``; the stats pass
  :func:`capacity_for` and the overflow check :func:`check_stats`.

It may import :mod:`jaxembed.core`, :mod:`jaxembed.kernels` (the routing's CPU kernel),
:mod:`jaxembed.sparse` and :mod:`jaxembed.collections`.
Nothing below it imports it: the core and the sparse update reach it through the ``Layout``
interface.
"""

from jaxembed.sharding._collection import (
    BlockGrad,
    CapacityError,
    ShardedLookup,
    capacity_for,
    check_stats,
    embedding_bag_collection,
    embedding_collection,
    init,
    lookup,
    optimizer,
    put_features,
    shard_params,
    spec_of,
    step_bytes,
    tables_of,
)
from jaxembed.sharding._layout import TableSharding
from jaxembed.sharding._placement import (
    Group,
    Kind,
    Placement,
    ShardingPlan,
    by_hand,
    column_wise,
    data_parallel,
    row_wise,
    table_wise,
)
from jaxembed.sharding._planner import collective_bytes, plan

__all__ = [
    "BlockGrad",
    "CapacityError",
    "Group",
    "Kind",
    "Placement",
    "ShardedLookup",
    "ShardingPlan",
    "TableSharding",
    "by_hand",
    "capacity_for",
    "check_stats",
    "collective_bytes",
    "column_wise",
    "data_parallel",
    "embedding_bag_collection",
    "embedding_collection",
    "init",
    "lookup",
    "optimizer",
    "plan",
    "put_features",
    "row_wise",
    "shard_params",
    "spec_of",
    "step_bytes",
    "table_wise",
    "tables_of",
]
