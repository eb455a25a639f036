"""Benign traffic family B (bench/detection/family_b.py): determinism, validity through the
real decoder, the documented session lengths, each behaviour's signature, merge() and the CLI.

Everything runs on the "synthetic" dataset (no scikit-learn), except one tabular decoder check.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.config import Settings
from exporter.events import Decoder
from exporter.sim import Population, Traffic, build_world, simulate
from exporter.sim.traffic import DEFAULT_START
from tests.conftest import REPO, load_script


fb = load_script(REPO / "bench" / "detection" / "family_b.py", "bench_detection_family_b")
SMALL = fb.FamilyB(length=fb.LengthDist(20, 300))  # short sessions keep the tests fast
SEED = 3
N = 72  # ~4-7 clients of every behaviour with the default mix


@pytest.fixture(scope="module")
def world():
    return build_world("synthetic", 0)


@pytest.fixture(scope="module")
def traffic(world):
    return fb.simulate_benign_b(world, N, SEED, family=SMALL)


def _types(t: Traffic) -> np.ndarray:
    return np.array([t.truth[c]["type"] for c in t.clients])


def _of(t: Traffic, kind: str) -> list[int]:
    return [int(i) for i in np.flatnonzero(_types(t) == kind)]


def _margins(t: Traffic) -> np.ndarray:
    P = np.sort(t.P, axis=1)
    return P[:, -1] - P[:, -2]


def _same(a: Traffic, b: Traffic) -> bool:
    return (np.array_equal(a.ts, b.ts) and np.array_equal(a.client, b.client) and a.clients == b.clients
            and np.array_equal(a.X, b.X) and np.array_equal(a.P, b.P) and a.truth == b.truth)


# -- determinism and structure ---------------------------------------------------------------
def test_same_seed_same_traffic_and_another_stream_other_clients(world, traffic):
    assert _same(traffic, fb.simulate_benign_b(world, N, SEED, family=SMALL))
    other = fb.simulate_benign_b(world, N, SEED, family=SMALL, stream="b-cal")
    assert not np.array_equal(other.X[other.client == 0], traffic.X[traffic.client == 0])
    assert fb.outage_span(SEED, "b-cal", SMALL, DEFAULT_START, fb.DEFAULT_WINDOW) != fb.outage_span(SEED, "b-eval", SMALL, DEFAULT_START, fb.DEFAULT_WINDOW)


def test_growing_the_population_keeps_earlier_clients(world, traffic):
    small = fb.simulate_benign_b(world, 30, SEED, family=SMALL)
    for i in range(30):
        a, b = small.client == i, traffic.client == i
        assert np.array_equal(small.ts[a], traffic.ts[b]) and np.array_equal(small.X[a], traffic.X[b])
        assert small.truth[small.clients[i]] == traffic.truth[traffic.clients[i]]


def test_time_order_window_and_ground_truth(traffic):
    assert np.all(np.diff(traffic.ts) >= 0)
    assert traffic.ts.min() >= DEFAULT_START and traffic.ts.max() <= DEFAULT_START + fb.DEFAULT_WINDOW
    assert set(_types(traffic)) == set(fb.BEHAVIOURS_B) == set(fb.DEFAULT_MIX_B)
    for name, t in traffic.truth.items():
        assert t["kind"] == "benign" and name.startswith("bapp-")
        assert (t["group"] is not None) == (t["type"] == "org_app")
    gt = traffic.ground_truth(seed=SEED)
    assert sum(c["queries"] for c in gt["clients"].values()) == len(traffic)


def test_every_line_passes_the_real_decoder(traffic):
    decoder = Decoder(Settings())
    events = [decoder.decode_line(line) for line in traffic.lines()]  # raises Rejected on any bad line
    assert len(events) == len(traffic)
    assert all(e.client.startswith("bapp-") for e in events[:50])


def test_tabular_lines_pass_the_decoder_and_stay_in_the_box():
    pytest.importorskip("sklearn")
    w = build_world("wine", 0)
    t = fb.simulate_benign_b(w, 24, 1, family=SMALL)
    decoder = Decoder(Settings())
    assert sum(1 for line in t.lines() if decoder.decode_line(line)) == len(t)
    ds = w.dataset
    assert np.all(t.X >= ds.lo) and np.all(t.X <= ds.hi)
    assert np.array_equal(t.X, ds.round_natural(t.X))  # natural precision, nothing finer


def test_inputs_are_natural_precision_inside_the_box(world, traffic):
    ds = world.dataset
    assert np.all(traffic.X >= ds.lo) and np.all(traffic.X <= ds.hi)
    assert np.array_equal(traffic.X, ds.round_natural(traffic.X))


def test_session_lengths_span_the_documented_heavy_tailed_range(traffic):
    d = fb.LengthDist()
    rng = np.random.default_rng(0)
    n = np.array([d.sample(rng) for _ in range(20000)])
    assert n.min() == 20 and 3000 <= n.max() <= 5000
    assert 40 <= np.median(n) <= 90 and n.mean() > 2.5 * np.median(n)  # heavy tail
    counts = np.bincount(traffic.client)
    assert counts.min() >= 20 and counts.max() <= 300


def test_family_parameters_are_validated_and_hold_out_behaviours(world):
    with pytest.raises(ValueError, match="unknown"):
        fb.simulate_benign_b(world, 3, 0, family=fb.FamilyB(mix={"interactive": 1, "telepathy": 1}))
    with pytest.raises(ValueError):
        fb.FamilyB(machine_rate=(2.0, 1.0)).validate()
    held = fb.simulate_benign_b(world, 20, 0, family=SMALL.without("bulk", "canary"))
    assert not {"bulk", "canary"} & set(_types(held))
    assert set(_types(fb.simulate_benign_b(world, 5, 0, family=SMALL.only("reviewer")))) == {"reviewer"}


# -- behaviour signatures --------------------------------------------------------------------
def test_outage_retry_clients_resend_inside_the_retry_span(traffic):
    down, up, end = fb.outage_span(SEED, "b-eval", SMALL, DEFAULT_START, fb.DEFAULT_WINDOW)
    retry = _of(traffic, "outage_retry")
    assert len(retry) >= 3
    exact_copies = 0
    for i in retry:
        m = traffic.client == i
        ts, X = traffic.ts[m], traffic.X[m]
        assert not np.any((ts >= down) & (ts < up)), "nothing is answered during the outage"
        inside = np.flatnonzero((ts >= up) & (ts <= end))
        assert inside.size >= 1
        assert inside.size / (end - up) > 3 * len(ts) / (ts[-1] - ts[0])  # a burst of re-sends
        exact_copies += sum(bool((X[j] == X[:j]).all(axis=1).any()) for j in inside)
    assert exact_copies >= len(retry)  # answered-but-lost queries come back identical


def test_org_apps_share_a_sub_distribution(traffic):
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(traffic.clients):
        if traffic.truth[c]["group"]:
            groups.setdefault(traffic.truth[c]["group"], []).append(i)
    multi = [g for g in groups.values() if len(g) >= 2]
    assert multi
    outsiders = [i for i in range(len(traffic.clients)) if traffic.truth[traffic.clients[i]]["group"] is None]
    X_out = traffic.X[np.isin(traffic.client, outsiders)]
    for a, b, *_ in multi:
        Xa, Xb = traffic.X[traffic.client == a], traffic.X[traffic.client == b]
        shared = sum(bool((Xb == x).all(axis=1).any()) for x in Xa)
        assert 0 < shared < len(Xa)  # overlapping, not identical
        to_mate = np.sqrt(((Xa[:, None] - Xb[None]) ** 2).sum(-1)).min(1)
        to_out = np.sqrt(((Xa[:, None] - X_out[None]) ** 2).sum(-1)).min(1)
        assert np.median(to_mate) < np.median(to_out)


def test_canaries_repeat_a_small_fixed_set(traffic):
    for i in _of(traffic, "canary"):
        X = traffic.X[traffic.client == i]
        assert len(np.unique(X, axis=0)) <= 9 and len(X) >= 20


def test_reviewers_send_borderline_cases(traffic):
    m = _margins(traffic)
    q20 = np.quantile(m[np.isin(traffic.client, _of(traffic, "interactive"))], 0.2)
    for i in _of(traffic, "reviewer"):
        assert np.mean(m[traffic.client == i] <= q20) > 0.8


def test_form_edits_change_few_features_at_a_time(traffic):
    changed = []
    for i in _of(traffic, "form_edit"):
        X = traffic.X[traffic.client == i]
        changed.extend((np.diff(X, axis=0) != 0).sum(axis=1))
    assert np.median(changed) <= 3


def test_bulk_jobs_send_bursts(traffic):
    for i in _of(traffic, "bulk"):
        gaps = np.diff(traffic.ts[traffic.client == i])
        assert np.mean(gaps <= 0.02) > 0.8


def test_class_subset_clients_see_few_classes(traffic):
    for i in _of(traffic, "class_subset"):
        counts = np.sort(np.bincount(traffic.P[traffic.client == i].argmax(1)))[::-1]
        assert counts[:3].sum() >= 0.9 * counts.sum()


def test_popular_clients_resend_the_shared_pool(world, traffic):
    pool = fb.popular_pool(world, SEED, SMALL.popular_pool)

    def share(kind: str) -> float:
        X = traffic.X[np.isin(traffic.client, _of(traffic, kind))]
        return float(np.mean([(pool == x).all(axis=1).any() for x in X]))

    assert 0.4 < share("popular") < 0.8  # popular_share = 0.6
    assert share("interactive") < 0.06  # popular_background = 0.02


def test_drift_clients_change_their_class_mix_and_fade(world):
    def stats(kind: str) -> tuple[float, float]:
        t = fb.simulate_benign_b(world, 6, 1, family=fb.FamilyB(length=fb.LengthDist(300, 300)).only(kind))
        chi2, fade = [], []
        for i in range(6):
            m = t.client == i
            y, X = t.P[m].argmax(1), t.X[m]
            H = np.array([np.bincount(y[s], minlength=10) for s in np.array_split(np.arange(len(y)), 5)], dtype=float)
            E = H.sum(1, keepdims=True) * H.sum(0, keepdims=True) / H.sum()
            chi2.append(((H - E) ** 2 / np.where(E > 0, E, 1)).sum())
            fade.append(X[-60:].mean() / X[:60].mean())
        return float(np.median(chi2)), float(np.median(fade))

    drift, steady = stats("drift"), stats("interactive")
    assert drift[0] > 1.5 * steady[0]  # class mix moves over the session
    assert drift[1] < 0.97 < steady[1] + 0.03  # images fade


def test_imputing_clients_send_cropped_scans(traffic):
    def cropped(kind: str) -> float:
        X = traffic.X[np.isin(traffic.client, _of(traffic, kind))].reshape(-1, 8, 8)
        return float(np.mean((X[:, 0] == 0).all(1) | (X[:, -1] == 0).all(1)))

    assert cropped("imputing") > 0.1 and cropped("interactive") < 0.02


def test_humans_think_and_sometimes_double_submit(traffic):
    gaps, doubles = [], 0
    for i in _of(traffic, "interactive"):
        ts, X = traffic.ts[traffic.client == i], traffic.X[traffic.client == i]
        gaps.extend(np.diff(ts))
        doubles += int((np.diff(X, axis=0) == 0).all(axis=1).sum())
    assert np.median(gaps) >= 1.0 and doubles >= 1


def test_proxies_mix_several_users(traffic):
    for i in _of(traffic, "proxy"):
        assert len(np.unique(traffic.P[traffic.client == i].argmax(1))) >= 3


# -- merge and CLI ---------------------------------------------------------------------------
def test_merge_keeps_time_order_counts_and_truth(world, traffic):
    attackers = simulate(world, Population(benign=0, attacks={"jbda": 1, "uniform": 1}, attack_queries=60), seed=0)
    both = fb.merge(traffic, attackers)
    assert len(both) == len(traffic) + len(attackers)
    assert np.all(np.diff(both.ts) >= 0)
    assert both.clients == traffic.clients + attackers.clients
    counts = np.bincount(both.client, minlength=len(both.clients))
    for t in (traffic, attackers):
        own = np.bincount(t.client, minlength=len(t.clients))
        for i, c in enumerate(t.clients):
            assert counts[both.clients.index(c)] == own[i]
            assert both.truth[c] == t.truth[c]
    first = both.client[0]
    assert np.array_equal(both.X[both.client == first][0], (traffic if first < len(traffic.clients) else attackers).X[0])
    with pytest.raises(ValueError, match="clash"):
        fb.merge(traffic, traffic)


def test_merge_is_stable_for_equal_timestamps(world):
    def tiny(name: str, value: float) -> Traffic:
        X = np.full((2, world.dataset.dim), value)
        return Traffic(np.array([5.0, 5.0]), np.array([0, 0]), [name], X, world.answer(X), {name: {"kind": "benign"}},
                       world.model, world.dataset.decimals)

    m = fb.merge(tiny("a", 1.0), tiny("b", 2.0))
    assert m.clients == ["a", "b"] and list(m.client) == [0, 0, 1, 1]
    assert list(m.X[:, 0]) == [1.0, 1.0, 2.0, 2.0]
    other = tiny("c", 1.0)
    other.model = "another"
    with pytest.raises(ValueError, match="model"):
        fb.merge(tiny("a", 1.0), other)


def test_cli_writes_json_lines_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    assert fb.main(["--dataset", "synthetic", "--clients", "14", "--seed", "0", "--window", "3600", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    printed = capsys.readouterr().out
    assert printed.startswith(f"{len(lines)} events from 14 clients")
    assert "interactive" in printed and "org_app" in printed
