"""Calibration end to end: benign logs -> profile -> replay/run with the profile; profile errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.calibrate import conformal_scale, fold_of, sessions, tail_threshold
from exporter.config import Settings
from exporter.detectors import enabled_detectors
from exporter.demo import benign_log, example_log
from exporter.profile import Profile, ProfileError
from exporter.replay import replay
from tests.conftest import REPO


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cal")
    log = tmp / "benign.jsonl"
    log.write_text("".join(line + "\n" for line in benign_log(seed=11, clients=300)))
    out = tmp / "profile.npz"
    run = cli("calibrate", "--out", str(out), str(log))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    model = summary["models"]["digits"]
    assert summary["profile"] == str(out) and model["clients"] == 300  # every client, out of fold
    assert model["promise"]["fpr"] == pytest.approx(0.01) and model["promise"]["scale"] >= 1.0  # 300 clients: 1 % is distribution-free
    assert "union bound" in model["promise"]["how"]
    return out


def test_tail_threshold_reads_order_statistics_with_enough_clients_and_extrapolates_below() -> None:
    maxima = np.linspace(0.0, 1.0, 1000)
    tau, how = tail_threshold(maxima, 0.01)  # 1000 >= 2 / 0.01: the order statistic
    assert how == "order statistics" and np.sum(maxima >= tau) <= 10 and np.sum(maxima >= tau - 0.002) >= 10
    rng = np.random.default_rng(0)
    small = rng.exponential(0.05, 20)
    tau, how = tail_threshold(small, 0.001)  # 20 clients for 0.1 %: extrapolated past the largest
    assert "exponential tail" in how and tau > small.max()
    # an exponential population: the extrapolated threshold is near the true quantile (0.05 * ln 1000 = 0.35)
    big = [tail_threshold(rng.exponential(0.05, 60), 0.001)[0] for _ in range(200)]
    assert 0.25 < np.median(big) < 0.45


def test_conformal_scale_keeps_its_promise_whatever_the_tails() -> None:
    """Raising the thresholds to the conformal order statistic keeps the promise for new
    clients drawn like the calibration clients, even where the tail model is wrong (a
    heavy-tailed mixture): measured over many calibration draws."""
    rng = np.random.default_rng(1)
    thresholds = {"a": 0.5, "b": 0.3}
    for n, alpha, promised in ((20, 0.01, 1 / 21), (60, 0.01, 1 / 61), (200, 0.01, 0.01)):
        rates = []
        for _ in range(300):
            def draw(m: int) -> dict[str, np.ndarray]:  # half the clients heavy-tailed on "a", a few extreme on "b"
                return {"a": rng.pareto(1.5, m) * 0.05, "b": np.where(rng.random(m) < 0.05, rng.uniform(0.2, 1.0, m), 0.01)}
            cal = draw(n)
            clients = [f"c{i}" for i in range(n)]
            per = {name: dict(zip(clients, cal[name])) for name in thresholds}
            scale, got, upper = conformal_scale(per, clients, thresholds, alpha)
            assert got == pytest.approx(promised) and scale >= 1.0 and upper > promised
            new = draw(2000)
            flagged = (new["a"] >= thresholds["a"] * scale) | (new["b"] >= thresholds["b"] * scale)
            rates.append(flagged.mean())
        assert np.mean(rates) <= promised * 1.1, (n, np.mean(rates), promised)
        assert np.mean(np.array(rates) > upper) <= 0.1 + 0.05  # the per-sample bound holds for 90 % of samples
    # nothing to raise when every client is under its thresholds, and a zero threshold is handled
    clients = ["x", "y"]
    assert conformal_scale({"a": {"x": 0.1, "y": 0.2}}, clients, {"a": 0.5}, 0.01)[:2] == (1.0, pytest.approx(1 / 3))
    assert conformal_scale({"a": {"x": 0.0, "y": 0.0}}, clients, {"a": 0.0}, 0.01)[0] == 1.0


def test_sessions_cut_long_clients_and_structure_free_events() -> None:
    from exporter.events import Event

    rng = np.random.default_rng(0)
    events = [Event(f"c{i % 40}", "m", float(i), "tabular", vector=np.zeros(2)) for i in range(400)]
    same, structured = sessions(events, rng)
    assert structured and same == events  # 40 clients of 10 events: nothing to cut
    one = [Event("train", "m", float(i), "tabular", vector=np.zeros(2)) for i in range(3000)]
    cut, structured = sessions(one, rng)
    assert not structured and [e.ts for e in cut] == [e.ts for e in one]
    labels = [e.client for e in cut]
    lengths = np.array([labels.count(c) for c in dict.fromkeys(labels)])  # in the order the segments come
    assert len(lengths) > 5 and lengths[:-1].min() >= 50 and lengths.max() <= 500  # the last one is what remains
    assert {fold_of(c) for c in {e.client for e in cut}} == {0, 1}


def test_profile_holds_thresholds_and_references(profile_path: Path) -> None:
    profile = Profile.load(profile_path)
    mp = profile.models["digits"]
    assert (mp.input_dim, mp.num_classes, mp.modality) == (64, 10, "tabular")
    assert mp.scaling is not None and mp.scaling["spread"].shape == (64,)
    assert {"confidence", "repetition", "near_duplicate", "knn", "ood", "steps"} <= set(mp.thresholds)
    for name, (cls, params) in enabled_detectors(Settings()).items():  # never below what a detector can tell apart
        if name in mp.thresholds:
            assert mp.thresholds[name] >= params.min_threshold
    assert mp.promise["fpr"] == pytest.approx(0.01)


def test_calibrated_replay_flags_scrapers_and_few_fresh_benign_clients(profile_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "eval.jsonl"
    scrapers = [line for line in example_log(seed=0) if '"scraper-' in line]
    fresh = list(benign_log(seed=99, clients=300))  # clients the calibration never saw
    log.write_text("".join(line + "\n" for line in sorted(scrapers + fresh, key=lambda s: json.loads(s)["ts"])))
    report = replay(Settings(), [str(log)], progress=False, profile=Profile.load(profile_path))
    flagged = {c for c, v in report["clients"].items() if v["flagged"]}
    assert {"scraper-repeat", "scraper-search", "scraper-boundary"} <= flagged
    for name in ("scraper-repeat", "scraper-search", "scraper-boundary"):
        assert report["clients"][name]["score"] > 0.9
    benign_flagged = len([c for c in flagged if c.startswith("cal-")])
    assert benign_flagged <= 9  # target 1% of 300; 3% leaves room for sampling noise


def test_profile_that_contradicts_the_config_is_a_clear_error(profile_path: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("models:\n  digits:\n    input_dim: 32\n")
    log = tmp_path / "x.jsonl"
    log.write_text("")
    run = cli("replay", "--config", str(cfg), "--profile", str(profile_path), str(log))
    assert run.returncode == 2
    assert "calibrated on 64 input features" in run.stderr and "models.digits.input_dim = 32" in run.stderr


def test_traffic_of_other_dimensions_is_rejected_under_a_profile(profile_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "x.jsonl"
    log.write_text(json.dumps({"client": "a", "model": "digits", "input": [1.0] * 10}) + "\n")
    report = replay(Settings(), [str(log)], progress=False, profile=Profile.load(profile_path))
    assert report["events"] == {"accepted": 0, "rejected": {"wrong_dimension": 1}}


def test_not_a_profile(tmp_path: Path) -> None:
    bad = tmp_path / "p.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(ProfileError, match="not a MONITAUR calibration profile"):
        Profile.load(bad)
    with pytest.raises(ProfileError, match="cannot read profile"):
        Profile.load(tmp_path / "missing.npz")
    log = tmp_path / "x.jsonl"
    log.write_text("")
    run = cli("replay", "--profile", str(bad), str(log))
    assert run.returncode == 2 and "unusable calibration profile" in run.stderr


def test_calibrating_on_nothing_fails_clearly(tmp_path: Path) -> None:
    log = tmp_path / "empty.jsonl"
    log.write_text("{bad\n")
    run = cli("calibrate", "--out", str(tmp_path / "p.npz"), str(log))
    assert run.returncode == 1 and "no valid events" in run.stderr


def test_the_calibration_ceiling_counts_linked_queries_against_a_full_links_window() -> None:
    """links' value divides by the queries in its window, at least min_events: three chance
    links among an honest client's first 50 queries make it 0.06, over the 0.05 ceiling, and
    compared with that value such a client would be left out as an attack. The
    ceiling is compared with the most linked queries among any window of consecutive judged
    queries, over the whole window, whatever the batching; and only that decides."""
    from exporter.calibrate import _attacks_inside, _LinkedWindows
    from exporter.detectors.base import Batch, Signals
    from exporter.detectors.kit import window_shares

    window, min_events = 200, 50
    rng = np.random.default_rng(3)
    cases = {
        "burst": np.isin(np.arange(120), [10, 20, 30, 45]),  # 4 early links: value 0.08, 4 of a window
        "split": rng.random(600) < 0.08,  # a split's member: far more than 10 of 200
        "chance": rng.random(900) < 0.01,
    }
    rec = _LinkedWindows({"burst", "split", "chance"}, window, min_events)
    for client, hits in cases.items():
        buf, count, start = np.zeros(window, dtype=bool), 0, 0
        while start < hits.size:  # batches of 1 to 40 events, some not judged (NaN)
            part = hits[start : start + int(rng.integers(1, 41))]
            values, flagged = window_shares(buf, count, part, min_events, 0.03)
            count += part.size
            start += part.size
            sig = Signals(np.concatenate((values, [np.nan])), np.concatenate((flagged, [False])))
            rec(Batch(client, "m", []), "links", sig)
            rec(Batch(client, "m", []), "ood", Signals(np.ones(3), np.ones(3, dtype=bool)))  # another detector: ignored
        # brute force: the most set flags among the up to `window` judged queries ending at each one
        most = max(int(hits[max(0, i + 1 - window) : i + 1].sum()) for i in range(hits.size))
        assert rec.shares["m"][client] == pytest.approx(most / window)
    assert rec.shares["m"]["burst"] == pytest.approx(4 / window)
    specs = enabled_detectors(Settings(state={"dir": None}, files={"paths": []}, detectors={"links": {"enabled": True}}))
    values = {"links": {"burst": 0.08, "split": 0.2, "chance": 0.04}}  # links' own maxima: not what decides
    found = _attacks_inside(specs, values, rec.shares["m"])
    assert found["clients"] == ["split"] and found["largest"] == pytest.approx(rec.shares["m"]["split"])


def test_a_calibration_group_standing_with_a_client_over_the_links_ceiling_is_left_out_of_the_group_threshold() -> None:
    """A split's weaker members link fewer queries than its strongest, and its group's score
    can stay under the ceiling (a weak split on digits: 0.043), which would then set the group
    threshold just above it. A group that stands with a client over the ceiling is left out,
    whatever its score; a group without one, or dissolved (no members left to check), counts."""
    from exporter.calibrate import _group_calibration

    specs = enabled_detectors(Settings(state={"dir": None}, files={"paths": []}, detectors={"links": {"enabled": True}}))
    groups = [(0.043, ("a", "b", "c")), (0.03, ("d", "e")), (0.5, ()), (0.01, ())]  # the last two dissolved
    calibrated = _group_calibration(specs, groups, 0.01, True, {"a"})
    assert calibrated["left_out_groups"] == 2 and calibrated["benign_groups"] == 2 and calibrated["max_benign_score"] == pytest.approx(0.03)
    assert calibrated["threshold"] == pytest.approx(np.nextafter(0.03, 1.0))  # just above the largest benign group
    kept = _group_calibration(specs, groups, 0.01, False, {"a"})  # most clients over it: nothing left out
    assert kept["benign_groups"] == 4 and "left_out_groups" not in kept
    assert _group_calibration(specs, groups, 0.01, True, set())["left_out_groups"] == 1  # by score alone
