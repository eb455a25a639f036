"""HTTP endpoints: ``/metrics``, ``/healthz``, a landing page at ``/`` and ``POST /api/v1/events``.

Push answers are JSON: 202 with accepted/rejected counts, or an error object
``{"error": "...", "reason": "..."}`` with 400, 401, 404, 405, 411 or 413 (500 only if
processing fails after decoding; one event's decoding failure is its own rejection).
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from exporter import __version__, jsonparse, reasons
from exporter.health import Health
from exporter.pipeline import Pipeline

log = logging.getLogger("monitaur.http")
PUSH_PATH = "/api/v1/events"


class ExporterHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one pipeline."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], pipeline: Pipeline, tokens: list[str], push_enabled: bool, max_body: int,
                 healthy: Callable[[], Health]) -> None:
        self.pipeline = pipeline
        self.tokens = [t.encode() for t in tokens]
        self.push_enabled = push_enabled
        self.max_body = max_body
        self.healthy = healthy
        super().__init__(address, _Handler)

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
    server_version = f"monitaur-exporter/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- helpers -------------------------------------------------------------
    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode() + b"\n", "application/json", headers)

    def _push_answer(self, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.server.pipeline.metrics.push_requests.labels(str(code)).inc()
        self._json(code, obj, headers)

    # -- routes --------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(self.server.pipeline.metrics.registry)
            except Exception as exc:  # an answer, not a dropped connection, even if a series cannot be encoded
                log.error("cannot render /metrics: %s", type(exc).__name__)
                self._json(500, {"error": "metrics could not be rendered; see the exporter's log"})
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            health = self.server.healthy()  # exporter.health: 503 names the reasons
            self._json(200 if health.ok else 503, {**health.as_json(), "version": __version__})
        elif path == "/":
            self._send(200, self._landing().encode(), "text/html; charset=utf-8")
        elif path == PUSH_PATH:
            self._json(405, {"error": "use POST to push events"}, {"Allow": "POST"})
        else:
            self._json(404, {"error": "no such endpoint; see / for the list"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != PUSH_PATH:
            self._json(404, {"error": f"POST is only accepted at {PUSH_PATH}"})
            return
        if not self.server.push_enabled:
            self._push_answer(404, {"error": "push is disabled in this exporter's config (push.enabled)"})
            return
        if self.server.tokens and not self._authorized():
            self.close_connection = True
            self._push_answer(401, {"error": "missing or invalid bearer token"}, {"WWW-Authenticate": 'Bearer realm="monitaur"'})
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            self._push_answer(411, {"error": "a Content-Length header is required (chunked bodies are not supported)"})
            return
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._push_answer(400, {"error": "Content-Length is not a non-negative integer"})
            return
        if length > self.server.max_body:
            self.close_connection = True  # the unread body makes the connection unusable
            self.server.pipeline.reject(reasons.BODY_TOO_LARGE, f"push body of {length} bytes exceeds {self.server.max_body}")
            self._push_answer(
                413, {"error": f"body of {length} bytes exceeds the limit of {self.server.max_body} bytes (push.max_body_bytes)", "reason": reasons.BODY_TOO_LARGE}
            )
            return
        body = self.rfile.read(length)
        self._ingest(body)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # Compare against every token so timing does not reveal which one nearly matched.
        return any([hmac.compare_digest(given, t) for t in self.server.tokens])

    def _ingest(self, body: bytes) -> None:
        pipeline = self.server.pipeline
        text = body.strip()
        if not text:
            self._push_answer(400, {"error": "empty body; send JSON lines or a JSON array of events"})
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
            self._push_answer(500, {"error": "the events could not be processed; see the exporter's log"})
            return
        self._push_answer(202, {"accepted": result.accepted, "rejected": sum(result.rejected.values()), "rejected_reasons": dict(result.rejected)})

    def _landing(self) -> str:
        view = self.server.pipeline.view
        flagged = view.flagged(50)
        tracked = view.tracked()
        rows = "".join(
            f"<tr><td>{html.escape(c.client_id)}</td><td>{c.score:.3f}</td><td>{html.escape(', '.join(c.detectors_on))}</td>"
            f"<td>{c.queries}</td></tr>"
            for c in flagged
        )
        return (
            f"<!doctype html><html><head><title>MONITAUR exporter</title></head><body>"
            f"<h1>MONITAUR exporter {html.escape(__version__)}</h1>"
            f'<p><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> · push: <code>POST {PUSH_PATH}</code></p>'
            f"<p>Tracked clients: {tracked}. Flagged now: {len(flagged)}.</p>"
            f"<table border=1 cellpadding=4><tr><th>client</th><th>score</th><th>flagged by</th><th>queries</th></tr>{rows}</table>"
            f"</body></html>"
        )
