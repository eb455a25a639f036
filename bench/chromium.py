"""Load a local HTML page in headless Chromium: its DOM after scripts, its console messages, a screenshot.

Used by ``tests/test_report_html.py`` and ``bench/html_report.py``. Chromium is started
with a throw-away profile, every background service off, DNS resolution refused and a
proxy on a closed loopback port, so a page (or the browser) that tried to fetch
anything would fail rather than reach the network. Console messages (``console.*``,
uncaught errors, Content Security Policy violations) are read from Chromium's log on
stderr (``--enable-logging=stderr``), where each is a line with ``:CONSOLE``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium")
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\]\s*(.*)")


@dataclass(frozen=True)
class Rendered:
    """What a headless load of a page gave."""

    dom: str  # the DOM after the page's scripts ran (--dump-dom)
    console: list[str]  # console messages, errors included
    seconds: float  # wall time of the whole run, browser start included
    returncode: int


def find_chromium() -> str | None:
    """The Chromium binary, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(page: Path, screenshot: Path | None = None, size: tuple[int, int] = (1280, 2000), timeout: float = 120.0) -> Rendered:
    """Load ``page`` (a local file) in headless Chromium; optionally save a PNG screenshot of the window."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium not found (Debian package `chromium`)")
    with tempfile.TemporaryDirectory(prefix="monitaur-chromium-") as profile:
        args = [
            binary,
            "--headless",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--no-pings",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9",  # nothing listens there: any fetch fails
            "--enable-logging=stderr",
            "--v=0",
            f"--window-size={size[0]},{size[1]}",
            "--dump-dom",
        ]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        if screenshot is not None:
            args.append(f"--screenshot={screenshot}")
        args.append(Path(page).resolve().as_uri())
        started = time.perf_counter()
        run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, errors="replace")
        seconds = time.perf_counter() - started
    console = [m.group(1) for line in run.stderr.splitlines() if (m := CONSOLE.search(line))]
    return Rendered(run.stdout, console, seconds, run.returncode)


def check_attributes(dom: str) -> dict[str, str]:
    """The attributes of the report's ``render-check`` element (written by the page's script)."""
    m = re.search(r"<p id=\"render-check\"([^>]*)>", dom)
    if m is None:
        return {}
    return dict(re.findall(r"([a-z-]+)=\"([^\"]*)\"", m.group(1)))
