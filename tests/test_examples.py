"""Each example runs, with tiny flags."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_notebook(capsys):
    _load("seed_notebook").main()
    out = capsys.readouterr().out
    assert "row norms after looking up [7]" in out
    # the last norms printed: rows 0, 1, 3, 4 and 7 renormed to 1, the padding row 0
    last = out.split("row norms after looking up [7]")[1].strip().split("\n\n")[0]
    last = last.strip("[]").split()
    norms = np.array([float(x) for x in last])
    np.testing.assert_allclose(norms[[0, 1, 3, 4, 7]], 1.0, atol=1e-4)
    assert norms[2] == 0
    # the functional half shows the same pattern: looked-up rows over max_norm end at norm 1
    functional = out.split("## The same with the functional core")[1]
    blocks = functional.split("row norms after looking up [7]")
    assert len(blocks) == 2
    norms = np.array([float(x) for x in blocks[1].strip().split("\n\n")[0].strip("[]").split()])
    assert np.all(norms[[0, 1, 3, 4, 7]] <= 1 + 1e-4) and norms[2] == 0


def test_train_skipgram_tiny(tmp_path):
    plot = tmp_path / "loss.png"
    result = _load("train_skipgram").main(
        ["--steps", "150", "--batch", "64", "--dim", "16", "--vocab", "500", "--plot", str(plot)]
    )
    losses = result["losses"]
    assert len(losses) == 150 and np.isfinite(losses).all()
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert result["neighbours"]  # some query words are in a 500-word vocabulary


@pytest.mark.slow  # the README's command runs the smaller examples; CI runs this one
def test_dlrm_tiny(tmp_path):
    plot = tmp_path / "dlrm.png"
    result = _load("dlrm").main(
        ["--steps", "40", "--batch", "64", "--dim", "4", "--cap", "500", "--eval-every", "20",
         "--plot", str(plot)]
    )  # fmt: skip
    losses = result["losses"]
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert [step for step, _ in result["aucs"]] == [20, 40]
    assert all(0 <= a <= 1 for _, a in result["aucs"])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_drifting_ids_tiny(tmp_path):
    plot = tmp_path / "drift.png"
    history = _load("drifting_ids").main(
        ["--steps", "60", "--batch", "256", "--slots", "512", "--universe", "20000",
         "--interval", "5", "--drift", "2", "--plot", str(plot)]
    )  # fmt: skip
    assert len(history["managed"]) == 60 and np.isfinite(history["managed"]).all()
    assert all(0 <= h <= 1 for h in history["hit"])
    evicting = [k for k, n in enumerate(history["evicted"]) if n]
    assert evicting and all(k % 5 == 4 for k in evicting)  # every 5th call evicts
    assert np.mean(history["managed"][-20:]) < np.mean(history["managed"][:5])
    # held ids keep rows of their own, where id % V shares them (fixed seeds)
    assert np.mean(history["managed"][-20:]) < np.mean(history["hashed"][-20:])
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_serve_tiny(tmp_path):
    """Two (three, with the kernels) server processes answer over localhost, every one with the
    live model's scores (the example asserts it on every request)."""
    plot = tmp_path / "serve.png"
    results = _load("serve").main(
        ["--steps", "5", "--cap", "500", "--dim", "4", "--batches", "1,8", "--requests", "5",
         "--plot", str(plot)]
    )  # fmt: skip
    assert sorted(results) == [1, 8]
    for by_kind in results.values():
        assert {"artifact", "live"} <= set(by_kind)
        assert all(0 < p50 <= p99 for p50, p99 in by_kind.values())
    assert plot.read_bytes()[:4] == b"\x89PNG"
