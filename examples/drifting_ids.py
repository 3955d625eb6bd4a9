"""Unbounded, drifting 64-bit ids on a fixed table: managed collisions against ``id % V``.

A stream of hashed 64-bit ids, Zipf-distributed, whose popular set drifts: every step the
ranking moves ``--drift`` ids down the universe, so yesterday's head becomes the tail and new ids
keep arriving. Each id has a fixed target (a teacher's random score); the model learns a row per
id whose sum predicts it (mean squared error), trained with row-wise Adagrad.

Two tables of ``--slots`` rows learn the same stream:

* **managed collisions** (``jaxembed.ManagedCollision``, distance-LFU by default): each held id
  gets a row of its own; every ``--interval`` steps the least useful ids are evicted and their
  rows (and Adagrad state) reset; ids not held share the miss row;
* **hashing**, ``id % slots``: every id gets a row, shared with every id of the same remainder.

    python examples/drifting_ids.py                 # ~1 minute on 2 CPU cores
    python examples/drifting_ids.py --steps 2000 --slots 20000

It prints each table's loss, the managed table's hit rate (the share of ids held) and its
evictions, and plots them.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed
from jaxembed.collisions import ManagedCollision, RawIds, raw_ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--universe", type=int, default=200_000)
    ap.add_argument("--drift", type=int, default=20, help="ids the ranking moves a step")
    ap.add_argument("--interval", type=int, default=5, help="steps between evictions")
    ap.add_argument("--eviction", default="distance_lfu", choices=["lfu", "lru", "distance_lfu"])
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--plot", default="drifting_ids.png")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    # the universe: distinct 63-bit hashes, and each one's target
    universe = np.unique(rng.integers(0, 2**63 - 1, size=args.universe, dtype=np.int64))
    rng.shuffle(universe)
    target_of = rng.standard_normal(universe.size).astype(np.float32)

    def batch(step):
        rank = np.minimum(rng.zipf(1.1, args.batch) - 1, universe.size - 1)
        at = (rank + step * args.drift) % universe.size
        return universe[at], target_of[at]

    opt = jaxembed.sparse.rowwise_adagrad(args.lr)
    mc = ManagedCollision(args.eviction, args.interval)

    def train(table, opt_state, rows_idx, target):
        rows, lk = jaxembed.sparse.lookup({"weight": table}, rows_idx)
        loss, g = jax.value_and_grad(lambda r: jnp.mean((r.sum(-1) - target) ** 2))(rows)
        table, opt_state = opt.update(lk.grad(g), opt_state, lk.params["weight"])
        return table, opt_state, loss

    @jax.jit
    def managed_step(mc_state, table, opt_state, hi, lo, target, key):
        out = mc.remap(mc_state, RawIds(hi, lo))
        table = jaxembed.collisions.reset_rows(out.evicted, table, key, init=_small)
        opt_state = jaxembed.collisions.reset_state(out.evicted, opt_state, opt, table)
        table, opt_state, loss = train(table, opt_state, out.slots, target)
        hit = jnp.mean(out.slots != args.slots - 1)
        return out.state, table, opt_state, loss, hit, out.num_evicted

    @jax.jit
    def hashed_step(table, opt_state, rows_idx, target):
        return train(table, opt_state, rows_idx, target)

    table0 = _small(jax.random.key(0), (args.slots, args.dim), jnp.float32)
    managed = [mc.init(args.slots, args.batch), table0, opt.init(table0)]
    hashed = [table0, opt.init(table0)]
    history = {"managed": [], "hashed": [], "hit": [], "evicted": []}
    for step in range(args.steps):
        ids, target = batch(step)
        pairs = raw_ids(ids)
        *managed, loss, hit, evicted = managed_step(
            *managed, pairs.hi, pairs.lo, target, jax.random.key(step + 1)
        )
        hashed_rows = (ids % args.slots).astype(np.int32)  # id % V: collisions
        *hashed, hashed_loss = hashed_step(*hashed, hashed_rows, target)
        for name, value in (("managed", loss), ("hashed", hashed_loss), ("hit", hit),
                            ("evicted", evicted)):  # fmt: skip
            history[name].append(float(value))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss managed {loss:.3f}  hashed {hashed_loss:.3f}  "
                  f"hit rate {hit:.2f}  evicted {int(evicted)}")  # fmt: skip
    tail = max(1, args.steps // 5)
    summary = {k: float(np.mean(v[-tail:])) for k, v in history.items()}
    print(f"last {tail} steps: loss managed {summary['managed']:.3f}, hashed "
          f"{summary['hashed']:.3f}; hit rate {summary['hit']:.2f}; "
          f"{summary['evicted']:.0f} slots evicted a step")  # fmt: skip
    if args.plot:
        _plot(history, args.plot)
    return history


def _small(key, shape, dtype):
    return 0.01 * jax.random.normal(key, shape, dtype)


def _plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("managed", "hashed"):
        a.plot(np.convolve(history[name], np.ones(20) / 20, mode="valid"), label=name)
    a.set(xlabel="step", ylabel="loss (20-step mean)", title="managed collisions vs id % V")
    a.legend()
    b.plot(history["hit"], label="hit rate")
    b2 = b.twinx()
    b2.plot(history["evicted"], color="tab:red", alpha=0.5, label="evicted")
    b.set(xlabel="step", ylabel="hit rate", title="managed table")
    b2.set(ylabel="slots evicted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
