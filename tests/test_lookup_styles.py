"""Lookup styles: "gather", "one_hot" (a matmul) and "auto" give the same outputs, renormed
tables and gradients, in embedding, embedding_bag, sparse.lookup and the modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxembed
from jaxembed import linen as jlinen

V, D = 11, 4
W = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32) * 2
OPTIONS = [
    {},
    {"padding_idx": 2},
    {"max_norm": 1.0},
    {"max_norm": 1.5, "norm_type": 1.0, "padding_idx": -1, "scale_grad_by_freq": True},
]


def _embedding_run(lookup, idx, kw, dtype=jnp.float32):
    cot = jnp.asarray(np.random.default_rng(1).normal(size=idx.shape + (D,)), dtype)

    def loss(p):
        out, new = jaxembed.embedding(p, idx, lookup_style=lookup, **kw)
        return jnp.sum(out * cot), (out, new)

    grads, (out, new) = jax.jit(jax.grad(loss, has_aux=True))({"weight": jnp.asarray(W, dtype)})
    return out, new["weight"], grads["weight"]


CASES = [
    (style, shape, kw, dtype)
    for shape in [(), (0,), (7,), (3, 4)]
    for kw in OPTIONS
    for style, dtype in [("one_hot", jnp.float32), ("one_hot", jnp.bfloat16), ("auto", jnp.float32)]
    # "auto" is the gather on CPU: one case per option checks the dispatch
    if style != "auto" or shape == (3, 4)
]


@pytest.mark.parametrize("style,shape,kw,dtype", CASES, ids=str)
def test_embedding_styles_agree(style, shape, kw, dtype):
    idx = np.random.default_rng(2).integers(0, V, size=shape)
    for a, b in zip(
        _embedding_run("gather", idx, kw, dtype), _embedding_run(style, idx, kw, dtype), strict=True
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


BAGS = [
    ("2d", np.array([[1, 2, 2], [0, 10, 3]]), None),
    ("offsets", np.array([1, 2, 2, 0, 10, 3, 3]), np.array([0, 2, 2, 5])),
]


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout,idx,offsets", BAGS, ids=[b[0] for b in BAGS])
def test_bag_styles_agree(layout, idx, offsets, mode):
    style = "one_hot"
    kw = dict(mode=mode, padding_idx=3, max_norm=1.2)
    psw = jnp.asarray(np.linspace(0.5, 2, idx.size).reshape(idx.shape), jnp.float32)

    def run(lookup):
        def loss(p, w):
            out, new = jaxembed.embedding_bag(
                p, idx, offsets, lookup_style=lookup, per_sample_weights=w, **kw
            )
            return jnp.sum(out * jnp.arange(out.size).reshape(out.shape)), (out, new)

        w = psw if mode == "sum" else None
        argnums = (0, 1) if w is not None else 0
        grads, (out, new) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(
            {"weight": jnp.asarray(W)}, w
        )
        return jax.tree.leaves((grads, out, new))

    # the rows are bit-identical; the reduction may round differently where XLA fuses the
    # per-sample-weight multiply-add differently around a matmul than around a gather (1 ulp)
    for a, b in zip(run("gather"), run(style), strict=True):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-7)


def test_sparse_lookup_and_modules_take_the_style():
    idx = np.array([[1, 4], [4, 9]])
    rows, _ = jaxembed.sparse.lookup({"weight": jnp.asarray(W)}, idx, lookup_style="one_hot")
    np.testing.assert_array_equal(rows, W[idx])
    for cls, call in (
        (jaxembed.Embedding, lambda m: m(idx)),
        (jaxembed.EmbeddingBag, lambda m: m(idx)),
    ):
        a = cls.from_pretrained(jnp.asarray(W), max_norm=1.0)
        b = cls.from_pretrained(jnp.asarray(W), max_norm=1.0, lookup_style="one_hot")
        assert b.lookup_style == "one_hot"
        np.testing.assert_array_equal(call(a), call(b))
        np.testing.assert_array_equal(a.weight[...], b.weight[...])
    m = jlinen.Embedding(V, D, lookup_style="one_hot")
    variables = m.init(jax.random.key(0), idx)
    np.testing.assert_array_equal(
        m.apply(variables, idx), np.asarray(variables["params"]["weight"])[idx]
    )
    emb = jaxembed.Embedding(V, D, lookup_style="one_hot", rngs=nnx.Rngs(0))
    assert emb(idx).shape == (2, 2, D)


def test_out_of_range_under_jit_is_nan_in_every_style():
    for style in ("gather", "one_hot", "auto"):
        out = jax.jit(
            lambda i, s=style: jaxembed.embedding({"weight": jnp.asarray(W)}, i, lookup_style=s)[0]
        )(jnp.array([1, V, -1]))
        assert np.isnan(out[1:]).all() and not np.isnan(out[0]).any()


def test_one_hot_spreads_non_finite_values():
    """Documented: with one_hot, a NaN/inf anywhere in the table reaches every row (0 * inf)."""
    w = jnp.asarray(W).at[5, 0].set(jnp.inf)
    gathered = jaxembed.embedding({"weight": w}, jnp.array([1, 2]))[0]
    hot = jaxembed.embedding({"weight": w}, jnp.array([1, 2]), lookup_style="one_hot")[0]
    assert np.isfinite(gathered).all()
    assert np.isnan(hot[:, 0]).all()


def test_bad_lookup_and_no_retrace():
    with pytest.raises(ValueError, match="lookup"):
        jaxembed.embedding({"weight": jnp.asarray(W)}, [1], lookup_style="matmul")
    with pytest.raises(ValueError, match="lookup"):
        jaxembed.EmbeddingBag(V, D, lookup_style="x", rngs=nnx.Rngs(0))
    traces = []

    @jax.jit
    def f(p, i):
        traces.append(1)
        return jaxembed.embedding(p, i, lookup_style="one_hot", max_norm=1.0)[0]

    for k in range(3):
        f({"weight": jnp.asarray(W)}, jnp.array([k, k + 1]))
    assert len(traces) == 1
