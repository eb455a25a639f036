"""Config: plain data validated in one place, keys and sources named in errors, env overrides, embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from exporter.config import ConfigError, Settings, load_settings
from exporter.detectors import enabled_detectors
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
    assert list(enabled_detectors(s))[:3] == ["confidence", "repetition", "near_duplicate"]
    assert "risk" not in enabled_detectors(s) and s.fusion.inputs is None  # the verdict is a stage, not a detector
    assert "prada" not in enabled_detectors(s) and "steps" in enabled_detectors(s)  # prada is there to compare with
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
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        enabled_detectors(load_settings(path))  # the detectors section is resolved by the registry, not by load_settings
    assert key in str(err.value)
    run = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(path)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and f"config file {str(path)!r}: {key}" in run.stderr, run.stderr


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
    params = enabled_detectors(s)["confidence"][1]
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
    assert "repetition" not in enabled_detectors(s) and "confidence" in enabled_detectors(s)


def test_plugin_detector(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "plugins:\n  always: tests.plugins:FlagClientsNamedBad\ndetectors:\n  always: {}\n"))
    assert "always" in enabled_detectors(s)
    with pytest.raises(ConfigError, match="plugins.bad"):
        enabled_detectors(load_settings(write(tmp_path, "plugins:\n  bad: no_colon_here\n")))


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
    assert enabled_detectors(s)["confidence"][1].window == 100


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


def test_fusion_inputs_must_name_enabled_detectors(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "fusion:\n  inputs: [knn, nosuch]\n"))  # plain data: loads
    with pytest.raises(ConfigError, match="fusion.inputs: nosuch is not an enabled detector"):
        enabled_detectors(s)
    assert list(enabled_detectors(load_settings(write(tmp_path, "fusion:\n  inputs: [knn, ood]\n"))))


def test_config_does_not_import_the_detectors() -> None:
    """config -> detectors -> base -> canonical -> events -> config was an import circle."""
    code = "import sys, exporter.config; print(any(m.startswith('exporter.detectors') for m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def test_env_empty_means_unset_and_null_means_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "listen:\n  port: 9800\nstate:\n  dir: /var/lib/x\n")
    monkeypatch.setenv("MONITAUR_LISTEN__PORT", "")  # empty: the file's value stands
    monkeypatch.setenv("MONITAUR_STATE__DIR", "null")  # null: no state at all (not a directory ./null)
    s = load_settings(path)
    assert s.listen.port == 9800 and s.state.dir is None
    monkeypatch.setenv("MONITAUR_STATE__DIR", "")
    assert load_settings(None).state.dir == Path("./state")  # the default again
    monkeypatch.setenv("MONITAUR_DEFAULT_TIMEZONE", "null")
    monkeypatch.setenv("MONITAUR_FUSION__INPUTS", '["knn", "ood"]')  # JSON arrays are decoded
    monkeypatch.setenv("MONITAUR_MODEL_ADMISSION__PATTERN", "[a-z]+")  # ... text that is not JSON is kept
    s = load_settings(None)
    assert s.default_timezone is None and s.fusion.inputs == ["knn", "ood"] and s.model_admission.pattern == "[a-z]+"


def test_env_errors_name_the_variable_not_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "state:\n  max_clients: 10\n")
    monkeypatch.setenv("MONITAUR_LISTEN__PORT", "null")  # not optional
    monkeypatch.setenv("MONITAUR_STATE__CHECKPOINT_INTERVAL_SECONDS", "soon")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    lines = str(err.value).splitlines()
    assert any(line.startswith("environment variable MONITAUR_LISTEN__PORT: listen.port: ") for line in lines), lines
    assert any(line.startswith("environment variable MONITAUR_STATE__CHECKPOINT_INTERVAL_SECONDS: state.checkpoint_interval_seconds") for line in lines)
    assert "c.yml" not in str(err.value)
    monkeypatch.delenv("MONITAUR_LISTEN__PORT")
    monkeypatch.delenv("MONITAUR_STATE__CHECKPOINT_INTERVAL_SECONDS")
    monkeypatch.setenv("MONITAUR_STATE__DIRR", "/x")  # a misspelt key below a known one is an error
    with pytest.raises(ConfigError, match="^environment variable MONITAUR_STATE__DIRR: state.dirr: Extra inputs"):
        load_settings(path)
    monkeypatch.delenv("MONITAUR_STATE__DIRR")
    monkeypatch.setenv("MONITAUR_LISTEN__HOST", "0.0.0.0")  # a check across keys: blamed on the variable that set one
    with pytest.raises(ConfigError, match="^environment variable MONITAUR_LISTEN__HOST: push is enabled"):
        load_settings(path)
    monkeypatch.delenv("MONITAUR_LISTEN__HOST")
    monkeypatch.setenv("MONITAUR_DETECTORS__CONFIDENCE__WINDOW", "-3")  # detector parameters, resolved later, too
    with pytest.raises(ConfigError, match="^environment variable MONITAUR_DETECTORS__CONFIDENCE__WINDOW: detectors.confidence.window: "):
        enabled_detectors(load_settings(path))
    bad = write(tmp_path, "state:\n  max_clients: ten\n")
    with pytest.raises(ConfigError, match=f"^config file {str(bad)!r}: state.max_clients: "):
        load_settings(bad)


def test_unknown_env_variables_are_warned_about(tmp_path: Path) -> None:
    env = {**os.environ, "MONITAUR_FOO": "1", "MONITAUR_PUSH_TOKEN": "x", "MONITAUR_LISTEN__PORT": "9801"}
    run = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(write(tmp_path, "{}\n"))],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr
    assert "MONITAUR_FOO names no configuration key" in run.stderr and "MONITAUR_PUSH_TOKEN names no configuration key" in run.stderr
    assert "MONITAUR_LISTEN__PORT" not in run.stderr


def test_the_reaction_secret_file_is_read_and_checked_once(tmp_path: Path) -> None:
    """The secret is the file's first line as validated at start-up: emptying the file later
    cannot turn it into an empty secret that an empty header would match."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret-s3cret-s3cret-0123\n")
    s = Settings(state={"dir": None}, files={"paths": []}, reaction={"enabled": True, "secret_file": str(secret)})
    secret.write_text("")
    assert s.reaction.shared_secret() == "s3cret-s3cret-s3cret-0123"
    with pytest.raises(ValidationError, match="secret_file"):
        Settings(state={"dir": None}, files={"paths": []}, reaction={"enabled": True, "secret_file": str(secret)})
