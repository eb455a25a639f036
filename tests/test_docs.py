"""The README and docs/: short README with the two commands, links that lead somewhere,
dashboard titles as the dashboards have them, figures as results rather than history."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_lead_somewhere(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_readme_is_short_and_shows_the_two_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "sudo apt-get install -y python3-venv" in text  # the prerequisite, stated exactly
    assert "python3 -m venv .venv && .venv/bin/pip install . &&" in text and "\nbash .ci/run\n" in text
    assert "python3 -m pip" not in text and not re.search(r"^\s*(sudo )?pip3? install", text, re.M)  # nothing into the system Python
    assert "logs/example.jsonl localhost" not in text and "@logs/example.jsonl" not in text  # never re-push a read log
    assert "Authorization` header is ignored" in text  # loopback without tokens, said


def test_ci_installs_into_a_virtual_environment() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "-m venv .venv" in ci and ".venv/bin/python -m pip install" in ci and ".venv/bin/python -m pytest" in ci
    assert "python3 -m pip" not in ci
    for package in ("python3-venv", "prometheus", "prometheus-alertmanager", "docker-compose", "nginx", "chromium"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", ci), package


def test_dashboard_titles_in_the_docs_are_the_real_ones() -> None:
    titles = {json.loads(p.read_text())["title"] for p in (REPO / "dashboards").glob("*.json")}
    mentioned = set()
    for page in PAGES:
        mentioned |= set(re.findall(r"\*(MONITAUR[^*]*)\*", page.read_text(encoding="utf-8")))
    assert mentioned and mentioned <= titles, mentioned - titles


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_figures_are_results_not_history(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for phrase in ("this round", "at the start of", "before the last", "earlier in the session", "where it used to"):
        assert phrase not in text, f"{page.name}: {phrase!r}"
    assert "python3 -m pip" not in text, f"{page.name}: pip into the system Python"


def test_the_calibration_example_creates_its_config() -> None:
    text = (REPO / "docs" / "calibration.md").read_text(encoding="utf-8")
    assert text.index("cat > monitaur.yml") < text.index("calibrate --config monitaur.yml")
