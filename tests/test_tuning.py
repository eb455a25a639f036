"""The command line's process settings (exporter.tuning): defaults that an operator's environment overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.tuning import ENVIRONMENT, HEAP_TOP_PAD, M_TOP_PAD, TOP_PAD_VARIABLE, _glibc, tune_process

REPO = Path(__file__).resolve().parent.parent


class FakeLibc:
    """Records mallopt calls; answers ``result`` (glibc: 1 on success, 0 on failure)."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_defaults_are_set_and_the_heap_is_padded() -> None:
    env: dict[str, str] = {}
    libc = FakeLibc()
    assert tune_process(env, libc) is True
    assert env == ENVIRONMENT
    assert env["NUMPY_MADVISE_HUGEPAGE"] == "0" and env["OPENBLAS_NUM_THREADS"] == "1"
    assert libc.calls == [(M_TOP_PAD, HEAP_TOP_PAD)]


def test_an_operators_own_settings_win() -> None:
    mine = {"OMP_NUM_THREADS": "4", "NUMPY_MADVISE_HUGEPAGE": "1", TOP_PAD_VARIABLE: "131072"}
    env = dict(mine)
    libc = FakeLibc()
    assert tune_process(env, libc) is False
    assert {k: env[k] for k in mine} == mine
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # what the operator left unset still gets its default
    assert libc.calls == []  # glibc read MALLOC_TOP_PAD_ itself


class NoMallopt:
    pass


class BrokenMallopt:
    def mallopt(self, param: int, value: int) -> int:
        raise OSError("not here")


@pytest.mark.parametrize("libc", [NoMallopt(), BrokenMallopt(), FakeLibc(result=0)])
def test_a_c_library_that_cannot_pad_the_heap_is_left_alone(libc: object) -> None:
    env: dict[str, str] = {}
    assert tune_process(env, libc) is False
    assert env == ENVIRONMENT


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT and k != TOP_PAD_VARIABLE}
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


@pytest.mark.skipif(not _glibc(), reason="mallopt's parameters are glibc's")
def test_glibc_takes_the_pad() -> None:
    assert _python("from exporter.tuning import tune_process; print(tune_process())") == "True"
    assert _python("from exporter.tuning import tune_process; print(tune_process())", MALLOC_TOP_PAD_="0") == "False"
