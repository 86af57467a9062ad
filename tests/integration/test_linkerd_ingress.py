"""Linkerd ingress mode through real gunicorn and raw sockets: what the gateway's own
Linkerd proxy would receive. No Kubernetes API here (discovery fails and is reported):
routing must not depend on it, since the proxy picks the pods."""

from __future__ import annotations

import base64
import time

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.raw_client import RawResponse, echoed_get
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

TRACE = "463ac35c9f6413ad48485a3953bb6124"
SPAN = "a2fb4a1d1a96d312"


@pytest.fixture(scope="module")
def echo():
    with Upstream("echo") as up:
        yield up


def linkerd_config(echo, legacy: bool = True) -> dict:
    return {
        "server": {"timeout": "3s"},
        "serviceMesh": {
            "enabled": True,
            "type": "linkerd",
            "namespace": "shop",
            "linkerd": {
                "legacyHeaders": legacy,
                "controlPlaneAddr": "linkerd-controller-api.linkerd.svc:8085",
            },
            # Outside a cluster, no kubeconfig: discovery can only fail.
            "kubeconfig": None,
        },
        "services": [
            {"name": "orders", "basePath": "/orders", "targets": [echo.url]},
            {
                "name": "pay",
                "basePath": "/pay",
                "targets": [echo.url],
                "meshService": "payments",
                "namespace": "billing",
                "port": 8080,
                "identity": "payments",
                "timeout": "1500ms",
            },
        ],
    }


@pytest.fixture(scope="module")
def gw(echo):
    gateway = GatewayProcess(linkerd_config(echo), env={"KUBECONFIG": "/nonexistent/kubeconfig"})
    try:
        yield gateway.start()
    finally:
        gateway.cleanup()


def send(gw, *headers: str, path: str = "/orders/x") -> tuple[RawResponse, dict[str, str]]:
    return echoed_get(gw.port, *headers, path=path, host="gw.example")


def test_dst_override_per_service_and_client_copies_never_pass(gw):
    _, seen = send(
        gw,
        "L5D-Dst-Override: kube-apiserver.default.svc.cluster.local:443",
        "l5d-require-id: attacker.evil.serviceaccount.identity.linkerd.cluster.local",
        "L5d-Ctx-Trace: AAAA",
        "l5d-reqid: forged",
        "l5d-sample: 1.0",
        "l5d-anything: x",
    )
    assert seen["l5d-dst-override"] == "orders.shop.svc.cluster.local:" + seen["host"].split(":")[1]
    assert "l5d-require-id" not in seen  # orders names no identity
    assert "l5d-sample" not in seen and "l5d-anything" not in seen
    assert seen["l5d-reqid"] != "forged"
    _, pay = send(gw, "L5D-DST-OVERRIDE: evil:1", "L5D-REQUIRE-ID: evil", path="/pay/x")
    assert pay["l5d-dst-override"] == "payments.billing.svc.cluster.local:8080"
    assert pay["l5d-require-id"] == (
        "payments.billing.serviceaccount.identity.linkerd.cluster.local"
    )


def test_legacy_context_headers_agree_with_the_b3_ids(gw):
    before = time.time_ns()
    resp, seen = send(
        gw,
        f"X-B3-TraceId: {TRACE}",
        f"X-B3-SpanId: {SPAN}",
        "X-B3-Sampled: 1",
        "X-Request-Id: order-42",
        path="/pay/x",
    )
    assert seen["l5d-reqid"] == "order-42" == resp.header("X-Request-Id")
    start, deadline = (int(v) for v in seen["l5d-ctx-deadline"].split(" "))
    assert before - 5_000_000_000 < start <= time.time_ns()
    assert deadline - start == 1_500_000_000  # the pay route's timeout
    raw = base64.b64decode(seen["l5d-ctx-trace"])
    assert raw[0:8].hex() == seen["x-b3-spanid"] != SPAN
    assert raw[8:16].hex() == SPAN == seen["x-b3-parentspanid"]
    assert raw[16:24].hex() + raw[32:40].hex() == TRACE[16:] + TRACE[:16]
    assert seen["x-b3-traceid"] == TRACE
    assert int.from_bytes(raw[24:32], "big") == 6


def test_routing_does_not_wait_for_kubernetes_and_the_failure_is_reported(gw):
    assert gw.admin("mesh").json()["ready"] is True
    services = {s["name"]: s for s in gw.admin("services").json()["services"]}
    pay = services["pay"]["sidecar"]
    assert pay["mode"] == "linkerd-ingress"
    assert pay["dstOverride"] == "payments.billing.svc.cluster.local:8080"
    assert pay["loadBalancing"] == "linkerd-proxy"
    deadline = time.monotonic() + 10
    error = None
    while time.monotonic() < deadline and not error:
        error = gw.admin("mesh").json().get("lastError")
        time.sleep(0.1)
    assert error and "kubeconfig" in error.lower(), error
    log = gw.log()
    assert "Linkerd 2 ignores" in log and "public controller API was removed" in log


def test_legacy_headers_off(echo):
    with GatewayProcess(
        linkerd_config(echo, legacy=False), env={"KUBECONFIG": "/nonexistent/kubeconfig"}
    ) as gw:
        _, seen = send(gw)
        assert not {"l5d-reqid", "l5d-ctx-deadline", "l5d-ctx-trace"} & set(seen)
        assert seen["l5d-dst-override"].startswith("orders.shop.svc.cluster.local:")
        assert "Linkerd 2 ignores" not in gw.log()
