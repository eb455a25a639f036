"""The short rotation-and-restart drill (bench/rotation_drill.py --quick) against the real `monitaur-exporter run`.

About 25 s: a writer at 5,000 lines/s, ~60 rename rotations (most while the exporter is
down), ~8 copytruncates, 3 SIGTERM and 2 SIGKILL restarts; every client's count must be exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_drill_loses_and_repeats_nothing(tmp_path: Path) -> None:
    out = tmp_path / "drill.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rotation_drill.py"), "--quick", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    result = json.loads(out.read_text())
    summary = {k: v for k, v in result.items() if k != "per_client"}
    assert proc.returncode == 0 and result["ok"], (summary, proc.stderr[-3000:])
    assert result["lines_per_second"] >= 4500 and result["clients"] == 20
    assert result["renames"] >= 40 and result["renames_while_down"] >= 5 and result["copytruncates"] >= 4, summary
    assert (result["sigterm"], result["sigkill"]) == (3, 2)
    assert result["lost"] == 0 and result["duplicated"] <= result["duplicated_bound"]
    assert result["file_lines_drops"] == 0 and result["rotations_series_missing"] == 0
    assert result["client_counter_increase"] <= result["client_counter_increase_bound"]
