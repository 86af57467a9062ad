"""Istio's standard metrics from a real gateway: two workers, one scrape, Istio's labels."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import one_session_per_worker
from tests.support.upstream import free_port

pytestmark = pytest.mark.integration

PER_WORKER = 15
BODY = b"x" * 100
ENV = {  # as Istio's injection template sets them
    "POD_NAME": "odin-gateway-7f8d9c6b4d-x2kqp",
    "POD_NAMESPACE": "edge",
    "INSTANCE_IP": "127.0.0.1",
    "ISTIO_METAJSON_LABELS": '{"app": "odin", "version": "v1"}',
    "ISTIO_META_CLUSTER_ID": "cluster-1",
}


def scrape(gw) -> dict[str, list]:
    text = requests.get(gw.url + "/metrics", timeout=5).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def total(found: dict, family: str, sample: str, **labels) -> float:
    return sum(
        s.value
        for s in found.get(family, ())
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def settled(gw, family: str, sample: str, expected: float, **labels) -> dict:
    """A scrape once ``sample`` reaches ``expected`` (or after 5 s): a request is counted
    when its response is closed, just after the client has read it."""
    deadline = time.monotonic() + 5
    while True:
        found = scrape(gw)
        if total(found, family, sample, **labels) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_istio_standard_metrics_across_workers(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "monitoring": {"enabled": True},
            "services": [
                {
                    "name": "orders",
                    "basePath": "/orders",
                    "targets": [upstream.url],
                    "meshService": "orders",
                },
                {
                    "name": "pay",
                    "basePath": "/pay",
                    "targets": [f"http://127.0.0.1:{free_port()}"],  # nothing listens
                    "meshService": "payments",
                    "retries": 0,
                },
            ],
            "serviceMesh": {
                "enabled": True,
                "type": "istio",
                "namespace": "shop",
                "istio": {"enableTelemetry": True},
                # Istio discovery is not built: ready on the static targets at once.
                "readyGracePeriod": 0,
            },
        },
        workers=2,
        env=ENV,
    )
    sessions = one_session_per_worker(gw)
    sent = 0
    for pid, session in sessions.items():
        for _ in range(PER_WORKER):
            r = session.post(gw.url + "/orders/x", data=BODY, timeout=10)
            assert r.status_code == 200
            sent += len(r.content)
        assert session.get(gw.url + "/health", timeout=5).json()["pid"] == pid
    first = next(iter(sessions.values()))
    assert first.get(gw.url + "/pay/x", timeout=10).status_code == 502
    assert first.get(gw.url + "/nowhere", timeout=10).status_code == 404
    for session in sessions.values():
        session.close()

    n = 2 * PER_WORKER
    # The response size is each observation's last write: all n + 2 are complete then.
    found = settled(gw, "istio_response_bytes", "istio_response_bytes_count", n + 2)
    orders = {"destination_service": "orders.shop.svc.cluster.local", "response_code": "200"}
    ok = [s for s in found["istio_requests"] if s.labels["response_code"] == "200"]
    assert len(ok) == 1, ok  # one series: the workers' samples are merged
    assert ok[0].value == n
    assert ok[0].labels == {
        "reporter": "source",
        "source_workload": "odin-gateway",
        "source_workload_namespace": "edge",
        "source_principal": "unknown",
        "source_app": "odin",
        "source_version": "v1",
        "source_canonical_service": "odin",
        "source_canonical_revision": "v1",
        "source_cluster": "cluster-1",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_service": "orders.shop.svc.cluster.local",
        "destination_service_name": "orders",
        "destination_service_namespace": "shop",
        "destination_canonical_service": "unknown",
        "destination_canonical_revision": "latest",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_flags": "-",
        "connection_security_policy": "unknown",
        "response_code": "200",
        "grpc_response_status": "",
    }

    def hist(name: str, suffix: str, **labels) -> float:
        return total(found, name, f"{name}_{suffix}", **{**orders, **labels})

    duration = "istio_request_duration_milliseconds"
    assert hist(duration, "count") == n
    assert 0 < hist(duration, "sum") < n * 10_000  # milliseconds, not seconds
    assert hist(duration, "bucket", le="+Inf") == n
    assert hist("istio_request_bytes", "count") == n
    assert hist("istio_request_bytes", "sum") == n * len(BODY)
    assert hist("istio_request_bytes", "bucket", le="100.0") == n
    assert hist("istio_request_bytes", "bucket", le="50.0") == 0
    assert hist("istio_response_bytes", "count") == n
    assert hist("istio_response_bytes", "sum") == sent

    failed = [s for s in found["istio_requests"] if s.labels["response_code"] == "502"]
    assert [(s.labels["response_flags"], s.value) for s in failed] == [("UF", 1)]
    assert failed[0].labels["destination_service"] == "payments.shop.svc.cluster.local"
    assert failed[0].labels["destination_service_name"] == "payments"
    no_route = [s for s in found["istio_requests"] if s.labels["response_code"] == "404"]
    assert [(s.labels["response_flags"], s.value) for s in no_route] == [("NR", 1)]
    assert no_route[0].labels["destination_service"] == "unknown"
    # The gateway's own answers (/health, /metrics) are not mesh traffic.
    codes = {s.labels["response_code"] for s in found["istio_requests"]}
    assert codes == {"200", "404", "502"}
    # The gateway's own metrics are still there beside them.
    assert total(found, "odin_requests", "odin_requests_total", service="orders") == n
