"""Tables on a JAX mesh: the :class:`TableSharding` layout and the sharded row-wise update.

What this folder owns, module by module:

* ``_layout``: :class:`TableSharding`, a :class:`~jaxembed.core._layout.Layout`: the specs of a
  table and its lookups, their checks, the placement of arrays, and the device steps the core's
  one lookup body calls (localize, gather the indices over ``batch``, combine over ``vocab``);
* ``_update``: a row-wise optimizer on a sharded table (public as
  :func:`jaxembed.sparse.sharded`, which reaches it through ``TableSharding.rowwise``).

It may import :mod:`jaxembed.core` and :mod:`jaxembed.sparse`. Nothing below it imports it: the
core and the sparse update reach it through the ``Layout`` interface.
"""

from jaxembed.sharding._layout import TableSharding

__all__ = ["TableSharding"]
