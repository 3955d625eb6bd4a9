"""The public API as a new user meets it: names, signatures, docs, and the natural mistakes."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
import jaxembed.linen
from jaxembed import sparse

W = np.arange(24, dtype=np.float32).reshape(6, 4) / 10


def _public(module):
    return [(f"{module.__name__}.{n}", getattr(module, n)) for n in module.__all__]


PUBLIC = [
    (name, obj)
    for module in (jaxembed, sparse, jaxembed.collisions, jaxembed.linen, jaxembed.checkpoint)
    for name, obj in _public(module)
    if callable(obj) and not inspect.ismodule(obj)
]


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_every_public_name_is_documented_with_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, name
    is_state = isinstance(obj, type) and issubclass(obj, tuple) and name.endswith("State")
    is_variable = isinstance(obj, type) and issubclass(obj, nnx.Variable)
    is_enum = name.endswith("LookupStyle")
    if not (is_state or is_variable or is_enum or name.endswith("ModelGrads")):
        assert ">>>" in doc or "Example" in doc, f"{name} has no example"
    if inspect.isfunction(obj) and inspect.signature(obj).parameters:
        assert "Args:" in doc, f"{name} documents no arguments"
    if is_state or name.endswith(("SparseGrad", "SparseLookup", "RowOptimizer", "ModelGrads")):
        assert "Attributes:" in doc, f"{name} documents no fields"
        for field in obj._fields:
            assert f"{field}:" in doc, f"{name} does not document {field}"


def test_modules_show_their_real_signature_and_a_readable_initializer():
    for cls in (jaxembed.Embedding, jaxembed.EmbeddingBag):
        signature = inspect.signature(cls)
        assert list(signature.parameters)[:2] == ["num_embeddings", "embedding_dim"]
        assert signature.parameters["embedding_init"].default is jaxembed.default_embedding_init
        assert "normal(stddev=1.0)" in str(signature)
    assert repr(jaxembed.default_embedding_init) == "normal(stddev=1.0)"


def test_linen_is_an_attribute_of_the_package():
    assert jaxembed.linen.Embedding is jaxembed.modules._linen.Embedding
    assert "linen" in dir(jaxembed)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jaxembed.nope  # noqa: B018


def test_lookup_style_takes_the_enum_and_the_string():
    idx = jnp.array([1, 5])
    ref = jaxembed.embedding({"weight": W}, idx)[0]
    for style in (jaxembed.LookupStyle.ONE_HOT, "one_hot"):
        out = jaxembed.embedding({"weight": W}, idx, lookup_style=style)[0]
        np.testing.assert_array_equal(out, ref)
    emb = jaxembed.Embedding(6, 4, lookup_style=jaxembed.LookupStyle.AUTO, rngs=nnx.Rngs(0))
    assert emb.lookup_style == "auto"


def test_the_old_names_still_work_with_a_deprecation_warning():
    idx = jnp.array([1, 5])
    with pytest.warns(DeprecationWarning, match="lookup_style"):
        out = jaxembed.embedding({"weight": W}, idx, lookup="one_hot")[0]
    np.testing.assert_array_equal(out, jaxembed.embedding({"weight": W}, idx)[0])
    with pytest.warns(DeprecationWarning, match="lookup_style"):
        jaxembed.EmbeddingBag(6, 4, lookup="one_hot", rngs=nnx.Rngs(0))
    with pytest.warns(DeprecationWarning, match="lookup_style"):
        rows, _ = sparse.lookup({"weight": W}, idx, lookup="one_hot")
    np.testing.assert_array_equal(rows, W[[1, 5]])
    with pytest.raises(TypeError, match="lookup_style= only"):
        jaxembed.embedding({"weight": W}, idx, lookup="gather", lookup_style="gather")
    with pytest.warns(DeprecationWarning, match="lookup_style"):
        model = jaxembed.linen.Embedding(6, 4, lookup="one_hot")
        model.init(jax.random.key(0), idx)
    for old, new in (("SparseGrads", "ModelGrads"), ("SparseOptimizer", "RowOptimizer")):
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(sparse, old) is getattr(sparse, new)
    with pytest.warns(DeprecationWarning, match="sum_grads"):
        assert sparse.concat is sparse.sum_grads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse.ModelGrads  # noqa: B018


def _model():
    class Model(nnx.Module):
        def __init__(self):
            self.emb = jaxembed.Embedding(10, 4, sparse=True, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(4, 1, rngs=nnx.Rngs(1))

        def __call__(self, ids):
            return self.head(self.emb(ids)).sum()

    return Model()


def test_a_plain_nnx_optimizer_with_sparse_grads_names_the_right_one():
    model = _model()
    _, grads = sparse.value_and_grad(lambda m: m(jnp.array([1, 2])))(model)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = nnx.state(model)
    with pytest.raises(TypeError, match=r"jaxembed\.sparse\.Optimizer"):
        opt.update(model, grads)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_model_grads_cross_jit_and_nnx_jit():
    model = _model()
    loss = lambda m: m(jnp.array([1, 2]))  # noqa: E731
    _, grads = nnx.jit(sparse.value_and_grad(loss))(model)
    grads = jax.jit(lambda g: g)(grads)
    np.testing.assert_array_equal(grads.sparse["emb/weight"].indices, [1, 2])


def test_optimizer_takes_wrt_like_nnx_optimizer():
    model = _model()
    head_before = model.head.kernel[...]
    table_before = model.emb.weight[...]
    opt = sparse.Optimizer(model, optax.sgd(0.1), sparse.sgd(0.1), wrt=sparse.SparseParam)
    _, grads = sparse.value_and_grad(lambda m: m(jnp.array([1, 2])))(model)
    opt.update(model, grads)
    np.testing.assert_array_equal(model.head.kernel[...], head_before)  # not selected by wrt
    assert not np.array_equal(model.emb.weight[...][1], table_before[1])

    model = _model()
    table_before = model.emb.weight[...]
    opt = sparse.Optimizer(model, optax.sgd(0.1), sparse.sgd(0.1), wrt=nnx.Not(sparse.SparseParam))
    assert opt.sparse_state == {}
    _, grads = sparse.value_and_grad(lambda m: m(jnp.array([1, 2])))(model)
    opt.update(model, grads)
    np.testing.assert_array_equal(model.emb.weight[...], table_before)
    assert not np.array_equal(model.head.kernel[...], head_before)


def test_a_row_optimizer_of_your_own():
    def init(table):
        return jnp.zeros((), jnp.int32)

    def update(grad, count, table, *, column_axis=None):
        rows = sparse.row_mean(grad.values, column_axis)[:, None]
        return table.at[grad.indices].add(-rows, mode="drop"), count + 1

    mine = sparse.RowOptimizer(init, update)
    table = jnp.asarray(W)
    grad = sparse.SparseGrad(jnp.array([2, 6]), jnp.ones((2, 4)) * 2.0)
    new, count = jax.jit(mine.update)(grad, mine.init(table), table)
    np.testing.assert_array_equal(new[2], W[2] - 2.0)
    np.testing.assert_array_equal(np.delete(new, 2, 0), np.delete(W, 2, 0))
    assert int(count) == 1


def test_sharded_refuses_an_optimizer_without_column_axis_on_split_columns():
    mesh = jax.make_mesh((1,), ("cols",))
    plain = sparse.RowOptimizer(lambda t: (), lambda g, s, t: (t, s))
    with pytest.raises(TypeError, match="column_axis"):
        sparse.sharded(plain, jaxembed.TableSharding(mesh, dim="cols"))
    sparse.sharded(plain, jaxembed.TableSharding(mesh, vocab="cols"))  # rows split: fine
    with pytest.raises(TypeError, match="TableSharding, got None"):
        sparse.sharded(sparse.sgd(0.1), None)
