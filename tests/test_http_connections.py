"""The HTTP server's connection bounds, with real sockets on 127.0.0.1: timeouts per phase,
the connection cap, readable refusals of bodies, and nothing from the request in a header."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from exporter.app import App
from exporter.config import Settings
from exporter.server import header_value
from tests.test_pipeline import lines

URL = "/api/v1/events"
MAX_BODY = 10 * 1024 * 1024  # the default push.max_body_bytes, as in the drill


def make_app(tmp_path: Path, **listen: Any) -> App:
    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0, **listen},
        files={"paths": [str(tmp_path / "none-*.jsonl")], "mode": "poll"},
        state={"dir": None},
        push={"tokens": ["tok"], "max_body_bytes": MAX_BODY},
    )
    app = App(settings)
    app.start()
    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = make_app(tmp_path, header_timeout_seconds=1.0, idle_timeout_seconds=1.5, body_timeout_seconds=1.0, max_connections=4)
    yield a
    a.stop()


def base(app: App) -> str:
    host, port = app.address
    return f"http://{host}:{port}"


def connect(app: App, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(app.address, timeout=timeout)


def read_until_closed(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def dropped(app: App, reason: str) -> float:
    value = app.metrics.registry.get_sample_value("monitaur_http_connections_dropped_total", {"reason": reason})
    assert value is not None
    return value


def closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``s`` (EOF or reset); fails if it is still open after ``seconds``."""
    start = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {seconds} s")
    return time.monotonic() - start


# -- timeouts ------------------------------------------------------------------------
def test_slowloris_is_dropped_at_the_header_deadline_and_others_are_served(app: App) -> None:
    """A client that sends one header byte every 0.2 s (each recv would wait less than any
    per-recv timeout) is dropped once the 1 s header deadline passes; others are served meanwhile."""
    s = connect(app)
    s.sendall(b"GET /metrics HTTP/1.1\r\n")
    stop = threading.Event()

    def trickle() -> None:
        try:
            while not stop.is_set():
                s.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass

    start = time.monotonic()
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        for _ in range(3):
            assert requests.get(base(app) + "/healthz", timeout=5).status_code == 200
        s.settimeout(5)
        reply = read_until_closed(s)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        s.close()
    assert reply == b""  # dropped without an answer
    assert 0.8 <= elapsed < 3.0
    assert dropped(app, "header_timeout") == 1


def test_a_silent_connection_is_dropped_and_a_kept_alive_one_after_the_idle_timeout(app: App) -> None:
    silent = connect(app)
    assert 0.8 <= closed_within(silent, 5) < 3.0
    silent.close()
    assert dropped(app, "header_timeout") == 1

    kept = connect(app)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    kept.settimeout(5)
    head = kept.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
    waited = closed_within(kept, 5)  # idle_timeout 1.5 s
    kept.close()
    assert 1.2 <= waited < 3.5
    assert dropped(app, "header_timeout") == 1  # an idle kept-alive connection is not a stall


def test_a_stalled_body_gets_408(app: App) -> None:
    s = connect(app)
    s.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    s.settimeout(5)
    start = time.monotonic()
    reply = read_until_closed(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout")
    assert "listen.body_timeout_seconds" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert time.monotonic() - start < 3.0
    assert dropped(app, "body_timeout") == 1
    assert app.metrics.registry.get_sample_value("monitaur_push_requests_total", {"code": "408"}) == 1


def test_a_body_cut_short_is_not_ingested(app: App) -> None:
    s = connect(app)
    s.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Length: 1000\r\n\r\n")
    s.sendall(lines("k1", 1)[0].encode() + b"\n")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(5)
    reply = read_until_closed(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"ended after" in reply
    assert app.metrics.registry.get_sample_value("monitaur_events_total", {"model": "digits"}) is None


# -- the cap -----------------------------------------------------------------------------
def test_connections_beyond_the_cap_get_503_at_once_and_threads_stay_bounded(app: App) -> None:
    threads_before = threading.active_count()
    held = [connect(app) for _ in range(4)]  # max_connections = 4, all stalled
    time.sleep(0.2)
    refused = []
    for _ in range(20):
        s = connect(app)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        refused.append(read_until_closed(s))
        s.close()
    assert threading.active_count() - threads_before <= 4
    for reply in refused:
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        head, body = reply.split(b"\r\n\r\n", 1)
        assert b"Retry-After: 1" in head and b"Connection: close" in head
        assert "listen.max_connections = 4" in json.loads(body)["error"]
    assert dropped(app, "over_capacity") == 20
    held[0].close()  # a slot frees as soon as its client leaves
    r = None
    for _ in range(50):
        r = requests.get(base(app) + "/healthz", timeout=5)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r is not None and r.status_code == 200
    for s in held[1:]:
        s.close()


def test_the_gauge_counts_open_connections(app: App) -> None:
    held = [connect(app) for _ in range(2)]
    time.sleep(0.2)
    try:
        # the scrape's own connection is open too
        text = requests.get(base(app) + "/metrics", timeout=5).text
        assert "monitaur_http_connections 3.0" in text
        assert "monitaur_http_connections_limit 4.0" in text
    finally:
        for s in held:
            s.close()


# -- refused bodies are readable ---------------------------------------------------------
def test_a_client_that_sends_a_whole_oversized_body_reads_the_413(app: App) -> None:
    """The issue's drill: 10 MiB + 1 sent whole before reading gave a broken pipe."""
    s = connect(app)
    s.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    s.sendall(b"x" * (MAX_BODY + 1))
    s.settimeout(5)
    reply = read_until_closed(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["reason"] == "body_too_large"
    r = requests.post(base(app) + URL, data=b"x" * (MAX_BODY + 1), headers={"Authorization": "Bearer tok"}, timeout=10)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    r = requests.post(base(app) + URL, data=b"x" * (MAX_BODY + 1), headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_data_binary_of_max_plus_one_reads_the_413(app: App, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_BODY + 1))
    out = subprocess.run(
        ["curl", "-sS", "-H", "Authorization: Bearer tok", "--data-binary", f"@{big}", "-w", "\n%{http_code}", base(app) + URL],
        capture_output=True, text=True, timeout=60,
    )
    body, _, code = out.stdout.rpartition("\n")
    assert code == "413", out.stderr
    assert json.loads(body)["reason"] == "body_too_large"
    # The same without curl's Expect: 100-continue: the body is sent whole, then read back.
    out = subprocess.run(
        ["curl", "-sS", "-H", "Expect:", "-H", "Authorization: Bearer tok", "--data-binary", f"@{big}", "-w", "\n%{http_code}", base(app) + URL],
        capture_output=True, text=True, timeout=60,
    )
    assert out.stdout.rpartition("\n")[2] == "413", out.stderr


def test_expect_100_continue_comes_only_for_an_acceptable_request(app: App) -> None:
    body = lines("k1", 2)
    payload = ("\n".join(body) + "\n").encode()
    s = connect(app)
    s.settimeout(5)
    s.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nExpect: 100-continue\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
    assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(payload)
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"HTTP/1.1 202")
    s = connect(app)
    s.settimeout(5)
    s.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nExpect: 100-continue\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    reply = read_until_closed(s)  # the final answer, without asking for the body
    s.close()
    assert reply.startswith(b"HTTP/1.1 413")


def test_length_framing_is_strict(app: App) -> None:
    def raw(request: bytes) -> bytes:
        with connect(app) as s:
            s.settimeout(5)
            s.sendall(request)
            return read_until_closed(s)

    auth = b"Authorization: Bearer tok\r\n"
    assert raw(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef").startswith(b"HTTP/1.1 400")
    assert raw(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 1_0\r\n\r\n0123456789").startswith(b"HTTP/1.1 400")
    assert raw(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n").startswith(
        b"HTTP/1.1 411"
    )
    # A GET with a body: the body is not taken for a second request; the connection closes after one answer.
    smuggled = b"GET /nope-smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply


# -- nothing from the request in a header ------------------------------------------------
@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1<script>x-injected",
        b"GET / HTTP/9.9",
        b"GET /\x0bx-injected HTTP/1.1 extra",
        b"BREW /x-injected HTTP/1.1",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1",
    ],
)
def test_request_text_never_reaches_the_status_line_or_headers(app: App, request_line: bytes) -> None:
    with connect(app) as s:
        s.settimeout(5)
        s.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        reply = read_until_closed(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    assert status.split(b" ", 2)[1] in (b"400", b"414", b"501", b"505")
    assert b"injected" not in head and b"script" not in reply
    json.loads(body)  # JSON, not the stdlib's HTML error page


def test_header_value_escapes_everything_but_printable_ascii() -> None:
    assert header_value('Basic realm="monitaur"') == 'Basic realm="monitaur"'
    forged = header_value("x\r\nSet-Cookie: a=b")
    assert "\r" not in forged and "\n" not in forged and forged == "x%0D%0ASet-Cookie: a=b"
    assert header_value("é\ud800\x00") == "%C3%A9%ED%A0%80%00"


def test_a_client_that_does_not_read_cannot_hold_a_write() -> None:
    from exporter.server import _DeadlineWriter

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        writer = _DeadlineWriter(ours, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            writer.write(b"x" * (16 * 1024 * 1024))  # the peer never reads
        assert 0.4 <= time.monotonic() - start < 2.0
        assert writer.timed_out
    finally:
        ours.close()
        theirs.close()
