"""Makes the site's figures under docs/_static/figures/, each stamped with its machine.

    pip install -e '.[docs,bench-baselines]'
    python docs/make_figures.py              # all of them, about 2 minutes on 2 CPU cores
    python docs/make_figures.py placement    # one of: bench_sweep, bench_bars, dlrm, skipgram,
                                             # pipeline, placement

Run it alone on the machine, as every benchmark here: the bench figures are timings. The
diagrams (pipeline, placement) are drawn from the code's own objects, and time nothing.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "figures"


def machine() -> str:
    """The processor and the versions, for every figure's footer."""
    import jax

    import jaxembed
    from jaxembed.bench import _report

    return (
        f"{_report.machine(jax.devices()[0])}; jax {jax.__version__}, jaxembed "
        f"{jaxembed.__version__}, {jaxembed.bench.kernels_path()}"
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stamp(src: pathlib.Path, dst: pathlib.Path, note: str) -> None:
    """``src`` re-saved as ``dst`` with ``note`` (the machine, the command) under it."""
    plt = _plt()
    img = plt.imread(src)
    h, w = img.shape[:2]
    fig = plt.figure(figsize=(w / 110, h / 110 + 0.45), dpi=110)
    ax = fig.add_axes((0, 0.45 / (h / 110 + 0.45), 1, 1 - 0.45 / (h / 110 + 0.45)))
    ax.imshow(img)
    ax.axis("off")
    fig.text(0.01, 0.01, note, fontsize=7, color="0.3", wrap=True)
    fig.savefig(dst, dpi=110)
    plt.close(fig)


def _plotted(out: str, program: list[str], shown: str, args: list[str]) -> None:
    """Runs ``program *args --plot TMP`` (without ``XLA_FLAGS``: one device) and saves its PNG as
    ``out``, stamped with ``shown *args`` and the machine."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with tempfile.TemporaryDirectory() as tmp:
        png = pathlib.Path(tmp) / out
        cmd = [sys.executable, *program, *args, "--plot", str(png)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        _stamp(png, OUT / out, f"{shown} {' '.join(args)}  |  {machine()}")


def bench_sweep() -> None:
    """Lookup and bag-sum time and bandwidth against the vocabulary, with torch's beside."""
    args = ["--ops", "lookup,bag-sum", "--sweep", "vocab=1e3,1e4,1e5,1e6", "--dim", "64"]
    args += ["--batch", "16384", "--repeat", "15"]
    _plotted("bench_sweep.png", ["-m", "jaxembed.bench"], "jaxembed-bench", args)


def bench_bars() -> None:
    """jaxembed against torch and FBGEMM at one size, lookups, bags and sparse steps."""
    ops = "lookup,bag-sum,bag-max,train-sparse-sgd,train-sparse-rowwise_adagrad"
    ops += ",train-bag-rowwise_adagrad"
    args = ["--ops", ops, "--vocab", "1000000", "--dim", "64", "--batch", "16384"]
    args += ["--ids", "uniform,zipf:1.15", "--repeat", "7"]
    _plotted("bench_bars.png", ["-m", "jaxembed.bench"], "jaxembed-bench", args)


def dlrm() -> None:
    """The DLRM example's loss and held-out AUC."""
    args = ["--steps", "400", "--cap", "50000", "--eval-every", "50"]
    _plotted("dlrm_loss.png", ["examples/dlrm.py"], "python examples/dlrm.py", args)


def skipgram() -> None:
    """The skip-gram example's loss."""
    shown = "python examples/train_skipgram.py"
    _plotted("skipgram_loss.png", ["examples/train_skipgram.py"], shown, [])


# the layers of jaxembed/, top to bottom, and what each may import (tests/test_package.py)
LAYERS = [
    (
        "entry points",
        [
            "modules: Embedding, EmbeddingBag,\ncollections (nnx, linen)",
            "serving: export,\nArtifact, load",
            "bench: jaxembed-bench",
            "_interop: torch, safetensors",
        ],
    ),
    (
        "many tables",
        [
            "collections: KeyedJagged, stacking",
            "sharding: TableSharding,\nplan, placements",
            "quantized: QuantizedTable",
        ],
    ),
    ("training", ["sparse: lookup, SparseGrad, row-wise optimizers, value_and_grad"]),
    (
        "core",
        [
            "embedding, embedding_bag,\nrenorm, init",
            "LookupOptions (static)",
            "the pipeline: one lookup body",
            "Layout: one device, or a mesh",
        ],
    ),
    (
        "kernels",
        [
            "CPU kernels (C++, XLA FFI): gather,\nbag sum/mean/max, row-wise step",
            "else the pure-JAX path (GPU, TPU, no compiler)",
        ],
    ),
]
PIPELINE = [
    "ids",
    "index policy\n(out of range -> sentinel)",
    "max_norm renorm\n(referenced rows)",
    "gather / bag\n(kernel or XLA)",
    "rows, bags\n+ new params",
    "gradient\n(dense or SparseGrad)",
]


def pipeline() -> None:
    """A diagram: the layers of jaxembed/, and the one lookup pipeline every entry point runs."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 8.5), height_ratios=(3.2, 1))
    colors = ["#dbe9f6", "#e3f1df", "#fbeed5", "#f6dede", "#e8e1f3"]
    for i, (layer, parts) in enumerate(LAYERS):
        y = len(LAYERS) - 1 - i
        ax.text(-0.15, y + 0.4, layer, ha="right", va="center", fontsize=11, weight="bold")
        width = 10 / len(parts)
        for j, part in enumerate(parts):
            ax.add_patch(
                plt.Rectangle(
                    (j * width + 0.05, y + 0.05),
                    width - 0.1,
                    0.7,
                    facecolor=colors[i],
                    edgecolor="0.4",
                )
            )
            ax.text(
                j * width + width / 2,
                y + 0.4,
                part,
                ha="center",
                va="center",
                fontsize=9,
                wrap=True,
            )
        if i < len(LAYERS) - 1:
            ax.annotate(
                "",
                xy=(10.25, y - 0.2),
                xytext=(10.25, y + 0.4),
                arrowprops=dict(arrowstyle="->", color="0.4"),
            )
    ax.text(
        10.4,
        2.2,
        "a folder imports\nfrom its own row\nor the rows below",
        fontsize=8,
        color="0.3",
        va="center",
    )
    ax.set_xlim(-2.0, 11.5)
    ax.set_ylim(-0.2, len(LAYERS))
    ax.axis("off")
    ax.set_title("The layers of jaxembed/ (each folder's __init__ says what it may import)")
    for k, step in enumerate(PIPELINE):
        bx.add_patch(
            plt.Rectangle((k * 2 + 0.1, 0.1), 1.6, 0.8, facecolor=colors[3], edgecolor="0.4")
        )
        bx.text(k * 2 + 0.9, 0.5, step, ha="center", va="center", fontsize=8.5)
        if k < len(PIPELINE) - 1:
            bx.annotate(
                "",
                xy=(k * 2 + 2.1, 0.5),
                xytext=(k * 2 + 1.7, 0.5),
                arrowprops=dict(arrowstyle="->", color="0.4"),
            )
    bx.set_xlim(0, len(PIPELINE) * 2)
    bx.set_ylim(0, 1)
    bx.axis("off")
    bx.set_title("One lookup (core/_pipeline.py), run by every entry point, on every layout")
    fig.tight_layout()
    fig.savefig(OUT / "pipeline.png", dpi=110)
    plt.close(fig)


def placement() -> None:
    """The planner's placement of 26 Criteo-shaped tables on 8 devices, and each one's memory."""
    code = f"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import sys
sys.path.insert(0, {str(ROOT / "docs")!r})
import make_figures
make_figures._placement_in_process()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _placement_in_process() -> None:
    import jax
    import numpy as np

    import jaxembed

    sys.path.insert(0, str(ROOT / "examples"))
    from dlrm import CRITEO  # the DLRM example's 26 cardinalities

    plt = _plt()
    tables = [
        jaxembed.EmbeddingBagConfig(f"t{i}", 64, min(r, 1_000_000), [f"cat_{i}"])
        for i, r in enumerate(CRITEO)
    ]
    mesh = jax.make_mesh((8,), ("model",))
    tx = jaxembed.sparse.rowwise_adagrad(0.01)
    plan = jaxembed.plan(tables, mesh, optimizer=tx, batch_size=4096)
    kinds = ["data_parallel", "table_wise", "row_wise", "column_wise"]
    colors = dict(zip(kinds, ["#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc"], strict=True))
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 11), height_ratios=(3, 1), sharex=True)
    for y, t in enumerate(tables):
        group = plan.group_of(t.name)
        kind = group.kind.value
        device, _ = group.where(t.name)
        cells = range(8) if device is None else [device]
        for d in cells:
            share = 1.0 if kind in ("data_parallel", "table_wise") else 1 / 8
            ax.add_patch(
                plt.Rectangle(
                    (d, y),
                    0.95,
                    0.9,
                    facecolor=colors[kind],
                    alpha=0.35 + 0.65 * share,
                    edgecolor="white",
                )
            )
        ax.text(
            -0.1,
            y + 0.45,
            f"{t.name} ({t.num_embeddings:,} rows)",
            ha="right",
            va="center",
            fontsize=7.5,
        )
    ax.set_xlim(-3.2, 8)
    ax.set_ylim(len(tables), 0)
    ax.set_yticks([])
    ax.set_xticks([d + 0.47 for d in range(8)], [f"device {d}" for d in range(8)])
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colors[k]) for k in kinds]
    bx.legend(
        handles,
        [k.replace("_", "-") for k in kinds],
        loc="upper left",
        fontsize=8,
        title="placement (faint: a 1/8 share)",
    )
    ax.set_title(
        "jaxembed.plan: 26 Criteo-shaped tables (D = 64, capped at 10^6 rows), "
        "row-wise Adagrad, on 8 devices"
    )
    memory = np.asarray(plan.memory(tx)) / 2**20
    bx.bar([d + 0.47 for d in range(8)], memory, width=0.9, color="0.6")
    bx.set_ylabel("tables + optimizer\nstate (MiB)")
    bx.grid(True, axis="y", alpha=0.3)
    fig.text(
        0.01, 0.005, f"docs/make_figures.py placement  |  {machine()}", fontsize=7, color="0.3"
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(OUT / "placement.png", dpi=110)
    plt.close(fig)


FIGURES = {
    "pipeline": pipeline,
    "placement": placement,
    "skipgram": skipgram,
    "dlrm": dlrm,
    "bench_sweep": bench_sweep,
    "bench_bars": bench_bars,
}


def main(argv: list[str]) -> int:
    names = argv or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        FIGURES[name]()
        print("made", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
