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
from mesh_checks import copies_alike

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
    if name in ("row_wise", "row_wise_block"):
        own = "block" if name == "row_wise_block" else "mod"
        return {t.name: S.row_wise(own) if t.pooling != "max" else S.table_wise(1) for t in tables}
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


# the README's command runs "mixed" (every kind at once, weighted) and "planned"; each kind
# alone runs with -m slow (CI runs both)
CASES = [
    pytest.param("data_parallel", False, True, marks=pytest.mark.slow),
    pytest.param("table_wise", False, True, marks=pytest.mark.slow),
    pytest.param("row_wise", False, True, marks=pytest.mark.slow),
    pytest.param("row_wise_block", False, True, marks=pytest.mark.slow),
    pytest.param("column_wise", False, True, marks=pytest.mark.slow),
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
    _, blocks = _batch(tables, weighted=weighted)
    features = S.put_features(blocks, plan)
    sharded = S.init(jax.random.key(0), plan)
    cot = _cotangents(tables)
    ref, ref_new, g_ref, stepped = _unsharded(weighted)
    with jax.set_mesh(mesh):
        # the forward and the renorm: bit for bit (every device pools its own bags from its
        # rows, as one device does), but weighted bags (XLA may contract a weight's product
        # and the sum into one FMA in one program and not in the other)
        out, new = S.embedding_bag_collection(sharded, features, plan)
        for f in ref:
            _same(out[f], ref[f], not weighted, f"pooled {f}")
        for t, w in S.tables_of(new, plan).items():
            _same(w, ref_new[t]["weight"], True, f"renormed {t}")

        # the dense gradient: a replica's is summed over devices, so the order of sums differs
        def loss(p):
            pooled = S.embedding_bag_collection(p, features, plan)[0]
            return sum((pooled[f] * cot[f]).sum() for f in pooled)

        g = jax.grad(loss)(sharded)
        for t, w in S.tables_of(g, plan).items():
            _same(w, g_ref[t]["weight"], False, f"gradient {t}")

        # three sparse steps: bit for bit where a replica gathers every device's entries (in
        # the unsharded order); within a few ulp where a routed group's owner, or a small
        # replica's psum, adds each device's per-row sums (another order of the same sums),
        # and column-wise, whose row-wise statistic is a sum over devices
        tx = jaxembed.sparse.rowwise_adagrad(0.1)
        sharded_opt = S.optimizer(tx, plan)
        sharded_state = sharded_opt.init(sharded)

        @jax.jit
        def step(p, st, features):
            _, lk = S.lookup(p, features, plan)
            return sharded_opt.update(lk.grad(cot), st, lk.params)

        for _ in range(3):
            sharded, sharded_state = step(sharded, sharded_state, features)
        copies_alike((new, sharded, sharded_state), "the tables and state")
        for t, w in S.tables_of(sharded, plan).items():
            exact = in_order(plan, t, CAPACITY) and not weighted
            _same(w, stepped[t]["weight"], exact, f"sparse steps {t}")
        # the state is laid out as its table
        for g_ in plan.groups:
            spec = S.spec_of(g_, "x")
            leaf = jax.tree.leaves(sharded_state[g_.name])[-1]
            assert leaf.sharding.spec[: leaf.ndim] == spec[: leaf.ndim] or leaf.ndim == 1


def in_order(plan, table, ids):
    """Whether ``table``'s sparse update sums its entries in the unsharded order: a replica
    that gathers every device's entries (:func:`jaxembed.sharding._collection.dense_replica`)."""
    g = plan.group_of(table)
    dense = S._collection.dense_replica(g, ids, plan.num_blocks)
    return g.kind is S.Kind.DATA_PARALLEL and not dense


def whole_table(tables, feature):
    return next(t.name for t in tables if feature in t.feature_names)


def test_features_not_split_into_the_plans_blocks_are_refused():
    tables = _tables()
    plan = _plan("row_wise", tables, _mesh())
    whole, _ = _batch(tables)
    params = S.init(jax.random.key(0), plan)
    short = jaxembed.KeyedJagged(whole.keys, whole.values[:-1], whole.lengths)
    with pytest.raises(ValueError, match=r"8 equal device blocks \(jaxembed\.sharding\.put"):
        S.embedding_bag_collection(params, short, plan)


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


@pytest.mark.slow  # the README's command keeps the bytes tests; CI runs this
def test_no_table_is_gathered_and_a_routed_group_moves_k_times_its_capacity():
    # tables of many rows: no block's shape is a routed buffer's by chance
    tables = [dataclasses.replace(t, num_embeddings=t.num_embeddings * 40) for t in _tables()]
    mesh = _mesh()
    kinds = [S.row_wise(), S.table_wise(2)]
    plan = S.by_hand(tables, mesh, {t.name: kinds[i % 2] for i, t in enumerate(tables)})
    _, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    capacity = S.capacity_for(plan, [features], slack=1.0)
    assert set(capacity) == {g.name for g in plan.groups}
    assert all(1 <= c < CAPACITY for c in capacity.values())
    plan = plan.with_capacity(capacity)
    params = S.init(jax.random.key(0), plan)
    hlo = _compiled(plan, params, features)
    shapes = re.findall(r"(\w+)\[(\d+)(?:,(\d+))?\]\{", " ".join(
        line.split("=", 1)[1].split("all-to-all(")[0]
        for line in hlo.splitlines() if " all-to-all(" in line
    ))  # fmt: skip
    assert shapes
    for g in plan.groups:  # no collective carries a table, whole or a block of it
        for rows, cols in (g.global_shape, (g.rows, g.cols)):
            assert (f"{rows}", f"{cols}") not in {(r, c) for _, r, c in shapes}, g.name
    # each all-to-all moves K blocks of one group's capacity: its rows (K, c, D) and ids (K, c)
    sizes = {int(r) for _, r, _ in shapes}
    assert sizes <= set(capacity.values())
    with jax.set_mesh(mesh):
        ref = S.embedding_bag_collection(S.init(jax.random.key(0), plan.with_capacity(None)),
                                         features, plan.with_capacity(None))[0]  # fmt: skip
        out = S.embedding_bag_collection(params, features, plan)[0]
    for f in ref:  # the capacity each device needed is enough: nothing overflows
        _same(out[f], ref[f], True, f)


def _zipf_batch(tables, seed=0, length=12):
    """Skewed ids: hot rows repeated across every device's samples."""
    rng = np.random.default_rng(seed)
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    lists = {
        f: [list(np.minimum(rng.zipf(1.3, rng.integers(0, length)), n) - 1) for _ in
            range(K * B_LOCAL)]
        for f, n in rows.items()
    }  # fmt: skip
    blocks = [
        jaxembed.KeyedJagged.from_lists(
            {f: v[k * B_LOCAL : (k + 1) * B_LOCAL] for f, v in lists.items()},
            capacity=CAPACITY * 2,
        )
        for k in range(K)
    ]
    return lists, blocks


def _owner_of(g, t, i):
    """``(owner, row in its block)`` of row ``i`` of table ``t`` in group ``g``."""
    if g.kind is S.Kind.ROW_WISE:  # row r on device r % K
        row = g.stack.offsets[[x.name for x in g.stack.tables].index(t.name)] + i
        return row % K, row // K
    owner, offset = g.where(t.name)
    return owner, offset + i


def _served(lists, plan, capacity):
    """A numpy model of the routing: per device and owner, the ``capacity[group]`` lowest
    distinct rows are served. Returns the lists without the other ids, and how many they were."""
    served, dropped = {f: [list(b) for b in v] for f, v in lists.items()}, 0
    for g in plan.groups:
        routed = [(t, f) for t in g.stack.tables for f in t.feature_names]
        pairs = {}
        for t, f in routed:
            for b, ids in enumerate(lists[f]):
                for i in ids:
                    if i != t.padding_idx:
                        owner, local = _owner_of(g, t, i)
                        pairs.setdefault((b // B_LOCAL, owner), set()).add(local)
        ok = {key: sorted(v)[: capacity[g.name]] for key, v in pairs.items()}
        for t, f in routed:
            for b, ids in enumerate(lists[f]):
                keep = [
                    i
                    for i in ids
                    if i == t.padding_idx
                    or _owner_of(g, t, i)[1] in ok[(b // B_LOCAL, _owner_of(g, t, i)[0])]
                ]
                dropped += len(ids) - len(keep)
                served[f][b] = keep
    return served, dropped


@pytest.mark.parametrize(
    "kind", ["row_wise", pytest.param("table_wise", marks=pytest.mark.slow)]
)  # the same routing: the second owner mapping in the scale run
def test_an_overflow_raises_and_changes_nothing_or_is_dropped_and_counted(kind):
    tables = [t for t in _tables() if t.name in ("a", "b", "c")]
    mesh = _mesh()
    place = S.row_wise() if kind == "row_wise" else S.table_wise(5)
    plan = S.by_hand(tables, mesh, {t.name: place for t in tables})
    lists, blocks = _zipf_batch(tables)
    features = S.put_features(blocks, plan)
    need = S.capacity_for(plan, [features], slack=1.0)
    assert len(need) == 3  # a, b and c cannot stack: a group each
    small = {name: max(1, n - 3) for name, n in need.items()}
    strict = plan.with_capacity(small)
    params = S.init(jax.random.key(0), plan)
    tx = jaxembed.sparse.rowwise_adagrad(0.1)
    opt = S.optimizer(tx, strict)
    state = opt.init(params)
    before = S.tables_of(params, plan)
    cot = {f: jnp.ones((K * B_LOCAL, 16)) for f in features.keys}

    with jax.set_mesh(mesh):
        # eagerly: the error names the group, the capacity and what the batch needs
        name = strict.groups[0].name
        message = f"group '{name}': \\d+ ids overflowed its capacity of {small[name]} .* "
        message += f"needs {need[name]}"
        with pytest.raises(S.CapacityError, match=message):
            S.lookup(params, features, strict)
        with pytest.raises(S.CapacityError, match=message):
            S.embedding_bag_collection(params, features, strict)

        # under jit: the group's bags are NaN, and the step leaves tables and state as they were
        @jax.jit
        def step(p, st, x):
            pooled, lk = S.lookup(p, x, strict)
            new_p, new_st = opt.update(lk.grad(cot), st, lk.params)
            return pooled, new_p, new_st, lk.stats

        pooled, new_params, new_state, stats = step(params, state, features)
        with pytest.raises(S.CapacityError, match=message):
            S.check_stats(stats, strict, features)
        assert all(np.isnan(np.asarray(v)).all() for v in pooled.values())
        for t, w in S.tables_of(new_params, plan).items():
            np.testing.assert_array_equal(w, before[t], err_msg=t)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)

        # drop: the count is exact, and the dropped ids get no value and no gradient
        loose = plan.with_capacity(small, overflow="drop")
        served, dropped = _served(lists, loose, small)
        assert dropped > 0
        with pytest.warns(UserWarning, match="ids overflowed"):
            out, lk = S.lookup(params, features, loose)
        assert sum(int(np.asarray(v)[:, 1].sum()) for v in lk.stats.values()) == dropped
        assert {n: int(np.asarray(v)[:, 0].max()) for n, v in lk.stats.items()} == need
        kept = jaxembed.KeyedJagged.from_lists(served, capacity=K * CAPACITY * 2)
        unsharded = jaxembed.collections.init(jax.random.key(0), tables, stack=False)
        ref = jaxembed.embedding_bag_collection(unsharded, kept, tables, stack=False)[0]
        for f in ref:
            _same(out[f], ref[f], True, f)

        def loss(p, x, pl):
            pooled = S.embedding_bag_collection(p, x, pl)[0]
            return sum((pooled[f] * cot[f]).sum() for f in pooled)

        def ref_loss(p):
            pooled = jaxembed.embedding_bag_collection(p, kept, tables, stack=False)[0]
            return sum((pooled[f] * cot[f]).sum() for f in pooled)

        g = jax.jit(jax.grad(loss), static_argnums=2)(params, features, loose)
        g_ref = jax.grad(ref_loss)(unsharded)
        for t, w in S.tables_of(g, plan).items():
            _same(w, g_ref[t]["weight"], False, f"gradient {t}")


def _quick(*cases):
    """``pytest.param`` each case, marked slow but those ``(name, rows)`` in ``QUICK_BYTES``."""
    return [c if c in QUICK_BYTES else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


# the default run's cases: "mixed" holds every kind (a small replica sums densely); a replica
# of more rows than the batch's ids gathers the entries
QUICK_BYTES = (("mixed", 1), ("data_parallel", 40))


# the table-wise and row-wise plans stack several tables per group
KINDS = ("table_wise", "row_wise", "mixed", "data_parallel")


@pytest.mark.parametrize("name,rows", _quick(*[(n, r) for n in KINDS for r in (1, 40)]))
def test_the_bytes_a_step_moves_are_those_the_plan_states(name, rows):
    tables = [dataclasses.replace(t, num_embeddings=t.num_embeddings * rows) for t in _tables()]
    _assert_bytes_are_the_plans(tables, name, K * B_LOCAL)


def _assert_bytes_are_the_plans(tables, name, outputs):
    """Every collective of the lookup and of its gradient (for ``outputs`` rows of each
    feature: bags, or unpooled rows), read off the compiled HLO, is ``S.step_bytes``'."""
    mesh = _mesh()
    plan = _plan(name, tables, mesh)
    _, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    params = S.init(jax.random.key(0), plan)
    stated = S.step_bytes(plan, features)
    assert S.collective_bytes(_compiled(plan, params, features)) == stated["lookup"]
    with jax.set_mesh(mesh):
        _, lk = S.lookup(params, features, plan)
    cot = {f: jnp.ones((outputs, plan.group_of(whole_table(tables, f)).stack.embedding_dim))
           for f in features.keys}  # fmt: skip
    hlo = S._collection._grads.lower(cot, lk.pieces, plan=plan, keys=features.keys)
    assert S.collective_bytes(hlo.compile().as_text()) == stated["grad"]


def _device_bytes(trees) -> np.ndarray:
    out = {}
    for leaf in jax.tree.leaves(trees):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return np.array([out[d.id] for d in jax.devices()[:K]])


@pytest.mark.slow  # a Criteo-sized plan: CI runs it (-m slow)
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
    pinned = {"tiny": S.data_parallel(), "t0": S.table_wise(3), "t1": S.table_wise(5)}
    plan = jaxembed.plan(tables, mesh, optimizer=tx, memory_per_device=bound, batch_size=512,
                         replicate_below=4000, pinned=pinned)  # fmt: skip
    # the pinned tables as pinned; the planner's own join their groups or one row-wise group
    # (routed, balanced, and each group a pass over the ids: its cost model's cheapest)
    assert {t: plan.placement(t) for t in pinned} == pinned
    assert sorted(g.kind.value for g in plan.groups) == ["data_parallel", "row_wise",
                                                         "table_wise"]  # fmt: skip
    assert plan.placement("big").kind is S.Kind.ROW_WISE
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
    for f in ref:  # every device pools its own bags, in float32, as one device does
        assert out[f].dtype == jnp.bfloat16
        a, b = np.asarray(out[f], np.float32), np.asarray(ref[f], np.float32)
        np.testing.assert_array_equal(a, b, err_msg=f)
    for t, w in S.tables_of(sharded, plan).items():
        assert w.dtype == jnp.bfloat16
        a, b = w.astype(np.float32), np.asarray(params[t]["weight"], np.float32)
        if in_order(plan, t, CAPACITY):
            np.testing.assert_array_equal(a, b, err_msg=t)
        else:  # each device's per-row sums, rounded to bfloat16, then summed
            np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-9, err_msg=t)


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
            # the loss's gradient is the pooled features': a routed owner's sums of each
            # device's sums, and column-wise statistics, round apart
            _same(w, single.tables()[t], in_order(plan, t, CAPACITY), t)
    with pytest.raises(ValueError, match="ShardingPlan of these tables"):
        jaxembed.EmbeddingBagCollection(tables[:2], rngs=nnx.Rngs(0), sharding=plan)


def test_the_nnx_collection_keeps_its_routing_stats_for_the_host_under_jit():
    """Under ``nnx.jit`` an overflow cannot raise inside the step: the module keeps the step's
    routing stats (``module.routing``) and ``check_routing`` raises on the host afterwards,
    naming the group, its capacity and the need; the tables are as they were. A batch that
    fits passes, with the stats of the batch."""
    from flax import nnx

    tables = [t for t in _tables() if t.name in ("a", "b", "c")]
    mesh = _mesh()
    plan = S.by_hand(tables, mesh, {t.name: S.row_wise() for t in tables})
    _, blocks = _zipf_batch(tables)
    features = S.put_features(blocks, plan)
    need = S.capacity_for(plan, [features], slack=1.0)
    small = {name: max(1, n - 3) for name, n in need.items()}
    traces = []

    def loss(module, kj):
        traces.append(1)
        return sum((v * v).sum() for v in module(kj).values())

    @nnx.jit
    def step(module, opt, kj):
        value, grads = jaxembed.sparse.value_and_grad(loss)(module, kj)
        opt.update(module, grads)
        return value

    with jax.set_mesh(mesh):
        for caps, fits in ((small, False), (need, True)):
            module = jaxembed.EmbeddingBagCollection(
                tables, rngs=nnx.Rngs(0), sparse=True, sharding=plan.with_capacity(caps)
            )
            assert set(module.routing.keys()) == set(need)
            module.check_routing()  # nothing looked up yet
            before = module.tables()
            opt = jaxembed.sparse.Optimizer(
                module, optax.sgd(0.0), jaxembed.sparse.rowwise_adagrad(0.1)
            )
            traces.clear()
            step(module, opt, features)
            first = len(traces)  # sparse.value_and_grad traces the loss more than once
            step(module, opt, features)
            assert len(traces) == first  # the stats are state: the step does not retrace
            stats = {n: np.asarray(v.get_value()) for n, v in module.routing.items()}
            assert {n: int(s[:, 0].max()) for n, s in stats.items()} == need
            if fits:
                module.check_routing()
                assert all(s[:, 1].sum() == 0 for s in stats.values())
                assert any((module.tables()[t] != before[t]).any() for t in before)
                continue
            name = module.sharding.groups[0].name
            message = f"group '{name}': \\d+ ids overflowed its capacity of {small[name]} .* "
            with pytest.raises(S.CapacityError, match=message + f"needs {need[name]}"):
                module.check_routing()
            for t, w in module.tables().items():
                np.testing.assert_array_equal(w, before[t], err_msg=t)
            # a forward alone (no gradient) keeps its stats too
            module.routing[name].set_value(jnp.zeros_like(module.routing[name].get_value()))
            nnx.jit(lambda m, kj: m(kj))(module, features)
            with pytest.raises(S.CapacityError, match=message):
                module.check_routing()
    with pytest.raises(ValueError, match="sharded collection's stats"):
        jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0)).check_routing()


# -- unpooled collections (EmbeddingConfig tables) ------------------------------------------------


def _plain_tables():
    P_ = jaxembed.EmbeddingConfig
    return [
        P_("a", 16, 40, ["fa"]),
        P_("b", 16, 50, ["fb", "fb2"], padding_idx=3, lr_scale=2.0),
        P_("c", 16, 30, ["fc"], max_norm=1.0),
        P_("d", 8, 64, ["fd"], scale_grad_by_freq=True),
    ]


def _whole_rows(jagged, k=K):
    """A sharded feature's rows in the whole batch's order (each device's block, its rows only),
    and whether every block is zeros past its rows."""
    values, lengths = np.asarray(jagged.values), np.asarray(jagged.lengths)
    c, b = values.shape[0] // k, lengths.shape[0] // k
    parts, zeros = [], True
    for d in range(k):
        n = int(lengths[d * b : (d + 1) * b].sum())
        parts.append(values[d * c : d * c + n])
        zeros &= not values[d * c + n : (d + 1) * c].any()
    return np.concatenate(parts), zeros


def _to_blocks(whole, lengths, c, k=K):
    """The whole batch's ``(N, D)`` per-row values as a sharded feature's ``(K * C, D)``."""
    lengths = np.asarray(lengths)
    b = lengths.shape[0] // k
    out, at = np.zeros((k * c, whole.shape[1]), whole.dtype), 0
    for d in range(k):
        n = int(lengths[d * b : (d + 1) * b].sum())
        out[d * c : d * c + n] = whole[at : at + n]
        at += n
    return jnp.asarray(out)


@pytest.mark.parametrize("name", ["mixed", "planned", "data_parallel", "table_wise", "row_wise",
                                  "column_wise"])  # fmt: skip
def test_unpooled_placements_equal_the_unsharded_collection(name):
    """``S.embedding_collection`` and ``S.lookup`` of :class:`~jaxembed.EmbeddingConfig` tables
    on every placement against :func:`jaxembed.embedding_collection` on the whole batch (checked
    against TorchRec in tests/test_collections.py): the rows (padding's own row, duplicates,
    a row in two features), the renormed tables, the dense gradients and three sparse
    steps."""
    tables = _plain_tables()
    mesh = _mesh()
    plan = _plan(name, tables, mesh)
    assert not plan.pooled
    whole, blocks = _batch(tables)
    features = S.put_features(blocks, plan)
    params = jaxembed.collections.init(jax.random.key(0), tables, stack=False)
    sharded = S.init(jax.random.key(0), plan)
    for t, w in S.tables_of(sharded, plan).items():
        np.testing.assert_array_equal(w, params[t]["weight"])
    ref, ref_new = jaxembed.embedding_collection(params, whole, tables, stack=False)
    rng = np.random.default_rng(3)
    totals = {f: int(np.asarray(ref[f].lengths).sum()) for f in ref}
    cot = {f: rng.normal(size=(totals[f], ref[f].values.shape[1])).astype(np.float32)
           for f in ref}  # fmt: skip
    with jax.set_mesh(mesh):
        out, new = S.embedding_collection(sharded, features, plan)
        for f in ref:
            rows, zeros = _whole_rows(out[f])
            np.testing.assert_array_equal(rows, np.asarray(ref[f].values)[: totals[f]], f)
            assert zeros, f
            np.testing.assert_array_equal(out[f].lengths, ref[f].lengths)
        for t, w in S.tables_of(new, plan).items():
            _same(w, ref_new[t]["weight"], True, f"renormed {t}")
        blocks_cot = {f: _to_blocks(cot[f], out[f].lengths, CAPACITY) for f in ref}

        def loss(p):
            rows = S.embedding_collection(p, features, plan)[0]
            return sum((rows[f].values * blocks_cot[f]).sum() for f in rows)

        def ref_loss(p):
            rows = jaxembed.embedding_collection(p, whole, tables, stack=False)[0]
            return sum((rows[f].values[: totals[f]] * cot[f]).sum() for f in rows)

        g, g_ref = jax.grad(loss)(sharded), jax.grad(ref_loss)(params)
        for t, w in S.tables_of(g, plan).items():
            _same(w, g_ref[t]["weight"], False, f"gradient {t}")

        tx = jaxembed.sparse.rowwise_adagrad(0.1)
        opt = S.optimizer(tx, plan)
        ref_opt = jaxembed.collections.optimizer(tx, tables, stack=False)
        state, ref_state = opt.init(sharded), ref_opt.init(params)

        @jax.jit
        def step(p, st):
            rows, lk = S.lookup(p, features, plan)
            values = {f: r.values for f, r in rows.items()}
            grads = jax.grad(lambda v: sum((v[f] * blocks_cot[f]).sum() for f in v))(values)
            return opt.update(lk.grad(grads), st, lk.params)

        @jax.jit
        def ref_step(p, st):
            # the unsharded sparse path the nnx EmbeddingCollection trains with
            seq = jaxembed.collections._collection
            rows, lookups = seq.lookup_sequences(p, whole, tables, stack=False)

            def seq_loss(values):
                stacks = {k: (v, rows[k][1]) for k, v in values.items()}
                feats = seq.sequence_features(stacks, whole, seq._plan(tables, stack=False))
                return sum((feats[f].values[: totals[f]] * cot[f]).sum() for f in feats)

            row_cot = jax.grad(seq_loss)({k: r for k, (r, _) in rows.items()})
            grads = {k: lookups[k].grad(row_cot[k]) for k in lookups}
            return ref_opt.update(grads, st, {k: lk.params for k, lk in lookups.items()})

        for _ in range(3):
            sharded, state = step(sharded, state)
            params, ref_state = ref_step(params, ref_state)
        copies_alike((new, sharded, state), "the tables and state")
        for t, w in S.tables_of(sharded, plan).items():
            _same(w, params[t]["weight"], in_order(plan, t, CAPACITY), f"sparse steps {t}")
        with pytest.raises(TypeError, match=r"use jaxembed\.sharding\.embedding_collection"):
            S.embedding_bag_collection(sharded, features, plan)


@pytest.mark.parametrize("name,rows", [("mixed", 1), ("column_wise", 1), ("data_parallel", 40)])
def test_the_bytes_an_unpooled_step_moves_are_those_the_plan_states(name, rows):
    """Every collective of an unpooled lookup and its gradient, read off the compiled HLO,
    against ``S.step_bytes`` (column-wise devices return rows, not bags)."""
    tables = [dataclasses.replace(t, num_embeddings=t.num_embeddings * rows)
              for t in _plain_tables()]  # fmt: skip
    _assert_bytes_are_the_plans(tables, name, K * CAPACITY)


@pytest.mark.parametrize("name", ["row_wise", "data_parallel", "column_wise"])
def test_an_unpooled_id_outside_its_table_gives_a_nan_row_and_an_overflow_is_loud(name):
    """Under ``jit`` an id outside its table reads a NaN row (the others are exact); eagerly it
    raises, as on one device. A routed group's overflow raises under ``error`` and, under
    ``drop``, leaves the dropped ids' rows zeros, counted exactly."""
    tables = _plain_tables()
    mesh = _mesh()
    plan = S.by_hand(tables, mesh, _placements(name, tables))
    whole, blocks = _batch(tables, out_of_range="fa")
    features = S.put_features(blocks, plan)
    params = S.init(jax.random.key(0), plan)
    unsharded = jaxembed.collections.init(jax.random.key(0), tables, stack=False)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, x: S.embedding_collection(p, x, plan)[0])(params, features)
        ref = jax.jit(lambda p, x: jaxembed.embedding_collection(p, x, tables, stack=False)[0])(
            unsharded, whole
        )
        for f in ref:
            rows, _ = _whole_rows(out[f])
            np.testing.assert_array_equal(rows, np.asarray(ref[f].values)[: rows.shape[0]], f)
        assert np.isnan(_whole_rows(out["fa"])[0]).any()
        with pytest.raises(IndexError):
            S.embedding_collection(params, features, plan)
        if name != "row_wise":
            return
        _, blocks = _batch(tables)
        features = S.put_features(blocks, plan)
        need = S.capacity_for(plan, [features], slack=1.0)
        small = {n: max(1, c - 2) for n, c in need.items()}
        with pytest.raises(S.CapacityError, match="overflowed its capacity"):
            S.embedding_collection(params, features, plan.with_capacity(small))
        loose = plan.with_capacity(small, overflow="drop")
        with pytest.warns(UserWarning, match="ids overflowed"):
            rows, lk = S.lookup(params, features, loose)
        dropped = sum(int(np.asarray(v)[:, 1].sum()) for v in lk.stats.values())
        full, _ = S.embedding_collection(params, features, plan)
        zeroed = 0
        for f in rows:
            a, b = _whole_rows(rows[f])[0], _whole_rows(full[f])[0]
            lost = ~(a == b).all(axis=1)
            assert not a[lost].any(), f  # a dropped id's row is zeros
            zeroed += int(lost.sum())
        assert 0 < zeroed <= dropped  # (a dropped padding entry of an all-zero row is unseen)


@pytest.mark.parametrize("pooled", [True, False])
def test_two_lookups_in_one_loss_train_as_on_one_device(pooled):
    """A loss that looks the sharded collection up twice (two batches; the second renorms a
    table the first renormed) sums both lookups' gradients, each device's entries in its own
    block: three sparse steps equal the unsharded module's on the same two batches."""
    from flax import nnx

    tables = _tables() if pooled else _plain_tables()
    mesh = _mesh()
    plan = _plan("mixed", tables, mesh)
    batches = [_batch(tables, seed=seed) for seed in (0, 1)]
    sharded_batches = [S.put_features(blocks, plan) for _, blocks in batches]
    Module = jaxembed.EmbeddingBagCollection if pooled else jaxembed.EmbeddingCollection

    def loss(module, kj):
        out = module(kj)
        return sum((jnp.sin(getattr(v, "values", v)) ** 2).sum() for v in out.values())

    def train(module, kjs):
        opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.0), jaxembed.sparse.adagrad(0.1))

        @nnx.jit
        def step(module, opt, first, second):
            both = lambda m, a, b: loss(m, a) + loss(m, b)  # noqa: E731
            value, grads = jaxembed.sparse.value_and_grad(both)(module, first, second)
            opt.update(module, grads)
            return value

        return [float(step(module, opt, *kjs)) for _ in range(3)]

    with jax.set_mesh(mesh):
        sharded = Module(tables, rngs=nnx.Rngs(0), sparse=True, stack=False, sharding=plan)
        single = Module(tables, rngs=nnx.Rngs(0), sparse=True, stack=False)
        got = train(sharded, sharded_batches)
        np.testing.assert_allclose(got, train(single, [w for w, _ in batches]), rtol=1e-5)
        for t, w in sharded.tables().items():
            _same(w, single.tables()[t], False, t)
        copies_alike(nnx.state(sharded), "the module's state")


def test_an_overflow_in_either_lookup_of_a_loss_refuses_the_whole_step():
    """Two lookups in one loss under ``error``: the second overflows, so the step changes no
    table (not even by the first's entries) and ``check_routing`` raises with the step's
    stats (the worst need of either lookup, every overflowed id counted)."""
    from flax import nnx

    tables = [t for t in _tables() if t.name in ("a", "b")]
    mesh = _mesh()
    plan = S.by_hand(tables, mesh, {t.name: S.row_wise() for t in tables})
    one_id = {f: [[1]] * B_LOCAL for t in tables for f in t.feature_names}  # needs 1 a pair
    quiet = S.put_features([jaxembed.KeyedJagged.from_lists(one_id)] * K, plan)
    _, skewed = _zipf_batch(tables)
    skewed = S.put_features(skewed, plan)
    need = S.capacity_for(plan, [skewed], slack=1.0)
    small = {n: max(1, need[n] - 3) for n in need}
    assert all(small[n] < need[n] for n in need)

    def loss(m, a, b):
        return sum((v**2).sum() for kj in (a, b) for v in m(kj).values())

    with jax.set_mesh(mesh):
        module = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True,
                                                 sharding=plan.with_capacity(small))  # fmt: skip
        opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.0), jaxembed.sparse.adagrad(0.1))
        before = module.tables()

        @nnx.jit
        def step(module, opt, a, b):
            value, grads = jaxembed.sparse.value_and_grad(loss)(module, a, b)
            opt.update(module, grads)
            return value

        step(module, opt, quiet, skewed)
        for t, w in module.tables().items():
            np.testing.assert_array_equal(w, before[t], err_msg=t)
        stats = {n: np.asarray(v.get_value()) for n, v in module.routing.items()}
        assert {n: int(s[:, 0].max()) for n, s in stats.items()} == need
        with pytest.raises(S.CapacityError, match="overflowed its capacity"):
            module.check_routing()


def test_a_sharded_table_read_outside_a_lookup_is_refused():
    """A penalty on a sharded group's array gives a gradient of the whole array, which the
    group's optimizer cannot split into its devices' blocks: refused, naming the cause, and
    nothing changes."""
    from flax import nnx

    tables = _tables()
    mesh = _mesh()
    plan = _plan("mixed", tables, mesh)
    _, blocks = _batch(tables)
    features = S.put_features(blocks, plan)

    def penalty(m):
        return sum((w.get_value() ** 2).sum() for w in m.weights.values())

    with jax.set_mesh(mesh):
        module = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True,
                                                 sharding=plan)  # fmt: skip
        opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.1), jaxembed.sparse.sgd(0.1))
        before = module.tables()
        for loss in (
            lambda m, kj: sum(v.sum() for v in m(kj).values()) + penalty(m),
            lambda m, kj: penalty(m),  # no lookup at all
        ):
            grads = jaxembed.sparse.value_and_grad(loss)(module, features)[1]
            with pytest.raises(NotImplementedError, match="read outside a lookup"):
                opt.update(module, grads)
            for t, w in module.tables().items():
                np.testing.assert_array_equal(w, before[t], err_msg=t)


def test_the_nnx_embedding_collection_trains_on_the_plan():
    """``EmbeddingCollection(sharding=plan)``, dense and sparse, trains as on one device."""
    from flax import nnx

    tables = _plain_tables()
    mesh = _mesh()
    plan = S.by_hand(tables, mesh, _placements("mixed", tables))
    whole, blocks = _batch(tables)
    features = S.put_features(blocks, plan)

    def loss(module, kj):
        rows = module(kj)
        return sum((jnp.sin(r.values) ** 2).sum() for r in rows.values())

    def train(module, sparse):
        tx = jaxembed.sparse.rowwise_adagrad(0.1)
        if sparse:
            opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.0), tx)
        else:
            opt = nnx.Optimizer(module, optax.adagrad(0.1), wrt=nnx.Param)

        @nnx.jit
        def step(module, opt, kj):
            if sparse:
                value, grads = jaxembed.sparse.value_and_grad(loss)(module, kj)
            else:
                value, grads = nnx.value_and_grad(loss)(module, kj)
            opt.update(module, grads)
            return value

        return [float(step(module, opt, kj)) for kj in [features if module.sharding else whole] * 3]

    with jax.set_mesh(mesh):
        for sparse in (True, False):
            sharded = jaxembed.EmbeddingCollection(
                tables, rngs=nnx.Rngs(0), sparse=sparse, stack=False, sharding=plan
            )
            single = jaxembed.EmbeddingCollection(
                tables, rngs=nnx.Rngs(0), sparse=sparse, stack=False
            )
            np.testing.assert_allclose(train(sharded, sparse), train(single, sparse), rtol=1e-5)
            for t, w in sharded.tables().items():
                _same(w, single.tables()[t], False, t)
