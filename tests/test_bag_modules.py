"""The EmbeddingBag modules: equal to ``embedding_bag``, and trained like torch's."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxembed
import jaxembed.linen

V, D = 12, 4
IDX = jnp.array([1, 2, 2, 10, 11, 3, 3, 0])
OFF = jnp.array([0, 3, 3, 6])


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize(
    ("param_dtype", "dtype"), [(jnp.float32, None), (jnp.bfloat16, jnp.float32)]
)
def test_modules_equal_core_bit_for_bit(mode, param_dtype, dtype):
    opts = dict(padding_idx=-1, max_norm=1.0)
    nnx_bag = jaxembed.EmbeddingBag(
        V, D, mode=mode, **opts, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(1)
    )
    params = {"weight": nnx_bag.weight[...]}
    np.testing.assert_array_equal(params["weight"][V - 1], 0)
    model = jaxembed.linen.EmbeddingBag(
        V, D, mode=mode, **opts, dtype=dtype, param_dtype=param_dtype
    )
    variables = {"params": {"weight": params["weight"]}}
    out = nnx.jit(lambda m, i, o: m(i, o))(nnx_bag, IDX, OFF)
    lout, upd = jax.jit(lambda v, i, o: model.apply(v, i, o, mutable=["params"]))(
        variables, IDX, OFF
    )
    ref, new = jaxembed.embedding_bag(params, IDX, OFF, mode=mode, **opts)
    expected = ref.astype(dtype or param_dtype)
    chex.assert_trees_all_equal(out, expected)
    chex.assert_trees_all_equal(lout, expected)
    chex.assert_trees_all_equal(nnx_bag.weight[...], new["weight"])
    chex.assert_trees_all_equal(upd["params"]["weight"], new["weight"])


def _batches():
    rng = np.random.default_rng(7)
    out = []
    for _ in range(8):
        idx = rng.integers(0, V, size=10)
        off = np.sort(rng.integers(0, 10, size=4))
        off[0] = 0
        psw = rng.normal(size=10).astype(np.float32)
        out.append((idx, off, psw, rng.normal(size=(4, D)).astype(np.float32)))
    return out


@pytest.mark.parametrize(
    "opts",
    [
        dict(mode="sum", padding_idx=3, max_norm=1.0, psw=True),
        dict(mode="mean", padding_idx=-2, max_norm=0.8, norm_type=1.0),
        dict(mode="max", max_norm=1.2),
    ],
    ids=["sum-psw", "mean", "max"],
)
def test_nnx_bag_training_matches_torch(opts):
    opts = dict(opts)
    use_psw = opts.pop("psw", False)
    bag = jaxembed.EmbeddingBag(
        V, D, **opts, embedding_init=jax.nn.initializers.normal(2.0), rngs=nnx.Rngs(0)
    )
    start = np.asarray(bag.weight[...]).copy()
    optimizer = nnx.Optimizer(bag, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, idx, off, psw, target):
        def loss_fn(m):
            return jnp.mean((m(idx, off, psw) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [
        float(step(bag, optimizer, i, o, p if use_psw else None, t)) for i, o, p, t in _batches()
    ]

    tbag = torch.nn.EmbeddingBag.from_pretrained(torch.tensor(start), freeze=False, **opts)
    topt = torch.optim.Adam(tbag.parameters(), lr=0.05)
    ref_losses = []
    for i, o, p, t in _batches():
        topt.zero_grad()
        out = tbag(
            torch.from_numpy(i), torch.from_numpy(o), torch.from_numpy(p) if use_psw else None
        )
        loss = ((out - torch.from_numpy(t)) ** 2).mean()
        loss.backward()
        topt.step()
        ref_losses.append(loss.item())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bag.weight[...], tbag.weight.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_from_pretrained_bag():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)) * 3, jnp.float32)
    bag = jaxembed.EmbeddingBag.from_pretrained(table, mode="sum", padding_idx=0, max_norm=1.0)
    assert isinstance(bag.weight, jaxembed.FrozenWeight)
    np.testing.assert_array_equal(bag.weight[...][0], table[0])
    out = bag(jnp.array([[0, 1], [2, 2]]))
    np.testing.assert_allclose(np.linalg.norm(out[0]), 1.0, rtol=1e-5)  # the padding entry left out
    assert jax.tree.leaves(nnx.state(bag, nnx.Param)) == []
    trainable = jaxembed.EmbeddingBag.from_pretrained(table, freeze=False, include_last_offset=True)
    assert isinstance(trainable.weight, nnx.Param)
    out = trainable(jnp.array([1, 2, 3]), jnp.array([0, 1, 3]))
    np.testing.assert_allclose(out[1], table[2:4].mean(0), rtol=1e-6)  # indices[1:3]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(mode="median"), "mode"),
        (dict(mode="max", scale_grad_by_freq=True), "scale_grad_by_freq"),
        (dict(padding_idx=V), "padding_idx"),
        (dict(max_norm=0.0), "max_norm"),
    ],
)
def test_bag_modules_bad_configuration(kw, match):
    with pytest.raises(ValueError, match=match):
        jaxembed.EmbeddingBag(V, D, **kw, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        jaxembed.linen.EmbeddingBag(V, D, **kw)


def test_linen_bag_immutable_warns():
    model = jaxembed.linen.EmbeddingBag(V, D, mode="sum", max_norm=0.5)
    variables = model.init(jax.random.key(0), jnp.array([[0]]))
    with pytest.warns(UserWarning, match="EmbeddingBag"):
        model.apply(variables, jnp.array([[1, 2]]))


def test_bag_module_no_retrace_when_offsets_change():
    traces = []
    bag = jaxembed.EmbeddingBag(V, D, mode="mean", max_norm=1.0, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(m, i, o):
        traces.append(None)
        return m(i, o)

    f(bag, IDX, OFF)
    f(bag, IDX, jnp.array([0, 1, 5, 7]))
    assert len(traces) == 1
