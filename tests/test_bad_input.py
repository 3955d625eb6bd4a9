"""A sweep of bad input over every public entry point, and the property that a failing call
changes nothing.

Each case corrupts one argument of a valid call. It must either raise a clear error (the right
type, a message naming the argument) or give the documented result; and afterwards the caller's
params and the modules' state are exactly what they were.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxembed
from jaxembed import linen as jlinen
from jaxembed import sparse

V, D = 6, 3
W = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32) * 2


def _params():
    return {"weight": jnp.asarray(W)}


GOOD = {
    "embedding": dict(indices=np.array([[0, 5], [2, 2]])),
    "embedding_bag": dict(indices=np.array([0, 5, 2, 2]), offsets=np.array([0, 1]), mode="sum"),
    "renorm": dict(indices=np.array([0, 5]), max_norm=1.0),
    "lookup": dict(indices=np.array([1, 1, 3])),
}
ENTRY = {
    "embedding": jaxembed.embedding,
    "embedding_bag": jaxembed.embedding_bag,
    "renorm": jaxembed.renorm,
    "lookup": sparse.lookup,
}

# (argument, bad value, exception, text the message must hold)
COMMON = [
    ("indices", np.array([0.0, 1.0]), TypeError, "indices"),
    ("indices", np.array([True]), TypeError, "indices"),
    ("indices", np.array(["a"]), TypeError, "indices"),
    ("indices", [0.5], TypeError, "indices"),
    ("indices", np.array([V]), IndexError, "out of range"),
    ("indices", np.array([-1]), IndexError, "out of range"),
    ("indices", np.array([2**40], np.int64), IndexError, "out of range"),
    ("padding_idx", V, ValueError, "padding_idx"),
    ("padding_idx", -V - 1, ValueError, "padding_idx"),
    ("padding_idx", 1.0, TypeError, "padding_idx"),
    ("padding_idx", "1", TypeError, "padding_idx"),
    ("max_norm", 0.0, ValueError, "max_norm"),
    ("max_norm", -1.0, ValueError, "max_norm"),
    ("max_norm", math.nan, ValueError, "max_norm"),
    ("max_norm", "1", TypeError, "max_norm"),
    ("norm_type", 0.0, ValueError, "norm_type"),
    ("norm_type", math.nan, ValueError, "norm_type"),
    ("norm_type", "2", TypeError, "norm_type"),
    ("params", None, TypeError, "params"),
    ("params", {"w": W}, TypeError, "weight"),
    ("params", {"weight": W[0]}, ValueError, "2-D"),
    ("params", {"weight": W[None]}, ValueError, "2-D"),
    ("params", {"weight": W.astype(np.int32)}, TypeError, "floating"),
    ("params", {"weight": np.zeros((0, D), np.float32)}, IndexError, "out of range"),
]
FLAGS = [
    ("scale_grad_by_freq", 1, TypeError, "scale_grad_by_freq"),
    ("scale_grad_by_freq", "yes", TypeError, "scale_grad_by_freq"),
]
BAG = [
    ("offsets", np.array([0.0, 1.0]), TypeError, "offsets"),
    ("offsets", np.array([[0, 1]]), ValueError, "offsets"),
    ("offsets", np.array([1, 2]), ValueError, "offsets"),
    ("offsets", np.array([0, 3, 2]), ValueError, "offsets"),
    ("offsets", np.array([0, 9]), ValueError, "offsets"),
    ("mode", "avg", ValueError, "mode"),
    ("mode", 1, ValueError, "mode"),
    ("per_sample_weights", np.ones(3, np.float32), ValueError, "per_sample_weights"),
    ("per_sample_weights", np.ones(4, np.int32), TypeError, "per_sample_weights"),
    ("include_last_offset", "no", TypeError, "include_last_offset"),
]


def _cases():
    cases = []
    for entry in ENTRY:
        args = list(COMMON)
        if entry != "renorm":
            args += FLAGS
        else:
            args = [a for a in args if a[0] not in ("padding_idx",)]
        if entry == "embedding_bag":
            args += BAG
        cases += [(entry, *a) for a in args]
    return cases


CASES = _cases()


def _call(entry, arg, value):
    kw = dict(GOOD[entry])
    params = _params()
    if arg == "params":
        params = value
    else:
        kw[arg] = value
    if entry == "renorm" and arg == "max_norm" and value is None:
        kw.pop("max_norm")
    return ENTRY[entry](params, **kw)


@pytest.mark.parametrize(
    "entry,arg,value,exc,text", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_argument_raises_a_clear_error(entry, arg, value, exc, text):
    before = np.array(W)
    with pytest.raises(exc, match=text):
        _call(entry, arg, value)
    np.testing.assert_array_equal(W, before)


@pytest.mark.parametrize("entry", sorted(ENTRY))
def test_documented_results_for_odd_but_valid_input(entry):
    """Python lists, scalars, int64 with x64 off, NaN/inf in the table, an infinite max_norm."""
    for indices in ([1, 2], 3, np.array([1, 2], np.int64), np.array([[1], [4]], np.uint8)):
        kw = dict(GOOD[entry], indices=indices)
        if entry == "embedding_bag":
            kw["offsets"] = None if np.ndim(indices) != 1 else np.array([0])
            if np.ndim(indices) == 0:
                continue  # a bag needs 1-D (with offsets) or 2-D indices: tested above
        ENTRY[entry](_params(), **kw)
    bad_table = {"weight": jnp.asarray(W).at[1, 0].set(jnp.nan).at[2, 1].set(jnp.inf)}
    kw = dict(GOOD[entry])
    if entry != "renorm":
        kw["max_norm"] = math.inf  # never renorms: values pass through untouched
    out = ENTRY[entry](bad_table, **kw)
    assert out is not None


@pytest.fixture
def models():
    rngs = nnx.Rngs(0)
    emb = jaxembed.Embedding(V, D, max_norm=1.0, padding_idx=0, rngs=rngs)
    bag = jaxembed.EmbeddingBag(V, D, max_norm=1.0, mode="max", rngs=rngs)
    sp = jaxembed.Embedding(V, D, max_norm=1.0, sparse=True, rngs=rngs)
    return emb, bag, sp


MODULE_CALLS = [
    ("emb", dict(indices=np.array([0.5])), TypeError),
    ("emb", dict(indices=np.array([1, V])), IndexError),
    ("emb", dict(indices=np.array([1, -1])), IndexError),
    ("bag", dict(indices=np.array([1, 2]), offsets=np.array([1])), ValueError),
    ("bag", dict(indices=np.array([1, V])), IndexError),
    ("bag", dict(indices=np.array([[1, 2]]), offsets=np.array([0])), ValueError),
    ("sp", dict(indices=np.array([V])), IndexError),
]


@given(
    st.lists(st.sampled_from(range(len(MODULE_CALLS))), min_size=1, max_size=4),
    st.lists(st.integers(0, V - 1), min_size=1, max_size=6),
)
def test_failed_module_calls_change_nothing(calls, good):
    """Property: between good calls (which do renorm the tables), failing calls leave every
    module's state exactly as it was."""
    rngs = nnx.Rngs(0)
    mods = {
        "emb": jaxembed.Embedding(V, D, max_norm=1.0, padding_idx=0, rngs=rngs),
        "bag": jaxembed.EmbeddingBag(V, D, max_norm=1.0, mode="max", rngs=rngs),
        "sp": jaxembed.Embedding(V, D, max_norm=1.0, sparse=True, rngs=rngs),
    }
    good = np.array(good)
    for k in calls:
        name, kw, exc = MODULE_CALLS[k]
        before = {n: jax.tree.map(np.asarray, nnx.state(m)) for n, m in mods.items()}
        with pytest.raises(exc):
            mods[name](**kw)
        after = {n: jax.tree.map(np.asarray, nnx.state(m)) for n, m in mods.items()}
        jax.tree.map(np.testing.assert_array_equal, before, after)
        mods["emb"](good)
        mods["bag"](good[None])
        mods["sp"](good)


def test_failed_sparse_optimizer_update_changes_nothing():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = jaxembed.Embedding(V, D, sparse=True, rngs=rngs)
            self.head = nnx.Linear(D, 2, rngs=rngs)

        def __call__(self, ids):
            return self.head(self.embed(ids)).sum()

    model = Model(nnx.Rngs(0))
    opt = sparse.Optimizer(model, optax.adam(0.1), sparse.lazy_adam(0.1))
    _, grads = sparse.value_and_grad(lambda m: m(jnp.array([1, 2])))(model)
    broken = grads._replace(
        sparse={"embed/weight": sparse.SparseGrad(jnp.array([1]), jnp.ones((1, D + 1)))}
    )
    before = jax.tree.map(np.asarray, nnx.state((model, opt)))
    with pytest.raises(ValueError, match="values"):
        opt.update(model, broken)
    after = jax.tree.map(np.asarray, nnx.state((model, opt)))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    opt.update(model, grads)  # the good gradients still apply
    assert int(opt.step[...]) == 1


@pytest.mark.parametrize(
    "make,exc,text",
    [
        (lambda: jaxembed.Embedding(-1, D, rngs=nnx.Rngs(0)), ValueError, "num_embeddings"),
        (lambda: jaxembed.Embedding(V, 2.5, rngs=nnx.Rngs(0)), TypeError, "embedding_dim"),
        (
            lambda: jaxembed.Embedding(V, D, padding_idx=V, rngs=nnx.Rngs(0)),
            ValueError,
            "padding_idx",
        ),
        (
            lambda: jaxembed.Embedding(V, D, max_norm=-1, rngs=nnx.Rngs(0)),
            ValueError,
            "max_norm",
        ),
        (
            lambda: jaxembed.Embedding(V, D, param_dtype=jnp.int32, rngs=nnx.Rngs(0)),
            TypeError,
            "param_dtype",
        ),
        (
            lambda: jaxembed.EmbeddingBag(V, D, mode="avg", rngs=nnx.Rngs(0)),
            ValueError,
            "mode",
        ),
        (
            lambda: jaxembed.EmbeddingBag(
                V, D, mode="max", scale_grad_by_freq=True, rngs=nnx.Rngs(0)
            ),
            ValueError,
            "scale_grad_by_freq",
        ),
        (lambda: jaxembed.Embedding.from_pretrained(np.zeros(3)), ValueError, "2-D"),
        (lambda: jaxembed.init(jax.random.key(0), V, D, dtype=jnp.int32), TypeError, "dtype"),
        (
            lambda: jlinen.Embedding(V, D, norm_type=0).init(jax.random.key(0), jnp.array([1])),
            ValueError,
            "norm_type",
        ),
        (
            lambda: jlinen.EmbeddingBag(V, D, mode="median").init(
                jax.random.key(0), jnp.array([[1]])
            ),
            ValueError,
            "mode",
        ),
    ],
)
def test_bad_constructors(make, exc, text):
    with pytest.raises(exc, match=text):
        make()
