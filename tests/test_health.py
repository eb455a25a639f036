"""/healthz and the monitaur_ingest_* gauges: each unhealthy condition, from the unit to the running App."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from exporter.app import App
from exporter.config import HealthConfig, Settings
from exporter.health import REASONS, HealthCheck, HealthCollector
from exporter.tailer import Progress
from tests.conftest import wait_for
from tests.test_pipeline import lines


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, progress: tuple = (), failures: dict | None = None, running: bool = True, **cfg: object) -> HealthCheck:
    return HealthCheck(HealthConfig(**cfg), lambda: running, lambda: progress, (lambda: failures) if failures is not None else None, clock)


def reasons(check: HealthCheck) -> list[str]:
    return [p.reason for p in check.check().problems]


def test_healthy_by_default() -> None:
    h = make(Clock(), failures={"state": 0, "offsets": 0})
    assert h.check().ok and h.check().as_json() == {"status": "ok", "problems": []}


def test_consecutive_failed_cycles() -> None:
    h = make(Clock(), max_failed_cycles=3)
    h.cycle(False)
    h.cycle(False)
    assert reasons(h) == []
    h.cycle(False)
    assert reasons(h) == ["ingest_failing"]
    h.cycle(True)  # one good cycle resets the count
    assert reasons(h) == []


def test_a_loop_that_stops_finishing_cycles_or_is_not_running() -> None:
    clock = Clock()
    h = make(clock, stall_seconds=60)
    h.cycle(True)
    clock.t += 59
    assert reasons(h) == []
    clock.t += 2
    assert reasons(h) == ["ingest_stalled"]
    assert reasons(make(clock, running=False)) == ["ingest_stalled"]


def test_a_file_with_unread_bytes_and_no_progress() -> None:
    clock = Clock()
    files = tuple(Progress(f"/logs/{i}.jsonl", 100, 1000.0 + i) for i in range(12))
    h = make(clock, progress=files, stall_seconds=30)
    clock.t += 30.5
    h.cycle(True)  # the loop goes on; the files do not
    [p] = h.check().problems
    assert p.reason == "file_stalled" and p.detail.startswith("/logs/0.jsonl (100 bytes unread for 30s)") and "/logs/1.jsonl" not in p.detail
    clock.t += 20
    h.cycle(True)
    [p] = h.check().problems
    assert "/logs/9.jsonl" in p.detail and p.detail.endswith("and 2 more")  # at most 10 named


def test_checkpoints_that_keep_failing() -> None:
    failures = {"state": 2, "offsets": 0}
    h = make(Clock(), failures=failures, max_failed_checkpoints=3)
    assert reasons(h) == []
    failures["state"] = 3
    [p] = h.check().problems
    assert p.reason == "checkpoint_failing" and "3 state checkpoint writes" in p.detail


def test_gauges_exist_for_every_reason_from_the_start() -> None:
    from prometheus_client import CollectorRegistry

    clock = Clock()
    h = make(clock, max_failed_cycles=1)
    registry = CollectorRegistry()
    registry.register(HealthCollector(h.check))
    assert registry.get_sample_value("monitaur_ingest_healthy") == 1
    assert {r: registry.get_sample_value("monitaur_ingest_problem", {"reason": r}) for r in REASONS} == dict.fromkeys(REASONS, 0.0)
    h.cycle(False)
    assert registry.get_sample_value("monitaur_ingest_healthy") == 0
    assert registry.get_sample_value("monitaur_ingest_problem", {"reason": "ingest_failing"}) == 1


def test_stall_seconds_must_leave_room_for_polls() -> None:
    with pytest.raises(ValueError, match="health.stall_seconds"):
        Settings(files={"poll_interval_seconds": 10}, health={"stall_seconds": 20})


# -- the running App ----------------------------------------------------------------------------
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object) -> App:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir(exist_ok=True)
    cfg: dict = {
        "listen": {"port": 0},
        "files": {"paths": [str(tmp_path / "logs" / "*.jsonl")], "mode": "poll", "poll_interval_seconds": 0.05},
        "state": {"dir": str(tmp_path / "state"), "checkpoint_interval_seconds": 0.1},
        "health": {"stall_seconds": 0.5, "max_failed_checkpoints": 2},
    }
    cfg.update(overrides)
    app = App(Settings(**cfg))
    app.start()
    return app


def healthz(app: App) -> tuple[int, dict]:
    host, port = app.address
    r = requests.get(f"http://{host}:{port}/healthz", timeout=5)
    return r.status_code, r.json()


def test_healthz_names_a_stalled_file_then_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = start(tmp_path, monkeypatch)
    try:
        assert healthz(app)[0] == 200
        assert app.metrics.registry.get_sample_value("monitaur_ingest_healthy") == 1
        log = tmp_path / "logs" / "a.jsonl"
        log.write_text("\n".join(lines("alice", 3)) + "\n")
        wait_for(lambda: app.pipeline.view.tracked() == 1, timeout=10, what="alice read")
        real_pread = os.pread
        monkeypatch.setattr("exporter.tailer.os.pread", lambda fd, n, off: real_pread(fd, n, off) if off == 0 else (_ for _ in ()).throw(OSError(5, "EIO")))
        with open(log, "a") as fh:
            fh.write("\n".join(lines("alice", 2, seed=1)) + "\n")
        code, body = wait_for(lambda: (r := healthz(app))[0] == 503 and r, timeout=10, what="503")
        [problem] = body["problems"]
        assert problem["reason"] == "file_stalled" and str(log) in problem["detail"] and body["status"] == "unhealthy"
        assert app.metrics.registry.get_sample_value("monitaur_ingest_problem", {"reason": "file_stalled"}) == 1
        monkeypatch.setattr("exporter.tailer.os.pread", real_pread)
        wait_for(lambda: healthz(app)[0] == 200, timeout=10, what="healthy again")
    finally:
        app.stop()


def test_healthz_reports_checkpoints_that_keep_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state").write_text("a file where the state directory should be")  # fails even as root
    app = start(tmp_path, monkeypatch)
    try:
        code, body = wait_for(lambda: (r := healthz(app))[0] == 503 and r, timeout=10, what="503")
        assert "checkpoint_failing" in [p["reason"] for p in body["problems"]]
    finally:
        app.stop()


def test_healthz_reports_failing_ingest_cycles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = start(tmp_path, monkeypatch)
    try:
        def broken() -> int:
            raise RuntimeError("a bug")

        monkeypatch.setattr(app.tailer, "poll_once", broken)
        code, body = wait_for(lambda: (r := healthz(app))[0] == 503 and r, timeout=10, what="503")
        assert [p["reason"] for p in body["problems"]] == ["ingest_failing"]
    finally:
        app.stop()
