"""Sybil traffic family B (bench/detection/sybil_b.py): the member and ground-truth contract,
coverage of every key, timing inside the window, inputs as logged inside the feature box,
answers from the victim, determinism, the work-splitting signatures and the CLI.

Runs on digits (images) and wine (tabular), which need scikit-learn, with small groups.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.sim import Traffic, World, build_world
from exporter.sim.traffic import DEFAULT_START
from tests.conftest import REPO, load_script

pytest.importorskip("sklearn")


sb = load_script(REPO / "bench" / "detection" / "sybil_b.py", "bench_detection_sybil_b")
SIZE, PER, SEED = 4, 24, 5
DATASETS = ("digits", "wine")
CASES = [(d, s) for d in DATASETS for s in sb.STRATEGIES_B]
_CACHE: dict[tuple[str, str], Traffic] = {}


def _world(name: str) -> World:
    return build_world(name, 0)


def _traffic(name: str, strategy: str) -> Traffic:
    """The reference group of each (dataset, strategy), simulated once per test session."""
    if (name, strategy) not in _CACHE:
        _CACHE[name, strategy] = sb.simulate_sybil_b(_world(name), strategy, SIZE, SEED, 0, per_member=PER)
    return _CACHE[name, strategy]


def _same(a: Traffic, b: Traffic) -> bool:
    return (np.array_equal(a.ts, b.ts) and np.array_equal(a.client, b.client) and a.clients == b.clients
            and np.array_equal(a.X, b.X) and np.array_equal(a.P, b.P) and a.truth == b.truth)


def test_every_strategy_name_has_one_implementation():
    assert list(sb.STRATEGY_FUNCS) == list(sb.STRATEGIES_B) and len(set(sb.STRATEGIES_B)) == len(sb.STRATEGIES_B)


@pytest.mark.parametrize("name,strategy", CASES)
def test_members_truth_and_budget(name, strategy):
    t = _traffic(name, strategy)
    group = f"sybb-{strategy}-{SIZE}-0"
    assert t.clients == [f"{group}-{j}" for j in range(SIZE)]
    for c in t.clients:
        truth = dict(t.truth[c])
        params = truth.pop("params")
        assert truth == {"kind": "attack", "type": f"sybil-b-{strategy}", "group": group, "strategy": strategy, "size": SIZE}
        assert params["rounding"] in ("natural", "full", "jitter")
        assert strategy != "jbda_split" or (0.05 <= params["step"] <= 0.3 and params["split"] in ("robin", "slices", "random", "crew"))
    assert SIZE * PER // 2 <= len(t) <= SIZE * PER
    assert np.bincount(t.client, minlength=SIZE).min() >= 1  # every key sends
    assert t.model == name and np.array_equal(t.decimals, _world(name).dataset.decimals)


@pytest.mark.parametrize("name,strategy", CASES)
def test_time_order_and_window(name, strategy):
    t = _traffic(name, strategy)
    window = sb.DEFAULT_WINDOW
    assert np.all(np.diff(t.ts) >= 0)
    assert t.ts[0] >= DEFAULT_START and t.ts[-1] <= DEFAULT_START + window
    assert t.ts[0] <= DEFAULT_START + window / 2  # the group starts in the first half


@pytest.mark.parametrize("name,strategy", CASES)
def test_inputs_logged_inside_the_box_and_answered_by_the_victim(name, strategy):
    t, ds = _traffic(name, strategy), _world(name).dataset
    assert t.X.shape == (len(t), ds.dim) and np.all(np.isfinite(t.X))
    assert np.all(t.X >= ds.lo) and np.all(t.X <= ds.hi)
    assert np.array_equal(t.X, ds.round(t.X))
    np.testing.assert_allclose(t.P, _world(name).answer(t.X), rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", sb.STRATEGIES_B)
def test_deterministic_and_groups_differ(strategy):
    w, ref = _world("wine"), _traffic("wine", strategy)
    assert _same(ref, sb.simulate_sybil_b(w, strategy, SIZE, SEED, 0, per_member=PER))
    other = sb.simulate_sybil_b(w, strategy, SIZE, SEED, 1, per_member=PER)
    assert not np.array_equal(other.X[: len(ref)], ref.X[: len(other)])
    assert other.clients[0] == f"sybb-{strategy}-{SIZE}-1-0"
    assert not np.array_equal(sb.simulate_sybil_b(w, strategy, SIZE, SEED + 1, 0, per_member=PER).X[:20], ref.X[:20])


@pytest.mark.parametrize("strategy", sb.STRATEGIES_B)
def test_every_key_sends_with_tight_budgets_and_custom_window(strategy):
    w = _world("digits")
    for size, per, index in [(7, 3, 0), (12, 2, 1), (3, 40, 2)]:
        t = sb.simulate_sybil_b(w, strategy, size, 1, index, per_member=per, prefix="x", stream="s", start=1000.0, window=1800.0)
        assert np.bincount(t.client, minlength=size).min() >= 1, (size, per, index)
        assert t.ts[0] >= 1000.0 and t.ts[-1] <= 2800.0 and t.ts[0] <= 1900.0
        assert t.clients[-1] == f"x-{strategy}-{size}-{index}-{size - 1}"


def test_breast_cancer_bounds_finer_than_the_log_stay_in_the_box():
    w = build_world("breast_cancer", 0)
    ds = w.dataset
    for strategy in sb.STRATEGIES_B:
        t = sb.simulate_sybil_b(w, strategy, 3, 0, 0, per_member=15)
        assert np.all(t.X >= ds.lo) and np.all(t.X <= ds.hi) and np.array_equal(t.X, ds.round(t.X)), strategy


def test_rotation_uses_one_key_at_a_time():
    t = sb.simulate_sybil_b(_world("digits"), "rotation", 5, 2, 0, per_member=60)
    runs = 1 + int(np.count_nonzero(np.diff(t.client)))
    assert runs >= 5 and runs <= len(t) // 4  # every key takes a turn, in long stretches


def test_shared_chains_spend_every_key_budget():
    t = _traffic("wine", "shared_chains")
    assert np.array_equal(np.bincount(t.client, minlength=SIZE), np.full(SIZE, PER))


@pytest.mark.parametrize("name,index", [("wine", 0), ("wine", 1), ("wine", 2), ("digits", 0)])
def test_jbda_split_doubles_the_set_by_sign_steps_of_one_lambda(name, index):
    """Papernot's augmentation, checked on a group sent at full logged precision: every round
    after the seeds is as large as everything labelled before it (the last one at most), and
    nearly every query is an earlier one moved by the same +-lambda * range on every feature it
    was not clipped on (lambda one per group, within the rounding of the log)."""
    w = _world(name)
    ds = w.dataset
    size, per = 4, 60
    rng = sb._rng(SEED, "test", "jbda_split", size, index)
    g = sb._Group(w, rng, size, per, sb._draw_pace(rng, size), "full", 0.0)
    sb._jbda_split(g)
    X, rnd, member = np.concatenate(g.X), np.concatenate(g.rnd), np.concatenate(g.member)
    assert len(X) == size * per and np.bincount(member, minlength=size).min() >= 1
    counts = np.bincount(rnd)
    assert counts.size >= 3 and np.all(counts > 0)
    assert np.array_equal(counts[1:-1], np.cumsum(counts)[:-2]) and counts[-1] <= counts[:-1].sum()
    span = np.where(ds.span > 0, ds.span, 1.0)
    tol = (0.5 * 10.0 ** -ds.decimals.astype(float) + 1e-9) / span
    lo_band, hi_band = [], []  # per query after the seeds: the lambdas its best parent allows
    for i in np.flatnonzero(rnd > 0):
        inner = (X[i] > ds.lo) & (X[i] < ds.hi)  # features not clipped to the box
        ratio = np.abs(X[i] - X[rnd < rnd[i]]) / span
        lo = np.where(inner, ratio - tol, -np.inf).max(1)
        hi = np.where(inner, ratio + tol, np.inf).min(1)
        ok = np.flatnonzero((lo <= hi) & (lo > 0.01))
        best = ok[np.argmax(hi[ok] - lo[ok])] if ok.size else None
        lo_band.append(lo[best] if best is not None else np.nan)
        hi_band.append(hi[best] if best is not None else np.nan)
    lo_band, hi_band = np.array(lo_band), np.array(hi_band)
    lam = float(np.nanmedian((lo_band + hi_band) / 2))
    assert 0.05 - 1e-3 <= lam <= 0.3 + 1e-3 and lam == pytest.approx(g.drawn["step"], abs=2e-3)  # the step the truth reports
    assert np.mean((lo_band <= lam + 1e-9) & (lam - 1e-9 <= hi_band)) >= 0.9


def test_substitute_learns_the_victim_from_api_answers():
    w = _world("wine")
    ds = w.dataset
    t = sb.simulate_sybil_b(w, "margin_pool", 5, 0, 0, per_member=80)
    sub = sb.Substitute(np.random.default_rng(0), ds.lo, ds.hi, ds.num_classes, 32)
    sub.fit(t.X, t.P, steps=800)
    assert (sub.proba(ds.X_test).argmax(1) == w.victim.predict(ds.X_test)).mean() >= 0.8


def test_unknown_strategy_and_bad_sizes_raise():
    w = _world("wine")
    with pytest.raises(ValueError, match="unknown Sybil-B strategy 'telepathy'; known: margin_pool"):
        sb.simulate_sybil_b(w, "telepathy", 3, 0, 0)
    with pytest.raises(ValueError, match="size and per_member"):
        sb.simulate_sybil_b(w, "bisect", 0, 0, 0)


def test_cli_prints_one_line_per_strategy(capsys):
    assert sb.main(["--dataset", "wine", "--seed", "0", "--size", "3", "--per-member", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["strategy", "members"] and len(lines) == 1 + len(sb.STRATEGIES_B)
    for line, strategy in zip(lines[1:], sb.STRATEGIES_B):
        cells = line.split()
        assert cells[0] == strategy and cells[1] == "3" and int(cells[2]) <= 60
