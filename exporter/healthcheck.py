"""``monitaur-exporter healthcheck``: ask the running exporter's ``/healthz``, for container health checks.

It reads the same configuration as ``run`` and so finds the exporter where it listens,
over TLS when ``listen.web_config_file`` configures it. A loopback probe of the exporter's
own process checks liveness, not identity, so the certificate is not verified. With basic
auth, either list ``/healthz`` in the web config's ``auth_excluded_paths`` (the simplest
for a health check) or give a file holding ``user:password``. A web config that requires
client certificates cannot be probed this way: use ``auth_excluded_paths`` and a
``client_auth_type`` that does not require them, or probe from outside the container.

Exit 0 when ``/healthz`` answers 200, 1 otherwise (the answer's reasons are printed).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from pathlib import Path

from exporter import webconfig
from exporter.config import Settings

TIMEOUT = 3.0  # seconds: a health check that hangs is a failed one


def probe_address(settings: Settings) -> tuple[str, int]:
    """Where to reach the exporter from its own host: a wildcard address means loopback."""
    host = settings.listen.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, settings.listen.port


def check(settings: Settings, basic_auth_file: Path | None = None, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """``(healthy, what to print)`` for the exporter that ``settings`` describe."""
    host, port = probe_address(settings)
    web = webconfig.load(settings.listen.web_config_file) if settings.listen.web_config_file is not None else None
    if web is not None and web.tls is not None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {}
    if basic_auth_file is not None:
        credentials = basic_auth_file.read_text(encoding="utf-8").strip()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    try:
        conn.request("GET", "/healthz", headers=headers)
        answer = conn.getresponse()
        body = answer.read(65536)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"no answer from {host}:{port}: {type(exc).__name__}"
    finally:
        conn.close()
    if answer.status == 200:
        return True, "healthy"
    try:
        reasons = json.loads(body).get("reasons")
    except (ValueError, AttributeError):
        reasons = None
    return False, f"/healthz answered {answer.status}" + (f": {reasons}" if reasons else "")
