"""Where each table of a collection lives on a mesh: :class:`Placement` and :class:`ShardingPlan`.

A plan is a plain value: one :class:`Placement` per table, the mesh and the one mesh axis the
collection spreads over (each device holds a slice of the batch and a share of the tables, as a
TorchRec world does). Tables are grouped after placement: the tables of one placement kind that
could stack (same dim, dtype, pooling, ``max_norm``, ``norm_type``, ``scale_grad_by_freq``;
:mod:`jaxembed.collections._config`) share one physical array, a :class:`Group`:

====================  ===================  ==================================================
kind                  the group's array    each device holds
====================  ===================  ==================================================
``data_parallel``     ``(V, D)``           the whole stack (replicated)
``table_wise``        ``(K * R, D)``       block ``k``: the tables placed on device ``k``,
                                           stacked, padded with zero rows to ``R``, the
                                           fullest block's rows
``row_wise``          ``(K * R, D)``       block ``k``: the stack's rows ``r`` with
                                           ``r % K == k``, as row ``r // K``; ``R`` is
                                           ``ceil(V / K)``
``column_wise``       ``(V, D)``           ``D / K`` of every row's columns
====================  ===================  ==================================================

``K`` is the axis' size. The plan's memory (:meth:`ShardingPlan.memory`) counts exactly these
blocks, padding included, and the optimizer state shaped like them. On a 2-D mesh (the plan's
``replica`` axis, TorchRec's 2D parallel) every device along ``replica`` holds a copy of these
blocks, and the batch splits over both axes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxembed.collections._config import EmbeddingConfig, Plan, Stack, _stack_key
from jaxembed.sharding._layout import replicate_onto

OVERFLOW = ("error", "drop")
OWNERSHIP = ("mod", "block")


class Kind(enum.Enum):
    """How a table is placed (TorchRec's sharding types)."""

    DATA_PARALLEL = "data_parallel"
    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"


@dataclasses.dataclass(frozen=True)
class Placement:
    """One table's placement.

    Attributes:
      kind: a :class:`Kind` (or its value, e.g. ``"row_wise"``).
      device: for ``table_wise``, the device's position along the plan's axis; else None.
      ownership: for ``row_wise``, which device owns stacked row ``r``: ``"mod"`` (device
        ``r % K``, the default: hot low ids spread over the devices) or ``"block"`` (device
        ``r // R``, contiguous blocks of ``R = ceil(V / K)`` rows, as TorchRec's); else None.

    Example:
      >>> import jaxembed
      >>> jaxembed.sharding.Placement("table_wise", 3)
      Placement('table_wise', 3)
    """

    kind: Kind
    device: int | None = None
    ownership: str | None = None

    def __post_init__(self):
        try:
            kind = Kind(self.kind.value if isinstance(self.kind, Kind) else self.kind)
        except ValueError:
            raise ValueError(
                f"kind must be one of {[k.value for k in Kind]}, got {self.kind!r}"
            ) from None
        object.__setattr__(self, "kind", kind)
        if kind is Kind.TABLE_WISE:
            if isinstance(self.device, bool) or not isinstance(self.device, (int, np.integer)):
                raise TypeError(f"a table_wise placement needs device=<int>, got {self.device!r}")
            object.__setattr__(self, "device", int(self.device))
        elif self.device is not None:
            raise ValueError(f"device is for table_wise placements only, got {kind.value} with it")
        if kind is Kind.ROW_WISE:
            ownership = "mod" if self.ownership is None else self.ownership
            if ownership not in OWNERSHIP:
                raise ValueError(f"ownership must be one of {OWNERSHIP}, got {ownership!r}")
            object.__setattr__(self, "ownership", ownership)
        elif self.ownership is not None:
            raise ValueError(f"ownership is for row_wise placements only, got {kind.value} with it")

    def __repr__(self) -> str:
        extra = "" if self.device is None else f", {self.device}"
        if self.ownership not in (None, "mod"):
            extra += f", ownership={self.ownership!r}"
        return f"Placement({self.kind.value!r}{extra})"

    def __str__(self) -> str:
        tail = "" if self.ownership in (None, "mod") else f"({self.ownership})"
        return self.kind.value + ("" if self.device is None else f"@{self.device}") + tail


def data_parallel() -> Placement:
    """Replicated on every device; each device pools its own samples."""
    return Placement(Kind.DATA_PARALLEL)


def table_wise(device: int) -> Placement:
    """The whole table on one device: its ids are sent there and its bags sent back."""
    return Placement(Kind.TABLE_WISE, device)


def row_wise(ownership: str = "mod") -> Placement:
    """Rows split evenly over the devices; each id is sent to the device owning its row.

    Args:
      ownership: ``"mod"``: stacked row ``r`` on device ``r % K`` (hot low ids spread over the
        devices); ``"block"``: on device ``r // R``, contiguous blocks of ``R = ceil(V / K)``
        rows (TorchRec's row-wise layout).
    """
    return Placement(Kind.ROW_WISE, ownership=ownership)


def column_wise() -> Placement:
    """Columns split evenly over the devices; each device's column slice of the bags moves."""
    return Placement(Kind.COLUMN_WISE)


@dataclasses.dataclass(frozen=True)
class Group:
    """Tables sharing one physical array on the mesh (see the module's table).

    Attributes:
      name: the params key, ``"<kind>:<table>+<table>..."``.
      kind: the placement kind.
      stack: the stack of all the group's tables (its row offsets are the unsharded stack's).
      slots: ``table_wise``: each device's stack (None where it holds none); else ``()``.
      rows: each device's block of the array, its rows.
      cols: and its columns.
      devices: the devices along the plan's axis.
      block: ``row_wise``: stacked row ``r`` is on device ``r // rows`` (else ``r % devices``).
    """

    name: str
    kind: Kind
    stack: Stack
    slots: tuple[Stack | None, ...]
    rows: int
    cols: int
    devices: int
    block: bool = False

    @property
    def global_shape(self) -> tuple[int, int]:
        """The whole array's shape (blocks side by side as the kind lays them out)."""
        if self.kind is Kind.DATA_PARALLEL:
            return (self.rows, self.cols)
        if self.kind is Kind.COLUMN_WISE:
            return (self.rows, self.cols * self.devices)
        return (self.rows * self.devices, self.cols)

    @property
    def dtype(self) -> Any:
        return self.stack.dtype

    @property
    def routed(self) -> bool:
        """Whether each id is sent to the one device owning its row (row- and table-wise)."""
        return self.kind in (Kind.ROW_WISE, Kind.TABLE_WISE)

    @property
    def pooled(self) -> bool:
        """Whether the group's tables are bags, not unpooled tables (a row per id)."""
        return self.stack.pooling is not None

    @property
    def split_rows(self) -> bool:
        """Whether each device's block holds other rows (row- and table-wise)."""
        return self.kind in (Kind.ROW_WISE, Kind.TABLE_WISE)

    def owner_of(self, rows: Any) -> tuple[Any, Any]:
        """``(device, row in its block)`` of a row-wise stack's rows (NumPy or JAX): row ``r`` is
        row ``r // K`` of device ``r % K`` (so a table's low, often hot, ids spread over the
        devices), or, with block ownership, row ``r % R`` of device ``r // R``."""
        if self.block:
            return rows // self.rows, rows % self.rows
        return rows % self.devices, rows // self.devices

    def rows_of(self, table: str, rows: Any = None) -> Any:
        """The rows of the group's whole array that hold ``table``'s ``rows`` (NumPy or JAX;
        default: all of them, in order), a row-wise stack's as :meth:`owner_of` places them."""
        device, offset = self.where(table)
        if rows is None:
            rows = np.arange(next(t.num_embeddings for t in self.stack.tables if t.name == table))
        rows = offset + rows
        if self.kind is Kind.ROW_WISE:
            owner, local = self.owner_of(rows)
            return owner * self.rows + local
        return rows if device is None else device * self.rows + rows

    def where(self, table: str) -> tuple[int | None, int]:
        """``(device, row offset in its block)`` of a table (device None: every device)."""
        if self.kind is Kind.TABLE_WISE:
            for d, slot in enumerate(self.slots):
                if slot is not None:
                    for t, off in zip(slot.tables, slot.offsets, strict=True):
                        if t.name == table:
                            return d, off
            raise KeyError(table)
        i = [t.name for t in self.stack.tables].index(table)
        return None, self.stack.offsets[i]


def _stack_of(name: str, tables: Sequence[Any]) -> Stack:
    offsets = tuple(int(x) for x in np.cumsum([0] + [t.num_embeddings for t in tables]))
    return Stack(name, tuple(tables), offsets[:-1])


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A collection of pooled tables placed on a mesh: printable, editable, hashable.

    Build one with :func:`jaxembed.plan` (or by hand); edit it with :meth:`replace`. It is the
    ``sharding`` of :func:`jaxembed.sharding.embedding_bag_collection`,
    :func:`jaxembed.sharding.lookup`, :func:`jaxembed.sharding.optimizer` and
    :class:`jaxembed.EmbeddingBagCollection`.

    Attributes:
      tables: the :class:`~jaxembed.EmbeddingBagConfig` of every table (or, for an unpooled
        collection, the :class:`~jaxembed.EmbeddingConfig` of every table).
      placements: ``((table name, Placement), ...)`` in the tables' order.
      mesh: the ``jax.sharding.Mesh``.
      axis: the mesh axis the batch and the tables spread over (the model axis).
      replica: None, or a second mesh axis (TorchRec's 2D parallel: ``replica x model``) over
        which the batch splits too and every table is replicated: the ids move within a
        replica group (along ``axis``), and only the owners' sparse updates are combined across
        the replicas. It must come before ``axis`` in the mesh's axes. Every other axis of the
        mesh must have size 1.
      estimates: the planner's per-device estimates ``(memory bytes, step cost)``, or ``()``.
      capacity: ``((group name, capacity), ...)``: for the ``row_wise`` and ``table_wise``
        groups named, the distinct rows one device may send one owner per step (see
        :meth:`with_capacity`); a group not named gets the device's whole id capacity, which
        never overflows and moves ``K`` times the ids.
      overflow: what a step does when a device has more distinct rows for an owner than the
        capacity: ``"error"`` (nothing is served, the step changes nothing and raises on the
        host) or ``"drop"`` (the ids past the capacity get no value and no gradient, counted).

    Example:
      >>> import jax, jaxembed
      >>> from jaxembed import sharding as S
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 8, 100, ["f"])]
      >>> plan = S.by_hand(tables, jax.make_mesh((1,), ("x",)), {"t": S.row_wise()})
      >>> plan.replace(t=S.table_wise(0)).placement("t")
      Placement('table_wise', 0)
    """

    tables: tuple[EmbeddingConfig, ...]
    placements: tuple[tuple[str, Placement], ...]
    mesh: Any
    axis: str
    estimates: tuple = dataclasses.field(default=(), compare=False)
    capacity: tuple[tuple[str, int], ...] = ()
    overflow: str = "error"
    replica: str | None = None

    def __post_init__(self):
        tables = Plan.of_either(self.tables).tables
        object.__setattr__(self, "tables", tables)
        if not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(
                f"axis={self.axis!r} is not an axis of the mesh {self.mesh.axis_names}"
            )
        names = self.mesh.axis_names
        if self.replica is not None:
            if self.replica not in names or self.replica == self.axis:
                raise ValueError(
                    f"replica={self.replica!r} must be an axis of the mesh {names} other than "
                    f"axis={self.axis!r}"
                )
            if names.index(self.replica) > names.index(self.axis):
                raise ValueError(
                    f"replica={self.replica!r} must come before axis={self.axis!r} in the mesh's "
                    f"axes {names} (the batch splits replica-major, as the devices are ordered)"
                )
        used = (self.axis, self.replica)
        other = {a: n for a, n in self.mesh.shape.items() if a not in used and n > 1}
        if other:
            raise ValueError(
                f"a collection spreads over the mesh axis {self.axis!r} (and a replica axis, "
                f"replica=); the mesh's axes {other} must have size 1"
            )
        placements = dict(self.placements)
        names = [t.name for t in tables]
        unknown = sorted(set(placements) - set(names))
        if unknown:
            raise ValueError(f"placements name tables {unknown} that are not in tables")
        missing = [n for n in names if n not in placements]
        if missing:
            raise ValueError(f"tables {missing} have no placement")
        k = self.num_devices
        for t in tables:
            p = placements[t.name]
            if not isinstance(p, Placement):
                raise TypeError(f"placement of {t.name!r} must be a Placement, got {p!r}")
            if p.kind is Kind.TABLE_WISE and not 0 <= p.device < k:
                raise ValueError(
                    f"table {t.name!r}: table_wise device {p.device} is not on the axis "
                    f"{self.axis!r} of {k} devices"
                )
            if p.kind is Kind.COLUMN_WISE and t.embedding_dim % k:
                raise ValueError(
                    f"table {t.name!r}: column_wise splits embedding_dim={t.embedding_dim} over "
                    f"{k} devices; it must be a multiple of {k}"
                )
        object.__setattr__(self, "placements", tuple((n, placements[n]) for n in names))
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {self.overflow!r}")
        routed = {g.name for g in self.groups if g.routed}
        capacity = dict(self.capacity)
        for name, c in capacity.items():
            if name not in routed:
                raise ValueError(
                    f"capacity names {name!r}, which is not a row_wise or table_wise group of "
                    f"this plan ({sorted(routed)})"
                )
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
                raise ValueError(f"capacity[{name!r}] must be a positive int, got {c!r}")
        capacity = tuple(sorted((n, int(c)) for n, c in capacity.items()))
        object.__setattr__(self, "capacity", capacity)

    @property
    def num_devices(self) -> int:
        """``K``, the devices along ``axis``, among which a replica's tables are placed."""
        return self.mesh.shape[self.axis]

    @property
    def num_replicas(self) -> int:
        """``R``, the replicas of every table (the size of ``replica``; 1 without one)."""
        return 1 if self.replica is None else self.mesh.shape[self.replica]

    @property
    def num_blocks(self) -> int:
        """``R * K``, the batch's blocks, one per device."""
        return self.num_replicas * self.num_devices

    @property
    def batch_axes(self) -> str | tuple[str, str]:
        """The mesh axes the batch splits over, ``axis`` or ``(replica, axis)``."""
        return self.axis if self.replica is None else (self.replica, self.axis)

    def replicated(self, x: jax.Array) -> jax.Array:
        """``x`` replicated over the plan's mesh (what :class:`jaxembed.sparse.Optimizer` does to
        a model's other arrays): see ``jaxembed.sharding._layout.replicate_onto``."""
        return replicate_onto(self.mesh, x)

    def placement(self, table: str) -> Placement:
        """The placement of the table named ``table``."""
        return dict(self.placements)[table]

    def replace(self, **placements: Placement) -> ShardingPlan:
        """The plan with some tables placed anew, e.g. ``plan.replace(t0=row_wise())``."""
        new = dict(self.placements)
        unknown = sorted(set(placements) - set(new))
        if unknown:
            raise ValueError(f"no tables named {unknown} in this plan")
        new.update(placements)
        plan = ShardingPlan(self.tables, tuple(new.items()), self.mesh, self.axis,
                            replica=self.replica)  # fmt: skip
        kept = {g.name for g in plan.groups} & dict(self.capacity).keys()
        return plan.with_capacity({n: c for n, c in self.capacity if n in kept}, self.overflow)

    def with_capacity(self, capacity: Any, overflow: str | None = None) -> ShardingPlan:
        """The plan with a static capacity for its ``row_wise`` and ``table_wise`` groups.

        Each step routes a device's distinct rows of a group to their owners in a ``(K,
        capacity)`` buffer: its bytes and the owners' work are ``O(K * capacity)`` per device.
        :func:`jaxembed.sharding.capacity_for` measures what sample batches need. A changed
        capacity (or policy) is a new plan: the step compiles anew.

        Args:
          capacity: an int for every such group, or ``{group name: int}``; None: none (each
            device's whole id capacity).
          overflow: ``"error"`` or ``"drop"`` (see the class); None keeps the plan's.

        Example:
          >>> import jax, jaxembed
          >>> from jaxembed import sharding as S
          >>> tables = [jaxembed.EmbeddingBagConfig("t", 8, 100, ["f"])]
          >>> plan = S.by_hand(tables, jax.make_mesh((1,), ("x",)), {"t": S.row_wise()})
          >>> plan.with_capacity(64).capacity
          (('row_wise:t', 64),)
        """
        if capacity is None:
            capacity = {}
        elif not isinstance(capacity, Mapping):
            capacity = {g.name: capacity for g in self.groups if g.routed}
        return dataclasses.replace(
            self,
            capacity=tuple(capacity.items()),
            overflow=self.overflow if overflow is None else overflow,
        )

    def capacity_of(self, group: Group, ids: int) -> int:
        """The group's capacity per (source, owner) pair, for ``ids`` ids per device."""
        return max(1, min(dict(self.capacity).get(group.name, ids), ids))

    @functools.cached_property
    def groups(self) -> tuple[Group, ...]:
        """The physical arrays, in a fixed order (see the module's table)."""
        k = self.num_devices
        by_key: dict[Any, list] = {}
        for t in self.tables:
            p = self.placement(t.name)
            key = (p.kind, p.ownership, _stack_key(t) if t.stack else ("alone", t.name))
            by_key.setdefault(key, []).append(t)
        groups = []
        for (kind, ownership, _), tables in by_key.items():
            name = f"{kind.value}:" + "+".join(t.name for t in tables)
            stack = _stack_of(name, tables)
            d = stack.embedding_dim
            if kind is Kind.TABLE_WISE:
                slots = []
                for dev in range(k):
                    mine = [t for t in tables if self.placement(t.name).device == dev]
                    slots.append(_stack_of(f"{name}@{dev}", mine) if mine else None)
                rows = max(s.num_embeddings for s in slots if s is not None)
                groups.append(Group(name, kind, stack, tuple(slots), rows, d, k))
            elif kind is Kind.ROW_WISE:
                rows = -(-stack.num_embeddings // k)
                groups.append(Group(name, kind, stack, (), rows, d, k, ownership == "block"))
            elif kind is Kind.COLUMN_WISE:
                groups.append(Group(name, kind, stack, (), stack.num_embeddings, d // k, k))
            else:
                groups.append(Group(name, kind, stack, (), stack.num_embeddings, d, k))
        return tuple(groups)

    def group_of(self, table: str) -> Group:
        return next(g for g in self.groups if any(t.name == table for t in g.stack.tables))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return Plan.of_either(self.tables).feature_names

    @property
    def pooled(self) -> bool:
        """Whether the tables are bag configs (a bag collection), not plain ones (unpooled)."""
        return self.tables[0].pooling is not None  # one kind a plan (checked at construction)

    # -- memory ---------------------------------------------------------------------------------

    def memory(self, optimizer: Any = None) -> np.ndarray:
        """Each device's bytes of tables (and of ``optimizer``'s state, a
        :class:`jaxembed.sparse.RowOptimizer`), padding included: ``(K,)`` int64."""
        out = np.zeros(self.num_devices, np.int64)
        for g in self.groups:
            out += block_bytes(g.rows, g.cols, g.dtype, optimizer)
        return out

    def __str__(self) -> str:
        k = self.num_devices
        lines = [f"ShardingPlan over {k} devices of axis {self.axis!r}:"]
        if self.replica is not None:
            lines[0] = (f"ShardingPlan over {k} devices of axis {self.axis!r}, replicated "
                        f"{self.num_replicas} times over {self.replica!r}:")  # fmt: skip
        head = f"  {'table':<16} {'rows':>10} {'dim':>5}  {'placement':<16} group"
        lines.append(head)
        for t in self.tables:
            p = self.placement(t.name)
            g = self.group_of(t.name)
            lines.append(
                f"  {t.name:<16} {t.num_embeddings:>10} {t.embedding_dim:>5}  {p!s:<16} "
                f"{g.name if len(g.name) < 40 else g.name[:37] + '...'}"
            )
        mem = self.memory()
        lines.append(
            "  table bytes per device: "
            + ", ".join(readable_bytes(m) for m in mem)
            + f" (max/mean {mem.max() / max(mem.mean(), 1):.2f})"
        )
        return "\n".join(lines)


def readable_bytes(n: float) -> str:
    """``n`` bytes at a scale that shows them: ``"512 B"``, ``"3.1 KiB"``, ``"1.5 GiB"``."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def block_bytes(rows: int, cols: int, dtype: Any, optimizer: Any = None) -> int:
    """A ``(rows, cols)`` block's bytes, and its optimizer state's."""
    total = rows * cols * np.dtype(dtype).itemsize
    if optimizer is not None:
        state = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct((rows, cols), dtype))
        total += sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    return int(total)


def by_hand(
    tables: Any,
    mesh: Any,
    placements: Mapping[str, Placement],
    *,
    axis: str | None = None,
    replica: str | None = None,
) -> ShardingPlan:
    """A :class:`ShardingPlan` from a placement per table name (``replica``: see the class)."""
    axis = default_axis(mesh, replica) if axis is None else axis
    return ShardingPlan(tuple(tables), tuple(placements.items()), mesh, axis, replica=replica)


def default_axis(mesh: Any, replica: str | None = None) -> str:
    """The mesh's one axis of size > 1 other than ``replica`` (else its first other axis)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    rest = [a for a in mesh.axis_names if a != replica]
    big = [a for a in rest if mesh.shape[a] > 1]
    if len(big) > 1:
        raise ValueError(f"the mesh has several axes of size > 1 {big}; pass axis=")
    if not rest:
        raise ValueError(f"the mesh {mesh.axis_names} has no axis but replica={replica!r}")
    return big[0] if big else rest[0]
