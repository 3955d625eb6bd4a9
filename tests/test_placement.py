"""Placements, plans and the sharded collection's checks, on this process's one device.

(Their results on 8 devices are in tests/multidevice/test_collection_mesh.py.)
"""

import jax
import numpy as np
import pytest

import jaxembed
from jaxembed import sharding as S

E = jaxembed.EmbeddingBagConfig
TABLES = [E("a", 8, 10, ["fa"]), E("b", 8, 20, ["fb"], pooling="max")]


def _mesh():
    return jax.make_mesh((1,), ("x",))


def test_placements_are_checked_values():
    assert S.Placement("row_wise") == S.row_wise()
    assert (
        str(S.table_wise(2)) == "table_wise@2"
        and repr(S.column_wise()) == "Placement('column_wise')"
    )
    with pytest.raises(ValueError, match="kind must be one of"):
        S.Placement("diagonal")
    with pytest.raises(TypeError, match="needs device=<int>"):
        S.Placement("table_wise")
    with pytest.raises(ValueError, match="table_wise placements only"):
        S.Placement("row_wise", 1)
    assert hash(S.table_wise(1)) == hash(S.table_wise(1))


def test_a_plan_refuses_what_it_cannot_run():
    mesh = _mesh()
    with pytest.raises(ValueError, match="tables \\['b'\\] have no placement"):
        S.by_hand(TABLES, mesh, {"a": S.row_wise()})
    with pytest.raises(ValueError, match="not in tables"):
        S.by_hand(TABLES, mesh, {"a": S.row_wise(), "b": S.data_parallel(), "z": S.row_wise()})
    plan = S.by_hand(TABLES, mesh, {"a": S.row_wise(), "b": S.row_wise()})  # max pools too
    (group,) = [g.name for g in plan.groups if g.stack.pooling == "max"]
    with pytest.raises(ValueError, match="overflow must be one of"):
        plan.with_capacity(4, overflow="ignore")
    with pytest.raises(ValueError, match="not a row_wise or table_wise group"):
        plan.with_capacity({"data_parallel:a": 4})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"capacity\[.*\] must be a positive int"):
            plan.with_capacity({group: bad})
    capped = plan.with_capacity(4, overflow="drop")
    assert dict(capped.capacity) == {g.name: 4 for g in plan.groups}
    assert capped != plan and capped.overflow == "drop"
    assert capped.with_capacity(None, overflow="error") == plan
    # a new placement keeps the capacity of the groups that still exist
    assert capped.replace(a=S.data_parallel()).capacity == ((group, 4),)
    with pytest.raises(ValueError, match=r"device 3 is not on the axis"):
        S.by_hand(TABLES, mesh, {"a": S.table_wise(3), "b": S.data_parallel()})
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        S.by_hand(TABLES, mesh, {"a": S.row_wise(), "b": S.data_parallel()}, axis="y")
    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        S.by_hand(TABLES, "mesh", {"a": S.row_wise(), "b": S.data_parallel()})


def test_plan_is_printable_editable_and_hashable():
    mesh = _mesh()
    plan = jaxembed.plan(TABLES, mesh)
    assert "ShardingPlan over 1 devices" in str(plan) and "a " in str(plan)
    edited = plan.replace(a=S.row_wise())
    assert edited.placement("a") == S.row_wise() and plan.placement("a") != S.row_wise()
    assert hash(edited) == hash(plan.replace(a=S.row_wise()))
    with pytest.raises(ValueError, match="no tables named"):
        plan.replace(zz=S.row_wise())
    with pytest.raises(ValueError, match="pinned names tables"):
        jaxembed.plan(TABLES, mesh, pinned={"zz": S.row_wise()})
    with pytest.raises(ValueError, match="memory_per_device must be > 0"):
        jaxembed.plan(TABLES, mesh, memory_per_device=0)
    with pytest.raises(ValueError, match="the largest, 'b', needs 640"):
        jaxembed.plan(TABLES, mesh, memory_per_device=100)


def test_sharded_calls_check_their_arguments():
    mesh = _mesh()
    plan = S.by_hand(TABLES, mesh, {"a": S.row_wise(), "b": S.table_wise(0)})
    params = S.init(jax.random.key(0), plan)
    kj = jaxembed.KeyedJagged.from_lists({"fa": [[1, 2]], "fb": [[3]]})
    features = S.put_features([kj], plan)
    pooled, _ = S.embedding_bag_collection(params, features, plan)
    ref, _ = jaxembed.embedding_bag_collection(
        jaxembed.collections.init(jax.random.key(0), TABLES, stack=False), kj, TABLES, stack=False
    )
    for f in ref:
        np.testing.assert_array_equal(np.asarray(pooled[f]), np.asarray(ref[f]))
    with pytest.raises(TypeError, match=r"ShardingPlan"):
        S.embedding_bag_collection(params, features, TABLES)
    with pytest.raises(ValueError, match=r"build params with jaxembed\.sharding\.init"):
        S.embedding_bag_collection({"x": params[next(iter(params))]}, features, plan)
    with pytest.raises(TypeError, match="KeyedJagged"):
        S.lookup(params, {"fa": 1}, plan)
    bad = jaxembed.KeyedJagged.from_lists({"fa": [[1, 12]], "fb": [[3]]})
    with pytest.raises(IndexError, match="feature 'fa' holds 12"):
        S.embedding_bag_collection(params, S.put_features([bad], plan), plan)
    with pytest.raises(ValueError, match="one KeyedJagged per device"):
        S.put_features([kj, kj], plan)
    with pytest.raises(KeyError, match="no weight given for table 'b'"):
        S.shard_params({"a": np.zeros((10, 8), np.float32)}, plan)
    with pytest.raises(ValueError, match="has shape"):
        S.shard_params({"a": np.zeros((10, 8)), "b": np.zeros((21, 8))}, plan)
    with pytest.raises(TypeError, match="RowOptimizer"):
        S.optimizer(object(), plan)
    _, lk = S.lookup(params, features, plan)
    with pytest.raises(KeyError, match="lack the features"):
        lk.grad({"fa": np.ones((1, 8), np.float32)})
