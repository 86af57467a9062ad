"""Istio's tracing and mesh headers, checked through real sockets against real gunicorn.

One gateway for the module: ``serviceMesh.type: istio`` in sidecar mode, its services
with ``targets`` (sent to as written, as the sidecar would intercept them) on loopback,
and ``samplingRate: 0`` so that a sampled request can only be one whose decision was kept.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.raw_client import RawResponse, echoed_get
from tests.support.raw_upstream import RawUpstream, Reply
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

TRACE = "463ac35c9f6413ad48485a3953bb6124"
SPAN = "a2fb4a1d1a96d312"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
W3C_PARENT = "00f067aa0ba902b7"
HEX = set("0123456789abcdef")


@pytest.fixture(scope="module")
def echo():
    with Upstream("echo") as up:
        yield up


@pytest.fixture(scope="module")
def dropper():
    """Reads each request and closes without answering: the gateway retries elsewhere."""
    with RawUpstream([Reply(b"", then="close")]) as up:
        yield up


@pytest.fixture(scope="module")
def gw(echo, dropper):
    config = {
        "serviceMesh": {
            "enabled": True,
            "type": "istio",
            "namespace": "shop",
            # No istiod here: serve the static targets at once rather than after 10 s.
            "readyGracePeriod": 0,
            "istio": {
                "samplingRate": 0.0,
                "customHeaders": ["X-Tenant", "X-Envoy-Retry-On", "X-Request-ID"],
            },
        },
        "services": [
            {"name": "shop", "basePath": "/shop", "targets": [echo.url]},
            {
                "name": "flaky",
                "basePath": "/flaky",
                "targets": [dropper.url, echo.url],
                "retries": 1,
            },
        ],
    }
    gateway = GatewayProcess(config)
    try:
        yield gateway.start()
    finally:
        gateway.cleanup()


def send(gw, *headers: str, path: str = "/shop/x") -> tuple[RawResponse, dict[str, str]]:
    return echoed_get(gw.port, *headers, path=path, host="gw")


def assert_hop(seen: dict[str, str], sampled: str) -> tuple[str, str]:
    """The shapes every upstream request has; returns its (trace id, span id)."""
    trace, span = seen["x-b3-traceid"], seen["x-b3-spanid"]
    assert len(trace) in (16, 32) and set(trace) <= HEX and trace.strip("0")
    assert len(span) == 16 and set(span) <= HEX and span.strip("0")
    assert seen["x-b3-sampled"] == sampled
    flags = "01" if sampled == "1" else "00"
    assert seen["traceparent"] == f"00-{trace:0>32}-{span}-{flags}"
    assert seen["x-envoy-namespace"] == "shop"
    assert seen["x-request-id"]
    return trace, span


def test_new_trace_for_a_bare_request(gw):
    resp, seen = send(gw)
    trace, _ = assert_hop(seen, "0")  # samplingRate 0 decided
    assert len(trace) == 32
    assert "x-b3-parentspanid" not in seen and "x-b3-flags" not in seen
    assert "tracestate" not in seen
    # The request id: a fresh UUID4, the same one the client gets back.
    assert uuid.UUID(seen["x-request-id"]).version == 4
    assert resp.header("X-Request-Id") == seen["x-request-id"]


def test_two_requests_get_different_ids(gw):
    (_, a), (_, b) = send(gw), send(gw)
    for name in ("x-request-id", "x-b3-traceid", "x-b3-spanid", "traceparent"):
        assert a[name] != b[name]


def test_incoming_b3_span_becomes_the_parent(gw):
    _, seen = send(gw, f"X-B3-TraceId: {TRACE}", f"X-B3-SpanId: {SPAN}", "X-B3-Sampled: 1")
    trace, span = assert_hop(seen, "1")  # the caller's decision is kept
    assert trace == TRACE and seen["x-b3-parentspanid"] == SPAN and span != SPAN


def test_single_b3_header_with_debug(gw):
    _, seen = send(gw, f"b3: {TRACE}-{SPAN}-d-0020000000000001")
    trace, span = assert_hop(seen, "1")
    assert trace == TRACE and seen["x-b3-parentspanid"] == SPAN and span != SPAN
    assert seen["x-b3-flags"] == "1"
    # Sent on in the form it came in too, consistent with the multi headers.
    assert seen["b3"] == f"{TRACE}-{span}-d-{SPAN}"


def test_64_bit_trace_id_is_accepted(gw):
    _, seen = send(gw, f"X-B3-TraceId: {SPAN}", "X-B3-SpanId: 0020000000000001")
    trace, _ = assert_hop(seen, "0")  # no decision came: samplingRate decides
    assert trace == SPAN and seen["traceparent"].startswith(f"00-{'0' * 16}{SPAN}-")


def test_traceparent_gives_trace_and_parent_and_tracestate_passes(gw):
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    _, seen = send(gw, f"traceparent: 00-{W3C_TRACE}-{W3C_PARENT}-01", f"tracestate: {state}")
    trace, span = assert_hop(seen, "1")
    assert trace == W3C_TRACE and seen["x-b3-parentspanid"] == W3C_PARENT
    assert span != W3C_PARENT and seen["tracestate"] == state


@pytest.mark.parametrize(
    "headers",
    [
        (f"X-B3-TraceId: {'0' * 32}", f"X-B3-SpanId: {SPAN}"),
        (f"X-B3-TraceId: {TRACE[:-3]}", f"X-B3-SpanId: {SPAN}"),
        (f"X-B3-TraceId: {TRACE[:-1]}g", f"X-B3-SpanId: {SPAN}"),
        (f"X-B3-TraceId: {TRACE}", "X-B3-SpanId: 0000000000000000"),
        (f"b3: {TRACE}-{SPAN}-yes",),
        (f"traceparent: 00-{W3C_TRACE.upper()}-{W3C_PARENT}-01", "tracestate: a=1"),
    ],
)
def test_invalid_ids_start_a_new_trace(gw, headers):
    _, seen = send(gw, *headers, "X-B3-ParentSpanId: 0020000000000001")
    trace, _ = assert_hop(seen, "0")
    assert len(trace) == 32 and trace not in (TRACE, W3C_TRACE, "0" * 32)
    assert "x-b3-parentspanid" not in seen and "tracestate" not in seen


def test_sampling_decision_without_ids_is_kept(gw):
    _, seen = send(gw, "X-B3-Sampled: 1")
    assert_hop(seen, "1")


def test_custom_headers_propagated_and_envoy_headers_stripped(gw):
    _, seen = send(
        gw,
        "Connection: X-Tenant",  # a hop-by-hop claim does not drop a custom header
        "X-Tenant: acme ;tier=gold",
        "X-Envoy-Retry-On: 5xx",  # listed in customHeaders, stripped all the same
        "x-envoy-upstream-rq-timeout-ms: 1",
        "X-ENVOY-MAX-RETRIES: 9",
        "X-Envoy-Namespace: evil",
        "X-Other: kept",
    )
    assert seen["x-tenant"] == "acme ;tier=gold" and seen["x-other"] == "kept"
    envoy = {k: v for k, v in seen.items() if k.startswith("x-envoy-")}
    assert envoy == {"x-envoy-namespace": "shop"}
    log = gw.log()
    assert "customHeaders X-Envoy-Retry-On" in log and "always stripped" in log


def test_request_id_kept_when_sane_replaced_when_not(gw):
    resp, seen = send(gw, "X-Request-Id: order-42:retry/1")
    assert seen["x-request-id"] == "order-42:retry/1" == resp.header("X-Request-Id")
    for bad in ("two words", "x" * 201, "<id>"):
        resp, seen = send(gw, f"X-Request-Id: {bad}")
        assert uuid.UUID(seen["x-request-id"]).version == 4
        assert resp.header("X-Request-Id") == seen["x-request-id"]


def test_each_attempt_is_a_new_hop(gw, dropper):
    # Round-robin over [dropper, echo]: within a few requests one tries the dropper
    # first, then is retried on the echo upstream.
    for i in range(6):
        rid = f"attempt-{i}"
        _, seen = send(
            gw,
            f"X-Request-Id: {rid}",
            f"X-B3-TraceId: {TRACE}",
            f"X-B3-SpanId: {SPAN}",
            path="/flaky/x",
        )
        first = [r for r in dropper.requests if r.header("X-Request-Id") == rid]
        if first:
            break
    else:
        pytest.fail("no request was tried on the dropping upstream first")
    (dropped,) = first
    retried_span = assert_hop(seen, "0")[1]
    dropped_span = dropped.header("X-B3-SpanId")
    assert dropped.header("X-B3-TraceId") == seen["x-b3-traceid"] == TRACE
    assert dropped.header("X-B3-ParentSpanId") == seen["x-b3-parentspanid"] == SPAN
    assert dropped_span and dropped_span != retried_span
    assert dropped.header("traceparent") == f"00-{TRACE}-{dropped_span}-00"
