"""Sparse tables inside models: nnx (``sparse=True``) and a functional loop, each against torch.

The model is a sparse embedding looked up twice per step (the second lookup sees the renormed
rows), a mean over the sequence and a dense linear head. torch trains the table with
``SparseAdam`` and the head with ``Adam``; jaxembed with ``lazy_adam`` and ``optax.adam`` in one
jitted step.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxembed
from jaxembed import sparse

V, D, C, STEPS = 17, 6, 3, 6
KW = {"padding_idx": 2, "max_norm": 1.3}


def _batches():
    rng = np.random.default_rng(0)
    return [
        (
            rng.integers(0, V, (4, 5)),
            rng.integers(0, V, (3,)),
            rng.normal(size=(4, C)).astype(np.float32),
        )
        for _ in range(STEPS)
    ]


def _torch_run(table, kernel, bias):
    emb = torch.nn.Embedding.from_pretrained(torch.tensor(table), freeze=False, sparse=True, **KW)
    head = torch.nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(kernel.T))
        head.bias.copy_(torch.tensor(bias))
    opt_sparse = torch.optim.SparseAdam(emb.parameters(), lr=0.05)
    opt_dense = torch.optim.Adam(head.parameters(), lr=0.02)
    losses = []
    for ids, extra, y in _batches():
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        h = emb(torch.from_numpy(ids)).mean(1) + emb(torch.from_numpy(extra)).sum(0)
        loss = ((head(h) - torch.from_numpy(y)) ** 2).mean()
        loss.backward()
        opt_sparse.step()
        opt_dense.step()
        losses.append(loss.item())
    return emb.weight.detach().numpy(), head.weight.detach().numpy().T, np.array(losses)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.embed = jaxembed.Embedding(V, D, sparse=True, rngs=rngs, **KW)
        self.head = nnx.Linear(D, C, rngs=rngs)

    def __call__(self, ids, extra):
        return self.head(self.embed(ids).mean(1) + self.embed(extra).sum(0))


def _loss(model, ids, extra, y):
    return jnp.mean((model(ids, extra) - y) ** 2)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_nnx_model_trains_like_torch_with_sparse_and_dense_optimizers():
    model = Model(nnx.Rngs(0))
    table = np.asarray(model.embed.weight[...])
    kernel, bias = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
    optimizer = sparse.Optimizer(model, optax.adam(0.02), sparse.lazy_adam(0.05))
    traces = []

    @functools.partial(nnx.jit, donate_argnums=(0, 1))
    def train_step(model, optimizer, ids, extra, y):
        traces.append(1)
        loss, grads = sparse.value_and_grad(_loss)(model, ids, extra, y)
        optimizer.update(model, grads)
        return loss

    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "donated buffers were not usable"
        for ids, extra, y in _batches():
            losses.append(float(train_step(model, optimizer, ids, extra, y)))
    assert len(traces) == 1
    want_table, want_kernel, want_losses = _torch_run(table, kernel, bias)
    np.testing.assert_allclose(model.embed.weight[...], want_table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.head.kernel[...], want_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert int(optimizer.step[...]) == STEPS
    # the dense optimizer holds no state for the table: no (V, D) Adam moments
    dense_leaves = jax.tree.leaves(nnx.state(optimizer.dense.opt_state))
    assert all(leaf.shape != (V, D) for leaf in dense_leaves)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_functional_loop_trains_like_torch():
    """The same model as plain functions: sparse.lookup for the table, optax for the head."""
    rng = np.random.default_rng(4)
    table = rng.normal(size=(V, D)).astype(np.float32)
    kernel = rng.normal(size=(D, C)).astype(np.float32) * 0.3
    bias = np.zeros(C, np.float32)
    sparse_tx, dense_tx = sparse.lazy_adam(0.05), optax.adam(0.02)
    head = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    weight = jnp.asarray(table)
    states = (sparse_tx.init(weight), dense_tx.init(head))

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(weight, head, states, ids, extra, y):
        rows, lk = sparse.lookup({"weight": weight}, ids, **KW)
        # the second lookup sees the table the first one renormed, as in torch
        rows2, lk2 = sparse.lookup(lk.params, extra, **KW)

        def loss_fn(rows, rows2, head):
            h = rows.mean(1) + rows2.sum(0)
            return jnp.mean((h @ head["kernel"] + head["bias"] - y) ** 2)

        loss, (g, g2, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(rows, rows2, head)
        grad = sparse.sum_grads(lk.grad(g), lk2.grad(g2))
        weight, s_state = sparse_tx.update(grad, states[0], lk2.params["weight"])
        updates, d_state = dense_tx.update(g_head, states[1], head)
        return weight, optax.apply_updates(head, updates), (s_state, d_state), loss

    losses = []
    for ids, extra, y in _batches():
        weight, head, states, loss = step(weight, head, states, ids, extra, y)
        losses.append(float(loss))
    want_table, want_kernel, want_losses = _torch_run(table, kernel, bias)
    np.testing.assert_allclose(weight, want_table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head["kernel"], want_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


def test_outside_value_and_grad_a_sparse_table_trains_densely():
    """Plain nnx.grad still works (densely): sparse=True only changes what value_and_grad does."""
    sparse_model = Model(nnx.Rngs(0))
    dense_model = Model(nnx.Rngs(0))
    dense_model.embed = jaxembed.Embedding(V, D, rngs=nnx.Rngs(0), **KW)
    ids, extra, y = _batches()[0]
    g_sparse = nnx.grad(_loss)(sparse_model, ids, extra, y)
    g_dense = nnx.grad(_loss)(dense_model, ids, extra, y)
    np.testing.assert_array_equal(g_sparse["embed"]["weight"][...], g_dense["embed"]["weight"][...])
    assert isinstance(sparse_model.embed.weight, sparse.SparseParam)


def test_value_and_grad_gives_rows_and_dense_grads():
    model = Model(nnx.Rngs(1))
    ids, extra, y = _batches()[1]
    (loss, aux), grads = sparse.value_and_grad(lambda m, *a: (_loss(m, *a), "aux"), has_aux=True)(
        model, ids, extra, y
    )
    assert aux == "aux"
    assert set(grads.sparse) == {"embed/weight"}
    g = grads.sparse["embed/weight"]
    assert g.values.shape == (ids.size + extra.size, D)
    # the sum of the entries per row is the dense gradient
    dense = jnp.zeros((V + 1, D)).at[g.indices].add(g.values)[:V]
    want = nnx.grad(_loss)(Model(nnx.Rngs(1)), ids, extra, y)["embed"]["weight"][...]
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
    assert "weight" not in grads.dense.get("embed", {})
    np.testing.assert_allclose(float(loss), float(_loss(Model(nnx.Rngs(1)), ids, extra, y)))


def test_table_not_looked_up_is_left_alone():
    class TwoTables(nnx.Module):
        def __init__(self, rngs):
            self.a = jaxembed.Embedding(V, D, sparse=True, rngs=rngs)
            self.b = jaxembed.Embedding(V, D, sparse=True, rngs=rngs)

        def __call__(self, ids):
            return self.a(ids).sum()

    model = TwoTables(nnx.Rngs(0))
    before = np.asarray(model.b.weight[...])
    opt = sparse.Optimizer(model, optax.sgd(0.1), sparse.lazy_adam(0.1))
    _, grads = sparse.value_and_grad(lambda m: m(jnp.array([1, 2])))(model)
    opt.update(model, grads)
    np.testing.assert_array_equal(model.b.weight[...], before)
    assert int(opt.sparse_state["b/weight"].count[...]) == 0
    assert int(opt.sparse_state["a/weight"].count[...]) == 1


def test_errors():
    model = Model(nnx.Rngs(0))
    with pytest.raises(TypeError, match="sparse_tx"):
        sparse.Optimizer(model, optax.sgd(0.1), optax.sgd(0.1))
    opt = sparse.Optimizer(model, optax.sgd(0.1), sparse.sgd(0.1))
    with pytest.raises(TypeError, match="value_and_grad"):
        opt.update(model, nnx.grad(_loss)(model, *_batches()[0]))
    stranger = jaxembed.Embedding(V, D, sparse=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not part of the model"):
        sparse.value_and_grad(
            lambda m: stranger(jnp.array([1])).sum() + m(*_batches()[0][:2]).sum()
        )(model)
    with pytest.raises(TypeError, match="sparse"):
        jaxembed.Embedding(V, D, sparse=1, rngs=nnx.Rngs(0))


class _WithBatchNorm(nnx.Module):
    def __init__(self, sparse):
        self.emb = jaxembed.Embedding(10, 4, sparse=sparse, rngs=nnx.Rngs(0))
        self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(1))

    def __call__(self, ids):
        return jnp.sum(self.bn(self.emb(ids)) ** 2)


@pytest.mark.parametrize("jit", [False, True])
def test_a_model_that_updates_its_own_state_trains_as_the_dense_one(jit):
    # BatchNorm's statistics (any variable the loss updates) are updated once a call, as
    # nnx.value_and_grad updates them, and the dense parameters get the same gradients
    ids = jnp.array([1, 2, 2, 7])
    sparse_model, dense_model = _WithBatchNorm(True), _WithBatchNorm(False)
    wrap = nnx.jit if jit else (lambda f: f)
    sparse_step = wrap(sparse.value_and_grad(lambda m: m(ids)))
    dense_step = wrap(nnx.value_and_grad(lambda m: m(ids)))
    for _ in range(2):
        loss, grads = sparse_step(sparse_model)
        want, want_grads = dense_step(dense_model)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                getattr(sparse_model.bn, name)[...], getattr(dense_model.bn, name)[...], rtol=1e-6
            )
        np.testing.assert_allclose(
            grads.dense["bn"]["scale"][...], want_grads["bn"]["scale"][...], rtol=1e-5, atol=1e-7
        )
        dense_rows = want_grads["emb"]["weight"][...]
        got = (
            jnp.zeros_like(dense_rows)
            .at[grads.sparse["emb/weight"].indices]
            .add(grads.sparse["emb/weight"].values)
        )
        np.testing.assert_allclose(got, dense_rows, rtol=1e-5, atol=1e-7)
