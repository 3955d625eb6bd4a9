"""The nn.Embedding walkthrough, replayed with jaxembed.

Example 1 looks rows of an 8x4 table up with [1, 3, 4]. Example 2 builds a table with
padding_idx=2, max_norm=1 and prints the row norms before any lookup, after [1, 3, 4], after
[0, 2] and after [7]: the renorm is online, and only the looked-up rows are rewritten.

    python examples/seed_notebook.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxembed


def show(title: str, value) -> None:
    print(f"\n{title}")
    print(np.array2string(np.asarray(value), precision=4, suppress_small=True))


def main() -> None:
    print("## Example 1: an 8 x 4 lookup table")
    params = jaxembed.init(jax.random.key(0), num_embeddings=8, embedding_dim=4)
    show("weight", params["weight"])
    idx = jnp.array([1, 3, 4])
    emb, params = jaxembed.embedding(params, idx)
    show("embedding(params, [1, 3, 4])", emb)

    print("\n## Example 2: padding_idx=2, max_norm=1, norm_type=2")
    opts = dict(padding_idx=2, max_norm=1.0, norm_type=2.0)
    params = jaxembed.init(jax.random.key(1), 8, 4, padding_idx=2)
    show("weight", params["weight"])

    def norms(p):
        return jnp.linalg.norm(p["weight"], axis=-1)

    show("row norms before any lookup: not normalised yet", norms(params))
    emb, params = jaxembed.embedding(params, idx, **opts)
    show("embedding(params, [1, 3, 4]): the looked-up rows, renormed", emb)
    show("weight after the lookup: rows 1, 3, 4 rewritten", params["weight"])
    show("row norms", norms(params))
    for step in ([0, 2], [7]):
        _, params = jaxembed.embedding(params, jnp.array(step), **opts)
        show(f"row norms after looking up {step}", norms(params))


if __name__ == "__main__":
    main()
