"""HTTP endpoints: ``/metrics``, ``/healthz``, a landing page at ``/``, a client's page at
``/clients/{id}`` (:mod:`exporter.clientpage`), the runbook at ``/runbook``
(:mod:`exporter.runbook`), ``POST /api/v1/events`` and the clients and groups API under
``/api/v1/clients`` and ``/api/v1/groups`` (:mod:`exporter.api`, :mod:`exporter.groups_api`, which decide their answers).

Push answers are JSON: 202 with accepted/rejected counts, or an error object
``{"error": "...", "reason": "..."}`` with 400, 401, 404, 405, 408, 411 or 413 (500 only if
processing fails after decoding; one event's decoding failure is its own rejection).
Every error answer, of any endpoint, carries a ``reason`` of :data:`ERROR_REASONS` (a
fixed word for programs; ``error`` is the sentence for people).

Connections are bounded (:class:`ConnectionLimits`): a cap on those served at once, and
deadlines for each phase of a request, so that stalled clients are dropped and cannot
hold threads. A request whose body is refused is answered first, then its body is
discarded up to a bound, so that a client that sends it whole still reads the answer.
With a web config (:mod:`exporter.webconfig`): TLS, and basic auth on every endpoint but
push and the clients API, which have their own bearer tokens. Nothing a client sends reaches a status line or a
response header (``send_response``, ``header_value``).
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable
from urllib.parse import quote, unquote

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from exporter import __version__, api, jsonparse, reasons, runbook
from exporter.health import Health
from exporter.httpio import DeadlineReader as _DeadlineReader
from exporter.httpio import DeadlineWriter as _DeadlineWriter
from exporter.httpio import header_value
from exporter.names import is_valid_name
from exporter.pipeline import Pipeline
from exporter.webconfig import BasicAuth, TLSContextSource, WebConfig

log = logging.getLogger("monitaur.http")
PUSH_PATH = "/api/v1/events"
# Why the server closed a connection before its request was answered (monitaur_http_connections_dropped_total).
DROP_REASONS = ("over_capacity", "header_timeout", "body_timeout", "write_timeout", "tls_handshake")
# The `reason` of error answers (besides the stdlib parser's, named after their status: bad_request, ...).
ERROR_REASONS = (
    "unauthorized", "not_found", "method_not_allowed", "push_disabled", "length_required", "bad_content_length",
    reasons.BODY_TOO_LARGE, "body_timeout", "body_incomplete", "empty_body", reasons.MALFORMED_JSON, reasons.INTERNAL_ERROR,
    "over_capacity", *api.ERROR_REASONS,
)
CLIENT_PAGE = "/clients/"


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server serves at once, and how long each phase of a request may take.

    ``header_timeout``: the request line and headers, from the connection's start (the TLS
    handshake has its own ``header_timeout``) or, on a kept-alive connection, from the
    first byte of the next request. ``idle_timeout``: a kept-alive connection waiting for
    its next request. ``body_timeout``: a push body, whole. ``write_timeout``: each write
    of an answer (a client that does not read cannot hold a thread).
    """

    max_connections: int = 64
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    write_timeout: float = 30.0


def _busy_answer(limit: int) -> bytes:
    body = json.dumps({"error": f"too many connections (listen.max_connections = {limit}); retry later", "reason": "over_capacity"}).encode() + b"\n"
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ExporterHTTPServer(HTTPServer):
    """The exporter's HTTP server, bound to one pipeline: at most ``limits.max_connections``
    connections at once, each in its own thread; beyond that a connection is answered 503
    (plain HTTP) or closed (TLS, where an answer would need a handshake in the accepting
    thread) at once. With a web config: TLS, and basic auth for every endpoint but push.
    """

    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: a burst of connections waits here, not in SYN retries (1 s each)

    def __init__(self, address: tuple[str, int], pipeline: Pipeline, tokens: list[str], push_enabled: bool, max_body: int,
                 healthy: Callable[[], Health], limits: ConnectionLimits = ConnectionLimits(), web: WebConfig | None = None,
                 clients_api: "api.ClientsAPI | None" = None, client_page: Callable[[str], str | None] | None = None) -> None:
        self.pipeline = pipeline
        self.api = clients_api
        self.client_page = client_page
        self.tokens = [("push", t.encode()) for t in tokens]
        self.push_enabled = push_enabled
        self.max_body = max_body
        self.healthy = healthy
        self.limits = limits
        self.tls = TLSContextSource(web.tls) if web is not None and web.tls is not None else None
        self.basic_auth = BasicAuth(web.basic_auth_users) if web is not None and web.basic_auth_users else None
        self.auth_excluded_paths = web.auth_excluded_paths if web is not None else frozenset()
        self.extra_headers = dict(web.headers) if web is not None else {}
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._busy = _busy_answer(limits.max_connections)
        r = pipeline.metrics.registry
        self.open_connections = Gauge("monitaur_http_connections", "HTTP connections being served.", registry=r)
        Gauge("monitaur_http_connections_limit", "The most HTTP connections served at once (listen.max_connections).", registry=r).set(
            limits.max_connections
        )
        self.dropped = Counter(
            "monitaur_http_connections_dropped", "HTTP connections closed by the server before an answer, by reason.", ["reason"], registry=r
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        super().__init__(address, _Handler)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accepting thread: take a slot and hand the connection to a thread of its own, or refuse it."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        self.open_connections.inc()
        try:
            context = self.tls.context() if self.tls is not None else None
            threading.Thread(target=self._serve, args=(request, client_address, context), name="monitaur-http-conn", daemon=True).start()
        except BaseException:
            self.open_connections.dec()
            self._slots.release()  # the caller (socketserver) logs the error and closes the socket
            raise

    def _refuse(self, sock: socket.socket) -> None:
        """Answer 503 without blocking (the answer fits an empty send buffer) and close.

        What the client has already sent is read first, so that closing does not reset the
        connection and discard the answer before the client reads it.
        """
        self.dropped.labels("over_capacity").inc()
        try:
            if self.tls is None:
                sock.setblocking(False)
                try:
                    sock.recv(65536)
                except OSError:
                    pass
                sock.send(self._busy)
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, sock: socket.socket, client_address: Any, context: ssl.SSLContext | None) -> None:
        conn: socket.socket | None = sock
        try:
            if context is not None:
                conn = self._handshake(sock, context)
            if conn is not None:
                self.finish_request(conn, client_address)
        except OSError:
            pass  # the client went away, or reset the connection
        except Exception:
            self.handle_error(conn, client_address)
        finally:
            if conn is not None:
                self.shutdown_request(conn)
            sock.close()
            self.open_connections.dec()
            self._slots.release()

    def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket | None:
        """The TLS handshake, within ``header_timeout`` in all (the ssl module's timeout is a deadline for
        the whole handshake); None, counted, if it fails: no certificate, a plain-HTTP client, a stall."""
        sock.settimeout(self.limits.header_timeout)
        conn = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.dropped.labels("tls_handshake").inc()
            log.debug("TLS handshake failed: %s", type(exc).__name__)
            conn.close()
            return None
        return conn

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a request that failed with its exception type only (the default prints a
        traceback to stderr, whose text a client's input could shape)."""
        exc = sys.exc_info()[1]
        log.error("request from %s failed: %s", client_address[0] if client_address else "?", type(exc).__name__)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="monitaur-http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: ExporterHTTPServer
    protocol_version = "HTTP/1.1"
    # Not the stdlib's HTTP/0.9, which answers without a status line or headers (errors included).
    default_request_version = "HTTP/1.0"
    server_version = f"monitaur-exporter/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- connection: deadlines, bodies left unread --------------------------------
    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 65536)
        self.wfile = _DeadlineWriter(self.connection, self.server.limits.write_timeout)
        self._unread_body = 0
        self._expect_100 = False

    def handle(self) -> None:
        """Requests until the connection closes: the first within ``header_timeout``, the next
        ones after at most ``idle_timeout`` of silence, each then within ``header_timeout``."""
        limits = self.server.limits
        self.close_connection = True
        first = True
        while first or not self.close_connection:
            self._unread_body, self._expect_100 = 0, False
            if first:
                self._reader.expect("header", limits.header_timeout)
            else:
                self._reader.expect("header", limits.idle_timeout, then=limits.header_timeout)
            self.handle_one_request()
            if self._reader.timed_out and self._reader.phase == "header" and (first or self._reader.phase_bytes):
                self.server.dropped.labels("header_timeout").inc()
            elif self.wfile.timed_out:
                self.server.dropped.labels("write_timeout").inc()
            first = False

    def finish(self) -> None:
        """Discard a body the handler did not read (bounded), so that closing does not reset
        the connection before the client has read the answer."""
        if self._unread_body > 0 and not self.wfile.timed_out:
            self._drain(self._unread_body)
        super().finish()

    def _drain(self, limit: int) -> None:
        """Read and drop up to ``limit`` bytes within ``body_timeout``. On plain TCP the write side is
        shut first: the client sees the end of the answer while it is still sending."""
        if not isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                return
        self._reader.expect("drain", self.server.limits.body_timeout)
        try:
            while limit > 0:
                chunk = self.rfile.read1(min(limit, 65536))
                if not chunk:
                    break
                limit -= len(chunk)
        except (TimeoutError, OSError):
            pass

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        # The body, if any, is not read unless the route reads it: until then the request
        # counts it as unread and the connection is closed after the answer.
        if self.headers.get("Transfer-Encoding") is not None:
            self._unread_body = self._drain_limit()
        else:
            length = self._content_length()
            self._unread_body = self._drain_limit() if length is None else min(length, self._drain_limit())
        return True

    def _drain_limit(self) -> int:
        return 2 * self.server.max_body

    def _content_length(self) -> int | None:
        """The declared body length: 0 without Content-Length, None if it is not one non-negative decimal."""
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            return 0
        if len(values) > 1:
            return None
        value = values.pop()
        return int(value) if value.isascii() and value.isdigit() else None

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until the request's headers pass (see ``do_POST``): a client
        whose body will be refused gets the final answer and need not send the body."""
        self._expect_100 = True
        return True

    # -- answers -------------------------------------------------------------------
    def send_response(self, code: int, message: str | None = None) -> None:
        """The standard reason phrase always: the stdlib would put request text in the status line."""
        super().send_response(code)

    def send_header(self, keyword: str, value: str) -> None:
        super().send_header(keyword, header_value(str(value)))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by the stdlib's parser (400, 414, 431, 501, 505) as JSON, without echoing the request."""
        self.close_connection = True
        phrase = self.responses.get(code, ("request refused",))[0]
        self._json(code, {"error": phrase, "reason": re.sub(r"\W+", "_", phrase.lower()).strip("_")})

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        if self._unread_body:
            self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**self.server.extra_headers, **(headers or {})}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode() + b"\n", "application/json", headers)

    def _push_answer(self, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.server.pipeline.metrics.push_requests.labels(str(code)).inc()
        self._json(code, obj, headers)

    def _basic_auth_ok(self, path: str) -> bool:
        """True if the web config asks no basic auth for ``path``, or the request passes it; else answers 401."""
        auth = self.server.basic_auth
        if auth is None or path in self.server.auth_excluded_paths or auth.check(self.headers.get("Authorization")):
            return True
        self._json(401, {"error": "missing or invalid basic auth credentials", "reason": "unauthorized"}, {"WWW-Authenticate": 'Basic realm="monitaur"'})
        return False

    # -- routes --------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.server.api is not None and self.server.api.handles(path):
            self._api(path)  # bearer tokens, not basic auth
            return
        if not self._basic_auth_ok(path):
            return
        if path == "/metrics":
            try:
                body = generate_latest(self.server.pipeline.metrics.registry)
            except Exception as exc:  # an answer, not a dropped connection, even if a series cannot be encoded
                log.error("cannot render /metrics: %s", type(exc).__name__)
                self._json(500, {"error": "metrics could not be rendered; see the exporter's log", "reason": reasons.INTERNAL_ERROR})
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            health = self.server.healthy()  # exporter.health: 503 names the reasons
            self._json(200 if health.ok else 503, {**health.as_json(), "version": __version__})
        elif path == "/":
            self._send(200, self._landing().encode(), "text/html; charset=utf-8")
        elif path == "/runbook":
            self._send(200, runbook.page(), "text/html; charset=utf-8")
        elif path.startswith(CLIENT_PAGE) and self.server.client_page is not None:
            self._client_page(path[len(CLIENT_PAGE):])
        elif path == PUSH_PATH:
            self._json(405, {"error": "use POST to push events", "reason": "method_not_allowed"}, {"Allow": "POST"})
        else:
            self._json(404, {"error": "no such endpoint; see / for the list", "reason": "not_found"})

    def do_POST(self) -> None:
        """Push. Every refusal is answered before the body is read; ``finish`` then discards
        the body (bounded), so that even a client that sends it whole reads the answer."""
        path = self.path.split("?", 1)[0]
        if self.server.api is not None and self.server.api.handles(path):
            self._api(path)
            return
        if path != PUSH_PATH:
            if self._basic_auth_ok(path):
                self._json(404, {"error": f"POST is only accepted at {PUSH_PATH}", "reason": "not_found"})
            return
        if not self.server.push_enabled:
            self._push_answer(404, {"error": "push is disabled in this exporter's config (push.enabled)", "reason": "push_disabled"})
            return
        if self.server.tokens and not self._authorized():
            self.close_connection = True
            self._push_answer(401, {"error": "missing or invalid bearer token", "reason": "unauthorized"}, {"WWW-Authenticate": 'Bearer realm="monitaur"'})
            return
        limit = self.server.max_body
        body = self._body(limit, "push.max_body_bytes", self._push_answer,
                          lambda n: self.server.pipeline.reject(reasons.BODY_TOO_LARGE, f"push body of {n} bytes exceeds {limit}"))
        if body is not None:
            self._ingest(body)

    def _body(self, limit: int, setting: str, answer: Callable[..., None], too_large: Callable[[int], None] | None = None) -> bytes | None:
        """The request's body, of a declared length of at most ``limit`` bytes (the config's ``setting``);
        None once ``answer`` has said why not (``too_large`` is told the length of a body over the limit)."""
        if self.headers.get("Transfer-Encoding") is not None or not self.headers.get_all("Content-Length"):
            answer(411, {"error": "a Content-Length header is required (chunked bodies are not supported)", "reason": "length_required"})
            return None
        length = self._content_length()
        if length is None:
            answer(400, {"error": "Content-Length is not one non-negative decimal integer", "reason": "bad_content_length"})
            return None
        if length > limit:
            if too_large is not None:
                too_large(length)
            answer(413, {"error": f"body of {length} bytes exceeds the limit of {limit} bytes ({setting})", "reason": reasons.BODY_TOO_LARGE})
            return None
        return self._read_body(length, answer)

    def _read_body(self, length: int, answer: Callable[..., None]) -> bytes | None:
        """The body, whole within ``body_timeout``; None (answered 408 or 400 by ``answer``; connection closed) if it does not come."""
        if self._expect_100:
            self.send_response_only(100)
            self.end_headers()
        self._unread_body = 0
        self._reader.expect("body", self.server.limits.body_timeout)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.server.dropped.labels("body_timeout").inc()
            self.close_connection = True
            answer(408, {"error": f"the body did not arrive within {self.server.limits.body_timeout:g} s (listen.body_timeout_seconds)", "reason": "body_timeout"})
            return None
        if len(body) < length:
            self.close_connection = True
            answer(400, {"error": f"the body ended after {len(body)} of its {length} bytes", "reason": "body_incomplete"})
            return None
        return body

    def _api(self, path: str) -> None:
        """A clients API request: authenticated here, answered by :class:`exporter.api.ClientsAPI`."""
        clients = self.server.api
        assert clients is not None
        allowed, who = clients.authenticate(self.headers.get("Authorization"))
        if not allowed:
            self.close_connection = True
            self._json(401, {"error": "missing or invalid bearer token (api.tokens)", "reason": "unauthorized"}, {"WWW-Authenticate": 'Bearer realm="monitaur"'})
            return
        if self.command in ("GET", "HEAD"):
            answer = clients.get(path, self.path.partition("?")[2])
        else:
            body = self._body(api.MAX_BODY, "fixed for the clients API", self._json)
            if body is None:
                return
            answer = clients.post(path, body, who)
        self._json(answer.status, answer.body, answer.headers)

    def _client_page(self, quoted: str) -> None:
        """A client's page (HTML): ``/clients/{id}``, the id percent-encoded."""
        try:
            client = unquote(quoted, errors="strict")
        except UnicodeDecodeError:
            client = ""
        page = self.server.client_page(client) if is_valid_name(client) else None
        if page is None:
            self._json(404, {"error": "no such client (ids are percent-encoded in the path)", "reason": "not_found"})
            return
        self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")

    def _authorized(self) -> bool:
        return api.bearer_match(self.headers.get("Authorization"), self.server.tokens) is not None

    def _ingest(self, body: bytes) -> None:
        pipeline = self.server.pipeline
        text = body.strip()
        if not text:
            self._push_answer(400, {"error": "empty body; send JSON lines or a JSON array of events", "reason": "empty_body"})
            return
        try:
            if text[:1] == b"[":
                try:
                    items = jsonparse.loads(text)
                except ValueError as exc:  # UnicodeDecodeError included
                    pipeline.reject(reasons.MALFORMED_JSON, "push body is not a valid JSON array")
                    self._push_answer(
                        400, {"error": f"body starts with '[' but is not a valid JSON array ({type(exc).__name__})", "reason": reasons.MALFORMED_JSON}
                    )
                    return
                result = pipeline.ingest_objects(items)
            else:
                # Blank lines are skipped, as in tailed files (jsonparse.is_blank).
                result = pipeline.ingest_lines(line for line in text.split(b"\n") if not jsonparse.is_blank(line))
        except Exception as exc:  # decoding failures are rejections already; this is a failure after decoding
            log.error("push body failed after decoding: %s", type(exc).__name__)
            self._push_answer(500, {"error": "the events could not be processed; see the exporter's log", "reason": reasons.INTERNAL_ERROR})
            return
        self._push_answer(202, {"accepted": result.accepted, "rejected": sum(result.rejected.values()), "rejected_reasons": dict(result.rejected)})

    def _landing(self) -> str:
        view = self.server.pipeline.view
        flagged = view.flagged(50)
        tracked = view.tracked()
        link = self.server.client_page is not None
        rows = "".join(
            f"<tr><td>{_client_link(c.client_id) if link else html.escape(c.client_id)}</td><td>{c.score:.3f}</td>"
            f"<td>{c.flag.first_query if c.flag else ''}</td>"
            f"<td>{html.escape(', '.join(f'{d} {r:.2f}x' for d, r in c.flag.detectors.items()) if c.flag else '')}</td>"
            f"<td>{c.queries}</td></tr>"
            for c in flagged
        )
        return (
            f"<!doctype html><html><head><title>MONITAUR exporter</title></head><body>"
            f"<h1>MONITAUR exporter {html.escape(__version__)}</h1>"
            f'<p><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> · <a href="/runbook">/runbook</a> · push: <code>POST {PUSH_PATH}</code></p>'
            f"<p>Tracked clients: {tracked}. Flagged (most recent first, at most 50): {len(flagged)}.</p>"
            f"<table border=1 cellpadding=4><tr><th>client</th><th>risk now</th><th>flagged at query</th>"
            f"<th>over threshold at the flag (value / threshold)</th><th>queries</th></tr>{rows}</table>"
            f"</body></html>"
        )


def _client_link(client: str) -> str:
    """A link to the client's page: the id percent-encoded in the URL, HTML-escaped in the text (ids are client-chosen)."""
    return f'<a href="{CLIENT_PAGE}{quote(client, safe="")}">{html.escape(client)}</a>'
