"""The decision endpoint for gateways: a process of its own that answers allow (200) or block (403) per client.

The contract is nginx ``auth_request`` and Envoy's ``ext_authz`` HTTP service at once:
any method and any path; 200 allows; 403 denies (nginx treats 401 and 403 as denials and
any other status as an error; Envoy denies on any status but 200). The client is named
by one header, ``reaction.client_header``, which the gateway sets from its own
authentication and overwrites if the client sent one; the endpoint reads no other part
of the request (not the user's ``Authorization``). Answers have no body; they carry
``X-Monitaur-Decision`` and ``Cache-Control: max-age=reaction.cache_seconds`` (errors:
``no-store``), so that a gateway can cache them per client.

Decisions (``monitaur_decisions_total{decision}``):

- ``allow``: the client is not blocked;
- ``block`` (403) / ``would_block`` (200, ``reaction.mode: observe``): it is blocked,
  that is, flagged and not released, or blocked by hand;
- ``allowlisted``: blocked, but in ``reaction.allowlist`` (200);
- ``error_allow`` (200) / ``error_deny`` (403), by ``reaction.on_error``: no decision
  could be made (``monitaur_decision_errors_total{reason}``: no or several client
  headers, an invalid id, no table yet, a stale table, a malformed request, too many
  connections);
- ``refused`` (403, whatever ``on_error``): the shared secret is set and the request
  does not carry it (``bad_secret``).

Why a process: answering must not wait for ingestion. In the exporter's process a
request needs the GIL at each step, and a busy ingest thread gives it up only every
``sys.getswitchinterval()`` (5 ms). Here only decisions run. The exporter
(:mod:`exporter.reaction`) starts it as ``python -m exporter.decision FD``, where FD is
the listening socket (owned by the exporter, so a restart of this process loses no
connection), and talks to it over stdin and stdout, one JSON object per line:

- stdin: first ``{"config": {...}}`` (:class:`DecisionConfig`); then
  ``{"table": {client: until}}``, the whole table of blocked clients (``until``: Unix
  seconds, or null while a flag holds), or ``{"set": {...}, "unset": [...]}``, a change
  to it, each time flags or overrides change; and ``{"fresh": 1}`` each time the
  exporter has confirmed the table against its verdicts. The table is never changed in
  place: each change makes a new one, and requests read whichever is current (one
  reference). End of input (the exporter stopped or died): the process exits.
- stdout: ``{"decisions": {...}, "errors": {...}}``, cumulative counts, at most once a
  second when they changed, and at exit.

This module imports only the standard library and the exporter's small helpers, so the
process starts in a fraction of a second and stays small.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from exporter.httpio import DeadlineReader, DeadlineWriter
from exporter.logutil import RateLimitedLog, escaping_handler
from exporter.names import is_valid_name

log = logging.getLogger("monitaur.decision")

ALLOW, BLOCK, WOULD_BLOCK, ALLOWLISTED, ERROR_ALLOW, ERROR_DENY, REFUSED = (
    "allow", "block", "would_block", "allowlisted", "error_allow", "error_deny", "refused")
DECISIONS = (ALLOW, BLOCK, WOULD_BLOCK, ALLOWLISTED, ERROR_ALLOW, ERROR_DENY, REFUSED)
STATUS = {ALLOW: 200, WOULD_BLOCK: 200, ALLOWLISTED: 200, ERROR_ALLOW: 200, BLOCK: 403, ERROR_DENY: 403, REFUSED: 403}
CACHEABLE = frozenset({ALLOW, BLOCK, WOULD_BLOCK, ALLOWLISTED})  # what depends on the client only
ERRORS = ("missing_client", "invalid_client", "not_published", "stale", "bad_request", "over_capacity", "bad_secret")

MAX_LINE = 8192  # bytes of the request line, and of each header line
MAX_HEAD = 65536  # bytes of the request line and headers together (nginx forwards the user's headers)
MAX_DISCARD = 65536  # bytes read and dropped before a connection closes (a body sent with a decision request)
LINGER = 1.0  # seconds given to those bytes
WRITE_TIMEOUT = 10.0
REPORT_EVERY = 1.0  # seconds between count reports to the exporter
FIRST_TABLE_WAIT = 2.0  # seconds connections wait (in the backlog) for the first table at start, before errors are answered


@dataclass(frozen=True)
class DecisionConfig:
    """What the decision process needs of ``reaction`` (plain data, sent as its first line)."""

    mode: str = "observe"
    client_header: str = "x-monitaur-client"
    secret_header: str = "x-monitaur-secret"
    secret: str | None = None
    allowlist: tuple[str, ...] = ()
    on_error: str = "allow"
    stale_seconds: float = 30.0
    cache_seconds: int = 5
    max_connections: int = 256
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    log_level: str = "info"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DecisionConfig":
        raw = dict(raw)
        raw["allowlist"] = tuple(raw.get("allowlist", ()))
        raw["client_header"] = str(raw.get("client_header", cls.client_header)).lower()
        raw["secret_header"] = str(raw.get("secret_header", cls.secret_header)).lower()
        return cls(**raw)


class Decider:
    """Decides each request from the table last published, and counts decisions and errors.

    ``table``: client -> until (Unix seconds; ``inf`` while a flag holds) of every blocked
    client; None until the exporter publishes one. It is replaced whole, never changed in
    place, so a request reads one consistent table with one reference.
    """

    def __init__(self, config: DecisionConfig, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.table: dict[str, float] | None = None
        self.fresh_at = -math.inf  # monotonic time the exporter last confirmed the table
        self.allowlist = frozenset(config.allowlist)
        self._client = config.client_header.lower().encode("ascii")
        self._secret_header = config.secret_header.lower().encode("ascii")
        self._secret = config.secret.encode() if config.secret is not None else None
        self._on_error = ERROR_ALLOW if config.on_error == "allow" else ERROR_DENY
        self._blocked = BLOCK if config.mode == "block" else WOULD_BLOCK
        self._lock = threading.Lock()
        self.decisions = dict.fromkeys(DECISIONS, 0)
        self.errors = dict.fromkeys(ERRORS, 0)
        self._log = RateLimitedLog(log, interval=60.0)

    # -- from the exporter -------------------------------------------------------------
    def publish(self, table: dict[str, float]) -> None:
        """A whole new table, confirmed now."""
        self.table = table
        self.fresh_at = self.monotonic()

    def change(self, set_: dict[str, float], unset: list[str]) -> None:
        """A change to the current table: a new table with it applied, then swapped in."""
        table = dict(self.table or {})
        table.update(set_)
        for client in unset:
            table.pop(client, None)
        self.publish(table)

    def confirm(self) -> None:
        self.fresh_at = self.monotonic()

    # -- per request ---------------------------------------------------------------------
    def decide(self, headers: dict[bytes, list[bytes]]) -> str:
        """The decision for a request's headers (lower-case names -> values), counted."""
        if self._secret is not None:
            given = headers.get(self._secret_header, ())
            if len(given) != 1 or not hmac.compare_digest(given[0], self._secret):
                return self.error("bad_secret", REFUSED)
        values = headers.get(self._client)
        if not values or values == [b""]:
            return self.error("missing_client")
        if len(values) > 1:  # a client-supplied header the gateway appended to instead of overwriting
            return self.error("invalid_client", detail=f"{len(values)} {self.config.client_header} headers")
        try:
            client = values[0].decode("utf-8")
        except UnicodeDecodeError:
            return self.error("invalid_client", detail="not UTF-8")
        if not is_valid_name(client):
            return self.error("invalid_client", detail=f"not a client id: {client[:64]!r}")  # the log handler escapes it
        table = self.table
        if table is None:
            return self.error("not_published")
        if self.monotonic() - self.fresh_at > self.config.stale_seconds:
            return self.error("stale")
        until = table.get(client)
        if until is None or self.clock() >= until:
            return self.count(ALLOW)
        if client in self.allowlist:
            return self.count(ALLOWLISTED)
        return self.count(self._blocked)

    def error(self, reason: str, decision: str | None = None, detail: str = "") -> str:
        """Count an error and return its decision (``on_error``'s unless given)."""
        with self._lock:
            self.errors[reason] += 1
        self._log.log(logging.WARNING, reason, "decision request without a decision: %s%s", reason, f" ({detail})" if detail else "")
        return self.count(decision or self._on_error)

    def note_body(self) -> None:
        """A decision request came with a body: say how to avoid it (each such request costs a connection)."""
        self._log.log(logging.WARNING, "body", "decision requests carry a body (or a Content-Length) and so close their connection; "
                      'with nginx, set proxy_set_header Content-Length ""; in the auth_request location')

    def count(self, decision: str) -> str:
        with self._lock:
            self.decisions[decision] += 1
        return decision

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"decisions": dict(self.decisions), "errors": dict(self.errors)}


def answers(config: DecisionConfig) -> dict[tuple[str, str], bytes]:
    """Every answer, ready to send: (decision, connection header: "", "close" or "keep-alive") -> bytes."""
    cache = f"max-age={config.cache_seconds}" if config.cache_seconds > 0 else "no-store"
    out = {}
    for decision in DECISIONS:
        status = STATUS[decision]
        phrase = "OK" if status == 200 else "Forbidden"
        for connection in ("", "close", "keep-alive"):
            head = [f"HTTP/1.1 {status} {phrase}", "Content-Length: 0", f"Cache-Control: {cache if decision in CACHEABLE else 'no-store'}",
                    f"X-Monitaur-Decision: {decision}"]
            if connection:
                head.append(f"Connection: {connection}")
            out[(decision, connection)] = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
    return out


class BadRequest(Exception):
    """A request that is not HTTP/1.x as the endpoint reads it."""


def read_head(rfile: io.BufferedReader) -> tuple[bytes, bytes, dict[bytes, list[bytes]]] | None:
    """(method, version, headers by lower-case name) of the next request; None at a clean end of input."""
    line = rfile.readline(MAX_LINE + 1)
    if line in (b"\r\n", b"\n"):  # one empty line before a request is tolerated (RFC 9112, 2.2)
        line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise BadRequest("request line too long or cut")
    parts = line.split()
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("not an HTTP/1.x request line")
    headers: dict[bytes, list[bytes]] = {}
    total = len(line)
    while True:
        h = rfile.readline(MAX_LINE + 1)
        total += len(h)
        if total > MAX_HEAD or len(h) > MAX_LINE or not h.endswith(b"\n"):
            raise BadRequest("headers too long or cut")
        if h in (b"\r\n", b"\n"):
            return parts[0], parts[2], headers
        name, sep, value = h.partition(b":")
        if not sep or not name or name != name.strip() or h[:1] in (b" ", b"\t"):
            raise BadRequest("malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t\r\n"))


def _keep_alive(version: bytes, headers: dict[bytes, list[bytes]]) -> tuple[bool, str]:
    """Whether the connection stays open after the answer, and the Connection header to send."""
    tokens = {t.strip().lower() for v in headers.get(b"connection", ()) for t in v.split(b",")}
    if version == b"HTTP/1.1":
        return (False, "close") if b"close" in tokens else (True, "")
    return (True, "keep-alive") if b"keep-alive" in tokens else (False, "close")


def _has_body(headers: dict[bytes, list[bytes]]) -> bool:
    """Whether the request declares a body (chunked, or a Content-Length other than 0)."""
    return b"transfer-encoding" in headers or any(v != b"0" for v in headers.get(b"content-length", ()))


def _linger(conn: socket.socket, reader: DeadlineReader, rfile: io.BufferedReader) -> None:
    """Before closing: end our side, then read and drop what the peer still sends (bounded), so
    that closing with unread bytes does not reset the connection before the answer is read."""
    try:
        conn.shutdown(socket.SHUT_WR)
        reader.expect("drain", LINGER)
        left = MAX_DISCARD
        while left > 0:
            chunk = rfile.read1(min(left, 16384))
            if not chunk:
                break
            left -= len(chunk)
    except (TimeoutError, OSError):
        pass


class DecisionServer:
    """Serves decisions on a listening socket: a thread per connection, at most ``max_connections``,
    each request's head within ``header_timeout``, kept-alive connections closed after ``idle_timeout``."""

    def __init__(self, sock: socket.socket, decider: Decider) -> None:
        self.sock = sock
        self.decider = decider
        self.config = decider.config
        self.answers = answers(decider.config)
        self._slots = threading.BoundedSemaphore(self.config.max_connections)
        self._closed = threading.Event()

    def serve_forever(self, ready: threading.Event | None = None) -> None:
        """Accept connections until :meth:`close`; first wait up to :data:`FIRST_TABLE_WAIT` for ``ready``
        (the first table), so that connections made at start wait in the backlog rather than get errors."""
        if ready is not None:
            ready.wait(FIRST_TABLE_WAIT)
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.01)  # EMFILE and the like: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="monitaur-decision-conn", daemon=True).start()
            except RuntimeError:
                self._slots.release()
                conn.close()

    def close(self) -> None:
        self._closed.set()
        try:
            self.sock.close()
        except OSError:
            pass

    def _refuse(self, conn: socket.socket) -> None:
        """Over capacity: the ``on_error`` answer at once, without a thread, then close."""
        decision = self.decider.error("over_capacity")
        try:
            conn.setblocking(False)
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.send(self.answers[(decision, "close")])
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        cfg = self.config
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            reader = DeadlineReader(conn)
            rfile = io.BufferedReader(reader, 16384)
            writer = DeadlineWriter(conn, WRITE_TIMEOUT)
            first = True
            while not self._closed.is_set():
                if first:
                    reader.expect("header", cfg.header_timeout)
                else:
                    reader.expect("header", cfg.idle_timeout, then=cfg.header_timeout)
                first = False
                try:
                    head = read_head(rfile)
                except BadRequest as exc:
                    decision = self.decider.error("bad_request", detail=str(exc))
                    writer.write(self.answers[(decision, "close")])
                    return
                if head is None:
                    return
                _, version, headers = head
                keep, connection = _keep_alive(version, headers)
                if _has_body(headers):
                    # Answered at once, never after waiting for a body: nginx forwards the user's
                    # Content-Length with no body unless told not to. The connection then closes,
                    # since where the next request starts is not known.
                    keep, connection = False, "close"
                    self.decider.note_body()
                decision = self.decider.decide(headers)
                writer.write(self.answers[(decision, connection)])
                if not keep:
                    _linger(conn, reader, rfile)
                    return
        except (TimeoutError, OSError):
            pass  # a stalled or vanished gateway connection
        finally:
            try:
                conn.close()
            finally:
                self._slots.release()


# -- the process ----------------------------------------------------------------------------
def _report(decider: Decider, out: Any, stop: threading.Event) -> None:
    """Write the counts to the exporter when they changed, at most every :data:`REPORT_EVERY` seconds."""
    last = None
    while True:
        stopping = stop.wait(REPORT_EVERY)
        counts = decider.counts()
        if counts != last:
            try:
                out.write(json.dumps(counts).encode() + b"\n")
                out.flush()
            except (OSError, ValueError):
                return
            last = counts
        if stopping:
            return


def _table(raw: dict[str, Any]) -> dict[str, float]:
    return {str(k): (math.inf if v is None else float(v)) for k, v in raw.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m exporter.decision FD``: serve decisions on the listening socket FD (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C, timeout(1) and systemd signal the whole process group: the exporter gets the
    # signal too and ends this process by closing its input, after its last requests.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    first = stdin.readline()
    if not first:
        return 0
    config = DecisionConfig.from_dict(json.loads(first)["config"])
    logging.basicConfig(level=config.log_level.upper(), handlers=[escaping_handler(sys.stderr)])
    decider = Decider(config)
    server = DecisionServer(sock, decider)
    stop = threading.Event()
    reporter = threading.Thread(target=_report, args=(decider, stdout, stop), name="monitaur-decision-report", daemon=True)
    reporter.start()
    ready = threading.Event()
    threading.Thread(target=server.serve_forever, args=(ready,), name="monitaur-decision-accept", daemon=True).start()
    for line in stdin:  # until the exporter closes our input
        try:
            msg = json.loads(line)
            if "table" in msg:
                decider.publish(_table(msg["table"]))
                ready.set()
            elif "set" in msg:
                decider.change(_table(msg["set"]), [str(c) for c in msg.get("unset", ())])
            elif "fresh" in msg:
                decider.confirm()
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("unreadable message from the exporter: %s", type(exc).__name__)
    server.close()
    stop.set()
    reporter.join(timeout=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
