"""The tracing section, the per-request Trace and the Tracer's spans and counts."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from odin_gw.config import ConfigError, parse_config
from odin_gw.config.tracing import TracingConfig
from odin_gw.mesh.headers import TraceHeaders, injectors_for
from odin_gw.mesh.snapshot import Endpoint
from odin_gw.metrics import GatewayMetrics
from odin_gw.proxy.exchange import Exchange
from odin_gw.tracer import Tracer

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Memory(SpanExporter):
    """Keeps what it is given; ``gate`` (when set) holds each export until released."""

    def __init__(self, result=SpanExportResult.SUCCESS, gate: threading.Event | None = None):
        self.spans = []
        self.result = result
        self.gate = gate
        self.entered = threading.Event()

    def export(self, spans):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.spans.extend(spans)
        return self.result

    def shutdown(self):
        pass


def counter(metrics: GatewayMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


def request(headers: TraceHeaders, environ: dict | None = None, service="web") -> Exchange:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/web/a", **(environ or {})}
    exchange = Exchange(environ)
    headers.request(exchange, environ)
    exchange.service = service
    exchange.route = service
    exchange.status = 200
    return exchange


def attempt(headers: TraceHeaders, exchange: Exchange, status=200, failure=None) -> dict:
    out = dict(exchange.mesh_headers)
    endpoint = Endpoint("10.0.0.7", 8080, datacenter="dc2", identity="spiffe://x/ns/a/sa/b")
    headers.upstream(exchange, endpoint, out)
    exchange.trace.attempt_ended(status, failure)
    return out


def tracer(metrics, exporter, **cfg) -> Tracer:
    config = TracingConfig(enabled=True, endpoint="http://127.0.0.1:1/v1/traces", **cfg)
    return Tracer(config, metrics, "consul", exporter=exporter)


def test_config_defaults_and_endpoint_path():
    cfg = parse_config(
        "tracing: {enabled: true, endpoint: 'https://otel.example:4318', sampleRate: 0.25}"
    ).tracing
    assert cfg.endpoint == "https://otel.example:4318/v1/traces"
    assert cfg.sample_rate == 0.25 and cfg.service_name == "odin-gateway"
    kept = parse_config("tracing: {endpoint: 'https://c:4318/otlp/traces'}").tracing
    assert kept.endpoint == "https://c:4318/otlp/traces" and not kept.enabled


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("{enabled: true}", "tracing.endpoint: required when tracing is enabled"),
        ("{endpoint: 'http://c:4318'}", "tracing.endpoint: http://c:4318 is plain HTTP"),
        ("{endpoint: 'ftp://c'}", "tracing.endpoint: invalid URL 'ftp://c'"),
        ("{endpoint: 'https://u:p@c'}", "tracing.endpoint: credentials in the URL"),
        ("{endpoint: 'https://u@c'}", "tracing.endpoint: credentials in the URL"),
        ("{endpoint: 'https://c/v1/traces?k=1'}", "tracing.endpoint: invalid URL"),
        ("{endpoint: 'http://c', insecure: false}", "or set tracing.insecure: true"),
        ("{endpoint: 'https://c:99999'}", "tracing.endpoint: invalid URL"),
        ("{sampleRate: 2}", "tracing.sampleRate"),
        ("{headers: {'a b': x}}", "tracing.headers: 'a b' is not a valid header name"),
        ('{headers: {a: "x\\ny"}}', "tracing.headers: value of a contains CR, LF or NUL"),
        ("{timeout: 0s}", "tracing.timeout: must be greater than zero"),
        ("{maxQueueSize: 100, batchSize: 200}", "tracing.batchSize: must not be larger"),
        ("{servicename: x}", "tracing.servicename: unknown field"),
    ],
)
def test_config_problems_name_the_key(section, problem):
    with pytest.raises(ConfigError) as err:
        parse_config(f"tracing: {section}")
    assert problem in str(err.value)


def test_collector_headers_are_redacted_whatever_their_name():
    config = parse_config(
        "tracing: {endpoint: 'https://c', headers: {x-honeycomb-team: k3y, Authorization: t}}"
    )
    assert config.redacted()["tracing"]["headers"] == {
        "x-honeycomb-team": "<redacted>",
        "Authorization": "<redacted>",
    }
    assert dict(config.tracing.headers)["x-honeycomb-team"] == "k3y"


@pytest.mark.parametrize(
    ("yaml_text", "kinds"),
    [
        ("{}", ["TraceHeaders"]),
        ("serviceMesh: {enabled: true, type: consul}", ["TraceHeaders", "ConsulHeaders"]),
        ("serviceMesh: {enabled: true, type: istio}", ["IstioHeaders"]),
        ("serviceMesh: {enabled: true, type: linkerd}", ["LinkerdHeaders"]),
    ],
)
def test_every_mesh_type_propagates_trace_context(yaml_text, kinds):
    injectors = injectors_for(parse_config(yaml_text))
    assert [type(i).__name__ for i in injectors] == kinds
    assert isinstance(injectors[0], TraceHeaders)


def test_sample_rate_comes_from_tracing_then_istio():
    istio = "serviceMesh: {enabled: true, type: istio, istio: {samplingRate: 0.0}}"
    (inj,) = injectors_for(parse_config(istio))
    assert request(inj).trace.sampled == "0"
    (inj,) = injectors_for(parse_config(istio + "\ntracing: {sampleRate: 1.0}"))
    assert request(inj).trace.sampled == "1"


def test_recorded_trace_parents_the_hops_on_the_gateway_span():
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj, {"HTTP_TRACEPARENT": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    trace = exchange.trace
    assert trace.caller_span == CALLER_SPAN and trace.span_id not in (None, CALLER_SPAN)
    first = attempt(inj, exchange, 0, "connect")
    second = attempt(inj, exchange, 200)
    assert first["X-B3-ParentSpanId"] == second["X-B3-ParentSpanId"] == trace.span_id
    assert [a.span_id for a in trace.attempts] == [first["X-B3-SpanId"], second["X-B3-SpanId"]]
    assert trace.attempts[0].failure == "connect" and trace.attempts[1].status == 200
    # Not recorded: no gateway span; the caller's span is the hop's parent.
    plain = TraceHeaders(1.0, recording=False)
    exchange = request(plain, {"HTTP_TRACEPARENT": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert exchange.trace.attempts is None and exchange.trace.span_id is None
    assert attempt(plain, exchange)["X-B3-ParentSpanId"] == CALLER_SPAN


def test_unsampled_requests_are_not_recorded():
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj, {"HTTP_TRACEPARENT": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
    assert exchange.trace.attempts is None
    assert TraceHeaders(0.0, recording=True).decide() == "0"


def test_single_b3_goes_out_as_single_b3_with_the_parent():
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj, {"HTTP_B3": f"{CALLER_TRACE}-{CALLER_SPAN}-1"})
    out = attempt(inj, exchange)
    assert out["b3"] == f"{CALLER_TRACE}-{out['X-B3-SpanId']}-1-{exchange.trace.span_id}"
    multi = request(inj, {"HTTP_X_B3_TRACEID": CALLER_TRACE, "HTTP_X_B3_SPANID": CALLER_SPAN})
    assert "b3" not in attempt(inj, multi)


def test_spans_built_from_a_request():
    metrics = GatewayMetrics()
    memory = Memory()
    t = tracer(metrics, memory, schedule_delay=0.01)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(
        inj, {"HTTP_TRACEPARENT": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "HTTP_TRACESTATE": "a=1"}
    )
    attempt(inj, exchange, 0, "connect")
    out = attempt(inj, exchange, 503)
    exchange.status, exchange.retries, exchange.target = 503, 1, "http://10.0.0.7:8080"
    exchange.route = "web/canary"
    t.record(exchange, exchange.trace.start_ns + 5_000_000)
    t.close()
    server, failed, answered = memory.spans
    assert server.kind is SpanKind.SERVER and server.name == "GET web"
    assert server.parent.span_id == int(CALLER_SPAN, 16) and server.parent.is_remote
    assert server.context.trace_id == int(CALLER_TRACE, 16)
    assert server.context.trace_state.to_header() == "a=1"
    assert server.parent.trace_state.to_header() == "a=1"
    assert failed.context.trace_state.to_header() == "a=1"
    assert server.context.span_id == int(exchange.trace.span_id, 16)
    assert server.status.status_code is StatusCode.ERROR  # a 503 answered
    assert server.attributes["odin.route"] == "web/canary"
    assert server.attributes["odin.mesh"] == "consul"
    assert server.attributes["odin.retries"] == 1
    assert server.end_time - server.start_time == 5_000_000
    assert failed.attributes["error.type"] == "connect" and failed.kind is SpanKind.CLIENT
    assert "http.response.status_code" not in failed.attributes
    assert answered.context.span_id == int(out["X-B3-SpanId"], 16)
    assert answered.parent.span_id == server.context.span_id
    assert answered.attributes["odin.mesh.datacenter"] == "dc2"
    assert answered.attributes["odin.mesh.peer_identity"] == "spiffe://x/ns/a/sa/b"
    assert answered.status.status_code is StatusCode.ERROR
    assert counter(metrics, "odin_tracing_spans_exported_total") == 3


def test_root_span_and_ok_status():
    memory = Memory()
    t = tracer(GatewayMetrics(), memory)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj)
    attempt(inj, exchange, 204)
    exchange.status = 204
    t.record(exchange, exchange.trace.start_ns + 1)
    t.close()
    server, client = memory.spans
    assert server.parent is None and server.status.status_code is StatusCode.UNSET
    assert client.status.status_code is StatusCode.UNSET


def test_the_gateways_own_endpoints_are_not_traced():
    memory = Memory()
    t = tracer(GatewayMetrics(), memory)
    exchange = request(TraceHeaders(1.0, recording=True), service=None)
    t.record(exchange, exchange.trace.start_ns + 1)
    t.close()
    assert memory.spans == []


def test_a_full_queue_drops_and_counts_without_waiting():
    metrics = GatewayMetrics()
    gate = threading.Event()
    memory = Memory(gate=gate)
    t = tracer(metrics, memory, max_queue_size=64, batch_size=8, schedule_delay=0.01)
    inj = TraceHeaders(1.0, recording=True)

    def one():
        exchange = request(inj)
        attempt(inj, exchange)
        t.record(exchange, exchange.trace.start_ns + 1)

    one()
    assert memory.entered.wait(5)  # the exporter holds a batch (2 spans) and is stuck
    for _ in range(40):  # 80 spans more: 64 fit, 16 are dropped
        one()
    assert counter(metrics, "odin_tracing_spans_dropped_total", reason="queue_full") == 16
    gate.set()
    t.close(5)
    assert len(memory.spans) == 2 + 64
    assert counter(metrics, "odin_tracing_spans_exported_total") == 66


def test_refused_exports_are_counted_as_lost():
    metrics = GatewayMetrics()
    memory = Memory(result=SpanExportResult.FAILURE)
    t = tracer(metrics, memory)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj)
    attempt(inj, exchange)
    t.record(exchange, exchange.trace.start_ns + 1)
    t.close()
    assert counter(metrics, "odin_tracing_spans_dropped_total", reason="export_failed") == 2
    assert counter(metrics, "odin_tracing_spans_exported_total") == 0


def test_the_otlp_exporter_loads_with_the_installed_protobuf_modules():
    """xds-protos ships an older copy of opentelemetry-proto's modules at the same paths;
    the install must leave the exporter's own (make test reinstalls it last)."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope")
    t = Tracer(
        TracingConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"),
        GatewayMetrics(),
        "none",
    )
    assert type(t.exporter.inner).__name__ == "OTLPSpanExporter"
    t.close()


def test_every_attribute_of_both_span_kinds():
    memory = Memory()
    t = tracer(GatewayMetrics(), memory, service_name="edge")
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj, {"HTTP_TRACEPARENT": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    exchange.client_addr = "192.0.2.9"
    out = attempt(inj, exchange, 200)
    exchange.target, exchange.datacenter = "http://10.0.0.7:8080", "dc2"
    exchange.peer_identity, exchange.error_kind = "spiffe://x/ns/a/sa/b", "upstream_timeout"
    t.record(exchange, exchange.trace.start_ns + 7)
    t.close()
    server, client = memory.spans
    assert dict(server.attributes) == {
        "http.request.method": "GET",
        "url.path": "/web/a",
        "http.response.status_code": 200,
        "client.address": "192.0.2.9",
        "odin.request_id": exchange.request_id,
        "odin.mesh": "consul",
        "odin.retries": 0,
        "odin.service": "web",
        "odin.upstream.endpoint": "http://10.0.0.7:8080",
        "odin.mesh.datacenter": "dc2",
        "odin.mesh.peer_identity": "spiffe://x/ns/a/sa/b",
        "error.type": "upstream_timeout",
    }
    assert dict(client.attributes) == {
        "http.request.method": "GET",
        "odin.attempt": 0,
        "server.address": "10.0.0.7",
        "server.port": 8080,
        "url.scheme": "http",
        "odin.mesh.peer_identity": "spiffe://x/ns/a/sa/b",
        "odin.mesh.datacenter": "dc2",
        "http.response.status_code": 200,
    }
    assert server.name == "GET web" and client.name == "GET"
    assert not server.context.is_remote and server.context.trace_flags.sampled
    assert server.parent.is_remote and server.parent.trace_flags.sampled
    assert not client.context.is_remote and client.context.trace_flags.sampled
    assert client.context.span_id == int(out["X-B3-SpanId"], 16)
    assert client.parent == server.context
    assert client.start_time == exchange.trace.attempts[0].start_ns
    assert client.end_time == exchange.trace.attempts[0].end_ns
    for span in (server, client):
        assert span.resource.attributes["service.name"] == "edge"
        assert "/" in span.resource.attributes["service.instance.id"]
        assert span.instrumentation_scope.name == "odin_gw"


@pytest.mark.parametrize(
    ("status", "server_error", "attempt_status", "attempt_error"),
    [(499, False, 399, False), (500, True, 400, True), (0, True, 0, True)],
)
def test_error_status_boundaries(status, server_error, attempt_status, attempt_error):
    memory = Memory()
    t = tracer(GatewayMetrics(), memory)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj)
    attempt(inj, exchange, attempt_status)
    exchange.status = status
    t.record(exchange, exchange.trace.start_ns + 1)
    t.close()
    server, client = memory.spans
    assert (server.status.status_code is StatusCode.ERROR) is server_error
    assert (client.status.status_code is StatusCode.ERROR) is attempt_error
    assert ("http.response.status_code" in client.attributes) is bool(attempt_status)


def test_an_unfinished_attempt_ends_with_the_request():
    memory = Memory()
    t = tracer(GatewayMetrics(), memory)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj)
    inj.upstream(exchange, Endpoint("10.0.0.1", 80), dict(exchange.mesh_headers))  # a tunnel
    t.record(exchange, exchange.trace.start_ns + 99)
    t.close()
    assert memory.spans[1].end_time == exchange.trace.start_ns + 99


def test_an_exporter_that_raises_counts_a_failure_and_logs_one_line():
    class Broken(Memory):
        def export(self, spans):
            raise ConnectionError("collector gone")

    metrics = GatewayMetrics()
    t = tracer(metrics, Broken())
    handler_records = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_records.append(record.getMessage())

    logger = logging.getLogger("odin_gw.tracing")
    keep = Keep()
    logger.addHandler(keep)
    try:
        for _ in range(2):
            inj = TraceHeaders(1.0, recording=True)
            exchange = request(inj)
            attempt(inj, exchange)
            t.record(exchange, exchange.trace.start_ns + 1)
            t.processor.force_flush()
    finally:
        t.close()
        logger.removeHandler(keep)
    assert counter(metrics, "odin_tracing_spans_dropped_total", reason="export_failed") == 4
    assert t.exporter.taken == 4  # counted over both exports
    assert handler_records == ["tracing: exporting 2 spans failed: collector gone"] * 2


def test_close_gives_up_on_a_stuck_exporter_within_its_timeout():
    gate = threading.Event()
    memory = Memory(gate=gate)
    t = tracer(GatewayMetrics(), memory, schedule_delay=0.01)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj)
    attempt(inj, exchange)
    t.record(exchange, exchange.trace.start_ns + 1)
    assert memory.entered.wait(5)
    started = time.monotonic()
    t.close(0.2)
    assert time.monotonic() - started < 3  # not the SDK's 30 s
    gate.set()


@pytest.mark.parametrize(
    "mesh",
    [
        "",
        "serviceMesh: {enabled: true, type: consul}",
        "serviceMesh: {enabled: true, type: istio, istio: {samplingRate: 1.0}}",
        "serviceMesh: {enabled: true, type: linkerd}",
    ],
)
def test_every_mesh_type_gets_the_tracing_rate_and_recording(mesh):
    config = parse_config(
        f"{mesh}\ntracing: {{enabled: true, endpoint: 'https://c', sampleRate: 0.0}}"
    )
    trace = injectors_for(config)[0]
    assert trace.recording is True and trace.decide() == "0"
    plain = injectors_for(parse_config(mesh or "{}"))[0]
    assert plain.recording is False and plain.decide() == "1"


def test_a_hop_without_request_context_starts_its_own_trace():
    inj = TraceHeaders(1.0)
    headers: dict = {}
    trace, span, sampled = inj.new_span(headers)
    assert headers["X-B3-TraceId"] == trace and headers["X-B3-Sampled"] == sampled == "1"
    assert headers["X-B3-SpanId"] == span
    assert headers["traceparent"] == f"00-{trace}-{span}-01"
    half = {"X-B3-TraceId": CALLER_TRACE}  # no decision with it: a trace of its own
    assert inj.new_span(half)[0] != CALLER_TRACE


def test_debug_goes_on_in_the_single_header_and_attempts_are_timed():
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj, {"HTTP_B3": f"{CALLER_TRACE}-{CALLER_SPAN}-d"})
    before = time.time_ns()
    out = attempt(inj, exchange)
    assert out["b3"].split("-")[2] == "d" and out["X-B3-Flags"] == "1"
    assert before <= exchange.trace.attempts[0].start_ns <= time.time_ns()


def test_b3_single_form_and_attempt_bookkeeping():
    from odin_gw.mesh.tracing import Attempt, b3_single

    assert (
        b3_single(CALLER_TRACE, CALLER_SPAN, "1", False, None) == f"{CALLER_TRACE}-{CALLER_SPAN}-1"
    )
    assert (
        b3_single("a" * 16, "b" * 16, "0", True, "c" * 16) == f"{'a' * 16}-{'b' * 16}-d-{'c' * 16}"
    )
    fresh = Attempt("b" * 16, None, 5)
    assert (fresh.start_ns, fresh.end_ns, fresh.status, fresh.failure) == (5, 0, 0, None)
    inj = TraceHeaders(1.0, recording=True)
    exchange = request(inj)
    attempt(inj, exchange, 0, "reset")
    first = exchange.trace.attempts[0]
    ended = first.end_ns
    assert ended >= first.start_ns > 0 and (first.status, first.failure) == (0, "reset")
    exchange.trace.attempt_ended(200)  # an attempt ends once
    assert (first.end_ns, first.status, first.failure) == (ended, 0, "reset")


def test_the_istio_rate_is_for_istio_only():
    consul = "serviceMesh: {enabled: true, type: consul, istio: {samplingRate: 0.0}}"
    assert injectors_for(parse_config(consul))[0].decide() == "1"


def test_a_fractional_rate_draws_both_decisions():
    from odin_gw.mesh.tracing import sampler

    decide = sampler(0.5)
    seen = {decide() for _ in range(200)}  # both, with odds of 2**-199 against
    assert seen == {"0", "1"}
