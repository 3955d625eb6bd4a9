"""What a run prints and writes: the table on the terminal, and the JSON document."""

from __future__ import annotations

import os
import platform
from typing import Any

import jax

import jaxembed
from jaxembed.bench import _allocator

CAPTION = (
    "ms: the median of --repeat calls, timed in interleaved rounds. compile ms: trace, lowering "
    "and XLA compile, apart (0 for torch). GB/s: the op's theoretical bytes (MB: what it must at "
    "least read and write) / its time. of copy: that as a share of the copy bandwidth measured "
    "in this run on a buffer of at least 128 MiB; past 100% the op's data stayed in cache (a "
    "small table or batch), which the large copy cannot. vs base: time / the op's baseline's "
    "time (its row says (base)); - where the baseline did not run."
)


def table(results: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title, caption=CAPTION)
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


def machine(device) -> str:
    """The machine a run measures, for titles and the JSON: on CPU the processor's model and its
    logical cores (``/proc/cpuinfo``, else ``platform.processor()``), else the device's kind.

    Example:
      >>> import jax
      >>> from jaxembed.bench import _report
      >>> isinstance(_report.machine(jax.devices()[0]), str)
      True
    """
    if device.platform != "cpu":
        return f"{device.device_kind} ({device.platform})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def json_doc(device, config: dict[str, Any], copies: list[float], results, skipped) -> dict:
    """The ``--json`` document: the device, the versions, the allocator, the kernels' path, the
    configuration, the copy bandwidths (GB/s, one per configuration) and every result."""
    import jaxlib

    return dict(
        device=dict(
            kind=device.device_kind,
            machine=machine(device),
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
        config=config,
        copy_bandwidth_gbps=[c / 1e9 for c in copies],
        results=results,
        skipped=[dict(op=op, impl=name, why=why) for op, name, why in skipped],
    )
