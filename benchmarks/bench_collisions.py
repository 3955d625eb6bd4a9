"""Managed collisions: the remap against the lookup, and a training call against TorchRec's.

In one process, interleaved rounds, uniform and Zipf ids (issue 26's numbers):

* **remap vs lookup**: ``ManagedCollision.remap(train=False)`` of ``--batch`` raw ids into a
  full table of ``--slots`` slots, against ``jaxembed.embedding`` of the same number of rows
  from a ``(slots, dim)`` table, both jitted;
* **a training call**: ``remap`` (profile, and evict every ``--interval`` calls) against
  TorchRec 1.8's ``MCHManagedCollisionModule`` forward + ``evict()`` with the same policy on
  the same stream, state donated; the mean over a whole number of intervals, so evictions count;
* **memory**: the state's bytes a slot, counted from its arrays, and the window's apart;
* **a managed-collision training step** (``--step``): remap (profile, evict every
  ``--interval`` calls), sum-pooled bags of ``--bag`` ids, and a row-wise Adagrad update,
  against TorchRec's ``MCHManagedCollisionModule`` (forward + ``evict()``) feeding FBGEMM's
  CPU ``SplitTableBatchedEmbeddingBagsCodegen`` with its fused ``EXACT_ROWWISE_ADAGRAD`` (the
  unsharded MC-EBC's work with FBGEMM's fused update); table, optimizer and remap state
  donated. Neither side resets evicted rows (TorchRec's reset runs only on GPU).

    python benchmarks/bench_collisions.py
    python benchmarks/bench_collisions.py --slots 100000 --batch 8192   # a quick run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=65_536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--interval", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--eviction", default="lfu", choices=["lfu", "lru", "distance_lfu"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torchrec", action="store_true")
    ap.add_argument("--step", action="store_true", help="only the training-step comparison")
    ap.add_argument("--bag", type=int, default=16, help="ids a bag, in the training step")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxembed
    from jaxembed.collisions import ManagedCollision, RawIds, raw_ids

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import median_ms

    rng = np.random.default_rng(0)
    S, B = args.slots, args.batch
    print(f"{jax.devices()[0].device_kind}; kernels: {jaxembed.kernels.status()}; "
          f"{S:,} slots, {B:,} ids a call, dim {args.dim}; "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '(none: glibc)'}")  # fmt: skip
    if args.step:
        return training_steps(args, rng)

    # a full table: S - 1 distinct 62-bit ids held
    universe = np.unique(rng.integers(0, 2**62, size=S + S // 8, dtype=np.int64))
    rng.shuffle(universe)
    held = np.sort(universe[: S - 1])
    mc = ManagedCollision(args.eviction, 1)  # train=False below: it never evicts
    state = state_for(mc, S, B, held)._replace(  # the held ids in shuffled slots
        slot=jnp.asarray(np.concatenate([rng.permutation(S - 1), [S - 1]]).astype(np.int32))
    )
    table = jnp.asarray(rng.standard_normal((S, args.dim), dtype=np.float32))
    remap = jax.jit(lambda s, h, l: mc.remap(s, RawIds(h, l), train=False).slots)  # noqa: E741
    lookup = jax.jit(lambda t, i: jaxembed.embedding({"weight": t}, i)[0])

    def draw(kind, pool, n):
        if kind == "uniform":
            return pool[rng.integers(0, pool.size, n)]
        return pool[np.minimum(rng.zipf(1.2, n) - 1, pool.size - 1)]

    print("\nremap vs lookup (median ms of rounds; ratio = remap / lookup)")
    for kind in ("uniform", "zipf"):
        q = raw_ids(draw(kind, held, B))
        idx = remap(state, q.hi, q.lo)
        times = {"remap": [], "lookup": []}
        calls = {
            "remap": lambda q=q: remap(state, q.hi, q.lo).block_until_ready(),
            "lookup": lambda idx=idx: lookup(table, idx).block_until_ready(),
        }
        for _ in range(args.rounds):  # interleaved
            for name, call in calls.items():
                times[name].append(median_ms(call, args.repeat))
        r, k = statistics.median(times["remap"]), statistics.median(times["lookup"])
        print(f"  {kind:8s} remap {r:7.2f} ms  lookup {k:7.2f} ms  ratio {r / k:5.2f}")

    print("\nmemory: bytes a slot, from the arrays")
    for ev in ("lfu", "lru", "distance_lfu"):
        s = ManagedCollision(ev, 1).init(S, B)
        per_slot = sum(a.nbytes for a in (s.hi, s.lo, s.slot, s.counts, s.last) if a is not None)
        window = s.window_hi.nbytes + s.window_lo.nbytes
        print(f"  {ev:12s} {per_slot / S:5.1f} B a slot; window {window / B:.0f} B an id a call "
              f"x eviction_interval")  # fmt: skip

    if args.no_torchrec:
        return
    import torch
    from torchrec.sparse.jagged_tensor import JaggedTensor

    print("\na training call (mean ms over whole intervals; ratio = jaxembed / TorchRec)")
    for interval in args.interval:
        calls = max(2 * interval, 4) // interval * interval
        for kind in ("uniform", "zipf"):
            stream = [draw(kind, universe, B) for _ in range(calls)]
            mc = ManagedCollision(args.eviction, interval)
            step = jax.jit(lambda s, h, l, mc=mc: mc.remap(s, RawIds(h, l)), donate_argnums=0)  # noqa: E741
            jstream = [raw_ids(ids) for ids in stream]
            ours, theirs = [], []
            for _ in range(max(1, args.rounds // 2)):
                s = state_for(mc, S, B, held)
                jax.block_until_ready(step(s, jstream[0].hi, jstream[0].lo))  # compile
                s = state_for(mc, S, B, held)
                t0 = time.perf_counter()
                for q in jstream:
                    s = step(s, q.hi, q.lo).state
                jax.block_until_ready(s)
                ours.append((time.perf_counter() - t0) * 1e3 / calls)
                module = torchrec_mch(args.eviction, S, interval, held)
                t0 = time.perf_counter()
                for ids in stream:
                    jt = JaggedTensor(values=torch.from_numpy(ids), lengths=torch.tensor([B]))
                    module({"f": jt})
                    module.evict()
                theirs.append((time.perf_counter() - t0) * 1e3 / calls)
            o, t = statistics.median(ours), statistics.median(theirs)
            print(f"  interval {interval:3d} {kind:8s} jaxembed {o:8.2f} ms  TorchRec {t:8.2f} ms"
                  f"  ratio {o / t:5.2f}")  # fmt: skip


def training_steps(args, rng):
    """The managed-collision training step, jaxembed against TorchRec's MCH + FBGEMM's TBE."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import JaggedTensor

    import jaxembed
    from jaxembed.bench._baselines import fbgemm_rowwise_adagrad
    from jaxembed.collisions import ManagedCollision, RawIds, raw_ids

    S, B, D, bag = args.slots, args.batch, args.dim, args.bag
    universe = np.unique(rng.integers(0, 2**62, size=S + S // 8, dtype=np.int64))
    rng.shuffle(universe)
    held = np.sort(universe[: S - 1])
    table0 = rng.uniform(-0.01, 0.01, size=(S, D)).astype(np.float32)
    target = rng.standard_normal((B // bag, D)).astype(np.float32)
    offsets = jnp.arange(0, B, bag, dtype=jnp.int32)
    opt = jaxembed.sparse.rowwise_adagrad(0.05)

    def draw(kind, n):
        if kind == "uniform":
            return universe[rng.integers(0, universe.size, n)]
        return universe[np.minimum(rng.zipf(1.2, n) - 1, universe.size - 1)]

    print(
        f"\na managed-collision training step: {B // bag:,} bags of {bag} ids, row-wise "
        "Adagrad (mean ms a call over whole intervals; ratio = jaxembed / TorchRec+FBGEMM)"
    )
    for interval in args.interval:
        calls = max(2 * interval, 4) // interval * interval
        mc = ManagedCollision(args.eviction, interval)

        def step(table, opt_state, mc_state, hi, lo, mc=mc):
            out = mc.remap(mc_state, RawIds(hi, lo))
            bags, lk = jaxembed.sparse.lookup_bags(
                {"weight": table}, out.slots, offsets, mode="sum"
            )
            g = jax.grad(lambda x: 0.5 * jnp.mean((x - target) ** 2))(bags)
            table, opt_state = opt.update(lk.grad(g), opt_state, lk.params["weight"])
            return table, opt_state, out.state

        jstep = jax.jit(step, donate_argnums=(0, 1, 2))
        for kind in ("uniform", "zipf"):
            stream = [draw(kind, B) for _ in range(calls)]
            jstream = [raw_ids(ids) for ids in stream]
            ours, theirs = [], []
            for _ in range(max(1, args.rounds // 2)):  # interleaved rounds

                def fresh(mc=mc):
                    t = jnp.asarray(table0)
                    return t, opt.init(t), state_for(mc, S, B, held)

                jax.block_until_ready(jstep(*fresh(), jstream[0].hi, jstream[0].lo))  # compile
                t, o, s = fresh()
                jax.block_until_ready((t, o, s))
                t0 = time.perf_counter()
                for q in jstream:
                    t, o, s = jstep(t, o, s, q.hi, q.lo)
                jax.block_until_ready((t, o, s))
                ours.append((time.perf_counter() - t0) * 1e3 / calls)
                ours_table = np.asarray(t)
                del t, o, s

                module = torchrec_mch(args.eviction, S, interval, held)
                tbe_module = fbgemm_rowwise_adagrad(torch, table0, 0.05, pooled=True)
                t_offsets = torch.arange(0, B + 1, bag, dtype=torch.int64)
                t_target = torch.from_numpy(target)
                t0 = time.perf_counter()
                for ids in stream:
                    jt = JaggedTensor(values=torch.from_numpy(ids), lengths=torch.tensor([B]))
                    slots = module({"f": jt})["f"].values()
                    module.evict()
                    out = tbe_module(slots, t_offsets)
                    (0.5 * ((out - t_target) ** 2).mean()).backward()
                theirs.append((time.perf_counter() - t0) * 1e3 / calls)
                # the same work: both end the stream with the same table (to float rounding)
                theirs_table = tbe_module.split_embedding_weights()[0].detach().numpy()
                diff = float(np.abs(ours_table - theirs_table).max())
                del tbe_module, module
            o, t = statistics.median(ours), statistics.median(theirs)
            print(f"  interval {interval:3d} {kind:8s} jaxembed {o:8.2f} ms  TorchRec+FBGEMM "
                  f"{t:8.2f} ms  ratio {o / t:5.2f}  (tables differ by {diff:.1e})")  # fmt: skip


def torchrec_mch(eviction, S, interval, held):
    """TorchRec's ``MCHManagedCollisionModule`` in training mode, holding ``held`` as
    :func:`state_for` does."""
    import torch
    from torchrec.modules import mc_modules

    policy = {
        "lfu": mc_modules.LFU_EvictionPolicy,
        "lru": mc_modules.LRU_EvictionPolicy,
        "distance_lfu": mc_modules.DistanceLFU_EvictionPolicy,
    }[eviction]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = mc_modules.MCHManagedCollisionModule(
            zch_size=S, device=torch.device("cpu"), eviction_policy=policy,
            eviction_interval=interval,
        ).train()  # fmt: skip
    module.load_state_dict(torch_state(module, held, S))
    return module


def state_for(mc, S, B, held):
    """A full state: ``held`` (sorted, S - 1 ids) in slots 0.. in order, counts 1, call 0."""
    from jaxembed.collisions import raw_ids

    s = mc.init(S, B)
    pairs = raw_ids(held)
    return s._replace(
        hi=s.hi.at[: S - 1].set(pairs.hi),
        lo=s.lo.at[: S - 1].set(pairs.lo),
        counts=None if s.counts is None else s.counts.at[: S - 1].set(1),
    )


def torch_state(module, held, S):
    """The same full state as TorchRec's buffers."""
    import numpy as np
    import torch

    sd = {k: v.clone() for k, v in module.state_dict().items()}
    ids = np.concatenate([held, [2**63 - 1]]).astype(np.int64)
    sd["_mch_sorted_raw_ids"] = torch.from_numpy(ids)
    if "_mch_counts" in sd:
        counts = np.ones(S, np.int64)
        counts[-1] = 0
        sd["_mch_counts"] = torch.from_numpy(counts)
    return sd


if __name__ == "__main__":
    main()
