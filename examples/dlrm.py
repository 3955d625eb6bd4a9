"""A DLRM on synthetic data shaped like Criteo, with jaxembed's EmbeddingBagCollection.

Data: 26 sparse features with Criteo's (Kaggle DAC) cardinalities capped at ``--cap`` rows,
Zipf-distributed ids and bag lengths (1-8 ids per bag), 13 dense features, and labels from a
fixed random teacher (a hidden DLRM-like scorer over the same ids and dense features), so there
is something to learn. Model: a bottom MLP over the dense features, the 26 pooled embeddings,
their pairwise dot products (DLRM's interaction), and a top MLP, in ``flax.nnx``. Training:
row-wise Adagrad for the tables (sparse: only the looked-up rows are touched, one fused update
over the stacked table) and Adam for the MLPs, in one jitted step.

    python examples/dlrm.py                      # ~1 minute on 2 CPU cores
    python examples/dlrm.py --steps 2000 --cap 1000000 --batch 2048

It prints the loss and a held-out AUC as it trains and saves the curves as a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxembed

CRITEO = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
          27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # fmt: skip
NUM_DENSE = 13


class Data:
    """Synthetic Criteo-shaped batches, labelled by a fixed random teacher."""

    def __init__(self, rows, batch, seed=0, max_len=8):
        self.rows, self.batch, self.max_len = rows, batch, max_len
        self.rng = np.random.default_rng(seed)
        teacher = np.random.default_rng(1234)
        # the teacher: a score per row of each table, and a dense weight vector
        self.row_score = [teacher.normal(0, 1, r).astype(np.float32) for r in rows]
        self.dense_w = teacher.normal(0, 1, NUM_DENSE).astype(np.float32)
        self.keys = [f"cat_{i}" for i in range(len(rows))]
        total = len(rows) * batch * max_len
        self.capacity = 1 << (total - 1).bit_length()

    def next(self):
        b, rng = self.batch, self.rng
        lengths = np.minimum(rng.zipf(1.5, (len(self.rows), b)), self.max_len)
        values, score = [], np.zeros(b, np.float32)
        for t, (r, n) in enumerate(zip(self.rows, lengths, strict=True)):
            ids = (rng.zipf(1.1, int(n.sum())) - 1) % r
            values.append(ids)
            bag = np.repeat(np.arange(b), n)
            score += np.bincount(bag, self.row_score[t][ids], minlength=b) / np.maximum(n, 1)
        dense = rng.lognormal(0, 1, (b, NUM_DENSE)).astype(np.float32)
        logit = score / np.sqrt(len(self.rows)) + np.log1p(dense) @ self.dense_w / 4 - 0.5
        labels = (rng.random(b) < 1 / (1 + np.exp(-2 * logit))).astype(np.float32)
        kj = jaxembed.KeyedJagged.from_lengths(
            self.keys, np.concatenate(values), lengths.reshape(-1), capacity=self.capacity
        )
        return kj, jnp.asarray(np.log1p(dense)), jnp.asarray(labels)


class MLP(nnx.Module):
    def __init__(self, sizes, *, rngs, last_relu=True):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.last_relu = last_relu

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.last_relu:
                x = jax.nn.relu(x)
        return x


class DLRM(nnx.Module):
    def __init__(self, rows, dim, *, rngs):
        tables = [
            jaxembed.EmbeddingBagConfig(f"t{i}", dim, r, [f"cat_{i}"], pooling="mean")
            for i, r in enumerate(rows)
        ]
        self.embeddings = jaxembed.EmbeddingBagCollection(tables, rngs=rngs, sparse=True)
        self.bottom = MLP([NUM_DENSE, 64, dim], rngs=rngs)
        n = len(rows) + 1
        self.top = MLP([dim + n * (n - 1) // 2, 64, 1], rngs=rngs, last_relu=False)

    def __call__(self, kj, dense):
        pooled = self.embeddings(kj)
        x = self.bottom(dense)  # (B, D)
        feats = jnp.stack([x] + [pooled[f] for f in self.embeddings.feature_names], axis=1)
        inter = jnp.einsum("bfd,bgd->bfg", feats, feats)
        i, j = np.triu_indices(feats.shape[1], k=1)
        return self.top(jnp.concatenate([x, inter[:, i, j]], axis=1))[:, 0]


def auc(labels, scores):
    """The area under the ROC curve (rank statistic; ties averaged)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    ranks[order] = np.arange(1, len(scores) + 1)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first, counts, strict=True):
        if c > 1:
            ranks[order[f : f + c]] = f + (c + 1) / 2
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--cap", type=int, default=200_000, help="cap on each table's rows")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--plot", default="dlrm_loss.png")
    args = ap.parse_args(argv)
    rows = [min(c, args.cap) for c in CRITEO]
    data, held_out = Data(rows, args.batch, seed=0), Data(rows, 4 * args.batch, seed=99)
    eval_batch = held_out.next()
    model = DLRM(rows, args.dim, rngs=nnx.Rngs(0))
    opt = jaxembed.sparse.Optimizer(model, optax.adam(1e-3), jaxembed.sparse.rowwise_adagrad(0.05))

    def bce(logits, labels):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    @nnx.jit
    def step(model, opt, kj, dense, labels):
        loss, grads = jaxembed.sparse.value_and_grad(lambda m: bce(m(kj, dense), labels))(model)
        opt.update(model, grads)
        return loss

    predict = nnx.jit(lambda model, kj, dense: model(kj, dense))
    print(f"26 tables, {sum(rows):,} rows x {args.dim}; batch {args.batch}")
    losses, aucs, t0 = [], [], time.perf_counter()
    for i in range(1, args.steps + 1):
        losses.append(float(step(model, opt, *data.next())))
        if i % args.eval_every == 0 or i == args.steps:
            score = auc(eval_batch[2], predict(model, eval_batch[0], eval_batch[1]))
            aucs.append((i, score))
            recent = np.mean(losses[-args.eval_every :])
            print(f"step {i:5d}  loss {recent:.4f}  held-out AUC {score:.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(losses, lw=0.5)
        a.set(xlabel="step", ylabel="BCE loss", title="training loss")
        b.plot(*zip(*aucs, strict=True), marker="o")
        b.set(xlabel="step", ylabel="AUC", title="held-out AUC")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"saved {args.plot}")
    return {"losses": losses, "aucs": aucs, "model": model}


if __name__ == "__main__":
    main(sys.argv[1:])
