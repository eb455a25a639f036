"""Replay: the forensic report, event-time order across files, and progress output."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from exporter.config import Settings
from exporter.detectors import enabled_detectors
from exporter.demo import example_log
from exporter.replay import replay
from tests.conftest import REPO


def write(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(r + "\n" for r in rows))
    return path


def test_report_on_the_example_log(tmp_path: Path) -> None:
    rows = list(example_log())
    # blank and whitespace-only lines are skipped, not rejected
    log = write(tmp_path / "a.jsonl", rows[:5] + ["", "  \t", "\r"] + rows[5:] + ["{bad", '{"input": [1]}', " "])
    run = subprocess.run([sys.executable, "-m", "exporter", "replay", str(log)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["events"] == {"accepted": 1440, "rejected": {"malformed_json": 1, "missing_client": 1}}
    clients = report["clients"]
    assert {c for c, v in clients.items() if v["flagged"]} == {"scraper-boundary", "scraper-repeat", "scraper-search"}
    rep = clients["scraper-repeat"]
    assert rep["queries"] == 60 and rep["detectors"]["repetition"]["flagged"]
    assert rep["first_flagged_query"] == rep["detectors"]["repetition"]["first_flagged_query"]
    assert 1 <= rep["first_flagged_query"] <= 60 and 0.0 <= rep["score"] <= 1.0
    assert clients["app-00"]["first_flagged_query"] is None
    assert set(rep["detectors"]) == set(enabled_detectors(Settings()))
    assert "risk" not in rep["detectors"]  # the verdict is the top-level flag and score, not a detector


def test_events_are_replayed_in_timestamp_order_across_files(tmp_path: Path) -> None:
    rows = [json.loads(r) for r in example_log() if '"scraper-repeat"' in r]
    # split one client's stream over two files, out of order
    a = write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows[1::2]])
    b = write(tmp_path / "b.jsonl", [json.dumps(r) for r in rows[0::2]])
    together = replay(Settings(), [str(a), str(b)], progress=False)
    single = replay(Settings(), [str(write(tmp_path / "c.jsonl", [json.dumps(r) for r in rows]))], progress=False)
    assert together["clients"] == single["clients"]


def test_evicted_clients_stay_in_the_report(tmp_path: Path) -> None:
    log = write(tmp_path / "a.jsonl", list(example_log()))
    report = replay(Settings(state={"max_clients": 2, "dir": None}), [str(log)], progress=False)
    assert len(report["clients"]) == 23
    assert sum(c["queries"] for c in report["clients"].values()) == 1440


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    log = write(tmp_path / "a.jsonl", list(example_log()))
    err = io.StringIO()
    replay(Settings(), [str(log)], progress_stream=err, progress=True)
    assert "events/s" in err.getvalue() and "100.0%" in err.getvalue()


def test_missing_log_is_a_usage_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "exporter", "replay", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "no such log file" in run.stderr


def test_reading_and_detection_pause_the_cyclic_gc_and_restore_it(tmp_path: Path, monkeypatch) -> None:
    import gc
    from collections import Counter

    from exporter.pipeline import Pipeline
    from exporter.replay import Progress, read_events, run_blocks

    log = write(tmp_path / "a.jsonl", list(example_log())[:20] + ["{bad"])
    pipeline = Pipeline(Settings())
    decode, seen = pipeline.decoder.decode_line, []

    def spy(line, now=None, clock=None):
        seen.append(gc.isenabled())
        return decode(line, now, clock)

    monkeypatch.setattr(pipeline.decoder, "decode_line", spy)
    assert gc.isenabled()
    events = read_events([log], pipeline, 1 << 20, Progress(io.StringIO(), False), Counter())
    assert len(events) == 20 and len(seen) == 21 and not any(seen)
    assert gc.isenabled()
    process, seen = pipeline.process, []

    def spy_process(block, now=None):
        seen.append(gc.isenabled())
        return process(block, now)

    monkeypatch.setattr(pipeline, "process", spy_process)
    run_blocks(pipeline, events, Progress(io.StringIO(), False))
    assert seen == [False] and gc.isenabled() and sum(c.total for c in pipeline.store.values()) == 20
    gc.disable()  # a caller that had it off keeps it off
    try:
        read_events([log], pipeline, 1 << 20, Progress(io.StringIO(), False), Counter())
        assert not gc.isenabled()
    finally:
        gc.enable()
