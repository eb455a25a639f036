"""Configuration: one YAML file, overridable key by key with ``MONITAUR_*`` variables.

Everything is validated here and only here, including each detector's parameters (by
the detector's own ``Params`` model), so a bad config fails at start-up with the
offending key named, never later inside the pipeline. The defaults of :class:`Settings`
*are* the embedded default configuration.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from exporter.names import MAX_MODEL_LENGTH, is_valid_name

DEFAULT_PORT = 9717


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key and what is expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListenConfig(_Section):
    """Where the HTTP server (metrics, health, push) listens, how many connections it serves
    at once, how long it waits for each, and its TLS and basic auth (``web_config_file``)."""

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    max_connections: int = Field(64, ge=1, le=4096, description="connections served at once; beyond, 503 (TLS: closed)")
    header_timeout_seconds: float = Field(10.0, gt=0, description="request line and headers (and the TLS handshake), whole")
    body_timeout_seconds: float = Field(30.0, gt=0, description="a push body, whole")
    idle_timeout_seconds: float = Field(30.0, gt=0, description="a kept-alive connection waiting for its next request")
    write_timeout_seconds: float = Field(30.0, gt=0, description="each write of an answer to a client that does not read")
    web_config_file: Path | None = Field(None, description="exporter-toolkit web config: TLS and basic auth")

    @field_validator("web_config_file")
    @classmethod
    def _web_config(cls, value: Path | None) -> Path | None:
        if value is not None:
            from exporter.webconfig import WebConfigError, load

            try:
                load(value)
            except WebConfigError as exc:
                raise ValueError(f"{str(value)!r}: {exc}") from None
        return value

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class PushConfig(_Section):
    """HTTP push of events to ``POST /api/v1/events``."""

    enabled: bool = True
    tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="bearer tokens; env: comma-separated")
    tokens_file: Path | None = Field(None, description="file with one bearer token per line")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)

    @field_validator("tokens", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def all_tokens(self) -> list[str]:
        """Tokens from the config/environment plus those in ``tokens_file``."""
        tokens = list(self.tokens)
        if self.tokens_file is not None:
            text = self.tokens_file.read_text(encoding="utf-8")
            tokens += [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]
        return tokens


class FilesConfig(_Section):
    """Tailing of JSON-lines log files."""

    paths: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["./logs/*.jsonl"])
    mode: Literal["notify", "poll"] = "notify"
    poll_interval_seconds: float = Field(1.0, gt=0)
    max_line_bytes: int = Field(1024 * 1024, ge=64)
    start_at: Literal["beginning", "end"] = "beginning"
    rotated_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="where else rotated files are moved (logrotate's olddir), besides their own directory; relative to it"
    )
    rotated_idle_seconds: float = Field(60.0, gt=0, description="a rotated file is followed until it has had no new bytes for this long")

    @field_validator("paths", "rotated_dirs", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value


class HealthConfig(_Section):
    """When ``/healthz`` answers 503 (and ``monitaur_ingest_healthy`` is 0)."""

    max_failed_cycles: int = Field(3, ge=1, description="unhealthy after this many ingest cycles in a row fail")
    stall_seconds: float = Field(120.0, gt=0, description="unhealthy when a file has unread bytes and nothing of it was read for this long")
    max_failed_checkpoints: int = Field(3, ge=1, description="unhealthy after this many checkpoint writes of one kind in a row fail")


class FieldsConfig(_Section):
    """Dotted paths of the event fields inside each JSON object."""

    client: str = "client"
    ts: str = "ts"
    model: str = "model"
    input: str = "input"
    output: str = "output"


class ModelConfig(_Section):
    """What is known about one model; unset values are learned or guessed from traffic."""

    modality: Literal["tabular", "image", "text"] | None = None
    input_dim: int | None = Field(None, ge=1)
    num_classes: int | None = Field(None, ge=2)
    output: Literal["probabilities", "logits"] = "probabilities"
    image_shape: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ModelConfig":
        if self.image_shape is not None:
            if len(self.image_shape) not in (2, 3) or min(self.image_shape) < 1:
                raise ValueError("image_shape must be [height, width] or [height, width, channels]")
            if self.input_dim is not None and self.input_dim != _prod(self.image_shape):
                raise ValueError("input_dim must equal the product of image_shape")
        return self


class ModelAdmissionConfig(_Section):
    """Which model names met in traffic get state of their own, and how many (a client chooses the name).

    Every admitted model holds its detectors, shared indexes and metric series; without
    a bound, a client could allocate memory by inventing model names. The models named
    in ``models``, ``default_model`` and the calibration profile's models are always
    admitted, and take their places from the start.
    """

    allowed: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="further names admitted as they arrive; env: comma-separated"
    )
    pattern: str | None = Field(None, description="names matching this regular expression (whole name) are admitted as they arrive")
    max_models: int = Field(16, ge=1, le=4096, description="most models with state; further names are rejected (too_many_models)")

    @field_validator("allowed", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("allowed")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not is_valid_name(name, MAX_MODEL_LENGTH):
                raise ValueError(f"{name!r} is not a model name (printable text of at most {MAX_MODEL_LENGTH} characters)")
        return value

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @property
    def open(self) -> bool:
        """Whether any name is admitted (up to ``max_models``): neither ``allowed`` nor ``pattern`` is set."""
        return not self.allowed and self.pattern is None


class StateConfig(_Section):
    """Per-client state: bounds, and where snapshots and file offsets are kept."""

    dir: Path | None = Field(Path("./state"), description="None disables snapshots and offset checkpoints")
    checkpoint_interval_seconds: float = Field(10.0, gt=0)
    max_clients: int = Field(10_000, ge=1)
    idle_ttl_seconds: float = Field(7 * 24 * 3600, gt=0)


class MetricsConfig(_Section):
    """The per-client cardinality guard."""

    max_client_series: int = Field(500, ge=0, description="top-N clients by score get their own series")


class FusionConfig(_Section):
    """The fusion stage (:mod:`exporter.fusion`): which detectors' flags make the verdict."""

    inputs: list[str] | None = Field(
        None, description="detectors whose flags make the verdict; default: every enabled detector that counts as evidence (not rate)"
    )


class VerdictConfig(_Section):
    """The sticky verdict (:mod:`exporter.verdict`): how long a flag holds, what is kept of evicted flagged clients."""

    hold_seconds: float = Field(
        24 * 3600, gt=0,
        description="a flagged client stays flagged until released, or until this long passes without a new flag (inactive or clean)",
    )
    max_recently_flagged: int = Field(1000, ge=0, description="evicted flagged clients remembered (id, model, flag times, detectors)")


class LimitsConfig(_Section):
    """Bounds on the work one event can cause, whatever its sender puts in it."""

    max_image_pixels: int = Field(
        1024 * 1024,
        ge=1,
        le=4096 * 4096,
        description="encoded images with more pixels (width x height, read from the header before decoding) are rejected",
    )


class CalibrationConfig(_Section):
    """How ``calibrate`` learns a profile from benign traffic."""

    target_fpr: float = Field(0.01, gt=0.0, lt=0.5, description="target share of benign clients flagged, per detector and for risk")
    max_reference_samples: int = Field(50_000, ge=100, description="benign inputs per model kept for fitting reference statistics")
    null_samples: int = Field(20_000, ge=100, description="benign values per detector kept for risk p-values")
    seed: int = 0


class Settings(BaseSettings):
    """The whole configuration. ``Settings()`` is the embedded default."""

    model_config = SettingsConfigDict(env_prefix="MONITAUR_", env_nested_delimiter="__", extra="forbid")

    listen: ListenConfig = Field(default_factory=ListenConfig)
    push: PushConfig = Field(default_factory=PushConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    fields: FieldsConfig = Field(default_factory=FieldsConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    model_admission: ModelAdmissionConfig = Field(default_factory=ModelAdmissionConfig)
    default_model: str = "default"
    default_timezone: str | None = None
    state: StateConfig = Field(default_factory=StateConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    plugins: dict[str, str] = Field(default_factory=dict, description="extra detectors: name -> 'module:Class'")
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    profile: Path | None = Field(None, description="calibration profile used by run and replay (--profile overrides)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _detector_params: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment overrides it key by key.
        return (env_settings, init_settings)

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}; expected an IANA name such as 'UTC' or 'Europe/Paris'") from None
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if self.health.stall_seconds < 3 * self.files.poll_interval_seconds:
            raise ValueError(
                f"health.stall_seconds ({self.health.stall_seconds:g}) must be at least 3 x files.poll_interval_seconds "
                f"({self.files.poll_interval_seconds:g}): a file is read once per poll"
            )
        if self.push.enabled and not self.listen.is_loopback:
            if self.push.tokens_file is not None and not self.push.tokens_file.is_file():
                raise ValueError(f"push.tokens_file {str(self.push.tokens_file)!r} does not exist")
            if not self.push.all_tokens():
                raise ValueError(
                    f"push is enabled and listen.host {self.listen.host!r} is not loopback: bearer tokens are required "
                    "(set push.tokens_file or MONITAUR_PUSH__TOKENS), or disable push"
                )
        from exporter.detectors import resolve_detectors

        self._detector_params = resolve_detectors(self.detectors, self.plugins)
        unknown = [name for name in self.fusion.inputs or [] if name not in self._detector_params]
        if unknown:
            raise ValueError(f"fusion.inputs: {', '.join(unknown)} is not an enabled detector; enabled: {', '.join(self._detector_params)}")
        return self

    def detector_params(self) -> dict[str, Any]:
        """Enabled detectors in run order: name -> validated ``Params`` instance."""
        return dict(self._detector_params)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted key, then what is expected."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"{key}: {msg}" if key else msg)
    return "\n".join(lines)


def load_settings(path: Path | str | None = None) -> Settings:
    """Load and validate the config at ``path`` (or the embedded default), with env overrides.

    Raises :class:`ConfigError` with a readable message on any problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None)
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}{f': {problem}' if problem else ''}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys at the top level")
        data = loaded
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
