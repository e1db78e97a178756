"""An HTTPS server on 127.0.0.1 with a self-signed certificate: what a client that verifies TLS must refuse.

It answers just enough for ``dora-reconciler check``: the Kubernetes Application list (empty), GitHub's
``/rate_limit`` and DevLake's webhook (400 to an empty body, as DevLake does once the key is accepted).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fakes.server import FakeServer


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """``(certificate, key)`` PEM files for ``127.0.0.1``, signed by nobody a client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class SelfSignedServer(FakeServer):
    """``with SelfSignedServer(tmp_path) as server: server.url``; ``server.paths`` lists what was asked."""

    thread_name = "tls-server"
    scheme = "https"

    def __init__(self, directory: Path) -> None:
        super().__init__()
        cert, key = self_signed_certificate(directory)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self.paths: list[str] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler(self)

    def prepare(self, server: ThreadingHTTPServer) -> None:
        server.socket = self._context.wrap_socket(server.socket, server_side=True)


def _handler(server: SelfSignedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path.split("?", 1)[0]
            server.paths.append(path)
            status, body = _route(self.command, path)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            with contextlib.suppress(ssl.SSLError, ConnectionError):  # a client that refused our certificate
                super().handle()

    return Handler


def _route(method: str, path: str) -> tuple[int, Any]:
    if path == "/apis/argoproj.io/v1alpha1/applications":
        return 200, {"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationList", "metadata": {}, "items": []}
    if path == "/rate_limit":
        core = {"limit": 5000, "remaining": 4999, "reset": 1893456000, "used": 1, "resource": "core"}
        return 200, {"resources": {"core": core}, "rate": core}
    if method == "POST" and path.endswith("/deployments"):
        return 400, {"success": False, "message": "deployment_commits is empty (400)"}
    return 404, {"message": "not found"}
