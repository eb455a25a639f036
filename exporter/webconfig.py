"""The web configuration file of the Prometheus exporter-toolkit: TLS and basic auth for the HTTP server.

``listen.web_config_file`` names a YAML file in the format of exporter-toolkit's
``docs/web-configuration.md`` (what node_exporter and Prometheus itself read with
``--web.config.file``), so that an operator can reuse one file and the matching
``prometheus.yml`` settings (``scheme: https``, ``tls_config``, ``basic_auth``)::

    tls_server_config:
      cert_file: server.crt             # paths are relative to this file's directory
      key_file: server.key
      client_ca_file: ca.crt            # optional, with client_auth_type
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12                # TLS10..TLS13; default TLS12 (max: TLS13)
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}
    basic_auth_users:
      alice: $2y$10$...                 # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')
    auth_excluded_paths: [/healthz]     # optional: paths served without basic auth

Keys of the toolkit that this exporter does not implement (inline ``cert``/``key``/
``client_ca``, ``cipher_suites``, ``curve_preferences``, ``client_allowed_sans``,
``rate_limit``, and the client auth types that do not verify the certificate) are
refused with an error naming them, never ignored: a security setting that is silently
dropped is worse than none. The file is read at start-up; the certificate, key and CA
files are reloaded when they change (checked at each new connection), so a renewed
certificate needs no restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger("monitaur.http")

CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The response headers exporter-toolkit lets a web config set, with their allowed values (None: any).
EXTRA_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_UNSUPPORTED_TLS = {
    "cert": "give the certificate in a file (cert_file)",
    "key": "give the key in a file (key_file)",
    "client_ca": "give the CA certificates in a file (client_ca_file)",
    "cipher_suites": "the exporter uses OpenSSL's default cipher suites",
    "curve_preferences": "the exporter uses OpenSSL's default curves",
    "client_allowed_sans": "restrict clients by the CA that signs their certificates (client_ca_file)",
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
BCRYPT_MAX_PASSWORD = 72  # bytes; bcrypt ignores (and the bcrypt package refuses) longer ones


class WebConfigError(Exception):
    """A web config that cannot be used; the message names the key and what is expected."""


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config``, with paths made absolute."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    prefer_server_cipher_suites: bool = True

    def files(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())

    def build_context(self) -> ssl.SSLContext:
        """A server-side SSL context; :class:`WebConfigError` naming the key if a file is unusable."""
        for key, path in (("cert_file", self.cert_file), ("key_file", self.key_file), ("client_ca_file", self.client_ca_file)):
            if path is not None:
                try:
                    path.read_bytes()
                except OSError as exc:
                    raise WebConfigError(f"tls_server_config.{key}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        ctx.maximum_version = self.max_version
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise WebConfigError(
                f"tls_server_config: cert_file {str(self.cert_file)!r} and key_file {str(self.key_file)!r} "
                f"are not a PEM certificate and its unencrypted private key ({exc.reason or exc})"
            ) from None
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except ssl.SSLError as exc:
                raise WebConfigError(
                    f"tls_server_config.client_ca_file: {str(self.client_ca_file)!r} holds no usable PEM certificate ({exc.reason or exc})"
                ) from None
        ctx.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        if self.prefer_server_cipher_suites:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        return ctx


class TLSContextSource:
    """The SSL context for new connections, rebuilt when the certificate, key or CA file changes.

    Called from the accepting thread only. A change that does not load (a certificate
    written before its key, say) is logged, and the previous context stays in use until
    the files change again.
    """

    def __init__(self, config: TLSServerConfig) -> None:
        self.config = config
        self._signature = self._stat()
        self._context = config.build_context()

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in self.config.files():
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def context(self) -> ssl.SSLContext:
        signature = self._stat()
        if signature != self._signature:
            self._signature = signature
            try:
                self._context = self.config.build_context()
                log.info("TLS certificate files changed: reloaded")
            except WebConfigError as exc:
                log.error("TLS certificate files changed but cannot be loaded, keeping the previous ones: %s", exc)
        return self._context


class BasicAuth:
    """Checks ``Authorization: Basic`` credentials against bcrypt hashes, as exporter-toolkit does.

    A bcrypt check costs ~0.13 s at cost 10 (``bcrypt.checkpw``, measured here), so:

    - each user's last good password is remembered as an HMAC-SHA256 under a key drawn at
      start-up (not the password itself), compared in constant time: a scrape with the
      same credentials costs one HMAC, not a bcrypt;
    - bcrypt checks run one at a time (a lock), so wrong passwords can keep one core busy,
      never all of them;
    - an unknown user is checked against a dummy hash of the same cost, so the time of a
      401 does not tell which users exist.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        self._key = os.urandom(32)
        self._good: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._dummy: bytes | None = None
        self._cost = min((_cost(h) for h in self._users.values()), default=10)

    def check(self, header: str | None) -> bool:
        """True if ``header`` (the Authorization header, or None) holds a configured user's password."""
        credentials = parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        digest = hmac.new(self._key, password, hashlib.sha256).digest()
        good = self._good.get(user)
        if good is not None and hmac.compare_digest(good, digest):
            return True
        hashed = self._users.get(user)
        with self._lock:
            ok = _bcrypt_matches(password, hashed if hashed is not None else self._dummy_hash())
        if ok and hashed is not None:
            self._good[user] = digest
            return True
        return False

    def _dummy_hash(self) -> bytes:
        import bcrypt

        if self._dummy is None:
            self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(self._cost))
        return self._dummy


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    if len(password) > BCRYPT_MAX_PASSWORD:
        return False
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # a hash that passed the format check but not bcrypt's own
        log.error("a basic_auth_users hash of the web config is not usable by bcrypt")
        return False


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` value, or None if it is not one."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
        user, sep, password = raw.partition(b":")
        return (user.decode("utf-8"), password) if sep else None
    except (binascii.Error, ValueError):  # UnicodeDecodeError and non-ASCII text included
        return None


@dataclass(frozen=True)
class WebConfig:
    """A loaded web config. Empty (no TLS, no users) is valid: plain HTTP without auth."""

    path: Path
    tls: TLSServerConfig | None = None
    basic_auth_users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    auth_excluded_paths: frozenset[str] = frozenset()


def load(path: Path | str) -> WebConfig:
    """Read and validate the web config at ``path``, including its certificate files.

    Raises :class:`WebConfigError` with the offending key in the message.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WebConfigError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise WebConfigError(f"{str(path)!r} is not valid YAML ({type(exc).__name__})") from None
    data = {} if data is None else _mapping(data, "the web config's top level")
    known = {"tls_server_config", "http_server_config", "basic_auth_users", "auth_excluded_paths", "rate_limit"}
    _no_unknown(data, known, "")
    if "rate_limit" in data:
        raise WebConfigError("rate_limit: not supported by this exporter (listen.max_connections bounds the load instead)")
    base = path.resolve().parent
    tls = _tls(_mapping(data.get("tls_server_config") or {}, "tls_server_config"), base)
    headers = _headers(_mapping(data.get("http_server_config") or {}, "http_server_config"))
    users = _users(_mapping(data.get("basic_auth_users") or {}, "basic_auth_users"))
    excluded = data.get("auth_excluded_paths") or []
    if not isinstance(excluded, list) or not all(isinstance(p, str) and p.startswith("/") for p in excluded):
        raise WebConfigError("auth_excluded_paths: expected a list of paths starting with '/', e.g. [/healthz]")
    config = WebConfig(path, tls, users, headers, frozenset(excluded))
    if tls is not None:
        tls.build_context()  # every file readable, the key matches the certificate
    return config


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise WebConfigError(f"{where}: expected a mapping")
    return value


def _no_unknown(section: dict[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise WebConfigError(f"{prefix}{unknown[0]}: unknown key (expected one of {', '.join(sorted(known))})")


def _string(section: dict[str, Any], key: str, prefix: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebConfigError(f"{prefix}{key}: expected a string")
    return value


def _tls(section: dict[str, Any], base: Path) -> TLSServerConfig | None:
    p = "tls_server_config."
    known = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version", "prefer_server_cipher_suites"}
    for key, instead in _UNSUPPORTED_TLS.items():
        if section.get(key) not in (None, "", []):
            raise WebConfigError(f"{p}{key}: not supported by this exporter; {instead}")
    _no_unknown({k: v for k, v in section.items() if k not in _UNSUPPORTED_TLS}, known, p)
    values = {k: _string(section, k, p) for k in ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version")}
    if not any(values.values()):
        return None
    if values["cert_file"] is None:
        raise WebConfigError(f"{p}cert_file: required when TLS is configured")
    if values["key_file"] is None:
        raise WebConfigError(f"{p}key_file: required when TLS is configured")
    auth = values["client_auth_type"] or "NoClientCert"
    if auth in _UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            f"{p}client_auth_type: {auth} accepts certificates nobody verified and is not supported; use RequireAndVerifyClientCert"
        )
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(f"{p}client_auth_type: {auth!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}")
    ca = values["client_ca_file"]
    if ca is not None and auth == "NoClientCert":
        raise WebConfigError(f"{p}client_ca_file: set without a client_auth_type that checks certificates (RequireAndVerifyClientCert)")
    if ca is None and auth != "NoClientCert":
        raise WebConfigError(f"{p}client_ca_file: required by client_auth_type {auth}")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = values[key] or default
        if name not in TLS_VERSIONS:
            raise WebConfigError(f"{p}{key}: {name!r} is not one of {', '.join(TLS_VERSIONS)}")
        versions[key] = TLS_VERSIONS[name]
    if versions["min_version"] > versions["max_version"]:
        raise WebConfigError(f"{p}min_version: above max_version")
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{p}prefer_server_cipher_suites: expected true or false")
    return TLSServerConfig(
        cert_file=base / values["cert_file"],
        key_file=base / values["key_file"],
        client_ca_file=base / ca if ca is not None else None,
        client_auth_type=auth,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        prefer_server_cipher_suites=prefer,
    )


def _headers(section: dict[str, Any]) -> dict[str, str]:
    _no_unknown(section, {"headers", "http2"}, "http_server_config.")
    if not isinstance(section.get("http2", True), bool):
        raise WebConfigError("http_server_config.http2: expected true or false (the exporter speaks HTTP/1.1 either way)")
    headers = _mapping(section.get("headers") or {}, "http_server_config.headers")
    for name, value in headers.items():
        if name not in EXTRA_HEADERS:
            raise WebConfigError(f"http_server_config.headers.{name}: cannot be configured (allowed: {', '.join(EXTRA_HEADERS)})")
        allowed = EXTRA_HEADERS[name]
        if not isinstance(value, str) or not value or not (value.isascii() and value.isprintable()):
            raise WebConfigError(f"http_server_config.headers.{name}: expected a non-empty string of printable ASCII")
        if allowed is not None and value not in allowed:
            raise WebConfigError(f"http_server_config.headers.{name}: expected one of {', '.join(allowed)}")
    return dict(headers)


def _users(section: dict[str, Any]) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if not user or ":" in user or not user.isprintable():
            raise WebConfigError(f"basic_auth_users: {user!r} is not a usable user name (non-empty, printable, without ':')")
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise WebConfigError(
                f"basic_auth_users.{user}: expected a bcrypt hash ($2y$10$ and 53 characters), "
                "e.g. from: htpasswd -nBC 10 \"\" | tr -d ':\\n'"
            )
        if not 4 <= _cost(hashed.encode()) <= 31:
            raise WebConfigError(f"basic_auth_users.{user}: bcrypt cost must be between 4 and 31")
        users[user] = hashed.encode("ascii")
    return users
