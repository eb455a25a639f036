"""The "zero to first page" path (docs/zero-to-first-page.md): its setup script makes the
secrets with the owners the containers need, and ``scripts/test-notification`` sends a test
alert that the repository's Alertmanager routing delivers to Slack and to e-mail.

The second test runs Debian's ``prometheus-alertmanager`` with ``alertmanager/alertmanager.yml``
(addresses, secret paths and group_wait rewritten), a local HTTP sink for Slack and a local
SMTP sink (aiosmtpd) for the relay. It is skipped when the binary is missing (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, free_port
from tests.stack import HTTPSink, SMTPSink

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def test_first_page_setup_makes_the_secrets_with_their_owners(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changes owners: runs as root (CI), or by hand with sudo")
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    (work / "alertmanager").mkdir()
    shutil.copy(REPO / "scripts" / "first-page-setup", work / "scripts")
    shutil.copy(REPO / "alertmanager" / "alertmanager.yml", work / "alertmanager")
    (tmp_path / "relay").write_text("relay-secret\n")
    env = {**os.environ, "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/X", "SMTP_PASSWORD_FILE": str(tmp_path / "relay")}
    run = subprocess.run(["sh", str(work / "scripts" / "first-page-setup")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    token = work / "secrets" / "push_tokens"
    assert len(token.read_text().strip()) == 64 and (token.stat().st_uid, token.stat().st_mode & 0o777) == (10001, 0o400)
    for name, content in (("slack_webhook_url", "https://hooks.slack.com/services/T0/B0/X\n"), ("smtp_password", "relay-secret\n")):
        f = work / "alertmanager" / "secrets" / name
        assert f.read_text() == content and (f.stat().st_uid, f.stat().st_mode & 0o777) == (65534, 0o400)
    assert "smtp_smarthost is the placeholder" in run.stdout
    first = token.read_text()
    run = subprocess.run(["sh", str(work / "scripts" / "first-page-setup")], capture_output=True, text=True, env={**os.environ})
    assert run.returncode == 0 and token.read_text() == first and "exists: kept" in run.stdout  # a rerun keeps the token


SMTP_USER, SMTP_PASSWORD = "alertmanager", "relay-password"


def alertmanager_config(tmp_path: Path, slack_url: str, smtp_port: int) -> Path:
    cfg = yaml.safe_load((REPO / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8"))
    (tmp_path / "slack_webhook_url").write_text(slack_url)
    (tmp_path / "smtp_password").write_text(SMTP_PASSWORD)
    cfg["global"].update(smtp_smarthost=f"127.0.0.1:{smtp_port}", smtp_require_tls=False, smtp_auth_username=SMTP_USER,
                         smtp_auth_password_file=str(tmp_path / "smtp_password"))
    cfg["templates"] = [str(REPO / "alertmanager" / "templates" / "*.tmpl")]
    cfg["route"]["group_wait"] = "1s"
    for receiver in cfg["receivers"]:
        for slack in receiver.get("slack_configs", []):
            slack["api_url_file"] = str(tmp_path / "slack_webhook_url")
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.skipif(ALERTMANAGER is None, reason="needs prometheus-alertmanager (Debian package prometheus-alertmanager; .ci/run installs it)")
def test_test_notification_reaches_slack_and_email(tmp_path: Path) -> None:
    pytest.importorskip("aiosmtpd", reason="aiosmtpd is a test dependency: pip install -e '.[test]'")
    slack, mail = HTTPSink(), SMTPSink(SMTP_USER, SMTP_PASSWORD)
    port = free_port()
    log = open(tmp_path / "am.log", "wb")
    am = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={alertmanager_config(tmp_path, slack.url, mail.port)}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert am.poll() is None and time.monotonic() < deadline, (tmp_path / "am.log").read_text()
            time.sleep(0.1)
        run = subprocess.run([sys.executable, str(REPO / "scripts" / "test-notification"), "--alertmanager", url],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 0 and "accepted the critical test alert" in run.stdout, run.stderr
        deadline = time.monotonic() + 30
        while not (slack.messages() and mail.messages()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slack.messages() and mail.messages(), (slack.messages(), mail.messages(), (tmp_path / "am.log").read_text()[-2000:])
        posted = json.dumps(slack.messages()[0]["body"])
        assert "MonitaurTestNotification" in posted and "Nothing is under attack" in posted
        assert "MonitaurTestNotification" in mail.messages()[0]["subject"] and "Nothing is under attack" in mail.messages()[0]["text"]
        unreachable = subprocess.run([sys.executable, str(REPO / "scripts" / "test-notification"), "--alertmanager", f"http://127.0.0.1:{free_port()}"],
                                     capture_output=True, text=True, timeout=30)
        assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    finally:
        am.terminate()
        am.wait(timeout=10)
        log.close()
        slack.close()
        mail.close()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose (Debian package docker-compose; .ci/run installs it)")
def test_the_own_logs_override_of_the_guide_is_valid_compose(tmp_path: Path) -> None:
    """docs/zero-to-first-page.md, "Your own logs": its docker-compose.override.yml replaces the demo's log volume."""
    text = (REPO / "docs" / "zero-to-first-page.md").read_text(encoding="utf-8")
    [override] = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if block.startswith("services:")]
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / "docker-compose.override.yml").write_text(override)
    run = subprocess.run(["docker-compose", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    exporter = yaml.safe_load(run.stdout)["services"]["exporter"]
    mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v['target']}" for v in exporter["volumes"]]
    on_logs = [m for m in mounts if ":/var/log/monitaur" in m]
    assert len(on_logs) == 1 and on_logs[0].startswith("/var/log/myapi:"), mounts
    assert exporter["environment"]["MONITAUR_FILES__PATHS"] == "/var/log/monitaur/predictions*.jsonl"
    assert exporter["environment"]["MONITAUR_PUSH__TOKENS_FILE"] == "/run/secrets/push_tokens"  # the rest is kept
