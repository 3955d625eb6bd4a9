"""A sparse table read outside a lookup (a tied head, a penalty) gets its exact gradient, or the
optimizer that cannot apply it raises: never a silently dropped gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxembed
from jaxembed import sparse

V, D = 12, 4


class TiedLM(nnx.Module):
    """A tiny decoder: embed, a hidden layer, and the table itself as the output head."""

    def __init__(self, *, max_norm=None, rngs):
        self.embed = jaxembed.Embedding(V, D, max_norm=max_norm, sparse=True, rngs=rngs)
        self.hidden = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.hidden(self.embed(ids))))


def _loss(model, ids, labels):
    logits = model(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _whole(grads, key, shape):
    """A table's whole gradient, as a dense array, from a ModelGrads."""
    total = np.zeros(shape, np.float64)
    if key in grads.sparse:
        g = grads.sparse[key]
        keep = np.asarray(g.indices) < shape[0]
        np.add.at(total, np.asarray(g.indices)[keep], np.asarray(g.values)[keep])
    if key in grads.tables:
        total += np.asarray(grads.tables[key])
    return total


def test_the_tied_head_gets_its_gradient():
    model = TiedLM(rngs=nnx.Rngs(0))
    ids, labels = jnp.array([[1, 2, 3], [4, 4, 0]]), jnp.array([[2, 3, 4], [4, 0, 1]])
    _, grads = sparse.value_and_grad(_loss)(model, ids, labels)
    assert set(grads.tables) == {"embed/weight"}
    ref = nnx.grad(_loss)(model, ids, labels)
    np.testing.assert_allclose(
        _whole(grads, "embed/weight", (V, D)), ref["embed"]["weight"][...], atol=1e-6
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        grads.dense["hidden"],
        ref["hidden"],
    )


def test_only_lookups_keep_the_step_sparse():
    model = TiedLM(rngs=nnx.Rngs(0))
    _, grads = sparse.value_and_grad(lambda m: m.embed(jnp.array([1, 5])).sum())(model)
    assert grads.tables == {}
    np.testing.assert_array_equal(grads.sparse["embed/weight"].indices, [1, 5])


@pytest.mark.parametrize(
    "name,ours,theirs",
    [
        ("sgd", lambda: sparse.sgd(0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
        ("adagrad", lambda: sparse.adagrad(0.3), lambda p: torch.optim.Adagrad(p, lr=0.3)),
    ],
)
def test_tied_model_trains_like_torch(name, ours, theirs):
    model = TiedLM(max_norm=1.5, rngs=nnx.Rngs(1))
    table0 = np.asarray(model.embed.weight[...])
    kernel0, bias0 = np.asarray(model.hidden.kernel[...]), np.asarray(model.hidden.bias[...])
    opt = sparse.Optimizer(model, optax.sgd(0.1), ours())

    @nnx.jit
    def step(model, opt, ids, labels):
        loss, grads = sparse.value_and_grad(_loss)(model, ids, labels)
        opt.update(model, grads)
        return loss

    emb = torch.nn.Embedding(V, D, max_norm=1.5, sparse=True)
    lin = torch.nn.Linear(D, D)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(table0.copy()))
        lin.weight.copy_(torch.from_numpy(kernel0.T.copy()))
        lin.bias.copy_(torch.from_numpy(bias0))
    t_table, t_dense = theirs(emb.parameters()), torch.optim.SGD(lin.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    for _ in range(4):
        ids, labels = rng.integers(0, V, (3, 5)), rng.integers(0, V, (3, 5))
        loss = step(model, opt, jnp.asarray(ids), jnp.asarray(labels))
        t_table.zero_grad()
        t_dense.zero_grad()
        logits = torch.tanh(lin(emb(torch.from_numpy(ids)))) @ emb.weight.T
        t_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), torch.from_numpy(labels).reshape(-1)
        )
        t_loss.backward()
        assert not emb.weight.grad.is_sparse  # torch's gradient became dense too
        t_table.step()
        t_dense.step()
        np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(model.embed.weight[...], emb.weight.detach(), atol=1e-5)
    np.testing.assert_allclose(model.hidden.kernel[...], lin.weight.detach().T, atol=1e-5)


def test_lazy_adam_refuses_the_dense_gradient_naming_the_table():
    model = TiedLM(rngs=nnx.Rngs(0))
    opt = sparse.Optimizer(model, optax.adam(0.1), sparse.lazy_adam(0.1))
    before = jax.tree.map(np.asarray, nnx.state(model))
    _, grads = sparse.value_and_grad(_loss)(model, jnp.array([[1, 2]]), jnp.array([[2, 3]]))
    with pytest.raises(ValueError, match=r"'embed/weight' was read outside a lookup.*SparseAdam"):
        opt.update(model, grads)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # nothing changed
    # torch refuses the same
    emb = torch.nn.Embedding(V, D, sparse=True)
    (emb(torch.tensor([1])) @ emb.weight.T).sum().backward()
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
        torch.optim.SparseAdam(emb.parameters()).step()


class Mixed(nnx.Module):
    def __init__(self, max_norm, rngs):
        self.a = jaxembed.Embedding(V, D, max_norm=max_norm, sparse=True, rngs=rngs)
        self.b = jaxembed.Embedding(V + 3, D, padding_idx=0, sparse=True, rngs=rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)


@given(
    lookups=st.lists(st.sampled_from(["a", "b"]), min_size=0, max_size=3),
    reads=st.lists(st.sampled_from(["attend_a", "l2_a", "l2_b", "row_b"]), max_size=2),
    max_norm=st.sampled_from([None, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_any_mix_of_lookups_and_reads_equals_the_dense_gradient(lookups, reads, max_norm, seed):
    model = Mixed(max_norm, nnx.Rngs(seed % 7))
    rng = np.random.default_rng(seed)
    ids = {k: jnp.asarray(rng.integers(0, V, (2, 3))) for k in ("a", "b")}

    def loss(m):
        total = jnp.float32(0.0)
        h = jnp.zeros((2, 3, D))
        for k in lookups:
            h = h + getattr(m, k)(ids[k])
        total = total + m.head(jnp.sin(h)).sum()
        for r in reads:
            if r == "attend_a":
                total = total + jnp.cos(m.a.attend(h)).sum()
            elif r.startswith("l2_"):
                total = total + 0.1 * jnp.sum(getattr(m, r[-1]).weight[...] ** 2)
            else:
                total = total + m.b.weight[...][4].sum()
        return total

    _, grads = sparse.value_and_grad(loss)(model)
    ref = nnx.grad(loss)(model)
    for name, rows in (("a", V), ("b", V + 3)):
        want = ref[name]["weight"][...]
        np.testing.assert_allclose(_whole(grads, f"{name}/weight", (rows, D)), want, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads.dense["head"], ref["head"]
    )
