"""``jaxembed.embedding_bag`` against torch's ``F.embedding_bag``."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from tests.torch_ref import torch_embedding_bag

V, D = 10, 4
LAYOUTS = ["2d", "offsets", "csr", "balanced"]
MODES = ["sum", "mean", "max"]
PADDING = [None, 2, -3]
NORMS = [None, (1.0, 2.0), (0.8, 1.0)]


def _case(layout, padding_idx, seed=0):
    rng = np.random.default_rng(seed)
    weight = (rng.normal(size=(V, D)) * 1.5).astype(np.float32)
    if layout == "2d":
        indices = rng.integers(0, 6, size=(5, 3))
        offsets = None
        if padding_idx is not None:
            indices[1, :] = padding_idx % V  # an all-padding bag
            indices[3, 0] = padding_idx % V
    elif layout == "balanced":  # bags of sizes 2, 2, 0, 3, 2: the column loop's case
        indices = rng.integers(0, 6, size=9)
        offsets = np.array([0, 2, 4, 4, 7])
        if padding_idx is not None:
            indices[2:4] = padding_idx % V  # an all-padding bag
            indices[5] = padding_idx % V
    else:  # bags of sizes 3, 0, 2, 1, 0, 5: a long bag, so the segment reduction's case
        indices = rng.integers(0, 6, size=11)
        # bags of sizes 3, 0 (empty), 2, 1, 0 (empty), 5
        offsets = np.array([0, 3, 3, 5, 6, 6])
        if padding_idx is not None:
            indices[3:5] = padding_idx % V  # an all-padding bag
            indices[7] = padding_idx % V
        if layout == "csr":
            offsets = np.append(offsets, len(indices))
    num_bags = indices.shape[0] if layout == "2d" else len(offsets) - (layout == "csr")
    cot = rng.normal(size=(num_bags, D)).astype(np.float32)
    psw = rng.normal(size=indices.shape).astype(np.float32)
    return weight, indices, offsets, cot, psw


def _cases():
    for layout, mode, pad, norm in itertools.product(LAYOUTS, MODES, PADDING, NORMS):
        for psw, freq in itertools.product([False, True], [False, True]):
            if (psw and mode != "sum") or (freq and mode == "max"):
                continue
            yield layout, mode, pad, norm, psw, freq


CASES = list(_cases())


def _jax_bag(weight, indices, offsets, cot, psw, **kw):
    def loss(params, psw):
        out, new = jaxembed.embedding_bag(params, indices, offsets, per_sample_weights=psw, **kw)
        return jnp.sum(out * cot), (out, new)

    argnums = (0, 1) if psw is not None else 0
    f = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))
    grads, (out, new) = f({"weight": jnp.asarray(weight)}, psw)
    if psw is None:
        grads = (grads, None)
    return out, new["weight"], grads[0]["weight"], grads[1]


@pytest.mark.parametrize(
    ("layout", "mode", "padding_idx", "norm", "psw", "freq"),
    CASES,
    ids=[
        f"{lay}-{m}-pad{p}-{'nonorm' if n is None else f'mn{n[0]}p{n[1]}'}"
        f"{'-psw' if w else ''}{'-freq' if f else ''}"
        for lay, m, p, n, w, f in CASES
    ],
)
def test_matches_torch(layout, mode, padding_idx, norm, psw, freq):
    weight, indices, offsets, cot, weights = _case(layout, padding_idx)
    max_norm, norm_type = norm if norm else (None, 2.0)
    kw = dict(
        mode=mode,
        padding_idx=padding_idx,
        max_norm=max_norm,
        norm_type=norm_type,
        scale_grad_by_freq=freq,
        include_last_offset=layout == "csr",
    )
    weights = weights if psw else None
    # torch 2.13's CPU bag kernel mis-scales scale_grad_by_freq: use the documented semantics
    ref = torch_embedding_bag(
        weight, indices, offsets, cot, per_sample_weights=weights, composed=freq, **kw
    )
    out, table, grad, psw_grad = _jax_bag(weight, indices, offsets, cot, weights, **kw)
    np.testing.assert_allclose(out, ref.out, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(table, ref.table, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grad, ref.grad, rtol=2e-6, atol=2e-6)
    if psw:
        np.testing.assert_allclose(psw_grad, ref.psw_grad, rtol=2e-6, atol=2e-6)


def test_torch_cpu_scale_grad_by_freq_bug_is_real():
    """Why scale_grad_by_freq is tested against the composed reference (pytorch 190063)."""
    weight = np.eye(3, dtype=np.float32)
    indices = np.array([[0, 0], [1, 2]])
    cot = np.ones((2, 3), np.float32)
    kernel = torch_embedding_bag(weight, indices, None, cot, mode="sum", scale_grad_by_freq=True)
    documented = torch_embedding_bag(
        weight, indices, None, cot, mode="sum", scale_grad_by_freq=True, composed=True
    )
    np.testing.assert_allclose(documented.grad[1], 1.0)
    ours = jax.grad(
        lambda p: jaxembed.embedding_bag(p, indices, mode="sum", scale_grad_by_freq=True)[0].sum()
    )({"weight": jnp.asarray(weight)})["weight"]
    np.testing.assert_allclose(ours, documented.grad)
    if not np.allclose(kernel.grad, documented.grad):  # torch 2.13: row 1 gets 0.5
        assert kernel.grad[1, 0] == 0.5


@pytest.mark.parametrize("mode", MODES)
def test_eager_matches_jit(mode):
    weight, indices, offsets, _, _ = _case("offsets", 2)
    params = {"weight": jnp.asarray(weight)}
    kw = dict(mode=mode, padding_idx=2, max_norm=1.0)
    eager = jaxembed.embedding_bag(params, indices, offsets, **kw)
    jitted = jax.jit(lambda p, i, o: jaxembed.embedding_bag(p, i, o, **kw))(
        params, indices, offsets
    )
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_max_gradient_goes_to_first_argmax_entry():
    weight = np.array([[1.0, 5.0], [3.0, 0.0], [0.0, 0.0]], np.float32)
    # row 1 appears twice: only its first occurrence is the arg-max, so it gets the gradient once
    indices = np.array([1, 0, 1, 2])
    grad = jax.grad(
        lambda p: jaxembed.embedding_bag(p, indices, np.array([0]), mode="max")[0].sum()
    )({"weight": jnp.asarray(weight)})["weight"]
    np.testing.assert_array_equal(grad, [[0, 1], [1, 0], [0, 0]])


def test_no_retrace_when_offsets_change():
    traces = []

    @jax.jit
    def f(params, indices, offsets):
        traces.append(None)
        return jaxembed.embedding_bag(params, indices, offsets, mode="mean")[0]

    params = jaxembed.init(jax.random.key(0), V, D)
    indices = jnp.arange(8) % V
    a = f(params, indices, jnp.array([0, 2, 5]))
    b = f(params, indices, jnp.array([0, 6, 6]))
    assert len(traces) == 1
    np.testing.assert_allclose(a[0], params["weight"][:2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(b[0], params["weight"][:6].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(b[1], 0)  # an empty bag


@pytest.mark.parametrize("mode", MODES)
def test_empty_inputs(mode):
    params = jaxembed.init(jax.random.key(0), V, D)
    out, _ = jaxembed.embedding_bag(params, jnp.zeros((3, 0), jnp.int32), mode=mode)
    np.testing.assert_array_equal(out, np.zeros((3, D)))  # 3 empty bags (torch: an error)
    out, _ = jaxembed.embedding_bag(
        params, jnp.zeros((0,), jnp.int32), jnp.array([0, 0]), mode=mode
    )
    np.testing.assert_array_equal(out, np.zeros((2, D)))
    out, _ = jaxembed.embedding_bag(params, jnp.zeros((0, 4), jnp.int32), mode=mode)
    assert out.shape == (0, D)


@pytest.mark.parametrize("mode", MODES)
def test_jit_out_of_range_makes_its_bag_nan(mode):
    params = jaxembed.init(jax.random.key(0), V, D)
    f = jax.jit(lambda p, i, o: jaxembed.embedding_bag(p, i, o, mode=mode)[0])
    out = f(params, jnp.array([1, 2, V, 3, -1]), jnp.array([0, 2, 4]))
    assert not np.isnan(out[0]).any()
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    with pytest.raises(IndexError):
        jaxembed.embedding_bag(params, np.array([1, V]), np.array([0]), mode=mode)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_tables(dtype):
    weight, indices, offsets, _, _ = _case("offsets", None)
    params = {"weight": jnp.asarray(weight, dtype)}
    for mode in MODES:
        out, new = jaxembed.embedding_bag(params, indices, offsets, mode=mode, max_norm=1.0)
        assert out.dtype == dtype and new["weight"].dtype == dtype
        ref, _ = jaxembed.embedding_bag(
            {"weight": jnp.asarray(weight)}, indices, offsets, mode=mode, max_norm=1.0
        )
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


def _params():
    return jaxembed.init(jax.random.key(0), V, D)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: jaxembed.embedding_bag(p, jnp.array([[1]]), mode="median"), "mode"),
        (
            lambda p: jaxembed.embedding_bag(
                p, jnp.array([[1, 2]]), mode="mean", per_sample_weights=jnp.ones((1, 2))
            ),
            "per_sample_weights",
        ),
        (
            lambda p: jaxembed.embedding_bag(
                p, jnp.array([[1, 2]]), mode="sum", per_sample_weights=jnp.ones((2,))
            ),
            "shape of indices",
        ),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([1, 2])), "need offsets"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([[1, 2]]), jnp.array([0])), "None"),
        (lambda p: jaxembed.embedding_bag(p, jnp.ones((1, 1, 1), int), None), "1-D .* or 2-D"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([1, 2]), jnp.array([[0]])), "1-D"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([1, 2]), jnp.array([1])), r"offsets\[0\]"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([1, 2]), jnp.array([0, 2, 1])), "non-decr"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([1, 2]), jnp.array([0, 3])), "past the end"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([1, 2]), jnp.array([], int)), "no bag"),
        (
            lambda p: jaxembed.embedding_bag(
                p, jnp.array([1, 2]), jnp.array([0, 1]), include_last_offset=True
            ),
            "last offset",
        ),
        (
            lambda p: jaxembed.embedding_bag(
                p, jnp.array([1]), jnp.array([], int), include_last_offset=True
            ),
            "at least one",
        ),
        (
            lambda p: jaxembed.embedding_bag(
                p, jnp.array([[1]]), mode="max", scale_grad_by_freq=True
            ),
            "scale_grad_by_freq",
        ),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([[1]]), padding_idx=V), "padding_idx"),
        (lambda p: jaxembed.embedding_bag(p, jnp.array([[1]]), max_norm=-1.0), "max_norm"),
    ],
)
def test_bad_input_value_errors(call, match):
    params = _params()
    with pytest.raises(ValueError, match=match):
        call(params)


def test_bad_input_type_errors():
    params = _params()
    with pytest.raises(TypeError, match="offsets"):
        jaxembed.embedding_bag(params, jnp.array([1, 2]), jnp.array([0.0]))
    with pytest.raises(TypeError, match="indices"):
        jaxembed.embedding_bag(params, jnp.array([[1.0]]))
    with pytest.raises(TypeError, match="per_sample_weights"):
        jaxembed.embedding_bag(
            params, jnp.array([[1]]), mode="sum", per_sample_weights=jnp.array([[1]])
        )


@pytest.mark.parametrize("layout", ["2d", "offsets"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_is_the_transpose_of_reverse(layout, mode):
    weight, indices, offsets, _, psw = _case(layout, 2, seed=3)
    psw = jnp.asarray(psw) if mode == "sum" else None
    kw = dict(mode=mode, padding_idx=2, max_norm=1.0)

    def f(w, p):
        return jaxembed.embedding_bag({"weight": w}, indices, offsets, per_sample_weights=p, **kw)[
            0
        ]

    argnums = (0, 1) if psw is not None else 0
    fwd = jax.jacfwd(f, argnums=argnums)(jnp.asarray(weight), psw)
    rev = jax.jacrev(f, argnums=argnums)(jnp.asarray(weight), psw)
    for a, b in zip(jax.tree.leaves(fwd), jax.tree.leaves(rev), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [[3, 0, 2, 1, 0, 5], [2, 2, 2], [0, 0], [7], [1, 0, 0, 4, 2]])
def test_column_loop_equals_segment_reduction(mode, sizes):
    """The two forward passes the offsets layout picks between agree, arg-max positions too."""
    from jaxembed.core import _bag

    rng = np.random.default_rng(len(sizes))
    n = sum(sizes)
    table = jnp.asarray(rng.normal(size=(V, D)).astype(np.float32))
    safe = jnp.asarray(rng.integers(0, V, size=n))
    keep = jnp.asarray(rng.random(n) > 0.2)
    psw = jnp.asarray(rng.normal(size=n).astype(np.float32)) if mode == "sum" else None
    starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32))
    a = _bag._column_bags(table, safe, keep, psw, starts, mode, max(sizes), "gather")
    b = _bag._segment_bags(table, safe, keep, psw, starts, mode, "one_hot")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    if mode == "max":
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 1), (3, 0), (0, 5)])
def test_accelerator_pass_equals_column_loop(mode, shape):
    """GPU/TPU take the gather-and-reduce forward pass; the CPU's column loop must agree with it."""
    from jaxembed.core import _bag

    rng = np.random.default_rng(sum(shape))
    n = shape[0] * shape[1]
    table = jnp.asarray(rng.normal(size=(V, D)).astype(np.float32))
    safe = jnp.asarray(rng.integers(0, V, size=n))
    keep = jnp.asarray(rng.random(n) > 0.3)
    psw = jnp.asarray(rng.normal(size=n).astype(np.float32)) if mode == "sum" else None
    starts = jnp.arange(shape[0], dtype=jnp.int32) * shape[1]
    a = _bag._column_bags(table, safe, keep, psw, starts, mode, shape[1], "one_hot")
    b = _bag._reshape_bags(table, safe, keep, psw, starts, mode, shape[1], "gather")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    if mode == "max":
        np.testing.assert_array_equal(a[1], b[1])


def test_fuzz_regression_max_near_tie_after_renorm():
    """Found by the fuzzer: with D = 1 every renormed row is max_norm up to an ulp, so the bag's
    arg-max is decided by the last bit of torch's double-precision scale."""
    w = np.array(
        [
            [0.28358006],
            [-0.78412265],
            [-0.6195953],
            [-3.6622012],
            [2.699561],
            [1.7162488],
            [-0.48813426],
            [1.1607099],
        ],
        np.float32,
    )
    idx = np.array([[4, 2, 1], [5, 2, 4]])
    cot = np.array([[-0.31055656], [-0.3288239]], np.float32)
    kw = dict(mode="max", max_norm=1.0, norm_type=1.0)
    ref = torch_embedding_bag(w, idx, None, cot, **kw)

    def loss(p):
        out = jaxembed.embedding_bag(p, idx, **kw)[0]
        return (out * cot).sum(), out

    grad, out = jax.grad(loss, has_aux=True)({"weight": jnp.asarray(w)})
    np.testing.assert_allclose(out, ref.out, rtol=1e-6)
    np.testing.assert_array_equal(grad["weight"], ref.grad)
