"""Quantized bags: an 8-, 4- and 2-bit bag-sum against the f32 bag and torch's quantized bags.

    python benchmarks/bench_quantized.py [--vocab 1000000 --dim 128 --bags 4096 --bag-size 32]

In one process, interleaved rounds, uniform and Zipf ids: jaxembed's ``embedding_bag`` on the
float32 table and on ``jaxembed.quantize(table, bits)``, and torch's
``quantized::embedding_bag_{byte,4bit,2bit}_rowwise_offsets`` on the same bytes (FBGEMM's CPU
kernels). Also the tables' bytes per row, measured, and each quantized bag's bytes (rows read,
bags written) per second against the device's copy bandwidth (the byte roofline), measured in
the same process. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_ms  # benchmarks/ is on sys.path when run as a script

import jaxembed

OPS = {8: "byte", 4: "4bit", 2: "2bit"}


def zipf_ids(rng, vocab, n, a=1.1):
    ids = rng.zipf(a, size=n) - 1
    return (rng.permutation(vocab)[ids % vocab]).astype(np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bags", type=int, default=4096)
    ap.add_argument("--bag-size", type=int, default=32)
    ap.add_argument("--bits", default="8,4,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    V, D, B, N = args.vocab, args.dim, args.bags, args.bag_size
    bits_list = [int(b) for b in args.bits.split(",")]
    rng = np.random.default_rng(0)
    w_np = rng.normal(size=(V, D)).astype(np.float32)
    params = {"weight": jnp.asarray(w_np)}
    tables = {b: jaxembed.quantize(params, bits=b) for b in bits_list}
    for b, q in tables.items():
        print(f"{b}-bit: {q.nbytes / V:.1f} bytes per row in memory (f32: {4 * D})")
    offsets = np.arange(B, dtype=np.int32) * N
    ids = {"uniform": rng.integers(0, V, B * N).astype(np.int32), "zipf": zipf_ids(rng, V, B * N)}

    bag = jax.jit(lambda t, i, o: jaxembed.embedding_bag(t, i, o, mode="sum")[0])
    cases = {}
    for dist, i_np in ids.items():
        i, o = jnp.asarray(i_np), jnp.asarray(offsets)
        cases[(dist, "f32")] = lambda i=i, o=o: jax.block_until_ready(bag(params, i, o))
        for b, q in tables.items():
            cases[(dist, f"{b}-bit")] = lambda q=q, i=i, o=o: jax.block_until_ready(bag(q, i, o))
        if not args.no_torch:
            import torch

            wt = torch.from_numpy(w_np)
            it = torch.from_numpy(i_np.astype(np.int64))
            ot = torch.from_numpy(offsets.astype(np.int64))
            for b in bits_list:
                packed = getattr(torch.ops.quantized, f"embedding_bag_{OPS[b]}_prepack")(wt)
                op = getattr(torch.ops.quantized, f"embedding_bag_{OPS[b]}_rowwise_offsets")
                cases[(dist, f"torch {b}-bit")] = lambda op=op, p=packed, i=it, o=ot: op(p, i, o)
            cases[(dist, "torch f32")] = lambda i=it, o=ot, w=wt: torch.nn.functional.embedding_bag(
                i, w, o, mode="sum"
            )
    times = {k: [] for k in cases}
    for _ in range(args.rounds):  # interleaved: every case once per round
        for k, fn in cases.items():
            times[k].append(median_ms(fn, args.repeat))
    # the byte roofline: the device's copy bandwidth (read + write), measured in this process in
    # place (a copy into a fresh buffer measured its page faults: 1 GB/s here, not 46)
    bandwidth = jaxembed.bench.copy_bandwidth(params["weight"], args.repeat)
    kind = jax.devices()[0].device_kind
    print(f"{kind}; V={V:,} D={D} bags={B} x {N}; medians of {args.rounds} rounds; "
          f"{jaxembed.bench.kernels_path()}")  # fmt: skip
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    for dist in ids:
        f32 = statistics.median(times[(dist, "f32")])
        print(f"\n{dist}: jaxembed f32 bag {f32:.2f} ms")
        for b in bits_list:
            t = statistics.median(times[(dist, f"{b}-bit")])
            moved = B * N * tables[b].data.shape[1] + B * D * 4  # rows read, bags written
            line = f"  {b}-bit {t:.2f} ms: f32 / {b}-bit = {f32 / t:.2f}x"
            line += f", {moved / (t * 1e-3) / bandwidth:.0%} of the copy bandwidth"
            if not args.no_torch:
                tt = statistics.median(times[(dist, f"torch {b}-bit")])
                line += f"; torch {b}-bit {tt:.2f} ms, torch / jaxembed = {tt / t:.2f}x"
            print(line)
        if not args.no_torch:
            tf = statistics.median(times[(dist, "torch f32")])
            print(f"  torch f32 bag {tf:.2f} ms: torch f32 / jaxembed f32 = {tf / f32:.2f}x")


if __name__ == "__main__":
    main()
