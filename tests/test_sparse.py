"""Sparse training: row-wise optimizers against torch's sparse optimizers, NumPy and optax."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxembed
from jaxembed import sparse
from jaxembed.sparse import _update as _sparse_update

V, D, STEPS = 13, 5, 5


def _batches(seed=0, shape=(6, 4), vocab=V, steps=STEPS):
    """Small vocab, many duplicates (rows occur up to ~8 times per batch)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, vocab, shape), rng.normal(size=shape + (D,)).astype(np.float32))
        for _ in range(steps)
    ]


def _weight(seed=1, vocab=V):
    return np.random.default_rng(seed).normal(size=(vocab, D)).astype(np.float32)


def _loss(rows, target):
    return jnp.mean((rows - target) ** 2)


def _linear_loss(rows, target):
    return jnp.sum(rows * target)


def _jax_run(opt, w0, batches, kw, jit=True, loss=_loss):
    table = jnp.asarray(w0)
    state = opt.init(table)

    def step(table, state, ids, target):
        rows, lk = sparse.lookup({"weight": table}, ids, **kw)
        value, g = jax.value_and_grad(loss)(rows, target)
        table, state = opt.update(lk.grad(g), state, lk.params["weight"])
        return table, state, value

    if jit:
        step = jax.jit(step, donate_argnums=(0, 1))
    losses = []
    for ids, target in batches:
        table, state, value = step(table, state, ids, target)
        losses.append(float(value))
    return np.asarray(table), state, np.array(losses)


def _torch_run(make_opt, w0, batches, kw):
    """torch's sparse path; with scale_grad_by_freq (which torch refuses with sparse=True) the
    dense gradient is turned into the COO gradient torch's sparse backward would produce."""
    sgbf = kw.get("scale_grad_by_freq", False)
    emb = torch.nn.Embedding.from_pretrained(torch.tensor(w0), freeze=False, sparse=not sgbf, **kw)
    opt = make_opt(emb.parameters())
    losses = []
    for ids, target in batches:
        opt.zero_grad(set_to_none=True)
        idx = torch.from_numpy(ids)
        loss = ((emb(idx) - torch.from_numpy(target)) ** 2).mean()
        loss.backward()
        if sgbf:
            rows = torch.unique(idx.reshape(-1))
            if kw.get("padding_idx") is not None:
                rows = rows[rows != emb.padding_idx]
            dense = emb.weight.grad
            emb.weight.grad = torch.sparse_coo_tensor(rows[None], dense[rows], dense.shape)
        opt.step()
        losses.append(loss.item())
    return emb.weight.detach().numpy(), np.array(losses)


OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.3), lambda: sparse.sgd(0.3)),
    "sgd_momentum": (
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, dampening=0.2),
        lambda: sparse.sgd(0.3, momentum=0.9, dampening=0.2),
    ),
    "sgd_nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, nesterov=True, maximize=True),
        lambda: sparse.sgd(0.2, momentum=0.8, nesterov=True, maximize=True),
    ),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.3), lambda: sparse.adagrad(0.3)),
    "adagrad_options": (
        lambda p: torch.optim.Adagrad(
            p, lr=0.3, lr_decay=0.1, initial_accumulator_value=0.2, eps=1e-6
        ),
        lambda: sparse.adagrad(0.3, lr_decay=0.1, initial_accumulator_value=0.2, eps=1e-6),
    ),
    "sparse_adam": (
        lambda p: torch.optim.SparseAdam(p, lr=0.1),
        lambda: sparse.lazy_adam(0.1),
    ),
    "sparse_adam_options": (
        lambda p: torch.optim.SparseAdam(p, lr=0.2, betas=(0.8, 0.95), eps=1e-6),
        lambda: sparse.lazy_adam(0.2, b1=0.8, b2=0.95, eps=1e-6),
    ),
}

OPTIONS = {
    "plain": {},
    "padding": {"padding_idx": 3},
    "max_norm": {"max_norm": 1.2},
    "max_norm_p1_padding": {"max_norm": 2.0, "norm_type": 1.0, "padding_idx": 0},
    "scale_grad_by_freq": {"scale_grad_by_freq": True},
    "all": {"padding_idx": 5, "max_norm": 1.5, "scale_grad_by_freq": True},
}


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_torch_sparse_optimizers(name, option):
    make_torch, make_jax = OPTIMIZERS[name]
    kw = OPTIONS[option]
    w0, batches = _weight(), _batches()
    want, want_losses = _torch_run(make_torch, w0, batches, kw)
    got, _, losses = _jax_run(make_jax(), w0, batches, kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    if "padding_idx" in kw:  # the padding row never moves
        np.testing.assert_array_equal(got[kw["padding_idx"]], want[kw["padding_idx"]])


@pytest.mark.parametrize("shape", [(0,), (), (1,), (3, 0, 2)])
def test_empty_and_scalar_index_shapes_match_torch(shape):
    w0 = _weight()
    rng = np.random.default_rng(3)
    batches = [
        (rng.integers(0, V, shape), rng.normal(size=shape + (D,)).astype(np.float32))
        for _ in range(3)
    ]
    make_torch, make_jax = OPTIMIZERS["sparse_adam"]
    got, state, _ = _jax_run(make_jax(), w0, batches, {})
    if int(np.prod(shape)) == 0:  # nothing looked up: nothing changes, but the step counts
        np.testing.assert_array_equal(got, w0)
        assert int(state.count) == 3
    else:
        want, _ = _torch_run(make_torch, w0, [(i, t) for i, t in batches], {})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _rowwise_adagrad_numpy(w0, batches, lr, eps, wd, padding_idx, maximize=False):
    """FBGEMM's exact row-wise Adagrad, written out per row."""
    w = w0.astype(np.float64).copy()
    acc = np.zeros(w.shape[0])
    for ids, target in batches:
        rows = w[ids]
        g = 2 * (rows - target) / rows.size  # d mean((rows - target)**2) / d rows
        summed = {}
        for r, gr in zip(ids.reshape(-1), g.reshape(-1, D), strict=True):
            if r != padding_idx:
                summed[r] = summed.get(r, 0) + gr
        for r, gr in summed.items():
            gr = -gr if maximize else gr
            gr = gr + wd * w[r]
            acc[r] += np.mean(gr**2)
            w[r] -= lr / (np.sqrt(acc[r]) + eps) * gr
    return w, acc


@pytest.mark.parametrize(
    "wd,padding_idx,maximize", [(0.0, None, False), (0.05, 2, False), (0.0, None, True)]
)
def test_rowwise_adagrad_matches_numpy(wd, padding_idx, maximize):
    w0, batches = _weight(), _batches(5)
    opt = sparse.rowwise_adagrad(0.5, eps=1e-6, weight_decay=wd, maximize=maximize)
    got, state, _ = _jax_run(opt, w0, batches, {"padding_idx": padding_idx})
    want, acc = _rowwise_adagrad_numpy(w0, batches, 0.5, 1e-6, wd, padding_idx, maximize)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.sum, acc, rtol=1e-5, atol=1e-7)
    assert state.sum.shape == (V,)  # one accumulator per row


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_sparse_sgd_equals_dense_sgd_exactly(option):
    """Sparse SGD on the rows == optax.sgd on jaxembed.embedding's dense gradient, bit for bit.

    The loss is linear in the rows, so both programs get the very same row cotangents and only
    the summing of duplicates and the update can differ: they must not.
    """
    kw = OPTIONS[option]
    w0 = _weight()
    # rows repeated up to 6 times, so the order in which duplicates are summed matters
    batches = _batches(7, shape=(40,))
    got, _, _ = _jax_run(sparse.sgd(0.7), w0, batches, kw, loss=_linear_loss)
    tx = optax.sgd(0.7)
    params = {"weight": jnp.asarray(w0)}
    state = tx.init(params)

    @jax.jit
    def dense_step(params, state, ids, target):
        def loss_fn(p):
            out, new_params = jaxembed.embedding(p, ids, **kw)
            return _linear_loss(out, target), new_params

        grads, new_params = jax.grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(grads, state, new_params)
        return optax.apply_updates(new_params, updates), state

    for ids, target in batches:
        params, state = dense_step(params, state, ids, target)
    np.testing.assert_array_equal(got, np.asarray(params["weight"]))


def test_coalesce_paths_agree_across_many_chunks():
    """The CPU chunk loop (many chunks of duplicates) and the GPU/TPU scatter give equal sums."""
    rng = np.random.default_rng(0)
    n = 3 * _sparse_update._CHUNK + 123
    indices = jnp.asarray(rng.integers(0, 5, n).astype(np.int32).tolist() + [7, 9, -1])
    values = jnp.asarray(rng.normal(size=(n + 3, 3)).astype(np.float32))
    owners = _sparse_update._owners(jnp.where(indices < 0, 8, indices), 8)
    first = owners == jnp.arange(n + 3)
    extra = (indices >= 0) & ~first
    a = jax.jit(_sparse_update._add_duplicates_in_chunks)(values, owners, extra)
    b = jax.jit(_sparse_update._add_duplicates_scatter)(values, owners, extra)
    np.testing.assert_array_equal(np.asarray(a)[first], np.asarray(b)[first])
    rows, summed = jax.jit(_sparse_update.coalesce, static_argnums=1)(
        sparse.SparseGrad(indices, values), 8
    )
    for r in range(5):
        k = int(np.flatnonzero(np.asarray(rows) == r)[0])
        np.testing.assert_allclose(
            summed[k], values[:n][np.asarray(indices[:n]) == r].sum(0), rtol=1e-4, atol=1e-4
        )
    assert sorted(np.asarray(rows)[np.asarray(rows) < 8].tolist()) == [0, 1, 2, 3, 4, 7]


@pytest.mark.parametrize("name", ["sgd", "adagrad", "sparse_adam"])
def test_chunked_update_matches_torch_on_a_large_batch(name):
    """More entries than one CPU chunk: the chunk loop plus its tail."""
    make_torch, make_jax = OPTIMIZERS[name]
    vocab = 3000
    w0 = _weight(vocab=vocab)
    batches = _batches(11, shape=(_sparse_update._CHUNK + 1000,), vocab=vocab, steps=3)
    want, _ = _torch_run(make_torch, w0, batches, {})
    got, _, _ = _jax_run(make_jax(), w0, batches, {})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_out_of_range_entries_under_jit_are_dropped():
    opt = sparse.lazy_adam(0.1)
    table = jnp.asarray(_weight())
    grad = sparse.SparseGrad(jnp.array([V, -1, 2, V + 5]), jnp.ones((4, D)))
    new, state = jax.jit(opt.update)(grad, opt.init(table), table)
    changed = np.flatnonzero(np.any(np.asarray(new) != np.asarray(table), axis=1))
    assert changed.tolist() == [2]
    assert np.flatnonzero(np.asarray(state.mu).any(1)).tolist() == [2]


def test_step_does_not_retrace_and_donation_is_honoured():
    traces = []
    opt = sparse.lazy_adam(0.05)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(table, state, ids, target):
        traces.append(1)
        rows, lk = sparse.lookup({"weight": table}, ids, max_norm=1.0, padding_idx=0)
        g = jax.grad(_loss)(rows, target)
        return opt.update(lk.grad(g), state, lk.params["weight"])

    table = jnp.asarray(_weight())
    state = opt.init(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" would raise
        for ids, target in _batches(2):
            old = table
            table, state = step(table, state, ids, target)
    assert len(traces) == 1
    assert old.is_deleted()  # the table's buffer was handed to the step


def test_bfloat16_table_keeps_its_dtype():
    opt = sparse.lazy_adam(0.1)
    table = jnp.asarray(_weight(), jnp.bfloat16)
    rows, lk = sparse.lookup({"weight": table}, jnp.array([1, 1, 4]))
    g = jax.grad(lambda r: jnp.sum(r.astype(jnp.float32) ** 2))(rows)
    new, state = opt.update(lk.grad(g), opt.init(table), lk.params["weight"])
    assert new.dtype == state.mu.dtype == jnp.bfloat16
    assert np.flatnonzero(np.any(np.asarray(new != table), axis=1)).tolist() == [1, 4]


def test_learning_rate_schedule():
    schedule = optax.linear_schedule(0.5, 0.0, 4)
    opt = sparse.sgd(schedule)
    table = jnp.zeros((3, 1))
    state = opt.init(table)
    grad = sparse.SparseGrad(jnp.array([1]), jnp.ones((1, 1)))
    for _ in range(3):
        table, state = opt.update(grad, state, table)
    np.testing.assert_allclose(table[1, 0], -(0.5 + 0.375 + 0.25))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sparse.sgd(0.1, weight_decay=0.1), "weight_decay"),
        (lambda: sparse.adagrad(0.1, weight_decay=0.1), "weight_decay"),
        (lambda: sparse.sgd(0.1, nesterov=True), "nesterov"),
        (lambda: sparse.sgd(-0.1), "learning_rate"),
        (lambda: sparse.sgd(0.1, momentum=-1), "momentum"),
        (lambda: sparse.lazy_adam(b1=1.0), "b1"),
        (lambda: sparse.lazy_adam(b2=-0.1), "b2"),
        (lambda: sparse.adagrad(eps=float("nan")), "eps"),
        (lambda: sparse.rowwise_adagrad(initial_accumulator_value=-1), "initial_accumulator"),
        (lambda: sparse.adagrad(lr_decay=-1), "lr_decay"),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types():
    with pytest.raises(TypeError, match="learning_rate"):
        sparse.sgd("0.1")
    with pytest.raises(TypeError, match="maximize"):
        sparse.lazy_adam(maximize=1)
    opt = sparse.sgd(0.1)
    table = jnp.zeros((4, 2))
    with pytest.raises(TypeError, match="SparseGrad"):
        opt.update((jnp.array([1]), jnp.ones((1, 2))), opt.init(table), table)
    with pytest.raises(TypeError, match="integer"):
        opt.update(sparse.SparseGrad(jnp.array([1.0]), jnp.ones((1, 2))), opt.init(table), table)
    with pytest.raises(ValueError, match="values"):
        opt.update(sparse.SparseGrad(jnp.array([1]), jnp.ones((1, 3))), opt.init(table), table)
    with pytest.raises(TypeError, match="floating"):
        opt.init(jnp.zeros((4, 2), jnp.int32))


def test_lookup_checks_like_embedding_and_row_grads_shape():
    params = {"weight": jnp.zeros((4, 2))}
    with pytest.raises(IndexError):
        sparse.lookup(params, np.array([4]))
    with pytest.raises(TypeError):
        sparse.lookup(params, np.array([1.0]))
    with pytest.raises(ValueError, match="padding_idx"):
        sparse.lookup(params, np.array([1]), padding_idx=9)
    _, lk = sparse.lookup(params, np.array([1, 2]))
    with pytest.raises(ValueError, match="row_grads"):
        lk.grad(jnp.ones((3, 2)))


def test_lookup_rows_equal_embedding_and_renorm_is_returned():
    w0 = _weight()
    ids = np.array([[1, 2, 2], [0, 5, 1]])
    kw = {"max_norm": 0.9, "padding_idx": 2}
    rows, lk = sparse.lookup({"weight": jnp.asarray(w0)}, ids, **kw)
    out, new_params = jaxembed.embedding({"weight": jnp.asarray(w0)}, ids, **kw)
    np.testing.assert_array_equal(rows, out)
    np.testing.assert_array_equal(lk.params["weight"], new_params["weight"])
    assert lk.indices.tolist() == [1, V, V, 0, 5, 1]  # padding dropped
    # rows carry no gradient to the table: only through row_grads
    g = jax.grad(lambda w: sparse.lookup({"weight": w}, ids)[0].sum())(jnp.asarray(w0))
    assert not np.asarray(g).any()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_scalar_index_with_padding():
    """Found by the fuzzer: torch's sparse backward raises IndexError for a 0-d index when the
    module has a padding_idx. jaxembed handles it, and matches torch run on the same index as a
    1-element vector."""
    w0 = _weight()
    emb = torch.nn.Embedding.from_pretrained(
        torch.tensor(w0), freeze=False, sparse=True, padding_idx=0
    )
    with pytest.raises(IndexError):
        emb(torch.tensor(3)).sum().backward()
    batches = [(np.array(3), np.ones(D, np.float32)), (np.array(0), np.ones(D, np.float32))]
    got, _, _ = _jax_run(OPTIMIZERS["sgd"][1](), w0, batches, {"padding_idx": 0})
    want, _ = _torch_run(
        OPTIMIZERS["sgd"][0], w0, [(i.reshape(1), t[None]) for i, t in batches], {"padding_idx": 0}
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "lazy_adam"])
def test_no_table_sized_temporary(name):
    """The compiled step allocates O(batch) scratch: nothing near the (V, D) table's size."""
    vocab, dim, n = 200_000, 16, 256
    opt = {
        "sgd": sparse.sgd(0.1),
        "adagrad": sparse.adagrad(0.1),
        "rowwise_adagrad": sparse.rowwise_adagrad(0.1),
        "lazy_adam": sparse.lazy_adam(0.1),
    }[name]
    table = jax.ShapeDtypeStruct((vocab, dim), jnp.float32)
    state = jax.eval_shape(opt.init, table)

    def step(table, state, ids, target):
        rows, lk = sparse.lookup({"weight": table}, ids, max_norm=1.0)
        g = jax.grad(_loss)(rows, target)
        return opt.update(lk.grad(g), state, lk.params["weight"])

    ids = jax.ShapeDtypeStruct((n,), jnp.int32)
    target = jax.ShapeDtypeStruct((n, dim), jnp.float32)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(table, state, ids, target).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # the first-entry scratch is one int32 per row (dim times smaller than the table); the rest
    # is O(batch)
    assert temp <= vocab * 4 + 64 * n * dim * 4, temp
    assert temp < vocab * dim * 4 / 4
