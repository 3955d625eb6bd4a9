"""The planner: :func:`plan` places each table of a collection on a mesh.

It is TorchRec's planner in miniature: a greedy pass over the tables (pinned ones, then the
largest first, the small ones last) that puts each where a simple cost model says the step is
cheapest while every device stays within its memory. The model, per device and step (the
constants are module attributes):

* **memory**: the blocks the plan's groups put on the device, padding included, and the
  optimizer's state shaped like them (:meth:`ShardingPlan.memory`: exact, not estimated);
* **time**: ``bytes read / READ_BYTES_PER_S + bytes moved / link``, where ``link`` is
  ``LINK_BYTES_PER_S`` between accelerators and the read speed between CPU devices (one host's
  memory: :func:`link_bytes_per_s`), and a table of ``F`` features, ``N = batch_size * pooling
  factors`` ids and ``D`` columns of ``s`` bytes costs

  =============  =========================  ==============================================
  placement      bytes read                 bytes moved
  =============  =========================  ==============================================
  data_parallel  ``N D s / K`` on each      ``min(V, N) (4 D + 4)`` on each (the update: a
                                            ``psum`` of ``(V, D)``, or every entry gathered)
  table_wise     ``N D s`` on the owner     ``N (4 + 2 D s) / K`` on each (its ids routed to
                                            the owner, their rows and gradients back)
  row_wise       ``N D s / K`` on each      ``N (4 + 2 D s) / K`` on each (routed alike)
  column_wise    ``N D s / K`` on each      ``N 4 + 2 F B D 4 / K`` on each
  =============  =========================  ==============================================

  (a routed placement at a capacity of about its ids over ``K`` per (device, owner) pair:
  :meth:`ShardingPlan.with_capacity`), plus, for each group of the plan (one array: the tables
  of one kind that stack), ``C (2 D s + INDEX_BYTES)`` bytes read on each device, where ``C``
  is the device's ids of every table (``K`` times that for a column-wise group, which gathers
  them): a group's pass over its entries, whatever its share of the ids. So fewer groups cost
  less, and a placement joins an existing group where the rest is a draw.

The candidates: ``table_wise`` on each device; ``row_wise``; ``column_wise`` when there are
several devices and each keeps at least ``MIN_COLUMNS`` columns; and ``data_parallel`` for a
table (with its state) of at most ``replicate_below`` bytes. A candidate's score is the
largest plus the mean device time (the step's critical path, and the work every device does),
over the time of every table on one device, plus the largest device memory over all tables'
memory: balanced plans that do not make every device pay for one table score low.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxembed.collections._config import EmbeddingConfig, Plan
from jaxembed.sharding._placement import Kind, Placement, ShardingPlan, block_bytes, default_axis

#: a device's table read bandwidth in the model (bytes per second; only ratios matter)
READ_BYTES_PER_S = 1.0e12
#: a device's collective bandwidth in the model
LINK_BYTES_PER_S = 1.0e11
#: a group's bytes of index work (sorts, scans, masks) per entry it holds
INDEX_BYTES = 64
#: the least columns a column_wise table keeps per device
MIN_COLUMNS = 32


def link_bytes_per_s(mesh: Any) -> float:
    """The model's collective bandwidth on ``mesh``'s devices: :data:`LINK_BYTES_PER_S` between
    accelerators; on CPU devices (one host's memory: a collective is a copy) the read speed."""
    platform = mesh.devices.reshape(-1)[0].platform
    return READ_BYTES_PER_S if platform == "cpu" else LINK_BYTES_PER_S


def _group_passes(trial: ShardingPlan, ids: float) -> float:
    """Seconds of the model each device spends per step on the groups of ``trial`` whatever
    their tables' share of the ids: each group reads and spreads the entries it holds (the
    device's ``ids``, its static capacity; a column-wise group gathers every device's) at its
    width, forward and back, and sorts and scans them (:data:`INDEX_BYTES` an entry)."""
    total = 0.0
    for g in trial.groups:
        entries = ids * (g.devices if g.kind is Kind.COLUMN_WISE else 1)
        total += entries * (2 * g.cols * np.dtype(g.dtype).itemsize + INDEX_BYTES)
    return total / READ_BYTES_PER_S


def _step_cost(t: EmbeddingConfig, p: Placement, k: int, batch: int, pooling: float, link: float):
    """``(K,)`` seconds of the model for table ``t`` placed as ``p``."""
    f = len(t.feature_names)
    n = batch * pooling * f
    d, s = t.embedding_dim, np.dtype(t.param_dtype).itemsize
    pooled = 2 * (f * batch if t.pooling is not None else n) * d * 4  # bags, or every row
    read = np.zeros(k)
    moved = np.zeros(k)
    if p.kind is Kind.DATA_PARALLEL:  # the update: a psum of (V, D), or every entry gathered
        read += n * d * s / k
        moved += min(t.num_embeddings, n) * (4 * d + 4)
    elif p.kind is Kind.TABLE_WISE:
        read[p.device] += n * d * s
        moved += n * (4 + 2 * d * s) / k
    elif p.kind is Kind.ROW_WISE:
        read += n * d * s / k
        moved += n * (4 + 2 * d * s) / k
    else:
        read += n * d * s / k
        moved += n * 4 + pooled / k
    return read / READ_BYTES_PER_S + moved / link


def _candidates(t: EmbeddingConfig, k: int):
    for d in range(k):
        yield Placement(Kind.TABLE_WISE, d)
    yield Placement(Kind.ROW_WISE)
    if k > 1 and t.embedding_dim % k == 0 and t.embedding_dim // k >= MIN_COLUMNS:
        yield Placement(Kind.COLUMN_WISE)


def plan(
    tables: Any,
    mesh: Any,
    *,
    axis: str | None = None,
    replica: str | None = None,
    memory_per_device: int | None = None,
    optimizer: Any = None,
    batch_size: int = 4096,
    pooling_factors: float | Mapping[str, float] = 1.0,
    pinned: Mapping[str, Placement] | None = None,
    replicate_below: int = 1 << 20,
) -> ShardingPlan:
    """Places every table of a collection on ``mesh``: TorchRec's planner, in miniature.

    Args:
      tables: the :class:`~jaxembed.EmbeddingBagConfig` of every table (or every
        :class:`~jaxembed.EmbeddingConfig`: an unpooled collection).
      mesh: a ``jax.sharding.Mesh``.
      axis: the mesh axis to spread over (default: the mesh's one axis of size > 1 other than
        ``replica``).
      replica: None, or the mesh axis that replicates every table (a 2-D ``replica x model``
        mesh, :class:`ShardingPlan`'s ``replica``): the tables are placed along ``axis`` as for
        one replica group, whose devices see ``batch_size / R`` samples.
      memory_per_device: each device's bytes for tables and optimizer state; None: unbounded.
      optimizer: the :mod:`jaxembed.sparse` optimizer whose state counts as memory.
      batch_size: the global batch of the cost model.
      pooling_factors: the mean ids per bag, one for all features or per feature name.
      pinned: ``{table name: Placement}`` placed as given; the planner places the rest.
      replicate_below: the largest table (with its state, in bytes) to consider replicating.

    Returns:
      A :class:`ShardingPlan`; ``print`` it to see the placement of every table and the memory
      per device; :meth:`ShardingPlan.replace` edits it.

    Raises:
      ValueError: the tables do not fit: the message names the largest table and the memory it
        needs, and the table that could not be placed.

    Example:
      >>> import jax, jaxembed
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> tables = [jaxembed.EmbeddingBagConfig("t", 8, 100, ["f"])]
      >>> jaxembed.plan(tables, mesh).placement("t")
      Placement('data_parallel')
    """
    tables = Plan.of_either(tables).tables
    axis = default_axis(mesh, replica) if axis is None else axis
    k = mesh.shape[axis] if axis in mesh.axis_names else 0
    if k == 0:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh {mesh.axis_names}")
    if replica is not None and replica not in mesh.axis_names:
        raise ValueError(f"replica={replica!r} is not an axis of the mesh {mesh.axis_names}")
    pinned = dict(pinned or {})
    names = {t.name for t in tables}
    unknown = sorted(set(pinned) - names)
    if unknown:
        raise ValueError(f"pinned names tables {unknown} that are not in tables")
    if memory_per_device is not None:
        memory_per_device = int(memory_per_device)
        if memory_per_device <= 0:
            raise ValueError(f"memory_per_device must be > 0, got {memory_per_device}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if replica is not None:  # one replica group's share of the batch
        batch_size = max(1, batch_size // mesh.shape[replica])

    def pooling_of(t):
        if isinstance(pooling_factors, Mapping):
            return sum(float(pooling_factors.get(f, 1.0)) for f in t.feature_names) / len(
                t.feature_names
            )
        return float(pooling_factors)

    alone = {
        t.name: block_bytes(t.num_embeddings, t.embedding_dim, t.param_dtype, optimizer)
        for t in tables
    }
    largest = max(tables, key=lambda t: alone[t.name])
    total_memory = sum(alone.values())
    if memory_per_device is not None and total_memory > k * memory_per_device:
        raise ValueError(
            f"the tables need {total_memory} bytes (with optimizer state), past the {k} devices' "
            f"{k * memory_per_device}; the largest, {largest.name!r}, needs {alone[largest.name]}"
        )
    link = link_bytes_per_s(mesh)
    one_device = 0.0  # every table on one device: the time the scores are relative to
    costs = {}
    for t in tables:
        costs[t.name] = {}
        every = [Placement(Kind.DATA_PARALLEL), *_candidates(t, k), pinned.get(t.name)]
        for p in every:
            if p is not None:
                costs[t.name][p] = _step_cost(t, p, k, batch_size, pooling_of(t), link)
        on_one = Placement(Kind.TABLE_WISE, 0)
        one_device += float(_step_cost(t, on_one, k, batch_size, pooling_of(t), link)[0])
    ids = batch_size * sum(pooling_of(t) * len(t.feature_names) for t in tables) / k
    time_scale = max(one_device, 1e-30)

    placed: dict[str, Placement] = {}
    cost = np.zeros(k)
    order = [t for t in tables if t.name in pinned]
    # the sharded tables first, largest first; then the small ones, replicated where they fit
    order += sorted((t for t in tables if t.name not in pinned),
                    key=lambda t: (alone[t.name] <= replicate_below, -alone[t.name]))  # fmt: skip
    for t in order:
        if t.name in pinned:
            tries = [[pinned[t.name]]]
        else:  # a small table may also be replicated; each placed by cost where it fits
            others = list(_candidates(t, k))
            small = alone[t.name] <= replicate_below
            tries = [[Placement(Kind.DATA_PARALLEL), *others]] if small else [others]
        best, tried = None, {}
        for options in tries:
            for p in options:
                trial = _partial(tables, {**placed, t.name: p}, mesh, axis, replica)
                mem = trial.memory(optimizer)
                tried[p] = int(mem.max())
                if memory_per_device is not None and mem.max() > memory_per_device:
                    continue
                c = cost + costs[t.name][p]  # the tables' time; the groups' passes on top
                with_passes = c + _group_passes(trial, ids)
                score = (with_passes.max() + with_passes.mean()) / time_scale + mem.max() / max(
                    total_memory, 1
                )
                if best is None or score < best[0]:
                    best = (score, p, c)
            if best is not None:
                break
        if best is None:
            raise ValueError(_fits_nowhere(t, tried, k, memory_per_device, alone, largest))
        placed[t.name] = best[1]
        cost = best[2]
    result = ShardingPlan(tables, tuple((t.name, placed[t.name]) for t in tables), mesh, axis,
                          replica=replica)  # fmt: skip
    cost = cost + _group_passes(result, ids)
    estimates = (tuple(int(m) for m in result.memory(optimizer)), tuple(float(c) for c in cost))
    return dataclasses.replace(result, estimates=estimates)


def _fits_nowhere(t, tried, k, memory_per_device, alone, largest) -> str:
    """Why no placement holds table ``t``: each placement tried, and the fullest device it
    would make, or why it does not apply."""
    reasons = []
    wise = {p: m for p, m in tried.items() if p.kind is Kind.TABLE_WISE}
    if wise:
        p, m = min(wise.items(), key=lambda pm: pm[1])
        reasons.append(f"table_wise: the least full device would hold {m} (device {p.device})")
    for kind in (Kind.ROW_WISE, Kind.COLUMN_WISE, Kind.DATA_PARALLEL):
        m = tried.get(Placement(kind))
        if m is not None:
            reasons.append(f"{kind.value}: the fullest device would hold {m}")
        elif kind is Kind.COLUMN_WISE:
            reasons.append(
                f"column_wise: not possible, embedding_dim={t.embedding_dim} does not split "
                f"into {k} blocks of at least {MIN_COLUMNS} columns"
            )
        elif kind is Kind.DATA_PARALLEL:
            reasons.append("data_parallel: not tried, the table is above replicate_below")
    return (
        f"table {t.name!r} fits nowhere: it needs {alone[t.name]} bytes with optimizer state "
        f"and the devices hold {memory_per_device} each; "
        + "; ".join(reasons)
        + f"; the largest table, {largest.name!r}, needs {alone[largest.name]}"
    )


def _partial(tables, placed: Mapping[str, Placement], mesh, axis, replica) -> ShardingPlan:
    """The plan of the tables placed so far."""
    subset = tuple(t for t in tables if t.name in placed)
    return ShardingPlan(subset, tuple((t.name, placed[t.name]) for t in subset), mesh, axis,
                        replica=replica)  # fmt: skip


# -- what a compiled step moves -------------------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(?P<result>\([^=]*?\)|\S+)\s+(?P<op>all-gather|all-to-all|reduce-scatter|all-reduce|"
    r"collective-permute)(?:-start)?\((?P<rest>.*)$",
    re.MULTILINE,
)
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_GROUP = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += _BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x)
    return total


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective exchanges per device in a compiled program's HLO text
    (``jax.jit(f).lower(...).compile().as_text()``), summed by kind: each collective's larger
    buffer (an all-gather's result, a reduce-scatter's operand: its result times the group)."""
    out: dict[str, int] = {}
    for m in _COLLECTIVE.finditer(re.sub(r"/\*.*?\*/", "", hlo)):
        size = _shape_bytes(m["result"])
        if m["op"] == "reduce-scatter":
            group = _GROUP.search(m["rest"])
            size *= len(group[1].split(",")) if group else 1
        out[m["op"]] = out.get(m["op"], 0) + size
    return out
