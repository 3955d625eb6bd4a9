"""The nn.Embedding walkthrough, replayed with jaxembed's nnx module.

Example 1 looks rows of an 8x4 table up with [1, 3, 4]. Example 2 builds a table with
padding_idx=2, max_norm=1 and prints the row norms before any lookup, after [1, 3, 4], after
[0, 2] and after [7]: the renorm is online, and only the looked-up rows are rewritten.

    python examples/seed_notebook.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxembed


def show(title: str, value) -> None:
    print(f"\n{title}")
    print(np.array2string(np.asarray(value), precision=4, suppress_small=True))


def main() -> None:
    print("## Example 1: an 8 x 4 lookup table")
    embedding_layer = jaxembed.Embedding(num_embeddings=8, embedding_dim=4, rngs=nnx.Rngs(0))
    show("embedding_layer.weight", embedding_layer.weight[...])
    idx = jnp.array([1, 3, 4])
    show("embedding_layer([1, 3, 4])", embedding_layer(idx))

    print("\n## Example 2: padding_idx=2, max_norm=1, norm_type=2")
    embedding_layer = jaxembed.Embedding(
        num_embeddings=8,
        embedding_dim=4,
        padding_idx=2,
        max_norm=1.0,
        norm_type=2.0,
        rngs=nnx.Rngs(1),
    )
    show("embedding_layer.weight", embedding_layer.weight[...])

    def norms():
        return jnp.linalg.norm(embedding_layer.weight[...], axis=-1)

    show("row norms before any lookup: not normalised yet", norms())
    show("embedding_layer([1, 3, 4]): the looked-up rows, renormed", embedding_layer(idx))
    show("weight after the lookup: rows 1, 3, 4 rewritten", embedding_layer.weight[...])
    show("row norms", norms())
    for step in ([0, 2], [7]):
        embedding_layer(jnp.array(step))
        show(f"row norms after looking up {step}", norms())

    print("\n## The same with the functional core: the renorm is an explicit state update")
    params = jaxembed.init(jax.random.key(1), 8, 4, padding_idx=2)
    show("row norms before any lookup", jnp.linalg.norm(params["weight"], axis=-1))
    emb, params = jaxembed.embedding(params, idx, padding_idx=2, max_norm=1.0)
    show("embedding(params, [1, 3, 4])[0]", emb)
    show("row norms of new_params after [1, 3, 4]", jnp.linalg.norm(params["weight"], axis=-1))
    for step in ([0, 2], [7]):
        _, params = jaxembed.embedding(params, jnp.array(step), padding_idx=2, max_norm=1.0)
        show(f"row norms after looking up {step}", jnp.linalg.norm(params["weight"], axis=-1))


if __name__ == "__main__":
    main()
