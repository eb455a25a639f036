"""The sticky verdict: a flag holds until released, lapsed or evicted; evicted flags are remembered.

The test detector ``marked`` (tests.plugins.Marked) scores an event 0.8 when its first
feature is 16 and 0.1 otherwise, against a threshold of 0.4 (ratio 2.0 at a flag); it is
the verdict's only input, so each test decides exactly when the live verdict flags.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from exporter.detectors import enabled_detectors
from exporter.metrics import Metrics
from exporter.pipeline import Pipeline
from exporter.snapshot import pack, unpack
from tests.plugins import marked_event as event
from tests.plugins import marked_settings
from tests.test_pipeline import Clock, value


def make(clock: Clock, latch: bool = False, **kw: object) -> Pipeline:
    kw.setdefault("state", {"dir": None})
    settings = marked_settings(latch, **kw)
    return Pipeline(settings, Metrics(enabled_detectors(settings)), clock=clock)


def send(p: Pipeline, clock: Clock, client: str, *marks: bool, step: float = 1.0) -> None:
    """One event per mark, ``step`` seconds apart (each its own batch, as a live exporter sees them)."""
    for m in marks:
        clock.t += step
        p.ingest_lines([event(client, m)])


def test_a_flag_sticks_while_the_live_verdict_clears_and_the_risk_moves() -> None:
    clock = Clock(1000.0)
    p = make(clock)
    send(p, clock, "mallory", False, False, True)  # flagged at its 3rd query, at t = 1003
    send(p, clock, "mallory", False, False)
    c = p.store["mallory"]
    assert c.suspicious and not c.flagged_now and c.score == pytest.approx(0.125)  # 0.1 / 0.4 / 2
    assert value(p, "monitaur_client_suspicious", client="mallory") == 1
    assert value(p, "monitaur_client_risk", client="mallory") == pytest.approx(0.125)
    assert value(p, "monitaur_client_flagged_timestamp_seconds", client="mallory", model="digits") == 1003.0
    assert value(p, "monitaur_client_last_flagged_timestamp_seconds", client="mallory") == 1003.0
    assert value(p, "monitaur_client_flagged_query", client="mallory") == 3
    assert value(p, "monitaur_client_flag_threshold_ratio", client="mallory", detector="marked") == pytest.approx(2.0)
    assert value(p, "monitaur_client_score", client="mallory", detector="risk") is None  # the risk has its own gauge
    send(p, clock, "mallory", True)  # flagged again at t = 1006: the same flag, later
    assert c.flag is not None and (c.flag.first_at, c.flag.last_at, c.flag.first_query, c.flag.last_query) == (1003.0, 1006.0, 3, 6)
    assert value(p, "monitaur_client_last_flagged_timestamp_seconds", client="mallory") == 1006.0
    # an unflagged client has no flag series
    send(p, clock, "alice", False)
    assert value(p, "monitaur_client_suspicious", client="alice") == 0
    assert value(p, "monitaur_client_flagged_timestamp_seconds", client="alice", model="digits") is None


def test_the_flag_lapses_after_the_hold_without_a_new_flag_and_detection_restarts() -> None:
    clock = Clock(1000.0)
    p = make(clock, latch=True, verdict={"hold_seconds": 100})
    send(p, clock, "mallory", True)  # t = 1001; the latching detector flags every event from now on
    send(p, clock, "mallory", False, step=60)  # t = 1061: still flagged live (latched): the hold restarts
    assert p.store["mallory"].flag.last_at == 1061.0
    clock.t = 1160.0
    p.expire()
    assert p.store["mallory"].suspicious  # 99 s since the last flag
    clock.t = 1165.0
    p.expire()  # sweeps run at most every hold / 10 (10 s here; a minute at most): not yet
    assert p.store["mallory"].suspicious
    clock.t = 1170.0
    p.expire()
    c = p.store["mallory"]
    assert not c.suspicious and c.flag is not None and c.flag.cleared == "hold_expired" and c.flag.cleared_at == 1170.0
    assert value(p, "monitaur_flags_cleared_total", cause="hold_expired") == 1
    assert value(p, "monitaur_client_suspicious", client="mallory") == 0
    assert value(p, "monitaur_client_flagged_timestamp_seconds", client="mallory", model="digits") is None
    assert c.detector_state == {} and c.fusion_state == {}  # restarted: the latch is gone
    send(p, clock, "mallory", False)
    assert not p.store["mallory"].suspicious and p.store["mallory"].first_flagged_query == 1  # the lifetime history stays


def test_a_lapsed_flag_keeps_the_clients_group() -> None:
    """A lapse restarts the client's own detection; its links to other clients are the groups'
    evidence, which expires by the links TTL, not by the verdict's hold. (A lapse used to
    dissolve the group of a key that still explored with the others, and the group formed
    again later under a new id, which paged again.) A release still takes it out."""
    import numpy as np

    from exporter.config import Settings
    from exporter.detectors.base import Block
    from exporter.detectors.fingerprint import client_key
    from exporter.events import Event
    from exporter.groups import links_params

    clock = Clock(1000.0)
    settings = Settings(plugins={"marked": "tests.plugins:Marked"}, detectors={"marked": {}, "links": {"enabled": True}},
                        fusion={"inputs": ["marked"]}, verdict={"hold_seconds": 100}, state={"dir": None})
    p = Pipeline(settings, Metrics(enabled_detectors(settings)), clock=clock)
    send(p, clock, "syb-0", True)  # flagged at t = 1001
    send(p, clock, "syb-1", False, False)
    params = links_params(p.runtimes.get("digits"))
    for child, parent in [("syb-0", "syb-1"), ("syb-1", "syb-0")] * 3:  # links found by the links detector
        clock.t += 1.0
        block = Block("digits", [Event(child, "digits", clock.t, "tabular", vector=np.zeros(64))])
        keys = np.zeros((1, 2), dtype=np.uint64)
        keys[0, 0] = client_key(parent)
        block.prepared["links"] = (np.ones(1, dtype=bool), np.ones(1, dtype=bool), keys)
        p.groups.model("digits", params).observe(block, np.array([True]))
    [gid] = p.group_ids("syb-0")
    clock.t = 1200.0
    p.expire()
    assert p.store["syb-0"].flag.cleared == "hold_expired" and p.store["syb-0"].detector_state == {}
    assert p.group_ids("syb-0") == p.group_ids("syb-1") == [gid]
    assert {m.client for m in p.group_summaries(gid)[0].members} == {"syb-0", "syb-1"}
    send(p, clock, "syb-1", True)
    p.release("syb-1", "oncall", "checked")
    assert p.group_ids("syb-0") == p.group_ids("syb-1") == []


def test_an_inactive_client_lapses_when_it_comes_back_after_the_hold() -> None:
    clock = Clock(1000.0)
    p = make(clock, latch=True, verdict={"hold_seconds": 100})
    send(p, clock, "mallory", True)
    send(p, clock, "mallory", False, step=150)  # no sweep ran: lapsed on arrival, judged afresh
    assert not p.store["mallory"].suspicious and not p.store["mallory"].flagged_now
    assert value(p, "monitaur_flags_cleared_total", cause="hold_expired") == 1


def test_release_clears_the_flag_and_the_same_history_does_not_flag_again() -> None:
    clock = Clock(1000.0)
    p = make(clock, latch=True)
    send(p, clock, "mallory", False, True, False)
    assert p.release("alice", "oncall", "not flagged") is None
    released = p.release("mallory", "oncall@example.com", "known load test\n(ticket 42)")
    assert released is not None and released.first_query == 2 and released.cleared == "released"
    c = p.store["mallory"]
    assert not c.suspicious and c.released is not None and (c.released.who, c.released.at) == ("oncall@example.com", 1003.0)
    assert c.released.flag.open  # the flag as it was when released
    assert value(p, "monitaur_flags_cleared_total", cause="released") == 1
    assert value(p, "monitaur_client_suspicious", client="mallory") == 0
    send(p, clock, "mallory", False, False)  # the latch would flag these, had its state been kept
    assert not p.store["mallory"].suspicious
    send(p, clock, "mallory", True)  # new evidence flags it again, as a new flag
    assert p.store["mallory"].suspicious and p.store["mallory"].flag.first_query == 6
    assert p.release("mallory", "oncall", "again") is not None and p.release("mallory", "oncall", "again") is None


def test_flagged_clients_outlast_unflagged_ones_though_their_live_verdict_cleared() -> None:
    clock = Clock(1000.0)
    p = make(clock, state={"dir": None, "max_clients": 10})
    send(p, clock, "mallory", True, False, False)  # flagged once, clean since: the live verdict is clear
    for i in range(50):
        send(p, clock, f"fresh-{i}", False)
    assert "mallory" in p.store and p.store["mallory"].suspicious
    assert value(p, "monitaur_client_evictions_total", reason="lru") == 41


def test_evicted_flagged_clients_are_remembered_bounded_restored_and_kept_across_restarts() -> None:
    clock = Clock(1000.0)
    p = make(clock, state={"dir": None, "max_clients": 2}, verdict={"max_recently_flagged": 2})
    for name in ("a", "b", "c", "d", "e"):  # every tracked client is flagged: each new one evicts the oldest
        send(p, clock, name, True)
    recent = p.view.recently_flagged()
    assert [r.client_id for r in recent] == ["b", "c"]  # "a" was pushed out of the record (bound 2)
    assert (recent[0].reason, recent[0].flag.model, recent[0].flag.first_at, recent[0].flag.group) == ("lru_flagged", "digits", 1002.0, None)
    assert recent[0].flag.detectors == {"marked": pytest.approx(2.0)}
    assert value(p, "monitaur_recently_flagged_clients") == 2 and value(p, "monitaur_recently_flagged_clients_limit") == 2

    q = make(Clock(clock.t), state={"dir": None, "max_clients": 2}, verdict={"max_recently_flagged": 2})
    q.restore(pack(p.snapshot_copy()))
    assert [(r.client_id, r.flag.first_at, r.evicted_at) for r in q.view.recently_flagged()] == [(r.client_id, r.flag.first_at, r.evicted_at) for r in recent]
    assert value(q, "monitaur_recently_flagged_clients") == 2
    # "b" comes back, clean: it is still flagged, with its first flag's time and evidence; "d" makes room for it
    send(q, q.clock, "b", False)
    b = q.store["b"]
    assert b.suspicious and b.flag.first_at == 1002.0 and [r.client_id for r in q.view.recently_flagged()] == ["c", "d"]
    # "d" (evicted by b's return) is released while evicted: its record goes, and it returns unflagged
    assert q.release("d", "oncall", "false alarm") is not None and "d" not in {r.client_id for r in q.view.recently_flagged()}
    send(q, q.clock, "d", False)
    assert not q.store["d"].suspicious


def test_an_evicted_flag_does_not_come_back_after_the_hold() -> None:
    clock = Clock(1000.0)
    p = make(clock, state={"dir": None, "max_clients": 1}, verdict={"hold_seconds": 100})
    send(p, clock, "a", True)
    send(p, clock, "b", True)  # evicts a
    send(p, clock, "a", False, step=200)
    assert not p.store["a"].suspicious


def test_flags_and_releases_survive_a_restart() -> None:
    clock = Clock(1000.0)
    p = make(clock)
    send(p, clock, "mallory", False, True, False)
    send(p, clock, "eve", True)
    p.release("eve", "oncall", "ok")
    q = make(Clock(clock.t))
    q.restore(pack(p.snapshot_copy()))
    m, e = q.store["mallory"], q.store["eve"]
    assert m.suspicious and m.flag.as_dict() == p.store["mallory"].flag.as_dict() and m.first_flagged_at == 1002.0
    assert not e.suspicious and e.released.reason == "ok" and e.flag.cleared == "released"
    assert value(q, "monitaur_client_flagged_timestamp_seconds", client="mallory", model="digits") == 1002.0
    assert value(q, "monitaur_client_flag_threshold_ratio", client="mallory", detector="marked") == pytest.approx(2.0)


def test_a_version_2_snapshot_is_migrated_and_a_later_version_refused() -> None:
    clock = Clock(1000.0)
    p = make(clock)
    send(p, clock, "mallory", False, True)
    send(p, clock, "alice", False)
    doc = p.snapshot_copy()
    doc["version"] = 2
    del doc["recently_flagged"]
    for c in doc["clients"]:
        for key in ("flag", "released", "flagged_now", "first_flagged_at"):
            del c[key]
    q = make(Clock(clock.t))
    assert q.restore(pack(doc)) == 2
    m = q.store["mallory"]
    assert m.suspicious and (m.flag.first_at, m.flag.first_query, m.flag.model) == (1002.0, 2, "digits")  # dated at its last event
    assert not q.store["alice"].suspicious
    assert m.detector_state["digits"]["marked"] is not None  # version 2 detector state is kept
    doc["version"] = 4
    with pytest.raises(ValueError, match="unsupported state snapshot version 4"):
        make(Clock()).restore(pack(doc))


def test_a_non_finite_ratio_is_kept_as_none_in_snapshots() -> None:
    clock = Clock(1000.0)
    p = make(clock)
    send(p, clock, "mallory", True)
    p.store["mallory"].flag.detectors["marked"] = math.inf  # a threshold of 0
    doc = unpack(pack(p.snapshot_copy()))
    assert doc["clients"][0]["flag"]["detectors"] == {"marked": None}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_the_exposition_with_flags_passes_promtool() -> None:
    clock = Clock(1000.0)
    p = make(clock, metrics={"max_client_series": 1})
    send(p, clock, "mallory", True)
    for i in range(3):
        send(p, clock, f"app-{i}", False)
    text = generate_latest(p.metrics.registry).decode()
    assert 'monitaur_client_risk{client="__other__"}' in text
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_replay_reports_the_flag_and_keeps_it_across_an_eviction(tmp_path) -> None:
    from exporter.replay import replay

    def row(client: str, marked: bool, ts: float) -> str:
        obj = json.loads(event(client, marked))
        obj["ts"] = ts
        return json.dumps(obj)

    # mallory is flagged at its 2nd query (t = 2), evicted by two fresh clients (t = 4, 5; all flagged), and comes back clean
    rows = [row("mallory", False, 1), row("mallory", True, 2), row("mallory", False, 3), row("x", True, 4), row("y", True, 5), row("mallory", False, 6)]
    log = tmp_path / "a.jsonl"
    log.write_text("".join(r + "\n" for r in rows))
    settings = marked_settings(state={"dir": None, "max_clients": 2})
    m = replay(settings, [str(log)], progress=False)["clients"]["mallory"]
    assert (m["queries"], m["flagged"], m["first_flagged_query"], m["flagged_at"], m["last_flagged_at"]) == (4, True, 2, 2.0, 2.0)
    assert m["flag_detectors"] == {"marked": 2.0} and m["flagged_at_end"]  # back within the hold: still flagged
