"""The command line's process settings (exporter.tuning): defaults that an operator's environment overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.tuning import ENVIRONMENT, tune_process

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_set() -> None:
    env: dict[str, str] = {}
    tune_process(env)
    assert env == ENVIRONMENT
    assert env["NUMPY_MADVISE_HUGEPAGE"] == "0" and env["OPENBLAS_NUM_THREADS"] == "1"


def test_an_operators_own_settings_win() -> None:
    mine = {"OMP_NUM_THREADS": "4", "NUMPY_MADVISE_HUGEPAGE": "1"}
    env = dict(mine)
    tune_process(env)
    assert {k: env[k] for k in mine} == mine
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # what the operator left unset still gets its default


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    clean["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120, check=True)
    return proc.stdout.strip()


def test_the_command_line_applies_them_before_numpy_loads() -> None:
    probe = "import exporter.cli, numpy, os; print(numpy._core.multiarray._get_madvise_hugepage(), os.environ['OMP_NUM_THREADS'])"
    try:
        assert _python(probe) == "False 1"
        assert _python(probe, NUMPY_MADVISE_HUGEPAGE="1", OMP_NUM_THREADS="2") == "True 2"
    except subprocess.CalledProcessError as exc:
        if "_get_madvise_hugepage" in exc.stderr:
            pytest.skip("this numpy does not report its huge-page setting")
        raise
