"""Serving the DLRM example over localhost: the exported artifact against the training code.

    python examples/serve.py                       # ~2 minutes on 2 CPU cores
    python examples/serve.py --steps 300 --batches 1,16,128,1024 --requests 300

It trains the DLRM of ``examples/dlrm.py`` for ``--steps`` steps and then serves it two ways,
each from a server process of its own that answers batched requests over a localhost socket:

* **artifact**: the forward pass exported with :func:`jaxembed.serving.export` (a symbolic batch
  and ids capacity: one artifact for every batch size), its tables in ``.safetensors``; the
  server loads it with :func:`jaxembed.serving.load` and never sees the model's code;
* **kernels**: the same export with ``kernels=True``, where jaxembed's CPU kernels are built:
  the live program through the StableHLO (its server needs jaxembed, with the kernels);
* **live**: the training code's ``DLRM`` class, rebuilt in the server and restored from a
  :func:`jaxembed.checkpoint.save` of the trained state, its forward pass under ``jax.jit``
  (the model split once; ``nnx.jit`` would split it again on every request, a few ms).

A client sends the same requests (Criteo-shaped batches of ``--batches`` samples) to each,
in rotating order, and times each round trip: request out, scores back. It checks that every server
returns the same scores (bit for bit on the pure-JAX path; within float rounding where the live
model runs the CPU kernels), prints p50 and p99 latency and throughput per batch size, and
plots them.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the wire: a 4-byte length, then an .npz of named arrays ------------------------------------


def send(sock: socket.socket, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    sock.sendall(struct.pack("<I", len(data)) + data)


def receive(sock: socket.socket) -> dict[str, np.ndarray] | None:
    head = _exactly(sock, 4)
    if head is None:
        return None
    data = _exactly(sock, struct.unpack("<I", head)[0])
    with np.load(io.BytesIO(data)) as npz:
        return {k: npz[k] for k in npz.files}


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(n - got, 1 << 20))
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# -- the servers --------------------------------------------------------------------------------


def serve(predict, port_file: str) -> None:
    """Answers requests ``{values, lengths, dense}`` with ``{scores}``, one connection at a time,
    until the client hangs up."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        with open(port_file + ".tmp", "w") as f:
            f.write(str(server.getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)  # the client waits for this file
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (request := receive(conn)) is not None:
                scores = predict(request["values"], request["lengths"], request["dense"])
                send(conn, scores=np.asarray(scores))


def serve_artifact(folder: str, port_file: str) -> None:
    import jax.numpy as jnp

    import jaxembed

    served = jaxembed.serving.load(folder)  # the StableHLO and its tables; no model code
    serve(lambda v, n, d: served(jnp.asarray(v), jnp.asarray(n), jnp.asarray(d)), port_file)


def serve_live(folder: str, port_file: str, cap: int, dim: int) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxembed

    sys.path.insert(0, HERE)
    from dlrm import CRITEO, DLRM

    rows = [min(c, cap) for c in CRITEO]
    model = DLRM(rows, dim, rngs=nnx.Rngs(0))  # the training code's model, restored
    graphdef, like = nnx.split(model)
    state = jaxembed.checkpoint.restore(folder, like)
    keys = model.embeddings.feature_names

    # split once, merged inside jax.jit: nnx.jit would split the model again on every request
    @jax.jit
    def predict(state, values, lengths, dense):
        kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths)
        return jax.nn.sigmoid(nnx.merge(graphdef, state)(kj, dense))

    serve(lambda v, n, d: predict(state, jnp.asarray(v), jnp.asarray(n), jnp.asarray(d)), port_file)


def start(kind: str, folder: str, args) -> tuple[subprocess.Popen, socket.socket]:
    port_file = os.path.join(folder, f"{kind}.port")
    mode, where = {
        "artifact": ("artifact", folder),
        "kernels": ("artifact", os.path.join(folder, "kernels")),
        "live": ("live", folder),
    }[kind]
    cmd = [sys.executable, os.path.abspath(__file__), f"--serve-{mode}", where, port_file]
    cmd += ["--cap", str(args.cap), "--dim", str(args.dim)]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 300
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the {kind} server did not start")
        time.sleep(0.05)
    sock = socket.create_connection(("127.0.0.1", int(open(port_file).read())))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proc, sock


# -- the client ---------------------------------------------------------------------------------


def requests(rows, batch, n, seed):
    """``n`` Criteo-shaped request batches, their ids padded to one power-of-two capacity."""
    sys.path.insert(0, HERE)
    from dlrm import NUM_DENSE

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = np.minimum(rng.zipf(1.5, (len(rows), batch)), 8)
        values = np.concatenate(
            [(rng.zipf(1.1, int(k.sum())) - 1) % r for r, k in zip(rows, lengths, strict=True)]
        )
        dense = np.log1p(rng.lognormal(0, 1, (batch, NUM_DENSE))).astype(np.float32)
        out.append((values.astype(np.int32), lengths.reshape(-1).astype(np.int32), dense))
    capacity = 1 << (max(len(v) for v, _, _ in out) - 1).bit_length()
    return [(np.pad(v, (0, capacity - len(v))), n_, d) for v, n_, d in out]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--cap", type=int, default=200_000)
    ap.add_argument("--batches", default="1,16,128,1024")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--plot", default="serve_latency.png")
    ap.add_argument("--serve-artifact", nargs=2, metavar=("FOLDER", "PORT_FILE"))
    ap.add_argument("--serve-live", nargs=2, metavar=("FOLDER", "PORT_FILE"))
    args = ap.parse_args(argv)
    if args.serve_artifact:
        return serve_artifact(*args.serve_artifact)
    if args.serve_live:
        return serve_live(*args.serve_live, args.cap, args.dim)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxembed

    sys.path.insert(0, HERE)
    import dlrm

    trained = dlrm.main(
        ["--steps", str(args.steps), "--dim", str(args.dim), "--cap", str(args.cap), "--plot", ""]
        + ["--eval-every", str(max(args.steps, 1))]
    )
    model = trained["model"]
    rows = [min(c, args.cap) for c in dlrm.CRITEO]
    keys = model.embeddings.feature_names
    graphdef, state = nnx.split(model)

    def forward(state, values, lengths, dense):
        kj = jaxembed.KeyedJagged.from_lengths(keys, values, lengths)
        return jax.nn.sigmoid(nnx.merge(graphdef, state)(kj, dense))

    b, c = jaxembed.serving.symbolic_shape("b, c")
    specs = (
        jax.ShapeDtypeStruct((c,), jnp.int32),
        jax.ShapeDtypeStruct((len(keys) * b,), jnp.int32),
        jax.ShapeDtypeStruct((b, dlrm.NUM_DENSE), jnp.float32),
    )
    kinds = ["artifact", "live"]
    with tempfile.TemporaryDirectory() as folder:
        jaxembed.serving.export(forward, state, *specs).save(folder)
        if jaxembed.kernels.available():  # the same program as live, through the StableHLO
            kinds.insert(1, "kernels")
            jaxembed.serving.export(forward, state, *specs, kernels=True).save(f"{folder}/kernels")
        jaxembed.checkpoint.save(folder, 0, state)  # what the live server restores
        servers = {kind: start(kind, folder, args) for kind in kinds}
        results = {}
        try:
            for batch in (int(x) for x in args.batches.split(",")):
                reqs = requests(rows, batch, args.requests + 3, seed=batch)
                times = {kind: [] for kind in servers}
                for r, (v, n, d) in enumerate(reqs):
                    answers = {}
                    order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # rotate
                    for kind in order:
                        sock = servers[kind][1]
                        t0 = time.perf_counter()
                        send(sock, values=v, lengths=n, dense=d)
                        answers[kind] = receive(sock)["scores"]
                        if r >= 3:  # the first three compile
                            times[kind].append((time.perf_counter() - t0) * 1e3)
                    for kind in answers:
                        np.testing.assert_allclose(
                            answers[kind], answers["live"], rtol=1e-5, atol=1e-6, err_msg=kind
                        )
                results[batch] = {
                    k: (np.percentile(t, 50), np.percentile(t, 99)) for k, t in times.items()
                }
        finally:
            for proc, sock in servers.values():
                sock.close()
                proc.wait(timeout=60)
    head = ("batch", "server", "p50 ms", "p99 ms", "samples/s", "p50/live")
    print("{:>6} {:<9} {:>8} {:>8} {:>10} {:>9}".format(*head))
    for batch, by_kind in results.items():
        for kind, (p50, p99) in by_kind.items():
            ratio = p50 / by_kind["live"][0]
            print(
                f"{batch:>6} {kind:<9} {p50:>8.3f} {p99:>8.3f} {1e3 * batch / p50:>10.0f} "
                f"{ratio:>8.2f}x"
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b_) = plt.subplots(1, 2, figsize=(9, 3.5))
        batches = list(results)
        styles = {"artifact": "o-", "kernels": "^-", "live": "s--"}
        for i, kind in enumerate(kinds):
            p50 = [results[x][kind][0] for x in batches]
            p99 = [results[x][kind][1] for x in batches]
            a.plot(batches, p50, styles[kind], color=f"C{i}", label=f"{kind} p50")
            a.plot(batches, p99, styles[kind], color=f"C{i}", alpha=0.35, label=f"{kind} p99")
            b_.plot(batches, [1e3 * x / t for x, t in zip(batches, p50, strict=True)],
                    styles[kind], color=f"C{i}", label=kind)  # fmt: skip
        a.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms", title="latency")
        b_.set(xscale="log", yscale="log", xlabel="batch", ylabel="samples/s", title="throughput")
        a.legend(fontsize=7)
        b_.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
