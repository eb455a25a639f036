"""One hostile event never does lasting damage: the corpus of tests/hostile_corpus.py
through the decoder, a tailed file, push, calibrate and replay, plus the last-resort paths.

For every kind: rejected with its reason (counted in monitaur_events_rejected_total),
its valid neighbours kept, nothing re-processed, no planted log line or input value in
the log, and /metrics (parsed as Prometheus text) and /healthz still answering.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import exporter.server as server_module
from exporter import jsonparse, reasons
from exporter.app import App
from exporter.config import Settings
from exporter.events import Decoder, Rejected
from exporter.logutil import escape, escaping_handler
from exporter.pipeline import Pipeline
from exporter.runtime import ModelAdmission
from exporter.snapshot import pack, unpack
from exporter.state import ClientState
from exporter.verdict import FlagRecord
from tests.conftest import REPO, parse_metrics, sample, wait_for
from tests.hostile_corpus import MARKER, SECRET, SETTINGS, Hostile, corpus
from tests.test_pipeline import lines

CORPUS = corpus()
SECRET_TEXT = str(SECRET)[:6]  # "987654": inputs are never echoed


def test_the_corpus_is_large_and_covers_every_decoding_reason() -> None:
    assert len(CORPUS) >= 100
    covered = {h.reason for h in CORPUS}
    # Reasons that no single decoded line can have: the tailer's, push's and the last resort.
    assert covered == set(reasons.ALL) - {reasons.LINE_TOO_LONG, reasons.BODY_TOO_LARGE, reasons.INTERNAL_ERROR}
    assert all(b"\n" not in h.line and len(h.line) <= 1024 * 1024 for h in CORPUS)


@pytest.mark.parametrize("hostile", CORPUS, ids=[h.kind for h in CORPUS])
def test_the_decoder_rejects_each_kind_with_its_reason(hostile: Hostile) -> None:
    settings = Settings(**SETTINGS)
    d = Decoder(settings, ModelAdmission.for_settings(settings))
    with pytest.raises(Rejected) as err:
        d.decode_line(hostile.line, None, time.time())  # as live ingestion decodes: with the exporter's clock
    assert err.value.reason == hostile.reason
    assert "FORGED" not in err.value.message and SECRET_TEXT not in err.value.message
    assert d.learned() == {"input_dims": {}, "num_classes": {}, "modalities": {}}  # nothing learned from it


# -- through a tailed file, with the real App ------------------------------------------------


def _app_settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(
        **SETTINGS,
        listen={"host": "127.0.0.1", "port": 0},
        files={"paths": [str(tmp_path / "logs" / "*.jsonl")], "mode": "poll", "poll_interval_seconds": 0.02},
        state={"dir": str(tmp_path / "state"), "checkpoint_interval_seconds": 0.3},
        **kw,
    )


def _base(app: App) -> str:
    host, port = app.address
    return f"http://{host}:{port}"


def _scrape(base: str) -> dict:
    """GET /metrics, parsed as Prometheus text (as Prometheus would), and /healthz; both must answer."""
    r = requests.get(base + "/metrics", timeout=10)
    assert r.status_code == 200
    families = list(text_string_to_metric_families(r.text))
    assert any(f.name == "monitaur_events_rejected" for f in families)
    h = requests.get(base + "/healthz", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    return parse_metrics(r.text)


def _rejected(app: App) -> dict[str, float]:
    reg = app.metrics.registry
    return {reason: reg.get_sample_value("monitaur_events_rejected_total", {"reason": reason}) or 0.0 for reason in reasons.ALL}


def _accepted(app: App) -> float:
    return app.metrics.registry.get_sample_value("monitaur_events_total", {"model": "digits"}) or 0.0


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_the_corpus_through_a_tailed_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One hostile line at a time between valid lines of a control client, and blank lines.

    After each: exact counts (the line was rejected once, its neighbours accepted once,
    nothing before it re-read), and /metrics and /healthz answer. After a restart from
    the checkpoint: nothing is read again and tailing goes on.
    """
    caplog.set_level(logging.INFO)
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "events.jsonl"
    good = [line.encode() for line in lines("control", len(CORPUS) + 2)]
    app = App(_app_settings(tmp_path))
    app.start()
    try:
        base = _base(app)
        _append(log, good[0] + b"\n")
        wait_for(lambda: _accepted(app) == 1, what="the first valid line")
        for i, hostile in enumerate(CORPUS, start=1):
            _append(log, hostile.line + b"\n \r\n\n" + good[i] + b"\n")  # blank lines are skipped, never counted
            wait_for(lambda: _accepted(app) == i + 1 and sum(_rejected(app).values()) == i, what=f"{hostile.kind} rejected, its neighbour accepted")
            assert _rejected(app)[hostile.reason] == Counter(h.reason for h in CORPUS[:i])[hostile.reason], hostile.kind
            _scrape(base)
        m = _scrape(base)
        expected = Counter(h.reason for h in CORPUS)
        for reason in reasons.ALL:
            assert sample(m, "monitaur_events_rejected_total", reason=reason) == expected.get(reason, 0), reason
        assert sample(m, "monitaur_client_queries_total", client="control", model="digits") == len(CORPUS) + 1
        assert sample(m, "monitaur_file_lines_total", path=str(log)) == 2 * len(CORPUS) + 1
        assert app.pipeline.store["control"].total == len(CORPUS) + 1
        assert {c.client_id for c in app.pipeline.store.values()} == {"control"}  # no hostile line created a client
    finally:
        app.stop()
    # A restart resumes after the last line: nothing is re-read, and tailing goes on.
    again = App(_app_settings(tmp_path))
    again.start()
    try:
        _append(log, CORPUS[0].line + b"\n" + good[-1] + b"\n")
        wait_for(lambda: _accepted(again) == 1, what="the line after the restart")
        assert sum(_rejected(again).values()) == 1 and again.pipeline.store["control"].total == len(CORPUS) + 2
        _scrape(_base(again))
    finally:
        again.stop()
    assert "FORGED" not in caplog.text and SECRET_TEXT not in caplog.text
    assert "rejected event: invalid_client" in caplog.text  # rejections are logged, without their content


# -- through push, against the real CLI ------------------------------------------------------


def test_the_corpus_through_push_to_the_cli(tmp_path: Path, exporter_factory) -> None:
    """Each kind in a JSON-lines body between two valid events, then in a JSON array where it is JSON.

    The exporter runs as ``monitaur-exporter run``, so its log is what the CLI's handler
    writes: a files path with a newline (logged at start) shows that the CLI escapes it.
    """
    forged_path = "\n2031-01-01 00:00:00,000 ERROR monitaur.app: PATH-FORGED"
    p = exporter_factory(
        {**SETTINGS, "files": {"paths": [str(tmp_path / "none" / "*.jsonl"), forged_path], "mode": "poll"}, "state": {"dir": None}}
    ).start()
    url = p.url + "/api/v1/events"
    good = iter(line.encode() for line in lines("control", 4 * len(CORPUS)))
    expected: Counter[str] = Counter()
    accepted = 0
    for hostile in CORPUS:
        body = next(good) + b"\n" + hostile.line + b"\n  \n" + next(good) + b"\n"
        r = requests.post(url, data=body, timeout=30)
        assert r.status_code == 202, hostile.kind
        assert r.json() == {"accepted": 2, "rejected": 1, "rejected_reasons": {hostile.reason: 1}}, hostile.kind
        expected[hostile.reason] += 1
        accepted += 2
        try:
            jsonparse.loads(hostile.line)
        except ValueError:
            continue  # not JSON: only a JSON-lines body can carry it
        r = requests.post(url, data=b"[" + next(good) + b"," + hostile.line + b"," + next(good) + b"]", timeout=30)
        assert r.status_code == 202 and r.json()["rejected_reasons"] == {hostile.reason: 1}, hostile.kind
        expected[hostile.reason] += 1
        accepted += 2
    m = _scrape(p.url)
    for reason in reasons.ALL:
        assert sample(m, "monitaur_events_rejected_total", reason=reason) == expected.get(reason, 0), reason
    assert sample(m, "monitaur_events_total", model="digits") == accepted
    assert sample(m, "monitaur_client_queries_total", client="control", model="digits") == accepted
    assert p.stop() == 0
    text = p.log_text()
    assert "FORGED" in text  # the forged path was logged, escaped on its line:
    assert "\\n2031-01-01 00:00:00,000 ERROR monitaur.app: PATH-FORGED" in text
    assert not any(line.startswith("2031-") for line in text.splitlines())
    assert MARKER not in text and SECRET_TEXT not in text


# -- through calibrate and replay, as real processes -----------------------------------------


def test_the_corpus_through_calibrate_and_replay(tmp_path: Path) -> None:
    """A log with every kind between valid lines of control clients, as an operator would
    calibrate on it and replay it: each kind rejected with its reason (the summary's and the
    report's counts), every valid line judged, and the same report as from the valid lines
    alone; nothing a client planted reaches stderr. (A far-future timestamp is rejected here
    too: sorted last, it would expire what is kept by event time before the report.)"""
    good = [line.encode() for line in lines("control-a", len(CORPUS) + 1)] + [line.encode() for line in lines("control-b", 40, seed=1)]
    clean, hostile = tmp_path / "clean.jsonl", tmp_path / "hostile.jsonl"
    clean.write_bytes(b"".join(g + b"\n" for g in good))
    hostile.write_bytes(b"".join(g + b"\n" + (CORPUS[i].line + b"\n" if i < len(CORPUS) else b"") for i, g in enumerate(good)))
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({**SETTINGS, "state": {"dir": None}, "files": {"paths": []}}))
    expected = dict(Counter(h.reason for h in CORPUS))

    def cli(*args: str) -> tuple[dict, str]:
        run = subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout), run.stderr

    summary, err = cli("calibrate", "--config", str(config), "--out", str(tmp_path / "profile.bin"), str(hostile))
    assert summary["events"] == {"accepted": len(good), "rejected": expected}
    assert "FORGED" not in err and SECRET_TEXT not in err
    profile = str(tmp_path / "profile.bin")
    report, err = cli("replay", "--config", str(config), "--profile", profile, str(hostile))
    assert report["events"] == {"accepted": len(good), "rejected": dict(sorted(expected.items()))}
    assert "FORGED" not in err and SECRET_TEXT not in err
    plain, _ = cli("replay", "--config", str(config), "--profile", profile, str(clean))
    assert set(report["clients"]) == {"control-a", "control-b"}  # no hostile line made a client
    assert report["clients"] == plain["clients"] and report["groups"] == plain["groups"]


# -- the last resort: an exception nobody foresaw ----------------------------------------------


def test_an_unforeseen_decoding_failure_rejects_its_event_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "events.jsonl"
    app = App(_app_settings(tmp_path))
    real = app.pipeline.decoder.decode_line

    def flaky(line: bytes | str, now: float | None = None, clock: float | None = None):
        if b"BOOM" in (line if isinstance(line, bytes) else line.encode()):
            raise ZeroDivisionError(f"BOOM\n{MARKER}")
        return real(line, now, clock)

    app.pipeline.decoder.decode_line = flaky  # type: ignore[method-assign]
    app.start()
    try:
        good = [line.encode() for line in lines("control", 6)]
        boom = b'{"client": "BOOM", "input": [1]}'
        _append(log, good[0] + b"\n" + boom + b"\n" + good[1] + b"\n")
        wait_for(lambda: _accepted(app) == 2, what="the neighbours of the failing line")
        _append(log, good[2] + b"\n")  # the next poll goes on, and nothing is re-read
        wait_for(lambda: _accepted(app) == 3, what="the line after")
        r = requests.post(_base(app) + "/api/v1/events", data=b"\n".join([good[3], boom, good[4]]), timeout=10)
        assert r.status_code == 202 and r.json() == {"accepted": 2, "rejected": 1, "rejected_reasons": {"internal_error": 1}}
        assert _accepted(app) == 5 and _rejected(app)[reasons.INTERNAL_ERROR] == 2
        _scrape(_base(app))
    finally:
        app.stop()
    assert "rejected event: internal_error: decoding raised ZeroDivisionError" in caplog.text
    assert "FORGED" not in caplog.text


def test_push_answers_even_when_processing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = App(_app_settings(tmp_path))
    app.start()
    try:
        base = _base(app)
        monkeypatch.setattr(app.pipeline, "process", lambda events, now=None: 1 / 0)
        r = requests.post(base + "/api/v1/events", data=lines("control", 1)[0], timeout=10)
        assert r.status_code == 500 and "error" in r.json()
        monkeypatch.setattr(server_module, "generate_latest", lambda registry: "\ud800".encode())
        r = requests.get(base + "/metrics", timeout=10)
        assert r.status_code == 500 and "error" in r.json()
        assert requests.get(base + "/healthz", timeout=10).status_code == 200
        m = parse_metrics(generate_latest(app.metrics.registry).decode())
        assert sample(m, "monitaur_push_requests_total", code="500") == 1
    finally:
        app.stop()


# -- names that cannot be exported: snapshot restore and the collector ------------------------


def test_a_snapshot_with_unexportable_names_is_restored_without_them(caplog: pytest.LogCaptureFixture) -> None:
    """An older version accepted "\\ud800x" as a client id; from then on every scrape failed, even after a restart."""
    settings = Settings(**SETTINGS, state={"dir": None})
    p = Pipeline(settings)
    p.ingest_lines(lines("alice", 3) + lines("bob", 2))
    doc = unpack(pack(p.snapshot_copy()))
    alice, bob = sorted(doc["clients"], key=lambda c: c["id"])
    # Forge what the old decoder let through: unexportable client ids, and a model name.
    doc["clients"] += [dict(alice, id="\ud800x"), dict(alice, id=f"x\n{MARKER}")]
    bob["queries"]["m\ud800"] = 5
    doc["models"]["m\ud800"] = doc["models"]["digits"]
    doc["decoder"]["modalities"]["m\ud800"] = "tabular"
    caplog.set_level(logging.WARNING)
    q = Pipeline(settings)
    assert q.restore(pack(doc)) == 2
    assert {c.client_id for c in q.store.values()} == {"alice", "bob"} and "m\ud800" not in q.runtimes
    assert q.store["bob"].queries == {"digits": 2}
    assert "dropped 3 clients or models" in caplog.text
    text = generate_latest(q.metrics.registry).decode()  # a scrape works
    assert 'client="alice"' in text and "\ud800" not in text


def test_the_collector_never_exports_an_unexportable_label() -> None:
    """Defense in depth: a name that reached the store anyway is left out of the scrape, which still works."""
    p = Pipeline(Settings(**SETTINGS, state={"dir": None}))
    p.ingest_lines(lines("alice", 2))
    for client_id in ("\ud800x", f"x\n{MARKER}"):
        c = ClientState(client_id=client_id, last_seen=p.clock(), total=1)
        c.queries = {"digits": 1, "m\udc00": 1}
        c.flag = FlagRecord(p.clock(), p.clock(), 1, 1, "digits")  # flagged clients always get their own series
        p.store.put(c)
    p.store["alice"].queries["m\udc00"] = 1
    text = generate_latest(p.metrics.registry).decode()
    assert 'client="alice",model="digits"' in text
    assert "\\ud800" not in text and "FORGED" not in text and "m\\udc00" not in text
    list(text_string_to_metric_families(text))


# -- blank lines: the same rule in files and push ------------------------------------------------


def test_blank_lines_are_skipped_in_push_as_in_files(tmp_path: Path) -> None:
    app = App(_app_settings(tmp_path))
    app.start()
    try:
        body = b"\r\n".join([b"", *[line.encode() for line in lines("control", 2)], b"   ", b"\t", b"\r", b""])
        r = requests.post(_base(app) + "/api/v1/events", data=body, timeout=10)
        assert r.status_code == 202 and r.json() == {"accepted": 2, "rejected": 0, "rejected_reasons": {}}
        r = requests.post(_base(app) + "/api/v1/events", data=b" \r\n\t\n", timeout=10)
        assert r.status_code == 400 and "empty" in r.json()["error"]  # a body with no line at all
    finally:
        app.stop()


# -- log escaping ---------------------------------------------------------------------------------


def _logger(name: str, *handlers: logging.Handler) -> logging.Logger:
    lg = logging.getLogger(f"monitaur.test.{name}")
    lg.handlers[:] = list(handlers)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    return lg


def _assert_no_forged_line(text: str) -> None:
    for line in text.splitlines():
        assert not line.startswith("2031-"), text


def test_every_record_is_escaped_by_the_cli_handler() -> None:
    out = io.StringIO()
    lg = _logger("escape", escaping_handler(out))
    lg.warning("client %s flagged", f"x\n{MARKER}\u2028{MARKER}\r{MARKER}\x1b[2J\ud800\x85")
    lg.info(f"an f-string call site that forgot escaping: x\n{MARKER}")
    try:
        raise ValueError(f"bad value\n{MARKER}")
    except ValueError:
        lg.exception("failed on %s", f"y\n{MARKER}")
    lg.info("%s %s", "one argument for two")  # a broken call site still logs, and escaped
    text = out.getvalue()
    _assert_no_forged_line(text)
    assert len([line for line in text.splitlines() if not line.startswith(" ")]) == 4  # one line per record, tracebacks indented
    assert "client x\\n2031-01-01 00:00:00,000 ERROR monitaur.app: FORGED\\u2028" in text and "\\x1b[2J\\ud800\\x85 flagged" in text
    assert "    ValueError: bad value\n    2031-01-01" in text
    text.encode("utf-8")  # no lone surrogate reaches the stream


def test_escaping_is_done_once_with_several_handlers() -> None:
    outs = [io.StringIO(), io.StringIO()]
    lg = _logger("twice", *(escaping_handler(out) for out in outs))
    try:
        raise KeyError("k")
    except KeyError:
        lg.exception("x\ny")
    for out in outs:
        text = out.getvalue()
        assert "monitaur.test.twice: x\\ny\n    Traceback (most recent call last):\n      File " in text  # indented once
        assert "x\\\\ny" not in text and "\n        Traceback" not in text


@pytest.mark.parametrize(
    "text, escaped",
    [("plain text: é, 客户, 🙂", "plain text: é, 客户, 🙂"), ("a\nb", "a\\nb"), ("\x00\x7f\x85", "\\x00\\x7f\\x85"), ("\u2028\u202e\ud800", "\\u2028\\u202e\\ud800")],
)
def test_escape(text: str, escaped: str) -> None:
    assert escape(text) == escaped
