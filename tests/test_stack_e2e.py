"""End to end: the whole monitoring topology on 127.0.0.1, with the real components.

    log files + HTTP push ──> monitaur-exporter run ──scrape──> Prometheus ──> Alertmanager
                                                                                 ├─ Slack webhook ──> local HTTP sink
                                                                                 └─ SMTP relay ────> local SMTP sink (aiosmtpd)

Every component is the real one, started as a process (no Docker): the exporter
(``python3 -m exporter run``), Debian's ``prometheus`` and ``prometheus-alertmanager``
(upstream's ``alertmanager`` name works too). Slack and the mail relay are replaced by
local sinks that record what they receive.

Prometheus and Alertmanager run the repository's OWN files; the test writes copies in
which ONLY ADDRESSES AND INTERVALS ARE REWRITTEN:

- ``prometheus/prometheus.yml``: the scrape targets (``exporter:9717``,
  ``alertmanager:9093``, ``localhost:9090``) and the Alertmanager target become
  ``127.0.0.1:<port>``; scrape and evaluation intervals become 1s; ``rule_files`` points
  to copies of ``alert_rules/*.yml`` in which only the ``for:`` durations are shortened
  (to ``FOR``, or ``FOR_OF``); every expression, label and annotation is the repository's.
- ``alertmanager/alertmanager.yml``: the Slack ``api_url_file`` and
  ``smtp_auth_password_file`` point to temp files (the webhook file holds the HTTP
  sink's URL), ``smtp_smarthost`` is the SMTP sink, ``smtp_require_tls`` is false (the
  local sink has no TLS: part of the address-level rewrite, the relay being another
  one), ``templates`` is the repository's templates directory, and every route's
  ``group_wait``/``group_interval``/``repeat_interval`` is shortened. The sink requires
  AUTH PLAIN (without TLS, on loopback) with the password of the temp file, so the
  ``smtp_auth_username`` and password file of the real config are exercised too.

The exporter's config is the test's own (poll-mode tailing of a temp log dir, state in
tmp, a push token). Its limits (``state.max_clients``, ``metrics.max_client_series``)
are set from the attack run's client count, and the test-only detector
``tests.plugins:Broken`` (fails on clients named ``crash*``) is loaded, so that the
attack run produces the data every rule and dashboard query reads (see below); the
benign run stays under every limit and has no ``crash*`` client.

Run 1 (attack): the traffic of ``exporter.demo.example_log()`` (8 benign ``app-NN``
clients, and the attackers ``scraper-repeat``, ``scraper-search``, ``scraper-boundary``),
plus ``scraper-sybil`` (a second identity sending scraper-repeat's queries, nearly
unchanged), a ``crash-00`` client and ~8% malformed lines, is fed gradually over ~25 s
(rates need several scrapes): mostly appended to a tailed log (with two rename-and-create
rotations and two copytruncates), one chunk pushed over HTTP. With the embedded default
detectors and no calibration profile, the fused ``risk`` flags the scrapers and none of
the ``app-`` clients. The test asserts that MonitaurModelExtractionSuspected for
scraper-repeat reaches BOTH sinks (critical routes to e-mail and Slack), that no
notification and no alert names an ``app-`` client, and that every PromQL expression of
``dashboards/*.json`` (Grafana variables substituted: ``GRAFANA_VARS``) and every
``expr`` of ``alert_rules/*.yml`` parses and returns data on the live Prometheus, except:
``MAY_BE_EMPTY`` (alerts on failures the test does not cause), expressions on a detector
that is not enabled (``NEEDS_DETECTOR``, cross-client evidence) and ``KNOWN_BUGS``.

Run 2 (benign): fresh exporter, Prometheus, Alertmanager and sinks; only the ``app-``
clients' traffic. After it is ingested, the rules are evaluated for OBSERVE seconds
(checked through Prometheus's own rule-group iteration counter): no alert fires and
neither sink receives anything.

Skipped only when a binary is missing (Debian packages prometheus,
prometheus-alertmanager; .ci/run installs them). aiosmtpd is a test dependency.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import requests
import yaml

from tests.conftest import REPO, ExporterProcess, free_port, parse_metrics, sample, wait_for

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),  # the SMTP sink, on loopback
    pytest.mark.skipif(
        PROMETHEUS is None or ALERTMANAGER is None,
        reason="needs the prometheus and alertmanager binaries (Debian packages prometheus, prometheus-alertmanager; .ci/run installs them)",
    ),
]

RULES_DIR = REPO / "alert_rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
AM_TEMPLATES = REPO / "alertmanager" / "templates"

FOR = "5s"  # every `for:` of the rules, shortened
# ... except these. Prometheus hands its first targets to the scrape manager only after
# its discovery update interval (5 s), so `up` is absent for the first ~5-6 s after
# start (measured: first scrape 5.5 s in), and `absent(up)` would fire
# MonitaurExporterDown at every start with a 5 s `for:`. The test never needs it to fire
# (promtool tests do); 30 s keeps the startup gap out of the notifications.
FOR_OF = {"MonitaurExporterDown": "30s"}
INTERVAL = "1s"  # scrape and rule evaluation
AM_TIMING = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1m"}
WAIT = 90.0  # bound of every wait for something that should happen
OBSERVE = 20.0  # benign run: seconds of rule evaluations during which nothing may be sent
FEED_SECONDS = 25.0

MODEL = "digits"
ATTACKER = "scraper-repeat"  # the client the dashboards' $client stands for
ATTACKERS = {"scraper-repeat", "scraper-search", "scraper-boundary", "scraper-sybil"}
BENIGN = re.compile(r"\bapp-\d+\b")
DETECTION_ALERTS = {"MonitaurModelExtractionSuspected", "MonitaurQueryFlood", "MonitaurBoundaryProbing", "MonitaurSybilClusterSuspected"}
PUSH_TOKEN = "e2e-push-token"
SMTP_USER = "monitaur-alertmanager"  # smtp_auth_username of alertmanager/alertmanager.yml
SMTP_PASSWORD = "e2e-smtp-password"
GRAFANA_VARS = {"$__rate_interval": "1m", "$client": ATTACKER, "$job": "monitaur", "$model": MODEL}

# Cross-client evidence (monitaur_client_cross_client_matches_total > 0, peer series)
# comes only from a detector that indexes all clients' queries (fingerprint); the
# exporter exports zeros without one. Expressions reading it may be empty while no such
# detector is enabled (e.g. the embedded defaults); once one is, the `scraper-sybil`
# identity, which replays scraper-repeat's queries, gives them data like the rest.
CROSS_CLIENT_DETECTORS = {"fingerprint"}
CROSS_CLIENT_METRICS = ("monitaur_client_cross_client_matches_total", "monitaur_client_peer_matches", "cross_client_matches")

# Alert expressions allowed to return nothing in the attack run: their condition is a
# failure the test cannot (or must not) produce. The series they read are checked through
# the recording rules (every recording rule must return data) and `up`.
MAY_BE_EMPTY = {
    # the exporter must be up, or nothing else works (asserted via up == 1)
    "MonitaurExporterDown": "the exporter is up",
    # 10 MiB unread for 15 minutes: reads path:monitaur_file_lag_bytes:max
    "MonitaurIngestionLagging": "the exporter keeps up with a few hundred lines",
    # needs an unwritable state dir; root ignores permissions. Reads kind:monitaur_checkpoint_errors:rate5m
    "MonitaurCheckpointFailing": "checkpoints succeed",
    # the exporter's own check failing for 5 minutes; reads monitaur_ingest_healthy, which the
    # "Ingest health" panel shows (and must return data)
    "MonitaurIngestionUnhealthy": "ingestion works",
}
# Alerts allowed empty only while the detector they read is not enabled in the exporter.
NEEDS_DETECTOR = {"MonitaurBoundaryProbing": "confidence"}
# Expressions empty because of a known exporter bug: (rule or panel, part of the expr, bug).
# Strict, like xfail(strict=True): once the expression returns data, the test fails and
# asks for the entry to be removed.
KNOWN_BUGS: list[tuple[str, str, str]] = []


# =========================================================================== sinks
class HTTPSink:
    """Slack's incoming webhook, replaced: records every JSON body POSTed to it."""

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
                    sink.bodies.append({"path": self.path, "body": body})
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
    """The mail relay, replaced: an aiosmtpd server that requires AUTH and records messages."""

    def __init__(self, user: str, password: str) -> None:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError:  # a test dependency: fail loudly rather than skip the whole topology
            pytest.fail("aiosmtpd is not installed: pip install aiosmtpd (a test dependency)")
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
                    sink.messages_.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos), "subject": str(msg["Subject"]), "text": "\n".join(parts)})
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
def shortened_rules(dest: Path) -> list[Path]:
    """Copies of alert_rules/*.yml in which only the `for:` durations are shortened (FOR, FOR_OF)."""
    dest.mkdir()
    out = []
    for path in RULE_FILES:
        text = path.read_text(encoding="utf-8")
        lines, alert = [], None
        for line in text.splitlines(keepends=True):
            if m := re.match(r"\s*- alert:\s*(\S+)", line):
                alert = m.group(1)
            line = re.sub(r"^(\s+for:[ \t]*)\S+([ \t]*)$", lambda m: f"{m.group(1)}{FOR_OF.get(alert, FOR)}{m.group(2)}", line)
            lines.append(line)
        new = "".join(lines)
        # nothing but `for:` changed
        original, copy = yaml.safe_load(text), yaml.safe_load(new)
        assert len(original["groups"]) == len(copy["groups"])
        for g1, g2 in zip(original["groups"], copy["groups"]):
            assert len(g1["rules"]) == len(g2["rules"])
            for r1, r2 in zip(g1["rules"], g2["rules"]):
                if "for" in r1:
                    assert r2["for"] == FOR_OF.get(r1.get("alert"), FOR)
                    r2 = {**r2, "for": r1["for"]}
                assert r1 == r2, f"rewriting {path.name} changed more than `for:`"
        (dest / path.name).write_text(new, encoding="utf-8")
        out.append(dest / path.name)
    return out


def prometheus_config(workdir: Path, exporter_port: int, prom_port: int, am_port: int) -> Path:
    """The repository's prometheus/prometheus.yml with addresses and intervals rewritten."""
    cfg = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    address = {"exporter:9717": f"127.0.0.1:{exporter_port}", "alertmanager:9093": f"127.0.0.1:{am_port}", "localhost:9090": f"127.0.0.1:{prom_port}"}

    def rewrite(targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in address]
        assert not unknown, f"prometheus.yml has targets this test does not know how to rewrite: {unknown}"
        return [address[t] for t in targets]

    cfg["global"].update(scrape_interval=INTERVAL, scrape_timeout=INTERVAL, evaluation_interval=INTERVAL)
    rules = shortened_rules(workdir / "rules")
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


def alertmanager_config(workdir: Path, slack_url: str, smtp_port: int) -> Path:
    """The repository's alertmanager/alertmanager.yml with addresses, intervals and secret paths rewritten."""
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
    cfg["templates"] = [str(AM_TEMPLATES / "*.tmpl")]

    def shorten(route: dict) -> None:
        for key, value in AM_TIMING.items():
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

    def __init__(self, workdir: Path, exporter_config: dict[str, Any]) -> None:
        self.workdir = workdir
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
        am_cfg = alertmanager_config(self.workdir, self.slack.url, self.smtp.port)
        self.alertmanager = Process(
            "alertmanager",
            [ALERTMANAGER, f"--config.file={am_cfg}", f"--storage.path={self.workdir / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{self.am_port}", "--cluster.listen-address=",
             f"--web.external-url=http://127.0.0.1:{self.am_port}"],
            self.workdir / "alertmanager.log",
        )
        prom_cfg = prometheus_config(self.workdir, self.exporter.port, self.prom_port, self.am_port)
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


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], Stack]]:
    made: list[Stack] = []

    def make(name: str, exporter_config: dict[str, Any]) -> Stack:
        stack = Stack(tmp_path / name, exporter_config)
        made.append(stack)
        return stack.start()

    yield make
    for stack in made:
        stack.stop()


# =========================================================================== traffic
def demo_lines() -> list[str]:
    from exporter.demo import example_log

    return list(example_log())


def sybil_lines(lines: list[str], of: str = "scraper-repeat", name: str = "scraper-sybil", shift: float = 1.0) -> list[str]:
    """A second identity sending another attacker's queries a moment later (a Sybil pair).

    Each copy has one feature moved by 0.01: a near-duplicate, not an exact repeat (the
    fingerprint detector ignores exact repeats across clients, the repetition detector's job).
    """
    out = []
    rows = [obj for obj in map(json.loads, lines) if obj["client"] == of]
    for k, obj in enumerate(rows):
        x = obj["input"]
        x[k % len(x)] = round(x[k % len(x)] + 0.01, 3)
        obj.update(client=name, ts=round(obj["ts"] + shift, 3), input=x)
        out.append(json.dumps(obj))
    return out


def crash_client_lines(n: int = 24) -> list[str]:
    """A client whose every batch the test-only detector `broken` fails on: detector errors."""
    from exporter.demo import DigitsLike, benign_rows, to_lines

    world = DigitsLike(0)  # example_log(seed=0)'s world
    return list(to_lines(world, benign_rows(world, np.random.default_rng(7), 1, n, 1764097200.0, prefix="crash-")))


MALFORMED = ["{not json", '{"input": [1, 2]}']  # malformed_json, missing_client


def by_time(lines: list[str]) -> list[str]:
    return sorted(lines, key=lambda line: json.loads(line)["ts"])


def clients_of(lines: list[str]) -> set[str]:
    return {json.loads(line)["client"] for line in lines}


def with_malformed(lines: list[str], every: int = 12) -> list[str]:
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i % every == every - 1:
            out.append(MALFORMED[(i // every) % len(MALFORMED)])
    return out


def append(path: Path, rows: list[str]) -> None:
    with open(path, "a") as fh:
        fh.write("".join(r + "\n" for r in rows))


class Feeder(threading.Thread):
    """Feeds lines gradually (rates need several scrapes), with rotations, copytruncates and a push.

    Events: ("rotate", i) renames the log away and creates a new one, ("truncate", i)
    copies it away and truncates it (copytruncate), ("push", i) POSTs chunk i to the
    exporter instead of appending it. Each rotation and truncation waits for the exporter
    to count it before more lines are written, so that none goes unnoticed.
    """

    def __init__(self, stack: Stack, lines: list[str], seconds: float, chunks: int, events: dict[int, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.stack, self.seconds, self.events = stack, seconds, events or {}
        self.chunks = [list(c) for c in np.array_split(np.array(lines, dtype=object), chunks)]
        self.log = stack.logs / "api.jsonl"
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _counter(self, name: str) -> float:
        return sample(self.stack.exporter_metrics(), name, path=str(self.log)) or 0.0

    def run(self) -> None:
        try:
            pause = self.seconds / len(self.chunks)
            for i, chunk in enumerate(self.chunks):
                event = self.events.get(i)
                if event == "rotate":
                    before = self._counter("monitaur_file_rotations_total")
                    os.rename(self.log, self.stack.logs / f"api.jsonl.rotated-{i}")
                    append(self.log, chunk)
                    wait_for(lambda: self._counter("monitaur_file_rotations_total") > before, timeout=WAIT, what="rotation noticed")
                elif event == "truncate":
                    before = self._counter("monitaur_file_truncations_total")
                    shutil.copy(self.log, self.stack.logs / f"api.jsonl.copy-{i}")
                    with open(self.log, "r+") as fh:
                        fh.truncate(0)
                    wait_for(lambda: self._counter("monitaur_file_truncations_total") > before, timeout=WAIT, what="truncation noticed")
                    append(self.log, chunk)
                elif event == "push":
                    r = requests.post(self.stack.exporter.url + "/api/v1/events", data="\n".join(chunk).encode(),
                                      headers={"Authorization": f"Bearer {PUSH_TOKEN}"}, timeout=10)
                    assert r.status_code == 202, r.text
                else:
                    append(self.log, chunk)
                time.sleep(pause)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()

    def result(self) -> None:
        self.join(timeout=WAIT)
        assert not self.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise self.error


def exporter_config(max_clients: int, max_client_series: int) -> dict[str, Any]:
    return {
        "push": {"tokens": [PUSH_TOKEN]},
        "state": {"max_clients": max_clients},
        "metrics": {"max_client_series": max_client_series},
        "plugins": {"broken": "tests.plugins:Broken"},
        "log_level": "info",
    }


# =========================================================================== expressions
def rule_exprs() -> list[tuple[str, str, str]]:
    """(file, rule name, expr) of every rule in alert_rules/*.yml."""
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                out.append((path.name, rule.get("alert") or rule["record"], rule["expr"].strip()))
    return out


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(file, panel title, expr with Grafana variables substituted) of every panel target."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in iter_panels(board["panels"]):
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], grafana(target["expr"])))
    return out


def dashboard_variables() -> list[tuple[str, str, str, str]]:
    """(file, variable, selector, label) of every `label_values(selector, label)` variable."""
    out = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text(encoding="utf-8"))["templating"]["list"]:
            if var.get("type") == "query":
                m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"])
                assert m, var["query"]
                out.append((path.name, var["name"], grafana(m.group(1)), m.group(2)))
    return out


def enabled_detectors(metrics_text: str) -> set[str]:
    """The exporter's enabled detectors: it zero-initialises monitaur_detector_errors_total for each."""
    return {dict(labels)["detector"] for (name, labels) in parse_metrics(metrics_text) if name == "monitaur_detector_errors_total"}


def known_bug(name: str, expr: str) -> str | None:
    return next((bug for rule, part, bug in KNOWN_BUGS if rule == name and part in expr), None)


def allowed_empty(name: str, expr: str, detectors: set[str]) -> str | None:
    """Why this expression may return no data in the attack run, or None if it must return data."""
    if known_bug(name, expr):
        return known_bug(name, expr)
    if name in MAY_BE_EMPTY:
        return MAY_BE_EMPTY[name]
    if name in NEEDS_DETECTOR and NEEDS_DETECTOR[name] not in detectors:
        return f"the {NEEDS_DETECTOR[name]} detector is not enabled"
    if any(m in expr for m in CROSS_CLIENT_METRICS) and not CROSS_CLIENT_DETECTORS & detectors:
        return "no detector gives cross-client evidence"
    return None


# =========================================================================== the test
def notifications_of(stack: Stack) -> tuple[list[str], list[str]]:
    """The Slack bodies and the e-mails received, as text."""
    slack = [json.dumps(m["body"]) for m in stack.slack.messages()]
    mails = [f"To: {m['to']}\nSubject: {m['subject']}\n{m['text']}" for m in stack.smtp.messages()]
    return slack, mails


def test_stack_end_to_end(stacks) -> None:
    # ---------------------------------------------------------------- run 1: attack
    demo = demo_lines()
    attack = by_time(demo + sybil_lines(demo) + crash_client_lines())
    clients = clients_of(attack)
    assert ATTACKERS <= clients and any(BENIGN.fullmatch(c) for c in clients)
    benign_clients = {c for c in clients if BENIGN.fullmatch(c)}
    # Limits that this run reaches and the benign run (only the benign clients) does not:
    # tracked clients == state.max_clients (no eviction yet), and more exported clients
    # than metrics.max_client_series.
    config = exporter_config(max_clients=len(clients), max_client_series=len(benign_clients) + 1)
    stack = stacks("attack", config)
    lines = with_malformed(attack)
    feeder = Feeder(stack, lines, FEED_SECONDS, 50, {3: "push", 6: "rotate", 12: "rotate", 18: "truncate", 24: "truncate"})
    feeder.start()

    def extraction_alert_firing() -> list[dict]:
        if feeder.error is not None:
            raise feeder.error
        return [a for a in stack.alerts() if a["labels"]["alertname"] == "MonitaurModelExtractionSuspected" and a["state"] == "firing"]

    try:
        firing = wait_for(extraction_alert_firing, timeout=WAIT, interval=0.5, what="MonitaurModelExtractionSuspected firing in Prometheus")
        assert {a["labels"]["client"] for a in firing} <= ATTACKERS, firing
        alert = next(a for a in firing)
        assert alert["labels"]["model"] == MODEL and alert["labels"]["severity"] == "critical"
        # the alert's value is the fused risk, 0..1
        assert 0 < float(alert["value"]) <= 1 and "above the calibrated threshold" in alert["annotations"]["description"]
        wait_for(lambda: any(a["labels"].get("client") == ATTACKER and a["state"] == "firing" for a in stack.alerts()),
                 timeout=WAIT, interval=0.5, what=f"an alert firing for {ATTACKER}")

        # Every query of the dashboards and the rules returns data on the live Prometheus.
        detectors = enabled_detectors(stack.exporter.scrape_text())
        assert {"confidence", "broken"} <= detectors, detectors
        checks = [(f"{f} / {title} #{i}", title, expr) for i, (f, title, expr) in enumerate(dashboard_exprs())]
        checks += [(f"{f} / {name} #{i}", name, expr) for i, (f, name, expr) in enumerate(rule_exprs())]
        pending = {label: expr for label, name, expr in checks if not allowed_empty(name, expr, detectors)}
        for label, name, expr in checks:  # every one parses, allowed-empty or not
            body = stack.query_raw(expr)
            assert body.get("status") == "success", f"{label}: {expr}\n{body}"

        def remaining() -> dict[str, str]:
            for label in list(pending):
                if stack.query(pending[label]):
                    del pending[label]
            return pending

        deadline = time.monotonic() + WAIT
        while remaining() and time.monotonic() < deadline:
            time.sleep(1)
        assert not pending, "queries with no data on the live Prometheus:\n" + "\n".join(f"  {k}: {v}" for k, v in pending.items())
        for label, name, expr in checks:
            if known_bug(name, expr):
                assert not stack.query(expr), f"{label} returns data now: remove its KNOWN_BUGS entry ({known_bug(name, expr)})"
        for f, var, selector, label in dashboard_variables():
            values = {s["metric"].get(label) for s in stack.query(selector)}
            wanted = {"job": "monitaur", "client": ATTACKER, "model": MODEL}[var]
            assert wanted in values, f"{f}: variable {var} = label_values({selector}, {label}) has no {wanted!r}: {values}"

        # MonitaurModelExtractionSuspected reaches Slack AND e-mail (critical routes to both),
        # naming the attacker in the title and in the body.
        def delivered() -> bool:
            slack, mails = notifications_of(stack)
            pattern = re.compile(rf"MonitaurModelExtractionSuspected.{{0,40}}client {ATTACKER} on model {MODEL}")
            return any(pattern.search(s) and f"client `{ATTACKER}`" in s for s in slack) and any(
                pattern.search(m) and re.search(rf"Client: +{ATTACKER}\b", m) for m in mails
            )

        wait_for(delivered, timeout=WAIT, interval=0.5, what=f"MonitaurModelExtractionSuspected for {ATTACKER} in both sinks")
        feeder.result()
        assert stack.smtp.logins, "Alertmanager did not authenticate with the password file"
        assert all(m["to"] == ["security-oncall@example.com"] for m in stack.smtp.messages())

        # The traffic is all in: let the rules run long enough for anything pending to fire
        # and be notified (for: + group_wait, twice over), then nothing names a benign client.
        wait_for(stack.caught_up, timeout=WAIT, interval=0.2, what="the exporter reading the logs to their end")
        start = min(stack.rule_iterations().values())
        wait_for(lambda: min(stack.rule_iterations().values()) >= start + 15, timeout=WAIT, interval=0.5, what="15 more rule evaluations")
        bad_alerts = [a for a in stack.alerts() if BENIGN.search(a["labels"].get("client", ""))]
        assert not bad_alerts, f"alerts about benign clients: {bad_alerts}"
        slack, mails = notifications_of(stack)
        for text in slack + mails:
            assert not BENIGN.search(text), f"a notification names a benign client:\n{text[:3000]}"
        flagged = {s["metric"]["client"] for s in stack.query('monitaur_client_suspicious{job="monitaur"} == 1')}
        assert flagged & ATTACKERS and not flagged & benign_clients, flagged
        notified = set(re.findall(r"MonitaurModelExtractionSuspected.{0,40}client (\S+) on model", "\n".join(slack + mails)))
        assert ATTACKER in notified and notified <= ATTACKERS, notified
        assert not any("MonitaurExporterDown" in s for s in slack + mails)
        assert not stack.rules_health(), stack.rules_health()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.diagnostics()}") from None
    finally:
        feeder.done.wait(timeout=WAIT)
    stack.stop()  # frees the CPU for the second run

    # ---------------------------------------------------------------- run 2: benign only
    benign = [line for line in attack if BENIGN.fullmatch(json.loads(line)["client"])]
    stack2 = stacks("benign", config)
    try:
        feeder2 = Feeder(stack2, benign, FEED_SECONDS / 2, 25)
        feeder2.start()
        feeder2.result()
        wait_for(lambda: sample(stack2.exporter_metrics(), "monitaur_events_total", model=MODEL) == len(benign), timeout=WAIT, interval=0.2, what="benign traffic ingested")
        start_iterations = stack2.rule_iterations()
        assert len(start_iterations) >= 3, start_iterations  # monitaur.rules, monitaur.detection, monitaur.exporter
        t0 = time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= OBSERVE and min(stack2.rule_iterations().values()) >= min(start_iterations.values()) + OBSERVE / 2,
                 timeout=WAIT + OBSERVE, interval=0.5, what=f"{OBSERVE:.0f}s of rule evaluations")
        assert not stack2.rules_health(), stack2.rules_health()
        assert stack2.query('up{job="monitaur"} == 1')
        assert not stack2.query('monitaur_client_suspicious{job="monitaur"} == 1')
        alerts = stack2.alerts()
        assert not [a for a in alerts if a["labels"]["alertname"] in DETECTION_ALERTS], alerts
        assert not [a for a in alerts if a["state"] == "firing"], f"alerts firing on benign traffic: {alerts}"
        slack, mails = notifications_of(stack2)
        assert not slack and not mails, f"notifications on benign traffic:\nSlack: {slack}\nE-mail: {mails}"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack2.diagnostics()}") from None
