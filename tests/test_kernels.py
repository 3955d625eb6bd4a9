"""The CPU kernels (``jaxembed.kernels``) against the pure-JAX path, which stays the reference.

Each property draws random tables and batches (every float dtype and packed format, empty bags,
duplicates, padding, ids outside the table and negative ones) and compares a kernel with the
reference function it replaces, both jitted on CPU:

* bags (sum, mean, max and its positions) and row gathers: bit for bit, weighted sums too (the
  kernel fuses each weighted entry's multiply-add, as XLA does the reference's);
* packed tables (8, 4, 2 bits, e4m3, e5m2, each output dtype): bit for bit the reference's
  decode (``QuantizedTable.take``) pooled the same way;
* the row-wise optimizers: sgd and adagrad bit for bit; rowwise_adagrad and lazy_adam within the
  bound each test states (XLA sums a row's squares in vector lanes in an order of its own, and
  contracts lazy_adam's moment updates in two fusions differently);
* a pooled step (``lookup_bags``): the kernel spreads the bags' gradient itself, bit for bit as
  it updates from the spread ``(n, D)`` values, which the compiled step never makes.

The whole suite also runs on each path: ``python -m pytest`` (the kernels) and
``JAXEMBED_KERNELS=0 python -m pytest`` (the reference), as ``.ci/run`` does.
"""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxembed
from jaxembed.core import _bag, _index_policy
from jaxembed.kernels import _ffi
from jaxembed.sparse import _lookup

ROOT = pathlib.Path(__file__).resolve().parents[1]

needs_kernels = pytest.mark.skipif(not _ffi.available(), reason=f"kernels {_ffi._WHY}")

#: examples of the properties that compile a program a dtype and layout, per profile: fewer than
#: the default profile's 15 by default (the README's command), as many as the profile's elsewhere
_PROFILE = settings.get_current_profile_name()
costly = settings(max_examples=10) if _PROFILE == "default" else settings()


def reference_path():
    """Trace the pure-JAX path: the kernels are chosen when a function is traced, and
    :func:`jaxembed.kernels.pure_jax` clears JAX's caches on the way in and out, so no trace
    made with the kernels (an inner ``jax.jit`` of the core's, say) is reused inside."""
    return jaxembed.kernels.pure_jax()


def test_the_kernels_are_built_where_a_compiler_is():
    """An install on a machine with a C++ compiler builds the kernels (a failed build would
    otherwise leave every user on the slower path without a word)."""
    if os.environ.get("JAXEMBED_BUILD_KERNELS") == "0" or not shutil.which("c++"):
        pytest.skip("no compiler, or the build was turned off")
    assert _ffi._native is not None, _ffi._WHY
    if os.environ.get("JAXEMBED_KERNELS", "1") == "0":
        assert not jaxembed.kernels.available()
        assert "JAXEMBED_KERNELS=0" in jaxembed.kernels.status()
    else:
        assert jaxembed.kernels.available()
        assert jaxembed.kernels.status() in ("generic", "avx2", "avx512")


# -- bags and gathers ---------------------------------------------------------------------------

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@st.composite
def bag_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 40))
    dim = draw(st.sampled_from([1, 3, 8, 17, 64]))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    two_d = draw(st.booleans())
    if two_d:
        num_bags, width = draw(st.integers(0, 8)), draw(st.integers(0, 6))
        lengths = [width] * num_bags
    else:
        lengths = draw(st.lists(st.integers(0, 7), min_size=1, max_size=10))
        width = None
    n = sum(lengths) + (0 if two_d else draw(st.integers(0, 3)))  # entries in no bag
    ids = draw(st.lists(st.integers(-3, rows + 3), min_size=n, max_size=n))
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    weighted = mode == "sum" and draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, rows, dim, mode, lengths, width, ids, keep, weighted, seed


def _bag_inputs(case):
    dtype, rows, dim, mode, lengths, width, ids, keep, weighted, seed = case
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    # as the core hands them on: an id outside the table (a negative one too) is the sentinel
    ids = _index_policy.safe_indices(jnp.asarray(np.asarray(ids, np.int32)), rows)
    keep = np.asarray(keep, bool)
    keep[sum(lengths) :] = False  # an entry in no bag is left out, as the core leaves it out
    keep = jnp.asarray(keep)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    ends = (starts + np.asarray(lengths, np.int32)).astype(np.int32)
    psw = jnp.asarray(rng.uniform(-2, 2, ids.shape[0]), jnp.float32) if weighted else None
    return table, ids, keep, psw, jnp.asarray(starts), jnp.asarray(ends), mode, width


def _reference_bags(table, ids, keep, psw, starts, ends, mode, width):
    """The pure-JAX forward on the same entries (the column loop; the segment reduction for
    1-D bags too), jitted."""
    bounds = starts if width is not None else (starts, ends)
    longest = width if width is not None else int(np.max(np.asarray(ends - starts), initial=0))

    def run():
        out = [_bag._column_bags(table, ids, keep, psw, bounds, mode, longest, "gather")]
        if width is None:
            out.append(_bag._segment_bags(table, ids, keep, psw, bounds, mode, "gather"))
        return out

    return jax.jit(run)()


def _same(a, b, what):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), what)


def _within(a, b, limit, what):
    """``a`` and ``b`` NaN at the same places, and elsewhere at most ``limit`` apart."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), f"{what}: NaN placement")
    ok = np.isnan(b) | (np.abs(a - b) <= limit)
    assert ok.all(), (what, np.abs(a - b)[~ok].max())


def _weighted_bound(values, psw, longest, out, terms=1.0):
    """A weighted bag's distance from the reference's: XLA contracts the reference's products
    into its sums in some programs and not in others, the kernel always (one FMA an entry):
    one rounding of each entry's product, each at most ``eps * |term|`` where a term is at most
    ``terms * max|values| * max|weight|``, carried through the bag's ``longest`` sums, then the
    output dtype's own rounding of the result."""
    eps = float(np.finfo(np.float32).eps)
    weight = float(np.abs(np.asarray(psw)).max(initial=1.0))
    largest = terms * float(np.nanmax(np.abs(np.asarray(values, np.float32)), initial=0.0))
    out_eps = float(jnp.finfo(out.dtype).eps)
    rounding = out_eps * np.abs(np.asarray(out, np.float32))
    return 2 * eps * (longest + 1) * largest * weight + rounding


@needs_kernels
@given(bag_cases())
def test_bags_equal_the_pure_jax_bags(case):
    table, ids, keep, psw, starts, ends, mode, width = _bag_inputs(case)
    bounds = starts if width is not None else (starts, ends)
    ours, pos = jax.jit(lambda: _bag._native_bags(table, ids, keep, psw, bounds, mode, width))()
    refs = _reference_bags(table, ids, keep, psw, starts, ends, mode, width)
    longest = width if width is not None else int(np.max(np.asarray(ends - starts), initial=0))
    for k, (ref, ref_pos) in enumerate(refs):
        if k == 1 and mode == "max":
            continue  # the segment path's max picks positions its own way (same values)
        if psw is None:  # sums, means and maxes: bit for bit
            _same(ours, ref, f"{mode} bags against reference {k}")
        else:
            bound = _weighted_bound(table, psw, longest, ref)
            _within(ours, ref, bound, f"weighted bags against reference {k}")
        if mode == "max":
            np.testing.assert_array_equal(pos, ref_pos)
    assert ours.dtype == table.dtype


@needs_kernels
@given(bag_cases(), st.sampled_from([float("nan"), 0.0]))
def test_gathers_equal_xla_gathers(case, fill):
    table, ids, *_ = _bag_inputs(case)
    ours = jax.jit(lambda: _ffi.gather(table, ids, fill))()
    ref = jax.jit(lambda: _index_policy._gather(table, ids, fill))()
    _same(ours, ref, "rows")
    assert ours.dtype == table.dtype


@needs_kernels
def test_a_negative_or_huge_id_reads_the_fill_row_and_never_wraps():
    """The core maps such ids to the sentinel first; handed one anyway, a kernel reads no row
    for it (XLA's ``take`` would wrap a negative one)."""
    table = jnp.arange(12.0).reshape(4, 3)
    ids = jnp.array([-1, -4, 4, 2**31 - 1, 1], jnp.int32)
    rows = np.asarray(_ffi.gather(table, ids, float("nan")))
    assert np.isnan(rows[:4]).all() and (rows[4] == [3, 4, 5]).all()
    bags = _ffi.bag_sum(table, ids, None, None, jnp.array([0, 4]), jnp.array([4, 5]), mean=False)
    assert np.isnan(np.asarray(bags[0])).all() and (np.asarray(bags[1]) == [3, 4, 5]).all()
    wide = jnp.array([-1, 2**40, 2], jnp.int64) if jax.config.jax_enable_x64 else None
    if wide is not None:
        assert np.isnan(np.asarray(_ffi.gather(table, wide, float("nan")))[:2]).all()


FORMATS = [(8, None), (4, None), (2, None), (8, "e4m3"), (8, "e5m2")]


@needs_kernels
@costly
@given(
    bag_cases(),
    st.sampled_from(FORMATS),
    st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
def test_packed_bags_and_gathers_equal_the_reference_decode(case, fmt, out_dtype):
    table, ids, keep, psw, starts, ends, mode, width = _bag_inputs(case)
    bits, fp8 = fmt
    if table.shape[1] % 4:
        table = jnp.pad(table, ((0, 0), (0, 4 - table.shape[1] % 4)))
    q = jaxembed.quantize(table.astype(jnp.float32), bits=bits, fp8=fp8)
    q = q.with_output_dtype(out_dtype)
    bounds = starts if width is not None else (starts, ends)
    with reference_path():  # the reference decodes through QuantizedTable.take
        refs = _reference_bags(q, ids, keep, psw, starts, ends, mode, width)
        ref_rows = jax.jit(lambda: q.take(ids, float("nan")).astype(out_dtype))()
    ours, pos = jax.jit(lambda: _bag._native_bags(q, ids, keep, psw, bounds, mode, width))()
    ref, ref_pos = refs[0]
    rows = jax.jit(lambda: _ffi.gather(q, ids, float("nan")))()
    assert ours.dtype == out_dtype
    exact_decode = (bits, fp8) != (8, None)  # a small code times a float16 scale, or fp8: exact
    if mode == "max" and exact_decode:
        np.testing.assert_array_equal(pos, ref_pos)
    if exact_decode and psw is None:
        _same(ours, ref, f"{fmt} {mode} bags")
        _same(rows, ref_rows, f"{fmt} rows")
        return
    # XLA fuses the reference's 8-bit ``code * scale + bias``, and a weighted entry's product and
    # sum, into one FMA in some programs and not in others; the kernel rounds the decode's product
    # and sum, and fuses each weighted entry. One rounding per value, and per entry.
    decoded = np.asarray(jaxembed.dequantize(q)["weight"])
    longest = int(np.max(np.asarray(ends - starts), initial=0)) if width is None else width
    weights = jnp.ones(1) if psw is None else psw
    # A decoded row's smallest value is its bias (code 0), so a product ``code * scale`` is at
    # most twice the row's largest magnitude: ``terms=2``; then two roundings an entry.
    bound = 2 * _weighted_bound(decoded, weights, longest, ref, terms=2.0)
    _within(ours, ref, bound, f"{fmt} {mode} bags")
    row_bound = _weighted_bound(decoded, jnp.ones(1), 1, ref_rows, terms=2.0)
    _within(rows, ref_rows, row_bound, f"{fmt} rows")
    if mode == "max":  # values an ulp apart may swap places: a near-maximal entry of the bag
        _near_maximal(pos, ref_pos, ref, bound, decoded, ids, keep, starts, ends)


def _near_maximal(pos, ref_pos, ref, bound, decoded, ids, keep, starts, ends):
    """Where the kernel's max position differs from the reference's, it is a kept entry of the
    same bag whose (reference-decoded) value is within ``bound`` of the bag's maximum."""
    pos, ref_pos, ref = np.asarray(pos), np.asarray(ref_pos), np.asarray(ref, np.float32)
    ids, keep = np.asarray(ids), np.asarray(keep)
    starts, ends, bound = np.asarray(starts), np.asarray(ends), np.broadcast_to(bound, ref.shape)
    np.testing.assert_array_equal(pos < 0, ref_pos < 0, "bags with nothing kept")
    for b, d in zip(*np.nonzero(pos != ref_pos), strict=True):
        j = int(pos[b, d])
        assert starts[b] <= j < ends[b] and keep[j], (b, d, j)
        value = decoded[ids[j], d] if ids[j] < decoded.shape[0] else np.nan
        assert np.isnan(ref[b, d]) or value >= ref[b, d] - bound[b, d], (b, d, j, value)


@needs_kernels
def test_large_bags_split_over_the_thread_pool_equal_the_reference():
    """Big enough that the handler splits the bags over XLA's threads (skewed lengths)."""
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(5000, 64)), jnp.float32)
    lengths = np.minimum(rng.zipf(1.3, 3000), 200)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    ends = (starts + lengths).astype(np.int32)
    ids = jnp.asarray(rng.integers(0, 5000, int(lengths.sum())), jnp.int32)
    keep = jnp.ones(ids.shape, bool)
    args = (table, ids, keep, None, jnp.asarray(starts), jnp.asarray(ends))
    for mode in ("sum", "mean", "max"):
        ours, _ = jax.jit(lambda m=mode: _bag._native_bags(*args[:4], args[4:], m, None))()
        ref, _ = _reference_bags(*args, mode, None)[1]
        _same(ours, ref, mode)


@needs_kernels
def test_the_handlers_refuse_buffers_that_do_not_match():
    """The native side checks every buffer before it reads one: a mismatch is an error, never
    a read past a buffer."""
    table = jnp.ones((4, 2))
    out = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    attrs = dict(mean=np.bool_(False), fill=np.float64(0), format=np.int32(0), dim=np.int64(2))
    bad_keep = (table, jnp.zeros(3, jnp.int32), jnp.ones(2, bool), jnp.zeros(0, jnp.float32),
                jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))  # fmt: skip
    with pytest.raises(Exception, match="keep must hold one flag per id"):
        jax.block_until_ready(_ffi._call("jaxembed_bag_sum", out, *bad_keep, **attrs))
    packed = jnp.zeros((4, 5), jnp.uint8)  # 8 bits of 2 values need 10 bytes a row
    with pytest.raises(Exception, match=r"a packed table must be \(rows, 10\) uint8"):
        out = jax.ShapeDtypeStruct((1, 2), jnp.float32)
        ids = jnp.zeros(1, jnp.int32)
        attrs = dict(fill=np.float64(0), format=np.int32(8), dim=np.int64(2))
        jax.block_until_ready(_ffi._call("jaxembed_gather", out, packed, ids, **attrs))


# -- the row-wise optimizers --------------------------------------------------------------------


@st.composite
def update_cases(draw):
    rows = draw(st.integers(1, 30))
    dim = draw(st.sampled_from([1, 4, 7, 16, 33]))
    n = draw(st.integers(1, 60))
    ids = draw(st.lists(st.integers(-2, rows + 2), min_size=n, max_size=n))
    name = draw(st.sampled_from(["sgd", "adagrad", "rowwise_adagrad", "lazy_adam"]))
    options = {}
    if name != "sgd":
        options["maximize"] = draw(st.booleans())
    if name == "rowwise_adagrad":
        options["weight_decay"] = draw(st.sampled_from([0.0, 0.01]))
    scaled = draw(st.booleans())
    return rows, dim, ids, name, options, scaled, draw(st.integers(0, 2**31 - 1))


OPTIMIZERS = {
    "sgd": lambda **kw: jaxembed.sparse.sgd(0.3, **kw),
    "adagrad": lambda **kw: jaxembed.sparse.adagrad(0.3, **kw),
    "rowwise_adagrad": lambda **kw: jaxembed.sparse.rowwise_adagrad(0.3, **kw),
    "lazy_adam": lambda **kw: jaxembed.sparse.lazy_adam(0.05, **kw),
}


def _cancellation(grads, rows: int) -> np.ndarray:
    """``(rows, 1)``: how far each table row's duplicate gradient entries cancel, the largest
    over its columns and over ``grads`` (one ``SparseGrad`` a step) of ``sum |v| / |sum v|``: 1
    for a row with one entry or none, inf where nonzero terms sum to exactly zero. Two paths
    that sum a row's duplicates in different orders differ by up to ``n eps sum |v|``: relative
    to the sum, this factor times ``n eps``; a row-wise step normalizes the sum, so its own
    relative error is that large too."""
    kappa = np.ones(rows)
    for g in grads:
        idx, v = np.asarray(g.indices), np.asarray(g.values, np.float64)
        keep = (idx >= 0) & (idx < rows)  # padding and dropped entries carry the sentinel
        total, size = np.zeros((rows, v.shape[1])), np.zeros((rows, v.shape[1]))
        np.add.at(total, idx[keep], v[keep])
        np.add.at(size, idx[keep], np.abs(v[keep]))
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(size == 0, 1.0, size / np.abs(total))
        kappa = np.maximum(kappa, k.max(axis=1))
    return kappa[:, None]


@needs_kernels
@costly
@given(update_cases())
def test_row_wise_steps_equal_the_pure_jax_steps(case):
    rows, dim, ids, name, options, scaled, seed = case
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    grads = [
        jaxembed.sparse.SparseGrad(
            jnp.asarray(np.asarray(ids, np.int32)),
            jnp.asarray(rng.normal(size=(len(ids), dim)), jnp.float32),
        )
        for _ in range(2)
    ]
    opt = OPTIMIZERS[name](**options)
    lr_scale = None
    if scaled:  # two tables stacked: the second's rows at half the rate
        from jaxembed.collections._collection import RowScale

        lr_scale = RowScale((0, rows // 2), (1.0, 0.5))

    def steps(table):
        state, tables = opt.init(table), [table]
        for g in grads:
            table, state = opt.update(g, state, table, lr_scale=lr_scale)
            tables.append(table)
        return table, state, tables

    ours = jax.jit(lambda t: steps(t))(table)
    with reference_path():
        ref = jax.jit(lambda t: steps(t))(table)
    # XLA contracts a multiply-add into one FMA where it fuses them, and how it fuses depends on
    # the whole program; rowwise_adagrad's row sum runs in vector lanes there. So each step is
    # within a few ulp of the step, and of the row (typically equal: sgd, adagrad), times how
    # far the row's duplicates cancel (their sum's condition number, _cancellation)
    eps = float(np.finfo(np.float32).eps)
    path = [np.asarray(t) for t in ref[2]]
    moved = sum(np.abs(b - a) for a, b in itertools.pairwise(path))  # each step's own
    steps_bound = (dim + 4 + len(ids)) * eps * moved * _cancellation(grads, rows)
    bound = steps_bound + 2 * eps * sum(np.abs(t) for t in path[1:]) + 1e-30
    assert np.all(np.abs(np.asarray(ours[0]) - np.asarray(ref[0])) <= bound)
    # a state entry sums terms as large as the gradients (a moment can cancel to near zero)
    terms = max(float(np.abs(np.asarray(g.values)).max()) for g in grads) ** 2 + 1.0
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(ref[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=(dim + 4) * eps, atol=4 * eps * terms)


@st.composite
def pooled_cases(draw):
    """Bags for sparse training (``lookup_bags``): every mode and option that shapes a bag's
    gradient, duplicates and padding, and each optimizer."""
    rows = draw(st.integers(1, 30))
    dim = draw(st.sampled_from([1, 5, 8, 16, 40]))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    two_d = draw(st.booleans())
    if two_d:
        lengths = [draw(st.integers(1, 5))] * draw(st.integers(1, 6))
    else:
        lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=8))
    n = sum(lengths)
    ids = draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n))
    options = {}
    if draw(st.booleans()):
        options["padding_idx"] = draw(st.integers(0, rows - 1))
    if mode != "max" and draw(st.booleans()):
        options["scale_grad_by_freq"] = True
    weighted = mode == "sum" and draw(st.booleans())
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    opt_options = {"maximize": draw(st.booleans())}
    if name == "rowwise_adagrad":
        opt_options["weight_decay"] = draw(st.sampled_from([0.0, 0.01]))
    scaled = draw(st.booleans())
    return rows, dim, mode, two_d, lengths, ids, options, weighted, name, opt_options, scaled


def _pooled_step(case, seed):
    """``(step, table)``: two row-wise steps of ``lookup_bags`` + ``opt.update`` on ``case``,
    as a function of the table, and ``step(table, plain=True)``, the same steps on the spread
    values as a plain ``SparseGrad`` (no pooled gradient to read)."""
    rows, dim, mode, two_d, lengths, ids, options, weighted, name, opt_options, scaled = case
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    ids = np.asarray(ids, np.int32)
    if two_d:
        indices, offsets = jnp.asarray(ids.reshape(len(lengths), -1)), None
    else:
        indices = jnp.asarray(ids)
        offsets = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32))
    psw = jnp.asarray(rng.uniform(-2, 2, ids.shape), jnp.float32) if weighted else None
    if weighted and two_d:
        psw = psw.reshape(indices.shape)
    targets = [jnp.asarray(rng.normal(size=(len(lengths), dim)), jnp.float32) for _ in range(2)]
    opt = OPTIMIZERS[name](**opt_options)
    lr_scale = None
    if scaled:
        from jaxembed.collections._collection import RowScale

        lr_scale = RowScale((0, rows // 2), (1.0, 0.5))

    def step(table, plain=False, collect=False):
        state, tables, grads = opt.init(table), [table], []
        for target in targets:
            bags, lk = jaxembed.sparse.lookup_bags(
                {"weight": table}, indices, offsets, mode=mode, per_sample_weights=psw, **options
            )
            grad = lk.grad(jax.grad(lambda b, t=target: jnp.sum((b - t) ** 2 * t))(bags))
            assert _lookup.spread_of(grad) is not None  # the bags' gradient, for the kernel
            if plain:
                grad = jaxembed.sparse.SparseGrad(grad.indices, grad.values)
            table, state = opt.update(grad, state, lk.params["weight"], lr_scale=lr_scale)
            tables.append(table)
            grads.append(jaxembed.sparse.SparseGrad(grad.indices, grad.values))
        if collect:  # the spread values each step applied (the reference's, for the bound)
            return table, state, tables, grads
        return table, state, tables

    return step, table


@needs_kernels
@costly
@given(pooled_cases(), st.integers(0, 2**31 - 1))
def test_pooled_steps_read_the_bags_gradient_and_equal_the_spread_values(case, seed):
    """The update kernel reads a bag's gradient, spread entry by entry as it goes: the same
    step, bit for bit, as the kernel on the spread ``(n, D)`` values, and within the row-wise
    steps' bound of the pure-JAX path."""
    step, table = _pooled_step(case, seed)
    ours = jax.jit(step)(table)
    spread = jax.jit(lambda t: step(t, plain=True))(table)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(spread), strict=True):
        np.testing.assert_array_equal(a, b)
    with reference_path():
        ref = jax.jit(lambda t: step(t, collect=True))(table)
    # as test_row_wise_steps_equal_the_pure_jax_steps: XLA contracts and reorders the
    # reference's arithmetic by program, so a few ulp of each step and of the row, times how far
    # the row's duplicates cancel (weighted bags: weights of both signs)
    eps = float(np.finfo(np.float32).eps)
    path = [np.asarray(t) for t in ref[2]]
    moved = sum(np.abs(b - a) for a, b in itertools.pairwise(path))
    n = len(case[5])
    kappa = _cancellation(ref[3], table.shape[0])
    bound = (table.shape[1] + 4 + n) * eps * moved * kappa
    bound = bound + 2 * eps * sum(np.abs(t) for t in path[1:])
    assert np.all(np.abs(np.asarray(ours[0]) - path[-1]) <= bound + 1e-30)


@needs_kernels
def test_a_pooled_step_makes_no_per_entry_values():
    """Compiled, a donated ``lookup_bags`` + row-wise step hands the kernel the ``(B, D)`` bag
    gradients: no ``(n, D)`` buffer exists (XLA drops the spread values nothing reads)."""
    opt = jaxembed.sparse.rowwise_adagrad(0.1)
    table = jnp.ones((1000, 24))
    bags = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (64, 16)), jnp.int32)

    def step(table, state, bags):
        out, lk = jaxembed.sparse.lookup_bags({"weight": table}, bags, mode="mean")
        grad = lk.grad(jax.grad(lambda b: jnp.sum(b**2))(out))
        return opt.update(grad, state, lk.params["weight"])

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(table, opt.init(table), bags)
    text = hlo.compile().as_text()
    assert "jaxembed_sparse_update" in text
    assert "f32[1024,24]" not in text, "the (n, D) spread values were made"


@needs_kernels
def test_a_donated_sparse_step_updates_the_table_in_place():
    opt = jaxembed.sparse.rowwise_adagrad(0.1)
    table = jnp.asarray(np.random.default_rng(0).normal(size=(1000, 32)), jnp.float32)
    state = opt.init(table)
    grad = jaxembed.sparse.SparseGrad(jnp.array([3, 7, 3]), jnp.ones((3, 32)))
    step = jax.jit(lambda g, s, t: opt.update(g, s, t), donate_argnums=(1, 2))
    hlo = step.lower(grad, state, table).compile().as_text()
    assert "jaxembed_sparse_update" in hlo
    # no copy of the table or its statistic: the kernel writes into the donated buffers
    assert not any("copy(" in line and "f32[1000,32]" in line for line in hlo.splitlines())
    before = table.unsafe_buffer_pointer()
    new_table, _ = step(grad, state, table)
    assert new_table.unsafe_buffer_pointer() == before
    assert float(new_table[5, 0]) != float(new_table[3, 0])


@needs_kernels
def test_the_compiled_steps_call_the_kernels():
    params = {"weight": jnp.ones((50, 8))}
    ids, offsets = jnp.array([1, 2, 3, 4]), jnp.array([0, 2])

    def text(f, *args):
        return jax.jit(f).lower(*args).compile().as_text()

    assert "jaxembed_gather" in text(lambda p: jaxembed.embedding(p, ids)[0], params)
    for mode, target in (("sum", "jaxembed_bag_sum"), ("max", "jaxembed_bag_max")):
        bag = text(lambda p, m=mode: jaxembed.embedding_bag(p, ids, offsets, mode=m)[0], params)
        assert target in bag
    q = jaxembed.quantize(params, bits=4)
    assert "jaxembed_bag_sum" in text(
        lambda q: jaxembed.embedding_bag(q, ids, offsets, mode="sum")[0], q
    )


@needs_kernels
def test_vmap_of_a_bag_is_each_bag():
    tables = jnp.asarray(np.random.default_rng(1).normal(size=(3, 20, 4)), jnp.float32)
    ids = jnp.array([[1, 2], [3, 3], [0, 19]])
    out = jax.vmap(lambda t: jaxembed.embedding_bag({"weight": t}, ids, mode="sum")[0])(tables)
    for k in range(3):
        _same(out[k], jaxembed.embedding_bag({"weight": tables[k]}, ids, mode="sum")[0], k)


# -- the builds ---------------------------------------------------------------------------------


def _isas():
    """The builds below the one this process runs (the rest of the suite tests that one)."""
    builds = ["generic", "avx2"] if platform.machine() in ("x86_64", "AMD64") else ["generic"]
    return [isa for isa in builds if isa != _ffi.status()]


@needs_kernels
@pytest.mark.slow  # a second build of every kernel, run through the whole reference: CI runs it
@pytest.mark.parametrize("isa", _isas())
def test_each_instruction_set_equals_the_reference(isa):
    """Each build below the best one (generic, and AVX2 on an AVX-512 CPU), picked on this CPU
    by JAXEMBED_KERNEL_ISA, on bags of float and packed tables and on two row-wise steps (the
    best build runs everywhere else in the suite)."""
    script = """
import jax, jax.numpy as jnp, numpy as np, jaxembed
from jaxembed.kernels import _ffi
from jaxembed.core import _bag
assert jaxembed.kernels.status() == ISA, jaxembed.kernels.status()
rng = np.random.default_rng(0)
table = jnp.asarray(rng.normal(size=(300, 37)), jnp.float32)
ids = jnp.asarray(rng.integers(0, 301, 900), jnp.int32)  # 300: the sentinel
keep = jnp.asarray(rng.random(900) < 0.9)
starts = jnp.arange(0, 900, 9, dtype=jnp.int32)
for t in (table, table.astype(jnp.bfloat16), table.astype(jnp.float16),
          jaxembed.quantize(table[:, :36], bits=4)):
    for mode in ("sum", "mean", "max"):
        ours = _bag._native_bags(t, ids, keep, None, starts, mode, 9)[0]
        _ffi._ON = False
        ref = _bag._column_bags(t, ids, keep, None, starts, mode, 9, "gather")[0]
        _ffi._ON = True
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
grad = jaxembed.sparse.SparseGrad(ids % 300, jnp.asarray(rng.normal(size=(900, 37)), jnp.float32))
for opt in (jaxembed.sparse.rowwise_adagrad(0.1), jaxembed.sparse.lazy_adam(0.01)):
    ours = jax.jit(lambda t: opt.update(grad, opt.init(t), t))(table)
    _ffi._ON = False
    ref = jax.jit(lambda t: opt.update(grad, opt.init(t), t))(table)
    _ffi._ON = True
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("ok", jaxembed.kernels.status())
""".replace("ISA", repr(isa))
    env = {**os.environ, "JAXEMBED_KERNEL_ISA": isa, "JAXEMBED_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", isa]


def test_an_install_without_a_compiler_skips_the_kernels_and_succeeds(tmp_path):
    """The top-level CMake project with no usable C++ compiler: it warns and configures, so
    ``pip install`` still succeeds, on the pure-JAX path."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake on this machine")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    command = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build")]
    command.append(f"-DPython_EXECUTABLE={sys.executable}")
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "installing without the CPU kernels" in out.stderr, out.stderr


# -- managed collisions' remap -------------------------------------------------------------------


@st.composite
def remap_cases(draw):
    """Held ids (sorted, empties last) and queries: hits, misses, duplicates, extremes, masked."""
    from jaxembed.collisions import ManagedCollision, raw_ids

    size = draw(st.integers(2, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    held = int(draw(st.integers(0, size - 1)))
    spread = draw(st.sampled_from([2**8, 2**31, 2**63 - 1]))
    pool = np.unique(np.concatenate([rng.integers(0, spread, size=held + 4, dtype=np.int64),
                                     [0, 2**63 - 1]]))  # fmt: skip
    ids = np.sort(rng.choice(pool, size=min(held, pool.size), replace=False))
    state = ManagedCollision("lfu", 1).init(size, 1)
    pairs = raw_ids(ids)
    state = state._replace(
        hi=state.hi.at[: ids.size].set(pairs.hi),
        lo=state.lo.at[: ids.size].set(pairs.lo),
        slot=jnp.asarray(rng.permutation(size).astype(np.int32)),
    )
    n = draw(st.integers(0, 400))
    queries = rng.choice(pool, size=n) if draw(st.booleans()) else rng.zipf(1.3, n) % 300
    q = raw_ids(queries.astype(np.int64))
    ok = rng.random(n) < draw(st.sampled_from([1.0, 0.7, 0.0]))
    if n and draw(st.booleans()):  # a bad id under trace: top bit set
        q = q._replace(hi=q.hi.at[0].set(np.uint32(0xFFFFFFFF)))
        ok[0] = True
    return state, q, jnp.asarray(ok)


@needs_kernels
@costly
@given(remap_cases())
def test_search_kernel_equals_the_lower_bound(case):
    """The held ids' search (managed collisions' remap) against the pure-JAX lower bound."""
    from jaxembed.collisions import _ids

    state, q, ok = case
    ok = ok & _ids.valid(q)
    size = state.hi.shape[0]

    def reference(hi, lo, q_hi, q_lo, ok):
        return jnp.where(ok, _ids.lower_bound(hi, lo, size - 1, q_hi, q_lo), size - 1)

    args = (state.hi, state.lo, q.hi, q.lo, ok)
    ours = jax.jit(_ffi.search)(*args)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.jit(reference)(*args)))


@needs_kernels
@costly
@given(st.integers(0, 3000), st.sampled_from([1, 2**8, 2**31, 2**64 - 1]), st.integers(0, 2**31))
def test_argsort_kernel_is_a_stable_sort(n, spread, seed):
    """Equal keys (hot ids, padding) keep their input order, as the reference's sort does."""
    from jaxembed.collisions import _ids

    rng = np.random.default_rng(seed)
    keys = rng.integers(0, spread, size=n, dtype=np.uint64)
    keys[rng.random(n) < 0.3] = keys[0] if n else 0  # many duplicates
    hi = jnp.asarray((keys >> np.uint64(32)).astype(np.uint32))
    lo = jnp.asarray((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    ours = jax.jit(_ffi.argsort)(hi, lo)
    with reference_path():
        ref = jax.jit(_ids.argsort)(hi, lo)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(ours), np.argsort(keys, kind="stable"))


@needs_kernels
@costly
@given(remap_cases())
def test_remap_kernel_equals_the_reference(case):
    """Each query's row (the search, the hit test and the row read fused) against the pure-JAX
    search: held ids, misses, duplicates, masked queries and a traced bad id."""
    from jaxembed.collisions import _ids, _remap

    state, q, ok = case
    ok = ok & _ids.valid(q)
    ours = jax.jit(_ffi.remap)(state.hi, state.lo, state.slot, q.hi, q.lo, ok)
    with reference_path():
        ref = jax.jit(_remap.search)(state, q.hi, q.lo, ok)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@st.composite
def window_cases(draw):
    """A window of calls: duplicates, hot ids, ids near 2**63, unused (empty) entries."""
    per_call = draw(st.integers(1, 60))
    calls = draw(st.integers(1, 6))
    n = per_call * calls
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([5, 2**31, 2**63 - 1]))
    ids = rng.integers(0, spread, n, dtype=np.int64)
    ids[rng.random(n) < 0.3] = 2**63 - 1 if draw(st.booleans()) else ids[0]
    empty = rng.random(n) < draw(st.sampled_from([0.0, 0.4, 1.0]))
    hi = np.where(empty, 0xFFFFFFFF, (ids >> 32).astype(np.uint32)).astype(np.uint32)
    lo = np.where(empty, 0xFFFFFFFF, (ids & 0xFFFFFFFF).astype(np.uint32)).astype(np.uint32)
    first = draw(st.integers(1, 2**20))
    return jnp.asarray(hi), jnp.asarray(lo), jnp.int32(first), per_call


@needs_kernels
@costly
@given(window_cases())
def test_window_kernel_equals_the_reference(case):
    """An eviction's step 1: the window's distinct ids, their counts and last calls, against
    the pure-JAX sort and segment sums (the last calls past the distinct ids are never read)."""
    from jaxembed.collisions import _remap

    hi, lo, first, per_call = case
    ours = jax.jit(lambda *a: _ffi.window(*a, ids_per_call=per_call))(hi, lo, first)
    with reference_path():
        ref = jax.jit(lambda *a: _remap._distinct(*a, ids_per_call=per_call))(hi, lo, first)
    count = np.asarray(ref[2])
    for a, b in zip(ours[:3], ref[:3], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ours[3])[count > 0], np.asarray(ref[3])[count > 0])
    keys = (np.asarray(hi).astype(np.uint64) << np.uint64(32)) | np.asarray(lo)
    assert (count > 0).sum() == np.unique(keys[np.asarray(hi) < 2**31]).size


@st.composite
def eviction_streams(draw):
    """A managed-collision config and a stream of calls: any policy, decay, admission and time
    to live, tables from 2 rows, windows smaller and larger than the table, uniform and Zipf
    ids."""
    from jaxembed.collisions import ManagedCollision

    eviction = draw(st.sampled_from(["lfu", "lru", "distance_lfu"]))
    admission = draw(st.sampled_from([None, "average", "dynamic", "count", "probabilistic"]))
    value = {"count": draw(st.integers(1, 3)), "probabilistic": 0.3}.get(admission)
    mc = ManagedCollision(eviction, draw(st.integers(1, 3)),
                          decay_exponent=draw(st.sampled_from([0.5, 1.0, 2.0])),
                          admission=admission, admission_value=value,
                          ttl=draw(st.sampled_from([None, None, 1, 2, 4])))  # fmt: skip
    slots = draw(st.integers(2, 60))
    per_call = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    universe = np.unique(rng.integers(0, draw(st.sampled_from([30, 2**62])), 200))
    calls = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            pick = rng.integers(0, universe.size, per_call)
        else:
            pick = np.minimum(rng.zipf(1.3, per_call) - 1, universe.size - 1)
        calls.append(universe[pick])
    return mc, slots, per_call, calls


@needs_kernels
@(settings(max_examples=3) if _PROFILE == "default" else settings())  # both paths compile each
@given(eviction_streams())
def test_evictions_on_the_kernels_equal_the_pure_path(stream):
    """A stream of training calls (profile, evict, remap) on the kernels (window, evict, remap,
    search, argsort) against the pure-JAX path: every output and the whole state, call by call,
    exactly."""
    from jaxembed.collisions import RawIds, raw_ids

    mc, slots, per_call, calls = stream

    def call(state, hi, lo):
        return mc.remap(state, RawIds(hi, lo))

    ours_state = mc.init(slots, per_call)
    step = jax.jit(call)
    hlo = step.lower(ours_state, *raw_ids(calls[0])).compile().as_text()
    for target in ("jaxembed_window", "jaxembed_evict", "jaxembed_remap"):
        assert target in hlo, target
    with reference_path():
        ref_step = jax.jit(call)
        ref_state = mc.init(slots, per_call)
        refs = []
        for ids in calls:
            out = ref_step(ref_state, *raw_ids(ids))
            ref_state = out.state
            refs.append(jax.device_get(out))
    for ids, ref in zip(calls, refs, strict=True):
        out = step(ours_state, *raw_ids(ids))
        ours_state = out.state
        for a, b in zip(jax.tree.leaves(jax.device_get(out)), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)


@needs_kernels
def test_evict_kernel_refuses_a_count_of_new_ids_past_its_buffers():
    """num_new is read from a buffer: outside [0, W] it is refused before anything is read."""
    size, window = 4, 3
    u32, i32 = jnp.zeros(size, jnp.uint32), jnp.zeros(size, jnp.int32)
    held = (u32, u32, i32, i32, None)
    new = (jnp.zeros(window, jnp.uint32), jnp.zeros(window, jnp.uint32),
           jnp.zeros(window, jnp.int32), jnp.zeros(window, jnp.int32))  # fmt: skip
    jax.block_until_ready(_ffi.evict(held, u32, new, new[0], jnp.int32(0)))
    for bad in (-1, window + 1):
        with pytest.raises(Exception, match=r"num_new must be in \[0, W\]"):
            jax.block_until_ready(_ffi.evict(held, u32, new, new[0], jnp.int32(bad)))


# -- the sharded collection's routing -----------------------------------------------------------


@st.composite
def bucket_cases(draw):
    """A device's entries to route: any number of devices, blocks of any size (up to
    ``devices * rows`` just below 2**31), capacities from none to all, uniform or skewed rows,
    and unsent entries holding anything."""
    devices = draw(st.integers(1, 9))
    rows = draw(st.sampled_from([1, 3, 50, 1000, (2**31 - 2) // devices]))
    n = draw(st.integers(0, 400))
    capacity = draw(st.sampled_from([0, 1, 5, 64, n]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    local = rng.integers(0, rows, n) if draw(st.booleans()) else (rng.zipf(1.2, n) - 1) % rows
    owner = rng.integers(0, devices, n)
    send = rng.random(n) < draw(st.sampled_from([1.0, 0.6, 0.0]))
    owner = np.where(send, owner, rng.integers(-(2**31), 2**31 - 1, n))  # never read
    return (jnp.asarray(owner, jnp.int32), jnp.asarray(local, jnp.int32), jnp.asarray(send),
            dict(devices=devices, rows=rows, capacity=capacity))  # fmt: skip


@needs_kernels
@costly
@given(bucket_cases())
def test_bucket_kernel_equals_the_reference(case):
    """Slots, the rows each slot holds, its entry counts, the owners' distinct rows and the
    entries in slot order: every output, exactly, against the pure-JAX sort and search."""
    from jaxembed.sharding import _route

    owner, local, send, attrs = case
    ours = jax.jit(lambda *a: _ffi.bucket(*a, **attrs))(owner, local, send)
    with reference_path():
        ref = jax.jit(lambda *a: _route.bucket(*a, **attrs))(owner, local, send)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    slot, size = np.asarray(ours[0]), attrs["devices"] * attrs["capacity"]
    served = slot < size
    assert not served[~np.asarray(send)].any()
    np.testing.assert_array_equal(np.asarray(ours[2]), np.bincount(slot[served], minlength=size))


@needs_kernels
def test_bucket_kernel_refuses_a_sent_entry_outside_its_owner_or_block():
    """A sent entry's owner and row are checked before anything is written."""
    ok = jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32), jnp.ones(3, bool)
    attrs = dict(devices=2, rows=4, capacity=2)
    jax.block_until_ready(_ffi.bucket(*ok, **attrs))
    for owner, local in (([0, 2, 0], [0, 0, 0]), ([0, -1, 0], [0, 0, 0]), ([0, 0, 0], [0, 4, 0]),
                         ([0, 0, 0], [-1, 0, 0])):  # fmt: skip
        with pytest.raises(Exception, match=r"outside \[0, devices\) x \[0, rows\)"):
            owner, local = jnp.asarray(owner, jnp.int32), jnp.asarray(local, jnp.int32)
            jax.block_until_ready(_ffi.bucket(owner, local, ok[2], **attrs))


@needs_kernels
@costly
@given(st.integers(0, 300), st.sampled_from(["sum", "mean"]), st.booleans(),
       st.sampled_from([jnp.float32, jnp.float64]), st.integers(0, 2**31))  # fmt: skip
def test_into_slots_sums_each_slot_as_the_scatter_does(n, mode, weighted, dtype, seed):
    """The gradient's way back into the slots, by the bag kernel, equals the pure-JAX spread
    and scatter-add bit for bit (the same shares, added in the same order). Weighted bags stay
    on the pure-JAX path (the kernel's weighted bag fuses the multiply-add): equal too."""
    from jaxembed.sharding import _route

    rng = np.random.default_rng(seed)
    bags, devices, rows, capacity = 7, 3, 20, 6
    with jax.enable_x64(dtype == jnp.float64):
        lengths = rng.multinomial(n, np.ones(bags) / bags)
        starts = jnp.asarray(np.cumsum(lengths) - lengths, jnp.int32)
        keep = jnp.asarray(rng.random(n) < 0.9)
        psw = jnp.asarray(rng.normal(size=n), dtype) if weighted else None
        cot = jnp.asarray(rng.normal(size=(bags, 5)), dtype)
        owner = jnp.asarray(rng.integers(0, devices, n), jnp.int32)
        local = jnp.asarray((rng.zipf(1.3, n) - 1) % rows, jnp.int32)
        route = _ffi.bucket(owner, local, keep, devices=devices, rows=rows, capacity=capacity)
        slot, _, filled, _, order = route
        parts = _bag.spread_parts(cot, keep, starts, None, psw, None, mode, None)
        into = jax.jit(functools.partial(_route.into_slots, weighted=weighted))
        ours = into(parts, slot, order, filled)
        if n and not weighted:  # the kernel's path was taken
            assert "jaxembed_bag_sum" in into.lower(parts, slot, order, filled).as_text()
        with reference_path():
            ref = into(parts, slot, order, filled)
        assert ours.dtype == ref.dtype == dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
