"""Tracing through real gunicorn: W3C and B3 context in and out for every mesh type, and
the gateway's spans exported over OTLP/HTTP to a receiver that decodes the protobuf
(``tests/support/otlp_receiver.py``)."""

from __future__ import annotations

import re
import time

import pytest
import requests
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.doubles.consul import ConsulDouble
from tests.integration.consul_helpers import consul_config
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.upstream import free_port

pytestmark = pytest.mark.integration

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
COLLECTOR_SECRET = "collector-secret-7f3a"


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def tracing(receiver, **extra) -> dict:
    return {
        "enabled": True,
        "endpoint": receiver.endpoint,
        "insecure": True,
        "serviceName": "edge-gw",
        "scheduleDelay": "100ms",
        "headers": {"Authorization": f"Bearer {COLLECTOR_SECRET}"},
        **extra,
    }


def web(*urls, **extra) -> dict:
    return {"name": "web", "basePath": "/web", "targets": list(urls), **extra}


def sent(upstream, index: int = -1) -> dict:
    """The headers the upstream received (lower-case names) on its ``index``th request."""
    return {k.lower(): v for k, v in upstream.seen[index]["headers"]}


def metric(gw, name: str) -> float:
    text = requests.get(gw.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_w3c_caller_gets_a_child_span_and_the_backend_a_grandchild(
    gateway_factory, upstream, receiver
):
    gw = gateway_factory({"services": [web(upstream.url)], "tracing": tracing(receiver)})
    r = requests.get(
        gw.url + "/web/orders/7?secret=1",
        headers={
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            "tracestate": "congo=t61rcWkgMzE",
        },
        timeout=5,
    )
    assert r.status_code == 200
    got = sent(upstream)
    hop = got["traceparent"].split("-")
    assert hop[0] == "00" and hop[1] == CALLER_TRACE and hop[3] == "01"
    assert got["x-b3-traceid"] == CALLER_TRACE and got["x-b3-spanid"] == hop[2]
    assert got["tracestate"] == "congo=t61rcWkgMzE"
    assert "authorization" not in got  # the collector's credentials stay with the exporter

    server, client = _request_spans(receiver)
    assert server.trace_id == client.trace_id == CALLER_TRACE
    assert server.parent_span_id == CALLER_SPAN  # the gateway's span: the caller's child
    assert client.parent_span_id == server.span_id == got["x-b3-parentspanid"]
    assert client.span_id == hop[2]  # the backend's parent is the attempt's span
    assert server.name == "GET web" and client.name == "GET"
    assert server.trace_state == "congo=t61rcWkgMzE"
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["url.path"] == "/web/orders/7"  # never the query
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["odin.service"] == "web"
    assert server.attributes["odin.upstream.endpoint"] == upstream.url
    assert server.attributes["odin.retries"] == 0
    assert server.attributes["odin.mesh"] == "none"
    assert server.attributes["odin.request_id"] == r.headers["X-Request-Id"]
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == int(upstream.url.rsplit(":", 1)[1])
    assert client.attributes["http.response.status_code"] == 200
    assert server.start <= client.start <= client.end <= server.end
    assert server.resource["service.name"] == "edge-gw"
    assert server.scope == "odin_gw"
    assert server.headers["authorization"] == f"Bearer {COLLECTOR_SECRET}"
    assert server.headers["content-type"] == "application/x-protobuf"
    assert COLLECTOR_SECRET not in gw.log()


def _request_spans(receiver, count: int = 2, timeout: float = 10.0):
    spans = receiver.wait_for(count, timeout)
    assert len(spans) >= count, spans
    server = [s for s in spans if s.kind == SERVER]
    clients = [s for s in spans if s.kind == CLIENT]
    assert len(server) == 1, spans
    return (server[0], *clients)


def test_b3_multi_and_single_headers_continue_the_trace(gateway_factory, upstream, receiver):
    gw = gateway_factory({"services": [web(upstream.url)], "tracing": tracing(receiver)})
    requests.get(
        gw.url + "/web/a",
        headers={"X-B3-TraceId": CALLER_TRACE, "X-B3-SpanId": CALLER_SPAN, "X-B3-Sampled": "1"},
        timeout=5,
    )
    multi = sent(upstream)
    assert multi["x-b3-traceid"] == CALLER_TRACE and "b3" not in multi
    server, client = _request_spans(receiver)
    assert server.parent_span_id == CALLER_SPAN and client.span_id == multi["x-b3-spanid"]

    # The single header: the same trace goes on in every form, b3 included.
    trace64 = "a3ce929d0e0e4736"
    requests.get(gw.url + "/web/b", headers={"b3": f"{trace64}-{CALLER_SPAN}-1"}, timeout=5)
    single = sent(upstream)
    b3 = single["b3"].split("-")
    assert b3[0] == trace64 and b3[1] == single["x-b3-spanid"] and b3[2] == "1"
    assert single["traceparent"].split("-")[1] == "0" * 16 + trace64
    spans = receiver.wait_for(2, trace_id="0" * 16 + trace64)
    assert {s.kind for s in spans} == {SERVER, CLIENT}
    server = next(s for s in spans if s.kind == SERVER)
    assert b3[3] == server.span_id and server.parent_span_id == CALLER_SPAN

    # A debug flag in the single header: sent as d, and sampled.
    requests.get(gw.url + "/web/c", headers={"b3": f"{CALLER_TRACE}-{CALLER_SPAN}-d"}, timeout=5)
    assert sent(upstream)["b3"].split("-")[2] == "d"
    assert sent(upstream)["x-b3-flags"] == "1"


def test_a_trace_starts_at_the_gateway_without_context(gateway_factory, upstream, receiver):
    gw = gateway_factory({"services": [web(upstream.url)], "tracing": tracing(receiver)})
    requests.get(gw.url + "/web/x", timeout=5)
    got = sent(upstream)
    server, client = _request_spans(receiver)
    assert server.parent_span_id is None  # a root span
    assert re.fullmatch(r"[0-9a-f]{32}", server.trace_id) and server.trace_id != "0" * 32
    assert got["traceparent"] == f"00-{server.trace_id}-{client.span_id}-01"


def test_unsampled_requests_export_nothing_but_propagate(gateway_factory, upstream, receiver):
    gw = gateway_factory(
        {"services": [web(upstream.url)], "tracing": tracing(receiver, sampleRate=0.0)},
    )
    for _ in range(5):
        requests.get(gw.url + "/web/x", timeout=5)
    got = sent(upstream)
    assert got["x-b3-sampled"] == "0" and got["traceparent"].endswith("-00")
    # A caller's decision wins over the rate.
    requests.get(
        gw.url + "/web/y",
        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        timeout=5,
    )
    spans = receiver.wait_for(2)
    assert {s.trace_id for s in spans} == {CALLER_TRACE}
    assert len(spans) == 2


def test_each_attempt_is_its_own_span(gateway_factory, upstream, receiver):
    dead = f"http://127.0.0.1:{free_port()}"  # refuses connections
    gw = gateway_factory(
        {
            "services": [web(dead, upstream.url, loadBalancing="round-robin", retries=2)],
            "tracing": tracing(receiver),
        }
    )
    # Round robin from a random start: within a few requests one starts at the dead one.
    for _ in range(4):
        assert requests.get(gw.url + "/web/x", timeout=5).status_code == 200
    spans = receiver.wait_for(1, kind=SERVER, **{"odin.retries": 1})
    assert spans, "no request was retried"
    server = spans[0]
    attempts = sorted(
        (s for s in receiver.wait_for(2, trace_id=server.trace_id) if s.kind == CLIENT),
        key=lambda s: s.attributes["odin.attempt"],
    )
    assert [a.attributes["odin.attempt"] for a in attempts] == [0, 1]
    failed, ok = attempts
    assert failed.attributes["error.type"] == "connect"
    assert failed.status_code == Status.StatusCode.STATUS_CODE_ERROR
    assert ok.attributes["http.response.status_code"] == 200
    assert {a.parent_span_id for a in attempts} == {server.span_id}
    assert failed.span_id != ok.span_id
    traceparents = [sent(upstream, i)["traceparent"] for i in range(len(upstream.seen))]
    assert f"00-{server.trace_id}-{ok.span_id}-01" in traceparents


def test_upstream_error_status_marks_the_spans(gateway_factory, upstream, receiver):
    gw = gateway_factory({"services": [web(upstream.url)], "tracing": tracing(receiver)})
    assert requests.get(gw.url + "/web/status/503", timeout=5).status_code == 503
    server, client = _request_spans(receiver)
    assert server.status_code == Status.StatusCode.STATUS_CODE_ERROR
    assert client.attributes["http.response.status_code"] == 503


def test_exporting_never_blocks_and_losses_are_counted(gateway_factory, upstream, receiver):
    gw = gateway_factory(
        {
            "services": [web(upstream.url)],
            "monitoring": {"enabled": True},
            "tracing": tracing(receiver, maxQueueSize=64, batchSize=16, timeout="1s"),
        },
        threads=4,
    )
    receiver.set_mode("hang")  # a collector that takes the batch and never answers
    session = requests.Session()
    started = time.monotonic()
    for _ in range(80):  # 160 spans: the queue holds 64 while the exporter is stuck
        assert session.get(gw.url + "/web/x", timeout=5).status_code == 200
    assert time.monotonic() - started < 30  # bounded, not a speed goal: 80 served
    dropped = metric(gw, 'odin_tracing_spans_dropped_total{reason="queue_full"}')
    assert dropped >= 160 - 64 - 3 * 16
    receiver.set_mode("bad")  # the collector now refuses: those spans are lost, counted
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if metric(gw, 'odin_tracing_spans_dropped_total{reason="export_failed"}') >= 16:
            break
        time.sleep(0.2)
    assert metric(gw, 'odin_tracing_spans_dropped_total{reason="export_failed"}') >= 16
    receiver.set_mode("ok")
    before = len(receiver.spans)
    for _ in range(5):
        session.get(gw.url + "/web/x", timeout=5)
    assert len(receiver.wait_for(before + 10, 10)) >= before + 10
    deadline = time.monotonic() + 5
    while metric(gw, "odin_tracing_spans_exported_total") < len(receiver.spans):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert metric(gw, "odin_tracing_spans_exported_total") == len(receiver.spans)


def test_propagation_without_tracing_section(gateway_factory, upstream):
    """No tracing section, no mesh: the context is still continued and re-sent whole."""
    gw = gateway_factory({"services": [web(upstream.url)]})
    requests.get(
        gw.url + "/web/x",
        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "x-b3-spanid": "f" * 16},
        timeout=5,
    )
    got = sent(upstream)
    hop = got["traceparent"].split("-")
    assert hop[1] == CALLER_TRACE and hop[2] != CALLER_SPAN and hop[2] == got["x-b3-spanid"]
    assert got["x-b3-parentspanid"] == CALLER_SPAN  # nothing recorded: the caller's span
    assert got["x-b3-spanid"] != "f" * 16  # a stray client B3 header is never relayed


def test_consul_mesh_propagates_and_tags_the_datacenter(gateway_factory, upstream, receiver):
    with ConsulDouble() as consul:
        consul.register("web", id="web-a", port=upstream.port)
        config = consul_config(consul, [{"name": "web", "basePath": "/web"}])
        config["tracing"] = tracing(receiver)
        gw = gateway_factory(config)
        r = requests.get(
            gw.url + "/web/x",
            headers={"X-B3-TraceId": CALLER_TRACE, "X-B3-SpanId": CALLER_SPAN},
            timeout=5,
        )
        assert r.status_code == 200
    got = sent(upstream)
    assert got["x-b3-traceid"] == CALLER_TRACE and got["x-consul-datacenter"] == "dc1"
    server, client = _request_spans(receiver)
    assert server.attributes["odin.mesh"] == "consul"
    assert server.attributes["odin.mesh.datacenter"] == "dc1"
    assert client.attributes["odin.mesh.datacenter"] == "dc1"
    assert client.span_id == got["x-b3-spanid"] and server.parent_span_id == CALLER_SPAN
