"""The forensic report page (exporter/report_html.py): content, escaping, and a real browser.

The browser tests load pages from ``file://`` in headless Chromium (bench/chromium.py),
with DNS refused and a dead loopback proxy: nothing leaves the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from exporter.config import Settings
from exporter.demo import example_log
from exporter.replay import replay
from exporter.report_html import CSS, SCRIPT, _path, render_client, render_report, replay_summary, when
from exporter.timelines import Timeline, TimelineRecorder
from tests.conftest import REPO, load_script

chromium = load_script(REPO / "bench" / "chromium.py", "bench_chromium")
needs_chromium = pytest.mark.skipif(chromium.find_chromium() is None, reason="needs Debian's chromium")

SCRAPERS = ("scraper-boundary", "scraper-repeat", "scraper-search")
# Printable client ids (the decoder accepts them) that would be markup or script if not escaped.
PAYLOADS = {
    "scraper-boundary": "<script>document.body.setAttribute('data-pwned','1')</script>",
    "scraper-repeat": "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">",
    "scraper-search": "'></a></td></table></svg><svg onload=document.body.setAttribute('data-pwned','3')>",
    "app-00": "#t0' onclick='document.body.dataset.pwned=4",
    "app-01": "</title></style></script><script>document.body.dataset.pwned=5</script>",
}
HOSTILE_MODEL = "</p><iframe srcdoc='<script>parent.document.body.dataset.pwned=6</script>'>"
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "thead", "tbody", "tr", "th", "td",
    "a", "span", "ul", "li", "strong", "section", "svg", "rect", "text", "line", "path", "circle", "script",
}  # fmt: skip


class Page(HTMLParser):
    """Tags, attributes, script and style bodies, and text of a page."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.raw: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in self.raw else None

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self.raw[self._in].append(data)
        else:
            self.text.append(data)


def assert_only_our_markup(source: str) -> Page:
    page = Page(source)
    assert {t for t, _ in page.tags} <= ALLOWED_TAGS
    assert [t for t, _ in page.tags].count("script") == 1 and page.raw["script"] == [SCRIPT]
    assert [t for t, _ in page.tags].count("style") == 1 and page.raw["style"] == [CSS]
    for tag, attrs in page.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert "src" not in attrs and "srcdoc" not in attrs
        href = attrs.get("href")
        assert href is None or (href.startswith("#t") and href[2:].isdigit()), href
        assert attrs.get("id") is None or attrs["id"] in ("flagged-list", "clients", "groups", "peers", "render-check") or attrs["id"][1:].isdigit()
    csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and csp[0].startswith("default-src 'none'; script-src 'sha256-")
    return page


def write_demo(path: Path, rename: dict[str, str] | None = None, model: str | None = None, marker: float | None = None) -> Path:
    rows = []
    for line in example_log():
        obj = json.loads(line)
        obj["client"] = (rename or {}).get(obj["client"], obj["client"])
        if model is not None:
            obj["model"] = model
        if marker is not None:
            obj["input"][7] = marker
        rows.append(json.dumps(obj))
    path.write_text("".join(r + "\n" for r in rows))
    return path


def replay_page(tmp_path: Path, log: Path) -> tuple[dict[str, Any], Path]:
    out = tmp_path / "report.html"
    run = subprocess.run([sys.executable, "-m", "exporter", "replay", "--compact", "--html", str(out), str(log)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), out


# -- the page, without a browser ---------------------------------------------------------------
def test_replay_html_writes_the_page_and_still_prints_the_report(tmp_path: Path) -> None:
    report, out = replay_page(tmp_path, write_demo(tmp_path / "demo.jsonl"))
    assert {c for c, v in report["clients"].items() if v["flagged"]} == set(SCRAPERS)
    source = out.read_text(encoding="utf-8")
    page = assert_only_our_markup(source)
    text = " ".join(page.text)
    assert "events accepted 1,440" in " ".join(text.split())
    assert "No calibration profile" in text and "No false-alarm rate is promised" in text
    assert [t for t, a in page.tags if t == "svg" and a.get("class") == "timeline"] == ["svg"] * 3
    assert sum(1 for t, a in page.tags if t == "tr") >= 23
    assert "http://" not in source.replace("http://www.w3.org/2000/svg", "")  # no external asset
    assert "https://" not in source


def test_replay_html_reports_an_unwritable_path(tmp_path: Path) -> None:
    log = write_demo(tmp_path / "demo.jsonl")
    (tmp_path / "file").write_text("")
    run = subprocess.run([sys.executable, "-m", "exporter", "replay", "--html", str(tmp_path / "file" / "r.html"), str(log)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1 and "cannot write" in run.stderr


def test_the_page_never_shows_inputs(tmp_path: Path) -> None:
    """Only derived values in [0, 1], ids and times: a recognisable input value never appears."""
    _, out = replay_page(tmp_path, write_demo(tmp_path / "demo.jsonl", marker=4711.0625))
    source = out.read_text(encoding="utf-8")
    for shown in ("4711", "4,711", "4.711"):
        assert shown not in source


def test_hostile_client_ids_and_model_names_stay_text(tmp_path: Path) -> None:
    report, out = replay_page(tmp_path, write_demo(tmp_path / "demo.jsonl", PAYLOADS, HOSTILE_MODEL))
    assert {PAYLOADS[c] for c in SCRAPERS} == {c for c, v in report["clients"].items() if v["flagged"]}
    page = assert_only_our_markup(out.read_text(encoding="utf-8"))
    text = "".join(page.text)
    for payload in [*PAYLOADS.values(), HOSTILE_MODEL]:
        assert payload in text  # shown, as text


def _summary_with(client: str, model: str = "m") -> tuple[dict[str, Any], dict[str, list[Timeline]]]:
    entry = {
        "queries": 10, "flagged": True, "first_flagged_query": 4, "score": 0.75,
        "detectors": {"a": {"flagged": True, "first_flagged_query": 4, "value": 0.9}, "b": {"flagged": False, "first_flagged_query": None, "value": 0.1}},
    }  # fmt: skip
    tl = Timeline(
        model=model,
        detectors=("a", "b"),
        query=np.arange(1, 11),
        ts=1.7e9 + np.arange(10.0),
        risk=np.linspace(0, 0.75, 10).astype(np.float32),
        values=np.stack([np.linspace(0, 0.9, 10), np.full(10, np.nan)], axis=1).astype(np.float32),
        alarm=4,
        crossings={"a": 4},
    )
    summary = {
        "events": {"accepted": 10, "rejected": {"invalid_client": 2}},
        "clients": {client: entry, "benign": {**entry, "flagged": False, "first_flagged_query": None, "score": 0.1}},
        "models": {model: {"thresholds": {"a": 0.5, "b": 1.5}, "verdict_inputs": ["a"]}},
        "profile": {"source": "/etc/p\u202e.profile", "target_fpr": 0.01, "created_at": 1.7e9, "models": {model: {"clients": 300, "events": 9000, "promise": {"fpr": 0.01, "how": "order statistics"}}}},
    }
    return summary, {client: [tl]}


def test_unprintable_strings_are_shown_escaped() -> None:
    """Lone surrogates, bidi overrides and controls (which the decoder refuses, but a live
    server's data may hold) are shown as \\uXXXX; the page is valid UTF-8."""
    client = "ev\ud800il\u202e\n<b>x</b>"
    summary, series = _summary_with(client, model="m\x00\u2028")
    summary["peers"] = {client: {"peer\udfff": 3}}
    source = render_report(summary, series)
    source.encode("utf-8")  # strict: no lone surrogate left
    for raw in ("\ud800", "\u202e", "\x00", "\u2028", "<b>"):
        assert raw not in source
    text = "".join(assert_only_our_markup(source).text)
    assert "ev\\ud800il\\u202e\\u000a<b>x</b>" in text and "m\\u0000\\u2028" in text and "peer\\udfff" in text
    assert "target false-alarm rate (per client)" in text and "0.0100" in text and "order statistics" in text
    assert "1.500 (above 1: never flags)" in text


def test_groups_are_drawn_when_the_report_has_them_else_peers() -> None:
    summary, series = _summary_with("c1")
    summary["peers"] = {"c1": {"c2": 7}}
    with_peers = "".join(Page(render_report(summary, series)).text)
    assert "fingerprint peers" in with_peers and "c2 (7)" in with_peers
    summary["groups"] = [{"id": "g-1", "members": ["c1", "c2", "<c3>"], "score": 0.8, "flagged": True, "nested": {"x": 1}}]
    source = render_report(summary, series)
    page = assert_only_our_markup(source)
    text = "".join(page.text)
    assert "fingerprint peers" not in text
    assert "g-1" in text and "3: c1, c2, <c3>" in text and "score: 0.800" in text and "flagged: True" in text and "nested" not in text
    summary["groups"] = {"g-2": {"clients": {"c1": 1, "c9": 2}}}
    assert "2: c1, c9" in "".join(Page(render_report(summary, series)).text)


def test_one_clients_page() -> None:
    summary, series = _summary_with("c1")
    summary["peers"] = {"c1": {"c2": 7}, "benign": {"c3": 1}}
    text = "".join(assert_only_our_markup(render_client("c1", summary, series)).text)
    assert "MONITAUR: client c1" in text and "benign" not in text and "c3" not in text and "c2 (7)" in text


def test_the_page_is_bounded() -> None:
    """Table rows and drawn timelines are capped, and the page says what it left out."""
    summary, series = _summary_with("c1")
    clients = {f"c{i}": {**summary["clients"]["c1"], "score": i / 1000} for i in range(300)}
    summary["clients"] = clients
    series = {c: series["c1"] for c in clients}
    page = Page(render_report(summary, series, max_rows=100, max_timelines=5))
    assert sum(1 for t, a in page.tags if t == "svg") == 5
    assert sum(1 for t, _ in page.tags if t == "tr") <= 100 + 30
    text = "".join(page.text)
    assert "295 more flagged clients" in text and "200 more clients not listed" in text


def test_replay_summary_takes_peers_and_thresholds_from_the_recorder(tmp_path: Path) -> None:
    log = write_demo(tmp_path / "demo.jsonl")
    rec = TimelineRecorder()
    report = replay(Settings(), [str(log)], progress=False, observer=rec, at_end=rec.finish)
    rec.peers = {"scraper-search": {"app-03": 2}}
    summary = replay_summary(report, rec, None)
    assert summary["models"]["digits"]["thresholds"]["near_duplicate"] == pytest.approx(0.9)
    assert summary["peers"] == rec.peers and summary["profile"] is None
    assert report["groups"] == {}  # the demo has no linked group: peers are the cross-client evidence shown
    grouped = {**report, "groups": {"g1": {"model": "digits", "members": {"scraper-search": {"links": 3}, "app-03": {"links": 3}}}}}
    assert "peers" not in replay_summary(grouped, rec, None)


def test_paths_are_compact_and_exact() -> None:
    """Relative moves, breaks at NaN, inner points of flat runs left out; decoding gives the points back."""
    xs = np.arange(10.0) * 10
    ys = np.array([5, 5, 5, 5, 7, np.nan, 3, 3, 2, 9], dtype=float)
    d = _path(xs, ys)
    assert d == "M0 5l30 0 10 2M60 3l10 0 10-1 10 7"
    import re

    points = []
    for move, rel in re.findall(r"M(-?\d+ -?\d+)l?([-\d ]*)", d.replace("-", " -")):
        x, y = map(int, move.split())
        points.append((x, y))
        nums = list(map(int, rel.split()))
        for dx, dy in zip(nums[0::2], nums[1::2]):
            x, y = x + dx, y + dy
            points.append((x, y))
    assert points == [(0, 5), (30, 5), (40, 7), (60, 3), (70, 3), (80, 2), (90, 9)]
    assert _path(xs, np.full(10, np.nan)) == "" and _path(xs[:1], ys[:1]) == "M0 5h0"


# -- a real browser ----------------------------------------------------------------------------
@needs_chromium
def test_chromium_renders_the_demo_report(tmp_path: Path) -> None:
    _, out = replay_page(tmp_path, write_demo(tmp_path / "demo.jsonl"))
    shot = tmp_path / "report.png"
    got = chromium.render(out, shot, size=(1200, 1600))
    assert got.returncode == 0
    assert got.console == []  # no script error, no CSP violation, no log
    check = chromium.check_attributes(got.dom)
    assert check["data-timelines"] == "3"  # the script ran and found a drawn series in each timeline
    assert check["data-rows"] == "23" and int(check["data-height"]) > 1600
    flagged_list = got.dom[got.dom.index('id="flagged-list"') :]
    flagged_list = flagged_list[: flagged_list.index("</ul>")]
    assert all(c in flagged_list for c in SCRAPERS)
    with Image.open(shot) as img:
        assert img.size == (1200, 1600)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # text and curves, not a blank page


@needs_chromium
def test_chromium_runs_no_injected_script(tmp_path: Path) -> None:
    _, out = replay_page(tmp_path, write_demo(tmp_path / "demo.jsonl", PAYLOADS, HOSTILE_MODEL))
    got = chromium.render(out)
    assert got.returncode == 0 and got.console == []
    assert "data-pwned" not in got.dom.replace("data-pwned'", "").replace("data-pwned',", "")
    assert "<img" not in got.dom and "<iframe" not in got.dom and got.dom.count("<script") == 1
    assert chromium.check_attributes(got.dom)["data-timelines"] == "3"


@needs_chromium
def test_the_table_sorts_in_the_browser(tmp_path: Path) -> None:
    """Clicking a head sorts by it (numbers by value, the en dash lowest), again reverses.

    The page's CSP admits only its own script, so the test copy drops it to add the clicks."""
    summary, series = _summary_with("c1")
    summary["clients"] = {f"c{i}": {**summary["clients"]["c1"], "queries": q, "flagged": False} for i, q in enumerate([5, 1_200, 30, 7])}
    summary["clients"]["c9"] = {"queries": None, "flagged": False, "score": None, "detectors": {}}
    source = render_report(summary, {})
    source = source[: source.index("<meta http-equiv")] + source[source.index("<meta name=viewport") :]
    clicks = (
        "<script>var h=document.querySelectorAll('#clients th');h[1].click();var a=[...document.querySelectorAll('#clients tbody tr')]"
        ".map(r=>r.cells[0].textContent).join();h[1].click();var b=[...document.querySelectorAll('#clients tbody tr')]"
        ".map(r=>r.cells[0].textContent).join();document.body.setAttribute('data-order',a+'|'+b);</script>"
    )
    page = tmp_path / "sort.html"
    page.write_text(source.replace("</body>", clicks + "</body>"))
    got = chromium.render(page)
    assert got.console == []
    assert 'data-order="c9,c0,c3,c2,c1|c1,c2,c3,c0,c9"' in got.dom


@needs_chromium
def test_the_browser_check_sees_console_errors(tmp_path: Path) -> None:
    """The console check can fail: a script error and a blocked fetch are both reported."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><meta http-equiv=Content-Security-Policy content=\"default-src 'none'; script-src 'unsafe-inline'\">"
        "<img src='http://example.invalid/x.png'><script>console.log('hello'); missing();</script>"
    )
    got = chromium.render(bad)
    assert any("hello" in m for m in got.console)
    assert any("missing is not defined" in m for m in got.console)
    assert any("Content Security Policy" in m for m in got.console)


def test_a_time_that_cannot_be_shown_becomes_a_dash_not_an_error() -> None:
    assert when(0) == "1970-01-01 00:00:00Z" and when("1.5") == "1970-01-01 00:00:01Z"
    for bad in (None, 1e300, float("nan"), float("inf"), "soon", [1]):  # client pages and reports render whatever they hold
        assert when(bad) == "\u2013"
