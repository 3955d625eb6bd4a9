"""The ops jaxembed-bench times, and each op's implementations: jaxembed's paths, the pure-JAX
references, and the steps a training loop runs (the torch and FBGEMM baselines are in
:mod:`jaxembed.bench._baselines`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed
from jaxembed import sparse
from jaxembed.bench._timing import Case

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
OPS = (
    "lookup",
    "lookup+max_norm",
    "grad",
    "bag-sum",
    "bag-mean",
    "bag-max",
    "train-dense",
    *(f"train-sparse-{name}" for name in SPARSE_OPTIMIZERS),
    "train-bag-rowwise_adagrad",
    "remap",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LR = 0.01


def train_loss(rows: jax.Array, target: jax.Array) -> jax.Array:
    """The training ops' loss: ``0.5 * mean((rows - target) ** 2)``."""
    return 0.5 * jnp.mean((rows.astype(jnp.float32) - target) ** 2)


def sparse_train_step(opt: sparse.RowOptimizer) -> Callable:
    """``(table, state, ids, target) -> (table, state, loss)`` with a row-wise optimizer."""

    def step(table, state, ids, target):
        rows, lk = sparse.lookup({"weight": table}, ids)
        loss, row_grads = jax.value_and_grad(train_loss)(rows, target)
        table, state = opt.update(lk.grad(row_grads), state, lk.params["weight"])
        return table, state, loss

    return step


# the floor of a sparse step: its lookup, loss and rows' gradient, with no update at all
FLOOR = "floor: take+loss+grad"


def floor_step(pool: Callable) -> Callable:
    """``(table, ids, target) -> (loss, rows' gradient)`` with ``jnp.take``: what any sparse step
    must at least do (the ``FLOOR`` row of the training ops; ``pool`` reduces bags)."""

    def step(table, ids, target):
        return jax.value_and_grad(lambda r: train_loss(pool(r), target))(
            jnp.take(table, ids, axis=0)
        )

    return step


def sparse_bag_train_step(opt: sparse.RowOptimizer) -> Callable:
    """``(table, state, bags, target) -> (table, state, loss)``: bags summed by
    :func:`jaxembed.sparse.lookup_bags`, then ``opt`` on the bags' gradient (on CPU the update
    kernel spreads it as it reads it)."""

    def step(table, state, bags, target):
        pooled, lk = sparse.lookup_bags({"weight": table}, bags, mode="sum")
        loss, bag_grads = jax.value_and_grad(lambda b: train_loss(b, target))(pooled)
        table, state = opt.update(lk.grad(bag_grads), state, lk.params["weight"])
        return table, state, loss

    return step


def dense_train_step(tx: optax.GradientTransformation) -> Callable:
    """The same step with ``tx`` on the dense gradient; ``state = tx.init({"weight": table})``."""

    def step(table, state, ids, target):
        params = {"weight": table}
        loss, grads = jax.value_and_grad(
            lambda p: train_loss(jaxembed.embedding(p, ids)[0], target)
        )(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates)["weight"], state, loss

    return step


# the one-hot lookup builds a (batch, vocab) matrix: past this many elements it is left out

ONE_HOT_MAX_ELEMENTS = 2**26


def jax_cases(op: str, table, ids, bags, cot, target, bag_target) -> dict[str, Case]:
    cases = _all_jax_cases(op, table, ids, bags, cot, target, bag_target)
    if ids.shape[0] * table.shape[0] > ONE_HOT_MAX_ELEMENTS:
        cases = {k: v for k, v in cases.items() if not k.endswith(":one_hot")}
    return cases


def _all_jax_cases(op: str, table, ids, bags, cot, target, bag_target) -> dict[str, Case]:
    params = {"weight": table}
    if op == "lookup":
        # only the rows: returning the (undonated) params too would time a copy of the table
        cases = {
            f"jaxembed:{style}": Case(
                lambda p, i, s=style: jaxembed.embedding(p, i, lookup_style=s)[0], (params, ids)
            )
            for style in ("gather", "one_hot")
        }
        cases["jnp.take"] = Case(lambda w, i: jnp.take(w, i, axis=0), (table, ids))
        return cases
    if op == "lookup+max_norm":
        # the renormed table is the state a step hands on: donated, in place, as in training
        return {
            f"jaxembed:{style}": Case(
                lambda p, i, s=style: jaxembed.embedding(p, i, lookup_style=s, max_norm=1.0)[::-1],
                ({"weight": table + 0}, ids),
                carry=True,
                donate=(0,),
            )
            for style in ("gather", "one_hot")
        }
    if op == "grad":

        def grad(lookup):
            return jax.grad(
                lambda p, i: jnp.sum(jaxembed.embedding(p, i, lookup_style=lookup)[0] * cot)
            )

        return {
            "jaxembed:gather": Case(grad("gather"), (params, ids)),
            "jaxembed:one_hot": Case(grad("one_hot"), (params, ids)),
            "jnp.take": Case(
                jax.grad(lambda w, i: jnp.sum(jnp.take(w, i, axis=0) * cot)), (table, ids)
            ),
        }
    if op.startswith("bag-"):
        mode = op.removeprefix("bag-")
        reduce = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[mode]
        return {
            "jaxembed:gather": Case(
                lambda p, b: jaxembed.embedding_bag(p, b, mode=mode)[0], (params, bags)
            ),
            "jaxembed:one_hot": Case(
                lambda p, b: jaxembed.embedding_bag(p, b, mode=mode, lookup_style="one_hot")[0],
                (params, bags),
            ),
            "jnp.take+reduce": Case(
                lambda w, b: reduce(jnp.take(w, b, axis=0), axis=1), (table, bags)
            ),
        }
    if op == "train-dense":
        tx = optax.adam(LR)
        state = tx.init({"weight": table})
        return {
            "optax.adam (dense)": Case(
                dense_train_step(tx), (table + 0, state, ids, target), carry=True, donate=(0, 1)
            )
        }
    if op.startswith("train-sparse-"):
        opt = getattr(sparse, op.removeprefix("train-sparse-"))(LR)
        step = sparse_train_step(opt)
        return {
            "jaxembed.sparse": Case(
                step, (table + 0, opt.init(table), ids, target), carry=True, donate=(0, 1)
            ),
            FLOOR: Case(floor_step(lambda rows: rows), (table, ids, target)),
        }
    if op == "remap":
        return remap_cases(table, ids)
    if op == "train-bag-rowwise_adagrad":
        opt = sparse.rowwise_adagrad(LR)
        return {
            "jaxembed.sparse": Case(
                sparse_bag_train_step(opt),
                (table + 0, opt.init(table), bags, bag_target),
                carry=True,
                donate=(0, 1),
            ),
            FLOOR: Case(floor_step(lambda rows: rows.sum(1)), (table, bags, bag_target)),
        }
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


def hashed_ids(ids: np.ndarray) -> np.ndarray:
    """Ids in ``[0, V)`` as distinct raw 63-bit ids: a multiplicative hash (odd, so one to one
    modulo 2**64), its top 63 bits."""
    return ((ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(1)).astype(
        np.int64
    )


def remap_state(num_slots: int, ids_per_call: int):
    """``(mc, state)``: LFU managed collisions over ``num_slots`` slots, full: the hashed ids of
    ``0 .. num_slots - 2`` held, id ``k``'s hash in slot ``k``."""
    from jaxembed.collisions import ManagedCollision, raw_ids

    mc = ManagedCollision("lfu", 1)
    state = mc.init(num_slots, ids_per_call)
    held = hashed_ids(np.arange(num_slots - 1))
    order = np.argsort(held)
    pairs = raw_ids(held[order])
    return mc, state._replace(
        hi=state.hi.at[: num_slots - 1].set(pairs.hi),
        lo=state.lo.at[: num_slots - 1].set(pairs.lo),
        slot=state.slot.at[: num_slots - 1].set(jnp.asarray(order.astype(np.int32))),
    )


def remap_cases(table, ids) -> dict[str, Case]:
    """The remap of a batch of raw ids (the hashes of ``ids``; ``V - 1`` is the miss slot's)
    into a full table of ``V`` slots, and, as its baseline, the lookup of as many rows."""
    from jaxembed.collisions import RawIds, raw_ids

    mc, state = remap_state(table.shape[0], ids.shape[0])
    q = raw_ids(hashed_ids(np.asarray(ids)))
    remap = lambda s, h, lo: mc.remap(s, RawIds(h, lo), train=False).slots  # noqa: E731
    return {
        "jaxembed.collisions": Case(remap, (state, q.hi, q.lo)),
        "lookup": Case(lambda p, i: jaxembed.embedding(p, i)[0], ({"weight": table}, ids)),
    }


BASELINE = {
    "lookup": "jnp.take",
    "remap": "lookup",
    "lookup+max_norm": "torch",
    "grad": "jnp.take",
    "train-dense": "torch",
}


def baseline(op: str) -> str:
    if op.startswith("bag-"):
        return "jnp.take+reduce"
    if op in ("train-sparse-rowwise_adagrad", "train-bag-rowwise_adagrad"):
        return "fbgemm TBE"
    if op.startswith("train-sparse-"):
        return "torch"
    return BASELINE[op]
