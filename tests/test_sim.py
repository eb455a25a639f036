"""The traffic simulator: determinism, the event contract, each behaviour's and attack's
shape, and the ``simulate`` command writing files and pushing to a real exporter.

Everything here uses the numpy-only ``synthetic`` dataset, so it runs without scikit-learn.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.app import App
from exporter.config import Settings
from exporter.events import Decoder
from exporter.sim import ATTACKS, BEHAVIOURS, Population, build_world, run_attack, simulate
from exporter.sim.benign import DEFAULT_MIX, organisation
from exporter.sim.attacks import BudgetExhausted, Interleave, Oracle, augmentation_parents, coordinated_augmentation
from exporter.sim.cli import main as simulate_main
from exporter.sim.datasets import FRACTIONS, load, sklearn_available
from exporter.sim.traffic import allocate

WORLD_SEED = 3


@pytest.fixture(scope="module")
def world():
    return build_world("synthetic", WORLD_SEED)


@pytest.fixture(scope="module")
def mixed(world):
    """A small population with every behaviour and every attack."""
    pop = Population(benign=14, benign_queries=40, attacks={a: 1 for a in ATTACKS}, attack_queries=300)
    return simulate(world, pop, seed=1)


def rows_of(traffic, client: str) -> tuple[np.ndarray, np.ndarray]:
    i = traffic.clients.index(client)
    sel = traffic.client == i
    return traffic.ts[sel], traffic.X[sel]


# -- datasets and the victim ------------------------------------------------------------------
def test_synthetic_dataset_splits_and_box() -> None:
    ds = load("synthetic", 0)
    sizes = {r: len(getattr(ds, f"X_{r}")) for r in ("victim", "benign", "attacker", "test")}
    total = sum(sizes.values())
    for role, frac in FRACTIONS.items():
        assert abs(sizes[role] / total - frac) < 0.01
    assert (ds.lo <= ds.X_test.min(0)).all() and (ds.hi >= ds.X_test.max(0)).all()
    assert ds.dim == 64 and ds.num_classes == 10 and (ds.data_decimals == 0).all()


def test_victim_is_accurate_and_gives_probabilities(world) -> None:
    ds = world.dataset
    p = world.victim.predict_proba(ds.X_test)
    assert np.allclose(p.sum(1), 1) and (p >= 0).all()
    assert (p.argmax(1) == ds.y_test).mean() > 0.9
    uniform = world.victim.predict_proba(np.random.default_rng(0).uniform(ds.lo, ds.hi, (300, ds.dim)))
    assert uniform.max(1).mean() < p.max(1).mean()  # less confident off the data


@pytest.mark.skipif(not sklearn_available(), reason="scikit-learn (the bench extra) is not installed")
@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_sklearn_datasets(name: str) -> None:
    w = build_world(name, 0)
    ds = w.dataset
    assert (w.victim.predict(ds.X_test) == ds.y_test).mean() > 0.85
    off = ds.off_distribution(np.random.default_rng(0), 200)
    assert off.shape == (200, ds.dim) and (off >= ds.lo - 1e-9).all() and (off <= ds.hi + 1e-9).all()


# -- determinism and the event contract --------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_traffic(world) -> None:
    pop = Population(benign=6, benign_queries=30, attacks={"jbda": 1, "simba": 1}, attack_queries=120)
    a = list(simulate(world, pop, seed=5).lines())
    b = list(simulate(build_world("synthetic", WORLD_SEED), pop, seed=5).lines())
    c = list(simulate(world, pop, seed=6).lines())
    assert a == b
    assert a != c


def test_adding_attackers_leaves_benign_traffic_unchanged(world) -> None:
    alone = simulate(world, Population(benign=5, benign_queries=30), seed=2)
    mixed = simulate(world, Population(benign=5, benign_queries=30, attacks={"uniform": 2}, attack_queries=50), seed=2)
    for client in alone.clients:
        assert np.array_equal(rows_of(alone, client)[1], rows_of(mixed, client)[1])


def test_every_line_decodes_with_the_exporter_decoder(mixed) -> None:
    decoder = Decoder(Settings())
    lines = list(mixed.lines())
    assert len(lines) == len(mixed)
    last = -1.0
    for line in lines:
        obj = json.loads(line)
        assert list(obj) == ["ts", "client", "model", "input", "output"]
        event = decoder.decode_line(line)
        assert event.model == "synthetic" and event.vector.shape == (64,) and event.probs.shape == (10,)
        assert event.ts >= last
        last = event.ts
    assert {json.loads(line)["client"] for line in lines} == set(mixed.clients)


def test_ground_truth(mixed) -> None:
    gt = mixed.ground_truth(dataset="synthetic", seed=1)
    clients = gt["clients"]
    assert sum(c["queries"] for c in clients.values()) == len(mixed)
    kinds = {c["type"] for c in clients.values() if c["kind"] == "benign"}
    assert kinds == set(DEFAULT_MIX)  # org_app and outage_retry are not in the default mix
    for name in ATTACKS:
        if name == "sybil":
            continue
        assert clients[f"atk-{name}-0"] == {"kind": "attack", "type": name, "group": None, "queries": 300}


# -- benign behaviours ---------------------------------------------------------------------------
def behaviour(world, name: str, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    extra = {"org": organisation(world, rng, 1000.0, 3600.0)} if name == "org_app" else {"outage": (2500.0, 2800.0)} if name == "outage_retry" else {}
    return BEHAVIOURS[name](world, rng, n, 1000.0, 3600.0, **extra)


@pytest.mark.parametrize("name", list(BEHAVIOURS))
def test_behaviour_shape(world, name: str) -> None:
    s = behaviour(world, name)
    ds = world.dataset
    sent = 400 if name != "outage_retry" else len(s.X)  # outage_retry re-sends what the outage lost: a few more
    assert s.X.shape == (sent, ds.dim) and s.ts.shape == (sent,) and 400 <= sent <= 480
    assert (np.diff(s.ts) >= 0).all()
    assert s.ts[0] >= 1000.0 and s.ts[-1] <= 1000.0 + 3600.0 + 120.0  # re-sends may trail the session a little
    assert (s.X >= ds.lo).all() and (s.X <= ds.hi).all()


def _exact_duplicates(X: np.ndarray) -> int:
    return len(X) - len(np.unique(X, axis=0))


def test_retries_are_exact_duplicates(world) -> None:
    assert _exact_duplicates(behaviour(world, "retries").X) >= 30
    assert _exact_duplicates(behaviour(world, "iid").X) <= 5


def test_noisy_resubmits_are_near_not_exact(world) -> None:
    X = behaviour(world, "noisy_resubmit").X
    d = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    near = (d.min(1) > 0) & (d.min(1) < 5.0)  # a few pixels changed by one level
    assert near.sum() >= 40
    iid = behaviour(world, "iid").X
    di = np.sqrt(((iid[:, None, :] - iid[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(di, np.inf)
    assert ((di.min(1) > 0) & (di.min(1) < 5.0)).sum() < near.sum() / 4


def test_batch_jobs_send_same_timestamp_bursts(world) -> None:
    s = behaviour(world, "batch", n=600)
    _, counts = np.unique(s.ts, return_counts=True)
    assert counts.min() >= 1 and counts.max() >= 50 and len(counts) <= 12


@pytest.mark.parametrize("start", [0.0, 1000.0, 3000.0, 9000.0])
def test_an_org_app_sends_within_its_organisations_hours_and_never_all_at_once(world, start: float) -> None:
    org = organisation(world, np.random.default_rng(3), 1000.0, 6000.0)
    s = BEHAVIOURS["org_app"](world, np.random.default_rng(0), 200, start, 1500.0, org=org)  # a session before, in or after the hours
    assert org.t0 <= s.ts[0] and s.ts[-1] <= org.t1
    assert s.ts[-1] - s.ts[0] >= 0.5 * min(1500.0, org.t1 - org.t0)  # spread over the session, not one burst


def test_class_skew_and_drift(world) -> None:
    v = world.victim
    skewed = np.bincount(v.predict(behaviour(world, "class_skewed", seed=4).X), minlength=10) / 400
    assert np.sort(skewed)[-2:].sum() > 0.5
    d = behaviour(world, "drift", seed=1)
    early = np.bincount(v.predict(d.X[:100]), minlength=10) / 100
    late = np.bincount(v.predict(d.X[-100:]), minlength=10) / 100
    assert np.sort(late)[-3:].sum() > np.sort(early)[-3:].sum() + 0.2


def test_popular_inputs_are_shared_across_clients(world) -> None:
    a, b = behaviour(world, "popular", seed=1).X, behaviour(world, "popular", seed=2).X
    pool = {r.tobytes() for r in world.popular}
    in_a = {r.tobytes() for r in a} & pool
    in_b = {r.tobytes() for r in b} & pool
    assert sum(r.tobytes() in pool for r in a) > 100
    assert len(in_a & in_b) >= 5


def test_allocation_follows_the_mix() -> None:
    out = allocate({"iid": 0.5, "retries": 0.25, "batch": 0.25}, 8)
    assert sorted(out) == sorted(["iid"] * 4 + ["retries"] * 2 + ["batch"] * 2)
    assert set(out[:3]) == {"iid", "retries", "batch"}


# -- attacks -------------------------------------------------------------------------------------
def attack(world, name: str, budget: int = 400, seed: int = 0) -> np.ndarray:
    return run_attack(name, world.dataset, world.answer, budget, np.random.default_rng(seed))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_spends_its_budget_inside_the_box(world, name: str) -> None:
    X = attack(world, name)
    ds = world.dataset
    assert X.shape == (400, ds.dim)
    assert (X >= ds.lo - 1e-9).all() and (X <= ds.hi + 1e-9).all()


def test_oracle_records_and_enforces_the_budget(world) -> None:
    oracle = Oracle(world.answer, 5)
    oracle(np.zeros((3, 64)))
    with pytest.raises(BudgetExhausted):
        oracle(np.ones((4, 64)))
    assert oracle.used == 5 and oracle.queries.shape == (5, 64)
    assert (oracle.queries[3:] == 1).all()


def _margins(world, X: np.ndarray) -> np.ndarray:
    p = np.sort(world.answer(X), axis=1)
    return p[:, -1] - p[:, -2]


def test_boundary_attacks_get_low_margins(world) -> None:
    natural = world.dataset.natural(np.random.default_rng(0), 400)[0]
    base = np.mean(_margins(world, natural) < 0.3)
    for name in ("linesearch", "hopskipjump"):
        assert np.mean(_margins(world, attack(world, name)) < 0.3) > max(0.4, 3 * base), name


def test_linesearch_queries_are_midpoints(world) -> None:
    X = attack(world, "linesearch", 200)
    # after the two endpoints, every query of a search lies on the segment of the previous two
    mids = 0
    for i in range(2, len(X)):
        a, b = X[i - 2], X[i - 1]
        if np.allclose(X[i], (a + b) / 2, atol=0.05) or np.allclose(X[i], (X[i - 1] + X[max(i - 3, 0)]) / 2, atol=0.05):
            mids += 1
    assert mids > 100


def test_jbda_points_are_sign_steps_from_earlier_points(world) -> None:
    X = attack(world, "jbda", 400)
    ds = world.dataset
    lam = 0.1 * ds.span
    seeds = 10 * ds.num_classes
    close = 0
    for i in range(seeds, len(X)):
        diff = np.abs(X[:i] - X[i])
        ok = np.all((diff <= 1e-3) | (np.abs(diff - lam) <= 1e-3) | (X[i] == ds.lo) | (X[i] == ds.hi), axis=1)
        close += bool(ok.any())
    assert close == len(X) - seeds


def test_hopskipjump_sends_many_tiny_perturbations(world) -> None:
    X = attack(world, "hopskipjump", 400)
    step = np.linalg.norm(np.diff(X, axis=0), axis=1)
    natural = world.dataset.natural(np.random.default_rng(0), 400)[0]
    typical = np.median(np.linalg.norm(np.diff(natural, axis=0), axis=1))
    assert np.median(step) < typical / 20


def test_simba_changes_one_coordinate_at_a_time(world) -> None:
    X = attack(world, "simba", 300)
    one = 0
    for i in range(1, len(X)):
        changed = (np.abs(X[:i] - X[i]) > 1e-9).sum(axis=1)
        one += bool((changed == 1).any())
    assert one > 0.9 * (len(X) - 1)


def test_knockoff_and_activethief_are_natural_but_off_distribution(world) -> None:
    for name in ("knockoff", "activethief"):
        X = attack(world, name, 300)
        assert np.allclose(X, np.rint(X))  # natural pixels, integers
        assert _exact_duplicates(X) == 0
    # ActiveThief picks uncertain samples: lower margins than random off-distribution ones
    assert np.mean(_margins(world, attack(world, "activethief", 300))) < np.mean(_margins(world, attack(world, "knockoff", 300)))


def test_interleaved_alternates_attack_and_natural_queries(mixed, world) -> None:
    _, X = rows_of(mixed, "atk-interleaved-0")
    seeds = 10 * world.dataset.num_classes
    natural = X[1::2]
    attack_steps = X[0::2][seeds:]
    assert np.allclose(natural, np.rint(natural))  # natural pool rows: integer pixels
    assert np.mean(np.any(np.abs(attack_steps - np.rint(attack_steps)) > 1e-6, axis=1)) > 0.9  # JbDA steps of 1.6


def test_sybil_group_has_ten_round_robin_members(mixed) -> None:
    truth = mixed.ground_truth()["clients"]
    members = sorted(c for c, v in truth.items() if v["group"] == "syb-0")
    assert members == [f"syb-0-{j}" for j in range(10)]
    assert all(truth[m]["type"] == "sybil" and truth[m]["queries"] == 30 for m in members)
    idx = np.flatnonzero(np.isin(mixed.client, [mixed.clients.index(m) for m in members]))
    order = [mixed.clients[mixed.client[i]] for i in idx]
    assert order[:10] == [f"syb-0-{j}" for j in range(10)]


def test_slow_attack_spans_days(world) -> None:
    t = simulate(world, Population(benign=0, attacks={"slow": 1}, attack_queries=1000), seed=0)
    ts, _ = rows_of(t, "atk-slow-0")
    assert ts[-1] - ts[0] > 2 * 86400
    assert np.median(np.diff(ts)) > 60


def test_scripted_attacks_are_fast(mixed) -> None:
    ts, _ = rows_of(mixed, "atk-jbda-0")
    assert ts[-1] - ts[0] < 3 * 3600


# -- knobs of the benchmark's attack sweep and held-out regimes -----------------------------------
def test_interleave_ratio_puts_k_natural_queries_after_each_attack_query(world) -> None:
    oracle = Oracle(world.answer, 12)
    wrap = Interleave(oracle, lambda m: np.full((m, 64), -1.0), ratio=3)
    answers = wrap(np.zeros((3, 64)))
    assert answers.shape == (3, 10)
    marks = oracle.queries[:, 0]
    assert list(marks) == [0, -1, -1, -1] * 3


def test_interleaved_attack_takes_its_ratio_from_params(world) -> None:
    X = run_attack("interleaved", world.dataset, world.answer, 600, np.random.default_rng(0), {"interleave": 4})
    seeds = 10 * world.dataset.num_classes
    natural = np.delete(X, np.arange(0, len(X), 5), axis=0)
    steps = X[0::5][seeds:]
    assert np.allclose(natural, np.rint(natural))  # natural pool rows: integer pixels
    assert np.mean(np.any(np.abs(steps - np.rint(steps)) > 1e-6, axis=1)) > 0.9


def test_jbda_step_and_seed_count_follow_params(world) -> None:
    ds = world.dataset
    X = run_attack("jbda", ds, world.answer, 60, np.random.default_rng(0), {"step": 0.02, "seeds": 2})
    seeds = 2 * ds.num_classes
    pool = {r.tobytes() for r in ds.X_attacker}
    assert all(r.tobytes() in pool for r in X[:seeds])
    moved = np.abs(X[seeds : 2 * seeds] - X[:seeds]) / np.where(ds.span > 0, ds.span, 1.0)
    assert (moved <= 0.02 + 1e-9).all()  # less only where the box clips the step
    assert np.mean(np.abs(moved - 0.02) < 1e-9) > 0.5


@pytest.mark.parametrize("name", ["jbda", "trnd", "mixed"])
def test_augmentation_parents_name_the_point_each_query_was_made_from(world, name: str) -> None:
    """Every non-seed query is one step of λ (or less, where the box clips it) from the query
    augmentation_parents names, in every feature; one seed fewer names the wrong points."""
    ds = world.dataset
    rng = np.random.default_rng(0)
    if name == "mixed":
        X, _ = coordinated_augmentation(ds, world.answer, 700, rng, ["jbda", "trnd", "jbda"])
    else:
        X = run_attack(name, ds, world.answer, 700, rng)
    seeds = 10 * ds.num_classes
    lam = 0.1 * ds.span

    def one_step(parent: np.ndarray) -> np.ndarray:
        made = np.flatnonzero(parent >= 0)
        moved = np.abs(X[made] - X[parent[made]])
        clipped = (X[made] == ds.lo) | (X[made] == ds.hi)
        return np.all((np.abs(moved - lam) <= 1e-9) | ((moved < lam) & clipped), axis=1)

    parent = augmentation_parents(len(X), seeds)
    assert (parent[:seeds] == -1).all() and (parent[seeds:] >= 0).all() and (parent[seeds:] < np.arange(seeds, len(X))).all()
    assert len(X) > 4 * seeds and one_step(parent).all()  # at least three rounds
    assert not one_step(augmentation_parents(len(X), seeds - 1)).all()
    assert augmentation_parents(7, 2).tolist() == [-1, -1, 0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="seed"):
        augmentation_parents(5, 0)


def test_rounds_restart_from_fresh_seeds(world) -> None:
    ds = world.dataset
    pool = {r.tobytes() for r in ds.X_attacker}
    X = run_attack("jbda", ds, world.answer, 40, np.random.default_rng(0), {"rounds": 1, "seeds": 1})
    from_pool = [r.tobytes() in pool for r in X]
    assert from_pool == [True] * 10 + [False] * 10 + [True] * 10 + [False] * 10  # seeds, one round, new seeds, ...
    unbounded = run_attack("jbda", ds, world.answer, 40, np.random.default_rng(0), {"seeds": 1})
    assert not any(r.tobytes() in pool for r in unbounded[10:])


def test_trnd_targets_spawn_several_points_per_point(world) -> None:
    ds = world.dataset
    X = run_attack("trnd", ds, world.answer, 50, np.random.default_rng(0), {"targets": 4, "seeds": 1})
    seeds = ds.num_classes
    children = X[seeds:].reshape(-1, 4, ds.dim)  # each seed's 4 points, toward 4 random classes
    lam = 0.1 * ds.span
    for i in range(len(children)):
        d = np.abs(children[i] - X[i])
        assert ((d <= lam + 1e-9) | (children[i] == ds.lo) | (children[i] == ds.hi)).all()
    distinct = [len({c.tobytes() for c in kids}) for kids in children]
    assert np.mean(np.array(distinct) > 1) > 0.5  # other target classes, other steps


def test_default_params_leave_attacks_unchanged(world) -> None:
    for name in ("jbda", "trnd", "interleaved"):
        plain = attack(world, name, 300)
        explicit = run_attack(name, world.dataset, world.answer, 300, np.random.default_rng(0),
                              {"step": 0.1, "seeds": 10, "rounds": 0, "targets": 1, "tau": 3, **({"interleave": 1} if name == "interleaved" else {})})
        assert np.array_equal(plain, explicit), name


def test_benign_query_range_bounds_every_client_even_batch_jobs(world) -> None:
    t = simulate(world, Population(benign=20, benign_queries=100, benign_query_range=(30, 50)), seed=0)
    counts = [c["queries"] for c in t.ground_truth()["clients"].values()]
    assert min(counts) >= 30 and max(counts) <= 50


def test_benign_rate_sets_the_session_pace(world) -> None:
    def rates(rate: float) -> float:
        t = simulate(world, Population(benign=14, benign_queries=60, benign_rate=rate, mix={"iid": 1.0}, window=6 * 3600.0), seed=0)
        per = [(t.client == i).sum() / np.ptp(t.ts[t.client == i]) for i in range(len(t.clients))]
        return float(np.median(per))

    assert 0.5 < rates(2.0) < 8.0
    assert 0.005 < rates(0.02) < 0.08


def test_popular_share_is_a_behaviour_parameter(world) -> None:
    pool = {r.tobytes() for r in world.popular}

    def share(params: dict) -> float:
        t = simulate(world, Population(benign=4, mix={"popular": 1.0}, behaviour_params=params), seed=0)
        return float(np.mean([r.tobytes() in pool for r in t.X]))

    assert share({"popular": {"share": 0.9}}) > 0.8 > 0.5 > share({}) > 0.25
    default = Population(benign=6, benign_queries=30)
    explicit = Population(benign=6, benign_queries=30, behaviour_params={"popular": {"share": 0.4}})
    assert list(simulate(world, default, seed=3).lines()) == list(simulate(world, explicit, seed=3).lines())


def test_population_knobs_are_validated() -> None:
    for bad in ({"benign_query_range": (0, 5)}, {"benign_query_range": (9, 5)}, {"benign_rate": 0.0}, {"behaviour_params": {"nope": {}}}):
        with pytest.raises(ValueError):
            Population(**bad).validate()


# -- the simulate command ---------------------------------------------------------------------
def sim(*args: str) -> int:
    return simulate_main(["--dataset", "synthetic", "--quiet", *args])


def test_cli_writes_appends_and_records_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "dir" / "sim.jsonl"
    gt = tmp_path / "gt.json"
    assert sim("--benign", "3", "--attacks", "jbda,sybil:1", "--attack-queries", "100", "--out", str(out), "--ground-truth", str(gt)) == 0
    lines = out.read_text().splitlines()
    truth = json.loads(gt.read_text())
    assert len(lines) == sum(c["queries"] for c in truth["clients"].values())
    assert truth["dataset"] == "synthetic" and truth["clients"]["atk-jbda-0"]["kind"] == "attack"
    assert sum(1 for c in truth["clients"].values() if c["group"] == "syb-0") == 10
    decoder = Decoder(Settings())
    for line in lines:
        decoder.decode_line(line)
    assert sim("--benign", "3", "--attacks", "jbda,sybil:1", "--attack-queries", "100", "--out", str(out)) == 0
    again = out.read_text().splitlines()
    assert again == lines + lines  # appended, and the same seed gives the same events


def test_cli_events_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    assert sim("--benign", "2", "--attacks", "none", "--events", "1000", "--out", str(out)) == 0
    assert len(out.read_text().splitlines()) == 1000
    assert sim("--benign", "10", "--attacks", "uniform", "--events", "50", "--out", str(tmp_path / "b.jsonl")) == 0
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 50


def test_cli_duration_spreads_synthetic_timestamps(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    assert sim("--benign", "5", "--attacks", "none", "--duration", "60", "--start", "1000000", "--out", str(out)) == 0
    ts = [json.loads(line)["ts"] for line in out.read_text().splitlines()]
    assert min(ts) >= 1000000 and max(ts) <= 1000000 + 60 + 120


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--attacks", "nope"], "unknown attack 'nope'"),
        (["--rate", "-1"], "--rate"),
        (["--events", "0"], "--events"),
        (["--push", "ftp://host"], "http://"),
        (["--token", "x"], "--token is only used with --push"),
        (["--mix", "iid=1,bogus=2"], "unknown benign behaviour 'bogus'"),
        (["--benign", "0", "--attacks", "none"], "nothing to simulate"),
        (["--start", "yesterday"], "--start"),
    ]
    for args, message in cases:
        assert sim(*args) == 2, args
        assert message in capsys.readouterr().err


def test_cli_lists_attacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(["--list-attacks"]) == 0
    text = capsys.readouterr().out
    for name in (*ATTACKS, *BEHAVIOURS):
        assert name in text


def test_cli_missing_sklearn_dataset_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import exporter.sim.datasets as datasets
    import exporter.sim.world as world_module

    monkeypatch.setattr(datasets, "sklearn_available", lambda: False)
    monkeypatch.setattr(world_module, "_CACHE", {})
    assert simulate_main(["--dataset", "wine", "--benign", "1", "--attacks", "none"]) == 2
    assert "scikit-learn" in capsys.readouterr().err


def test_cli_writes_to_stdout_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    assert sim("--benign", "1", "--attacks", "none", "--events", "7") == 0
    assert len(buf.getvalue().splitlines()) == 7


@pytest.fixture
def exporter_app():
    apps: list[App] = []

    def start(**push: object) -> tuple[App, str]:
        app = App(Settings(listen={"port": 0}, files={"paths": []}, state={"dir": None}, push=push or {}))
        app.start()
        apps.append(app)
        host, port = app.address
        return app, f"http://{host}:{port}"

    yield start
    for app in apps:
        app.stop()


def test_cli_pushes_to_a_running_exporter(exporter_app, capsys: pytest.CaptureFixture[str]) -> None:
    app, url = exporter_app()
    code = simulate_main(["--dataset", "synthetic", "--benign", "4", "--attacks", "simba", "--attack-queries", "150",
                          "--events", "600", "--batch", "100", "--push", url])
    assert code == 0
    err = capsys.readouterr().err
    assert "pushed in 6 requests, 600 accepted" in err
    with app.pipeline.lock:
        total = sum(c.total for c in app.pipeline.store.values())
        ids = {c.client_id for c in app.pipeline.store.values()}
    assert total == 600 and "atk-simba-0" in ids


def test_cli_push_needs_the_token(exporter_app, capsys: pytest.CaptureFixture[str]) -> None:
    _, url = exporter_app(tokens=["s3cret"])
    base = ["--dataset", "synthetic", "--benign", "1", "--attacks", "none", "--events", "20", "--push", url + "/api/v1/events"]
    assert simulate_main(base) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert simulate_main([*base, "--token", "wrong"]) == 1
    assert simulate_main([*base, "--token", "s3cret", "--quiet"]) == 0


def test_cli_unreachable_exporter_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    assert sim("--benign", "1", "--attacks", "none", "--events", "5", "--push", f"http://127.0.0.1:{free_port()}") == 1
    assert "cannot reach" in capsys.readouterr().err


def test_cli_live_rate_paces_and_stamps_with_the_wall_clock(tmp_path: Path) -> None:
    out = tmp_path / "live.jsonl"
    before = time.time()
    assert sim("--benign", "2", "--attacks", "none", "--rate", "100", "--events", "40", "--out", str(out)) == 0
    took = time.time() - before
    ts = [json.loads(line)["ts"] for line in out.read_text().splitlines()]
    assert len(ts) == 40 and took >= 0.3
    assert before - 1 <= min(ts) and max(ts) <= time.time() + 1
    assert sim("--benign", "2", "--attacks", "none", "--rate", "200", "--duration", "0.1", "--out", str(tmp_path / "d.jsonl")) == 0
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 20
