"""Kubernetes discovery through real gunicorn: the kube-apiserver stand-in over HTTPS,
two workers sharing what the leader watches, for Linkerd ingress mode (shown only) and
Istio direct mode with ``discovery: kubernetes`` (routed, over mTLS), and every Linkerd
example of the spec."""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
import requests
import yaml

from tests.doubles.kube_apiserver import KubeApiServerDouble, SliceEndpoint
from tests.doubles.pki import CertificateAuthority
from tests.integration.consul_helpers import eventually
from tests.support.gateway import one_session_per_worker
from tests.support.upstream import Upstream, mtls_server_context

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "gw-token-7f3a"
SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "spec")
NO_KUBE_ENV = {"KUBECONFIG": "/nonexistent/kubeconfig", "KUBERNETES_SERVICE_HOST": ""}


@pytest.fixture
def kube():
    with KubeApiServerDouble(tokens={TOKEN: "system:serviceaccount:shop:odin"}) as server:
        yield server


def orders_slices(kube, ns: str = "shop", *, b_ready: bool = True) -> None:
    kube.upsert_service(ns, "orders", ports=[{"name": "http", "port": 80, "targetPort": 8080}])
    kube.upsert_endpoint_slice(
        ns,
        "orders-abc",
        "orders",
        endpoints=[
            SliceEndpoint(["10.1.0.1"], ready=True, zone="eu-1a", node_name="node-a"),
            SliceEndpoint(
                ["10.1.0.2"],
                ready=b_ready,
                serving=True,
                terminating=not b_ready,
                zone="eu-1b",
                node_name="node-b",
            ),
        ],
        ports=[{"name": "http", "port": 8080}],
    )


def targets_by_address(session: requests.Session, gw, name: str) -> dict[str, dict]:
    doc = session.get(
        gw.url + "/admin/services",
        headers={"Authorization": f"Bearer {gw.config['admin']['token']}"},
        timeout=10,
    ).json()
    svc = next(s for s in doc["services"] if s["name"] == name)
    return {t["address"]: t for t in svc["targets"]}


def test_linkerd_shows_slices_on_every_worker_follows_changes_and_survives_an_outage(
    kube, tmp_path, gateway_factory, upstream
):
    orders_slices(kube)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN, namespace="shop")
    gw = gateway_factory(
        {
            "serviceMesh": {
                "enabled": True,
                "type": "linkerd",
                "namespace": "shop",
                "kubeconfig": str(kubeconfig),
                "refreshInterval": "30s",
            },
            "services": [{"name": "orders", "basePath": "/orders", "targets": [upstream.url]}],
        },
        workers=2,
        env=NO_KUBE_ENV,
    )
    sessions = one_session_per_worker(gw)

    def shown(want_b_status: str) -> bool:
        for session in sessions.values():
            seen = targets_by_address(session, gw, "orders")
            if set(seen) != {"10.1.0.1", "10.1.0.2"} or seen["10.1.0.2"]["status"] != want_b_status:
                return False
        return True

    eventually(lambda: shown("passing"), what="the slices on both workers")
    a = targets_by_address(sessions[next(iter(sessions))], gw, "orders")["10.1.0.1"]
    assert (a["port"], a["locality"], a["node"], a["healthy"]) == (8080, "eu-1a", "node-a", True)
    assert a["active"] is False  # shown, never picked: the Linkerd proxy picks
    r = requests.get(gw.url + "/orders/x", timeout=10)
    assert r.status_code == 200 and r.json()["server"] == upstream.name

    # A pod starts terminating: every worker shows it draining within 2 s.
    orders_slices(kube, b_ready=False)
    started = time.monotonic()
    eventually(lambda: shown("draining"), timeout=5, what="draining on both workers")
    assert time.monotonic() - started < 2.0
    b = targets_by_address(sessions[next(iter(sessions))], gw, "orders")["10.1.0.2"]
    assert b["healthy"] is False

    # The API server goes away: the last view stays, the error is on /admin/mesh.
    kube.go_down()
    eventually(lambda: gw.admin("mesh").json()["lastError"], what="the outage reported")
    assert shown("draining")
    assert requests.get(gw.url + "/orders/x", timeout=10).status_code == 200
    assert TOKEN not in gw.admin("mesh").text and TOKEN not in gw.log()
    kube.come_up()
    orders_slices(kube, b_ready=True)
    eventually(lambda: shown("passing"), timeout=40, what="recovered after the outage")


def test_istio_direct_mode_routes_to_slice_endpoints_over_mtls(kube, tmp_path, gateway_factory):
    td = "cluster.local"
    ca = CertificateAuthority(trust_domain=td)
    certs = tmp_path / "certs"
    ca.issue(uri=f"spiffe://{td}/ns/shop/sa/odin-gw").write(certs, "cert-chain.pem", "key.pem")
    ca.write_ca(certs / "root-cert.pem")
    ca.issue(uri=f"spiffe://{td}/ns/shop/sa/orders").write(certs, "orders.pem", "orders.key")
    ca.issue(uri=f"spiffe://{td}/ns/shop/sa/intruder").write(certs, "bad.pem", "bad.key")
    good_ctx = mtls_server_context(
        str(certs / "orders.pem"), str(certs / "orders.key"), str(certs / "root-cert.pem")
    )
    bad_ctx = mtls_server_context(
        str(certs / "bad.pem"), str(certs / "bad.key"), str(certs / "root-cert.pem")
    )
    with Upstream("orders", tls=good_ctx) as good, Upstream("intruder", tls=bad_ctx) as bad:
        kube.upsert_service("shop", "orders", ports=[{"name": "http", "port": 8080}])
        kube.upsert_endpoint_slice(
            "shop",
            "orders-1",
            "orders",
            endpoints=[SliceEndpoint(["127.0.0.1"], ready=True, zone="eu-1a")],
            ports=[{"name": "http", "port": good.port}],
        )
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN, namespace="shop")
        gw = gateway_factory(
            {
                "serviceMesh": {
                    "enabled": True,
                    "type": "istio",
                    "namespace": "shop",
                    "trustDomain": td,
                    "mtlsEnabled": True,
                    "certFile": str(certs / "cert-chain.pem"),
                    "keyFile": str(certs / "key.pem"),
                    "caFile": str(certs / "root-cert.pem"),
                    "kubeconfig": str(kubeconfig),
                    "readyGracePeriod": "10s",
                    "istio": {"injectSidecar": False, "discovery": "kubernetes"},
                },
                "services": [
                    {
                        "name": "orders",
                        "basePath": "/orders",
                        "port": 8080,
                        "identity": "orders",
                        "retries": 0,
                    }
                ],
            },
            env=NO_KUBE_ENV,
        )
        r = requests.get(gw.url + "/orders/x", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["server"] == "orders"
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen["host"] == "orders.shop.svc.cluster.local:8080"
        assert r.json()["peer"]  # the upstream saw our client certificate
        # The slice now points at a peer with another identity: nothing is sent to it.
        kube.upsert_endpoint_slice(
            "shop",
            "orders-1",
            "orders",
            endpoints=[SliceEndpoint(["127.0.0.1"], ready=True)],
            ports=[{"name": "http", "port": bad.port}],
        )

        def refused() -> str | None:
            r = requests.get(gw.url + "/orders/x", timeout=10)
            return r.text if r.status_code == 502 else None

        text = eventually(refused, what="the intruder refused")
        assert "intruder" in text and "spiffe://cluster.local/ns/shop/sa/orders" in text
        assert bad.requests == 0


def _mesh_type(path: str) -> str | None:
    with open(path) as fh:
        return (yaml.safe_load(fh).get("serviceMesh") or {}).get("type")


LINKERD_EXAMPLES = sorted(
    p for p in glob.glob(os.path.join(SPEC, "*.yaml")) if _mesh_type(p) == "linkerd"
)


def test_the_spec_has_three_linkerd_examples():
    assert [os.path.basename(p) for p in LINKERD_EXAMPLES] == [
        "example2-linkerd-tap.yaml",
        "kubernetes-linkerd.yaml",
        "linkerd.yaml",
    ]


@pytest.mark.parametrize("path", LINKERD_EXAMPLES, ids=os.path.basename)
def test_linkerd_example_runs(path, kube, tmp_path, gateway_factory):
    with open(path) as fh:
        config = yaml.safe_load(fh)
    mesh = config["serviceMesh"]
    ns = mesh.get("namespace", "default")
    with Upstream("cluster") as app:
        services = config.get("services") or [{"name": "web", "basePath": "/web"}]
        for svc in services:
            # The cluster's Service, played by a local upstream (the Linkerd proxy would
            # intercept the connection and route by l5d-dst-override).
            svc["targets"] = [app.url]
        config["services"] = services
        config["admin"] = {"token": "admin-token-for-tests-0123456789"}
        name = services[0]["name"]
        kube.upsert_service(ns, name, ports=[{"name": "http", "port": 80}])
        kube.upsert_endpoint_slice(
            ns, f"{name}-1", name, endpoints=[SliceEndpoint(["10.2.0.1"])], ports=[{"port": 80}]
        )
        mesh["kubeconfig"] = str(kube.write_kubeconfig(tmp_path / "kc", TOKEN, namespace=ns))
        gw = gateway_factory(config, env=NO_KUBE_ENV)
        base = services[0]["basePath"].rstrip("/")
        r = requests.get(gw.url + base + "/x", timeout=10)
        assert r.status_code == 200, r.text
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen["l5d-dst-override"] == f"{name}.{ns}.svc.cluster.local:{app.port}"
        eventually(
            lambda: (
                "10.2.0.1"
                in {t["address"] for t in gw.admin("services").json()["services"][0]["targets"]}
            ),
            what="the slice shown",
        )
        log = gw.log()
        if mesh.get("linkerd", {}).get("controlPlaneAddr"):
            assert "public controller API was removed" in log
        if mesh.get("certFile"):
            assert "certFile/keyFile/caFile are not used" in log
        if mesh.get("linkerd", {}).get("enableTap"):
            headers = {"Authorization": f"Bearer {config['admin']['token']}"}
            with requests.get(
                gw.url + "/admin/tap?limit=1&path=" + base, headers=headers, stream=True, timeout=10
            ) as tap:
                assert tap.status_code == 200
                time.sleep(0.7)  # the workers notice the new tap
                assert requests.get(gw.url + base + "/y", timeout=10).status_code == 200
                lines = [json.loads(x) for x in tap.iter_lines() if x]
            events = [e for e in lines if "requestId" in e]
            assert events and events[0]["path"] == base + "/y" and events[0]["status"] == 200
        else:
            r = requests.get(
                gw.url + "/admin/tap",
                headers={"Authorization": f"Bearer {config['admin']['token']}"},
                timeout=10,
            )
            assert r.status_code == 404
