"""An OTLP/HTTP trace receiver on loopback, as an OpenTelemetry Collector's ``otlp``
receiver answers (https://opentelemetry.io/docs/specs/otlp/#otlphttp):

- ``POST /v1/traces`` with ``Content-Type: application/x-protobuf`` (optionally
  ``Content-Encoding: gzip``): the body is decoded as an ``ExportTraceServiceRequest``
  by the ``opentelemetry-proto`` package; success is ``200`` with an (empty)
  ``ExportTraceServiceResponse`` in protobuf;
- another path is ``404``, another method ``405``, another content type ``415``, a body
  that does not decode ``400`` with a ``google.rpc.Status`` body;
- ``mode`` switches failures on: ``"unavailable"`` answers ``503`` (retryable for the
  client, with ``Retry-After: 1``), ``"bad"`` answers ``400`` (not retryable), ``"hang"``
  holds each request until released or ``hang_limit`` seconds pass.

Decoded spans are kept flattened (``spans``), with their resource attributes and the
request headers that brought them.
"""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(pairs) -> dict:
    """An OTLP ``repeated KeyValue`` as a dict."""
    return {kv.key: _value(kv.value) for kv in pairs}


class ReceivedSpan:
    """One decoded span: ids as lower-case hex, attributes as a dict."""

    def __init__(self, span, resource: dict, scope: str, headers: dict) -> None:
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_span_id = span.parent_span_id.hex() or None
        self.name = span.name
        self.kind = span.kind  # opentelemetry.proto.trace.v1.Span.SpanKind value
        self.start = span.start_time_unix_nano
        self.end = span.end_time_unix_nano
        self.attributes = attributes(span.attributes)
        self.status_code = span.status.code
        self.trace_state = span.trace_state
        self.resource = resource
        self.scope = scope
        self.headers = headers

    def __repr__(self) -> str:
        return f"<span {self.name} {self.span_id} parent={self.parent_span_id}>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _status(self, status: int, message: str) -> None:
        self._answer(status, status_pb2.Status(code=3, message=message).SerializeToString())

    def do_GET(self) -> None:
        self._status(405, "method not allowed")

    def do_POST(self) -> None:
        srv = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with srv.lock:
            srv.posts += 1
        if self.path != "/v1/traces":
            self._status(404, "not found")
            return
        if self.headers.get("Content-Type", "").split(";")[0] != "application/x-protobuf":
            self._status(415, "unsupported content type")
            return
        mode = srv.mode
        if mode == "hang":
            srv.release.wait(srv.hang_limit)
        elif mode == "unavailable":
            self._answer(503, b"", {"Retry-After": "1"})
            return
        elif mode == "bad":
            self._status(400, "refused by the test")
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            self._status(400, f"undecodable: {exc}")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        spans = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans.append(ReceivedSpan(span, resource, ss.scope.name, headers))
        with srv.lock:
            srv.spans.extend(spans)
        self._answer(200, ExportTraceServiceResponse().SerializeToString())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []
        self.posts = 0
        self.mode = "ok"
        self.release = threading.Event()
        self.hang_limit = 30.0


class OtlpReceiver:
    """``with OtlpReceiver() as r: ... r.endpoint ... r.wait_for(n)``."""

    def __init__(self) -> None:
        self._server = _Server()
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.release.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._server.lock:
            return list(self._server.spans)

    @property
    def posts(self) -> int:
        return self._server.posts

    def set_mode(self, mode: str) -> None:
        """``ok``, ``unavailable``, ``bad`` or ``hang`` (see the module docstring)."""
        self._server.mode = mode
        if mode == "hang":
            self._server.release.clear()
        else:
            self._server.release.set()

    def wait_for(self, count: int, timeout: float = 10.0, **match) -> list[ReceivedSpan]:
        """At least ``count`` spans whose attributes/fields equal ``match`` (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.spans if _matches(s, match)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def _matches(span: ReceivedSpan, match: dict) -> bool:
    for key, want in match.items():
        got = getattr(span, key) if hasattr(span, key) else span.attributes.get(key)
        if got != want:
            return False
    return True
