"""``jaxembed-bench --allocator glibc,tcmalloc``: the same run under each malloc, side by side.

On CPU, XLA's per-call temporaries of 32 MiB or more go through glibc's ``mmap`` and fault in
every page on every call; an allocator that keeps freed memory (tcmalloc) skips that. The
allocator can only be chosen when a process starts (``LD_PRELOAD``), so each one gets a fresh
run of the bench, and this compares their JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# where Debian and Ubuntu put libtcmalloc-minimal4 (apt-get install libtcmalloc-minimal4)
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)


def current() -> str:
    """The allocator this process runs with: ``glibc``, or what ``LD_PRELOAD`` names."""
    preload = os.environ.get("LD_PRELOAD", "").strip()
    return os.path.basename(preload) if preload else "glibc"


def resolve(name: str) -> str | None:
    """The library to preload for ``name`` (None for glibc); ``SystemExit`` if it is not found."""
    if name == "glibc":
        return None
    if name == "tcmalloc":
        for path in TCMALLOC_PATHS:
            if os.path.exists(path):
                return path
        raise SystemExit(
            "--allocator tcmalloc: libtcmalloc_minimal.so.4 not found "
            f"(looked in {', '.join(TCMALLOC_PATHS)}); on Debian: "
            "apt-get install libtcmalloc-minimal4, or pass the library's path"
        )
    if os.path.exists(name):
        return os.path.abspath(name)
    raise SystemExit(f"--allocator: {name!r} is neither glibc, tcmalloc nor a library's path")


def _without(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _option(argv: list[str], option: str) -> str | None:
    for k, arg in enumerate(argv):
        if arg == option and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def rerun(argv: list[str], spec: str) -> int:
    """Runs the bench once per allocator in ``spec`` and prints their times side by side.

    With ``--json``, that file holds ``{"allocators": {name: that run's JSON}}``.
    """
    names = [n.strip() for n in spec.split(",") if n.strip()]
    libraries = {name: resolve(name) for name in names}
    out_json = _option(argv, "--json")
    child_argv = _without(_without(argv, "--allocator"), "--json")
    child_argv = _without(child_argv, "--plot")
    docs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, library in libraries.items():
            env = dict(os.environ)
            env.pop("LD_PRELOAD", None)
            if library is not None:
                env["LD_PRELOAD"] = library
            path = os.path.join(tmp, f"{len(docs)}.json")
            print(f"--- allocator: {name}" + (f" ({library})" if library else ""), flush=True)
            cmd = [sys.executable, "-m", "jaxembed.bench", *child_argv, "--json", path]
            code = subprocess.call(cmd, env=env)
            if code:
                return code
            with open(path) as f:
                docs[name] = json.load(f)
    _compare(docs)
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"allocators": docs}, f, indent=1)
    return 0


def _compare(docs: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(docs)
    t = Table(
        title="the same runs under each allocator (median ms)",
        caption=f"ratio: {names[0]} time / each other allocator's time (>1: that one is faster)",
    )
    for col in (
        "op",
        "implementation",
        "ids",
        "V",
        *names,
        *(f"{names[0]}/{n}" for n in names[1:]),
    ):
        t.add_column(col, justify="left" if col in ("op", "implementation", "ids") else "right")
    rows: dict[tuple, dict[str, float]] = {}
    for name, doc in docs.items():
        for r in doc["results"]:
            rows.setdefault((r["op"], r["impl"], r["ids"], r["vocab"]), {})[name] = r["ms"]
    for (op, impl, ids, vocab), ms in rows.items():
        times = [f"{ms[n]:.2f}" if n in ms else "-" for n in names]
        ratios = [
            f"{ms[names[0]] / ms[n]:.2f}x" if names[0] in ms and n in ms else "-" for n in names[1:]
        ]
        t.add_row(op, impl, ids, f"{vocab:,}", *times, *ratios)
    Console(width=160).print(t)
