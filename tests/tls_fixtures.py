"""A self-signed certificate for 127.0.0.1 / localhost, made at test time with the openssl CLI."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) valid for 127.0.0.1, ::1 and localhost for one day."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
                   check=True, capture_output=True)
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only ``cert``."""
    return ssl.create_default_context(cafile=str(cert))
