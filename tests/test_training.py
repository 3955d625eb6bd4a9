"""Multi-step training: jaxembed + optax reproduces a torch nn.Embedding training run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxembed

V, D, STEPS = 20, 6, 12


def _batches(seed):
    rng = np.random.default_rng(seed)
    goal = (rng.normal(size=(V, D)) * 0.1).astype(np.float32)  # a fixed table to learn
    idx = [rng.integers(0, V, size=(4, 5)) for _ in range(STEPS)]
    return idx, [goal[i] for i in idx]


def _torch_run(weight, opt_name, kw):
    emb = torch.nn.Embedding.from_pretrained(torch.tensor(weight), freeze=False, **kw)
    opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    }[opt_name](emb.parameters())
    losses = []
    for idx, target in zip(*_batches(1), strict=True):
        opt.zero_grad()
        out = emb(torch.from_numpy(idx))
        loss = ((out - torch.from_numpy(target)) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return emb.weight.detach().numpy(), np.array(losses)


def _jax_run(weight, opt_name, kw):
    tx = {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(0.05)}[opt_name]
    params = {"weight": jnp.asarray(weight)}
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, idx, target):
        def loss_fn(p):
            out, new_params = jaxembed.embedding(p, idx, **kw)
            return jnp.mean((out - target) ** 2), new_params

        (loss, new_params), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # gradients at the pre-step table; the update applies to the renormed one
        updates, opt_state = tx.update(grads, opt_state, new_params)
        return optax.apply_updates(new_params, updates), opt_state, loss

    losses = []
    for idx, target in zip(*_batches(1), strict=True):
        params, opt_state, loss = step(params, opt_state, idx, target)
        losses.append(float(loss))
    return np.asarray(params["weight"]), np.array(losses)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(padding_idx=3, max_norm=1.0),
        dict(padding_idx=-2, max_norm=0.5, norm_type=1.0, scale_grad_by_freq=True),
        dict(max_norm=0.8, norm_type=float("inf")),
        dict(padding_idx=0),
    ],
    ids=["pad-mn", "negpad-l1-freq", "inf", "pad-only"],
)
def test_training_run_matches_torch(opt_name, kw):
    weight = (np.random.default_rng(0).normal(size=(V, D)) * 2).astype(np.float32)
    if kw.get("padding_idx") is not None:
        weight[kw["padding_idx"]] = 0.0
    ref_w, ref_losses = _torch_run(weight, opt_name, kw)
    w, losses = _jax_run(weight, opt_name, kw)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-5)
    if kw.get("padding_idx") is not None:
        np.testing.assert_array_equal(w[kw["padding_idx"]], 0.0)  # never moved
    assert losses[-1] < losses[0]
