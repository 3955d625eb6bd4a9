"""``jaxembed.Embed``: swapping Flax's ``nnx.Embed`` out of an existing model changes nothing."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed

V, D = 16, 8


class TinyLM(nnx.Module):
    """A Flax decoder-style LM with a tied head, written against nnx.Embed's API."""

    def __init__(self, embed_cls, *, dtype=None, rngs):
        self.embed = embed_cls(V, D, dtype=dtype, rngs=rngs)
        self.mix = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        h = jnp.tanh(self.mix(self.embed(ids)))
        return self.embed.attend(h)  # logits over the vocabulary


def _loss(model, ids, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(ids), labels).mean()


def _state_paths(model):
    return sorted(path for path, _ in nnx.to_flat_state(nnx.state(model)))


@pytest.mark.parametrize("dtype", [None, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_a_flax_model_with_embed_swapped_is_identical(dtype):
    flax_model = TinyLM(nnx.Embed, dtype=dtype, rngs=nnx.Rngs(0))
    ours = TinyLM(jaxembed.Embed, dtype=dtype, rngs=nnx.Rngs(0))
    assert _state_paths(ours) == _state_paths(flax_model)  # checkpoints load either way
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(flax_model))
    ids = jnp.array([[1, 5, 9, 15], [0, 0, 3, 2]])
    labels = jnp.array([[5, 9, 15, 1], [0, 3, 2, 7]])
    np.testing.assert_array_equal(ours(ids), flax_model(ids))
    g_ours, g_flax = nnx.grad(_loss)(ours, ids, labels), nnx.grad(_loss)(flax_model, ids, labels)
    jax.tree.map(np.testing.assert_array_equal, g_ours, g_flax)

    opts = [nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param) for m in (ours, flax_model)]

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(_loss)(model, ids, labels)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        assert step(ours, opts[0]) == step(flax_model, opts[1])
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(flax_model))


def test_the_default_init_is_flax_s_not_torch_s():
    table = jaxembed.Embed(2000, 64, rngs=nnx.Rngs(0)).embedding[...]
    assert abs(float(jnp.std(table)) - 1 / np.sqrt(64)) < 0.01  # N(0, 1/D), not torch's N(0, 1)
    default = inspect.signature(jaxembed.Embed).parameters["embedding_init"].default
    assert repr(default) == "variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)"


def test_state_moves_between_the_two_and_the_torch_options_apply():
    flax_embed = nnx.Embed(V, D, rngs=nnx.Rngs(3))
    ours = jaxembed.Embed(V, D, max_norm=1.0, padding_idx=0, rngs=nnx.Rngs(9))
    nnx.update(ours, nnx.state(flax_embed))  # the same paths: the state loads as it is
    np.testing.assert_array_equal(ours.embedding[...], flax_embed.embedding[...])
    ours(jnp.array([1, 2]))  # max_norm renorms the looked-up rows in place, as torch does
    norms = jnp.linalg.norm(ours.embedding[...][jnp.array([1, 2])], axis=-1)
    assert bool(jnp.all(norms <= 1.0 + 1e-6))

    converted = jaxembed.Embed.from_flax(flax_embed, scale_grad_by_freq=True)
    np.testing.assert_array_equal(converted.embedding[...], flax_embed.embedding[...])
    assert converted.scale_grad_by_freq and isinstance(converted.embedding, nnx.Param)
    back = converted.to_flax()
    assert isinstance(back, nnx.Embed)
    np.testing.assert_array_equal(back.embedding[...], flax_embed.embedding[...])
    with pytest.raises(TypeError, match=r"nnx\.Embed"):
        jaxembed.Embed.from_flax(jaxembed.Embed(V, D, rngs=nnx.Rngs(0)))


def test_out_sharding_on_call_and_attend():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    ours = jaxembed.Embed(V, D, rngs=nnx.Rngs(0))
    flax_embed = nnx.Embed(V, D, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 2], [3, 4]])
    with jax.set_mesh(mesh):
        spec = jax.sharding.PartitionSpec("data")
        out = ours(ids, out_sharding=spec)
        ref = flax_embed(ids, out_sharding=spec)
        np.testing.assert_array_equal(out, ref)
        assert out.sharding.spec == ref.sharding.spec
        logits = ours.attend(out, out_sharding=spec)
        np.testing.assert_array_equal(logits, flax_embed.attend(ref, out_sharding=spec))


def test_embed_trains_sparsely_with_the_tied_head():
    model = TinyLM(lambda *a, **k: jaxembed.Embed(*a, sparse=True, **k), rngs=nnx.Rngs(0))
    ids, labels = jnp.array([[1, 5]]), jnp.array([[5, 9]])
    _, grads = jaxembed.sparse.value_and_grad(_loss)(model, ids, labels)
    assert set(grads.sparse) == set(grads.tables) == {"embed/embedding"}
