"""The command line's process settings (exporter.tuning): defaults that an operator's environment overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.tuning import ENVIRONMENT, GLIBC_MALLOC_VARIABLES, M_MMAP_THRESHOLD, M_TOP_PAD, _glibc, tune_process

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
    assert libc.calls == [(M_MMAP_THRESHOLD, 32 << 20), (M_TOP_PAD, 64 << 20)]


def test_an_operators_own_settings_win() -> None:
    mine = {"OMP_NUM_THREADS": "4", "NUMPY_MADVISE_HUGEPAGE": "1"}
    env = dict(mine)
    assert tune_process(env, FakeLibc()) is True
    assert {k: env[k] for k in mine} == mine
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # what the operator left unset still gets its default


@pytest.mark.parametrize(
    "tuned",
    [{name: "131072"} for name in GLIBC_MALLOC_VARIABLES] + [{"GLIBC_TUNABLES": "glibc.cpu.x86_rep_movsb_threshold=2048:glibc.malloc.top_pad=0"}],
)
def test_an_operator_who_tunes_glibcs_allocator_keeps_it(tuned: dict[str, str]) -> None:
    env = dict(tuned)
    libc = FakeLibc()
    assert tune_process(env, libc) is False
    assert libc.calls == []  # glibc read the operator's settings itself
    assert env["NUMPY_MADVISE_HUGEPAGE"] == "0"


def test_tunables_of_other_parts_of_glibc_do_not_count() -> None:
    libc = FakeLibc()
    assert tune_process({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, libc) is True
    assert len(libc.calls) == 2


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
    clean = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT and k not in GLIBC_MALLOC_VARIABLES and k != "GLIBC_TUNABLES"}
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
def test_glibc_takes_the_heaps_settings() -> None:
    assert _python("from exporter.tuning import tune_process; print(tune_process())") == "True"
    assert _python("from exporter.tuning import tune_process; print(tune_process())", MALLOC_TOP_PAD_="0") == "False"
