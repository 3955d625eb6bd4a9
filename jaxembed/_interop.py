"""Tables in and out: torch state dicts and safetensors files (e.g. a transformer's token table).

* :func:`from_torch` / :func:`to_torch`: an ``nn.Embedding`` / ``nn.EmbeddingBag`` state dict,
  or any state dict holding one under a prefix (``"model.embed_tokens."`` in a Hugging Face
  checkpoint), to and from ``{"weight": Array}``.
* :func:`load_safetensors` / :func:`save_safetensors`: the same for ``.safetensors`` files. The
  format (an 8-byte header length, a JSON header, raw little-endian data) is read here with NumPy:
  only the requested tensor is read from disk, so picking the token table out of a multi-GB
  checkpoint costs the table's size. No extra dependency.

Dtypes are kept (bfloat16 included); nothing is rounded on the way in or out.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxembed.core import _validation

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# every array a serving artifact's tables hold (packed rows, ids, fp8 scales): the format's names
_ARRAY_DTYPES = {
    **_SAFETENSORS_DTYPES,
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ARRAY_NAMES = {v: k for k, v in _ARRAY_DTYPES.items()}


def _key(prefix: str, name: str | None) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        return name
    return prefix + "weight"


def _missing(key: str, keys: list[str]) -> KeyError:
    tables = [k for k in keys if k.endswith("weight") and "emb" in k.lower()]
    hint = f"; embedding tables present: {tables[:8]}" if tables else ""
    return KeyError(f"no tensor named {key!r} (pass its prefix, e.g. 'model.embed_tokens.'){hint}")


def _torch_to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; NumPy has no bfloat16, so view its bits
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import torch

            return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _table(name: str, array: Any, dtype: Any) -> dict[str, jax.Array]:
    array = np.asarray(array)
    if array.dtype == np.float64 and dtype is None and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{name} is float64, which JAX holds only with jax_enable_x64; enable it, or pass "
            "dtype=jnp.float32 to round the table on purpose"
        )
    _validation.check_table(name, array)  # the stored table itself: 2-D, floating
    return {"weight": jnp.asarray(array, dtype)}


def from_torch(
    state_dict: Mapping[str, Any], *, prefix: str = "", name: str | None = None, dtype: Any = None
) -> dict[str, jax.Array]:
    """``params`` from a torch state dict: ``state_dict[prefix + "weight"]``.

    Args:
      state_dict: an ``nn.Embedding`` / ``nn.EmbeddingBag`` ``state_dict()``, or a whole model's.
      prefix: where the table sits, e.g. ``"model.embed_tokens."`` (Hugging Face decoders) or
        ``"embeddings.word_embeddings."`` (BERT).
      name: the full key instead of ``prefix + "weight"``.
      dtype: cast to this dtype; None keeps the checkpoint's (bfloat16 included).

    Returns:
      ``{"weight": Array[num_embeddings, embedding_dim]}``.

    Raises:
      TypeError: ``state_dict`` is not a mapping; the tensor is not floating; a float64 tensor
        with x64 off (it would be rounded silently).
      KeyError: the key is missing (the message lists the keys that look like tables).
      ValueError: the tensor is not 2-D.

    Example:
      >>> import torch, jaxembed
      >>> emb = torch.nn.Embedding(4, 2)
      >>> params = jaxembed.from_torch({"encoder.tok." + k: v for k, v in emb.state_dict().items()},
      ...                              prefix="encoder.tok.")
      >>> params["weight"].shape
      (4, 2)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    key = _key(prefix, name)
    if key not in state_dict:
        raise _missing(key, list(state_dict))
    return _table(f"state_dict[{key!r}]", _torch_to_numpy(state_dict[key]), dtype)


def to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """A torch state dict ``{prefix + "weight": tensor}`` for ``nn.Embedding.load_state_dict``.

    Args:
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``.
      prefix: prepended to ``"weight"``, e.g. ``"model.embed_tokens."``.

    Returns:
      ``{prefix + "weight": torch.Tensor}`` in the table's dtype (bfloat16 included), on CPU.

    Raises:
      TypeError, ValueError: ``params`` is not a table dict.

    Example:
      >>> import jax.numpy as jnp, torch, jaxembed
      >>> emb = torch.nn.Embedding(3, 2)
      >>> emb.load_state_dict(jaxembed.to_torch({"weight": jnp.ones((3, 2))}))
      <All keys matched successfully>
    """
    import torch

    weight = np.array(_validation.check_weight(params))  # a copy torch may own
    key = _key(prefix, None)
    if weight.dtype == ml_dtypes.bfloat16:
        return {key: torch.from_numpy(weight.view(np.int16)).view(torch.bfloat16)}
    return {key: torch.from_numpy(weight)}


def _read_header(f: Any, path: str) -> tuple[dict[str, Any], int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", raw)
    if size > 100 * 2**20:
        raise ValueError(f"{path} is not a safetensors file (header of {size} bytes)")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file (bad header: {e})") from None
    return header, 8 + size


def safetensors_names(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file holds: ``{name: (dtype, shape)}``, read from its header.

    Args:
      path: the file.

    Returns:
      ``{name: (dtype, shape)}``, without the ``__metadata__`` entry.

    Raises:
      ValueError: the file is not a safetensors file.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, jaxembed
      >>> path = os.path.join(tempfile.mkdtemp(), "emb.safetensors")
      >>> jaxembed.save_safetensors(path, {"weight": jnp.eye(3)}, prefix="tok.")
      >>> jaxembed.safetensors_names(path)
      {'tok.weight': ('F32', (3, 3))}
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        header, _ = _read_header(f, path)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def load_safetensors(
    path: str | os.PathLike, *, prefix: str = "", name: str | None = None, dtype: Any = None
) -> dict[str, jax.Array]:
    """``params`` from the tensor ``prefix + "weight"`` of a ``.safetensors`` file.

    Only that tensor's bytes are read. Float64, float32, float16 and bfloat16 tables are supported.

    Args:
      path: the file.
      prefix: where the table sits, e.g. ``"model.embed_tokens."``.
      name: the full tensor name instead of ``prefix + "weight"``.
      dtype: cast to this dtype; None keeps the file's.

    Returns:
      ``{"weight": Array[num_embeddings, embedding_dim]}``.

    Raises:
      KeyError: no such tensor (the message lists the file's tensors).
      TypeError: the tensor is not floating.
      ValueError: not a safetensors file, truncated, or the tensor is not 2-D.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, jaxembed
      >>> path = os.path.join(tempfile.mkdtemp(), "emb.safetensors")
      >>> jaxembed.save_safetensors(path, {"weight": jnp.eye(2)})
      >>> jaxembed.load_safetensors(path)["weight"]
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """
    path = os.fspath(path)
    key = _key(prefix, name)
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path)
        if key not in header or key == "__metadata__":
            raise _missing(key, [k for k in header if k != "__metadata__"])
        entry = header[key]
        np_dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if np_dtype is None:
            raise TypeError(
                f"{key!r} in {path} has dtype {entry['dtype']}; a table must be one of "
                f"{sorted(_SAFETENSORS_DTYPES)}"
            )
        array = _read_entry(f, path, key, entry, np_dtype, data_start)
    return _table(f"{key!r} in {path}", array, dtype)


def _read_entry(f: Any, path: str, key: str, entry: dict, dtype: Any, data_start: int):
    """The array of one header ``entry``, read from the open file ``f``; ``ValueError`` where
    its offsets do not match its shape, or the file ends before its data does."""
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
        raise ValueError(f"{key!r} in {path}: data_offsets do not match shape {shape}")
    f.seek(data_start + begin)
    array = np.fromfile(f, dtype=dtype, count=count)
    if array.size != count:
        raise ValueError(f"{path} is truncated: {key!r} needs {count} values")
    return array.reshape(shape)


def save_safetensors(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    *,
    prefix: str = "",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``params["weight"]`` as the tensor ``prefix + "weight"`` of a ``.safetensors`` file.

    The file is written beside ``path`` and renamed into place, so a failed save leaves no half
    file.

    Args:
      path: the file to write (replaced if it exists).
      params: ``{"weight": Array[num_embeddings, embedding_dim]}``, float64/32/16 or bfloat16.
      prefix: prepended to ``"weight"``, e.g. ``"model.embed_tokens."``.
      metadata: string pairs for the file's ``__metadata__``.

    Raises:
      TypeError, ValueError: ``params`` is not a table dict of a supported dtype.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, jaxembed
      >>> path = os.path.join(tempfile.mkdtemp(), "emb.safetensors")
      >>> jaxembed.save_safetensors(path, {"weight": jnp.eye(3)}, prefix="model.embed_tokens.")
      >>> jaxembed.load_safetensors(path, prefix="model.embed_tokens.")["weight"][1]
      Array([0., 1., 0.], dtype=float32)
    """
    weight = np.asarray(_validation.check_weight(params))
    if weight.dtype not in _SAFETENSORS_NAMES:
        raise TypeError(f"safetensors tables must be one of {sorted(_SAFETENSORS_DTYPES)}")
    write_arrays(path, {_key(prefix, None): weight}, metadata)


def _array_name(key: str, dtype: np.dtype) -> str:
    name = _ARRAY_NAMES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise TypeError(f"{key!r}: safetensors holds no {dtype} arrays")
    return name


def _header(
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header (its 8-byte size first) for arrays of ``{name: (dtype, shape)}``, laid
    out in that order, and each array's ``(start, bytes)`` in the file."""
    header: dict[str, Any] = {}
    spans, offset = {}, 0
    for key, (dtype, shape) in specs.items():
        name = _array_name(key, np.dtype(dtype))
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ARRAY_DTYPES[name].itemsize
        header[key] = {
            "dtype": name,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        spans[key] = (offset, nbytes)
        offset += nbytes
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    head = struct.pack("<Q", len(raw)) + raw
    return head, {k: (len(head) + start, n) for k, (start, n) in spans.items()}


def write_arrays(
    path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes named arrays of any dtype the format names (floats, ints, bool, fp8) as one
    ``.safetensors`` file, beside ``path`` and renamed into place (a failed write leaves no
    half file); ``TypeError`` names an array of another dtype."""
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    head, _ = _header({k: (a.dtype, a.shape) for k, a in arrays.items()}, metadata)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:  # written aside and renamed: a failed save leaves no half file
        f.write(head)
        for key, array in arrays.items():
            dtype = _ARRAY_DTYPES[_array_name(key, array.dtype)]
            f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())  # little-endian
    os.replace(tmp, path)


def allocate_arrays(
    path: str | os.PathLike, specs: Mapping[str, tuple[Any, tuple[int, ...]]]
) -> dict[str, np.memmap]:
    """A new ``.safetensors`` file at ``path`` for arrays of ``{name: (dtype, shape)}``, sized
    and zero-filled, and a writable memory map of each array in it: a caller fills them block by
    block, never holding a whole array in memory. Flush the maps before reading the file."""
    head, spans = _header({k: (np.dtype(d), tuple(s)) for k, (d, s) in specs.items()}, None)
    size = len(head) + sum(n for _, n in spans.values())
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return _maps(path, specs, spans, "r+")


def _maps(path, specs, spans, mode) -> dict[str, np.memmap]:
    out = {}
    for key, (dtype, shape) in specs.items():
        start, nbytes = spans[key]
        dtype = _ARRAY_DTYPES[_array_name(key, np.dtype(dtype))]
        if nbytes == 0:  # numpy cannot map zero bytes
            out[key] = np.zeros(tuple(shape), dtype)
            continue
        out[key] = np.memmap(path, dtype=dtype, mode=mode, offset=start, shape=tuple(shape))
    return out


def map_arrays(path: str | os.PathLike, *, writable: bool = False) -> dict[str, np.memmap]:
    """A memory map of every array of a ``.safetensors`` file (read-only, or ``writable``):
    slicing one reads only those bytes. ``ValueError`` names the file if it is not one, or is
    shorter than its header says."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path)
    size = os.path.getsize(path)
    specs, spans = {}, {}
    for key, entry, dtype in _typed_entries(header, path):
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{key!r} in {path}: data_offsets do not match shape {shape}")
        if data_start + end > size:
            raise ValueError(f"{path} is truncated: {key!r} ends past its end")
        specs[key], spans[key] = (dtype, shape), (data_start + begin, end - begin)
    return _maps(path, specs, spans, "r+" if writable else "r")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def named_leaves(tree: Any, what: str) -> tuple[list[str], list[Any], Any]:
    """A pytree's leaves named by their paths (``"users/weight"``), and its treedef; ``what``
    (the argument's name) leads the ``ValueError`` where two leaves would share a name."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: two leaves share a name: {names}")
    return names, [leaf for _, leaf in flat], treedef


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a ``.safetensors`` file, by name, as :func:`write_arrays` writes them;
    ``ValueError`` names the file if it is not one, or is truncated."""
    path = os.fspath(path)
    out = {}
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path)
        for key, entry, dtype in _typed_entries(header, path):
            out[key] = _read_entry(f, path, key, entry, dtype, data_start)
    return out


def _typed_entries(header: dict, path: str):
    """A header's arrays, ``(name, entry, dtype)``; ``ValueError`` on a dtype it cannot read."""
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _ARRAY_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"{key!r} in {path} has dtype {entry.get('dtype')!r}")
        yield key, entry, dtype
