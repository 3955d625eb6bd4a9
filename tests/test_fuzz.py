"""Property-based comparison with torch over random configurations (hypothesis).

Quick by default; `python -m pytest tests/test_fuzz.py --hypothesis-profile=deep` runs 2,000
examples per property.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxembed
from tests.torch_ref import torch_embedding, torch_embedding_bag

NORM_TYPES = st.one_of(
    st.sampled_from([1.0, 2.0, 3.0, math.inf]), st.floats(0.25, 4.0, allow_nan=False)
)


@st.composite
def embedding_cases(draw):
    v = draw(st.integers(1, 12))
    d = draw(st.integers(0, 6))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    weight = (rng.normal(size=(v, d)) * draw(st.sampled_from([0.3, 1.0, 3.0]))).astype(np.float32)
    indices = rng.integers(0, v, size=shape)
    kw = dict(
        padding_idx=draw(st.one_of(st.none(), st.integers(-v, v - 1))),
        max_norm=draw(st.one_of(st.none(), st.floats(0.1, 3.0))),
        norm_type=draw(NORM_TYPES),
        scale_grad_by_freq=draw(st.booleans()),
    )
    cot = rng.normal(size=shape + (d,)).astype(np.float32)
    return weight, indices, cot, kw


@given(embedding_cases())
def test_embedding_matches_torch(case):
    weight, indices, cot, kw = case
    if weight.shape[1] == 0 and kw["max_norm"] is not None and math.isinf(kw["norm_type"]):
        # torch raises here (an inf norm of an empty row has no identity); a zero-width row has
        # norm 0 and nothing to renorm: see test_zero_width_inf_norm below
        kw = {**kw, "norm_type": 2.0}
    ref = torch_embedding(weight, indices, cot, **kw)

    def loss(params):
        out, new = jaxembed.embedding(params, indices, **kw)
        return jnp.sum(out * cot), (out, new)

    grads, (out, new) = jax.grad(loss, has_aux=True)({"weight": jnp.asarray(weight)})
    np.testing.assert_allclose(out, ref.out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["weight"], ref.table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["weight"], ref.grad, rtol=1e-5, atol=1e-6)


@st.composite
def bag_cases(draw):
    v = draw(st.integers(1, 10))
    d = draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    weight = (rng.normal(size=(v, d)) * 1.5).astype(np.float32)
    layout = draw(st.sampled_from(["2d", "offsets", "csr"]))
    if layout == "2d":
        indices = rng.integers(0, v, size=(draw(st.integers(0, 4)), draw(st.integers(1, 4))))
        offsets = None
        num_bags = indices.shape[0]
    else:
        sizes = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))
        indices = rng.integers(0, v, size=sum(sizes))
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        if layout == "csr":
            offsets = np.append(offsets, len(indices))
        num_bags = len(sizes)
    kw = dict(
        mode=mode,
        padding_idx=draw(st.one_of(st.none(), st.integers(-v, v - 1))),
        max_norm=draw(st.one_of(st.none(), st.floats(0.2, 3.0))),
        norm_type=draw(NORM_TYPES),
        scale_grad_by_freq=mode != "max" and draw(st.booleans()),
        include_last_offset=layout == "csr",
    )
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = rng.normal(size=indices.shape).astype(np.float32)
    cot = rng.normal(size=(num_bags, d)).astype(np.float32)
    return weight, indices, offsets, cot, psw, kw


@given(bag_cases())
def test_embedding_bag_matches_torch(case):
    weight, indices, offsets, cot, psw, kw = case
    # torch's bag kernel mis-scales scale_grad_by_freq: the documented semantics are the oracle
    ref = torch_embedding_bag(
        weight,
        indices,
        offsets,
        cot,
        per_sample_weights=psw,
        composed=kw["scale_grad_by_freq"],
        **kw,
    )

    def loss(params, p):
        out, new = jaxembed.embedding_bag(params, indices, offsets, per_sample_weights=p, **kw)
        return jnp.sum(out * cot), (out, new)

    argnums = (0, 1) if psw is not None else 0
    grads, (out, new) = jax.grad(loss, argnums=argnums, has_aux=True)(
        {"weight": jnp.asarray(weight)}, None if psw is None else jnp.asarray(psw)
    )
    if psw is None:
        grads = (grads, None)
    np.testing.assert_allclose(out, ref.out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["weight"], ref.table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[0]["weight"], ref.grad, rtol=1e-5, atol=1e-5)
    if psw is not None:
        np.testing.assert_allclose(grads[1], ref.psw_grad, rtol=1e-5, atol=1e-5)


def test_zero_width_inf_norm():
    """Found by the fuzzer: torch raises for max_norm with norm_type=inf on a zero-width table;
    jaxembed returns the empty result (a zero-width row has norm 0, under any max_norm)."""
    params = {"weight": jnp.zeros((3, 0))}
    out, new = jaxembed.embedding(params, jnp.array(0), max_norm=1.0, norm_type=math.inf)
    assert out.shape == (0,) and new["weight"].shape == (3, 0)
    bags, _ = jaxembed.embedding_bag(params, jnp.array([[0, 1]]), max_norm=1.0, norm_type=math.inf)
    assert bags.shape == (1, 0)
