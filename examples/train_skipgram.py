"""Skip-gram word embeddings on Python's own documentation, with jaxembed's nnx module.

The corpus is ``pydoc_data.topics``, which ships with CPython: no download. Word and context
tables are ``jaxembed.Embedding`` modules with ``padding_idx=0`` (windows at the edges of a topic
are padded) and ``max_norm`` (rows are renormed as they are looked up, as in torch). Training is a
jit-compiled ``nnx.Optimizer`` + ``optax.adam`` loop with negative sampling.

    python examples/train_skipgram.py                      # ~15 s on 2 CPU cores
    python examples/train_skipgram.py --steps 20000 --dim 128 --vocab 20000

At the end it prints the nearest neighbours of a few words and saves the loss curve as a PNG.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxembed

PAD, UNK = 0, 1


def load_corpus(vocab_size: int) -> tuple[list[np.ndarray], list[str]]:
    """Tokenised topics as arrays of word ids, and the vocabulary (0 = <pad>, 1 = <unk>)."""
    from pydoc_data.topics import topics

    docs = [re.findall(r"[a-z_][a-z0-9_]+", text.lower()) for text in topics.values()]
    counts = collections.Counter(w for doc in docs for w in doc)
    words = ["<pad>", "<unk>"] + [w for w, _ in counts.most_common(vocab_size - 2)]
    ids = {w: i for i, w in enumerate(words)}
    return [np.array([ids.get(w, UNK) for w in doc], np.int32) for doc in docs if doc], words


def make_pairs(docs: list[np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (center, contexts) pair; contexts past a topic's edge are PAD."""
    centers, contexts = [], []
    for doc in docs:
        padded = np.concatenate([np.full(window, PAD), doc, np.full(window, PAD)])
        for i in range(len(doc)):
            ctx = np.concatenate(
                [padded[i : i + window], padded[i + window + 1 : i + 2 * window + 1]]
            )
            centers.append(doc[i])
            contexts.append(ctx)
    return np.array(centers, np.int32), np.stack(contexts).astype(np.int32)


class SkipGram(nnx.Module):
    def __init__(self, vocab: int, dim: int, max_norm: float, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.1)
        self.words = jaxembed.Embedding(
            vocab, dim, padding_idx=PAD, max_norm=max_norm, embedding_init=init, rngs=rngs
        )
        self.contexts = jaxembed.Embedding(
            vocab, dim, padding_idx=PAD, max_norm=max_norm, embedding_init=init, rngs=rngs
        )

    def __call__(self, center, context, negatives):
        u = self.words(center)  # (B, D)
        pos = jnp.einsum("bd,bcd->bc", u, self.contexts(context))  # (B, C)
        neg = jnp.einsum("bd,bcnd->bcn", u, self.contexts(negatives))  # (B, C, K)
        mask = (context != PAD).astype(u.dtype)
        per_pair = -jax.nn.log_sigmoid(pos) - jnp.sum(jax.nn.log_sigmoid(-neg), axis=-1)
        return jnp.sum(per_pair * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@nnx.jit
def train_step(model, optimizer, center, context, negatives):
    loss, grads = nnx.value_and_grad(lambda m: m(center, context, negatives))(model)
    # the forward pass renormed the looked-up rows in place; the update applies to them
    optimizer.update(model, grads)
    return loss


def progress(step: int, total: int, loss: float, start: float) -> None:
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(
        f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.4f} {rate:.0f} it/s"
    )
    sys.stderr.flush()


def nearest(model: SkipGram, words: list[str], query: str, k: int = 5) -> list[str]:
    table = np.asarray(model.words.weight[...])
    table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-8)
    q = table[words.index(query)]
    order = np.argsort(-table @ q)
    return [words[i] for i in order if words[i] not in (query, "<pad>", "<unk>")][:k]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--max-norm", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="skipgram_loss.png", help="where to save the loss curve")
    ap.add_argument("--words", default="list,function,class,string,file,exception")
    args = ap.parse_args(argv)

    docs, words = load_corpus(args.vocab)
    centers, contexts = make_pairs(docs, args.window)
    note = ""
    if len(words) < args.vocab:  # every distinct word fits: the table needs no more rows
        note = (
            f" (--vocab {args.vocab} asked; the corpus holds only {len(words) - 2} distinct words)"
        )
    print(f"corpus: {len(docs)} topics, {len(centers)} words, vocabulary {len(words)}{note}")
    # negatives drawn from the unigram distribution ^ 0.75, as in word2vec
    freq = np.bincount(centers, minlength=len(words)).astype(np.float64) ** 0.75
    freq[[PAD, UNK]] = 0
    freq /= freq.sum()

    model = SkipGram(len(words), args.dim, args.max_norm, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = rng.integers(0, len(centers), size=args.batch)
        context = contexts[pick]
        negatives = rng.choice(len(words), size=context.shape + (args.negatives,), p=freq)
        loss = float(
            train_step(model, optimizer, centers[pick], context, negatives.astype(np.int32))
        )
        losses.append(loss)
        if step % 50 == 0 or step == args.steps:
            progress(step, args.steps, float(np.mean(losses[-50:])), start)
    sys.stderr.write("\n")
    first, last = (
        np.mean(losses[: max(1, len(losses) // 10)]),
        np.mean(losses[-max(1, len(losses) // 10) :]),
    )
    print(f"loss: {first:.4f} (first 10% of steps) -> {last:.4f} (last 10%)")
    norms = np.linalg.norm(np.asarray(model.words.weight[...]), axis=1)
    # rows are renormed when looked up; the optimizer step after it may move them past
    # max_norm, as torch's does
    print(
        f"largest word-vector norm: {norms.max():.4f} (max_norm {args.max_norm}, applied at "
        f"lookup); <pad> row norm: {norms[PAD]:.1f}"
    )

    neighbours = {}
    for w in args.words.split(","):
        if w in words:
            neighbours[w] = nearest(model, words, w)
            print(f"  {w:12s} -> {', '.join(neighbours[w])}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses, lw=0.5, alpha=0.4, label="step")
        smooth = (
            np.convolve(losses, np.ones(50) / 50, mode="valid") if len(losses) >= 50 else losses
        )
        ax.plot(np.arange(len(smooth)) + (len(losses) - len(smooth)), smooth, label="mean of 50")
        ax.set_xlabel("step")
        ax.set_ylabel("negative-sampling loss")
        ax.set_title("skip-gram on pydoc_data.topics (jaxembed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"loss curve saved to {args.plot}")
    return {"losses": losses, "neighbours": neighbours, "max_norm": float(norms.max())}


if __name__ == "__main__":
    main()
