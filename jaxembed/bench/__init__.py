"""``jaxembed-bench``: how close each embedding path runs to the device's memory bandwidth.

    jaxembed-bench                                   # every op at small sizes, ~1 min on 2 cores
    jaxembed-bench --vocab 1000000 --dim 128 --batch 65536 --ops lookup,bag-sum,train-sparse-sgd
    jaxembed-bench --ops lookup --sweep vocab=1e3,1e4,1e5,1e6 --plot lookup.png --json out.json
    python -m jaxembed.bench --help

Method: each (op, implementation) is jit-compiled first (the compile time is reported on its
own), run once more to warm up, then timed ``--repeat`` times with ``block_until_ready``, the
implementations of an op in interleaved rounds; the median is reported. What is timed is what a
training step does: the state it hands on (the table, the optimizer state) is donated, and only
the outputs an op really produces are returned (an undonated table returned from ``jit`` would
time a copy of it). The device's copy bandwidth is measured in the same run (a large on-device
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
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed
from jaxembed import sparse
from jaxembed.bench import _allocator, _baselines

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
    "train-bag-rowwise_adagrad",
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
    * ``train-bag-rowwise_adagrad``: bags of ``bag_size`` summed, then row-wise Adagrad: read the
      rows, read the bags' target, read and write the touched rows and their accumulators.
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
    if op == "train-bag-rowwise_adagrad":
        bags = (batch // bag_size) * dim * itemsize
        return 3 * rows + bags + 2 * batch * 4 + idx
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


def bandwidth(nbytes: float, ms: float) -> float:
    """Bytes per second."""
    return nbytes / (ms / 1e3)


# --- timing ----------------------------------------------------------------------------------


def make_ids(spec: str, vocab: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` int32 ids in ``[0, vocab)`` drawn as ``spec`` says.

    * ``"uniform"``: every row equally likely.
    * ``"zipf:ALPHA"``: heavy-tailed, as real traffic is: the row of rank ``k`` (from 0) is drawn
      with probability proportional to ``1 / (k + 1) ** ALPHA`` (any ``ALPHA > 0``: a finite
      vocabulary needs no ``ALPHA > 1``), and the ranks sit at random rows of the table.

    Example:
      >>> import numpy as np
      >>> from jaxembed import bench
      >>> ids = bench.make_ids("zipf:1.15", 1000, 10_000, np.random.default_rng(0))
      >>> ids.dtype, int(ids.min()) >= 0, int(ids.max()) < 1000, len(np.unique(ids)) < 1000
      (dtype('int32'), True, True, True)
    """
    kind, alpha = parse_ids(spec)
    if kind == "uniform":
        return rng.integers(0, vocab, n).astype(np.int32)
    cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -alpha)
    ranks = np.searchsorted(cdf, rng.uniform(0, cdf[-1], n), side="right")
    rows = rng.permutation(vocab)
    return rows[np.minimum(ranks, vocab - 1)].astype(np.int32)


def parse_ids(spec: str) -> tuple[str, float]:
    """``("uniform", 0.0)`` or ``("zipf", ALPHA)`` from ``--ids``; ``ValueError`` otherwise."""
    if spec == "uniform":
        return "uniform", 0.0
    kind, _, alpha = spec.partition(":")
    try:
        value = float(alpha)
    except ValueError:
        value = float("nan")
    if kind != "zipf" or not value > 0:
        raise ValueError(f"ids must be 'uniform' or 'zipf:ALPHA' with ALPHA > 0, got {spec!r}")
    return "zipf", value


def _interleaved_ms(cases: dict[str, Any], repeat: int) -> dict[str, float]:
    """Median ms of each case, timed in interleaved rounds (one call of each per round), so that
    a noisy neighbour slows every implementation alike and their ratios hold.

    Each round starts one case later than the last: torch's and FBGEMM's OpenMP threads spin for
    a while after their call, slowing whatever runs next, and the rotation spreads that evenly.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            case = cases[name]
            t0 = time.perf_counter()
            jax.block_until_ready(case())
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


# the floor of a sparse step: its lookup, loss and rows' gradient, with no update at all
FLOOR = "floor: take+loss+grad"


def floor_step(pool: Callable) -> Callable:
    """``(table, ids, target) -> (loss, rows' gradient)`` with ``jnp.take``: what any sparse step
    must at least do (the ``FLOOR`` row of the training ops; ``pool`` reduces bags)."""

    def step(table, ids, target):
        return jax.value_and_grad(lambda r: train_loss(pool(r), target))(
            jnp.take(table, ids, axis=0)
        )

    return step


def sparse_bag_train_step(opt: sparse.RowOptimizer) -> Callable:
    """``(table, state, bags, target) -> (table, state, loss)``: bags summed by
    :func:`jaxembed.sparse.lookup_bags`, then ``opt`` on the bags' gradient (on CPU the update
    kernel spreads it as it reads it)."""

    def step(table, state, bags, target):
        pooled, lk = sparse.lookup_bags({"weight": table}, bags, mode="sum")
        loss, bag_grads = jax.value_and_grad(lambda b: train_loss(b, target))(pooled)
        table, state = opt.update(lk.grad(bag_grads), state, lk.params["weight"])
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


def _jax_cases(op: str, table, ids, bags, cot, target, bag_target) -> dict[str, Case]:
    cases = _all_jax_cases(op, table, ids, bags, cot, target, bag_target)
    if ids.shape[0] * table.shape[0] > ONE_HOT_MAX_ELEMENTS:
        cases = {k: v for k, v in cases.items() if not k.endswith(":one_hot")}
    return cases


def _all_jax_cases(op: str, table, ids, bags, cot, target, bag_target) -> dict[str, Case]:
    params = {"weight": table}
    if op == "lookup":
        # only the rows: returning the (undonated) params too would time a copy of the table
        cases = {
            f"jaxembed:{style}": Case(
                lambda p, i, s=style: jaxembed.embedding(p, i, lookup_style=s)[0], (params, ids)
            )
            for style in ("gather", "one_hot")
        }
        cases["jnp.take"] = Case(lambda w, i: jnp.take(w, i, axis=0), (table, ids))
        return cases
    if op == "lookup+max_norm":
        # the renormed table is the state a step hands on: donated, in place, as in training
        return {
            f"jaxembed:{style}": Case(
                lambda p, i, s=style: jaxembed.embedding(p, i, lookup_style=s, max_norm=1.0)[::-1],
                ({"weight": table + 0}, ids),
                carry=True,
                donate=(0,),
            )
            for style in ("gather", "one_hot")
        }
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
            ),
            FLOOR: Case(floor_step(lambda rows: rows), (table, ids, target)),
        }
    if op == "train-bag-rowwise_adagrad":
        opt = sparse.rowwise_adagrad(LR)
        return {
            "jaxembed.sparse": Case(
                sparse_bag_train_step(opt),
                (table + 0, opt.init(table), bags, bag_target),
                carry=True,
                donate=(0, 1),
            ),
            FLOOR: Case(floor_step(lambda rows: rows.sum(1)), (table, bags, bag_target)),
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
    if op in ("train-sparse-rowwise_adagrad", "train-bag-rowwise_adagrad"):
        return "fbgemm TBE"
    if op.startswith("train-sparse-"):
        return "torch"
    return BASELINE[op]


# --- one run -----------------------------------------------------------------------------------


def kernels_path() -> str:
    """Which path jaxembed's CPU ops run here, for a benchmark's header: the kernels and their
    instruction set, or the pure-JAX path and why (:mod:`jaxembed.kernels`).

    Example:
      >>> import jaxembed
      >>> jaxembed.bench.kernels_path().startswith(("CPU kernels", "pure-JAX path"))
      True
    """
    if jaxembed.kernels.available():
        return f"CPU kernels ({jaxembed.kernels.status()})"
    return f"pure-JAX path ({jaxembed.kernels.status()})"


def copy_bandwidth(table: jax.Array, repeat: int = 5) -> float:
    """The device's copy bandwidth in bytes/s (read + write): a donated ``x + 1`` in place on a
    buffer of ``table``'s dtype, as large as the table or 128 MiB, whichever is larger (small
    copies measure launch overhead, not bandwidth; a fresh output would measure page faults).

    Example:
      >>> import jax.numpy as jnp, jaxembed
      >>> jaxembed.bench.copy_bandwidth(jnp.zeros((4, 2)), repeat=1) > 0
      True
    """
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
    """Times every implementation of every op at one configuration.

    Returns ``(results, copy_bandwidth, skipped)``: a dict per (op, implementation), the measured
    copy bandwidth in bytes/s, and ``(op, baseline, why)`` for each baseline left out.
    """
    V, D, N = config["vocab"], config["dim"], config["batch"]
    bag_size = config["bag_size"]
    dtype = DTYPES[config["dtype"]]
    device = jax.devices(config["backend"])[0] if config["backend"] else jax.devices()[0]
    rng = np.random.default_rng(0)
    with jax.default_device(device):
        table = jax.jit(lambda k: jax.random.normal(k, (V, D), dtype))(jax.random.key(0))
        ids_np = make_ids(config["ids"], V, N, rng)
        unique = len(np.unique(ids_np))
        bags_np = ids_np[: (N // bag_size) * bag_size].reshape(-1, bag_size)
        cot_np = rng.normal(size=(N, D)).astype(np.float32)
        bag_target_np = cot_np[: bags_np.shape[0]].copy()
        ids, bags = jnp.asarray(ids_np), jnp.asarray(bags_np)
        cot, target = jnp.asarray(cot_np, dtype), jnp.asarray(cot_np)
        bag_target = jnp.asarray(bag_target_np)
        copy_bw = copy_bandwidth(table, config["repeat"])
        table_np = np.asarray(table) if config["torch"] else None
        results, skipped = [], []
        for op in ops:
            cases: dict[str, Any] = _jax_cases(op, table, ids, bags, cot, target, bag_target)
            if table_np is not None:
                found, missing = _baselines.cases(
                    op,
                    table_np,
                    ids_np,
                    bags_np,
                    cot_np,
                    bag_target_np,
                    "cuda" if device.platform == "gpu" else "cpu",
                    LR,
                )
                cases.update(found)
                skipped += [(op, name, why) for name, why in missing.items()]
            compile_ms = {}
            for name, case in cases.items():
                if progress is not None:
                    progress(f"{op} / {name}")
                compile_ms[name] = case.compile_ms()
                for _ in range(3):  # warm-up: the first calls fault in fresh pages
                    jax.block_until_ready(case())
            times = _interleaved_ms(cases, config["repeat"])
            del cases
            nbytes = op_bytes(op, V, D, N, jnp.dtype(dtype).itemsize, bag_size)
            base = times.get(_baseline(op))
            for name, ms in times.items():
                results.append(
                    dict(
                        op=op,
                        impl=name,
                        ms=ms,
                        compile_ms=compile_ms[name],
                        bytes=nbytes,
                        gbps=bandwidth(nbytes, ms) / 1e9,
                        fraction=bandwidth(nbytes, ms) / copy_bw,
                        peak_bytes=_peak_memory(device),
                        vs_baseline=None if base is None else ms / base,
                        baseline=_baseline(op) if base is not None else None,
                        ids=config["ids"],
                        unique_ids=unique,
                        **{k: config[k] for k in ("vocab", "dim", "batch", "dtype")},
                    )
                )
    return results, copy_bw, skipped


# --- output ------------------------------------------------------------------------------------


_CAPTION = (
    "ms: the median of --repeat calls, timed in interleaved rounds. compile ms: trace, lowering "
    "and XLA compile, apart (0 for torch). GB/s: the op's theoretical bytes (MB: what it must at "
    "least read and write) / its time. of copy: that as a share of the copy bandwidth measured "
    "in this run on a buffer of at least 128 MiB; past 100% the op's data stayed in cache (a "
    "small table or batch), which the large copy cannot. vs base: time / the op's baseline's "
    "time (its row says (base)); - where the baseline did not run."
)


def _table(results: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title, caption=_CAPTION)
    columns = ("op", "implementation", "ms", "compile ms", "GB/s", "of copy", "vs base", "MB")
    for col in columns:
        t.add_column(
            col, justify="left" if col in ("op", "implementation") else "right", no_wrap=True
        )
    for r in results:
        ratio = "-" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}x"
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


def _colors(n: int) -> list:
    """``n`` distinct colours (matplotlib's tab20, then evenly spaced hues past 20)."""
    import matplotlib

    if n <= 20:
        return [matplotlib.colormaps["tab20"](k) for k in range(n)]
    return [matplotlib.colormaps["hsv"](k / n) for k in range(n)]


def _plot(path: str, results: list[dict], key: str | None):
    """A PNG: with a sweep, time and share of copy bandwidth against the swept size, a line per
    (op, implementation); without one, horizontal bars, a group per op, a colour per
    implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'jaxembed[bench]'") from None
    if key is None:
        _bars(plt, results)
    else:
        _lines(plt, results, key)
    plt.gcf().suptitle(f"jaxembed-bench on {jax.devices()[0].device_kind}", y=1.02)
    plt.gcf().savefig(path, dpi=110, bbox_inches="tight")
    plt.close("all")


def _group(r: dict) -> str:
    return r["op"] + ("" if r["ids"] == "uniform" else f" [{r['ids']}]")


def _bars(plt, results: list[dict]) -> None:
    groups = list(dict.fromkeys(_group(r) for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    colors = dict(zip(impls, _colors(len(impls)), strict=True))
    height = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.5 + 0.08 * len(groups) * max(len(impls), 4)))
    for ax, value, label in (
        (axes[0], lambda r: r["ms"], "median time (ms), log scale"),
        (axes[1], lambda r: 100 * r["fraction"], "% of measured copy bandwidth"),
    ):
        for k, impl in enumerate(impls):
            pts = [(groups.index(_group(r)), value(r)) for r in results if r["impl"] == impl]
            ax.barh(
                [g + (k - (len(impls) - 1) / 2) * height for g, _ in pts],
                [v for _, v in pts],
                height=height,
                color=colors[impl],
                label=impl if ax is axes[0] else None,
            )
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_xscale("log")
    axes[1].set_yticklabels([])
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="implementation")
    fig.tight_layout()


def _lines(plt, results: list[dict], key: str) -> None:
    series = list(dict.fromkeys((_group(r), r["impl"]) for r in results))
    colors = dict(zip(series, _colors(len(series)), strict=True))
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(13, 5))
    for s in series:
        pts = sorted(
            (r[key], r["ms"], r["fraction"]) for r in results if (_group(r), r["impl"]) == s
        )
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] for p in pts], marker="o", color=colors[s], label=f"{s[0]}: {s[1]}")
        ax_f.plot(xs, [100 * p[2] for p in pts], marker="o", color=colors[s])
    for ax, label in ((ax_t, "median time (ms)"), (ax_f, "% of measured copy bandwidth")):
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()


def _parse_sweep(text: str | None) -> tuple[str | None, list[int]]:
    if not text:
        return None, []
    key, _, values = text.partition("=")
    if key not in ("vocab", "batch", "dim") or not values:
        raise SystemExit(f"--sweep must look like vocab=1e4,1e5 (or batch=, dim=), got {text!r}")
    return key, [int(float(v)) for v in values.split(",")]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's layout and shows every option's default."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jaxembed-bench", description=__doc__, formatter_class=_Formatter
    )
    ap.add_argument("--vocab", type=int, default=100_000, help="rows of the table (V)")
    ap.add_argument("--dim", type=int, default=64, help="width of each row (D)")
    ap.add_argument("--batch", type=int, default=16_384, help="indices per call")
    ap.add_argument(
        "--bag-size", type=int, default=16, help="indices per bag for bag-* and train-bag-*"
    )
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the table's dtype")
    ap.add_argument("--ops", default="all", help="comma-separated, from: " + ", ".join(OPS))
    ap.add_argument(
        "--ids",
        default="uniform",
        help="how ids are drawn, comma-separated to run each: uniform, zipf:ALPHA (heavy-tailed: "
        "rank k with probability ~ 1/(k+1)**ALPHA), e.g. uniform,zipf:1.15",
    )
    ap.add_argument("--backend", default=None, help="cpu, gpu, tpu: what jax.devices() offers")
    ap.add_argument(
        "--repeat", type=int, default=10, help="timed calls per implementation (the median)"
    )
    ap.add_argument("--sweep", help="vary one size: vocab=1e4,1e5,1e6 (or batch=..., dim=...)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--plot",
        help="write a PNG: time and share of copy bandwidth against the --sweep, or bars without",
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the torch and FBGEMM baselines")
    ap.add_argument(
        "--allocator",
        default=None,
        help="re-run under each of these allocators and report both: 'glibc', and 'tcmalloc' "
        "or a path to a malloc library to LD_PRELOAD (comma-separated, e.g. glibc,tcmalloc)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    ops = list(OPS) if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown ops {bad}; choose from {', '.join(OPS)}")
    if args.repeat < 1 or args.batch < args.bag_size or min(args.vocab, args.dim) < 1:
        ap.error("sizes and --repeat must be positive, and --batch at least --bag-size")
    id_specs = [i.strip() for i in args.ids.split(",") if i.strip()]
    try:
        for spec in id_specs:
            parse_ids(spec)
    except ValueError as e:
        ap.error(str(e))
    if args.allocator:
        return _allocator.rerun(argv if argv is not None else sys.argv[1:], args.allocator)
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
    configs = [
        {**base, **({key: v} if key else {}), "ids": spec}
        for v in (values or [None])
        for spec in id_specs
    ]

    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=max(Console().width, 120))
    device = jax.devices(args.backend)[0] if args.backend else jax.devices()[0]
    all_results, copies, skipped = [], [], []
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

            results, copy_bw, missing = run(config, ops, progress)
            all_results += results
            copies.append(copy_bw)
            skipped += [m for m in missing if m not in skipped]
            unique = results[0]["unique_ids"] if results else 0
            console.print(
                _table(
                    results,
                    f"V={config['vocab']:,} D={config['dim']} batch={config['batch']:,} "
                    f"{config['dtype']}, {config['ids']} ids ({unique:,} unique) on "
                    f"{device.device_kind} ({device.platform}); measured copy bandwidth "
                    f"{copy_bw / 1e9:.1f} GB/s; {kernels_path()}",
                )
            )
    for op, name, why in skipped:
        console.print(f"baseline left out: {op} / {name}: {why}")
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
            allocator=_allocator.current(),
            kernels=dict(available=jaxembed.kernels.available(), status=jaxembed.kernels.status()),
            config=dict(base, ops=ops, ids=id_specs, sweep=args.sweep),
            copy_bandwidth_gbps=[c / 1e9 for c in copies],
            results=all_results,
            skipped=[dict(op=op, impl=name, why=why) for op, name, why in skipped],
        )
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        _plot(args.plot, all_results, key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
