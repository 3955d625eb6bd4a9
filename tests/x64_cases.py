"""float64 tables against torch float64: run with x64 on, in their own process.

tests/test_fuzz.py::test_float64_under_x64 runs this file with JAX_ENABLE_X64=1 (x64 has to be on
before JAX starts, so it cannot share the main test process).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given

import jaxembed
from tests.test_fuzz import bag_cases, embedding_cases
from tests.torch_ref import torch_embedding, torch_embedding_bag


def test_x64_is_on():
    assert jax.config.jax_enable_x64


@given(embedding_cases())
def test_float64_embedding_matches_torch(case):
    weight, indices, cot, kw = case
    if weight.shape[1] == 0 and kw["max_norm"] is not None and np.isinf(kw["norm_type"]):
        kw = {**kw, "norm_type": 2.0}
    weight, cot = weight.astype(np.float64) * 1.1, cot.astype(np.float64)
    ref = torch_embedding(weight, indices.astype(np.int64), cot, **kw)

    def loss(params):
        out, new = jaxembed.embedding(params, jnp.asarray(indices, jnp.int64), **kw)
        return jnp.sum(out * cot), (out, new)

    grads, (out, new) = jax.jit(jax.grad(loss, has_aux=True))({"weight": jnp.asarray(weight)})
    assert out.dtype == new["weight"].dtype == jnp.float64
    np.testing.assert_allclose(out, ref.out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(new["weight"], ref.table, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["weight"], ref.grad, rtol=1e-12, atol=1e-13)


@given(bag_cases())
def test_float64_embedding_bag_matches_torch(case):
    weight, indices, offsets, cot, psw, kw = case
    weight, cot = weight.astype(np.float64), cot.astype(np.float64)
    psw = None if psw is None else psw.astype(np.float64)
    ref = torch_embedding_bag(
        weight,
        indices,
        offsets,
        cot,
        per_sample_weights=psw,
        composed=kw["scale_grad_by_freq"],
        **kw,
    )

    def loss(params):
        out, new = jaxembed.embedding_bag(params, indices, offsets, per_sample_weights=psw, **kw)
        return jnp.sum(out * cot), (out, new)

    grads, (out, new) = jax.grad(loss, has_aux=True)({"weight": jnp.asarray(weight)})
    np.testing.assert_allclose(out, ref.out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new["weight"], ref.table, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["weight"], ref.grad, rtol=1e-12, atol=1e-12)


def test_scale_grad_by_freq_one_third_in_float64():
    """Found by the fuzzer: 1/count was computed in float32, so a row looked up three times got
    a float64 gradient off by 3e-8 (relative)."""
    weight = np.array([[0.18859532]])
    g = jax.grad(
        lambda p: jaxembed.embedding(p, jnp.array([0, 0, 0]), scale_grad_by_freq=True)[0].sum()
    )({"weight": jnp.asarray(weight)})["weight"]
    assert float(g[0, 0]) == 1.0  # 3 * (1/3) in float64
    g = jax.grad(
        lambda p: jaxembed.embedding_bag(
            p, jnp.array([[0, 0, 0]]), mode="mean", scale_grad_by_freq=True
        )[0].sum()
    )({"weight": jnp.asarray(weight)})["weight"]
    assert float(g[0, 0]) == 3 * (1 / 3) * (1 / 3)
