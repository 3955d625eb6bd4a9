"""Managed collisions over a collection, against TorchRec 1.8's
ManagedCollisionEmbeddingBagCollection call by call: the remapped features, the pooled
outputs and every table's managed-collision state."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
from jaxembed.collisions import (
    ManagedCollision,
    ManagedCollisionCollection,
    RawKeyedJagged,
    raw_ids,
)

torch = pytest.importorskip("torch")
mc_modules = pytest.importorskip("torchrec.modules.mc_modules")
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.modules.mc_embedding_modules import (  # noqa: E402
    ManagedCollisionEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from tests.test_collisions import assert_same_state, torchrec_module  # noqa: E402
from tests.torch_ref import torchrec_bag_configs  # noqa: E402

INT64_MAX = 2**63 - 1

# two tables: "a" serves two features, listed in another order than the batch's keys
TABLES = [
    jaxembed.EmbeddingBagConfig(
        name="a", embedding_dim=4, num_embeddings=12, feature_names=("f2", "f1")
    ),
    jaxembed.EmbeddingBagConfig(
        name="b", embedding_dim=4, num_embeddings=6, feature_names=("f3",), pooling="mean"
    ),
]
KEYS = ("f1", "f3", "f2")
BATCH = 3
PER_TABLE = {"a": 10, "b": 5}  # each table's ids a call (TorchRec sizes its buffer once)


def policies(kind):
    return {
        "lfu": {"a": ManagedCollision("lfu", 2), "b": ManagedCollision("lfu", 1)},
        "mixed": {
            "a": ManagedCollision("distance_lfu", 3, decay_exponent=1.5),
            "b": ManagedCollision("lru", 2),
        },
    }[kind]


def torchrec_mc_ebc(mcs, weights):
    configs = torchrec_bag_configs(TABLES)
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    with torch.no_grad():
        for t in TABLES:
            ebc.embedding_bags[t.name].weight.copy_(torch.from_numpy(np.asarray(weights[t.name])))
    modules = {t.name: torchrec_module(mcs[t.name], t.num_embeddings) for t in TABLES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcc = mc_modules.ManagedCollisionCollection(modules, configs)
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=True).train()


def batch_lists(rng, universe):
    """Per-feature bags of raw ids with random lengths; each table's total is fixed."""
    out = {}
    for t in TABLES:
        bags = len(t.feature_names) * BATCH
        lengths = rng.multinomial(PER_TABLE[t.name], np.ones(bags) / bags)
        for f, name in enumerate(t.feature_names):
            out[name] = [
                universe[np.minimum(rng.zipf(1.4, size=n) - 1, universe.size - 1)]
                for n in lengths[f * BATCH : (f + 1) * BATCH]
            ]
    return {k: out[k] for k in KEYS}


def torchrec_kjt(lists):
    values = [np.asarray(b, np.int64) for k in KEYS for b in lists[k]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(KEYS),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.tensor([v.size for v in values], dtype=torch.int64),
    )


def universe(rng):
    base = rng.integers(0, 2**62, size=40, dtype=np.int64)
    # TorchRec's empty marker is 2**63 - 1 (it cannot hold that id; jaxembed can): left out
    base[:6] = [INT64_MAX - 2, INT64_MAX - 1, 0, 1 << 32, (1 << 32) + 1, 1]  # shared low halves
    return np.unique(base)


@pytest.mark.parametrize("kind", ["lfu", "mixed"])
def test_matches_torchrec_managed_collision_ebc_call_by_call(kind):
    rng = np.random.default_rng(3)
    ids = universe(rng)
    mcs = policies(kind)
    mcc = ManagedCollisionCollection(mcs, TABLES)
    params = jaxembed.collections.init(jax.random.key(0), TABLES)
    weights = jaxembed.collections.tables_of(params, TABLES)
    theirs = torchrec_mc_ebc(mcs, weights)
    state = mcc.init(PER_TABLE)

    @jax.jit
    def step(state, raw):
        kj, state, evicted, num_evicted = mcc.remap(state, raw)
        pooled, _ = jaxembed.embedding_bag_collection(params, kj, TABLES)
        return pooled, kj, state, evicted, num_evicted

    evictions = 0
    for _ in range(9):
        lists = batch_lists(rng, ids)
        pooled, kj, state, _, num_evicted = step(state, RawKeyedJagged.from_lists(lists))
        want, want_kjt = theirs(torchrec_kjt(lists))
        want_rows = {k: v for k, v in want_kjt.to_dict().items()}
        got_rows = kj.to_lists()
        for key in KEYS:
            np.testing.assert_array_equal(
                np.concatenate(got_rows[key]), want_rows[key].values().numpy(), err_msg=key
            )
            np.testing.assert_allclose(
                pooled[key], want.to_dict()[key].detach().numpy(), rtol=1e-6, atol=1e-6
            )
        for t in TABLES:
            module = theirs._managed_collision_collection._managed_collision_modules[t.name]
            assert_same_state(mcs[t.name], state[t.name], module)
            evictions += int(num_evicted[t.name]) > 0
    assert evictions >= 5


def test_evicted_rows_and_an_overflow():
    mcs = {t.name: ManagedCollision("lru", 1) for t in TABLES}
    mcc = ManagedCollisionCollection(mcs, TABLES)
    state = mcc.init({"a": 3, "b": 2})
    lists = {"f1": [[10, 11], [], []], "f2": [[12], [], [10]], "f3": [[7], [], []]}
    # eagerly, a table given more ids than its ids_per_call raises, naming the table
    with pytest.raises(ValueError, match=r"table 'a' gets 4 ids .* ids_per_call 3"):
        mcc.remap(state, RawKeyedJagged.from_lists(lists))
    # under jit, the ids past it are neither profiled nor remapped: out of range, NaN bags
    kj, new, _, num_evicted = jax.jit(mcc.remap)(state, RawKeyedJagged.from_lists(lists))
    rows = kj.to_lists()
    # table a's call: f2's ids, then f1's ([12, 10, 10, 11]); the fourth is past ids_per_call
    row_12, row_10 = int(rows["f2"][0][0]), int(rows["f2"][2][0])
    assert row_12 != row_10 and max(row_12, row_10) < 11  # both admitted (not the miss row)
    assert rows["f1"][0][0] == row_10
    assert rows["f1"][0][1] == 12  # out of range for table a
    held, slots = jaxembed.collisions.held_ids(new["a"])
    assert dict(zip(held.tolist(), slots.tolist(), strict=True)) == {10: row_10, 12: row_12}
    assert int(num_evicted["a"]) == 2 and int(num_evicted["b"]) == 1
    params = jaxembed.collections.init(jax.random.key(0), TABLES)
    with pytest.raises(IndexError, match="feature 'f1' holds 12"):  # eagerly: loud
        jaxembed.embedding_bag_collection(params, kj, TABLES)
    pooled, _ = jax.jit(lambda p, k: jaxembed.embedding_bag_collection(p, k, TABLES))(params, kj)
    assert np.isnan(pooled["f1"][0]).all() and np.isfinite(pooled["f2"]).all()
    # eval remaps and changes nothing
    same = mcc.remap(new, RawKeyedJagged.from_lists({**lists, "f1": [[10], [], []]}), train=False)
    for a, b in zip(jax.tree.leaves(same.state), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_eager_remap_runs_one_jitted_program_call_after_call(monkeypatch):
    """Eager calls trace the collection's remap once (each table's eviction ``lax.cond``,
    run op by op, was traced and compiled anew on every call) and give the traced result."""
    mcc = ManagedCollisionCollection(policies("mixed"), TABLES)
    traces, remap = [], mcc._remap
    monkeypatch.setattr(mcc, "_remap", lambda *args: traces.append(1) or remap(*args))
    rng = np.random.default_rng(5)
    ids = universe(rng)
    state = want = mcc.init(PER_TABLE)
    for _ in range(4):
        raw = RawKeyedJagged.from_lists(batch_lists(rng, ids))
        got = mcc.remap(state, raw)
        ref = remap(want, raw, True)  # the same body, op by op
        np.testing.assert_array_equal(got.features.values, ref.features.values)
        for x, y in zip(jax.tree.leaves(got.state), jax.tree.leaves(ref.state), strict=True):
            np.testing.assert_array_equal(x, y)
        state, want = got.state, ref.state
    assert len(traces) == 1


def test_remap_feeds_sparse_training_and_does_not_retrace():
    mcs = {t.name: ManagedCollision("lfu", 2) for t in TABLES}
    mcc = ManagedCollisionCollection(mcs, TABLES)
    tx = jaxembed.collections.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), TABLES)
    params = jaxembed.collections.init(jax.random.key(1), TABLES)
    traces = []

    @jax.jit
    def train(params, opt, state, raw):
        traces.append(1)
        kj, state, _, _ = mcc.remap(state, raw)
        pooled, lk = jaxembed.collections.lookup(params, kj, TABLES)
        grads = lk.grad({k: 2 * v for k, v in pooled.items()})  # d/dx sum(x^2)
        params, opt = tx.update(grads, opt, params)
        return params, opt, state, kj

    state, opt = mcc.init(PER_TABLE), tx.init(params)
    rng = np.random.default_rng(0)
    ids = universe(rng)
    for call in range(2):
        raw = RawKeyedJagged.from_lists(batch_lists(rng, ids))
        if call:  # the second call: the jitted step only (it must not retrace)
            params, opt, state, kj = train(params, opt, state, raw)
            continue
        # the same step, eagerly and piece by piece
        kj_want, state_want, _, _ = mcc.remap(state, raw)
        pooled, lk = jaxembed.collections.lookup(params, kj_want, TABLES)
        want, opt_want = tx.update(lk.grad({k: 2 * v for k, v in pooled.items()}), opt, params)
        params, opt, state, kj = train(params, opt, state, raw)
        np.testing.assert_array_equal(kj.values, kj_want.values)
        for a, b in zip(
            jax.tree.leaves((params, opt, state)),
            jax.tree.leaves((want, opt_want, state_want)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "build, error, match",
    [
        (
            lambda: ManagedCollisionCollection({"a": ManagedCollision()}, TABLES),
            ValueError,
            r"no ManagedCollision for \['b'\]",
        ),
        (
            lambda: ManagedCollisionCollection(
                {"a": ManagedCollision(), "b": ManagedCollision(), "c": ManagedCollision()}, TABLES
            ),
            ValueError,
            r"\['c'\] are not tables",
        ),
        (
            lambda: ManagedCollisionCollection({"a": ManagedCollision(), "b": "lfu"}, TABLES),
            TypeError,
            r"managed_collisions\['b'\]",
        ),
        (lambda: ManagedCollisionCollection([], TABLES), TypeError, "managed_collisions"),
        (lambda: ManagedCollisionCollection({}, TABLES[0]), TypeError, "tables"),
        (lambda: RawKeyedJagged.from_lists({"f": [[-1]]}), ValueError, "features holds -1"),
        (lambda: RawKeyedJagged.from_lists({"f": [[1.5]]}), TypeError, "integer"),
        (
            lambda: RawKeyedJagged(["f"], np.array([1, 2]), np.array([3])),
            ValueError,
            "lengths sum to 3",
        ),
        (lambda: RawKeyedJagged(["f"], np.array([[1]]), np.array([1])), ValueError, "1-D"),
    ],
)
def test_bad_arguments_raise_naming_themselves(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_calls_raise_and_change_nothing():
    mcc = ManagedCollisionCollection({t.name: ManagedCollision() for t in TABLES}, TABLES)
    state = mcc.init(8)
    raw = RawKeyedJagged.from_lists({"f1": [[1]], "f2": [[2]], "f3": [[3]]})
    with pytest.raises(ValueError, match=r"missing \['f3'\]"):
        mcc.remap(state, RawKeyedJagged.from_lists({"f1": [[1]], "f2": [[2]]}))
    with pytest.raises(ValueError, match=r"unknown \['g'\]"):
        mcc.remap(
            state, RawKeyedJagged.from_lists({"f1": [[1]], "f2": [[2]], "f3": [[3]], "g": [[4]]})
        )
    with pytest.raises(ValueError, match="one CollisionState per table"):
        mcc.remap({"a": state["a"]}, raw)
    with pytest.raises(TypeError, match="RawKeyedJagged"):
        mcc.remap(state, jaxembed.KeyedJagged.from_lists({"f1": [[1]], "f2": [[2]], "f3": [[3]]}))
    with pytest.raises(ValueError, match="ids_per_call must name every table"):
        mcc.init({"a": 4})
    assert int(state["a"].step) == 0


def test_raw_ids_keep_their_64_bits():
    raw = RawKeyedJagged.from_lists({"f": [[INT64_MAX, 2**40 + 1], []]})
    np.testing.assert_array_equal(raw.ids.hi[:2], raw_ids(np.array([INT64_MAX, 2**40 + 1])).hi)
    assert raw.capacity == 16 and raw.batch_size == 2
    unsigned = RawKeyedJagged.from_lists({"f": [np.array([2**63 - 1], np.uint64)]})
    np.testing.assert_array_equal(unsigned.ids.lo[:1], raw.ids.lo[:1])


# -- the nnx modules --------------------------------------------------------------------------


def mc_ebc(mcs, *, sparse=False, seed=0, reset_evicted=False, **kwargs):
    ebc = jaxembed.EmbeddingBagCollection(TABLES, rngs=nnx.Rngs(seed), sparse=sparse)
    mcc = ManagedCollisionCollection(mcs, TABLES)
    return jaxembed.ManagedCollisionEmbeddingBagCollection(
        ebc, mcc, ids_per_call=PER_TABLE, reset_evicted=reset_evicted, **kwargs
    )


def sparse_step():
    """A jitted sparse training step of a module on the pooled features' squares."""

    @nnx.jit
    def step(model, opt, raw):
        loss, grads = jaxembed.sparse.value_and_grad(
            lambda m: sum(jnp.sum(v**2) for v in m(raw).values())
        )(model)
        opt.update(model, grads)
        return loss

    return step


def assert_same_state_dict(module, theirs):
    ours, want = module.to_torch(), theirs.state_dict()
    assert sorted(ours) == sorted(want)
    for key in want:
        np.testing.assert_allclose(
            ours[key].numpy(), want[key].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=key
        )


def test_the_module_trains_as_torchrecs_call_by_call():
    """Dense SGD on the pooled features' squares: the tables, the held ids and every counter
    equal TorchRec's ManagedCollisionEmbeddingBagCollection trained by torch.optim.SGD."""
    mcs = policies("mixed")
    model = mc_ebc(mcs, return_remapped_features=True)
    theirs = torchrec_mc_ebc(mcs, model.embedding_module.tables())
    opt = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    torch_opt = torch.optim.SGD(theirs.parameters(), lr=0.05)

    traces = []

    @nnx.jit
    def step(model, opt, raw):
        traces.append(1)

        def loss_fn(model):
            pooled, kj = model(raw)
            return sum(jnp.sum(v**2) for v in pooled.values()), kj

        (loss, kj), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, kj

    rng = np.random.default_rng(5)
    ids = universe(rng)
    for _ in range(7):
        lists = batch_lists(rng, ids)
        loss, kj = step(model, opt, RawKeyedJagged.from_lists(lists))
        pooled, kjt = theirs(torchrec_kjt(lists))
        want = sum((v**2).sum() for v in pooled.to_dict().values())
        torch_opt.zero_grad()
        want.backward()
        torch_opt.step()
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
        for key, jt in kjt.to_dict().items():
            np.testing.assert_array_equal(np.concatenate(kj.to_lists()[key]), jt.values().numpy())
        assert_same_state_dict(model, theirs)
    assert len(traces) == 1  # the states' updates never retrace


@pytest.mark.slow  # the reset test below trains the sparse module too: CI runs this one
def test_the_sparse_module_trains_as_the_functional_path():
    mcs = policies("lfu")
    model = mc_ebc(mcs, sparse=True, seed=2)
    tables = model.embedding_module.tables()
    opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.1), jaxembed.sparse.rowwise_adagrad(0.1))
    mcc = ManagedCollisionCollection(mcs, TABLES)
    params = jaxembed.collections.stack_tables(tables, TABLES)
    tx = jaxembed.collections.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), TABLES)
    tx_state, state = tx.init(params), mcc.init(PER_TABLE)

    step = sparse_step()

    @jax.jit
    def reference(params, tx_state, state, raw):
        kj, state, _, _ = mcc.remap(state, raw)
        pooled, lk = jaxembed.collections.lookup(params, kj, TABLES)
        grads = lk.grad({k: 2 * v for k, v in pooled.items()})
        return (*tx.update(grads, tx_state, params), state)

    rng = np.random.default_rng(6)
    ids = universe(rng)
    for _ in range(5):
        raw = RawKeyedJagged.from_lists(batch_lists(rng, ids))
        step(model, opt, raw)
        params, tx_state, state = reference(params, tx_state, state, raw)
        for name, table in jaxembed.collections.tables_of(params, TABLES).items():
            np.testing.assert_allclose(
                model.embedding_module.tables()[name], table, rtol=1e-6, atol=1e-7
            )
        for name in state:
            for a, b in zip(
                jax.tree.leaves(model.mc_state[name].get_value()),
                jax.tree.leaves(state[name]),
                strict=True,
            ):
                np.testing.assert_array_equal(a, b)


def test_eval_changes_no_state_and_from_torch_resumes_as_torchrec():
    mcs = policies("mixed")
    model = mc_ebc(mcs)
    rng = np.random.default_rng(7)
    ids = universe(rng)
    theirs = torchrec_mc_ebc(mcs, model.embedding_module.tables())
    call = nnx.jit(lambda m, raw: m(raw))
    for _ in range(4):
        lists = batch_lists(rng, ids)
        call(model, RawKeyedJagged.from_lists(lists))
        theirs(torchrec_kjt(lists))
    assert_same_state_dict(model, theirs)
    # eval (an eager call): remaps, and no state changes (TorchRec's eval mode)
    model.eval()
    theirs.eval()
    lists = batch_lists(rng, ids)
    before = model.to_torch()
    pooled = model(RawKeyedJagged.from_lists(lists))
    want, _ = theirs(torchrec_kjt(lists))
    for key, value in want.to_dict().items():
        np.testing.assert_allclose(pooled[key], value.detach().numpy(), rtol=1e-6, atol=1e-6)
    for key, value in model.to_torch().items():
        np.testing.assert_array_equal(value.numpy(), before[key].numpy(), err_msg=key)
    # a module read from TorchRec's state dict goes on as TorchRec does after its own reload
    model.train()
    theirs.train()
    back = jaxembed.ManagedCollisionEmbeddingBagCollection.from_torch(
        theirs.state_dict(),
        ManagedCollisionCollection(mcs, TABLES),
        ids_per_call=PER_TABLE,
        sparse=False,
        reset_evicted=False,  # TorchRec's unsharded module keeps evicted rows
    )
    reloaded = torchrec_mc_ebc(mcs, model.embedding_module.tables())
    reloaded.load_state_dict(theirs.state_dict())
    for _ in range(4):
        lists = batch_lists(rng, ids)
        pooled = call(back, RawKeyedJagged.from_lists(lists))
        want, _ = reloaded(torchrec_kjt(lists))
        for key, value in want.to_dict().items():
            np.testing.assert_allclose(pooled[key], value.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert_same_state_dict(back, reloaded)


def test_the_module_refuses_what_it_cannot_do():
    mcs = policies("lfu")
    mcc = ManagedCollisionCollection(mcs, TABLES)
    ebc = jaxembed.EmbeddingBagCollection(TABLES, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"embedding_module must be a jaxembed\.EmbeddingBagColl"):
        jaxembed.ManagedCollisionEmbeddingBagCollection(mcc, mcc, ids_per_call=4)
    with pytest.raises(TypeError, match="managed_collision_collection"):
        jaxembed.ManagedCollisionEmbeddingBagCollection(ebc, mcs, ids_per_call=4)
    other = [TABLES[0], jaxembed.EmbeddingBagConfig("b", 4, 7, ["f3"], pooling="mean")]
    with pytest.raises(ValueError, match="same table configs"):
        jaxembed.ManagedCollisionEmbeddingBagCollection(
            jaxembed.EmbeddingBagCollection(other, rngs=nnx.Rngs(0)), mcc, ids_per_call=4
        )
    with pytest.raises(TypeError, match="EmbeddingCollection"):
        jaxembed.ManagedCollisionEmbeddingCollection(ebc, mcc, ids_per_call=4)
    # the default resets evicted rows, with their row-wise state: a dense table cannot
    with pytest.raises(ValueError, match=r"reset_evicted=True .* needs a sparse=True"):
        jaxembed.ManagedCollisionEmbeddingBagCollection(ebc, mcc, ids_per_call=4)
    sparse_ebc = jaxembed.EmbeddingBagCollection(TABLES, rngs=nnx.Rngs(0), sparse=True)
    resetting = jaxembed.ManagedCollisionEmbeddingBagCollection(sparse_ebc, mcc, ids_per_call=4)
    raw = RawKeyedJagged.from_lists({"f1": [[1]], "f2": [[3]], "f3": [[4]]})
    with pytest.raises(ValueError, match=r"runs under jaxembed\.sparse\.value_and_grad"):
        resetting(raw)  # a training call outside value_and_grad would leave the state stale
    resetting.eval()
    resetting(raw)  # remapping alone needs no optimizer
    model = jaxembed.ManagedCollisionEmbeddingBagCollection(
        ebc, mcc, ids_per_call=2, reset_evicted=False
    )
    before = model.to_torch()
    with pytest.raises(ValueError, match="table 'a' gets 3 ids"):
        model(RawKeyedJagged.from_lists({"f1": [[1, 2]], "f2": [[3]], "f3": [[4]]}))
    for key, value in model.to_torch().items():  # a failed call changes nothing
        np.testing.assert_array_equal(value.numpy(), before[key].numpy(), err_msg=key)


def test_the_unpooled_module():
    tables = [jaxembed.EmbeddingConfig("s", 4, 8, ["seq"])]
    mcc = ManagedCollisionCollection({"s": ManagedCollision("lru", 1)}, tables)
    model = jaxembed.ManagedCollisionEmbeddingCollection(
        jaxembed.EmbeddingCollection(tables, rngs=nnx.Rngs(0)),
        mcc,
        ids_per_call=8,
        return_remapped_features=True,
        reset_evicted=False,
    )
    out, kj = model(RawKeyedJagged.from_lists({"seq": [[2**45, 9, 2**45], [9]]}))
    rows = kj.to_lists()["seq"]
    assert rows[0][0] == rows[0][2] and rows[0][1] == rows[1][0] != rows[0][0]
    weight = model.embedding_module.tables()["s"]
    np.testing.assert_array_equal(out["seq"].to_padded(3)[0], weight[rows[0]])


def test_evicted_rows_and_their_state_start_afresh_as_the_functional_reset():
    """reset_evicted (the default): each evicted row is drawn from its table's init before the
    call's lookup, and its row-wise Adagrad state restarts, as TorchRec's sharded module does;
    the module equals the functional step with reset_rows and reset_state, key for key."""
    mcs = {"a": ManagedCollision("lru", 1), "b": ManagedCollision("lfu", 2)}
    model = mc_ebc(mcs, sparse=True, seed=3, reset_evicted=True, rngs=nnx.Rngs(11))
    rowwise = jaxembed.sparse.rowwise_adagrad(0.1)
    opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.1), rowwise)
    mcc = ManagedCollisionCollection(mcs, TABLES)
    params = jaxembed.collections.stack_tables(model.embedding_module.tables(), TABLES)
    tx = jaxembed.collections.optimizer(rowwise, TABLES)
    tx_state, state = tx.init(params), mcc.init(PER_TABLE)
    keys = nnx.Rngs(11)
    assert sorted(params) == ["a", "b"]  # one table a stack: the stacks' keys are the tables'

    step = sparse_step()

    @jax.jit
    def reference(params, tx_state, state, raw, key_a, key_b):
        kj, state, evicted, _ = mcc.remap(state, raw)
        for t, key in zip(TABLES, (key_a, key_b), strict=True):
            bound = (1.0 / t.num_embeddings) ** 0.5
            init = lambda k, shape, dtype, b=bound: jax.random.uniform(k, shape, dtype, -b, b)  # noqa: E731
            table = params[t.name]["weight"]
            params = {
                **params,
                t.name: {
                    "weight": jaxembed.collisions.reset_rows(evicted[t.name], table, key, init=init)
                },
            }
            tx_state = {
                **tx_state,
                t.name: jaxembed.collisions.reset_state(
                    evicted[t.name], tx_state[t.name], rowwise, table
                ),
            }
        pooled, lk = jaxembed.collections.lookup(params, kj, TABLES)
        grads = lk.grad({k: 2 * v for k, v in pooled.items()})
        return (*tx.update(grads, tx_state, params), state, evicted)

    rng = np.random.default_rng(8)
    ids = universe(rng)
    resets = 0
    for _ in range(5):
        raw = RawKeyedJagged.from_lists(batch_lists(rng, ids))
        step(model, opt, raw)
        params, tx_state, state, evicted = reference(params, tx_state, state, raw, keys(), keys())
        resets += sum(int((evicted[t.name] < t.num_embeddings).sum()) for t in TABLES)
        got = model.embedding_module.tables()
        for t in TABLES:
            np.testing.assert_allclose(got[t.name], params[t.name]["weight"], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(
                opt.sparse_state[f"embedding_module/weights/{t.name}"].sum.get_value(),
                tx_state[t.name].sum,
                rtol=1e-6,
                atol=1e-7,
            )
    assert resets > 10  # rows were reset, and a reset row's state restarted


def test_a_bfloat16_table_resets_its_evicted_rows_in_its_own_dtype():
    tables = [jaxembed.EmbeddingBagConfig("t", 4, 16, ["f"], param_dtype=jnp.bfloat16)]
    mcc = ManagedCollisionCollection({"t": ManagedCollision("lru", 1)}, tables)
    model = jaxembed.ManagedCollisionEmbeddingBagCollection(
        jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True),
        mcc,
        ids_per_call=4,
    )
    before = np.asarray(model.embedding_module.tables()["t"], np.float32)
    loss_fn = lambda m: sum(jnp.sum(v.astype(jnp.float32)) for v in m(raw).values())  # noqa: E731
    raw = RawKeyedJagged.from_lists({"f": [[2**40, 7]]})
    _, grads = nnx.jit(jaxembed.sparse.value_and_grad(loss_fn))(model)
    after = model.embedding_module.tables()["t"]
    assert after.dtype == jnp.bfloat16
    rows = [int(r) for r in grads.fresh["embedding_module/weights/t"] if r < 16]
    assert len(rows) == 2  # the first eviction fills two rows: both drawn afresh
    bound = (1 / 16) ** 0.5
    changed = np.flatnonzero((np.asarray(after, np.float32) != before).any(axis=1))
    assert sorted(changed.tolist()) == sorted(rows)
    assert np.abs(np.asarray(after, np.float32)[rows]).max() <= bound
