"""Checks shared by the 8-device tests (a helper module: pytest collects no tests here)."""

from __future__ import annotations

import jax
import numpy as np


def copies_alike(tree, what: str) -> None:
    """Every copy of every block of ``tree``'s arrays holds the same values: a replicated
    table's copies, and a 2-D mesh's copies of a block (one per replica), never drift apart."""
    for leaf in jax.tree.leaves(tree):
        seen: dict[str, np.ndarray] = {}
        for shard in leaf.addressable_shards:
            key, data = str(shard.index), np.asarray(shard.data)
            if key in seen:
                np.testing.assert_array_equal(data, seen[key], err_msg=f"copies of {what}")
            seen[key] = data
