"""Managed collisions on a mesh (run via tests/test_sharding.py, on 8 fake devices).

Every device gathers the whole batch's raw ids and runs the one-device remap on them, with the
states replicated, so the reference is one device on the whole batch (itself checked against
TorchRec in tests/test_collisions_collection.py): the remapped rows, the states and the evicted
rows equal it exactly, call by call, on a 1-D mesh and on a 2-D (replica x model) one; and the
nnx module over a sharded collection, every kind of placement at once, trains with resets as
the one-device module does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

import jaxembed
from jaxembed import sharding as S
from jaxembed.collisions import (
    ManagedCollision,
    ManagedCollisionCollection,
    RawKeyedJagged,
    put_raw_features,
    to_int64,
)

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through tests/test_sharding.py)", allow_module_level=True)

N, B, CAPACITY = 8, 2, 32  # blocks, samples a block, ids a block
E = jaxembed.EmbeddingBagConfig
TABLES = [
    E("a", 4, 24, ["f1", "f2"]),  # two features, listed in another order than the keys
    E("b", 8, 12, ["f3"], pooling="mean"),
    E("c", 8, 40, ["f4"]),
    E("d", 6, 16, ["f5"], pooling="max"),
]
KEYS = ("f2", "f3", "f1", "f4", "f5")
PER_TABLE = {"a": 2 * N * B * 3, "b": N * B * 3, "c": N * B * 3, "d": N * B * 3}
POLICIES = {
    "a": ManagedCollision("lfu", 2),
    "b": ManagedCollision("lru", 1),
    "c": ManagedCollision("distance_lfu", 3, decay_exponent=1.5),
    "d": ManagedCollision("lru", 2, ttl=3),
}
PLACEMENTS = {
    "a": S.row_wise(),
    "b": S.table_wise(1),
    "c": S.column_wise(),
    "d": S.data_parallel(),
}


def _plan(shape, tables=TABLES, placements=PLACEMENTS):
    if shape in ("1d", "1d-auto"):
        kind = AxisType.Auto if shape == "1d-auto" else AxisType.Explicit
        mesh = jax.make_mesh((N,), ("x",), axis_types=(kind,))
        return S.by_hand(tables, mesh, placements)
    mesh = jax.make_mesh((2, N // 2), ("replica", "x"))
    return S.by_hand(tables, mesh, placements, axis="x", replica="replica")


def _universe(rng):
    ids = rng.integers(0, 2**63 - 1, size=60, dtype=np.int64)
    ids[:5] = [2**63 - 1, 0, 1 << 32, (1 << 32) + 1, 1]  # the limits, and shared low halves
    return np.unique(ids)


def _zipf(rng, n):
    return np.minimum(rng.zipf(1.3, size=rng.integers(0, 4)) - 1, n - 1)


def _batch(rng, universe):
    """The whole batch (samples block after block) and each device's block of it."""
    lists = {f: [list(universe[_zipf(rng, len(universe))]) for _ in range(N * B)] for f in KEYS}
    whole = RawKeyedJagged.from_lists(lists, capacity=N * CAPACITY)
    blocks = [
        RawKeyedJagged.from_lists(
            {f: v[k * B : (k + 1) * B] for f, v in lists.items()}, capacity=CAPACITY
        )
        for k in range(N)
    ]
    return whole, blocks


def _lists_of(features):
    """A sharded KeyedJagged's bags, ``{feature: [bag, ...]}`` over the whole batch; and its
    blocks' padding, which must read row 0 as one device's padding does."""
    values = np.asarray(features.values).reshape(N, -1)
    lengths = np.asarray(features.lengths).reshape(N, -1)
    out = {f: [] for f in features.keys}
    for k in range(N):
        block = jaxembed.KeyedJagged(features.keys, values[k], lengths[k])
        for f, bags in block.to_lists().items():
            out[f] += [list(b) for b in bags]
        np.testing.assert_array_equal(values[k, lengths[k].sum() :], 0)
    return out


def _assert_same_tree(a, b, what):
    def data(x):  # a key (the module's rngs) by its bits
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(data(x)), np.asarray(data(y)), err_msg=what)


def _assert_trained_alike(sharded, single, tables):
    """The remap states and held ids equal; the tables equal to rounding (a routed owner sums
    each device's sums)."""
    for t in tables:
        _assert_same_tree(sharded.mc_state[t.name].get_value(),
                          single.mc_state[t.name].get_value(), t.name)  # fmt: skip
        np.testing.assert_allclose(
            sharded.embedding_module.tables()[t.name],
            single.embedding_module.tables()[t.name],
            rtol=2e-5,
            atol=2e-6,
            err_msg=t.name,
        )
        for ids_a, ids_b in zip(sharded.held_ids()[t.name], single.held_ids()[t.name], strict=True):
            np.testing.assert_array_equal(ids_a, ids_b)


@pytest.mark.parametrize("shape", ["1d", "2d"])
@pytest.mark.parametrize("jit", [True, False])
def test_the_remap_on_a_mesh_is_one_devices_on_the_whole_batch(shape, jit):
    plan = _plan(shape)
    mcc = ManagedCollisionCollection(POLICIES, TABLES)
    on_mesh = functools.partial(mcc.remap, sharding=plan)
    if jit:
        on_mesh = jax.jit(on_mesh)
    rng = np.random.default_rng(0)
    universe = _universe(rng)
    one = mesh = mcc.init(PER_TABLE)
    evictions = 0
    for call in range(7):
        whole, blocks = _batch(rng, universe)
        ref = mcc.remap(one, whole)
        got = on_mesh(mesh, put_raw_features(blocks, plan))
        want = {f: [list(b) for b in bags] for f, bags in ref.features.to_lists().items()}
        assert _lists_of(got.features) == want, call
        _assert_same_tree(got.state, ref.state, f"state after call {call}")
        _assert_same_tree((got.evicted, got.num_evicted), (ref.evicted, ref.num_evicted), "evicted")
        for x in jax.tree.leaves(got.state):
            assert x.sharding.is_fully_replicated
        evictions += sum(int(v) for v in ref.num_evicted.values())
        one, mesh = ref.state, got.state
    assert evictions > 20  # slots were taken and given up


def test_the_eager_remap_on_a_mesh_does_not_retrace(monkeypatch):
    """An eager call on a mesh runs one jitted program, traced once and reused call after call
    (a state from init, on one device, is first replicated on the mesh), not compiled anew."""
    plan = _plan("1d")
    mcc = ManagedCollisionCollection(POLICIES, TABLES)
    traces, remap = [], mcc._remap
    monkeypatch.setattr(mcc, "_remap", lambda *args: traces.append(1) or remap(*args))
    rng = np.random.default_rng(3)
    universe = _universe(rng)
    state = mcc.init(PER_TABLE)
    for _ in range(4):
        _, blocks = _batch(rng, universe)
        state = mcc.remap(state, put_raw_features(blocks, plan), sharding=plan).state
    assert len(traces) == 1


def test_the_remap_on_a_mesh_refuses_what_it_cannot_do():
    plan = _plan("1d")
    mcc = ManagedCollisionCollection(POLICIES, TABLES)
    rng = np.random.default_rng(1)
    whole, blocks = _batch(rng, _universe(rng))
    with pytest.raises(ValueError, match="equal device blocks"):
        mcc.remap(mcc.init(PER_TABLE), whole.tree_unflatten(
            whole.keys, (jax.tree.map(lambda x: x[:-1], whole.ids), whole.lengths, None)
        ), sharding=plan)  # fmt: skip
    small = {**PER_TABLE, "a": 3}
    before = mcc.init(small)
    with pytest.raises(ValueError, match=r"'a' gets .* over the mesh's whole batch"):
        mcc.remap(before, put_raw_features(blocks, plan), sharding=plan)
    with pytest.raises(TypeError, match=r"sharding must be a jaxembed\.sharding\.ShardingPlan"):
        mcc.remap(before, whole, sharding="x")
    with pytest.raises(ValueError, match="one RawKeyedJagged per device"):
        put_raw_features(blocks[:3], plan)
    with pytest.raises(TypeError, match="blocks must be RawKeyedJagged"):
        put_raw_features([jaxembed.KeyedJagged.from_lists({"f1": [[1]]})] * N, plan)


def _module(plan, seed=0):
    ebc = jaxembed.EmbeddingBagCollection(
        TABLES, rngs=nnx.Rngs(seed), sparse=True, stack=False, sharding=plan
    )
    mcc = ManagedCollisionCollection(POLICIES, TABLES)
    return jaxembed.ManagedCollisionEmbeddingBagCollection(
        ebc, mcc, ids_per_call=PER_TABLE, rngs=nnx.Rngs(7)
    )


@pytest.mark.parametrize("shape", ["1d", "2d", "1d-auto"])
def test_the_module_on_a_mesh_trains_with_resets_as_on_one_device(shape):
    """Sparse row-wise Adagrad with reset_evicted (the default), every placement kind at once:
    the remap states equal one device's exactly; the tables and the optimizer's state equal
    them to rounding (a routed owner sums each device's sums); the step does not retrace."""
    plan = _plan(shape)
    traces = []

    def train(model, batches):
        opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.0), jaxembed.sparse.rowwise_adagrad(0.2))

        @nnx.jit
        def step(model, opt, raw):
            traces.append(model.embedding_module.sharding is not None)

            def loss(m):
                return sum(jnp.sum((v - 0.5) ** 2) for v in m(raw).values())

            value, grads = jaxembed.sparse.value_and_grad(loss)(model)
            opt.update(model, grads)
            return value

        return [float(step(model, opt, raw)) for raw in batches], opt

    rng = np.random.default_rng(2)
    universe = _universe(rng)
    batches = [_batch(rng, universe) for _ in range(6)]
    seen = set()
    for whole, _ in batches:  # table b's ids: feature f3, the second key
        per_key = np.asarray(whole.lengths).reshape(len(KEYS), -1).sum(1)
        seen |= set(to_int64(whole.ids)[per_key[0] : per_key[0] + per_key[1]].tolist())
    assert len(seen) > 2 * TABLES[1].num_embeddings  # table b's slots were given up and reset
    with jax.set_mesh(plan.mesh):
        sharded = _module(plan)
        single = _module(None)
        got, opt = train(sharded, [put_raw_features(blocks, plan) for _, blocks in batches])
        want, single_opt = train(single, [whole for whole, _ in batches])
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert traces.count(True) == 1 and traces.count(False) == 1
    _assert_trained_alike(sharded, single, TABLES)
    # the optimizer's row-wise state, reset with the evicted rows, sits where the plan put it
    group_sums = {
        g.name: np.asarray(opt.sparse_state[f"embedding_module/weights/{g.name}"].sum.get_value())
        for g in plan.groups
    }
    for g in plan.groups:
        for t in g.stack.tables:
            np.testing.assert_allclose(
                group_sums[g.name][g.rows_of(t.name)],
                np.asarray(
                    single_opt.sparse_state[f"embedding_module/weights/{t.name}"].sum.get_value()
                ),
                rtol=2e-5,
                atol=2e-6,
                err_msg=t.name,
            )


def test_the_unpooled_module_on_a_mesh_trains_with_resets_as_on_one_device():
    """ManagedCollisionEmbeddingCollection over a sharded EmbeddingCollection (row-wise and
    data-parallel): the rows of every id, the remap states and the trained tables equal the
    one-device module's."""
    tables = [
        jaxembed.EmbeddingConfig("a", 4, 24, ["f1", "f2"]),
        jaxembed.EmbeddingConfig("b", 4, 12, ["f3", "f4", "f5"]),
    ]
    policies = {"a": POLICIES["a"], "b": POLICIES["b"]}
    per_table = {"a": PER_TABLE["a"], "b": 3 * N * B * 3}
    plan = _plan("1d", tables, {"a": S.row_wise(), "b": S.data_parallel()})

    def module(sharding):
        ec = jaxembed.EmbeddingCollection(
            tables, rngs=nnx.Rngs(0), sparse=True, stack=False, sharding=sharding
        )
        mcc = ManagedCollisionCollection(policies, tables)
        return jaxembed.ManagedCollisionEmbeddingCollection(
            ec, mcc, ids_per_call=per_table, rngs=nnx.Rngs(3)
        )

    def train(model, batches):
        opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.0), jaxembed.sparse.adagrad(0.3))

        @nnx.jit
        def step(model, opt, raw):
            def loss(m):
                # padding rows read zero, and add nothing
                return sum(jnp.sum(jnp.sin(j.values) ** 2) for j in m(raw).values())

            value, grads = jaxembed.sparse.value_and_grad(loss)(model)
            opt.update(model, grads)
            return value

        return [float(step(model, opt, raw)) for raw in batches]

    rng = np.random.default_rng(4)
    universe = _universe(rng)
    batches = [_batch(rng, universe) for _ in range(5)]
    with jax.set_mesh(plan.mesh):
        sharded, single = module(plan), module(None)
        got = train(sharded, [put_raw_features(blocks, plan) for _, blocks in batches])
        want = train(single, [whole for whole, _ in batches])
    np.testing.assert_allclose(got, want, rtol=2e-5)
    _assert_trained_alike(sharded, single, tables)


def test_a_checkpoint_of_the_module_on_a_mesh_resumes_bit_for_bit(tmp_path):
    """jaxembed.checkpoint.save of the module and its optimizer on a 2-D plan (the sharded
    tables, their row-wise state, the replicated remap states with their windows), restored
    into a freshly built module: training goes on exactly as the live run."""
    from jaxembed import checkpoint

    plan = _plan("2d")

    def build(seed):
        model = _module(plan, seed)
        tx = jaxembed.sparse.rowwise_adagrad(0.2)
        return model, jaxembed.sparse.Optimizer(model, optax.sgd(0.0), tx)

    @nnx.jit
    def step(model, opt, raw):
        def loss(m):
            return sum(jnp.sum((v - 0.5) ** 2) for v in m(raw).values())

        value, grads = jaxembed.sparse.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    rng = np.random.default_rng(5)
    universe = _universe(rng)
    batches = [put_raw_features(_batch(rng, universe)[1], plan) for _ in range(6)]
    with jax.set_mesh(plan.mesh):
        model, opt = build(0)
        for raw in batches[:3]:  # call 3 is mid-window for every policy but b's
            step(model, opt, raw)
        checkpoint.save(tmp_path, 3, nnx.state((model, opt)))
        fresh, fresh_opt = build(9)
        graphdef, like = nnx.split((fresh, fresh_opt))
        model2, opt2 = nnx.merge(graphdef, checkpoint.restore(tmp_path, like))
        _assert_same_tree(nnx.state((model2, opt2)), nnx.state((model, opt)), "restored")
        for raw in batches[3:]:
            assert float(step(model, opt, raw)) == float(step(model2, opt2, raw))
    _assert_same_tree(nnx.state((model2, opt2)), nnx.state((model, opt)), "resumed")
    for leaf in jax.tree.leaves(nnx.state(model2.mc_state)):
        assert leaf.sharding.is_fully_replicated


def test_what_the_modules_on_a_mesh_refuse_is_named():
    mesh = jax.make_mesh((N,), ("x",))
    plan = S.by_hand([E("t", 4, 8, ["f"])], mesh, {"t": S.row_wise()})
    with jax.set_mesh(mesh):
        ebc = jaxembed.EmbeddingBagCollection(plan.tables, rngs=nnx.Rngs(0), sharding=plan)
        with pytest.raises(ValueError, match=r"reset_evicted=True .* needs a sparse=True"):
            jaxembed.ManagedCollisionEmbeddingBagCollection(
                ebc, ManagedCollisionCollection({"t": POLICIES["a"]}, plan.tables), ids_per_call=8
            )
        table = jaxembed.Embedding(
            8, 4, rngs=nnx.Rngs(0), sparse=True, sharding=jaxembed.TableSharding(mesh, vocab="x")
        )
        with pytest.raises(NotImplementedError, match="sharded Embedding are not built; put"):
            jaxembed.ManagedCollisionEmbedding(table, POLICIES["a"], ids_per_call=8)
