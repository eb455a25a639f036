"""Configuration: one YAML file, overridable key by key with ``MONITAUR_*`` variables.

The settings are plain data, validated here, so a bad config fails at start-up with the
offending key and its source named (the config file, or the environment variable),
never later inside the pipeline. The defaults of :class:`Settings` *are* the embedded
default configuration. The ``detectors`` section is a mapping of parameters that this
module does not interpret: :func:`exporter.detectors.enabled_detectors` resolves it
against the detector registry (and checks ``fusion.inputs``) where a pipeline is built,
and the CLI calls it at start-up too, so detector errors fail as early.

Environment variables (:func:`env_overrides`): ``MONITAUR_<KEY>__<SUBKEY>...``, merged
into the file key by key. An empty value means "unset" (the file or default applies);
``null`` sets a key to none (``MONITAUR_STATE__DIR=null`` disables state); a value that
starts with ``[`` or ``{`` is read as JSON when it parses; a variable that names no
top-level key is reported by :func:`unknown_env_vars` (a warning, not an error: other
tools may share the prefix), while an unknown key below a known one is an error.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from exporter.names import MAX_MODEL_LENGTH, is_valid_name

DEFAULT_PORT = 9717


ENV_PREFIX = "MONITAUR_"
ENV_NESTING = "__"
ENV_NULL = "null"


class ConfigError(Exception):
    """A configuration that cannot be used; each problem names its key, its source and what is expected.

    ``problems`` are ``(dotted key, message)`` pairs; ``file`` is the config file, if any.
    The message of the exception attributes each problem to the environment variable
    that set the key (or one above it), else to the config file (:meth:`describe`).
    """

    def __init__(self, problems: list[tuple[str, str]] | str, file: str | os.PathLike[str] | None = None) -> None:
        self.problems = [("", problems)] if isinstance(problems, str) else list(problems)
        self.file = None if file is None else str(file)
        super().__init__(self.describe())

    def describe(self, environ: Mapping[str, str] | None = None) -> str:
        """One line per problem: ``<source>: <key>: <message>``."""
        origins = env_overrides(os.environ if environ is None else environ)[1]
        lines = []
        for key, msg in self.problems:
            where = source_of(key, origins, self.file, msg)
            lines.append(": ".join(part for part in (where, key, msg) if part))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


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
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address to listen on) is loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
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


# Header names the gateway sets for the decision endpoint: HTTP tokens, and none that
# carries the user's credentials or frames the request.
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_RESERVED_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "expect"}
)
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_SECRET_LENGTH = 16


def _secret_text(value: str, what: str) -> str:
    if len(value) < MIN_SECRET_LENGTH or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"{what} must be at least {MIN_SECRET_LENGTH} printable ASCII characters without spaces")
    return value


def read_named_tokens(path: Path) -> dict[str, str]:
    """A tokens file: one ``name:token`` per line; blank lines and lines starting with ``#`` are skipped."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            raise ValueError(f"{str(path)!r} line {n}: expected name:token")
        out[name.strip()] = token.strip()
    return out


class ApiConfig(_Section):
    """The clients API (``/api/v1/clients``): read verdicts; release and block clients.

    Protected like push, by bearer tokens, but its own: each token has a name, which the
    log and the override record give as who released or blocked a client.
    """

    enabled: bool | None = Field(
        None, description="null: on when listen.host is loopback or tokens are set; true: on (tokens required beyond loopback); false: off"
    )
    tokens: dict[str, str] = Field(default_factory=dict, description="name -> bearer token; env: a JSON object")
    tokens_file: Path | None = Field(None, description="file with one name:token per line")

    def all_tokens(self) -> dict[str, str]:
        """Tokens from the config/environment plus those in ``tokens_file`` (which wins for a name in both)."""
        tokens = dict(self.tokens)
        if self.tokens_file is not None:
            tokens.update(read_named_tokens(self.tokens_file))
        return tokens

    @model_validator(mode="after")
    def _tokens(self) -> "ApiConfig":
        if self.tokens_file is not None and not self.tokens_file.is_file():
            raise ValueError(f"api.tokens_file {str(self.tokens_file)!r} does not exist")
        try:
            tokens = self.all_tokens()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"api.tokens_file {str(self.tokens_file)!r} cannot be read: {exc}") from None
        for name, token in tokens.items():
            if not _TOKEN_NAME.fullmatch(name):
                raise ValueError(f"api token name {name!r}: letters, digits and . _ @ - only (at most 64), as it names who acted in logs")
            _secret_text(token, f"api token {name!r}")
        if len(set(tokens.values())) < len(tokens):
            raise ValueError("two api tokens are the same: each token must name one operator")
        return self


class ReactionListenConfig(_Section):
    """Where the decision endpoint listens (its own port, served by a process of its own)."""

    host: str = "127.0.0.1"
    port: int = Field(9718, ge=0, le=65535)
    max_connections: int = Field(256, ge=1, le=4096, description="gateway connections served at once; beyond, the on_error answer")
    header_timeout_seconds: float = Field(10.0, gt=0, description="a request's line and headers, whole")
    idle_timeout_seconds: float = Field(
        75.0, gt=0, description="a kept-alive connection between requests (keep it above the gateway's own: nginx's upstream keepalive_timeout is 60 s)"
    )

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


class ReactionConfig(_Section):
    """The decision endpoint for gateways (nginx ``auth_request``, Envoy ``ext_authz``): see docs/reaction.md."""

    enabled: bool = Field(False, description="serve decisions on reaction.listen")
    mode: Literal["observe", "block"] = Field("observe", description="observe: always allow, count would_block; block: answer 403 to blocked clients")
    listen: ReactionListenConfig = Field(default_factory=ReactionListenConfig)
    client_header: str = Field("X-Monitaur-Client", description="the header the gateway sets to the client id, from its own authentication")
    secret_header: str = Field("X-Monitaur-Secret", description="the header that carries the shared secret, when one is set")
    secret: str | None = Field(None, description="shared secret the gateway sends in secret_header; required beyond loopback")
    secret_file: Path | None = Field(None, description="file holding the shared secret (first line)")
    allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list, description="clients never blocked; env: comma-separated")
    block_seconds: float | None = Field(24 * 3600, gt=0, description="how long a manual block lasts; null: until released")
    on_error: Literal["allow", "deny"] = Field(
        "allow", description="answer when no decision can be made (no or bad client header, no table yet, stale table): allow (fail open) or deny"
    )
    stale_seconds: float = Field(30.0, ge=2, description="decisions not confirmed against the verdicts for this long are stale (on_error)")
    cache_seconds: int = Field(5, ge=0, le=3600, description="Cache-Control max-age of decisions; 0: no-store")
    max_manual_blocks: int = Field(10_000, ge=1, description="manual blocks in force at once")

    @field_validator("allowlist", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value

    @field_validator("allowlist")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        for client in value:
            if not is_valid_name(client):
                raise ValueError(f"{client!r} is not a client id (printable text of at most 256 characters)")
        return value

    @field_validator("client_header", "secret_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a header name (letters, digits and '-', at most 64)")
        if value.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{value!r} is reserved: the decision endpoint never reads the user's credentials or the request's framing")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return None if value is None else _secret_text(value, "reaction.secret")

    _secret_value: str | None = PrivateAttr(default=None)  # the secret as validated (secret_file is read once, here)

    @model_validator(mode="after")
    def _checks(self) -> "ReactionConfig":
        if self.client_header.lower() == self.secret_header.lower():
            raise ValueError("reaction.client_header and reaction.secret_header must differ")
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set reaction.secret or reaction.secret_file, not both")
        self._secret_value = self.secret
        if self.secret_file is not None:
            if not self.secret_file.is_file():
                raise ValueError(f"reaction.secret_file {str(self.secret_file)!r} does not exist")
            try:
                lines = self.secret_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"reaction.secret_file {str(self.secret_file)!r} cannot be read: {exc}") from None
            self._secret_value = _secret_text(lines[0].strip() if lines else "", "the secret in reaction.secret_file")
        return self

    def shared_secret(self) -> str | None:
        """The shared secret, from ``secret`` or the first line of ``secret_file`` as read and checked at
        validation (a file emptied later cannot turn it into an empty secret); None without one."""
        return self._secret_value


class LimitsConfig(_Section):
    """Bounds on the work one event can cause, whatever its sender puts in it."""

    max_image_pixels: int = Field(
        1024 * 1024,
        ge=1,
        le=4096 * 4096,
        description="encoded images with more pixels (width x height, read from the header before decoding) are rejected",
    )
    max_input_values: int = Field(
        4096,
        ge=2,
        le=1_000_000,
        description=(
            "an array input longer than this is rejected unless its model's input_dim is configured: a model's memory grows with "
            "its input length, which an unconfigured model learns from its first event"
        ),
    )
    max_future_seconds: float = Field(
        300.0,
        ge=1.0,
        le=366 * 86400.0,
        description=(
            "an event stamped more than this many seconds after the exporter's clock (in replay and calibrate, the moment reading "
            "began) is rejected: what is kept by event time (the links index, groups' edges) expires against the latest event time, "
            "so one event far in the future would wipe it"
        ),
    )
    max_classes: int = Field(
        4096,
        ge=2,
        le=1_000_000,
        description="an output with more classes is rejected unless its model's num_classes is configured (the same reason, for class counts)",
    )


class CalibrationConfig(_Section):
    """How ``calibrate`` learns a profile from benign traffic."""

    target_fpr: float = Field(0.01, gt=0.0, lt=0.5, description="target share of benign clients the verdict flags at any point of their history")
    max_reference_samples: int = Field(50_000, ge=100, description="benign inputs per model kept for fitting reference statistics")
    seed: int = 0


class Settings(BaseSettings):
    """The whole configuration. ``Settings()`` is the embedded default."""

    # The environment is read by _EnvSource (MONITAUR_<KEY>__<SUBKEY>), not by pydantic-settings' own source.
    model_config = SettingsConfigDict(extra="forbid")

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
    api: ApiConfig = Field(default_factory=ApiConfig)
    reaction: ReactionConfig = Field(default_factory=ReactionConfig)
    profile: Path | None = Field(None, description="calibration profile used by run and replay (--profile overrides)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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
        return (_EnvSource(settings_cls), init_settings)

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
        if self.api.enabled and not self.listen.is_loopback and not self.api.all_tokens():
            raise ValueError(
                f"api.enabled is true and listen.host {self.listen.host!r} is not loopback: named tokens are required "
                "(set api.tokens_file or MONITAUR_API__TOKENS), or leave api.enabled unset"
            )
        r = self.reaction
        if r.enabled:
            if not r.listen.is_loopback and r.shared_secret() is None:
                raise ValueError(
                    f"reaction.listen.host {r.listen.host!r} is not loopback: set reaction.secret_file (or reaction.secret), "
                    "a shared secret the gateway sends, so that only it can ask for decisions"
                )
            hosts = {r.listen.host, self.listen.host}
            if r.listen.port != 0 and r.listen.port == self.listen.port and (len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
                raise ValueError(f"reaction.listen.port and listen.port are both {self.listen.port}: the decision endpoint needs a port of its own")
        return self


def api_enabled(settings: Settings) -> bool:
    """Whether the clients API is served: ``api.enabled``, or when unset, on loopback or with tokens."""
    if settings.api.enabled is not None:
        return settings.api.enabled
    return settings.listen.is_loopback or bool(settings.api.all_tokens())


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted key, what is expected)`` per problem of a pydantic error."""
    return [(".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, ")) for err in exc.errors()]


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted key, then what is expected."""
    return "\n".join(f"{key}: {msg}" if key else msg for key, msg in validation_problems(exc))


# -- environment ---------------------------------------------------------------------
def _env_value(text: str) -> Any:
    """An environment value: ``null`` is None; JSON arrays and objects are decoded when
    they parse (else the text is kept, e.g. a regular expression ``[a-z]+``); anything
    else stays a string for the field to validate (``"9800"`` -> 9800)."""
    if text == ENV_NULL:
        return None
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str], list[str]]:
    """Read ``MONITAUR_*`` variables: (nested overrides, key path -> variable, unknown variables).

    ``MONITAUR_STATE__DIR=/x`` gives ``{"state": {"dir": "/x"}}``. Empty values are
    skipped (unset). A variable whose first key is not a top-level key of :class:`Settings`
    is returned as unknown, and left out of the overrides.
    """
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    unknown: list[str] = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or environ[name] == "":
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_NESTING))
        if path[0] not in Settings.model_fields or not all(path):
            unknown.append(name)
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):  # MONITAUR_STATE={"dir": ...} and MONITAUR_STATE__DIR: the deeper one wins
                child = node[part] = {}
            node = child
        node[path[-1]] = _env_value(environ[name])
        origins[path] = name
    return data, origins, unknown


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """``MONITAUR_*`` variables that name no configuration key (they are ignored)."""
    return env_overrides(os.environ if environ is None else environ)[2]


_DOTTED_KEY = re.compile(r"\b[a-z_]+(?:\.[a-z_]+)+\b")


def source_of(key: str, origins: Mapping[tuple[str, ...], str], file: str | None, message: str = "") -> str:
    """Where a dotted key's value comes from: the environment variable that set it or a
    key above it, else the config file, else "" (the embedded default).

    A problem without a key (a check across keys) is attributed to the variables that
    set the keys its message names, if any.
    """
    keys = [key] if key else _DOTTED_KEY.findall(message)
    found: list[str] = []
    for k in keys:
        path = tuple(k.split("."))
        for n in range(len(path), 0, -1):
            if path[:n] in origins:
                found.append(origins[path[:n]])
                break
    if found:
        names = list(dict.fromkeys(found))
        return f"environment variable{'s' if len(names) > 1 else ''} {', '.join(names)}"
    if file is not None:
        return f"config file {file!r}"
    return ""


class _EnvSource(PydanticBaseSettingsSource):
    """The ``MONITAUR_*`` variables as a settings source (see :func:`env_overrides`)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # required by the base class; unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return env_overrides(os.environ)[0]


def load_settings(path: Path | str | None = None) -> Settings:
    """Load and validate the config at ``path`` (or the embedded default), with env overrides.

    Raises :class:`ConfigError` with a readable message on any problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc
            raise ConfigError(f"cannot read config file {str(p)!r}: {why}") from None
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
        raise ConfigError(validation_problems(exc), file=path) from None
