"""Managed collisions, against TorchRec 1.8's MCHManagedCollisionModule call by call.

Every call compares the remapped slots, the slots reported evicted, and every saved buffer
(held ids, their slots, counts, last calls, the call counter) with TorchRec's.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed.collisions import (
    CollisionState,
    ManagedCollision,
    RawIds,
    from_torchrec,
    held_ids,
    raw_ids,
    to_int64,
    to_torchrec,
)

torch = pytest.importorskip("torch")
mc_modules = pytest.importorskip("torchrec.modules.mc_modules")
from torchrec.sparse.jagged_tensor import JaggedTensor  # noqa: E402

INT64_MAX = 2**63 - 1


def torchrec_module(mc: ManagedCollision, num_slots: int, offset: int = 0):
    threshold = {
        None: None,
        "average": mc_modules.average_threshold_filter,
        "dynamic": lambda counts: mc_modules.dynamic_threshold_filter(
            counts, threshold_skew_multiplier=mc.admission_value
        ),
    }[mc.admission]
    policy = {
        "lfu": lambda: mc_modules.LFU_EvictionPolicy(threshold_filtering_func=threshold),
        "lru": lambda: mc_modules.LRU_EvictionPolicy(
            decay_exponent=mc.decay_exponent, threshold_filtering_func=threshold
        ),
        "distance_lfu": lambda: mc_modules.DistanceLFU_EvictionPolicy(
            decay_exponent=mc.decay_exponent, threshold_filtering_func=threshold
        ),
    }[mc.eviction]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = mc_modules.MCHManagedCollisionModule(
            zch_size=num_slots,
            device=torch.device("cpu"),
            eviction_policy=policy,
            eviction_interval=mc.eviction_interval,
            output_global_offset=offset,
        )
    return module.train()


def torchrec_call(module, ids: np.ndarray):
    jt = JaggedTensor(values=torch.from_numpy(ids), lengths=torch.tensor([ids.size]))
    out = module({"f": jt})["f"].values().numpy()
    evicted = module.evict()
    return out, None if evicted is None else evicted.numpy()


def stream(rng, kind: str, calls: int, per_call: int, universe: int) -> list[np.ndarray]:
    """Calls of raw ids: Zipf or uniform ranks mapped onto ids spread over the int64 range.

    Ranks map to ids that share their low 32 bits in pairs, and to ids near 2**63 - 1, so a
    comparison of halves that ignores one half would collide.
    """
    base = rng.integers(0, 2**62, size=universe, dtype=np.int64)
    base[: universe // 4] = (np.arange(universe // 4, dtype=np.int64) % 3) << 32 | 12345
    base[-2:] = [INT64_MAX - 1, 0]
    base = np.unique(base)
    rng.shuffle(base)
    out = []
    for _ in range(calls):
        if kind == "zipf":
            rank = np.minimum(rng.zipf(1.3, size=per_call) - 1, base.size - 1)
        else:
            rank = rng.integers(0, base.size, size=per_call)
        out.append(base[rank])
    return out


def ours_step(mc: ManagedCollision):
    return jax.jit(lambda state, hi, lo: mc.remap(state, RawIds(hi, lo)))


def assert_same_state(mc, state, module, offset=0):
    ours = to_torchrec(mc, state, offset=offset)
    theirs = {k: v.numpy() for k, v in module.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def run_against_torchrec(mc, num_slots, calls, offset=0):
    module = torchrec_module(mc, num_slots, offset)
    per_call = calls[0].size
    state = mc.init(num_slots, per_call)
    step = ours_step(mc)
    evictions = 0
    for k, ids in enumerate(calls):
        want, want_evicted = torchrec_call(module, ids)
        pairs = raw_ids(ids)
        out = step(state, pairs.hi, pairs.lo)
        state = out.state
        np.testing.assert_array_equal(np.asarray(out.slots) + offset, want, err_msg=f"call {k}")
        got_evicted = np.asarray(out.evicted)[: int(out.num_evicted)] + offset
        if want_evicted is None:
            assert int(out.num_evicted) == 0, f"call {k}"
        else:
            evictions += 1
            np.testing.assert_array_equal(got_evicted, want_evicted, err_msg=f"call {k}")
        assert_same_state(mc, state, module, offset)
    return state, module, evictions


POLICIES = [
    ManagedCollision("lfu", 2),
    ManagedCollision("lru", 1),
    ManagedCollision("lru", 3, decay_exponent=2.0),
    ManagedCollision("distance_lfu", 2),
    ManagedCollision("distance_lfu", 3, decay_exponent=2.0),
    ManagedCollision("distance_lfu", 1, decay_exponent=0.5),
]


@pytest.mark.parametrize("mc", POLICIES, ids=lambda m: f"{m.eviction}-{m.eviction_interval}-"
                         f"{m.decay_exponent}")  # fmt: skip
@pytest.mark.parametrize("num_slots,per_call,universe,kind", [
    (2, 3, 5, "uniform"),
    pytest.param(8, 6, 40, "zipf", marks=pytest.mark.slow),  # the README's command: 2 of 4
    (64, 32, 400, "zipf"),
    pytest.param(64, 32, 90, "uniform", marks=pytest.mark.slow),
])  # fmt: skip
def test_matches_torchrec_call_by_call(mc, num_slots, per_call, universe, kind):
    rng = np.random.default_rng(num_slots * 31 + per_call + hash(mc) % 97)
    calls = stream(rng, kind, 12, per_call, universe)
    _, _, evictions = run_against_torchrec(mc, num_slots, calls)
    assert evictions == 12 // mc.eviction_interval


@pytest.mark.parametrize(
    "eviction", ["lfu", *(pytest.param(e, marks=pytest.mark.slow) for e in ("lru", "distance_lfu"))]
)
def test_matches_torchrec_with_an_offset_over_a_long_stream(eviction):
    mc = ManagedCollision(eviction, 2)
    calls = stream(np.random.default_rng(5), "zipf", 40, 64, 2000)
    state, _, _ = run_against_torchrec(mc, 100, calls, offset=1000)
    assert held_ids(state)[0].size == 99  # full: every slot but the miss slot is held


ADMITTING = [
    ManagedCollision("lfu", 2, admission="average"),
    ManagedCollision("lru", 1, admission="dynamic", admission_value=1.5),
    ManagedCollision("distance_lfu", 3, admission="dynamic", admission_value=0.7),
    ManagedCollision("lfu", 1, admission="dynamic"),  # TorchRec's default multiplier, 10
]


@pytest.mark.parametrize("mc", ADMITTING, ids=lambda m: f"{m.eviction}-{m.admission}")
@pytest.mark.parametrize("kind", ["zipf", pytest.param("uniform", marks=pytest.mark.slow)])
def test_admission_filters_match_torchrec(mc, kind):
    """TorchRec's threshold_filtering_func (average_threshold_filter, dynamic_threshold_filter):
    the ids it drops from an eviction are dropped here, call for call, state for state."""
    rng = np.random.default_rng(7 + len(kind))
    calls = stream(rng, kind, 12, 48, 300)
    run_against_torchrec(mc, 40, calls)


def _counts(state):
    """``{held id: its count}`` (the state's arrays are in id order; ``slot`` maps each entry
    to its row)."""
    ids, slots = held_ids(state)
    entry = {int(s): k for k, s in enumerate(np.asarray(state.slot))}
    return {int(i): int(state.counts[entry[int(s)]]) for i, s in zip(ids, slots, strict=True)}


def test_count_and_probabilistic_admission_by_hand():
    """Hand-computed: 'count' admits an id seen at least k times in the window, and drops a
    held id below k from the update; 'probabilistic' admits a frequent id sooner than a rare one,
    and its draws depend only on the id and the call."""
    mc = ManagedCollision("lfu", 2, admission="count", admission_value=2)
    out = mc.remap(mc.init(6, 4), raw_ids([10, 20, 10, 30]))
    out = mc.remap(out.state, raw_ids([40, 10, 50, 20]))  # window: 10 x3, 20 x2, others once
    assert sorted(held_ids(out.state)[0].tolist()) == [10, 20]
    assert _counts(out.state) == {10: 3, 20: 2}
    out = mc.remap(out.state, raw_ids([10, 60, 60, 70]))
    out = mc.remap(out.state, raw_ids([20, 20, 70, 80]))  # 10 once: its count stays 3
    assert _counts(out.state) == {10: 3, 20: 4, 60: 2, 70: 2}

    mc = ManagedCollision("lfu", 1, admission="probabilistic", admission_value=0.05)
    rng = np.random.default_rng(0)
    hot, cold = np.arange(1, 21), np.arange(1000, 1200)
    state, admitted_at = mc.init(512, 60), {}
    step = ours_step(mc)
    for call in range(40):
        ids = raw_ids(np.concatenate([np.repeat(hot, 2), rng.choice(cold, 20, replace=False)]))
        state = step(state, ids.hi, ids.lo).state
        for i in held_ids(state)[0].tolist():
            admitted_at.setdefault(i, call)
    hot_held = sum(int(i) in admitted_at for i in hot)
    cold_held = sum(int(i) in admitted_at for i in cold)
    assert hot_held / 20 > 0.7 > cold_held / 200 > 0.05  # seen 80 vs about 4 times
    again = mc.init(512, 60)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ids = raw_ids(np.concatenate([np.repeat(hot, 2), rng.choice(cold, 20, replace=False)]))
        again = step(again, ids.hi, ids.lo).state
    np.testing.assert_array_equal(again.hi, state.hi)  # the same stream, the same decisions
    np.testing.assert_array_equal(again.lo, state.lo)


def test_reference_examples():
    """managed-collision.md section 4's worked examples, run by hand against TorchRec."""

    def run(mc, num_slots, per_call, *calls):
        step = jax.jit(lambda s, h, lo, ok: mc.remap(s, RawIds(h, lo), valid=ok))
        state = mc.init(num_slots, per_call)
        for call in calls:  # padded to per_call ids, the padding masked out
            pairs = raw_ids(np.array(call + [0] * (per_call - len(call)), np.int64))
            out = step(state, pairs.hi, pairs.lo, jnp.arange(per_call) < len(call))
            state = out.state
        return out

    out = run(ManagedCollision("lfu", 1), 4, 1, [10])
    assert out.slots.tolist() == [2]  # the highest-positioned empty is taken first
    out = run(ManagedCollision("lru", 1), 3, 4, [9, 8, 7, 7])
    assert out.slots.tolist() == [2, 1, 0, 0]
    for decay, gone in ((1.0, {2, 3}), (2.0, {1, 2})):
        mc = ManagedCollision("distance_lfu", 2, decay_exponent=decay)
        out = run(mc, 4, 4, [1, 1, 1, 2], [3, 3], [4, 4, 4, 4], [5])
        assert set(held_ids(out.state)[0].tolist()) == {1, 2, 3, 4, 5} - gone


def test_the_largest_id_is_held():
    """TorchRec's empty marker 2**63 - 1 is a valid id here."""
    mc = ManagedCollision("lfu", 1)
    out = mc.remap(mc.init(4, 2), raw_ids([INT64_MAX, 5]))
    assert sorted(held_ids(out.state)[0].tolist()) == [5, INT64_MAX]
    again = mc.remap(out.state, raw_ids([INT64_MAX, 6]), train=False)
    assert int(again.slots[0]) != 3 and int(again.slots[1]) == 3
    with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
        to_torchrec(mc, out.state)


@pytest.mark.parametrize(
    "eviction", ["distance_lfu", *(pytest.param(e, marks=pytest.mark.slow) for e in ("lfu", "lru"))]
)
def test_torchrec_state_dict_round_trip_and_resume(eviction):
    """Saved mid-window and loaded both ways, the next calls agree (TorchRec's resume)."""
    mc = ManagedCollision(eviction, 3)
    calls = stream(np.random.default_rng(1), "zipf", 10, 16, 200)
    state, module, _ = run_against_torchrec(mc, 20, calls[:4], offset=7)
    loaded = from_torchrec(mc, {k: v for k, v in module.state_dict().items()}, ids_per_call=16)
    fresh = torchrec_module(mc, 20, offset=7)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in to_torchrec(
        mc, state, offset=7).items()})  # fmt: skip
    step = ours_step(mc)
    for ids in calls[4:]:
        want, _ = torchrec_call(fresh, ids)
        pairs = raw_ids(ids)
        out = step(loaded, pairs.hi, pairs.lo)
        loaded = out.state
        np.testing.assert_array_equal(np.asarray(out.slots) + 7, want)
        assert_same_state(mc, loaded, fresh, offset=7)


def test_from_torchrec_refuses_a_broken_state_dict():
    mc = ManagedCollision("lfu", 1)
    good = to_torchrec(mc, mc.init(4, 2))
    with pytest.raises(KeyError, match="_mch_counts"):
        from_torchrec(mc, {k: v for k, v in good.items() if k != "_mch_counts"}, ids_per_call=2)
    bad = dict(good, _mch_remapped_ids_mapping=np.array([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="permutation"):
        from_torchrec(mc, bad, ids_per_call=2)
    bad = dict(good, _mch_sorted_raw_ids=np.array([5, 3, INT64_MAX, INT64_MAX]))
    with pytest.raises(ValueError, match="ascending"):
        from_torchrec(mc, bad, ids_per_call=2)


# --- properties -------------------------------------------------------------------------------


def window_counts(calls):
    ids, counts = np.unique(np.concatenate(calls), return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


@pytest.mark.parametrize("eviction", ["lfu", "lru", "distance_lfu"])
@pytest.mark.parametrize("seed", [0, *(pytest.param(k, marks=pytest.mark.slow) for k in (1, 2, 3))])
def test_properties_over_random_streams(eviction, seed):
    """No two held ids share a slot; LFU counts are the exact hits since admission."""
    rng = np.random.default_rng(seed)
    num_slots = int(rng.integers(2, 40))
    per_call = int(rng.integers(1, 30))
    mc = ManagedCollision(eviction, int(rng.integers(1, 4)))
    calls = stream(rng, rng.choice(["zipf", "uniform"]), 15, per_call, int(rng.integers(3, 200)))
    state = mc.init(num_slots, per_call)
    step = ours_step(mc)
    hits: dict[int, int] = {}
    window: list[np.ndarray] = []
    for ids in calls:
        pairs = raw_ids(ids)
        out = step(state, pairs.hi, pairs.lo)
        window.append(ids)
        ids_held, slots = held_ids(out.state)
        assert ids_held.size <= num_slots - 1
        assert np.unique(slots).size == slots.size and (slots < num_slots - 1).all()
        assert sorted(np.asarray(out.state.slot).tolist()) == list(range(num_slots))
        evicted = np.asarray(out.evicted)[: int(out.num_evicted)]
        assert np.unique(evicted).size == evicted.size
        if int(out.state.last_eviction) == int(out.state.step):  # evicted in this call
            seen = window_counts(window)
            new_hits = {i: hits.get(i, 0) + seen.get(i, 0) if i in hits else seen[i]
                        for i in ids_held.tolist()}  # fmt: skip
            hits = new_hits
            window = []
            if mc.uses_counts:
                is_held = to_int64(RawIds(out.state.hi, out.state.lo)) >= 0
                counts = np.asarray(out.state.counts)[is_held]
                got = dict(zip(ids_held.tolist(), counts.tolist(), strict=True))
                assert got == hits
        # held ids map to their own slot, the rest to the miss slot
        slot_of = dict(zip(ids_held.tolist(), slots.tolist(), strict=True))
        want = [slot_of.get(i, num_slots - 1) for i in ids.tolist()]
        assert np.asarray(out.slots).tolist() == want
        state = out.state


def test_a_time_to_live_by_hand():
    """ttl=2 over LRU, evicting every call (call t evicts the ids last used before t - 2),
    worked by hand: an expired id leaves with no new id to take its slot, and a new id takes
    a freed slot; every row whose id changed is reported once."""
    mc = ManagedCollision("lru", 1, ttl=2)
    state = mc.init(6, 3)  # 5 rows for ids, row 5 the miss row
    calls = [
        # ids, slots, evicted rows, held ids after
        ([1, 2, 3], [2, 3, 4], [2, 3, 4], [1, 2, 3]),
        ([1, 4, 5], [2, 0, 1], [0, 1], [1, 2, 3, 4, 5]),
        ([1, 6, 7], [2, 3, 4], [3, 4], [1, 4, 5, 6, 7]),  # full: LRU replaces 2 and 3
        ([1, 1, 1], [2, 2, 2], [], [1, 4, 5, 6, 7]),  # 4, 5 used at call 2: not yet expired
        ([1, 1, 1], [2, 2, 2], [0, 1], [1, 6, 7]),  # now they are: rows 0, 1 free, unfilled
        ([8, 1, 1], [1, 2, 2], [1, 3, 4], [1, 8]),  # 6, 7 expire; 8 takes a free row
    ]
    step = ours_step(mc)
    for ids, slots, evicted, held in calls:
        pairs = raw_ids(np.array(ids, np.int64))
        out = step(state, pairs.hi, pairs.lo)
        state = out.state
        assert np.asarray(out.slots).tolist() == slots, ids
        assert np.asarray(out.evicted)[: int(out.num_evicted)].tolist() == evicted, ids
        assert held_ids(state)[0].tolist() == held, ids
    assert out.evicted.shape == (6,)  # with a ttl, every held id may leave at once


@pytest.mark.parametrize(  # the README's command runs one case; -m slow the rest
    "eviction,seed",
    [("lru", 0)] + [pytest.param(e, k, marks=pytest.mark.slow)
                    for e in ("lfu", "lru", "distance_lfu") for k in (0, 1, 2)
                    if (e, k) != ("lru", 0)],
)  # fmt: skip
def test_a_time_to_live_over_random_streams(eviction, seed):
    """At every eviction no held id was last used more than ttl calls ago, and every id that
    left (expired or replaced) is reported by its row; a ttl longer than the stream changes
    nothing against the policy alone (checked against TorchRec above)."""
    rng = np.random.default_rng(seed)
    num_slots, per_call = int(rng.integers(4, 30)), int(rng.integers(1, 12))
    interval, ttl = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    calls = stream(rng, rng.choice(["zipf", "uniform"]), 16, per_call, int(rng.integers(5, 80)))
    runs = {}
    for live in (ttl, 100, None):
        mc = ManagedCollision(eviction, interval, ttl=live)
        state, step, last_use, outs = mc.init(num_slots, per_call), ours_step(mc), {}, []
        for t, ids in enumerate(calls, start=1):
            pairs = raw_ids(ids)
            before = dict(zip(*(a.tolist() for a in held_ids(state)), strict=True))
            out = step(state, pairs.hi, pairs.lo)
            state = out.state
            last_use.update(dict.fromkeys(ids.tolist(), t))
            after = dict(zip(*(a.tolist() for a in held_ids(state)), strict=True))
            evicted = set(np.asarray(out.evicted)[: int(out.num_evicted)].tolist())
            assert len(evicted) == int(out.num_evicted)
            assert {before[i] for i in before if i not in after} <= evicted
            if live is not None and t % interval == 0:  # this call evicted
                stale = [i for i in after if t - last_use[i] > live]
                assert not stale, (t, stale)
            outs.append((np.asarray(out.slots), held_ids(state)[0]))
        runs[live] = outs
    for (a, b), (c, d) in zip(runs[100], runs[None], strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_a_time_to_live_is_checked_and_has_no_torchrec_state_dict():
    with pytest.raises(ValueError, match="ttl must be >= 1"):
        ManagedCollision("lfu", 1, ttl=0)
    with pytest.raises((ValueError, TypeError), match="ttl"):
        ManagedCollision("lfu", 1, ttl=1.5)
    mc = ManagedCollision("lfu", 1, ttl=3)
    assert mc.uses_last and mc.uses_counts  # LFU with a ttl keeps each id's last use too
    state = mc.remap(mc.init(4, 2), raw_ids([5, 6])).state
    with pytest.raises(ValueError, match="no time to live"):
        to_torchrec(mc, state)


def test_valid_mask_and_padding_are_not_profiled():
    mc = ManagedCollision("lfu", 1)
    state = mc.init(6, 4)
    ids = raw_ids([1, 2, 3, 4])
    out = mc.remap(state, ids, valid=jnp.array([True, False, True, False]))
    assert sorted(held_ids(out.state)[0].tolist()) == [1, 3]
    assert out.slots[1] == 6 and out.slots[3] == 6  # masked: out of range
    fewer = mc.remap(state, raw_ids([1, 3]))  # fewer ids than ids_per_call pad the window
    np.testing.assert_array_equal(fewer.state.hi, out.state.hi)
    np.testing.assert_array_equal(fewer.state.slot, out.state.slot)


def test_eval_changes_nothing():
    mc = ManagedCollision("distance_lfu", 2)
    state = mc.init(8, 4)
    for call in ([1, 2, 2, 3], [3, 3, 4, 5]):
        state = mc.remap(state, raw_ids(call)).state
    out = mc.remap(state, raw_ids([3, 9, 1, 2]), train=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), out.state, state))
    assert int(out.num_evicted) == 0


def test_traced_bad_ids_are_never_admitted():
    """Under jit a negative int64 cannot raise: it is not profiled and reads out of range."""
    mc = ManagedCollision("lfu", 1)
    step = ours_step(mc)
    hi = jnp.array([0xFFFFFFFF, 0], jnp.uint32)
    out = step(mc.init(4, 2), hi, jnp.array([5, 5], jnp.uint32))
    assert held_ids(out.state)[0].tolist() == [5]
    assert out.slots.tolist()[0] == 4


def test_does_not_retrace():
    mc = ManagedCollision("lru", 2)
    traces = []

    @jax.jit
    def step(state, hi, lo):
        traces.append(1)
        return mc.remap(state, RawIds(hi, lo))

    state = mc.init(16, 8)
    for k in range(5):
        pairs = raw_ids(np.arange(8) + k)
        state = step(state, pairs.hi, pairs.lo).state
    assert len(traces) == 1


@pytest.mark.parametrize(
    "ids,error,match",
    [
        (np.array([1, -3]), ValueError, "-3"),
        (np.array([1.5]), TypeError, "integer"),
        ([1, 2**63], ValueError, "2\\*\\*63"),
        (np.array([2**63], np.uint64), ValueError, "largest raw id"),
        ([True], TypeError, "integer"),
    ],
)
def test_bad_ids_raise_naming_the_argument(ids, error, match):
    mc = ManagedCollision("lfu", 1)
    state = mc.init(4, 4)
    with pytest.raises(error, match=match):
        mc.remap(state, ids)
    with pytest.raises(error, match="ids"):
        raw_ids(ids)


def test_bad_config_and_state_raise():
    with pytest.raises(ValueError, match="eviction"):
        ManagedCollision("fifo", 1)
    with pytest.raises(ValueError, match="eviction_interval"):
        ManagedCollision("lfu", 0)
    with pytest.raises(TypeError, match="eviction_interval"):
        ManagedCollision("lfu", None)
    with pytest.raises(ValueError, match="decay_exponent"):
        ManagedCollision("lru", 1, decay_exponent=0.0)
    bad_admissions = [
        ({"admission": "fifo"}, ValueError, "admission must be None or one of"),
        ({"admission_value": 2}, ValueError, "admission_value is set, but admission is None"),
        ({"admission": "count"}, ValueError, "needs admission_value"),
        ({"admission": "count", "admission_value": 1.5}, ValueError, "an int >= 1"),
        ({"admission": "average", "admission_value": 2}, ValueError, "takes no admission_value"),
        ({"admission": "dynamic", "admission_value": -1}, ValueError, "must be > 0"),
        ({"admission": "probabilistic", "admission_value": 1.5}, ValueError, r"in \(0, 1\]"),
        ({"admission": "dynamic", "admission_value": "2"}, TypeError, "must be a number"),
    ]
    for kwargs, error, match in bad_admissions:
        with pytest.raises(error, match=match):
            ManagedCollision("lfu", 1, **kwargs)
    assert ManagedCollision("lfu", 1, admission="dynamic").admission_value == 10.0
    mc = ManagedCollision("lfu", 2)
    with pytest.raises(ValueError, match="num_slots"):
        mc.init(1, 4)
    with pytest.raises(ValueError, match="ids_per_call"):
        mc.init(4, 0)
    state = mc.init(4, 2)
    with pytest.raises(ValueError, match="ids_per_call"):
        mc.remap(state, raw_ids([1, 2, 3]))
    with pytest.raises(ValueError, match="eviction='lru'"):
        ManagedCollision("lru", 2).remap(state, raw_ids([1]))
    with pytest.raises(ValueError, match="valid"):
        mc.remap(state, raw_ids([1, 2]), valid=jnp.array([True]))
    with pytest.raises(TypeError, match="CollisionState"):
        mc.remap({"hi": 1}, raw_ids([1]))
    assert isinstance(state, CollisionState)


def test_raw_ids_round_trip_the_int64_range():
    values = np.array([0, 1, 2**31, 2**32 - 1, 2**32, 2**62 + 7, INT64_MAX], np.int64)
    pairs = raw_ids(values)
    assert pairs.hi.dtype == jnp.uint32 and pairs.lo.dtype == jnp.uint32
    np.testing.assert_array_equal(to_int64(pairs), values)
    np.testing.assert_array_equal(to_int64(raw_ids(values.reshape(7, 1))), values.reshape(7, 1))
    assert to_int64(raw_ids(12)).tolist() == 12


# --- evicted rows and optimizer state ---------------------------------------------------------


def test_reset_rows_and_state_touch_only_the_evicted_rows():
    import jaxembed
    from jaxembed.collisions import reset_rows, reset_state

    table = jnp.arange(12.0).reshape(6, 2)
    evicted = jnp.array([4, 1, 6, -1], jnp.int32)  # 6 and -1: padding, dropped (never wrapped)
    fives = lambda key, shape, dtype: jnp.full(shape, 5.0, dtype)  # noqa: E731
    out = reset_rows(evicted, table, jax.random.key(0), init=fives)
    want = np.arange(12.0).reshape(6, 2)
    want[[1, 4]] = 5.0
    np.testing.assert_array_equal(out, want)
    for opt in (jaxembed.sparse.rowwise_adagrad(0.1, initial_accumulator_value=0.25),
                jaxembed.sparse.adagrad(0.1), jaxembed.sparse.sgd(0.1, momentum=0.9),
                jaxembed.sparse.lazy_adam(0.1)):  # fmt: skip
        state = jax.tree.map(lambda a: a + 3 if a.ndim else a + 7, opt.init(table))
        fresh = opt.init(table)
        got = reset_state(evicted, state, opt, table)
        leaves = (jax.tree.leaves(got), jax.tree.leaves(state), jax.tree.leaves(fresh))
        for g, s, f in zip(*leaves, strict=True):
            if g.ndim == 0:
                assert g == s  # the step count is not a row's
                continue
            w = np.asarray(s).copy()
            w[[1, 4]] = np.asarray(f)[[1, 4]]
            np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="evicted"):
        reset_rows(jnp.zeros((2, 2), jnp.int32), table, jax.random.key(0))


def test_training_with_resets_matches_torchrec_with_a_reset_hook():
    """The managed-collision sparse step against TorchRec's module, a torch table and FBGEMM's
    row-wise Adagrad, with evicted rows and their ``sum`` reset before the same call's lookup
    (TorchRec's sharded semantics; managed-collision.md section 5)."""
    import jaxembed
    from jaxembed.collisions import reset_rows, reset_state

    num_slots, dim, lr, eps = 12, 4, 0.3, 1e-8
    mc = ManagedCollision("distance_lfu", 2)
    calls = stream(np.random.default_rng(3), "zipf", 16, 10, 60)
    targets = np.random.default_rng(4).standard_normal((16, 10, dim)).astype(np.float32)
    w0 = np.random.default_rng(5).standard_normal((num_slots, dim)).astype(np.float32)
    half = lambda key, shape, dtype: jnp.full(shape, 0.5, dtype)  # noqa: E731
    opt = jaxembed.sparse.rowwise_adagrad(lr, eps=eps)

    @jax.jit
    def step(mc_state, table, opt_state, hi, lo, target):
        out = mc.remap(mc_state, RawIds(hi, lo))
        table = reset_rows(out.evicted, table, jax.random.key(0), init=half)
        opt_state = reset_state(out.evicted, opt_state, opt, table)
        rows, lk = jaxembed.sparse.lookup({"weight": table}, out.slots)
        grad = lk.grad(jax.grad(lambda r: jnp.sum(r * target))(rows))
        table, opt_state = opt.update(grad, opt_state, lk.params["weight"])
        return out.state, table, opt_state, out.slots

    module = torchrec_module(mc, num_slots)
    weight = torch.from_numpy(w0.copy())
    acc = torch.zeros(num_slots)
    resets = 0
    state, table, opt_state = mc.init(num_slots, 10), jnp.asarray(w0), opt.init(jnp.asarray(w0))
    for ids, target in zip(calls, targets, strict=True):
        slots, evicted = torchrec_call(module, ids)
        if evicted is not None:
            resets += int(acc[evicted].gt(0).sum())  # a trained row is reset
            weight[evicted] = 0.5
            acc[evicted] = 0.0
        w = weight.clone().requires_grad_(True)
        (w[torch.from_numpy(slots)] * torch.from_numpy(target)).sum().backward()
        present = torch.unique(torch.from_numpy(slots))
        g = w.grad[present]
        acc[present] += (g * g).mean(dim=1)
        weight[present] -= lr * g / (acc[present].sqrt() + eps)[:, None]
        pairs = raw_ids(ids)
        state, table, opt_state, ours = step(state, table, opt_state, pairs.hi, pairs.lo, target)
        np.testing.assert_array_equal(np.asarray(ours), slots)
        np.testing.assert_allclose(np.asarray(table), weight.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(opt_state.sum), acc.numpy(), rtol=1e-6, atol=1e-7)
    assert resets > 0


def test_the_bench_remap_op_remaps_as_torchrec():
    """jaxembed-bench's ``remap`` op: a full table of hashed ids, TorchRec's buffers the same."""
    from jaxembed.bench import _baselines, _cases

    ids = np.random.default_rng(0).integers(0, 50, size=64).astype(np.int32)
    table = jnp.zeros((50, 4))
    ours = _cases.remap_cases(table, jnp.asarray(ids))["jaxembed.collisions"]
    slots = np.asarray(jax.jit(ours.fn)(*ours.args))
    want = np.where(ids == 49, 49, ids)  # id k's hash is held in slot k; 49 is the miss slot
    np.testing.assert_array_equal(slots, want)
    theirs = _baselines._torchrec_remap(torch, 50, ids)
    np.testing.assert_array_equal(theirs().numpy(), want)


@pytest.mark.slow
@pytest.mark.parametrize("eviction", ["lfu", "lru", "distance_lfu"])
@pytest.mark.parametrize("kind", ["zipf", "uniform"])
def test_matches_torchrec_at_scale(eviction, kind):
    """Thousands of slots, a window of thousands of ids with heavy ties: the bisection that
    selects the leaving entries, and the merge that keeps the held ids sorted, at size."""
    mc = ManagedCollision(eviction, 2, decay_exponent=1.0 if eviction == "lfu" else 1.5)
    calls = stream(np.random.default_rng(11), kind, 8, 4096, 60_000)
    run_against_torchrec(mc, 5000, calls, offset=3)
