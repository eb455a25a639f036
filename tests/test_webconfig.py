"""The exporter-toolkit web config: validation, basic auth, and real TLS on 127.0.0.1
(certificates made in the test with the openssl command), up to a real Prometheus scrape."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import time
import sys
from pathlib import Path
from typing import Any, Iterator

import bcrypt
import pytest
import requests
import yaml

from exporter.app import App
from exporter.cli import main as cli_main
from exporter.config import ConfigError, Settings, load_settings
from exporter.webconfig import BasicAuth, WebConfigError, load, parse_basic
from tests.conftest import free_port, wait_for
from tests.test_pipeline import lines
from tests.tlsfiles import TLSFiles, make_tls_files, needs_openssl, server_cert

PASSWORD = "s3cret pass"
# htpasswd -B writes $2y$; bcrypt's own prefix is $2b$: the same algorithm. Cost 4 keeps the tests fast.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("tls_server_config: [1]", "tls_server_config: expected a mapping"),
        ({"tls_server_config": {"cert_file": "missing.crt", "key_file": "missing.key"}}, "tls_server_config.cert_file: cannot read"),
        ({"tls_server_config": {"key_file": "k"}}, "tls_server_config.cert_file: required"),
        ({"tls_server_config": {"cert_file": "c"}}, "tls_server_config.key_file: required"),
        ({"tls_server_config": {"cert_file": "c", "key_file": "k", "client_auth_type": "RequireAnyClientCert"}}, "is not supported; use RequireAndVerifyClientCert"),
        ({"tls_server_config": {"cert_file": "c", "key_file": "k", "client_auth_type": "Sometimes"}}, "client_auth_type: 'Sometimes' is not one of"),
        ({"tls_server_config": {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"}}, "client_ca_file: set without a client_auth_type"),
        ({"tls_server_config": {"cert_file": "c", "key_file": "k", "client_auth_type": "RequireAndVerifyClientCert"}}, "client_ca_file: required by"),
        ({"tls_server_config": {"cert_file": "c", "key_file": "k", "min_version": "TLS14"}}, "min_version: 'TLS14' is not one of"),
        ({"tls_server_config": {"cert": "-----BEGIN"}}, "tls_server_config.cert: not supported"),
        ({"tls_server_config": {"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}}, "tls_server_config.cipher_suites: not supported"),
        ({"tls_server_config": {"cert_file": "c", "key_file": "k", "nonsense": 1}}, "tls_server_config.nonsense: unknown key"),
        ({"basic_auth_users": {"alice": "plaintext"}}, "basic_auth_users.alice: expected a bcrypt hash"),
        ({"basic_auth_users": {"a:b": HASH}}, "not a usable user name"),
        ({"basic_auth_users": {"alice": HASH.replace("$04$", "$99$")}}, "bcrypt cost must be between 4 and 31"),
        ({"http_server_config": {"headers": {"Set-Cookie": "x"}}}, "http_server_config.headers.Set-Cookie: cannot be configured"),
        ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}}, "expected one of deny, sameorigin"),
        ({"rate_limit": {"interval": "1s", "burst": 5}}, "rate_limit: not supported"),
        ({"auth_excluded_paths": ["healthz"]}, "auth_excluded_paths: expected a list of paths starting with '/'"),
        ({"basic_auth_user": {}}, "basic_auth_user: unknown key"),
        ("a: [", "is not valid YAML"),
    ],
)
def test_load_refuses_with_the_key_named(tmp_path: Path, data: Any, message: str) -> None:
    with pytest.raises(WebConfigError) as info:
        load(write(tmp_path / "web.yml", data))
    assert message in str(info.value)


def test_an_empty_file_means_plain_http_without_auth(tmp_path: Path) -> None:
    config = load(write(tmp_path / "web.yml", ""))
    assert config.tls is None and config.basic_auth_users == {} and config.headers == {}


def test_the_exporter_config_names_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    web = write(tmp_path / "web.yml", {"basic_auth_users": {"alice": "nope"}})
    cfg = write(tmp_path / "config.yml", {"listen": {"web_config_file": str(web)}})
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(info.value).startswith(f"config file {str(cfg)!r}: listen.web_config_file: ") and "basic_auth_users.alice" in str(info.value)
    assert cli_main(["check-config", str(cfg)]) == 2
    assert "listen.web_config_file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="listen.web_config_file: .*cannot read"):
        load_settings(write(tmp_path / "c2.yml", {"listen": {"web_config_file": str(tmp_path / "absent.yml")}}))


# -- basic auth ------------------------------------------------------------------------------
@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_basic_auth_checks_and_caches_only_good_passwords(bcrypt_calls: list[bytes]) -> None:
    auth = BasicAuth({"alice": HASH.encode()})
    assert auth.check(basic("alice", PASSWORD))
    assert auth.check(basic("alice", PASSWORD)) and auth.check(basic("alice", PASSWORD))
    assert len(bcrypt_calls) == 1  # later scrapes cost an HMAC, not a bcrypt
    assert not auth.check(basic("alice", "wrong"))
    assert not auth.check(basic("alice", "wrong"))
    assert len(bcrypt_calls) == 3  # failures are never cached as successes
    assert not auth.check(basic("mallory", PASSWORD))
    assert bcrypt_calls[-1] != HASH.encode() and bcrypt_calls[-1][:7] == b"$2b$04$"  # a dummy of the same cost
    assert not auth.check(basic("alice", "x" * 100))  # longer than bcrypt's 72 bytes: refused, not an exception
    assert auth.check(basic("alice", PASSWORD))


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer abc", "Basic", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(),
     "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(), "Basic é"],
)
def test_parse_basic_refuses_what_is_not_basic_credentials(header: str | None) -> None:
    assert parse_basic(header) is None


# -- TLS on 127.0.0.1 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (Debian package openssl)")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def start_app(tmp_path: Path, web: dict[str, Any], **listen: Any) -> App:
    web_file = write(tmp_path / "web.yml", web)
    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0, "web_config_file": str(web_file), **listen},
        files={"paths": [str(tmp_path / "none-*.jsonl")], "mode": "poll"},
        state={"dir": None},
        push={"tokens": ["tok"]},
    )
    app = App(settings)
    app.start()
    return app


@pytest.fixture
def app_factory() -> Iterator[Any]:
    apps: list[App] = []

    def make(tmp_path: Path, web: dict[str, Any], **listen: Any) -> App:
        apps.append(start_app(tmp_path, web, **listen))
        return apps[-1]

    yield make
    for a in apps:
        a.stop()


def url(app: App, path: str) -> str:
    host, port = app.address
    return f"https://{host}:{port}{path}"


@needs_openssl
def test_https_with_basic_auth(tmp_path: Path, tls: TLSFiles, app_factory: Any) -> None:
    # Paths relative to the web config's directory, as in exporter-toolkit.
    for name in ("server.crt", "server.key"):
        shutil.copy(tls.dir / name, tmp_path / name)
    app = app_factory(tmp_path, {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS13"},
        "basic_auth_users": {"alice": HASH},
        "auth_excluded_paths": ["/healthz"],
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
    })
    ca = str(tls.ca_cert)
    r = requests.get(url(app, "/metrics"), auth=("alice", PASSWORD), verify=ca, timeout=5)
    assert r.status_code == 200 and "monitaur_http_connections_limit" in r.text
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for auth in (None, ("alice", "wrong"), ("bob", PASSWORD)):
        for path in ("/metrics", "/", "/nope"):
            r = requests.get(url(app, path), auth=auth, verify=ca, timeout=5)
            assert r.status_code == 401, (auth, path)
            assert r.headers["WWW-Authenticate"] == 'Basic realm="monitaur"'
            assert "monitaur_" not in r.text and "<table" not in r.text
    assert requests.get(url(app, "/"), auth=("alice", PASSWORD), verify=ca, timeout=5).status_code == 200
    assert requests.get(url(app, "/healthz"), verify=ca, timeout=5).status_code == 200  # auth_excluded_paths
    # Push keeps its bearer tokens, over TLS.
    r = requests.post(url(app, "/api/v1/events"), data="\n".join(lines("k1", 2)), headers={"Authorization": "Bearer tok"}, verify=ca, timeout=5)
    assert r.status_code == 202 and r.json()["accepted"] == 2
    # Plain HTTP on the TLS port: no answer, a counted failed handshake.
    host, port = app.address
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{host}:{port}/metrics", timeout=5)
    assert app.metrics.registry.get_sample_value("monitaur_http_connections_dropped_total", {"reason": "tls_handshake"}) >= 1
    # A TLS version below min_version is refused.
    ctx = ssl.create_default_context(cafile=ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(requests.exceptions.SSLError):
        session = requests.Session()
        session.mount("https://", _ContextAdapter(ctx))
        session.get(url(app, "/healthz"), timeout=5)


class _ContextAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


@needs_openssl
def test_client_certificates_required(tmp_path: Path, tls: TLSFiles, app_factory: Any) -> None:
    app = app_factory(tmp_path, {"tls_server_config": {
        "cert_file": str(tls.server_cert), "key_file": str(tls.server_key),
        "client_ca_file": str(tls.ca_cert), "client_auth_type": "RequireAndVerifyClientCert",
    }})
    ca = str(tls.ca_cert)
    r = requests.get(url(app, "/metrics"), cert=(str(tls.client_cert), str(tls.client_key)), verify=ca, timeout=5)
    assert r.status_code == 200
    for cert in (None, (str(tls.rogue_cert), str(tls.rogue_key))):
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError included
            requests.get(url(app, "/metrics"), cert=cert, verify=ca, timeout=5)
    # TLS 1.3 sends the client's certificate after the client's handshake has finished: the
    # server may count the refusal just after the client has seen it fail
    wait_for(lambda: app.metrics.registry.get_sample_value("monitaur_http_connections_dropped_total", {"reason": "tls_handshake"}) >= 2,
             timeout=10, what="both refused handshakes counted")


@needs_openssl
def test_a_stalled_handshake_is_dropped_at_the_header_deadline(tmp_path: Path, tls: TLSFiles, app_factory: Any) -> None:
    app = app_factory(tmp_path, {"tls_server_config": {"cert_file": str(tls.server_cert), "key_file": str(tls.server_key)}},
                      header_timeout_seconds=1.0)
    hello = bytes.fromhex("160301") + b"\x02\x00" + b"\x01" * 20  # the start of a ClientHello, never finished
    for trickle in (False, True):
        with socket.create_connection(app.address, timeout=5) as s:
            start = time.monotonic()
            try:
                for i, byte in enumerate(hello):
                    s.sendall(bytes([byte]))
                    if not trickle and i == 5:
                        break
                    time.sleep(0.15)
                s.recv(1)
            except OSError:
                pass
            elapsed = time.monotonic() - start
        assert elapsed < 2.5, (trickle, elapsed)
    assert app.metrics.registry.get_sample_value("monitaur_http_connections_dropped_total", {"reason": "tls_handshake"}) == 2
    assert requests.get(url(app, "/healthz"), verify=str(tls.ca_cert), timeout=5).status_code == 200


@needs_openssl
def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path, tls: TLSFiles, app_factory: Any) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(tls.dir, certs)
    app = app_factory(tmp_path, {"tls_server_config": {"cert_file": "certs/server.crt", "key_file": "certs/server.key"}})
    host, port = app.address

    def served() -> str:
        return ssl.get_server_certificate((host, port), timeout=5).strip()

    def pem(path: Path) -> str:
        return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(path.read_text())).strip()

    assert served() == pem(certs / "server.crt")
    server_cert(certs, "renewed")
    os.replace(certs / "renewed.key", certs / "server.key")
    os.replace(certs / "renewed.crt", certs / "server.crt")
    renewed = pem(certs / "server.crt")
    assert renewed != pem(tls.server_cert)
    assert served() == renewed
    # A broken renewal keeps the previous certificate in service.
    (certs / "server.crt").write_text("not a certificate\n")
    assert served() == renewed


# -- a real Prometheus ----------------------------------------------------------------------
PROMETHEUS = shutil.which("prometheus")


@needs_openssl
@pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus binary (Debian package prometheus; .ci/run installs it)")
def test_prometheus_scrapes_over_tls_with_client_cert_and_basic_auth(tmp_path: Path, tls: TLSFiles, app_factory: Any) -> None:
    """The prometheus.yml settings the README documents (scheme https, tls_config, basic_auth with
    password_file), against the exporter's TLS with client certificates and basic auth."""
    app = app_factory(tmp_path, {
        "tls_server_config": {"cert_file": str(tls.server_cert), "key_file": str(tls.server_key),
                              "client_ca_file": str(tls.ca_cert), "client_auth_type": "RequireAndVerifyClientCert"},
        "basic_auth_users": {"prometheus": HASH},
    })
    host, port = app.address
    write(tmp_path / "password", PASSWORD + "\n")
    write(tmp_path / "wrong", "wrong\n")

    def job(name: str, password_file: Path) -> dict[str, Any]:
        return {
            "job_name": name,
            "scheme": "https",
            "tls_config": {"ca_file": str(tls.ca_cert), "cert_file": str(tls.client_cert), "key_file": str(tls.client_key)},
            "basic_auth": {"username": "prometheus", "password_file": str(password_file)},
            "static_configs": [{"targets": [f"{host}:{port}"]}],
        }

    prom_cfg = write(tmp_path / "prometheus.yml", {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [job("monitaur", tmp_path / "password"), job("wrong-password", tmp_path / "wrong")],
    })
    prom_port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def query(expr: str) -> list[dict[str, Any]]:
            try:
                body = requests.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": expr}, timeout=5).json()
            except requests.RequestException:
                return []
            return body.get("data", {}).get("result", [])

        wait_for(lambda: query('up{job="monitaur"} == 1'), timeout=90, interval=0.5,
                 what=f"Prometheus scraping over TLS (log: {tmp_path / 'prometheus.log'})")
        wait_for(lambda: query('up{job="wrong-password"} == 0'), timeout=30, interval=0.5, what="the wrong password failing")
        assert query('monitaur_http_connections_limit{job="monitaur"}')[0]["value"][1] == "64"
        assert not query('up{job="wrong-password"} == 1')
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@needs_openssl
def test_the_container_healthcheck_finds_the_exporter_over_tls_and_basic_auth(tmp_path: Path, tls: TLSFiles, app_factory: Any) -> None:
    """`monitaur-exporter healthcheck` (the Dockerfile's HEALTHCHECK) reads the exporter's own
    config: it speaks TLS when the web config does, and sends basic auth from a file."""
    from exporter.healthcheck import check

    app = app_factory(tmp_path, {"tls_server_config": {"cert_file": str(tls.server_cert), "key_file": str(tls.server_key)},
                                 "basic_auth_users": {"alice": HASH}})
    settings = app.settings.model_copy(update={"listen": app.settings.listen.model_copy(update={"port": app.address[1]})})
    assert check(settings)[0] is False  # behind basic auth, without credentials
    creds = tmp_path / "creds"
    creds.write_text(f"alice:{PASSWORD}\n")
    assert check(settings, creds) == (True, "healthy")
    plain = settings.model_copy(update={"listen": settings.listen.model_copy(update={"web_config_file": None})})
    healthy, what = check(plain, creds)  # plain HTTP against a TLS listener: no valid answer
    assert not healthy and ("no answer" in what or "answered" in what)
    app.stop()
    healthy, what = check(settings, creds)
    assert not healthy and what.startswith("no answer from 127.0.0.1:")


def test_healthcheck_command_exits_1_when_nothing_answers(tmp_path: Path) -> None:
    env = {**os.environ, "MONITAUR_LISTEN__PORT": str(free_port()), "MONITAUR_STATE__DIR": "null"}
    run = subprocess.run([sys.executable, "-m", "exporter", "healthcheck"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert run.returncode == 1 and "no answer from 127.0.0.1:" in run.stderr
