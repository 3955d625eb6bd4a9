"""Bag reductions against torch's EmbeddingBag (FBGEMM on CPU) and a plain take(...).sum(1).

    python benchmarks/bench_bag.py [--vocab 1000000 --dim 128 --bags 4096 --bag-size 16]

Both layouts: 2-D indices (B, N), and 1-D indices with offsets (the same bags).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_ms  # benchmarks/ is on sys.path when run as a script

import jaxembed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bags", type=int, default=4096)
    ap.add_argument("--bag-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-device", default="cpu", help="where torch runs: cpu or cuda")
    args = ap.parse_args(argv)
    V, D, B, N, R = args.vocab, args.dim, args.bags, args.bag_size, args.repeat
    rng = np.random.default_rng(0)
    w_np = rng.normal(size=(V, D)).astype(np.float32)
    idx_np = rng.integers(0, V, size=(B, N)).astype(np.int32)
    params = {"weight": jnp.asarray(w_np)}
    idx2 = jnp.asarray(idx_np)
    idx1 = idx2.reshape(-1)
    offsets = jnp.arange(B, dtype=jnp.int32) * N
    res = {}

    def block(x):
        return jax.block_until_ready(x)

    take_sum = jax.jit(lambda w, i: jnp.take(w, i, axis=0).sum(1))
    res["jnp take(...).sum(1)"] = median_ms(lambda: block(take_sum(params["weight"], idx2)), R)
    for mode in ("sum", "mean", "max"):
        f2 = jax.jit(lambda p, i, m=mode: jaxembed.embedding_bag(p, i, mode=m)[0])
        res[f"jaxembed 2-D {mode}"] = median_ms(lambda f=f2: block(f(params, idx2)), R)
        f1 = jax.jit(lambda p, i, o, m=mode: jaxembed.embedding_bag(p, i, o, mode=m)[0])
        res[f"jaxembed offsets {mode}"] = median_ms(lambda f=f1: block(f(params, idx1, offsets)), R)
    psw = jnp.asarray(rng.normal(size=(B, N)).astype(np.float32))
    fw = jax.jit(lambda p, i, w: jaxembed.embedding_bag(p, i, mode="sum", per_sample_weights=w)[0])
    res["jaxembed 2-D sum + weights"] = median_ms(lambda: block(fw(params, idx2, psw)), R)

    if not args.no_torch:
        import torch

        dev = torch.device(args.torch_device)
        sync = torch.cuda.synchronize if dev.type == "cuda" else None
        tw = torch.from_numpy(w_np).to(dev)
        ti = torch.from_numpy(idx_np.astype(np.int64)).to(dev)
        with torch.no_grad():
            for mode in ("sum", "mean", "max"):
                bag = torch.nn.EmbeddingBag.from_pretrained(tw, mode=mode)
                res[f"torch EmbeddingBag {mode}"] = median_ms(lambda b=bag: b(ti), R, sync)

    print(
        f"V={V} D={D} bags={B}x{N} float32, median of {R}, "
        f"jax {jax.__version__} on {jax.devices()[0]}, {jaxembed.bench.kernels_path()}"
    )
    for name, ms in res.items():
        print(f"  {name:30s} {ms:8.2f} ms")
    moved = B * N * D * 4 + B * D * 4  # gathered rows read, bags written
    copy_bw = jaxembed.bench.copy_bandwidth(params["weight"], R)  # in place: no page faults
    bw = moved / (res["jaxembed 2-D sum"] / 1e3)
    print(
        f"roofline: copy bandwidth {copy_bw / 1e9:.1f} GB/s; 2-D sum moves {moved / 1e6:.1f} MB "
        f"at {bw / 1e9:.1f} GB/s = {bw / copy_bw:.0%} of it"
    )
    base = res["jnp take(...).sum(1)"]
    print("ratios (time / baseline):")
    for mode in ("sum", "mean", "max"):
        line = f"  {mode:4s}: 2-D {res[f'jaxembed 2-D {mode}'] / base:5.2f}x take.sum"
        line += f", offsets {res[f'jaxembed offsets {mode}'] / base:5.2f}x take.sum"
        if f"torch EmbeddingBag {mode}" in res:
            t = res[f"torch EmbeddingBag {mode}"]
            line += f"; vs torch: 2-D {res[f'jaxembed 2-D {mode}'] / t:5.2f}x"
            line += f", offsets {res[f'jaxembed offsets {mode}'] / t:5.2f}x"
        print(line)


if __name__ == "__main__":
    main()
