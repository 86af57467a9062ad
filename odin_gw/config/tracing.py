"""The top-level ``tracing`` section: exporting the gateway's spans over OTLP/HTTP.

Trace context (W3C ``traceparent``/``tracestate``, B3 multi-header and single ``b3``)
is read and propagated whatever this section says; ``enabled`` only decides whether
spans are exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from .fields import Duration, Section, header_problem

#: Appended to an endpoint given without a path, as OTEL_EXPORTER_OTLP_ENDPOINT is.
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class TracingConfig:
    enabled: bool = False
    service_name: str = "odin-gateway"
    #: The full OTLP/HTTP traces URL (``.../v1/traces``).
    endpoint: str | None = None
    #: Head sampling of traces that start at the gateway (``None``: the mesh's rate,
    #: ``istio.samplingRate``, else 1). A caller's decision is always kept.
    sample_rate: float | None = None
    #: ``http://`` endpoints are refused unless this is set.
    insecure: bool = False
    #: Sent with every export (collector credentials): never logged or shown.
    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    timeout: float = 10.0
    max_queue_size: int = 2048
    batch_size: int = 64
    schedule_delay: float = 1.0


class TracingSchema(Section):
    enabled = fields.Boolean(load_default=False)
    service_name = fields.String(
        data_key="serviceName",
        load_default="odin-gateway",
        validate=validate.Length(min=1, max=255),
    )
    endpoint = fields.String(load_default=None, allow_none=True)
    sample_rate = fields.Float(
        data_key="sampleRate", load_default=None, allow_none=True, validate=validate.Range(0, 1)
    )
    insecure = fields.Boolean(load_default=False)
    headers = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    ca_file = fields.String(data_key="caFile", load_default=None, allow_none=True)
    timeout = Duration(load_default=10.0)
    max_queue_size = fields.Integer(
        data_key="maxQueueSize", load_default=2048, validate=validate.Range(64, 1_000_000)
    )
    batch_size = fields.Integer(
        data_key="batchSize", load_default=64, validate=validate.Range(1, 10_000)
    )
    schedule_delay = Duration(data_key="scheduleDelay", load_default=1.0)

    @validates_schema
    def check(self, data, **kwargs):
        problems: dict[str, list[str]] = {}
        endpoint = data.get("endpoint")
        if endpoint is not None:
            problem = _endpoint_problem(endpoint, data.get("insecure", False))
            if problem:
                problems["endpoint"] = [problem]
        elif data.get("enabled"):
            problems["endpoint"] = [
                "required when tracing is enabled (the collector's OTLP/HTTP traces URL, "
                "e.g. http://otel-collector:4318/v1/traces)"
            ]
        for name, value in (data.get("headers") or {}).items():
            problem = header_problem(name, value)
            if problem is not None:
                problems.setdefault("headers", []).append(problem)
        if data.get("batch_size", 0) > data.get("max_queue_size", 2048):
            problems["batchSize"] = ["must not be larger than maxQueueSize"]
        if problems:
            raise ValidationError(problems)

    @post_load
    def build(self, data, **kwargs):
        endpoint = data["endpoint"]
        if endpoint is not None and urlsplit(endpoint).path in ("", "/"):
            endpoint = endpoint.rstrip("/") + TRACES_PATH
        data["endpoint"] = endpoint
        data["headers"] = tuple(data["headers"].items())
        return TracingConfig(**data)


def _endpoint_problem(url: str, insecure: bool) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"invalid URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"invalid URL {url!r}: an http:// or https:// URL with a host is needed"
    if parts.username or parts.password:
        return "credentials in the URL would be logged: put them in tracing.headers"
    if parts.query or parts.fragment:
        return f"invalid URL {url!r}: no query or fragment"
    if parts.scheme == "http" and not insecure:
        return (
            f"{url} is plain HTTP: spans carry paths and addresses; use https://, or set "
            "tracing.insecure: true (a collector on the same host or pod)"
        )
    return None
