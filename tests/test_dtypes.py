"""Table dtypes: kept in outputs and new tables; low-precision renorm never overshoots max_norm."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from tests.torch_ref import torch_embedding

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _reference_renorm(weight64, indices, max_norm, norm_type):
    """The documented semantics, in float64: referenced rows over max_norm are rescaled."""
    out = weight64.copy()
    for i in np.unique(indices):
        norm = np.linalg.norm(out[i], ord=norm_type)
        if norm > max_norm:
            out[i] = out[i] * (max_norm / (norm + 1e-7))
    return out


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dtype_kept_and_matches_reference(dtype, norm_type):
    rng = np.random.default_rng(5)
    weight = jnp.asarray(rng.normal(size=(12, 7)) * 3, dtype)
    idx = jnp.asarray(rng.integers(0, 12, size=(4, 5)))
    out, new = jax.jit(
        lambda p, i: jaxembed.embedding(p, i, padding_idx=3, max_norm=1.0, norm_type=norm_type)
    )({"weight": weight}, idx)
    assert out.dtype == dtype and new["weight"].dtype == dtype
    expected = _reference_renorm(np.asarray(weight, np.float64), np.asarray(idx), 1.0, norm_type)
    np.testing.assert_allclose(np.asarray(new["weight"], np.float64), expected, rtol=TOL[dtype])
    np.testing.assert_array_equal(out, new["weight"][idx])
    grad = jax.grad(lambda w: jaxembed.embedding({"weight": w}, idx, padding_idx=3)[0].sum())(
        weight
    )
    assert grad.dtype == dtype
    ref = torch_embedding(np.asarray(weight, np.float32), np.asarray(idx), padding_idx=3)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), ref.grad)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, math.inf])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("max_norm", [1.0, 0.3, 7.0])
def test_low_precision_renorm_never_overshoots(dtype, norm_type, max_norm):
    rng = np.random.default_rng(11)
    weight = jnp.asarray(rng.normal(size=(4096, 64)) * 10, dtype)
    idx = jnp.arange(4096)
    _, new = jaxembed.embedding({"weight": weight}, idx, max_norm=max_norm, norm_type=norm_type)
    norms = np.linalg.norm(np.asarray(new["weight"], np.float64), ord=norm_type, axis=1)
    assert norms.max() <= max_norm
    assert norms.min() > max_norm * 0.98  # still renormed to just below max_norm, not far under


def test_torch_bf16_overshoots_where_jaxembed_does_not():
    """The motivating torch defect: bf16 norms computed in bf16 land above max_norm."""
    rng = np.random.default_rng(0)
    w32 = (rng.normal(size=(2048, 32)) * 4).astype(np.float32)
    import torch
    import torch.nn.functional as F

    tw = torch.tensor(w32).to(torch.bfloat16)
    F.embedding(torch.arange(2048), tw, max_norm=1.0)
    torch_norms = tw.float().norm(dim=1).numpy()
    _, new = jaxembed.embedding(
        {"weight": jnp.asarray(w32, jnp.bfloat16)}, jnp.arange(2048), max_norm=1.0
    )
    ours = np.linalg.norm(np.asarray(new["weight"], np.float32), axis=1)
    assert torch_norms.max() > 1.0
    assert ours.max() <= 1.0


def test_float64_under_x64_matches_torch():
    """x64 must be switched on before JAX starts, so this runs in its own process."""
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, jaxembed
        from tests.torch_ref import torch_embedding
        rng = np.random.default_rng(0)
        w = rng.normal(size=(9, 4)) * 2
        idx = np.array([[1, 2, 2], [8, 0, 1]], dtype=np.int64)
        cot = rng.normal(size=(2, 3, 4))
        for p in (1.0, 2.0, 3.0, float("inf")):
            kw = dict(padding_idx=-1, max_norm=1.0, norm_type=p, scale_grad_by_freq=True)
            ref = torch_embedding(w, idx, cot, **kw)
            def loss(params):
                out, new = jaxembed.embedding(params, jnp.asarray(idx), **kw)
                return (out * cot).sum(), (out, new)
            g, (out, new) = jax.jit(jax.grad(loss, has_aux=True))({"weight": jnp.asarray(w)})
            assert out.dtype == jnp.float64 and new["weight"].dtype == jnp.float64
            np.testing.assert_allclose(out, ref.out, rtol=1e-13)
            np.testing.assert_allclose(new["weight"], ref.table, rtol=1e-13)
            np.testing.assert_allclose(g["weight"], ref.grad, rtol=1e-13)
        print("x64 ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x64 ok" in res.stdout


@pytest.mark.slow  # a process of its own under x64: CI runs it
def test_sparse_optimizers_float64_under_x64_match_torch():
    """Sparse SGD / Adagrad / lazy Adam on float64 tables, int64 indices (x64: own process)."""
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, torch
        from jaxembed import sparse
        rng = np.random.default_rng(0)
        w = rng.normal(size=(9, 4))
        batches = [(rng.integers(0, 9, (3, 4)), rng.normal(size=(3, 4, 4))) for _ in range(4)]
        pairs = [
            (sparse.sgd(0.3), lambda p: torch.optim.SGD(p, lr=0.3)),
            (sparse.adagrad(0.3, lr_decay=0.1),
             lambda p: torch.optim.Adagrad(p, lr=0.3, lr_decay=0.1)),
            (sparse.lazy_adam(0.1), lambda p: torch.optim.SparseAdam(p, lr=0.1)),
        ]
        for opt, make in pairs:
            emb = torch.nn.Embedding.from_pretrained(
                torch.tensor(w), freeze=False, sparse=True, padding_idx=1, max_norm=1.2
            )
            topt = make(emb.parameters())
            table = jnp.asarray(w)
            state = opt.init(table)
            for ids, t in batches:
                topt.zero_grad()
                ((emb(torch.from_numpy(ids)) - torch.from_numpy(t)) ** 2).mean().backward()
                topt.step()
                kw = dict(padding_idx=1, max_norm=1.2)
                rows, lk = sparse.lookup({"weight": table}, jnp.asarray(ids), **kw)
                g = jax.grad(lambda r: jnp.mean((r - t) ** 2))(rows)
                table, state = jax.jit(opt.update)(lk.grad(g), state, lk.params["weight"])
            assert table.dtype == jnp.float64 and lk.indices.dtype == jnp.int64
            np.testing.assert_allclose(table, emb.weight.detach().numpy(), rtol=1e-12, atol=1e-12)
        print("x64 sparse ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x64 sparse ok" in res.stdout
