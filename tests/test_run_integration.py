"""End to end: `monitaur-exporter run` as a subprocess, real files, rotation, restart, push, scrape.

Every count asserted here is exact: a lost or repeated line fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import ExporterProcess, sample, wait_for
from tests.test_pipeline import lines


def append(path: Path, rows: list[str]) -> None:
    with open(path, "a") as fh:
        fh.write("".join(r + "\n" for r in rows))


def config(tmp_path: Path) -> dict:
    return {
        "files": {"paths": [str(tmp_path / "logs" / "*.jsonl")], "mode": "poll", "poll_interval_seconds": 0.05},
        "state": {"dir": str(tmp_path / "state"), "checkpoint_interval_seconds": 0.5},
        "push": {"tokens": ["t0k"]},
        "log_level": "info",
    }


def events_total(p: ExporterProcess) -> float:
    return sample(p.metrics(), "monitaur_events_total", model="digits") or 0.0


def test_tail_rotate_restart_push(tmp_path: Path, exporter_factory) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.jsonl"
    p = exporter_factory(config(tmp_path)).start()

    # 1. appends, with bad lines among the good ones
    append(app, lines("alice", 10)[:5] + ["{not json", '{"input": [1, 2]}'] + lines("alice", 10)[5:])
    wait_for(lambda: events_total(p) == 10, what="10 events")
    m = p.metrics()
    assert sample(m, "monitaur_events_rejected_total", reason="malformed_json") == 1
    assert sample(m, "monitaur_events_rejected_total", reason="missing_client") == 1
    assert sample(m, "monitaur_file_lines_total", path=str(app)) == 12

    # 2. rename-and-create rotation, with late writes to the renamed file
    rotated = logs / "app.jsonl.1"
    append(app, lines("bob", 5))
    os.rename(app, rotated)
    append(rotated, lines("bob", 3, seed=1))  # written by the app before it reopened its log
    append(app, lines("carol", 4))
    wait_for(lambda: events_total(p) == 22, what="22 events after rotation")
    assert sample(p.metrics(), "monitaur_file_rotations_total", path=str(app)) == 1

    # 3. copytruncate rotation
    shutil.copy(app, logs / "app.jsonl.2")
    with open(app, "r+") as fh:
        fh.truncate(0)
    wait_for(lambda: sample(p.metrics(), "monitaur_file_truncations_total", path=str(app)) == 1, what="truncation noticed")
    append(app, lines("dave", 2))
    wait_for(lambda: events_total(p) == 24, what="24 events after copytruncate")

    # 4. push: good and bad bodies
    url = p.url + "/api/v1/events"
    r = requests.post(url, data="\n".join(lines("erin", 3) + ['{"client": "erin", "input": [1, NaN]}']), headers={"Authorization": "Bearer t0k"}, timeout=5)
    assert r.status_code == 202 and r.json()["accepted"] == 3 and r.json()["rejected_reasons"] == {"non_finite": 1}
    assert requests.post(url, data=lines("erin", 1)[0], timeout=5).status_code == 401
    assert requests.post(url, data="[{", headers={"Authorization": "Bearer t0k"}, timeout=5).status_code == 400
    m = p.metrics()
    assert sample(m, "monitaur_events_total", model="digits") == 27
    assert sample(m, "monitaur_events_rejected_total", reason="non_finite") == 1
    assert sample(m, "monitaur_events_rejected_total", reason="malformed_json") == 2
    assert sample(m, "monitaur_push_requests_total", code="202") == 1
    assert sample(m, "monitaur_push_requests_total", code="401") == 1
    assert sample(m, "monitaur_push_requests_total", code="400") == 1
    assert sample(m, "monitaur_client_queries_total", client="bob", model="digits") == 8

    # 5. clean restart: nothing re-read, nothing lost, no clean slate
    assert p.stop(signal.SIGTERM) == 0
    append(app, lines("alice", 2, seed=5))  # written while the exporter was down
    q = exporter_factory(config(tmp_path)).start()
    append(app, lines("alice", 1, seed=6))
    wait_for(lambda: events_total(q) == 3, what="only the 3 new events after restart")
    m = q.metrics()
    # State is restored (5 clients, no clean slate); per-client counters count from this
    # process's start, as every counter does after a restart (rate() reads it as a reset).
    assert sample(m, "monitaur_tracked_clients") == 5
    assert sample(m, "monitaur_client_queries_total", client="alice", model="digits") == 3
    assert sample(m, "monitaur_client_queries_total", client="erin", model="digits") == 0
    assert sample(m, "monitaur_file_lines_total", path=str(app)) == 3
    assert sample(m, "monitaur_file_rotations_total", path=str(app)) == 0
    assert "Traceback" not in p.log_text()
    assert q.stop() == 0


def test_attacker_flagged_and_scrape_passes_promtool(tmp_path: Path, exporter_factory) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    p = exporter_factory(config(tmp_path)).start()
    from exporter.demo import example_log

    append(logs / "demo.jsonl", list(example_log()))
    wait_for(lambda: sample(p.metrics(), "monitaur_client_suspicious", client="scraper-repeat") == 1, what="repeat flood flagged")
    m = p.metrics()
    benign = [c for (name, labels), v in m.items() if name == "monitaur_client_suspicious" for k, c in labels if k == "client" and c.startswith("app-")]
    assert benign and all(sample(m, "monitaur_client_suspicious", client=c) == 0 for c in benign)
    assert "client scraper-repeat flagged by" in p.log_text()
    text = p.scrape_text()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (Debian package 'prometheus'); .ci/run installs it")
    run = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # the detectors' per-client statistics are part of that exposition
    assert sample(m, "monitaur_client_similar_pairs_total", client="scraper-repeat", model="digits") > 0  # exact repeats pair up
    assert {name for name, _ in m} >= {"monitaur_client_feature_coverage", "monitaur_client_class_entropy"}
    # raw model inputs never reach the log
    first_input = json.loads(next(iter(example_log())))["input"]
    assert json.dumps(first_input) not in p.log_text()
