"""Collections against TorchRec (EmbeddingBagCollection, EmbeddingCollection, its fused row-wise
Adagrad over FBGEMM), and against per-table torch for the options TorchRec lacks."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxembed
from jaxembed.collections import _collection
from tests.torch_ref import torch_embedding_bag, torchrec_bag_configs

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchrec
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad


def _case(rng, tables, batch, max_len=4, empty_feature=None):
    """Random jagged ids for every feature of ``tables``: ``(keys, values, lengths)``."""
    keys, values, lengths = [], [], []
    features = [(f, t) for t in tables for f in t.feature_names]
    # the jagged input's key order is not the tables' (the same for the same tables: a new
    # order is a new pytree structure, so a new compilation)
    np.random.default_rng(len(features)).shuffle(features)
    for f, t in features:
        n = np.zeros(batch, np.int64) if f == empty_feature else rng.integers(0, max_len, batch)
        keys.append(f)
        lengths.append(n)
        values.append(rng.integers(0, t.num_embeddings, int(n.sum())))
    return keys, np.concatenate(values), np.concatenate(lengths)


def _torchrec_tables(tables):
    return torchrec_bag_configs(tables)


def _kjt(keys, values, lengths):
    return torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.asarray(values, np.int64)),
        lengths=torch.from_numpy(np.asarray(lengths, np.int64)),
    )


CASES = {
    # shared tables, mixed dims, sum and mean
    "mixed": (
        [
            jaxembed.EmbeddingBagConfig("t0", 8, 50, ["a", "b"]),
            jaxembed.EmbeddingBagConfig("t1", 8, 30, ["c"], pooling="mean"),
            jaxembed.EmbeddingBagConfig("t2", 4, 20, ["d"]),
            jaxembed.EmbeddingBagConfig("t3", 8, 10, ["e"]),
        ],
        5,
        "b",
    ),
    "batch_of_one": ([jaxembed.EmbeddingBagConfig("t0", 3, 7, ["a", "b", "c"])], 1, "c"),
}


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pooled_features_equal_torchrec_ebc(case, stack):
    tables, batch, empty = CASES[case]
    rng = np.random.default_rng(0)
    keys, values, lengths = _case(rng, tables, batch, empty_feature=empty)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ebc = torchrec.EmbeddingBagCollection(
            tables=_torchrec_tables(tables), device=torch.device("cpu")
        )
    expected = ebc(_kjt(keys, values, lengths))
    module = jaxembed.EmbeddingBagCollection.from_torch(ebc.state_dict(), tables, stack=stack)
    kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=64)
    eager = module(kj)
    jitted = nnx.jit(lambda m, kj: m(kj))(module, kj)
    for pooled in (eager, jitted):
        for f in expected.keys():
            # sums bit for bit; torch's mean rounds differently (an ulp)
            np.testing.assert_allclose(
                np.asarray(pooled[f]), expected[f].detach().numpy(), rtol=2e-7, atol=0, err_msg=f
            )
        np.testing.assert_allclose(
            np.asarray(module.concat(pooled)),
            expected.values().detach().numpy()[:, _torchrec_order(expected, module)],
            rtol=2e-7,
            atol=0,
        )
    assert np.all(np.asarray(eager[empty]) == 0)


def _torchrec_order(kt, module):
    """The columns of TorchRec's KeyedTensor, reordered to the collection's feature order."""
    offsets = dict(zip(kt.keys(), kt.offset_per_key()[:-1], strict=True))
    lengths = dict(zip(kt.keys(), kt.length_per_key(), strict=True))
    return np.concatenate(
        [np.arange(offsets[f], offsets[f] + lengths[f]) for f in module.feature_names]
    )


def test_sequence_features_equal_torchrec_embedding_collection():
    tables = [
        jaxembed.EmbeddingConfig("t0", 4, 40, ["a", "b"]),
        jaxembed.EmbeddingConfig("t1", 4, 9, ["c"]),
    ]
    rng = np.random.default_rng(1)
    keys, values, lengths = _case(rng, tables, 3, empty_feature="c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ec = torchrec.EmbeddingCollection(
            tables=[
                torchrec.EmbeddingConfig(
                    name=t.name,
                    embedding_dim=t.embedding_dim,
                    num_embeddings=t.num_embeddings,
                    feature_names=list(t.feature_names),
                )
                for t in tables
            ],
            device=torch.device("cpu"),
        )
    expected = ec(_kjt(keys, values, lengths))
    module = jaxembed.EmbeddingCollection.from_torch(ec.state_dict(), tables)
    out = module(jaxembed.KeyedJagged.from_lengths(keys, values, lengths))
    for f, jt in expected.items():
        n = jt.values().shape[0]
        np.testing.assert_array_equal(np.asarray(out[f].values[:n]), jt.values().detach().numpy())
        assert np.all(np.asarray(out[f].values[n:]) == 0)
        np.testing.assert_array_equal(np.asarray(out[f].lengths), jt.lengths().numpy())
    np.testing.assert_array_equal(
        np.asarray(module.to_torch()["embeddings.t1.weight"]),
        ec.state_dict()["embeddings.t1.weight"].numpy(),
    )


def test_sparse_sequence_collection_trains_like_torch_sparse_embeddings():
    """EmbeddingCollection(sparse=True) + SparseAdam against per-table torch nn.Embedding
    (sparse=True, padding_idx) fed every id of its features."""
    tables = [
        jaxembed.EmbeddingConfig("s0", 4, 30, ["a", "b"], padding_idx=2),
        jaxembed.EmbeddingConfig("s1", 4, 12, ["c"]),
    ]
    rng = np.random.default_rng(9)
    module = jaxembed.EmbeddingCollection(tables, rngs=nnx.Rngs(1), sparse=True)
    embs = {}
    for name, w in module.tables().items():
        t = next(t for t in tables if t.name == name)
        embs[name] = torch.nn.Embedding(w.shape[0], 4, padding_idx=t.padding_idx, sparse=True)
        with torch.no_grad():
            embs[name].weight.copy_(torch.from_numpy(np.array(w)))
    topt = torch.optim.SparseAdam([e.weight for e in embs.values()], lr=0.05)
    opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.0), jaxembed.sparse.lazy_adam(0.05))

    @nnx.jit
    def step(module, opt, kj):
        def loss(m):
            out = m(kj)
            return sum(
                jnp.sum(jnp.tanh(out[f].values) * (i + 1)) for i, f in enumerate(sorted(out))
            )

        _, grads = jaxembed.sparse.value_and_grad(loss)(module)
        opt.update(module, grads)

    for _ in range(3):
        keys, values, lengths = _case(rng, tables, 3)
        values[::3] = 2
        step(module, opt, jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=32))
        offs = np.concatenate([[0], np.cumsum(lengths)])
        per = {}
        for j, f in enumerate(keys):
            ids = torch.from_numpy(values[offs[j * 3] : offs[j * 3 + 3]].astype(np.int64))
            per[f] = embs[next(t.name for t in tables if f in t.feature_names)](ids)
        topt.zero_grad()
        sum(torch.tanh(per[f]).sum() * (i + 1) for i, f in enumerate(sorted(per))).backward()
        topt.step()
    for name, w in module.tables().items():
        np.testing.assert_allclose(
            np.asarray(w), embs[name].weight.detach().numpy(), rtol=1e-5, atol=1e-6
        )


# the options TorchRec lacks, against one torch nn.EmbeddingBag per table fed every bag of its
# features at once (which is what a collection's table sees)
OPTION_TABLES = [
    jaxembed.EmbeddingBagConfig("p", 6, 12, ["a", "b"], padding_idx=3, max_norm=1.0),
    jaxembed.EmbeddingBagConfig("q", 6, 9, ["c"], scale_grad_by_freq=True),
    jaxembed.EmbeddingBagConfig("r", 6, 8, ["d"], pooling="max", padding_idx=0),
    jaxembed.EmbeddingBagConfig("s", 6, 10, ["e"], max_norm=0.5, norm_type=1.0, pooling="mean"),
]


def _torch_bags(tables, weights, keys, values, lengths, batch):
    """Per table: torch's bags of its features (in ``keys`` order), the table's gradient of
    ``sum(bags * cot)``, and the renormed table."""
    out, grads, renormed = {}, {}, {}
    offs = np.concatenate([[0], np.cumsum(lengths)])
    for t in tables:
        feats = [f for f in keys if f in t.feature_names]
        ids, bag_offsets = [], []
        for f in feats:
            j = keys.index(f)
            for b in range(batch):
                bag_offsets.append(sum(len(x) for x in ids))
                ids.append(values[offs[j * batch + b] : offs[j * batch + b + 1]])
        shape = (len(bag_offsets), t.embedding_dim)
        res = torch_embedding_bag(
            np.asarray(weights[t.name]),
            np.concatenate(ids),
            np.asarray(bag_offsets),
            np.linspace(-1, 1, np.prod(shape), dtype=np.float32).reshape(shape),
            # torch's bag kernel divides by the wrong count with scale_grad_by_freq: its
            # documented semantics, composed from F.embedding, are the oracle there
            composed=t.scale_grad_by_freq,
            mode=t.pooling,
            padding_idx=t.padding_idx,
            max_norm=t.max_norm,
            norm_type=t.norm_type,
            scale_grad_by_freq=t.scale_grad_by_freq,
        )
        for i, f in enumerate(feats):
            out[f] = res.out[i * batch : (i + 1) * batch]
        grads[t.name] = res.grad
        renormed[t.name] = res.table
    return out, grads, renormed


def _cotangent(pooled, tables, keys):
    """The cotangent of each feature, as :func:`_torch_bags` builds it per table."""
    cots = {}
    for t in tables:
        feats = [f for f in keys if f in t.feature_names]
        n = sum(pooled[f].size for f in feats)
        flat = np.linspace(-1, 1, n, dtype=np.float32)
        for i, f in enumerate(feats):
            cots[f] = flat[i * pooled[f].size : (i + 1) * pooled[f].size].reshape(pooled[f].shape)
    return cots


def test_options_torchrec_lacks_equal_per_table_torch():
    tables, batch = OPTION_TABLES, 4
    rng = np.random.default_rng(2)
    keys, values, lengths = _case(rng, tables, batch, max_len=5)
    values[::4] = 0  # padding ids of p (3 only where p), of r (0)
    params = jaxembed.collections.init(jax.random.key(0), tables)
    # some rows well past the max norms, and the padding rows non-zero
    params = jax.tree.map(lambda w: w * 9.0 + 0.1, params)
    weights = jaxembed.collections.tables_of(params, tables)
    kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=128)
    expected, grads, renormed = _torch_bags(tables, weights, keys, values, lengths, batch)
    pooled, new = jaxembed.embedding_bag_collection(params, kj, tables)
    for f in expected:
        np.testing.assert_allclose(np.asarray(pooled[f]), expected[f], rtol=1e-6, atol=1e-6)
    for name, w in jaxembed.collections.tables_of(new, tables).items():
        np.testing.assert_allclose(np.asarray(w), renormed[name], rtol=1e-6, atol=1e-6)
    cots = _cotangent(pooled, tables, keys)

    def loss(params):
        pooled, _ = jaxembed.embedding_bag_collection(params, kj, tables)
        return sum(jnp.sum(pooled[f] * cots[f]) for f in pooled)

    got = jaxembed.collections.tables_of(jax.jit(jax.grad(loss))(params), tables)
    for name in grads:
        np.testing.assert_allclose(np.asarray(got[name]), grads[name], rtol=1e-5, atol=1e-6)


def test_stacked_and_unstacked_are_bit_identical():
    # padding_idx + max_norm, scale_grad_by_freq (each a stack of its own) and two tables that
    # stack, one at another learning rate
    tables = OPTION_TABLES[:2] + [
        jaxembed.EmbeddingBagConfig("u", 6, 15, ["f", "g"]),
        jaxembed.EmbeddingBagConfig("v", 6, 5, ["h"], lr_scale=0.5),
    ]
    rng = np.random.default_rng(3)
    keys, values, lengths = _case(rng, tables, 3)
    kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=64)
    results = []
    for stack in (True, False):
        params = jaxembed.collections.init(jax.random.key(1), tables, stack=stack)
        assert len(params) == (3 if stack else 4)  # p and q alone (their options), u+v

        def loss(params, stack=stack):
            pooled, _ = jaxembed.embedding_bag_collection(params, kj, tables, stack=stack)
            return sum(jnp.sum(jnp.sin(p)) for p in pooled.values()), pooled

        (_, pooled), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        opt = jaxembed.collections.optimizer(
            jaxembed.sparse.rowwise_adagrad(0.3), tables, stack=stack
        )

        @jax.jit
        def train(params, state, kj, stack=stack, opt=opt):
            pooled, lk = jaxembed.collections.lookup(params, kj, tables, stack=stack)
            grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(v)) for v in p.values()))(pooled)
            return opt.update(lk.grad(grads), state, lk.params)

        state = opt.init(params)
        for _ in range(2):
            params, state = train(params, state, kj)
        results.append(
            (
                pooled,
                jaxembed.collections.tables_of(grad, tables, stack=stack),
                jaxembed.collections.tables_of(params, tables, stack=stack),
            )
        )
    for a, b in zip(*results, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_sparse_training_equals_torch_optimizers_per_table():
    tables = [
        jaxembed.EmbeddingBagConfig("t0", 4, 30, ["a", "b"], padding_idx=1),
        jaxembed.EmbeddingBagConfig("t1", 4, 20, ["c"], pooling="mean", lr_scale=2.0),
    ]
    batch, lr = 4, 0.2
    rng = np.random.default_rng(4)
    steps = [_case(rng, tables, batch) for _ in range(3)]
    params0 = jaxembed.collections.init(jax.random.key(2), tables)
    weights0 = jaxembed.collections.tables_of(params0, tables)
    kinds = {
        "sgd": (jaxembed.sparse.sgd, torch.optim.SGD),
        "adagrad": (jaxembed.sparse.adagrad, torch.optim.Adagrad),
        "lazy_adam": (jaxembed.sparse.lazy_adam, torch.optim.SparseAdam),
    }
    for kind, (ours, theirs) in kinds.items():
        bags = {}
        opts = {}
        for t in tables:
            bags[t.name] = torch.nn.EmbeddingBag(
                t.num_embeddings, t.embedding_dim, mode=t.pooling, padding_idx=t.padding_idx,
                sparse=True,
            )  # fmt: skip
            with torch.no_grad():
                bags[t.name].weight.copy_(torch.from_numpy(np.array(weights0[t.name])))
            opts[t.name] = theirs([bags[t.name].weight], lr=lr * t.lr_scale)
        module = jaxembed.EmbeddingBagCollection.from_torch(
            {f"embedding_bags.{k}.weight": v.weight.detach() for k, v in bags.items()},
            tables,
            sparse=True,
        )
        opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.0), ours(lr))

        @nnx.jit
        def step(module, opt, kj):
            def loss(m):
                pooled = m(kj)
                return sum(
                    jnp.sum(jnp.tanh(pooled[f]) * (i + 1)) for i, f in enumerate(sorted(pooled))
                )

            value, grads = jaxembed.sparse.value_and_grad(loss)(module)
            opt.update(module, grads)
            return value

        for keys, values, lengths in steps:
            kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=64)
            step(module, opt, kj)
            offs = np.concatenate([[0], np.cumsum(lengths)])
            pooled = {}
            for t in tables:
                feats = [f for f in keys if f in t.feature_names]
                ids, starts = [], []
                for f in feats:
                    j = keys.index(f)
                    for b in range(batch):
                        starts.append(sum(len(x) for x in ids))
                        ids.append(values[offs[j * batch + b] : offs[j * batch + b + 1]])
                res = bags[t.name](
                    torch.from_numpy(np.concatenate(ids).astype(np.int64)), torch.tensor(starts)
                )
                for i, f in enumerate(feats):
                    pooled[f] = res[i * batch : (i + 1) * batch]
            order = sorted(pooled)
            total = sum(torch.tanh(pooled[f]).sum() * (i + 1) for i, f in enumerate(order))
            for o in opts.values():
                o.zero_grad()
            total.backward()
            for o in opts.values():
                o.step()
        got = module.tables()
        for t in tables:
            np.testing.assert_allclose(
                np.asarray(got[t.name]), bags[t.name].weight.detach().numpy(), rtol=1e-5,
                atol=1e-5, err_msg=kind,
            )  # fmt: skip


def test_fused_rowwise_adagrad_equals_torchrec_fused_ebc():
    """TorchRec's FusedEmbeddingBagCollection: FBGEMM's CPU TBE with EXACT_ROWWISE_ADAGRAD."""
    tables = [
        jaxembed.EmbeddingBagConfig("t0", 8, 40, ["a"]),
        jaxembed.EmbeddingBagConfig("t1", 8, 25, ["b", "c"]),
        jaxembed.EmbeddingBagConfig("t2", 4, 12, ["d"]),
    ]
    batch, lr = 6, 0.1
    rng = np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = FusedEmbeddingBagCollection(
            tables=_torchrec_tables(tables),
            optimizer_type=RowWiseAdagrad,
            optimizer_kwargs={"lr": lr, "eps": 1e-8},
            device=torch.device("cpu"),
        )
    module = jaxembed.EmbeddingBagCollection.from_torch(fused.state_dict(), tables, sparse=True)
    opt = jaxembed.sparse.Optimizer(module, optax.sgd(0.0), jaxembed.sparse.rowwise_adagrad(lr))
    target = jnp.asarray(rng.normal(size=(batch, 28)).astype(np.float32))

    @nnx.jit
    def step(module, opt, kj):
        def loss(m):
            return 0.5 * jnp.mean((m.concat(m(kj)) - target) ** 2)

        value, grads = jaxembed.sparse.value_and_grad(loss)(module)
        opt.update(module, grads)
        return value

    for _ in range(4):
        keys, values, lengths = _case(rng, tables, batch, max_len=6)
        step(module, opt, jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=128))
        out = fused(_kjt(keys, values, lengths))
        cols = _torchrec_order(out, module)
        (
            0.5 * ((out.values()[:, cols] - torch.from_numpy(np.asarray(target))) ** 2).mean()
        ).backward()
    state = fused.state_dict()
    for name, w in module.tables().items():
        np.testing.assert_allclose(
            np.asarray(w), state[f"embedding_bags.{name}.weight"].numpy(), rtol=1e-5, atol=1e-5
        )


def test_sparse_embedding_bag_equals_torch_sparse_and_dense():
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 16, 40)
    offsets = np.sort(rng.choice(40, 9, replace=False))
    offsets[0] = 0
    cases = [("sum", None, None), ("mean", 2, None), ("max", None, None), ("sum", 0, 30)]
    for mode, pad, num_valid in cases:
        sparse = jaxembed.EmbeddingBag(16, 3, mode=mode, padding_idx=pad, sparse=True,
                                       rngs=nnx.Rngs(0))  # fmt: skip
        dense = jaxembed.EmbeddingBag(16, 3, mode=mode, padding_idx=pad, rngs=nnx.Rngs(0))
        offs = offsets[offsets <= (num_valid or 40)]
        loss = lambda m, offs=offs, nv=num_valid: jnp.sum(jnp.sin(m(ids, offs, num_valid=nv)))  # noqa: E731
        value, grads = jax.jit(jaxembed.sparse.value_and_grad(loss))(sparse)
        dense_value, dense_grads = nnx.jit(nnx.value_and_grad(loss))(dense)
        assert value == dense_value
        g = grads.sparse["weight"]
        full = jnp.zeros((16, 3)).at[g.indices].add(g.values, mode="drop")
        np.testing.assert_array_equal(np.asarray(full), np.asarray(dense_grads["weight"][...]))
        n = num_valid or 40
        bag = torch.nn.EmbeddingBag(16, 3, mode=mode, padding_idx=pad, sparse=mode != "max")
        with torch.no_grad():
            bag.weight.copy_(torch.from_numpy(np.asarray(sparse.weight[...])))
        torch.sin(bag(torch.from_numpy(ids[:n]), torch.from_numpy(offs))).sum().backward()
        np.testing.assert_allclose(
            np.asarray(full), bag.weight.grad.to_dense().numpy(), rtol=1e-6, atol=1e-6
        )
    with pytest.raises(ValueError, match="sharding"):
        mesh = jax.make_mesh((1,), ("m",))
        jaxembed.EmbeddingBag(4, 2, sparse=True, sharding=jaxembed.TableSharding(mesh, vocab="m"),
                              rngs=nnx.Rngs(0))  # fmt: skip


def test_new_lengths_and_values_never_retrace():
    tables = [jaxembed.EmbeddingBagConfig("t", 4, 20, ["a", "b"])]
    params = jaxembed.collections.init(jax.random.key(0), tables)
    rng = np.random.default_rng(7)
    # the other tests of this process may have compiled these for other shapes: count new ones
    before = (_collection._bag_collection._cache_size(), _collection._sparse_bags._cache_size())
    for _ in range(3):
        keys, values, lengths = _case(rng, tables, 4)
        kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=32)
        jaxembed.embedding_bag_collection(params, kj, tables)
        pooled, lk = jaxembed.collections.lookup(params, kj, tables)
        lk.grad(pooled)
    assert _collection._bag_collection._cache_size() - before[0] <= 1
    assert _collection._sparse_bags._cache_size() - before[1] <= 1


def test_bad_input_raises_naming_it_and_changes_nothing():
    tables = [
        jaxembed.EmbeddingBagConfig("t", 4, 10, ["a"], max_norm=0.1),
        jaxembed.EmbeddingBagConfig("u", 4, 5, ["b"]),
    ]
    module = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(module))
    with pytest.raises(ValueError, match="lengths sum to 5, past the 4 values"):
        jaxembed.KeyedJagged(["a", "b"], np.arange(4), [2, 3])
    with pytest.raises(ValueError, match=r"keys \['z'\] that no table"):
        module(jaxembed.KeyedJagged.from_lists({"a": [[1]], "b": [[2]], "z": [[0]]}))
    with pytest.raises(ValueError, match=r"lack \['b'\]"):
        module(jaxembed.KeyedJagged.from_lists({"a": [[1]]}))
    with pytest.raises(IndexError, match="feature 'b' holds 5, out of range for table 'u'"):
        module(jaxembed.KeyedJagged.from_lists({"a": [[9]], "b": [[5]]}))
    with pytest.raises(ValueError, match="feature 'a' is in tables"):
        jaxembed.EmbeddingBagCollection(tables + [jaxembed.EmbeddingBagConfig("v", 4, 3, ["a"])],
                                        rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match=r"mode must be one of"):
        jaxembed.EmbeddingBagConfig("t", 4, 10, ["a"], pooling="median")
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        jaxembed.KeyedJagged(["a"], np.arange(4), [-1])
    with pytest.raises(TypeError, match="values"):
        jaxembed.KeyedJagged(["a"], np.ones(2), [1])
    # unpooled tables have no bags to look up for sparse training
    seq = [jaxembed.EmbeddingConfig("s", 4, 10, ["a"])]
    with pytest.raises(TypeError, match=r"collections\.lookup takes EmbeddingBagConfigs"):
        jaxembed.collections.lookup(
            jaxembed.collections.init(jax.random.key(0), seq),
            jaxembed.KeyedJagged.from_lists({"a": [[1]]}),
            seq,
        )
    after = jax.tree.map(np.asarray, nnx.state(module))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    # under jit an id outside its table is a NaN bag, never a neighbouring table's row
    kj = jaxembed.KeyedJagged.from_lists({"a": [[1], [2]], "b": [[4], [3]]})
    bad = jaxembed.KeyedJagged(kj.keys, kj.values.at[2].set(5), kj.lengths)
    out = jax.jit(lambda kj: _collection.embedding_bag_collection(
        _collection.init(jax.random.key(0), tables), kj, tables)[0])(bad)  # fmt: skip
    assert np.isnan(np.asarray(out["b"][0])).all() and np.isfinite(np.asarray(out["b"][1])).all()


def test_keyed_jagged_constructors_agree():
    lists = {"a": [[1, 2], [], [3]], "b": [[4], [5, 6, 7], []]}
    kj = jaxembed.KeyedJagged.from_lists(lists)
    by_offsets = jaxembed.KeyedJagged.from_offsets(
        ["a", "b"], kj.values, np.concatenate([[0], np.cumsum(kj.lengths)])
    )
    dense = {"a": np.array([[1, 2, -1], [-1, -1, -1], [3, -1, -1]]),
             "b": np.array([[4, -1, -1], [5, 6, 7], [-1, -1, -1]])}  # fmt: skip
    by_dense = jax.jit(jaxembed.KeyedJagged.from_dense)(dense)
    for other in (by_offsets, by_dense):
        np.testing.assert_array_equal(np.asarray(other.lengths), np.asarray(kj.lengths))
        n = int(kj.num_valid())
        np.testing.assert_array_equal(np.asarray(other.values)[:n], np.asarray(kj.values)[:n])
    assert [[b.tolist() for b in v] for v in by_dense.to_lists().values()] == list(lists.values())
    np.testing.assert_array_equal(np.asarray(kj.length_per_key()), [3, 4])


def test_orbax_checkpoint_resumes_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tables = [jaxembed.EmbeddingBagConfig(f"t{i}", 4, 20, [f"f{i}"]) for i in range(3)]
    rng = np.random.default_rng(8)
    batches = [jaxembed.KeyedJagged.from_lengths(*_case(rng, tables, 4), capacity=64)
               for _ in range(4)]  # fmt: skip

    def make():
        m = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True)
        return m, jaxembed.sparse.Optimizer(
            m, optax.adam(1e-2), jaxembed.sparse.rowwise_adagrad(0.1)
        )

    @nnx.jit
    def step(m, opt, kj):
        _, grads = jaxembed.sparse.value_and_grad(lambda m: jnp.sum(m.concat(m(kj)) ** 2))(m)
        opt.update(m, grads)

    m, opt = make()
    for kj in batches[:2]:
        step(m, opt, kj)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", nnx.state((m, opt)))
    for kj in batches[2:]:
        step(m, opt, kj)
    m2, opt2 = make()
    abstract = nnx.state((m2, opt2))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    nnx.update((m2, opt2), restored)
    for kj in batches[2:]:
        step(m2, opt2, kj)
    jax.tree.map(np.testing.assert_array_equal, nnx.state((m, opt)), nnx.state((m2, opt2)))


def test_weighted_features_and_bf16_tables_equal_single_tables():
    """Per-id weights (TorchRec's weighted features) and bfloat16 tables: each feature's bags,
    and the weights' and tables' gradients, equal jaxembed.embedding_bag on its own table (which
    the single-table suite checks against torch), dense and sparse."""
    tables = [
        jaxembed.EmbeddingBagConfig("w", 4, 20, ["a", "b"], param_dtype=jnp.bfloat16),
        jaxembed.EmbeddingBagConfig("x", 4, 9, ["c"], param_dtype=jnp.bfloat16),
    ]
    lists = {"a": [[1, 2, 2], [], [5]], "b": [[3], [19, 0], []], "c": [[8, 8], [1], [0]]}
    weights = {k: [np.linspace(0.5, 2, len(bag)).tolist() for bag in v] for k, v in lists.items()}
    kj = jaxembed.KeyedJagged.from_lists(lists, weights)
    params = jaxembed.collections.init(jax.random.key(3), tables)
    per_table = jaxembed.collections.tables_of(params, tables)

    def collection(params, psw):
        kjw = jaxembed.KeyedJagged(kj.keys, kj.values, kj.lengths, psw)
        pooled, _ = jaxembed.embedding_bag_collection(params, kjw, tables)
        return sum(jnp.sum(jnp.sin(p.astype(jnp.float32))) for p in pooled.values()), pooled

    (_, pooled), (g_params, g_psw) = jax.jit(
        jax.value_and_grad(collection, argnums=(0, 1), has_aux=True)
    )(params, kj.weights)
    # the reference: one embedding_bag per table over its features' bags, in the input's order
    for t in tables:
        feats = [f for f in kj.keys if f in t.feature_names]
        bags = [b for f in feats for b in lists[f]]
        ws = [w for f in feats for w in weights[f]]
        ids, offs, n = jaxembed.pad_bags(bags)
        psw = np.zeros(ids.shape, np.float32)
        psw[:n] = np.concatenate(ws)

        def single(w, psw, ids=ids, offs=offs, n=n):
            out, _ = jaxembed.embedding_bag(
                {"weight": w}, ids, offs, mode="sum", per_sample_weights=psw, num_valid=n
            )
            return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

        (_, out), (g_w, _) = jax.value_and_grad(single, argnums=(0, 1), has_aux=True)(
            per_table[t.name], jnp.asarray(psw)
        )
        got = jnp.concatenate([pooled[f] for f in feats])
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(out, np.float32))
        g_table = jaxembed.collections.tables_of(g_params, tables)[t.name]
        np.testing.assert_array_equal(np.asarray(g_table, np.float32), np.asarray(g_w, np.float32))
    assert np.isfinite(np.asarray(g_psw)).all() and np.any(np.asarray(g_psw) != 0)
    # sparse: the same bags, and the spread gradient sums to the dense one
    pooled_s, lk = jaxembed.collections.lookup(params, kj, tables)
    for f in pooled:
        np.testing.assert_array_equal(
            np.asarray(pooled_s[f], np.float32), np.asarray(pooled[f], np.float32)
        )
    cot = jax.grad(lambda p: sum(jnp.sum(jnp.sin(v.astype(jnp.float32))) for v in p.values()))(
        pooled_s
    )
    for name, g in lk.grad(cot).items():
        w = params[name]["weight"]
        dense = (
            jnp.zeros(w.shape, jnp.float32)
            .at[g.indices]
            .add(g.values.astype(jnp.float32), mode="drop")
        )
        np.testing.assert_allclose(
            np.asarray(dense),
            np.asarray(g_params[name]["weight"], np.float32),
            rtol=1e-2,
            atol=1e-2,
        )
    with pytest.raises(ValueError, match="only sum-pooled"):
        mean = [jaxembed.EmbeddingBagConfig("m", 4, 20, ["a", "b", "c"], pooling="mean")]
        jaxembed.embedding_bag_collection(
            jaxembed.collections.init(jax.random.key(0), mean), kj, mean
        )


@st.composite
def _collections(draw):
    """Random tables (shared, stackable or not, every option) and jagged features for them."""
    tables, n_features = [], 0
    dim = draw(st.sampled_from([2, 3]))
    for i in range(draw(st.integers(1, 3))):
        rows = draw(st.integers(1, 12))
        pooling = draw(st.sampled_from(["sum", "mean", "max"]))
        feats = [f"f{n_features + k}" for k in range(draw(st.integers(1, 2)))]
        n_features += len(feats)
        tables.append(
            jaxembed.EmbeddingBagConfig(
                f"t{i}",
                draw(st.sampled_from([dim, dim, 4])),
                rows,
                feats,
                pooling=pooling,
                padding_idx=draw(st.none() | st.integers(0, rows - 1)),
                max_norm=draw(st.sampled_from([None, None, 0.5, 2.0])),
                scale_grad_by_freq=pooling != "max" and draw(st.booleans()),
                stack=draw(st.sampled_from([True, True, False])),
            )
        )
    batch = draw(st.integers(1, 3))
    keys = draw(st.permutations([f for t in tables for f in t.feature_names]))
    lengths = [draw(st.integers(0, 4)) for _ in range(len(keys) * batch)]
    values = []
    for j, f in enumerate(keys):
        rows = next(t.num_embeddings for t in tables if f in t.feature_names)
        n = sum(lengths[j * batch : (j + 1) * batch])
        values += draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n))
    return tables, keys, np.array(values, np.int32), np.array(lengths, np.int32), batch


@settings(max_examples=max(4, settings().max_examples // 4))
@given(_collections())
def test_random_collections_equal_one_embedding_bag_per_table(case):
    """Any mix of tables, options, stacking and empty bags: each table's bags, renormed rows and
    gradient equal jaxembed.embedding_bag (torch-checked on its own) on its features' bags."""
    tables, keys, values, lengths, batch = case
    params = jax.tree.map(lambda w: w * 3, jaxembed.collections.init(jax.random.key(0), tables))
    kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths, capacity=64)

    def loss(params):
        pooled, new = jaxembed.embedding_bag_collection(params, kj, tables)
        return sum(jnp.sum(jnp.sin(v) * (i + 1)) for i, v in enumerate(pooled.values())), (
            pooled,
            new,
        )

    (_, (pooled, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    weights = jaxembed.collections.tables_of(params, tables)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    order = list(pooled)  # the weights of the loss above follow this order
    for t in tables:
        feats = [f for f in keys if f in t.feature_names]
        bags = [values[offs[keys.index(f) * batch + b] : offs[keys.index(f) * batch + b + 1]]
                for f in feats for b in range(batch)]  # fmt: skip
        ids, starts, n = jaxembed.pad_bags(bags)

        def single(w, ids=ids, starts=starts, n=n, t=t, feats=feats):
            out, new = jaxembed.embedding_bag(
                {"weight": w}, ids, starts, mode=t.pooling, padding_idx=t.padding_idx,
                max_norm=t.max_norm, scale_grad_by_freq=t.scale_grad_by_freq, num_valid=n,
            )  # fmt: skip
            per = out.reshape(len(feats), batch, -1)
            total = sum(
                jnp.sum(jnp.sin(per[i]) * (order.index(f) + 1)) for i, f in enumerate(feats)
            )
            return total, (per, new)

        (_, (per, new_single)), g = jax.value_and_grad(single, has_aux=True)(weights[t.name])
        for i, f in enumerate(feats):
            np.testing.assert_allclose(pooled[f], per[i], rtol=1e-6, atol=1e-7, err_msg=f)
        np.testing.assert_allclose(
            jaxembed.collections.tables_of(new, tables)[t.name], new_single["weight"], rtol=1e-6
        )
        np.testing.assert_allclose(
            jaxembed.collections.tables_of(grads, tables)[t.name], g, rtol=1e-5, atol=1e-6
        )
