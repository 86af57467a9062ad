"""Mesh header injectors, each a small class named for the events it handles.

``request`` runs in a Flask ``before_request`` hook (once per request), ``upstream`` once
per attempt after an endpoint is chosen. ``strip`` and ``strip_prefixes`` name the
environ keys of client headers that never pass through (a spoofed mesh header is a
security hole); the forwarder drops them before any injector adds its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, MutableMapping
from time import time_ns

from ..config.model import ConsulConfig, MeshConfig, ServiceConfig
from ..proxy.exchange import Exchange
from ..proxy.headers import UNTRUSTED_ONLY, env_key, upstream_headers
from .snapshot import Endpoint
from .tracing import (
    Attempt,
    Trace,
    b3_single,
    extract,
    new_span_id,
    new_trace_id,
    sampler,
    traceparent,
)

log = logging.getLogger("odin_gw.mesh")


class MeshHeaders:
    """Base injector: adds nothing, strips nothing."""

    strip: frozenset[str] = frozenset()
    strip_prefixes: tuple[str, ...] = ()

    def request(self, exchange: Exchange, environ: dict) -> None:
        """Called once per request in a ``before_request`` hook; may append to
        ``exchange.mesh_headers`` (trace ids, for instance)."""

    def upstream(
        self, exchange: Exchange, endpoint: Endpoint, headers: MutableMapping[str, str]
    ) -> None:
        """Called for each attempt with the chosen endpoint and the outgoing headers
        (case-insensitive: ``headers[name] = value`` replaces a client's copy in any case)."""


class ConsulHeaders(MeshHeaders):
    """The spec's "Consul Headers", minus the ACL token unless the operator opts in.

    ``X-Consul-Datacenter`` names the datacenter of the instance that serves the request.
    ``X-Consul-Token`` from a client is always stripped; the gateway's own token is only
    sent with ``consul.forwardToken: true`` (it would hand the ACL token to every backend).
    """

    strip = frozenset({"HTTP_X_CONSUL_TOKEN", "HTTP_X_CONSUL_DATACENTER"})

    def __init__(self, consul: ConsulConfig) -> None:
        self.local_dc = consul.datacenter
        self.token = consul.token if consul.forward_token else None

    def upstream(
        self, exchange: Exchange, endpoint: Endpoint, headers: MutableMapping[str, str]
    ) -> None:
        dc = endpoint.datacenter or self.local_dc
        if dc:
            headers["X-Consul-Datacenter"] = dc
        if self.token:
            headers["X-Consul-Token"] = self.token


class TraceHeaders(MeshHeaders):
    """B3 and W3C trace context, for every mesh type (and none).

    Per request (:meth:`request`): the trace is continued from ``b3``, ``x-b3-*`` or
    ``traceparent`` (see :mod:`odin_gw.mesh.tracing`), or a new one starts; the
    exchange gets its :class:`~odin_gw.mesh.tracing.Trace`, and ``X-B3-TraceId``,
    ``X-B3-Sampled`` (kept, else decided by ``sampling_rate``), ``X-B3-ParentSpanId``
    (the hop's parent: the gateway's span when spans are recorded, else the caller's
    span when there was one), ``X-B3-Flags: 1`` (debug, when asked) and ``tracestate``
    (with its own trace only) are added.

    Per attempt (:meth:`upstream`): a new ``X-B3-SpanId`` and the matching
    ``traceparent`` (and ``b3``, when the context came in that single header), so each
    try, a retry on another endpoint too, is its own hop; a recorded trace notes the
    attempt (:class:`~odin_gw.mesh.tracing.Attempt`) for the exported span.

    Stripped from clients: the trace headers above (re-sent consistent, never raw).
    """

    strip = frozenset({"HTTP_B3", "HTTP_TRACEPARENT", "HTTP_TRACESTATE"})
    strip_prefixes: tuple[str, ...] = ("HTTP_X_B3_",)

    def __init__(self, sampling_rate: float = 1.0, recording: bool = False) -> None:
        self.decide = sampler(sampling_rate)  # () -> "1" | "0"
        self.recording = recording  # spans are exported (tracing.enabled)

    def request(self, exchange: Exchange, environ: dict) -> None:
        inbound = extract(environ)
        sampled = inbound.sampled or self.decide()
        trace = Trace(
            inbound,
            inbound.trace_id or new_trace_id(),
            sampled,
            self.recording and sampled == "1",
        )
        exchange.trace = trace
        add = exchange.mesh_headers.append
        add(("X-B3-TraceId", trace.trace_id))
        parent = trace.hop_parent
        if parent is not None:
            add(("X-B3-ParentSpanId", parent))
        add(("X-B3-Sampled", sampled))
        if inbound.debug:
            add(("X-B3-Flags", "1"))
        if inbound.tracestate is not None:
            add(("tracestate", inbound.tracestate))

    def upstream(
        self, exchange: Exchange, endpoint: Endpoint, headers: MutableMapping[str, str]
    ) -> None:
        self.new_span(headers, exchange, endpoint)

    def new_span(
        self,
        headers: MutableMapping[str, str],
        exchange: Exchange | None = None,
        endpoint: Endpoint | None = None,
    ) -> tuple[str, str, str]:
        """A new span for this attempt: ``(trace id, span id, sampled)`` as sent."""
        # The trace id and decision are read back from what will be sent, so the span and
        # traceparent always agree with them.
        trace_id = headers.get("X-B3-TraceId")
        sampled = headers.get("X-B3-Sampled")
        if trace_id is None or sampled is None:  # request() did not run: a trace of its own
            trace_id = headers["X-B3-TraceId"] = new_trace_id()
            sampled = headers["X-B3-Sampled"] = self.decide()
        span = new_span_id()
        headers["X-B3-SpanId"] = span
        headers["traceparent"] = traceparent(trace_id, span, sampled)
        trace = exchange.trace if exchange is not None else None
        if trace is not None:
            if trace.single:
                headers["b3"] = b3_single(
                    trace_id, span, sampled, trace.debug, headers.get("X-B3-ParentSpanId")
                )
            if trace.attempts is not None:
                trace.attempts.append(Attempt(span, endpoint, time_ns()))
        return trace_id, span, sampled


class IstioHeaders(TraceHeaders):
    """The spec's "Istio Headers", as today's Istio and Envoy read them.

    The trace headers of :class:`TraceHeaders` (sampling by ``tracing.sampleRate``, else
    ``istio.samplingRate``),
    plus ``X-Envoy-Namespace`` (``serviceMesh.namespace``). ``X-Request-Id`` is the
    exchange's (kept when sane, else a new UUID).

    Stripped from clients, besides the trace headers: every ``x-envoy-*``. Those steer
    the gateway's own sidecar and the target's (timeouts, retries, routing:
    ``x-envoy-upstream-rq-timeout-ms``, ``x-envoy-retry-on``, ``x-envoy-max-retries``...),
    so a client must never set them, even when ``istio.customHeaders`` lists one (a
    warning at start says so).

    ``istio.customHeaders`` are copied as received from the client, whatever else would
    have dropped them (a ``Connection`` header naming them, for instance), except names
    the gateway decides itself, each reported once at start: trace headers and
    ``X-Request-Id`` (propagated by the rules above: a valid id continues unchanged, an
    invalid one would break the trace), ``x-envoy-*``, hop-by-hop and framing headers,
    forwarding headers (``Host``, ``X-Forwarded-*``, ``Forwarded``...: trust is
    ``server.trustedProxies``'s call), and names a service sets in its ``headers`` (the
    service's value must win; other services still get the client's copy as an ordinary
    header).
    """

    strip_prefixes = ("HTTP_X_B3_", "HTTP_X_ENVOY_")

    def __init__(
        self,
        mesh: MeshConfig,
        services: Iterable[ServiceConfig] = (),
        sampling_rate: float | None = None,
        recording: bool = False,
    ) -> None:
        rate = mesh.istio.sampling_rate if sampling_rate is None else sampling_rate
        super().__init__(rate, recording)
        self.namespace = ("X-Envoy-Namespace", mesh.namespace)
        self.custom = _custom_copies(mesh.istio.custom_headers, services)

    def request(self, exchange: Exchange, environ: dict) -> None:
        super().request(exchange, environ)
        add = exchange.mesh_headers.append
        add(self.namespace)
        for key, name in self.custom:
            value = environ.get(key)
            if value is not None:
                add((name, value))


# Trace headers the gateway continues itself (IstioHeaders), besides the x-b3-* prefix.
_TRACE_NAMES = frozenset({"x-request-id", "b3", "traceparent", "tracestate"})
# Body framing is the gateway's: a copied Content-Length would desynchronise the stream.
_FRAMING = frozenset({"content-length", "content-type", "transfer-encoding"})


def _custom_copies(
    names: Iterable[str], services: Iterable[ServiceConfig]
) -> tuple[tuple[str, str], ...]:
    """``(environ key, header name)`` of the ``istio.customHeaders`` copied as received;
    the names refused are logged (see :class:`IstioHeaders`)."""
    set_by_service = {name.lower() for svc in services for name, _ in svc.headers}
    copies: dict[str, tuple[str, str]] = {}
    for name in names:
        lower, key = name.lower(), env_key(name)
        if lower in _TRACE_NAMES or lower.startswith("x-b3-"):
            log.info(
                "istio.customHeaders %s: a trace header, propagated by the trace rules "
                "(a valid incoming value continues, an invalid one is replaced)",
                name,
            )
        elif lower.startswith("x-envoy-"):
            log.warning(
                "istio.customHeaders %s: x-envoy-* headers steer Envoy (timeouts, retries, "
                "routing) and are always stripped from clients; it is not propagated",
                name,
            )
        elif lower in _FRAMING or not upstream_headers({key: "x"}, UNTRUSTED_ONLY):
            # upstream_headers() keeps no hop-by-hop header and none the gateway sets
            # itself (Host, X-Forwarded-*, X-Real-IP) or believes only from trusted proxies.
            log.warning(
                "istio.customHeaders %s: hop-by-hop, framing or forwarding header set by "
                "the gateway itself (see server.trustedProxies); a client's copy is not "
                "propagated",
                name,
            )
        elif lower in set_by_service:
            log.warning(
                "istio.customHeaders %s: a service sets it in its headers, and that value "
                "wins; to other services the client's copy goes as an ordinary header",
                name,
            )
        else:
            copies.setdefault(lower, (key, name))
    return tuple(copies.values())


def injectors_for(config) -> list[MeshHeaders]:
    """The injector pipeline for the configured mesh (order = call order). Trace
    context is propagated whatever the mesh (:class:`TraceHeaders` or a subclass)."""
    mesh = config.service_mesh
    tracing = config.tracing
    rate = tracing.sample_rate
    if rate is None:
        rate = mesh.istio.sampling_rate if mesh.kind == "istio" else 1.0
    recording = tracing.enabled
    if mesh.kind == "consul":
        if mesh.consul.forward_token and mesh.consul.token:
            log.warning(
                "consul.forwardToken is on: the gateway's Consul ACL token is sent to every "
                "backend as X-Consul-Token; any backend can then act on Consul with it"
            )
        return [TraceHeaders(rate, recording), ConsulHeaders(mesh.consul)]
    if mesh.kind == "istio":  # sidecar and direct mode alike
        return [IstioHeaders(mesh, config.backends, rate, recording)]
    if mesh.kind == "linkerd":
        from .linkerd import LinkerdHeaders

        return [LinkerdHeaders(config, rate, recording)]
    return [TraceHeaders(rate, recording)]
