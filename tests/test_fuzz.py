"""Property-based comparison with torch over random configurations (hypothesis).

Quick by default; `python -m pytest tests/test_fuzz.py --hypothesis-profile=deep` runs 2,000
examples per property. float32 tables against torch float32, bf16/f16 tables against torch float32
on the same values (torch's own low-precision renorm overshoots), float64 under x64 in its own
process (test_float64_under_x64), and multi-step sparse training against torch's sparse optimizers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jaxembed
from tests.torch_ref import torch_embedding, torch_embedding_bag

NORM_TYPES = st.one_of(
    st.sampled_from([1.0, 2.0, 3.0, math.inf]), st.floats(0.1, 4.0, allow_nan=False)
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


def check_embedding_case(case, dtype, rtol, atol):
    """``embedding``'s output, new table and gradient against torch's, with ``dtype`` tables
    (float32 here; float64 in tests/x64_cases.py)."""
    weight, indices, cot, kw = case
    if weight.shape[1] == 0 and kw["max_norm"] is not None and math.isinf(kw["norm_type"]):
        # torch raises here (an inf norm of an empty row has no identity); a zero-width row has
        # norm 0 and nothing to renorm: see test_zero_width_inf_norm below
        kw = {**kw, "norm_type": 2.0}
    weight, cot = weight.astype(dtype), cot.astype(dtype)
    ref = torch_embedding(weight, indices, cot, **kw)

    def loss(params):
        out, new = jaxembed.embedding(params, indices, **kw)
        return jnp.sum(out * cot), (out, new)

    grads, (out, new) = jax.grad(loss, has_aux=True)({"weight": jnp.asarray(weight)})
    assert out.dtype == new["weight"].dtype == dtype
    np.testing.assert_allclose(out, ref.out, rtol=rtol, atol=atol)
    np.testing.assert_allclose(new["weight"], ref.table, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grads["weight"], ref.grad, rtol=rtol, atol=atol)


@given(embedding_cases())
def test_embedding_matches_torch(case):
    check_embedding_case(case, np.float32, rtol=1e-5, atol=1e-6)


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


def check_bag_case(case, dtype, rtol, atol):
    """``embedding_bag``'s bags, new table, table and per-sample-weight gradients against
    torch's; the table is compared ten times tighter (it is only renormed, never summed)."""
    weight, indices, offsets, cot, psw, kw = case
    weight, cot = weight.astype(dtype), cot.astype(dtype)
    psw = None if psw is None else psw.astype(dtype)
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
    assert out.dtype == new["weight"].dtype == dtype
    np.testing.assert_allclose(out, ref.out, rtol=rtol, atol=atol)
    np.testing.assert_allclose(new["weight"], ref.table, rtol=rtol, atol=atol / 10)
    np.testing.assert_allclose(grads[0]["weight"], ref.grad, rtol=rtol, atol=atol)
    if psw is not None:
        np.testing.assert_allclose(grads[1], ref.psw_grad, rtol=rtol, atol=atol)


@given(bag_cases())
def test_embedding_bag_matches_torch(case):
    check_bag_case(case, np.float32, rtol=1e-5, atol=1e-5)


def test_zero_width_inf_norm():
    """Found by the fuzzer: torch raises for max_norm with norm_type=inf on a zero-width table;
    jaxembed returns the empty result (a zero-width row has norm 0, under any max_norm)."""
    params = {"weight": jnp.zeros((3, 0))}
    out, new = jaxembed.embedding(params, jnp.array(0), max_norm=1.0, norm_type=math.inf)
    assert out.shape == (0,) and new["weight"].shape == (3, 0)
    bags, _ = jaxembed.embedding_bag(params, jnp.array([[0, 1]]), max_norm=1.0, norm_type=math.inf)
    assert bags.shape == (1, 0)


# --- low-precision tables ---------------------------------------------------------------------

# forward values: the renorm is computed in float32 and rounded toward zero, so a row is within a
# couple of the dtype's ulps of torch's float32 result; gradients accumulate in the table's dtype
LOW_TOL = {jnp.bfloat16: 2e-2, jnp.float16: 3e-3}


@given(embedding_cases(), st.sampled_from(sorted(LOW_TOL, key=str)))
def test_low_precision_embedding_matches_torch_float32(case, dtype):
    """torch computes bf16/f16 norms in that dtype and can overshoot max_norm (its documented
    semantics are a float32 norm): the oracle is torch in float32 on the same values."""
    weight, indices, cot, kw = case
    if weight.shape[1] == 0 and kw["max_norm"] is not None and math.isinf(kw["norm_type"]):
        kw = {**kw, "norm_type": 2.0}  # see test_zero_width_inf_norm
    low = jnp.asarray(weight, dtype)
    cot_low = jnp.asarray(cot, dtype)
    ref = torch_embedding(
        np.asarray(low, np.float32), indices, np.asarray(cot_low, np.float32), **kw
    )

    def loss(params):
        out, new = jaxembed.embedding(params, indices, **kw)
        return jnp.sum(out.astype(jnp.float32) * cot_low.astype(jnp.float32)), (out, new)

    grads, (out, new) = jax.jit(jax.grad(loss, has_aux=True))({"weight": low})
    tol = LOW_TOL[dtype]
    assert out.dtype == new["weight"].dtype == grads["weight"].dtype == dtype
    for got, want in ((new["weight"], ref.table), (out, ref.out), (grads["weight"], ref.grad)):
        got = np.asarray(got, np.float32)
        np.testing.assert_allclose(
            got, want, rtol=tol, atol=tol * (1 + np.abs(want).max(initial=0))
        )
    if kw["max_norm"] is not None and weight.shape[1]:
        norms = np.linalg.norm(np.asarray(new["weight"], np.float64), ord=kw["norm_type"], axis=1)
        touched = np.unique(indices)
        assert (norms[touched] <= kw["max_norm"]).all()  # never above max_norm after rounding


# --- sparse training --------------------------------------------------------------------------

SPARSE = {
    "sgd": (
        lambda h: jaxembed.sparse.sgd(h["lr"], momentum=h["momentum"]),
        lambda p, h: torch.optim.SGD(p, lr=h["lr"], momentum=h["momentum"]),
    ),
    "adagrad": (
        lambda h: jaxembed.sparse.adagrad(h["lr"], lr_decay=h["decay"]),
        lambda p, h: torch.optim.Adagrad(p, lr=h["lr"], lr_decay=h["decay"]),
    ),
    "lazy_adam": (
        lambda h: jaxembed.sparse.lazy_adam(h["lr"], b1=h["b1"]),
        lambda p, h: torch.optim.SparseAdam(p, lr=h["lr"], betas=(h["b1"], 0.999)),
    ),
}


@st.composite
def sparse_cases(draw):
    weight, _, _, kw = draw(embedding_cases())
    v, d = weight.shape
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    steps = [
        (rng.integers(0, v, shape), rng.normal(size=shape + (d,)).astype(np.float32))
        for _ in range(draw(st.integers(1, 3)))
    ]
    hyper = dict(
        lr=draw(st.floats(0.01, 0.5)),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        decay=draw(st.sampled_from([0.0, 0.1])),
        b1=draw(st.sampled_from([0.9, 0.5])),
    )
    return weight, steps, kw, draw(st.sampled_from(sorted(SPARSE))), hyper


@given(sparse_cases())
def test_sparse_training_matches_torch(case):
    weight, steps, kw, name, hyper = case
    if weight.shape[1] == 0:
        return  # torch's sparse optimizers reject zero-width tables; nothing to train
    make_jax, make_torch = SPARSE[name]
    sgbf = kw["scale_grad_by_freq"]
    emb = torch.nn.Embedding.from_pretrained(
        torch.tensor(weight), freeze=False, sparse=not sgbf, **kw
    )
    topt = make_torch(emb.parameters(), hyper)
    opt = make_jax(hyper)
    table = jnp.asarray(weight)
    state = opt.init(table)
    for ids, target in steps:
        topt.zero_grad(set_to_none=True)
        # flat for torch: its sparse backward fails on a 0-d index with padding_idx (found here;
        # see tests/test_sparse.py::test_scalar_index_with_padding)
        idx = torch.from_numpy(ids.reshape(-1))
        flat_target = torch.from_numpy(target.reshape(-1, target.shape[-1]))
        ((emb(idx) - flat_target) ** 2).sum().backward()
        if emb.weight.grad is not None:
            if sgbf:  # torch refuses it with sparse=True: the dense gradient's rows, as COO
                rows = torch.unique(idx.reshape(-1))
                if emb.padding_idx is not None:
                    rows = rows[rows != emb.padding_idx]
                dense = emb.weight.grad
                emb.weight.grad = torch.sparse_coo_tensor(rows[None], dense[rows], dense.shape)
            topt.step()
        rows, lk = jaxembed.sparse.lookup({"weight": table}, ids, **kw)
        g = jax.grad(lambda r, t=target: jnp.sum((r - t) ** 2))(rows)
        table, state = jax.jit(opt.update)(lk.grad(g), state, lk.params["weight"])
        if ids.size == 0:  # torch skips a parameter without a gradient; the step count shows it
            state = state._replace(count=state.count - 1)
    np.testing.assert_allclose(table, emb.weight.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a process of its own: CI runs it (-m slow)
def test_float64_under_x64():
    """The float64 properties (tests/x64_cases.py), in a process started with x64 on."""
    import os
    import subprocess
    import sys

    from hypothesis import settings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    profile = {15: "default", 300: "ci"}.get(settings().max_examples, "deep")
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-o",
            "python_files=x64_cases.py",
            f"--hypothesis-profile={profile}",
            "tests/x64_cases.py",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "4 passed" in res.stdout
