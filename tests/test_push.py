"""HTTP push and the other endpoints, against a real server on a loopback port."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import requests

from exporter.app import App
from exporter.config import Settings
from tests.conftest import parse_metrics, sample
from tests.test_pipeline import lines

URL = "/api/v1/events"


@pytest.fixture
def app(tmp_path: Path):
    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0},
        files={"paths": [str(tmp_path / "none-*.jsonl")], "mode": "poll"},
        state={"dir": str(tmp_path / "state")},
        push={"tokens": ["tok-1", "tok-2"], "max_body_bytes": 4096},
    )
    a = App(settings)
    a.start()
    yield a
    a.stop()


def base(app: App) -> str:
    host, port = app.address
    return f"http://{host}:{port}"


AUTH = {"Authorization": "Bearer tok-2"}


def test_push_json_lines_and_array(app: App) -> None:
    body = "\n".join(lines("k1", 3)) + "\n{oops\n"
    r = requests.post(base(app) + URL, data=body, headers=AUTH, timeout=5)
    assert r.status_code == 202
    assert r.json() == {"accepted": 3, "rejected": 1, "rejected_reasons": {"malformed_json": 1}}
    arr = "[" + ",".join(lines("k2", 2)) + ',{"client": "k2"}]'
    r = requests.post(base(app) + URL, data=arr, headers=AUTH, timeout=5)
    assert r.status_code == 202 and r.json()["accepted"] == 2 and r.json()["rejected_reasons"] == {"missing_input": 1}
    m = parse_metrics(requests.get(base(app) + "/metrics", timeout=5).text)
    assert sample(m, "monitaur_client_queries_total", client="k1", model="digits") == 3
    assert sample(m, "monitaur_push_requests_total", code="202") == 2
    assert sample(m, "monitaur_events_rejected_total", reason="malformed_json") == 1


def test_push_needs_a_valid_bearer_token(app: App) -> None:
    body = lines("k1", 1)[0]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dG9rLTE="}):
        r = requests.post(base(app) + URL, data=body, headers=headers, timeout=5)
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert app.pipeline.metrics.registry.get_sample_value("monitaur_events_total", {"model": "digits"}) is None


def test_bad_bodies(app: App) -> None:
    r = requests.post(base(app) + URL, data="[1, 2", headers=AUTH, timeout=5)
    assert r.status_code == 400 and r.json()["reason"] == "malformed_json"
    r = requests.post(base(app) + URL, data="[" * 2000 + "]" * 2000, headers=AUTH, timeout=5)  # deeper than json.loads goes
    assert r.status_code == 400 and r.json()["reason"] == "malformed_json"
    r = requests.post(base(app) + URL, data="   ", headers=AUTH, timeout=5)
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = requests.post(base(app) + URL, data="x" * 5000, headers=AUTH, timeout=5)
    assert r.status_code == 413 and "4096" in r.json()["error"]
    m = parse_metrics(requests.get(base(app) + "/metrics", timeout=5).text)
    assert sample(m, "monitaur_events_rejected_total", reason="body_too_large") == 1
    assert sample(m, "monitaur_push_requests_total", code="400") == 3
    assert sample(m, "monitaur_push_requests_total", code="413") == 1


def test_missing_content_length_is_refused(app: App) -> None:
    host, port = app.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\n\r\n")
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 411")


def test_other_endpoints(app: App) -> None:
    r = requests.get(base(app) + "/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    requests.post(base(app) + URL, data="\n".join(lines("bad-<b>", 1)), headers=AUTH, timeout=5)
    r = requests.get(base(app) + "/", timeout=5)
    assert r.status_code == 200 and "/metrics" in r.text
    assert requests.get(base(app) + "/nope", timeout=5).status_code == 404
    assert requests.get(base(app) + URL, timeout=5).status_code == 405
    assert requests.post(base(app) + "/metrics", timeout=5).status_code == 404


def test_every_error_answer_names_its_reason(app: App) -> None:
    """The README promises {"error": ..., "reason": ...} for every error: a program reads the reason."""
    post = lambda data, headers: requests.post(base(app) + URL, data=data, headers=headers, timeout=5)  # noqa: E731
    cases = {
        "unauthorized": post("x", {}),
        "empty_body": post("  ", AUTH),
        "body_too_large": post("x" * 5000, AUTH),
        "malformed_json": post("[1, 2", AUTH),
        "not_found": requests.get(base(app) + "/nope", timeout=5),
        "method_not_allowed": requests.get(base(app) + URL, timeout=5),
    }
    for reason, r in cases.items():
        assert r.status_code >= 400 and r.json()["reason"] == reason and r.json()["error"], (reason, r.status_code, r.text)
    host, port = app.address
    for request, status, reason in [
        (b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\n\r\n", 411, "length_required"),
        (b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\nContent-Length: -1\r\n\r\n", 400, "bad_content_length"),
        (b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\nContent-Length: 10\r\n\r\nabc", 400, "body_incomplete"),
    ]:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(request)
            if reason == "body_incomplete":
                s.shutdown(socket.SHUT_WR)
            reply = b""
            while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(re.search(rb"Content-Length: (\d+)", reply)[1]):
                reply += s.recv(4096)
        head, _, body = reply.decode().partition("\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}") and f'"reason": "{reason}"' in body, reply


def test_push_can_be_disabled(tmp_path: Path) -> None:
    a = App(Settings(listen={"port": 0}, files={"paths": []}, state={"dir": None}, push={"enabled": False}))
    a.start()
    try:
        r = requests.post(base(a) + URL, data=lines("k", 1)[0], timeout=5)
        assert r.status_code == 404 and "disabled" in r.json()["error"]
    finally:
        a.stop()


def test_corrupt_state_snapshot_is_set_aside_and_counted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.npz").write_bytes(b"\x00" * 64)
    a = App(Settings(listen={"port": 0}, files={"paths": []}, state={"dir": str(state)}))
    a.start()
    try:
        assert a.pipeline.metrics.registry.get_sample_value("monitaur_checkpoint_errors_total", {"kind": "state"}) == 1
        assert len(a.pipeline.store) == 0
        assert [p.name.startswith("state.npz.corrupt-") for p in state.iterdir()] == [True]
    finally:
        a.stop()
    assert (state / "state.npz").exists()  # a fresh snapshot was written on stop
