"""The options of a lookup, as one checked, frozen, hashable value: :class:`LookupOptions`.

A front end (``embedding``, ``embedding_bag``, ``sparse.lookup``) or a module builds it once from
its keyword arguments, and it travels from there to the kernel as one static argument of
``jax.jit``. A module builds it at construction, so a bad option raises before any table exists.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxembed.core import _validation
from jaxembed.core._packed import is_packed

#: the dtypes a quantized table's lookups may return
OUTPUT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


class LookupStyle(str, enum.Enum):
    """How rows are read from the table (haiku's ``lookup_style``).

    Every style gives the same outputs and gradients for a finite table.

    Attributes:
      GATHER: XLA's gather, the default.
      ONE_HOT: ``one_hot(indices) @ weight``, a matmul: often faster on TPU for small
        vocabularies; exact for finite tables, but a NaN or inf anywhere in the table reaches
        every row.
      AUTO: ``ONE_HOT`` on TPU up to 2,048 rows, else ``GATHER``.
    """

    GATHER = "gather"
    ONE_HOT = "one_hot"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value


def check_lookup_style(lookup_style: Any) -> str:
    """``lookup_style`` (a :class:`LookupStyle` or its string) as its string, or ``ValueError``."""
    try:
        return LookupStyle(lookup_style).value
    except ValueError:
        names = tuple(s.value for s in LookupStyle)
        raise ValueError(f"lookup_style must be one of {names}, got {lookup_style!r}") from None


def renamed_lookup(fn: Callable) -> Callable:
    """Accepts jaxembed 0.1's ``lookup=`` for ``lookup_style=``, with a DeprecationWarning.

    (``lookup=`` read as the name of ``jaxembed.sparse.lookup``, hence the rename: haiku's.)
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "lookup" in kwargs:
            if "lookup_style" in kwargs:
                raise TypeError("give lookup_style= only (lookup= is its old name)")
            warnings.warn(
                "lookup= is now lookup_style= (jaxembed.LookupStyle)",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs["lookup_style"] = kwargs.pop("lookup")
        return fn(*args, **kwargs)

    return wrapper


@dataclasses.dataclass(frozen=True)
class LookupOptions:
    """torch's ``nn.Embedding`` options, checked for a table of ``num_embeddings`` rows.

    Build it with :meth:`check`; its fields are then normalised (``padding_idx`` in
    ``[0, num_embeddings)``, numbers as Python floats), so equal options hash equal and a jitted
    kernel compiles once for them.

    Attributes:
      padding_idx: the row whose gradient is always zero, or None.
      max_norm: renorm referenced rows whose norm exceeds this, or None.
      norm_type: the p of the p-norm for ``max_norm``.
      scale_grad_by_freq: divide each row's gradient by its index's count in the call.
      lookup_style: the :class:`LookupStyle`'s string.
    """

    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    lookup_style: str = "gather"

    @classmethod
    def check(
        cls,
        num_embeddings: int,
        *,
        padding_idx: Any = None,
        max_norm: Any = None,
        norm_type: Any = 2.0,
        scale_grad_by_freq: Any = False,
        lookup_style: Any = "gather",
    ) -> LookupOptions:
        """The options, checked; a bad one raises ``TypeError`` or ``ValueError`` naming it."""
        return cls(
            padding_idx=_validation.check_padding_idx(padding_idx, num_embeddings),
            max_norm=_validation.check_max_norm(max_norm),
            norm_type=_validation.check_norm_type(norm_type),
            scale_grad_by_freq=_validation.check_flag("scale_grad_by_freq", scale_grad_by_freq),
            lookup_style=check_lookup_style(lookup_style),
        )

    @classmethod
    def of_call(
        cls,
        params: Any,
        padding_idx: Any,
        max_norm: Any,
        norm_type: Any,
        scale_grad_by_freq: Any,
        lookup_style: Any,
    ) -> LookupOptions:
        """The options of a front end's call on ``params`` (the table checked first), in the
        order every front end's signature lists them."""
        weight = _validation.check_weight(params, packed=True)
        return cls.check(
            weight.shape[0],
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            lookup_style=lookup_style,
        )

    def table_of(self, params: Any, output_dtype: Any = None) -> Any:
        """The table a lookup with these options reads from ``params``: its float weight, or a
        quantized table (frozen: no ``max_norm``, ``scale_grad_by_freq`` or one-hot lookup)
        returning ``output_dtype`` (float32, float16 or bfloat16; default float32).

        Raises:
          ValueError: those options with a quantized table; ``output_dtype`` with a float table
            (its lookups return its own dtype) or another dtype than those three.
        """
        weight = _validation.check_weight(params, packed=True)
        self.check_table(weight.shape[0])
        if not is_packed(weight):
            if output_dtype is not None:
                raise ValueError(
                    "output_dtype is for quantized tables; a float table's lookups return its "
                    f"own dtype ({weight.dtype}): cast the result instead"
                )
            return weight
        for name, value in (("max_norm", self.max_norm is not None),
                            ("scale_grad_by_freq", self.scale_grad_by_freq)):  # fmt: skip
            if value:
                raise ValueError(
                    f"{name} needs a trainable table; a quantized table is frozen (no renorm, "
                    "no gradient)"
                )
        if self.lookup_style == LookupStyle.ONE_HOT.value:
            raise ValueError(
                'lookup_style="one_hot" multiplies by the float table; a quantized table is '
                'read by gather only ("gather" or "auto")'
            )
        if output_dtype is None:
            return weight
        return weight.with_output_dtype(check_output_dtype(output_dtype))

    def check_table(self, num_embeddings: int) -> LookupOptions:
        """Raises ``ValueError`` unless these options fit a table of ``num_embeddings`` rows."""
        if self.padding_idx is not None and self.padding_idx >= num_embeddings:
            raise ValueError(
                f"padding_idx={self.padding_idx} is outside the table's {num_embeddings} rows"
            )
        return self


def check_output_dtype(output_dtype: Any) -> Any:
    """A quantized table's output dtype: float32, float16 or bfloat16, else ``ValueError``."""
    try:
        dtype = jnp.dtype(output_dtype)
    except TypeError:
        dtype = None
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be float32, float16 or bfloat16, got {output_dtype!r}")
    return dtype


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """A module's table: its shape and its :class:`LookupOptions` (checked at construction)."""

    num_embeddings: int
    embedding_dim: int
    options: LookupOptions

    @classmethod
    def check(cls, num_embeddings: Any, embedding_dim: Any, **options: Any) -> TableConfig:
        """The configuration, checked; ``options`` are :meth:`LookupOptions.check`'s."""
        num_embeddings = _validation.check_size("num_embeddings", num_embeddings)
        return cls(
            num_embeddings=num_embeddings,
            embedding_dim=_validation.check_size("embedding_dim", embedding_dim),
            options=LookupOptions.check(num_embeddings, **options),
        )


MODES = ("sum", "mean", "max")


def bag_call_options(
    params: Any,
    mode: Any,
    include_last_offset: Any,
    padding_idx: Any,
    max_norm: Any,
    norm_type: Any,
    scale_grad_by_freq: Any,
    lookup_style: Any,
) -> tuple[str, bool, LookupOptions]:
    """``(mode, include_last_offset, options)`` of a bag front end's call, checked."""
    mode, include_last_offset = check_bag_options(mode, include_last_offset, scale_grad_by_freq)
    options = LookupOptions.of_call(
        params, padding_idx, max_norm, norm_type, scale_grad_by_freq, lookup_style
    )
    return mode, include_last_offset, options


def check_bag_options(mode: Any, include_last_offset: Any, scale_grad_by_freq: Any) -> tuple:
    """``(mode, include_last_offset)`` of a bag, checked."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale_grad_by_freq and mode == "max":
        raise ValueError('scale_grad_by_freq is not supported with mode="max" (as in torch)')
    return mode, _validation.check_flag("include_last_offset", include_last_offset)
