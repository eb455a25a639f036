"""The decision endpoint's process logic (exporter.decision), in this process: the decisions,
the errors and their policy, the answers' headers, and HTTP/1.x as a gateway speaks it."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from exporter.decision import DECISIONS, ERRORS, Decider, DecisionConfig, DecisionServer, answers
from tests.conftest import wait_for


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def decider(**kw: object) -> tuple[Decider, Mono]:
    mono = Mono()
    d = Decider(DecisionConfig(**kw), clock=lambda: 1000.0, monotonic=mono)  # type: ignore[arg-type]
    return d, mono


def h(**headers: str | list[str]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for k, v in headers.items():
        out[k.replace("_", "-").encode()] = [x.encode() for x in ([v] if isinstance(v, str) else v)]
    return out


def test_blocked_means_in_the_table_until_its_end_and_mode_decides_the_answer() -> None:
    d, _ = decider(mode="block", allowlist=("vip",))
    d.publish({"mallory": math.inf, "old": 999.0, "later": 1001.0, "vip": math.inf})
    assert d.decide(h(x_monitaur_client="mallory")) == "block"
    assert d.decide(h(x_monitaur_client="later")) == "block"
    assert d.decide(h(x_monitaur_client="old")) == "allow"  # its block ended at 999 (the clock says 1000)
    assert d.decide(h(x_monitaur_client="alice")) == "allow"
    assert d.decide(h(x_monitaur_client="vip")) == "allowlisted"
    o, _ = decider(mode="observe")
    o.publish({"mallory": math.inf})
    assert o.decide(h(x_monitaur_client="mallory")) == "would_block"
    assert o.counts()["decisions"]["would_block"] == 1 and o.counts()["decisions"]["block"] == 0


def test_a_change_makes_a_new_table_and_leaves_the_old_one_untouched() -> None:
    d, _ = decider(mode="block")
    first = {"a": math.inf, "b": math.inf}
    d.publish(first)
    d.change({"c": math.inf}, ["a"])
    assert first == {"a": math.inf, "b": math.inf}  # a request that read the old table saw a whole one
    assert d.table == {"b": math.inf, "c": math.inf}


@pytest.mark.parametrize("on_error,expected", [("allow", "error_allow"), ("deny", "error_deny")])
def test_errors_follow_on_error(on_error: str, expected: str) -> None:
    d, mono = decider(mode="block", on_error=on_error, stale_seconds=30)
    assert d.decide(h(x_monitaur_client="alice")) == expected  # nothing published yet
    d.publish({})
    assert d.decide(h()) == expected  # no client header
    assert d.decide(h(x_monitaur_client="")) == expected
    assert d.decide(h(x_monitaur_client=["alice", "mallory"])) == expected  # one from the client, one from the gateway
    assert d.decide({b"x-monitaur-client": [b"\xff\xfe"]}) == expected  # not UTF-8
    assert d.decide(h(x_monitaur_client="a\u202eb")) == expected  # not a valid id (bidi override)
    assert d.decide(h(x_monitaur_client="alice")) == "allow"
    mono.t += 31  # the exporter has not confirmed the table for longer than stale_seconds
    assert d.decide(h(x_monitaur_client="alice")) == expected
    d.confirm()
    assert d.decide(h(x_monitaur_client="alice")) == "allow"
    errors = d.counts()["errors"]
    assert errors == {**dict.fromkeys(ERRORS, 0), "not_published": 1, "missing_client": 2, "invalid_client": 3, "stale": 1}
    assert d.counts()["decisions"][expected] == 7


def test_the_shared_secret_is_required_whatever_on_error_says() -> None:
    d, _ = decider(on_error="allow", secret="s" * 20)
    d.publish({})
    assert d.decide(h(x_monitaur_client="alice")) == "refused"
    assert d.decide(h(x_monitaur_client="alice", x_monitaur_secret="t" * 20)) == "refused"
    assert d.decide(h(x_monitaur_client="alice", x_monitaur_secret=["s" * 20, "s" * 20])) == "refused"
    assert d.decide(h(x_monitaur_client="alice", x_monitaur_secret="s" * 20)) == "allow"
    assert d.counts()["errors"]["bad_secret"] == 3


def test_answers_are_cacheable_by_client_and_errors_are_not() -> None:
    a = answers(DecisionConfig(cache_seconds=5))
    assert set(a) == {(d, c) for d in DECISIONS for c in ("", "close", "keep-alive")}
    allow, block, err = a[("allow", "")].decode(), a[("block", "close")].decode(), a[("error_deny", "")].decode()
    assert allow.startswith("HTTP/1.1 200 OK\r\n") and "Cache-Control: max-age=5\r\n" in allow and "X-Monitaur-Decision: allow\r\n" in allow
    assert block.startswith("HTTP/1.1 403 Forbidden\r\n") and "Cache-Control: max-age=5\r\n" in block and "Connection: close\r\n" in block
    assert err.startswith("HTTP/1.1 403 ") and "Cache-Control: no-store\r\n" in err
    assert all(b"\r\nContent-Length: 0\r\n" in v and v.endswith(b"\r\n\r\n") for v in a.values())  # no body, ever
    assert "no-store" in answers(DecisionConfig(cache_seconds=0))[("allow", "")].decode()


# -- over HTTP ------------------------------------------------------------------------------
@pytest.fixture
def served():
    listener = socket.create_server(("127.0.0.1", 0))
    d, _ = decider(mode="block", max_connections=2, header_timeout=1.0, idle_timeout=1.0)
    d.publish({"mallory": math.inf})
    server = DecisionServer(listener, d)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield listener.getsockname()[1], d
    server.close()


def exchange(sock: socket.socket, data: bytes, answers_expected: int = 1) -> list[bytes]:
    sock.sendall(data)
    got = b""
    deadline = time.monotonic() + 5
    while got.count(b"\r\n\r\n") < answers_expected and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return [a for a in got.split(b"\r\n\r\n") if a]


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_any_method_and_path_on_one_kept_alive_connection(served) -> None:
    port, d = served
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = exchange(s, b"GET /_monitaur HTTP/1.1\r\nHost: x\r\nX-Monitaur-Client: mallory\r\nAuthorization: Bearer user\r\n\r\n"
                          b"POST /v1/predict?x=1 HTTP/1.1\r\nHost: x\r\nX-Monitaur-Client: alice\r\nContent-Length: 0\r\n\r\n"
                          b"DELETE / HTTP/1.1\r\nx-monitaur-client:   alice  \r\n\r\n", 3)
        assert [status(a) for a in got] == [403, 200, 200]
        assert b"X-Monitaur-Decision: block" in got[0]
    assert d.counts()["decisions"]["block"] == 1 and d.counts()["decisions"]["allow"] == 2


def test_http10_closes_unless_kept_alive_and_close_is_honoured(served) -> None:
    port, _ = served
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = exchange(s, b"GET / HTTP/1.0\r\nX-Monitaur-Client: alice\r\n\r\n")
        assert status(got[0]) == 200 and b"Connection: close" in got[0]
        assert s.recv(10) == b""  # closed
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = exchange(s, b"GET / HTTP/1.1\r\nConnection: close\r\nX-Monitaur-Client: alice\r\n\r\n")
        assert b"Connection: close" in got[0] and s.recv(10) == b""


def test_malformed_requests_get_the_error_answer_and_the_connection_closes(served) -> None:
    port, d = served
    for bad in (b"GARBAGE\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = exchange(s, bad)
            assert status(got[0]) == 200 and b"X-Monitaur-Decision: error_allow" in got[0] and b"no-store" in got[0]
            s.settimeout(2.0)
            assert s.recv(10) == b""  # closed
    assert d.counts()["errors"]["bad_request"] == 4


@pytest.mark.parametrize("framing", [b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"Content-Length: 331\r\n\r\n"])
def test_a_request_with_a_body_is_answered_at_once_and_its_connection_closes(served, framing: bytes) -> None:
    """nginx forwards the user's Content-Length without the body unless told not to: answer, never wait for it."""
    port, _ = served
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.monotonic()
        got = exchange(s, b"GET / HTTP/1.1\r\nX-Monitaur-Client: mallory\r\n" + framing)
        assert time.monotonic() - started < 0.5
        assert status(got[0]) == 403 and b"Connection: close" in got[0]
        s.settimeout(2.0)
        assert s.recv(10) == b""  # closed, the body never read


def test_connections_beyond_the_cap_get_the_error_answer_at_once(served) -> None:
    port, d = served
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # hold both slots
    time.sleep(0.2)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = exchange(s, b"GET / HTTP/1.1\r\nX-Monitaur-Client: mallory\r\n\r\n")
            assert b"X-Monitaur-Decision: error_allow" in got[0]
        assert d.counts()["errors"]["over_capacity"] == 1
        for s in idle:  # header_timeout (1 s): the server drops the idle connections, which frees their slots
            s.settimeout(5.0)
            assert s.recv(1) == b""

        def answered() -> bool:
            with socket.create_connection(("127.0.0.1", port)) as s:
                return status(exchange(s, b"GET / HTTP/1.1\r\nX-Monitaur-Client: mallory\r\n\r\n")[0]) == 403

        wait_for(answered, timeout=5, what="a freed slot")
    finally:
        for s in idle:
            s.close()
