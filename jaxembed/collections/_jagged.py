"""``KeyedJagged``: many features' variable-length ids for one batch, as one jit-able pytree.

TorchRec's ``KeyedJaggedTensor``, with a static capacity: ``values`` holds every feature's ids
back to back, feature-major (all of the first feature's samples, then the next feature's), and
``lengths[f * B + b]`` is how many ids feature ``f`` has for sample ``b``. Only the first
``sum(lengths)`` values are ids; the rest, up to the static capacity, are padding in no bag. The
capacity, the keys and the batch size are the pytree's static shape: new lengths and values of
the same capacity never retrace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxembed.core import _index_policy, _serialization


def _check_keys(keys: Any) -> tuple[str, ...]:
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise TypeError(f"keys must be a sequence of feature names, got {type(keys).__name__}")
    keys = tuple(keys)
    if not keys:
        raise ValueError("keys must name at least one feature")
    for key in keys:
        if not isinstance(key, str) or not key:
            raise TypeError(f"keys must be non-empty strings, got {key!r}")
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"keys must be distinct, got {dup} more than once")
    return keys


def _capacity_for(total: int, min_capacity: int) -> int:
    """The smallest power of two (at least ``min_capacity``) that holds ``total`` ids."""
    return max(int(min_capacity), 1 << max(total - 1, 0).bit_length())


@jax.tree_util.register_pytree_node_class
class KeyedJagged:
    """Jagged ids of several features for one batch (TorchRec's ``KeyedJaggedTensor``).

    Build it with :meth:`from_lengths`, :meth:`from_offsets`, :meth:`from_lists` (host lists)
    or :meth:`from_dense` (padded arrays, also under ``jit``). Concrete inputs are checked at
    construction: lengths that are negative or sum past the values, a lengths array whose size
    is not a multiple of the number of keys, non-integer ids.

    Attributes:
      keys: the feature names, in the order of ``values`` (static).
      values: ``(capacity,)`` integer ids, feature-major; those past ``sum(lengths)`` are in no
        bag.
      lengths: ``(len(keys) * batch_size,)`` int32, ``lengths[f * B + b]`` ids of feature ``f``
        for sample ``b``.
      weights: ``(capacity,)`` floating per-id weights (weighted features, summed bags), or None.

    Example:
      >>> import jaxembed
      >>> kj = jaxembed.KeyedJagged.from_lists({"user": [[1, 2], [3]], "item": [[], [4, 5, 6]]})
      >>> kj.keys, kj.batch_size, kj.capacity
      (('user', 'item'), 2, 16)
      >>> kj.lengths
      Array([2, 1, 0, 3], dtype=int32)
      >>> [[bag.tolist() for bag in bags] for bags in kj.to_lists().values()]
      [[[1, 2], [3]], [[], [4, 5, 6]]]
    """

    def __init__(
        self,
        keys: Sequence[str],
        values: ArrayLike,
        lengths: ArrayLike,
        weights: ArrayLike | None = None,
    ):
        self.keys = _check_keys(keys)
        values = _index_policy.as_integer_array(values, "values")
        lengths = _index_policy.as_integer_array(lengths, "lengths")
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
        if lengths.ndim != 1 or lengths.shape[0] % len(self.keys) or lengths.shape[0] == 0:
            raise ValueError(
                f"lengths must be 1-D with a non-zero multiple of len(keys) = {len(self.keys)} "
                "entries (one per feature and sample, feature-major: at least one sample), got "
                f"shape {tuple(lengths.shape)}"
            )
        if not isinstance(lengths, jax.core.Tracer):
            host = np.asarray(lengths).astype(np.int64)
            if np.any(host < 0):
                raise ValueError(f"lengths must be >= 0, got {int(host.min())}")
            if host.sum() > values.shape[0]:
                raise ValueError(
                    f"lengths sum to {int(host.sum())}, past the {values.shape[0]} values"
                )
        if weights is not None:
            if not hasattr(weights, "dtype"):
                weights = np.asarray(weights, np.float32)
            if not jnp.issubdtype(weights.dtype, jnp.floating):
                raise TypeError(f"weights must have a floating dtype, got {weights.dtype}")
            if tuple(weights.shape) != tuple(values.shape):
                raise ValueError(
                    f"weights must have the shape of values {tuple(values.shape)}, "
                    f"got {tuple(weights.shape)}"
                )
            weights = jnp.asarray(weights)
        dtype = _index_policy._working_dtype(values.dtype)
        if not isinstance(values, jax.core.Tracer) and values.shape[0]:
            host = np.asarray(values)
            info = np.iinfo(dtype)
            if host.max() > info.max or host.min() < info.min:
                raise IndexError(
                    f"values hold {host.max() if host.max() > info.max else host.min()}, "
                    f"outside {np.dtype(dtype).name} (no table has that many rows)"
                )
        self.values = jnp.asarray(values, dtype)
        self.lengths = jnp.asarray(lengths, jnp.int32)
        self.weights = weights

    # -- pytree ---------------------------------------------------------------------------------

    def tree_flatten(self):
        return (self.values, self.lengths, self.weights), self.keys

    @classmethod
    def tree_unflatten(cls, keys, children):
        self = object.__new__(cls)
        self.keys = keys
        self.values, self.lengths, self.weights = children
        return self

    # -- shape ----------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """B, the samples of the batch (static)."""
        return self.lengths.shape[0] // len(self.keys)

    @property
    def capacity(self) -> int:
        """The static length of ``values``."""
        return self.values.shape[0]

    def offsets(self) -> jax.Array:
        """``(len(keys) * B + 1,)`` int32: where each (feature, sample) bag starts, then the end."""
        return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(self.lengths, dtype=jnp.int32)])

    def num_valid(self) -> jax.Array:
        """How many of the values are ids (``sum(lengths)``)."""
        return jnp.sum(self.lengths, dtype=jnp.int32)

    def length_per_key(self) -> jax.Array:
        """``(len(keys),)``: how many ids each feature has in the batch."""
        return jnp.sum(self.lengths.reshape(len(self.keys), -1), axis=1, dtype=jnp.int32)

    def __repr__(self) -> str:
        return (
            f"KeyedJagged(keys={self.keys}, batch_size={self.batch_size}, "
            f"capacity={self.capacity}, weighted={self.weights is not None})"
        )

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_lengths(
        cls,
        keys: Sequence[str],
        values: ArrayLike,
        lengths: ArrayLike,
        weights: ArrayLike | None = None,
        *,
        capacity: int | None = None,
    ) -> KeyedJagged:
        """From flat feature-major ``values`` and ``lengths`` (TorchRec's ``from_lengths_sync``).

        Args:
          keys: the feature names.
          values: the ids, feature-major.
          lengths: ``(len(keys) * B,)``: ids per (feature, sample).
          weights: per-id weights, the shape of ``values``, or None.
          capacity: pad ``values`` (and ``weights``) with zeros to this length (concrete inputs
            only); default their length.

        Raises:
          ValueError: ``capacity`` below the number of values.
        """
        if capacity is not None:
            values = np.asarray(values)
            capacity = int(capacity)
            if capacity < values.shape[0]:
                raise ValueError(f"capacity={capacity} cannot hold the {values.shape[0]} values")
            pad = capacity - values.shape[0]
            values = np.concatenate([values.astype(np.int64), np.zeros(pad, np.int64)])
            if weights is not None:
                weights = np.asarray(weights)
                weights = np.concatenate([weights, np.zeros(pad, weights.dtype)])
        return cls(keys, values, lengths, weights)

    @classmethod
    def from_offsets(
        cls,
        keys: Sequence[str],
        values: ArrayLike,
        offsets: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> KeyedJagged:
        """From ``offsets`` ``(len(keys) * B + 1,)``, CSR style: bag ``i`` is
        ``values[offsets[i]:offsets[i + 1]]``; ``offsets[0]`` must be 0.

        Raises:
          ValueError: offsets not 1-D, empty, not starting at 0 or decreasing (concrete).
        """
        offsets = _index_policy.as_integer_array(offsets, "offsets")
        if offsets.ndim != 1 or offsets.shape[0] == 0:
            raise ValueError(
                f"offsets must be 1-D with len(keys) * B + 1 entries, got {tuple(offsets.shape)}"
            )
        if not isinstance(offsets, jax.core.Tracer):
            host = np.asarray(offsets).astype(np.int64)
            if host[0] != 0:
                raise ValueError(f"offsets[0] must be 0, got {host[0]}")
            if np.any(np.diff(host) < 0):
                raise ValueError("offsets must be non-decreasing")
        offsets = jnp.asarray(offsets, jnp.int32)
        return cls(keys, values, offsets[1:] - offsets[:-1], weights)

    @classmethod
    def from_lists(
        cls,
        features: Mapping[str, Sequence[Sequence[int]]],
        weights: Mapping[str, Sequence[Sequence[float]]] | None = None,
        *,
        capacity: int | None = None,
        min_capacity: int = 16,
    ) -> KeyedJagged:
        """From per-feature host lists: ``{feature: [ids of sample 0, ids of sample 1, ...]}``.

        The values are padded to a power-of-two capacity (at least ``min_capacity``), or to
        ``capacity``, so a data loader's batches compile a handful of programs, not one each.

        Args:
          features: the ids of each feature and sample; every feature has the same samples.
          weights: the same structure of per-id weights, or None.
          capacity: the length of ``values``; default a power of two.
          min_capacity: the least default capacity.

        Raises:
          ValueError: features with different batch sizes, ``capacity`` too small, weights
            shaped unlike the ids.
        """
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of name to bags, got {type(features)}")
        keys = _check_keys(list(features))
        sizes = {k: len(features[k]) for k in keys}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"every feature must have the same batch size, got {sizes}")
        bags = [np.asarray(b, np.int64).reshape(-1) for k in keys for b in features[k]]
        lengths = np.array([b.size for b in bags], np.int32)
        total = int(lengths.sum())
        capacity = _capacity_for(total, min_capacity) if capacity is None else int(capacity)
        flat = np.concatenate(bags) if bags else np.zeros(0, np.int64)
        w = None
        if weights is not None:
            if set(weights) != set(keys):
                raise ValueError("weights must have the keys of features")
            wbags = [np.asarray(b, np.float32).reshape(-1) for k in keys for b in weights[k]]
            if [b.size for b in wbags] != list(lengths):
                raise ValueError("weights must have one weight per id, bag by bag")
            w = np.concatenate(wbags) if wbags else np.zeros(0, np.float32)
        return cls.from_lengths(keys, flat, lengths, w, capacity=capacity)

    @classmethod
    def from_dense(
        cls,
        features: Mapping[str, ArrayLike],
        padding_value: int = -1,
        weights: Mapping[str, ArrayLike] | None = None,
    ) -> KeyedJagged:
        """From padded arrays ``{feature: (B, L)}``: the entries equal to ``padding_value`` are
        not ids. Works under ``jit`` (the capacity is the padded arrays' total size).

        Args:
          features: ``(B, L_f)`` integer ids per feature (the same B; L may differ).
          padding_value: the value that marks no id.
          weights: ``{feature: (B, L_f)}`` per-id weights, or None.

        Raises:
          ValueError: arrays that are not 2-D or differ in batch size.
        """
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of name to (B, L) arrays, got {features}")
        keys = _check_keys(list(features))
        arrays = [_index_policy.as_integer_array(features[k], f"features[{k!r}]") for k in keys]
        arrays = [jnp.asarray(a) for a in arrays]
        for k, a in zip(keys, arrays, strict=True):
            if a.ndim != 2:
                raise ValueError(f"features[{k!r}] must be (B, L), got shape {tuple(a.shape)}")
        if len({a.shape[0] for a in arrays}) > 1:
            raise ValueError("every feature must have the same batch size B")
        mask = jnp.concatenate([(a != padding_value).reshape(-1) for a in arrays])
        flat = jnp.concatenate([a.reshape(-1).astype(jnp.int32) for a in arrays])
        lengths = jnp.concatenate([jnp.sum(a != padding_value, axis=1) for a in arrays])
        (where,) = jnp.nonzero(mask, size=flat.shape[0], fill_value=flat.shape[0])
        values = jnp.take(flat, where, mode="fill", fill_value=0)
        w = None
        if weights is not None:
            wflat = jnp.concatenate([jnp.asarray(weights[k]).reshape(-1) for k in keys])
            w = jnp.take(wflat, where, mode="fill", fill_value=0)
        return cls(keys, values, lengths.astype(jnp.int32), w)

    # -- inspection (host) ----------------------------------------------------------------------

    def to_lists(self) -> dict[str, list[np.ndarray]]:
        """``{feature: [ids of each sample]}`` as NumPy arrays (host-side, concrete only)."""
        values = np.asarray(self.values)
        ends = np.cumsum(np.asarray(self.lengths))
        starts = ends - np.asarray(self.lengths)
        b = self.batch_size
        return {
            k: [values[starts[f * b + i] : ends[f * b + i]] for i in range(b)]
            for f, k in enumerate(self.keys)
        }


_serialization.register_node(KeyedJagged, "KeyedJagged", to_json=list, from_json=tuple)
