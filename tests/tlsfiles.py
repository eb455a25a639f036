"""Throwaway TLS files for tests, made with the ``openssl`` command line (Debian's openssl package).

A test CA signs a server certificate for 127.0.0.1/localhost and a client certificate;
a second, self-signed client certificate is signed by nobody the server trusts.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command (Debian package openssl)")


@dataclass(frozen=True)
class TLSFiles:
    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(name: str, cn: str, cwd: Path) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)


def _sign(name: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=cwd)


def server_cert(cwd: Path, name: str = "server") -> None:
    """A server certificate for 127.0.0.1 and localhost, signed by ``cwd``'s test CA."""
    _key_and_csr(name, "127.0.0.1", cwd)
    _sign(name, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", cwd)


def make_tls_files(cwd: Path) -> TLSFiles:
    cwd.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=monitaur test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)
    server_cert(cwd)
    _key_and_csr("client", "prometheus", cwd)
    _sign("client", "extendedKeyUsage=clientAuth\n", cwd)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", "rogue.key", "-out", "rogue.crt", "-subj", "/CN=prometheus", cwd=cwd)
    return TLSFiles(cwd, cwd / "ca.crt", cwd / "server.crt", cwd / "server.key", cwd / "client.crt", cwd / "client.key",
                    cwd / "rogue.crt", cwd / "rogue.key")
