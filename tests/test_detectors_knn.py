"""k-NN distance to a client's own history (Chen, Carlini & Wagner 2019) with SEAT's pair count.

Traffic is digits-shaped (64 features 0..16, 10 class prototypes + noise). Adversarial
search is modelled as HopSkipJump-like probing (batches of tiny Gaussian probes around
a slowly moving point) and SimBA (one coordinate changed by +-epsilon per query).
"""

from __future__ import annotations


import numpy as np
import pytest
from pydantic import ValidationError

from exporter.detectors.base import Batch, ModelContext, Reference
from exporter.detectors.kit import Scaling, reservoir_slots
from exporter.detectors.knn import (
    RESERVOIR_SALT,
    KnnDetector,
    KnnParams,
    history_items,
    similar_pairs,
)
from exporter.events import Event
from exporter.detectors.kit import window_shares
from tests.synthetic import judge, WORLD, D, K, savez_roundtrip, hopskipjump, jbda, run, simba


def context() -> ModelContext:
    scaling = Scaling.fit(WORLD.sample(np.random.default_rng(99), 3000))
    return ModelContext(name="m", modality="tabular", input_dim=D, num_classes=K, scaling=scaling)


def make_events(x: np.ndarray, client: str = "c") -> list[Event]:
    return [Event(client, "m", 1000.0 + i, "tabular", vector=x[i]) for i in range(len(x))]


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


def test_adversarial_search_is_flagged_within_a_few_dozen_queries() -> None:
    det = KnnDetector(KnnParams(), context())
    for seed, attack in enumerate((hopskipjump, simba)):
        values, flags, state = run(det, make_events(attack(np.random.default_rng(seed), 200)))
        assert flags.any(), attack.__name__
        first = int(np.argmax(flags))
        assert first == 27 if attack is hopskipjump else first < 40  # 27 = k + min_events - 1: the earliest possible
        assert values[-1] > 0.8
        assert np.isnan(values[: det.params.k]).all()  # fewer than k earlier queries: not judged
        assert similar_pairs(state) > 100


def test_iid_natural_clients_are_not_flagged() -> None:
    det = KnnDetector(KnnParams(), context())
    rng = np.random.default_rng(7)
    for client in range(5):
        values, flags, state = run(det, make_events(WORLD.sample(rng, 400), client=f"app-{client}"))
        assert not flags.any()
        assert np.nanmax(values) == 0.0
        assert similar_pairs(state) == 0


def test_jbda_steps_are_as_large_as_natural_variation_a_known_miss() -> None:
    """JbDA (lambda = 0.1 of the range on every feature) moves each query about as far as
    two natural samples of a class differ, and its 100 seed families do not fit a
    128-query history: its k-NN distances look natural, so knn does not flag it (PRADA does)."""
    det = KnnDetector(KnnParams(), context())
    rng = np.random.default_rng(3)
    values, flags, _ = run(det, make_events(jbda(rng, 600)))
    assert not flags.any()
    # a random walk of small sign steps from one seed is close enough to be caught
    walk = np.clip(WORLD.sample(rng, 1)[0] + np.cumsum(0.032 * np.sign(rng.standard_normal((300, D))), axis=0), 0, 16)
    _, flags, _ = run(det, make_events(walk))
    assert flags.any()


def test_the_reservoir_keeps_early_queries_through_a_flood() -> None:
    params = KnnParams()
    det = KnnDetector(params, context())
    rng = np.random.default_rng(5)
    attack = hopskipjump(rng, 100)
    flood = rng.uniform(0, 16, (3000, D))
    _, _, state = run(det, make_events(np.concatenate([attack, flood])))
    reservoir, fifo = history_items(state, params.recent)
    assert fifo.tolist() == list(range(3100 - params.recent, 3100))
    assert reservoir.shape[0] == params.reservoir
    assert int((reservoir < 100).sum()) >= 1  # each of the 3100 is kept with probability 64/3100: 2 expected of 100
    assert similar_pairs(state) > 0


def test_interleaved_flooding_does_not_hide_the_attack_queries() -> None:
    """Each attack query is followed by 5 unrelated ones. With a FIFO only, the previous
    attack queries are flushed and no attack query is close; with recent + reservoir every
    attack query still is, so the client's share stays at the attack's share (1/6)."""
    rng = np.random.default_rng(9)
    attack = hopskipjump(rng, 150)
    mixed = []
    for a in attack:
        mixed.append(a)
        mixed.extend(rng.uniform(0, 16, (5, D)))
    events = make_events(np.array(mixed))
    with_history, _, _ = run(KnnDetector(KnnParams(), context()), events)
    fifo_only, _, _ = run(KnnDetector(KnnParams(recent=16, reservoir=0), context()), events)
    assert with_history[-1] == pytest.approx(1 / 6, abs=0.02)
    assert fifo_only[-1] == 0.0


def test_fit_learns_the_distance_threshold_from_benign_reference_data() -> None:
    ctx = context()
    det = KnnDetector(KnnParams(), ctx)
    ref = det.fit(Reference(WORLD.sample(np.random.default_rng(1), 2000), None, ctx.scaling))
    assert ref is not None and set(ref) == {"distance_threshold"}
    learned = float(ref["distance_threshold"])
    assert 0.4 < learned < 1.0  # the 1st percentile of benign k-NN means on this data
    det.load_reference(ref)
    assert det.distance_threshold == learned
    _, flags, _ = run(det, make_events(WORLD.sample(np.random.default_rng(2), 300)))
    assert not flags.any()
    _, flags, _ = run(det, make_events(simba(np.random.default_rng(2), 100)))
    assert flags.any()
    assert det.fit(Reference(None, None, None)) is None
    with pytest.raises(ValueError):
        det.load_reference({"distance_threshold": np.asarray(-1.0)})


def test_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(11)
    x = np.concatenate([hopskipjump(rng, 120), WORLD.sample(rng, 120), simba(rng, 120)])
    events = make_events(x)
    for params in (KnnParams(), KnnParams(k=2, recent=5, reservoir=3, window=10, min_events=3)):
        det = KnnDetector(params, context())
        one_values, one_flags, one_state = run(det, events, sizes=1)
        assert one_flags.any() and not one_flags.all()
        for sizes in ([7], [32], [64, 1, 3, 17], [400]):
            values, flags, state = run(det, events, sizes=sizes)
            np.testing.assert_array_equal(flags, one_flags)
            np.testing.assert_array_equal(values, one_values)
            for key in one_state:
                np.testing.assert_array_equal(state[key], one_state[key], err_msg=key)


def reference_knn(det: KnnDetector, x: np.ndarray) -> tuple[np.ndarray, int, list[int]]:
    """The documented semantics by brute force, query by query: query t sees the ``recent``
    queries before it, and the reservoir copy of an older query q (kept per
    :func:`reservoir_slots`) from t = q + recent + 1 up to and including the next query
    taking its slot. Returns the k-NN mean distances, SEAT's pair count and the queries
    the reservoir holds at the end."""
    p = det.params
    e = det.embed(x).astype(np.float64)
    n = e.shape[0]
    slots = reservoir_slots(np.arange(n), p.reservoir, RESERVOIR_SALT)
    until = np.full(n, n)  # the copy of q is seen by the queries up to and including until[q]
    holder: dict[int, int] = {}
    for q in range(n):
        if slots[q] >= 0:
            if slots[q] in holder:
                until[holder[slots[q]]] = q
            holder[int(slots[q])] = q
    dists, pairs = np.full(n, np.nan), 0
    pair_sq = (p.pair_threshold * np.sqrt(D)) ** 2
    for t in range(n):
        q = np.arange(t)
        seen = (t - q <= p.recent) | ((slots[:t] >= 0) & (q + p.recent < t) & (t <= until[:t]))
        d2 = ((e[:t][seen] - e[t]) ** 2).sum(axis=1)
        pairs += int(np.count_nonzero(d2 < pair_sq))
        if t >= p.k and not (d2 <= 1e-9).any():  # an exact repeat of a seen query is not judged
            dists[t] = np.sort(np.sqrt(d2))[: p.k].mean() / np.sqrt(D)
    return dists, pairs, sorted(holder.values())


def test_the_detector_follows_the_reference_semantics_however_batched() -> None:
    rng = np.random.default_rng(12)
    x = np.concatenate([hopskipjump(rng, 240), WORLD.sample(rng, 230), simba(rng, 230)])
    events = make_events(x)
    for params in (KnnParams(), KnnParams(k=3, recent=8, reservoir=5, window=20, min_events=3), KnnParams(k=2, recent=70, reservoir=200)):
        det = KnnDetector(params, context())
        dists, pairs, held = reference_knn(det, x)
        judged = ~np.isnan(dists)
        close = dists[judged] < det.distance_threshold
        values, flags = np.full(len(x), np.nan), np.zeros(len(x), dtype=bool)
        values[judged], flags[judged] = window_shares(np.zeros(params.window, dtype=bool), 0, close, params.min_events, params.threshold)
        assert flags.any() and not flags.all()
        for sizes in ([1], [7], [700], [64, 1, 3, 17, 300]):
            got_values, got_flags, state = run(det, events, sizes=sizes)
            np.testing.assert_array_equal(got_values, values)
            np.testing.assert_array_equal(got_flags, flags)
            assert similar_pairs(state) == pairs
            reservoir, fifo = history_items(state, params.recent)
            assert reservoir.tolist() == held and fifo.tolist() == list(range(len(x) - params.recent, len(x)))


def test_projection_is_fixed_by_the_seed_and_state_survives_savez() -> None:
    a, b = KnnDetector(KnnParams(), context()), KnnDetector(KnnParams(), context())
    x = WORLD.sample(np.random.default_rng(0), 5)
    np.testing.assert_array_equal(a.embed(x), b.embed(x))
    assert a.embed(x).shape == (5, 32)
    c = KnnDetector(KnnParams(projection_seed=1), context())
    assert not np.array_equal(a.embed(x), c.embed(x))
    events = make_events(hopskipjump(np.random.default_rng(1), 120))
    v_ref, f_ref, _ = run(a, events)
    _, _, state = run(a, events[:60])
    restored = savez_roundtrip(state)
    v2, f2, _ = run(b, events[60:], state=restored)
    np.testing.assert_array_equal(v2, v_ref[60:])
    np.testing.assert_array_equal(f2, f_ref[60:])


def test_events_without_vectors_are_not_judged() -> None:
    det = KnnDetector(KnnParams(k=2, recent=4, reservoir=4, min_events=2, window=10), context())
    x = hopskipjump(np.random.default_rng(0), 6)
    events = make_events(x)
    events.insert(3, Event("c", "m", 1003.5, "text", text="hello"))
    values, _, state = run(det, events, sizes=7)
    assert np.isnan(values[[0, 1, 3]]).all() and np.isfinite(values[[2, 4, 5, 6]]).all()
    assert int(state["seen"]) == 6
    assert judge(det, state, Batch("c", "m", [Event("c", "m", 1.0, "text", text="x")])) is None


def test_reservoir_slots_follow_algorithm_r() -> None:
    slots = reservoir_slots(np.arange(5000), 64, RESERVOIR_SALT)
    np.testing.assert_array_equal(slots[:64], np.arange(64))
    # item j >= 64 is kept with probability 64 / (j + 1): about 64 * ln(5000 / 64) = 279 of them
    assert 64 * np.log(5000 / 64) * 0.7 < (slots[64:] >= 0).sum() < 64 * np.log(5000 / 64) * 1.3
    np.testing.assert_array_equal(reservoir_slots(np.arange(5000), 64, RESERVOIR_SALT), slots)


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        KnnParams(k=10, recent=8)
    with pytest.raises(ValidationError):
        KnnParams(window=10, min_events=20)
    with pytest.raises(ValidationError):
        KnnParams(distance_threshold=0)
    assert KnnDetector.threshold_param == "threshold" and KnnDetector.name == "knn"


