"""Pipeline: per-client state, detector failures, cardinality guard, eviction, snapshots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.config import Settings
from exporter.detectors import enabled_detectors
from exporter.demo import DigitsLike
from exporter.metrics import Metrics
from exporter.snapshot import pack
from exporter.pipeline import Pipeline

PLUGINS = {"always": "tests.plugins:FlagClientsNamedBad", "broken": "tests.plugins:Broken"}


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock | None = None, **kw) -> Pipeline:
    kw.setdefault("plugins", PLUGINS)
    kw.setdefault("detectors", {"always": {}, "broken": {}})
    settings = Settings(**kw)
    return Pipeline(settings, Metrics(enabled_detectors(settings)), clock=clock or Clock())


def lines(client: str, n: int, seed: int = 0) -> list[str]:
    world = DigitsLike(0)
    x = world.sample(np.random.default_rng(seed), n)
    p = world.predict(x)
    return [json.dumps({"client": client, "model": "digits", "input": xi.tolist(), "output": pi.tolist()}) for xi, pi in zip(x, p)]


def value(p: Pipeline, name: str, **labels: str) -> float | None:
    return p.metrics.registry.get_sample_value(name, labels)


def test_state_is_per_client() -> None:
    p = make()
    p.ingest_lines(lines("bad-1", 5) + lines("good-1", 7, seed=1))
    assert p.store["bad-1"].total == 5 and p.store["good-1"].total == 7
    assert p.store["bad-1"].suspicious and not p.store["good-1"].suspicious
    assert p.store["bad-1"].first_flagged_query == 1
    assert int(p.store["good-1"].detector_state["digits"]["always"]["n"]) == 7
    assert value(p, "monitaur_client_queries_total", client="good-1", model="digits") == 7
    assert value(p, "monitaur_client_suspicious", client="bad-1") == 1
    assert value(p, "monitaur_events_total", model="digits") == 12


def test_a_failing_detector_is_counted_not_treated_as_benign() -> None:
    p = make()
    result = p.ingest_lines(lines("crash-1", 4) + lines("weird-1", 3))
    assert result.accepted == 7  # the events themselves are fine
    assert value(p, "monitaur_detector_errors_total", detector="broken") == 7
    # no "not suspicious" verdict was recorded for the events it could not judge
    assert "broken" not in p.store["crash-1"].scores and "broken" not in p.store["weird-1"].current
    # the other detector still ran
    assert p.store["crash-1"].scores["always"] == pytest.approx(0.1)


def test_a_failure_around_the_detectors_costs_one_client_its_batch_not_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict stage or a client's bookkeeping raising is the last resort's case: it is
    counted (detector="fusion"), and the other clients of the same block are judged."""
    p = make()
    assert value(p, "monitaur_detector_errors_total", detector="fusion") == 0  # created at 0
    rt = p.runtimes.build("digits")
    real = rt.fusion.judge

    def judge(state, signals, n):  # type: ignore[no-untyped-def]
        if n == 2:  # the unlucky client's batch
            raise OverflowError("boom")
        return real(state, signals, n)

    monkeypatch.setattr(rt.fusion, "judge", judge)
    result = p.ingest_lines(lines("bad-1", 3) + lines("unlucky-1", 2, seed=1) + lines("good-1", 4, seed=2))
    assert result.accepted == 9
    assert value(p, "monitaur_detector_errors_total", detector="fusion") == 2
    assert p.store["bad-1"].suspicious and p.store["good-1"].total == 4 and not p.store["good-1"].suspicious


def test_bad_lines_are_counted_and_the_valid_ones_around_them_kept() -> None:
    p = make()
    good = lines("good-1", 3)
    result = p.ingest_lines([good[0], "{broken", good[1], '{"input": [1]}', good[2]])
    assert result.accepted == 3 and dict(result.rejected) == {"malformed_json": 1, "missing_client": 1}
    assert value(p, "monitaur_events_rejected_total", reason="malformed_json") == 1
    assert value(p, "monitaur_events_rejected_total", reason="non_finite") == 0  # zero-initialised


def test_live_events_stamped_far_after_the_clock_are_rejected_before_they_admit_or_expire_anything() -> None:
    """What is kept by event time expires against the latest event time: one event stamped in
    the year 2999 would wipe the links index and every group. Live ingestion rejects events
    more than limits.max_future_seconds (300) after the exporter's clock, whether or not event
    time is the pipeline's clock (replay's pipeline)."""
    clock = Clock(1_000_000.0)
    p = make(clock, limits={"max_future_seconds": 300})
    ok, ahead, far = (json.loads(lines(c, 1)[0]) for c in ("ok", "ahead", "far"))
    result = p.ingest_lines([json.dumps({**ok, "ts": clock.t + 299.0}), json.dumps({**ahead, "ts": clock.t + 301.0}),
                             json.dumps({**far, "model": "other", "ts": 32503679999.0})])
    assert result.accepted == 1 and dict(result.rejected) == {"future_timestamp": 2}
    assert value(p, "monitaur_events_rejected_total", reason="future_timestamp") == 2
    assert "ahead" not in p.store and "far" not in p.store and "other" not in p.decoder.learned_input_dims
    clock.t += 10.0  # the clock moves on: the same event is now on time
    assert p.ingest_lines([json.dumps({**ahead, "ts": 1_000_301.0})]).accepted == 1
    replaying = Pipeline(Settings(), clock=clock, event_time=True)
    result = replaying.ingest_lines([json.dumps({**far, "ts": 32503679999.0}), json.dumps({**ok, "ts": 1000.0})])
    assert result.accepted == 1 and dict(result.rejected) == {"future_timestamp": 1}  # an old event is kept


def test_cardinality_guard_top_n_plus_flagged_and_other() -> None:
    p = make(metrics={"max_client_series": 2})
    for i in range(5):
        p.ingest_lines(lines(f"good-{i}", 2, seed=i))
    p.view.read(lambda clients: p.collector.refresh(list(clients)))
    p.ingest_lines(lines("bad-1", 3))
    text = p.metrics.registry.get_sample_value
    exported = {c for c in p.collector.exported}
    assert "bad-1" in exported  # flagged clients always get their own series
    assert len(exported - {"bad-1"}) == 2
    total = sum(text("monitaur_client_queries_total", {"client": c, "model": "digits"}) or 0 for c in exported | {"__other__"})
    assert total >= 13  # nothing vanishes: what is not exported is counted under __other__
    assert text("monitaur_client_queries_total", {"client": "__other__", "model": "digits"}) > 0
    series = {s.labels["client"] for f in p.metrics.registry.collect() if f.name == "monitaur_client_suspicious" for s in f.samples}
    assert series == exported | {"__other__"}
    assert value(p, "monitaur_client_series") == len(exported) == 3


def test_lru_eviction_removes_series_and_counts() -> None:
    p = make(state={"max_clients": 2, "dir": None})
    p.ingest_lines(lines("a", 1) + lines("b", 1) + lines("c", 1))
    assert "a" not in p.store and len(p.store) == 2
    assert value(p, "monitaur_client_evictions_total", reason="lru") == 1
    assert value(p, "monitaur_client_queries_total", client="a", model="digits") is None
    assert value(p, "monitaur_tracked_clients") == 2


def test_idle_ttl_eviction() -> None:
    clock = Clock()
    p = make(clock, state={"idle_ttl_seconds": 60, "dir": None})
    p.ingest_lines(lines("a", 1))
    clock.t += 30
    p.ingest_lines(lines("b", 1))
    clock.t += 45
    p.expire()
    assert "a" not in p.store and "b" in p.store
    assert value(p, "monitaur_client_evictions_total", reason="ttl") == 1


def test_snapshot_round_trip_gives_no_clean_slate() -> None:
    p = make()
    p.ingest_lines(lines("bad-1", 4) + lines("good-1", 6, seed=3))
    data = pack(p.snapshot_copy())
    q = make()
    assert q.restore(data) == 2
    assert q.store["bad-1"].suspicious and q.store["good-1"].total == 6
    q.ingest_lines(lines("good-1", 2, seed=9))
    assert int(q.store["good-1"].detector_state["digits"]["always"]["n"]) == 8
    # the decoder remembers the model's shape across the restart
    assert q.ingest_lines([json.dumps({"client": "x", "model": "digits", "input": [1, 2]})]).rejected["wrong_dimension"] == 1


def test_snapshot_from_another_configuration_drops_only_mismatched_detector_state() -> None:
    p = make(detectors={"always": {}, "broken": {}, "confidence": {"window": 50}})
    p.ingest_lines(lines("good-1", 5))
    q = make(detectors={"always": {}, "broken": {}, "confidence": {"window": 80}})
    q.restore(pack(p.snapshot_copy()))
    states = q.store["good-1"].detector_state["digits"]
    assert "always" in states and "confidence" not in states
    q.ingest_lines(lines("good-1", 1))  # the dropped detector starts afresh without error
    assert value(q, "monitaur_detector_errors_total", detector="confidence") == 0


def test_corrupt_snapshot_is_an_error_not_a_crash() -> None:
    with pytest.raises(ValueError):
        make().restore(b"definitely not a snapshot")


def test_detectors_export_per_client_statistics_for_exported_clients() -> None:
    from exporter.detectors.coverage import CoverageDetector
    from exporter.detectors.knn import similar_pairs

    # coverage needs 500 samples: the live baseline's second fit, at 2,048 offers (128 clients x 16)
    detectors = {"stats": {}}
    p = make(plugins={**PLUGINS, "stats": "tests.plugins:Stats"}, detectors=detectors, metrics={"max_client_series": 134})
    x = lines("good-1", 30)
    p.ingest_lines([line for i in range(128) for line in lines(f"warm-{i}", 16, seed=10 + i)])
    assert p.runtimes.get("digits").context.scaling is not None
    p.ingest_lines(x[:10])
    p.ingest_lines(x[10:] + x[:10] + lines("quiet-1", 4, seed=1) + lines("statfail-1", 3, seed=2))
    assert value(p, "monitaur_client_test_events_total", client="good-1", model="digits") == 40
    assert value(p, "monitaur_client_test_ratio", client="good-1", model="digits") == 0.25
    assert value(p, "monitaur_client_test_events_total", client="quiet-1", model="digits") == 4
    assert value(p, "monitaur_client_test_ratio", client="quiet-1", model="digits") is None  # NaN: not exported
    # a detector failing to report leaves out its own values, not the scrape
    assert value(p, "monitaur_client_test_events_total", client="statfail-1", model="digits") is None
    assert value(p, "monitaur_client_queries_total", client="statfail-1", model="digits") == 3
    # the built-in ones: SEAT's similar pairs (knn), coverage and class entropy (coverage)
    state = p.store["good-1"].detector_state["digits"]
    assert value(p, "monitaur_client_similar_pairs_total", client="good-1", model="digits") == similar_pairs(state["knn"]) >= 10
    coverage = next(d for d in p.runtimes.get("digits").detectors if isinstance(d, CoverageDetector))
    assert value(p, "monitaur_client_feature_coverage", client="good-1", model="digits") == coverage.coverage(state["coverage"]) > 0
    assert 0 < value(p, "monitaur_client_class_entropy", client="good-1", model="digits") == coverage.class_entropy(state["coverage"]) <= 1
    # clients under __other__ have no such series
    for i in range(2, 6):
        p.ingest_lines(lines(f"good-{i}", 2, seed=i))
    clients = {s.labels["client"] for f in p.metrics.registry.collect() if f.name == "monitaur_client_test_events" for s in f.samples}
    exported = p.collector.exported  # as of that scrape
    assert clients == exported - {"statfail-1"} and {c.client_id for c in p.store.values()} - exported


@pytest.mark.parametrize("name", ["monitaur_client_score", "monitaur_client_x_total", "monitaur_x", "monitaur_client_Upper", "monitaur_client_dup"])
def test_client_metric_names_are_checked(name: str) -> None:
    from exporter.detectors import ClientMetric
    from exporter.metrics import ClientCollector

    metrics = [ClientMetric(name, "gauge", "x")] + ([ClientMetric(name, "counter", "y")] if name.endswith("dup") else [])
    with pytest.raises(ValueError, match="unique name"):
        ClientCollector(Pipeline(Settings()).store, 10, None, [], client_metrics=metrics)  # type: ignore[arg-type]


# -- a detector that fails leaves its state as before the batch ---------------------------

HALF = {"always": "tests.plugins:FlagClientsNamedBad", "half": "tests.plugins:HalfApplied"}


def _arrays(state: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in state.items()}


def test_a_detector_failing_halfway_leaves_its_state_as_before_the_batch() -> None:
    p = make(plugins=HALF, detectors={"always": {}, "half": {}})
    p.ingest_lines(lines("bad-half-1", 3))  # the first batch succeeds
    states = p.store["bad-half-1"].detector_state["digits"]
    before = _arrays(states["half"])
    assert int(before["n"]) == 3 and "replaced" in before
    result = p.ingest_lines(lines("bad-half-1", 4, seed=1))  # changes everything, then raises
    assert result.accepted == 4
    after = states["half"]
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert value(p, "monitaur_detector_errors_total", detector="half") == 4
    # the other detectors and the verdict went on, on every event of the batch
    assert int(states["always"]["n"]) == 7 and p.store["bad-half-1"].total == 7
    assert p.store["bad-half-1"].suspicious and p.store["bad-half-1"].flags["always"] == 7
    assert p.store["bad-half-1"].scores["half"] == 0.2  # from the first batch: the failed one reported nothing


def test_a_new_clients_state_is_kept_only_when_its_first_batch_succeeds() -> None:
    p = make(plugins=HALF, detectors={"always": {}, "half": {}})
    p.ingest_lines(lines("halffirst-1", 2) + lines("halfweird-1", 2) + lines("ok-1", 2))
    assert "half" not in p.store["halffirst-1"].detector_state["digits"]
    assert "half" not in p.store["halfweird-1"].detector_state["digits"]  # malformed signals are a failure too
    assert int(p.store["ok-1"].detector_state["digits"]["half"]["n"]) == 2
    assert value(p, "monitaur_detector_errors_total", detector="half") == 4
    p.ingest_lines(lines("halfweird-1", 3))
    assert "half" not in p.store["halfweird-1"].detector_state["digits"]
    assert int(p.store["halfweird-1"].detector_state["digits"]["always"]["n"]) == 5
