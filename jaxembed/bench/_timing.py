"""How jaxembed-bench times: compiled once, warmed up, then timed in interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def interleaved_ms(cases: dict[str, Any], repeat: int) -> dict[str, float]:
    """Median ms of each case, timed in interleaved rounds (one call of each per round), so that
    a noisy neighbour slows every implementation alike and their ratios hold.

    Each round starts one case later than the last: torch's and FBGEMM's OpenMP threads spin for
    a while after their call, slowing whatever runs next, and the rotation spreads that evenly.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            case = cases[name]
            t0 = time.perf_counter()
            jax.block_until_ready(case())
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Case:
    """One implementation of one op: a jitted function, its arguments, and how it carries state."""

    def __init__(self, fn: Callable, args: tuple, *, carry: bool = False, donate: tuple = ()):
        self.fn = jax.jit(fn, donate_argnums=donate)
        self.args, self.carry = args, carry

    def compile_ms(self) -> float:
        """Compiles (trace, lower, XLA) and keeps the executable that the timed calls then run."""
        t0 = time.perf_counter()
        self.fn = self.fn.lower(*self.args).compile()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self):
        out = self.fn(*self.args)
        if self.carry:  # a training step: its first outputs are the next step's first inputs
            self.args = tuple(out[: len(out) - 1]) + self.args[len(out) - 1 :]
        return out
