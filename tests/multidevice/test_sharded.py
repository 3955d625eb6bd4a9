"""Sharded lookups on 8 devices equal the unsharded ones.

These need 8 devices: ``tests/test_sharding.py`` runs this folder in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts); in the main test
process, with one CPU device, the module is skipped. Run it alone with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed
from jaxembed import sparse

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through tests/test_sharding.py)", allow_module_level=True)

MESHES = [(1, 8), (2, 4), (4, 2)]
# (vocab, dim, batch) over the mesh axes ("data", "model")
LAYOUTS = {
    "vocab+batch": ("model", None, "data"),
    "dim+batch": (None, "model", "data"),
    "vocab+dim": ("data", "model", None),
    "vocab": (("data", "model"), None, None),
}
V, D = 32, 8  # V: a multiple of 8; 24 rows would not split over 16 shards of ('data', 'model')


def _grid(layouts, variants, rich, every_layout=True):
    """Every variant on the 2x4 mesh (for every layout, or the first only), and the ``rich`` one
    for every layout on all three meshes."""
    first = layouts if every_layout else layouts[:1]
    cases = [((2, 4), layout, v) for layout in first for v in variants]
    cases += [((2, 4), layout, rich) for layout in layouts if layout not in first]
    return cases + [(m, layout, rich) for layout in layouts for m in MESHES if m != (2, 4)]


def _mesh(shape, explicit=True):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def _layout(shape, name, explicit=True):
    vocab, dim, batch = LAYOUTS[name]
    return jaxembed.TableSharding(_mesh(shape, explicit), vocab=vocab, dim=dim, batch=batch)


def _table(key=0, dtype=jnp.float32, rows=V, cols=D):
    return (jax.random.normal(jax.random.key(key), (rows, cols)) * 1.5).astype(dtype)


def _ids(shape=(8, 5), vocab=V, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, shape)
    ids.flat[:3] = 1  # duplicates
    return ids.astype(np.int32)


def _put(layout, ids):
    return layout.put_indices(ids) if layout.batch is not None else jnp.asarray(ids)


def _check_equal(got, want, exact, rtol=2e-6, atol=1e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# -- embedding -----------------------------------------------------------------------------------

OPTIONS = [
    dict(),
    dict(padding_idx=1, scale_grad_by_freq=True),
    dict(max_norm=1.0),
    dict(max_norm=2.0, norm_type=1.0, padding_idx=0, scale_grad_by_freq=True),
    dict(max_norm=1.0, norm_type=float("inf"), lookup_style="one_hot"),
]


@pytest.mark.parametrize(
    ("mesh_shape", "layout_name", "options"),
    _grid(list(LAYOUTS), OPTIONS, OPTIONS[3]),
    ids=lambda x: ",".join(x) if isinstance(x, dict) else None,
)
def test_embedding_equals_unsharded(mesh_shape, layout_name, options):
    layout = _layout(mesh_shape, layout_name)
    weight, ids = _table(), _ids()
    params = layout.put({"weight": weight})
    sharded_ids = _put(layout, ids)

    def loss(p, i, sharding):
        out, new = jaxembed.embedding(p, i, sharding=sharding, **options)
        return (out**3).sum(), (out, new)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
    (_, (out, new)), grad = step(params, sharded_ids, layout)
    (_, (ref, ref_new)), ref_grad = jax.value_and_grad(loss, has_aux=True)(
        {"weight": weight}, ids, None
    )
    # split columns change the order of a norm's sum: the renormed rows may move by an ulp
    exact = layout.dim is None or "max_norm" not in options or options.get("norm_type") == np.inf
    _check_equal(out, ref, exact)
    _check_equal(new["weight"], ref_new["weight"], exact)
    _check_equal(grad["weight"], ref_grad["weight"], exact=False)
    assert new["weight"].sharding == params["weight"].sharding  # new_params keeps the sharding
    assert grad["weight"].sharding.spec == layout.spec
    assert out.sharding.spec == layout.output_spec(2)


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "auto"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_mesh_kinds_and_dtypes(explicit, dtype):
    layout = _layout((2, 4), "vocab+batch", explicit)
    weight, ids = _table(dtype=dtype), _ids((4, 3, 2))  # 3-D indices
    out, new = jax.jit(
        lambda p, i: jaxembed.embedding(p, i, max_norm=1.0, padding_idx=2, sharding=layout)
    )(layout.put({"weight": weight}), _put(layout, ids))
    ref, ref_new = jaxembed.embedding({"weight": weight}, ids, max_norm=1.0, padding_idx=2)
    assert out.dtype == dtype and out.shape == (4, 3, 2, D)
    _check_equal(out, ref, exact=True)
    _check_equal(new["weight"], ref_new["weight"], exact=True)


def test_unsharded_input_is_placed():
    """A table or indices not yet on the mesh are laid out by the call itself."""
    layout = _layout((2, 4), "vocab+batch")
    weight, ids = _table(), _ids()
    out, new = jaxembed.embedding({"weight": weight}, ids, max_norm=1.0, sharding=layout)
    ref, ref_new = jaxembed.embedding({"weight": weight}, ids, max_norm=1.0)
    _check_equal(out, ref, exact=True)
    _check_equal(new["weight"], ref_new["weight"], exact=True)
    assert new["weight"].sharding.spec == layout.spec


def test_out_of_range_under_jit_gives_nan_rows_and_no_gradient():
    layout = _layout((2, 4), "vocab+batch")
    weight = _table()
    ids = jnp.array([[3, V, -1, 5]] * 2)

    def loss(p, i):
        out, _ = jaxembed.embedding(p, i, max_norm=1.0, sharding=layout)
        return jnp.where(jnp.isnan(out), 0, out).sum(), out

    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        layout.put({"weight": weight}), _put(layout, ids)
    )
    out = np.asarray(out)
    assert np.isnan(out[:, 1:3]).all() and not np.isnan(out[:, [0, 3]]).any()
    g = np.asarray(grad["weight"])
    assert set(np.nonzero(g.any(1))[0]) == {3, 5}


def test_empty_and_scalar_indices():
    layout = jaxembed.TableSharding(_mesh((2, 4)), vocab="model")
    params = layout.put({"weight": _table()})
    out, _ = jaxembed.embedding(params, jnp.zeros((0, 4), jnp.int32), sharding=layout)
    assert out.shape == (0, 4, D)
    out, _ = jaxembed.embedding(params, jnp.array(7), max_norm=1.0, sharding=layout)
    _check_equal(out, jaxembed.embedding({"weight": _table()}, jnp.array(7), max_norm=1.0)[0], True)
    batched = _layout((2, 4), "vocab+batch")
    out, _ = jaxembed.embedding(params, jnp.zeros((0,), jnp.int32), sharding=batched)
    assert out.shape == (0, D)


# -- uneven shapes and bad configurations --------------------------------------------------------


def test_vocab_not_divisible_raises_and_pad_vocab_fixes_it():
    layout = _layout((2, 4), "vocab+batch")
    weight, ids = _table(rows=30), _ids(vocab=30)
    with pytest.raises(ValueError, match=r"num_embeddings=30 is not a multiple of the 4 shards"):
        jaxembed.embedding({"weight": weight}, ids, sharding=layout)
    with pytest.raises(ValueError, match="num_embeddings=30"):
        layout.put({"weight": weight})
    padded = layout.put(layout.pad_vocab({"weight": weight}))
    assert padded["weight"].shape == (32, D)
    np.testing.assert_array_equal(np.asarray(padded["weight"])[30:], 0)

    def loss(p, i, sharding):
        out, new = jaxembed.embedding(p, i, max_norm=1.0, sharding=sharding)
        return (out**2).sum(), (out, new)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
    (_, (out, new)), grad = grad_fn(padded, _put(layout, ids), layout)
    (_, (ref, ref_new)), ref_grad = grad_fn({"weight": weight}, ids, None)
    _check_equal(out, ref, exact=True)
    _check_equal(np.asarray(new["weight"])[:30], ref_new["weight"], exact=True)
    _check_equal(np.asarray(grad["weight"])[:30], ref_grad["weight"], exact=False)
    np.testing.assert_array_equal(np.asarray(grad["weight"])[30:], 0)


def test_bad_configurations_raise_value_errors():
    mesh = _mesh((2, 4))
    params = {"weight": _table()}
    with pytest.raises(ValueError, match="embedding_dim=6 is not a multiple of the 4 shards"):
        jaxembed.embedding(
            {"weight": _table(cols=6)}, _ids(), sharding=jaxembed.TableSharding(mesh, dim="model")
        )
    with pytest.raises(ValueError, match=r"indices of shape \(5, 2\).*multiple of 2"):
        jaxembed.embedding(
            params, _ids((5, 2)), sharding=jaxembed.TableSharding(mesh, vocab="model", batch="data")
        )
    with pytest.raises(ValueError, match="indices of shape"):
        jaxembed.embedding(
            params, jnp.array(3), sharding=jaxembed.TableSharding(mesh, batch="data")
        )
    with pytest.raises(ValueError, match="vocab='rows' names no axis of the mesh"):
        jaxembed.embedding(params, _ids(), sharding=jaxembed.TableSharding(mesh, vocab="rows"))
    with pytest.raises(ValueError, match="distinct mesh axes"):
        jaxembed.TableSharding(mesh, vocab="model", dim="model")
    with pytest.raises(ValueError, match="no mesh"):
        jaxembed.embedding(params, _ids(), sharding=jaxembed.TableSharding(vocab="model"))
    with pytest.raises(TypeError, match=r"sharding must be a jaxembed\.TableSharding"):
        jaxembed.embedding(params, _ids(), sharding=mesh)
    with pytest.raises(TypeError, match="vocab must be a mesh axis name"):
        jaxembed.TableSharding(mesh, vocab=3)
    with pytest.raises(ValueError, match="batch splits 2-D bags only"):
        jaxembed.embedding_bag(
            params,
            _ids((8,)),
            jnp.array([0, 4]),
            sharding=jaxembed.TableSharding(mesh, vocab="model", batch="data"),
        )


def test_context_mesh():
    """``TableSharding(mesh=None)`` runs on the mesh set with ``jax.set_mesh``."""
    mesh = _mesh((2, 4))
    layout = jaxembed.TableSharding(vocab="model", batch="data")
    weight, ids = _table(), _ids()
    with jax.set_mesh(mesh):
        out, _ = jax.jit(lambda p, i: jaxembed.embedding(p, i, sharding=layout))(
            layout.put({"weight": weight}), layout.put_indices(ids)
        )
    _check_equal(out, jaxembed.embedding({"weight": weight}, ids)[0], exact=True)


# -- bags ----------------------------------------------------------------------------------------

BAG_OPTIONS = [
    dict(mode="sum", per_sample_weights=True, scale_grad_by_freq=True, padding_idx=1),
    dict(mode="mean", max_norm=1.0),
    dict(mode="max", max_norm=1.0, padding_idx=1),
]


@pytest.mark.parametrize(
    ("mesh_shape", "layout_name", "options"),
    _grid(["vocab+batch", "dim+batch", "vocab+dim"], BAG_OPTIONS, BAG_OPTIONS[0], False),
    ids=lambda x: x["mode"] if isinstance(x, dict) else None,
)
def test_bags_equal_unsharded(mesh_shape, layout_name, options):
    layout = _layout(mesh_shape, layout_name)
    weight, ids = _table(), _ids((8, 5))
    options = dict(options)
    psw = None
    if options.pop("per_sample_weights", False):
        psw = jnp.asarray(np.random.default_rng(1).normal(size=ids.shape), jnp.float32)

    def loss(p, w, i, sharding):
        out, new = jaxembed.embedding_bag(p, i, per_sample_weights=w, sharding=sharding, **options)
        return (out**3).sum(), (out, new)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1) if psw is not None else 0, has_aux=True)
    (_, (out, new)), grad = jax.jit(grad_fn, static_argnums=3)(
        layout.put({"weight": weight}), psw, _put(layout, ids), layout
    )
    (_, (ref, ref_new)), ref_grad = grad_fn({"weight": weight}, psw, ids, None)
    # split columns compile the reduction differently (fused multiply-adds): ulps apart
    exact = layout.dim is None
    _check_equal(out, ref, exact)
    if "max_norm" in options:
        _check_equal(new["weight"], ref_new["weight"], exact)
        assert new["weight"].sharding.spec == layout.spec
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        _check_equal(g, r, exact=False)


@pytest.mark.parametrize("num_valid", [None, 14])
@pytest.mark.parametrize("layout_name", ["vocab", "vocab+dim"])
def test_offset_bags_equal_unsharded(layout_name, num_valid):
    layout = _layout((2, 4), layout_name)
    weight, ids = _table(), _ids((20,))
    offsets = jnp.array([0, 3, 3, 11])
    for mode in ("sum", "mean", "max"):

        def loss(p, sharding, mode=mode):
            out, _ = jaxembed.embedding_bag(
                p, ids, offsets, mode=mode, num_valid=num_valid, sharding=sharding
            )
            return (out**3).sum(), out

        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        (_, out), grad = grad_fn(layout.put({"weight": weight}), layout)
        (_, ref), ref_grad = grad_fn({"weight": weight}, None)
        _check_equal(out, ref, exact=True)
        _check_equal(grad["weight"], ref_grad["weight"], exact=False)


# -- sparse training -----------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda: sparse.sgd(0.1),
    "sgd_momentum": lambda: sparse.sgd(0.1, momentum=0.9, nesterov=True),
    "adagrad": lambda: sparse.adagrad(0.1, lr_decay=0.01),
    "rowwise_adagrad": lambda: sparse.rowwise_adagrad(0.1, weight_decay=0.01),
    "lazy_adam": lambda: sparse.lazy_adam(0.05),
}


def _sparse_steps(make_opt, layout, weight, ids, options, steps=3):
    opt = make_opt() if layout is None else sparse.sharded(make_opt(), layout)
    params = {"weight": weight} if layout is None else layout.put({"weight": weight})
    ids = ids if layout is None else _put(layout, ids)
    state = opt.init(params["weight"])

    @jax.jit
    def step(params, state):
        rows, lk = sparse.lookup(params, ids, sharding=layout, **options)
        row_grads = jax.grad(lambda r: (r**3).sum())(rows)
        table, state = opt.update(lk.grad(row_grads), state, lk.params["weight"])
        return {"weight": table}, state

    for _ in range(steps):
        params, state = step(params, state)
    return params["weight"], state


@pytest.mark.parametrize(
    ("mesh_shape", "layout_name", "opt_name"),
    _grid(["vocab+batch", "dim+batch", "vocab+dim"], list(OPTIMIZERS), "rowwise_adagrad", False),
)
def test_sparse_training_equals_unsharded(mesh_shape, layout_name, opt_name):
    layout = _layout(mesh_shape, layout_name)
    options = dict(padding_idx=2, max_norm=2.0)
    weight, ids = _table(), _ids()
    table, state = _sparse_steps(OPTIMIZERS[opt_name], layout, weight, ids, options)
    ref_table, ref_state = _sparse_steps(OPTIMIZERS[opt_name], None, weight, ids, options)
    # vocab-split tables sum each row's entries in the unsharded order: bit for bit, except where
    # XLA contracts row-wise Adagrad's scaled update into the scatter's add in one program only
    exact = layout.dim is None and opt_name != "rowwise_adagrad"
    _check_equal(table, ref_table, exact, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        _check_equal(got, want, exact, rtol=1e-5, atol=1e-6)
    assert table.sharding.spec == layout.spec
    for leaf in jax.tree.leaves(state):
        expected = {0: P(), 1: P(layout.vocab), 2: layout.spec}[leaf.ndim]
        assert leaf.sharding.spec == expected


@pytest.mark.parametrize("opt_name", ["sgd", "lazy_adam"])
def test_sparse_training_with_frequency_scaling(opt_name):
    """Equal up to rounding: unsharded, XLA fuses the ``1/count`` product into the update's
    multiply-adds; sharded, the entries' gather sits between them."""
    layout = _layout((2, 4), "vocab+batch")
    options = dict(padding_idx=2, max_norm=2.0, scale_grad_by_freq=True)
    weight, ids = _table(), _ids()
    table, _ = _sparse_steps(OPTIMIZERS[opt_name], layout, weight, ids, options)
    ref_table, _ = _sparse_steps(OPTIMIZERS[opt_name], None, weight, ids, options)
    _check_equal(table, ref_table, exact=False, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(np.asarray(table), np.asarray(weight))


def test_sparse_update_is_in_place_per_device():
    """Donated, the table's per-device buffers are reused: nothing table-sized is allocated."""
    layout = _layout((2, 4), "vocab+batch")
    opt = sparse.sharded(sparse.lazy_adam(0.1), layout)
    params = layout.put({"weight": _table(rows=4096, cols=64)})
    state = opt.init(params["weight"])
    ids = layout.put_indices(_ids((8, 5), vocab=4096))

    def step(table, state):
        rows, lk = sparse.lookup({"weight": table}, ids, sharding=layout)
        return opt.update(lk.grad(jnp.ones_like(rows)), state, lk.params["weight"])

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params["weight"], state).compile()
    local_table = 4096 // 4 * 64 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < local_table
    table, _ = compiled(params["weight"], state)
    assert params["weight"].is_deleted()
    assert table.addressable_shards[0].data.shape == (1024, 64)


# -- no all-gather of the table ------------------------------------------------------------------


def _table_sized_collectives(hlo: str, rows: int) -> list[str]:
    """HLO collectives (all-gather, all-to-all, collective-permute) producing a ``[rows, ...]``
    array: moving the table, or a whole-vocab block of it, between devices."""
    pattern = re.compile(r"= \w+\[(\d+)(?:,\d+)*\][^ ]* (all-gather|all-to-all|collective-permute)")
    return [m.group(0) for m in pattern.finditer(hlo) if int(m.group(1)) >= rows]


def test_checker_finds_an_all_gathered_table():
    """The check below can fail: a lookup that first replicates the vocab-sharded table compiles
    to an all-gather of it."""
    mesh = _mesh((2, 4), explicit=False)
    table = jax.device_put(_table(rows=4096), NamedSharding(mesh, P("model", None)))
    ids = jax.device_put(_ids((8, 5), vocab=4096), NamedSharding(mesh, P("data")))

    def replicated_take(t, i):
        t = jax.lax.with_sharding_constraint(t, NamedSharding(mesh, P()))
        return jnp.take(t, i, axis=0)

    hlo = jax.jit(replicated_take).lower(table, ids).compile().as_text()
    assert _table_sized_collectives(hlo, 4096 // 4)


@pytest.mark.parametrize("layout_name", ["vocab+batch", "vocab+dim"])
def test_no_all_gather_of_the_table(layout_name):
    layout = _layout((2, 4), layout_name)
    rows = 4096
    params = layout.put({"weight": _table(rows=rows)})
    ids = _put(layout, _ids((8, 5), vocab=rows))
    local_rows = rows // layout.count("vocab")

    def dense(p):
        out, new = jaxembed.embedding(p, ids, max_norm=1.0, sharding=layout)
        bags, _ = jaxembed.embedding_bag(p, ids, mode="max", sharding=layout)
        return (out**2).sum() + bags.sum(), new

    opt = sparse.sharded(sparse.rowwise_adagrad(0.1), layout)
    state = opt.init(params["weight"])

    def sparse_step(p, state):
        rows_, lk = sparse.lookup(p, ids, max_norm=1.0, sharding=layout)
        return opt.update(lk.grad(rows_), state, lk.params["weight"])

    programs = {
        "dense": jax.jit(jax.value_and_grad(dense, has_aux=True)).lower(params),
        "sparse": jax.jit(sparse_step).lower(params, state),
    }
    for name, lowered in programs.items():
        hlo = lowered.compile().as_text()
        assert not _table_sized_collectives(hlo, local_rows), name
        assert "all-gather" not in hlo or layout.batch is None, name


def test_no_retrace_on_second_call():
    layout = _layout((2, 4), "vocab+batch")
    params = layout.put({"weight": _table()})
    traces = []

    @jax.jit
    def f(p, i):
        traces.append(1)
        out, new = jaxembed.embedding(p, i, max_norm=1.0, sharding=layout)
        return out, new

    for seed in (0, 1):
        f(params, layout.put_indices(_ids(seed=seed)))
    assert len(traces) == 1
    # eagerly, the sharded core compiles once too
    before = jaxembed.core._embedding._embedding._cache_size()
    for seed in (2, 3):
        jaxembed.embedding(params, layout.put_indices(_ids(seed=seed)), sharding=layout)
    assert jaxembed.core._embedding._embedding._cache_size() == before + 1


# -- Flax nnx ------------------------------------------------------------------------------------


class _Model(nnx.Module):
    def __init__(self, rngs, sharding=None, init=jaxembed.default_embedding_init, sparse=False):
        kwargs = dict(sharding=sharding, embedding_init=init, rngs=rngs)
        self.emb = jaxembed.Embedding(V, D, max_norm=1.0, padding_idx=0, sparse=sparse, **kwargs)
        self.bag = jaxembed.EmbeddingBag(V, D, mode="sum", **kwargs)
        self.head = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.emb(ids).mean(1) + self.bag(ids))[:, 0]


def _loss(model, ids):
    return ((model(ids) - 1.0) ** 2).mean()


def _train(model, ids, sparse_tables, steps=3):
    if sparse_tables:
        opt = sparse.Optimizer(model, optax.adam(0.05), sparse.lazy_adam(0.05))
        grad_fn = sparse.value_and_grad(_loss)
    else:
        opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
        grad_fn = nnx.value_and_grad(_loss)

    @nnx.jit
    def step(model, opt, ids):
        loss, grads = grad_fn(model, ids)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, ids)) for _ in range(steps)]


@pytest.mark.parametrize("how", ["sharding", "with_partitioning"])
@pytest.mark.parametrize("sparse_tables", [False, True], ids=["dense", "sparse"])
def test_nnx_modules_under_nnx_jit_on_a_mesh(how, sparse_tables):
    mesh = _mesh((2, 4))
    ids = _ids((8, 5))
    reference = _Model(nnx.Rngs(0), sparse=sparse_tables)
    ref_losses = _train(reference, ids, sparse_tables)
    with jax.set_mesh(mesh):
        if how == "sharding":
            layout = jaxembed.TableSharding(vocab="model", batch="data")
            model = _Model(nnx.Rngs(0), sharding=layout, sparse=sparse_tables)
        else:
            init = nnx.with_partitioning(jaxembed.default_embedding_init, ("model", None))
            model = _Model(nnx.Rngs(0), init=init, sparse=sparse_tables)
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        assert specs["emb"]["weight"].get_value() == P("model", None)
        assert model.emb.weight[...].sharding.spec == P("model", None)
        batch = jax.device_put(ids, NamedSharding(mesh, P("data")))
        losses = _train(model, batch, sparse_tables)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for name in ("emb", "bag"):
        got = getattr(model, name).weight[...]
        assert got.sharding.spec == P("model", None)
        _check_equal(got, getattr(reference, name).weight[...], exact=False, rtol=1e-5)


def test_nnx_sharding_conflicts_and_uneven_tables_raise():
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh):
        init = nnx.with_partitioning(jaxembed.default_embedding_init, ("model", None))
        with pytest.raises(ValueError, match="disagrees with the partitioning"):
            jaxembed.Embedding(
                V,
                D,
                embedding_init=init,
                sharding=jaxembed.TableSharding(dim="model"),
                rngs=nnx.Rngs(0),
            )
        with pytest.raises(ValueError, match="num_embeddings=30"):
            jaxembed.Embedding(
                30, D, sharding=jaxembed.TableSharding(vocab="model"), rngs=nnx.Rngs(0)
            )


def test_nnx_module_built_without_a_mesh_is_placed_later():
    layout = jaxembed.TableSharding(vocab="model", batch="data")
    model = jaxembed.Embedding(V, D, sharding=layout, rngs=nnx.Rngs(0))  # no mesh yet
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        specs = nnx.get_partition_spec(state)
        nnx.update(
            model, jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        )
        out = nnx.jit(lambda m, i: m(i))(model, layout.put_indices(_ids()))
    assert model.weight[...].sharding.spec == P("model", None)
    _check_equal(out, np.asarray(model.weight[...])[_ids()], exact=True)


# -- Flax linen ----------------------------------------------------------------------------------


def test_linen_modules_with_sharding():
    import jaxembed.linen

    layout = _layout((2, 4), "vocab+batch")
    ids = _ids((8, 5))
    for cls, extra in (
        (jaxembed.linen.Embedding, {}),
        (jaxembed.linen.EmbeddingBag, {"mode": "max"}),
    ):
        sharded_model = cls(V, D, max_norm=1.0, sharding=layout, **extra)
        model = cls(V, D, max_norm=1.0, **extra)
        variables = model.init(jax.random.key(0), ids)
        placed = {"params": layout.put(variables["params"])}

        def loss(params, m, i):
            out, updates = m.apply({"params": params}, i, mutable=["params"])
            return (out**2).sum(), (out, updates["params"]["weight"])

        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        (_, (out, new)), grad = grad_fn(placed["params"], sharded_model, _put(layout, ids))
        (_, (ref, ref_new)), ref_grad = grad_fn(variables["params"], model, ids)
        _check_equal(out, ref, exact=True)
        _check_equal(new, ref_new, exact=True)
        assert new.sharding.spec == layout.spec
        _check_equal(grad["weight"], ref_grad["weight"], exact=False)


@pytest.mark.parametrize("bits", [4])
def test_quantized_tables_shard_by_rows_and_equal_unsharded(bits):
    """A quantized table splits by rows like a float one (each device decodes its own rows);
    columns of packed bytes do not split, and are refused. (The layout sees one packed format as
    any other: the rows another device holds decode to zeros in every format, which
    tests/test_quantized_lookup.py checks.)"""
    mesh = _mesh((2, 4))
    q = jaxembed.quantize(jax.random.normal(jax.random.key(bits), (V, 16)), bits=bits)
    ids = jax.random.randint(jax.random.key(1), (8, 5), 0, V).at[0, 0].set(V)  # one out of range
    sharding = jaxembed.TableSharding(mesh, vocab="model", batch="data")
    for mode in ("sum", "mean", "max"):
        bag = jax.jit(lambda q, i, m=mode: jaxembed.embedding_bag(q, i, mode=m, sharding=sharding))
        ref = jax.jit(lambda q, i, m=mode: jaxembed.embedding_bag(q, i, mode=m))
        np.testing.assert_array_equal(np.asarray(bag(q, ids)[0]), np.asarray(ref(q, ids)[0]))
    rows = jax.jit(lambda q, i: jaxembed.embedding(q, i, sharding=sharding)[0])(q, ids)
    ref = jax.jit(lambda q, i: jaxembed.embedding(q, i)[0])(q, ids)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(ref))
    assert np.isnan(np.asarray(rows)[0, 0]).all()
    assert q.data.sharding.is_fully_replicated  # the caller's table is left as it was
    with pytest.raises(ValueError, match="shard it by rows"):
        jaxembed.embedding(q, ids % V, sharding=jaxembed.TableSharding(mesh, dim="model"))
    # the frozen module on the mesh: its packed rows placed by rows, the same bags
    module = jaxembed.EmbeddingBag.from_quantized(q, mode="sum", sharding=sharding)
    bags = nnx.jit(lambda m, i: m(i))(module, ids)
    ref = jax.jit(lambda q, i: jaxembed.embedding_bag(q, i, mode="sum")[0])(q, ids)
    np.testing.assert_array_equal(np.asarray(bags), np.asarray(ref))
    with pytest.raises(ValueError, match="by rows"):
        jaxembed.Embedding.from_quantized(q, sharding=jaxembed.TableSharding(mesh, dim="model"))
