"""The Flax modules: equal to the functional core, trained like torch, frozen, tied, linen."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxembed
import jaxembed.linen

V, D = 12, 5
OPTS = dict(padding_idx=-2, max_norm=1.0, norm_type=3.0, scale_grad_by_freq=True)
DTYPES = [
    (jnp.float32, None),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, None),
    (jnp.bfloat16, jnp.float32),
]


def _ids(dt):
    return "-".join(jnp.dtype(d).name if d is not None else "None" for d in dt)


@pytest.mark.parametrize(("param_dtype", "dtype"), DTYPES, ids=[_ids(d) for d in DTYPES])
def test_nnx_equals_core_bit_for_bit(param_dtype, dtype):
    emb = jaxembed.Embedding(V, D, **OPTS, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(3))
    params = {"weight": emb.weight[...]}
    assert params["weight"].dtype == param_dtype
    np.testing.assert_array_equal(params["weight"][V - 2], 0)  # the padding row, zeroed
    step = nnx.jit(lambda m, i: m(i))
    for idx in (jnp.array([[1, 2, 10], [2, 2, 11]]), jnp.array([0, 1, 3])):
        out = step(emb, idx)
        ref, params = jaxembed.embedding(params, idx, **OPTS)
        assert out.dtype == (dtype or param_dtype)
        chex.assert_trees_all_equal(out, ref.astype(dtype or param_dtype))
        chex.assert_trees_all_equal(emb.weight[...], params["weight"])


@pytest.mark.parametrize(("param_dtype", "dtype"), DTYPES, ids=[_ids(d) for d in DTYPES])
def test_linen_equals_core_bit_for_bit(param_dtype, dtype):
    model = jaxembed.linen.Embedding(V, D, **OPTS, dtype=dtype, param_dtype=param_dtype)
    variables = model.init(jax.random.key(3), jnp.array([0]))
    params = {"weight": variables["params"]["weight"]}
    np.testing.assert_array_equal(params["weight"][V - 2], 0)
    apply = jax.jit(lambda v, i: model.apply(v, i, mutable=["params"]))
    for idx in (jnp.array([[1, 2, 10], [2, 2, 11]]), jnp.array([0, 1, 3])):
        out, updates = apply(variables, idx)
        variables = {**variables, **updates}
        ref, params = jaxembed.embedding(params, idx, **OPTS)
        chex.assert_trees_all_equal(out, ref.astype(dtype or param_dtype))
        chex.assert_trees_all_equal(variables["params"]["weight"], params["weight"])


def _torch_adam_run(weight, batches, opts):
    emb = torch.nn.Embedding.from_pretrained(torch.tensor(weight), freeze=False, **opts)
    opt = torch.optim.Adam(emb.parameters(), lr=0.05)
    losses = []
    for a, b, target in batches:
        opt.zero_grad()
        # two lookups in one forward pass: the second sees the rows the first renormed
        out = emb(torch.from_numpy(a)) * 2.0 + emb(torch.from_numpy(b)).sum(0)
        loss = ((out - torch.from_numpy(target)) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return emb.weight.detach().numpy(), np.array(losses)


def _batches():
    rng = np.random.default_rng(4)
    return [
        (
            rng.integers(0, V, (3, 4)),
            rng.integers(0, V, (2, 3, 4)),
            rng.normal(size=(3, 4, D)).astype(np.float32),
        )
        for _ in range(10)
    ]


@pytest.mark.parametrize(
    "opts",
    [OPTS, dict(padding_idx=1, max_norm=0.7), dict(max_norm=1.2, norm_type=float("inf"))],
    ids=["pad-mn-p3-freq", "pad-mn", "inf"],
)
def test_nnx_optimizer_training_matches_torch(opts):
    emb = jaxembed.Embedding(
        V, D, **opts, embedding_init=jax.nn.initializers.normal(2.0), rngs=nnx.Rngs(0)
    )
    start = np.asarray(emb.weight[...]).copy()
    optimizer = nnx.Optimizer(emb, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, a, b, target):
        def loss_fn(m):
            out = m(a) * 2.0 + m(b).sum(0)
            return jnp.mean((out - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(emb, optimizer, *batch)) for batch in _batches()]
    ref_w, ref_losses = _torch_adam_run(start, _batches(), opts)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.weight[...], ref_w, rtol=1e-5, atol=1e-5)


def test_linen_training_matches_torch():
    model = jaxembed.linen.Embedding(V, D, **OPTS, embedding_init=jax.nn.initializers.normal(2.0))
    variables = model.init(jax.random.key(0), jnp.array([0]))
    start = np.asarray(variables["params"]["weight"]).copy()
    tx = optax.adam(0.05)
    params = variables["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, a, b, target):
        def loss_fn(p):
            def fwd(mdl):
                return mdl(a) * 2.0 + mdl(b).sum(0)

            out, updates = nn.apply(fwd, model, mutable=["params"])({"params": p})
            return jnp.mean((out - target) ** 2), updates["params"]

        (loss, new_params), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, new_params)
        return optax.apply_updates(new_params, updates), opt_state, loss

    losses = []
    for batch in _batches():
        params, opt_state, loss = step(params, opt_state, *batch)
        losses.append(float(loss))
    ref_w, ref_losses = _torch_adam_run(start, _batches(), OPTS)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["weight"], ref_w, rtol=1e-5, atol=1e-5)


def test_from_pretrained_freeze():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)) * 3, jnp.float32)
    emb = jaxembed.Embedding.from_pretrained(table, padding_idx=2, max_norm=1.0)
    assert isinstance(emb.weight, jaxembed.FrozenWeight) and not isinstance(emb.weight, nnx.Param)
    np.testing.assert_array_equal(emb.weight[...][2], table[2])  # not zeroed
    optimizer = nnx.Optimizer(emb, optax.sgd(0.1), wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.array([0, 1])).sum(), argnums=nnx.DiffState(0, nnx.Param))(emb)
    assert jax.tree.leaves(grads) == []
    optimizer.update(emb, grads)
    # the renorm still applied to the looked-up rows, and nothing else moved
    np.testing.assert_allclose(np.linalg.norm(emb.weight[...][:2], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(emb.weight[...][2:], table[2:])

    trainable = jaxembed.Embedding.from_pretrained(table, freeze=False, padding_idx=2)
    assert isinstance(trainable.weight, nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.array([0, 2, 2])).sum())(trainable)
    np.testing.assert_array_equal(
        grads.weight[...], np.array([[1] * 3] + [[0] * 3] * 5, np.float32)
    )


def test_attend_nnx_and_linen():
    emb = jaxembed.Embedding(V, D, rngs=nnx.Rngs(0))
    q = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, D)), jnp.float32)
    np.testing.assert_allclose(emb.attend(q), q @ emb.weight[...].T, rtol=1e-6)
    bf = jaxembed.Embedding(V, D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bf.attend(q).dtype == jnp.bfloat16
    model = jaxembed.linen.Embedding(V, D)
    variables = model.init(jax.random.key(0), jnp.array([0]))
    scores = model.apply(variables, q, method="attend")
    np.testing.assert_allclose(scores, q @ variables["params"]["weight"].T, rtol=1e-6)


def test_linen_without_mutable_params():
    model = jaxembed.linen.Embedding(V, D, max_norm=0.5)
    variables = model.init(jax.random.key(0), jnp.array([0]))
    idx = jnp.array([1, 4])
    with pytest.warns(UserWarning, match="stored table was not updated"):
        out = model.apply(variables, idx)
    ref, _ = jaxembed.embedding(variables["params"], idx, max_norm=0.5)
    np.testing.assert_array_equal(out, ref)  # the output is renormed all the same
    quiet = jaxembed.linen.Embedding(V, D, max_norm=0.5, on_immutable="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(quiet.apply(variables, idx), ref)
    strict = jaxembed.linen.Embedding(V, D, max_norm=0.5, on_immutable="error")
    with pytest.raises(ValueError, match="mutable"):
        strict.apply(variables, idx)
    with warnings.catch_warnings():  # no max_norm: nothing to write, nothing said
        warnings.simplefilter("error")
        jaxembed.linen.Embedding(V, D).apply(variables, idx)


def test_no_retrace_nnx_and_linen():
    traces = []
    emb = jaxembed.Embedding(V, D, max_norm=1.0, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(m, i):
        traces.append(None)
        return m(i)

    f(emb, jnp.array([1, 2]))
    f(emb, jnp.array([3, 4]))
    assert len(traces) == 1
    model = jaxembed.linen.Embedding(V, D, max_norm=1.0)
    variables = model.init(jax.random.key(0), jnp.array([0]))

    @jax.jit
    def g(v, i):
        traces.append(None)
        return model.apply(v, i, mutable=["params"])

    _, upd = g(variables, jnp.array([1, 2]))
    g({**variables, **upd}, jnp.array([5, 6]))
    assert len(traces) == 2


@pytest.mark.parametrize(
    ("kw", "err", "name"),
    [
        (dict(num_embeddings=-1), ValueError, "num_embeddings"),
        (dict(embedding_dim=-3), ValueError, "embedding_dim"),
        (dict(padding_idx=V), ValueError, "padding_idx"),
        (dict(padding_idx=-V - 1), ValueError, "padding_idx"),
        (dict(max_norm=0.0), ValueError, "max_norm"),
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(norm_type=0.0), ValueError, "norm_type"),
        (dict(param_dtype=jnp.int32), TypeError, "param_dtype"),
    ],
)
def test_bad_configuration_raises_at_construction(kw, err, name):
    args = dict(num_embeddings=V, embedding_dim=D) | kw
    with pytest.raises(err, match=name):
        jaxembed.Embedding(**args, rngs=nnx.Rngs(0))
    with pytest.raises(err, match=name):
        jaxembed.linen.Embedding(**args)


def test_linen_bad_on_immutable():
    with pytest.raises(ValueError, match="on_immutable"):
        jaxembed.linen.Embedding(V, D, on_immutable="sometimes")


def test_empty_tables_allowed():
    emb = jaxembed.Embedding(0, D, rngs=nnx.Rngs(0))
    assert emb.weight[...].shape == (0, D)
    assert emb(jnp.zeros((0,), jnp.int32)).shape == (0, D)
    model = jaxembed.linen.Embedding(V, 0)
    variables = model.init(jax.random.key(0), jnp.array([1]))
    assert model.apply(variables, jnp.array([1, 2])).shape == (2, 0)


def test_module_index_error_leaves_state_alone():
    emb = jaxembed.Embedding(V, D, max_norm=0.1, rngs=nnx.Rngs(0))
    before = np.asarray(emb.weight[...]).copy()
    with pytest.raises(IndexError):
        emb(np.array([0, V]))
    np.testing.assert_array_equal(emb.weight[...], before)


def test_with_partitioning_places_the_table_on_a_mesh():
    """Fake devices must be set before JAX starts: its own process."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import PartitionSpec as P
        import jaxembed
        mesh = jax.make_mesh((4,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,))
        init = nnx.with_partitioning(jaxembed.default_embedding_init, ("vocab", None), mesh=mesh)
        emb = jaxembed.Embedding(16, 3, padding_idx=1, max_norm=1.0, embedding_init=init,
                                 rngs=nnx.Rngs(0))
        w = emb.weight[...]
        assert w.sharding.spec == P("vocab", None), w.sharding
        assert len(w.sharding.device_set) == 4
        idx = jnp.array([1, 2, 15])
        ref, new = jaxembed.embedding({"weight": w}, idx, padding_idx=1, max_norm=1.0)
        out = nnx.jit(lambda m, i: m(i))(emb, jnp.array([1, 2, 15]))
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(emb.weight[...], new["weight"])
        assert emb.weight[...].sharding.spec == P("vocab", None)
        print("sharded ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sharded ok" in res.stdout
