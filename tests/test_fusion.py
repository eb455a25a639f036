"""The verdict stage: any input detector over its threshold flags; the risk is the strongest ratio.

And the pipeline around it: a benign client's first queries do not alarm, an extreme one
does as soon as a detector has its evidence, and one client's extreme inputs move no
other client's verdict (the live baseline is robust).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.baseline import BaselinePlan
from exporter.config import ConfigError, FusionConfig, Settings
from exporter.detectors import enabled_detectors
from exporter.detectors.base import Signals
from exporter.fusion import Fusion
from exporter.pipeline import Pipeline
from tests.test_pipeline import lines


def sig(values: list[float], flags: list[bool]) -> Signals:
    return Signals(np.array(values, dtype=np.float64), np.array(flags, dtype=bool))


def test_any_flag_flags_and_the_risk_is_half_the_strongest_ratio() -> None:
    f = Fusion(FusionConfig(), ["a", "b"], {"a": 0.5, "b": 0.2})
    state = f.init_state()
    out = f.update(state, {"a": sig([0.1, 0.6, 0.2], [False, True, False]), "b": sig([0.05, 0.05, 0.3], [False, False, True])}, 3)
    assert out is not None
    np.testing.assert_allclose(out.values, [0.125, 0.6, 0.75])  # max(a / 0.5, b / 0.2) / 2
    assert out.flagged.tolist() == [False, True, True]


def test_the_judgement_names_the_inputs_over_their_thresholds_by_ratio_not_raw_value() -> None:
    """A raw 0.42 over a threshold of 0.2 is stronger evidence than a raw 0.9 over 0.75: the evidence is value / threshold."""
    f = Fusion(FusionConfig(), ["ood", "knn", "prada"], {"ood": 0.75, "knn": 0.2, "prada": 0.5})
    judged = f.judge(f.init_state(), {"ood": sig([0.9, 0.42], [True, False]), "knn": sig([0.1, 0.42], [False, True]), "prada": sig([0.65, 0.3], [True, False])}, 2)
    assert judged is not None and judged.signals.flagged.tolist() == [True, True]
    first = judged.over_threshold(0)
    assert list(first) == ["prada", "ood"] and first["prada"] == pytest.approx(1.3) and first["ood"] == pytest.approx(1.2)
    assert judged.over_threshold(1) == {"knn": pytest.approx(2.1)}  # only the inputs that flagged there
    np.testing.assert_allclose(judged.signals.values, [0.65, 1.0])  # the risk: the strongest ratio, halved, at most 1
    plain = f.update(f.init_state(), {"ood": sig([0.9, 0.42], [True, False]), "knn": sig([0.1, 0.42], [False, True]), "prada": sig([0.65, 0.3], [True, False])}, 2)
    assert plain is not None and plain.values.tolist() == judged.signals.values.tolist()


def test_an_input_that_did_not_judge_keeps_its_last_value_and_flag() -> None:
    f = Fusion(FusionConfig(), ["a", "b"], {"a": 0.5, "b": 0.5})
    state = f.init_state()
    f.update(state, {"a": sig([0.9], [True])}, 1)
    out = f.update(state, {"a": sig([np.nan, np.nan], [False, False]), "b": sig([0.1, np.nan], [False, False])}, 2)
    assert out is not None and out.flagged.all() and out.values.tolist() == [0.9, 0.9]
    nothing = Fusion(FusionConfig(), ["a"], {"a": 0.5})
    assert np.isnan(nothing.update(nothing.init_state(), {}, 2).values).all()  # nothing judged yet: no risk


def test_inputs_come_from_the_config_and_unknown_ones_are_an_error() -> None:
    s = Settings(fusion={"inputs": ["knn", "ood"]})
    p = Pipeline(s)
    p.ingest_lines(lines("c", 2))
    assert p.runtimes.get("digits").fusion.inputs == ["knn", "ood"]
    with pytest.raises(ConfigError, match="fusion.inputs: nope is not an enabled detector"):
        enabled_detectors(Settings(fusion={"inputs": ["nope"]}))  # resolved with the registry, where pipelines are built
    with pytest.raises(ConfigError, match="fusion.inputs: nope is not an enabled detector"):
        Pipeline(Settings(fusion={"inputs": ["nope"]}))
    default = Pipeline(Settings())
    default.ingest_lines(lines("c", 2))
    inputs = default.runtimes.get("digits").fusion.inputs
    assert "rate" not in inputs and "fingerprint" not in inputs and {"knn", "ood", "steps"} <= set(inputs)


def uniform_lines(client: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 16, (n, 64)).round()
    p = np.full((n, 10), 0.1)
    return [json.dumps({"client": client, "model": "digits", "input": xi.tolist(), "output": pi.tolist()}) for xi, pi in zip(x, p)]


def warmed(**kw: object) -> Pipeline:
    """A pipeline whose live baseline has learned the model (its first fit: 16 clients' first 16 events)."""
    p = Pipeline(Settings(**kw))
    p.ingest_lines([line for i in range(20) for line in lines(f"warm-{i}", 16, seed=100 + i)])
    assert p.runtimes.get("digits").context.scaling is not None
    return p


def test_a_benign_clients_first_queries_do_not_alarm_and_extreme_ones_do_once_there_is_evidence() -> None:
    p = warmed()
    for n in range(1, 20):
        p.ingest_lines(lines(f"new-{n}", n, seed=500 + n))
        assert not p.store[f"new-{n}"].suspicious
    # uniform random queries are far beyond anything benign; a detector flags once it has min_events of them
    for i, line in enumerate(uniform_lines("scraper", 40, 7), start=1):
        p.ingest_lines([line])
        if p.store["scraper"].suspicious:
            break
    assert p.store["scraper"].suspicious and p.store["scraper"].first_flagged_query == i <= 20


@pytest.mark.parametrize("value", [1e4, 1e14])  # 1e14: just inside the decoder's bound on input magnitudes
def test_one_clients_extreme_inputs_move_no_other_clients_verdict(value: float) -> None:
    """Measured before: one event with every feature at 10,000, sent without a profile, made 19 of the
    next 20 benign clients flagged (the online mean and variance it moved were everybody's scale).

    Here the poison is in the live baseline's sample when it refits (at 512 offers, after the
    first fit at 256), and the clients judged after that refit are compared with a clean run."""
    plan = BaselinePlan(steps=(256, 512, 16384))
    runs = {}
    for poisoned in (False, True):
        p = Pipeline(Settings(), plan=plan)
        p.ingest_lines([line for i in range(20) for line in lines(f"warm-{i}", 16, seed=100 + i)])  # 320 offers
        poison = json.dumps({"client": "mallory", "model": "digits", "input": [value] * 64, "output": [0.1] * 10})
        p.ingest_lines([poison] * 16 if poisoned else lines("mallory", 16, seed=99))  # 336
        p.ingest_lines([line for i in range(11) for line in lines(f"more-{i}", 16, seed=300 + i)])  # 512: the refit
        assert p.runtimes.get("digits").baseline.offered == 512
        for i in range(20):
            p.ingest_lines(lines(f"later-{i}", 60, seed=900 + i))
        runs[poisoned] = p
    clean, poisoned = runs[False], runs[True]
    scale = poisoned.runtimes.get("digits").context.scaling
    assert np.abs(scale.center).max() < 17 and scale.spread.max() < 17  # digits' own range, not the poison's
    for i in range(20):
        a, b = clean.store[f"later-{i}"], poisoned.store[f"later-{i}"]
        assert a.suspicious == b.suspicious and a.first_flagged_query == b.first_flagged_query
        assert b.score == pytest.approx(a.score, abs=0.02)
    assert not any(clean.store[f"later-{i}"].suspicious for i in range(20))
