"""The bounded timeline recorder behind ``replay --html`` (exporter/timelines.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.config import Settings
from exporter.demo import example_log
from exporter.detectors import Batch, Signals
from exporter.events import Event
from exporter.fusion import FUSION
from exporter.replay import replay
from exporter.timelines import Timeline, TimelineRecorder


def _batch(client: str, start: int, n: int, model: str = "m") -> Batch:
    events = [Event(client=client, model=model, ts=1000.0 + start + i, modality="tabular", vector=np.zeros(2)) for i in range(n)]
    return Batch(client, model, events)


def feed(rec: TimelineRecorder, client: str, total: int, cuts: list[int], alarm_at: int | None = None, cross_at: int | None = None) -> None:
    """``total`` events of one client, cut into batches of the sizes in ``cuts`` (cycled);
    detector ``a``'s value is the event's local index / total, ``b`` judges nothing on even
    events; the fusion flags from local index ``alarm_at``, ``a`` from ``cross_at``."""
    done, i = 0, 0
    while done < total:
        n = min(cuts[i % len(cuts)], total - done)
        idx = np.arange(done, done + n)
        batch = _batch(client, done, n)
        a = idx / total
        rec(batch, "a", Signals(a, idx >= cross_at if cross_at is not None else np.zeros(n, bool)))
        rec(batch, "b", Signals(np.where(idx % 2 == 0, np.nan, 0.25), np.zeros(n, bool)))
        rec(batch, FUSION, Signals(a / 2, idx >= alarm_at if alarm_at is not None else np.zeros(n, bool)))
        done += n
        i += 1


def only(rec: TimelineRecorder, client: str) -> Timeline:
    (tl,) = rec.timelines([client])[client]
    return tl


def test_every_point_is_kept_below_the_cap() -> None:
    rec = TimelineRecorder(per_client=64)
    feed(rec, "c", 50, [7])
    tl = only(rec, "c")
    assert tl.query.tolist() == list(range(1, 51))
    assert tl.detectors == ("a", "b")
    assert np.allclose(tl.values[:, 0], np.arange(50) / 50)
    assert np.isnan(tl.values[0::2, 1]).all() and (tl.values[1::2, 1] == 0.25).all()
    assert np.allclose(tl.ts, 1000.0 + np.arange(50))
    assert tl.alarm is None and tl.crossings == {}


def test_a_long_series_is_thinned_evenly_and_keeps_first_last_and_first_flags() -> None:
    rec = TimelineRecorder(per_client=64)
    feed(rec, "c", 10_000, [1, 333, 4096, 5], alarm_at=4321, cross_at=777)
    tl = only(rec, "c")
    assert 32 <= tl.query.size - 3 <= 64  # kept points, plus alarm, crossing and last
    assert tl.query[0] == 1 and tl.query[-1] == 10_000
    assert tl.alarm == 4322 and tl.crossings == {"a": 778}
    assert 4322 in tl.query and 778 in tl.query  # the exact points, whatever the stride
    regular = np.setdiff1d(tl.query, [4322, 778, 10_000]) - 1
    stride = np.diff(regular)
    assert (stride == stride[0]).all() and stride[0] & (stride[0] - 1) == 0  # one power-of-two stride
    assert np.all(np.diff(tl.query) > 0)
    assert rec.points <= 64


def test_the_kept_points_do_not_depend_on_how_events_are_batched() -> None:
    one, many = TimelineRecorder(per_client=50), TimelineRecorder(per_client=50)
    feed(one, "c", 3_000, [3_000], alarm_at=1_000, cross_at=10)
    feed(many, "c", 3_000, [1, 2, 17, 250], alarm_at=1_000, cross_at=10)
    a, b = only(one, "c"), only(many, "c")
    assert a.query.tolist() == b.query.tolist()
    assert np.array_equal(a.values, b.values, equal_nan=True)
    assert (a.alarm, dict(a.crossings)) == (b.alarm, dict(b.crossings))


def test_the_total_is_bounded_quiet_series_giving_way_first() -> None:
    rec = TimelineRecorder(per_client=128, max_points=2_000, floor=16)
    feed(rec, "attacker", 5_000, [100], alarm_at=50)
    for c in range(40):
        feed(rec, f"quiet-{c}", 1_000, [100])
    assert rec.points <= 2_000
    assert rec.cap_quiet < 128 and rec.cap_flagged == 128
    assert only(rec, "attacker").query.size >= 64
    assert all(only(rec, f"quiet-{c}").query.size <= rec.cap_quiet + 1 for c in range(40))


def test_past_every_floor_the_oldest_quiet_series_are_dropped() -> None:
    rec = TimelineRecorder(per_client=32, max_points=400, floor=16)
    feed(rec, "attacker", 500, [50], alarm_at=10)
    for c in range(60):
        feed(rec, f"quiet-{c}", 100, [50])
    assert rec.points <= 400 and rec.dropped_series > 0
    kept = rec.timelines()
    assert "attacker" in kept and "quiet-59" in kept and "quiet-0" not in kept


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        TimelineRecorder(per_client=8, max_points=4)


def test_replay_timelines_agree_with_the_report(tmp_path: Path) -> None:
    """Query indexes are the report's: the alarm is the report's first flag, each crossing a
    detector's; also when clients are evicted and come back (indexes continue)."""
    log = tmp_path / "demo.jsonl"
    log.write_text("".join(line + "\n" for line in example_log()))
    for settings in (Settings(), Settings(state={"max_clients": 4, "dir": None})):
        rec = TimelineRecorder()
        report = replay(settings, [str(log)], progress=False, observer=rec, at_end=rec.finish)
        flagged = {c: v for c, v in report["clients"].items() if v["flagged"]}
        assert set(flagged) == {"scraper-boundary", "scraper-repeat", "scraper-search"}
        series = rec.timelines()
        assert set(series) == set(report["clients"])
        for client, entry in flagged.items():
            (tl,) = series[client]
            assert tl.alarm == entry["first_flagged_query"]
            assert dict(tl.crossings) == {n: d["first_flagged_query"] for n, d in entry["detectors"].items() if d["flagged"]}
            assert tl.query[-1] == entry["queries"]
        assert rec.models["digits"]["thresholds"]["confidence"] == pytest.approx(0.5)
        assert "fingerprint" not in rec.models["digits"]["verdict_inputs"]
