"""Checkpoints of large tables: delta checkpoints of the rows a step changed, and saves that a crash
never leaves half-read.

A training loop saves a full checkpoint now and then, and between them only the rows each table
(and its row-wise optimizer state) changed, tracked from the sparse updates inside the jitted
step::

    tracker = jaxembed.checkpoint.DeltaTracker(model)        # or untouched() and track()
    ...                                                     # in the step, after the update:
    tracker.update(grads)
    ...
    jaxembed.checkpoint.save(folder, step, nnx.state((model, optimizer)), tracker.touched)
    tracker.clear()
    ...
    state = jaxembed.checkpoint.restore(folder, nnx.state((model, optimizer)))

Whole-state checkpoints with orbax work as before (docs: the checkpoints guide); this folder adds
what orbax does not do for embedding tables: saving only the changed rows.

What this folder owns, module by module:

* ``_track``: :func:`untouched`, :func:`track` and :class:`DeltaTracker`: the changed rows;
* ``_store``: :func:`save`, :func:`restore`, :func:`steps`: the checkpoints on disk, the
  crash-safe write and the checks on read (:class:`CheckpointError`);
* ``_tables``: :func:`save_tables` and :func:`restore_tables`: a collection saved table by
  table, block by block, and restored onto any plan, any number of devices, or one device;
  :func:`export_tables`: its tables as a TorchRec state dict in a ``.safetensors`` file,
  written block by block.

It may import every other folder (it is an entry point, as :mod:`jaxembed.serving` is).
"""

from jaxembed.checkpoint._store import CheckpointError, Saved, restore, save, steps
from jaxembed.checkpoint._tables import export_tables, restore_tables, save_tables
from jaxembed.checkpoint._track import DeltaTracker, Touched, track, untouched

__all__ = [
    "CheckpointError",
    "DeltaTracker",
    "Saved",
    "Touched",
    "export_tables",
    "restore",
    "restore_tables",
    "save",
    "save_tables",
    "steps",
    "track",
    "untouched",
]
