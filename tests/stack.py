"""The monitoring topology on 127.0.0.1, with the real components, for tests/test_stack_e2e.py and bench/page_latency.py.

    log files + HTTP push ──> monitaur-exporter run ──scrape──> Prometheus ──> Alertmanager
                                                                                 ├─ Slack webhook ──> local HTTP sink
                                                                                 └─ SMTP relay ────> local SMTP sink (aiosmtpd)

Every component is the real one, started as a process (no Docker): the exporter
(``python3 -m exporter run``), Debian's ``prometheus`` and ``prometheus-alertmanager``
(upstream's ``alertmanager`` name works too). Slack and the mail relay are replaced by
local sinks that record what they receive, and when.

Prometheus and Alertmanager run the repository's OWN files; :class:`Stack` writes copies
in which ONLY ADDRESSES AND, IF ASKED (:class:`Timings`), INTERVALS ARE REWRITTEN:

- ``prometheus/prometheus.yml``: the scrape targets (``exporter:9717``,
  ``alertmanager:9093``, ``localhost:9090``) and the Alertmanager target become
  ``127.0.0.1:<port>``; with :data:`FAST` timings, scrape and evaluation intervals become
  1s and the ``for:`` durations of copies of ``alert_rules/*.yml`` are shortened (every
  expression, label and annotation stays the repository's); with :data:`REAL` timings,
  the intervals and rules are the repository's own.
- ``alertmanager/alertmanager.yml``: the Slack ``api_url_file`` and
  ``smtp_auth_password_file`` point to temp files (the webhook file holds the HTTP
  sink's URL), ``smtp_smarthost`` is the SMTP sink, ``smtp_require_tls`` is false (the
  local sink has no TLS: part of the address-level rewrite, the relay being another
  one), the templates are the repository's with the two base URLs of ``links.tmpl`` set to
  :data:`LINKS` (addresses too: this proves the links come from that configuration), and
  with FAST timings every route's ``group_wait``/``group_interval``/``repeat_interval`` is
  shortened. The sink requires AUTH PLAIN (without TLS, on loopback) with the password of
  the temp file, so the ``smtp_auth_username`` and password file of the real config are
  exercised too.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.conftest import REPO, ExporterProcess, free_port, parse_metrics, wait_for

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
RULES_DIR = REPO / "alert_rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
AM_TEMPLATES = REPO / "alertmanager" / "templates"
SMTP_USER = "monitaur-alertmanager"  # smtp_auth_username of alertmanager/alertmanager.yml
SMTP_PASSWORD = "e2e-smtp-password"
WAIT = 90.0  # bound of every wait for something that should happen
PAGE = "MonitaurModelExtractionSuspected"
# The links' base URLs in the stack's notifications (links.tmpl rewritten): markers that appear nowhere else.
LINKS = {"monitaur.runbook_url": "http://runbook.e2e.invalid/runbook", "monitaur.grafana_url": "http://grafana.e2e.invalid:3000"}


@dataclass(frozen=True)
class Timings:
    """How fast the stack runs; None keeps the repository's own value."""

    interval: str | None = None  # scrape and rule evaluation interval
    for_: str | None = None  # every alert's `for:` ...
    for_of: dict[str, str] = field(default_factory=dict)  # ... except these alerts'
    alertmanager: dict[str, str] | None = None  # group_wait / group_interval / repeat_interval of every route that sets them


REAL = Timings()  # the repository's: 15 s scrapes and evaluations, the rules' `for:`, Alertmanager's waits
# Prometheus hands its first targets to the scrape manager only after its discovery update
# interval (5 s), so `up` is absent for the first ~5-6 s after start (measured: first scrape
# 5.5 s in), and `absent(up)` would fire MonitaurExporterDown at every start with a 5 s
# `for:`; 30 s keeps the startup gap out of the notifications.
FAST = Timings(interval="1s", for_="5s", for_of={"MonitaurExporterDown": "30s"},
               alertmanager={"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1m"})


# =========================================================================== sinks
class HTTPSink:
    """Slack's incoming webhook, replaced: records every JSON body POSTed to it, with its arrival time."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unparsable": raw.decode(errors="replace")}
                with sink.lock:
                    sink.bodies.append({"path": self.path, "body": body, "at": time.time()})
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slack"

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SMTPSink:
    """The mail relay, replaced: an aiosmtpd server that requires AUTH and records messages, with their arrival time."""

    def __init__(self, user: str, password: str) -> None:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError:  # a test dependency: fail loudly rather than skip the whole topology
            raise RuntimeError("aiosmtpd is not installed: pip install aiosmtpd (a test dependency)") from None
        self.messages_: list[dict[str, Any]] = []
        self.logins: list[str] = []
        self.lock = threading.Lock()
        sink = self

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
            ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user and auth_data.password.decode() == password
            if ok:
                with sink.lock:
                    sink.logins.append(mechanism)
            return AuthResult(success=ok)

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
                parts = [p.get_content() for p in msg.walk() if p.get_content_maintype() == "text"]
                with sink.lock:
                    sink.messages_.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos), "subject": str(msg["Subject"]),
                                           "text": "\n".join(parts), "at": time.time()})
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port, authenticator=authenticator, auth_required=True, auth_require_tls=False,
            # Alertmanager's LOGIN expects the challenge "Username:", aiosmtpd sends "User Name": PLAIN only.
            auth_exclude_mechanism=["LOGIN"],
        )
        self.controller.start()

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.messages_)

    def close(self) -> None:
        self.controller.stop()


# =========================================================================== processes
class Process:
    """A long-running binary with its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.log_path = name, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        return True

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        stop_process(self.proc)
        if not self._log.closed:
            self._log.close()


def stop_process(proc: subprocess.Popen | None) -> None:
    """Terminate, then kill after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


# =========================================================================== config rewrites
def shortened_rules(dest: Path, timings: Timings) -> list[Path]:
    """Copies of alert_rules/*.yml in which only the `for:` durations (``timings.for_``, ``timings.for_of``)
    and the groups' own evaluation intervals (``timings.interval``) are shortened; with ``timings.for_``
    None, exact copies."""
    dest.mkdir()
    out = []
    for path in RULE_FILES:
        text = path.read_text(encoding="utf-8")
        if timings.for_ is None:
            (dest / path.name).write_text(text, encoding="utf-8")
            out.append(dest / path.name)
            continue
        shortened = lambda alert: timings.for_of.get(alert, timings.for_)  # noqa: E731
        lines, alert = [], None
        for line in text.splitlines(keepends=True):
            if m := re.match(r"\s*- alert:\s*(\S+)", line):
                alert = m.group(1)
            line = re.sub(r"^(\s+for:[ \t]*)\S+([ \t]*)$", lambda m: f"{m.group(1)}{shortened(alert)}{m.group(2)}", line)
            if timings.interval is not None:
                line = re.sub(r"^(    interval:[ \t]*)\S+([ \t]*)$", rf"\g<1>{timings.interval}\g<2>", line)
            lines.append(line)
        new = "".join(lines)
        # nothing but `for:` and group intervals changed
        original, copy = yaml.safe_load(text), yaml.safe_load(new)
        assert len(original["groups"]) == len(copy["groups"])
        for g1, g2 in zip(original["groups"], copy["groups"]):
            assert g2.get("interval") == (timings.interval if "interval" in g1 else None), g2.get("interval")
            assert {k: v for k, v in g1.items() if k not in ("interval", "rules")} == {k: v for k, v in g2.items() if k not in ("interval", "rules")}
            assert len(g1["rules"]) == len(g2["rules"])
            for r1, r2 in zip(g1["rules"], g2["rules"]):
                if "for" in r1:
                    assert r2["for"] == shortened(r1.get("alert"))
                    r2 = {**r2, "for": r1["for"]}
                assert r1 == r2, f"rewriting {path.name} changed more than `for:`"
        (dest / path.name).write_text(new, encoding="utf-8")
        out.append(dest / path.name)
    return out


def prometheus_config(workdir: Path, exporter_port: int, prom_port: int, am_port: int, timings: Timings) -> Path:
    """The repository's prometheus/prometheus.yml with addresses (and intervals, unless ``timings.interval`` is None) rewritten."""
    cfg = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    address = {"exporter:9717": f"127.0.0.1:{exporter_port}", "alertmanager:9093": f"127.0.0.1:{am_port}", "localhost:9090": f"127.0.0.1:{prom_port}"}

    def rewrite(targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in address]
        assert not unknown, f"prometheus.yml has targets this test does not know how to rewrite: {unknown}"
        return [address[t] for t in targets]

    if timings.interval is not None:
        cfg["global"].update(scrape_interval=timings.interval, scrape_timeout=timings.interval, evaluation_interval=timings.interval)
    rules = shortened_rules(workdir / "rules", timings)
    assert len(cfg["rule_files"]) == 1 and cfg["rule_files"][0].endswith("/*.yml")
    cfg["rule_files"] = [str(workdir / "rules" / "*.yml")]
    for am in cfg["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            sc["targets"] = rewrite(sc["targets"])
    for job in cfg["scrape_configs"]:
        assert "scrape_interval" not in job and "scrape_timeout" not in job, job["job_name"]
        for sc in job["static_configs"]:
            sc["targets"] = rewrite(sc["targets"])
    assert {j["job_name"] for j in cfg["scrape_configs"]} >= {"monitaur"}
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    assert rules
    return path


def alertmanager_config(workdir: Path, slack_url: str, smtp_port: int, timings: Timings) -> Path:
    """The repository's alertmanager/alertmanager.yml with addresses, secret paths, link base URLs (links.tmpl: LINKS)
    and, unless ``timings.alertmanager`` is None, intervals rewritten."""
    cfg = yaml.safe_load((REPO / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8"))
    secrets = workdir / "secrets"
    secrets.mkdir()
    (secrets / "slack_webhook_url").write_text(slack_url)
    (secrets / "smtp_password").write_text(SMTP_PASSWORD)  # no newline: the sink compares it exactly
    g = cfg["global"]
    assert g["smtp_auth_username"] == SMTP_USER
    g["smtp_smarthost"] = f"127.0.0.1:{smtp_port}"
    g["smtp_require_tls"] = False  # the local sink has no TLS (address-level rewrite)
    g["smtp_auth_password_file"] = str(secrets / "smtp_password")
    # The repository's templates, but the links' base URLs of the test (links.tmpl is their configuration).
    links = (AM_TEMPLATES / "links.tmpl").read_text(encoding="utf-8")
    for name, url in LINKS.items():
        links, n = re.subn(rf'(\{{\{{ define "{re.escape(name)}" \}}\}})[^{{]*(\{{\{{ end \}}\}})', rf"\g<1>{url}\g<2>", links)
        assert n == 1, f"links.tmpl does not define {name}"
    (workdir / "links.tmpl").write_text(links, encoding="utf-8")
    cfg["templates"] = [str(p) for p in sorted(AM_TEMPLATES.glob("*.tmpl")) if p.name != "links.tmpl"] + [str(workdir / "links.tmpl")]

    def shorten(route: dict) -> None:
        for key, value in (timings.alertmanager or {}).items():
            if key in route:
                route[key] = value
        for sub in route.get("routes", []):
            shorten(sub)

    shorten(cfg["route"])
    for receiver in cfg["receivers"]:
        for slack in receiver.get("slack_configs", []):
            slack["api_url_file"] = str(secrets / "slack_webhook_url")
    text = yaml.safe_dump(cfg, sort_keys=False)
    assert "/etc/alertmanager" not in text and "smtp:25" not in text, "a container path or address was not rewritten"
    path = workdir / "alertmanager.yml"
    path.write_text(text, encoding="utf-8")
    return path


# =========================================================================== the stack
class Stack:
    """Sinks, exporter, Alertmanager and Prometheus of one run, on loopback ports."""

    def __init__(self, workdir: Path, exporter_config: dict[str, Any], timings: Timings) -> None:
        self.workdir = workdir
        self.timings = timings
        workdir.mkdir()
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.exporter_config = exporter_config
        self.slack: HTTPSink | None = None
        self.smtp: SMTPSink | None = None
        self.exporter: ExporterProcess | None = None
        self.alertmanager: Process | None = None
        self.prometheus: Process | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Stack":
        self.slack = HTTPSink()
        self.smtp = SMTPSink(SMTP_USER, SMTP_PASSWORD)
        cfg = dict(self.exporter_config)
        cfg["files"] = {"paths": [str(self.logs / "*.jsonl")], "mode": "poll", "poll_interval_seconds": 0.1}
        cfg["state"] = {**cfg.get("state", {}), "dir": str(self.workdir / "state"), "checkpoint_interval_seconds": 1}
        (self.workdir / "exporter").mkdir()
        self.exporter = ExporterProcess(self.workdir / "exporter", cfg)  # assigned first: stop() ends it if start() fails
        self.exporter.start()

        self.am_port, self.prom_port = free_port(), free_port()
        am_cfg = alertmanager_config(self.workdir, self.slack.url, self.smtp.port, self.timings)
        self.alertmanager = Process(
            "alertmanager",
            [ALERTMANAGER, f"--config.file={am_cfg}", f"--storage.path={self.workdir / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{self.am_port}", "--cluster.listen-address=",
             f"--web.external-url=http://127.0.0.1:{self.am_port}"],
            self.workdir / "alertmanager.log",
        )
        prom_cfg = prometheus_config(self.workdir, self.exporter.port, self.prom_port, self.am_port, self.timings)
        self.prometheus = Process(
            "prometheus",
            [PROMETHEUS, f"--config.file={prom_cfg}", f"--storage.tsdb.path={self.workdir / 'prom-data'}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}", f"--web.external-url=http://127.0.0.1:{self.prom_port}",
             "--web.enable-lifecycle"],
            self.workdir / "prometheus.log",
        )
        wait_for(lambda: self.alertmanager.alive() and get_ok(f"http://127.0.0.1:{self.am_port}/-/ready"), timeout=WAIT, interval=0.2, what="Alertmanager ready")
        wait_for(lambda: self.prometheus.alive() and get_ok(f"{self.prom_url}/-/ready"), timeout=WAIT, interval=0.2, what="Prometheus ready")
        wait_for(lambda: self.query('up{job="monitaur"} == 1'), timeout=WAIT, interval=0.2, what="Prometheus scraping the exporter")
        wait_for(self._alertmanager_discovered, timeout=WAIT, interval=0.2, what="Prometheus knowing the Alertmanager")
        return self

    def stop(self) -> None:
        """Idempotent: Prometheus first (no more alerts), then Alertmanager, the exporter, the sinks."""
        for proc in (self.prometheus, self.alertmanager):
            if proc is not None:
                proc.stop()
        if self.exporter is not None and self.exporter.proc is not None:
            stop_process(self.exporter.proc)
            log = getattr(self.exporter, "_log", None)
            if log is not None and not log.closed:
                log.close()
        for sink in (self.slack, self.smtp):
            if sink is not None:
                sink.close()
        self.slack = self.smtp = None

    def diagnostics(self) -> str:
        parts = []
        for proc in (self.prometheus, self.alertmanager):
            if proc is not None:
                parts.append(f"--- {proc.name} log:\n{proc.tail(1500)}")
        if self.exporter is not None:
            parts.append(f"--- exporter log:\n{self.exporter.log_text()[-1500:]}")
        if self.slack is not None and self.smtp is not None:
            received = notifications(self)
            parts.append(f"--- {len(received)} notifications:")
            parts += [f"{n.sink} at {n.at:.1f} for {sorted(n.page_clients)}: {n.text[:400]}" for n in received[-6:]]
        return "\n".join(parts)

    # -- Prometheus API ------------------------------------------------------
    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def api(self, path: str, **params: str) -> Any:
        r = requests.get(self.prom_url + path, params=params, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query_raw(self, expr: str) -> dict[str, Any]:
        r = requests.get(self.prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
        return r.json()

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("/api/v1/alerts")["alerts"]

    def _alertmanager_discovered(self) -> bool:
        return bool(self.api("/api/v1/alertmanagers")["activeAlertmanagers"])

    def rule_iterations(self) -> dict[str, float]:
        """Prometheus's own count of evaluations, per rule group."""
        text = requests.get(self.prom_url + "/metrics", timeout=10).text
        out = {}
        for (name, labels), value in parse_metrics(text).items():
            if name == "prometheus_rule_group_iterations_total":
                out[dict(labels)["rule_group"]] = value
        return out

    def rules_health(self) -> list[str]:
        """'group/rule: error' of every rule whose last evaluation failed or never happened."""
        bad = []
        for group in self.api("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                if rule.get("health") != "ok":
                    bad.append(f"{group['name']}/{rule['name']}: {rule.get('health')} {rule.get('lastError', '')}")
        return bad

    # -- exporter ------------------------------------------------------------
    def exporter_metrics(self) -> dict:
        return self.exporter.metrics()

    def caught_up(self) -> bool:
        """The exporter has read every tailed file to its end."""
        m = self.exporter_metrics()
        sizes = {labels: v for (name, labels), v in m.items() if name == "monitaur_file_size_bytes"}
        offsets = {labels: v for (name, labels), v in m.items() if name == "monitaur_file_offset_bytes"}
        return bool(sizes) and sizes == offsets




# =========================================================================== what the sinks received
@dataclass(frozen=True)
class Notification:
    """One message of a sink: when it arrived, its text, and the clients of the page it carries (if it is one)."""

    sink: str  # "slack" or "email"
    at: float
    text: str
    page_clients: frozenset[str]


def notifications(stack: Stack) -> list[Notification]:
    """Every Slack message and e-mail received, in arrival order, with the clients of the extraction page each names.

    A page's clients are read where the templates put them: the facts line of Slack
    (``• client `x` ``) and the ``Client:`` line of the e-mail, per alert of the message.
    """
    out = []
    for m in stack.slack.messages():
        text = json.dumps(m["body"])
        body = "\n".join(a.get("title", "") + "\n" + a.get("text", "") for a in m["body"].get("attachments", []))
        clients = frozenset(re.findall(r"• client `([^`]+)`", body)) if PAGE in body and "[FIRING" in body else frozenset()
        out.append(Notification("slack", m["at"], text, clients))
    for m in stack.smtp.messages():
        text = f"To: {m['to']}\nSubject: {m['subject']}\n{m['text']}"
        clients = frozenset(re.findall(r"^  Client: +(\S+)\s*$", m["text"], flags=re.M)) if PAGE in m["subject"] and "[FIRING" in m["subject"] else frozenset()
        out.append(Notification("email", m["at"], text, clients))
    return sorted(out, key=lambda n: n.at)


def flags_of(stack: Stack) -> dict[str, float]:
    """Every client the exporter flags, and when it first flagged it (its wall clock), from its own /metrics."""
    return {dict(labels)["client"]: value for (name, labels), value in stack.exporter_metrics().items()
            if name == "monitaur_client_flagged_timestamp_seconds"}


def page_latencies(flags: dict[str, float], received: list[Notification]) -> dict[str, dict[str, float | None]]:
    """Per flagged client and sink: seconds from the exporter's first flag to the first page naming the client (None: none)."""
    out: dict[str, dict[str, float | None]] = {}
    for client, flagged_at in flags.items():
        out[client] = {}
        for sink in ("slack", "email"):
            first = next((n.at for n in received if n.sink == sink and client in n.page_clients), None)
            out[client][sink] = None if first is None else first - flagged_at
    return out
