"""Timing shared by the benchmark scripts: the median of repeated calls after a warm-up."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeat, sync=None):
    """Median wall time of ``fn()`` in ms, after one untimed call (which compiles).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called after each call, inside the timing.
    """

    def call():
        fn()
        if sync is not None:
            sync()

    call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
