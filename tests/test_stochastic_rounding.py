"""Stochastic rounding of bfloat16 / float16 tables in the sparse optimizers, tested
statistically: the rounding is unbiased, and a long run of updates below half an ulp moves the
table where round-to-nearest stalls (FBGEMM's reason to round so in low-precision training)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed
from jaxembed.sparse import _update

S = jaxembed.sparse
DTYPES = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_rounding_is_unbiased(dtype):
    """Each value between two neighbours rounds up with probability its distance from below
    (0.1, 0.5 and 0.83 of an ulp, at four magnitudes): over 50,000 draws the fraction rounded up
    and the mean error are within 5 sigma."""
    base = jnp.array([1.0, -3.0, 1e-3, 700.0], jnp.float32).astype(dtype)
    base = jnp.tile(base, 3)
    fraction = jnp.repeat(jnp.array([0.1, 0.5, 0.83], jnp.float32), 4)
    up = jnp.nextafter(base, jnp.array(jnp.inf, dtype))
    lo, hi = base.astype(jnp.float32), up.astype(jnp.float32)
    x = lo + fraction * (hi - lo)  # (12,): exactly known distances
    n = 50_000
    rows = jnp.arange(n, dtype=jnp.int32)
    key = _update.rounding_key(7, jnp.int32(3), dtype)
    xs = jnp.broadcast_to(x, (n, x.shape[0]))
    out = _update.stochastic_round(xs, dtype, _update._noise(key, rows, xs)).astype(jnp.float32)
    assert bool(jnp.all((out == lo) | (out == hi)))
    p = np.asarray((out == hi).mean(axis=0))
    exact = np.asarray((x - lo) / (hi - lo))
    sigma = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(p - exact) <= 5 * sigma), (p, exact)
    mean_error = np.asarray((out - x).mean(axis=0) / (hi - lo))  # E[round(x)] - x, in ulps
    assert np.all(np.abs(mean_error) <= 5 * sigma)


def test_exact_values_nan_inf_and_overflow_round_as_nearest_does():
    for dtype in DTYPES:
        overflow = 1e30 if dtype == jnp.float16 else float(np.finfo(np.float32).max)
        x = jnp.array([0.5, -2.0, 0.0, jnp.nan, jnp.inf, -jnp.inf, overflow], jnp.float32)
        assert np.isinf(np.asarray(x[-1].astype(dtype), np.float32))  # past the dtype's range
        xs = jnp.broadcast_to(x, (1000, x.shape[0]))
        noise = _update._noise(jnp.uint32(5), jnp.arange(1000), xs)
        rounded = jax.jit(_update.stochastic_round, static_argnums=1)(xs, dtype, noise)
        out = np.asarray(rounded.astype(jnp.float32))
        np.testing.assert_array_equal(
            out, np.broadcast_to(np.asarray(x.astype(dtype).astype(jnp.float32)), out.shape)
        )


OPTIMIZERS = {
    "sgd": lambda sr, lr, seed=0: S.sgd(1.0, stochastic_rounding=sr, seed=seed),
    "adagrad": lambda sr, lr, seed=0: S.adagrad(lr, stochastic_rounding=sr, seed=seed),
    "rowwise_adagrad": lambda sr, lr, seed=0: S.rowwise_adagrad(
        lr, stochastic_rounding=sr, seed=seed
    ),
    "lazy_adam": lambda sr, lr, seed=0: S.lazy_adam(lr, stochastic_rounding=sr, seed=seed),
}
# a step below half an ulp under 1.0 (bfloat16: 2**-9, float16: 2**-12), a power of two
STEP = {jnp.bfloat16: 2.0**-11, jnp.float16: 2.0**-14}


def _run(tx, table, steps, grad_value):
    state = tx.init(table)
    grad = S.SparseGrad(jnp.array([1, 3]), jnp.full((2, table.shape[1]), grad_value, table.dtype))
    traces = []

    @jax.jit
    def step(table, state):
        traces.append(1)
        return tx.update(grad, state, table)

    for _ in range(steps):
        table, state = step(table, state)
    assert len(traces) == 1
    return np.asarray(table.astype(jnp.float32))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_long_run_of_tiny_updates_moves_where_round_to_nearest_stalls(name, dtype):
    """Every step's change is below half an ulp of the table's values: round-to-nearest never
    moves it, stochastic rounding follows the float32 run. Its mean over 4,000 elements is
    within 5 sigma (independent roundings, at most (ulp / 2)^2 of variance a step), plus 2% of
    the distance moved: the low-precision run also does its optimizer arithmetic in its dtype."""
    lr = STEP[dtype]
    grad = lr if name == "sgd" else 1.0
    steps = 300
    start = jnp.ones((5, 2000), jnp.float32)
    exact = _run(OPTIMIZERS[name](False, lr), start, steps, grad)
    nearest = _run(OPTIMIZERS[name](False, lr), start.astype(dtype), steps, grad)
    rounded = _run(OPTIMIZERS[name](True, lr), start.astype(dtype), steps, grad)
    np.testing.assert_array_equal(nearest, np.ones_like(nearest))  # stalled
    ulp = float(jnp.nextafter(jnp.ones((), dtype), jnp.array(2, dtype)).astype(jnp.float32)) - 1
    moved = 1.0 - exact[[1, 3]].mean()
    assert moved > 2 * ulp  # the float32 run moves by several ulps
    sigma = np.sqrt(steps) * ulp / 2 / np.sqrt(rounded[[1, 3]].size)
    assert abs(rounded[[1, 3]].mean() - exact[[1, 3]].mean()) <= 5 * sigma + 0.02 * moved
    np.testing.assert_array_equal(rounded[[0, 2, 4]], 1.0)  # rows not in the gradient: untouched


def test_off_by_default_deterministic_by_seed_and_a_no_op_for_float32():
    table = jnp.ones((4, 64), jnp.bfloat16)
    default = _run(S.rowwise_adagrad(0.01), table, 20, 1.0)
    np.testing.assert_array_equal(
        default, _run(OPTIMIZERS["rowwise_adagrad"](False, 0.01), table, 20, 1.0)
    )
    a = _run(OPTIMIZERS["rowwise_adagrad"](True, 0.01, 1), table, 20, 1.0)
    np.testing.assert_array_equal(
        a, _run(OPTIMIZERS["rowwise_adagrad"](True, 0.01, 1), table, 20, 1.0)
    )
    assert not np.array_equal(a, _run(OPTIMIZERS["rowwise_adagrad"](True, 0.01, 2), table, 20, 1.0))
    f32 = table.astype(jnp.float32)
    np.testing.assert_array_equal(
        _run(OPTIMIZERS["sgd"](True, 1.0), f32, 5, 0.3),
        _run(OPTIMIZERS["sgd"](False, 1.0), f32, 5, 0.3),
    )


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        S.sgd(0.1, stochastic_rounding=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        S.rowwise_adagrad(0.1, stochastic_rounding=True, seed=-1)
    with pytest.raises(ValueError, match="sgd with momentum moves the whole table"):
        S.sgd(0.1, momentum=0.9, stochastic_rounding=True)
