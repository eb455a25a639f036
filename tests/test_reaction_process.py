"""The decision endpoint as it runs: its own process, fed by the exporter's publisher, restarted if it dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from exporter.app import App
from tests.conftest import parse_metrics, sample, wait_for
from tests.test_reaction import event, settings


@pytest.fixture
def app(tmp_path: Path):
    s = settings(tmp_path, listen={"port": 0}, files={"paths": []},
                 reaction={"enabled": True, "mode": "block", "on_error": "deny", "stale_seconds": 2, "listen": {"port": 0}})
    a = App(s)
    a.start()
    yield a
    a.stop()


def decide(app: App, client: str) -> requests.Response:
    host, port = app.reaction.address
    return requests.get(f"http://{host}:{port}/any/path", headers={"X-Monitaur-Client": client}, timeout=5)


def metrics(app: App) -> dict:
    host, port = app.address
    return parse_metrics(requests.get(f"http://{host}:{port}/metrics", timeout=5).text)


def test_a_flag_blocks_within_a_publish_cycle_and_a_release_unblocks(app: App) -> None:
    assert decide(app, "mallory").status_code == 200
    app.pipeline.ingest_lines([event("mallory", True)])
    flagged = time.monotonic()
    wait_for(lambda: decide(app, "mallory").status_code == 403, timeout=5, what="mallory blocked")
    assert time.monotonic() - flagged < 1.0  # PUBLISH_EVERY (0.1 s) plus a request
    assert decide(app, "alice").status_code == 200
    app.reaction.release(["mallory"], "alice", "false alarm")
    wait_for(lambda: decide(app, "mallory").status_code == 200, timeout=5, what="mallory released")
    app.reaction.block(["carol"], "bob", "by hand")
    wait_for(lambda: decide(app, "carol").status_code == 403, timeout=5, what="carol blocked by hand")
    wait_for(lambda: sample(metrics(app), "monitaur_decisions_total", decision="block") >= 2, timeout=5, what="counts reported")
    assert sample(metrics(app), "monitaur_decision_table_clients") == 1


def test_stale_decisions_follow_on_error_while_the_verdicts_cannot_be_read(app: App) -> None:
    app.pipeline.ingest_lines([event("mallory", True)])
    wait_for(lambda: decide(app, "mallory").status_code == 403, timeout=5, what="mallory blocked")
    with app.pipeline.lock:  # ingestion stuck inside a batch: the publisher cannot confirm the table
        wait_for(lambda: decide(app, "alice").headers["X-Monitaur-Decision"] == "error_deny", timeout=6, what="stale")
        r = decide(app, "alice")
        assert r.status_code == 403 and r.headers["Cache-Control"] == "no-store"
    wait_for(lambda: decide(app, "alice").status_code == 200, timeout=5, what="fresh again")
    wait_for(lambda: (sample(metrics(app), "monitaur_decision_errors_total", reason="stale") or 0) >= 2, timeout=5, what="stale counted")


def test_a_dead_decision_process_is_started_again_and_counts_go_on(app: App) -> None:
    for _ in range(3):
        decide(app, "alice")
    wait_for(lambda: sample(metrics(app), "monitaur_decisions_total", decision="allow") == 3, timeout=5, what="3 allowed")
    old = app.reaction.decisions.proc
    os.kill(old.pid, signal.SIGKILL)
    wait_for(lambda: app.reaction.decisions.proc is not old and decide(app, "alice").status_code == 200, timeout=10, what="restarted")
    wait_for(lambda: sample(metrics(app), "monitaur_decisions_total", decision="allow") == 4, timeout=5, what="counts kept")
    assert app.reaction.decisions.restarts == 1


def test_the_decision_process_ends_with_the_exporter(tmp_path: Path) -> None:
    a = App(settings(tmp_path, listen={"port": 0}, files={"paths": []}, reaction={"enabled": True, "listen": {"port": 0}}))
    a.start()
    proc = a.reaction.decisions.proc
    a.stop()
    assert proc.poll() == 0  # it exited at the end of its input (a kill after the grace period would not be 0)
    assert a.reaction.decisions.sock.fileno() == -1  # the listener is closed


def test_counts_from_the_process_are_read_line_by_line(app: App) -> None:
    d = app.reaction.decisions
    # a report names every decision; unknown names or broken lines are ignored
    from io import BytesIO

    d._read_counts(BytesIO(b'{"decisions": {"allow": 5, "nope": 1}, "errors": {}}\nnot json\n'), d._current)
    assert d.counts()["decisions"]["allow"] == 5 and "nope" not in d.counts()["decisions"]


def test_a_report_of_the_old_process_read_after_a_restart_neither_doubles_nor_lowers_the_counts(app: App) -> None:
    from io import BytesIO

    d = app.reaction.decisions
    d._stop.set()  # the publisher would restart the process itself
    d._thread.join(timeout=10)
    for _ in range(3):
        decide(app, "alice")
    wait_for(lambda: d.counts()["decisions"]["allow"] == 3, timeout=5, what="3 allowed")
    old, old_counts = d.proc, d._current
    os.kill(old.pid, signal.SIGKILL)
    old.wait(timeout=5)
    d._restart()
    d._publish()  # the table, as the (stopped) publisher would send it
    assert d.counts()["decisions"]["allow"] == 3  # the ended process's counts are kept
    d._read_counts(BytesIO(b'{"decisions": {"allow": 3}, "errors": {}}\n'), old_counts)  # its last report, read late
    assert d.counts()["decisions"]["allow"] == 3  # not 6
    decide(app, "alice")
    wait_for(lambda: d.counts()["decisions"]["allow"] == 4, timeout=5, what="the new process's decision counted")
