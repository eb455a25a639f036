"""The detection benchmark (bench/detection/): its quick mode end to end, its populations
(families, held-out behaviours and regimes, attack variants), its scoring and its targets.

The quick mode runs the real CLI (calibrate, replay) on digits, seed 0: one evaluation log
of 1,000 benign clients plus 2 attackers per type (1 Sybil group), replayed with profiles
calibrated on 20 and on 200 other benign clients.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, load_script

pytest.importorskip("sklearn", reason="the detection benchmark needs scikit-learn (the 'bench' extra)")

# -- figures the quick mode must reach (2 attackers per type, 1 Sybil group: coarse figures,
#    deliberate margins) -----------------------------------------------------------------------------
QUICK_MIN_DETECTION = 0.95  # share of attacker clients flagged, per ordinary attack type
QUICK_MIN_DETECTION_HARD = 0.5  # interleaved, slow, sybil (per group)
QUICK_MAX_FALSE_ALARMS = 0.02  # share of benign clients flagged with the 200-client calibration (1 % target; one draw)
QUICK_MAX_MEDIAN_QUERIES = 250  # per attack type, among detected attackers
# The interleaved JbDA sends its 100 natural seeds interleaved 1:1 with natural queries: its
# first synthetic query is its 201st, so its median is measured against a later cap.
QUICK_MAX_MEDIAN_QUERIES_INTERLEAVED = 350
QUICK_MAX_SECONDS = 90  # CI budget for the quick mode (it takes ~25 s on 2 cores)
# What the calibration redesign must meet with only 20 benign clients per model (the issue's
# target at that size): at most 2 % of other benign clients flagged, and the upper end of the
# two-sided 95 % Clopper-Pearson interval of that rate at most 3 %.
FA_RATE_AT_20_CLIENTS = 0.02
FA_UPPER_BOUND_AT_20_CLIENTS = 0.03

BENCH = REPO / "bench" / "detection"
RUN_PY = BENCH / "run.py"


def load(name: str):
    """A module of bench/detection/ (run.py puts the directory on sys.path for its siblings)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "run":
        return load_script(RUN_PY, "bench_detection_run")
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(RUN_PY), "--quick", "--readme", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout, elapsed


# -- the quick mode, end to end ------------------------------------------------------------------------
def test_quick_mode_structure(quick) -> None:
    results, stdout, elapsed = quick
    populations = load("populations")
    sizes = populations.QUICK
    assert elapsed < QUICK_MAX_SECONDS
    assert results["mode"] == "quick" and results["datasets"] == ["digits"] and results["seeds"] == [0]
    assert results["calibrations"] == ["20", "200"] and results["eval_families"] == ["a"]
    expected = populations.attack_counts(sizes, results["attacks"])
    for label, cell in results["results"]["digits"].items():
        assert list(cell["attacks"]) == results["attacks"]
        for attack, s in cell["attacks"].items():
            assert s["entities"] == expected[attack] and s["set"] == "default"
            for key in ("detection_rate", "fidelity_at_alarm", "fidelity_all_queries"):
                assert 0.0 <= s[key] <= 1.0, (label, attack, key)
            if s["detection_rate"] > 0:
                assert 1 <= s["median_queries"] <= s["p90_queries"] <= s["queries_per_entity"]
        fa = cell["false_alarms"]
        assert fa["clients"] == sizes.eval_benign >= 1000  # evaluated on other benign clients than calibration's
        assert fa["lower"] <= fa["rate"] <= fa["upper"] and list(fa["by_family"]) == ["a"]
        assert set(fa["by_family"]["a"]["by_behaviour"]) == {"iid", "class_skewed", "retries", "noisy_resubmit", "batch", "drift", "popular"}
    runs = {r["calibration"]: r for r in results["runs"]}
    assert set(runs) == {"20", "200"}
    for r in runs.values():
        assert r["detectors"] and {"calibrate", "replay", "score"} <= set(r["seconds"])
        assert r["calibration_summary"]["models"]["digits"]["clients"] > 0
    assert "| dataset | calibration | benign FA (k/n) | 95% upper |" in stdout
    assert "| attack | n | detection | median q | p90 q | fidelity at alarm |" in stdout
    assert "### Targets" in stdout and "targets met" in stdout and "### README table" in stdout
    assert "python3 bench/detection/run.py --quick --readme --out" in stdout


def test_quick_mode_entities_are_consistent(quick) -> None:
    results, _, _ = quick
    assert {r["calibration"] for r in results["entities"]} == {"20", "200"}
    for row in results["entities"]:
        assert row["queries"] == results["sizes"]["attack_queries"]
        if row["detected"]:
            assert 1 <= row["queries_to_detection"] <= row["queries"]
        else:
            assert row["queries_to_detection"] is None and row["fidelity_at_alarm"] == row["fidelity_all"]
        if row["attack"] == "sybil":
            assert row["members"] == 10
    flagged = [b for b in results["benign_flagged"] if b["calibration"] == "200"]
    assert len(flagged) == results["results"]["digits"]["200"]["false_alarms"]["flagged"]


def _detection_asserts(results: dict, attacks: tuple[str, ...], label: str) -> None:
    cell = results["results"]["digits"][label]
    for attack in attacks:
        s = cell["attacks"][attack]
        need = QUICK_MIN_DETECTION_HARD if attack in ("interleaved", "slow", "sybil") else QUICK_MIN_DETECTION
        assert s["detection_rate"] >= need, (label, attack, s["detection_rate"])
        cap = QUICK_MAX_MEDIAN_QUERIES_INTERLEAVED if attack == "interleaved" else QUICK_MAX_MEDIAN_QUERIES
        assert s["median_queries"] is not None and s["median_queries"] <= cap, (label, attack, s["median_queries"])
        if results["has_prada"]:
            assert s["fidelity_at_alarm"] <= s["prada_fidelity_at_alarm"] + 0.02, (label, attack)


@pytest.mark.parametrize("label", ["20", "200"])
def test_quick_mode_detects_every_attack(quick, label: str) -> None:
    results, _, _ = quick
    _detection_asserts(results, tuple(results["attacks"]), label)


def test_quick_mode_false_alarms_with_200_calibration_clients(quick) -> None:
    results, _, _ = quick
    assert results["results"]["digits"]["200"]["false_alarms"]["rate"] <= QUICK_MAX_FALSE_ALARMS


def test_quick_mode_false_alarm_bound_after_20_calibration_clients(quick) -> None:
    results, _, _ = quick
    fa = results["results"]["digits"]["20"]["false_alarms"]
    assert fa["rate"] <= FA_RATE_AT_20_CLIENTS, fa
    assert fa["upper"] <= FA_UPPER_BOUND_AT_20_CLIENTS, fa


# -- a small run of the other modes: held-out regime, held-out attacks (synthetic data) ---------------------
def test_holdout_and_heldout_attacks_end_to_end(tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(RUN_PY), "--quick", "--datasets", "synthetic", "--eval-benign", "40", "--calibrations", "20,none",
                           "--attacks", "uniform", "--holdout", "regime:rate", "--heldout-attacks", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["holdout"]["spec"] == "regime:rate"
    for label in ("20", "none"):
        cell = results["results"]["synthetic"][label]
        fa = cell["false_alarms"]
        assert fa["clients"] == 40 + load("populations").QUICK.holdout_benign
        assert fa["holdout"]["clients"] == load("populations").QUICK.holdout_benign
        held = {a: s for a, s in cell["attacks"].items() if s["set"] == "heldout"}
        assert set(held) == {v.name for v in load("populations").HELDOUT_ATTACKS}
    assert "HELD-OUT attack variants" in proc.stdout and "held-out clients" in proc.stdout


def test_usage_errors() -> None:
    run = load("run")
    assert run.main(["--quick", "--holdout", "behaviour:nope", "--quiet"]) == 2
    assert run.main(["--quick", "--calibrations", "twenty", "--quiet"]) == 2
    assert run.main(["--quick", "--jobs", "0", "--quiet"]) == 2


# -- populations -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    from exporter.sim import build_world

    return build_world("synthetic", 0)


def small_sizes():
    populations = load("populations")
    return populations.Sizes(eval_benign=21, per_attack=1, sybil_groups=1, slow=0, interleaved=1, benign_queries=20,
                             attack_queries=120, window=3600.0, holdout_benign=7, variant_clients=2)


def test_behaviour_holdout_leaves_it_out_of_calibration_only(world) -> None:
    populations = load("populations")
    h = populations.parse_holdout("behaviour:retries")
    cal = populations.calibration_traffic(world, 0, "20", "a", small_sizes(), h)
    assert len(cal.clients) == 20 and "retries" not in {v["type"] for v in cal.truth.values()}
    ev = populations.evaluation_traffic(world, 0, populations.EvalPlan(small_sizes(), ["uniform"], ["a"], h))
    truth = ev.ground_truth()["clients"]
    held = [c for c, v in truth.items() if v["kind"] == "benign" and h.is_held_out(v)]
    hold = [c for c in held if c.startswith("hold-")]
    assert len(hold) == 7 and all(truth[c]["type"] == "retries" for c in held)
    assert len(held) > len(hold)  # the evaluation population's own retries clients count too
    assert not h.is_held_out({"kind": "benign", "type": "retries", "family": "b"})


def test_regime_holdouts_shape_calibration_and_held_out_clients(world) -> None:
    populations = load("populations")
    h = populations.parse_holdout("regime:session_length")
    cal = populations.calibration_traffic(world, 0, "20", "a", small_sizes(), h)
    assert max(v["queries"] for v in cal.ground_truth()["clients"].values()) <= 80
    ev = populations.evaluation_traffic(world, 0, populations.EvalPlan(small_sizes(), [], ["a"], h))
    truth = ev.ground_truth()["clients"]
    long = [v["queries"] for c, v in truth.items() if c.startswith("hold-")]
    assert len(long) == 7 and min(long) >= 300
    assert all(not h.is_held_out(v) for c, v in truth.items() if c.startswith("app-"))
    for name in populations.REGIMES:
        assert populations.parse_holdout(f"regime:{name}").spec == f"regime:{name}"
    for bad in ("regime:nope", "behaviour:nope", "retries"):
        with pytest.raises(ValueError):
            populations.parse_holdout(bad)


def test_calibration_populations_are_separate_streams(world) -> None:
    populations = load("populations")
    a = populations.calibration_traffic(world, 0, "20", "a", small_sizes(), None)
    b = populations.calibration_traffic(world, 0, "21", "a", small_sizes(), None)
    ev = populations.evaluation_traffic(world, 0, populations.EvalPlan(small_sizes(), [], ["a"]))
    assert not ({r.tobytes() for r in a.X[:50]} & {r.tobytes() for r in b.X[:50]} - {r.tobytes() for r in world.popular})
    assert set(a.clients).isdisjoint(ev.clients)


def test_training_data_as_events(world) -> None:
    populations = load("populations")
    tr = populations.training_events(world, 0)
    ds = world.dataset
    assert tr.clients == ["train-0000"] and len(tr) == len(ds.X_victim)
    rows = lambda X: X[np.lexsort(X.T[::-1])]  # noqa: E731 (rows in lexicographic order)
    assert np.array_equal(rows(tr.X), rows(ds.round(ds.X_victim)))  # every training row once, in another order
    assert not np.array_equal(tr.X, ds.round(ds.X_victim))
    assert np.allclose(tr.P, world.victim.predict_proba(tr.X)) and (np.diff(tr.ts) > 0).all()
    assert populations.calibration_traffic(world, 0, "training", "a", small_sizes(), None).clients == ["train-0000"]


def test_variant_names_and_the_held_out_set() -> None:
    populations = load("populations")
    v = populations.variant("trnd", rounds=4, step=0.05)
    assert v.name == "trnd-l0.05-r4" and v == populations.variant("trnd", step=0.05, rounds=4)
    assert populations.variant("interleaved", budget=300, interleave=5).name == "interleaved-i5-b300"
    assert populations.variant("jbda", budget=5000).name == "jbda-b5000"
    with pytest.raises(ValueError):
        populations.variant("jbda", lam=0.1)
    sweep = set(populations.SWEEP)
    assert len(sweep) == len(populations.SWEEP) and len({s.name for s in sweep}) == len(sweep)
    for held in populations.HELDOUT_ATTACKS:
        assert held not in sweep and held.name not in {s.name for s in sweep}
    # the held-out T-RND has a step and a target count no sweep variant uses
    trnd = populations.HELDOUT_ATTACKS[0]
    used = {(k, val) for s in sweep for k, val in s.params}
    assert trnd.attack == "trnd" and not ({p for p in trnd.params} & used)


def test_variant_clients_are_named_after_the_variant(world) -> None:
    populations = load("populations")
    v = populations.variant("trnd", step=0.05, rounds=4, budget=150)
    tr = populations.simulate_variant(world, v, 2, 0, small_sizes(), "sweep")
    assert tr.clients == ["atk-trnd-l0.05-r4-b150-0", "atk-trnd-l0.05-r4-b150-1"]
    gt = tr.ground_truth()["clients"]
    assert all(g["type"] == v.name and g["base"] == "trnd" and g["set"] == "sweep" and g["queries"] == 150 for g in gt.values())
    syb = populations.simulate_variant(world, populations.variant("sybil", step=0.05), 1, 0, small_sizes(), "sweep")
    assert syb.truth["syb-sybil-l0.05-0-3"]["group"] == "syb-sybil-l0.05-0"


def test_merge_orders_events_and_refuses_clashing_ids(world) -> None:
    populations = load("populations")
    from exporter.sim import Population, simulate

    a = simulate(world, Population(benign=3, benign_queries=20, benign_prefix="x"), 0)
    b = simulate(world, Population(benign=2, benign_queries=20, benign_prefix="y", stream="other"), 0)
    m = populations.merge(populations.tag(a, family="a"), b)
    assert len(m) == len(a) + len(b) and (np.diff(m.ts) >= 0).all()
    assert m.truth["x-0000"]["family"] == "a" and "family" not in m.truth["y-0000"]
    for name in ("x-0001", "y-0001"):
        src = a if name.startswith("x") else b
        assert np.array_equal(m.X[m.client == m.clients.index(name)], src.X[src.client == src.clients.index(name)])
    with pytest.raises(ValueError):
        populations.merge(a, a)


def test_family_b_is_optional() -> None:
    populations = load("populations")
    run = load("run")
    if populations.family_b_module() is not None:
        pytest.skip("bench/detection/family_b.py is present")
    args = run.parse_args(["--eval-family", "auto"])
    assert run._resolve(args)[4] == ["a"]
    with pytest.raises(ValueError, match="family_b.py"):
        run._resolve(run.parse_args(["--eval-family", "ab"]))
    with pytest.raises(populations.FamilyUnavailable):
        populations.FAMILIES["b"].simulate(None, 1, 0, prefix="b", stream="s", sizes=small_sizes())


# -- scoring and targets, on hand-made reports ----------------------------------------------------------------
def _report(traffic, flags: dict[str, int], prada: dict[str, int]) -> dict:
    clients = {}
    counts = np.bincount(traffic.client, minlength=len(traffic.clients))
    for i, name in enumerate(traffic.clients):
        q, p = flags.get(name), prada.get(name)
        clients[name] = {
            "queries": int(counts[i]), "flagged": q is not None, "first_flagged_query": q, "score": 0.0,
            "detectors": {"prada": {"flagged": p is not None, "first_flagged_query": p, "value": 0.0}},
        }
    return {"clients": clients, "events": {"accepted": len(traffic), "rejected": {}}}


def test_scoring_of_groups_clients_and_false_alarms(world) -> None:
    scoring = load("scoring")
    report_md = load("report")
    populations = load("populations")
    from exporter.sim import Population, simulate

    traffic = populations.tag(simulate(world, Population(benign=4, benign_queries=20, attacks={"sybil": 1, "uniform": 1}, attack_queries=200), seed=0),
                              family="a")
    report = _report(traffic, flags={"syb-0-3": 2, "syb-0-7": 5, "atk-uniform-0": 50, "app-0001": 3}, prada={"atk-uniform-0": 120})
    attackers, benign, has_prada = scoring.Scorer("synthetic", 0, world, traffic).score(report, "20")
    assert has_prada
    rows = {r["entity"]: r for r in attackers}
    group = rows["syb-0"]
    # round-robin: member 3's 2nd query is the group's 14th; member 7's 5th would be its 48th
    assert group["detected"] and group["queries_to_detection"] == 14 and group["members"] == 10 and group["queries"] == 200
    assert not group["prada_detected"] and group["prada_fidelity_at_alarm"] == group["fidelity_all"]
    uni = rows["atk-uniform-0"]
    assert uni["queries_to_detection"] == 50 and uni["prada_queries_to_detection"] == 120 and uni["calibration"] == "20"
    assert {b["client"]: b["flagged"] for b in benign} == {"app-0000": False, "app-0001": True, "app-0002": False, "app-0003": False}
    summary = scoring.summarize(attackers, benign, has_prada)
    fa = summary["false_alarms"]
    assert fa["rate"] == 0.25 and fa["flagged"] == 1 and fa["clients"] == 4 and fa["by_family"]["a"]["flagged"] == 1
    from exporter.binomial import clopper_pearson

    assert (fa["lower"], fa["upper"]) == clopper_pearson(1, 4, 0.95)
    assert summary["attacks"]["sybil"]["detection_rate"] == 1.0 and summary["attacks"]["sybil"]["prada_detection_rate"] == 0.0
    assert "| sybil | 1 | 100% | 14 | 14 |" in report_md.attack_table(summary["attacks"], has_prada)
    with pytest.raises(RuntimeError, match="query totals"):
        bad = _report(traffic, {}, {})
        bad["clients"]["app-0000"]["queries"] += 1
        scoring.Scorer("synthetic", 0, world, traffic).score(bad, "20")


def test_promise_is_read_when_calibrate_states_one() -> None:
    scoring = load("scoring")
    assert scoring.promise_of({"models": {"digits": {"clients": 7}}}, "digits") is None
    assert scoring.promise_of(None, "digits") is None
    p = {"fpr": 0.01, "upper": 0.02, "how": "conformal"}
    assert scoring.promise_of({"models": {"digits": {"promise": p}}}, "digits") == p


def _cell(rate_by_attack: dict[str, float], flagged: int, clients: int, median: float = 50.0) -> dict:
    scoring = load("scoring")
    attacks = {a: {"set": "default", "base": a, "detection_rate": r, "median_queries": median if r else None,
                   "fidelity_at_alarm": 0.2, "prada_fidelity_at_alarm": 0.5} for a, r in rate_by_attack.items()}
    fa = scoring.false_alarm_counts([True] * flagged + [False] * (clients - flagged))
    fa["by_family"] = {"a": dict(fa)}
    return {"attacks": attacks, "false_alarms": fa}


def test_targets_per_calibration_size() -> None:
    targets = load("targets")
    assert targets.fa_target("20") == (0.02, 0.03) and targets.fa_target("60") == (0.01, 0.02) and targets.fa_target("600") == (0.01, 0.02)
    assert targets.fa_target("training") is None and targets.fa_target("none") is None and targets.fa_target("10") is None
    good = targets.check_cell("digits", "60", _cell({"jbda": 1.0, "interleaved": 0.8}, 5, 1000), True)
    assert good and all(c["pass"] for c in good)
    bad = {c["target"]: c for c in targets.check_cell("digits", "60", _cell({"jbda": 0.9, "interleaved": 0.5}, 15, 1000, median=300), True)}
    assert not bad["family a: benign FA <= 1%"]["pass"] and bad["family a: benign FA <= 1%"]["detail"] == "15/1000"
    assert not bad["ordinary attacks: detection >= 95% each"]["pass"] and "jbda 90.0%" in bad["ordinary attacks: detection >= 95% each"]["detail"]
    assert not bad["interleaved/slow/Sybil: detection >= 80% each"]["pass"]
    assert not bad["median queries to detection <= 200 per attack type"]["pass"]
    # 20 clients: 2 % and 3 %; 18/1000 passes the rate, and its upper bound (2.8 %) the bound
    at20 = {c["target"]: c for c in targets.check_cell("digits", "20", _cell({}, 18, 1000), False)}
    assert at20["family a: benign FA <= 2%"]["pass"] and at20["family a: 95% CP upper bound <= 3%"]["pass"]
    assert targets.check_cell("digits", "training", _cell({"jbda": 0.0}, 500, 1000), True) == []


def test_promise_checks() -> None:
    targets = load("targets")
    scoring = load("scoring")
    measured = scoring.false_alarm_counts([True] * 12 + [False] * 988)
    assert targets.check_promises("digits", "60", [(0, None, measured)]) == []
    [ok] = targets.check_promises("digits", "60", [(0, {"fpr": 0.01, "upper": 0.02}, measured)])
    [bad] = targets.check_promises("digits", "60", [(0, {"fpr": 0.01}, measured), (1, {"fpr": 0.02}, measured)])
    assert ok["pass"] and not bad["pass"] and bad["value"] == 1


def test_group_rules_regroup_a_toy_link_graph() -> None:
    """bench/detection/group_rules.py: two true groups joined by one bridge of 3 links; components merge them, average linkage does not."""
    from collections import Counter

    rules = load("group_rules")
    a = [f"syb-even-3-0-{j}" for j in range(3)]
    b = [f"syb-even-3-1-{j}" for j in range(3)]
    edges = Counter({frozenset(p): 6 for p in [(a[0], a[1]), (a[1], a[2]), (a[0], a[2]), (b[0], b[1]), (b[1], b[2]), (b[0], b[2])]})
    edges[frozenset((a[2], b[0]))] = 3  # the bridge
    eligible = set(a) | set(b)
    truth = {"syb-even-3-0": set(a), "syb-even-3-1": set(b)}
    merged = rules.components(edges, eligible, 3)
    assert merged == [eligible] and rules.score(merged, truth) == (2, 0)  # both named, neither pure
    assert rules.score(rules.components(edges, eligible, 5), truth) == (2, 2)
    split = rules.average_linkage(edges, eligible, 1.0)
    assert sorted(map(sorted, split)) == sorted([sorted(a), sorted(b)]) and rules.score(split, truth) == (2, 2)
    assert rules.MEMBER.match("syb-mixed-30-11-29").group(1) == "syb-mixed-30-11" and rules.MEMBER.match("atk-jbda-0") is None


def test_replay_kept_needs_exactly_one_profile(tmp_path) -> None:
    """bench/detection/group_rules.py's ``replay_kept`` (members.py uses it too) refuses a run
    directory without a calibration profile, or with several, instead of guessing which one."""
    rules = load("group_rules")
    with pytest.raises(SystemExit, match="expected one profile-\\*.bin, found 0"):
        rules.replay_kept(tmp_path, lambda *_: None)
    (tmp_path / "profile-20.bin").write_bytes(b"")
    (tmp_path / "profile-200.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match="found 2"):
        rules.replay_kept(tmp_path, lambda *_: None)


def test_group_rules_attach_joins_a_client_whose_links_are_spread_over_a_group() -> None:
    """bench/detection/group_rules.py's ``attach``: a client with 1 link to each of 3 members of a
    component joins it at k = 3 (no single edge of 3), not at k = 4; one with 2 links joins nothing;
    a client not eligible never joins; with links to two components it joins the one it has more with."""
    from collections import Counter

    rules = load("group_rules")
    a = [f"syb-mixed-30-0-{j}" for j in range(3)]
    b = [f"syb-even-3-1-{j}" for j in range(2)]
    spread, weak, outsider = "syb-mixed-30-0-3", "syb-mixed-30-0-4", "app-0001"
    edges = Counter({frozenset(p): 5 for p in [(a[0], a[1]), (a[1], a[2]), (b[0], b[1])]})
    for m in a:
        edges[frozenset((spread, m))] = 1
        edges[frozenset((outsider, m))] = 1
    edges[frozenset((spread, b[0]))] = 2
    edges[frozenset((weak, a[0]))] = 2
    eligible = set(a) | set(b) | {spread, weak}
    got = rules.attach(edges, eligible, 3)
    assert sorted(map(sorted, got)) == sorted([sorted(a + [spread]), sorted(b)])
    assert sorted(map(sorted, rules.attach(edges, eligible, 4))) == sorted([sorted(a), sorted(b)])
    assert rules.HONEST.match(outsider) and rules.HONEST.match("bapp-0417") and not rules.HONEST.match(spread)


def test_coactivity_joins_flagged_clients_by_schedule() -> None:
    """bench/detection/coactivity.py: flagged clients whose first and last queries are both
    within the tolerance are joined, a late stop or an unflagged client is not; a schedule edge
    merges two groups, and brings a client outside every group into one."""
    co = load("coactivity")
    span = {"a": (0.0, 100.0), "b": (5.0, 104.0), "c": (8.0, 500.0), "d": (2.0, 99.0), "x": (1.0, 101.0), "y": (1000.0, 1100.0)}
    edges = co.schedule_edges(span, {"a", "b", "c", "x", "y"}, 10.0)  # d is not flagged
    assert set(edges) == {frozenset(("a", "b")), frozenset(("a", "x")), frozenset(("b", "x"))}
    assert co.schedule_edges(span, {"a", "b"}, 4.0) == {}  # starts 5 s apart
    groups = [{"a", "p"}, {"b", "q"}, {"y", "z"}]
    got = co.merged(groups, edges)
    assert sorted(map(sorted, got)) == [["a", "b", "p", "q", "x"], ["y", "z"]]
    assert sorted(map(sorted, co.merged(groups, type(edges)()))) == sorted(map(sorted, groups))


def _group_row(strategy: str, kind: str, size: int, named: bool, queries: float | None = None) -> dict:
    return {"strategy": strategy, "set": kind, "size": size, "named": named, "flagged": named, "queries_at_naming": queries,
            "purity": 1.0 if named else None, "members_flagged": size - 1}


def test_group_summary_checks_held_out_and_independent_groups_apart() -> None:
    """bench/detection/groups.py: groups that chose the method meet the main target; held-out and
    independent-generator groups (``--sybil b``) are checked against the held-out target only."""
    groups = load("groups")
    benign = {"benign": 1000, "linked": 20, "benign_only_flagged": 0}
    ours = [_group_row("even", "default", 10, True, 120.0), _group_row("even", "default", 3, True), _group_row("uneven", "default", 3, False),
            _group_row("mixed", "heldout", 10, True, 90.0), _group_row("mixed", "heldout", 3, False)]
    text, checks = groups.summarize([{"dataset": "wine", "groups": ours, "benign": benign}], ["wine"])
    got = {c["target"]: c for c in checks}
    assert got[">= 80 % of Sybil groups named"]["value"] == pytest.approx(2 / 3) and not got[">= 80 % of Sybil groups named"]["pass"]
    assert got["held-out strategies: >= 70 % named"]["value"] == 0.5 and not got["held-out strategies: >= 70 % named"]["pass"]
    assert got["10-member groups named before a median 200 queries/member"]["value"] == 120.0  # held-out groups left out
    assert got["<= 1 % of benign clients linked"]["value"] == 0.02 and not got["<= 1 % of benign clients linked"]["pass"]
    assert "| wine | mixed (HELD OUT) | 2 | 1/2 (1.3–99 %) |" in text and "| wine | uneven | 1 | 0/1 (0–98 %) | 0/1 | - | - | 2/3 |" in text
    assert "| wine | even | 2 | 2/2 (16–100 %) | 2/2 | 120.0 | 1.00 | 11/13 |" in text
    # the targets' shares with their 95 % Clopper-Pearson intervals
    assert "| wine | >= 80 % of Sybil groups named | 66.7%, 2/3 (9.4–99 %) | NO |" in text
    assert "| wine | <= 1 % of benign clients linked | 2.0%, 20/1000 (1.2–3.1 %) | NO |" in text
    theirs = [_group_row("rotation", "independent", 10, True, 150.0), _group_row("rotation", "independent", 30, True, 180.0),
              _group_row("bisect", "independent", 3, True)]
    text, checks = groups.summarize([{"dataset": "wine", "groups": theirs, "benign": {**benign, "linked": 1}}], ["wine"])
    got = {c["target"]: c for c in checks}
    assert ">= 80 % of Sybil groups named" not in got  # no group of this log chose the method
    assert got["held-out strategies: >= 70 % named"]["pass"] and got["10-member groups named before a median 200 queries/member"]["value"] == 150.0
    assert "| wine | rotation (independent generator) | 2 | 2/2 (16–100 %) |" in text


def test_group_benchmark_refuses_a_calibration_of_fewer_than_two_clients(capsys) -> None:
    """bench/detection/groups.py --calibration-clients: below 2 there is nothing to calibrate, refused before any work."""
    groups = load("groups")
    with pytest.raises(SystemExit) as exc:
        groups.main(["--calibration-clients", "1", "--datasets", "wine", "--seeds", "0"])
    assert exc.value.code == 2 and "--calibration-clients must be at least 2" in capsys.readouterr().err


def test_score_groups_names_a_true_group_held_by_one_reported_group(world) -> None:
    """scoring.score_groups: named at 80 % of the members in one reported group, when, purity, own flags, the benign side."""
    scoring = load("scoring")
    populations = load("populations")
    from exporter.sim import Population, simulate
    from exporter.sim.sybil import SybilPlan, simulate_sybil

    benign = populations.tag(simulate(world, Population(benign=3, benign_queries=20), seed=0), family="a")
    sybil = populations.tag(simulate_sybil(world, SybilPlan("even", 5, 20), 0, 0), set="default")
    traffic = populations.merge(benign, sybil)
    members, app = sybil.clients, benign.clients[0]
    at = float(np.median(sybil.ts))
    joined = {c: {"joined": at} for c in [*members[:4], app]}
    report = {"clients": {c: {"flagged": c in members[1:4]} for c in traffic.clients},
              "groups": {"g1": {"flagged": False, "first_flagged": at, "members": joined}}}
    [row], side = scoring.score_groups(traffic, report)
    sent = [int(np.count_nonzero(sybil.ts[sybil.client == j] <= at)) for j in range(5)]
    assert row["named"] and row["set"] == "default" and row["members_found"] == 4 and row["purity"] == 0.8 and row["flagged"]
    assert row["members_flagged"] == 3 and row["queries_at_naming"] == float(np.median(sent)) and row["named_at"] == at
    assert side["linked"] == 1 and side["linked_clients"] == [app] and side["benign_only_groups"] == 0
    assert side["by_behaviour"] == {f"a:{benign.truth[app]['type']}": {"clients": sum(benign.truth[c]["type"] == benign.truth[app]["type"] for c in benign.clients), "linked": 1}}
    # 3 of 5 members in one group and the benign client alone in another: not named, a benign-only group
    report["groups"] = {"g1": {"flagged": False, "members": {c: {"joined": at} for c in members[:3]}},
                        "g2": {"flagged": True, "members": {app: {"joined": at}}}}
    [row], side = scoring.score_groups(traffic, report)
    assert not row["named"] and row["members_found"] == 3 and row["purity"] == 1.0 and not row["flagged"] and row["queries_at_naming"] is None
    assert side["benign_only_groups"] == 1 and side["benign_only_flagged"] == 1


def test_nearness_finds_the_nearest_earlier_query_of_another_client() -> None:
    """bench/detection/nearness.py: own queries, later queries, exact repeats, queries past the
    window and rows outside ``among`` do not count; groups come from member ids."""
    nearness = load("nearness")
    ts = np.array([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    clients = np.array(["app-1", "bapp-2", "app-1", "sybb-bisect-3-0-1", "app-1", "sybb-bisect-3-0-2"])
    U = np.array([[0.0, 0.0], [0.5, 0.5], [0.1, 0.0], [0.1, 0.0], [0.9, 0.9], [0.4, 0.4]])
    # query 5: nearest other-client queries back are 4 (app-1, 0.5 away), 3 and 2 ((0.3, 0.4)), 1 (0.1 each way)
    assert nearness.nearest_other(ts, clients, U, 5, window=100.0, recent=100) == (pytest.approx(0.1), 1)
    assert nearness.nearest_other(ts, clients, U, 5, window=25.0, recent=100) == (pytest.approx(np.sqrt((0.09 + 0.16) / 2)), 3)  # 1 is past the window
    assert nearness.nearest_other(ts, clients, U, 5, window=100.0, recent=1) == (pytest.approx(0.5), 4)  # only query 4 back
    among = np.array([True, False, True, True, False, True])
    assert nearness.nearest_other(ts, clients, U, 5, window=100.0, recent=100, among=among)[1] == 2  # 1 and 4 left out; 2 and 3 tie: the earlier
    assert nearness.nearest_other(ts, clients, U, 3, window=100.0, recent=100) == (pytest.approx(np.sqrt(0.005)), 0)  # 2 is an exact repeat
    assert nearness.nearest_other(ts, clients, U, 0, window=100.0, recent=100) is None
    assert [nearness.kind(c) for c in ("app-0001", "bapp-0420", "syb-even-3-0-1", "sybb-rotation-10-4-2", "atk-jbda-0")] == [
        "benign A", "benign B", "syb:even", "sybb:rotation", "atk"]
    assert nearness.group_of("sybb-rotation-10-4-2") == "sybb-rotation-10-4" and nearness.group_of("app-0001") is None


def test_repeats_counts_inputs_another_client_sent_first(tmp_path, capsys) -> None:
    """bench/detection/repeats.py: a repeat of one's own input or a new input is no cross-client
    repeat; the first sender decides, whoever repeated since; the table splits by population."""
    repeats = load("repeats")
    clients = np.array(["app-1", "app-1", "bapp-2", "sybb-bisect-3-0-1", "sybb-bisect-3-0-2", "app-1", "sybb-bisect-3-0-2"])
    X = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0], [0.0, 1.0]])
    assert repeats.first_other(clients, X).tolist() == [-1, -1, 0, -1, 3, 3, 0]
    log = tmp_path / "evaluation.jsonl"
    log.write_text("".join(json.dumps({"ts": float(t), "client": c, "input": x.tolist()}) + "\n" for t, c, x in zip(range(7), clients, X)))
    assert repeats.main([str(log)]) == 0
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line}
    assert table["benign A"][:2] == ["3", "0.333"] and table["benign B"][:2] == ["1", "1.000"]
    assert table["sybb:bisect"][:3] == ["3", "0.667", "0.50"]  # 4 repeats its own group's 3, 6 repeats app-1's 0



def test_repeats_tests_off_manifold_as_links_does(tmp_path, capsys) -> None:
    """bench/detection/repeats.py --reference: anchors from the calibration log only; an input far
    from them repeated by another client counts, per population and per far_factor;
    --calibration-clients learns from the first clients of the calibration log only."""
    repeats = load("repeats")
    ref = np.random.default_rng(0).uniform(0.0, 1.0, (200, 2))
    later = np.random.default_rng(1).uniform(4.9, 5.1, (50, 2))  # a second calibration client's inputs, around the far input
    clients = ["app-1", "app-2", "sybb-bisect-3-0-1", "sybb-bisect-3-0-2", "app-2"]
    X = [[0.5, 0.5], [0.5, 0.5], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]
    cal = (np.vstack([ref, later]).tolist(), ["cal-1"] * len(ref) + ["cal-2"] * len(later))
    for name, rows, who in (("calibration.jsonl", *cal), ("evaluation.jsonl", X, clients)):
        (tmp_path / name).write_text("".join(json.dumps({"ts": float(t), "client": c, "input": x}) + "\n" for t, (c, x) in enumerate(zip(who, rows))))
    far, spacing = repeats.off_manifold_distance(np.array(X), ref, anchors=1024)
    assert 0.0 < spacing < 0.2 and far[0] < spacing and far[2] > 10 * spacing
    def rows_of(*extra: str) -> dict[str, list[str]]:
        args = [str(tmp_path / "evaluation.jsonl"), "--reference", str(tmp_path / "calibration.jsonl"), "--factors", "1,20", "--clients", "sybb-", *extra]
        assert repeats.main(args) == 0
        out = capsys.readouterr().out
        return {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ") and "---" not in line}

    assert rows_of()["sybb:bisect"][-1].strip(" |") == "0.000"  # with cal-2, the far input has anchors around it
    table = rows_of("--calibration-clients", "1")
    assert table["sybb:bisect"][-1].strip(" |") == "0.500"  # member 2 repeats member 1's far input (still far at factor 20)
    assert table["benign A"][-1].strip(" |") == "0.333"  # of app-2's two repeats, the natural input's does not count
    assert table["1"][:2] == ["1", "1"] and table["20"][:2] == ["1", "1"]  # one honest client, one distinct far input
    assert table["sybb-bisect-3-0-1"] == ["1", "0", "0 |"] and table["sybb-bisect-3-0-2"] == ["1", "1", "1 |"]


@pytest.mark.parametrize("sybil", ["a", "b"])
def test_group_benchmark_end_to_end_on_a_small_log(tmp_path, sybil: str) -> None:
    """bench/detection/groups.py through the real calibrate and replay, on wine with 20 benign
    clients per family (about 20 s): every Sybil group is scored with its set, the targets are
    booleans, and the figures stay near those this small run gave when the test was written
    (deliberate margins)."""
    out = tmp_path / "groups.json"
    proc = subprocess.run([sys.executable, str(BENCH / "groups.py"), "--datasets", "wine", "--seeds", "0", "--benign", "20", "--jobs", "1",
                           "--sybil", sybil, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    [run] = result["runs"]
    rows = run["groups"]
    assert all(isinstance(c["pass"], bool) for c in result["targets"])
    assert run["benign"]["benign"] == 40 and run["benign"]["linked"] == 0
    members = sum(r["size"] for r in rows)
    if sybil == "a":
        assert sorted((r["strategy"], r["set"], r["size"]) for r in rows) == sorted(
            (st, "heldout" if st == "mixed" else "default", n) for st in ("even", "staggered", "uneven", "mixed") for n in (3, 10, 30))
        assert sum(r["named"] for r in rows) >= 10  # 12 of 12 when written
        assert sum(r["members_flagged"] for r in rows) >= 0.8 * members  # 168 of 172
        assert "| wine | mixed (HELD OUT) | 3 |" in proc.stdout
    else:
        sybil_b = load("sybil_b")
        assert sorted((r["strategy"], r["set"], r["size"]) for r in rows) == sorted(
            (st, "independent", n) for st in sybil_b.STRATEGIES_B for n in (3, 10, 30))
        assert sum(r["members_flagged"] for r in rows) >= 0.5 * members  # 187 of 258 when written
        assert ">= 80 % of Sybil groups named" not in {c["target"] for c in result["targets"]}
        assert "| wine | bisect (independent generator) | 3 |" in proc.stdout


def test_group_benchmark_keeps_a_groups_traffic_when_strategies_are_filtered(world) -> None:
    """groups.py --strategies: the groups kept are those of the full log (their index does not move)."""
    groups = load("groups")
    every = groups.sybil_groups(world, 0, "a")
    kept = groups.sybil_groups(world, 0, "a", ("mixed",))
    assert [t.clients[0] for t in kept] == [t.clients[0] for t in every if t.truth[t.clients[0]]["strategy"] == "mixed"]
    same = [t for t in every if t.truth[t.clients[0]]["strategy"] == "mixed"]
    assert all(np.array_equal(a.X, b.X) and np.array_equal(a.ts, b.ts) for a, b in zip(kept, same))
    assert {t.truth[t.clients[0]]["set"] for t in kept} == {"heldout"}


def test_group_benchmark_copies_add_groups_of_their_own(world, monkeypatch) -> None:
    """groups.py --copies: the first copy is the log of one copy; the others add groups with ids,
    traffic and starts of their own, for either generator (groups of 3 only, to keep it quick)."""
    groups = load("groups")
    monkeypatch.setattr(groups, "SIZES", (3,))
    for family in ("a", "b"):
        one = groups.sybil_groups(world, 0, family, ("even",) if family == "a" else ("bisect",))
        three = groups.sybil_groups(world, 0, family, ("even",) if family == "a" else ("bisect",), copies=3)
        assert len(three) == 3 * len(one)
        assert all(np.array_equal(a.X, b.X) and np.array_equal(a.ts, b.ts) and a.clients == b.clients for a, b in zip(one, three))
        ids = [t.truth[t.clients[0]]["group"] for t in three]
        assert len(set(ids)) == len(ids)
        assert len({float(t.ts[0]) for t in three}) == len(three)
    with pytest.raises(SystemExit):
        groups.main(["--copies", "0", "--datasets", "wine", "--seeds", "0"])


def test_parents_tells_split_lattices_from_one(capsys) -> None:
    """bench/detection/parents.py: round-robin dealing over a set that doubles from 2 seeds gives
    every point to its parent's member with 2 members (two lattices), and crosses with 3 (one
    lattice); a member that extends two others' points joins them; the table has a row per
    strategy and dataset."""
    parents = load("parents")
    n = 16
    assert parents.dealing(np.arange(n) % 2, 2) == (0.0, 2)
    share, parts = parents.dealing(np.arange(n) % 3, 2)
    assert parts == 1 and share == 1.0  # 2, 4, 8 are never multiples of 3
    assert parents.dealing(np.array([0, 1, 0, 1, 0, 1, 2, 2]), 2) == (pytest.approx(2 / 6), 1)  # 2 extends 0's and 1's points: they join
    assert parents.main(["--datasets", "synthetic", "--seeds", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| synthetic |")]
    assert len(rows) == 4 and all(row.count("part") == 3 for row in rows)


def test_near_finds_off_manifold_inputs_near_another_clients(tmp_path, capsys) -> None:
    """bench/detection/near.py: the nearest earlier off-manifold input of another client within the
    last positions, exact repeats left out, and the nearest of one's own; the tables count the
    members of a split near each other's inputs (where their own are farther), and no honest client."""
    near = load("near")
    U = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.0], [0.05, 0.0], [0.0, 0.3]])
    at = np.array([0, 1, 2, 3, 10])
    owner = np.array([0, 0, 1, 2, 1])
    best, who, own = near.nearest_earlier_other(U, at, owner, recent=100, block=2)
    assert who.tolist() == [-1, -1, 1, 0, 0]  # 2 repeats 0 exactly (left out): its nearest is 1; 4's own 2 is left out
    assert best[2:] == pytest.approx([np.sqrt(0.005), np.sqrt(0.00125), np.sqrt(0.045)])
    assert own == pytest.approx([np.inf, np.sqrt(0.005), np.inf, np.inf, np.sqrt(0.045)])  # 4: its own 2 as near as 0 (no link)
    assert near.nearest_earlier_other(U, at, owner, recent=5)[1].tolist() == [-1, -1, 1, 0, -1]  # 10 - 5 > 3
    from exporter.detectors.base import ModelContext, Reference
    from exporter.detectors.kit import Scaling
    from exporter.detectors.links import LinksDetector, LinksParams
    from exporter.profile import ModelProfile, Profile

    rng = np.random.default_rng(0)
    cal = rng.uniform(0, 1, (300, 2))
    scaling = Scaling.fit(cal)
    ref = LinksDetector(LinksParams(), ModelContext("m", "tabular", 2, 2, scaling, ("links",))).fit(Reference(cal, None, scaling, unclipped=cal))
    assert ref is not None and "spacing" in ref
    Profile(0.01, {"m": ModelProfile("tabular", 2, 2, None, references={"links": ref})}).save(tmp_path / "profile-200.bin")
    far = 5.0 + 0.001 * np.arange(20)[:, None] * np.ones(2)  # one line off the data, walked by two members in turn
    rows = [("app-1", x) for x in rng.uniform(0, 1, (20, 2))] + [(f"sybb-bisect-3-0-{i % 2 + 1}", x) for i, x in enumerate(far)]
    drift = 7.0 + 0.001 * np.arange(10)[:, None] * np.ones(2)  # an honest client off the data, each input a step from its last ...
    for x in drift:  # ... and an attacker sending a copy near each, just after it: the honest client's last stays nearer
        rows += [("app-2", x), ("atk-copy-1", x + np.array([0.0005, -0.0005]))]
    log = tmp_path / "evaluation.jsonl"
    log.write_text("".join(json.dumps({"ts": float(t), "client": c, "input": x.tolist()}) + "\n" for t, (c, x) in enumerate(rows)))
    assert near.main([str(tmp_path), "--distinct", "2"]) == 0
    out = capsys.readouterr().out
    assert "| sybb:bisect | 20 | 1.000 | 0.950 | 1.00 |" in out  # every one but the first: the other member's last is nearest
    assert "| benign A | 30 | 0.333 | 0.000 | - |" in out  # app-2's inputs are off the data, and near nobody else's first
    assert "| atk | 10 | 1.000 | 1.000 | - |" in out  # the copier's are near app-2's
    assert "| 0.5 | 0 | 0 | 0 | 2 |" in out


def test_local_scale_sees_inputs_off_a_dense_cluster_that_the_global_spacing_misses(tmp_path, capsys) -> None:
    """bench/detection/local_scale.py: with one dense and one sparse cluster of anchors, an input a
    little off the dense cluster is off the manifold by its local scale, not by the global spacing
    (set by the sparse cluster); an input inside the dense cluster is off by neither; and two
    members walking one line off the dense cluster are counted past ``--distinct`` near inputs."""
    local = load("local_scale")
    rng = np.random.default_rng(1)
    dense = 0.5 + rng.normal(0.0, 0.005, (150, 2))
    sparse = rng.uniform(0.0, 1.0, (150, 2)) * np.array([[1.0, 0.3]])  # a band far from the dense cluster
    anchors = np.concatenate([dense, sparse])
    near, ratio = local.local_ratio(np.array([[0.5, 0.5], [0.58, 0.5]]), anchors, k=5)
    assert ratio[0] < 2.0 < ratio[1]
    from exporter.detectors.base import ModelContext, Reference
    from exporter.detectors.kit import Scaling
    from exporter.detectors.links import LinksDetector, LinksParams
    from exporter.profile import ModelProfile, Profile

    scaling = Scaling.fit(anchors)
    ref = LinksDetector(LinksParams(), ModelContext("m", "tabular", 2, 2, scaling, ("links",))).fit(Reference(anchors, None, scaling, unclipped=anchors))
    assert ref is not None and near[1] < float(ref["far"])  # the global test misses it
    Profile(0.01, {"m": ModelProfile("tabular", 2, 2, None, references={"links": ref})}).save(tmp_path / "profile-200.bin")
    walk = np.array([0.58, 0.5]) + 0.0005 * np.arange(20)[:, None] * np.array([[1.0, 0.0]])  # one line off the dense cluster, two members in turn
    rows = [("app-1", x) for x in dense[:20]] + [(f"sybb-bisect-3-0-{i % 2 + 1}", x) for i, x in enumerate(walk)]
    log = tmp_path / "evaluation.jsonl"
    log.write_text("".join(json.dumps({"ts": float(t), "client": c, "input": x.tolist()}) + "\n" for t, (c, x) in enumerate(rows)))
    calibration = 0.5 + rng.normal(0.0, 0.005, (100, 2))  # the honest side: inside the dense cluster
    (tmp_path / "calibration.jsonl").write_text("".join(json.dumps({"ts": float(t), "client": "app-9", "input": x.tolist()}) + "\n" for t, x in enumerate(calibration)))
    assert local.main([str(tmp_path), "--distinct", "2", "--ratios", "2,1000"]) == 0
    out = capsys.readouterr().out
    quantiles = re.search(r"Local ratios of the 100 calibration inputs that are not anchors, quantiles 0.99: ([0-9.]+),", out)
    assert quantiles is not None and 0.0 < float(quantiles.group(1)) < 2.0, out
    assert "| benign A | 20 | 0.0000 | 0.0000 | 0.0000 |" in out
    assert "| sybb:bisect | 20 | 0.0000 | 1.0000 | 0.0000 |" in out
    assert "| sybb:bisect | 2 | 2 | 0 |" in out and "| benign A | 1 | 0 | 0 |" in out


def test_members_sorts_members_by_type_and_reported_group() -> None:
    """bench/detection/members.py: a ``mixed`` group's odd members are T-RND, the others JbDA; a
    member is in the reported group only when its group is the one holding most of its group's
    members; the other strategies' members are all JbDA."""
    members = load("members")
    M = members.Member
    run = {
        "syb-mixed-3-0-0": M(group="g1"), "syb-mixed-3-0-1": M(group="g2"), "syb-mixed-3-0-2": M(group="g1"),
        "syb-even-3-1-0": M(), "syb-even-3-1-1": M(group="g3"), "syb-even-3-1-2": M(),
    }
    got = members.rows({"breast_cancer-7": run})
    assert sorted(got) == [("breast_cancer", "even", 3, "jbda"), ("breast_cancer", "mixed", 3, "jbda"), ("breast_cancer", "mixed", 3, "trnd")]
    assert [inside for _, inside in got[("breast_cancer", "mixed", 3, "jbda")]] == [True, True]
    assert [inside for _, inside in got[("breast_cancer", "mixed", 3, "trnd")]] == [False]  # in g2, the group holds more of its members in g1
    assert sorted(inside for _, inside in got[("breast_cancer", "even", 3, "jbda")]) == [False, False, True]


def test_group_rules_that_need_links_of_a_clients_own_leave_out_a_client_only_linked_to() -> None:
    """bench/detection/group_rules.py's ``mutual``, ``own_into`` and ``active``: two members that
    link each other, and an eligible honest client that they only link *to* (every link of its
    edges is theirs). Components take it in; the rules that need links of its own leave it out.
    ``active`` differs from ``mutual`` in a member that links one way to an active member only."""
    from collections import Counter

    rules = load("group_rules")
    a, b, h = "syb-even-3-0-0", "syb-even-3-0-1", "app-0001"
    arcs = Counter({(a, b): 3, (b, a): 3, (a, h): 4, (b, h): 4})
    edges = Counter()
    for (x, y), n in arcs.items():
        edges[frozenset((x, y))] += n
    eligible = {a, b, h}
    assert rules.components(edges, eligible, 3) == [eligible]
    assert rules.mutual(edges, eligible, arcs, 3) == [{a, b}]
    assert rules.own_into(edges, eligible, arcs, 3, 1) == [{a, b}]
    assert rules.active(edges, eligible, arcs, 3) == [{a, b}]
    c = "syb-even-3-0-2"  # explores from a's queries only: a one-way edge, to an active member
    arcs[(c, a)] = 3
    edges[frozenset((c, a))] = 3
    assert rules.mutual(edges, eligible | {c}, arcs, 3) == [{a, b}]
    assert rules.active(edges, eligible | {c}, arcs, 3) == [{a, b, c}]
