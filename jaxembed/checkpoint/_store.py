"""Full and delta checkpoints in a directory, written so that a crash never leaves one half-read.

Layout: ``directory/step_000000012/`` holds ``arrays.safetensors`` and ``manifest.json``. A save
writes both into a hidden ``.step_000000012.partial-<pid>-<nonce>`` folder, flushes them to disk,
and renames the folder into place: a ``step_*`` folder is always whole, and a save killed part-way
leaves only a hidden partial folder, which :func:`steps` and :func:`restore` never read (and
:func:`restore` names, where its step is asked for). The manifest holds each file's size and
SHA-256, each leaf's name, dtype and shape, and, for a delta, its parent step and the SHA-256 of
the parent's manifest: a truncated or altered file, or a broken chain, raises, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.typing import ArrayLike

from jaxembed import _interop

FORMAT = "jaxembed.checkpoint/1"
MANIFEST = "manifest.json"
ARRAYS = "arrays.safetensors"
_STEP = re.compile(r"^step_(\d{9,})$")
_PARTIAL = re.compile(r"^\.step_(\d{9,})\.partial-")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it was saved: incomplete, truncated, altered, or not
    the state asked for. The message names the file.

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxembed
      >>> try:
      ...     jaxembed.checkpoint.restore(tempfile.mkdtemp(), {"w": jnp.zeros(2)})
      ... except jaxembed.checkpoint.CheckpointError as e:
      ...     print(str(e).split(" ")[-3:])
      ['no', 'whole', 'checkpoint']
    """


class Saved(NamedTuple):
    """What :func:`save` wrote.

    Attributes:
      step: the step.
      kind: ``"full"`` or ``"delta"``.
      parent: the step a delta applies on top of (None for a full checkpoint).
      path: the checkpoint's folder.
      nbytes: the bytes written (arrays and manifest).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxembed
      >>> saved = jaxembed.checkpoint.save(tempfile.mkdtemp(), 3, {"w": jnp.zeros((4, 2))})
      >>> saved.step, saved.kind, saved.parent, saved.path.name
      (3, 'full', None, 'step_000000003')
    """

    step: int
    kind: str
    parent: int | None
    path: Path
    nbytes: int


def _name(step: int) -> str:
    return f"step_{step:09d}"


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return int(step)


def steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the whole checkpoints in ``directory``, in order (saves that did not finish
    are left out).

    Args:
      directory: the checkpoints' folder (a missing one holds none).

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxembed
      >>> folder = tempfile.mkdtemp()
      >>> for step in (0, 10):
      ...     _ = jaxembed.checkpoint.save(folder, step, {"w": jnp.zeros(2)})
      >>> jaxembed.checkpoint.steps(folder)
      [0, 10]
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = (_STEP.match(p.name) for p in directory.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def _partials(directory: Path, step: int) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if (m := _PARTIAL.match(p.name)) and int(m.group(1)) == step
    )


def _leaves(state: Any, what: str = "state") -> list[tuple[str, Any]]:
    names, leaves, _ = _interop.named_leaves(state, what)
    return list(zip(names, leaves, strict=True))


def _segments(name: str) -> list[str]:
    return [s for s in name.split("/") if s]


def _table_of(name: str, shape: tuple[int, ...], tables: Mapping[str, int]) -> str | None:
    """The table whose rows the leaf ``name`` holds: the key whose path segments appear in the
    leaf's path, run together, and whose row count is the leaf's first dimension."""
    segments = _segments(name)
    hits = []
    for key, num_rows in tables.items():
        want = _segments(key)
        k = len(want)
        if any(segments[i : i + k] == want for i in range(len(segments) - k + 1)):
            hits.append((key, num_rows))
    if len(hits) > 1:
        raise ValueError(
            f"the leaf {name!r} lies under two tracked tables {[k for k, _ in hits]}; "
            "name the tables by longer paths"
        )
    if hits and len(shape) >= 1 and shape[0] == hits[0][1]:
        return hits[0][0]
    return None  # saved whole: scalars (a step count), or rows of another length


def _is_key(leaf: Any) -> bool:
    return jnp.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key)


def _host(leaf: Any) -> tuple[np.ndarray, str | None]:
    """A leaf as a NumPy array, and the PRNG implementation of a typed key array."""
    if _is_key(leaf):
        return np.asarray(jax.random.key_data(leaf)), str(jax.random.key_impl(leaf))
    return np.asarray(leaf), None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(folder: Path, kinds: tuple[str, ...] | None = None) -> tuple[dict, str]:
    """A checkpoint's manifest and its SHA-256; with ``kinds``, one of those kinds (a
    ``"tables"`` checkpoint is :func:`restore_tables`'s, the others :func:`restore`'s)."""
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {folder} is not a whole checkpoint") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path} is not a checkpoint manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    kind = manifest.get("kind")
    if kinds is not None and kind not in kinds:
        reader = "restore_tables" if kind == "tables" else "restore"
        raise CheckpointError(f"{path} is a {kind!r} checkpoint: {reader} reads it")
    return manifest, hashlib.sha256(raw).hexdigest()


def _take_rows(leaf: Any, rows: np.ndarray) -> Any:
    """``leaf[rows]``: on one device a gather there; split over devices, each shard's rows
    picked from its block on the host, one block at a time (no table is gathered whole)."""
    shards = getattr(leaf, "addressable_shards", None)
    if not shards or len(shards) == 1 or _is_key(leaf):
        return jnp.take(jnp.asarray(leaf), jnp.asarray(rows), axis=0)
    out = np.zeros((rows.shape[0], *leaf.shape[1:]), leaf.dtype)
    for shard in shards:
        if shard.replica_id != 0:
            continue
        start, stop, _ = shard.index[0].indices(leaf.shape[0])
        mine = (rows >= start) & (rows < stop)
        if mine.any():
            out[(mine, *shard.index[1:])] = np.asarray(shard.data)[rows[mine] - start]
    return out


def save(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    touched: Mapping[str, ArrayLike] | None = None,
) -> Saved:
    """Saves ``state`` at ``step``: whole (``touched=None``), or as a delta of the rows changed.

    A delta holds, for each leaf of a tracked table (the table, and each optimizer state with one
    entry a row), only the rows ``touched`` marks, with their indices; every other leaf (dense
    layers, step counts, a managed-collision state) is saved whole. It applies on top of the
    newest checkpoint in ``directory``, which must hold every change made before ``touched`` was
    last cleared. :func:`restore` replays the chain from the last full checkpoint.

    The write is crash-safe: the checkpoint appears under its name only once every byte of it is
    on disk (see the module's notes). On a single process: a state on a mesh is read through its
    addressable shards, and a multi-process state raises.

    Args:
      directory: the checkpoints' folder (created if missing).
      step: an int >= 0, larger than every step already in ``directory``.
      state: any pytree of arrays: ``nnx.state((model, optimizer))``, a dict of tables and
        optimizer states. Leaves are named by their paths.
      touched: ``{key: (V,) bool}`` from :func:`track` or :class:`DeltaTracker`. A key names a
        table by its path segments: every leaf whose path contains them, in a run, and whose first
        dimension is ``V`` is saved by rows (``"weight"`` matches ``0/weight/value`` and
        ``1/sparse_state/weight/mu/value``). None saves a full checkpoint.

    Returns:
      A :class:`Saved`.

    Raises:
      ValueError: a bad ``step``, a step not after the newest one, a delta with no checkpoint to
        apply on, or a ``touched`` key that names no leaf of ``V`` rows.
      FileExistsError: ``step`` is already saved.
      NotImplementedError: a state spread over several processes.

    Example:
      >>> import tempfile, jax.numpy as jnp, jaxembed
      >>> folder = tempfile.mkdtemp()
      >>> state = {"weight": jnp.zeros((1000, 4)), "step": jnp.array(0)}
      >>> jaxembed.checkpoint.save(folder, 0, state).kind
      'full'
      >>> state = {"weight": state["weight"].at[7].set(1.0), "step": jnp.array(1)}
      >>> touched = {"weight": jnp.zeros(1000, bool).at[7].set(True)}
      >>> saved = jaxembed.checkpoint.save(folder, 1, state, touched)
      >>> saved.kind, saved.parent, saved.nbytes < 2_000
      ('delta', 0, True)
      >>> like = {"weight": jnp.zeros((1000, 4)), "step": jnp.array(0)}
      >>> float(jaxembed.checkpoint.restore(folder, like)["weight"][7, 0])
      1.0
    """
    directory, done = _begin(directory, step)
    step = int(step)
    named = _leaves(state)

    parent = parent_digest = None
    tables: dict[str, int] = {}
    masks: dict[str, np.ndarray] = {}
    if touched is not None:
        if not done:
            raise ValueError(
                f"{directory} holds no checkpoint for a delta to apply on: save a full one "
                "first (touched=None)"
            )
        parent = done[-1]
        _, parent_digest = _read_manifest(directory / _name(parent))
        for key, mask in touched.items():
            mask = np.asarray(mask)
            if mask.ndim != 1 or mask.dtype != np.bool_:
                raise ValueError(
                    f"touched[{key!r}] must be a (V,) bool mask, got {mask.dtype}{list(mask.shape)}"
                )
            tables[key], masks[key] = mask.shape[0], mask

    arrays: dict[str, np.ndarray] = {}
    leaves: dict[str, dict] = {}
    used: set[str] = set()
    rows = {key: np.flatnonzero(m).astype(np.int64) for key, m in masks.items()}
    for name, leaf in named:
        shape, dtype = _abstract(leaf)
        table = _table_of(name, shape, tables) if tables else None
        if table is not None:
            used.add(table)
            value, impl = _host(_take_rows(leaf, rows[table]))
        else:
            value, impl = _host(leaf)
        arrays[name] = value
        leaves[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "table": table,
            "key_impl": impl,
        }
    unused = sorted(set(tables) - used)
    if unused:
        raise ValueError(
            f"touched names tables {unused} that no leaf of state holds (a leaf whose path has "
            "those segments and as many rows as the mask)"
        )
    for key in sorted(used):
        arrays[f"__rows__/{key}"] = rows[key]

    partial = _partial(directory, step)
    _interop.write_arrays(partial / ARRAYS, arrays)
    _fsync(partial / ARRAYS)
    manifest = {
        "step": step,
        "kind": "full" if touched is None else "delta",
        "parent": parent,
        "parent_manifest_sha256": parent_digest,
        "tables": {key: {"num_rows": tables[key], "rows": len(rows[key])} for key in sorted(used)},
        "leaves": leaves,
        "files": {ARRAYS: _file_entry(partial / ARRAYS)},
    }
    return _commit(directory, step, partial, manifest)


def _begin(
    directory: str | os.PathLike, step: Any, *, processes: bool = False
) -> tuple[Path, list[int]]:
    """The checks before a save of ``step``: the folder (created), and its whole steps.
    ``processes``: the save runs in every process of a multi-process job (else it refuses one)."""
    step = _check_step(step)
    if jax.process_count() > 1 and not processes:
        raise NotImplementedError(
            "jaxembed.checkpoint saves from a single process; a multi-process state needs each "
            "process to write its own blocks, which is not built yet"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _name(step)
    if final.exists():
        raise FileExistsError(f"{final} exists: step {step} is already saved")
    done = steps(directory)
    if done and done[-1] > step:
        raise ValueError(
            f"step must be after the newest checkpoint in {directory} (step {done[-1]}), got {step}"
        )
    return directory, done


def _partial(directory: Path, step: int) -> Path:
    """A new hidden folder to write the checkpoint of ``step`` into: one name in every process
    of a job, made by the first."""
    partial = directory / f".{_name(step)}.partial-{_shared_token()}"
    if jax.process_index() == 0:
        partial.mkdir()
    sync("partial folder made")
    return partial


def _shared_token() -> str:
    """A random token, the same in every process (the first process's)."""
    token = np.frombuffer(secrets.token_bytes(8), np.uint32).copy()
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return f"{os.getpid() if jax.process_count() == 1 else 'job'}-{token[0]:08x}{token[1]:08x}"


def sync(what: str) -> None:
    """Every process of a multi-process job waits here for the others (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxembed.checkpoint: {what}")


def _file_entry(path: Path, **extra: Any) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _interop.file_sha256(path), **extra}


def _commit(directory: Path, step: int, partial: Path, manifest: dict) -> Saved:
    """Writes the manifest, flushes ``partial`` and renames it into place as ``step`` (the
    first process of a job does, once every process has written its blocks)."""
    final = directory / _name(step)
    if jax.process_index() == 0:
        _write_manifest(partial, {"format": FORMAT, **manifest})
        _fsync(partial)
        os.rename(partial, final)  # atomic: the checkpoint appears whole, or not at all
        _fsync(directory)
    sync("committed")
    nbytes = sum(p.stat().st_size for p in final.iterdir())
    return Saved(step, manifest["kind"], manifest["parent"], final, nbytes)


def _load(folder: Path) -> tuple[dict, str, dict[str, np.ndarray]]:
    manifest, digest = _read_manifest(folder, ("full", "delta"))
    files = manifest.get("files", {})
    if set(files) != {ARRAYS}:
        raise CheckpointError(f"{folder / MANIFEST} lists {sorted(files)}, not [{ARRAYS!r}]")
    path = folder / ARRAYS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size, want = path.stat().st_size, files[ARRAYS]
    if size != want["bytes"]:
        raise CheckpointError(
            f"{path} has {size} bytes, its manifest says {want['bytes']}: truncated or altered"
        )
    if _interop.file_sha256(path) != want["sha256"]:
        raise CheckpointError(f"{path} does not match its manifest's SHA-256: altered or corrupt")
    arrays = _interop.read_arrays(path)
    missing = sorted(set(manifest["leaves"]) - set(arrays))
    if missing:
        raise CheckpointError(f"{path} lacks the leaves {missing} its manifest lists")
    return manifest, digest, arrays


def _folder(directory: Path, step: int | None) -> tuple[int, Path]:
    """The step (default: the newest whole one) and its folder; ``CheckpointError`` where
    there is none, naming a save of it that did not finish."""
    if step is None:
        done = steps(directory)
        if not done:
            raise CheckpointError(f"{directory} holds no whole checkpoint")
        step = done[-1]
    step = _check_step(step)
    folder = directory / _name(step)
    if not folder.is_dir():
        partial = _partials(directory, step) if directory.is_dir() else []
        if partial:
            raise CheckpointError(
                f"the save of step {step} did not finish ({partial[0]} is left, partly "
                f"written): it is never loaded. Whole checkpoints: {steps(directory)}"
            )
        raise CheckpointError(
            f"{folder} does not exist; whole checkpoints in {directory}: {steps(directory)}"
        )
    return step, folder


def _chain(directory: Path, step: int) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """The checkpoints to replay for ``step``: its last full one, then each delta, in order."""
    chain = []
    want_digest = None
    while True:
        _, folder = _folder(directory, step)
        manifest, digest, arrays = _load(folder)
        if want_digest is not None and digest != want_digest:
            raise CheckpointError(
                f"{folder / MANIFEST} is not the checkpoint its child delta was saved on top of "
                "(its SHA-256 differs): the chain is broken"
            )
        chain.append((manifest, arrays))
        if manifest["kind"] == "full":
            return chain[::-1]
        step, want_digest = manifest["parent"], manifest["parent_manifest_sha256"]


def _abstract(leaf: Any) -> tuple[tuple[int, ...], str]:
    """A leaf's shape and dtype name, for arrays, ``ShapeDtypeStruct`` s and Python numbers."""
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        leaf = np.asarray(leaf)
    if _is_key(leaf):
        return tuple(leaf.shape), str(leaf.dtype)
    return tuple(leaf.shape), str(np.dtype(leaf.dtype))


def restore(directory: str | os.PathLike, like: Any, step: int | None = None) -> Any:
    """The state saved at ``step``: its full checkpoint with every delta after it applied.

    Args:
      directory: the checkpoints' folder.
      like: a pytree with the saved state's structure, shapes and dtypes: a freshly built state,
        or ``jax.ShapeDtypeStruct`` leaves (``nnx.eval_shape``). A leaf's ``sharding``, where it
        has one, places the restored array.
      step: the step to restore (default: the newest whole checkpoint).

    Returns:
      ``like``'s pytree of the saved arrays, bit for bit.

    Raises:
      CheckpointError: no checkpoint, a save that did not finish, a truncated or altered file, a
        broken chain of deltas, or a state that is not ``like`` (the leaf, and what each holds,
        named).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jaxembed
      >>> folder = tempfile.mkdtemp()
      >>> _ = jaxembed.checkpoint.save(folder, 0, {"w": jnp.arange(4.0)})
      >>> like = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
      >>> jaxembed.checkpoint.restore(folder, like)["w"]
      Array([0., 1., 2., 3.], dtype=float32)
    """
    directory = Path(directory)
    step, _ = _folder(directory, step)
    chain = _chain(directory, step)
    named = _leaves(like, "like")
    names = [n for n, _ in named]
    saved = chain[-1][0]["leaves"]
    if set(saved) != set(names):
        ours, theirs = sorted(set(saved) - set(names))[:5], sorted(set(names) - set(saved))[:5]
        raise CheckpointError(
            f"{directory / _name(step)} holds another state than like: only in the checkpoint "
            f"{ours}, only in like {theirs}"
        )
    out = {}
    for name, leaf in named:
        shape, dtype = _abstract(leaf)
        for manifest, _ in chain:
            entry = manifest["leaves"].get(name)
            if entry is None or (tuple(entry["shape"]), entry["dtype"]) != (shape, dtype):
                got = None if entry is None else f"{entry['dtype']}{entry['shape']}"
                raise CheckpointError(
                    f"{directory / _name(manifest['step'])} holds {name!r} as {got}, "
                    f"like has {dtype}{list(shape)}"
                )
    for manifest, arrays in chain:
        for name in names:
            entry, value = manifest["leaves"][name], arrays[name]
            table = entry["table"]
            if manifest["kind"] == "full" or table is None:
                out[name] = np.array(value)
            else:
                out[name][arrays[f"__rows__/{table}"]] = value
    leaves = []
    for name, leaf in named:
        value = out[name]
        if _is_key(leaf):
            value = jax.random.wrap_key_data(value, impl=saved[name]["key_impl"])
        sharding = getattr(leaf, "sharding", None)
        leaves.append(
            jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        )
    return jax.tree.unflatten(jax.tree.structure(like), leaves)
