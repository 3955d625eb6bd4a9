"""Delta checkpoints (jaxembed.checkpoint): bytes and time of a delta against a full checkpoint.

    python benchmarks/bench_checkpoint.py [--cap 1000000 --dim 32 --batch 256]

The model is a DLRM's sparse part: 26 tables with Criteo's (Kaggle DAC) cardinalities capped at
``--cap`` rows, one feature each, D = ``--dim``, float32, an ``EmbeddingBagCollection(sparse=True)``
trained by row-wise Adagrad (so a table row and one state entry per row change together); 1-32
ids a bag (Zipf lengths); ids uniform or Zipf(1.1). A :class:`jaxembed.checkpoint.DeltaTracker`
marks the rows each jitted step updates. After a full checkpoint, the loop saves a delta every
``k`` steps (k = 1, 10, 100), and prints, per delta: the share of rows it holds, its bytes and its
save time against the full checkpoint's. Then it restores the newest step (the full checkpoint
plus the chain of deltas) and checks it equals the live state, bit for bit, and times that restore
against restoring the full checkpoint alone. The bytes are what is on disk (arrays and manifest).
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
import optax
from flax import nnx

import jaxembed
from jaxembed import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from dlrm import CRITEO


def batches(rows, batch, n, rng, dist):
    keys = tuple(f"cat_{i}" for i in range(len(rows)))
    out = []
    for _ in range(n):
        lengths = np.minimum(rng.zipf(1.3, (len(rows), batch)), 32)
        values = np.concatenate(
            [
                (rng.zipf(1.1, int(n_.sum())) - 1) % r
                if dist == "zipf"
                else rng.integers(0, r, int(n_.sum()))
                for r, n_ in zip(rows, lengths, strict=True)
            ]
        )
        cap = 32 * len(rows) * batch  # the most a batch can hold: one capacity, one compile
        padded = np.zeros(cap, np.int32)
        padded[: len(values)] = values
        out.append(
            jaxembed.KeyedJagged.from_lengths(
                keys, jnp.asarray(padded), jnp.asarray(lengths.reshape(-1), jnp.int32)
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--intervals", default="1,10,100")
    args = ap.parse_args()
    rows = [min(c, args.cap) for c in CRITEO]
    tables = [
        jaxembed.EmbeddingBagConfig(f"t{i}", args.dim, r, [f"cat_{i}"]) for i, r in enumerate(rows)
    ]
    print(
        f"26 tables capped at {args.cap:,} rows ({sum(rows):,} rows), D={args.dim}, float32, "
        f"rowwise_adagrad, batch {args.batch}; jax {jax.__version__}"
    )
    print(
        f"{'ids':<8} {'every':>5} {'rows held':>10} {'delta MB':>9} {'full MB':>8} "
        f"{'bytes':>7} {'save time':>9}"
    )
    for dist in ("uniform", "zipf"):
        model = jaxembed.EmbeddingBagCollection(tables, rngs=nnx.Rngs(0), sparse=True)
        opt = jaxembed.sparse.Optimizer(
            model, optax.sgd(0.0), jaxembed.sparse.rowwise_adagrad(0.05)
        )
        tracker = checkpoint.DeltaTracker(model)

        @nnx.jit
        def step(model, opt, tracker, features):
            def loss_fn(ebc):
                return sum(jnp.mean(v**2) for v in ebc(features).values())

            loss, grads = jaxembed.sparse.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            tracker.update(grads)
            return loss

        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            full = checkpoint.save(folder, 0, nnx.state((model, opt)))
            t_full = time.perf_counter() - t0
            done = 0
            for every in (int(k) for k in args.intervals.split(",")):
                for _ in range(every):  # a new batch every step
                    step(model, opt, tracker, batches(rows, args.batch, 1, rng, dist)[0])
                done += every
                jax.block_until_ready(nnx.state(model))
                held = sum(int(mask.sum()) for mask in tracker.touched.values())
                t0 = time.perf_counter()
                delta = checkpoint.save(folder, done, nnx.state((model, opt)), tracker.touched)
                t_delta = time.perf_counter() - t0
                tracker.clear()
                print(
                    f"{dist:<8} {every:>5} {held / sum(rows):>9.2%} {delta.nbytes / 1e6:>9.2f} "
                    f"{full.nbytes / 1e6:>8.1f} {delta.nbytes / full.nbytes:>6.2%} "
                    f"{t_delta / t_full:>8.3f}x"
                )
            like = nnx.state((model, opt))
            t0 = time.perf_counter()
            back = checkpoint.restore(folder, like)
            t_chain = time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint.restore(folder, like, step=0)
            t_one = time.perf_counter() - t0
            same = all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(like), strict=True)
            )
            print(
                f"{dist:<8} restore of the full checkpoint + {len(args.intervals.split(','))} "
                f"deltas: {t_chain / t_one:.2f}x the full one alone; equals the live state: {same}"
            )


if __name__ == "__main__":
    main()
