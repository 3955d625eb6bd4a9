"""A forward pass exported for serving, with its tables as arguments: :class:`Artifact`."""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jaxembed
from jaxembed import _interop
from jaxembed.kernels import _ffi

#: the layout of a saved artifact's directory
FORMAT = "jaxembed.serving/1"
MODEL, TABLES, MANIFEST = "model.jaxexport", "tables.safetensors", "manifest.json"
#: ids and entries are counted in int32: the largest a symbolic dimension may be
MAX_DIM = 2**31 - 1
#: symbolic_shape's default bound: an array of a symbolic dimension times up to 128 more
#: entries a row still counts its entries in int32
DEFAULT_MAX = 2**24


def symbolic_shape(spec: str, *, max_size: int = DEFAULT_MAX) -> tuple[Any, ...]:
    """``jax.export.symbolic_shape(spec)``, each dimension bounded as jaxembed's lookups need.

    A lookup counts its ids in int32, and checks so when it is traced: with a symbolic
    dimension that check can only decide under a bound. Every dimension that ``spec`` names is
    therefore at most ``max_size``: ``2**24`` by default, which leaves an array of ``b`` rows up
    to 128 ids a row. The artifact serves any size within the bound, and its manifest says it.
    Where jax reports a comparison of a dimension as inconclusive, lower ``max_size``.

    Args:
      spec: dimensions as ``jax.export.symbolic_shape`` takes them, e.g. ``"b, c"``.
      max_size: the largest size any of them may take, at most ``2**31 - 1``.

    Returns:
      The dimensions, for ``jax.ShapeDtypeStruct`` shapes (``(2 * b,)``: 2 features of ``b``
      samples).

    Raises:
      ValueError: ``max_size`` is not in ``[1, 2**31 - 1]``.

    Example:
      >>> import jaxembed
      >>> b, c = jaxembed.serving.symbolic_shape("b, c", max_size=65536)
      >>> str(b), str(2 * b)
      ('b', '2*b')
    """
    if not isinstance(max_size, int) or not 1 <= max_size <= MAX_DIM:
        raise ValueError(f"max_size must be an int in [1, {MAX_DIM}], got {max_size!r}")
    names = sorted(set(re.findall(r"[A-Za-z_]\w*", spec)) - {"max", "min", "mod", "floordiv"})
    constraints = [f"{n} <= {max_size}" for n in names]
    return jax.export.symbolic_shape(spec, constraints=constraints)


def export(
    fn: Callable[..., Any],
    tables: Any,
    *inputs: Any,
    platforms: tuple[str, ...] | None = None,
    kernels: bool = False,
) -> Artifact:
    """Exports ``fn(tables, *inputs)`` for serving, traced once (on the pure-JAX path by default).

    The tables travel as arguments beside the StableHLO, by name (their pytree paths,
    ``"users/weight"``), so the artifact holds no table and its size does not grow with them.
    Float and quantized tables (:class:`jaxembed.QuantizedTable`) both work. ``inputs`` may
    have symbolic dimensions (:func:`symbolic_shape`): one artifact then serves every size.

    Tables placed on a mesh (a plan's, a :class:`jaxembed.TableSharding`'s) export as they are
    placed: the artifact states the mesh (its axes and size) and each table's spec, and
    :func:`load` puts them back on a mesh of the same axes over the first devices of the
    loading process, or refuses a process with fewer. A sharded collection routes ids at a
    static capacity, so its inputs take concrete shapes: one artifact per batch and capacity.

    By default the trace runs in :func:`jaxembed.kernels.pure_jax`: XLA's own ops only, which
    any jax runs, since ``jax.export`` refuses custom calls without a compatibility guarantee,
    and the process that loads the artifact need not have jaxembed. Its outputs equal the live
    function's on the pure-JAX path bit for bit (on the kernels: as the kernels equal it,
    :doc:`/guides/cpu-kernels`). The trace clears JAX's caches on its way in and out. With
    ``kernels=True`` the artifact calls jaxembed's CPU kernels instead, as the live function
    does on CPU: faster, and only loadable where the same jaxembed, with its kernels, is
    installed (:func:`load` checks).

    Args:
      fn: ``fn(tables, *inputs) -> outputs``: a pure function of arrays, e.g. a collection's
        forward pass. ``outputs`` may be any pytree of arrays (jaxembed's pytrees are
        registered for serialization).
      tables: a pytree of arrays, the parameters ``fn`` reads (e.g. ``ebc``'s stacks, or
        quantized tables).
      *inputs: example inputs, arrays or ``jax.ShapeDtypeStruct`` (with symbolic dimensions).
      platforms: what the artifact runs on (``("cpu", "cuda")``); None: the default backend.
      kernels: call the CPU kernels (see above); this process must run them.

    Returns:
      An :class:`Artifact` holding the export and the tables.

    Raises:
      ValueError: two table leaves would share a name.
      NotImplementedError: tables on more than one mesh, some on a mesh and some on one
        device, or placed by another sharding than a ``NamedSharding``.
      RuntimeError: ``kernels=True`` where this process runs no kernels.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> params = jaxembed.init(jax.random.key(0), 100, 4)
      >>> (b,) = jaxembed.serving.symbolic_shape("b")
      >>> bag = lambda p, ids: jaxembed.embedding_bag(p, ids, mode="sum")[0]
      >>> art = jaxembed.serving.export(bag, params, jax.ShapeDtypeStruct((b, 3), jnp.int32))
      >>> art(jnp.array([[1, 2, 3]])).shape, art(jnp.zeros((5, 3), jnp.int32)).shape
      ((1, 4), (5, 4))
    """
    names, leaves, treedef = _interop.named_leaves(tables, "tables")
    layout = MeshLayout.of(dict(zip(names, leaves, strict=True)))
    named = {n: np.asarray(leaf) for n, leaf in zip(names, leaves, strict=True)}

    def forward(named_tables, *args):
        return fn(jax.tree.unflatten(treedef, [named_tables[n] for n in names]), *args)

    avals = {
        n: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=None if layout is None else layout.sharding(n)
        )
        for n, a in named.items()
    }
    if kernels:
        if not _ffi.available():
            raise RuntimeError(f"kernels=True, but this process runs no kernels: {_ffi.status()}")
        checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _ffi.targets()]
        exported = jax.export.export(jax.jit(forward), platforms=platforms, disabled_checks=checks)(
            avals, *inputs
        )
    else:
        with _ffi.pure_jax():
            exported = jax.export.export(jax.jit(forward), platforms=platforms)(avals, *inputs)
    return Artifact(exported, named, layout)


class MeshLayout:
    """The mesh an artifact's tables are placed on: its axes, and each table's spec.

    A sharded collection's lookups route ids to their owners at a static capacity, so an
    artifact on a mesh takes inputs of concrete shapes (one artifact per batch and capacity);
    its tables go back onto a mesh of the same axes, built from a process's first devices.

    Args:
      axis_names: the mesh's axis names.
      axis_sizes: their sizes.
      axis_types: their ``jax.sharding.AxisType`` names (``"Explicit"``, ``"Auto"``).
      specs: ``{table name: PartitionSpec entries}`` (None, an axis, or a list of axes).
      mesh: the mesh itself, where this process placed the tables (else built on demand).

    Example:
      >>> import jaxembed
      >>> layout = jaxembed.serving.MeshLayout(["x"], [1], ["Explicit"], {"t": ["x", None]})
      >>> layout.size, layout.sharding("t").spec
      (1, P('x', None))
    """

    def __init__(self, axis_names, axis_sizes, axis_types, specs, mesh=None):
        self.axis_names, self.axis_sizes = tuple(axis_names), tuple(axis_sizes)
        self.axis_types, self.specs = tuple(axis_types), dict(specs)
        self._mesh = mesh

    @classmethod
    def of(cls, leaves: dict[str, Any]) -> MeshLayout | None:
        """The layout of tables placed on one mesh; None for tables on one device."""
        meshes, specs = [], {}
        for name, leaf in leaves.items():
            sharding = getattr(leaf, "sharding", None)
            if sharding is None or len(sharding.device_set) == 1:
                continue
            if not isinstance(sharding, jax.sharding.NamedSharding):
                raise NotImplementedError(
                    f"tables: {name!r} is placed by a {type(sharding).__name__}; an artifact on "
                    "a mesh takes tables placed by a NamedSharding (a plan's, a TableSharding's)"
                )
            meshes.append(sharding.mesh)
            specs[name] = [list(p) if isinstance(p, tuple) else p for p in sharding.spec]
        if not meshes:
            return None
        mesh = meshes[0]
        if any(m != mesh for m in meshes):
            raise NotImplementedError("tables: placed on more than one mesh; export one mesh's")
        missing = sorted(set(leaves) - set(specs))
        if missing:
            raise NotImplementedError(
                f"tables: {missing} are on one device while the others are on a mesh of "
                f"{mesh.size}: place them all on the mesh (replicated, where small)"
            )
        types = [str(t).rsplit(".", 1)[-1] for t in mesh.axis_types]
        return cls(mesh.axis_names, mesh.axis_sizes, types, specs, mesh)

    @property
    def size(self) -> int:
        return int(np.prod(self.axis_sizes))

    def mesh(self) -> jax.sharding.Mesh:
        """The mesh: the exporting process's own, or one of the same axes over this process's
        first devices."""
        if self._mesh is None:
            if jax.device_count() < self.size:
                raise ValueError(
                    f"this artifact's tables are placed on a mesh of {self.size} devices (axes "
                    f"{dict(zip(self.axis_names, self.axis_sizes, strict=True))}); this process "
                    f"has {jax.device_count()}"
                )
            types = tuple(getattr(jax.sharding.AxisType, t) for t in self.axis_types)
            self._mesh = jax.make_mesh(
                self.axis_sizes,
                self.axis_names,
                axis_types=types,
                devices=jax.devices()[: self.size],
            )
        return self._mesh

    def sharding(self, name: str) -> jax.sharding.NamedSharding:
        spec = [tuple(p) if isinstance(p, list) else p for p in self.specs[name]]
        return jax.sharding.NamedSharding(self.mesh(), jax.sharding.PartitionSpec(*spec))

    def manifest(self) -> dict[str, Any]:
        return {
            "axis_names": list(self.axis_names),
            "axis_sizes": list(self.axis_sizes),
            "axis_types": list(self.axis_types),
            "devices": self.size,
            "table_specs": self.specs,
        }


class Artifact:
    """An exported forward pass and the tables it takes (:func:`export`, :func:`load`).

    Calling it runs the export with its tables: ``artifact(*inputs)``. The first call at a shape
    compiles; later calls at that shape do not.

    Attributes:
      exported: the ``jax.export.Exported``: its ``in_avals`` are the tables' (by name, sorted),
        then the inputs', with their symbolic dimensions.
      tables: ``{name: numpy array}``, the arguments the export takes first.
      kernels: the jaxembed CPU kernels the export calls (``export(..., kernels=True)``), else
        ``()``.
      mesh: where the tables go on a mesh (a ``MeshLayout``: axes, size, each table's spec), or
        None for tables on one device.

    Raises:
      RuntimeError: the export calls kernels this process does not run.
    """

    def __init__(
        self,
        exported: jax.export.Exported,
        tables: dict[str, np.ndarray],
        mesh: MeshLayout | None = None,
    ):
        self.exported, self.tables, self.mesh = exported, tables, mesh
        self.kernels = tuple(sorted(set(re.findall(r"@(jaxembed_\w+)", exported.mlir_module()))))
        if self.kernels:
            missing = sorted(set(self.kernels) - set(_ffi.targets()))
            if missing or not _ffi.available():
                raise RuntimeError(
                    f"this artifact calls jaxembed's CPU kernels {list(self.kernels)}, which this "
                    f"process does not run ({_ffi.status()}; missing: {missing}): install "
                    "jaxembed with its kernels, or export with kernels=False"
                )
            _ffi._registered()  # the FFI targets the compiled artifact calls
        self._call = jax.jit(exported.call)
        self._device_tables = None

    def __call__(self, *inputs: Any) -> Any:
        if self._device_tables is None:
            # placed once, concretely, even when the first call is inside a user's jit (a
            # tracer kept here would leak into every later call)
            with jax.ensure_compile_time_eval():
                if self.mesh is None:
                    self._device_tables = jax.device_put(self.tables)
                else:  # onto the mesh the artifact states, each table as it was placed
                    self._device_tables = {
                        n: jax.device_put(a, self.mesh.sharding(n)) for n, a in self.tables.items()
                    }
        return self._call(self._device_tables, *inputs)

    def manifest(self) -> dict[str, Any]:
        """What :meth:`save` writes beside the files: the format, the versions, the tables'
        dtypes and shapes, the inputs' and outputs' shapes (symbolic dimensions as written),
        the bounds of those dimensions (the sizes the artifact serves) and the platforms."""
        exp = self.exported
        return {
            "format": FORMAT,
            "jax": jax.__version__,
            "jaxembed": jaxembed.__version__,
            "platforms": list(exp.platforms),
            "kernels": list(self.kernels),
            "tables": {n: [str(a.dtype), list(a.shape)] for n, a in sorted(self.tables.items())},
            "inputs": [str(a) for a in exp.in_avals[len(self.tables) :]],
            "outputs": [str(a) for a in exp.out_avals],
            "constraints": _constraints(exp),
            "mesh": None if self.mesh is None else self.mesh.manifest(),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``model.jaxexport`` (the serialized StableHLO), ``tables.safetensors`` and
        ``manifest.json`` (with both files' SHA-256) into ``directory``, created if need be.

        Each file is written aside and renamed into place, the manifest last: a directory
        without a manifest, or whose files do not match it, is never loaded (:func:`load`).
        """
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # the old artifact is gone from here on
        _write(path / MODEL, self.exported.serialize())
        _interop.write_arrays(path / TABLES, self.tables)
        manifest = self.manifest()
        manifest["sha256"] = {f: _interop.file_sha256(path / f) for f in (MODEL, TABLES)}
        _write(path / MANIFEST, json.dumps(manifest, indent=1).encode())


def _constraints(exported: jax.export.Exported) -> list[str]:
    """The bounds of the symbolic dimensions (``"b <= 65536"``), as their scope prints them."""
    for aval in exported.in_avals:
        for dim in aval.shape:
            if not isinstance(dim, int):
                text = str(dim.scope)
                if "with constraints:" in text:
                    return [c.strip() for c in text.split("with constraints:")[1].splitlines()
                            if c.strip()]  # fmt: skip
                return []
    return []


def _write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load(directory: str | os.PathLike) -> Artifact:
    """Reads an artifact :meth:`Artifact.save` wrote.

    Args:
      directory: the artifact's directory.

    Returns:
      The :class:`Artifact`, its tables read into host memory.

    Raises:
      FileNotFoundError: no manifest (not an artifact, or a save that did not finish).
      ValueError: a file that does not match the manifest's checksum (truncated, corrupted or
        replaced), an unknown format, or tables whose names, dtypes or shapes differ from what
        the export takes; the message names the file.
    """
    path = pathlib.Path(directory)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{path / MANIFEST} is missing: {path} is not a saved artifact, or its save did not "
            "finish"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / MANIFEST} is not a manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: format {manifest.get('format')!r}, not {FORMAT!r}")
    for name in (MODEL, TABLES):
        expected = manifest.get("sha256", {}).get(name)
        if not (path / name).is_file() or _interop.file_sha256(path / name) != expected:
            raise ValueError(
                f"{path / name} does not match {path / MANIFEST} (missing, truncated, corrupted "
                "or replaced): refusing to load it"
            )
    exported = jax.export.deserialize(bytearray((path / MODEL).read_bytes()))
    tables = _interop.read_arrays(path / TABLES)
    want = manifest["tables"]
    got = {n: [str(a.dtype), list(a.shape)] for n, a in sorted(tables.items())}
    if got != want:
        raise ValueError(f"{path / TABLES} holds {got}, where the export takes {want}")
    mesh = manifest.get("mesh")
    layout = None
    if mesh is not None:
        layout = MeshLayout(
            mesh["axis_names"], mesh["axis_sizes"], mesh["axis_types"], mesh["table_specs"]
        )
        layout.mesh()  # a process without enough devices is refused here, by name
    return Artifact(exported, tables, layout)
