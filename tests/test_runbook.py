"""The runbook the exporter serves at /runbook: where every alert's runbook link leads by default."""

from __future__ import annotations

import re
import tomllib

import requests
import yaml

from exporter import runbook
from exporter.app import App
from exporter.config import Settings
from tests.conftest import REPO


def alert_names() -> set[str]:
    doc = yaml.safe_load((REPO / "alert_rules" / "monitaur.alerts.yml").read_text(encoding="utf-8"))
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_every_alerts_runbook_anchor_is_a_heading_of_the_served_page() -> None:
    page = runbook.page().decode()
    ids = set(re.findall(r'<h\d id="([^"]+)"', page))
    doc = yaml.safe_load((REPO / "alert_rules" / "monitaur.alerts.yml").read_text(encoding="utf-8"))
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                anchor = rule["annotations"]["runbook_url"]
                assert anchor == f"#{rule['alert'].lower()}" and anchor[1:] in ids, (rule["alert"], anchor)
    assert len(alert_names()) >= 10


def test_the_markdown_subset_is_rendered_and_escaped() -> None:
    html = runbook.to_html("# T\n\n## Monitaur<b>X</b>\n\nSee `a<b>` and **bold** [doc](#x) [bad](javascript:alert(1)).\n\n"
                           "1. one\n   more\n2. two\n\n| a | b |\n|---|---|\n| `c` | d |\n\n```sh\necho <x>\n```\n")
    assert '<h2 id="monitaurbxb">Monitaur&lt;b&gt;X&lt;/b&gt;</h2>' in html
    assert "<code>a&lt;b&gt;</code>" in html and "<b>bold</b>" in html and '<a href="#x">doc</a>' in html
    assert '<a href="#">bad</a>' in html and "javascript" not in html
    assert "<ol><li>one more</li><li>two</li></ol>" in html
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td><code>c</code></td><td>d</td></tr></table>" in html
    assert "<pre><code>echo &lt;x&gt;</code></pre>" in html


def test_the_runbook_ships_in_the_package() -> None:
    """The container image installs the wheel only: the runbook must be package data."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "runbook.md" in project["tool"]["setuptools"]["package-data"]["exporter"]
    assert (REPO / "exporter" / "runbook.md").is_file()


def test_the_exporter_serves_it(tmp_path) -> None:
    app = App(Settings(listen={"port": 0}, files={"paths": []}, state={"dir": None}))
    app.start()
    try:
        host, port = app.address
        r = requests.get(f"http://{host}:{port}/runbook", timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        assert 'id="monitaurmodelextractionsuspected"' in r.text
        assert 'href="/runbook"' in requests.get(f"http://{host}:{port}/", timeout=5).text
    finally:
        app.stop()
