"""Multi-host for real: 2 processes on localhost, 4 fake CPU devices each, train a collection.

``jax.distributed.initialize`` joins them (CPU collectives over gloo); each feeds its own devices'
blocks of the batch. After 3 sparse steps their tables equal this process's unsharded ones.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxembed

HERE = pathlib.Path(__file__).parent / "multihost"
sys.path.insert(0, str(HERE))
from case import batch, cotangents, tables  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes: CI runs it (-m slow)
@pytest.mark.parametrize("layout", ["1d", "2d"])  # 2d: replica x model, a replica a process
def test_two_processes_train_a_sharded_collection(tmp_path, layout):
    port, out = str(_free_port()), tmp_path / "tables.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), str(i), port, str(out), layout],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
        assert f"process {i}: done" in log
    assert ("table_wise@3" if layout == "2d" else "table_wise@5") in logs[0]  # the plan
    assert "bytes as the plan states" in logs[0]

    # the same collection, unsharded, in this process
    whole, _ = batch()
    params = jaxembed.collections.init(jax.random.key(0), tables(), stack=False)
    opt = jaxembed.collections.optimizer(jaxembed.sparse.rowwise_adagrad(0.1), tables(),
                                         stack=False)  # fmt: skip
    state = opt.init(params)
    cot = cotangents()
    for _ in range(3):
        _, lk = jaxembed.collections.lookup(params, whole, tables(), stack=False)
        params, state = opt.update(lk.grad(cot), state, lk.params)
    result = np.load(out)
    for t in tables():
        want = np.asarray(params[t.name]["weight"])
        # a routed owner, and a small replica's psum, add each device's per-row sums: a few ulp
        np.testing.assert_allclose(result[t.name], want, rtol=2e-6, atol=2e-7, err_msg=t.name)
        # saved by both processes, restored by both onto another plan: bit for bit
        np.testing.assert_array_equal(result[f"restored/{t.name}"], result[t.name], err_msg=t.name)
    assert "saved tables step_000000003" in logs[0]
