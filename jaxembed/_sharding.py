"""How a table and its lookups are laid out on a JAX mesh: :class:`TableSharding`.

The table ``(V, D)`` may be split along V (``vocab``, Megatron's vocab-parallel scheme), along D
(``dim``), or both, and the indices' leading dimension along ``batch`` (data parallel). The
lookups themselves live in :mod:`jaxembed._sharded_lookup`; this file holds the layout, its checks
and the helpers that place arrays on it.

Shards must be even: V must be a multiple of the ``vocab`` shard count and D of the ``dim`` one,
else the call raises ``ValueError``. :meth:`TableSharding.pad_vocab` pads a table with zero rows
up to the next multiple (Megatron's "vocab size divisible by"); ids never reach the extra rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Axis = str | tuple[str, ...] | None


def _names(axis: Axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _check_axis(name: str, axis: Any) -> Axis:
    if axis is None or isinstance(axis, str):
        return axis
    if isinstance(axis, (tuple, list)) and axis and all(isinstance(a, str) for a in axis):
        return tuple(axis)
    raise TypeError(f"{name} must be a mesh axis name, a tuple of names, or None, got {axis!r}")


@dataclasses.dataclass(frozen=True)
class TableSharding:
    """Where a table and its lookups live on a mesh.

    Pass it as ``sharding=`` to :func:`jaxembed.embedding`, :func:`jaxembed.embedding_bag`,
    :func:`jaxembed.sparse.lookup`, :func:`jaxembed.sparse.sharded` and the modules. The lookups
    then run under ``jax.shard_map``: each device gathers the rows it owns (others as zeros) and
    one ``psum`` over ``vocab`` combines them. The table is never gathered onto one device, the
    ``max_norm`` renorm rewrites each shard's own rows, and ``new_params`` keeps the table's
    sharding. With rows split, outputs and renormed tables equal the unsharded ones bit for bit
    (but for the sign of zero: a ``psum`` on CPU returns ``+0.0`` for ``-0.0`` entries);
    gradients are equal up to the order the data shards' sums are added in. With columns split a
    row's norm is a sum over shards, so renormed rows may differ by an ulp.

    Attributes:
      mesh: a ``jax.sharding.Mesh``; None uses the mesh set by ``jax.set_mesh`` at call time.
      vocab: the mesh axis (or axes) splitting the table's rows, or None.
      dim: the mesh axis splitting its columns (for wide tables), or None.
      batch: the mesh axis splitting the indices' leading dimension (data parallel), or None
        (every device sees all indices).

    Example:
      >>> import jax, jaxembed
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> sharding = jaxembed.TableSharding(mesh, vocab="model")
      >>> sharding.spec
      P('model', None)
    """

    mesh: Any = None
    vocab: Axis = None
    dim: Axis = None
    batch: Axis = None

    def __post_init__(self):
        for name in ("vocab", "dim", "batch"):
            object.__setattr__(self, name, _check_axis(name, getattr(self, name)))
        used = _names(self.vocab) + _names(self.dim) + _names(self.batch)
        if len(set(used)) != len(used):
            raise ValueError(f"vocab, dim and batch must use distinct mesh axes, got {used}")
        if self.mesh is not None and not isinstance(
            self.mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)
        ):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {self.mesh!r}")

    @property
    def spec(self) -> P:
        """The table's ``PartitionSpec``: ``P(vocab, dim)``."""
        return P(self.vocab, self.dim)

    def indices_spec(self, ndim: int) -> P:
        """The indices' ``PartitionSpec``: the leading dimension split over ``batch``."""
        if ndim == 0 or self.batch is None:
            return P()
        return P(self.batch, *([None] * (ndim - 1)))

    def output_spec(self, ndim: int) -> P:
        """The spec of a lookup's output for ``ndim``-D indices (the last axis over ``dim``)."""
        lead = [self.batch] if ndim and self.batch is not None else [None] * min(ndim, 1)
        return P(*lead, *([None] * (ndim - 1)), self.dim)

    def available_mesh(self) -> Any:
        """:attr:`mesh`, or the one set with ``jax.set_mesh``, or None when there is neither."""
        if self.mesh is not None:
            return self.mesh
        context = jax.sharding.get_abstract_mesh()
        return None if context is None or context.empty else context

    def resolve_mesh(self) -> Any:
        """The mesh to run on (:meth:`available_mesh`), its axis names checked; else ValueError."""
        mesh = self.available_mesh()
        if mesh is None:
            raise ValueError(
                "TableSharding has no mesh: pass TableSharding(mesh, ...) or call under "
                "`with jax.set_mesh(mesh):`"
            )
        for name in ("vocab", "dim", "batch"):
            for axis in _names(getattr(self, name)):
                if axis not in mesh.axis_names:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} names no axis of the mesh "
                        f"(its axes: {mesh.axis_names})"
                    )
        return mesh

    def count(self, name: str, mesh: Any = None) -> int:
        """How many shards the ``vocab``, ``dim`` or ``batch`` axis splits into."""
        mesh = self.resolve_mesh() if mesh is None else mesh
        return math.prod(mesh.shape[a] for a in _names(getattr(self, name)))

    def check_table(self, shape: tuple[int, ...], mesh: Any = None) -> None:
        """Raises ``ValueError`` unless the table splits evenly over ``vocab`` and ``dim``."""
        rows, cols = self.count("vocab", mesh), self.count("dim", mesh)
        if shape[0] % rows:
            raise ValueError(
                f"num_embeddings={shape[0]} is not a multiple of the {rows} shards of "
                f"vocab={self.vocab!r}; pad the table with TableSharding.pad_vocab (the extra rows "
                f"are never looked up) or build it with {-(-shape[0] // rows) * rows} rows"
            )
        if shape[1] % cols:
            raise ValueError(
                f"embedding_dim={shape[1]} is not a multiple of the {cols} shards of "
                f"dim={self.dim!r}"
            )

    def check_indices(self, shape: tuple[int, ...], mesh: Any = None, name="indices") -> None:
        """Raises ``ValueError`` unless the indices' leading dimension splits over ``batch``."""
        if self.batch is None:
            return
        shards = self.count("batch", mesh)
        if not shape or shape[0] % shards:
            raise ValueError(
                f"{name} of shape {tuple(shape)}: batch={self.batch!r} splits the leading "
                f"dimension over {shards} devices, so it must be a multiple of {shards}"
            )

    def pad_vocab(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with zero rows appended to the table up to a multiple of the vocab shards.

        The padded rows are never looked up by ids below the original ``num_embeddings``; drop
        them with ``weight[:num_embeddings]`` when exporting.
        """
        weight = params["weight"]
        rows = self.count("vocab")
        extra = -weight.shape[0] % rows
        if extra:
            weight = jnp.concatenate([weight, jnp.zeros((extra, weight.shape[1]), weight.dtype)])
        return {**params, "weight": weight}

    def _concrete_mesh(self) -> Any:
        self.resolve_mesh()  # checks the axis names
        return self.mesh if self.mesh is not None else jax.sharding.get_mesh()

    def put(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with the table placed on the mesh as :attr:`spec` says (``device_put``)."""
        mesh = self._concrete_mesh()
        weight = params["weight"]
        self.check_table(weight.shape, mesh)
        return {**params, "weight": jax.device_put(weight, NamedSharding(mesh, self.spec))}

    def put_indices(self, indices: Any) -> jax.Array:
        """``indices`` placed on the mesh, the leading dimension split over ``batch``."""
        mesh = self._concrete_mesh()
        indices = jnp.asarray(indices)
        self.check_indices(indices.shape, mesh)
        return jax.device_put(indices, NamedSharding(mesh, self.indices_spec(indices.ndim)))


def check_sharding(sharding: Any) -> TableSharding | None:
    if sharding is None or isinstance(sharding, TableSharding):
        return sharding
    raise TypeError(f"sharding must be a jaxembed.TableSharding or None, got {sharding!r}")


def bind(sharding: TableSharding, table_shape: tuple, indices_shape: tuple | None) -> TableSharding:
    """Checks a call against ``sharding`` and returns it with its mesh resolved (for ``jit``)."""
    mesh = sharding.resolve_mesh()
    sharding.check_table(table_shape, mesh)
    if indices_shape is not None:
        sharding.check_indices(indices_shape, mesh)
    return dataclasses.replace(sharding, mesh=mesh)
