"""``jaxembed-bench``: how close each embedding path runs to the device's memory bandwidth.

    jaxembed-bench                                   # every op at small sizes, ~1 min on 2 cores
    jaxembed-bench --vocab 1000000 --dim 128 --batch 65536 --ops lookup,bag-sum,train-sparse-sgd
    jaxembed-bench --ops lookup --sweep vocab=1e3,1e4,1e5,1e6 --plot lookup.png --json out.json
    python -m jaxembed.bench --help

Method: each (op, implementation) is jit-compiled first (the compile time is reported on its
own), run once more to warm up, then timed ``--repeat`` times with ``block_until_ready``; the
median is reported. The device's copy bandwidth is measured in the same run (a large on-device
copy, read + write), and every op's *theoretical bytes* (what it must at least read and write,
see :func:`op_bytes`) divided by its time gives its effective bandwidth and the fraction of the
copy bandwidth it reaches: the roofline of a memory-bound op. Baselines run in the same process
and each implementation's time is also given as a ratio to its op's baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed
from jaxembed import sparse

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
OPS = (
    "lookup",
    "lookup+max_norm",
    "grad",
    "bag-sum",
    "bag-mean",
    "bag-max",
    "train-dense",
    *(f"train-sparse-{name}" for name in SPARSE_OPTIMIZERS),
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LR = 0.01


# --- the roofline arithmetic -------------------------------------------------------------------


def op_bytes(op: str, vocab: int, dim: int, batch: int, itemsize: int, bag_size: int = 16) -> int:
    """The bytes ``op`` must at least move, for a (vocab, dim) table and ``batch`` indices.

    * ``lookup``: read the looked-up rows, write the output, read the int32 indices.
    * ``lookup+max_norm``: also read the rows for their norms and write them back renormed.
    * ``grad`` (the dense gradient of a lookup): write the zero (V, D) gradient, read the
      cotangent, read and write the rows it scatters into.
    * ``bag-*``: read the rows, write one row per bag (``batch // bag_size`` bags).
    * ``train-dense`` (optax Adam on the dense gradient): the gradient as in ``grad``, then read
      the gradient, parameters and both moments and write parameters and moments: 8 passes over
      the table, plus the rows and the target of the loss.
    * ``train-sparse-<opt>``: read the rows and the target, write their gradient, read and write
      the touched table rows and optimizer-state rows (Adagrad: one state row, row-wise Adagrad:
      one float32 per row, lazy Adam: two state rows).
    """
    rows = batch * dim * itemsize
    table = vocab * dim * itemsize
    idx = batch * 4
    if op == "lookup":
        return 2 * rows + idx
    if op == "lookup+max_norm":
        return 4 * rows + idx
    if op == "grad":
        return table + 3 * rows + idx
    if op.startswith("bag-"):
        return rows + (batch // bag_size) * dim * itemsize + idx
    if op == "train-dense":
        return 8 * table + 4 * rows + idx
    if op.startswith("train-sparse-"):
        state_rows = {"sgd": 0, "adagrad": 2 * rows, "rowwise_adagrad": 2 * batch * 4}
        state = state_rows.get(op.removeprefix("train-sparse-"), 4 * rows)
        return 3 * rows + 2 * rows + state + idx
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


def bandwidth(nbytes: float, ms: float) -> float:
    """Bytes per second."""
    return nbytes / (ms / 1e3)


# --- timing ----------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Case:
    """One implementation of one op: a jitted function, its arguments, and how it carries state."""

    def __init__(self, fn: Callable, args: tuple, *, carry: bool = False, donate: tuple = ()):
        self.fn = jax.jit(fn, donate_argnums=donate)
        self.args, self.carry = args, carry

    def compile_ms(self) -> float:
        """Compiles (trace, lower, XLA) and keeps the executable that the timed calls then run."""
        t0 = time.perf_counter()
        self.fn = self.fn.lower(*self.args).compile()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self):
        out = self.fn(*self.args)
        if self.carry:  # a training step: its first outputs are the next step's first inputs
            self.args = tuple(out[: len(out) - 1]) + self.args[len(out) - 1 :]
        return out


class TorchCase:
    def __init__(self, fn: Callable, sync: Callable | None):
        self.fn, self.sync = fn, sync

    def compile_ms(self) -> float:
        return 0.0

    def __call__(self):
        out = self.fn()
        if self.sync is not None:
            self.sync()
        return out


# --- the implementations -----------------------------------------------------------------------


def train_loss(rows: jax.Array, target: jax.Array) -> jax.Array:
    """The training ops' loss: ``0.5 * mean((rows - target) ** 2)``."""
    return 0.5 * jnp.mean((rows.astype(jnp.float32) - target) ** 2)


def sparse_train_step(opt: sparse.RowOptimizer) -> Callable:
    """``(table, state, ids, target) -> (table, state, loss)`` with a row-wise optimizer."""

    def step(table, state, ids, target):
        rows, lk = sparse.lookup({"weight": table}, ids)
        loss, row_grads = jax.value_and_grad(train_loss)(rows, target)
        table, state = opt.update(lk.grad(row_grads), state, lk.params["weight"])
        return table, state, loss

    return step


def dense_train_step(tx: optax.GradientTransformation) -> Callable:
    """The same step with ``tx`` on the dense gradient; ``state = tx.init({"weight": table})``."""

    def step(table, state, ids, target):
        params = {"weight": table}
        loss, grads = jax.value_and_grad(
            lambda p: train_loss(jaxembed.embedding(p, ids)[0], target)
        )(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates)["weight"], state, loss

    return step


# the one-hot lookup builds a (batch, vocab) matrix: past this many elements it is left out
ONE_HOT_MAX_ELEMENTS = 2**26


def _jax_cases(op: str, table, ids, bags, cot, target) -> dict[str, Case]:
    cases = _all_jax_cases(op, table, ids, bags, cot, target)
    if ids.shape[0] * table.shape[0] > ONE_HOT_MAX_ELEMENTS:
        cases = {k: v for k, v in cases.items() if not k.endswith(":one_hot")}
    return cases


def _all_jax_cases(op: str, table, ids, bags, cot, target) -> dict[str, Case]:
    params = {"weight": table}
    if op in ("lookup", "lookup+max_norm"):
        kw = {"max_norm": 1.0} if op == "lookup+max_norm" else {}
        # with max_norm the renormed table is the state a step hands on (donated, as in training)
        cases = {
            f"jaxembed:{style}": Case(
                lambda p, i, s=style: jaxembed.embedding(p, i, lookup_style=s, **kw)[::-1],
                ({"weight": table + 0} if kw else params, ids),
                carry=bool(kw),
                donate=(0,) if kw else (),
            )
            for style in ("gather", "one_hot")
        }
        if not kw:
            cases["jnp.take"] = Case(lambda w, i: jnp.take(w, i, axis=0), (table, ids))
        return cases
    if op == "grad":

        def grad(lookup):
            return jax.grad(
                lambda p, i: jnp.sum(jaxembed.embedding(p, i, lookup_style=lookup)[0] * cot)
            )

        return {
            "jaxembed:gather": Case(grad("gather"), (params, ids)),
            "jaxembed:one_hot": Case(grad("one_hot"), (params, ids)),
            "jnp.take": Case(
                jax.grad(lambda w, i: jnp.sum(jnp.take(w, i, axis=0) * cot)), (table, ids)
            ),
        }
    if op.startswith("bag-"):
        mode = op.removeprefix("bag-")
        reduce = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[mode]
        return {
            "jaxembed:gather": Case(
                lambda p, b: jaxembed.embedding_bag(p, b, mode=mode)[0], (params, bags)
            ),
            "jaxembed:one_hot": Case(
                lambda p, b: jaxembed.embedding_bag(p, b, mode=mode, lookup_style="one_hot")[0],
                (params, bags),
            ),
            "jnp.take+reduce": Case(
                lambda w, b: reduce(jnp.take(w, b, axis=0), axis=1), (table, bags)
            ),
        }
    if op == "train-dense":
        tx = optax.adam(LR)
        state = tx.init({"weight": table})
        return {
            "optax.adam (dense)": Case(
                dense_train_step(tx), (table + 0, state, ids, target), carry=True, donate=(0, 1)
            )
        }
    if op.startswith("train-sparse-"):
        opt = getattr(sparse, op.removeprefix("train-sparse-"))(LR)
        step = sparse_train_step(opt)
        return {
            "jaxembed.sparse": Case(
                step, (table + 0, opt.init(table), ids, target), carry=True, donate=(0, 1)
            )
        }
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


BASELINE = {
    "lookup": "jnp.take",
    "lookup+max_norm": "torch",
    "grad": "jnp.take",
    "train-dense": "torch",
}


def _baseline(op: str) -> str:
    if op.startswith("bag-"):
        return "jnp.take+reduce"
    if op.startswith("train-sparse-"):
        return "torch"
    return BASELINE[op]


def _torch_cases(op, table_np, ids_np, bags_np, cot_np, target_np, device) -> dict[str, TorchCase]:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    if table_np.dtype != np.float32:
        return {}
    sync = torch.cuda.synchronize if device == "cuda" else None
    w = torch.from_numpy(table_np.copy()).to(device)
    ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)
    if op == "lookup":
        return {"torch": TorchCase(lambda: F.embedding(ids, w), sync)}
    if op == "lookup+max_norm":
        return {"torch": TorchCase(lambda: F.embedding(ids, w, max_norm=1.0), sync)}
    if op == "grad":
        wg = w.clone().requires_grad_()
        cot = torch.from_numpy(cot_np).to(device)

        def grad():
            wg.grad = None
            (F.embedding(ids, wg) * cot).sum().backward()
            return wg.grad

        return {"torch": TorchCase(grad, sync)}
    if op.startswith("bag-"):
        bags = torch.from_numpy(bags_np.astype(np.int64)).to(device)
        mode = op.removeprefix("bag-")
        return {"torch": TorchCase(lambda: F.embedding_bag(bags, w, mode=mode), sync)}
    if op.startswith("train-"):
        name = op.removeprefix("train-sparse-")
        torch_opt = {"sgd": "SGD", "adagrad": "Adagrad", "lazy_adam": "SparseAdam"}
        if op == "train-dense":
            emb, make = torch.nn.Embedding.from_pretrained(w, freeze=False), torch.optim.Adam
        elif name in torch_opt:
            emb = torch.nn.Embedding.from_pretrained(w, freeze=False, sparse=True)
            make = getattr(torch.optim, torch_opt[name])
        else:
            return {}
        opt = make(emb.parameters(), lr=LR)
        target = torch.from_numpy(target_np).to(device)

        def step():
            opt.zero_grad(set_to_none=True)
            (0.5 * ((emb(ids) - target) ** 2).mean()).backward()
            opt.step()

        return {"torch": TorchCase(step, sync)}
    return {}


# --- one run -----------------------------------------------------------------------------------


def _copy_bandwidth(table: jax.Array, repeat: int) -> float:
    """Read + write of a large on-device buffer: the table, or 128 MiB if that is larger (small
    copies measure launch overhead, not bandwidth)."""
    n = max(table.size, 2**27 // table.dtype.itemsize)
    state = [jnp.zeros((n,), table.dtype)]
    copy = jax.jit(lambda w: w + 1, donate_argnums=0)  # in place: no fresh buffer to fault in
    nbytes = state[0].nbytes

    def step():
        state[0] = copy(state[0])
        return state[0]

    jax.block_until_ready(step())
    return bandwidth(2 * nbytes, _median_ms(step, max(repeat, 3)))


def _peak_memory(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats (CPU) raise or return None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run(config: dict[str, Any], ops: list[str], progress: Callable[[str], None] | None = None):
    """Times every implementation of every op at one configuration; returns result dicts."""
    V, D, N = config["vocab"], config["dim"], config["batch"]
    bag_size = config["bag_size"]
    dtype = DTYPES[config["dtype"]]
    device = jax.devices(config["backend"])[0] if config["backend"] else jax.devices()[0]
    rng = np.random.default_rng(0)
    with jax.default_device(device):
        table = jax.jit(lambda k: jax.random.normal(k, (V, D), dtype))(jax.random.key(0))
        ids_np = rng.integers(0, V, N).astype(np.int32)
        bags_np = ids_np[: (N // bag_size) * bag_size].reshape(-1, bag_size)
        cot_np = rng.normal(size=(N, D)).astype(np.float32)
        ids, bags = jnp.asarray(ids_np), jnp.asarray(bags_np)
        cot, target = jnp.asarray(cot_np, dtype), jnp.asarray(cot_np)
        copy_bw = _copy_bandwidth(table, config["repeat"])
        table_np = np.asarray(table) if config["torch"] else None
        results = []
        for op in ops:
            cases = _jax_cases(op, table, ids, bags, cot, target)
            if table_np is not None:
                torch_device = "cuda" if device.platform == "gpu" else "cpu"
                cases.update(
                    _torch_cases(op, table_np, ids_np, bags_np, cot_np, cot_np, torch_device)
                )
            nbytes = op_bytes(op, V, D, N, jnp.dtype(dtype).itemsize, bag_size)
            times = {}
            for name, case in cases.items():
                if progress is not None:
                    progress(f"{op} / {name}")
                compile_ms = case.compile_ms()
                jax.block_until_ready(case())  # warm-up
                ms = _median_ms(case, config["repeat"])
                times[name] = ms
                results.append(
                    dict(
                        op=op,
                        impl=name,
                        ms=ms,
                        compile_ms=compile_ms,
                        bytes=nbytes,
                        gbps=bandwidth(nbytes, ms) / 1e9,
                        fraction=bandwidth(nbytes, ms) / copy_bw,
                        peak_bytes=_peak_memory(device),
                        **{k: config[k] for k in ("vocab", "dim", "batch", "dtype")},
                    )
                )
                del case
            base = times.get(_baseline(op))
            for r in results:
                if r["op"] == op and r["vocab"] == V and r["batch"] == N and r["dim"] == D:
                    r["vs_baseline"] = None if base is None else r["ms"] / base
                    r["baseline"] = _baseline(op) if base is not None else None
    return results, copy_bw


# --- output ------------------------------------------------------------------------------------


_CAPTION = (
    "ms: median; GB/s: the op's theoretical bytes (MB) / time; of copy: that as a share of the "
    "measured copy bandwidth; vs base: time / the op's baseline's time"
)


def _table(results: list[dict], copy_bw: float, title: str):
    from rich.table import Table

    t = Table(title=title, caption=_CAPTION)
    for col in ("op", "implementation", "ms", "compile ms", "GB/s", "of copy", "vs base", "MB"):
        t.add_column(
            col, justify="left" if col in ("op", "implementation") else "right", no_wrap=True
        )
    for r in results:
        ratio = "" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}x"
        if r["impl"] == r.get("baseline"):
            ratio += " (base)"
        t.add_row(
            r["op"],
            r["impl"],
            f"{r['ms']:.3f}",
            f"{r['compile_ms']:.0f}",
            f"{r['gbps']:.1f}",
            f"{100 * r['fraction']:.0f}%",
            ratio,
            f"{r['bytes'] / 1e6:.1f}",
        )
    return t


def _plot(path: str, results: list[dict], key: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'jaxembed[bench]'") from None
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = sorted({(r["op"], r["impl"]) for r in results})
    for op, impl in lines:
        pts = sorted(
            (r[key], r["ms"], r["fraction"]) for r in results if r["op"] == op and r["impl"] == impl
        )
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] for p in pts], marker="o", label=f"{op}: {impl}")
        ax_f.plot(xs, [100 * p[2] for p in pts], marker="o", label=f"{op}: {impl}")
    for ax, label in ((ax_t, "median time (ms)"), (ax_f, "% of measured copy bandwidth")):
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_f.legend(fontsize=7, loc="best")
    fig.suptitle(f"jaxembed-bench on {jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parse_sweep(text: str | None) -> tuple[str | None, list[int]]:
    if not text:
        return None, []
    key, _, values = text.partition("=")
    if key not in ("vocab", "batch", "dim") or not values:
        raise SystemExit(f"--sweep must look like vocab=1e4,1e5 (or batch=, dim=), got {text!r}")
    return key, [int(float(v)) for v in values.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="jaxembed-bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16_384, help="indices per call")
    ap.add_argument("--bag-size", type=int, default=16, help="indices per bag for bag-*")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--backend", default=None, help="cpu, gpu, tpu: what jax.devices() offers")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--sweep", help="vary one size: vocab=1e4,1e5,1e6 (or batch=..., dim=...)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG of time and bandwidth fraction vs the sweep")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown ops {bad}; choose from {', '.join(OPS)}")
    if args.repeat < 1 or args.batch < args.bag_size or min(args.vocab, args.dim) < 1:
        ap.error("sizes and --repeat must be positive, and --batch at least --bag-size")
    key, values = _parse_sweep(args.sweep)
    base = dict(
        vocab=args.vocab,
        dim=args.dim,
        batch=args.batch,
        bag_size=args.bag_size,
        dtype=args.dtype,
        backend=args.backend,
        repeat=args.repeat,
        torch=not args.no_torch,
    )
    configs = [{**base, key: v} for v in values] if key else [base]

    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=max(Console().width, 120))
    device = jax.devices(args.backend)[0] if args.backend else jax.devices()[0]
    all_results, copies = [], []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("jaxembed-bench", total=len(configs) * len(ops))
        for config in configs:
            seen = set()

            def progress(label, config=config, seen=seen):
                op = label.split(" / ")[0]
                if op not in seen:
                    seen.add(op)
                    bar.advance(task)
                bar.update(task, description=f"{config['vocab']:,}x{config['dim']} {label}")

            results, copy_bw = run(config, ops, progress)
            all_results += results
            copies.append(copy_bw)
            console.print(
                _table(
                    results,
                    copy_bw,
                    f"V={config['vocab']:,} D={config['dim']} batch={config['batch']:,} "
                    f"{config['dtype']} on {device.device_kind} ({device.platform}); measured copy "
                    f"bandwidth {copy_bw / 1e9:.1f} GB/s",
                )
            )
    if args.json:
        import jaxlib

        doc = dict(
            device=dict(
                kind=device.device_kind,
                platform=device.platform,
                count=len(jax.devices(device.platform)),
            ),
            versions=dict(
                jax=jax.__version__,
                jaxlib=jaxlib.__version__,
                jaxembed=jaxembed.__version__,
                python=platform.python_version(),
            ),
            config=dict(base, ops=ops, sweep=args.sweep),
            copy_bandwidth_gbps=[c / 1e9 for c in copies],
            results=all_results,
        )
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        _plot(args.plot, all_results, key or "vocab")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
