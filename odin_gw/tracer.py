"""The gateway's spans, exported over OTLP/HTTP by the OpenTelemetry SDK (``tracing``).

Each sampled request for a service (the gateway's own endpoints are not traced) gives
a ``SERVER`` span (a child of the caller's span, named
``<METHOD> <service>``) and one ``CLIENT`` span per upstream attempt, whose span id is
the one that attempt sent upstream (``X-B3-SpanId``, ``traceparent``): the backend's
own span is its child. Ids are decided while the request runs (they must be sent
before any span ends; see :class:`odin_gw.mesh.tracing.Trace`), so the spans are built
once, when the answer has been sent, as SDK ``ReadableSpan`` objects with those ids,
and handed to the SDK's ``BatchSpanProcessor`` and ``OTLPSpanExporter``. That costs a
few microseconds per request; the SDK's tracer API, which would pick its own ids, costs
six times more.

Exporting never blocks a request: spans wait in the processor's bounded queue and a
background thread sends them in batches. A span that finds the queue full is dropped
at once and counted (``odin_tracing_spans_dropped_total{reason="queue_full"}``), as is
every span of a batch the collector refused or could not be reached for
(``reason="export_failed"``, after the exporter's own retries within
``tracing.timeout``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from .config.tracing import TracingConfig
from .proxy.exchange import Exchange

log = logging.getLogger("odin_gw.tracing")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)


class CountingExporter(SpanExporter):
    """The OTLP exporter, counting what it delivered and what it lost.

    ``taken`` is how many spans the processor has handed over so far: with the number
    of spans offered it says how many wait in the queue. Only the processor's worker
    thread calls :meth:`export` (under its export lock).
    """

    def __init__(self, inner: SpanExporter, metrics) -> None:
        self.inner = inner
        self.taken = 0
        self._exported = metrics.spans_exported
        self._failed = metrics.spans_dropped.labels("export_failed")

    def export(self, spans) -> SpanExportResult:
        count = len(spans)
        self.taken += count
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # the processor would log a traceback: one line instead
            log.warning("tracing: exporting %d spans failed: %s", count, exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._exported.inc(count)
        else:
            self._failed.inc(count)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracer:
    """Builds and queues the spans of sampled requests (see the module docstring).

    ``exporter`` replaces the OTLP exporter (tests of the span shapes).
    """

    def __init__(
        self, cfg: TracingConfig, metrics, mesh_kind: str, exporter: SpanExporter | None = None
    ) -> None:
        if exporter is None:
            exporter = _otlp_exporter_class()(
                endpoint=cfg.endpoint,
                certificate_file=cfg.ca_file,
                headers=dict(cfg.headers),
                timeout=cfg.timeout,
            )
        self.exporter = CountingExporter(exporter, metrics)
        self.max_queue = cfg.max_queue_size
        # The SDK's own queue has room for a batch being handed over on top of ours, so
        # it never drops silently: the admission check in record() does, and counts.
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=cfg.max_queue_size + 2 * cfg.batch_size,
            schedule_delay_millis=cfg.schedule_delay * 1000.0,
            max_export_batch_size=cfg.batch_size,
            export_timeout_millis=cfg.timeout * 1000.0,
        )
        self.resource = Resource.create(
            {
                "service.name": cfg.service_name,
                "service.instance.id": f"{socket.gethostname()}/{os.getpid()}",
            }
        )
        self.scope = InstrumentationScope("odin_gw")
        self.mesh_kind = mesh_kind
        self._queue_full = metrics.spans_dropped.labels("queue_full")
        self._offered = 0
        self._lock = threading.Lock()  # held for a counter update, never across I/O

    def record(self, exchange: Exchange, end_ns: int) -> None:
        """Queue the spans of a finished, recorded request (``exchange.trace.attempts``
        is not ``None``); ``end_ns``: when its answer was sent (Unix ns)."""
        trace = exchange.trace
        service = exchange.service
        # Only requests for a service: probes, scrapes and admin calls are not traced.
        if service is None or trace is None or trace.attempts is None or not trace.span_id:
            return
        attempts = trace.attempts
        count = 1 + len(attempts)
        with self._lock:
            if self._offered - self.exporter.taken + count > self.max_queue:
                full = True
            else:
                full = False
                self._offered += count
        if full:
            self._queue_full.inc(count)
            return
        trace_int = int(trace.trace_id, 16)
        state = _trace_state(trace.tracestate)
        server = SpanContext(trace_int, int(trace.span_id, 16), False, _SAMPLED, state)
        caller = (
            SpanContext(trace_int, int(trace.caller_span, 16), True, _SAMPLED, state)
            if trace.caller_span
            else None
        )
        status = exchange.status
        attributes = {
            "http.request.method": exchange.method,
            "url.path": exchange.path,
            "http.response.status_code": status,
            "client.address": exchange.client_addr,
            "odin.request_id": exchange.request_id,
            "odin.mesh": self.mesh_kind,
            "odin.retries": exchange.retries,
        }
        attributes["odin.service"] = service
        if exchange.route and exchange.route != service:
            attributes["odin.route"] = exchange.route
        if exchange.target:
            attributes["odin.upstream.endpoint"] = exchange.target
        if exchange.datacenter:
            attributes["odin.mesh.datacenter"] = exchange.datacenter
        if exchange.peer_identity:
            attributes["odin.mesh.peer_identity"] = exchange.peer_identity
        if exchange.error_kind:
            attributes["error.type"] = exchange.error_kind
        on_end = self.processor.on_end
        on_end(
            ReadableSpan(
                f"{exchange.method} {service}",
                server,
                caller,
                self.resource,
                attributes,
                kind=SpanKind.SERVER,
                status=_ERROR if status >= 500 or status == 0 else _OK,
                start_time=trace.start_ns,
                end_time=end_ns,
                instrumentation_scope=self.scope,
            )
        )
        for number, attempt in enumerate(attempts):
            on_end(self._attempt_span(exchange, attempt, number, trace_int, server, end_ns))

    def _attempt_span(self, exchange, attempt, number, trace_int, server, end_ns) -> ReadableSpan:
        endpoint = attempt.endpoint
        attributes = {"http.request.method": exchange.method, "odin.attempt": number}
        if endpoint is not None:
            attributes["server.address"] = endpoint.address
            attributes["server.port"] = endpoint.port
            attributes["url.scheme"] = endpoint.scheme
            if endpoint.identity:
                attributes["odin.mesh.peer_identity"] = endpoint.identity
            if endpoint.datacenter:
                attributes["odin.mesh.datacenter"] = endpoint.datacenter
        if attempt.status:
            attributes["http.response.status_code"] = attempt.status
        failed = attempt.failure is not None or attempt.status >= 400 or not attempt.status
        if attempt.failure is not None:
            attributes["error.type"] = attempt.failure
        return ReadableSpan(
            exchange.method,
            SpanContext(trace_int, int(attempt.span_id, 16), False, _SAMPLED, server.trace_state),
            server,
            self.resource,
            attributes,
            kind=SpanKind.CLIENT,
            status=_ERROR if failed else _OK,
            start_time=attempt.start_ns,
            end_time=attempt.end_ns or end_ns,
            instrumentation_scope=self.scope,
        )

    def close(self, timeout: float = 2.0) -> None:
        """Export what is queued and stop, waiting at most ``timeout`` seconds (the
        SDK's own shutdown may wait 30 s on a collector that does not answer: a stopping
        worker must not)."""
        closer = threading.Thread(
            target=self.processor.shutdown, name="odin-tracing-close", daemon=True
        )
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning("tracing: spans still queued after %.1fs at exit are lost", timeout)


def _otlp_exporter_class():
    """The SDK's OTLP/HTTP span exporter class; a clear error when its protobuf modules
    are not the ones it was built with."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        # xds-protos ships an older copy of opentelemetry-proto's modules at the same
        # paths; installed after opentelemetry-proto, it replaces them.
        raise RuntimeError(
            f"tracing: the OTLP exporter cannot be loaded ({exc}); opentelemetry-proto's "
            "modules were replaced by another package's older copy (xds-protos ships one). "
            "Reinstall it last: pip install --force-reinstall --no-deps "
            "opentelemetry-proto==<the version in requirements.txt>"
        ) from None
    return OTLPSpanExporter


def _trace_state(value: str | None) -> TraceState | None:
    if not value:
        return None
    try:
        return TraceState.from_header([value])
    except ValueError:
        return None
