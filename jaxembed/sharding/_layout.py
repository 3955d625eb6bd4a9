"""How a table and its lookups are laid out on a JAX mesh: :class:`TableSharding`.

The table ``(V, D)`` may be split along V (``vocab``, Megatron's vocab-parallel scheme), along D
(``dim``), or both, and the indices' leading dimension along ``batch`` (data parallel).
:class:`TableSharding` is a :class:`~jaxembed.core._layout.Layout`: the core's one lookup body
runs on it under ``jax.shard_map``. On each device:

1. the indices map to local rows: an index another vocab shard owns becomes the local sentinel,
   which the gather fills with zeros and every scatter drops;
2. with ``max_norm``, the device renorms its own rows referenced by *any* device's indices (the
   indices, not the table, are gathered over ``batch``), so every copy of a shard stays
   identical and ``new_params`` keeps the table's sharding; a row's norm over split columns is
   one ``psum``;
3. the gathered rows are ``psum``-ed over ``vocab`` (Megatron's vocab-parallel embedding):
   exactly one shard contributes each row, so the result equals the unsharded gather.

The table's gradient is the core's custom rule on each block (a scatter-add into local rows);
``shard_map``'s transpose sums it over ``batch``. Nothing table-sized moves between devices
except that gradient's all-reduce, which is data parallelism's cost for any dense parameter.

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
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed.core._layout import Layout
from jaxembed.sharding import _update

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
class TableSharding(Layout):
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

    # the rows another vocab shard holds are zeros here, so the psum over vocab adds them up
    fill = 0.0

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
    def splits_columns(self) -> bool:
        return self.dim is not None

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
        """``mesh``, or the one set with ``jax.set_mesh``, or None when there is neither."""
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

    def bind(
        self,
        table_shape: tuple[int, ...],
        indices_shape: tuple[int, ...] | None,
        *,
        offsets: bool = False,
    ) -> TableSharding:
        """Checks a call against the layout; returns it with its mesh resolved (for ``jit``).

        ``offsets``: the call reduces 1-D bags by offsets, which every device reduces whole.
        """
        if offsets and self.batch is not None:
            raise ValueError(
                "sharding.batch splits 2-D bags only; 1-D indices with offsets need "
                "TableSharding(batch=None) (each device then reduces every bag)"
            )
        mesh = self.resolve_mesh()
        self.check_table(table_shape, mesh)
        if indices_shape is not None:
            self.check_indices(indices_shape, mesh)
        return dataclasses.replace(self, mesh=mesh)

    def kind_spec(self, kind: str | None, ndim: int) -> P | None:
        """The ``PartitionSpec`` of an argument or output of a kind :meth:`run` names."""
        if kind is None:
            return None
        if kind == "table":
            return self.spec
        if kind == "indices":
            return self.indices_spec(ndim)
        if kind == "rows":
            return self.output_spec(ndim)
        if kind == "bags":
            return self.output_spec(1)
        if kind == "entries":
            return P(self.batch if ndim else None)
        if kind == "replicated":
            return P()
        raise ValueError(f"unknown kind {kind!r}")

    def run(self, body, args, in_kinds, out_kinds, *, ndim: int):
        """``jax.shard_map(body)(*args)`` on the mesh, the arguments placed as their kinds say.

        An argument that is None stays None; so may an output.
        """
        in_specs = tuple(
            None if a is None else self.kind_spec(k, ndim)
            for a, k in zip(args, in_kinds, strict=True)
        )
        out_specs = jax.tree.map(lambda k: self.kind_spec(k, ndim), out_kinds)
        return self.map(body, in_specs, out_specs, *args)

    def map(self, body, in_specs, out_specs, *args):
        """``jax.shard_map(body)(*args)`` on the mesh, the arguments placed as specified."""

        def placed(a, specs):  # one spec for a whole pytree (a quantized table), or one a leaf
            if isinstance(specs, P):
                return jax.tree.map(lambda x: place(x, self.mesh, specs), a)
            return jax.tree.map(lambda x, spec: place(x, self.mesh, spec), a, specs)

        args = [
            None if specs is None else placed(a, specs)
            for a, specs in zip(args, in_specs, strict=True)
        ]
        mapped = jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True
        )
        return mapped(*args)

    def entries(self, n: int) -> TableSharding:
        """The layout of ``n`` sparse-update entries: split over ``batch`` where they divide
        evenly among its shards (as a lookup returns them), else whole on every device."""
        if self.batch is not None and n % self.count("batch", self.mesh) == 0:
            return self
        return dataclasses.replace(self, batch=None)

    def everyone(self, x: jax.Array) -> jax.Array:
        """``x`` (one device's slice along ``batch``) gathered from every device, in global order.

        Written as a ``psum`` of each slice placed in a zero buffer, not ``all_gather``, so the
        result is typed as the same on every device along ``batch`` (``shard_map``'s replication
        check): the renormed table computed from it is one table, not one per data shard. Each
        entry is a sum of itself and zeros, so the values are exact.
        """
        if self.batch is None:
            return x
        n = x.shape[0]
        shards = self.count("batch", self.mesh)
        buffer = jnp.zeros((n * shards,) + x.shape[1:], x.dtype)
        at = jax.lax.axis_index(self.batch) * n
        return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(buffer, x, at, 0), self.batch)

    def localizer(self, num_local: int):
        """Maps global rows to this device's rows; another vocab shard's become ``num_local``."""
        if self.vocab is None:
            return lambda safe: safe
        offset = jax.lax.axis_index(self.vocab) * num_local

        def localize(safe):
            local = safe - offset
            return jnp.where((local >= 0) & (local < num_local), local, num_local)

        return localize

    def reduce_columns(self, partial: jax.Array, op: str) -> jax.Array:
        """A per-row sum (``psum``) or max (``pmax``) completed over the ``dim`` shards."""
        if self.dim is None:
            return partial
        return (jax.lax.pmax if op == "max" else jax.lax.psum)(partial, self.dim)

    def combine(self, rows: jax.Array, out_of_range: jax.Array) -> jax.Array:
        """The rows summed over ``vocab`` (one shard holds each); out-of-range ones NaN again."""
        if self.vocab is not None:
            rows = jax.lax.psum(rows, self.vocab)
        # an out-of-range index (under jit) gives a NaN row, as the unsharded lookup does
        return jnp.where(out_of_range[:, None], jnp.nan, rows)

    def bag_source(self, lookup, keep, starts, psw):
        """The bags reduce the combined rows: each bag then equals the unsharded one bit for bit.

        The rows carry the table's gradient unscaled; the reduction applies the scale.
        """
        rows = lookup.rows(scaled=False)
        positions = jnp.arange(lookup.safe.shape[0], dtype=jnp.int32)
        # the bag code's loops need every input to vary over the mesh axes the rows vary over
        keep, positions, starts, psw = (
            jax.tree.map(lambda y: _varying_like(y, rows), x)
            for x in (keep, positions, starts, psw)
        )
        return rows, jax.lax.stop_gradient(rows), positions, keep, starts, psw, "gather"

    def rowwise(self, optimizer):
        """``optimizer`` wrapped by :func:`jaxembed.sparse.sharded` for this layout."""
        return _update.shard_optimizer(optimizer, self)

    def _concrete_mesh(self) -> Any:
        self.resolve_mesh()  # checks the axis names
        return self.mesh if self.mesh is not None else jax.sharding.get_mesh()

    def put(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with the table placed on the mesh as :attr:`spec` says (``device_put``)."""
        mesh = self._concrete_mesh()
        weight = params["weight"]
        self.check_table(weight.shape, mesh)
        return {**params, "weight": jax.device_put(weight, NamedSharding(mesh, self.spec))}

    def replicated(self, x: jax.Array) -> jax.Array:
        """``x`` replicated over the mesh (unchanged if it is on the mesh already, or if this
        layout names no mesh yet): see ``replicate_onto``."""
        if self.mesh is None and jax.sharding.get_mesh().empty:
            return x
        return replicate_onto(self._concrete_mesh(), x)

    def put_indices(self, indices: Any) -> jax.Array:
        """``indices`` placed on the mesh, the leading dimension split over ``batch``."""
        mesh = self._concrete_mesh()
        indices = jnp.asarray(indices)
        self.check_indices(indices.shape, mesh)
        return jax.device_put(indices, NamedSharding(mesh, self.indices_spec(indices.ndim)))


def replicate_onto(mesh: Any, x: jax.Array) -> jax.Array:
    """``x`` replicated over ``mesh`` (``P(None, ...)``, as a jitted step on the mesh returns
    it), or ``x`` itself where it is on ``mesh`` already. In a multi-host run each process
    supplies its own devices' copies of its (equal) value."""
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return x
    target = NamedSharding(mesh, P(*[None] * x.ndim))
    if target.is_fully_addressable:
        return jax.device_put(x, target)
    impl = None  # a key array crosses as its key data
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl, x = jax.random.key_impl(x), jax.random.key_data(x)
        target = NamedSharding(mesh, P(*[None] * x.ndim))
    host = np.asarray(x)
    placed = jax.make_array_from_callback(x.shape, target, lambda index: host[index])
    return placed if impl is None else jax.random.wrap_key_data(placed, impl=impl)


def place(x: jax.Array | None, mesh: Any, spec) -> jax.Array | None:
    """``x`` laid out as ``spec`` on ``mesh`` (a no-op when it already is; None stays None)."""
    if x is None or spec is None:
        return x
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _varying_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` unchanged, typed as varying over (at least) the mesh axes ``ref`` varies over."""
    if x.dtype == bool:
        return x | jnp.zeros_like(ref, bool, shape=x.shape)
    return x + jnp.zeros_like(ref, x.dtype, shape=x.shape)
