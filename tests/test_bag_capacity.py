"""Variable-length bags at a fixed capacity: ``num_valid`` and ``pad_bags``, as a real data loader
(the torchtext ``collate_batch`` layout: flat ids + offsets) feeds them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jaxembed
from jaxembed.core import _bag

V, D = 20, 3


def _batch(rng, num_bags=4, longest=7):
    return [list(rng.integers(0, V, rng.integers(0, longest + 1))) for _ in range(num_bags)]


def _flat(bags):
    ids = np.array([i for b in bags for i in b], np.int64)
    offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).astype(np.int64)
    return ids, offsets


OPTIONS = [
    dict(mode="sum"),
    dict(mode="sum", psw=True, padding_idx=2),
    dict(mode="mean", max_norm=1.0),
    dict(mode="mean", padding_idx=2, max_norm=0.8, norm_type=1.0),
    dict(mode="max", max_norm=1.0),
    dict(mode="max", padding_idx=2),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("seed", range(3))
def test_padded_bags_equal_torch_on_the_unpadded_batch(opts, seed):
    opts = dict(opts)
    psw = opts.pop("psw", False)
    rng = np.random.default_rng(seed)
    bags = _batch(rng)
    weight = rng.normal(size=(V, D)).astype(np.float32)
    ids, offsets, n = jaxembed.pad_bags(bags)
    w_psw = rng.normal(size=ids.shape).astype(np.float32)

    @jax.jit
    def run(params, psw_values, n):
        def loss(p, s):
            out, new = jaxembed.embedding_bag(
                p, ids, offsets, num_valid=n, per_sample_weights=s if psw else None, **opts
            )
            return jnp.sum(out * jnp.arange(1.0, D + 1)), (out, new)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)({"weight": params}, psw_values)

    (g_w, g_psw), (out, new) = run(jnp.asarray(weight), jnp.asarray(w_psw), n)

    t_ids, t_off = _flat(bags)
    tw = torch.tensor(weight, requires_grad=True)
    tpsw = torch.tensor(w_psw[: len(t_ids)], requires_grad=True) if psw else None
    torch_opts = {k: v for k, v in opts.items()}
    t_out = F.embedding_bag(
        torch.from_numpy(t_ids), tw, torch.from_numpy(t_off), per_sample_weights=tpsw, **torch_opts
    )
    (t_out * torch.arange(1.0, D + 1)).sum().backward()
    np.testing.assert_allclose(out, t_out.detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["weight"], tw.detach(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_w["weight"], tw.grad, rtol=1e-5, atol=1e-6)
    if psw:
        np.testing.assert_allclose(g_psw[: len(t_ids)], tpsw.grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(g_psw[len(t_ids) :], 0)  # the padding gets nothing


def test_scale_grad_by_freq_counts_only_the_real_ids():
    rng = np.random.default_rng(5)
    bags = [[1, 1, 4], [4, 0], []]
    weight = jnp.asarray(rng.normal(size=(V, D)).astype(np.float32))
    ids, offsets, n = jaxembed.pad_bags(bags)  # the padding is id 0: it must not add to 0's count
    t_ids, t_off = _flat(bags)

    def grad(ids, offsets, **kw):
        def loss(p):
            return jaxembed.embedding_bag(
                p, ids, offsets, mode="sum", scale_grad_by_freq=True, **kw
            )[0].sum()

        return jax.grad(loss)({"weight": weight})["weight"]

    np.testing.assert_allclose(grad(ids, offsets, num_valid=n), grad(t_ids, t_off), rtol=1e-6)


def test_a_data_loader_compiles_a_handful_of_times_and_trains_like_torch():
    """50 batches of 8 texts with 1-12 tokens each, as torchtext's collate_batch makes them."""
    rng = np.random.default_rng(0)
    batches = [
        ([list(rng.integers(0, V, rng.integers(1, 13))) for _ in range(8)], rng.integers(0, 2, 8))
        for _ in range(50)
    ]

    class Classifier(nnx.Module):
        def __init__(self):
            self.bag = jaxembed.EmbeddingBag(V, D, mode="mean", rngs=nnx.Rngs(0))
            self.fc = nnx.Linear(D, 2, rngs=nnx.Rngs(1))

        def __call__(self, ids, offsets, n):
            return self.fc(self.bag(ids, offsets, num_valid=n))

    model = Classifier()
    t_bag = torch.nn.EmbeddingBag(V, D, mode="mean")
    t_fc = torch.nn.Linear(D, 2)
    with torch.no_grad():
        t_bag.weight.copy_(torch.from_numpy(np.asarray(model.bag.weight[...]).copy()))
        t_fc.weight.copy_(torch.from_numpy(np.asarray(model.fc.kernel[...]).T.copy()))
        t_fc.bias.copy_(torch.from_numpy(np.asarray(model.fc.bias[...]).copy()))
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    t_opt = torch.optim.SGD([*t_bag.parameters(), *t_fc.parameters()], lr=0.5)

    traces = []

    @nnx.jit
    def step(model, opt, ids, offsets, n, labels):
        traces.append(ids.shape)  # runs once per compile

        def loss_fn(model):
            logits = model(ids, offsets, n)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    capacities = set()
    for bags, labels in batches:
        ids, offsets, n = jaxembed.pad_bags(bags)
        capacities.add(ids.shape[0])
        loss = step(model, opt, ids, offsets, n, labels)
        t_ids, t_off = _flat(bags)
        t_opt.zero_grad()
        t_loss = F.cross_entropy(
            t_fc(t_bag(torch.from_numpy(t_ids), torch.from_numpy(t_off))), torch.from_numpy(labels)
        )
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)
    assert len({len([i for b in bags for i in b]) for bags, _ in batches}) > 20  # lengths vary
    assert len(traces) == len(capacities) <= 3
    np.testing.assert_allclose(model.bag.weight[...], t_bag.weight.detach(), atol=1e-5)


def test_new_num_valid_never_retraces():
    params = {"weight": jnp.ones((V, D))}
    ids, offsets, _ = jaxembed.pad_bags([[1, 2], [3]], capacity=8)
    jaxembed.embedding_bag(params, ids, offsets, mode="sum", num_valid=3)
    size = _bag._embedding_bag._cache_size()
    for n in (0, 1, 2, 3):
        offsets = np.array([0, min(2, n)], np.int32)
        out, _ = jaxembed.embedding_bag(params, ids, offsets, mode="sum", num_valid=n)
        assert out.shape == (2, D)
    assert _bag._embedding_bag._cache_size() == size


def test_include_last_offset_ends_at_num_valid():
    params = {"weight": jnp.arange(float(V))[:, None]}
    ids = np.array([1, 2, 3, 0, 0, 0])
    out, _ = jaxembed.embedding_bag(
        params, ids, np.array([0, 2, 3]), mode="sum", include_last_offset=True, num_valid=3
    )
    np.testing.assert_array_equal(out[:, 0], [3.0, 3.0])


def test_pad_bags():
    ids, offsets, n = jaxembed.pad_bags([[5, 6], [], [7, 8, 9]], num_bags=5)
    assert ids.shape == (16,) and n == 5
    np.testing.assert_array_equal(ids[:5], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(offsets, [0, 2, 2, 5, 5])
    assert jaxembed.pad_bags([list(range(17))])[0].shape == (32,)
    assert jaxembed.pad_bags([], num_bags=2)[1].tolist() == [0, 0]
    with pytest.raises(ValueError, match="num_bags"):
        jaxembed.pad_bags([[1], [2]], num_bags=1)
    with pytest.raises(ValueError, match="capacity"):
        jaxembed.pad_bags([[1, 2, 3]], capacity=2)


def test_bad_num_valid():
    params = {"weight": jnp.ones((V, D))}
    with pytest.raises(ValueError, match="num_valid is for 1-D"):
        jaxembed.embedding_bag(params, np.zeros((2, 3), np.int32), num_valid=2)
    with pytest.raises(ValueError, match="num_valid must be within"):
        jaxembed.embedding_bag(params, np.zeros(4, np.int32), np.array([0]), num_valid=5)
    with pytest.raises(ValueError, match="num_valid must be a scalar"):
        jaxembed.embedding_bag(params, np.zeros(4, np.int32), np.array([0]), num_valid=[1, 2])
    with pytest.raises(TypeError, match="num_valid"):
        jaxembed.embedding_bag(params, np.zeros(4, np.int32), np.array([0]), num_valid=1.5)
    with pytest.raises(ValueError, match="past the end"):
        jaxembed.embedding_bag(params, np.zeros(4, np.int32), np.array([0, 3]), num_valid=2)
