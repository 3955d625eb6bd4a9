"""A DLRM-shaped collection training step: jaxembed's stacked collection vs TorchRec + FBGEMM.

    python benchmarks/bench_collection.py [--batch 4096 --dim 64 --cap 1000000 --rounds 5]
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/...
    python benchmarks/bench_collection.py --rss       # the stacked step's peak RSS, alone

26 tables with Criteo's (Kaggle DAC) cardinalities capped at ``--cap`` rows, one feature each,
D = 64, float32; each bag holds 1-32 ids (Zipf lengths), ids Zipf(alpha) or uniform over the
table. Every step is forward, ``loss = 0.5 * mean((concat(pooled) - target) ** 2)``, backward
and a row-wise Adagrad update (FBGEMM's EXACT_ROWWISE_ADAGRAD), with the tables and the state
donated (jaxembed) or updated in place inside the backward pass (FBGEMM):

  * stacked: ``jaxembed.collections`` with the 26 tables stacked into one (one gather, one
    update);
  * separate: 26 single tables, as a user writes them today: ``jaxembed.sparse.lookup_bags``
    per table on its own feature (each padded to its own power-of-two capacity, ``num_valid``),
    26 row-wise updates, in one jitted step;
  * one table: a single table of the same total rows, fed the same ids as one feature;
  * torchrec: ``FusedEmbeddingBagCollection`` (FBGEMM's CPU TBE with the fused optimizer).

Rounds are interleaved in this one process; medians are reported, and ratios are what to quote.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed

CRITEO = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
          27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # fmt: skip
LR = 0.05


def zipf_ids(rng, alpha, size, high):
    """Zipf(alpha) ranks folded onto ``[0, high)`` by a fixed permutation (hot rows spread)."""
    if alpha is None:
        return rng.integers(0, high, size)
    ranks = rng.zipf(alpha, size) - 1
    return (ranks * 2654435761) % high  # a bijection-like scatter of the hot ranks


def batch(rng, rows, b, alpha, max_len=32):
    """``(values, lengths)`` feature-major, lengths Zipf in [1, max_len]."""
    lengths = np.minimum(rng.zipf(1.2, (len(rows), b)), max_len).astype(np.int64)
    values = [zipf_ids(rng, alpha, int(n.sum()), r) for n, r in zip(lengths, rows, strict=True)]
    return np.concatenate(values), lengths.reshape(-1)


def jaxembed_step(tables, stack):
    opt = jaxembed.collections.optimizer(jaxembed.sparse.rowwise_adagrad(LR), tables, stack=stack)

    def pooled_loss(pooled, target):
        out = jaxembed.collections.concat_pooled(pooled, tables)
        b = target.shape[0]
        if out.shape[0] != b:  # one table fed every feature's bags: (26 B, D) -> (B, 26 D)
            out = out.reshape(-1, b, out.shape[1]).transpose(1, 0, 2).reshape(b, -1)
        return 0.5 * jnp.mean((out - target) ** 2)

    def step(params, state, kj, target):
        pooled, lk = jaxembed.collections.lookup(params, kj, tables, stack=stack)
        pooled_grads = jax.grad(pooled_loss)(pooled, target)
        return opt.update(lk.grad(pooled_grads), state, lk.params)

    return opt, jax.jit(step, donate_argnums=(0, 1))


def separate_step(num_tables):
    opt = jaxembed.sparse.rowwise_adagrad(LR)

    def step(tables, states, feats, target):
        lookups = [
            jaxembed.sparse.lookup_bags({"weight": w}, ids, offs, mode="sum", num_valid=n)
            for w, (ids, offs, n) in zip(tables, feats, strict=True)
        ]

        def loss(bags):
            return 0.5 * jnp.mean((jnp.concatenate(bags, axis=1) - target) ** 2)

        bag_grads = jax.grad(loss)([bags for bags, _ in lookups])
        out = [
            opt.update(lk.grad(g), st, lk.params["weight"])
            for (_, lk), g, st in zip(lookups, bag_grads, states, strict=True)
        ]
        return [t for t, _ in out], [st for _, st in out]

    return opt, jax.jit(step, donate_argnums=(0, 1))


def torchrec_step(tables_np, names, dim):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchrec
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

    configs = [
        torchrec.EmbeddingBagConfig(
            name=n, embedding_dim=dim, num_embeddings=w.shape[0], feature_names=[n]
        )
        for n, w in zip(names, tables_np, strict=True)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ebc = FusedEmbeddingBagCollection(
            tables=configs,
            optimizer_type=RowWiseAdagrad,
            optimizer_kwargs={"lr": LR, "eps": 1e-8},
            device=torch.device("cpu"),
        )
    state = ebc.state_dict()
    with torch.no_grad():
        for n, w in zip(names, tables_np, strict=True):
            state[f"embedding_bags.{n}.weight"].copy_(torch.from_numpy(w))

    def step(values, lengths, target):
        kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(
            keys=names, values=values, lengths=lengths
        )
        out = ebc(kjt).values()
        (0.5 * ((out - target) ** 2).mean()).backward()

    return step, torch


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--cap", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=1.1)
    ap.add_argument("--rss", action="store_true", help="only the stacked step, with its peak RSS")
    ap.add_argument("--skip", default="", help="comma-separated impls to leave out")
    args = ap.parse_args()
    rows = [min(c, args.cap) for c in CRITEO]
    names = [f"t{i}" for i in range(len(rows))]
    D, B = args.dim, args.batch
    rng = np.random.default_rng(0)
    base_rss = rss_mb()
    tables_np = [
        rng.uniform(-(r**-0.5), r**-0.5, (r, D)).astype(np.float32) for r in rows
    ]  # TorchRec's init
    table_mb = sum(w.nbytes for w in tables_np) / 2**20
    print(f"26 tables, {sum(rows):,} rows x {D} ({table_mb:.0f} MiB), batch {B}, "
          f"{jaxembed.bench.kernels_path()}")  # fmt: skip
    tables = [jaxembed.EmbeddingBagConfig(n, D, r, [n]) for n, r in zip(names, rows, strict=True)]
    one = [jaxembed.EmbeddingBagConfig("all", D, sum(rows), ["all"])]
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]])

    def per_table(values, lengths):
        """Each table's (ids padded to a power of two, offsets, num_valid)."""
        lengths = lengths.reshape(len(rows), B)
        ends = np.cumsum(lengths.sum(1))
        out = []
        for t, n in enumerate(lengths):
            ids = values[ends[t] - n.sum() : ends[t]]
            cap = max(16, 1 << int(max(ids.size, 1) - 1).bit_length())
            padded = np.zeros(cap, np.int32)
            padded[: ids.size] = ids
            offs = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int32)
            out.append((jnp.asarray(padded), jnp.asarray(offs), jnp.int32(ids.size)))
        return out

    def inputs(alpha):
        values, lengths = batch(rng, rows, B, alpha)
        cap = 1 << int(values.size - 1).bit_length()
        kj = jaxembed.KeyedJagged.from_lengths(names, values, lengths, capacity=cap)
        per = lengths.reshape(len(rows), B).sum(1)
        shift = np.repeat(offsets, per)
        kj_one = jaxembed.KeyedJagged.from_lengths(["all"], values + shift, lengths, capacity=cap)
        target = rng.normal(size=(B, len(rows) * D)).astype(np.float32)
        separate = per_table(values, lengths) if "separate" in impls else None
        return values, lengths, kj, kj_one, target, separate

    impls = {}
    skip = set(args.skip.split(",")) if args.skip else set()
    if args.rss:
        skip |= {"separate", "one table", "torchrec"}
    for name, cfg, stack in (("stacked", tables, True), ("one table", one, True)):
        if name in skip:
            continue
        opt, step = jaxembed_step(cfg, stack)
        weights = {n: w for n, w in zip(names, tables_np, strict=True)}
        if cfg is one:
            weights = {"all": np.concatenate(tables_np)}
        params = jaxembed.collections.stack_tables(weights, cfg, stack=stack)
        impls[name] = dict(kind="jax", step=step, params=params, state=opt.init(params), cfg=cfg)
    if "separate" not in skip:
        opt, step = separate_step(len(rows))
        params = [jnp.asarray(w) for w in tables_np]
        impls["separate"] = dict(
            kind="separate", step=step, params=params, state=[opt.init(w) for w in params]
        )
    if args.rss:
        del tables_np
    elif "torchrec" not in skip:
        step, torch = torchrec_step(tables_np, names, D)
        impls["torchrec"] = dict(kind="torch", step=step)
    del weights
    times = {(k, ids): [] for k in impls for ids in ("uniform", "zipf")}
    peak = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    for r in range(args.rounds + 1):  # round 0 compiles and warms up
        for ids, alpha in (("uniform", None), ("zipf", args.alpha)):
            values, lengths, kj, kj_one, target, separate = inputs(alpha)
            if r == 1 and ids == "uniform" and args.rss:
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
            for name, impl in impls.items():
                t0 = time.perf_counter()
                if impl["kind"] != "torch":
                    feats = separate if impl["kind"] == "separate" else kj
                    feats = kj_one if impl.get("cfg") is one else feats
                    impl["params"], impl["state"] = impl["step"](
                        impl["params"], impl["state"], feats, target
                    )
                    jax.block_until_ready(impl["params"])
                else:
                    impl["step"](
                        torch.from_numpy(values), torch.from_numpy(lengths),
                        torch.from_numpy(target),
                    )  # fmt: skip
                if r:
                    times[(name, ids)].append((time.perf_counter() - t0) * 1e3)
    stop.set()
    med = {k: statistics.median(v) for k, v in times.items() if v}
    for ids in ("uniform", "zipf"):
        print(f"\nids {ids}" + (f" (alpha {args.alpha})" if ids == "zipf" else ""))
        for name in impls:
            line = f"  {name:10s} {med[(name, ids)]:8.1f} ms"
            if name != "stacked" and "stacked" in impls:
                line += f"   stacked is {med[(name, ids)] / med[('stacked', ids)]:.2f}x faster"
            print(line)
    if args.rss:
        state_mb = (
            sum(
                x.nbytes for x in jax.tree.leaves(impls["stacked"]["state"]) if hasattr(x, "nbytes")
            )
            / 2**20
        )
        print(
            f"\npeak RSS during the steps {peak[0]:.0f} MiB, {peak[0] - base_rss:.0f} above the "
            f"process before the tables; tables {table_mb:.0f} + state {state_mb:.0f} MiB: "
            f"{(peak[0] - base_rss) / (table_mb + state_mb):.2f}x"
        )


if __name__ == "__main__":
    main()
