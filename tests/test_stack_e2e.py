"""End to end: the whole monitoring topology on 127.0.0.1, with the real components
(tests/stack.py: the exporter, Debian's Prometheus and Alertmanager, a Slack sink and an
SMTP sink), at shortened timings (``FAST``: 1 s scrapes and evaluations, 5 s ``for:``,
1 s Alertmanager waits); only addresses, intervals and the links' base URLs of the
repository's files are rewritten. The real timings are measured by bench/page_latency.py.

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
detectors and no calibration profile, the verdict flags the scrapers and none of
the ``app-`` clients. The test asserts that no flagged client is lost: every client the
exporter flagged (its own /metrics and log) gets MonitaurModelExtractionSuspected in
BOTH sinks (critical routes to e-mail and Slack), naming it, the detectors over their
calibrated thresholds at the flag with how far, and links built from the configured base
URLs; that no notification and no alert names an ``app-`` client; and that every PromQL expression of
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

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import requests
import yaml

from tests.conftest import REPO, parse_metrics, sample, wait_for
from tests.stack import ALERTMANAGER, FAST, LINKS, PAGE, PROMETHEUS, RULE_FILES, WAIT, Stack, flags_of, notifications, page_latencies

pytestmark = [
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),  # the SMTP sink, on loopback
    pytest.mark.skipif(
        PROMETHEUS is None or ALERTMANAGER is None,
        reason="needs the prometheus and alertmanager binaries (Debian packages prometheus, prometheus-alertmanager; .ci/run installs them)",
    ),
]

DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
OBSERVE = 20.0  # benign run: seconds of rule evaluations during which nothing may be sent
FEED_SECONDS = 25.0

MODEL = "digits"
ATTACKER = "scraper-repeat"  # the client the dashboards' $client stands for
ATTACKERS = {"scraper-repeat", "scraper-search", "scraper-boundary", "scraper-sybil"}
BENIGN = re.compile(r"\bapp-\d+\b")
DETECTION_ALERTS = {"MonitaurModelExtractionSuspected", "MonitaurQueryFlood", "MonitaurBoundaryProbing", "MonitaurSybilClusterSuspected"}
PUSH_TOKEN = "e2e-push-token"
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
    # a flagged group of linked clients: the demo's attackers are not a Sybil split (tests/test_stack_sybil.py has one)
    "MonitaurSybilGroupSuspected": "no linked group in this traffic",
    # a key that joins a group after its page: needs a paged group and 10 minutes of its alert's history
    "MonitaurSybilGroupJoined": "no linked group in this traffic",
    "Linked groups": "the links detector is off here (tests/test_stack_sybil.py reads this panel)",
}
# Alerts allowed empty only while the detector they read is not enabled in the exporter.
NEEDS_DETECTOR = {"MonitaurBoundaryProbing": "confidence"}
# Expressions empty because of a known exporter bug: (rule or panel, part of the expr, bug).
# Strict, like xfail(strict=True): once the expression returns data, the test fails and
# asks for the entry to be removed.
KNOWN_BUGS: list[tuple[str, str, str]] = []


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], Stack]]:
    made: list[Stack] = []

    def make(name: str, exporter_config: dict[str, Any]) -> Stack:
        stack = Stack(tmp_path / name, exporter_config, FAST)
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
        assert alert["labels"]["group"] == "client/" + alert["labels"]["client"]  # a page per client (no linked groups here)
        # the alert's value is when the exporter flagged the client; the description says by what, how far over its threshold
        assert abs(float(alert["value"]) - time.time()) < WAIT
        assert re.search(r"thresholds at the flag \(value / threshold\): \w+ \d+\.\d\dx", alert["annotations"]["description"]), alert
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
        # naming the attacker in the title and in the body, with the evidence and working links.
        def delivered() -> bool:
            received = notifications(stack)
            return all(any(n.sink == sink and ATTACKER in n.page_clients for n in received) for sink in ("slack", "email"))

        wait_for(delivered, timeout=WAIT, interval=0.5, what=f"{PAGE} for {ATTACKER} in both sinks")
        received = notifications(stack)
        for sink in ("slack", "email"):
            text = next(n.text for n in received if n.sink == sink and ATTACKER in n.page_clients)
            assert re.search(rf"{PAGE}.{{0,40}}client {ATTACKER} on model {MODEL}", text), text
            assert re.search(r"repetition \d+\.\d\dx", text), f"the detector over its threshold, and how far:\n{text}"
            runbook = LINKS["monitaur.runbook_url"] + "#" + PAGE.lower()
            dashboard = LINKS["monitaur.grafana_url"] + f"/d/monitaur-client/monitaur-client?var-client={ATTACKER}"
            assert runbook in text and dashboard in text, f"links from links.tmpl's base URLs:\n{text}"
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
        received = notifications(stack)
        for n in received:
            assert not BENIGN.search(n.text), f"a notification names a benign client:\n{n.text[:3000]}"
        assert not any("MonitaurExporterDown" in n.text for n in received)
        assert not stack.rules_health(), stack.rules_health()

        # No flagged client is lost: every client the exporter flagged (its metrics, and its log:
        # nothing flagged vanished from the metrics) has its own page in both sinks.
        flags = flags_of(stack)
        logged = set(re.findall(r"client (\S+) flagged by ", stack.exporter.log_text()))
        assert ATTACKER in flags and set(flags) == logged and set(flags) <= ATTACKERS, (flags, logged)
        assert not set(flags) & benign_clients, flags
        latencies = page_latencies(flags, received)
        lost = {c: sinks for c, sinks in latencies.items() if None in sinks.values()}
        assert not lost, f"flagged clients without a page: {lost}"
        paged = set().union(*(n.page_clients for n in received))
        assert paged == set(flags), (paged, flags)
        # with FAST timings (for: 5s, waits of 1s) a page follows its flag within seconds
        print("first flag -> page (s), FAST timings:", {c: {s: round(t, 1) for s, t in v.items()} for c, v in latencies.items()})
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
        received = notifications(stack2)
        assert not received, f"notifications on benign traffic: {[n.text for n in received]}"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack2.diagnostics()}") from None
