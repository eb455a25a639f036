"""A benchmark script measures the checkout it is in, not the exporter the environment installed.

Run as ``python bench/X.py``, Python puts ``bench/`` first on the import path, so without
care ``import exporter`` finds whatever package the virtual environment installed (an
editable install of another checkout, say), and a before/after comparison run from two git
worktrees measures the same code twice. Each script here is copied beside a stand-in
``exporter`` package that exits with a marker code when imported: the script must reach it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARKER = 37


@pytest.mark.parametrize("script", ["throughput", "detector_cost", "checkpoint", "memory_per_client", "memory_per_model", "group_cost"])
def test_a_bench_script_imports_its_own_checkouts_exporter(tmp_path: Path, script: str) -> None:
    (tmp_path / "bench").mkdir()
    for name in ("throughput", script):  # detector_cost imports throughput's traffic
        shutil.copy(REPO / "bench" / f"{name}.py", tmp_path / "bench" / f"{name}.py")
    (tmp_path / "exporter").mkdir()
    (tmp_path / "exporter" / "__init__.py").write_text(f"raise SystemExit({MARKER})\n")
    proc = subprocess.run([sys.executable, str(tmp_path / "bench" / f"{script}.py"), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == MARKER, (proc.returncode, proc.stderr[-2000:])
