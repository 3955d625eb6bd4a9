"""The ids a benchmark looks up: uniform, or Zipf-distributed as real traffic is."""

from __future__ import annotations

import numpy as np


def make_ids(spec: str, vocab: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` int32 ids in ``[0, vocab)`` drawn as ``spec`` says.

    * ``"uniform"``: every row equally likely.
    * ``"zipf:ALPHA"``: heavy-tailed, as real traffic is: the row of rank ``k`` (from 0) is drawn
      with probability proportional to ``1 / (k + 1) ** ALPHA`` (any ``ALPHA > 0``: a finite
      vocabulary needs no ``ALPHA > 1``), and the ranks sit at random rows of the table.

    Example:
      >>> import numpy as np
      >>> from jaxembed import bench
      >>> ids = bench.make_ids("zipf:1.15", 1000, 10_000, np.random.default_rng(0))
      >>> ids.dtype, int(ids.min()) >= 0, int(ids.max()) < 1000, len(np.unique(ids)) < 1000
      (dtype('int32'), True, True, True)
    """
    kind, alpha = parse_ids(spec)
    if kind == "uniform":
        return rng.integers(0, vocab, n).astype(np.int32)
    cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -alpha)
    ranks = np.searchsorted(cdf, rng.uniform(0, cdf[-1], n), side="right")
    rows = rng.permutation(vocab)
    return rows[np.minimum(ranks, vocab - 1)].astype(np.int32)


def parse_ids(spec: str) -> tuple[str, float]:
    """``("uniform", 0.0)`` or ``("zipf", ALPHA)`` from ``--ids``; ``ValueError`` otherwise."""
    if spec == "uniform":
        return "uniform", 0.0
    kind, _, alpha = spec.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = float("nan")
    if kind != "zipf" or not value > 0:
        raise ValueError(f"ids must be 'uniform' or 'zipf:ALPHA' with ALPHA > 0, got {spec!r}")
    return "zipf", value
