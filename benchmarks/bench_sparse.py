"""A full training step (forward, backward, update) on a large table: sparse vs dense vs torch.

    python benchmarks/bench_sparse.py [--vocab 1000000 --dim 128 --batch 65536 --repeat 10]
    python benchmarks/bench_sparse.py --sweep 10000,100000,1000000,4000000   # cost vs vocab
    /usr/bin/time -v python benchmarks/bench_sparse.py --only lazy_adam        # peak RSS

Every step computes ``loss = 0.5 * mean((table[ids] - target) ** 2)``, its gradient and the
update, jit-compiled with the table and optimizer state donated:

  * jaxembed sparse: ``jaxembed.sparse.lookup`` + a row-wise optimizer (O(batch));
  * dense optax: ``jaxembed.embedding`` + the optax optimizer on the (V, D) gradient;
  * torch: ``nn.Embedding(sparse=True)`` + ``optim.SGD`` / ``Adagrad`` / ``SparseAdam``.

The three run interleaved, round by round, in this one process; the figures are medians and the
ratios are what to quote (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxembed import bench, sparse

# name: (jaxembed sparse optimizer, dense optax optimizer or None, torch optimizer name or None)
LR = 0.1
OPTIMIZERS = {
    "sgd": (lambda: sparse.sgd(LR), lambda: optax.sgd(LR), "SGD"),
    "adagrad": (lambda: sparse.adagrad(LR), lambda: optax.adagrad(LR, eps=1e-10), "Adagrad"),
    "rowwise_adagrad": (lambda: sparse.rowwise_adagrad(LR), None, None),
    "lazy_adam": (lambda: sparse.lazy_adam(LR), lambda: optax.adam(LR), "SparseAdam"),
}


def sparse_step(opt):
    # the same step jaxembed-bench times, jitted with the table and state donated
    return jax.jit(bench.sparse_train_step(opt), donate_argnums=(0, 1))


def dense_step(tx):
    return jax.jit(bench.dense_train_step(tx), donate_argnums=(0, 1))


def rows_grad_step():
    """The floor any implementation pays: the lookup, the loss and the rows' gradient, no update."""

    @jax.jit
    def step(table, ids, target):
        loss, row_grads = jax.value_and_grad(bench.train_loss)(jnp.take(table, ids, axis=0), target)
        return loss, row_grads

    return step


class FloorRunner:
    def __init__(self, table):
        self.step, self.table = rows_grad_step(), table

    def __call__(self, ids, target):
        jax.block_until_ready(self.step(self.table, ids, target))


class JaxRunner:
    def __init__(self, step, init, table):
        self.step, self.table = step, table
        self.state = init(table)

    def __call__(self, ids, target):
        self.table, self.state, loss = self.step(self.table, self.state, ids, target)
        jax.block_until_ready((self.table, self.state, loss))


class TorchRunner:
    def __init__(self, name, table_np, device):
        import torch

        self.torch, self.device = torch, device
        self.emb = torch.nn.Embedding.from_pretrained(
            torch.from_numpy(table_np).to(device), freeze=False, sparse=True
        )
        self.opt = getattr(torch.optim, name)(self.emb.parameters(), lr=LR)

    def __call__(self, ids, target):
        self.opt.zero_grad(set_to_none=True)
        loss = 0.5 * ((self.emb(ids) - target) ** 2).mean()
        loss.backward()
        self.opt.step()
        if self.device != "cpu":
            self.torch.cuda.synchronize()


def _table(vocab, dim):
    """N(0, 1) rows, made a slice at a time: no temporary several times the table's size."""
    rng = np.random.default_rng(1)
    host = np.empty((vocab, dim), np.float32)
    for start in range(0, vocab, 65536):
        stop = min(start + 65536, vocab)
        host[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    table = jnp.array(host)  # a copy: the host array is freed on return
    del host
    return table


def _time(runners, args, repeat):
    """Median ms of each runner; rounds interleave the runners so noise hits all alike."""
    for name, run in runners.items():
        run(*args[name])  # compile / warm up
    times = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(*args[name])
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _batch(vocab, dim, batch, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=batch).astype(np.int32)
    target = rng.normal(size=(batch, dim)).astype(np.float32)
    return ids, target


def compare(args):
    V, D, N = args.vocab, args.dim, args.batch
    ids, target = _batch(V, D, N)
    jax_args = (jnp.asarray(ids), jnp.asarray(target))
    table = _table(V, D)
    table_np = None if args.no_torch else np.asarray(table)
    print(
        f"V={V:,} D={D} batch={N:,} float32, {jax.devices()[0].device_kind}, median of "
        f"{args.repeat} interleaved rounds (ms), {bench.kernels_path()}\n"
    )
    floor = _time({"f": FloorRunner(table)}, {"f": jax_args}, args.repeat)["f"]
    print(f"lookup + loss + rows' gradient, no update (the floor of any step): {floor:.1f} ms\n")
    print(
        f"{'optimizer':<16}{'jaxembed sparse':>16}{'dense optax':>13}{'torch sparse':>14}"
        f"{'vs dense':>10}{'vs torch':>10}{'dense/floor':>13}"
    )
    for name in args.optimizers.split(","):
        make_sparse, make_dense, torch_name = OPTIMIZERS[name]
        runners, run_args = {}, {}
        opt = make_sparse()
        runners["sparse"] = JaxRunner(sparse_step(opt), opt.init, table.copy())
        run_args["sparse"] = jax_args
        if make_dense is not None and not args.no_dense:
            tx = make_dense()
            runners["dense"] = JaxRunner(
                dense_step(tx), lambda t, tx=tx: tx.init({"weight": t}), table.copy()
            )
            run_args["dense"] = jax_args
        if torch_name is not None and table_np is not None:
            import torch

            torch.set_num_threads(os.cpu_count())
            dev = args.torch_device
            runners["torch"] = TorchRunner(torch_name, table_np.copy(), dev)
            run_args["torch"] = (
                torch.from_numpy(ids.astype(np.int64)).to(dev),
                torch.from_numpy(target).to(dev),
            )
        ms = _time(runners, run_args, args.repeat)
        del runners
        s, d, t = ms["sparse"], ms.get("dense"), ms.get("torch")

        def fmt(x):
            return f"{x:.1f}" if x is not None else "-"

        def ratio(x, s=s):
            return f"{x / s:.1f}x" if x is not None else "-"

        print(
            f"{name:<16}{fmt(s):>16}{fmt(d):>13}{fmt(t):>14}{ratio(d):>10}{ratio(t):>10}"
            f"{ratio(d, floor):>13}",
            flush=True,
        )


def sweep(args):
    N, D = args.batch, args.dim
    print(f"sparse step vs vocab size, D={D}, batch={N:,} (median ms)\n")
    names = args.optimizers.split(",")
    print(f"{'vocab':>12}" + "".join(f"{n:>18}" for n in names))
    for V in (int(float(v)) for v in args.sweep.split(",")):
        ids, target = _batch(V, D, N)
        jax_args = (jnp.asarray(ids), jnp.asarray(target))
        row = []
        for name in names:
            opt = OPTIMIZERS[name][0]()
            run = JaxRunner(sparse_step(opt), opt.init, _table(V, D))
            row.append(_time({"s": run}, {"s": jax_args}, args.repeat)["s"])
            del run
        print(f"{V:>12,}" + "".join(f"{x:>18.1f}" for x in row), flush=True)


def _rss(field):
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def only(args):
    """One sparse optimizer: time per step, and the peak RSS of the training steps alone."""
    import gc

    V, D, N = args.vocab, args.dim, args.batch
    jax.block_until_ready(jnp.zeros(1) + 1)
    runtime = _rss("VmRSS")  # Python, JAX and its CPU client, before any data
    ids, target = _batch(V, D, N)
    ids, target = jnp.asarray(ids), jnp.asarray(target)
    opt = OPTIMIZERS[args.only][0]()
    run = JaxRunner(sparse_step(opt), opt.init, _table(V, D))
    jax.block_until_ready(run.state)
    gc.collect()
    time.sleep(1.0)  # let the runtime release the staging buffers of the table's creation
    resident = _rss("VmRSS")  # runtime + table + state + the batch, before any step
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak, to the current RSS
    ms = _time({"s": run}, {"s": (ids, target)}, args.repeat)["s"]
    peak = _rss("VmHWM")
    table_bytes = V * D * 4
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
    row_bytes = N * D * 4
    mib = 2**20
    print(
        f"{args.only}: {ms:.1f} ms/step; table {table_bytes / mib:.0f} MiB, optimizer state "
        f"{state_bytes / mib:.0f} MiB, one (batch, dim) array {row_bytes / mib:.0f} MiB"
    )
    print(
        f"RSS: runtime alone {runtime / mib:.0f} MiB; with table, state and batch "
        f"{resident / mib:.0f} MiB; peak over {args.repeat + 1} steps {peak / mib:.0f} MiB"
    )
    print(
        f"peak - runtime = {(peak - runtime) / mib:.0f} MiB = table + state + "
        f"{(peak - runtime - table_bytes - state_bytes) / row_bytes:.1f} (batch, dim) arrays; "
        f"bound (table + state) x 1.1 + O(batch) "
        f"= {(1.1 * (table_bytes + state_bytes)) / mib:.0f} MiB + O(batch)"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=65_536)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--torch-device", default="cpu", help="where torch runs: cpu or cuda")
    ap.add_argument("--sweep", help="comma-separated vocab sizes: time the sparse step at each")
    ap.add_argument("--only", choices=sorted(OPTIMIZERS), help="run one sparse optimizer")
    args = ap.parse_args(argv)
    if args.only:
        only(args)
    elif args.sweep:
        sweep(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
