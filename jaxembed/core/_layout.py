"""Where a table and its lookups live: :class:`Layout`, and its trivial case, one device.

The lookup pipeline (:mod:`jaxembed.core._pipeline`) is written once, against this interface.
The base class is the trivial layout, the whole table on one device: every index is local,
nothing is combined, and the body runs as it is. :class:`jaxembed.TableSharding` (in
:mod:`jaxembed.sharding`) is the other layout: it runs the same body under ``jax.shard_map``,
maps global rows to each device's block, and combines the devices' rows with collectives.
Nothing in the core knows more about meshes than the names of this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxembed.core._packed import is_packed


class Layout:
    """The trivial layout: one table on one device. Subclasses place tables over a mesh.

    Attributes:
      fill: what the gather returns for a row this device does not hold (NaN: an out-of-range
        index's row).
      splits_columns: whether each device holds only some of a row's columns (a packed table's
        rows do not split so).
    """

    fill: float = float("nan")

    @property
    def splits_columns(self) -> bool:
        """Whether each device holds only some of a row's columns."""
        return False

    def bind(
        self, table_shape: tuple[int, ...], indices_shape: tuple[int, ...] | None, **_: Any
    ) -> Layout:
        """Checks a call's shapes against the layout; returns the layout to run it on."""
        return self

    def run(
        self, body: Callable, args: tuple, in_kinds: tuple, out_kinds: Any, *, ndim: int
    ) -> Any:
        """``body(*args)``, on the layout's devices.

        ``in_kinds`` and ``out_kinds`` name how each argument and output is laid out:
        ``"table"``, ``"indices"`` (and arrays shaped like them), ``"rows"`` (a lookup's output),
        ``"bags"``, ``"entries"`` (one value per flat index) or ``"replicated"``. ``ndim`` is the
        indices' rank. The trivial layout needs neither.
        """
        del in_kinds, out_kinds, ndim
        return body(*args)

    def everyone(self, x: jax.Array) -> jax.Array:
        """``x``, one device's slice of the flat indices, as every device's slices together."""
        return x

    def localizer(self, num_local: int) -> Callable[[jax.Array], jax.Array]:
        """Maps global rows to this device's ``num_local`` rows (others to ``num_local``)."""
        del num_local
        return lambda safe: safe

    def reduce_columns(self, partial: jax.Array, op: str) -> jax.Array:
        """A per-row ``"sum"`` or ``"max"`` over this device's columns, completed over all."""
        del op
        return partial

    def combine(self, rows: jax.Array, out_of_range: jax.Array) -> jax.Array:
        """Every device's gathered rows combined into the lookup's rows."""
        del out_of_range
        return rows

    def bag_source(self, lookup: Any, keep, starts, psw) -> tuple:
        """What the bag reduction reads: ``(weight, table, index, keep, starts, psw, style)``.

        The trivial layout reduces straight from the (renormed) table, so the ``(n, D)`` rows are
        never materialised on CPU.
        """
        return (
            lookup.weight,
            lookup.table,
            lookup.local,
            keep,
            starts,
            psw,
            lookup.options.lookup_style,
        )

    def rowwise(self, optimizer: Any) -> Any:
        """The row-wise optimizer that updates a table on this layout."""
        return optimizer

    def __repr__(self) -> str:
        return "Layout()  # one device"


#: the trivial layout
LOCAL = Layout()


def bind(
    sharding: Any,
    table: Any,
    indices_shape: tuple[int, ...] | None,
    **kwargs: Any,
) -> Layout:
    """The layout a call on ``table`` runs on: :data:`LOCAL` for ``sharding=None``, else the
    sharding's. A packed (quantized) table's rows split by rows only."""
    layout = check(sharding).bind(table.shape, indices_shape, **kwargs)
    if is_packed(table) and layout.splits_columns:
        raise ValueError(
            "a quantized table's rows are packed bytes: shard it by rows (TableSharding(vocab=)),"
            " not by columns (dim=)"
        )
    return layout


def check(sharding: Any) -> Layout:
    """``sharding`` as a :class:`Layout` (None is :data:`LOCAL`), or ``TypeError``."""
    if sharding is None:
        return LOCAL
    if isinstance(sharding, Layout):
        return sharding
    raise TypeError(f"sharding must be a jaxembed.TableSharding or None, got {sharding!r}")


def set_rows(x: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """``x`` with ``rows`` (out of range: dropped) set to ``values``, laid out as ``x`` is: on
    a mesh of explicit axes, a scatter into a sharded array must name its output's sharding."""
    sharding = jax.typeof(x).sharding
    if any(axis is not None for axis in getattr(sharding, "spec", ())):
        return x.at[rows].set(values, mode="drop", out_sharding=sharding)
    return x.at[rows].set(values, mode="drop")
