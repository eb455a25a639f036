"""PRADA: Shapiro-Wilk normality of a client's minimum distances to its per-class growing sets.

Traffic is digits-shaped: 10 class prototypes in 64 features with values 0..16, natural
samples = prototype + Gaussian noise, rounded and clipped; the victim answers with a
softmax over distances to the prototypes. The JbDA-like attacker starts from 10 seeds
per class and doubles its set each round with steps of lambda = 0.1 of the feature
range along random sign directions (Papernot et al. 2017, as PRADA evaluates it).
"""

from __future__ import annotations


import numpy as np
import pytest
from pydantic import ValidationError

from exporter.detectors.base import Batch, ModelContext
from exporter.detectors.prada import (
    PradaDetector,
    PradaParams,
    _trimmed_ws,
    growing_set_slot,
    shapiro_coefficients,
    shapiro_w,
)
from exporter.events import Event
from exporter.detectors.kit import Scaling
from tests.synthetic import judge, WORLD, D, K, savez_roundtrip, jbda, run


def context(seed: int = 99) -> ModelContext:
    scaling = Scaling.fit(WORLD.sample(np.random.default_rng(seed), 3000))
    return ModelContext(name="m", modality="tabular", input_dim=D, num_classes=K, scaling=scaling)


def make_events(x: np.ndarray, client: str = "c", probs: bool = True) -> list[Event]:
    p = WORLD.predict(x)
    return [Event(client, "m", 1000.0 + i, "tabular", vector=x[i], probs=p[i] if probs else None) for i in range(len(x))]


# ---------------------------------------------------------------------------
# Shapiro-Wilk and the reservoir
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [20, 51, 100, 256, 1000])
def test_shapiro_w_matches_scipy(n: int) -> None:
    stats = pytest.importorskip("scipy.stats")  # scipy comes with imagehash; the detector does not need it
    rng = np.random.default_rng(n)
    for x in (rng.standard_normal(n), rng.exponential(size=n), rng.uniform(size=n), np.concatenate([rng.normal(0, 1, n // 2), rng.normal(6, 1, n - n // 2)])):
        assert shapiro_w(np.sort(x)) == pytest.approx(stats.shapiro(x).statistic, abs=1e-7)


def test_shapiro_edge_cases() -> None:
    assert shapiro_w(np.full(60, 2.5)) == 0.0  # a point mass has no normal shape at all
    assert shapiro_coefficients(3)[0] == pytest.approx(np.sqrt(0.5))
    assert shapiro_coefficients(256) is shapiro_coefficients(256)  # cached per n


def test_a_batch_of_tests_matches_shapiro_w_window_by_window() -> None:
    """The tests of a batch run together (windows of several lengths in one padded matrix)
    and give each window's W after 3-sigma trimming, as :func:`shapiro_w` does alone."""
    rng = np.random.default_rng(8)
    seq = np.abs(rng.normal(1.0, 0.3, 420))
    seq[[30, 170, 171, 380]] = [9.0, 0.0, 12.0, 7.5]  # outliers and an exact repeat's zero
    seq[300:340] = 0.7  # a window without spread: W = 0
    windows = [(0, 21), (0, 57), (0, 140), (90, 256), (150, 256), (300, 40), (164, 256)]

    def reference(x: np.ndarray) -> float:
        x = np.sort(x)
        mu, spread = x.mean(), 3.0 * x.std()
        kept = x[(x >= mu - spread) & (x <= mu + spread)]
        return shapiro_w(kept) if kept.shape[0] >= 3 else 1.0

    starts, lengths = [s for s, _ in windows], [n for _, n in windows]
    together = _trimmed_ws(seq, starts, lengths)
    for (s, n), w in zip(windows, together):
        assert w == pytest.approx(reference(seq[s : s + n]), abs=1e-9)
        assert w == pytest.approx(_trimmed_ws(seq, [s], [n])[0], abs=1e-12)
    assert together[5] == 0.0
    for k in (1, 4):  # windows holding outliers: trimmed, they look far more normal than untrimmed
        s, n = windows[k]
        assert together[k] > shapiro_w(np.sort(seq[s : s + n])) + 0.1


def test_growing_set_slot_is_a_deterministic_reservoir() -> None:
    cap = 8
    assert [growing_set_slot(3, n, cap) for n in range(cap)] == list(range(cap))
    kept = [growing_set_slot(3, n, cap) for n in range(cap, 4000)]
    assert kept == [growing_set_slot(3, n, cap) for n in range(cap, 4000)]
    assert all(-1 <= s < cap for s in kept)
    # Algorithm R keeps addition n with probability cap / (n + 1): about cap * ln(4000 / 8) = 50 here.
    assert 30 <= sum(s >= 0 for s in kept) <= 75
    assert kept != [growing_set_slot(4, n, cap) for n in range(cap, 4000)]  # classes draw independently


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


def test_jbda_is_flagged_within_a_few_hundred_queries_and_the_alarm_latches() -> None:
    det = PradaDetector(PradaParams(), context())
    for seed in range(3):
        rng = np.random.default_rng(seed)
        attack = jbda(rng, 600)
        after = WORLD.sample(rng, 300)  # the attacker then behaves; the alarm must stay on
        values, flags, _ = run(det, make_events(np.concatenate([attack, after])))
        assert flags.any()
        first = int(np.argmax(flags))
        assert first < 300
        assert flags[first:].all()
        assert values[first] >= 0.1  # W < 0.9
        assert np.isfinite(values[first:]).all()


def test_iid_natural_clients_are_not_flagged() -> None:
    det = PradaDetector(PradaParams(), context())
    rng = np.random.default_rng(7)
    worst = 0.0
    for client in range(6):
        values, flags, _ = run(det, make_events(WORLD.sample(rng, 700), client=f"app-{client}"))
        assert not flags.any()
        worst = max(worst, float(np.nanmax(values)))
    assert worst < 0.07  # W stays above 0.93 (threshold: W < 0.9)


def test_uniform_random_queries_are_a_known_miss() -> None:
    """Tramèr-style uniform queries have near-normal distances (PRADA's paper: W near 0.99)."""
    det = PradaDetector(PradaParams(), context())
    rng = np.random.default_rng(3)
    values, flags, _ = run(det, make_events(rng.uniform(0, 16, (600, D))))
    assert not flags.any()
    assert np.nanmax(values) < 0.1


def test_value_is_nan_until_the_first_test_then_steps_at_fixed_event_counts() -> None:
    params = PradaParams(test_every=8, min_distances=50)
    det = PradaDetector(params, context())
    events = make_events(WORLD.sample(np.random.default_rng(1), 200))
    values, flags, state = run(det, events, sizes=[5, 13, 1, 32])
    judged = np.flatnonzero(~np.isnan(values))
    first = int(judged[0])
    assert (first + 1) % 8 == 0  # tests run after events 8, 16, 24, ... of the client
    assert int(state["dist_count"]) <= 200
    # before it: not judged; after it: the value only changes at test positions
    assert np.isnan(values[:first]).all() and np.isfinite(values[first:]).all()
    changes = np.flatnonzero(np.diff(values[first:]) != 0) + first + 1
    assert all((c + 1) % 8 == 0 for c in changes)
    assert not flags.any()


def test_batching_does_not_change_the_result() -> None:
    params = PradaParams(max_per_class=6, window=60, min_distances=30, test_every=3)
    det = PradaDetector(params, context())
    rng = np.random.default_rng(11)
    x = np.concatenate([jbda(rng, 250), WORLD.sample(rng, 150), jbda(rng, 100, lam=0.02)])
    events = make_events(x)
    one_values, one_flags, one_state = run(det, events, sizes=1)
    assert one_flags.any() and not one_flags.all()
    for sizes in ([7], [32], [64, 1, 3, 17], [500]):
        values, flags, state = run(det, events, sizes=sizes)
        np.testing.assert_array_equal(flags, one_flags)
        np.testing.assert_array_equal(np.isnan(values), np.isnan(one_values))
        np.testing.assert_allclose(values, one_values, rtol=1e-9, atol=1e-12)
        for key in one_state:
            np.testing.assert_allclose(state[key], one_state[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_growing_sets_are_capped_and_exact_repeats_are_not_recorded() -> None:
    det = PradaDetector(PradaParams(max_per_class=4), context())
    rng = np.random.default_rng(5)
    x = WORLD.sample(rng, 300)
    _, _, state = run(det, make_events(x))
    assert state["members"].shape == (K, 4, D)
    assert (state["added"] > 4).sum() >= 5  # more joined than fit in most classes: a reservoir was kept
    np.testing.assert_array_equal(np.isfinite(state["members_sq"]).sum(axis=1), np.minimum(state["added"], 4))
    recorded = int(state["dist_count"])
    _, _, state = run(det, make_events(x[:50]), state=state)  # resubmitting exact inputs
    resent_members = int(state["dist_count"]) - recorded
    assert resent_members < 50  # repeats of current members record nothing
    again = PradaDetector(PradaParams(max_per_class=4, skip_exact_repeats=False), context())
    _, _, s2 = run(again, make_events(np.concatenate([x, x[:50]])))
    assert int(s2["dist_count"]) == recorded + 50


def test_events_without_vector_or_answer_are_not_judged() -> None:
    det = PradaDetector(PradaParams(min_distances=20, window=40, test_every=1), context())
    rng = np.random.default_rng(2)
    x = WORLD.sample(rng, 60)
    events = make_events(x)
    for e in events[::3]:  # label-only answers are bucketed by label
        e.label, e.probs = str(int(WORLD.predict(e.vector[None])[0].argmax())), None
    events[5].probs = events[5].label = None  # no answer at all
    text = Event("c", "m", 2000.0, "text", text="hello")
    values, flags, state = run(det, events + [text], sizes=16)
    assert np.isnan(values[5]) and np.isnan(values[-1])
    assert int(state["events"]) == 59
    assert np.isfinite(values[-2])
    assert judge(det, det.init_state(), Batch("c", "m", [text])) is None


def test_state_is_plain_arrays_that_survive_savez() -> None:
    det = PradaDetector(PradaParams(), context())
    rng = np.random.default_rng(4)
    x = jbda(rng, 400)
    events = make_events(x)
    v_ref, f_ref, _ = run(det, events)
    _, _, state = run(det, events[:200])
    restored = savez_roundtrip(state)
    assert all(isinstance(v, np.ndarray) for v in restored.values())
    v2, f2, _ = run(det, events[200:], state=restored)
    np.testing.assert_array_equal(f2, f_ref[200:])
    np.testing.assert_allclose(v2, v_ref[200:], rtol=1e-9)


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        PradaParams(window=100, min_distances=100)
    with pytest.raises(ValidationError):
        PradaParams(threshold=1.5)
    with pytest.raises(ValidationError):
        PradaParams(bogus=1)
    assert PradaDetector.threshold_param == "threshold" and PradaDetector.name == "prada"


def test_any_label_string_is_bucketed_without_raising() -> None:
    """Labels are client-controlled: digits that int() refuses ("²", 5,000 digits) are hashed."""
    det = PradaDetector(PradaParams(min_distances=20, window=40, test_every=1), context())
    rng = np.random.default_rng(3)
    events = make_events(WORLD.sample(rng, 6))
    for e, label in zip(events, ["²", "٣", "9" * 5000, " 7 ", "7", "cat"]):
        e.label, e.probs = label, None
    values, _, state = run(det, events)
    assert int(state["events"]) == 6
    assert det._label_bucket(" 7 ") == det._label_bucket("7") == 7 and det._label_bucket("²") != 2
