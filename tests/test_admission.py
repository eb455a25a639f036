"""Model admission: a client chooses model names, so which names get state, and how many, is bounded."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from exporter import reasons
from exporter.config import ConfigError, Settings, load_settings
from exporter.detectors import enabled_detectors
from exporter.events import Decoder, Rejected
from exporter.metrics import Metrics
from exporter.pipeline import Pipeline
from exporter.runtime import ModelAdmission
from exporter.snapshot import pack

EMPTY = {"input_dims": {}, "num_classes": {}, "modalities": {}}


def line(model: str, client: str = "c", dim: int = 4, k: int = 3) -> str:
    return json.dumps({"client": client, "model": model, "ts": 1e9, "input": [1.0] * dim, "output": [1.0 / k] * k})


def pipeline(**kw: object) -> Pipeline:
    settings = Settings(state={"dir": None}, **kw)  # type: ignore[arg-type]
    return Pipeline(settings, Metrics(enabled_detectors(settings)))


def rejected(p: Pipeline, reason: str) -> float:
    return p.metrics.registry.get_sample_value("monitaur_events_rejected_total", {"reason": reason}) or 0.0


def test_new_model_names_are_admitted_up_to_max_models_and_then_rejected() -> None:
    p = pipeline(model_admission={"max_models": 4})  # "default" holds one place from the start
    result = p.ingest_lines([line(f"m{i}", dim=4 + i) for i in range(6)])
    assert result.accepted == 3 and result.rejected == {reasons.TOO_MANY_MODELS: 3}
    assert rejected(p, reasons.TOO_MANY_MODELS) == 3
    assert sorted(name for name, _ in p.runtimes) == ["m0", "m1", "m2"]
    assert p.runtimes.admission.admitted == {"default", "m0", "m1", "m2"}
    # a refused model learns nothing: its first event's shape is not recorded
    assert set(p.decoder.learned()["input_dims"]) == {"m0", "m1", "m2"}
    # admitted models go on; the default model always has its place
    assert p.ingest_lines([line("m1", dim=5), line("default")]).accepted == 2
    assert p.ingest_lines([line("m5", dim=9)]).rejected == {reasons.TOO_MANY_MODELS: 1}


def test_allowed_names_and_pattern_admit_only_those_names() -> None:
    p = pipeline(model_admission={"allowed": ["alpha"], "pattern": r"tenant-[0-9]+"}, models={"fixed": {"modality": "tabular"}})
    result = p.ingest_lines([line("alpha"), line("tenant-7"), line("tenant-7x"), line("beta"), line("fixed"), line("default")])
    assert result.accepted == 4 and result.rejected == {reasons.MODEL_NOT_ALLOWED: 2}
    assert sorted(name for name, _ in p.runtimes) == ["alpha", "default", "fixed", "tenant-7"]
    assert rejected(p, reasons.MODEL_NOT_ALLOWED) == 2


def test_an_invalid_event_of_a_new_model_takes_no_place() -> None:
    s = Settings(state={"dir": None}, model_admission={"max_models": 2})
    admission = ModelAdmission.for_settings(s)
    d = Decoder(s, admission)
    with pytest.raises(Rejected) as err:
        d.decode_line(json.dumps({"client": "c", "model": "new", "input": [1.0, float("nan")]}).replace("NaN", '"x"'))
    assert err.value.reason == reasons.INVALID_INPUT
    assert admission.admitted == {"default"} and d.learned() == EMPTY
    d.decode_line(line("new"))
    assert admission.admitted == {"default", "new"}
    with pytest.raises(Rejected) as err:
        d.decode_line(line("newer"))
    assert err.value.reason == reasons.TOO_MANY_MODELS
    assert "newer" not in d.learned()["input_dims"]


def test_configured_and_profile_models_are_always_admitted() -> None:
    s = Settings(model_admission={"allowed": ["x"], "max_models": 1}, models={"a": {}, "b": {}}, default_model="d")
    admission = ModelAdmission.for_settings(s, SimpleNamespace(models={"p": object()}))  # type: ignore[arg-type]
    for name in ("a", "b", "d", "p"):
        assert admission.refusal(name) is None
    assert admission.refusal("x") == (reasons.TOO_MANY_MODELS, "model 'x' would exceed model_admission.max_models (1)")
    assert admission.refusal("y")[0] == reasons.MODEL_NOT_ALLOWED  # type: ignore[index]


def test_a_restore_readmits_the_saved_models_which_keep_their_places() -> None:
    p = pipeline(model_admission={"max_models": 3})
    p.ingest_lines([line("m0", client="a"), line("m1", client="b", dim=6)])
    data = pack(p.snapshot_copy())
    q = pipeline(model_admission={"max_models": 3})
    assert q.restore(data) == 2
    assert q.runtimes.admission.admitted == {"default", "m0", "m1"}
    assert q.decoder.learned()["input_dims"] == {"m0": 4, "m1": 6}
    assert q.ingest_lines([line("m2")]).rejected == {reasons.TOO_MANY_MODELS: 1}  # the restored models count
    assert q.ingest_lines([line("m1", client="b", dim=6)]).accepted == 1
    assert q.store["b"].detector_state["m1"]


def test_a_restore_under_a_tighter_admission_drops_the_models_it_refuses() -> None:
    p = pipeline()
    p.ingest_lines([line("keep", client="a"), line("drop", client="b", dim=6), line("late", client="c", dim=7)])
    q = pipeline(model_admission={"pattern": "keep|late", "max_models": 2})
    assert q.restore(pack(p.snapshot_copy())) == 3
    assert q.runtimes.admission.admitted == {"default", "keep"}  # "drop" not allowed, "late" past the max
    assert sorted(name for name, _ in q.runtimes) == ["keep"]
    assert set(q.decoder.learned()["input_dims"]) == {"keep"}
    assert "drop" not in q.store["b"].detector_state and "keep" in q.store["a"].detector_state


def test_many_fresh_model_names_allocate_no_model_state() -> None:
    p = pipeline(model_admission={"max_models": 2})
    rng = np.random.default_rng(0)
    for i in range(200):
        p.ingest_lines([line(f"flood-{i}", dim=int(rng.integers(2, 50)))])
    assert len(list(p.runtimes)) == 1 and rejected(p, reasons.TOO_MANY_MODELS) == 199
    assert len(p.decoder.learned()["modalities"]) == 1


def test_the_config_is_validated(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yml"
    for text, key in (
        ("model_admission:\n  pattern: '('\n", "model_admission.pattern"),
        ("model_admission:\n  allowed: ['a\u202eb']\n", "model_admission.allowed"),
        ("model_admission:\n  max_models: 0\n", "model_admission.max_models"),
        ("model_admission:\n  max: 3\n", "model_admission.max"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert key in str(err.value)
    monkeypatch.setenv("MONITAUR_MODEL_ADMISSION__ALLOWED", "a, b")
    monkeypatch.setenv("MONITAUR_MODEL_ADMISSION__MAX_MODELS", "5")
    s = load_settings(None)
    assert s.model_admission.allowed == ["a", "b"] and s.model_admission.max_models == 5
