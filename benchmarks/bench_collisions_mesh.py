"""Managed collisions on a mesh: the remap's cost beside the sharded step, and against one device.

Row-wise tables of ``--slots`` slots, raw 64-bit ids (hashes of Zipf ranks), one remapper a
table. In one process, interleaved rounds, each step jitted with its state donated:

* ``mesh + remap``: ``ManagedCollisionCollection.remap(..., sharding=plan)`` (every device
  remaps the whole batch), then the sharded lookup and row-wise Adagrad update;
* ``mesh``: the same sharded lookup and update on ids remapped beforehand (no remap);
* ``one + remap``: the remap, lookup and update on one device.

Fake CPU devices share the machine's cores: the ratios show the sharded program's overhead and
the remap's share of it, not a speed-up. The remap replicates the whole batch's work on every
device, so its share grows with the device count.

    python benchmarks/bench_collisions_mesh.py              # 8 fake CPU devices
    python benchmarks/bench_collisions_mesh.py --devices 0  # every real device (GPUs)
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices; 0: the real ones")
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--slots", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096, help="the global batch")
    ap.add_argument("--pooling", type=int, default=4, help="ids a sample a table")
    ap.add_argument("--eviction", default="lru")
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--slack", type=float, default=1.25, help="capacity over the most seen")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.devices:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    import jax
    import numpy as np

    import jaxembed
    from jaxembed import sharding as S
    from jaxembed.collisions import (
        ManagedCollision,
        ManagedCollisionCollection,
        RawKeyedJagged,
        put_raw_features,
    )

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import median_ms

    k = args.devices or jax.device_count()
    mesh = jax.make_mesh((k,), ("x",), devices=jax.devices()[:k])
    tables = [
        jaxembed.EmbeddingBagConfig(f"t{i}", args.dim, args.slots, [f"f{i}"])
        for i in range(args.tables)
    ]
    plan = S.by_hand(tables, mesh, {t.name: S.row_wise() for t in tables})
    mcs = {t.name: ManagedCollision(args.eviction, args.interval) for t in tables}
    mcc = ManagedCollisionCollection(mcs, tables)
    local = args.batch // k
    capacity = 1 << (local * args.pooling * args.tables - 1).bit_length()
    per_call = args.batch * args.pooling
    tx = jaxembed.sparse.rowwise_adagrad(0.05)
    print(f"{jax.devices()[0].device_kind} x {k}; {args.tables} row-wise tables of {args.slots:,} "
          f"slots x {args.dim}; batch {args.batch}, {args.pooling} ids a sample a table; "
          f"{args.eviction} every {args.interval} calls")  # fmt: skip

    def batch(seed):
        """The whole batch and each device's block: Zipf ranks hashed to 63-bit ids."""
        rng = np.random.default_rng(seed)
        ranks = rng.zipf(1.1, (args.tables, args.batch, args.pooling)).astype(np.uint64)
        ids = ((ranks * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(1)).astype(np.int64)
        lists = {f"f{i}": [list(s) for s in ids[i]] for i in range(args.tables)}
        whole = RawKeyedJagged.from_lists(lists, capacity=capacity * k)
        blocks = [
            RawKeyedJagged.from_lists(
                {f: v[d * local : (d + 1) * local] for f, v in lists.items()}, capacity=capacity
            )
            for d in range(k)
        ]
        return whole, put_raw_features(blocks, plan)

    def loss(pooled):
        return sum((v * v).sum() for v in pooled.values())

    opt = S.optimizer(tx, plan)

    def mesh_step(p, st, mc, raw):
        kj, mc, _, _ = mcc.remap(mc, raw, sharding=plan)
        pooled, lk = S.lookup(p, kj, plan)
        return (*opt.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params), mc)

    def mesh_lookup_step(p, st, kj):
        pooled, lk = S.lookup(p, kj, plan)
        return opt.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params)

    one = jax.devices()[0]
    single_opt = jaxembed.collections.optimizer(tx, tables)

    def single_step(p, st, mc, raw):
        kj, mc, _, _ = mcc.remap(mc, raw)
        pooled, lk = jaxembed.collections.lookup(p, kj, tables)
        return (*single_opt.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params), mc)

    whole, raw = batch(0)
    whole = jax.device_put(whole, one)
    params = S.init(jax.random.key(0), plan)
    mc_mesh = jax.tree.map(plan.replicated, mcc.init(per_call))
    warm = jax.jit(lambda mc, r: mcc.remap(mc, r, sharding=plan).state)
    with jax.set_mesh(mesh):  # a warm state, and its remapped ids for the no-remap step
        for seed in range(1, 2 * args.interval):
            mc_mesh = warm(mc_mesh, batch(seed)[1])
        remapped = mcc.remap(mc_mesh, raw, sharding=plan, train=False).features
        # the routed groups' capacity, from a stats pass over other remapped batches
        samples = [
            mcc.remap(mc_mesh, batch(seed)[1], sharding=plan, train=False).features
            for seed in (101, 102, 103)
        ]
    plan = plan.with_capacity(S.capacity_for(plan, samples, slack=args.slack))
    opt = S.optimizer(tx, plan)
    print(f"capacity per (device, owner) pair, slack {args.slack}: {dict(plan.capacity)}; each "
          f"device holds {capacity} ids")  # fmt: skip
    single_params = jax.device_put(jaxembed.collections.init(jax.random.key(0), tables), one)
    mc_one = jax.device_put(jax.tree.map(np.asarray, mc_mesh), one)
    box = {
        "mesh+remap": (params, opt.init(params), mc_mesh),
        "mesh": (S.init(jax.random.key(0), plan), opt.init(params)),
        "one+remap": (single_params, single_opt.init(single_params), mc_one),
    }
    steps = {
        "mesh+remap": (jax.jit(mesh_step, donate_argnums=(0, 1, 2)), raw),
        "mesh": (jax.jit(mesh_lookup_step, donate_argnums=(0, 1)), remapped),
        "one+remap": (jax.jit(single_step, donate_argnums=(0, 1, 2)), whole),
    }

    def runner(name):
        fn, features = steps[name]

        def run():
            if name.startswith("mesh"):
                with jax.set_mesh(mesh):
                    box[name] = fn(*box[name], features)
            else:
                box[name] = fn(*box[name], features)
            jax.block_until_ready(box[name])

        return run

    for name in steps:  # a step's second call may compile again (its inputs now committed)
        runner(name)()
    ratios = {"remap share": [], "vs one": []}
    for r in range(args.rounds):
        t = {name: median_ms(runner(name), args.repeat) for name in steps}
        ratios["remap share"].append(t["mesh+remap"] / t["mesh"])
        ratios["vs one"].append(t["mesh+remap"] / t["one+remap"])
        print(f"round {r}: " + ", ".join(f"{n} {v:8.1f} ms" for n, v in t.items())
              + f"; mesh+remap / mesh {ratios['remap share'][-1]:.2f}, "
              f"mesh+remap / one+remap {ratios['vs one'][-1]:.2f}")  # fmt: skip
    for name, v in ratios.items():
        print(f"median {name}: {np.median(v):.2f}")


if __name__ == "__main__":
    main()
