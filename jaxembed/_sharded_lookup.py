"""Lookups into a table sharded on a mesh: ``jax.shard_map`` bodies for the core functions.

Every device holds a ``(V / vocab_shards, D / dim_shards)`` block of the table and a
``1 / batch_shards`` slice of the indices. A lookup, on each device:

1. maps its indices to local rows: an index another vocab shard owns becomes the local sentinel,
   which the gather fills with zeros and every scatter drops;
2. with ``max_norm``, renorms its own rows referenced by *any* device's indices (the indices, not
   the table, are all-gathered over ``batch``), so every copy of a shard stays identical and
   ``new_params`` keeps the table's sharding; a row's norm over split columns is one ``psum``;
3. gathers its rows and ``psum``-s them over ``vocab`` (Megatron's vocab-parallel embedding):
   exactly one shard contributes each row, so the result equals the unsharded gather.

The table's gradient is the core's custom rule on each block (a scatter-add into local rows);
``shard_map``'s transpose sums it over ``batch``. Nothing table-sized ever moves between devices
except that gradient's all-reduce, which is data parallelism's cost for any dense parameter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed import _bag, _gradient, _index_policy, _renorm, _validation
from jaxembed._sharding import TableSharding


def everyone(x: jax.Array, sharding: TableSharding) -> jax.Array:
    """``x`` (one device's slice along ``batch``) gathered from every device, in global order.

    Written as a ``psum`` of each slice placed in a zero buffer, not ``all_gather``, so the
    result is typed as the same on every device along ``batch`` (``shard_map``'s replication
    check): the renormed table computed from it is one table, not one per data shard. Each entry
    is a sum of itself and zeros, so the values are exact.
    """
    if sharding.batch is None:
        return x
    n = x.shape[0]
    shards = sharding.count("batch", sharding.mesh)
    buffer = jnp.zeros((n * shards,) + x.shape[1:], x.dtype)
    at = jax.lax.axis_index(sharding.batch) * n
    return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(buffer, x, at, 0), sharding.batch)


def localizer(num_local: int, sharding: TableSharding):
    """Maps global rows to this device's rows; another vocab shard's become ``num_local``."""
    if sharding.vocab is None:
        return lambda safe: safe
    offset = jax.lax.axis_index(sharding.vocab) * num_local

    def localize(safe):
        local = safe - offset
        return jnp.where((local >= 0) & (local < num_local), local, num_local)

    return localize


def _shard_rows(
    weight: jax.Array,
    indices: jax.Array,
    sharding: TableSharding,
    *,
    num_embeddings: int,
    padding_idx: int | None,
    max_norm: float | None,
    norm_type: float,
    scale_grad_by_freq: bool,
    lookup: str,
    scale_rows: bool,
):
    """One device's share of a lookup: ``(rows, new_weight, safe, grad_scale)``.

    ``rows`` are this device's flat indices' rows, whole along V (after the ``psum``), carrying
    the table's gradient (scaled by ``grad_scale`` when ``scale_rows``).
    """
    num_local = weight.shape[0]
    safe = _index_policy.safe_indices(indices.reshape(-1), num_embeddings)
    needs_all = max_norm is not None or scale_grad_by_freq
    all_safe = everyone(safe, sharding) if needs_all else safe
    localize = localizer(num_local, sharding)
    table = jax.lax.stop_gradient(weight)
    new_weight = None
    if max_norm is not None:
        table = new_weight = _renorm.renorm_table(
            table, localize(all_safe), max_norm, norm_type, sharding.dim
        )
    local = localize(safe)
    rows = _index_policy.gather_rows(table, local, lookup, fill=0)
    grad_scale = _gradient.gradient_scale(
        safe, padding_idx, scale_grad_by_freq, weight.dtype, among=all_safe
    )
    rows = _gradient.with_table_gradient(rows, weight, local, grad_scale if scale_rows else None)
    if sharding.vocab is not None:
        rows = jax.lax.psum(rows, sharding.vocab)
    # an out-of-range index (under jit) gives a NaN row, as the unsharded lookup does
    rows = jnp.where((safe == num_embeddings)[:, None], jnp.nan, rows)
    return rows, new_weight, safe, grad_scale


def place(x: jax.Array | None, sharding: TableSharding, spec) -> jax.Array | None:
    """``x`` laid out as ``spec`` on the mesh (a no-op when it already is)."""
    if x is None:
        return None
    mesh = sharding.mesh
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def run(body, sharding: TableSharding, in_specs, out_specs, *args):
    """``shard_map(body)(*args)`` on the sharding's mesh, the arguments placed as specified."""
    args = [
        jax.tree.map(
            lambda x, spec: place(x, sharding, spec),
            a,
            specs,
            is_leaf=lambda x: x is None,
        )
        if specs is not None
        else None
        for a, specs in zip(args, in_specs, strict=True)
    ]
    mapped = jax.shard_map(
        body, mesh=sharding.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True
    )
    return mapped(*args)


def _run_lookup(body, sharding: TableSharding, out_specs, weight, indices):
    """``run`` for a ``body(weight, indices)``: the table as laid out, the indices split."""
    in_specs = (sharding.spec, sharding.indices_spec(indices.ndim))
    return run(body, sharding, in_specs, out_specs, weight, indices)


@functools.partial(jax.jit, static_argnames=("sharding", *_validation.LOOKUP_OPTIONS))
def embedding(weight, indices, *, sharding: TableSharding, **options):
    """The sharded :func:`jaxembed.embedding`: ``(out, new_weight or None)``."""
    num_embeddings = weight.shape[0]

    def body(weight, indices):
        rows, new_weight, *_ = _shard_rows(
            weight,
            indices,
            sharding,
            num_embeddings=num_embeddings,
            scale_rows=True,
            **options,
        )
        out = rows.reshape(indices.shape + rows.shape[-1:])
        return out if new_weight is None else (out, new_weight)

    out_specs: Any = sharding.output_spec(indices.ndim)
    if options["max_norm"] is not None:
        out_specs = (out_specs, sharding.spec)
    result = _run_lookup(body, sharding, out_specs, weight, indices)
    return result if options["max_norm"] is not None else (result, None)


def _varying_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` unchanged, typed as varying over (at least) the mesh axes ``ref`` varies over."""
    if x.dtype == bool:
        return x | jnp.zeros_like(ref, bool, shape=x.shape)
    return x + jnp.zeros_like(ref, x.dtype, shape=x.shape)


@functools.partial(jax.jit, static_argnames=("sharding", "mode", *_validation.LOOKUP_OPTIONS))
def embedding_bag(weight, indices, starts, psw, *, sharding: TableSharding, mode, **options):
    """The sharded :func:`jaxembed.embedding_bag`: ``(bags, new_weight or None)``.

    The rows are looked up as :func:`embedding` does and then reduced per bag on each device, by
    the core's own bag code, so with only rows split the bags equal the unsharded ones bit for
    bit.
    """
    num_embeddings = weight.shape[0]
    padding_idx = options["padding_idx"]

    def body(weight, indices, starts, psw):
        indices, starts, psw, width = _bag.flat_bags(indices, starts, psw)
        rows, new_weight, safe, grad_scale = _shard_rows(
            weight,
            indices,
            sharding,
            num_embeddings=num_embeddings,
            scale_rows=False,
            **options,
        )
        keep = _bag.kept(safe, padding_idx)
        positions = jnp.arange(safe.shape[0], dtype=jnp.int32)
        # the bag code's loops need every input to vary over the mesh axes the rows vary over
        keep, positions, starts, psw = (
            None if x is None else _varying_like(x, rows) for x in (keep, positions, starts, psw)
        )
        bags = _bag._bags(
            rows,
            jax.lax.stop_gradient(rows),
            positions,
            grad_scale,
            keep,
            psw,
            starts,
            mode,
            width,
            "gather",
        )
        return bags if new_weight is None else (bags, new_weight)

    two_d = indices.ndim == 2
    idx_spec = sharding.indices_spec(indices.ndim)
    in_specs = (
        sharding.spec,
        idx_spec,
        None if starts is None else jax.sharding.PartitionSpec(),
        None if psw is None else idx_spec,
    )
    out_specs: Any = (
        sharding.output_spec(1) if two_d else jax.sharding.PartitionSpec(None, sharding.dim)
    )
    if options["max_norm"] is not None:
        out_specs = (out_specs, sharding.spec)
    result = run(body, sharding, in_specs, out_specs, weight, indices, starts, psw)
    return result if options["max_norm"] is not None else (result, None)


@functools.partial(jax.jit, static_argnames=("sharding", *_validation.LOOKUP_OPTIONS))
def sparse_lookup(weight, indices, *, sharding: TableSharding, **options):
    """The sharded :func:`jaxembed.sparse.lookup`: ``(rows, new_weight, safe, scale)``.

    ``safe`` and ``scale`` are flat and split over ``batch`` like the indices; padding entries
    are sent to ``num_embeddings``, as the unsharded lookup sends them.
    """
    num_embeddings = weight.shape[0]
    padding_idx = options.pop("padding_idx")
    freq = options["scale_grad_by_freq"]

    def body(weight, indices):
        rows, new_weight, safe, scale = _shard_rows(
            jax.lax.stop_gradient(weight),
            indices,
            sharding,
            num_embeddings=num_embeddings,
            padding_idx=None,
            scale_rows=False,
            **options,
        )
        safe = _index_policy.drop_padding(safe, padding_idx, num_embeddings)
        out = (rows.reshape(indices.shape + rows.shape[-1:]), safe)
        if freq:
            out += (scale,)
        if new_weight is not None:
            out += (new_weight,)
        return out

    flat = jax.sharding.PartitionSpec(sharding.batch if indices.ndim else None)
    out_specs: tuple = (sharding.output_spec(indices.ndim), flat)
    if freq:
        out_specs += (flat,)
    if options["max_norm"] is not None:
        out_specs += (sharding.spec,)
    result = _run_lookup(body, sharding, out_specs, weight, indices)
    rows, safe = result[:2]
    scale = result[2] if freq else None
    new_weight = result[-1] if options["max_norm"] is not None else None
    return rows, new_weight, safe, scale
