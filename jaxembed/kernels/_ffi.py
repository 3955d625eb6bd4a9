"""The FFI handlers of ``csrc/`` as JAX functions, one ``jax.ffi.ffi_call`` each.

Each wrapper takes the arrays its handler reads, in the layout the handler checks (the handler
refuses any other, before it reads a byte), and is meant for the CPU branch of a
``jax.lax.platform_dependent``: the core decides where a kernel applies (:func:`bags_apply`,
:func:`table_applies`) and keeps the pure-JAX path everywhere else.

The handlers split their work over XLA's own intra-op thread pool (no second pool), and batch
under ``vmap`` one call at a time (``vmap_method="sequential"``): correct, not fast.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _load():
    """The compiled module: the installed one, or the build ``JAXEMBED_KERNELS_LIBRARY`` names
    (``csrc/check_sanitizers.sh`` runs the tests against a sanitized build this way)."""
    path = os.environ.get("JAXEMBED_KERNELS_LIBRARY")
    if not path:
        import jaxembed.kernels._native as native

        return native
    spec = importlib.util.spec_from_file_location("jaxembed.kernels._native", path)
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    return native


try:
    _native = _load()
except (ImportError, OSError) as error:  # not built: no compiler, or JAXEMBED_BUILD_KERNELS=0
    _native, _WHY = None, f"not built ({error})"
else:
    _WHY = None

if os.environ.get("JAXEMBED_KERNELS", "1").strip() == "0":
    _ON, _WHY = False, "turned off (JAXEMBED_KERNELS=0)"
else:
    _ON = _native is not None

#: the table dtypes the bag and gather kernels read
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
#: the table dtypes the row-wise update kernel writes
UPDATE_FLOATS = (jnp.float32, jnp.float64)
#: a kernel's entries are counted in int32
MAX_ENTRIES = 2**31 - 1

_OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "lazy_adam": 3}


#: set inside :func:`pure_jax`: what is traced there runs the pure-JAX path
_PURE = contextvars.ContextVar("jaxembed_pure_jax", default=False)


def available() -> bool:
    """Whether this process runs the CPU kernels: they were built, ``JAXEMBED_KERNELS`` is not
    ``0``, and the caller is not inside :func:`pure_jax`."""
    return _ON and not _PURE.get()


def on_cpu(kernel, reference, *args):
    """``kernel(*args)`` on CPU where this process runs the kernels (:func:`available`),
    ``reference(*args)`` elsewhere: ``jax.lax.platform_dependent`` picks at lowering time."""
    if not available():
        return reference(*args)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=reference)


@contextlib.contextmanager
def pure_jax():
    """Traces jaxembed on the pure-JAX path inside the block, kernels or not.

    What is traced inside holds no call of the kernels' FFI targets: XLA's own ops only, which
    any jax runs. :func:`jaxembed.serving.export` traces this way, since ``jax.export`` refuses a
    custom call without a compatibility guarantee, and the process that loads an artifact need
    not have jaxembed. JAX caches traces without knowing this switch, so the block clears the
    caches on its way in and out (``jax.clear_caches()``): what was compiled before is compiled
    again when next called, and nothing traced inside is reused outside.

    Example:
      >>> import jax, jax.numpy as jnp, jaxembed
      >>> with jaxembed.kernels.pure_jax():
      ...     jaxembed.kernels.available()
      False
    """
    token = _PURE.set(True)
    jax.clear_caches()
    try:
        yield
    finally:
        _PURE.reset(token)
        jax.clear_caches()


def status() -> str:
    """The instruction set the kernels run with (``"avx512"``, ``"avx2"``, ``"generic"``),
    or why they do not run."""
    return _native.isa() if _ON else _WHY


def targets() -> tuple[str, ...]:
    """The kernels' FFI target names (``"jaxembed_bag_sum"``, ...); none where not built."""
    return tuple(_native.registrations()) if _native is not None else ()


@functools.cache
def _registered() -> bool:
    for name, capsule in _native.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return True


#: the packed row formats (``PackedTable.native_format``): 8, 4 and 2-bit codes, and fp8
E4M3, E5M2 = 10, 11
PACKED = (8, 4, 2, E4M3, E5M2)
#: the dtypes a packed table's rows decode to
PACKED_OUT = (jnp.float32, jnp.bfloat16, jnp.float16)


def table_applies(table: Any, dtypes=FLOATS) -> bool:
    """Whether a kernel reads ``table``: on, a plain 2-D array of a dtype in ``dtypes``."""
    return (
        available()
        and isinstance(table, jax.Array | jax.core.Tracer)
        and getattr(table, "ndim", 0) == 2
        and any(table.dtype == d for d in dtypes)
    )


def _format(table: Any) -> int | None:
    """The kernels' format code of a table: 0 (a float array), a packed format, or None (no
    kernel reads it)."""
    if table_applies(table):
        return 0
    fmt = getattr(table, "native_format", None)
    stored = getattr(table, "stored", None)
    if (
        available()
        and fmt in PACKED
        and isinstance(stored, jax.Array | jax.core.Tracer)
        and stored.dtype == jnp.uint8
        and stored.ndim == 2
        and any(table.dtype == d for d in PACKED_OUT)
    ):
        return fmt
    return None


def bags_apply(table: Any, num_entries: int, style: str) -> bool:
    """Whether the bag and gather kernels read ``table``'s rows for ``num_entries`` ids looked
    up in ``style`` ("gather" or "auto": on CPU, "auto" gathers; "one_hot" keeps its matmul),
    at least one of them. ``table`` is a float array, or a packed table (the core's
    ``PackedTable``) whose ``native_format`` the kernels decode."""
    if _format(table) is None or style == "one_hot":
        return False
    return 0 < num_entries <= MAX_ENTRIES  # no ids: nothing to speed up


def _source(table: Any) -> tuple[jax.Array, dict]:
    """The array a kernel reads for ``table`` and the attributes that say how."""
    fmt = _format(table)
    stored = table if fmt == 0 else table.stored
    return stored, dict(format=np.int32(fmt), dim=np.int64(table.shape[1]))


def _ids(ids: jax.Array) -> jax.Array:
    return ids if ids.dtype in (jnp.int32, jnp.int64) else ids.astype(jnp.int32)


def _accumulator(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _call(name: str, results, *args, aliases=None, **attrs):
    """The handler ``name`` on ``args``. Inside ``shard_map`` the arguments are first cast to
    vary over the same manual axes (an FFI call, unlike ``jnp``'s operations, does not cast
    them itself), and so are the results."""
    _registered()
    axes = frozenset().union(*(_vma(a) for a in args))
    if axes:
        args = tuple(
            a if _vma(a) == axes else jax.lax.pcast(a, tuple(sorted(axes - _vma(a))), to="varying")
            for a in args
        )
        manual = jax.typeof(args[0]).manual_axis_type
        mesh = jax.sharding.get_abstract_mesh()

        def typed(r):
            spec = jax.sharding.PartitionSpec(*[None] * len(r.shape))
            sharding = jax.sharding.NamedSharding(mesh, spec)
            return jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=sharding,
                                        manual_axis_type=manual)  # fmt: skip

        results = jax.tree.map(typed, results)
    return jax.ffi.ffi_call(name, results, vmap_method="sequential", input_output_aliases=aliases)(
        *args, **attrs
    )


def _vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def _checkable(ids: jax.Array, rows: int, keep: jax.Array | None = None) -> None:
    """A gather of the ids into a zero-width table, for ``jax.experimental.checkify``'s index
    checks to see the ids the kernel reads (as they see XLA's gathers on the pure-JAX path);
    nothing uses its result, so outside ``checkify`` XLA drops it."""
    if keep is not None:
        ids = jnp.where(keep, ids, 0)
    jnp.take(jnp.zeros((rows, 0), jnp.float32), ids, axis=0, mode="fill", fill_value=0)


def gather(table: Any, ids: jax.Array, fill: float) -> jax.Array:
    """``table[ids]`` with a row of ``fill`` for an id outside the table: ``(n, D)`` in the
    table's dtype (a packed table's rows decoded)."""
    _checkable(ids, table.shape[0])
    stored, attrs = _source(table)
    out = jax.ShapeDtypeStruct((ids.shape[0], table.shape[1]), table.dtype)
    return _call("jaxembed_gather", out, stored, _ids(ids), fill=np.float64(fill), **attrs)


def _bounds(starts: jax.Array, ends: jax.Array) -> tuple[jax.Array, jax.Array]:
    return starts.astype(jnp.int32), ends.astype(jnp.int32)


def bag_sum(
    table: Any,
    ids: jax.Array,
    keep: jax.Array | None,
    weights: jax.Array | None,
    starts: jax.Array,
    ends: jax.Array,
    *,
    mean: bool,
    fill: float = float("nan"),
) -> jax.Array:
    """Bag ``b``'s kept entries ``[starts[b], ends[b])``, summed in float32 (float64 for a
    float64 table), weighted, and with ``mean`` divided by their count: ``(B, D)``."""
    acc = _accumulator(table.dtype)
    _checkable(ids, table.shape[0], keep)
    keep = jnp.zeros((0,), bool) if keep is None else keep.astype(bool)
    weights = jnp.zeros((0,), acc) if weights is None else weights.astype(acc)
    out = jax.ShapeDtypeStruct((starts.shape[0], table.shape[1]), table.dtype)
    s, e = _bounds(starts, ends)
    stored, attrs = _source(table)
    return _call("jaxembed_bag_sum", out, stored, _ids(ids), keep, weights, s, e,
                 mean=np.bool_(mean), fill=np.float64(fill), **attrs)  # fmt: skip


def bag_max(
    table: Any,
    ids: jax.Array,
    keep: jax.Array | None,
    starts: jax.Array,
    ends: jax.Array,
    *,
    fill: float = float("nan"),
) -> tuple[jax.Array, jax.Array]:
    """Bag ``b``'s column-wise max over its kept entries, and the position of the first
    maximal entry (-1 where the bag keeps nothing): ``(B, D)`` each."""
    _checkable(ids, table.shape[0], keep)
    keep = jnp.zeros((0,), bool) if keep is None else keep.astype(bool)
    shape = (starts.shape[0], table.shape[1])
    out = (jax.ShapeDtypeStruct(shape, table.dtype), jax.ShapeDtypeStruct(shape, jnp.int32))
    s, e = _bounds(starts, ends)
    stored, attrs = _source(table)
    return _call("jaxembed_bag_max", out, stored, _ids(ids), keep, s, e, fill=np.float64(fill),
                 **attrs)  # fmt: skip


def sparse_update(
    optimizer: str,
    table: jax.Array,
    states: tuple[jax.Array | None, jax.Array | None],
    ids: jax.Array,
    values: Any,
    rate: jax.Array,
    row_rate: jax.Array | None = None,
    *,
    eps: float = 0.0,
    b1: float = 0.0,
    b2: float = 0.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """One row-wise optimizer step in place: ``(table, state0, state1)``.

    ``optimizer`` is ``"sgd"``, ``"adagrad"``, ``"rowwise_adagrad"`` or ``"lazy_adam"``;
    ``states`` its row states (None where it keeps none); ``ids`` ``(n,)`` and ``values``
    ``(n, D)`` the gradient's entries (ids outside the table are dropped, duplicates summed in
    their order), or a pooled gradient (the core's ``Spread``: ``(B, D)`` bag gradients, the
    bags' starts, each entry's factor, a max bag's positions) that the kernel spreads as it
    reads it;
    ``rate`` the step size, a scalar; ``row_rate`` each entry's factor on it. The outputs alias
    the table and states: donate them to update in place.
    """
    dtype = table.dtype
    empty = jnp.zeros((0,), dtype)
    none = jnp.zeros((0,), jnp.int32)
    s0, s1 = (empty if s is None else s for s in states)
    row_rate = empty if row_rate is None else row_rate.astype(dtype)
    if isinstance(values, jax.Array | jax.core.Tracer):
        values, starts, factor, pos = values.astype(dtype), none, empty, none
    else:  # pooled: the spread's parts, in the table's type (the caller checked)
        starts, factor = values.starts.astype(jnp.int32), values.factor
        pos = none if values.pos is None else values.pos.astype(jnp.int32)
        values = values.cot
    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (table, s0, s1))
    table, s0, s1 = _call(
        "jaxembed_sparse_update", results, table, s0, s1, _ids(ids), values, starts, factor, pos,
        row_rate, jnp.asarray(rate, dtype), aliases={0: 0, 1: 1, 2: 2},
        optimizer=np.int32(_OPTIMIZERS[optimizer]), eps=np.float64(eps), b1=np.float64(b1),
        b2=np.float64(b2), weight_decay=np.float64(weight_decay), maximize=np.bool_(maximize),
    )  # fmt: skip
    return table, (None if states[0] is None else s0), (None if states[1] is None else s1)


def search(
    hi: jax.Array, lo: jax.Array, q_hi: jax.Array, q_lo: jax.Array, ok: jax.Array
) -> jax.Array:
    """Managed collisions' search: each query's lower bound among the first ``S - 1`` of the
    sorted pairs ``(hi, lo)``, in ``[0, S - 1]`` (``S - 1`` where ``ok`` is false), as
    ``jaxembed.collisions._ids.lower_bound`` computes it."""
    out = jax.ShapeDtypeStruct(q_hi.shape, jnp.int32)
    return _call("jaxembed_search", out, hi, lo, q_hi, q_lo, ok)


def remap(
    hi: jax.Array,
    lo: jax.Array,
    slot: jax.Array,
    q_hi: jax.Array,
    q_lo: jax.Array,
    ok: jax.Array,
) -> jax.Array:
    """Managed collisions' remap: each query's row, ``slot`` of its held id among the sorted
    pairs ``(hi, lo)``, the miss row ``S - 1`` for another valid id, ``S`` where ``ok`` is false,
    as ``jaxembed.collisions._remap.search`` computes it."""
    out = jax.ShapeDtypeStruct(q_hi.shape, jnp.int32)
    return _call("jaxembed_remap", out, hi, lo, slot, q_hi, q_lo, ok)


def window(
    hi: jax.Array, lo: jax.Array, first_call: jax.Array, *, ids_per_call: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A managed-collision window's distinct ids, ascending, with their counts and last calls:
    ``(u_hi, u_lo, u_count, u_last)``, as ``jaxembed.collisions._remap``'s pure-JAX step 1
    computes them (past the distinct ids: empties, counts 0, last calls 0)."""
    n = hi.shape[0]
    types = (jnp.uint32, jnp.uint32, jnp.int32, jnp.int32)
    out = tuple(jax.ShapeDtypeStruct((n,), t) for t in types)
    return _call("jaxembed_window", out, hi, lo, first_call.astype(jnp.int32),
                 ids_per_call=np.int64(ids_per_call))  # fmt: skip


def argsort(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """The stable order of the 64-bit keys ``hi * 2**32 + lo`` (uint32 halves): ``(n,)``
    int32, as ``jaxembed.collisions._ids.argsort`` computes it."""
    out = jax.ShapeDtypeStruct(hi.shape, jnp.int32)
    return _call("jaxembed_argsort", out, hi, lo)


def evict(held, key, new, new_key, num_new):
    """A managed-collision eviction's replacement, as ``jaxembed.collisions._remap``'s pure-JAX
    steps compute it: ``held`` is ``(hi, lo, slot, counts, last)`` (counts and last None where
    the policy keeps none), ``new`` is ``(n_hi, n_lo, n_count, n_last)`` in order F. Returns
    ``((hi, lo, slot, counts, last), evicted, entering)``."""
    hi, lo, slot, counts, last = held
    n_hi, n_lo, n_count, n_last = new
    size, window = hi.shape[0], n_hi.shape[0]
    none = jnp.zeros((0,), jnp.int32)
    counts_in, n_count = (none, none) if counts is None else (counts, n_count)
    last_in, n_last = (none, none) if last is None else (last, n_last)

    def like(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype)

    out = (*(like(a) for a in (hi, lo, slot, counts_in, last_in)),
           jax.ShapeDtypeStruct((min(size, window),), jnp.int32),
           jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
    hi, lo, slot, counts_out, last_out, evicted, entering = _call(
        "jaxembed_evict", out, hi, lo, slot, counts_in, last_in, key, n_hi, n_lo, n_count,
        n_last, new_key, num_new.astype(jnp.int32),
    )  # fmt: skip
    counts = None if counts is None else counts_out
    last = None if last is None else last_out
    return (hi, lo, slot, counts, last), evicted, entering


def bucket(
    owner: jax.Array, local: jax.Array, send: jax.Array, *, devices: int, rows: int, capacity: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """A device's entries bucketed by owner at a static capacity: ``(slot, keys, counts,
    per_owner, order)``, as ``jaxembed.sharding._route.bucket`` computes them (see it)."""
    n, size = owner.shape[0], devices * capacity
    out = (
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((size,), jnp.int32),
        jax.ShapeDtypeStruct((size,), jnp.int32),
        jax.ShapeDtypeStruct((devices,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    return _call("jaxembed_bucket", out, owner.astype(jnp.int32), local.astype(jnp.int32),
                 send.astype(bool), devices=np.int64(devices), rows=np.int64(rows),
                 capacity=np.int64(capacity))  # fmt: skip
