"""jaxembed-bench: the roofline arithmetic, and the command end to end at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    with pytest.raises(ValueError, match="unknown op"):
        bench.op_bytes("lookup+nothing", V, D, N, b)


def test_bandwidth():
    assert bench.bandwidth(2e9, 1000.0) == 2e9
    assert bench.bandwidth(1e6, 0.5) == 2e9


def test_sweep_parsing_and_bad_arguments():
    assert bench._parse_sweep("vocab=1e3,2000") == ("vocab", [1000, 2000])
    with pytest.raises(SystemExit):
        bench._parse_sweep("width=1,2")
    with pytest.raises(SystemExit):
        bench.main(["--ops", "lookup,teleport"])
    with pytest.raises(SystemExit):
        bench.main(["--batch", "4", "--bag-size", "16"])


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
    doc = json.loads(out_json.read_text())
    assert doc["device"]["platform"] == "cpu" and doc["versions"]["jax"]
    assert doc["config"]["ops"] == list(bench.OPS)
    assert len(doc["copy_bandwidth_gbps"]) == 2
    results = doc["results"]
    assert {r["vocab"] for r in results} == {32, 64}
    assert {r["op"] for r in results} == set(bench.OPS)
    impls = {(r["op"], r["impl"]) for r in results}
    assert {("lookup", "jnp.take"), ("lookup", "jaxembed:one_hot"), ("lookup", "torch")} <= impls
    for r in results:
        assert r["ms"] > 0 and r["bytes"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] / 1e3) / 1e9)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
