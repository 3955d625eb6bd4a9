"""A planned collection on a mesh: memory per device, bytes moved per step, and step time.

Criteo-shaped DLRM tables (26, capped), Zipf ids, placed by ``jaxembed.plan`` over the devices.
In one process it reports:

* each device's bytes of tables and optimizer state, against the plan's estimate;
* the bytes every collective of the lookup and of the gradient exchanges, read off the compiled
  HLO, against ``jaxembed.sharding.step_bytes``;
* the sparse training step's time on the mesh against the same collection on one device,
  interleaved rounds, donated. Fake CPU devices share the machine's cores: this measures the
  sharded program's overhead, not a speed-up.

    python benchmarks/bench_collection_mesh.py                # 8 fake CPU devices
    python benchmarks/bench_collection_mesh.py --devices 0    # every real device (GPUs)
    python benchmarks/bench_collection_mesh.py --replicas 2   # a 2-D mesh: 2 replicas x 4
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices; 0: the real ones")
    ap.add_argument("--batch", type=int, default=4096, help="the global batch")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--cap", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--slack", type=float, default=1.25, help="capacity over the most seen")
    ap.add_argument("--replicas", type=int, default=1,
                    help="a 2-D mesh: R replicas x devices / R along the model axis")  # fmt: skip
    ap.add_argument("--by-kind", action="store_true", help="also time every table one kind")
    ap.add_argument("--weak", action="store_true", help="also K = 1..8, per-device batch fixed")
    args = ap.parse_args(argv)
    if args.devices:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    import jax
    import numpy as np
    from jax.sharding import AxisType

    import jaxembed
    from jaxembed import sharding as S

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from _timing import median_ms
    from dlrm import CRITEO

    k = args.devices or jax.device_count()
    replica, r = ("replica", args.replicas) if args.replicas > 1 else (None, 1)
    if k % r:
        raise SystemExit(f"--replicas {r} must divide the {k} devices")
    shape, names = ((r, k // r), ("replica", "x")) if replica else ((k,), ("x",))
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:k])  # fmt: skip
    rows = [min(c, args.cap) for c in CRITEO]
    tables = [jaxembed.EmbeddingBagConfig(f"t{i}", args.dim, r, [f"cat_{i}"])
              for i, r in enumerate(rows)]  # fmt: skip
    tx = jaxembed.sparse.rowwise_adagrad(0.05)
    plan = jaxembed.plan(tables, mesh, optimizer=tx, batch_size=args.batch, pooling_factors=4.0,
                         replica=replica)  # fmt: skip
    print(f"{jax.devices()[0].device_kind} x {k}; {len(rows)} tables, {sum(rows):,} rows x "
          f"{args.dim}; batch {args.batch}")  # fmt: skip
    print(plan)

    local = args.batch // k

    def batch(seed, capacity=None, k=k):
        """The global batch of ``k * local`` samples, and each device's block of ``capacity``
        ids (default: the fullest block's, to a power of two)."""
        rng = np.random.default_rng(seed)
        lists = {}
        for i, r in enumerate(rows):
            lengths = np.minimum(rng.zipf(1.5, k * local), 8)
            ids = (rng.zipf(1.1, int(lengths.sum())) - 1) % r
            lists[f"cat_{i}"] = [list(b) for b in np.split(ids, np.cumsum(lengths)[:-1])]
        if capacity is None:
            capacity = max(sum(len(b) for v in lists.values() for b in v[d * local:(d + 1) * local])
                           for d in range(k))  # fmt: skip
            capacity = 1 << (capacity - 1).bit_length()
        whole = jaxembed.KeyedJagged.from_lists(lists, capacity=capacity * k)
        blocks = [
            jaxembed.KeyedJagged.from_lists(
                {f: v[d * local : (d + 1) * local] for f, v in lists.items()}, capacity=capacity
            )
            for d in range(k)
        ]
        return whole, blocks, capacity

    whole, blocks, capacity = batch(0)
    features = S.put_features(blocks, plan)
    # the routed groups' capacity, from a stats pass over other batches of the same stream
    samples = [S.put_features(batch(seed, capacity)[1], plan) for seed in (1, 2, 3)]

    def routed(p, samples=samples):
        return p.with_capacity(S.capacity_for(p, samples, slack=args.slack))

    plan = routed(plan)
    print(f"capacity per (device, owner) pair, slack {args.slack}: {dict(plan.capacity)}; each "
          f"device holds {capacity} ids")  # fmt: skip

    # memory: each device's bytes of tables and state, against the plan's estimate
    params = S.init(jax.random.key(0), plan)
    opt = S.optimizer(tx, plan)
    state = opt.init(params)
    held = {}
    for leaf in jax.tree.leaves((params, state)):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    held = np.array([held[d.id] for d in mesh.devices.reshape(-1)])
    estimate = np.tile(np.array(plan.memory(tx)), r)  # each replica holds the plan's blocks
    once = sum(
        S._placement.block_bytes(t.num_embeddings, t.embedding_dim, t.param_dtype, tx)
        for t in tables
    )
    print(
        f"memory per device: held / plan estimate = {(held / estimate).min():.3f} .. "
        f"{(held / estimate).max():.3f}; max {held.max() / 2**20:.1f} MiB, mean "
        f"{held.mean() / 2**20:.1f} MiB (all tables and state once: "
        f"{once / 2**20:.1f} MiB)"
    )

    # communication: the compiled programs' collectives against the plan's statement
    stated = S.step_bytes(plan, features)
    weights = tuple(params[g.name]["weight"] for g in plan.groups)
    with jax.set_mesh(mesh):
        hlo = S._collection._collection.lower(weights, features, plan=plan, sparse=True)
        seen = S.collective_bytes(hlo.compile().as_text())
        _, lk = S.lookup(params, features, plan)
        cot = {f: np.ones((args.batch, args.dim), np.float32) for f in features.keys}
        grad_hlo = S._collection._grads.lower(cot, lk.pieces, plan=plan, keys=features.keys)
        grad_seen = S.collective_bytes(grad_hlo.compile().as_text())
    for what, plan_bytes, hlo_bytes in (("lookup", stated["lookup"], seen),
                                        ("grad", stated["grad"], grad_seen)):  # fmt: skip
        for op in sorted(set(plan_bytes) | set(hlo_bytes)):
            a, b = plan_bytes.get(op, 0), hlo_bytes.get(op, 0)
            print(
                f"  {what:6s} {op:15s} plan {a / 2**20:8.3f} MiB  HLO {b / 2**20:8.3f} MiB  "
                f"ratio {b / a if a else float('nan'):.3f}"
            )

    # the step: sharded on the mesh vs the same collection on one device
    def loss(pooled):
        return sum((v * v).sum() for v in pooled.values())

    def sharded_step(p, st, features):
        pooled, lk = S.lookup(p, features, plan)
        return opt.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params)

    one = jax.devices()[0]
    single_params = jax.device_put(jaxembed.collections.init(jax.random.key(0), tables), one)
    single_opt = jaxembed.collections.optimizer(tx, tables)
    single_state = single_opt.init(single_params)
    whole = jax.device_put(whole, one)

    def single_step(p, st, features):
        pooled, lk = jaxembed.collections.lookup(p, features, tables)
        return single_opt.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params)

    sharded_jit = jax.jit(sharded_step, donate_argnums=(0, 1))
    single_jit = jax.jit(single_step, donate_argnums=(0, 1))
    # peak memory: the compiled step's per-device program (arguments, temporaries, outputs not
    # aliased to a donated argument), against the plan's estimate of the tables and state
    with jax.set_mesh(mesh):
        stats = sharded_jit.lower(params, state, features).compile().memory_analysis()
    peak = stats.peak_memory_in_bytes or (
        stats.argument_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )
    print(
        f"peak memory per device (compiled step): {peak / 2**20:.1f} MiB = "
        f"{peak / estimate.max():.2f}x the plan's estimate of tables and state "
        f"({estimate.max() / 2**20:.1f} MiB); temporaries {stats.temp_size_in_bytes / 2**20:.1f} "
        f"MiB, arguments {stats.argument_size_in_bytes / 2**20:.1f} MiB"
    )
    box = {"s": (params, state), "1": (single_params, single_state)}

    def run_sharded():
        with jax.set_mesh(mesh):
            box["s"] = sharded_jit(*box["s"], features)
        jax.block_until_ready(box["s"])

    def run_single():
        box["1"] = single_jit(*box["1"], whole)
        jax.block_until_ready(box["1"])

    ratios = []
    for r in range(args.rounds):
        t_sharded = median_ms(run_sharded, args.repeat)
        t_single = median_ms(run_single, args.repeat)
        ratios.append(t_sharded / t_single)
        print(f"round {r}: sharded on {k} devices {t_sharded:8.1f} ms, one device "
              f"{t_single:8.1f} ms, ratio {ratios[-1]:.2f}")  # fmt: skip
    print(f"sharded / one device step time: median {np.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip
    if args.by_kind:  # where the time goes: the lookup alone and the step, every table one kind
        by_size = sorted(tables, key=lambda t: -t.num_embeddings)

        def hand(placements):
            return S.by_hand(tables, mesh, placements, axis="x", replica=replica)

        kinds = {
            "planned": plan,
            "data_parallel": hand({t.name: S.data_parallel() for t in tables}),
            "row_wise": routed(hand({t.name: S.row_wise() for t in tables})),
            "table_wise": routed(hand(
                {t.name: S.table_wise(i % plan.num_devices) for i, t in enumerate(by_size)}
            )),
            "column_wise": hand({t.name: S.column_wise() for t in tables}),
        }  # fmt: skip
        for name, p in kinds.items():
            f = S.put_features(blocks, p)
            o = S.optimizer(tx, p)
            ps = S.init(jax.random.key(0), p)
            kbox = [ps, o.init(ps)]
            look = jax.jit(lambda q, f, p=p: S.lookup(q, f, p)[0])

            def kstep(q, st, f, p=p, o=o):
                pooled, lk = S.lookup(q, f, p)
                return o.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params)

            kjit = jax.jit(kstep, donate_argnums=(0, 1))

            def run_kind(kjit=kjit, f=f, kbox=kbox):
                kbox[:] = kjit(kbox[0], kbox[1], f)
                jax.block_until_ready(kbox)

            def run_look(look=look, f=f, kbox=kbox):
                jax.block_until_ready(look(kbox[0], f))

            with jax.set_mesh(mesh):
                t_look = median_ms(run_look, args.repeat)
                t_step = median_ms(run_kind, args.repeat)
            print(f"  {name:14s} lookup {t_look:8.1f} ms  step {t_step:8.1f} ms  "
                  f"step / one device {t_step / np.median([t_single]):.2f}")  # fmt: skip
    weak = weak_scaling(args, tables, tx, batch, routed, loss, median_ms) if args.weak else None
    return {"held": held, "estimate": estimate, "ratios": ratios, "stated": stated,
            "seen": {"lookup": seen, "grad": grad_seen}, "weak": weak, "peak": peak}  # fmt: skip


def weak_scaling(args, tables, tx, batch, routed, loss, median_ms):
    """The planned step on K = 1, 2, 4, 8 devices with the per-device batch fixed: each device's
    routed slots and bytes (off the compiled HLO, against ``step_bytes``), and the step time
    over K (fake devices share the cores: flat when each device's work is)."""
    import jax

    import jaxembed
    from jaxembed import sharding as S

    print(f"weak scaling: {args.batch // args.devices} samples per device")
    out = []
    for k in (1, 2, 4, 8):
        if k > args.devices:
            break
        mesh = jax.make_mesh((k,), ("x",), devices=jax.devices()[:k])
        plan = jaxembed.plan(tables, mesh, optimizer=tx, batch_size=args.batch // args.devices * k,
                             pooling_factors=4.0)  # fmt: skip
        _, blocks, capacity = batch(0, k=k)
        features = S.put_features(blocks, plan)
        samples = [S.put_features(batch(seed, capacity, k=k)[1], plan) for seed in (1, 2, 3)]
        plan = routed(plan, samples)
        params = S.init(jax.random.key(0), plan)
        opt = S.optimizer(tx, plan)
        box = [params, opt.init(params)]

        def step(p, st, f, plan=plan, opt=opt):
            pooled, lk = S.lookup(p, f, plan)
            return opt.update(lk.grad(jax.grad(loss)(pooled)), st, lk.params)

        jitted = jax.jit(step, donate_argnums=(0, 1))
        with jax.set_mesh(mesh):
            hlo = jitted.lower(*box, features).compile().as_text()

            def run(jitted=jitted, features=features, box=box, mesh=mesh):
                with jax.set_mesh(mesh):
                    box[:] = jitted(box[0], box[1], features)
                jax.block_until_ready(box)

            ms = median_ms(run, args.repeat)
        seen = sum(S.collective_bytes(hlo).values())
        stated = sum(sum(v.values()) for v in S.step_bytes(plan, features).values())
        slots = sum(k * plan.capacity_of(g, capacity) for g in plan.groups if g.routed)
        kinds = sorted({p.kind.value for _, p in plan.placements})
        out.append({"k": k, "ms": ms, "bytes": seen, "stated": stated, "slots": slots})
        print(f"  K={k}: {'+'.join(kinds):28s} routed slots per device {slots:7d}  bytes per "
              f"device HLO {seen / 2**20:7.2f} MiB, model {stated / 2**20:7.2f} MiB  step "
              f"{ms:7.1f} ms, / K {ms / k:6.1f} ms")  # fmt: skip
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
