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
    # numpy reads NUMPY_MADVISE_HUGEPAGE when it loads, and reports the result (numpy 1 and 2 differ in where)
    probe = (
        "import exporter.cli, numpy, os\n"
        "core = getattr(numpy, '_core', None) or numpy.core\n"
        "get = getattr(core.multiarray, '_get_madvise_hugepage', None)\n"
        "print(get() if get else 'unknown', os.environ['OMP_NUM_THREADS'])"
    )
    found = _python(probe)
    if found.startswith("unknown"):
        pytest.skip("this numpy does not report its huge-page setting")
    assert found == "False 1"
    assert _python(probe, NUMPY_MADVISE_HUGEPAGE="1", OMP_NUM_THREADS="2") == "True 2"
