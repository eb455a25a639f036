"""Golden replay reports (as mtail's golden tests): a change of verdict is a reviewed diff.

Each ``tests/golden/<name>.jsonl.gz`` log is replayed with the embedded default
configuration (no state, no profile) and its report compared with ``<name>.report.json``:
every client's flag, first flagged query and flagging detectors, and every count,
exactly; scores and detector values within ``TOLERANCE`` (so that a BLAS or numpy
version's last digits do not fail it). After a change to detection that is meant to
change verdicts, regenerate the reports and review their diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py && git diff --stat tests/golden

The logs (tests/golden/README.md says how they were made) stay fixed.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from exporter.config import Settings
from exporter.replay import replay
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"
LOGS = sorted(p.name.removesuffix(".jsonl.gz") for p in GOLDEN.glob("*.jsonl.gz"))
TOLERANCE = 1e-4
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def render(report: dict[str, Any]) -> str:
    """The report as committed: sorted keys, one client per block, easy to diff."""
    return json.dumps(report, indent=1, sort_keys=True) + "\n"


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two reports differ: exact for everything but floats, which may differ by TOLERANCE."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: only in the golden report" for k in expected.keys() - actual.keys()]
        out += [f"{path}/{k}: not in the golden report" for k in actual.keys() - expected.keys()]
        for k in sorted(expected.keys() & actual.keys()):
            out += differences(expected[k], actual[k], f"{path}/{k}")
        return out
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return [] if abs(expected - actual) <= TOLERANCE else [f"{path}: {expected} -> {actual}"]
    return [] if expected == actual and type(expected) is type(actual) else [f"{path}: {expected!r} -> {actual!r}"]


@pytest.mark.parametrize("name", LOGS)
def test_replay_report_matches_the_golden_one(name: str) -> None:
    report = replay(Settings(state={"dir": None}), [str(GOLDEN / f"{name}.jsonl.gz")], progress=False)
    golden = GOLDEN / f"{name}.report.json"
    if UPDATE:
        golden.write_text(render(report), encoding="utf-8")
        return
    assert golden.is_file(), f"no {golden.name}: create it with UPDATE_GOLDEN=1 (see this module's docstring)"
    expected = json.loads(golden.read_text(encoding="utf-8"))
    problems = differences(expected, report)
    if problems:
        diff = "".join(difflib.unified_diff(golden.read_text(encoding="utf-8").splitlines(True), render(report).splitlines(True),
                                            f"{name}.report.json (golden)", f"{name} (this code)", n=2))
        pytest.fail(f"{len(problems)} differences from {golden.name}, e.g. {problems[:5]}; if intended, regenerate "
                    f"(UPDATE_GOLDEN=1, see tests/test_golden.py) and review the diff:\n{diff[:6000]}")


def test_golden_comparison_can_fail() -> None:
    report = {"clients": {"a": {"flagged": True, "first_flagged_query": 20, "score": 0.5}}, "events": {"accepted": 3}}
    same = json.loads(json.dumps(report))
    same["clients"]["a"]["score"] = 0.50004
    assert differences(report, same) == []
    changed = json.loads(json.dumps(report))
    changed["clients"]["a"].update(flagged=False, first_flagged_query=None)
    changed["clients"]["b"] = {}
    assert sorted(differences(report, changed)) == ["/clients/a/first_flagged_query: 20 -> None", "/clients/a/flagged: True -> False",
                                                    "/clients/b: not in the golden report"]
    assert differences({"x": 1}, {"x": 1.0}) == ["/x: 1 -> 1.0"]


def test_every_golden_log_has_its_report() -> None:
    assert LOGS == ["demo", "mixed"]
    assert sorted(p.name for p in GOLDEN.glob("*.report.json")) == [f"{n}.report.json" for n in LOGS]
