"""Checkpoints lose nothing: save with orbax, restore into fresh objects, and training continues
bit for bit as if it had never stopped (dense optax state, sparse row-wise state, nnx modules)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxembed
from jaxembed import sparse

V, D, N_STEPS = 23, 4, 4


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, V, (3, 5)), rng.integers(0, 3, (3,)), rng.normal(size=(3, 5, D)))
        for _ in range(n)
    ]


def _save_restore(path, tree, fresh):
    """Saves ``tree``, restores it into the structure of ``fresh`` (a newly built state)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        return ckptr.restore(path, fresh)


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _functional_init():
    params = jaxembed.init(jax.random.key(0), V, D, padding_idx=0)
    head = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(D, 3)), jnp.float32)}
    dense_tx, sparse_tx = optax.adam(0.05), sparse.lazy_adam(0.05)
    state = {
        "weight": params["weight"],
        "head": head,
        "dense_opt": dense_tx.init(head),
        "sparse_opt": sparse_tx.init(params["weight"]),
    }
    return state, dense_tx, sparse_tx


def _functional_step(dense_tx, sparse_tx):
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, ids, labels, noise):
        rows, lk = sparse.lookup({"weight": state["weight"]}, ids, padding_idx=0, max_norm=1.0)

        def loss_fn(rows, head):
            logits = (rows + noise).mean(1) @ head["w"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        g_rows, g_head = jax.grad(loss_fn, argnums=(0, 1))(rows, state["head"])
        weight, sparse_opt = sparse_tx.update(
            lk.grad(g_rows), state["sparse_opt"], lk.params["weight"]
        )
        updates, dense_opt = dense_tx.update(g_head, state["dense_opt"], state["head"])
        head = optax.apply_updates(state["head"], updates)
        return {"weight": weight, "head": head, "dense_opt": dense_opt, "sparse_opt": sparse_opt}

    return step


def test_functional_state_resumes_bit_for_bit(tmp_path):
    batches = _batches(2 * N_STEPS)
    state, dense_tx, sparse_tx = _functional_init()
    step = _functional_step(dense_tx, sparse_tx)
    for b in batches:  # the uninterrupted run
        state = step(state, *b)
    straight = jax.tree.map(np.asarray, state)

    state, dense_tx, sparse_tx = _functional_init()
    step = _functional_step(dense_tx, sparse_tx)
    for b in batches[:N_STEPS]:
        state = step(state, *b)
    fresh, _, _ = _functional_init()
    restored = _save_restore(tmp_path / "ckpt", state, fresh)
    _assert_trees_equal(restored, state)
    assert isinstance(restored["sparse_opt"], sparse.LazyAdamState)
    for b in batches[N_STEPS:]:
        restored = step(restored, *b)
    _assert_trees_equal(restored, straight)


class Model(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.embed = jaxembed.Embedding(
            V, D, padding_idx=0, max_norm=1.0, sparse=True, param_dtype=dtype, rngs=rngs
        )
        self.bag = jaxembed.EmbeddingBag(V, D, mode="mean", rngs=rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, ids, noise):
        h = (self.embed(ids).astype(jnp.float32) + noise).mean(1) + self.bag(ids)
        return self.head(h)


def _nnx_objects(dtype):
    model = Model(nnx.Rngs(0), dtype)
    optimizer = sparse.Optimizer(model, optax.adam(0.05), sparse.rowwise_adagrad(0.3))
    return model, optimizer


@nnx.jit(donate_argnums=(0, 1))
def _nnx_step(model, optimizer, ids, labels, noise):
    def loss_fn(model):
        logits = model(ids, noise)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = sparse.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_nnx_model_and_optimizer_resume_bit_for_bit(tmp_path, dtype):
    batches = _batches(2 * N_STEPS, seed=3)
    model, optimizer = _nnx_objects(dtype)
    straight_losses = [float(_nnx_step(model, optimizer, *b)) for b in batches]
    straight = jax.tree.map(np.asarray, nnx.state((model, optimizer)))

    model, optimizer = _nnx_objects(dtype)
    losses = [float(_nnx_step(model, optimizer, *b)) for b in batches[:N_STEPS]]
    state = nnx.state((model, optimizer))
    # restore into freshly built objects, as a new process would
    model2, optimizer2 = _nnx_objects(dtype)
    graphdef, fresh = nnx.split((model2, optimizer2))
    restored = _save_restore(tmp_path / "nnx", state, fresh)
    model2, optimizer2 = nnx.merge(graphdef, restored)
    _assert_trees_equal(nnx.state((model2, optimizer2)), state)
    assert isinstance(model2.embed.weight, sparse.SparseParam)
    assert model2.embed.weight[...].dtype == dtype
    losses += [float(_nnx_step(model2, optimizer2, *b)) for b in batches[N_STEPS:]]
    assert losses == straight_losses
    _assert_trees_equal(nnx.state((model2, optimizer2)), straight)


@pytest.mark.parametrize("eviction", ["lfu", "lru", "distance_lfu"])
def test_managed_collision_state_resumes_bit_for_bit(tmp_path, eviction):
    """The remap state (held ids, slots, counts, the window mid-interval, the call counters)
    saved with orbax between evictions, restored into a fresh state: the next calls equal the
    uninterrupted run's, evictions included."""
    from jaxembed.collisions import ManagedCollision, RawIds, raw_ids

    mc = ManagedCollision(eviction, 3)
    rng = np.random.default_rng(0)
    calls = [raw_ids(rng.zipf(1.3, 16).astype(np.int64) * 2**33 + 7) for _ in range(10)]
    step = jax.jit(lambda s, h, lo: mc.remap(s, RawIds(h, lo)))
    state, straight = mc.init(12, 16), []
    for q in calls:
        out = step(state, q.hi, q.lo)
        state = out.state
        straight.append(out)
    state = mc.init(12, 16)
    for q in calls[:4]:  # call 4 is mid-interval: the window holds one call
        state = step(state, q.hi, q.lo).state
    restored = _save_restore(tmp_path / "mc", state, mc.init(12, 16))
    _assert_trees_equal(restored, state)
    for q, want in zip(calls[4:], straight[4:], strict=True):
        out = step(restored, q.hi, q.lo)
        restored = out.state
        _assert_trees_equal(out, want)
