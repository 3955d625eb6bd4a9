"""What returning an undonated table from ``jit`` costs: the README's "Donate what you hand on".

    python benchmarks/bench_donation.py [--vocab 1000000 --dim 128 --batch 65536 --repeat 15]

Each pattern runs the same lookup; they differ only in what the jitted function returns and
donates. Rounds are interleaved (one call of each per round) and the medians reported, with each
pattern's ratio to the plain lookup that returns only the rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxembed


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=65_536)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    V, D, N = args.vocab, args.dim, args.batch
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, N), jnp.int32)
    table = jax.random.normal(jax.random.key(0), (V, D))

    rows_only = jax.jit(lambda p, i: jaxembed.embedding(p, i)[0])
    with_params = jax.jit(lambda p, i: jaxembed.embedding(p, i)[::-1])
    with_params_donated = jax.jit(lambda p, i: jaxembed.embedding(p, i)[::-1], donate_argnums=0)
    renorm = jax.jit(lambda p, i: jaxembed.embedding(p, i, max_norm=1.0)[::-1])
    renorm_donated = jax.jit(
        lambda p, i: jaxembed.embedding(p, i, max_norm=1.0)[::-1], donate_argnums=0
    )

    # a module each: a call that is not donated replaces its module's table with fresh buffers
    ours, ours_donated = (jaxembed.Embedding(V, D, rngs=nnx.Rngs(0)) for _ in range(2))
    flax_embed, flax_donated = (nnx.Embed(V, D, rngs=nnx.Rngs(0)) for _ in range(2))
    module_call = nnx.jit(lambda m, i: m(i))
    module_call_donated = nnx.jit(lambda m, i: m(i), donate_argnums=0)

    state = {k: {"weight": table + 0} for k in ("donated", "renorm", "renorm_donated")}

    def carry(key, fn):
        def call():
            state[key], out = fn(state[key], ids)
            return out

        return call

    cases = {
        "jit, returns the rows only": lambda: rows_only({"weight": table}, ids),
        "jit, returns (params, rows), params not donated": lambda: with_params(
            {"weight": table}, ids
        ),
        "jit, returns (params, rows), params donated": carry("donated", with_params_donated),
        "jit, max_norm, new params not donated": lambda: renorm(state["renorm"], ids),
        "jit, max_norm, new params donated": carry("renorm_donated", renorm_donated),
        "nnx.jit, jaxembed.Embedding, not donated": lambda: module_call(ours, ids),
        "nnx.jit, jaxembed.Embedding, donate_argnums=0": lambda: module_call_donated(
            ours_donated, ids
        ),
        "nnx.jit, flax nnx.Embed, not donated": lambda: module_call(flax_embed, ids),
        "nnx.jit, flax nnx.Embed, donate_argnums=0": lambda: module_call_donated(flax_donated, ids),
    }
    for fn in cases.values():
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = {k: [] for k in cases}
    for _ in range(args.repeat):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["jit, returns the rows only"])
    print(f"V={V:,} D={D} batch={N:,} on {jax.devices()[0].device_kind}; medians of {args.repeat}")
    print(f"{'pattern':52s} {'ms':>9s} {'vs rows only':>13s}")
    for k, ts in times.items():
        ms = statistics.median(ts)
        print(f"{k:52s} {ms:9.2f} {ms / base:12.1f}x")


if __name__ == "__main__":
    main()
