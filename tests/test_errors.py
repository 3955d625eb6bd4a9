"""Bad input: a clear error naming the argument, before anything is computed."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed


@pytest.fixture
def params():
    return jaxembed.init(jax.random.key(0), 6, 3)


@pytest.mark.parametrize(
    "indices",
    [
        np.array([0.0, 1.0]),
        jnp.array([0.0]),
        np.array([True, False]),
        jnp.array([1 + 0j]),
        [0.5],
    ],
    ids=["np-float", "jax-float", "bool", "complex", "list-float"],
)
def test_non_integer_indices_raise_type_error(params, indices):
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        jaxembed.embedding(params, indices)
    with pytest.raises(TypeError, match="indices"):
        jaxembed.renorm(params, indices, max_norm=1.0)


def test_non_integer_indices_raise_under_jit(params):
    with pytest.raises(TypeError, match="integer dtype"):
        jax.jit(jaxembed.embedding)(params, jnp.array([0.0]))


@pytest.mark.parametrize("padding_idx", [6, -7, 100])
def test_padding_idx_out_of_range(params, padding_idx):
    with pytest.raises(ValueError, match="padding_idx"):
        jaxembed.embedding(params, jnp.array([0]), padding_idx=padding_idx)
    with pytest.raises(ValueError, match="padding_idx"):
        jaxembed.init(jax.random.key(0), 6, 3, padding_idx=padding_idx)


@pytest.mark.parametrize("padding_idx", [1.0, "1", True])
def test_padding_idx_wrong_type(params, padding_idx):
    with pytest.raises(TypeError, match="padding_idx"):
        jaxembed.embedding(params, jnp.array([0]), padding_idx=padding_idx)


@pytest.mark.parametrize("max_norm", [0, 0.0, -1.0, math.nan, -math.inf])
def test_bad_max_norm(params, max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        jaxembed.embedding(params, jnp.array([0]), max_norm=max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        jaxembed.renorm(params, jnp.array([0]), max_norm=max_norm)


def test_max_norm_wrong_type_and_renorm_requires_it(params):
    with pytest.raises(TypeError, match="max_norm"):
        jaxembed.embedding(params, jnp.array([0]), max_norm="1")
    with pytest.raises(ValueError, match="max_norm is required"):
        jaxembed.renorm(params, jnp.array([0]), max_norm=None)

    @jax.jit
    def traced(m):
        return jaxembed.embedding(params, jnp.array([0]), max_norm=m)

    with pytest.raises(TypeError, match="static"):
        traced(1.0)


def test_infinite_max_norm_never_renorms(params):
    weight = params["weight"] * 1e30
    _, new = jaxembed.embedding({"weight": weight}, jnp.array([0, 1]), max_norm=math.inf)
    np.testing.assert_array_equal(new["weight"], weight)


@pytest.mark.parametrize("norm_type", [0, -1.0, math.nan, -math.inf])
def test_bad_norm_type(params, norm_type):
    with pytest.raises(ValueError, match="norm_type"):
        jaxembed.embedding(params, jnp.array([0]), max_norm=1.0, norm_type=norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        jaxembed.renorm(params, jnp.array([0]), max_norm=1.0, norm_type=norm_type)


@pytest.mark.parametrize("shape", [(6,), (), (2, 3, 4)])
def test_weight_not_2d(shape):
    with pytest.raises(ValueError, match=r'params\["weight"\] must be 2-D'):
        jaxembed.embedding({"weight": jnp.zeros(shape)}, jnp.array([0]))


def test_weight_not_floating():
    with pytest.raises(TypeError, match="floating"):
        jaxembed.embedding({"weight": jnp.zeros((3, 2), jnp.int32)}, jnp.array([0]))


@pytest.mark.parametrize("params", [None, jnp.zeros((3, 2)), {"w": jnp.zeros((3, 2))}])
def test_params_not_a_weight_mapping(params):
    with pytest.raises(TypeError, match='"weight"'):
        jaxembed.embedding(params, jnp.array([0]))


def test_scale_grad_by_freq_must_be_bool(params):
    with pytest.raises(TypeError, match="scale_grad_by_freq"):
        jaxembed.embedding(params, jnp.array([0]), scale_grad_by_freq="yes")


@pytest.mark.parametrize(
    ("v", "d", "err", "name"),
    [
        (-1, 3, ValueError, "num_embeddings"),
        (3, -2, ValueError, "embedding_dim"),
        (3.0, 2, TypeError, "num_embeddings"),
        (3, None, TypeError, "embedding_dim"),
    ],
)
def test_init_bad_sizes(v, d, err, name):
    with pytest.raises(err, match=name):
        jaxembed.init(jax.random.key(0), v, d)


def test_init_non_floating_dtype():
    with pytest.raises(TypeError, match="dtype"):
        jaxembed.init(jax.random.key(0), 3, 2, dtype=jnp.int32)


def test_init_bad_initializer_shape():
    with pytest.raises(ValueError, match="initializer returned shape"):
        jaxembed.init(jax.random.key(0), 3, 2, initializer=lambda k, s, d: jnp.zeros((2, 2), d))
