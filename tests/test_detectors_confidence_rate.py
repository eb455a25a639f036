"""Boundary walks under ``confidence`` (low-margin share), and the ``rate`` (query volume) detector."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from exporter.detectors.base import Batch
from exporter.detectors.confidence import ConfidenceDetector, ConfidenceParams
from exporter.detectors.rate import RateDetector, RateParams
from exporter.events import Event
from tests.test_detectors_ood import (
    DIM,
    PROTOTYPES,
    assert_same_signals,
    context,
    digits,
    events,
    first_flag,
    model_probs,
    run,
    savez_roundtrip,
)
from tests.synthetic import judge

# ---------------------------------------------------------------------------
# boundary walks (confidence)
# ---------------------------------------------------------------------------


def boundary_walk(rng: np.random.Generator, n: int, steps: int = 12) -> np.ndarray:
    """Tramèr-style line search: bisect between two inputs of different classes until the
    boundary is pinned down, then start over with a new pair. Returns the queried points."""
    out = []
    while len(out) < n:
        a, b = rng.choice(10, size=2, replace=False)
        lo, hi = PROTOTYPES[a] * 0.8, PROTOTYPES[b] * 0.8
        cls_lo = int(model_probs(lo[None])[0].argmax())
        for _ in range(steps):
            mid = (lo + hi) / 2.0
            out.append(mid)
            if int(model_probs(mid[None])[0].argmax()) == cls_lo:
                lo = mid
            else:
                hi = mid
    return np.array(out[:n])


def confidence_detector(**params: object) -> ConfidenceDetector:
    return ConfidenceDetector(ConfidenceParams(**params), context(None))


def test_boundary_walker_flagged_benign_not() -> None:
    """``confidence`` (margin measure, the default) catches boundary walks; it replaced a separate ``boundary`` detector."""
    det = confidence_detector()
    flagged = 0
    for c in range(50):
        x, _ = digits(np.random.default_rng(100 + c), 100)
        sig, _ = run(det, events(f"b{c}", x, probs=model_probs(x)))
        flagged += bool(sig.flagged.any())
        assert sig.values[-1] < 0.3
    assert flagged == 0
    walk = boundary_walk(np.random.default_rng(31), 150)
    sig, _ = run(det, events("walker", walk, probs=model_probs(walk)))
    assert first_flag(sig) is not None and first_flag(sig) <= 25
    assert sig.values[-1] > 0.5


def test_label_only_answers_need_a_score() -> None:
    det = confidence_detector()
    state = det.init_state()
    labels = [Event("c", "m", float(i), "tabular", vector=np.zeros(DIM), label="7") for i in range(5)]
    assert judge(det, state, Batch("c", "m", labels)) is None
    assert int(state["low_count"]) == 0


def test_boundary_batching_does_not_change_results() -> None:
    rng = np.random.default_rng(33)
    x = np.concatenate([digits(rng, 80)[0], boundary_walk(rng, 120), digits(rng, 60)[0]])
    probs = model_probs(x)
    evs = events("c", x, probs=probs)
    for i in range(0, len(evs), 9):  # some label-only answers without a score sprinkled in
        evs[i] = Event("c", "m", evs[i].ts, "tabular", vector=x[i], label="3")
    det = confidence_detector()
    one, s1 = run(det, evs, 1)
    assert np.isnan(one.values).sum() == len(range(0, len(evs), 9))
    assert one.flagged.any() and not one.flagged.all()
    for sizes in (32, 260, (4, 1, 40, 7)):
        other, s2 = run(det, evs, sizes)
        assert_same_signals(one, other)
        np.testing.assert_array_equal(s1["low_buf"], s2["low_buf"])


# ---------------------------------------------------------------------------
# rate
# ---------------------------------------------------------------------------


def rate_detector(**params: object) -> RateDetector:
    return RateDetector(RateParams(**params), context(None))


def timed(client: str, ts: np.ndarray) -> list[Event]:
    return events(client, probs=np.full((len(ts), 2), 0.5), ts=ts)


def test_rate_params() -> None:
    p = RateParams()
    assert (p.window, p.min_events, p.rate_scale, p.threshold, p.min_span) == (64, 20, 1.0, 0.8, 1.0)
    assert RateDetector.threshold_param == "threshold" and RateDetector.name == "rate"
    with pytest.raises(ValidationError):
        RateParams(window=1)
    with pytest.raises(ValidationError):
        RateParams(min_span=0.0)


def test_scraper_flagged_humans_not() -> None:
    det = rate_detector()
    rng = np.random.default_rng(41)
    for c in range(50):  # people: a query every few seconds to minutes, in sessions
        gaps = rng.exponential(20.0, size=150) * rng.choice([1.0, 0.2], size=150, p=[0.7, 0.3])
        sig, state = run(det, timed(f"h{c}", 1_700_000_000.0 + np.cumsum(gaps)))
        assert not sig.flagged.any()
        assert det.rate(state) < 1.0
    scraper = 1_700_000_000.0 + np.arange(300) * 0.1 + rng.uniform(0, 0.02, 300)  # 10 queries/s
    sig, state = run(det, timed("scraper", scraper))
    assert first_flag(sig) == 20
    assert sig.values[-1] == pytest.approx(10 / 11, abs=0.02)
    assert det.rate(state) == pytest.approx(10.0, rel=0.05)
    assert det.burstiness(state) < -0.8  # a script: nearly periodic


def test_identical_timestamps_are_safe() -> None:
    det = rate_detector()
    with np.errstate(all="raise"):
        sig, state = run(det, timed("batch-job", np.full(100, 1_700_000_000.0)))
        assert np.isfinite(sig.values).all()
        assert sig.values[0] == 0.0  # one query is no rate
        # 63 queries in one second-resolution tick: at least 63/s
        assert sig.values[-1] == pytest.approx(63 / 64)
        assert sig.flagged[-1]
        assert np.isnan(det.burstiness(state))
        assert det.rate(state) == pytest.approx(63.0)


def test_burstiness_measures_the_arrival_pattern() -> None:
    det = rate_detector()
    rng = np.random.default_rng(42)
    _, periodic = run(det, timed("p", np.arange(64) * 5.0))
    assert det.burstiness(periodic) == pytest.approx(-1.0)
    _, poisson = run(det, timed("q", np.cumsum(rng.exponential(5.0, 64))))
    assert abs(det.burstiness(poisson)) < 0.2
    bursts = np.concatenate([t0 + np.arange(8) * 0.1 for t0 in np.arange(8) * 600.0])
    _, bursty = run(det, timed("b", bursts))
    assert det.burstiness(bursty) > 0.4  # 56 gaps of 0.1 s, 7 of 10 min: B = 0.48


def test_rate_batching_does_not_change_results() -> None:
    rng = np.random.default_rng(43)
    ts = 1_700_000_000.0 + np.cumsum(np.concatenate([rng.exponential(10.0, 80), np.full(30, 0.0), rng.exponential(0.05, 150)]))
    det = rate_detector()
    evs = timed("c", ts)
    one, s1 = run(det, evs, 1)
    assert one.flagged.any() and not one.flagged.all()
    for sizes in (32, 260, (3, 1, 70, 9)):
        other, s2 = run(det, evs, sizes)
        assert_same_signals(one, other)
        np.testing.assert_array_equal(s1["ts_buf"], s2["ts_buf"])
    restored = savez_roundtrip(s1)
    a, _ = run(det, timed("c", ts[-1] + np.arange(1, 21) * 0.1), state={k: v.copy() for k, v in s1.items()})
    b, _ = run(det, timed("c", ts[-1] + np.arange(1, 21) * 0.1), state=restored)
    assert_same_signals(a, b)
    assert sum(v.nbytes for v in det.init_state().values()) == 8 * 64 + 8
