"""The roofline: the bytes each op must at least move, and the copy bandwidth they are set
against, measured in the same run."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxembed.bench._cases import OPS
from jaxembed.bench._timing import median_ms


def op_bytes(op: str, vocab: int, dim: int, batch: int, itemsize: int, bag_size: int = 16) -> int:
    """The bytes ``op`` must at least move, for a (vocab, dim) table and ``batch`` indices.

    * ``lookup``: read the looked-up rows, write the output, read the int32 indices.
    * ``lookup+max_norm``: also read the rows for their norms and write them back renormed.
    * ``grad`` (the dense gradient of a lookup): write the zero (V, D) gradient, read the
      cotangent, read and write the rows it scatters into.
    * ``bag-*``: read the rows, write one row per bag (``batch // bag_size`` bags).
    * ``train-dense`` (optax Adam on the dense gradient): the gradient as in ``grad``, then read
      the gradient, parameters and both moments and write parameters and moments: 8 passes over
      the table, plus the rows and the target of the loss.
    * ``train-sparse-<opt>``: read the rows and the target, write their gradient, read and write
      the touched table rows and optimizer-state rows (Adagrad: one state row, row-wise Adagrad:
      one float32 per row, lazy Adam: two state rows).
    * ``train-bag-rowwise_adagrad``: bags of ``bag_size`` summed, then row-wise Adagrad: read the
      rows, read the bags' target, read and write the touched rows and their accumulators.
    * ``remap`` (managed collisions): read each raw id (8 bytes) and its held entry (the id's
      8 bytes and its slot's 4), write its slot.
    """
    rows = batch * dim * itemsize
    table = vocab * dim * itemsize
    idx = batch * 4
    if op == "lookup":
        return 2 * rows + idx
    if op == "lookup+max_norm":
        return 4 * rows + idx
    if op == "grad":
        return table + 3 * rows + idx
    if op.startswith("bag-"):
        return rows + (batch // bag_size) * dim * itemsize + idx
    if op == "train-dense":
        return 8 * table + 4 * rows + idx
    if op.startswith("train-sparse-"):
        state_rows = {"sgd": 0, "adagrad": 2 * rows, "rowwise_adagrad": 2 * batch * 4}
        state = state_rows.get(op.removeprefix("train-sparse-"), 4 * rows)
        return 3 * rows + 2 * rows + state + idx
    if op == "train-bag-rowwise_adagrad":
        bags = (batch // bag_size) * dim * itemsize
        return 3 * rows + bags + 2 * batch * 4 + idx
    if op == "remap":
        return batch * (8 + 12) + idx
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


def bandwidth(nbytes: float, ms: float) -> float:
    """Bytes per second."""
    return nbytes / (ms / 1e3)


def copy_bandwidth(table: jax.Array, repeat: int = 5) -> float:
    """The device's copy bandwidth in bytes/s (read + write): a donated ``x + 1`` in place on a
    buffer of ``table``'s dtype, as large as the table or 128 MiB, whichever is larger (small
    copies measure launch overhead, not bandwidth; a fresh output would measure page faults).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> jaxembed.bench.copy_bandwidth(jnp.zeros((4, 2)), repeat=1) > 0
      True
    """
    n = max(table.size, 2**27 // table.dtype.itemsize)
    state = [jnp.zeros((n,), table.dtype)]
    copy = jax.jit(lambda w: w + 1, donate_argnums=0)  # in place: no fresh buffer to fault in
    nbytes = state[0].nbytes

    def step():
        state[0] = copy(state[0])
        return state[0]

    jax.block_until_ready(step())
    return bandwidth(2 * nbytes, median_ms(step, max(repeat, 3)))
