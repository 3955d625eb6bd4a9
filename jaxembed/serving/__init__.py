"""Serving: a model's forward pass exported with ``jax.export``, its tables beside it.

* :func:`export`: ``fn(tables, *inputs)`` traced once on the pure-JAX path into a StableHLO
  artifact, with symbolic dimensions where the inputs have them (:func:`symbolic_shape`), so
  one artifact serves any batch; the tables are its arguments, not constants, so a table of
  any size exports.
* :class:`Artifact`: call it, :meth:`~Artifact.save` it (the StableHLO, the tables as
  ``.safetensors``, a manifest with checksums), :func:`load` it in another process. A process
  without jaxembed loads it too: ``jax.export.deserialize`` and any ``.safetensors`` reader.

What this folder owns, module by module:

* ``_artifact``: :func:`export`, :class:`Artifact`, :func:`load`, :func:`symbolic_shape`, and
  :class:`MeshLayout` (where an artifact's tables go on a mesh).

It may import every other folder (it is an entry point, as :mod:`jaxembed.modules` is).
"""

from jaxembed.serving._artifact import Artifact, MeshLayout, export, load, symbolic_shape

__all__ = ["Artifact", "MeshLayout", "export", "load", "symbolic_shape"]
