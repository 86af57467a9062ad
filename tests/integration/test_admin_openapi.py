"""Every admin answer of real gateways matches ``GET /admin/openapi.json``.

Gateways of several kinds (mesh none with every traffic feature and a dead target,
Consul Connect with the Consul stand-in and an ACL token, Linkerd with the kube-apiserver
stand-in, a ServiceProfile and the tap on, Istio sidecar mode, one without an admin
token) answer each documented operation, with each status that can be provoked; each
body, and each NDJSON line of a tap, is validated against the schema the document
(fetched from the gateway itself) gives for that path, method and status. The last test
checks that every documented operation and status was seen, bar the ones only the unit
test (409) or nothing safe (503) can provoke."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time

import pytest
import requests

from tests.doubles.consul import ConsulDouble
from tests.doubles.kube_apiserver import KubeApiServerDouble, SliceEndpoint
from tests.doubles.pki import CertificateAuthority
from tests.integration.consul_helpers import consul_config, eventually
from tests.integration.test_istio_sidecar import istio_sidecar_config
from tests.support.gateway import ADMIN_TOKEN, started
from tests.support.upstream import Upstream, free_port
from tests.unit.test_admin_openapi import AnswerChecker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CONSUL_ACL = "consul-acl-secret-77d1"
KUBE_TOKEN = "kube-token-openapi-5e2a"
REDIS_PASSWORD = "redis-pass-91c3"
TRACING_KEY = "otlp-key-0b7f"
#: Answers no gateway here can give: 409 needs a worker outside gunicorn (the unit test
#: provokes it), 503 a broken state dir.
NOT_PROVOKED = {("/admin/reload", "post", "409"), ("/admin/tap", "get", "503")}


@pytest.fixture(scope="module")
def checker(static_gw) -> AnswerChecker:
    """Checks answers against the document the gateway itself serves."""
    r = requests.get(static_gw.url + "/admin/openapi.json", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    return AnswerChecker(r.json())


@pytest.fixture(scope="module")
def upstreams():
    with Upstream("a") as a, Upstream("b") as b:
        yield a, b


@pytest.fixture(scope="module")
def static_gw(upstreams):
    a, b = upstreams
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connect failures
    runtime = tempfile.TemporaryDirectory(prefix="odin-openapi-runtime-")
    os.chmod(runtime.name, 0o700)
    config = {
        "server": {"timeout": "5s"},
        "monitoring": {"enabled": True},
        "rateLimit": {"storage": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"},
        "tracing": {"enabled": False, "headers": {"x-api-key": TRACING_KEY}},
        "services": [
            {
                "name": "shop",
                "basePath": "/shop",
                "targets": [a.url, dead],
                "retries": 1,
                "tryTimeout": "2s",
                "retryPolicy": {"retryOn": [503, "connect-failure"]},
                "headers": {"Authorization": "Bearer upstream-secret", "X-Plain": "shown"},
                "groups": {"canary": {"targets": [b.url]}},
                "split": {
                    "groups": [
                        {"group": "default", "weight": 80},
                        {"group": "canary", "weight": 20},
                    ],
                    "sticky": {"header": "X-User"},
                    "override": {"header": "X-Canary", "values": {"yes": "canary"}},
                },
                "rules": [
                    {"match": {"path": {"prefix": "/shop/down"}}, "direct": {"status": 503}},
                    {
                        "match": {"headers": [{"name": "X-Session", "exact": "s"}]},
                        "group": "canary",
                        "rewritePrefix": {"from": "/shop", "to": "/v2"},
                        "requestHeaders": {"set": {"X-R": "1"}, "remove": ["X-I"]},
                        "rateLimit": {"requests": 100, "per": "minute"},
                    },
                ],
                "circuitBreaker": {
                    "consecutiveFailures": 2,
                    "openFor": "30s",
                    "maxConcurrent": 50,
                    "failureRate": {"threshold": 90, "minRequests": 50},
                },
                "passiveHealth": {"consecutiveFailures": 1, "ejectFor": "30s"},
                "rateLimit": {"requests": 1000, "per": "second", "burst": 10},
            },
            {
                "name": "plain",
                "basePath": "/plain",
                "targets": [a.url, f"http://127.0.0.1:{free_port()}"],
                "panicThreshold": 50,
                "healthCheck": {"path": "/", "interval": "200ms", "timeout": "150ms"},
            },
        ],
    }
    # The storage Redis is unreachable: failOpen (default) lets requests through.
    gw = started(config, workers=1, env={"RUNTIME_DIRECTORY": runtime.name})
    yield gw
    gw.cleanup()
    runtime.cleanup()


@pytest.fixture(scope="module")
def consul_gw(upstreams):
    a, b = upstreams
    ca = CertificateAuthority()
    with ConsulDouble(ca=ca, acl_tokens={CONSUL_ACL: "write"}) as consul:
        consul.register("web", id="web-a", port=a.port, connect_proxy_port=a.port)
        consul.register(
            "web", id="web-b", port=b.port, connect_proxy_port=b.port, status="critical"
        )
        config = consul_config(
            consul,
            [{"name": "web", "basePath": "/web", "circuitBreaker": {"consecutiveFailures": 3}}],
            enableConnect=True,
            token=CONSUL_ACL,
        )
        config["serviceMesh"]["mtlsEnabled"] = True
        gw = started(config, workers=1)
        yield gw
        gw.cleanup()


ORDERS_PROFILE = {
    "routes": [
        {"name": "slow", "condition": {"pathRegex": "/orders/slow/.*"}, "timeout": "300ms"},
        {
            "name": "retry gets",
            "condition": {"all": [{"method": "GET"}, {"pathRegex": "/orders/.*"}]},
            "isRetryable": True,
        },
    ],
    "retryBudget": {"retryRatio": 0.2, "minRetriesPerSecond": 5, "ttl": "10s"},
}


@pytest.fixture(scope="module")
def linkerd_gw(upstreams):
    a, _ = upstreams
    with KubeApiServerDouble(tokens={KUBE_TOKEN: "system:serviceaccount:shop:odin"}) as kube:
        kube.upsert_service("shop", "orders", ports=[{"name": "http", "port": 80}])
        kube.upsert_service(
            "shop", "pay", ports=[80], annotations={"timeout.linkerd.io/request": "2s"}
        )
        kube.upsert_endpoint_slice(
            "shop",
            "orders-1",
            "orders",
            endpoints=[
                SliceEndpoint(["10.1.0.1"], ready=True, zone="eu-1a", node_name="n1"),
                SliceEndpoint(["10.1.0.2"], ready=False, serving=True, terminating=True),
            ],
            ports=[{"name": "http", "port": 8080}],
        )
        kube.upsert_service_profile("shop", "orders.shop.svc.cluster.local", ORDERS_PROFILE)
        with tempfile.TemporaryDirectory(prefix="odin-openapi-kube-") as tmp:
            kubeconfig = kube.write_kubeconfig(os.path.join(tmp, "kubeconfig"), KUBE_TOKEN, "shop")
            config = {
                "server": {"timeout": "5s"},
                "serviceMesh": {
                    "enabled": True,
                    "type": "linkerd",
                    "namespace": "shop",
                    "kubeconfig": str(kubeconfig),
                    "linkerd": {"enableTap": True, "maxTaps": 1},
                },
                "services": [
                    {"name": "orders", "basePath": "/orders", "targets": [a.url]},
                    {"name": "pay", "basePath": "/pay", "targets": [a.url], "identity": "pay"},
                ],
            }
            env = {"KUBECONFIG": "/nonexistent/kubeconfig", "KUBERNETES_SERVICE_HOST": ""}
            gw = started(config, workers=1, env=env)
            yield gw
            gw.cleanup()


@pytest.fixture(scope="module")
def istio_gw(upstreams):
    a, _ = upstreams
    config = istio_sidecar_config(
        [
            {"name": "web", "basePath": "/web", "port": 8080},
            {"name": "app", "basePath": "/app", "targets": [a.url]},
        ]
    )
    gw = started(config, workers=1)
    yield gw
    gw.cleanup()


@pytest.fixture(scope="module")
def disabled_gw(upstreams):
    a, _ = upstreams
    gw = started({"admin": {}, "services": [{"name": "w", "basePath": "/w", "targets": [a.url]}]})
    yield gw
    gw.cleanup()


def call(checker, gw, method: str, path: str, template: str | None = None, **kw):
    """``method path`` on ``gw`` with the token (unless ``headers`` says otherwise),
    validated against the document's ``template`` (default: ``path``)."""
    kw.setdefault("headers", AUTH)
    r = requests.request(method, gw.url + path, timeout=10, **kw)
    checker.check_response(template or path.split("?")[0], method.lower(), r)
    return r


TOKEN_OPERATIONS = [
    ("GET", "/admin/services", None),
    ("GET", "/admin/services/shop", "/admin/services/{name}"),
    ("GET", "/admin/routes", None),
    ("GET", "/admin/config", None),
    ("GET", "/admin/mesh", None),
    ("POST", "/admin/mesh/refresh", None),
    ("GET", "/admin/tap", None),
    ("GET", "/admin/reload", None),
    ("POST", "/admin/reload", None),
    ("GET", "/admin/stats", None),
    ("GET", "/admin/openapi.json", None),
]
DASHBOARD = [
    ("GET", "/admin/", None),
    ("GET", "/admin/ui/app.js", "/admin/ui/{name}"),
    ("GET", "/admin/ui/app.css", "/admin/ui/{name}"),
]


def test_the_served_document_describes_itself(static_gw, checker):
    r = call(checker, static_gw, "GET", "/admin/openapi.json")
    assert r.json() == checker.document


def test_static_gateway_with_every_traffic_feature(static_gw, checker, upstreams):
    session = requests.Session()
    for i in range(12):  # the dead target: ejection and an open circuit
        session.get(f"{static_gw.url}/shop/x", headers={"X-User": str(i)}, timeout=10)
    session.get(f"{static_gw.url}/shop/x", headers={"X-Canary": "yes"}, timeout=10)
    session.get(f"{static_gw.url}/shop/x", headers={"X-Session": "s"}, timeout=10)
    session.get(f"{static_gw.url}/shop/down", timeout=10)

    def checked_failing() -> bool:
        doc = call(checker, static_gw, "GET", "/admin/services").json()
        plain = next(s for s in doc["services"] if s["name"] == "plain")
        return any(t.get("check", {}).get("status") == "failing" for t in plain["targets"])

    eventually(checked_failing, timeout=10, what="the health check fails the dead target")
    doc = call(checker, static_gw, "GET", "/admin/services").json()
    shop = next(s for s in doc["services"] if s["name"] == "shop")
    dead = next(t for t in shop["targets"] if t["port"] != upstreams[0].port)
    assert dead["passive"]["ejected"] or dead["circuit"]["state"] != "closed", dead
    assert shop["ejected"] or shop["openCircuits"]
    assert "concurrency" in shop
    detail = call(checker, static_gw, "GET", "/admin/services/shop", "/admin/services/{name}")
    assert detail.json()["policy"]["routes"][0]["retryable"] is True
    # A backend group, as /admin/services lists it, can be fetched by that name.
    canary = call(
        checker, static_gw, "GET", "/admin/services/shop/canary", "/admin/services/{name}"
    )
    assert canary.status_code == 200 and canary.json()["name"] == "shop/canary"
    missing = call(checker, static_gw, "GET", "/admin/services/nope", "/admin/services/{name}")
    assert missing.status_code == 404
    shop_route, plain_route = call(checker, static_gw, "GET", "/admin/routes").json()["routes"]
    assert {"split", "rules", "rateLimit", "circuitBreaker"} <= set(shop_route)
    assert "healthCheck" in plain_route
    assert sum(g["requests"] for g in shop_route["split"]["groups"]) > 0
    config = call(checker, static_gw, "GET", "/admin/config")
    for secret in (ADMIN_TOKEN, REDIS_PASSWORD, TRACING_KEY, "upstream-secret"):
        assert secret not in config.text
    mesh = call(checker, static_gw, "GET", "/admin/mesh").json()
    assert mesh["type"] == "none" and mesh["healthChecks"]["endpoints"]["failing"] >= 1
    assert call(checker, static_gw, "POST", "/admin/mesh/refresh").status_code == 202
    assert call(checker, static_gw, "GET", "/admin/tap").status_code == 404
    stats = call(checker, static_gw, "GET", "/admin/stats").json()
    assert stats["services"]["shop"]["requests"] >= 15
    assert call(checker, static_gw, "GET", "/admin/reload").json()["served"]["generation"] == 1


def test_reload_refused_for_an_invalid_file(static_gw, checker):
    with open(static_gw.config_path) as fh:
        good = fh.read()
    static_gw.write_config("services: [{name: x}]\nbogus: 1\n")
    try:
        r = call(checker, static_gw, "POST", "/admin/reload")
    finally:
        static_gw.write_config(good)
    assert r.status_code == 422 and r.json()["problems"]


def test_without_the_token_every_protected_operation_is_401(static_gw, checker):
    for method, path, template in TOKEN_OPERATIONS:
        r = call(checker, static_gw, method, path, template, headers={})
        assert r.status_code == 401, (method, path)
    r = call(checker, static_gw, "GET", "/admin/routes", headers={"Authorization": "Bearer x"})
    assert r.status_code == 401


def test_the_dashboard_needs_no_token(static_gw, checker):
    for method, path, template in DASHBOARD:
        assert call(checker, static_gw, method, path, template, headers={}).status_code == 200
    r = call(checker, static_gw, "GET", "/admin/ui/nope.js", "/admin/ui/{name}", headers={})
    assert r.status_code == 404


def test_admin_disabled_is_403_everywhere(disabled_gw, checker):
    for method, path, template in TOKEN_OPERATIONS + DASHBOARD:
        r = call(checker, disabled_gw, method, path, template)
        assert r.status_code == 403, (method, path)


def test_consul_connect_gateway(consul_gw, checker):
    def both_shown() -> bool:
        doc = call(checker, consul_gw, "GET", "/admin/services").json()
        seen = {t["serviceId"]: t["status"] for t in doc["services"][0]["targets"]}
        return seen == {"web-a-sidecar-proxy": "passing", "web-b-sidecar-proxy": "critical"}

    eventually(both_shown, what="both instances discovered")
    call(checker, consul_gw, "GET", "/admin/services/web", "/admin/services/{name}")
    call(checker, consul_gw, "GET", "/admin/routes")
    config = call(checker, consul_gw, "GET", "/admin/config")
    assert config.json()["serviceMesh"]["consul"]["token"] == "<redacted>"
    assert CONSUL_ACL not in config.text
    mesh = call(checker, consul_gw, "GET", "/admin/mesh").json()
    assert mesh["type"] == "consul" and mesh["certificate"]["spiffeId"].startswith("spiffe://")
    call(checker, consul_gw, "POST", "/admin/mesh/refresh")
    call(checker, consul_gw, "GET", "/admin/stats")
    assert call(checker, consul_gw, "GET", "/admin/tap").status_code == 404


def test_istio_sidecar_gateway_and_a_reload_taken(istio_gw, checker):
    services = call(checker, istio_gw, "GET", "/admin/services").json()["services"]
    assert {s["name"]: s.get("sidecar", {}).get("mode") for s in services} == {
        "web": "istio-sidecar",
        "app": None,
    }
    call(checker, istio_gw, "GET", "/admin/services/web", "/admin/services/{name}")
    call(checker, istio_gw, "GET", "/admin/routes")
    call(checker, istio_gw, "GET", "/admin/mesh")
    call(checker, istio_gw, "GET", "/admin/config")
    r = call(checker, istio_gw, "POST", "/admin/reload")
    assert r.status_code == 202 and r.json()["changed"] is False
    eventually(
        lambda: call(checker, istio_gw, "GET", "/admin/reload").json()["served"]["generation"] == 2,
        timeout=20,
        what="the reload served",
    )


def _tap_lines(gw, query: str, traffic_path: str, want: int) -> list[dict]:
    """The NDJSON lines of ``/admin/tap?<query>`` while a thread sends traffic."""
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + 15
        while not stop.is_set() and time.monotonic() < deadline:
            requests.get(gw.url + traffic_path, timeout=5)
            time.sleep(0.05)

    thread = threading.Thread(target=traffic, daemon=True)
    lines = []
    with requests.get(f"{gw.url}/admin/tap?{query}", headers=AUTH, stream=True, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        thread.start()
        try:
            for raw in r.iter_lines():
                if raw:
                    lines.append(json.loads(raw))
                if len(lines) >= want + 20:  # bounded whatever the stream does
                    break
        finally:
            stop.set()
            thread.join(10)
    return lines


def test_linkerd_gateway_with_a_service_profile_and_the_tap(linkerd_gw, checker):
    def discovered() -> bool:
        doc = call(checker, linkerd_gw, "GET", "/admin/services/orders", "/admin/services/{name}")
        body = doc.json()
        return len(body["targets"]) == 2 and body["policy"]["source"].startswith("serviceprofile")

    eventually(discovered, timeout=20, what="the slices and the profile")
    services = call(checker, linkerd_gw, "GET", "/admin/services").json()["services"]
    assert all(s["sidecar"]["mode"] == "linkerd-ingress" for s in services)
    call(checker, linkerd_gw, "GET", "/admin/services/pay", "/admin/services/{name}")
    call(checker, linkerd_gw, "GET", "/admin/routes")
    mesh = call(checker, linkerd_gw, "GET", "/admin/mesh").json()
    assert mesh["client"]["watches"]

    lines = _tap_lines(linkerd_gw, "service=orders&limit=3", "/orders/x", 3)
    events = [line for line in lines if "requestId" in line]
    assert len(events) == 3 and all(e["service"] == "orders" for e in events)
    for line in lines:
        checker.check("/admin/tap", "get", 200, line, "application/x-ndjson")

    bad = call(checker, linkerd_gw, "GET", "/admin/tap?limit=0")
    assert bad.status_code == 400 and bad.json()["parameter"] == "limit"
    with socket.create_connection(("127.0.0.1", linkerd_gw.port), timeout=10) as held:
        auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
        held.sendall(f"GET /admin/tap HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        assert held.recv(12).startswith(b"HTTP/1.1 200")  # maxTaps 1 is taken now
        r = call(checker, linkerd_gw, "GET", "/admin/tap")
        assert r.status_code == 429
    call(checker, linkerd_gw, "GET", "/admin/stats")


def test_every_documented_operation_and_status_was_seen(checker):
    documented = {
        (path, method, status)
        for path, item in checker.document["paths"].items()
        for method, op in item.items()
        for status in op["responses"]
    }
    assert documented - checker.covered == NOT_PROVOKED
