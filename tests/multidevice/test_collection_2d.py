"""Collections on a 2-D mesh (``replica x model``, TorchRec's 2D parallel) equal the unsharded
collection (run via tests/test_sharding.py, on 8 fake devices as a 2 x 4 mesh).

The tables are placed along the model axis ``x`` (4 devices) and replicated over ``replica``
(2 copies); the batch splits over both (8 blocks). The 1-D suite's own checks
(``test_collection_mesh``) run here on the 2-D layout, with every copy of every block checked
alike after each step; the bytes each collective moves are read off the compiled HLO against
``S.step_bytes``; an overflow in one replica group refuses the step in every group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import jaxembed
from jaxembed import sharding as S

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through tests/test_sharding.py)", allow_module_level=True)

import test_collection_mesh as one_d
from mesh_checks import copies_alike

R, K = 2, 4  # replicas x devices along the model axis: 8 blocks of the batch, as the 1-D suite's


def _mesh(explicit=True):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((R, K), ("replica", "x"), axis_types=(kind, kind))


def _placements(name, tables):
    if name == "data_parallel":
        return {t.name: S.data_parallel() for t in tables}
    if name == "table_wise":  # several tables on one device, a device without any
        return {t.name: S.table_wise(i % 3) for i, t in enumerate(tables)}
    if name == "row_wise":
        return {t.name: S.row_wise() if t.pooling != "max" else S.table_wise(1) for t in tables}
    if name == "column_wise":
        return {t.name: S.column_wise() for t in tables}
    kinds = [S.row_wise(), S.table_wise(3), S.data_parallel(), S.column_wise(), S.table_wise(1)]
    return {t.name: kinds[i] for i, t in enumerate(tables)}  # "mixed"


def _plan(name, tables, mesh):
    if name == "planned":
        tx = jaxembed.sparse.rowwise_adagrad(0.1)
        return jaxembed.plan(tables, mesh, axis="x", replica="replica", optimizer=tx,
                             batch_size=R * K * one_d.B_LOCAL, replicate_below=2048)  # fmt: skip
    return S.by_hand(tables, mesh, _placements(name, tables), axis="x", replica="replica")


@pytest.fixture
def two_d(monkeypatch):
    """The 1-D suite's checks, on the 2-D mesh and its plans."""
    monkeypatch.setattr(one_d, "_mesh", _mesh)
    monkeypatch.setattr(one_d, "_plan", _plan)


# the README's command runs "mixed" (every kind at once, weighted) and "planned"; -m slow the rest
CASES = [
    pytest.param("data_parallel", False, True, marks=pytest.mark.slow),
    pytest.param("table_wise", False, True, marks=pytest.mark.slow),
    pytest.param("row_wise", False, True, marks=pytest.mark.slow),
    pytest.param("column_wise", False, True, marks=pytest.mark.slow),
    ("planned", False, True),
    ("mixed", True, False),  # weighted features, on a mesh of Auto axes
]


@pytest.mark.parametrize("name,weighted,explicit", CASES)
def test_2d_placements_equal_the_unsharded_collection(two_d, name, weighted, explicit):
    one_d.test_placements_equal_the_unsharded_collection(name, weighted, explicit)


@pytest.mark.parametrize("name", ["mixed", pytest.param("row_wise", marks=pytest.mark.slow)])
def test_2d_unpooled_placements_equal_the_unsharded_collection(two_d, name):
    one_d.test_unpooled_placements_equal_the_unsharded_collection(name)


@pytest.mark.parametrize("pooled", [True, False])
def test_the_bytes_a_2d_step_moves_are_those_the_plan_states(two_d, pooled):
    """Every kind at once (``max_norm``, ``scale_grad_by_freq`` and routed groups): each
    collective's bytes, lookup and gradient, are ``S.step_bytes``' (the copies' renorm, counts
    and updates across the replicas included)."""
    tables = one_d._tables() if pooled else one_d._plain_tables()
    rows = one_d.B_LOCAL if pooled else one_d.CAPACITY
    one_d._assert_bytes_are_the_plans(tables, "mixed", R * K * rows)


def test_the_2d_sharded_step_does_not_retrace(two_d):
    one_d.test_the_sharded_step_does_not_retrace()


def test_the_nnx_collection_trains_on_a_2d_plan(two_d):
    one_d.test_the_nnx_collection_trains_on_the_plan()


def test_an_overflow_in_one_replica_group_refuses_the_step_in_every_group():
    """Only replica group 1's devices overflow: under ``error`` no copy of any block changes
    (the copies stay alike); under ``drop`` each copy applies every group's served entries."""
    tables = [t for t in one_d._tables() if t.name in ("a", "b")]
    mesh = _mesh()
    plan = S.by_hand(tables, mesh, {t.name: S.row_wise() for t in tables}, axis="x",
                     replica="replica")  # fmt: skip
    lists, _ = one_d._zipf_batch(tables)
    half = R * K * one_d.B_LOCAL // 2
    for f in lists:  # replica group 0: one id a bag; group 1: the Zipf bags
        lists[f] = [[0] for _ in range(half)] + lists[f][half:]
    blocks = [
        jaxembed.KeyedJagged.from_lists(
            {f: v[d * one_d.B_LOCAL : (d + 1) * one_d.B_LOCAL] for f, v in lists.items()},
            capacity=one_d.CAPACITY * 2,
        )
        for d in range(R * K)
    ]
    features = S.put_features(blocks, plan)
    need = S.capacity_for(plan, [features], slack=1.0)
    small = {name: max(2, n - 3) for name, n in need.items()}
    strict = plan.with_capacity(small)
    params = S.init(jax.random.key(0), plan)
    opt = S.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), strict)
    state = opt.init(params)
    before = S.tables_of(params, plan)
    cot = {f: jnp.ones((R * K * one_d.B_LOCAL, 16)) for f in features.keys}

    def step(p, st, x, pl, o):
        pooled, lk = S.lookup(p, x, pl)
        return (pooled, *o.update(lk.grad(cot), st, lk.params), lk.stats)

    with jax.set_mesh(mesh):
        with pytest.raises(S.CapacityError, match="overflowed its capacity"):
            S.lookup(params, features, strict)
        pooled, new_params, new_state, stats = jax.jit(step, static_argnums=(3, 4))(
            params, state, features, strict, opt
        )
        for name, stat in stats.items():  # the overflow is group 1's alone
            stat = np.asarray(stat)
            assert stat[:K, 1].sum() == 0 and stat[K:, 1].sum() > 0, name
        assert all(np.isnan(np.asarray(v)).all() for v in pooled.values())
        for t, w in S.tables_of(new_params, plan).items():
            np.testing.assert_array_equal(w, before[t], err_msg=t)
        copies_alike((new_params, new_state), "the refused step's tables and state")

        loose = plan.with_capacity(small, overflow="drop")
        opt = S.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), loose)
        with pytest.warns(UserWarning, match="ids overflowed"):
            S.lookup(params, features, loose)
        _, new_params, new_state, stats = jax.jit(step, static_argnums=(3, 4))(
            params, opt.init(params), features, loose, opt
        )
        assert sum(int(np.asarray(v)[:, 1].sum()) for v in stats.values()) > 0
        assert any((w != before[t]).any() for t, w in S.tables_of(new_params, plan).items())
        copies_alike((new_params, new_state), "the dropping step's tables and state")


def test_a_2d_plan_says_what_it_needs():
    tables = one_d._tables()
    mesh = _mesh()
    plan = _plan("mixed", tables, mesh)
    assert (plan.num_devices, plan.num_replicas, plan.num_blocks) == (K, R, R * K)
    assert plan.batch_axes == ("replica", "x")
    assert "replicated 2 times over 'replica'" in str(plan)
    assert plan.replace(a=S.table_wise(0)).replica == "replica"
    placements = _placements("mixed", tables)
    with pytest.raises(ValueError, match="must have size 1"):  # a 1-D plan on the 2-D mesh
        S.by_hand(tables, mesh, placements, axis="x")
    with pytest.raises(ValueError, match="other than axis='x'"):
        S.by_hand(tables, mesh, placements, axis="x", replica="x")
    with pytest.raises(ValueError, match="other than axis='x'"):
        S.by_hand(tables, mesh, placements, axis="x", replica="rows")
    flipped = jax.make_mesh((K, R), ("x", "replica"))
    with pytest.raises(ValueError, match="must come before axis='x'"):
        S.by_hand(tables, flipped, placements, axis="x", replica="replica")
    # the model axis is found by itself: the mesh's one other axis of size > 1
    assert S.by_hand(tables, mesh, placements, replica="replica").axis == "x"
    with pytest.raises(ValueError, match="replica='rows' is not an axis"):
        jaxembed.plan(tables, mesh, axis="x", replica="rows")
    planned = jaxembed.plan(tables, mesh, replica="replica", batch_size=64)
    assert (planned.axis, planned.replica) == ("x", "replica")
    # one block per device of the 2-D mesh
    _, blocks = one_d._batch(tables)
    with pytest.raises(ValueError, match=f"one KeyedJagged per device of this process \\({R * K}"):
        S.put_features(blocks[:K], plan)


def test_one_2d_step_of_an_optax_loop_keeps_every_copy_alike():
    """A dense model beside the sharded tables, stepped by ``jaxembed.sparse.Optimizer`` under
    ``nnx.jit``: the model's arrays and every block's copies agree across the replicas."""
    from flax import nnx

    tables = one_d._tables()
    mesh = _mesh()
    plan = _plan("mixed", tables, mesh)
    _, blocks = one_d._batch(tables)
    features = S.put_features(blocks, plan)
    with jax.set_mesh(mesh):
        module = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True,
                                                 sharding=plan)  # fmt: skip
        opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.1), jaxembed.sparse.adagrad(0.1))

        @nnx.jit
        def step(module, opt, kj):
            loss = lambda m, kj: sum((v**2).sum() for v in m(kj).values())  # noqa: E731
            value, grads = jaxembed.sparse.value_and_grad(loss)(module, kj)
            opt.update(module, grads)
            return value

        first = float(step(module, opt, features))
        for _ in range(2):
            last = float(step(module, opt, features))
        assert last < first
        copies_alike(nnx.state(module), "the module's state")
        copies_alike(nnx.state(opt), "the optimizer's state")
