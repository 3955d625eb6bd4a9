"""Restoring a collection onto another plan (jaxembed.checkpoint.restore_tables) against restoring
it onto the plan it was saved under.

    python benchmarks/bench_reshard.py [--devices 8 --cap 200000 --dim 64 --rounds 3]

26 tables with Criteo's (Kaggle DAC) cardinalities capped at ``--cap`` rows, D = ``--dim``,
float32, with row-wise Adagrad state, planned by :func:`jaxembed.plan` on 8 fake CPU devices
and saved by :func:`jaxembed.checkpoint.save_tables`. Then, in interleaved rounds (each round
restores onto every target once, rotating who goes first), the time to restore onto: the same
plan; every table row-wise; every table table-wise (round robin); every table column-wise; a
4-device plan; one device (unsharded, stacked). Each restore is timed to ``block_until_ready``
and checked to equal the saved tables on its first round. The ratio to the same plan is what
to quote (fake devices share this machine's cores, so this is total work).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--cap", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    import jax
    import numpy as np

    import jaxembed
    from jaxembed import checkpoint
    from jaxembed import sharding as S

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from dlrm import CRITEO

    k = args.devices
    rows = [min(c, args.cap) for c in CRITEO]
    tables = [
        jaxembed.EmbeddingBagConfig(f"t{i}", args.dim, r, [f"cat_{i}"]) for i, r in enumerate(rows)
    ]
    tx = jaxembed.sparse.rowwise_adagrad(0.05)

    def mesh(n):
        return jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])

    source = jaxembed.plan(tables, mesh(k), optimizer=tx, batch_size=4096, pooling_factors=4.0)
    targets = {
        "same plan": source,
        "row_wise": S.by_hand(tables, mesh(k), {t.name: S.row_wise() for t in tables}),
        "table_wise": S.by_hand(
            tables, mesh(k), {t.name: S.table_wise(i % k) for i, t in enumerate(tables)}
        ),
        "column_wise": S.by_hand(tables, mesh(k), {t.name: S.column_wise() for t in tables}),
        f"{k // 2} devices": jaxembed.plan(
            tables, mesh(k // 2), optimizer=tx, batch_size=4096, pooling_factors=4.0
        ),
        "one device": tables,
    }
    print(
        f"{len(rows)} tables, {sum(rows):,} rows x {args.dim}, float32 + row-wise Adagrad; "
        f"saved under jaxembed.plan on {k} fake CPU devices; jax {jax.__version__}"
    )
    params = S.init(jax.random.key(0), source)
    state = S.optimizer(tx, source).init(params)
    want = S.tables_of(params, source)
    times = {name: [] for name in targets}
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        saved = checkpoint.save_tables(folder, 0, params, source, state=state)
        print(f"save: {time.perf_counter() - t0:.2f} s, {saved.nbytes / 1e6:.0f} MB")
        del params, state
        names = list(targets)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                layout = targets[name]
                t0 = time.perf_counter()
                back = checkpoint.restore_tables(folder, layout, tx=tx)
                jax.block_until_ready(back)
                times[name].append(time.perf_counter() - t0)
                if r == 0:
                    params = back[0]
                    got = (
                        S.tables_of(params, layout)
                        if isinstance(layout, S.ShardingPlan)
                        else jaxembed.collections.tables_of(params, layout)
                    )
                    assert all(np.array_equal(np.asarray(got[t]), want[t]) for t in want), name
                del back
    same = float(np.median(times["same plan"]))
    print(f"{'restore onto':<14} {'median s':>9} {'vs same plan':>13}")
    for name, ts in times.items():
        t = float(np.median(ts))
        print(f"{name:<14} {t:>9.2f} {t / same:>12.2f}x")


if __name__ == "__main__":
    main()
