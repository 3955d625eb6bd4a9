"""``jaxembed.embedding`` against torch's ``F.embedding``: outputs, renormed tables, gradients."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from tests.torch_ref import torch_embedding

V, D = 10, 5
INDEX_SHAPES = [(), (0,), (7,), (3, 4), (2, 0, 3), (2, 3, 4)]
PADDING = [None, 2, -3]
NORMS = [None, (1.0, 1.0), (1.0, 2.0), (0.8, 3.0), (1.5, 0.5), (0.7, math.inf)]


def _case(seed, shape, padding_idx):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(V, D)).astype(np.float32)
    # small range: plenty of duplicates; the padding row is always referenced where it fits
    indices = rng.integers(0, 5, size=shape).astype(np.int32)
    if padding_idx is not None and indices.size:
        indices.flat[0] = padding_idx % V
    cot = rng.normal(size=shape + (D,)).astype(np.float32)
    return weight, indices, cot


def _jax_embedding(weight, indices, cot, jit, **kw):
    def loss(params):
        out, new_params = jaxembed.embedding(params, indices, **kw)
        return jnp.sum(out * cot), (out, new_params)

    f = jax.value_and_grad(loss, has_aux=True)
    if jit:
        f = jax.jit(f)
    (_, (out, new_params)), grads = f({"weight": jnp.asarray(weight)})
    return out, new_params["weight"], grads["weight"]


# every shape under jit; eagerly (which also runs the Python-side index checks) a subset of shapes
EAGER_SHAPES = [(), (7,), (2, 3, 4)]
MODES = [(s, True) for s in INDEX_SHAPES] + [(s, False) for s in EAGER_SHAPES]


@pytest.mark.parametrize("scale_grad_by_freq", [False, True], ids=["", "freq"])
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: "nonorm" if n is None else f"mn{n[0]}p{n[1]}")
@pytest.mark.parametrize("padding_idx", PADDING, ids=lambda p: f"pad{p}")
@pytest.mark.parametrize(
    ("shape", "jit"), MODES, ids=[f"{s}-{'jit' if j else 'eager'}" for s, j in MODES]
)
def test_matches_torch(shape, padding_idx, norm, scale_grad_by_freq, jit):
    weight, indices, cot = _case(len(shape) * 7 + 1, shape, padding_idx)
    max_norm, norm_type = norm if norm else (None, 2.0)
    kw = dict(
        padding_idx=padding_idx,
        max_norm=max_norm,
        norm_type=norm_type,
        scale_grad_by_freq=scale_grad_by_freq,
    )
    ref = torch_embedding(weight, indices, cot, **kw)
    out, table, grad = _jax_embedding(weight, indices, cot, jit, **kw)
    assert out.shape == shape + (D,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref.out, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(table, ref.table, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grad, ref.grad, rtol=2e-6, atol=1e-7)
    if max_norm is not None:
        touched = np.zeros(V, bool)
        touched[indices.reshape(-1)] = True
        # rows not referenced are bit-identical; referenced rows sit at or below max_norm
        np.testing.assert_array_equal(np.asarray(table)[~touched], weight[~touched])
        norms = np.linalg.norm(np.asarray(table, np.float64)[touched], ord=norm_type, axis=1)
        assert np.all(norms <= max_norm * (1 + 1e-6))


def test_walkthrough_padding_and_renorm_sequence():
    """The sequence of the nn.Embedding walkthrough: renorm is online, only looked-up rows."""
    weight = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32) * 2
    weight[2] = 0
    params = {"weight": jnp.asarray(weight)}
    torch_w = weight.copy()
    for idx in ([1, 3, 4], [0, 2], [7]):
        idx = np.array(idx)
        ref = torch_embedding(torch_w, idx, padding_idx=2, max_norm=1.0)
        out, params = jaxembed.embedding(params, idx, padding_idx=2, max_norm=1.0)
        np.testing.assert_allclose(out, ref.out, rtol=2e-6)
        np.testing.assert_allclose(params["weight"], ref.table, rtol=2e-6)
        torch_w = ref.table
    norms = np.linalg.norm(np.asarray(params["weight"]), axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 4, 7]], 1.0, rtol=1e-6)
    assert norms[2] == 0


@pytest.mark.parametrize(
    "dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
)
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_any_integer_index_dtype(dtype, jit):
    weight = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32)
    indices = np.array([[1, 9], [0, 1]], dtype=dtype)
    f = jax.jit(jaxembed.embedding) if jit else jaxembed.embedding
    out, _ = f({"weight": weight}, indices)
    np.testing.assert_array_equal(out, weight[indices.astype(np.int64)])


def test_python_lists_and_scalars():
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    params = {"weight": weight}
    np.testing.assert_array_equal(
        jaxembed.embedding(params, [[1, 2], [3, 0]])[0], weight[[[1, 2], [3, 0]]]
    )
    out, _ = jaxembed.embedding(params, 3)
    assert out.shape == (3,)
    np.testing.assert_array_equal(out, weight[3])
    out, _ = jaxembed.embedding(params, [])
    assert out.shape == (0, 3)


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_empty_inputs_and_zero_width(max_norm):
    params = jaxembed.init(jax.random.key(0), 6, 0)
    out, new = jaxembed.embedding(params, jnp.array([[1, 2, 2]]), max_norm=max_norm)
    assert out.shape == (1, 3, 0) and new["weight"].shape == (6, 0)
    params = jaxembed.init(jax.random.key(0), 6, 3)
    out, new = jaxembed.embedding(params, jnp.zeros((0, 4), jnp.int32), max_norm=max_norm)
    assert out.shape == (0, 4, 3)
    np.testing.assert_array_equal(new["weight"], params["weight"])
    grad = jax.grad(lambda p: jaxembed.embedding(p, jnp.zeros((0,), jnp.int32))[0].sum())(params)
    np.testing.assert_array_equal(grad["weight"], 0)
    # an empty table accepts an empty lookup, as torch does
    empty = jaxembed.init(jax.random.key(0), 0, 3)
    out, _ = jaxembed.embedding(empty, np.zeros((0,), np.int32), max_norm=max_norm)
    assert out.shape == (0, 3)


def test_returns_params_itself_without_max_norm():
    params = jaxembed.init(jax.random.key(0), 4, 2)
    _, new = jaxembed.embedding(params, jnp.array([1]))
    assert new is params


def test_new_params_carry_no_gradient():
    params = jaxembed.init(jax.random.key(0), 4, 2)

    def f(p):
        _, new = jaxembed.embedding(p, jnp.array([0, 1]), max_norm=0.5)
        return new["weight"].sum()

    np.testing.assert_array_equal(jax.grad(f)(params)["weight"], 0)


def test_extra_params_entries_are_kept():
    params = {**jaxembed.init(jax.random.key(0), 4, 2), "other": jnp.ones(3)}
    _, new = jaxembed.embedding(params, jnp.array([0]), max_norm=0.1)
    assert new["other"] is params["other"]


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_no_retrace_on_second_call(max_norm):
    traces = []

    @jax.jit
    def f(params, idx):
        traces.append(None)
        return jaxembed.embedding(params, idx, padding_idx=1, max_norm=max_norm)

    params = jaxembed.init(jax.random.key(0), 10, 3)
    _out1, params = f(params, jnp.array([1, 2, 3]))
    _out2, params = f(params, jnp.array([4, 5, 9]))
    assert len(traces) == 1
    # eager calls reuse the library's own compiled function too
    size = jaxembed.core._embedding._embedding._cache_size()
    for idx in ([0, 1, 2], [3, 4, 5]):
        jaxembed.embedding(params, jnp.array(idx), padding_idx=1, max_norm=max_norm)
    assert jaxembed.core._embedding._embedding._cache_size() <= size + 1


def test_vmap_over_indices():
    params = jaxembed.init(jax.random.key(0), 10, 3)
    idx = jnp.array([[1, 2], [3, 3], [9, 0]])
    out = jax.vmap(lambda i: jaxembed.embedding(params, i, padding_idx=0)[0])(idx)
    np.testing.assert_array_equal(out, params["weight"][idx])
    # vmapped indices are traced: out-of-range gives NaN, never an exception
    out = jax.vmap(lambda i: jaxembed.embedding(params, i)[0])(jnp.array([[1, -1]]))
    assert np.isnan(out[0, 1]).all() and not np.isnan(out[0, 0]).any()


@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_forward_mode_is_the_transpose_of_reverse(padding_idx, scale_grad_by_freq, max_norm):
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32))
    idx = jnp.array([[1, 1, 2], [0, 5, 1]])
    kw = dict(padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq, max_norm=max_norm)

    def f(w):
        return jaxembed.embedding({"weight": w}, idx, **kw)[0]

    jac_fwd = jax.jacfwd(f)(weight)
    jac_rev = jax.jacrev(f)(weight)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-6)
    # the reverse mode is torch's weight.grad: check one row of the Jacobian against torch
    cot = np.zeros(idx.shape + (3,), np.float32)
    cot[0, 0, 1] = 1.0
    ref = torch_embedding(np.asarray(weight), np.asarray(idx), cot, **kw)
    np.testing.assert_allclose(jac_rev[0, 0, 1], ref.grad, rtol=1e-6)
    tangent = jnp.ones_like(weight)
    _, out_dot = jax.jvp(f, (weight,), (tangent,))
    np.testing.assert_allclose(out_dot, jnp.einsum("ijkvd,vd->ijk", jac_fwd, tangent), rtol=1e-6)


def test_forward_mode_matches_torch_without_padding_or_freq():
    import torch
    import torch.autograd.forward_ad as fwad
    import torch.nn.functional as F

    rng = np.random.default_rng(2)
    weight = rng.normal(size=(6, 3)).astype(np.float32)
    tangent = rng.normal(size=(6, 3)).astype(np.float32)
    idx = np.array([0, 4, 4, 2])
    with fwad.dual_level():
        dual = fwad.make_dual(torch.tensor(weight), torch.tensor(tangent))
        ref = fwad.unpack_dual(F.embedding(torch.tensor(idx), dual)).tangent.numpy()
    _, out_dot = jax.jvp(lambda w: jaxembed.embedding({"weight": w}, idx)[0], (weight,), (tangent,))
    np.testing.assert_allclose(out_dot, ref)


def test_grad_of_duplicates_accumulates():
    params = {"weight": jnp.zeros((4, 2))}
    g = jax.grad(lambda p: jaxembed.embedding(p, jnp.array([3, 3, 3, 1]))[0].sum())(params)
    np.testing.assert_array_equal(g["weight"], [[0, 0], [1, 1], [0, 0], [3, 3]])


def test_jit_and_eager_agree_bit_for_bit():
    params = jaxembed.init(jax.random.key(1), 7, 3)
    idx = jnp.array([1, 2, 6, 2])
    kw = dict(padding_idx=2, max_norm=1.0, norm_type=3.0)
    jitted = jax.jit(lambda p, i: jaxembed.embedding(p, i, **kw))(params, idx)
    eager = jaxembed.embedding(params, idx, **kw)
    chex.assert_trees_all_equal(jitted, eager)


@pytest.mark.parametrize("max_norm", [1.0, 0.1, 0.7, 2.5])
def test_renorm_scale_is_torchs_double_precision_scale(max_norm):
    """torch divides in float64 and rounds; so does jaxembed (float-float arithmetic)."""
    from jaxembed.core._renorm import renorm_scale

    rng = np.random.default_rng(0)
    norms = np.concatenate([rng.uniform(0.5, 50, 50_000), rng.uniform(1, 1.001, 50_000)])
    norms = norms.astype(np.float32)
    expected = (max_norm / (norms.astype(np.float64) + 1e-7)).astype(np.float32)
    ours = jax.jit(lambda n: renorm_scale(n, max_norm))(jnp.asarray(norms))
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_nan_inf_and_huge_rows_under_max_norm_match_torch(norm_type):
    """Documented: a NaN row is left as it is (its norm is not > max_norm); a row holding inf is
    scaled by 0, so its infinite entries become NaN and the finite ones 0; a huge finite row is
    renormed like any other. All as torch does."""
    w = np.array(
        [[3, 4], [np.nan, 1], [np.inf, 1], [-np.inf, np.inf], [3e35, -1e36], [0.3, 0.4]],
        np.float32,
    )
    idx = np.array([0, 1, 2, 3, 4, 5, 1])
    ref = torch_embedding(w, idx, max_norm=1.0, norm_type=norm_type)
    out, new = jax.jit(lambda p: jaxembed.embedding(p, idx, max_norm=1.0, norm_type=norm_type))(
        {"weight": jnp.asarray(w)}
    )
    np.testing.assert_array_equal(np.asarray(new["weight"]), ref.table)  # NaN == NaN here
    np.testing.assert_array_equal(np.asarray(out), ref.out)
