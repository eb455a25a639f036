"""The detection benchmark (bench/detection/run.py): its quick mode end to end, and its scoring.

The quick mode runs the real CLI (calibrate, replay) on a small simulated population and
its detection and false-alarm figures are asserted against the thresholds below, which
leave a margin around what the quick mode measures (all ordinary attack types detected,
1 of 2 interleaved attackers, 3% benign false alarms on 100 clients).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO

pytest.importorskip("sklearn", reason="the detection benchmark needs scikit-learn (the 'bench' extra)")

# -- figures the quick mode must reach (2 attackers per type, 1 Sybil group, 100 benign clients:
#    figures are coarse, the margins are deliberate) ------------------------------------------------
ENFORCE_TARGETS = True
QUICK_MIN_DETECTION = 0.95  # share of attacker clients flagged, per ordinary attack type
QUICK_MIN_DETECTION_HARD = 0.5  # interleaved, slow, sybil (per group)
QUICK_MAX_FALSE_ALARMS = 0.06  # share of benign clients flagged (1 % target; 3 % measured on 100 clients)
QUICK_MAX_MEDIAN_QUERIES = 250  # per attack type, among detected attackers
QUICK_MAX_SECONDS = 120  # the quick mode should take well under a minute; generous for slow CI

RUN_PY = REPO / "bench" / "detection" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_detection_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(RUN_PY), "--quick", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout, elapsed


def test_quick_mode_structure(quick) -> None:
    results, stdout, elapsed = quick
    bench = load_bench()
    sizes = bench.QUICK
    assert results["mode"] == "quick" and results["datasets"] == ["digits"] and results["seeds"] == [0]
    assert elapsed < QUICK_MAX_SECONDS
    attacks = results["attacks"]
    assert set(attacks) == set(bench.ATTACKS)
    summary = results["summary"]
    assert list(summary["attacks"]) == attacks
    expected = bench.attack_counts(sizes, attacks)
    for attack, s in summary["attacks"].items():
        assert s["entities"] == expected[attack]
        for key in ("detection_rate", "fidelity_at_alarm", "fidelity_all_queries"):
            assert 0.0 <= s[key] <= 1.0, (attack, key)
        if s["detection_rate"] > 0:
            assert 1 <= s["median_queries"] <= s["p90_queries"] <= s["queries_per_entity"]
    fa = summary["false_alarms"]
    assert fa["clients"] == sizes.eval_benign and 0.0 <= fa["rate"] <= 1.0
    assert set(fa["by_behaviour"]) <= {"iid", "class_skewed", "retries", "noisy_resubmit", "batch", "drift", "popular"}
    run = results["runs"][0]
    assert run["detectors"] and "replay" in run["seconds"]
    # the markdown table and the target checklist are printed
    assert "| attack | n | detection | FA rate | median q | p90 q | fidelity at alarm |" in stdout
    assert "### targets" in stdout and "targets met" in stdout


def test_quick_mode_entities_are_consistent(quick) -> None:
    results, _, _ = quick
    for row in results["entities"]:
        assert row["queries"] == (results["sizes"]["attack_queries"])
        if row["detected"]:
            assert 1 <= row["queries_to_detection"] <= row["queries"]
        else:
            assert row["queries_to_detection"] is None and row["fidelity_at_alarm"] == row["fidelity_all"]
        if row["attack"] == "sybil":
            assert row["members"] == 10
    assert len(results["benign"]) == results["sizes"]["eval_benign"]


def test_quick_mode_targets(quick) -> None:
    if not ENFORCE_TARGETS:
        pytest.skip("detection targets are not enforced until all detectors are registered (ENFORCE_TARGETS)")
    results, _, _ = quick
    summary = results["summary"]
    for attack, s in summary["attacks"].items():
        need = QUICK_MIN_DETECTION_HARD if attack in ("interleaved", "slow", "sybil") else QUICK_MIN_DETECTION
        assert s["detection_rate"] >= need, (attack, s["detection_rate"])
        assert s["median_queries"] is not None and s["median_queries"] <= QUICK_MAX_MEDIAN_QUERIES, (attack, s["median_queries"])
        if results["has_prada"]:
            assert s["fidelity_at_alarm"] <= s["prada_fidelity_at_alarm"] + 0.02, attack
    assert summary["false_alarms"]["rate"] <= QUICK_MAX_FALSE_ALARMS


# -- scoring, on a hand-made report ------------------------------------------------------------
def _report(traffic, flags: dict[str, int], prada: dict[str, int]) -> dict:
    clients = {}
    counts = np.bincount(traffic.client, minlength=len(traffic.clients))
    for i, name in enumerate(traffic.clients):
        q = flags.get(name)
        p = prada.get(name)
        clients[name] = {
            "queries": int(counts[i]), "flagged": q is not None, "first_flagged_query": q, "score": 0.0,
            "detectors": {"prada": {"flagged": p is not None, "first_flagged_query": p, "value": 0.0}},
        }
    return {"clients": clients, "events": {"accepted": len(traffic), "rejected": {}}}


def test_scoring_of_groups_clients_and_false_alarms() -> None:
    bench = load_bench()
    from exporter.sim import Population, build_world, simulate

    world = build_world("synthetic", 0)
    traffic = simulate(world, Population(benign=4, benign_queries=20, attacks={"sybil": 1, "uniform": 1}, attack_queries=200), seed=0)
    report = _report(traffic, flags={"syb-0-3": 2, "syb-0-7": 5, "atk-uniform-0": 50, "app-0001": 3}, prada={"atk-uniform-0": 120})
    res = bench.RunResult("synthetic", 0, world, traffic, report, None)
    attackers, benign, has_prada = bench.score_run(res)
    assert has_prada
    rows = {r["entity"]: r for r in attackers}
    group = rows["syb-0"]
    # round-robin: member 3's 2nd query is the group's 14th; member 7's 5th would be its 48th
    assert group["detected"] and group["queries_to_detection"] == 14 and group["members"] == 10 and group["queries"] == 200
    assert not group["prada_detected"] and group["prada_fidelity_at_alarm"] == group["fidelity_all"]
    uni = rows["atk-uniform-0"]
    assert uni["queries_to_detection"] == 50 and uni["prada_queries_to_detection"] == 120
    assert 0.0 <= uni["fidelity_at_alarm"] <= 1.0
    assert {b["client"]: b["flagged"] for b in benign} == {"app-0000": False, "app-0001": True, "app-0002": False, "app-0003": False}
    summary = bench.summarize(attackers, benign, has_prada)
    assert summary["false_alarms"]["rate"] == 0.25
    assert summary["attacks"]["sybil"]["detection_rate"] == 1.0 and summary["attacks"]["sybil"]["prada_detection_rate"] == 0.0
    table = bench.markdown_table(summary, has_prada)
    assert "| sybil | 1 | 100% | 25% | 14 | 14 |" in table
