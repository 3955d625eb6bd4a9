"""A collection's tables saved as tables, not as one plan's arrays: restored onto any plan.

A collection's params are physical arrays, one per stack (unsharded) or per group of a plan
(sharded): tables side by side, padded, a row-wise group's rows dealt round the devices. What is
saved here is each table's own ``(V, D)`` rows, and each optimizer state entry a row (``(V,)``
or ``(V, D)``) and its scalars, table by table, in one ``.safetensors`` file. The save writes
each device's block straight to its rows in the file (a memory map), and the restore builds each
device's block of the new layout from just its rows (``jax.make_array_from_callback`` over a
read-only memory map): no whole table is gathered into memory on either side.

The file's bytes are checked in chunks of at most 1 MiB: each chunk's SHA-256 is in the
manifest, and a restore checks every chunk it reads from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from jaxembed import _interop, collections, sharding
from jaxembed.checkpoint import _store
from jaxembed.checkpoint._store import CheckpointError, Saved
from jaxembed.collections import EmbeddingBagConfig
from jaxembed.collections._collection import _plan as _stacks
from jaxembed.collections._config import Plan
from jaxembed.modules._collection import _Collection
from jaxembed.sharding import ShardingPlan, spec_of
from jaxembed.sharding._collection import _state_spec
from jaxembed.sparse import Optimizer, RowOptimizer
from jaxembed.sparse._nnx import sparse_tables

TABLES = "tables.safetensors"
CHUNK = 1 << 20  # bytes a checksum covers, rounded to whole rows


class _Table(NamedTuple):
    name: str
    rows: np.ndarray  # the physical rows holding the table's rows, in order
    dim: int
    dtype: Any


class _Array(NamedTuple):
    """One physical array: its tables, its shape, and where its blocks go."""

    key: str
    tables: tuple[_Table, ...]
    shape: tuple[int, int]
    sharding: Any  # of its (V, D) arrays
    state_sharding: Any  # leaf -> sharding of a state leaf


def _arrays(layout: Any, stack: bool) -> list[_Array]:
    """The physical arrays of a collection laid out by ``layout``: a ``ShardingPlan``, or its
    table configs (unsharded, stacked as :func:`jaxembed.collections.init` stacks them)."""
    if isinstance(layout, ShardingPlan):
        out = []
        for g in layout.groups:
            tables = tuple(
                _Table(t.name, g.rows_of(t.name), t.embedding_dim, t.param_dtype)
                for t in g.stack.tables
            )
            mesh, axis = layout.mesh, layout.axis
            out.append(
                _Array(
                    g.name,
                    tables,
                    g.global_shape,
                    NamedSharding(mesh, spec_of(g, axis)),
                    lambda leaf, g=g, mesh=mesh, axis=axis: NamedSharding(
                        mesh, _state_spec(g, leaf, axis)
                    ),
                )
            )
        return out
    if isinstance(layout, str | bytes) or not isinstance(layout, Sequence | Plan):
        raise TypeError(
            "layout must be a jaxembed.sharding.ShardingPlan or a list of table configs, got "
            f"{type(layout).__name__}"
        )
    one = SingleDeviceSharding(jax.devices()[0])
    return [
        _Array(
            s.name,
            tuple(
                _Table(t.name, off + np.arange(t.num_embeddings), t.embedding_dim, t.param_dtype)
                for t, off in zip(s.tables, s.offsets, strict=True)
            ),
            (s.num_embeddings, s.embedding_dim),
            one,
            lambda leaf: one,
        )
        for s in _stacks(layout, stack).stacks
    ]


def _module_layout(module: _Collection) -> Any:
    if getattr(module, "bits", None) is not None:
        raise ValueError(
            "a quantized collection is frozen: save the float collection it came from, or its "
            "bytes with jaxembed.checkpoint.save"
        )
    return module.sharding if module.sharding is not None else module.plan


def _find_collection(model: Any) -> tuple[str, _Collection]:
    """The one collection module in ``model`` (the model itself, or one inside it), and its
    path there (``"ebc/"``, or ``""``)."""
    found = [
        ("/".join(str(p) for p in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, _Collection)
    ]
    if len(found) != 1:
        paths = [p or "the model" for p, _ in found]
        raise ValueError(
            f"the model holds {len(found)} EmbeddingBagCollection / EmbeddingCollection modules "
            f"({paths}); save_tables takes a model with exactly one"
        )
    path, module = found[0]
    return (path + "/" if path else ""), module


def _optimizer_keys(prefix: str, module: _Collection, optimizer: Any) -> dict[str, str]:
    """``{physical key: the optimizer's key}`` for each of the module's tables: the optimizer's
    state is keyed by the path from the model it was built for (the model passed here)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a jaxembed.sparse.Optimizer, got {type(optimizer).__name__}"
        )
    keys = {k.removeprefix("weights/"): prefix + k for k in sparse_tables(module)}
    missing = sorted(k for k in keys.values() if k not in optimizer.sparse_state)
    if missing or not keys:
        raise ValueError(
            f"the optimizer holds no state for the tables {missing or 'of a dense collection'} "
            f"(it holds {sorted(optimizer.sparse_state)}): pass the model it was built for, "
            "with sparse=True tables"
        )
    return keys


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _saved_name(table: str, what: str) -> str:
    """A saved entry's name: ``"<table>/weight"``, ``"<table>/state/<leaf>"``."""
    return f"{table}/{what}"


def _entries(
    array: _Array, leaf_shape: tuple[int, ...], what: str, name_of=_saved_name
) -> list[tuple[str, tuple]]:
    """The file's entries for one physical leaf: a ``(V, D)``, ``(V,)`` or scalar per table."""
    out = []
    for t in array.tables:
        if len(leaf_shape) == 0:
            shape = ()
        elif len(leaf_shape) == 1:
            shape = (len(t.rows),)
        elif len(leaf_shape) == 2:
            shape = (len(t.rows), t.dim)
        else:
            raise ValueError(f"{what} of {array.key!r} has shape {leaf_shape}: not rows")
        out.append((name_of(t.name, what), shape))
    return out


def _leaves(array: _Array, params: Mapping, state: Mapping | None) -> list[tuple[str, Any]]:
    leaves = [("weight", params[array.key]["weight"])]
    if state is not None:
        if array.key not in state:
            raise KeyError(f"state has no entry for {array.key!r} (it has {sorted(state)})")
        names, values, _ = _interop.named_leaves(state[array.key], "state")
        leaves += [("state/" + n, leaf) for n, leaf in zip(names, values, strict=True)]
    return leaves


def _overlap(t: _Table, index: tuple[slice, ...], shape: tuple[int, ...]):
    """The table's rows in a block ``index`` of a physical array: ``(its rows, the block's rows,
    the block's columns, the table's columns)``, or None."""
    rows = index[0].indices(shape[0]) if shape else None
    start, stop = rows[0], rows[1]
    mask = (t.rows >= start) & (t.rows < stop)
    if not mask.any():
        return None
    mine = np.flatnonzero(mask)
    block_rows = t.rows[mine] - start
    if len(shape) < 2:
        return mine, block_rows, None, None
    c0, c1, _ = index[1].indices(shape[1])
    hi = min(c1, t.dim)
    if hi <= c0:
        return None
    return mine, block_rows, slice(0, hi - c0), slice(c0, hi)


def save_tables(
    directory: str | os.PathLike,
    step: int,
    params: Mapping[str, Any] | Any,
    layout: ShardingPlan | Sequence[Any] | None = None,
    *,
    state: Mapping[str, Any] | None = None,
    stack: bool = True,
    optimizer: Optimizer | None = None,
) -> Saved:
    """Saves a collection's tables, and its row-wise optimizer state, table by table.

    Restore it with :func:`restore_tables` onto any layout of the same tables: another plan,
    another number of devices, or one device. Each device's block is written straight to its
    rows in the file; no table is gathered whole. The write is crash-safe as :func:`save`'s.
    In a multi-process job every process calls it: the first sizes the file, each writes the
    blocks of its own devices, and the first commits the checkpoint once all have written
    (a folder all processes share, as on one host or a shared disk with coherent writes).

    Args:
      directory: the checkpoints' folder (created if missing).
      step: an int >= 0, larger than every step already in ``directory``.
      params: ``{key: {"weight": array}}``: :func:`jaxembed.sharding.init` or
        :func:`~jaxembed.sharding.shard_params` for a plan, :func:`jaxembed.collections.init`
        unsharded. Or an nnx model holding one :class:`jaxembed.EmbeddingBagCollection` /
        :class:`~jaxembed.EmbeddingCollection` (or that module itself), on a mesh or not: its
        tables, its layout, and with ``optimizer`` its tables' optimizer state.
      layout: the :class:`jaxembed.sharding.ShardingPlan` of ``params``, or the table configs of
        an unsharded collection (None for a module).
      state: the state of :func:`jaxembed.sharding.optimizer` (or
        :func:`jaxembed.collections.optimizer`) for ``params``, or None. Each ``(V, ...)`` entry is
        saved by table; a scalar (a step count) once for each table.
      stack: with table configs: whether ``params`` stacks tables (as
        :func:`jaxembed.collections.init`'s ``stack``).
      optimizer: with a model: the :class:`jaxembed.sparse.Optimizer` built for that model,
        whose state of the collection's tables is saved.

    Returns:
      A :class:`Saved` (kind ``"tables"``).

    Raises:
      ValueError, KeyError, TypeError: a bad ``step``, ``params`` or ``state`` not of
        ``layout``; FileExistsError: ``step`` is already saved.

    Example:
      >>> import tempfile, jax, jaxembed
      >>> tables = [jaxembed.EmbeddingBagConfig("a", 4, 10, ["fa"]),
      ...           jaxembed.EmbeddingBagConfig("b", 4, 6, ["fb"])]
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)  # one stack "a+b"
      >>> folder = tempfile.mkdtemp()
      >>> jaxembed.checkpoint.save_tables(folder, 0, params, tables).kind
      'tables'
      >>> back = jaxembed.checkpoint.restore_tables(folder, tables, stack=False)  # unstacked
      >>> sorted(back), back["b"]["weight"].shape
      (['a', 'b'], (6, 4))
    """
    if isinstance(params, nnx.Module):
        if layout is not None or state is not None:
            raise TypeError("a module gives its own layout and state: pass optimizer= instead")
        prefix, module = _find_collection(params)
        layout = _module_layout(module)
        params = {k: {"weight": v.get_value()} for k, v in module.weights.items()}
        if optimizer is not None:
            state = {
                k: jax.tree.map(lambda v: v.get_value(), optimizer.sparse_state[o], is_leaf=_is_var)
                for k, o in _optimizer_keys(prefix, module, optimizer).items()
            }
    elif optimizer is not None:
        raise TypeError("optimizer= goes with a module; with params, pass state=")
    elif layout is None:
        raise TypeError("layout is required with params (a ShardingPlan, or the table configs)")
    directory, _ = _store._begin(directory, step, processes=True)
    step = int(step)
    arrays = _arrays(layout, stack)
    _check_params(params, arrays)
    partial = _store._partial(directory, step)
    path = partial / TABLES
    try:
        specs = _write(path, arrays, params, state, _saved_name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed call leaves nothing behind
        raise
    leaf_meta = {n: {"dtype": str(d), "shape": list(shape)} for n, (d, shape) in specs.items()}
    manifest = {
        "step": step,
        "kind": "tables",
        "parent": None,
        "parent_manifest_sha256": None,
        "tables": {
            t.name: {"num_rows": len(t.rows), "dim": t.dim} for a in arrays for t in a.tables
        },
        "leaves": leaf_meta,
        # the first process, which writes the manifest, hashes the file once all have written
        "files": {TABLES: _chunk_digests(path, specs)} if jax.process_index() == 0 else {},
    }
    return _store._commit(directory, step, partial, manifest)


def export_tables(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    layout: ShardingPlan | Sequence[Any],
    *,
    prefix: str | None = None,
    stack: bool = True,
) -> Path:
    """Writes a collection's tables as a TorchRec state dict in one ``.safetensors`` file, block
    by block: each device's block goes straight to its rows in the file, so no table is ever
    whole in memory, however large and however sharded.

    ``safetensors.torch.load_file(path)`` then gives the state dict of TorchRec's
    ``EmbeddingBagCollection`` (``embedding_bags.<table>.weight``) or ``EmbeddingCollection``
    (``embeddings.<table>.weight``) for ``load_state_dict``, and
    :meth:`jaxembed.EmbeddingBagCollection.from_torch` reads it back. The file is written aside
    and renamed into place.

    Args:
      path: the file to write.
      params: ``{key: {"weight": array}}`` of ``layout``.
      layout: a :class:`jaxembed.sharding.ShardingPlan`, or the table configs (unsharded).
      prefix: before each ``<table>.weight`` (default: ``"embedding_bags."`` for bag tables,
        ``"embeddings."`` otherwise, TorchRec's names).
      stack: with table configs: whether ``params`` stacks tables.

    Returns:
      The path written.

    Example:
      >>> import os, tempfile, jax, jaxembed
      >>> tables = [jaxembed.EmbeddingBagConfig("a", 4, 10, ["fa"])]
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)
      >>> path = os.path.join(tempfile.mkdtemp(), "ebc.safetensors")
      >>> _ = jaxembed.checkpoint.export_tables(path, params, tables)
      >>> jaxembed.safetensors_names(path)
      {'embedding_bags.a.weight': ('F32', (10, 4))}
    """
    arrays = _arrays(layout, stack)
    _check_params(params, arrays)
    if prefix is None:
        configs = layout.tables if isinstance(layout, ShardingPlan) else layout
        bags = all(isinstance(t, EmbeddingBagConfig) for t in configs)
        prefix = "embedding_bags." if bags else "embeddings."
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{_store._shared_token()}")
    try:
        _write(tmp, arrays, params, None, lambda table, what: f"{prefix}{table}.{what}")
        if jax.process_index() == 0:
            os.replace(tmp, path)
        _store.sync("exported")
    finally:
        if jax.process_index() == 0:
            tmp.unlink(missing_ok=True)
    return path


def _check_params(params: Any, arrays: list[_Array]) -> None:
    names = {a.key for a in arrays}
    if not isinstance(params, Mapping) or set(params) != names:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise KeyError(f"params must have the keys {sorted(names)} of layout, got {got}")


def _write(path: Path, arrays: list[_Array], params, state, name_of) -> dict:
    """Writes ``params`` (and ``state``) of ``arrays`` table by table to a new ``.safetensors``
    file at ``path``, each device's block to its rows; returns ``{name: (dtype, shape)}``."""
    plan_of = [(a, _leaves(a, params, state)) for a in arrays]
    specs: dict[str, tuple[Any, tuple]] = {}
    for a, leaves in plan_of:
        for what, leaf in leaves:
            if what == "weight" and tuple(leaf.shape) != a.shape:
                raise ValueError(
                    f"params[{a.key!r}]['weight'] has shape {tuple(leaf.shape)}, the layout's is "
                    f"{a.shape}"
                )
            for name, shape in _entries(a, tuple(leaf.shape), what, name_of):
                specs[name] = (np.dtype(leaf.dtype), shape)
    first = jax.process_index() == 0
    if first:  # one process sizes the file; each then writes the blocks of its own devices
        _interop.allocate_arrays(path, specs)  # its maps are dropped unwritten
    _store.sync("file allocated")
    maps = _interop.map_arrays(path, writable=True)
    for a, leaves in plan_of:
        for what, leaf in leaves:
            _write_leaf(a, what, leaf, maps, name_of, scalars=first)
    for m in maps.values():
        if isinstance(m, np.memmap):
            m.flush()
    del maps
    _store._fsync(path)
    _store.sync("blocks written")
    return specs


def _write_leaf(
    a: _Array, what: str, leaf: Any, maps: dict, name_of=_saved_name, scalars: bool = True
) -> None:
    """Writes the blocks of ``leaf`` this process holds (replica 0 of each) to their tables'
    rows; a scalar, where ``scalars``, once for each table."""
    leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
    shape = tuple(leaf.shape)
    if not shape:  # a scalar: one value for each table
        if not scalars:
            return
        value = np.asarray(leaf.addressable_data(0))
        for t in a.tables:
            maps[name_of(t.name, what)][...] = value
        return
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue  # a replica: its rows are written from replica 0
        index = tuple(shard.index) + (slice(None),) * (len(shape) - len(shard.index))
        block = None
        for t in a.tables:
            hit = _overlap(t, index, shape)
            if hit is None:
                continue
            if block is None:
                block = np.asarray(shard.data)  # this device's block, and no more
            mine, block_rows, block_cols, cols = hit
            target = maps[name_of(t.name, what)]
            if block_cols is None:
                target[mine] = block[block_rows]
            else:
                target[mine, cols] = block[block_rows, block_cols]


def _chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if shape else itemsize
    return max(1, CHUNK // max(row, 1))


def _sha256(part: np.ndarray) -> str:
    """The SHA-256 of an array's bytes, read in place (a map's rows are not copied)."""
    return hashlib.sha256(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data).hexdigest()


def _chunk_digests(path: Path, specs: Mapping[str, tuple[Any, tuple]]) -> dict:
    """The file's size, and each array's chunks' SHA-256 (a chunk: whole rows, at most 1 MiB)."""
    maps = _interop.map_arrays(path)
    digests = {}
    for name, (dtype, shape) in specs.items():
        data = maps[name]
        if not shape:
            digests[name] = [_sha256(data)]
            continue
        step = _chunk_rows(shape, np.dtype(dtype).itemsize)
        digests[name] = [_sha256(data[i : i + step]) for i in range(0, max(shape[0], 1), step)]
    return {"bytes": path.stat().st_size, "chunk_sha256": digests}


class _Reader:
    """The saved tables' file, read by rows; each chunk it reads from is checked once."""

    def __init__(self, folder: Path):
        manifest, _ = _store._read_manifest(folder, ("tables",))
        self.path = folder / TABLES
        entry = manifest["files"].get(TABLES)
        if not self.path.is_file() or entry is None:
            raise CheckpointError(f"{self.path} is missing")
        size = self.path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{self.path} has {size} bytes, its manifest says {entry['bytes']}: truncated "
                "or altered"
            )
        try:
            self.maps = _interop.map_arrays(self.path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self.manifest, self.digests, self.checked = manifest, entry["chunk_sha256"], set()

    def scalar(self, name: str) -> np.ndarray:
        data = self.maps[name]
        self._check(name, [0], data)
        return np.asarray(data)

    def read_into(self, name: str, rows: np.ndarray, cols: slice | None, out, where, out_cols):
        """Copies the rows ``rows`` (columns ``cols``) of ``name`` into ``out[where, out_cols]``,
        straight from the file's map, after checking each chunk they lie in."""
        data = self.maps[name]
        step = _chunk_rows(data.shape, data.dtype.itemsize)
        picked = _as_slice(rows)  # a block's rows are a run or a stride: read them as one
        if isinstance(picked, slice) and picked.step <= step:  # every chunk in the span
            chunks = range(picked.start // step, (picked.stop - 1) // step + 1)
        else:
            chunks = np.unique(rows // step)
        self._check(name, chunks, data, step)
        if cols is None:
            out[where] = data[picked]
            return
        out[where, out_cols] = data[picked, cols]

    def _check(self, name, chunks, data, step=1):
        for c in chunks:
            if (name, int(c)) in self.checked:
                continue
            part = np.asarray(data) if not data.shape else data[c * step : (c + 1) * step]
            got = _sha256(part)
            if got != self.digests[name][int(c)]:
                raise CheckpointError(
                    f"{self.path}: the bytes of {name!r} (rows {c * step}-{(c + 1) * step - 1}) "
                    "do not match the manifest's SHA-256: altered or corrupt"
                )
            self.checked.add((name, int(c)))


def _as_slice(rows: np.ndarray) -> slice | np.ndarray:
    """``rows`` as a slice where they are evenly spaced (a run of rows, or a row-wise device's
    every K-th row), else as they are."""
    if len(rows) < 2:
        return rows
    stride = int(rows[1] - rows[0])
    if stride > 0 and np.all(np.diff(rows) == stride):
        return slice(int(rows[0]), int(rows[-1]) + 1, stride)
    return rows


def restore_tables(
    directory: str | os.PathLike,
    layout: ShardingPlan | Sequence[Any] | Any,
    *,
    tx: RowOptimizer | None = None,
    step: int | None = None,
    stack: bool = True,
    optimizer: Optimizer | None = None,
) -> Any:
    """A collection saved by :func:`save_tables`, laid out by ``layout``: any plan, any number
    of devices, or one device.

    Each device's block is built from the file's rows it holds (a read-only memory map), so a
    process reads only the blocks of its devices. Rows a layout pads with are zeros, as
    :func:`jaxembed.sharding.shard_params` pads them.

    Args:
      directory: the checkpoints' folder.
      layout: a :class:`jaxembed.sharding.ShardingPlan` of the same tables, or the table
        configs (unsharded). Or an nnx model holding one collection module (built on any plan,
        or none): its tables, and with ``optimizer`` their optimizer state, are set in place.
      tx: the row-wise optimizer whose state was saved; its state is restored too.
      optimizer: with a model: the :class:`jaxembed.sparse.Optimizer` built for that model.
      step: the step (default: the newest whole checkpoint).
      stack: with table configs: whether to stack tables (as :func:`jaxembed.collections.init`).

    Returns:
      ``params`` (``{key: {"weight": array}}``), or ``(params, state)`` with ``tx``; None for a
      module (restored in place: every array is read before the first is set).

    Raises:
      CheckpointError: no such checkpoint, a truncated or altered file, or tables (names,
        shapes, dtypes) or a state that are not ``layout``'s; tables grouped together whose
        scalar state (a step count) differs.

    Example:
      >>> import tempfile, jax, jaxembed
      >>> tables = [jaxembed.EmbeddingBagConfig("a", 4, 10, ["fa"])]
      >>> tx = jaxembed.sparse.rowwise_adagrad(0.1)
      >>> params = jaxembed.collections.init(jax.random.key(0), tables)
      >>> state = jaxembed.collections.optimizer(tx, tables).init(params)
      >>> folder = tempfile.mkdtemp()
      >>> _ = jaxembed.checkpoint.save_tables(folder, 0, params, tables, state=state)
      >>> plan = jaxembed.sharding.by_hand(
      ...     tables, jax.make_mesh((1,), ("x",)), {"a": jaxembed.sharding.row_wise()})
      >>> params2, state2 = jaxembed.checkpoint.restore_tables(folder, plan, tx=tx)
      >>> bool((jaxembed.sharding.tables_of(params2, plan)["a"] == params["a"]["weight"]).all())
      True
    """
    _, folder = _store._folder(Path(directory), step)
    reader = _Reader(folder)
    module = None
    if isinstance(layout, nnx.Module):
        prefix, module = _find_collection(layout)
        layout = _module_layout(module)
        keys = {} if optimizer is None else _optimizer_keys(prefix, module, optimizer)
    elif optimizer is not None:
        raise TypeError("optimizer= goes with a module; with a layout, pass tx=")
    arrays = _arrays(layout, stack)
    saved = reader.manifest["tables"]
    want = {t.name: (len(t.rows), t.dim) for a in arrays for t in a.tables}
    have = {k: (v["num_rows"], v["dim"]) for k, v in saved.items()}
    if want != have:
        raise CheckpointError(
            f"{folder} holds the tables {have}, layout has {want}: another collection"
        )
    params = {}
    for a in arrays:
        dtype = np.dtype(a.tables[0].dtype)
        params[a.key] = {"weight": _build(reader, a, "weight", a.shape, dtype, a.sharding, folder)}
    if module is not None:
        current = {
            k: jax.tree.map(lambda v: v.get_value(), optimizer.sparse_state[o], is_leaf=_is_var)
            for k, o in keys.items()
        }
        state = _restore_state(reader, arrays, current, folder) if keys else {}
        for k, p in params.items():  # everything is read: now set
            module.weights[k].set_value(p["weight"])
        for k, o in keys.items():
            jax.tree.map(
                lambda v, x: v.set_value(x), optimizer.sparse_state[o], state[k], is_leaf=_is_var
            )
        return None
    if tx is None:
        return params
    if isinstance(layout, ShardingPlan):
        opt = sharding.optimizer(tx, layout)
    else:
        opt = collections.optimizer(tx, layout, stack=stack)
    return params, _restore_state(reader, arrays, jax.eval_shape(opt.init, params), folder)


def _restore_state(reader, arrays: list[_Array], shapes: Mapping, folder: Path) -> dict:
    """Each physical array's optimizer state, of ``shapes``' structure, read from the file."""
    state = {}
    for a in arrays:
        names, flat, treedef = _interop.named_leaves(shapes[a.key], "state")
        leaves = []
        for name, leaf in zip(names, flat, strict=True):
            what = "state/" + name
            placed = a.state_sharding(leaf)
            leaves.append(
                _build(reader, a, what, tuple(leaf.shape), np.dtype(leaf.dtype), placed, folder)
            )
        state[a.key] = jax.tree.unflatten(treedef, leaves)
    return state


def _build(reader, a: _Array, what, shape, dtype, placed, folder) -> jax.Array:
    """The physical array ``what`` of ``a``, each device's block read from its tables' rows."""
    for t in a.tables:
        name = _saved_name(t.name, what)
        meta = reader.manifest["leaves"].get(name)
        if meta is None:
            raise CheckpointError(f"{folder} holds no {name!r}: saved with another optimizer?")
        if meta["dtype"] != str(dtype):
            raise CheckpointError(f"{folder} holds {name!r} as {meta['dtype']}, layout has {dtype}")
    if not shape:
        values = {str(reader.scalar(_saved_name(t.name, what))) for t in a.tables}
        if len(values) != 1:
            raise CheckpointError(
                f"{folder}: the tables {[t.name for t in a.tables]} share one array in this "
                f"layout, but their {what!r} differ ({sorted(values)}); restore them apart"
            )
        value = reader.scalar(_saved_name(a.tables[0].name, what)).astype(dtype)
        return jax.make_array_from_callback((), placed, lambda _: value)

    def block(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        rows = index[0].indices(shape[0])
        out_shape = [rows[1] - rows[0]]
        if len(shape) == 2:
            cols = index[1].indices(shape[1])
            out_shape.append(cols[1] - cols[0])
        out = np.zeros(out_shape, dtype)
        for t in a.tables:
            hit = _overlap(t, index, shape)
            if hit is None:
                continue
            mine, block_rows, block_cols, cols = hit
            reader.read_into(
                _saved_name(t.name, what), mine, cols, out, _as_slice(block_rows), block_cols
            )
        return out

    return jax.make_array_from_callback(shape, placed, block)
