"""A collection saved table by table under one layout restores under any other (run via
tests/test_sharding.py): every pair among data_parallel, table_wise, row_wise, column_wise, a
mixed plan, a 4-device plan and one device (unsharded), tables and row-wise optimizer state bit
for bit, and training goes on from the restore exactly as it would have from the saved state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from jaxembed import checkpoint
from jaxembed import sharding as S

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through tests/test_sharding.py)", allow_module_level=True)

E = jaxembed.EmbeddingBagConfig
TABLES = [
    E("a", 16, 40, ["fa"]),
    E("b", 16, 50, ["fb", "fb2"], pooling="mean", padding_idx=3),
    E("c", 24, 30, ["fc"], lr_scale=0.5),
    E("d", 8, 61, ["fd"]),  # 61 rows: row-wise pads them
]
LAYOUTS = ["one_device", "data_parallel", "table_wise", "row_wise", "column_wise", "mixed", "four",
           "2d"]  # fmt: skip


def _layout(name):
    if name == "one_device":
        return TABLES
    if name == "2d":  # replica x model: 2 copies of a 4-device placement
        mesh = jax.make_mesh((2, 4), ("replica", "x"))
        kinds = [S.row_wise(), S.table_wise(3), S.column_wise(), S.data_parallel()]
        placements = {t.name: k for t, k in zip(TABLES, kinds, strict=True)}
        return S.by_hand(TABLES, mesh, placements, axis="x", replica="replica")
    devices = 4 if name == "four" else 8
    mesh = jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices])
    kinds = {
        "data_parallel": [S.data_parallel()] * 4,
        "table_wise": [S.table_wise(i % 3 * 3) for i in range(4)],
        "row_wise": [S.row_wise()] * 4,
        "column_wise": [S.column_wise()] * 4,
        "mixed": [S.row_wise(), S.table_wise(6), S.column_wise(), S.data_parallel()],
        "four": [S.row_wise(), S.table_wise(1), S.column_wise(), S.row_wise()],
    }[name]
    return S.by_hand(TABLES, mesh, {t.name: k for t, k in zip(TABLES, kinds, strict=True)})


def _tables_of(params, layout):
    if isinstance(layout, S.ShardingPlan):
        return S.tables_of(params, layout)
    return {k: np.asarray(v) for k, v in jaxembed.collections.tables_of(params, layout).items()}


def _state_of(state, layout):
    """Each table's optimizer state, by leaf: ``{table: {leaf: rows}}``."""
    out = {}
    for key, tree in state.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            if leaf.ndim == 0:
                continue
            for t, rows in _rows({key: {"weight": leaf}}, key, layout).items():
                out.setdefault(t, {})[name] = rows
    return out


def _rows(params, key, layout):
    """The rows of each table in ``params[key]["weight"]`` (a (V,) or (V, D) leaf)."""
    leaf = np.asarray(params[key]["weight"])
    if isinstance(layout, S.ShardingPlan):
        g = next(g for g in layout.groups if g.name == key)
        dims = {t.name: t.embedding_dim for t in g.stack.tables}
        return {
            t: leaf[g.rows_of(t)] if leaf.ndim == 1 else leaf[g.rows_of(t)][:, : dims[t]]
            for t in dims
        }
    stacks = jaxembed.collections._collection._plan(layout).stacks
    s = next(s for s in stacks if s.name == key)
    return {
        t.name: leaf[off : off + t.num_embeddings]
        for t, off in zip(s.tables, s.offsets, strict=True)
    }


def _lists(seed, rows=None):
    """16 samples of each feature's ids (below ``rows`` where given)."""
    rng = np.random.default_rng(seed)
    return {
        f: [list(rng.integers(0, rows or t.num_embeddings, rng.integers(0, 4))) for _ in range(16)]
        for t in TABLES
        for f in t.feature_names
    }


def _features(layout, seed, rows=None):
    """:func:`_lists` in ``layout``'s device blocks."""
    lists = _lists(seed, rows)
    k = layout.num_blocks
    b = 16 // k
    blocks = [
        jaxembed.KeyedJagged.from_lists(
            {f: v[i * b : (i + 1) * b] for f, v in lists.items()}, capacity=64
        )
        for i in range(k)
    ]
    return S.put_features(blocks, layout)


def _train(params, state, layout, tx, seed):
    """Two sparse Adagrad steps on a fixed batch under ``layout``."""
    if isinstance(layout, S.ShardingPlan):
        opt = S.optimizer(tx, layout)
        features = _features(layout, seed)

        def step(params, state):
            pooled, lk = S.lookup(params, features, layout)
            grads = jax.grad(lambda p: sum(jnp.sum(v**2) for v in p.values()))(pooled)
            return opt.update(lk.grad(grads), state, lk.params)
    else:
        opt = jaxembed.collections.optimizer(tx, layout)
        features = jaxembed.KeyedJagged.from_lists(_lists(seed))

        def step(params, state):
            pooled, lk = jaxembed.collections.lookup(params, features, layout)
            grads = jax.grad(lambda p: sum(jnp.sum(v**2) for v in p.values()))(pooled)
            return opt.update(lk.grad(grads), state, lk.params)

    for _ in range(2):
        params, state = jax.jit(step)(params, state)
    return params, state


def _init(layout, tx):
    if isinstance(layout, S.ShardingPlan):
        params = S.init(jax.random.key(0), layout)
        return params, S.optimizer(tx, layout).init(params)
    params = jaxembed.collections.init(jax.random.key(0), layout)
    return params, jaxembed.collections.optimizer(tx, layout).init(params)


@pytest.mark.parametrize("source", LAYOUTS)
def test_a_collection_restores_under_every_other_layout(tmp_path, source):
    tx = jaxembed.sparse.rowwise_adagrad(0.1, weight_decay=0.01)
    src = _layout(source)
    params, state = _init(src, tx)
    params, state = _train(params, state, src, tx, seed=1)
    saved = checkpoint.save_tables(tmp_path, 7, params, src, state=state)
    assert saved.kind == "tables"
    want_tables, want_state = _tables_of(params, src), _state_of(state, src)
    for target in LAYOUTS:
        dst = _layout(target)
        back, back_state = checkpoint.restore_tables(tmp_path, dst, tx=tx)
        got = _tables_of(back, dst)
        for t in want_tables:
            np.testing.assert_array_equal(got[t], want_tables[t], err_msg=f"{source}->{target} {t}")
        got_state = _state_of(back_state, dst)
        for t, leaves in want_state.items():
            for leaf, rows in leaves.items():
                np.testing.assert_array_equal(got_state[t][leaf], rows, err_msg=f"{t} {leaf}")
        if isinstance(dst, S.ShardingPlan):  # placed as the plan places it
            for key, p in back.items():
                assert p["weight"].sharding.spec == S.spec_of(
                    next(g for g in dst.groups if g.name == key), dst.axis
                )


@pytest.mark.parametrize("source,target", [("mixed", "mixed"), ("row_wise", "one_device")])
def test_training_goes_on_from_a_restore(tmp_path, source, target):
    """Two more Adam steps from the restore equal two more steps of the live run: bit for bit
    onto the same plan; onto one device within the few ulp by which a sharded step's sums
    differ from one device's (tests/multidevice/test_collection_mesh.py)."""
    tx = jaxembed.sparse.lazy_adam(0.05)
    src, dst = _layout(source), _layout(target)
    params, state = _train(*_init(src, tx), src, tx, seed=2)
    checkpoint.save_tables(tmp_path, 0, params, src, state=state)
    live = _tables_of(_train(params, state, src, tx, seed=3)[0], src)
    back, back_state = checkpoint.restore_tables(tmp_path, dst, tx=tx)
    resumed = _tables_of(_train(back, back_state, dst, tx, seed=3)[0], dst)
    for t in live:
        if source == target:
            np.testing.assert_array_equal(resumed[t], live[t], err_msg=t)
        else:
            np.testing.assert_allclose(resumed[t], live[t], rtol=1e-6, atol=1e-7, err_msg=t)


def test_each_device_block_reads_only_its_rows(tmp_path, monkeypatch):
    """Restoring table-wise, a device's block reads the rows of the tables it holds, and no
    other: the reads, counted per table, add up to each table's rows once."""
    src, dst = _layout("row_wise"), _layout("table_wise")
    params, _ = _init(src, jaxembed.sparse.sgd(0.1))
    checkpoint.save_tables(tmp_path, 0, params, src)
    reads = {}
    original = checkpoint._tables._Reader.read_into

    def counting(self, name, rows, *args):
        reads[name] = reads.get(name, 0) + len(rows)
        return original(self, name, rows, *args)

    monkeypatch.setattr(checkpoint._tables._Reader, "read_into", counting)
    checkpoint.restore_tables(tmp_path, dst)
    assert reads == {f"{t.name}/weight": t.num_embeddings for t in TABLES}


def test_a_restore_onto_other_tables_or_a_damaged_file_raises(tmp_path):
    src = _layout("row_wise")
    params, state = _init(src, jaxembed.sparse.lazy_adam(0.1))
    checkpoint.save_tables(tmp_path, 0, params, src, state=state)
    other = [*TABLES[:3], E("d", 8, 62, ["fd"])]
    with pytest.raises(checkpoint.CheckpointError, match="another collection"):
        checkpoint.restore_tables(tmp_path, other)
    with pytest.raises(checkpoint.CheckpointError, match="saved with another optimizer"):
        checkpoint.restore_tables(tmp_path, TABLES, tx=jaxembed.sparse.rowwise_adagrad(0.1))
    # tables stacked together whose step counts differ cannot share one count
    path = tmp_path / "step_000000000" / "tables.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"do not match the manifest's SHA-256"):
        checkpoint.restore_tables(tmp_path, TABLES, tx=jaxembed.sparse.lazy_adam(0.1))


@pytest.mark.parametrize("source", ["row_wise", "column_wise", "mixed"])
def test_a_sharded_collection_exports_a_torchrec_state_dict(tmp_path, source):
    layout = _layout(source)
    params, _ = _init(layout, jaxembed.sparse.sgd(0.1))
    path = checkpoint.export_tables(tmp_path / "ebc.safetensors", params, layout)
    want = S.tables_of(params, layout)
    assert sorted(jaxembed.safetensors_names(path)) == [
        f"embedding_bags.{t}.weight" for t in "abcd"
    ]
    for t in want:
        got = jaxembed.load_safetensors(path, prefix=f"embedding_bags.{t}.")["weight"]
        np.testing.assert_array_equal(np.asarray(got), want[t], err_msg=t)


def test_a_sharded_module_restores_into_a_module_on_another_plan(tmp_path):
    """An EmbeddingBagCollection(sharding=row-wise plan) and its sparse.Optimizer state restore
    into one built on the mixed plan: tables and state, read back the same."""
    import optax
    from flax import nnx

    def build(name, seed):
        layout = _layout(name)
        model = jaxembed.EmbeddingBagCollection(
            TABLES, rngs=nnx.Rngs(seed), sparse=True, sharding=layout
        )
        opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.1), jaxembed.sparse.rowwise_adagrad(0.1))
        return model, opt

    model, opt = build("row_wise", 0)
    # a trained-looking state: every row's statistic set, as training would set them
    for key, state in opt.sparse_state.items():
        leaf = state.sum
        leaf.set_value(jnp.arange(leaf.get_value().size, dtype=jnp.float32).reshape(leaf.shape))
        del key
    checkpoint.save_tables(tmp_path, 0, model, optimizer=opt)
    model2, opt2 = build("mixed", 5)
    checkpoint.restore_tables(tmp_path, model2, optimizer=opt2)
    for t, w in model.tables().items():
        np.testing.assert_array_equal(np.asarray(model2.tables()[t]), np.asarray(w), err_msg=t)
    back = checkpoint.restore_tables(tmp_path, TABLES, tx=jaxembed.sparse.rowwise_adagrad(0.1))[1]
    again = tmp_path / "again"
    checkpoint.save_tables(again, 0, model2, optimizer=opt2)
    back2 = checkpoint.restore_tables(again, TABLES, tx=jaxembed.sparse.rowwise_adagrad(0.1))[1]
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(back2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["mixed", "row_wise", "2d"])
def test_delta_checkpoints_of_a_sharded_collection_restore_bit_for_bit(tmp_path, name):
    """A DeltaTracker over a collection on a mesh marks, in each group's array, the rows its
    sharded update wrote (a routed owner's entries index its own block): every changed row of
    every table and state array is marked, and a full checkpoint plus deltas restores the live
    model and optimizer bit for bit into a fresh one."""
    import optax
    from flax import nnx

    layout = _layout(name)

    def build(seed):
        model = jaxembed.EmbeddingBagCollection(
            TABLES, rngs=nnx.Rngs(seed), sparse=True, sharding=layout
        )
        opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.1), jaxembed.sparse.rowwise_adagrad(0.1))
        return model, opt

    model, opt = build(0)
    tracker = checkpoint.DeltaTracker(model)

    @nnx.jit
    def step(model, opt, tracker, kj):
        loss = lambda m: sum(jnp.sum(v**2) for v in m(kj).values())  # noqa: E731
        _, grads = jaxembed.sparse.value_and_grad(loss)(model)
        opt.update(model, grads)
        tracker.update(grads)

    def arrays():
        return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state((model, opt)))}

    with jax.set_mesh(layout.mesh):
        checkpoint.save(tmp_path, 0, nnx.state((model, opt)))
        for i in (1, 2, 3):
            before = arrays()
            step(model, opt, tracker, _features(layout, i, rows=12))  # low ids: some rows kept
            after = arrays()
            masks = {k: np.asarray(m) for k, m in tracker.touched.items()}
            for path, a in after.items():
                changed = (a != before[path]).reshape(a.shape[0], -1).any(axis=1) if a.ndim else 0
                if not np.any(changed):
                    continue
                key = next((k for k in masks if k in "/".join(map(str, path))), None)
                if key is None:  # the routing stats: no table's rows
                    assert "routing" in path, path
                    continue
                mask = masks[key]
                assert mask.shape[0] == a.shape[0], path
                assert not (changed & ~mask).any(), f"{path}: changed rows left unmarked"
            assert any(not m.all() for m in masks.values())  # a delta, not everything
            checkpoint.save(tmp_path, i, nnx.state((model, opt)), tracker.touched)
            tracker.clear()
        _assert_restored(tmp_path, build, arrays())


def _assert_restored(tmp_path, build, live):
    """A fresh model and optimizer (``build(seed)``) restored from ``tmp_path``'s chain hold the
    ``live`` arrays bit for bit."""
    from flax import nnx

    fresh = build(7)
    nnx.update(fresh, checkpoint.restore(tmp_path, nnx.state(fresh)))
    got = dict(nnx.to_flat_state(nnx.state(fresh)))
    for path, a in live.items():
        np.testing.assert_array_equal(np.asarray(got[path]), a, err_msg=str(path))


def test_delta_tracking_refuses_rows_split_over_a_mesh_in_track():
    """The functional track takes a table's rows: a sharded update's entries (each device's
    own rows) are refused by name (the DeltaTracker maps them to the group's array)."""
    mesh = jax.make_mesh((8,), ("x",))
    rows = jax.device_put(jnp.arange(16), jax.sharding.NamedSharding(mesh, jax.P("x")))
    touched = checkpoint.untouched({"t": jnp.zeros((40, 2))})
    with pytest.raises(NotImplementedError, match=r"grads\['t'\] is split over a mesh"):
        checkpoint.track(touched, {"t": rows})


@pytest.mark.parametrize(
    "shape,axes",
    [((2, 4), dict(vocab="x", batch="data")), ((8,), dict(vocab="x")),
     ((4, 2), dict(vocab="data", dim="x"))],
)  # fmt: skip
def test_delta_checkpoints_of_a_table_sharding_table_restore_bit_for_bit(tmp_path, shape, axes):
    """A DeltaTracker over a table split by a TableSharding (rows; rows and columns; entries
    split over the batch, or not): its mask is split as the rows, each vocab shard marks its
    own rows of the update's entries; every changed row of the table and of the row-wise
    Adagrad state is marked, and a full checkpoint plus deltas restores bit for bit."""
    import optax
    from flax import nnx

    names = ("data", "x") if len(shape) == 2 else ("x",)
    mesh = jax.make_mesh(shape, names)
    layout = jaxembed.TableSharding(mesh, **axes)

    def build(seed):
        model = jaxembed.Embedding(64, 4, sparse=True, rngs=nnx.Rngs(seed), sharding=layout)
        opt = jaxembed.sparse.Optimizer(model, optax.sgd(0.1), jaxembed.sparse.rowwise_adagrad(0.1))
        return model, opt

    model, opt = build(0)
    tracker = checkpoint.DeltaTracker(model)
    assert tracker.touched["weight"].sharding.spec == jax.P(axes["vocab"])

    @nnx.jit
    def step(model, opt, tracker, ids):
        _, grads = jaxembed.sparse.value_and_grad(lambda m: jnp.sum(m(ids) ** 2))(model)
        opt.update(model, grads)
        tracker.update(grads)

    def arrays():
        return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state((model, opt)))}

    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        checkpoint.save(tmp_path, 0, nnx.state((model, opt)))
        for i in (1, 2, 3):
            before = arrays()
            ids = layout.put_indices(jnp.asarray(rng.integers(0, 40, (8, 3)), jnp.int32))
            step(model, opt, tracker, ids)
            after = arrays()
            mask = np.asarray(tracker.touched["weight"])
            assert 0 < mask.sum() < 40  # rows 40.. are never looked up
            for path, a in after.items():
                if a.ndim and a.shape[0] == 64:
                    changed = (a != before[path]).reshape(64, -1).any(axis=1)
                    assert not (changed & ~mask).any(), f"{path}: changed rows left unmarked"
            checkpoint.save(tmp_path, i, nnx.state((model, opt)), tracker.touched)
            tracker.clear()
        _assert_restored(tmp_path, build, arrays())
