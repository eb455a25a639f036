"""Linking coordinated clients on simulated traffic: a JbDA split on continuous features becomes one group;
popular inputs, apps of one organisation, retries after an outage and a framing attacker link nobody honest.

Every case runs the real pipeline (``replay`` with a profile from ``calibrate``) on traffic of
``exporter.sim``; needs scikit-learn for the datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from exporter.calibrate import calibrate  # noqa: E402
from exporter.config import Settings  # noqa: E402
from exporter.profile import Profile  # noqa: E402
from exporter.replay import replay  # noqa: E402
from exporter.sim import Traffic, build_world  # noqa: E402
from exporter.sim.traffic import DEFAULT_START  # noqa: E402
from tests.sybil import _merge, benign_only, sybil_split  # noqa: E402

DATASET = "breast_cancer"  # 30 continuous features


def settings(**links: object) -> Settings:
    """The tests' settings; ``links`` overrides parameters of the detector."""
    return Settings(state={"dir": None}, files={"paths": []}, calibration={"target_fpr": 0.01}, detectors={"links": {"enabled": True, **links}})  # links is opt-in


def calibrated(directory: Path, **links: object) -> Profile:
    """A profile calibrated on 80 honest clients, with ``links`` parameters (a profile is valid for the parameters it was calibrated with)."""
    log = directory / "cal.jsonl"
    benign_only(DATASET, clients=80).write(log, append=False)
    return calibrate(settings(**links), [str(log)], progress=False)[0]


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Profile:
    return calibrated(tmp_path_factory.mktemp("links"))


def run(traffic: Traffic, path: Path, profile: Profile, **links: object) -> dict:
    traffic.write(path, append=False)
    return replay(settings(**links), [str(path)], progress=False, profile=profile)


def honest(report: dict) -> list[str]:
    return [c for c in report["clients"] if c.startswith("app-")]


def test_a_jbda_split_of_ten_on_continuous_features_is_named_as_one_group(profile: Profile, tmp_path: Path) -> None:
    traffic, members = sybil_split(DATASET, size=10, per_member=300, benign=40)
    report = run(traffic, tmp_path / "sybil.jsonl", profile)
    found = {c: report["clients"][c]["group"] for c in members}
    groups = [g for g in found.values() if g]
    assert groups, "the split was not linked at all"
    best = max(set(groups), key=groups.count)
    assert groups.count(best) >= 8, found  # >= 80 % of the members in one group
    g = report["groups"][best]
    assert g["flagged"] and g["score"] >= g["threshold"] and g["first_flagged"] is not None
    assert all(report["clients"][c]["group"] is None for c in honest(report))  # no honest client in any group
    assert all(m["links"] >= 1 and m["queries"] == 300 and 0.0 < m["strength"] <= 1.0 for m in g["members"].values())


def test_one_event_stamped_far_in_the_future_neither_expires_a_group_in_replay_nor_enters_calibration(
    profile: Profile, tmp_path: Path
) -> None:
    """What is kept by event time expires against the latest event time. Sorted last, one line
    stamped in the year 2999 would expire the split's group before the report was written.
    replay and calibrate reject it (future_timestamp) and judge the rest as without it."""
    traffic, _ = sybil_split(DATASET, size=10, per_member=300, benign=40)
    plain = run(traffic, tmp_path / "plain.jsonl", profile)
    assert plain["groups"], "the split formed no group: the check below would be vacuous"
    log = tmp_path / "far.jsonl"
    traffic.write(log, append=False)
    far = json.dumps({**json.loads(log.read_text().splitlines()[-1]), "ts": 32503679999.0})  # a member's or an honest client's
    with log.open("a") as fh:
        fh.write(far + "\n")
    report = replay(settings(), [str(log)], progress=False, profile=profile)
    assert report["events"]["rejected"] == {"future_timestamp": 1}
    assert report["events"]["accepted"] == plain["events"]["accepted"]
    assert report["groups"] == plain["groups"] and report["clients"] == plain["clients"]
    cal = tmp_path / "cal.jsonl"
    benign_only(DATASET, clients=20).write(cal, append=False)
    with cal.open("a") as fh:
        fh.write(far + "\n")
    assert calibrate(settings(), [str(cal)], progress=False)[1]["events"]["rejected"] == {"future_timestamp": 1}


def test_a_split_inside_the_calibration_log_neither_raises_the_thresholds_nor_hides_the_next_one(
    profile: Profile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Calibration logs are production logs, and may hold an attack. A 10-way split among the
    80 honest calibration clients would set links' threshold and the group threshold just
    above its own values (the top of 90 clients), and the next split would form a group that
    is never flagged. Clients and groups over links' calibration_ceiling (0.05) are left out
    of every reference and threshold, named in the summary, and warned about."""
    log = tmp_path / "cal.jsonl"
    attack, members = sybil_split(DATASET, size=10, per_member=300, benign=0, seed=1)
    _merge([benign_only(DATASET, clients=80), attack]).write(log, append=False)
    caplog.set_level("WARNING", logger="monitaur.calibrate")
    poisoned, summary = calibrate(settings(), [str(log)], progress=False)
    model = summary["models"][DATASET]
    assert model["thresholds"]["links"] == pytest.approx(profile.models[DATASET].thresholds["links"])  # as on honest clients alone
    assert model["groups"]["threshold"] == pytest.approx(0.02) and model["groups"]["left_out_groups"] >= 1
    found = model["attacks_inside"]
    assert set(found["clients"]) <= set(members) and len(found["clients"]) >= 8 and found["largest"] > 0.05 and found["left_out"]
    assert model["clients"] == summary_clients(log) - len(found["clients"])  # left out of everything learned
    assert "seems to hold an attack" in caplog.text and found["clients"][0] in caplog.text
    traffic, split = sybil_split(DATASET, size=10, per_member=300, benign=40)
    report = run(traffic, tmp_path / "sybil.jsonl", poisoned)
    groups = [report["clients"][c]["group"] for c in split]
    best = max(set(groups) - {None}, key=groups.count)
    assert groups.count(best) >= 8 and report["groups"][best]["flagged"]


def summary_clients(log: Path) -> int:
    """Distinct client ids of a log (calibrate's clients when none is cut into sessions)."""
    return len({json.loads(line)["client"] for line in log.read_text().splitlines()})


def test_clients_sending_the_same_popular_inputs_are_not_linked(profile: Profile, tmp_path: Path) -> None:
    traffic = benign_only(DATASET, clients=60, mix={"popular": 1.0}, stream="tests-popular", prefix="app")
    report = run(traffic, tmp_path / "popular.jsonl", profile)
    assert report["groups"] == {}
    assert not any(v["detectors"]["links"]["flagged"] for v in report["clients"].values())
    # Sharing the inputs is no evidence: at most a chance continuation of one query here and there.
    assert sum(v["detectors"]["links"]["value"] > 0.0 for v in report["clients"].values()) <= 1


def test_apps_of_one_organisation_with_similar_data_are_not_linked(profile: Profile, tmp_path: Path) -> None:
    traffic = benign_only(DATASET, clients=40, mix={"org_app": 1.0}, stream="tests-org", prefix="app")
    orgs = {info["group"] for info in traffic.truth.values()}
    assert len(orgs) >= 8  # several organisations of 2-5 apps each: the check is not vacuous
    report = run(traffic, tmp_path / "org.jsonl", profile)
    assert report["groups"] == {}
    assert not any(v["detectors"]["links"]["flagged"] for v in report["clients"].values())


def test_many_clients_retrying_after_an_outage_are_not_linked(profile: Profile, tmp_path: Path) -> None:
    traffic = benign_only(DATASET, clients=40, mix={"outage_retry": 1.0}, stream="tests-outage", prefix="app")
    report = run(traffic, tmp_path / "outage.jsonl", profile)
    assert report["groups"] == {}
    assert not any(v["detectors"]["links"]["flagged"] for v in report["clients"].values())


def test_clients_that_start_at_the_same_moment_are_not_linked(profile: Profile, tmp_path: Path) -> None:
    """60 honest clients of the default mix, each moved in time so that all of them send their
    first query in the same second and keep their own pace after it: time alone links nobody."""
    traffic = benign_only(DATASET, clients=60, stream="tests-together", prefix="app")
    first = np.full(len(traffic.clients), np.inf)
    np.minimum.at(first, traffic.client, traffic.ts)
    ts = traffic.ts - first[traffic.client] + DEFAULT_START + 0.01 * traffic.client  # every start within 0.6 s
    order = np.argsort(ts, kind="stable")
    together = Traffic(ts[order], traffic.client[order], traffic.clients, traffic.X[order], traffic.P[order], traffic.truth,
                       traffic.model, traffic.decimals)
    starts = [together.ts[together.client == c].min() for c in np.unique(together.client)]
    assert len(starts) == 60 and max(starts) - min(starts) < 1.0
    report = run(together, tmp_path / "together.jsonl", profile)
    assert len(report["clients"]) == 60
    assert report["groups"] == {}
    assert not any(v["detectors"]["links"]["flagged"] for v in report["clients"].values())


def test_a_popular_input_sent_again_and_again_does_not_push_a_parent_out_of_the_index(profile: Profile, tmp_path: Path) -> None:
    """A parent point p1 (one step from p0, sent by alice), then 300 copies of one honest input
    right next to it (30 clients, 10 each: more than a bucket's depth, in the same buckets), then
    bob's steps from p1: a repeated point is filed once, so p1 is still a candidate and bob's
    queries continue alice's step."""
    world = build_world(DATASET, 0)
    ds = world.dataset
    rng = np.random.default_rng(2)  # p0, p1 and most children share some of their buckets
    lam = 0.05 * ds.span
    p0 = ds.lo + ds.span * rng.uniform(0.35, 0.65, ds.dim)
    p1 = p0 + lam * rng.choice([-1.0, 1.0], ds.dim)
    popular = p1 + 0.002 * ds.span * rng.uniform(-1.0, 1.0, ds.dim)
    children = p1 + lam * rng.choice([-1.0, 1.0], (10, ds.dim))
    X = ds.round(np.vstack([p0, p1, np.repeat(popular[None], 300, axis=0), children]))
    who = np.concatenate([[0, 0], 2 + np.arange(300) % 30, np.ones(10, dtype=np.int64)])
    ts = DEFAULT_START + np.arange(len(X), dtype=np.float64)
    names = ["alice", "bob", *[f"app-{j:04d}" for j in range(30)]]
    truth = {n: {"kind": "benign" if n.startswith("app-") else "attack", "type": "test"} for n in names}
    report = run(Traffic(ts, who, names, X, world.answer(X), truth, world.model, ds.decimals), tmp_path / "popular-parent.jsonl", profile)
    assert report["clients"]["bob"]["detectors"]["links"]["value"] > 0.0  # bob continued alice's step
    assert all(report["clients"][n]["detectors"]["links"]["value"] == 0.0 for n in names if n.startswith("app-"))


def test_an_attacker_who_copies_and_steps_away_from_an_honest_clients_queries_frames_nobody(profile: Profile, tmp_path: Path) -> None:
    """mallory-* copy every query of one honest client and explore away from them (JbDA rounds
    of sign steps grown from the honest client's points), each key a share of it. The attack is
    linked (the mallory keys form a group), the honest client stays unlinked and unflagged."""
    world = build_world(DATASET, 0)
    ds = world.dataset
    victim = benign_only(DATASET, clients=1, stream="tests-framed", prefix="honest")
    others, _ = sybil_split(DATASET, size=3, per_member=10, benign=30, start=DEFAULT_START)  # some ordinary traffic around
    rng = np.random.default_rng(3)
    lam = 0.05 * ds.span
    rounds = [victim.X.copy()]
    for _ in range(4):
        rounds.append(ds.round(ds.clip(rounds[-1] + lam * rng.choice([-1.0, 1.0], victim.X.shape))))
    later = max(victim.ts.max(), others.ts.max()) + 60.0
    rest = [later + 1000.0 * k + np.arange(len(victim), dtype=np.float64) for k in range(3)]
    X_a = np.concatenate(rounds)
    ts_a = np.concatenate([victim.ts + 5.0, victim.ts + 10.0, *rest])
    order = np.argsort(ts_a, kind="stable")
    X_a, ts_a = X_a[order], ts_a[order]
    attackers = Traffic(ts_a, np.arange(len(X_a)) % 3, ["mallory-0", "mallory-1", "mallory-2"], X_a, world.answer(X_a),
                        {f"mallory-{j}": {"kind": "attack", "type": "framing", "group": "mallory"} for j in range(3)}, world.model, ds.decimals)
    traffic = _merge([victim, attackers, others])
    report = run(traffic, tmp_path / "framing.jsonl", profile)
    mallory = [f"mallory-{j}" for j in range(3)]
    assert all(report["clients"][m]["detectors"]["links"]["value"] > 0.0 for m in mallory)  # the attack itself is linked
    assert any(sum(m in g["members"] for m in mallory) >= 2 for g in report["groups"].values())
    h = report["clients"]["honest-0000"]
    assert h["group"] is None
    assert h["detectors"]["links"]["value"] == 0.0 and not h["detectors"]["links"]["flagged"]
    assert not h["flagged"]
    assert all("honest-0000" not in g["members"] for g in report["groups"].values())


def synthetic_points(n: int, seed: int) -> np.ndarray:
    """``n`` inputs drawn uniformly in the data's box, rounded as logged: off the benign data
    (breast cancer's 30 features are strongly correlated), and with no step in common."""
    world = build_world(DATASET, 0)
    ds = world.dataset
    return ds.round(ds.lo + ds.span * np.random.default_rng(seed).uniform(0.0, 1.0, (n, ds.dim)))


def resending_split(size: int = 10, per_member: int = 300, seed: int = 5) -> tuple[Traffic, list[str]]:
    """A split whose keys send synthetic points with no common step (``links``' step tests
    see nothing), each point sent first by one key and re-sent by two others later: the
    textbook JbDA re-queries the points whose signs did not change, and any key may draw them."""
    world = build_world(DATASET, 0)
    rng = np.random.default_rng(seed)
    points = synthetic_points(size * per_member // 3, seed)
    X = np.concatenate([points, points[rng.permutation(len(points))], points[rng.permutation(len(points))]])
    who = rng.permutation(np.arange(len(X)) % size)
    ts = DEFAULT_START + 600.0 + 2.0 * np.arange(len(X), dtype=np.float64)
    names = [f"rsyb-{j}" for j in range(size)]
    truth = {n: {"kind": "attack", "type": "sybil", "group": "rsyb"} for n in names}
    attack = Traffic(ts, who, names, X, world.answer(X), truth, world.model, world.dataset.decimals)
    return _merge([attack, benign_only(DATASET, clients=40, stream="tests-resend", prefix="app")]), names


def test_a_split_that_resends_its_own_synthetic_points_is_named_by_the_repeats(profile: Profile, tmp_path: Path) -> None:
    traffic, members = resending_split()
    report = run(traffic, tmp_path / "resend.jsonl", profile)
    groups = [report["clients"][c]["group"] for c in members]
    best = max(set(groups), key=groups.count)
    assert best is not None and groups.count(best) >= 8, groups
    assert report["groups"][best]["flagged"]
    assert all(report["clients"][c]["group"] is None for c in honest(report))
    # Without anchors (a reference fitted before the off-manifold test) the same traffic links
    # nobody: the repeats are what named the group.
    without = run(traffic, tmp_path / "resend.jsonl", calibrated(tmp_path, anchors=0), anchors=0)
    assert without["groups"] == {} and not any(without["clients"][c]["detectors"]["links"]["value"] > 0.0 for c in members)


def test_honest_clients_sharing_synthetic_fixtures_are_not_grouped(profile: Profile, tmp_path: Path) -> None:
    """Health checks and test fixtures: 30 honest clients each send, among their ordinary
    queries, the same four synthetic inputs now and then; an attacker sends the fixtures first
    (framing: every honest copy then repeats the attacker's off-manifold input). A client's
    repeats link it only past its first ``distinct_repeats`` distinct ones: no honest client is
    flagged by links or joins a group."""
    world = build_world(DATASET, 0)
    base = benign_only(DATASET, clients=30, stream="tests-fixtures", prefix="app")
    fixtures = synthetic_points(4, 11)
    rng = np.random.default_rng(12)
    at = np.flatnonzero(rng.random(len(base)) < 0.05)  # 5 % of each client's queries are fixtures
    X = base.X.copy()
    X[at] = fixtures[rng.integers(0, 4, at.size)]
    early = base.ts.min() - 10.0 + np.arange(4, dtype=np.float64)
    ts = np.concatenate([early, base.ts])
    who = np.concatenate([np.full(4, 30), base.client])
    Xa = np.concatenate([fixtures, X])
    truth = dict(base.truth) | {"mallory": {"kind": "attack", "type": "framing"}}
    traffic = Traffic(ts, who, [*base.clients, "mallory"], Xa, world.answer(Xa), truth, world.model, world.dataset.decimals)
    # Counting every repeat (no distinct inputs remembered), most apps are flagged: the check is not vacuous.
    for links, flagged in (({}, 0), ({"distinct_repeats": 0, "repeats_remembered": 1}, 20)):
        report = run(traffic, tmp_path / "fixtures.jsonl", calibrated(tmp_path, **links) if links else profile, **links)
        apps = {c: v for c, v in report["clients"].items() if c.startswith("app-")}
        assert len(apps) == 30
        n = sum(v["detectors"]["links"]["flagged"] for v in apps.values())
        if flagged:
            assert n >= flagged, (links, n)
        else:
            assert n == 0 and report["groups"] == {} and all(v["group"] is None for v in apps.values())


def test_links_made_by_repeats_do_not_depend_on_the_block_size(profile: Profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The off-manifold test is cached per indexed entry and the distinct repeats are kept per
    client: cut into blocks of any size, the same events give the same links and groups."""
    from exporter import replay as replay_module

    traffic, members = resending_split(size=5, per_member=120)
    reports = []
    for size in (262_144, 1000, 37):
        monkeypatch.setattr(replay_module, "BLOCK", size)
        reports.append(run(traffic, tmp_path / "resend.jsonl", profile))
    assert any(reports[0]["clients"][c]["detectors"]["links"]["value"] > 0.0 for c in members)  # the check is not vacuous
    for report in reports[1:]:
        assert report["clients"] == reports[0]["clients"] and report["groups"] == reports[0]["groups"]
