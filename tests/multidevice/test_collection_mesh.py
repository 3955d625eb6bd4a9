"""Collections placed on 8 devices equal the unsharded collection (run via tests/test_sharding.py).

Every placement, and the planner's, against :func:`jaxembed.embedding_bag_collection` on the
whole batch (itself checked against TorchRec in tests/test_collections.py): the pooled features,
the renormed tables, the dense gradients and three sparse row-wise steps.
"""

from __future__ import annotations

import dataclasses
import functools
import re

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

K, B_LOCAL, CAPACITY = 8, 2, 48
E = jaxembed.EmbeddingBagConfig


def _tables(weighted=False):
    if weighted:  # weighted features: every table pools by sum
        return [
            E("a", 16, 40, ["fa"]),
            E("b", 16, 50, ["fb", "fb2"], padding_idx=3, lr_scale=2.0),
            E("c", 16, 30, ["fc"], max_norm=1.0),
            E("d", 8, 64, ["fd"], scale_grad_by_freq=True),
        ]
    return [
        E("a", 16, 40, ["fa"]),
        E("b", 16, 50, ["fb", "fb2"], pooling="mean", padding_idx=3),
        E("c", 16, 30, ["fc"], max_norm=1.0),
        E("d", 8, 64, ["fd"], scale_grad_by_freq=True, lr_scale=0.5),
        E("e", 32, 33, ["fe"], pooling="max"),
    ]


def _placements(name, tables):
    if name == "data_parallel":
        return {t.name: S.data_parallel() for t in tables}
    if name == "table_wise":  # several tables on one device, devices without any
        return {t.name: S.table_wise(i % 3 * 3) for i, t in enumerate(tables)}
    if name == "row_wise":
        return {t.name: S.row_wise() if t.pooling != "max" else S.table_wise(1) for t in tables}
    if name == "column_wise":
        return {t.name: S.column_wise() for t in tables}
    kinds = [S.row_wise(), S.table_wise(6), S.data_parallel(), S.column_wise(), S.table_wise(2)]
    return {t.name: kinds[i] for i, t in enumerate(tables)}  # "mixed"


def _batch(tables, seed=0, weighted=False, out_of_range=None):
    rng = np.random.default_rng(seed)
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    lists = {
        f: [list(rng.integers(0, n, rng.integers(0, 5))) for _ in range(K * B_LOCAL)]
        for f, n in rows.items()
    }
    lists["fa"][0] = [1, 1, 1, 2]  # duplicates within a bag
    lists["fb"][3] = [3, 3]  # all padding
    lists["fb2"][5] = [7, 3, 7]  # a row in two features of one table
    lists["fb"][5] = [7]
    if out_of_range is not None:
        lists[out_of_range][9] = [0, rows[out_of_range] + 5]
    weights = None
    if weighted:
        weights = {f: [list(rng.uniform(0.5, 2.0, len(b))) for b in v] for f, v in lists.items()}
    whole = jaxembed.KeyedJagged.from_lists(lists, weights, capacity=K * CAPACITY)
    blocks = [
        jaxembed.KeyedJagged.from_lists(
            {f: v[k * B_LOCAL : (k + 1) * B_LOCAL] for f, v in lists.items()},
            None
            if weights is None
            else {f: v[k * B_LOCAL : (k + 1) * B_LOCAL] for f, v in weights.items()},
            capacity=CAPACITY,
        )
        for k in range(K)
    ]
    return whole, blocks


def _cotangents(tables, dtype=jnp.float32):
    """A random ``(B, D)`` array per feature."""
    rng = np.random.default_rng(1)
    return {
        f: jnp.asarray(rng.normal(size=(K * B_LOCAL, t.embedding_dim)), dtype)
        for t in tables
        for f in t.feature_names
    }


def _mesh(explicit=True):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((K,), ("x",), axis_types=(kind,))


def _same(a, b, exact, what):
    a, b = np.asarray(a), np.asarray(b)
    if exact:
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=what)


def _plan(name, tables, mesh):
    if name == "planned":
        tx = jaxembed.sparse.rowwise_adagrad(0.1)
        return jaxembed.plan(tables, mesh, optimizer=tx, batch_size=K * B_LOCAL,
                             replicate_below=2048)  # fmt: skip
    return S.by_hand(tables, mesh, _placements(name, tables))


CASES = [
    ("data_parallel", False, True),
    ("table_wise", False, True),
    ("row_wise", False, True),
    ("column_wise", False, True),
    ("planned", False, True),
    ("mixed", True, False),  # weighted features, on a mesh of Auto axes
]


@functools.cache
def _unsharded(weighted):
    """The unsharded collection's results, which every placement must reproduce: computed once
    per table set (they do not depend on the placement or the mesh)."""
    tables = _tables(weighted)
    whole, _ = _batch(tables, weighted=weighted)
    params = jaxembed.collections.init(jax.random.key(0), tables, stack=False)
    cot = _cotangents(tables)
    ref, ref_new = jaxembed.embedding_bag_collection(params, whole, tables, stack=False)

    def loss(p):
        pooled = jaxembed.embedding_bag_collection(p, whole, tables, stack=False)[0]
        return sum((pooled[f] * cot[f]).sum() for f in pooled)

    g_ref = jax.grad(loss)(params)
    tx = jaxembed.sparse.rowwise_adagrad(0.1)
    opt = jaxembed.collections.optimizer(tx, tables, stack=False)
    state = opt.init(params)

    @jax.jit
    def ref_step(p, st):
        _, lk = jaxembed.collections.lookup(p, whole, tables, stack=False)
        return opt.update(lk.grad(cot), st, lk.params)

    stepped = params
    for _ in range(3):
        stepped, state = ref_step(stepped, state)
    return ref, ref_new, g_ref, stepped


@pytest.mark.parametrize("name,weighted,explicit", CASES)
def test_placements_equal_the_unsharded_collection(name, weighted, explicit):
    tables = _tables(weighted)
    mesh = _mesh(explicit)
    plan = _plan(name, tables, mesh)
    kinds = {p.kind for _, p in plan.placements}
    _, blocks = _batch(tables, weighted=weighted)
    features = S.put_features(blocks, plan)
    sharded = S.init(jax.random.key(0), plan)
    cot = _cotangents(tables)
    ref, ref_new, g_ref, stepped = _unsharded(weighted)
    with jax.set_mesh(mesh):
        # the forward and the renorm: bit for bit but for row-wise partial sums, and weighted
        # bags (XLA may contract a weight's product and the sum into one FMA in one program
        # and not in the other)
        out, new = S.embedding_bag_collection(sharded, features, plan)
        for f in ref:
            row_wise = plan.placement(whole_table(tables, f)).kind is S.Kind.ROW_WISE
            _same(out[f], ref[f], not (row_wise or weighted), f"pooled {f}")
        for t, w in S.tables_of(new, plan).items():
            _same(w, ref_new[t]["weight"], True, f"renormed {t}")

        # the dense gradient: a replica's is summed over devices, so the order of sums differs
        def loss(p):
            pooled = S.embedding_bag_collection(p, features, plan)[0]
            return sum((pooled[f] * cot[f]).sum() for f in pooled)

        g = jax.grad(loss)(sharded)
        for t, w in S.tables_of(g, plan).items():
            _same(w, g_ref[t]["weight"], False, f"gradient {t}")

        # three sparse steps: bit for bit (the entries are reordered as the unsharded ones),
        # but column-wise, whose row-wise statistic is a sum over devices
        tx = jaxembed.sparse.rowwise_adagrad(0.1)
        sharded_opt = S.optimizer(tx, plan)
        sharded_state = sharded_opt.init(sharded)

        @jax.jit
        def step(p, st, features):
            _, lk = S.lookup(p, features, plan)
            return sharded_opt.update(lk.grad(cot), st, lk.params)

        for _ in range(3):
            sharded, sharded_state = step(sharded, sharded_state, features)
        exact = S.Kind.COLUMN_WISE not in kinds and not weighted
        for t, w in S.tables_of(sharded, plan).items():
            _same(w, stepped[t]["weight"], exact, f"sparse steps {t}")
        # the state is laid out as its table
        for g_ in plan.groups:
            spec = S.spec_of(g_, "x")
            leaf = jax.tree.leaves(sharded_state[g_.name])[-1]
            assert leaf.sharding.spec[: leaf.ndim] == spec[: leaf.ndim] or leaf.ndim == 1


def whole_table(tables, feature):
    return next(t.name for t in tables if feature in t.feature_names)


@pytest.mark.parametrize("name", ["data_parallel", "table_wise", "row_wise", "column_wise"])
def test_an_id_outside_its_table_gives_a_nan_bag_under_jit(name):
    tables = _tables()
    mesh = _mesh()
    plan = _plan(name, tables, mesh)
    _, blocks = _batch(tables, out_of_range="fa")
    features = S.put_features(blocks, plan)
    params = S.init(jax.random.key(0), plan)
    with pytest.raises(IndexError, match="feature 'fa'"):
        S.embedding_bag_collection(params, features, plan)
    with jax.set_mesh(mesh):
        pooled = jax.jit(lambda p, f: S.embedding_bag_collection(p, f, plan)[0])(params, features)
    bad = np.isnan(np.asarray(pooled["fa"])).any(axis=1)
    assert bad[9] and bad.sum() == 1
    assert not any(np.isnan(np.asarray(v)).any() for f, v in pooled.items() if f != "fa")


def _compiled(plan, params, features, sparse=True):
    weights = tuple(params[g.name]["weight"] for g in plan.groups)
    lowered = S._collection._collection.lower(weights, features, plan=plan, sparse=sparse)
    return lowered.compile().as_text()


def test_no_table_is_gathered_and_row_wise_moves_bags_not_entries():
    # tables of many rows: no block's shape is a bag array's by chance
    tables = [dataclasses.replace(t, num_embeddings=t.num_embeddings * 40)
              for t in _tables() if t.pooling != "max"]  # fmt: skip
    mesh = _mesh()
    plan = S.by_hand(tables, mesh, {t.name: S.row_wise() for t in tables})
    _, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    params = S.init(jax.random.key(0), plan)
    hlo = _compiled(plan, params, features)
    shapes = re.findall(r"= (\S+) (?:all-gather|reduce-scatter|all-to-all|all-reduce)\(", hlo)
    assert shapes
    for g in plan.groups:  # no collective carries a table, whole or a block of it
        for rows, cols in (g.global_shape, (g.rows, g.cols)):
            assert not any(f"[{rows},{cols}]" in s for s in shapes), g.name
    # each group's reduce-scatter gives each device its (F * B_local, D) bags from (K * F *
    # B_local, D) partial bags: never (K * ids, D) entries
    scatters = re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} reduce-scatter\(", hlo)
    bags = sorted(len(g.stack.positions_in(features.keys)) * B_LOCAL for g in plan.groups)
    assert sorted(int(n) for n, _ in scatters) == bags
    assert S.collective_bytes(hlo)["reduce-scatter"] == sum(
        K * len(g.stack.positions_in(features.keys)) * B_LOCAL * g.cols * 4 for g in plan.groups
    )
    for g in plan.groups:
        assert not any(f"[{K * CAPACITY},{g.cols}]" in s for s in shapes)


# "mixed" holds every kind; the table-wise and row-wise plans stack several tables per group
@pytest.mark.parametrize("name", ["table_wise", "row_wise", "mixed"])
def test_the_bytes_a_step_moves_are_those_the_plan_states(name):
    tables = _tables()
    mesh = _mesh()
    plan = _plan(name, tables, mesh)
    _, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    params = S.init(jax.random.key(0), plan)
    stated = S.step_bytes(plan, features)
    assert S.collective_bytes(_compiled(plan, params, features)) == stated["lookup"]
    with jax.set_mesh(mesh):
        _, lk = S.lookup(params, features, plan)
    cot = {f: jnp.ones((K * B_LOCAL, plan.group_of(whole_table(tables, f)).stack.embedding_dim))
           for f in features.keys}  # fmt: skip
    hlo = S._collection._grads.lower(cot, lk.pieces, plan=plan, keys=features.keys)
    assert S.collective_bytes(hlo.compile().as_text()) == stated["grad"]


def _device_bytes(trees) -> np.ndarray:
    out = {}
    for leaf in jax.tree.leaves(trees):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return np.array([out[d.id] for d in jax.devices()[:K]])


def test_the_planned_memory_is_what_the_devices_hold():
    rng = np.random.default_rng(3)
    tables = [E(f"t{i}", 16, int(n), [f"f{i}"]) for i, n in
              enumerate(rng.integers(50, 5000, 24))]  # fmt: skip
    tables += [E("tiny", 16, 20, ["f_tiny"]), E("big", 16, 30_000, ["f_big"])]
    mesh = _mesh()
    tx = jaxembed.sparse.rowwise_adagrad(0.1)
    total = sum(S._placement.block_bytes(t.num_embeddings, t.embedding_dim, t.param_dtype, tx)
                for t in tables)  # fmt: skip
    bound = int(total / K * 1.1)
    plan = jaxembed.plan(tables, mesh, optimizer=tx, memory_per_device=bound, batch_size=512,
                         replicate_below=4000)  # fmt: skip
    # small tables replicated, mid-sized ones whole on a device, the huge one split by rows
    assert plan.placement("tiny").kind is S.Kind.DATA_PARALLEL
    assert plan.placement("big").kind is S.Kind.ROW_WISE
    assert S.Kind.TABLE_WISE in {p.kind for _, p in plan.placements}
    params = S.init(jax.random.key(0), plan)
    state = S.optimizer(tx, plan).init(params)
    held = _device_bytes((params, state))
    estimate = np.array(plan.estimates[0])
    assert np.all(np.abs(held - estimate) <= 0.1 * estimate), (held, estimate)
    assert held.max() <= bound
    # a pinned table stays where it is pinned
    pinned = jaxembed.plan(tables, mesh, optimizer=tx, pinned={"big": S.column_wise()})
    assert pinned.placement("big") == S.column_wise()
    with pytest.raises(ValueError, match=r"the largest, 'big', needs \d+"):
        jaxembed.plan(tables, mesh, optimizer=tx, memory_per_device=total // K // 2)
    with pytest.raises(ValueError, match=r"table 'big' fits nowhere.*the largest table, 'big'"):
        jaxembed.plan(tables, mesh, optimizer=tx, memory_per_device=int(total / K * 1.01),
                      pinned={"big": S.table_wise(0)})  # fmt: skip


def test_the_sharded_step_does_not_retrace():
    tables = _tables()
    mesh = _mesh()
    plan = _plan("mixed", tables, mesh)
    params = S.init(jax.random.key(0), plan)
    tx = jaxembed.sparse.rowwise_adagrad(0.1)
    opt = S.optimizer(tx, plan)
    state = opt.init(params)
    traces = []

    @jax.jit
    def step(p, st, features):
        traces.append(1)
        pooled, lk = S.lookup(p, features, plan)
        grads = jax.grad(lambda pooled: sum(v.sum() for v in pooled.values()))(pooled)
        return opt.update(lk.grad(grads), st, lk.params)

    with jax.set_mesh(mesh):
        for seed in range(3):
            _, blocks = _batch(tables, seed=seed)
            params, state = step(params, state, S.put_features(blocks, plan))
    assert len(traces) == 1


@pytest.mark.slow  # test_placements_equal_the_unsharded_collection: each placement in float32
def test_bfloat16_tables_on_every_placement():
    tables = [
        dataclasses.replace(t, param_dtype=jnp.bfloat16) for t in _tables() if t.pooling != "max"
    ]
    mesh = _mesh()
    kinds = [S.data_parallel(), S.table_wise(3), S.row_wise(), S.column_wise()]
    plan = S.by_hand(tables, mesh, {t.name: kinds[i] for i, t in enumerate(tables)})
    whole, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    params = jaxembed.collections.init(jax.random.key(0), tables, stack=False)
    sharded = S.init(jax.random.key(0), plan)
    tx = jaxembed.sparse.rowwise_adagrad(0.1)
    opt, sharded_opt = (
        jaxembed.collections.optimizer(tx, tables, stack=False),
        S.optimizer(tx, plan),
    )
    state, sharded_state = opt.init(params), sharded_opt.init(sharded)
    cot = _cotangents(tables, jnp.bfloat16)

    @jax.jit
    def ref_step(p, st):
        _, lk = jaxembed.collections.lookup(p, whole, tables, stack=False)
        return opt.update(lk.grad(cot), st, lk.params)

    @jax.jit
    def step(p, st, features):
        _, lk = S.lookup(p, features, plan)
        return sharded_opt.update(lk.grad(cot), st, lk.params)

    with jax.set_mesh(mesh):  # (jitted: op by op on 8 devices costs more than compiling)
        ref, _ = jax.jit(
            lambda p: jaxembed.embedding_bag_collection(p, whole, tables, stack=False)
        )(params)
        out, _ = jax.jit(lambda p, x: S.embedding_bag_collection(p, x, plan))(sharded, features)
        for _ in range(2):
            params, state = ref_step(params, state)
            sharded, sharded_state = step(sharded, sharded_state, features)
    for f in ref:
        assert out[f].dtype == jnp.bfloat16
        a, b = np.asarray(out[f], np.float32), np.asarray(ref[f], np.float32)
        if plan.placement(whole_table(tables, f)).kind is S.Kind.ROW_WISE:
            # each device's partial bag is rounded to bfloat16 before the devices' sum
            np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-9, err_msg=f)
        else:
            np.testing.assert_array_equal(a, b, err_msg=f)
    for t, w in S.tables_of(sharded, plan).items():
        assert w.dtype == jnp.bfloat16
        exact = plan.placement(t).kind is not S.Kind.COLUMN_WISE
        _same(w.astype(np.float32), np.asarray(params[t]["weight"], np.float32), exact, t)


def test_the_nnx_collection_trains_on_the_plan():
    from flax import nnx

    tables = _tables()
    mesh = _mesh()
    plan = _plan("mixed", tables, mesh)
    whole, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    target = _cotangents(tables)

    def loss(module, kj):
        pooled = module(kj)
        return sum(((pooled[f] - target[f]) ** 2).sum() for f in pooled)

    def train(module):
        opt = jaxembed.sparse.Optimizer(
            module, optax.sgd(0.0), jaxembed.sparse.rowwise_adagrad(0.1)
        )

        @nnx.jit
        def step(module, opt, kj):
            value, grads = jaxembed.sparse.value_and_grad(loss)(module, kj)
            opt.update(module, grads)
            return value

        return [float(step(module, opt, kj)) for kj in [features if module.sharding else whole] * 3]

    with jax.set_mesh(mesh):
        sharded = jaxembed.EmbeddingBagCollection(
            tables, rngs=nnx.Rngs(0), sparse=True, stack=False, sharding=plan
        )
        assert set(sharded.weights.keys()) == {g.name for g in plan.groups}
        single = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True, stack=False)
        np.testing.assert_allclose(train(sharded), train(single), rtol=1e-5)
        for t, w in sharded.tables().items():
            # the loss's gradient is the pooled features': row-wise partial sums round apart
            exact = plan.placement(t).kind not in (S.Kind.COLUMN_WISE, S.Kind.ROW_WISE)
            _same(w, single.tables()[t], exact, t)
        with pytest.raises(ValueError, match="looked up once per loss"):
            jaxembed.sparse.value_and_grad(lambda m: loss(m, features) + loss(m, features))(sharded)
    with pytest.raises(ValueError, match="ShardingPlan of these tables"):
        jaxembed.EmbeddingBagCollection(tables[:2], rngs=nnx.Rngs(0), sharding=plan)
