"""jaxembed's pytrees, registered for ``jax.export`` serialization.

``Exported.serialize()`` writes the pytree structure of an exported function's arguments and
results, and refuses a node class it does not know. Each pytree class of jaxembed that can
cross an exported function's boundary (:class:`~jaxembed.KeyedJagged`,
:class:`~jaxembed.QuantizedTable`, the sparse lookups, gradients and optimizer states)
registers itself where it is defined, with :func:`register_namedtuple` or
:func:`register_node`, as ``"jaxembed.<its public name>"``; its static part (the feature keys,
the bit width, ...) is written as JSON. The process that deserializes an artifact whose
boundary holds such a node must have imported jaxembed; one whose boundary holds only arrays,
dicts, lists and tuples needs jax alone (:mod:`jaxembed.serving` exports that way).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax


def register_namedtuple(cls: type, name: str) -> type:
    """Registers the ``NamedTuple`` ``cls`` (its fields are its children) as
    ``"jaxembed." + name``, e.g. ``"sparse.SparseGrad"``. Returns ``cls``."""
    jax.export.register_namedtuple_serialization(cls, serialized_name=f"jaxembed.{name}")
    return cls


def register_node(
    cls: type,
    name: str,
    *,
    to_json: Callable[[Any], Any] = lambda aux: None,
    from_json: Callable[[Any], Any] = lambda value: None,
) -> type:
    """Registers ``cls``, already a pytree node class, as ``"jaxembed." + name``.

    Args:
      cls: the class.
      name: its public name, e.g. ``"KeyedJagged"``.
      to_json, from_json: its static part (the aux data of its flattening) to and from JSON
        values; the defaults are for a class whose static part is None.

    Returns:
      ``cls``.
    """
    jax.export.register_pytree_node_serialization(
        cls,
        serialized_name=f"jaxembed.{name}",
        serialize_auxdata=lambda aux: json.dumps(to_json(aux)).encode(),
        deserialize_auxdata=lambda raw: from_json(json.loads(raw)),
    )
    return cls
