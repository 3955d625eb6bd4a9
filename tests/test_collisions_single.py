"""Managed collisions in front of one table: ``ManagedCollisionEmbedding`` and
``ManagedCollisionEmbeddingBag``.

The reference is the one-table managed-collision collection (tests/test_collisions_collection.py
checks it against TorchRec 1.8's ManagedCollisionEmbeddingBagCollection call by call) and the
functional remapper (tests/test_collisions.py): the same stream gives the same rows, states,
evictions, fresh rows and sparse steps.
"""

from __future__ import annotations

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

V, D, BATCH, PER_CALL = 12, 4, 3, 8


def _stream(seed: int, calls: int):
    """Bags of raw 64-bit ids, Zipf over a small universe that shares low halves."""
    rng = np.random.default_rng(seed)
    universe = np.unique(np.concatenate([
        rng.integers(0, 2**62, size=30, dtype=np.int64),
        np.array([0, 1, 1 << 32, (1 << 32) + 1, 2**63 - 1], np.int64),
    ]))  # fmt: skip
    out = []
    for _ in range(calls):
        lengths = rng.multinomial(PER_CALL - rng.integers(0, 3), np.ones(BATCH) / BATCH)
        out.append([universe[np.minimum(rng.zipf(1.3, n) - 1, universe.size - 1)]
                    for n in lengths])  # fmt: skip
    return out


def _flat(bags):
    """``(ids padded to PER_CALL, offsets, num_valid)``: the bag module's offsets form (the ids
    as :class:`RawIds` pairs: int64 NumPy handed to ``jit`` would be cut to int32)."""
    ids = np.zeros(PER_CALL, np.int64)
    flat = np.concatenate(bags) if bags else np.zeros(0, np.int64)
    ids[: flat.size] = flat
    offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).astype(np.int32)
    return raw_ids(ids), offsets, np.int32(flat.size)


@pytest.mark.parametrize(
    "mc,mode",
    [  # the README's command runs LRU; -m slow the rest (CI runs both)
        pytest.param(ManagedCollision("lfu", 1), "sum", marks=pytest.mark.slow),
        (ManagedCollision("lru", 2), "mean"),
        pytest.param(ManagedCollision("distance_lfu", 3, decay_exponent=1.5), "sum",
                     marks=pytest.mark.slow),
        pytest.param(ManagedCollision("lfu", 2, admission="count", admission_value=2), "mean",
                     marks=pytest.mark.slow),
    ],
    ids=["lfu", "lru", "distance_lfu", "lfu_count_admission"],
)  # fmt: skip
def test_the_bag_module_trains_as_the_one_table_collection(mc, mode):
    """Sparse training with reset_evicted (the default): every call's pooled rows, the table,
    the row-wise Adagrad state and the remap state equal the collection's, bit for bit."""
    init = jaxembed.default_embedding_init
    bag = jaxembed.EmbeddingBag(V, D, mode=mode, sparse=True, rngs=nnx.Rngs(0))
    single = jaxembed.ManagedCollisionEmbeddingBag(bag, mc, ids_per_call=PER_CALL,
                                                   init=init, rngs=nnx.Rngs(7))  # fmt: skip
    tables = [jaxembed.EmbeddingBagConfig("t", D, V, ["f"], pooling=mode, init=init)]
    coll = jaxembed.ManagedCollisionEmbeddingBagCollection(
        jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(1), sparse=True),
        ManagedCollisionCollection({"t": mc}, tables),
        ids_per_call=PER_CALL,
        rngs=nnx.Rngs(7),
    )
    coll.embedding_module.weights["t"].set_value(bag.weight.get_value())
    tx = jaxembed.sparse.rowwise_adagrad(0.1)
    opts = [jaxembed.sparse.Optimizer(m, optax.sgd(0.1), tx) for m in (single, coll)]
    traces = []

    @nnx.jit
    def step_single(model, opt, ids, offsets, num_valid):
        traces.append(1)

        def loss(m):
            pooled = m(ids, offsets, num_valid=num_valid)
            return jnp.sum(pooled**2), pooled

        (_, pooled), grads = jaxembed.sparse.value_and_grad(loss, has_aux=True)(model)
        opt.update(model, grads)
        return pooled

    @nnx.jit
    def step_coll(model, opt, raw):
        def loss(m):
            pooled = m(raw)["f"]
            return jnp.sum(pooled**2), pooled

        (_, pooled), grads = jaxembed.sparse.value_and_grad(loss, has_aux=True)(model)
        opt.update(model, grads)
        return pooled

    evictions, state = 0, mc.init(V, PER_CALL)
    for bags in _stream(seed=3, calls=12):
        ids, offsets, num_valid = _flat(bags)
        out = mc.remap(state, ids, valid=np.arange(PER_CALL) < num_valid)
        state, evictions = out.state, evictions + int(out.num_evicted)
        got = step_single(single, opts[0], ids, offsets, num_valid)
        raw = RawKeyedJagged.from_lists({"f": bags}, capacity=PER_CALL)
        want = step_coll(coll, opts[1], raw)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(bag.weight.get_value(), coll.embedding_module.tables()["t"])
        for a, b in zip(jax.tree.leaves(single.mc_state.get_value()),
                        jax.tree.leaves(coll.mc_state["t"].get_value()), strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            opts[0].sparse_state["embedding_module/weight"].sum.get_value(),
            opts[1].sparse_state["embedding_module/weights/t"].sum.get_value(),
        )
    # every slot filled (each fill resets its row), and more where the policy replaces ids
    assert evictions >= (1 if mc.admission else V - 1)
    assert len(traces) == 1  # the step does not retrace


def test_the_embedding_module_remaps_as_the_functional_remapper():
    """Rows are the table's rows at the remapper's slots, call by call; eval() only remaps and
    changes no state; a dense table keeps its evicted rows (reset_evicted=False)."""
    mc = ManagedCollision("lru", 2)
    emb = jaxembed.Embedding(V, D, rngs=nnx.Rngs(0))
    module = jaxembed.ManagedCollisionEmbedding(emb, mc, ids_per_call=PER_CALL,
                                                reset_evicted=False)  # fmt: skip
    state = mc.init(V, PER_CALL)
    table = np.asarray(emb.weight.get_value())
    step = nnx.jit(lambda m, ids: m(ids))
    for bags in _stream(seed=5, calls=6):
        ids = raw_ids(np.concatenate(bags)[None, :4])  # any shape: (1, 4)
        out = mc.remap(state, ids)
        state = out.state
        np.testing.assert_array_equal(step(module, ids), table[np.asarray(out.slots)])
        for a, b in zip(jax.tree.leaves(module.mc_state.get_value()), jax.tree.leaves(state),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(emb.weight.get_value(), table)  # nothing was reset
    module.eval()
    held = module.held_ids()
    ids = np.concatenate([held[0][:2], [2**61 + 3]])
    rows = module(ids)
    np.testing.assert_array_equal(module.remap(ids), [*held[1][:2], V - 1])  # the miss row
    np.testing.assert_array_equal(rows, table[[*held[1][:2], V - 1]])
    for a, b in zip(jax.tree.leaves(module.mc_state.get_value()), jax.tree.leaves(state),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def _bag(**kw):
    return jaxembed.EmbeddingBag(V, D, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: jaxembed.ManagedCollisionEmbedding(_bag(), ManagedCollision(), ids_per_call=4),
         TypeError, "embedding_module must be a jaxembed.Embedding"),
        (lambda: jaxembed.ManagedCollisionEmbeddingBag(_bag(sparse=True), "lfu", ids_per_call=4),
         TypeError, "managed_collision must be"),
        (lambda: jaxembed.ManagedCollisionEmbeddingBag(_bag(), ManagedCollision(), ids_per_call=4),
         ValueError, "reset_evicted=True .* needs a sparse=True EmbeddingBag"),
        (lambda: jaxembed.ManagedCollisionEmbeddingBag(
            _bag(padding_idx=0), ManagedCollision(), ids_per_call=4, reset_evicted=False),
         ValueError, "padding_idx=0"),
        (lambda: jaxembed.ManagedCollisionEmbeddingBag(
            _bag().quantize(8), ManagedCollision(), ids_per_call=4, reset_evicted=False),
         ValueError, "quantized"),
        (lambda: jaxembed.ManagedCollisionEmbeddingBag(
            _bag(), ManagedCollision(), ids_per_call=0, reset_evicted=False),
         ValueError, "ids_per_call"),
        (lambda: jaxembed.ManagedCollisionEmbeddingBag(
            _bag(), ManagedCollision(), ids_per_call=4, reset_evicted=False, init=3),
         TypeError, "init must be callable"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_naming_themselves(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_calls_raise_and_change_nothing():
    """A training call with reset_evicted outside jaxembed.sparse.value_and_grad, more ids than
    ids_per_call, and a negative raw id: each raises and leaves the table and state alone."""
    module = jaxembed.ManagedCollisionEmbedding(
        jaxembed.Embedding(V, D, sparse=True, rngs=nnx.Rngs(0)), ManagedCollision(), ids_per_call=4
    )
    table = np.asarray(module.embedding_module.weight.get_value())
    before = jax.tree.leaves(module.mc_state.get_value())
    for ids, error, match in (
        (np.array([2**40, 5]), ValueError, "runs under jaxembed.sparse.value_and_grad"),
        (np.arange(5), ValueError, "more than the state's ids_per_call 4"),
        (np.array([3, -1]), ValueError, "raw ids must be >= 0"),
    ):
        with pytest.raises(error, match=match):
            module(ids)
        np.testing.assert_array_equal(module.embedding_module.weight.get_value(), table)
        for a, b in zip(jax.tree.leaves(module.mc_state.get_value()), before, strict=True):
            np.testing.assert_array_equal(a, b)
