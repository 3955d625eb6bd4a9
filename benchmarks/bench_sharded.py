"""A table split over devices: per-device memory, and the step time against one device.

    python benchmarks/bench_sharded.py [--vocab 1048576 --dim 128 --batch 16384 --devices 8]

On a CPU it runs on ``--devices`` fake devices (requested before JAX starts); on a multi-GPU or
TPU host, pass ``--devices 0`` to use the real ones: the script is the same.

For each layout (``TableSharding``: rows over "model", the batch over "data") it compiles three
jitted, donated programs and reports, per device, what XLA's buffer assignment says they hold:

  * lookup: ``jaxembed.embedding`` forward;
  * dense step: lookup + loss + the table's (V, D) gradient + SGD (data parallel all-reduces it);
  * sparse step: ``sparse.lookup`` + loss + ``sparse.sharded(rowwise_adagrad)`` (O(batch)).

``table/dev`` is the bytes of the table shard on device 0, which must be V*D*4/shards;
``temp/dev`` is the program's temporaries on one device (XLA's ``memory_analysis``), which must
not grow with V for the lookup and the sparse step. Step times are medians of ``--repeat`` calls,
the one-device baseline (``unsharded``) run in the same process. On fake CPU devices all "devices"
share this machine's cores, so the times show overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:
    _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), None)
    if _n is None and "--devices" in sys.argv:
        _n = sys.argv[sys.argv.index("--devices") + 1]
    _n = "8" if _n is None else _n
    if _n != "0":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
        ).strip()

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed
from jaxembed import sparse

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_ms

MiB = 2**20


def programs(layout, vocab, dim, batch):
    """The three jitted steps for ``layout`` (None: one device), each with a function that makes
    fresh arguments (the steps donate theirs)."""
    rng = np.random.default_rng(0)
    ids_np = rng.integers(0, vocab, (batch,)).astype(np.int32)
    target_np = rng.normal(size=(batch, dim)).astype(np.float32)
    opt = sparse.rowwise_adagrad(0.1)
    if layout is not None:
        opt = sparse.sharded(opt, layout)

    def inputs():
        weight = jax.random.normal(jax.random.key(0), (vocab, dim), jnp.float32)
        if layout is None:
            return {"weight": weight}, jnp.asarray(ids_np), jnp.asarray(target_np)
        spec = jax.sharding.NamedSharding(layout.mesh, layout.output_spec(1))
        return (
            layout.put({"weight": weight}),
            layout.put_indices(ids_np),
            jax.device_put(target_np, spec),
        )

    def lookup(p, i):
        return jaxembed.embedding(p, i, max_norm=1.0, sharding=layout)

    def dense_step(p, i, t):
        def loss(p):
            out, new = jaxembed.embedding(p, i, max_norm=1.0, sharding=layout)
            return 0.5 * jnp.mean((out - t) ** 2), new

        grad, new = jax.grad(loss, has_aux=True)(p)
        return {"weight": new["weight"] - 0.1 * grad["weight"]}

    def sparse_step(p, s, i, t):
        rows, lk = sparse.lookup(p, i, max_norm=1.0, sharding=layout)
        row_grads = jax.grad(lambda r: 0.5 * jnp.mean((r - t) ** 2))(rows)
        table, s = opt.update(lk.grad(row_grads), s, lk.params["weight"])
        return {"weight": table}, s

    def sparse_inputs():
        p, i, t = inputs()
        return p, opt.init(p["weight"]), i, t

    return {
        "lookup": (jax.jit(lookup), lambda: inputs()[:2]),
        "dense step": (jax.jit(dense_step, donate_argnums=0), inputs),
        "sparse step": (jax.jit(sparse_step, donate_argnums=(0, 1)), sparse_inputs),
    }


def measure(layout, vocab, dim, batch, repeat):
    rows = []
    for name, (fn, make_args) in programs(layout, vocab, dim, batch).items():
        args = make_args()
        compiled = fn.lower(*args).compile()
        mem = compiled.memory_analysis()
        table = args[0]["weight"]
        shard = table.addressable_shards[0].data if layout is not None else table
        # a donated program consumes its inputs: each timed call feeds the previous outputs
        carry = {"args": args}

        def call(compiled=compiled, name=name, carry=carry):
            out = compiled(*carry["args"])
            jax.block_until_ready(out)
            if name == "dense step":
                carry["args"] = (out,) + carry["args"][1:]
            elif name == "sparse step":
                carry["args"] = out + carry["args"][2:]

        ms = median_ms(call, repeat)
        rows.append(
            dict(
                program=name,
                table_per_device_mib=shard.nbytes / MiB,
                temp_per_device_mib=mem.temp_size_in_bytes / MiB,
                args_per_device_mib=mem.argument_size_in_bytes / MiB,
                ms=ms,
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices; 0: the real ones")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    n = jax.device_count()
    print(f"{n} x {jax.devices()[0].device_kind}; V={args.vocab} D={args.dim} batch={args.batch}")
    full = args.vocab * args.dim * 4 / MiB
    print(f"table: {full:.0f} MiB; V*D*4/{n} = {full / n:.1f} MiB\n")
    layouts = {"unsharded (1 device)": None}
    for data in sorted({1, 2} & set(range(1, n + 1))):
        if n % data == 0:
            mesh = jax.make_mesh((data, n // data), ("data", "model"))
            name = f"vocab/{n // data} x batch/{data}"
            layouts[name] = jaxembed.TableSharding(mesh, vocab="model", batch="data")
    mesh = jax.make_mesh((n,), ("model",))
    layouts[f"dim/{n}"] = jaxembed.TableSharding(mesh, dim="model")

    results = {}
    header = (
        f"{'layout':<22} {'program':<12} {'table/dev':>10} {'temp/dev':>10} {'ms':>9} "
        f"{'vs 1 dev':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, layout in layouts.items():
        results[name] = measure(layout, args.vocab, args.dim, args.batch, args.repeat)
        for row, base in zip(results[name], results["unsharded (1 device)"], strict=True):
            print(
                f"{name:<22} {row['program']:<12} {row['table_per_device_mib']:>8.1f}Mi "
                f"{row['temp_per_device_mib']:>8.1f}Mi {row['ms']:>9.1f} "
                f"{row['ms'] / base['ms']:>8.2f}x"
            )
    return results


if __name__ == "__main__":
    main()
