"""The index policy: IndexError eagerly, NaN / no gradient / no write under jit, checkify loud."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxembed

V, D = 6, 3


@pytest.fixture
def params():
    return jaxembed.init(jax.random.key(0), V, D)


@pytest.mark.parametrize("bad", [-1, -V, V, V + 100])
@pytest.mark.parametrize("max_norm", [None, 1.0])
@pytest.mark.parametrize("as_", ["jax", "numpy", "list"])
def test_eager_out_of_range_raises_index_error(params, bad, max_norm, as_):
    idx = [[0, 1], [bad, 2]]
    idx = {"jax": jnp.array, "numpy": np.array, "list": lambda x: x}[as_](idx)
    before = np.asarray(params["weight"]).copy()
    with pytest.raises(IndexError, match=f"holds {bad}"):
        jaxembed.embedding(params, idx, max_norm=max_norm)
    with pytest.raises(IndexError):
        jaxembed.renorm(params, idx, max_norm=0.1)
    # nothing was rewritten: the rows before the bad one included (torch's kernel does rewrite them)
    np.testing.assert_array_equal(params["weight"], before)


def test_negative_indices_never_wrap(params):
    with pytest.raises(IndexError, match="do not wrap"):
        jaxembed.embedding(params, np.array([-1]))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_jit_out_of_range_is_nan_no_grad_no_write(params, padding_idx, scale_grad_by_freq):
    weight = params["weight"] * 5  # every row over max_norm

    @jax.jit
    def step(w, idx):
        def loss(w):
            out, new = jaxembed.embedding(
                {"weight": w},
                idx,
                padding_idx=padding_idx,
                max_norm=1.0,
                scale_grad_by_freq=scale_grad_by_freq,
            )
            return jnp.nansum(out), (out, new["weight"])

        return jax.grad(loss, has_aux=True)(w)

    idx = jnp.array([1, -1, V, 2, 1, -V - 3, 2**30])
    grad, (out, new_w) = step(weight, idx)
    weight, new_w = np.asarray(weight), np.asarray(new_w)
    valid = np.array([True, False, False, True, True, False, False])
    assert np.isnan(out[~valid]).all()
    assert not np.isnan(out[valid]).any()
    # only rows 1 and 2 were renormed; the rows that wrapped negatives would hit stay untouched
    np.testing.assert_array_equal(new_w[[0, 3, 4, 5]], weight[[0, 3, 4, 5]])
    np.testing.assert_allclose(np.linalg.norm(new_w[[1, 2]], axis=1), 1.0, rtol=1e-6)
    # the gradient goes to the valid rows only
    expected = np.zeros((V, D), np.float32)
    if scale_grad_by_freq:
        expected[[1, 2]] = 1.0
    else:
        expected[1], expected[2] = 2.0, 1.0
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("bad", [-1, V, -V])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_checkify_reports_out_of_range(params, bad, max_norm):
    def f(p, idx):
        return jaxembed.embedding(p, idx, max_norm=max_norm)[0]

    checked = jax.jit(checkify.checkify(f, errors=checkify.index_checks))
    err, _ = checked(params, jnp.array([0, bad]))
    assert err.get() is not None and "out-of-bounds" in err.get()
    err, _ = checked(params, jnp.array([0, V - 1]))
    assert err.get() is None


def test_unsigned_indices_that_overflow_int32_are_out_of_range(params):
    idx = jnp.array([1, 2**31 + 1], dtype=jnp.uint32)
    out, _ = jax.jit(jaxembed.embedding)(params, idx)
    assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()
    with pytest.raises(IndexError):
        jaxembed.embedding(params, np.array([2**31 + 1], np.uint32))
