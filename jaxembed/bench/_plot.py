"""``--plot``: the run's figure, bars per op, or lines against a swept size."""

from __future__ import annotations


def _colors(n: int) -> list:
    """``n`` distinct colours (matplotlib's tab20, then evenly spaced hues past 20)."""
    import matplotlib

    if n <= 20:
        return [matplotlib.colormaps["tab20"](k) for k in range(n)]
    return [matplotlib.colormaps["hsv"](k / n) for k in range(n)]


def plot(path: str, results: list[dict], key: str | None, title: str):
    """A PNG: with a sweep, time and share of copy bandwidth against the swept size, a line per
    (op, implementation); without one, horizontal bars, a group per op, a colour per
    implementation; ``title`` names the machine and the path that ran."""
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
    plt.gcf().suptitle(title, y=1.02)
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
