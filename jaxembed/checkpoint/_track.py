"""The rows a training step changed, tracked from its sparse updates: what a delta checkpoint saves.

A mask ``(V,)`` of bools a table, set where an update wrote: the rows of its sparse gradient, the
rows a managed-collision module reset, and every row where the table had a dense gradient. It is
set inside the jitted step, from the gradients, so no table is ever compared with an older copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxembed.sharding._layout import TableSharding
from jaxembed.sharding._placement import ShardingPlan
from jaxembed.sparse import ModelGrads, SparseGrad
from jaxembed.sparse._nnx import sparse_tables


def untouched(tables: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A mask of no rows for each table: ``{key: zeros((V,), bool)}``.

    Args:
      tables: ``{key: table}``: each ``(V, ...)`` array (or anything with a ``shape``). The keys
        name the tables in :func:`save`'s state (see there).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> jaxembed.checkpoint.untouched({"weight": jnp.zeros((3, 2))})
      {'weight': Array([False, False, False], dtype=bool)}
    """
    out = {}
    for key, table in tables.items():
        shape = getattr(table, "shape", None)
        if not isinstance(key, str) or shape is None or len(shape) < 1:
            raise ValueError(
                f"tables must map names to (V, ...) arrays, got {key!r}: {type(table).__name__}"
            )
        out[key] = jnp.zeros((shape[0],), bool)
    return out


def _rows_of(grad: Any, key: str) -> jax.Array:
    if isinstance(grad, SparseGrad):
        return grad.indices
    rows = jnp.asarray(grad)
    if not jnp.issubdtype(rows.dtype, jnp.integer):
        raise TypeError(
            f"grads[{key!r}] must be a SparseGrad or integer rows, got {rows.dtype} values"
        )
    return rows.reshape(-1)


def track(touched: Mapping[str, ArrayLike], grads: ModelGrads | Mapping[str, Any]) -> dict:
    """``touched`` with the rows ``grads`` update set: call it beside the optimizer's update.

    Rows outside ``[0, V)`` (padding and out-of-range entries, which no update writes) are
    ignored. Jit-able: the masks keep their shapes.

    Args:
      touched: ``{key: (V,) bool}``, from :func:`untouched` or an earlier :func:`track`.
      grads: a :class:`jaxembed.sparse.ModelGrads` (its sparse gradients' rows, the rows a
        module reset, and every row of a table with a dense gradient), or ``{key: SparseGrad}``
        or ``{key: integer rows}``. With ``max_norm``, the lookup also renorms the rows it reads
        (the padding row too): pass the looked-up ids as well.

    Returns:
      The new masks, ``{key: (V,) bool}``.

    Raises:
      ValueError: ``grads`` names a table ``touched`` does not track.
      NotImplementedError: rows split over a mesh (a sharded update's entries).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> touched = jaxembed.checkpoint.untouched({"weight": jnp.zeros((4, 2))})
      >>> grad = jaxembed.sparse.SparseGrad(jnp.array([3, 1, 4]), jnp.ones((3, 2)))
      >>> jaxembed.checkpoint.track(touched, {"weight": grad})["weight"]
      Array([False,  True, False,  True], dtype=bool)
    """
    out = {key: jnp.asarray(mask) for key, mask in touched.items()}
    if isinstance(grads, ModelGrads):
        parts = [(key, g.indices) for key, g in grads.sparse.items()]
        parts += list(grads.fresh.items())
        parts += [(key, None) for key in grads.tables]  # a dense gradient: any row may change
    else:
        parts = [(key, _rows_of(g, key)) for key, g in grads.items()]
    for key, rows in parts:
        if key not in out:
            raise ValueError(
                f"grads hold the table {key!r}, which touched does not track "
                f"(it tracks {sorted(out)})"
            )
        if rows is None:
            out[key] = jnp.ones_like(out[key])
        else:  # rows >= V (padding) drop; negatives are never rows here
            rows = _refuse_a_mesh(jnp.where(rows < 0, out[key].shape[0], rows), key)
            out[key] = out[key].at[rows].set(True, mode="drop")
    return out


def _refuse_a_mesh(rows: jax.Array, key: str) -> jax.Array:
    """``rows`` as they are, where they are on one device; a sharded update's entries (split
    over a mesh, in each device's own rows) raise: they are not the table's rows."""
    sharding = getattr(jax.typeof(rows), "sharding", None)
    spec = getattr(sharding, "spec", ())
    if any(p is not None for p in spec):
        raise NotImplementedError(
            f"grads[{key!r}] is split over a mesh: a sharded update's entries index each "
            "device's own rows, not the table's, so they cannot mark its rows yet. Save tables "
            "on a mesh with jaxembed.checkpoint.save_tables (every row) instead"
        )
    return rows


def _renorming(model: Any) -> list[str]:
    """The modules of ``model`` with sparse tables that renorm as they read (``max_norm``)."""
    found = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or not sparse_tables(node):
            continue
        tables = getattr(getattr(node, "plan", None), "tables", ())
        if getattr(node, "max_norm", None) is not None or any(
            getattr(t, "max_norm", None) is not None for t in tables
        ):
            found.append("/".join(str(p) for p in path) or "the model")
    return found


def _groups_on_a_mesh(model: Any) -> dict[str, tuple[Any, Any]]:
    """``{key: (plan, group)}`` for each sparse table of a collection placed on a mesh
    (``EmbeddingBagCollection(sharding=plan)``): its variable is one group's array."""
    found = {}
    for path, node in nnx.iter_graph(model):
        plan = getattr(node, "sharding", None)
        if not isinstance(plan, ShardingPlan) or not isinstance(node, nnx.Module):
            continue
        prefix = "/".join(str(p) for p in path)
        for g in plan.groups:
            found["/".join(x for x in (prefix, "weights", g.name) if x)] = (plan, g)
    return found


def _mask_spec(plan: Any, g: Any) -> jax.P:
    """A group's mask laid out as its array's rows: split for row- and table-wise groups."""
    return jax.P(plan.axis) if g.split_rows else jax.P()


def _mark_on_a_mesh(mask: jax.Array, rows: jax.Array, plan: Any, g: Any) -> jax.Array:
    """``mask`` with the rows of a sharded update set: each device's entries index its own
    block of the group's array (a row- or table-wise owner's), or, for a replica or a
    column-split group, the whole array's rows, alike on every device."""
    spec = _mask_spec(plan, g)

    def body(mask, rows):
        rows = jnp.where(rows < 0, mask.shape[0], rows)
        return mask.at[rows].set(True, mode="drop")

    mapped = jax.shard_map(body, mesh=plan.mesh, in_specs=(spec, jax.P(plan.axis)),
                           out_specs=spec, check_vma=False)  # fmt: skip
    return mapped(mask, rows)


def _tables_on_a_mesh(model: Any, tables: Mapping[str, Any]) -> dict[str, TableSharding]:
    """``{key: layout}`` for each sparse table placed by a :class:`~jaxembed.TableSharding` (a
    module's ``sharding``), its mesh the table's own."""
    by_variable = {id(var): key for key, var in tables.items()}
    found = {}
    for _, node in nnx.iter_graph(model):
        layout = getattr(node, "sharding", None)
        key = by_variable.get(id(getattr(node, "weight", None)))
        if isinstance(layout, TableSharding) and isinstance(node, nnx.Module) and key:
            mesh = getattr(tables[key][...].sharding, "mesh", None)
            found[key] = dataclasses.replace(layout, mesh=layout.mesh or mesh)
    return found


def _mark_by_layout(mask: jax.Array, rows: jax.Array, layout: TableSharding) -> jax.Array:
    """``mask`` (laid out as the table's rows, ``P(vocab)``) with the rows of a
    :class:`~jaxembed.TableSharding` table's sparse update set: its entries, global rows split
    over ``batch``, are gathered as the sharded optimizer gathers them, and each vocab shard
    marks its own."""
    n = rows.shape[0] if rows.ndim else 0
    entries = layout.entries(n)
    num_local = mask.shape[0] // layout.count("vocab", layout.mesh)

    def body(mask, rows):
        rows = entries.everyone(rows)
        rows = jnp.where(rows < 0, mask.shape[0], rows)  # negatives are never rows here
        return mask.at[layout.localizer(num_local)(rows)].set(True, mode="drop")

    spec = jax.P(layout.vocab)
    return layout.map(body, (spec, jax.P(entries.batch)), spec, mask, rows)


class Touched(nnx.Variable):
    """The ``(V,)`` bool mask of the rows of a table changed since the last checkpoint."""


class DeltaTracker(nnx.Pytree):
    """The rows of each sparse table of an nnx model changed since the last checkpoint.

    Update it with the same :class:`~jaxembed.sparse.ModelGrads` as the optimizer, inside the
    jitted step; hand :attr:`touched` to :func:`save`, then :meth:`clear` it.

    Tables on a mesh are tracked too. A collection on a mesh (``sharding=plan``): each group's
    mask is laid out as its array's rows, and each device marks the rows its own update wrote.
    A table placed by a :class:`~jaxembed.TableSharding`: its mask is split as its rows
    (``vocab``), and each vocab shard marks its own rows of the update's entries.

    Args:
      model: the model; its :class:`~jaxembed.sparse.SparseParam` tables are tracked, keyed by
        path as in ``ModelGrads`` (``"embed/weight"``).

    Raises:
      ValueError: the model has no sparse table, or a sparse table renorms as it is read
        (``max_norm``): a forward pass, in evaluation too, then changes rows that no update
        records, so only full checkpoints are exact for it.
      NotImplementedError: a sparse table on a mesh that no module's ``sharding`` placed (its
        update's entries cannot be mapped to its rows); save it with :func:`save_tables`.

    Example:
      >>> import jax.numpy as jnp, jaxembed, optax
      >>> from flax import nnx
      >>> emb = jaxembed.Embedding(5, 2, sparse=True, rngs=nnx.Rngs(0))
      >>> opt = jaxembed.sparse.Optimizer(emb, optax.sgd(0.1), jaxembed.sparse.sgd(0.1))
      >>> tracker = jaxembed.checkpoint.DeltaTracker(emb)
      >>> _, grads = jaxembed.sparse.value_and_grad(lambda m: m(jnp.array([3, 1])).sum())(emb)
      >>> opt.update(emb, grads)
      >>> tracker.update(grads)
      >>> tracker.touched["weight"]
      Array([False,  True, False,  True, False], dtype=bool)
    """

    def __init__(self, model: Any):
        tables = sparse_tables(model)
        if not tables:
            raise ValueError(
                "model has no sparse table (jaxembed.Embedding(..., sparse=True)) to track; "
                "a model trained densely changes every row: save full checkpoints"
            )
        renorming = _renorming(model)
        if renorming:
            raise ValueError(
                f"the sparse tables of {renorming} renorm as they are read (max_norm): a forward "
                "pass, in evaluation too, changes rows that no update records, so a delta "
                "checkpoint would miss them. Save full checkpoints (touched=None) for this model"
            )
        groups = _groups_on_a_mesh(model)
        layouts = _tables_on_a_mesh(model, tables)
        on_a_mesh = [
            key
            for key, var in tables.items()
            if len(getattr(var[...], "sharding", None).device_set) > 1
            and key not in groups
            and key not in layouts
        ]
        if on_a_mesh:  # a table placed some other way (by hand, not by a module's layout)
            raise NotImplementedError(
                f"the sparse tables {on_a_mesh} are on a mesh, placed by no module's sharding "
                "(a TableSharding or a collection's plan): delta checkpoints cannot map their "
                "update's entries to rows. Save them with jaxembed.checkpoint.save_tables"
            )
        masks = untouched({key: var[...] for key, var in tables.items()})
        for key, (plan, g) in groups.items():  # laid out as the group's rows
            sharding = jax.NamedSharding(plan.mesh, _mask_spec(plan, g))
            masks[key] = jax.device_put(masks[key], sharding)
        for key, layout in layouts.items():  # split as the table's rows
            sharding = jax.NamedSharding(layout.mesh, jax.P(layout.vocab))
            masks[key] = jax.device_put(masks[key], sharding)
        self.masks = nnx.data({key: Touched(m) for key, m in masks.items()})
        self.groups, self.layouts = groups, layouts

    @property
    def touched(self) -> dict[str, jax.Array]:
        """``{key: (V,) bool}``: the rows changed since the last :meth:`clear`."""
        return {key: var[...] for key, var in self.masks.items()}

    def update(self, grads: ModelGrads) -> None:
        """Marks the rows ``grads`` (from :func:`jaxembed.sparse.value_and_grad`) update."""
        if not isinstance(grads, ModelGrads):
            raise TypeError(
                "grads must come from jaxembed.sparse.value_and_grad (a ModelGrads), got "
                f"{type(grads).__name__}"
            )
        touched = self.touched
        sparse = dict(grads.sparse)
        for key, (plan, g) in self.groups.items():
            if key in sparse:
                touched[key] = _mark_on_a_mesh(touched[key], sparse.pop(key).indices, plan, g)
        for key, layout in self.layouts.items():
            if key in sparse:
                touched[key] = _mark_by_layout(touched[key], sparse.pop(key).indices, layout)
        for key, mask in track(touched, grads._replace(sparse=sparse)).items():
            self.masks[key].set_value(mask)

    def clear(self) -> None:
        """Marks no row: call it once a checkpoint with :attr:`touched` is saved."""
        for var in self.masks.values():
            var.set_value(jnp.zeros_like(var[...]))
