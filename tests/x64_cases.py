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
from tests.test_fuzz import bag_cases, check_bag_case, check_embedding_case, embedding_cases


def test_x64_is_on():
    assert jax.config.jax_enable_x64


@given(embedding_cases())
def test_float64_embedding_matches_torch(case):
    check_embedding_case(case, np.float64, rtol=1e-12, atol=1e-13)


@given(bag_cases())
def test_float64_embedding_bag_matches_torch(case):
    check_bag_case(case, np.float64, rtol=1e-12, atol=1e-12)


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
