"""Linkerd 2 ingress mode: the headers the gateway's own Linkerd proxy routes by.

The gateway runs meshed with ``linkerd.io/inject: ingress``. Its Linkerd proxy does mTLS
and load balancing, and in ingress mode it picks the destination by
``l5d-dst-override: <service>.<namespace>.svc.cluster.local:<port>`` (and removes the
header before forwarding). So the gateway sends each request to the service's cluster
name (or its ``targets``), never to a pod it picked itself: the proxy's per-route
features (ServiceProfiles, retries, timeouts, traffic splits) need it to choose.
Discovery (Kubernetes EndpointSlices) is shown on the admin API only.

Headers (:class:`LinkerdHeaders`):

- every ``l5d-*`` header a client sends is stripped first: ``l5d-dst-override`` from
  outside would make the gateway an open relay into the cluster, ``l5d-require-id`` and
  the context headers would steer or forge what the proxy and services see;
- ``l5d-dst-override`` per service, and ``l5d-require-id`` when the service names an
  ``identity`` (the proxy then refuses a peer presenting another one);
- the trace continued as B3 and W3C headers (Linkerd 2's proxies propagate those);
- unless ``linkerd.legacyHeaders: false``, the spec's Linkerd 1 context headers:
  ``l5d-reqid`` (the request id), ``l5d-ctx-deadline`` (``"<start ns> <deadline ns>"``
  since the epoch, the deadline the route's timeout implies) and ``l5d-ctx-trace``
  (Finagle's trace id serialisation, base64: span id, parent id, low 64 bits of the
  trace id, flags, then the high 64 bits for a 128-bit trace; flags 1 debug, 2 sampling
  known, 4 sampled), consistent with the B3 ids sent alongside. Linkerd 2 ignores them.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import MutableMapping

from ..config.model import GatewayConfig
from ..proxy.exchange import Exchange
from .cluster_names import cluster_service
from .headers import TraceHeaders
from .snapshot import Endpoint

log = logging.getLogger("odin_gw.mesh")

#: What ``/admin/services`` says about where requests go in ingress mode.
INGRESS_NOTE = (
    "Linkerd ingress mode: the gateway's own Linkerd proxy picks the pod by "
    "l5d-dst-override and does mTLS and load balancing; the endpoints listed come from "
    "Kubernetes EndpointSlices and are shown, not picked"
)

_FLAG_DEBUG = 1
_FLAG_SAMPLING_KNOWN = 2
_FLAG_SAMPLED = 4


def linkerd_identity(identity: str, namespace: str, trust_domain: str | None) -> str:
    """The proxy identity ``identity`` stands for: a name with dots is taken as a whole
    identity; a bare service account becomes
    ``<sa>.<namespace>.serviceaccount.identity.linkerd.<trust domain>``."""
    if "." in identity:
        return identity
    return (
        f"{identity}.{namespace}.serviceaccount.identity.linkerd.{trust_domain or 'cluster.local'}"
    )


def ctx_trace(trace: str, span: str, parent: str | None, sampled: str, debug: bool) -> str:
    """``l5d-ctx-trace`` for B3 ids (hex): Finagle's serialisation, base64.

    A root span is its own parent in Finagle, so ``parent`` defaults to ``span``.
    """
    flags = _FLAG_SAMPLING_KNOWN | (_FLAG_SAMPLED if sampled == "1" else 0)
    if debug:
        flags |= _FLAG_DEBUG
    high, low = (trace[:16], trace[16:]) if len(trace) == 32 else ("", trace)
    raw = bytes.fromhex(span + (parent or span) + low) + flags.to_bytes(8, "big")
    if high:
        raw += bytes.fromhex(high)
    return base64.b64encode(raw).decode("ascii")


def ctx_deadline(started_wall: float, timeout: float) -> str:
    """``l5d-ctx-deadline``: ``"<timestamp ns> <deadline ns>"`` since the epoch."""
    start = int(started_wall * 1e9)
    return f"{start} {start + int(timeout * 1e9)}"


class LinkerdHeaders(TraceHeaders):
    """The ingress-mode headers (see the module docstring), per service."""

    strip_prefixes = ("HTTP_X_B3_", "HTTP_L5D_")

    def __init__(
        self, config: GatewayConfig, sampling_rate: float = 1.0, recording: bool = False
    ) -> None:
        super().__init__(sampling_rate, recording)
        mesh = config.service_mesh
        self.legacy = mesh.linkerd.legacy_headers
        # route name -> (l5d-dst-override, l5d-require-id or None, the route's timeout)
        self.per_route: dict[str, tuple[str, str | None, float]] = {}
        for svc in config.backends:
            cs = cluster_service(svc, config)
            required = (
                linkerd_identity(svc.identity, cs.namespace, mesh.trust_domain)
                if svc.identity
                else None
            )
            timeout = svc.timeout or config.server.timeout
            self.per_route[svc.name] = (cs.authority, required, timeout)

    def request(self, exchange: Exchange, environ: dict) -> None:
        super().request(exchange, environ)
        if self.legacy:
            exchange.mesh_headers.append(("l5d-reqid", exchange.request_id))

    def upstream(
        self, exchange: Exchange, endpoint: Endpoint, headers: MutableMapping[str, str]
    ) -> None:
        trace, span, sampled = self.new_span(headers, exchange, endpoint)
        # The backend group's own Service when a rule or split chose one.
        route = self.per_route.get(exchange.route or exchange.service or "")
        if route is not None:
            authority, required, timeout = route
            headers["l5d-dst-override"] = authority
            if required:
                headers["l5d-require-id"] = required
                exchange.peer_identity = required
            if self.legacy:
                started = time.time() - exchange.elapsed()
                # The forwarder's deadline (a ServiceProfile route may shorten it).
                headers["l5d-ctx-deadline"] = ctx_deadline(started, exchange.timeout or timeout)
        if self.legacy:
            parent = headers.get("X-B3-ParentSpanId")
            debug = headers.get("X-B3-Flags") == "1"
            headers["l5d-ctx-trace"] = ctx_trace(trace, span, parent, sampled, debug)


def describe(config: GatewayConfig) -> list[str]:
    """The start-up lines for ``serviceMesh.type: linkerd``."""
    mesh = config.service_mesh
    lines = [
        "linkerd ingress mode: requests go to each service's cluster name (or its "
        "targets) with l5d-dst-override; the gateway's own Linkerd proxy (inject: "
        "ingress) picks the pod and does mTLS; client l5d-* headers are stripped"
    ]
    if mesh.linkerd.legacy_headers:
        lines.append(
            "linkerd: l5d-reqid, l5d-ctx-deadline and l5d-ctx-trace are Linkerd 1 context "
            "headers that Linkerd 2 ignores (sent for applications that read them; "
            "linkerd.legacyHeaders: false turns them off)"
        )
    if mesh.cert_file or mesh.key_file or mesh.ca_file:
        lines.append(
            "linkerd: certFile/keyFile/caFile are not used: the Linkerd proxy holds the "
            "workload certificate in memory and does mTLS"
        )
    return lines
