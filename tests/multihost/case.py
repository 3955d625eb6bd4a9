"""The collection both the 2-process run and its single-process reference train."""

import jax.numpy as jnp
import numpy as np

import jaxembed
from jaxembed import sharding as S

K, B_LOCAL, CAPACITY = 8, 2, 32
E = jaxembed.EmbeddingBagConfig


def tables():
    return [
        E("a", 8, 40, ["fa"]),
        E("b", 8, 50, ["fb", "fb2"], pooling="mean", padding_idx=3),
        E("c", 8, 30, ["fc"], max_norm=1.0),
        E("d", 16, 64, ["fd"], lr_scale=0.5),
    ]


def placements(two_d: bool = False):
    """On the 1-D mesh of 8 devices; or on the 2-D one, 2 replicas (one a process) of 4."""
    a = S.table_wise(3 if two_d else 5)
    return {"a": a, "b": S.row_wise(), "c": S.data_parallel(), "d": S.table_wise(1)}


def batch(seed=0):
    """The whole batch, and each device's block of it."""
    rng = np.random.default_rng(seed)
    rows = {f: t.num_embeddings for t in tables() for f in t.feature_names}
    lists = {
        f: [[int(x) for x in rng.integers(0, n, rng.integers(0, 4))] for _ in range(K * B_LOCAL)]
        for f, n in rows.items()
    }
    whole = jaxembed.KeyedJagged.from_lists(lists, capacity=K * CAPACITY)
    blocks = [
        jaxembed.KeyedJagged.from_lists(
            {f: v[k * B_LOCAL : (k + 1) * B_LOCAL] for f, v in lists.items()}, capacity=CAPACITY
        )
        for k in range(K)
    ]
    return whole, blocks


def cotangents():
    rng = np.random.default_rng(1)
    return {
        f: jnp.asarray(rng.normal(size=(K * B_LOCAL, t.embedding_dim)), jnp.float32)
        for t in tables()
        for f in t.feature_names
    }
