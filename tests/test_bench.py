"""jaxembed-bench: the roofline arithmetic, and the command end to end at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxembed import bench


def test_op_bytes():
    V, D, N, b = 1000, 8, 64, 4
    rows = N * D * b
    assert bench.op_bytes("lookup", V, D, N, b) == 2 * rows + 4 * N
    assert bench.op_bytes("lookup+max_norm", V, D, N, b) == 4 * rows + 4 * N
    assert bench.op_bytes("grad", V, D, N, b) == V * D * b + 3 * rows + 4 * N
    assert bench.op_bytes("bag-sum", V, D, N, b, bag_size=16) == rows + 4 * D * b + 4 * N
    assert bench.op_bytes("train-dense", V, D, N, b) == 8 * V * D * b + 4 * rows + 4 * N
    assert bench.op_bytes("train-sparse-sgd", V, D, N, b) == 5 * rows + 4 * N
    assert bench.op_bytes("train-sparse-lazy_adam", V, D, N, b) == 9 * rows + 4 * N
    assert bench.op_bytes("train-sparse-rowwise_adagrad", V, D, N, b) == 5 * rows + 12 * N
    # bfloat16 halves the bytes of every row
    assert bench.op_bytes("lookup", V, D, N, 2) == rows + 4 * N
    assert bench.op_bytes("remap", V, D, N, b) == 24 * N  # ids in, held entries read, rows out
    with pytest.raises(ValueError, match="unknown op"):
        bench.op_bytes("lookup+nothing", V, D, N, b)


def test_bandwidth():
    assert bench.bandwidth(2e9, 1000.0) == 2e9
    assert bench.bandwidth(1e6, 0.5) == 2e9


def test_sweep_parsing_and_bad_arguments():
    assert bench._cli._parse_sweep("vocab=1e3,2000") == ("vocab", [1000, 2000])
    with pytest.raises(SystemExit):
        bench._cli._parse_sweep("width=1,2")
    with pytest.raises(SystemExit):
        bench.main(["--ops", "lookup,teleport"])
    with pytest.raises(SystemExit):
        bench.main(["--batch", "4", "--bag-size", "16"])


@pytest.mark.slow  # every op, compiled twice: CI runs it; the quicker CLI tests stay
def test_command_end_to_end_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "jaxembed.bench",
        "--vocab",
        "64",
        "--dim",
        "4",
        "--batch",
        "32",
        "--bag-size",
        "4",
        "--repeat",
        "1",
        "--sweep",
        "vocab=32,64",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--ops",
        ",".join(bench.OPS),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "COLUMNS": "160"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "measured copy bandwidth" in res.stdout and "train-sparse-lazy_adam" in res.stdout
    assert "Sparse invariant checks" not in res.stdout + res.stderr
    doc = json.loads(out_json.read_text())
    assert doc["device"]["platform"] == "cpu" and doc["versions"]["jax"]
    assert doc["config"]["ops"] == list(bench.OPS)
    assert len(doc["copy_bandwidth_gbps"]) == 2
    results = doc["results"]
    assert {r["vocab"] for r in results} == {32, 64}
    assert {r["op"] for r in results} == set(bench.OPS)
    impls = {(r["op"], r["impl"]) for r in results}
    assert {("lookup", "jnp.take"), ("lookup", "jaxembed:one_hot"), ("lookup", "torch")} <= impls
    remaps = {("remap", "jaxembed.collisions"), ("remap", "lookup"), ("remap", "torchrec MCH")}
    assert remaps <= impls
    for r in results:
        assert r["ms"] > 0 and r["bytes"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] / 1e3) / 1e9)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bench_json(tmp_path, *args):
    out = tmp_path / "bench.json"
    assert bench.main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("op", ["lookup", "bag-sum"])
def test_the_lookup_times_the_lookup_not_a_copy_of_the_table(op):
    # what is timed must not write the table anew: its compiled executable allocates only
    # what the rows need (a copy of the 51 MB table would show as an output or a temp)
    import jax.numpy as jnp

    from jaxembed.bench._cases import jax_cases

    V, D, B, bag = 200_000, 64, 16_384, 16
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((V, D), dtype=np.float32))
    ids = jnp.asarray(bench.make_ids("uniform", V, B, rng))
    bags = ids.reshape(B // bag, bag)
    cot = jnp.ones((B, D), jnp.float32)
    cases = jax_cases(op, table, ids, bags, cot, cot, jnp.ones((B // bag, D), jnp.float32))
    assert {"jaxembed:gather"} < set(cases)
    rows = (B if op == "lookup" else B // bag) * D * 4
    for name, case in cases.items():
        mem = case.fn.lower(*case.args).compile().memory_analysis()
        assert mem.output_size_in_bytes == rows, name
        assert mem.temp_size_in_bytes < table.nbytes // 8, (name, mem.temp_size_in_bytes)


def test_ids_distributions():
    rng = np.random.default_rng(0)
    uniform = bench.make_ids("uniform", 100_000, 65_536, rng)
    zipf = bench.make_ids("zipf:1.15", 100_000, 65_536, rng)
    assert uniform.dtype == zipf.dtype == np.int32
    assert 0 <= zipf.min() and zipf.max() < 100_000
    # heavy-tailed: far fewer distinct rows, and the hottest row takes a large share
    assert len(np.unique(zipf)) < 0.5 * len(np.unique(uniform))
    assert np.bincount(zipf).max() > 100 * np.bincount(uniform).max()
    # the head follows the law: rank 1 is drawn about 2**alpha times as often as rank 2
    counts = np.sort(np.bincount(bench.make_ids("zipf:1.0", 1000, 200_000, rng)))[::-1]
    assert 1.8 < counts[0] / counts[1] < 2.2
    for bad in ("zipf", "zipf:0", "zipf:-1", "pareto:2", "zipf:x"):
        with pytest.raises(ValueError, match="ids must be"):
            bench.parse_ids(bad)
    with pytest.raises(SystemExit):
        bench.main(["--ids", "zipf:nope"])


def test_skewed_ids_and_the_fbgemm_baseline_without_a_sweep_draw_bars(tmp_path):
    png = tmp_path / "bars.png"
    ops = "lookup,train-sparse-rowwise_adagrad,train-bag-rowwise_adagrad"
    doc = _bench_json(
        tmp_path,
        *("--vocab", "512", "--dim", "8", "--batch", "256", "--bag-size", "8", "--repeat", "2"),
        *("--ids", "uniform,zipf:1.2", "--ops", ops, "--plot", str(png)),
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["config"]["ids"] == ["uniform", "zipf:1.2"]
    unique = {r["ids"]: r["unique_ids"] for r in doc["results"]}
    assert 0 < unique["zipf:1.2"] < unique["uniform"] <= 256
    impls = {(r["op"], r["impl"], r["ids"]) for r in doc["results"]}
    for ids in ("uniform", "zipf:1.2"):
        assert ("train-bag-rowwise_adagrad", "jaxembed.sparse", ids) in impls
        if not doc["skipped"]:  # FBGEMM installed: its fused step is the baseline
            assert ("train-bag-rowwise_adagrad", "fbgemm TBE", ids) in impls
    for r in doc["results"]:
        if r["op"].startswith("train-") and "rowwise" in r["op"] and not doc["skipped"]:
            assert r["baseline"] == "fbgemm TBE" and r["vs_baseline"] > 0


def test_a_missing_baseline_is_left_out_and_said(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fbgemm(name, *args, **kwargs):
        if name.startswith("fbgemm_gpu"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fbgemm)
    table = np.zeros((8, 2), np.float32)
    ids = np.arange(8, dtype=np.int32)
    found, missing = bench._baselines.cases(
        "train-bag-rowwise_adagrad", table, ids, ids.reshape(2, 4), table, table[:2], "cpu", 0.1
    )
    assert "fbgemm TBE" not in found
    assert "bench-baselines" in missing["fbgemm TBE"]


def test_help_shows_every_default():
    text = bench._cli._parser().format_help()
    for option in ("--vocab", "--dim", "--batch", "--dtype", "--repeat", "--ids", "--allocator"):
        assert option in text
    assert text.count("(default:") >= 8


def test_allocator_run_compares_runs(tmp_path, capsys):
    out = tmp_path / "alloc.json"
    args = ["--vocab", "64", "--dim", "4", "--batch", "32", "--repeat", "1", "--ops", "lookup"]
    assert bench.main([*args, "--no-torch", "--allocator", "glibc", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["allocators"]) == {"glibc"}
    assert doc["allocators"]["glibc"]["allocator"] == "glibc"
    with pytest.raises(SystemExit, match="neither glibc"):
        bench._allocator.resolve("/no/such/malloc.so")
