"""Istio's standard metrics: names, types, labels, buckets, response flags, the off switch."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from odin_gw import errors
from odin_gw.app import create_app
from odin_gw.config import build_config
from odin_gw.istio_telemetry import (
    BUCKETS,
    LABELS,
    RESPONSE_FLAGS,
    Destination,
    IstioTelemetry,
    Workload,
    istio_telemetry,
    spiffe_namespace,
)
from odin_gw.mesh.xds_node import NodeIdentity
from odin_gw.proxy.exchange import Exchange

# The tag names of istio/proxy's istio_stats filter (Context::all_tags_).
ISTIO_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
}
ENVOY_DEFAULT_BUCKETS = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
ENVOY_DEFAULT_BUCKETS += [30000, 60000, 300000, 600000, 1800000, 3600000]

GATEWAY = Workload(
    workload="odin-gateway",
    namespace="edge",
    app="odin",
    version="v1",
    canonical_service="odin",
    canonical_revision="v1",
    cluster="Kubernetes",
)
ISTIO = {"enabled": True, "type": "istio", "namespace": "shop"}
PEER_ID = "spiffe://cluster.local/ns/shop/sa/orders"
OUR_ID = "spiffe://cluster.local/ns/edge/sa/odin-gateway"


def telemetry(registry=None) -> IstioTelemetry:
    return IstioTelemetry(
        registry or CollectorRegistry(),
        GATEWAY,
        {"orders": Destination.of("orders", "shop")},
        local_principal=lambda: OUR_ID,
    )


def exchange(service="orders", status=200, error_kind=None, target=None, sent=0) -> Exchange:
    ex = Exchange({"REQUEST_METHOD": "GET"})
    ex.service, ex.status, ex.error_kind, ex.target = service, status, error_kind, target
    ex.response_bytes = sent
    return ex


def families(registry) -> dict:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_names_types_and_labels_are_istios():
    registry = CollectorRegistry()
    tel = telemetry(registry)
    tel.observe(exchange(sent=7), 0.012, {"CONTENT_LENGTH": "5"})
    tel.flush()
    found = families(registry)
    # The parser drops a counter's _total; the exposition says istio_requests_total.
    assert found["istio_requests"].type == "counter"
    assert [s.name for s in found["istio_requests"].samples] == ["istio_requests_total"]
    for name in (
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ):
        assert found[name].type == "histogram"
    assert set(LABELS) == ISTIO_LABELS and len(LABELS) == 25
    sample = found["istio_requests"].samples[0]
    assert set(sample.labels) == ISTIO_LABELS
    assert sample.value == 1


def test_source_side_values():
    labels = telemetry().labels_for("orders", 200)
    assert labels == {
        "reporter": "source",
        "source_workload": "odin-gateway",
        "source_workload_namespace": "edge",
        "source_principal": "unknown",  # no mesh mTLS to this target
        "source_app": "odin",
        "source_version": "v1",
        "source_canonical_service": "odin",
        "source_canonical_revision": "v1",
        "source_cluster": "Kubernetes",
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


def test_buckets_are_envoys_defaults_in_ms_and_bytes():
    assert list(BUCKETS) == ENVOY_DEFAULT_BUCKETS
    registry = CollectorRegistry()
    tel = telemetry(registry)
    tel.observe(exchange(sent=300), 0.0123, {"CONTENT_LENGTH": "20"})
    tel.flush()
    found = families(registry)
    for name, value in (
        ("istio_request_duration_milliseconds", 12.3),
        ("istio_request_bytes", 20),
        ("istio_response_bytes", 300),
    ):
        samples = found[name].samples
        bounds = [float(s.labels["le"]) for s in samples if s.name.endswith("_bucket")]
        assert bounds == [*ENVOY_DEFAULT_BUCKETS, float("inf")]
        total = next(s.value for s in samples if s.name.endswith("_sum"))
        assert total == pytest.approx(value)


@pytest.mark.parametrize(
    ("kind", "flag"),
    [
        (None, "-"),
        ("upstream_unreachable", "UF"),
        ("upstream_tls_error", "UF"),
        ("upstream_identity_mismatch", "UF"),
        ("upstream_timeout", "UT"),
        ("no_healthy_target", "UH"),
        ("no_route", "NR"),
        ("client_disconnected", "DC"),
        ("upstream_protocol_error", "UPE"),
        ("upstream_error", "UC"),
        ("body_interrupted", "UC"),
        ("internal_error", "-"),
        ("something_new", "-"),
    ],
)
def test_response_flags(kind, flag):
    assert telemetry().labels_for("orders", 502, kind)["response_flags"] == flag


def test_every_upstream_error_has_a_flag():
    # A new UpstreamError subclass must say which Envoy flag it is.
    pending = [errors.UpstreamError]
    while pending:
        cls = pending.pop()
        assert cls.code in RESPONSE_FLAGS, cls.__name__
        pending.extend(cls.__subclasses__())


def test_unrouted_404_is_no_route_and_own_answers_are_not_counted():
    registry = CollectorRegistry()
    tel = telemetry(registry)
    tel.observe(exchange(service=None, status=404), 0.001, {})
    tel.observe(exchange(service=None, status=200), 0.001, {})  # /health, /metrics...
    samples = families(registry)["istio_requests"].samples
    assert len(samples) == 1
    labels = samples[0].labels
    assert labels["response_flags"] == "NR" and labels["response_code"] == "404"
    assert labels["destination_service"] == "unknown"
    assert labels["destination_service_name"] == "unknown"


def test_peer_identity_from_mesh_target():
    tel = telemetry()
    target = f"https://10.0.0.7:8443#{PEER_ID}"
    labels = tel.labels_for("orders", 200, None, target)
    assert labels["destination_principal"] == PEER_ID
    assert labels["destination_workload_namespace"] == "shop"
    assert labels["source_principal"] == OUR_ID
    # No connection was made: no peer to name.
    failed = tel.labels_for("orders", 502, "upstream_identity_mismatch", target)
    assert failed["destination_principal"] == "unknown"
    assert failed["source_principal"] == "unknown"


def test_peer_hook_fills_destination_workload():
    peer = Workload(
        workload="orders-v2",
        namespace="ignored-when-the-principal-names-one",
        principal=PEER_ID,
        app="orders",
        version="v2",
        canonical_service="orders",
        canonical_revision="v2",
        cluster="east",
    )
    labels = telemetry().labels_for("orders", 200, peer=peer)
    assert labels["destination_workload"] == "orders-v2"
    assert labels["destination_workload_namespace"] == "shop"
    assert labels["destination_app"] == "orders" and labels["destination_version"] == "v2"
    assert labels["destination_canonical_revision"] == "v2"
    assert labels["destination_cluster"] == "east"


def test_request_bytes_from_content_length():
    registry = CollectorRegistry()
    tel = telemetry(registry)
    for length in ("100", None, "", "12x", "-5"):
        env = {} if length is None else {"CONTENT_LENGTH": length}
        tel.observe(exchange(), 0.001, env)
    tel.flush()
    samples = families(registry)["istio_request_bytes"].samples
    assert next(s.value for s in samples if s.name.endswith("_sum")) == 100
    assert next(s.value for s in samples if s.name.endswith("_count")) == 5


def test_label_sets_are_cached():
    tel = telemetry()
    for _ in range(3):
        tel.observe(exchange(), 0.001, {})
    tel.observe(exchange(status=503), 0.001, {})
    tel.observe(exchange(target="http://10.0.0.1:80"), 0.001, {})  # same labels as the first
    assert len(tel._cache) == 2


def source(env: dict, namespace: str = "shop") -> Workload:
    mesh = build_config({"serviceMesh": {**ISTIO, "namespace": namespace}}, env={}).service_mesh
    return Workload.from_node(NodeIdentity.from_env(mesh, {"INSTANCE_IP": "10.0.0.9", **env}))


def test_source_from_the_node_istiod_sees():
    labels = '{"app": "odin", "app.kubernetes.io/version": "2.1"}'
    env = {
        "POD_NAME": "odin-gateway-7f8d9c6b4d-x2kqp",
        "POD_NAMESPACE": "edge",
        "ISTIO_METAJSON_LABELS": labels,
        "ISTIO_META_CLUSTER_ID": "east",
    }
    gw = source(env)
    assert gw.workload == "odin-gateway"
    assert gw.namespace == "edge"
    assert gw.app == "odin" and gw.version == "unknown"
    assert gw.canonical_service == "odin" and gw.canonical_revision == "2.1"
    assert gw.cluster == "east"
    canonical = '{"service.istio.io/canonical-name": "edge-gw", "version": "v3"}'
    named = source({**env, "ISTIO_META_WORKLOAD_NAME": "gw", "ISTIO_METAJSON_LABELS": canonical})
    assert named.workload == "gw"
    assert named.canonical_service == "edge-gw" and named.canonical_revision == "v3"
    bare = source({"POD_NAME": "web-0"})
    assert (bare.workload, bare.namespace, bare.cluster) == ("web-0", "shop", "Kubernetes")
    assert (bare.app, bare.canonical_service, bare.canonical_revision) == (
        "unknown",
        "web-0",
        "latest",
    )


def test_destination_names():
    assert Destination.of("orders", "shop") == Destination(
        "orders.shop.svc.cluster.local", "orders", "shop"
    )
    assert spiffe_namespace(PEER_ID) == "shop"
    assert spiffe_namespace("unknown") is None


def config(mesh: dict, monitoring: bool = True):
    return build_config(
        {
            "monitoring": {"enabled": monitoring},
            "services": [
                {
                    "name": "orders",
                    "basePath": "/orders",
                    "targets": ["http://127.0.0.1:9"],
                    "meshService": "orders-svc",
                }
            ],
            "serviceMesh": mesh,
        },
        env={},
    )


@pytest.mark.parametrize(
    ("mesh", "monitoring"),
    [
        ({}, True),
        ({"enabled": True, "type": "consul"}, True),
        ({**ISTIO, "enabled": False}, True),
        ({**ISTIO, "istio": {"enableTelemetry": False}}, True),
        (ISTIO, False),  # nowhere to export them
    ],
)
def test_off_registers_nothing(mesh, monitoring):
    app = create_app(config(mesh, monitoring), start=False)
    try:
        gateway = app.extensions["odin"]
        assert istio_telemetry(gateway) is None
        text = gateway.metrics.render()[0].decode()
        assert "istio_" not in text
    finally:
        app.extensions["odin"].stop()


def test_on_through_the_app():
    app = create_app(config({**ISTIO, "istio": {"enableTelemetry": True}}), start=False)
    try:
        gateway = app.extensions["odin"]
        hooks = app.after_request_funcs[None][0].__self__  # the app's RequestHooks
        tel = hooks.istio
        assert isinstance(tel, IstioTelemetry)
        assert tel.destinations["orders"].service == "orders-svc.shop.svc.cluster.local"
        tel.observe(exchange(), 0.001, {})
        assert "istio_requests_total{" in gateway.metrics.render()[0].decode()
    finally:
        app.extensions["odin"].stop()


def test_observations_reach_the_metrics_within_a_flush_interval():
    """Request threads only queue (no prometheus lock per request); the flusher writes."""
    import time

    from odin_gw.istio_telemetry import FLUSH_INTERVAL

    registry = CollectorRegistry()
    tel = telemetry(registry)

    def total() -> float:
        samples = families(registry)["istio_requests"].samples
        return sum(s.value for s in samples if s.name == "istio_requests_total")

    for _ in range(3):
        tel.observe(exchange(), 0.001, {})
    assert len(tel._pending) <= 3
    deadline = time.monotonic() + 20 * FLUSH_INTERVAL
    while total() < 3 and time.monotonic() < deadline:
        time.sleep(FLUSH_INTERVAL / 5)
    assert total() == 3 and not tel._pending
    tel.flush()  # nothing left: a second drain changes nothing
    assert total() == 3
