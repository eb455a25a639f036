"""Static checks of the monitoring bundle: Prometheus, alert rules, Alertmanager, Grafana, compose.

The bundle lives in prometheus/, alert_rules/, alertmanager/, grafana/, dashboards/,
docker-compose.yml and Dockerfile. These tests run the real validators (promtool, amtool,
docker-compose) on it and check the conventions the files promise in their comments and
in docs/operations.md. A test is skipped only when its validator is not installed
(Debian packages prometheus, prometheus-alertmanager, docker-compose; .ci/run installs them).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES_DIR = REPO / "alert_rules"
ALERTS_FILE = RULES_DIR / "monitaur.alerts.yml"
RECORDING_FILE = RULES_DIR / "monitaur.rules.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
AM_CONFIG = REPO / "alertmanager" / "alertmanager.yml"
AM_TEMPLATES = REPO / "alertmanager" / "templates"
DASHBOARDS = REPO / "dashboards"
RUNBOOK = REPO / "exporter" / "runbook.md"  # served by the exporter at /runbook (docs/runbook.md points to it)
COMPOSE = REPO / "docker-compose.yml"

RUNBOOK_BASE = "http://localhost:9717/runbook"  # alertmanager/templates/links.tmpl: the exporter's /runbook
GRAFANA_BASE = "http://localhost:3000"  # ... and the compose stack's Grafana
PAGE = "MonitaurModelExtractionSuspected"  # the page: sticky verdict, fast timings
JOINED = "MonitaurSybilGroupJoined"  # a key new to a flagged group: new for 10 minutes only (the rule's comment)
CLIENT_DASHBOARD = "/d/monitaur-client/monitaur-client?var-client="
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
DATASOURCE_UID = "monitaur-prometheus"
SEVERITIES = {"critical", "warning", "info"}
REQUIRED_ALERTS = {
    "MonitaurModelExtractionSuspected",
    "MonitaurQueryFlood",
    "MonitaurBoundaryProbing",
    "MonitaurSybilClusterSuspected",
    "MonitaurExporterDown",
    "MonitaurIngestionLagging",
    "MonitaurIngestionUnhealthy",
    "MonitaurEventsRejected",
    "MonitaurDetectorErrors",
    "MonitaurClientCardinalityCapReached",
}
DETECTION_GROUP = "monitaur.detection"


def _tool(name: str, package: str):
    path = shutil.which(name)
    return path, pytest.mark.skipif(path is None, reason=f"{name} is not installed (Debian package {package!r})")


PROMTOOL, needs_promtool = _tool("promtool", "prometheus")
AMTOOL, needs_amtool = _tool("amtool", "prometheus-alertmanager")
DOCKER_COMPOSE, needs_compose = _tool("docker-compose", "docker-compose")


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)


def render(tmp_path: Path, data: dict, template: str, kind: str | None = None) -> str:
    """``amtool template render`` of one of the bundle's templates on a notification's data (its stdout)."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    res = run(AMTOOL, "template", "render", f"--template.glob={AM_TEMPLATES}/*.tmpl", f"--template.data={path}",
              *([f"--template.type={kind}"] if kind else []), f"--template.text={{{{ template \"{template}\" . }}}}")
    assert res.returncode == 0, res.stderr
    return res.stdout


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[tuple[str, dict]]:
    """(group name, rule) of every alerting rule."""
    return [(g["name"], r) for g in load_yaml(ALERTS_FILE)["groups"] for r in g["rules"] if "alert" in r]


def alert_names() -> set[str]:
    return {r["alert"] for _, r in alert_rules()}


def duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unparsable duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


# =========================================================================== Prometheus
def test_prometheus_config_contract():
    cfg = load_yaml(REPO / "prometheus" / "prometheus.yml")
    assert cfg["global"]["scrape_interval"] == "15s"
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = [t for sc in jobs["monitaur"]["static_configs"] for t in sc["targets"]]
    assert targets == ["exporter:9717"], "scrape the compose service name, not localhost"
    am = [t for a in cfg["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert am == ["alertmanager:9093"]


@needs_promtool
def test_promtool_check_config(tmp_path):
    cfg = load_yaml(REPO / "prometheus" / "prometheus.yml")
    cfg["rule_files"] = [str(RULES_DIR / "*.yml")]  # the repository's files instead of the container path
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    res = run(PROMTOOL, "check", "config", path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "monitaur.alerts.yml" in out and "monitaur.rules.yml" in out, out


@needs_promtool
def test_promtool_check_rules():
    files = sorted(RULES_DIR.glob("*.yml"))
    assert {f.name for f in files} == {"monitaur.rules.yml", "monitaur.alerts.yml"}
    res = run(PROMTOOL, "check", "rules", *files)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    assert RULE_TESTS, "no promtool unit tests in alert_rules/tests/"
    res = run(PROMTOOL, "test", "rules", *(p.name for p in RULE_TESTS), cwd=RULES_DIR / "tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(RULE_TESTS), res.stdout


# =========================================================================== rule conventions
def test_required_alerts_exist():
    assert REQUIRED_ALERTS <= alert_names()


def test_recording_rule_names_follow_level_metric_operations():
    records = [r["record"] for g in load_yaml(RECORDING_FILE)["groups"] for r in g["rules"] if "record" in r]
    assert records
    assert len(records) == len(set(records)), "duplicate recording rule"
    for name in records:
        assert re.fullmatch(r"[a-z][a-z_]*:monitaur_[a-z_]+:[a-z0-9_]+", name), name
    # the alerts only use recorded series that exist
    used = set(re.findall(r"\b[a-z_]+:monitaur_[a-z_]+:[a-z0-9_]+\b", ALERTS_FILE.read_text(encoding="utf-8")))
    assert used and used <= set(records), used - set(records)


@pytest.mark.parametrize("group,rule", alert_rules(), ids=lambda v: v if isinstance(v, str) else v["alert"])
def test_alert_conventions(group, rule):
    name = rule["alert"]
    assert re.fullmatch(r"Monitaur[A-Z][A-Za-z]+", name), name
    assert rule["labels"]["severity"] in SEVERITIES
    ann = rule["annotations"]
    for key in ("summary", "description", "runbook_url", "dashboard_url"):
        assert ann.get(key), f"{name}: annotation {key} missing"
    assert "{{" in ann["description"], f"{name}: the description should be templated"
    assert ann["runbook_url"] == f"#{name.lower()}", "a relative anchor in the runbook (links.tmpl gives the base URL)"
    if name == PAGE:
        # the exporter's verdict is sticky and calibrated: the delay only rides out a scrape (alertmanager.yml, the rule's comment)
        assert rule["for"] == "1m" and rule["keep_firing_for"] == "2m", rule
        assert "by (job, client, model)" in rule["expr"] and '"group"' in rule["expr"], "the flag's model, and the group label pages group by"
    elif name == JOINED:
        # its condition holds for the 10 minutes a member stays new; `for` eats into them
        assert rule["for"] == "1m" and "[1h] offset 10m" in rule["expr"] and "[1h] offset 9m" in rule["expr"], rule
    else:
        assert duration_seconds(rule["for"]) >= 300, f"{name}: `for:` shorter than 5m flaps"
    if group == DETECTION_GROUP:
        assert 'client!="__other__"' in rule["expr"], f"{name}: per-client alerts must exclude __other__"
        if name != PAGE:
            assert "group_left (model)" in rule["expr"] or "group_left(model)" in rule["expr"], f"{name}: join the model"
        assert ann["dashboard_url"].startswith(CLIENT_DASHBOARD + "{{ $labels.client"), ann["dashboard_url"]
        for label in ("$labels.client", "$labels.model"):
            assert label in ann["description"], f"{name}: the description should name {label}"
        assert ann.get("score"), f"{name}: detection alerts carry a score annotation for the notifications"


def test_runbook_has_a_section_per_alert():
    text = RUNBOOK.read_text(encoding="utf-8")
    headings = set(re.findall(r"^##+ +(\S+) *$", text, flags=re.M))
    missing = alert_names() - headings
    assert not missing, f"exporter/runbook.md has no section for {sorted(missing)}"
    for name in alert_names():
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0].lower()
        for part in ("meaning", "impact", "diagnosis", "mitigation"):
            assert part in section, f"runbook section {name} lacks {part}"


def _unit_test_cases() -> dict[str, dict[str, int]]:
    """alertname -> {"fires": n, "silent": n} over every alert_rule_test in alert_rules/tests."""
    cases: dict[str, dict[str, int]] = {}
    for path in RULE_TESTS:
        for test in load_yaml(path).get("tests", []):
            for case in test.get("alert_rule_test", []) or []:
                c = cases.setdefault(case["alertname"], {"fires": 0, "silent": 0})
                expected = case.get("exp_alerts") or []
                if expected:
                    c["fires"] += 1
                    for exp in expected:
                        assert exp.get("exp_labels", {}).get("severity") in SEVERITIES, (path.name, case)
                        ann = exp.get("exp_annotations") or {}
                        assert {"summary", "description", "runbook_url"} <= set(ann), (path.name, case["alertname"])
                else:
                    c["silent"] += 1
    return cases


def test_every_alert_has_firing_and_silent_unit_tests():
    cases = _unit_test_cases()
    assert set(cases) <= alert_names(), f"tests for unknown alerts: {set(cases) - alert_names()}"
    for name in sorted(alert_names()):
        assert cases.get(name, {}).get("fires"), f"{name}: no unit test where it fires"
        assert cases.get(name, {}).get("silent"), f"{name}: no unit test where it must not fire"


def _mutated_unit_tests(tmp_path: Path, alertname: str, new_expr: str) -> subprocess.CompletedProcess:
    work = tmp_path / "alert_rules"
    shutil.copytree(RULES_DIR, work)
    doc = load_yaml(ALERTS_FILE)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alertname:
                rule["expr"] = new_expr
    (work / ALERTS_FILE.name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    # promtool only checks the alerts that a test file names: run just those files.
    files = [p.name for p in RULE_TESTS if f"alertname: {alertname}" in p.read_text(encoding="utf-8")]
    assert files, f"no unit test names {alertname}"
    return run(PROMTOOL, "test", "rules", *files, cwd=work / "tests")


@needs_promtool
@pytest.mark.parametrize("alertname", sorted(alert_names()))
def test_unit_tests_catch_an_alert_that_never_fires(tmp_path, alertname):
    res = _mutated_unit_tests(tmp_path, alertname, "vector(1) == 0")
    assert res.returncode != 0, f"{alertname}: the unit tests still pass when the alert can never fire"


@needs_promtool
@pytest.mark.parametrize("alertname", sorted(alert_names()))
def test_unit_tests_catch_an_alert_that_always_fires(tmp_path, alertname):
    res = _mutated_unit_tests(tmp_path, alertname, "vector(1)")
    assert res.returncode != 0, f"{alertname}: the unit tests still pass when the alert always fires"


# =========================================================================== Alertmanager
def _am_config_for_tools(tmp_path: Path) -> Path:
    """The config with secret files created in tmp_path and the templates read from the repo."""
    text = AM_CONFIG.read_text(encoding="utf-8")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "slack_webhook_url").write_text("https://hooks.slack.com/services/T000/B000/XXXX\n")
    (secrets / "smtp_password").write_text("not-a-real-password\n")
    text = text.replace("/etc/alertmanager/secrets/", f"{secrets}/")
    text = text.replace("/etc/alertmanager/templates/", f"{AM_TEMPLATES}/")
    path = tmp_path / "alertmanager.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_alertmanager_config_contract():
    cfg = load_yaml(AM_CONFIG)
    g = cfg["global"]
    assert g["smtp_auth_password_file"] == "/etc/alertmanager/secrets/smtp_password"
    assert "smtp_auth_password" not in g and g["smtp_smarthost"]
    assert cfg["route"]["group_by"] == ["alertname", "client"]
    (critical,) = [r for r in cfg["route"]["routes"] if r["matchers"] == ['severity="critical"']]
    # pages: one per client or linked group, within seconds, repeats rate-limited (the route's comment)
    assert critical["group_by"] == ["alertname", "group"] and critical["group_wait"] == "5s"
    assert duration_seconds(critical["repeat_interval"]) >= 3600
    assert cfg["templates"] == ["/etc/alertmanager/templates/*.tmpl"]
    for receiver in cfg["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert slack["api_url_file"] == "/etc/alertmanager/secrets/slack_webhook_url"
            assert "api_url" not in slack
    assert not re.search(r"hooks\.slack\.com/services/T", AM_CONFIG.read_text()), "a webhook URL is committed"


def test_exporter_down_inhibits_every_detection_alert():
    detection = {r["alert"] for g, r in alert_rules() if g in (DETECTION_GROUP, "monitaur.groups")}
    assert {"MonitaurModelExtractionSuspected", "MonitaurQueryFlood", "MonitaurBoundaryProbing", "MonitaurSybilClusterSuspected",
            "MonitaurSybilGroupSuspected", "MonitaurSybilGroupJoined"} <= detection
    for rule in load_yaml(AM_CONFIG)["inhibit_rules"]:
        if rule.get("source_matchers") == ['alertname="MonitaurExporterDown"']:
            (target,) = rule["target_matchers"]
            m = re.fullmatch(r'alertname=~"(.*)"', target)
            assert m, target
            assert all(re.fullmatch(m.group(1), name) for name in detection)
            assert not re.fullmatch(m.group(1), "MonitaurExporterDown")
            # the absent() form of MonitaurExporterDown only has `job`; detection alerts keep it
            assert rule["equal"] == ["job"]
            break
    else:
        pytest.fail("no inhibit rule with source alertname=MonitaurExporterDown")


def test_alertmanager_secrets_are_not_committed():
    secrets = REPO / "alertmanager" / "secrets"
    assert (secrets / "README.md").is_file()
    ignore = (secrets / ".gitignore").read_text().split()
    assert ignore[0] == "*" or "*" in ignore
    assert {"!README.md", "!.gitignore"} <= set(ignore)
    if shutil.which("git") and (REPO / ".git").exists():
        res = run("git", "check-ignore", "-q", "alertmanager/secrets/slack_webhook_url")
        assert res.returncode == 0, "alertmanager/secrets/slack_webhook_url would not be ignored by git"


@needs_amtool
def test_amtool_check_config(tmp_path):
    res = run(AMTOOL, "check-config", _am_config_for_tools(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "SUCCESS" in out and "1 templates" in out, out


@needs_amtool
@pytest.mark.parametrize(
    "severity,receivers",
    [
        ("critical", "monitaur-email,monitaur-slack"),
        ("warning", "monitaur-slack"),
        ("info", "monitaur-info"),
        ("", "monitaur-slack"),  # a rule without severity still reaches someone
    ],
)
def test_amtool_routes(tmp_path, severity, receivers):
    config = _am_config_for_tools(tmp_path)
    labels = ["alertname=MonitaurModelExtractionSuspected", "client=mallory"] + ([f"severity={severity}"] if severity else [])
    res = run(AMTOOL, "config", "routes", "test", f"--config.file={config}", f"--verify.receivers={receivers}", *labels)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == receivers
    # and the verification really verifies
    wrong = run(AMTOOL, "config", "routes", "test", f"--config.file={config}", "--verify.receivers=nobody", *labels)
    assert wrong.returncode != 0


@needs_amtool
def test_group_alerts_are_notified_per_exporter_and_group_to_both_page_receivers(tmp_path):
    """The exporters of an HA pair number their groups independently: g3 on one and g3 on the
    other can be unrelated groups, which must not share a notification."""
    config = _am_config_for_tools(tmp_path)
    for alertname in ("MonitaurSybilGroupSuspected", "MonitaurSybilGroupJoined"):
        labels = [f"alertname={alertname}", "severity=critical", "group=g3", "instance=exporter-a:9717", "client=k1"]
        res = run(AMTOOL, "config", "routes", "test", f"--config.file={config}", "--verify.receivers=monitaur-email,monitaur-slack", *labels)
        assert res.returncode == 0, res.stdout + res.stderr
    (critical,) = [r for r in load_yaml(AM_CONFIG)["route"]["routes"] if r.get("matchers") == ['severity="critical"']]
    (groups,) = [r for r in critical["routes"] if "MonitaurSybilGroupJoined" in str(r.get("matchers"))]
    assert groups["group_by"] == ["alertname", "instance", "group"]
    assert all(re.fullmatch(groups["matchers"][0].split("=~")[1].strip('"'), name) for name in ("MonitaurSybilGroupSuspected", "MonitaurSybilGroupJoined"))


# Each fact appears in exactly one field, so a template that drops a field fails the test:
# the client label is "mallory@corp", while the dashboard path carries it URL-encoded.
SAMPLE_ALERT = {
    "status": "firing",
    "labels": {
        "alertname": "MonitaurModelExtractionSuspected",
        "severity": "critical",
        "job": "monitaur",
        "client": "mallory@corp",
        "model": "resnet50",
        "group": "client/mallory@corp",
        "detector": "risk",
    },
    "annotations": {
        "summary": "Model extraction suspected.",
        "description": "Flagged by the exporter.",
        "score": "0.91",
        "evidence": "knn 1.84x, prada 1.10x",
        "flagged_query": "37",
        "runbook_url": "#monitaurmodelextractionsuspected",
        "dashboard_url": CLIENT_DASHBOARD + "mallory%40corp",
    },
    "startsAt": "2024-05-01T10:00:00Z",
    "endsAt": "0001-01-01T00:00:00Z",
    "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
    "fingerprint": "0123456789abcdef",
}
SAMPLE_FACTS = {
    "client": "mallory@corp",
    "model": "resnet50",
    "detector": "risk",
    "score": "0.91",
    "detectors over their thresholds": "knn 1.84x, prada 1.10x",
    "query of the flag": "37",
    "dashboard link": GRAFANA_BASE + CLIENT_DASHBOARD + "mallory%40corp",
    "runbook link": RUNBOOK_BASE + "#monitaurmodelextractionsuspected",
}


@needs_amtool
@pytest.mark.parametrize(
    "template,kind",
    [
        ("monitaur.slack.text", "text"),
        ("monitaur.email.text", "text"),
        ("monitaur.email.html", "html"),
    ],
)
def test_notification_templates_name_client_model_detector_score_and_dashboard(tmp_path, template, kind):
    data = {
        "receiver": "monitaur-slack",
        "status": "firing",
        "alerts": [SAMPLE_ALERT],
        "groupLabels": {"alertname": "MonitaurModelExtractionSuspected", "group": "client/mallory@corp"},
        "commonLabels": {"alertname": "MonitaurModelExtractionSuspected", "job": "monitaur"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
    }
    out = render(tmp_path, data, template, kind)
    for what, fact in SAMPLE_FACTS.items():
        assert fact in out, f"{template} does not show the {what} ({fact!r}):\n{out}"


# =========================================================================== Grafana
def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS.glob("*.json"))}


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def test_dashboard_files_and_uids():
    boards = dashboards()
    assert set(boards) == {"monitaur-overview.json", "monitaur-client.json", "monitaur-health.json"}
    for name, board in boards.items():
        assert board["uid"] == name.removesuffix(".json")
        assert board["schemaVersion"] >= 36
        assert "monitaur" in board.get("tags", [])
    uids = [b["uid"] for b in boards.values()]
    assert len(uids) == len(set(uids))


def test_alert_dashboard_links_point_to_existing_dashboards():
    uids = {b["uid"] for b in dashboards().values()}
    for _, rule in alert_rules():
        m = re.match(r"/d/([a-z0-9-]+)/", rule["annotations"]["dashboard_url"])
        assert m and m.group(1) in uids, rule["annotations"]["dashboard_url"]


@pytest.mark.parametrize("name", ["monitaur-overview.json", "monitaur-client.json", "monitaur-health.json"])
def test_dashboard_conventions(name):
    board = dashboards()[name]
    text = json.dumps(board)
    assert DATASOURCE_UID not in text, "hard-coded data source uid"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DS_REF, var["name"]
    ids = []
    exprs = []
    for panel in iter_panels(board["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DS_REF, f"{panel['title']}: panel data source"
        assert panel.get("targets"), f"{panel['title']}: no query"
        assert panel.get("description"), f"{panel['title']}: no description"
        for t in panel["targets"]:
            assert t.get("datasource") == DS_REF, f"{panel['title']}: target data source"
            exprs.append((panel["title"], t["expr"]))
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for title, expr in exprs:
        calls = re.findall(r"\b(?:rate|irate|increase)\s*\(", expr)
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{title}: range other than $__rate_interval in {expr}"
        assert len(ranges) >= len(calls), f"{title}: rate/irate/increase without a range in {expr}"


def test_dashboards_cover_their_topics():
    boards = {n: json.dumps(b) for n, b in dashboards().items()}
    wanted = {
        "monitaur-overview.json": ["monitaur_client_risk", "monitaur_client_suspicious", "monitaur_client_flagged_timestamp_seconds", "monitaur_client_flags_total", "monitaur_events_total", "monitaur_events_rejected_total",
                                   "monitaur_group_members", "monitaur_group_score", "monitaur_group_suspicious"],
        "monitaur-client.json": ["monitaur_client_queries_total", "monitaur_client_score", "monitaur_prediction_confidence_bucket",
                                 "monitaur_client_cross_client_matches_total", "monitaur_client_peer_matches"],
        "monitaur-health.json": ["monitaur_file_size_bytes", "monitaur_file_offset_bytes", "monitaur_events_rejected_total", "monitaur_detector_errors_total",
                                 "monitaur_tracked_clients", "monitaur_client_evictions_total", "monitaur_detector_duration_seconds_bucket",
                                 "monitaur_ingest_healthy", "monitaur_file_lines_total", "monitaur_file_rotations_total"],
    }
    for name, needles in wanted.items():
        for needle in needles:
            assert needle in boards[name], f"{name} does not show {needle}"
    client_var = {v["name"]: v for v in dashboards()["monitaur-client.json"]["templating"]["list"]}["client"]
    assert re.fullmatch(r"label_values\(monitaur_client_queries_total(\{[^}]*\})?, *client\)", client_var["query"]), client_var["query"]


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """Every panel query, with Grafana's variables substituted, is valid PromQL."""
    subst = {"$__rate_interval": "1m", "$job": "monitaur", "$client": "mallory", "$model": ".+"}
    rules = []
    for name, board in dashboards().items():
        for panel in iter_panels(board["panels"]):
            for t in panel.get("targets", []):
                expr = t["expr"]
                for k, v in subst.items():
                    expr = expr.replace(k, v)
                assert "$" not in expr, f"{name}/{panel['title']}: unknown variable in {t['expr']}"
                rules.append({"record": f"dashboard:query_{len(rules)}:check", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    res = run(PROMTOOL, "check", "rules", path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_matches():
    ds = load_yaml(REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    (prom,) = [d for d in ds if d["type"] == "prometheus"]
    assert prom["uid"] == DATASOURCE_UID
    assert prom["url"] == "http://prometheus:9090"
    assert prom["jsonData"]["timeInterval"] == load_yaml(REPO / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    (provider,) = load_yaml(REPO / "grafana" / "provisioning" / "dashboards" / "monitaur.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# =========================================================================== compose, Dockerfile
def test_compose_contract():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"exporter", "demo", "prometheus", "alertmanager", "grafana"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    exporter = services["exporter"]
    env = exporter["environment"]
    assert env["MONITAUR_LISTEN__HOST"] == "0.0.0.0"
    assert env["MONITAUR_PUSH__TOKENS_FILE"] == "/run/secrets/push_tokens"
    assert compose["secrets"]["push_tokens"]["file"] == "./secrets/push_tokens"
    assert services["demo"]["profiles"] == ["demo"]
    assert services["demo"]["command"][0] == "simulate"
    log_volume = lambda svc: [v for v in svc["volumes"] if v.endswith(":/var/log/monitaur")]  # noqa: E731
    assert log_volume(exporter) == log_volume(services["demo"]) == ["monitaur-logs:/var/log/monitaur"]
    assert "--web.enable-lifecycle" in services["prometheus"]["command"]
    mounts = services["prometheus"]["volumes"] + services["alertmanager"]["volumes"] + services["grafana"]["volumes"]
    for mount in ("./alert_rules:/etc/prometheus/rules:ro", "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
                  "./alertmanager/secrets:/etc/alertmanager/secrets:ro", "./alertmanager/templates:/etc/alertmanager/templates:ro",
                  "./grafana/provisioning:/etc/grafana/provisioning:ro", "./dashboards:/var/lib/grafana/dashboards:ro"):
        assert mount in mounts, mount
    assert {"monitaur-logs", "monitaur-state", "prometheus-data"} <= set(compose["volumes"])


@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "demo"]], ids=["default", "demo"])
def test_docker_compose_config(profile):
    res = run(DOCKER_COMPOSE, "-f", COMPOSE, *profile, "config", "-q")
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and froms[-1] == "python:3.11-slim"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and not users[-1].startswith(("root", "0")), "the image must run as a non-root user"
    # the exporter's own probe: its config's address, TLS when its web config says so (tests/test_webconfig.py)
    assert re.search(r'^HEALTHCHECK .*CMD \["monitaur-exporter", "healthcheck"\]', text, flags=re.M | re.S)
    assert re.search(r"^EXPOSE 9717$", text, flags=re.M)
    assert re.search(r'^ENTRYPOINT \["monitaur-exporter"\]$', text, flags=re.M)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "*" in ignore and "!exporter/" in ignore and "!pyproject.toml" in ignore


@needs_amtool
@pytest.mark.parametrize(
    "template,kind",
    [("monitaur.slack.title", "text"), ("monitaur.slack.text", "text"), ("monitaur.email.html", "html")],
)
def test_client_controlled_values_are_escaped_in_slack_and_html(tmp_path, template, kind):
    """A client id or model name may hold Slack or HTML markup: '<!channel>' must not notify a channel."""
    client, model = "<!channel> & <b>mallory</b>", "m<@U123>"
    alert = {
        **SAMPLE_ALERT,
        "labels": {**SAMPLE_ALERT["labels"], "client": client, "model": model},
        "annotations": {**SAMPLE_ALERT["annotations"], "summary": f"Model extraction suspected from client {client}.", "description": f"Client {client}."},
    }
    data = {"receiver": "x", "status": "firing", "alerts": [alert], "groupLabels": {"alertname": "MonitaurModelExtractionSuspected", "group": "client/" + client},
            "commonLabels": alert["labels"], "commonAnnotations": {}, "externalURL": "http://alertmanager:9093"}
    out = render(tmp_path, data, template, kind)
    assert "&lt;!channel&gt; &amp; &lt;b&gt;mallory&lt;/b&gt;" in out and "m&lt;@U123&gt;" in out, out
    for raw in ("<!channel>", "<b>mallory", "<@U123>", "& <"):
        assert raw not in out, out


def test_links_come_from_one_base_url_each():
    """links.tmpl holds the runbook and Grafana base URLs; rules carry relative links; the dashboards' runbook link agrees."""
    links = (AM_TEMPLATES / "links.tmpl").read_text(encoding="utf-8")
    assert f'{{{{ define "monitaur.runbook_url" }}}}{RUNBOOK_BASE}{{{{ end }}}}' in links
    assert f'{{{{ define "monitaur.grafana_url" }}}}{GRAFANA_BASE}{{{{ end }}}}' in links
    others = [p for p in AM_TEMPLATES.glob("*.tmpl") if p.name != "links.tmpl"]
    assert not any(re.search(r"https?://localhost", p.read_text(encoding="utf-8")) for p in others), "a base URL outside links.tmpl"
    for name, board in dashboards().items():
        urls = [link["url"] for link in board.get("links", []) if "runbook" in link["url"]]
        assert urls == [RUNBOOK_BASE], (name, urls)
    assert "https://" not in ALERTS_FILE.read_text(encoding="utf-8").split("groups:", 1)[1], "absolute links in the rules"


@needs_amtool
def test_a_group_notification_lists_every_member_and_details_ten(tmp_path):
    """A linked group (label `group`) pages once: every member named, the first 10 detailed, so one attack's message is bounded."""
    alerts = [{**SAMPLE_ALERT, "labels": {**SAMPLE_ALERT["labels"], "client": f"syb-{i:02d}", "group": "group/g7"}, "fingerprint": f"{i:016x}"} for i in range(12)]
    common = {k: v for k, v in SAMPLE_ALERT["labels"].items() if k != "client"} | {"group": "group/g7"}
    data = {"receiver": "x", "status": "firing", "alerts": alerts, "groupLabels": {"alertname": "MonitaurModelExtractionSuspected", "group": "group/g7"},
            "commonLabels": common, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093"}
    out = {template: render(tmp_path, data, template) for template in ("monitaur.slack.title", "monitaur.slack.text", "monitaur.email.text")}
    assert out["monitaur.slack.title"].strip() == "[FIRING:12] MonitaurModelExtractionSuspected — group g7 (12 clients) on model resnet50 (critical)"
    for template in ("monitaur.slack.text", "monitaur.email.text"):
        text = out[template]
        assert all(f"syb-{i:02d}" in text.split("\n", 1)[0] for i in range(12)), text[:300]  # the members, on the first line
        assert text.count("Model extraction suspected.") == 10 and "12 alerts in this group; the first 10 are detailed above." in text


@needs_amtool
def test_keys_that_join_a_flagged_group_share_one_notification_naming_the_group_and_each_key(tmp_path):
    """MonitaurSybilGroupJoined: one alert per new key (label client), grouped per exporter and group."""
    alerts = [{**SAMPLE_ALERT, "labels": {"alertname": "MonitaurSybilGroupJoined", "severity": "critical", "job": "monitaur",
                                          "instance": "exporter:9717", "group": "g7", "model": "resnet50", "client": client},
               "fingerprint": f"{i:016x}"} for i, client in enumerate(("k-new1", "k-new2"))]
    common = {k: v for k, v in alerts[0]["labels"].items() if k != "client"}
    data = {"receiver": "x", "status": "firing", "alerts": alerts,
            "groupLabels": {"alertname": "MonitaurSybilGroupJoined", "instance": "exporter:9717", "group": "g7"},
            "commonLabels": common, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093"}
    assert render(tmp_path, data, "monitaur.slack.title").strip() == "[FIRING:2] MonitaurSybilGroupJoined — group g7 on model resnet50 (critical)"
    for template in ("monitaur.slack.text", "monitaur.email.text"):
        first = render(tmp_path, data, template).split("\n", 1)[0]
        assert "k-new1" in first and "k-new2" in first, (template, first)


@needs_amtool
@pytest.mark.parametrize(
    "labels,title",
    [
        # a group's page with one member flagged so far: still the group's notification, not a lone client's
        ({"client": "syb-03", "group": "group/g7"}, "[FIRING:1] MonitaurModelExtractionSuspected — group g7 (1 clients) on model resnet50 (critical)"),
        # the group alert (label group, no client): one alert for the whole group, not "(1 clients)"
        ({"alertname": "MonitaurSybilGroupSuspected", "client": None, "detector": None, "group": "g7"},
         "[FIRING:1] MonitaurSybilGroupSuspected — group g7 on model resnet50 (critical)"),
        # a lone client's page
        ({}, "[FIRING:1] MonitaurModelExtractionSuspected — client mallory@corp on model resnet50 (critical)"),
    ],
    ids=["group-page-of-one", "group-alert", "client-page"],
)
def test_notification_titles_name_the_group_or_the_client(tmp_path, labels, title):
    alert_labels = {k: v for k, v in {**SAMPLE_ALERT["labels"], **labels}.items() if v is not None}
    data = {"receiver": "x", "status": "firing", "alerts": [{**SAMPLE_ALERT, "labels": alert_labels}],
            "groupLabels": {"alertname": alert_labels["alertname"], "group": alert_labels["group"]},
            "commonLabels": alert_labels, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093"}
    for template in ("monitaur.slack.title", "monitaur.email.subject"):
        out = render(tmp_path, data, template)
        assert out.strip() == title, (template, out)
