"""A tiny model service behind the gateway in the gateway test and bench: ``python -m tests.model_service PORT LOG``.

``POST /predict`` with ``{"input": [64 numbers]}`` answers ``{"output": [10 probabilities]}``
from the demo's digits-like victim (:class:`exporter.demo.DigitsLike`), and appends one
event per answer to LOG, as a model service's access log would, for the exporter to
tail. The client is whoever the gateway says (the ``X-Monitaur-Client`` header it sets);
a request without one is refused (400), as it never passed the gateway.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from exporter.demo import DigitsLike

WORLD = DigitsLike(0)
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: without it, a delayed ACK costs 40 ms
    server: "Service"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        client = self.headers.get("X-Monitaur-Client")
        try:
            x = np.asarray(json.loads(body)["input"], dtype=float).reshape(1, -1)
        except (ValueError, KeyError, TypeError):
            x = None
        if not client or x is None or x.shape[1] != 64:
            self._answer(400, {"error": "need X-Monitaur-Client and a 64-value input"})
            return
        p = WORLD.predict(x)[0]
        line = json.dumps({"ts": round(time.time(), 6), "client": client, "model": "digits", "input": x[0].tolist(), "output": p.round(5).tolist()})
        with _lock:
            self.server.log.write(line + "\n")
            self.server.log.flush()
        self._answer(200, {"output": p.round(5).tolist()})

    def _answer(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Service(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, log_path: str) -> None:
        self.log = open(log_path, "a", encoding="utf-8")
        super().__init__(("127.0.0.1", port), Handler)


def main(argv: list[str]) -> int:
    Service(int(argv[0]), argv[1]).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
