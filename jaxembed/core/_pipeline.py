"""The lookup pipeline, written once: every entry point's body starts with :meth:`Lookup.start`.

One lookup, on one device of its :class:`~jaxembed.core._layout.Layout`:

1. the index policy maps out-of-range indices to the sentinel ``num_embeddings``;
2. the table is taken outside autograd (``stop_gradient``), as torch's renorm is;
3. with ``max_norm``, the rows that *any* device's indices reference are renormed
   (:mod:`jaxembed.core._renorm`); that is the table the call returns as ``new_params``;
4. :meth:`Lookup.rows` gathers the rows (in the chosen lookup style), gives them torch's table
   gradient (:mod:`jaxembed.core._gradient`: zero at padding, ``1/count`` with
   ``scale_grad_by_freq``), and combines the devices' rows.

``embedding`` returns those rows; ``embedding_bag`` reduces them per bag
(:mod:`jaxembed.core._bag`); ``sparse.lookup`` returns them without the table gradient, plus the
indices and scale its row-wise update needs. On the trivial layout every device step is the
identity, so the body is the plain single-device lookup.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxembed.core import _gradient, _index_policy, _renorm
from jaxembed.core._layout import Layout
from jaxembed.core._options import LookupOptions
from jaxembed.core._packed import is_packed


@dataclasses.dataclass(frozen=True)
class Lookup:
    """One device's share of a lookup, after the renorm and before the rows are read.

    Attributes:
      options: the lookup's options.
      layout: the layout it runs on.
      num_embeddings: the whole table's rows (the sentinel).
      weight: this device's block of the table, which the gradient flows to.
      table: ``weight`` outside autograd, renormed with ``max_norm``.
      new_weight: the renormed table (``max_norm``), else None.
      safe: ``(n,)`` this device's indices, flat, out-of-range ones mapped to ``num_embeddings``.
      local: ``safe`` as rows of this device's block (the rows another device holds, and the
        sentinel, map past its end).
      among: every device's ``safe`` together, where counts or the renorm need them.
    """

    options: LookupOptions
    layout: Layout
    num_embeddings: int
    weight: jax.Array
    table: jax.Array
    new_weight: jax.Array | None
    safe: jax.Array
    local: jax.Array
    among: jax.Array

    @classmethod
    def start(
        cls,
        weight: jax.Array,
        indices: jax.Array,
        options: LookupOptions,
        layout: Layout,
        num_embeddings: int,
    ) -> Lookup:
        """Steps 1-3 of the pipeline for ``indices`` (any shape) into ``weight``."""
        safe = _index_policy.safe_indices(indices.reshape(-1), num_embeddings)
        needs_all = options.max_norm is not None or options.scale_grad_by_freq
        among = layout.everyone(safe) if needs_all else safe
        localize = layout.localizer(weight.shape[0])
        table = jax.lax.stop_gradient(weight)
        new_weight = None
        if options.max_norm is not None:
            # the rows are gathered from the renormed table: duplicates all see the renormed row
            table = new_weight = _renorm.renorm_table(
                table, localize(among), options.max_norm, options.norm_type, layout.reduce_columns
            )
        return cls(
            options,
            layout,
            num_embeddings,
            weight,
            table,
            new_weight,
            safe,
            localize(safe),
            among,
        )

    def scale(self, *, padding: bool = True) -> jax.Array | None:
        """Each index's factor on the gradient (0 at padding, ``1/count``), or None if all 1."""
        return _gradient.gradient_scale(
            self.safe,
            self.options.padding_idx if padding else None,
            self.options.scale_grad_by_freq,
            self.weight.dtype,
            among=self.among,
        )

    def rows(self, *, gradient: bool = True, scaled: bool = True) -> jax.Array:
        """Step 4: the ``(n, D)`` rows, with torch's table gradient unless ``gradient=False``.

        ``scaled=False`` leaves the per-index factor out of the gradient, for a consumer (the bag
        reduction) that applies it itself.
        """
        rows = _index_policy.gather_rows(
            self.table, self.local, self.options.lookup_style, fill=self.layout.fill
        )
        if is_packed(self.table):  # frozen: no gradient; decoded as float32
            rows = rows.astype(self.table.dtype)
        elif gradient:
            scale = self.scale() if scaled else None
            rows = _gradient.with_table_gradient(rows, self.weight, self.local, scale)
        return self.layout.combine(rows, self.safe == self.num_embeddings)


def new_params(params: Any, new_weight: jax.Array | None) -> Any:
    """``params`` itself without a renorm, else a new dict holding the renormed table."""
    if new_weight is None:
        return params
    return {**params, "weight": jax.lax.stop_gradient(new_weight)}
