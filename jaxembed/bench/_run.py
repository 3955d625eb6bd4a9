"""One run of jaxembed-bench at one configuration: every implementation of every op timed, and
set against the roofline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed
from jaxembed.bench import _baselines
from jaxembed.bench._cases import DTYPES, LR, baseline, jax_cases
from jaxembed.bench._ids import make_ids
from jaxembed.bench._roofline import bandwidth, copy_bandwidth, op_bytes
from jaxembed.bench._timing import interleaved_ms


def kernels_path() -> str:
    """Which path jaxembed's CPU ops run here, for a benchmark's header: the kernels and their
    instruction set, or the pure-JAX path and why (:mod:`jaxembed.kernels`).

    Example:
      >>> import jaxembed
      >>> jaxembed.bench.kernels_path().startswith(("CPU kernels", "pure-JAX path"))
      True
    """
    if jaxembed.kernels.available():
        return f"CPU kernels ({jaxembed.kernels.status()})"
    return f"pure-JAX path ({jaxembed.kernels.status()})"


def peak_memory(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats (CPU) raise or return None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run(config: dict[str, Any], ops: list[str], progress: Callable[[str], None] | None = None):
    """Times every implementation of every op at one configuration.

    Returns ``(results, copy_bandwidth, skipped)``: a dict per (op, implementation), the measured
    copy bandwidth in bytes/s, and ``(op, baseline, why)`` for each baseline left out.
    """
    V, D, N = config["vocab"], config["dim"], config["batch"]
    bag_size = config["bag_size"]
    dtype = DTYPES[config["dtype"]]
    device = jax.devices(config["backend"])[0] if config["backend"] else jax.devices()[0]
    rng = np.random.default_rng(0)
    with jax.default_device(device):
        table = jax.jit(lambda k: jax.random.normal(k, (V, D), dtype))(jax.random.key(0))
        ids_np = make_ids(config["ids"], V, N, rng)
        unique = len(np.unique(ids_np))
        bags_np = ids_np[: (N // bag_size) * bag_size].reshape(-1, bag_size)
        cot_np = rng.normal(size=(N, D)).astype(np.float32)
        bag_target_np = cot_np[: bags_np.shape[0]].copy()
        ids, bags = jnp.asarray(ids_np), jnp.asarray(bags_np)
        cot, target = jnp.asarray(cot_np, dtype), jnp.asarray(cot_np)
        bag_target = jnp.asarray(bag_target_np)
        copy_bw = copy_bandwidth(table, config["repeat"])
        table_np = np.asarray(table) if config["torch"] else None
        results, skipped = [], []
        for op in ops:
            cases: dict[str, Any] = jax_cases(op, table, ids, bags, cot, target, bag_target)
            if table_np is not None:
                found, missing = _baselines.cases(
                    op,
                    table_np,
                    ids_np,
                    bags_np,
                    cot_np,
                    bag_target_np,
                    "cuda" if device.platform == "gpu" else "cpu",
                    LR,
                )
                cases.update(found)
                skipped += [(op, name, why) for name, why in missing.items()]
            compile_ms = {}
            for name, case in cases.items():
                if progress is not None:
                    progress(f"{op} / {name}")
                compile_ms[name] = case.compile_ms()
                for _ in range(3):  # warm-up: the first calls fault in fresh pages
                    jax.block_until_ready(case())
            times = interleaved_ms(cases, config["repeat"])
            del cases
            nbytes = op_bytes(op, V, D, N, jnp.dtype(dtype).itemsize, bag_size)
            base = times.get(baseline(op))
            for name, ms in times.items():
                results.append(
                    dict(
                        op=op,
                        impl=name,
                        ms=ms,
                        compile_ms=compile_ms[name],
                        bytes=nbytes,
                        gbps=bandwidth(nbytes, ms) / 1e9,
                        fraction=bandwidth(nbytes, ms) / copy_bw,
                        peak_bytes=peak_memory(device),
                        vs_baseline=None if base is None else ms / base,
                        baseline=baseline(op) if base is not None else None,
                        ids=config["ids"],
                        unique_ids=unique,
                        **{k: config[k] for k in ("vocab", "dim", "batch", "dtype")},
                    )
                )
    return results, copy_bw, skipped
