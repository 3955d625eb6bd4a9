"""The interface of a table stored in another form than a float array: :class:`PackedTable`.

A quantized table (:mod:`jaxembed.quantized`) is one. The lookups read it row by row through
:meth:`PackedTable.take`, so only the rows a call references are ever decoded, and the rest of
the pipeline (the index policy, the bag reduction, the layouts) runs on it unchanged. Such a
table is frozen: it takes no gradient, no ``max_norm`` renorm and no sparse update.
"""

from __future__ import annotations

import abc
from typing import Any

import jax


class PackedTable(abc.ABC):
    """A ``(num_embeddings, embedding_dim)`` table whose rows are decoded as they are read.

    Subclasses are pytrees whose leaves hold the stored rows (leading dimension
    ``num_embeddings``, so a layout may split them by rows).

    Attributes:
      shape: ``(num_embeddings, embedding_dim)``, the decoded table's.
      dtype: the dtype its lookups return.
      stored: the array holding the rows, ``(num_embeddings, ...)``.
    """

    ndim = 2

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abc.abstractmethod
    def dtype(self) -> Any: ...

    @property
    @abc.abstractmethod
    def stored(self) -> jax.Array: ...

    @abc.abstractmethod
    def with_output_dtype(self, dtype: Any) -> PackedTable:
        """The same rows, looked up as ``dtype``."""

    #: the row format the CPU kernels (:mod:`jaxembed.kernels`) decode in registers (8, 4 or 2
    #: bits, ``kernels.E4M3`` / ``E5M2``), or None: the table is only read through :meth:`take`
    native_format: int | None = None

    @abc.abstractmethod
    def take(self, safe: jax.Array, fill: float) -> jax.Array:
        """The rows ``safe`` (any shape) decoded, ``safe.shape + (D,)`` float32; the sentinel
        (and any index past the rows) gives rows of ``fill`` (NaN, or 0 on a sharded layout)."""


def is_packed(table: Any) -> bool:
    return isinstance(table, PackedTable)


def array_of(table: Any) -> jax.Array:
    """An array standing for ``table`` where only its placement matters (a carry made "like"
    it inside ``shard_map``)."""
    return table.stored if is_packed(table) else table
