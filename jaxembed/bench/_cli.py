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
import sys

import jax

from jaxembed.bench import _allocator, _plot, _report, _run
from jaxembed.bench._cases import DTYPES, OPS
from jaxembed.bench._ids import parse_ids


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
    """The ``jaxembed-bench`` command: parses ``argv`` (``sys.argv[1:]`` when None), runs every
    configuration it names, prints a table for each, writes ``--json`` and ``--plot``, and
    returns the exit status (``--allocator`` re-runs the command under each allocator instead).
    """
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

            results, copy_bw, missing = _run.run(config, ops, progress)
            all_results += results
            copies.append(copy_bw)
            skipped += [m for m in missing if m not in skipped]
            unique = results[0]["unique_ids"] if results else 0
            console.print(
                _report.table(
                    results,
                    f"V={config['vocab']:,} D={config['dim']} batch={config['batch']:,} "
                    f"{config['dtype']}, {config['ids']} ids ({unique:,} unique) on "
                    f"{_report.machine(device)}; measured copy bandwidth "
                    f"{copy_bw / 1e9:.1f} GB/s; {_run.kernels_path()}",
                )
            )
    for op, name, why in skipped:
        console.print(f"baseline left out: {op} / {name}: {why}")
    if args.json:
        config = dict(base, ops=ops, ids=id_specs, sweep=args.sweep)
        doc = _report.json_doc(device, config, copies, all_results, skipped)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        _plot.plot(
            args.plot,
            all_results,
            key,
            f"jaxembed-bench on {_report.machine(device)}, {_run.kernels_path()}, "
            f"{_allocator.current()} malloc",
        )
    return 0
