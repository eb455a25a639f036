"""Config: one validation point, keys named in errors, env overrides, embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from exporter.config import ConfigError, Settings, load_settings
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yml"
    p.write_text(text)
    return p


def test_embedded_default_is_valid_and_sensible() -> None:
    s = load_settings(None)
    assert s.files.paths == ["./logs/*.jsonl"]
    assert s.listen.host == "127.0.0.1" and s.listen.is_loopback
    assert s.push.enabled
    assert list(s.detector_params())[:3] == ["confidence", "repetition", "near_duplicate"]
    assert "risk" not in s.detector_params() and s.fusion.inputs is None  # the verdict is a stage, not a detector
    assert "prada" not in s.detector_params() and "steps" in s.detector_params()  # prada is there to compare with
    assert s.metrics.max_client_series == 500


@pytest.mark.parametrize(
    "text, key",
    [
        ("files:\n  pathz: [a]\n", "files.pathz"),
        ("state:\n  max_clients: zero\n", "state.max_clients"),
        ("detectors:\n  confidence:\n    window: -3\n", "detectors.confidence.window"),
        ("detectors:\n  nosuch: {}\n", "detectors.nosuch"),
        ("models:\n  m:\n    modality: audio\n", "models.m.modality"),
        ("listen:\n  port: 70000\n", "listen.port"),
    ],
)
def test_errors_name_the_offending_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert key in str(err.value)


def test_invalid_yaml_reports_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line 3, column 1: expected"):
        load_settings(write(tmp_path, "files:\n  paths: [a\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yml")


def test_env_overrides_yaml_key_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "detectors:\n  confidence:\n    window: 50\nfiles:\n  mode: poll\n")
    monkeypatch.setenv("MONITAUR_DETECTORS__CONFIDENCE__MIN_EVENTS", "7")
    monkeypatch.setenv("MONITAUR_FILES__PATHS", "/a/*.jsonl,/b/*.jsonl")
    monkeypatch.setenv("MONITAUR_LISTEN__PORT", "9999")
    s = load_settings(path)
    params = s.detector_params()["confidence"][1]
    assert params.window == 50 and params.min_events == 7  # yaml and env merged, not replaced
    assert s.files.paths == ["/a/*.jsonl", "/b/*.jsonl"] and s.files.mode == "poll"
    assert s.listen.port == 9999


def test_push_beyond_loopback_requires_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="bearer tokens are required"):
        load_settings(write(tmp_path, "listen:\n  host: 0.0.0.0\n"))
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nsecret-1\n\nsecret-2\n")
    s = load_settings(write(tmp_path, f"listen:\n  host: 0.0.0.0\npush:\n  tokens_file: {tokens}\n"))
    assert s.push.all_tokens() == ["secret-1", "secret-2"]
    monkeypatch.setenv("MONITAUR_PUSH__TOKENS", "a,b")
    assert load_settings(write(tmp_path, "listen:\n  host: 0.0.0.0\n")).push.all_tokens() == ["a", "b"]
    # push disabled: no tokens needed
    assert not Settings(listen={"host": "0.0.0.0"}, push={"enabled": False}).push.enabled


def test_disabling_a_default_detector(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "detectors:\n  repetition:\n    enabled: false\n"))
    assert "repetition" not in s.detector_params() and "confidence" in s.detector_params()


def test_plugin_detector(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "plugins:\n  always: tests.plugins:FlagClientsNamedBad\ndetectors:\n  always: {}\n"))
    assert "always" in s.detector_params()
    with pytest.raises(ConfigError, match="plugins.bad"):
        load_settings(write(tmp_path, "plugins:\n  bad: no_colon_here\n"))


def test_check_config_cli(tmp_path: Path) -> None:
    good = write(tmp_path, "files:\n  mode: poll\n")
    run = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(good)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "OK" in run.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("state:\n  idle_ttl_seconds: -1\n")
    run = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2
    assert "state.idle_ttl_seconds" in run.stderr and "greater than 0" in run.stderr


def test_annotated_example_config_is_valid() -> None:
    s = load_settings(REPO / "docs" / "config.example.yml")
    assert s.models["digits"].input_dim == 64 and s.listen.port == 9717
    assert s.detector_params()["confidence"][1].window == 100


def test_image_pixel_limit_is_validated(monkeypatch) -> None:
    assert Settings().limits.max_image_pixels == 1024 * 1024
    assert Settings(limits={"max_image_pixels": 4096 * 4096}).limits.max_image_pixels == 4096 * 4096
    for bad in (0, 4096 * 4096 + 1, "many"):
        with pytest.raises(ValidationError):
            Settings(limits={"max_image_pixels": bad})
    monkeypatch.setenv("MONITAUR_LIMITS__MAX_IMAGE_PIXELS", "50176")
    assert Settings().limits.max_image_pixels == 224 * 224


def test_rotation_and_health_keys_are_validated(monkeypatch) -> None:
    s = Settings()
    assert (s.files.rotated_dirs, s.files.rotated_idle_seconds) == ([], 60.0)
    assert (s.health.max_failed_cycles, s.health.stall_seconds, s.health.max_failed_checkpoints) == (3, 120.0, 3)
    for bad in ({"files": {"rotated_idle_seconds": 0}}, {"health": {"max_failed_cycles": 0}}, {"health": {"stall_seconds": -1}},
                {"health": {"max_failed_checkpoints": 0}}, {"health": {"unknown": 1}}):
        with pytest.raises(ValidationError):
            Settings(**bad)
    with pytest.raises(ValidationError, match="health.stall_seconds"):
        Settings(files={"poll_interval_seconds": 5}, health={"stall_seconds": 10})
    monkeypatch.setenv("MONITAUR_FILES__ROTATED_DIRS", "old, archive")
    monkeypatch.setenv("MONITAUR_HEALTH__STALL_SECONDS", "30")
    s = Settings()
    assert s.files.rotated_dirs == ["old", "archive"] and s.health.stall_seconds == 30
