"""Table configs (TorchRec's ``EmbeddingBagConfig`` / ``EmbeddingConfig``) and the stacking plan.

A collection's tables are stored as *stacks*: tables that share their width, dtype, pooling and
the options that act on a whole lookup (``max_norm``, ``norm_type``, ``scale_grad_by_freq``,
the lookup style) are one physical ``(sum of rows, D)`` table, each at a row offset. A step then
runs one gather, one renorm pass and one sparse update per stack, not per table. Per-table
``padding_idx`` stays per table inside a stack (its entries are left out of the bags and the
gradient, as in torch). A table built with ``stack=False`` is a stack of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.core import _options, _validation
from jaxembed.core._options import LookupOptions


class TorchRecInit:
    """TorchRec's default initial table: uniform in ``[-sqrt(1/rows), sqrt(1/rows)]``."""

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
        bound = math.sqrt(1.0 / max(shape[0], 1))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    def __repr__(self) -> str:
        return "uniform(-sqrt(1/num_embeddings), sqrt(1/num_embeddings))"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchRecInit)

    def __hash__(self) -> int:
        return hash(TorchRecInit)


TORCHREC_INIT = TorchRecInit()


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """One table of an :class:`~jaxembed.EmbeddingCollection` (TorchRec's ``EmbeddingConfig``).

    Args:
      name: the table's name (its key in the params and in ``to_torch``'s state dict).
      embedding_dim: width of each row.
      num_embeddings: rows of the table.
      feature_names: the features looked up in this table (several may share it); default
        ``(name,)``.
      padding_idx: a row whose entries get no gradient (and, in bags, count in no bag).
      max_norm: renorm looked-up rows whose ``norm_type``-norm exceeds it, as torch.
      norm_type: the p of the p-norm for ``max_norm``.
      scale_grad_by_freq: divide each row's gradient by its count among all of this table's ids
        in the call (every feature it serves), as one torch call over them would.
      init: ``init(key, shape, dtype)``; default TorchRec's uniform
        ``[-sqrt(1/num_embeddings), sqrt(1/num_embeddings)]``.
      param_dtype: the dtype the table is stored in.
      lr_scale: this table's factor on the row-wise optimizer's learning rate.
      stack: share a physical table with the tables it can stack with (default); False keeps it
        alone.

    Raises:
      TypeError, ValueError: a bad field, naming it.

    Example:
      >>> import jaxembed
      >>> jaxembed.EmbeddingConfig("items", 8, 1000, ["item", "last_item"]).feature_names
      ('item', 'last_item')
    """

    name: str
    embedding_dim: int
    num_embeddings: int
    feature_names: tuple[str, ...] = ()
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    init: Any = TORCHREC_INIT
    param_dtype: Any = jnp.float32
    lr_scale: float = 1.0
    stack: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "+" in self.name:
            raise ValueError(f"name must be a non-empty string without '+', got {self.name!r}")
        set_ = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731
        set_("num_embeddings", _validation.check_size("num_embeddings", self.num_embeddings))
        set_("embedding_dim", _validation.check_size("embedding_dim", self.embedding_dim))
        if self.num_embeddings == 0:
            raise ValueError(f"table {self.name!r}: num_embeddings must be >= 1")
        names = self.feature_names or (self.name,)
        if isinstance(names, str):
            names = (names,)
        names = tuple(names)
        for f in names:
            if not isinstance(f, str) or not f:
                raise TypeError(f"table {self.name!r}: feature_names must be strings, got {f!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"table {self.name!r}: feature_names repeat a name: {names}")
        set_("feature_names", names)
        options = LookupOptions.check(
            self.num_embeddings,
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
        )
        set_("padding_idx", options.padding_idx)
        set_("max_norm", options.max_norm)
        set_("norm_type", options.norm_type)
        set_("scale_grad_by_freq", options.scale_grad_by_freq)
        if not jnp.issubdtype(self.param_dtype, jnp.floating):
            raise TypeError(f"table {self.name!r}: param_dtype must be floating")
        set_("param_dtype", jnp.dtype(self.param_dtype))
        if not callable(self.init):
            raise TypeError(f"table {self.name!r}: init must be callable, got {self.init!r}")
        lr = self.lr_scale
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"table {self.name!r}: lr_scale must be a number >= 0, got {lr!r}")
        set_("lr_scale", float(lr))
        set_("stack", _validation.check_flag("stack", self.stack))
        self._check_pooling()

    def _check_pooling(self) -> None:
        pass

    @property
    def pooling(self) -> str | None:
        return None


@dataclasses.dataclass(frozen=True)
class EmbeddingBagConfig(EmbeddingConfig):
    """One table of an :class:`~jaxembed.EmbeddingBagCollection` (TorchRec's
    ``EmbeddingBagConfig``): :class:`EmbeddingConfig`'s fields, and how its bags pool.

    Args:
      pooling: ``"sum"``, ``"mean"`` or ``"max"`` (TorchRec's ``PoolingType``, lower case).

    Example:
      >>> import jaxembed
      >>> cfg = jaxembed.EmbeddingBagConfig("t0", 16, 100, ["f0"], pooling="mean", padding_idx=0)
      >>> cfg.pooling, cfg.padding_idx
      ('mean', 0)
    """

    pooling: str = "sum"

    def _check_pooling(self) -> None:
        pooling = self.pooling
        if hasattr(pooling, "name"):  # TorchRec's PoolingType enum
            pooling = pooling.name
        pooling = str(pooling).lower()
        _options.check_bag_options(pooling, False, self.scale_grad_by_freq)
        object.__setattr__(self, "pooling", pooling)


@dataclasses.dataclass(frozen=True)
class Stack:
    """Tables stored as one physical table: ``tables[i]`` holds rows
    ``[offsets[i], offsets[i] + tables[i].num_embeddings)``."""

    name: str
    tables: tuple[EmbeddingConfig, ...]
    offsets: tuple[int, ...]

    @property
    def num_embeddings(self) -> int:
        return self.offsets[-1] + self.tables[-1].num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.tables[0].embedding_dim

    @property
    def dtype(self) -> Any:
        return self.tables[0].param_dtype

    @property
    def pooling(self) -> str | None:
        return self.tables[0].pooling

    @property
    def options(self) -> LookupOptions:
        """The options of the whole stack (``padding_idx`` is per table, so None here)."""
        t = self.tables[0]
        return LookupOptions(None, t.max_norm, t.norm_type, t.scale_grad_by_freq)

    @property
    def features(self) -> tuple[tuple[str, int], ...]:
        """``(feature, table position in the stack)`` for each feature of the stack."""
        return tuple((f, i) for i, t in enumerate(self.tables) for f in t.feature_names)

    def positions_in(self, keys: Sequence[str]) -> tuple[int, ...]:
        """Where this stack's features are among the jagged input's ``keys``, in their order
        (the order of the stack's bags)."""
        mine = {f for f, _ in self.features}
        return tuple(j for j, k in enumerate(keys) if k in mine)

    def lr_scales(self) -> tuple[float, ...] | None:
        """Each table's ``lr_scale``, or None when all are 1."""
        scales = tuple(t.lr_scale for t in self.tables)
        return None if all(s == 1.0 for s in scales) else scales


def _stack_key(t: EmbeddingConfig) -> tuple:
    return (t.embedding_dim, t.param_dtype, t.pooling, t.max_norm, t.norm_type,
            t.scale_grad_by_freq)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """A collection's tables, checked, and how they are stacked (hashable: a static argument)."""

    tables: tuple[EmbeddingConfig, ...]
    stacks: tuple[Stack, ...]

    @classmethod
    def of(cls, tables: Any, kind: type, *, stack: bool = True) -> Plan:
        """Checks ``tables`` (each a ``kind``) and stacks those that can share a table.

        Raises:
          TypeError: a table of another kind.
          ValueError: no tables, repeated table names, a feature in two tables.
        """
        if isinstance(tables, Plan):
            return tables
        if isinstance(tables, EmbeddingConfig):
            tables = [tables]
        tables = tuple(tables)
        if not tables:
            raise ValueError("tables must hold at least one table config")
        for t in tables:
            if type(t) is not kind:
                raise TypeError(
                    f"tables must be {kind.__name__}s, got {type(t).__name__} ({t!r:.60})"
                )
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be distinct, got {names}")
        owner: dict[str, str] = {}
        for t in tables:
            for f in t.feature_names:
                if f in owner:
                    raise ValueError(
                        f"feature {f!r} is in tables {owner[f]!r} and {t.name!r}; a feature is "
                        "looked up in one table (tables may share features' ids, not names)"
                    )
                owner[f] = t.name
        groups: dict[Any, list[EmbeddingConfig]] = {}
        for t in tables:
            key = _stack_key(t) if (stack and t.stack) else ("alone", t.name)
            groups.setdefault(key, []).append(t)
        stacks = []
        for group in groups.values():
            offsets = tuple(int(x) for x in np.cumsum([0] + [t.num_embeddings for t in group]))
            if offsets[-1] >= 2**31 - 1:
                raise ValueError(
                    f"tables {[t.name for t in group]} stack to {offsets[-1]} rows, past int32; "
                    "build some with stack=False"
                )
            stacks.append(Stack("+".join(t.name for t in group), tuple(group), offsets[:-1]))
        return cls(tables, tuple(stacks))

    @classmethod
    def of_either(cls, tables: Any, *, stack: bool = True) -> Plan:
        """:meth:`of` for a collection of either kind: bag configs, or (unpooled) plain
        :class:`EmbeddingConfig` s, the kind of the first table (the rest must match).

        Raises:
          As :meth:`of`.
        """
        if isinstance(tables, Plan):
            return tables
        first = next(iter([tables] if isinstance(tables, EmbeddingConfig) else tables), None)
        kind = EmbeddingBagConfig if isinstance(first, EmbeddingBagConfig) else EmbeddingConfig
        return cls.of(tables, kind, stack=stack)

    @property
    def pooled(self) -> bool:
        """Whether the tables are bag configs (pooled), not plain ones (unpooled)."""
        return self.tables[0].pooling is not None

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every feature, in table order (the order of the concatenated output)."""
        return tuple(f for t in self.tables for f in t.feature_names)

    def table_of(self, feature: str) -> EmbeddingConfig:
        return next(t for t in self.tables if feature in t.feature_names)
