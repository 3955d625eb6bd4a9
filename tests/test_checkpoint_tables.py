"""A collection saved table by table (jaxembed.checkpoint.save_tables) restores onto another
layout: here on one device, stacked and unstacked, bfloat16 tables, the optimizer state; the
8-device plans are in tests/multidevice/test_checkpoint_mesh.py (run with -m slow)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxembed
from jaxembed import checkpoint

E = jaxembed.EmbeddingBagConfig
TABLES = [
    E("a", 4, 40, ["fa"]),
    E("b", 4, 50, ["fb"], padding_idx=3),
    E("c", 8, 30, ["fc"], pooling="mean"),
    E("h", 4, 20, ["fh"], param_dtype=jnp.bfloat16),
]


def _trained(tx, stack, seed=0):
    params = jaxembed.collections.init(jax.random.key(seed), TABLES, stack=stack)
    opt = jaxembed.collections.optimizer(tx, TABLES, stack=stack)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    lists = {
        f: [list(rng.integers(0, t.num_embeddings, 3)) for _ in range(4)]
        for t in TABLES
        for f in t.feature_names
    }
    features = jaxembed.KeyedJagged.from_lists(lists)

    @jax.jit
    def step(params, state):
        pooled, lk = jaxembed.collections.lookup(params, features, TABLES, stack=stack)
        grads = jax.grad(lambda p: sum(jnp.sum(v.astype(jnp.float32) ** 2) for v in p.values()))(
            pooled
        )
        return opt.update(lk.grad(grads), state, lk.params)

    for _ in range(2):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "tx_name,source_stack,target_stack",
    [
        ("rowwise_adagrad", True, False),
        ("lazy_adam", False, True),
        pytest.param("lazy_adam", True, False, marks=pytest.mark.slow),
        pytest.param("rowwise_adagrad", False, True, marks=pytest.mark.slow),
    ],
)
def test_stacked_and_unstacked_restore_each_other(tmp_path, tx_name, source_stack, target_stack):
    tx = getattr(jaxembed.sparse, tx_name)(0.1)
    params, state = _trained(tx, source_stack)
    checkpoint.save_tables(tmp_path, 3, params, TABLES, state=state, stack=source_stack)
    back, back_state = checkpoint.restore_tables(tmp_path, TABLES, tx=tx, stack=target_stack)
    want = jaxembed.collections.tables_of(params, TABLES, stack=source_stack)
    got = jaxembed.collections.tables_of(back, TABLES, stack=target_stack)
    for t in want:
        assert got[t].dtype == want[t].dtype
        np.testing.assert_array_equal(np.asarray(got[t]), np.asarray(want[t]), err_msg=t)
    assert _state_by_table(back_state, target_stack) == _state_by_table(state, source_stack)


def _state_by_table(state, stack):
    """``{(table, leaf): rows}``: each stack's state leaves, table by table (a scalar: its
    value, for each table)."""
    out = {}
    for s in jaxembed.collections._collection._plan(TABLES, stack).stacks:
        for path, leaf in jax.tree_util.tree_flatten_with_path(state[s.name])[0]:
            name = jax.tree_util.keystr(path)
            for t, off in zip(s.tables, s.offsets, strict=True):
                value = np.asarray(leaf)
                if leaf.ndim:
                    value = value[off : off + t.num_embeddings]
                out[t.name, name] = (str(value.dtype), value.tobytes())  # bit for bit
    return out


def test_a_bad_restore_names_what_is_wrong(tmp_path):
    params, state = _trained(jaxembed.sparse.rowwise_adagrad(0.1), True)
    with pytest.raises(KeyError, match="params must have the keys"):
        checkpoint.save_tables(tmp_path, 0, params, TABLES, stack=False)
    with pytest.raises(TypeError, match=r"layout must be a jaxembed\.sharding\.ShardingPlan"):
        checkpoint.save_tables(tmp_path, 0, params, "tables")
    checkpoint.save_tables(tmp_path, 0, params, TABLES, state=state)
    with pytest.raises(checkpoint.CheckpointError, match="another collection"):
        checkpoint.restore_tables(tmp_path, TABLES[:3])
    with pytest.raises(checkpoint.CheckpointError, match="saved with another optimizer"):
        checkpoint.restore_tables(tmp_path, TABLES, tx=jaxembed.sparse.lazy_adam(0.1))
    with pytest.raises(checkpoint.CheckpointError, match=r"a 'tables' checkpoint"):
        checkpoint.restore(tmp_path, params)
    checkpoint.save(tmp_path, 1, params)
    with pytest.raises(checkpoint.CheckpointError, match=r"is a 'full' checkpoint"):
        checkpoint.restore_tables(tmp_path, TABLES)
    path = tmp_path / "step_000000000" / "tables.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # in the last array: the last table's optimizer state
    path.write_bytes(bytes(data))
    back = checkpoint.restore_tables(tmp_path, TABLES, step=0)  # the tables alone read fine
    np.testing.assert_array_equal(
        np.asarray(back["h"]["weight"]), np.asarray(params["h"]["weight"])
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"'h/state/sum' \(rows 0-.*SHA-256"):
        checkpoint.restore_tables(tmp_path, TABLES, step=0, tx=jaxembed.sparse.rowwise_adagrad(0.1))
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(checkpoint.CheckpointError, match="truncated or altered"):
        checkpoint.restore_tables(tmp_path, TABLES, step=0)


def test_export_writes_torchrecs_state_dict(tmp_path):
    """The exported file loads into TorchRec's EmbeddingBagCollection as its state dict, each
    table equal to the collection's (bfloat16 widened to TorchRec's float32 exactly)."""
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    modules = pytest.importorskip("torchrec.modules.embedding_modules")
    from tests.torch_ref import torchrec_bag_configs

    params, _ = _trained(jaxembed.sparse.rowwise_adagrad(0.1), True)
    path = checkpoint.export_tables(tmp_path / "ebc.safetensors", params, TABLES)
    state_dict = safetensors_torch.load_file(path)
    ebc = modules.EmbeddingBagCollection(torchrec_bag_configs(TABLES))
    ebc.load_state_dict(state_dict)  # strict: every key, every shape
    want = jaxembed.collections.tables_of(params, TABLES)
    for t in TABLES:
        got = ebc.embedding_bags[t.name].weight.detach().to(torch.float32).numpy()
        np.testing.assert_array_equal(got, np.asarray(want[t.name], np.float32), err_msg=t.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ebc.safetensors"]  # no leftover
    seq = [jaxembed.EmbeddingConfig(t.name, t.embedding_dim, t.num_embeddings, t.feature_names)
           for t in TABLES[:2]]  # fmt: skip
    seq_params = jaxembed.collections.init(jax.random.key(1), seq)
    names = jaxembed.safetensors_names(checkpoint.export_tables(tmp_path / "ec", seq_params, seq))
    assert sorted(names) == ["embeddings.a.weight", "embeddings.b.weight"]


def _module_step():
    @nnx.jit
    def step(model, opt, features):
        loss_fn = lambda m: sum(jnp.sum(v.astype(jnp.float32) ** 2) for v in m(features).values())  # noqa: E731
        _, grads = jaxembed.sparse.value_and_grad(loss_fn)(model)
        opt.update(model, grads)

    return step


def _features(seed):
    rng = np.random.default_rng(seed)
    return jaxembed.KeyedJagged.from_lists(
        {
            f: [list(rng.integers(0, t.num_embeddings, 3)) for _ in range(4)]
            for t in TABLES
            for f in t.feature_names
        }
    )


class _Model(nnx.Module):  # the collection one level down, as in a DLRM
    def __init__(self, stack, seed):
        self.ebc = jaxembed.EmbeddingBagCollection(
            TABLES, rngs=nnx.Rngs(seed), sparse=True, stack=stack
        )

    def __call__(self, features):
        return self.ebc(features)


def test_a_module_and_its_optimizer_restore_into_another_layout(tmp_path):
    """A stacked collection inside a model, with its Adam state, restores into an unstacked
    one: tables and state equal, and two more steps of each stay equal bit for bit."""
    step = _module_step()
    model = _Model(True, 0)
    opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.1), jaxembed.sparse.lazy_adam(0.05))
    step(model, opt, _features(0))
    checkpoint.save_tables(tmp_path, 1, model, optimizer=opt)
    model2 = _Model(False, 7)
    opt2 = jaxembed.sparse.Optimizer(model2, optax.sgd(0.1), jaxembed.sparse.lazy_adam(0.05))
    assert checkpoint.restore_tables(tmp_path, model2, optimizer=opt2) is None
    for seed in (1, 2):
        step(model, opt, _features(seed))
        step(model2, opt2, _features(seed))
    for name, table in model.ebc.tables().items():
        np.testing.assert_array_equal(np.asarray(model2.ebc.tables()[name]), np.asarray(table))
    with pytest.raises(TypeError, match="a module gives its own layout"):
        checkpoint.save_tables(tmp_path, 2, model, TABLES)
    with pytest.raises(TypeError, match="optimizer= goes with a module"):
        checkpoint.restore_tables(tmp_path, TABLES, optimizer=opt2)
    # the collection itself, where the optimizer was built for the model around it
    with pytest.raises(ValueError, match=r"the optimizer holds no state for the tables \['weights"):
        checkpoint.save_tables(tmp_path, 2, model.ebc, optimizer=opt)

    class Two(nnx.Module):
        def __init__(self):
            self.a, self.b = _Model(True, 0), _Model(True, 1)

    with pytest.raises(ValueError, match="the model holds 2 EmbeddingBagCollection"):
        checkpoint.save_tables(tmp_path, 2, Two())
