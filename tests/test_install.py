"""The README's first command, as a new user runs it: from a copy of the repository, with the
system's ``python3`` (``/usr/bin/python3`` where it exists), a new virtual environment, a
non-editable ``pip install .`` and the demo.

It needs PyPI, or a pip configuration that finds the dependencies locally (``find-links``, a
local index). Without either it is skipped, naming the reason, unless ``REQUIRE_INSTALL_TEST=1``
(set by ``.ci/run``), where it fails. About 30 s with pip's cache warm.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port

SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else getattr(sys, "_base_executable", sys.executable)
NETWORK_ERRORS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable", "No matching distribution found",
                  "Could not find a version that satisfies")
SCRAPERS = {"scraper-boundary", "scraper-repeat", "scraper-search"}


def readme_command() -> str:
    """The README's install-and-demo line (the one that makes .venv and runs the exporter)."""
    lines = [line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
             if line.startswith("python3 -m venv .venv") and "monitaur-exporter run" in line]
    assert len(lines) == 1, "the README must show one install-and-demo command"
    return lines[0]


def copy_of_repo(dest: Path) -> Path:
    """The repository's files as a clone has them (no .venv, state or logs)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            src = REPO / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:  # not a git checkout (an archive)
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".venv", ".git", "state", "logs", "__pycache__"))
    return dest


def test_readme_command_installs_and_runs_the_demo_from_a_clean_environment(tmp_path: Path) -> None:
    command = readme_command()
    repo = copy_of_repo(tmp_path / "monitaur-exporter")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(SYSTEM_PYTHON)  # `python3` in the command is the system's
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONITAUR_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", MONITAUR_LISTEN__PORT=str(port), PIP_RETRIES="1", PIP_TIMEOUT="20")
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        flagged: set[str] = set()
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            flagged = {re.sub(r"-[0-9a-f]{6}$", "", c) for c in re.findall(r"client (\S+) flagged by", text)}
            if proc.poll() is not None or flagged >= SCRAPERS:
                break
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        if proc.poll() is not None:  # the command ended: the install failed (the exporter runs until stopped)
            if any(e in text for e in NETWORK_ERRORS) and os.environ.get("REQUIRE_INSTALL_TEST") != "1":
                pytest.skip(f"pip cannot reach an index for the dependencies (needs PyPI or a local find-links): {text[-300:]}")
            pytest.fail(f"the README command exited with {proc.returncode}:\n{text[-3000:]}")
        assert flagged >= SCRAPERS, text[-3000:]
        assert not {c for c in flagged if c.startswith("app-")}, f"benign apps flagged: {flagged}"
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        suspicious = {m.group(1) for m in re.finditer(r'^monitaur_client_suspicious\{client="([^"]+)"\} 1\.0$', metrics, re.M)}
        assert {re.sub(r"-[0-9a-f]{6}$", "", c) for c in suspicious} <= SCRAPERS and suspicious, suspicious
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # Ctrl-C's SIGINT would do the same: the exporter saves its state and exits 0
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text(errors="replace")[-2000:]
    assert (repo / "state").is_dir() and any((repo / "state").iterdir())
    venv = repo / ".venv"
    version = [subprocess.run([py, "-c", "import sys; print(sys.version)"], capture_output=True, text=True).stdout for py in (SYSTEM_PYTHON, str(venv / "bin" / "python"))]
    assert version[0] == version[1] and version[0], version  # made from the system's interpreter
    help_ = subprocess.run([str(venv / "bin" / "monitaur-exporter"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert help_.returncode == 0 and "replay" in help_.stdout and "calibrate" in help_.stdout
    # The installed package is the one that ran (not the copy's sources through the working directory).
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import exporter; print(exporter.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "site-packages" in where.stdout, where.stdout + where.stderr
