"""``bench/detector_cost.py`` runs, and measures a cross-client detector's stage too.

The script is how anyone finds where replay time goes; it once broke without notice when
the pipeline's classes changed. This runs it small (a few seconds) and checks that every
detector asked for got a cost, ``links`` (whose work is all in its cross-client stage)
included, on the same traffic as ``bench/throughput.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_detector_cost_measures_every_detector_asked_for(tmp_path: Path) -> None:
    config = tmp_path / "links.yml"
    config.write_text("detectors: {links: {enabled: true}}\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "detector_cost.py"), "--events", "6000", "--clients", "50", "--repeat", "1",
         "--reference", "2000", "--only", "links,steps", "--config", str(config)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    costs = dict(re.findall(r"^\s+(\w+)\s+([0-9.]+) us/event$", proc.stdout, flags=re.M))
    assert set(costs) == {"links", "steps", "sum"}, proc.stdout
    assert float(costs["links"]) > 0.5 and float(costs["steps"]) > 0.0  # links indexes every query: never free
    assert abs(float(costs["sum"]) - float(costs["links"]) - float(costs["steps"])) < 0.02
