"""The DLRM of ``examples/dlrm.py`` on a mesh: 26 tables placed by ``jaxembed.plan``.

Each device holds a slice of the batch and a share of the tables, as the planner places them
(by its cost model, every table in one row-wise group: each id routed to the device owning its
row); it prints the layout. The tables train with sparse row-wise Adagrad (each device updates
its own rows), the MLPs data-parallel with Adam, in one jitted step.

    python examples/dlrm_sharded.py --devices 8    # 8 fake CPU devices (XLA_FLAGS is set here)
    python examples/dlrm_sharded.py --devices 0    # every real device (GPUs, TPUs)
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices; 0: the real ones")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=512, help="the global batch")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--cap", type=int, default=200_000, help="cap on each table's rows")
    ap.add_argument("--memory", type=float, default=None, help="MiB per device for the plan")
    ap.add_argument("--replicate-below", type=float, default=1024, help="KiB: tables to replicate")
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args(argv)
    if args.devices and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxembed
    from jaxembed import sharding as S

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dlrm import CRITEO, MLP, NUM_DENSE, Data, auc

    k = jax.device_count() if not args.devices else args.devices
    if jax.device_count() < k:
        raise SystemExit(f"{k} devices asked for, {jax.device_count()} here (import jax later)")
    if args.batch % k:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {k} devices")
    mesh = jax.make_mesh((k,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:k])
    rows = [min(c, args.cap) for c in CRITEO]
    tables = [
        jaxembed.EmbeddingBagConfig(f"t{i}", args.dim, r, [f"cat_{i}"], pooling="mean")
        for i, r in enumerate(rows)
    ]
    tx = jaxembed.sparse.rowwise_adagrad(0.05)
    memory = None if args.memory is None else int(args.memory * 2**20)
    plan = jaxembed.plan(tables, mesh, optimizer=tx, batch_size=args.batch,
                         pooling_factors=2.0, memory_per_device=memory,
                         replicate_below=int(args.replicate_below * 1024))  # fmt: skip
    print(plan)

    # one data stream per device: each device's block of the batch
    local = args.batch // k
    streams = [Data(rows, local, seed=d) for d in range(k)]
    held_out = [Data(rows, local, seed=1000 + d) for d in range(k)]
    split = NamedSharding(mesh, P("x"))

    def next_batch(sources):
        parts = [s.next() for s in sources]
        features = S.put_features([p[0] for p in parts], plan)
        dense = jax.device_put(jnp.concatenate([p[1] for p in parts]), split)
        labels = jax.device_put(jnp.concatenate([p[2] for p in parts]), split)
        return features, dense, labels

    class Dense(nnx.Module):  # the bottom and top MLPs and the interaction
        def __init__(self, rngs):
            self.bottom = MLP([NUM_DENSE, 64, args.dim], rngs=rngs)
            n = len(rows) + 1
            self.top = MLP([args.dim + n * (n - 1) // 2, 64, 1], rngs=rngs, last_relu=False)

        def __call__(self, pooled, dense):
            x = self.bottom(dense)
            feats = jnp.stack([x] + [pooled[f"cat_{i}"] for i in range(len(rows))], axis=1)
            inter = jnp.einsum("bfd,bgd->bfg", feats, feats)
            i, j = np.triu_indices(feats.shape[1], k=1)
            return self.top(jnp.concatenate([x, inter[:, i, j]], axis=1))[:, 0]

    graph, weights = nnx.split(Dense(nnx.Rngs(0)))
    adam = optax.adam(1e-3)
    adam_state = adam.init(weights)
    params = S.init(jax.random.key(0), plan)
    opt = S.optimizer(tx, plan)
    state = opt.init(params)

    def bce(weights, pooled, dense, labels):
        logits = nnx.merge(graph, weights)(pooled, dense)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    @jax.jit
    def step(params, state, weights, adam_state, features, dense, labels):
        pooled, lk = S.lookup(params, features, plan)
        loss, (g_weights, g_pooled) = jax.value_and_grad(bce, argnums=(0, 1))(
            weights, pooled, dense, labels
        )
        params, state = opt.update(lk.grad(g_pooled), state, lk.params)
        updates, adam_state = adam.update(g_weights, adam_state, weights)
        return params, state, optax.apply_updates(weights, updates), adam_state, loss

    @jax.jit
    def predict(params, weights, features, dense):
        pooled, _ = S.embedding_bag_collection(params, features, plan)
        return nnx.merge(graph, weights)(pooled, dense)

    step = jax.jit(step, donate_argnums=(0, 1, 2, 3))
    eval_batch = next_batch(held_out)
    print(f"{len(rows)} tables, {sum(rows):,} rows x {args.dim}; batch {args.batch} over {k} "
          f"devices")  # fmt: skip
    losses, aucs, t0 = [], [], time.perf_counter()
    for i in range(1, args.steps + 1):
        params, state, weights, adam_state, loss = step(
            params, state, weights, adam_state, *next_batch(streams)
        )
        losses.append(float(loss))
        if i % args.eval_every == 0 or i == args.steps:
            score = auc(eval_batch[2], predict(params, weights, *eval_batch[:2]))
            aucs.append((i, score))
            recent = np.mean(losses[-args.eval_every :])
            print(f"step {i:5d}  loss {recent:.4f}  held-out AUC {score:.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s")
    return {"losses": losses, "aucs": aucs, "plan": plan}


if __name__ == "__main__":
    main(sys.argv[1:])
