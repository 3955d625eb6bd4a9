"""Serving latency: an exported artifact (jaxembed.serving) against the live jitted model.

    python benchmarks/bench_serving.py [--cap 100000 --dim 64 --batches 1,64,512,4096]
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/...

The model is a DLRM's sparse part: 26 tables with Criteo's (Kaggle DAC) cardinalities capped at
``--cap`` rows, one feature each, D = ``--dim``, float32, 1-32 ids a bag (Zipf lengths), Zipf
ids; its forward pass pools every feature and concatenates them, ``(B, 26 * D)``. Three ways to
serve it, each called on the same request batches:

  * live: ``jax.jit`` of the training code's forward pass (on the CPU kernels, where built);
  * artifact: ``jaxembed.serving.export`` on the pure-JAX path, saved and loaded back (what a
    process without jaxembed runs);
  * artifact+kernels: ``export(..., kernels=True)``, saved and loaded back (the same program as
    live, through the StableHLO).

Each batch size compiles once (one artifact serves them all). Requests are timed one at a time,
to ``block_until_ready``, in interleaved rounds (each round calls the three once, rotating who
goes first); p50 and p99 are over the rounds. The ratio to live is what to quote.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed

# the 26 cardinalities the DLRM example trains on (benchmarks/bench_collection_mesh.py does the
# same)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from dlrm import CRITEO


def requests(rows, batch, n, rng):
    """``n`` request batches of ``batch`` samples: (values padded to a power of two, lengths)."""
    out = []
    for _ in range(n):
        lengths = np.minimum(rng.zipf(1.3, (len(rows), batch)), 32)
        values = np.concatenate(
            [(rng.zipf(1.1, int(n_.sum())) - 1) % r for r, n_ in zip(rows, lengths, strict=True)]
        )
        capacity = 1 << max(int(len(values) - 1).bit_length(), 0)
        padded = np.zeros(capacity, np.int32)
        padded[: len(values)] = values
        out.append((jnp.asarray(padded), jnp.asarray(lengths.reshape(-1), jnp.int32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batches", default="1,64,512,4096")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    rows = [min(c, args.cap) for c in CRITEO]
    keys = tuple(f"cat_{i}" for i in range(len(rows)))
    tables = [
        jaxembed.EmbeddingBagConfig(f"t{i}", args.dim, r, [k])
        for i, (r, k) in enumerate(zip(rows, keys, strict=True))
    ]
    params = jaxembed.collections.init(jax.random.key(0), tables)

    def forward(params, values, lengths):
        features = jaxembed.KeyedJagged.from_lengths(keys, values, lengths)
        pooled, _ = jaxembed.embedding_bag_collection(params, features, tables)
        return jaxembed.collections.concat_pooled(pooled, tables)

    b, c = jaxembed.serving.symbolic_shape("b, c")
    specs = (
        jax.ShapeDtypeStruct((c,), jnp.int32),
        jax.ShapeDtypeStruct((len(keys) * b,), jnp.int32),
    )
    served = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kernels in (("artifact", False), ("artifact+kernels", True)):
            if kernels and not jaxembed.kernels.available():
                continue
            jaxembed.serving.export(forward, params, *specs, kernels=kernels).save(f"{tmp}/{name}")
            served[name] = jaxembed.serving.load(f"{tmp}/{name}")
    live = jax.jit(forward)
    ways = {"live": lambda v, n: live(params, v, n), **served}
    print(
        f"26 tables capped at {args.cap:,} rows, D={args.dim}, float32; jax {jax.__version__}; "
        f"{jaxembed.bench.kernels_path()}; {jaxembed.bench._report.machine(jax.devices()[0])}"
    )
    print(f"{'batch':>6} {'way':<17} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p50 / live':>10}")
    rng = np.random.default_rng(0)
    for batch in (int(x) for x in args.batches.split(",")):
        reqs = requests(rows, batch, args.rounds, rng)
        # one capacity per batch size here: the largest, so each way compiles once
        cap = max(len(v) for v, _ in reqs)
        reqs = [(jnp.pad(v, (0, cap - len(v))), n) for v, n in reqs]
        for way in ways.values():
            for v, n in reqs[:3]:
                jax.block_until_ready(way(v, n))
        times = {name: [] for name in ways}
        names = list(ways)
        for r, (v, n) in enumerate(reqs):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                jax.block_until_ready(ways[name](v, n))
                times[name].append((time.perf_counter() - t0) * 1e3)
        p50_live = float(np.percentile(times["live"], 50))
        for name, ts in times.items():
            p50, p99 = np.percentile(ts, 50), np.percentile(ts, 99)
            print(
                f"{batch:>6} {name:<17} {p50:>8.3f} {p99:>8.3f} {1e3 * batch / p50:>8.0f} "
                f"{p50 / p50_live:>9.2f}x"
            )


if __name__ == "__main__":
    main()
