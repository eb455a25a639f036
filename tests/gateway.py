"""A real gateway for tests and benches: Debian's nginx in front of the tiny model service
(:mod:`tests.model_service`), asking the exporter's decision endpoint with ``auth_request``.

nginx runs unprivileged (as ``nobody`` when the tests run as root) with its own prefix,
config, pid, logs, temp and cache paths in a directory of its own, on 127.0.0.1 ports.
Its config is :func:`nginx_conf`: the API keys it knows map to client ids, and the
``/predict`` location is the one documented in docs/reaction.md (the test checks that the
documented snippet holds these lines). ``/direct/predict`` skips the decision, so that a
bench can measure what ``auth_request`` adds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import REPO, free_port

NGINX = "/usr/sbin/nginx"

# What a gateway puts in front of the model (the documented snippet, with this harness's ports).
PROTECTED_LOCATION = """
    location /predict {
        if ($monitaur_client = "") { return 401; }          # not one of our API keys
        auth_request /_monitaur_decision;
        auth_request_set $monitaur_decision $upstream_http_x_monitaur_decision;
        proxy_set_header X-Monitaur-Client $monitaur_client;  # overwrites whatever the client sent
        proxy_set_header Connection "";                     # keep-alive to the model
        proxy_pass http://model;
    }

    location = /_monitaur_decision {
        internal;
        proxy_pass http://monitaur_decision;
        proxy_http_version 1.1;
        proxy_set_header Connection "";                     # keep-alive to the decision endpoint
        proxy_pass_request_headers off;                     # not the user's Authorization, cookies or API key
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";                 # nginx would send the user's, with no body
        proxy_set_header X-Monitaur-Client $monitaur_client;
        proxy_cache monitaur_decisions;
        proxy_cache_key $monitaur_client;                   # one cached answer per client, for its max-age
        error_page 500 502 503 504 = @monitaur_unreachable;
    }

    location @monitaur_unreachable {
        return 204;                                         # the exporter is down: allow (fail open); 403 fails closed
    }
"""


def nginx_conf(prefix: Path, port: int, model_port: int, decision_port: int, keys: dict[str, str]) -> str:
    """A whole nginx config: ``keys`` (API key -> client id) is the gateway's own authentication."""
    mapped = "\n".join(f'        "{key}" "{client}";' for key, client in keys.items())
    return f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    map $http_x_api_key $monitaur_client {{
        default "";
{mapped}
    }}
    proxy_cache_path {prefix}/cache keys_zone=monitaur_decisions:1m max_size=10m;
    upstream monitaur_decision {{
        server 127.0.0.1:{decision_port};
        keepalive 16;
        keepalive_timeout 30s;                              # below reaction.listen.idle_timeout_seconds
    }}
    upstream model {{
        server 127.0.0.1:{model_port};
        keepalive 16;
    }}
    proxy_http_version 1.1;

    server {{
        listen 127.0.0.1:{port};
{PROTECTED_LOCATION}
        location /direct/predict {{                          # the bench's baseline: no decision asked
            proxy_set_header X-Monitaur-Client $monitaur_client;
            proxy_set_header Connection "";
            proxy_pass http://model/predict;
        }}
    }}
}}
"""


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g} s")


class ModelService:
    """``python -m tests.model_service`` on a free loopback port, logging events to ``log``."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ModelService":
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.model_service", str(self.port), str(self.log)], cwd=REPO, env=env)
        _wait_port(self.port, self.proc, "the model service")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Nginx:
    """nginx with its own prefix under a fresh directory, unprivileged, in the foreground."""

    def __init__(self, model_port: int, decision_port: int, keys: dict[str, str]) -> None:
        if not os.path.exists(NGINX):
            raise RuntimeError("nginx is not installed (Debian package 'nginx'); .ci/run installs it")
        self.prefix = Path(tempfile.mkdtemp(prefix="monitaur-nginx-"))
        self.port = free_port()
        self.conf = self.prefix / "nginx.conf"
        (self.prefix / "tmp").mkdir()
        self.conf.write_text(nginx_conf(self.prefix, self.port, model_port, decision_port, keys))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        as_nobody = os.geteuid() == 0
        if as_nobody:  # unprivileged: its files belong to nobody
            for path in [self.prefix, *self.prefix.rglob("*")]:
                os.chown(path, 65534, 65534)
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.prefix / "error.log"), "-g", "daemon off;"],
            user=65534 if as_nobody else None, group=65534 if as_nobody else None, stderr=subprocess.STDOUT, stdout=open(self.prefix / "stdout.log", "wb"),
        )
        _wait_port(self.port, self.proc, f"nginx (see {self.prefix}/error.log)")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def errors(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)
