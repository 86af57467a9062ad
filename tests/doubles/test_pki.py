"""Tests of the test-time PKI (tests/doubles/pki.py)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.doubles.pki import (
    DEFAULT_TRUST_DOMAIN,
    CertificateAuthority,
    consul_service_uri,
    serial_to_hex,
)

pytestmark = pytest.mark.timeout(30)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_consul_service_uri() -> None:
    assert consul_service_uri("td.consul", "web") == "spiffe://td.consul/ns/default/dc/dc1/svc/web"
    assert (
        consul_service_uri("td.consul", "api", dc="dc2", ns="team")
        == "spiffe://td.consul/ns/team/dc/dc2/svc/api"
    )


def test_serial_to_hex_is_colon_separated_bytes() -> None:
    assert serial_to_hex(0x0A0B0C) == "0a:0b:0c"
    assert serial_to_hex(7) == "07"


def test_ca_is_self_signed_ca_with_spiffe_trust_domain() -> None:
    ca = CertificateAuthority()
    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    assert ca.trust_domain == DEFAULT_TRUST_DOMAIN
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    uris = _san(cert).get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://{DEFAULT_TRUST_DOMAIN}"]
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ca.id == ":".join(f"{b:02x}" for b in hashlib.sha1(der).digest())
    assert ca.not_after.tzinfo is not None and ca.not_after > datetime.now(UTC) + timedelta(
        days=365
    )
    assert "BEGIN PRIVATE KEY" in ca.key_pem
    assert ca.root is ca and ca.chain_pem == ca.cert_pem and ca.intermediate_pems == []


def test_issue_leaf_has_both_ekus_sans_and_verifies() -> None:
    ca = CertificateAuthority("aaaa.consul")
    uri = consul_service_uri(ca.trust_domain, "web")
    leaf = ca.issue(
        uri=uri, dns_names=["web.local"], ips=["127.0.0.1", "::1"], ttl=timedelta(hours=1)
    )
    cert = leaf.certificate
    cert.verify_directly_issued_by(ca.certificate)
    san = _san(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert san.get_values_for_type(x509.DNSName) == ["web.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1"), ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.serial == cert.serial_number and leaf.serial_hex == serial_to_hex(leaf.serial)
    assert leaf.uri == uri
    assert leaf.not_before == cert.not_valid_before_utc and leaf.not_before.tzinfo is not None
    assert leaf.not_after - datetime.now(UTC) <= timedelta(hours=1)
    assert leaf.not_after - datetime.now(UTC) > timedelta(minutes=59)
    assert leaf.not_before <= datetime.now(UTC) - timedelta(seconds=59)  # back-dated like Consul
    key = serialization.load_pem_private_key(leaf.key_pem.encode(), None)
    assert "BEGIN PRIVATE KEY" in leaf.key_pem  # PKCS#8
    assert "BEGIN EC PRIVATE KEY" in leaf.ec_key_pem  # SEC1, as Consul hands out
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_explicit_not_before_makes_expired_cert() -> None:
    ca = CertificateAuthority()
    start = datetime.now(UTC) - timedelta(days=2)
    leaf = ca.issue(not_before=start, ttl=timedelta(days=1))
    assert leaf.not_after < datetime.now(UTC)
    assert leaf.not_before == start.replace(microsecond=0)
    assert leaf.uri is None


def test_write_files_and_tls_mutual_handshake(tmp_path) -> None:
    ca = CertificateAuthority()
    server_leaf = ca.issue(dns_names=["localhost"], ips=["127.0.0.1"])
    client_leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, "odin"), ips=())
    s_cert, s_key = server_leaf.write(tmp_path / "server")
    c_cert, c_key = client_leaf.write(tmp_path / "client", cert_name="c.pem", key_name="k.pem")
    ca_path = ca.write_ca(tmp_path / "ca" / "ca.pem")
    assert ca_path.read_text() == ca.cert_pem
    assert c_cert.name == "c.pem" and c_key.name == "k.pem"
    _handshake(s_cert, s_key, c_cert, c_key, ca_path)


def _handshake(s_cert, s_key, c_cert, c_key, ca_path) -> dict:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(s_cert, s_key)
    server_ctx.load_verify_locations(ca_path)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(c_cert, c_key)
    client_ctx.load_verify_locations(ca_path)
    left, right = socket.socketpair()
    peer: dict = {}

    def serve() -> None:
        with server_ctx.wrap_socket(left, server_side=True) as tls:
            peer.update(tls.getpeercert())
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(right, server_hostname="127.0.0.1") as tls:
        assert tls.recv(2) == b"ok"
    thread.join(timeout=10)
    assert peer, "server did not see a client certificate"
    return peer


def test_intermediate_chain(tmp_path) -> None:
    root = CertificateAuthority("bbbb.consul")
    inter = root.intermediate()
    assert inter.trust_domain == root.trust_domain and not inter.is_root and inter.root is root
    inter.certificate.verify_directly_issued_by(root.certificate)
    assert inter.chain_pem == inter.cert_pem
    assert inter.intermediate_pems == [inter.cert_pem]
    assert inter.root_pem == root.cert_pem
    leaf = inter.issue(uri=consul_service_uri(root.trust_domain, "web"))
    leaf.certificate.verify_directly_issued_by(inter.certificate)
    assert leaf.chain_pem == leaf.cert_pem + inter.cert_pem
    deeper = inter.intermediate()
    assert deeper.chain_pem == deeper.cert_pem + inter.cert_pem
    # Only the root is trusted: the chain written by IssuedCert.write must suffice.
    server = inter.issue(ips=["127.0.0.1"])
    client = inter.issue(uri=leaf.uri, ips=())
    s_cert, s_key = server.write(tmp_path / "s")
    c_cert, c_key = client.write(tmp_path / "c")
    ca_path = inter.write_ca(tmp_path / "root.pem")
    assert ca_path.read_text() == root.cert_pem
    peer = _handshake(s_cert, s_key, c_cert, c_key, ca_path)
    assert ("URI", leaf.uri) in peer["subjectAltName"]
