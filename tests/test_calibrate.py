"""Calibration end to end: benign logs -> profile -> replay/run with the profile; profile errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.calibrate import threshold_for
from exporter.config import Settings
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
    assert summary["profile"] == str(out) and 60 < summary["models"]["digits"]["clients"] < 140  # the third that sets the risk threshold
    return out


def test_threshold_for_bounds_the_false_alarm_share() -> None:
    maxima = list(np.linspace(0, 1, 200))
    t = threshold_for(maxima, 0.01)
    assert sum(v >= t for v in maxima) <= 2 and sum(v >= t for v in maxima[:-3]) == 0


def test_profile_holds_thresholds_and_references(profile_path: Path) -> None:
    profile = Profile.load(profile_path)
    mp = profile.models["digits"]
    assert (mp.input_dim, mp.num_classes, mp.modality) == (64, 10, "tabular")
    assert mp.scaling is not None and mp.scaling["spread"].shape == (64,)
    assert {"confidence", "repetition", "near_duplicate", "fusion"} <= set(mp.thresholds)
    assert mp.thresholds["fusion"] >= 0.25  # the floor
    assert any(k.startswith("null.") for k in mp.fusion)


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


def test_split_by_client_is_stable_and_disjoint() -> None:
    from exporter.calibrate import split_by_client
    from exporter.events import Event

    events = [Event(f"c{i % 40}", "m", float(i), "tabular", vector=np.zeros(2)) for i in range(400)]
    parts = split_by_client(events, 3)
    groups = [{e.client for e in part} for part in parts]
    assert all(groups) and not (groups[0] & groups[1] or groups[1] & groups[2] or groups[0] & groups[2])
    assert sum(map(len, parts)) == 400
    assert split_by_client(events, 3) == parts  # stable
    one = [Event("train", "m", float(i), "tabular", vector=np.zeros(2)) for i in range(9)]
    assert [len(h) for h in split_by_client(one, 3)] == [3, 3, 3]
