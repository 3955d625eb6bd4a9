"""Train a model whose embedding table is split over a mesh of devices.

A click-through-rate style model: each example is a list of item ids (one Embedding, whose rows
are averaged) plus a user id (a bag of one, in an EmbeddingBag), and a linear head predicts a
label. Both tables are split by rows over the mesh axis "model" (vocab parallel) and the batch
over "data" (data parallel). The item table trains sparsely: each device updates only its own
looked-up rows, in place, with row-wise Adagrad.

On a CPU this runs on fake devices (the script asks for 8 before JAX starts)::

    python examples/sharded_training.py --mesh 2x4 --steps 200

On a GPU/TPU host the same code runs on the real devices. Across several hosts, start the same
script on every host with ``--multi-host`` (it calls ``jax.distributed.initialize()`` first);
nothing else changes: it is one SPMD program over the global mesh.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:  # fake CPU devices must be requested before JAX starts
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed


class CTRModel(nnx.Module):
    def __init__(self, num_items, num_users, dim, *, layout, rngs):
        self.items = jaxembed.Embedding(
            num_items, dim, padding_idx=0, max_norm=1.0, sparse=True, sharding=layout, rngs=rngs
        )
        self.users = jaxembed.EmbeddingBag(num_users, dim, mode="sum", sharding=layout, rngs=rngs)
        self.head = nnx.Linear(2 * dim, 1, rngs=rngs)

    def __call__(self, item_ids, user_ids):
        items = self.items(item_ids).mean(axis=1)  # (batch, dim)
        users = self.users(user_ids)  # one bag of one user id each
        return self.head(jnp.concatenate([items, users], axis=-1))[:, 0]


def make_data(rng, num_items, num_users, batch, bag):
    """Items with a hidden score; the label says whether the bag's mean score is positive."""
    score = rng.normal(size=num_items)
    items = rng.integers(1, num_items, size=(batch, bag))
    items[:, -2:] = np.where(rng.random((batch, 2)) < 0.3, 0, items[:, -2:])  # some padding
    users = rng.integers(0, num_users, size=(batch, 1))
    labels = (score[items].mean(axis=1) > 0).astype(np.float32)
    return items.astype(np.int32), users.astype(np.int32), labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default="2x4", help="data x model devices, e.g. 2x4, 1x8, 4x2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bag", type=int, default=8)
    parser.add_argument("--multi-host", action="store_true", help="jax.distributed.initialize()")
    args = parser.parse_args(argv)
    if args.multi_host:
        jax.distributed.initialize()

    data_n, model_n = (int(x) for x in args.mesh.split("x"))
    mesh = jax.make_mesh((data_n, model_n), ("data", "model"))
    layout = jaxembed.TableSharding(vocab="model", batch="data")
    rng = np.random.default_rng(0)
    items, users, labels = make_data(rng, args.items, args.users, 64 * args.batch, args.bag)

    with jax.set_mesh(mesh):
        model = CTRModel(args.items, args.users, args.dim, layout=layout, rngs=nnx.Rngs(0))
        opt = jaxembed.sparse.Optimizer(
            model, optax.adam(1e-2), jaxembed.sparse.rowwise_adagrad(0.1)
        )

        def loss_fn(model, item_ids, user_ids, y):
            logits = model(item_ids, user_ids)
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()

        @nnx.jit(donate_argnums=(0, 1))
        def train_step(model, opt, item_ids, user_ids, y):
            loss, grads = jaxembed.sparse.value_and_grad(loss_fn)(model, item_ids, user_ids, y)
            opt.update(model, grads)
            return loss

        batch_sharding = NamedSharding(mesh, P("data"))
        losses = []
        for step in range(args.steps):
            at = (step * args.batch) % len(labels)
            batch = [
                jax.device_put(a[at : at + args.batch], batch_sharding)
                for a in (items, users, labels)
            ]
            losses.append(float(train_step(model, opt, *batch)))
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {losses[-1]:.4f}")

    table = model.items.weight[...]
    shard = table.addressable_shards[0].data
    print(f"mesh {dict(mesh.shape)}; item table {table.shape} as {table.sharding.spec}")
    print(f"each device holds {shard.shape} rows x cols = {shard.nbytes / 2**10:.0f} KiB")
    return {"losses": losses, "table_spec": table.sharding.spec, "shard_shape": shard.shape}


if __name__ == "__main__":
    main()
