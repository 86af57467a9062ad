"""Istio's standard request metrics, reported by the gateway as Istio's own proxies do.

``serviceMesh.istio.enableTelemetry`` meant "report to Mixer"; Mixer was removed in Istio
1.8 and telemetry now comes from each proxy's ``istio.stats`` filter. With
``serviceMesh.type: istio`` and ``enableTelemetry: true`` the gateway exports that filter's
HTTP metrics itself, on its metrics path (``monitoring.path``, so only with
``monitoring.enabled``), in the registry and multi-process mode of :mod:`odin_gw.metrics`.
Istio's Grafana dashboards then read the gateway like any client proxy:

* ``istio_requests_total``: counter;
* ``istio_request_duration_milliseconds``: histogram, in milliseconds;
* ``istio_request_bytes`` and ``istio_response_bytes``: histograms, in bytes.

Names, the 25 labels (:data:`LABELS`) and the values a client-side reporter
(``reporter="source"``, as Istio's ingress gateway reports) gives them follow the filter's
source (istio/proxy ``source/extensions/filters/http/istio_stats/istio_stats.cc``) and the
"Istio Standard Metrics" reference page. The buckets are Envoy's defaults
(:data:`BUCKETS`, ``HistogramSettingsImpl::defaultBuckets``) for all three histograms:
Istio's bootstrap sets no others unless a pod says ``sidecar.istio.io/statsHistogramBuckets``.
gRPC message counters and TCP metrics are not exported: the gateway speaks HTTP/1.1.

Where the gateway differs from Envoy, and why:

* Request and response sizes are body bytes, as the reference page defines them; Envoy's
  filter records wire bytes, so its figures are larger by each message's head. The
  request size is the ``Content-Length``; a chunked request body counts as 0 (it is
  streamed through and not counted). The response size is what the gateway sent
  (``Exchange.response_bytes``).
* Durations are kept in fractions of a millisecond (Envoy truncates to whole ones).
* ``destination_service_namespace`` is the service's configured namespace; Envoy takes it
  from the peer's identity, which names the same namespace for an in-mesh peer.
* A connect timeout is reported ``UT`` like any upstream timeout (the gateway answers 504
  for both); Envoy says ``UF`` for it.

Only proxied requests count: those routed to a service, and the 404s of paths nothing
serves (``response_flags="NR"``, no destination, as Istio's gateways report a request no
route matched). The gateway's other own answers (health, metrics, admin) are not mesh
traffic.

If the gateway's pod also has an Istio sidecar in the request path (``injectSidecar``),
that sidecar reports the same requests as ``reporter="source"`` too: pick one reporter
(or turn the sidecar's metrics merging off) or dashboards count them twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from .errors import (
    ClientDisconnected,
    NoHealthyTarget,
    RouteNotFound,
    UpstreamError,
    UpstreamIdentityError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamUnreachable,
)
from .mesh.xds_node import NodeIdentity

if TYPE_CHECKING:
    from .proxy.exchange import Exchange

log = logging.getLogger("odin_gw.istio")

#: Istio's standard labels, in the order of the stats filter's tag table.
#: How often queued observations reach the metric files (a scrape may lag this much).
FLUSH_INTERVAL = 0.25

LABELS = (
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
)

#: Envoy's default histogram buckets, used by Istio for milliseconds and bytes alike.
BUCKETS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)

UNKNOWN = "unknown"
#: Istio's default canonical revision when a workload has no version label.
LATEST = "latest"
#: Istio's cluster id when ``global.multiCluster.clusterName`` is not set.
DEFAULT_CLUSTER_ID = "Kubernetes"
SERVICE_DOMAIN = ".svc.cluster.local"
#: Envoy's ``%RESPONSE_FLAGS%`` when nothing happened worth a flag.
NO_FLAGS = "-"

#: ``Exchange.error_kind`` -> Envoy's response flag (its short form, as Istio labels it).
RESPONSE_FLAGS = {
    RouteNotFound.code: "NR",  # no route: 404
    NoHealthyTarget.code: "UH",  # no healthy upstream: 503
    UpstreamUnreachable.code: "UF",  # connection failure
    UpstreamTlsError.code: "UF",  # Envoy: a failed handshake is a connection failure
    UpstreamIdentityError.code: "UF",  # a SAN mismatch fails Envoy's handshake the same way
    UpstreamTimeout.code: "UT",  # upstream request timeout: 504
    UpstreamProtocolError.code: "UPE",  # the answer broke HTTP
    UpstreamError.code: "UC",  # the upstream closed the connection before answering
    "body_interrupted": "UC",  # (forwarder) it closed or stalled in the middle of the body
    ClientDisconnected.code: "DC",  # downstream connection termination
}
# Flags of requests that never had a connection to a peer: no peer identity to report.
_UNCONNECTED = frozenset({"NR", "UH", "UF"})
# At most this many label sets are remembered (status codes x services x flags is small).
MAX_CACHED = 10000


@dataclass(frozen=True)
class Workload:
    """What Istio knows of a workload: its pod's node metadata, or a peer's.

    The defaults are the values Istio reports when it knows nothing of the workload.
    """

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    #: The SPIFFE ID it presents in mutual TLS.
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = LATEST
    cluster: str = UNKNOWN

    @classmethod
    def from_node(cls, node: NodeIdentity) -> Workload:
        """The gateway itself, from the node metadata it presents to istiod: what Envoy's
        stats filter reads for a proxy's own labels.

        :meth:`NodeIdentity.from_env <odin_gw.mesh.xds_node.NodeIdentity.from_env>` reads
        the pod's environment as Istio's injection template sets it:

        - ``source_workload``: ``ISTIO_META_WORKLOAD_NAME``, else ``POD_NAME`` (else the
          host name) without a Deployment pod's two suffixes;
        - ``source_workload_namespace``: ``POD_NAMESPACE``, else ``serviceMesh.namespace``;
        - ``source_cluster``: ``ISTIO_META_CLUSTER_ID``, else ``Kubernetes``;
        - the pod's labels, a JSON object in ``ISTIO_METAJSON_LABELS``: ``app`` and
          ``version`` (else ``unknown``), ``service.istio.io/canonical-name`` (else
          ``app.kubernetes.io/name``, the app, the workload) and
          ``service.istio.io/canonical-revision`` (else ``app.kubernetes.io/version``,
          the version, ``latest``): the canonical defaults Istio's injector gives a pod.

        The principal is the SPIFFE ID of the gateway's mesh certificate, known per
        request (see :meth:`IstioTelemetry.labels_for`).
        """
        meta = node.metadata
        labels = meta.get("LABELS")
        labels = labels if isinstance(labels, Mapping) else {}
        workload = str(meta.get("WORKLOAD_NAME") or UNKNOWN)
        app = labels.get("app")
        version = labels.get("version")
        return cls(
            workload=workload,
            namespace=node.namespace,
            app=app or UNKNOWN,
            version=version or UNKNOWN,
            canonical_service=labels.get("service.istio.io/canonical-name")
            or labels.get("app.kubernetes.io/name")
            or app
            or workload,
            canonical_revision=labels.get("service.istio.io/canonical-revision")
            or labels.get("app.kubernetes.io/version")
            or version
            or LATEST,
            cluster=node.cluster_id or DEFAULT_CLUSTER_ID,
        )


def spiffe_namespace(principal: str) -> str | None:
    """The namespace in ``spiffe://<td>/ns/<ns>/sa/<sa>`` (how the filter reads a peer's)."""
    _, found, rest = principal.partition("/ns/")
    if not found:
        return None
    return rest.split("/", 1)[0] or None


@dataclass(frozen=True)
class Destination:
    """The Kubernetes service a route sends to, as Istio names it."""

    service: str
    name: str
    namespace: str

    @classmethod
    def of(cls, mesh_service: str, namespace: str) -> Destination:
        """``reviews`` in ``shop`` -> ``reviews.shop.svc.cluster.local``: the host the
        gateway asks istiod for (:mod:`odin_gw.mesh.istio`) or sends its sidecar to."""
        return cls(f"{mesh_service}.{namespace}{SERVICE_DOMAIN}", mesh_service, namespace)


#: A request no route matched: Istio's gateways report it against no service.
NO_DESTINATION = Destination(UNKNOWN, UNKNOWN, UNKNOWN)
NO_PEER = Workload()


class IstioTelemetry:
    """The four HTTP metrics of Istio's stats filter, for the requests the gateway proxies.

    ``registry`` is :attr:`GatewayMetrics.registry <odin_gw.metrics.GatewayMetrics.registry>`
    (``None`` in multi-process mode). ``destinations`` maps route names to their
    :class:`Destination`; ``local_principal`` returns the SPIFFE ID of the gateway's mesh
    certificate (or ``None``), asked only when a new label set is built.
    """

    def __init__(
        self,
        registry,
        source: Workload,
        destinations: Mapping[str, Destination],
        local_principal: Callable[[], str | None] = lambda: None,
    ) -> None:
        kw = {"registry": registry}
        self.requests = Counter("istio_requests_total", "Requests proxied", LABELS, **kw)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Time from the request's first byte to the response's last, in milliseconds",
            LABELS,
            buckets=BUCKETS,
            **kw,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request body sizes", LABELS, buckets=BUCKETS, **kw
        )
        self.response_bytes = Histogram(
            "istio_response_bytes", "Response body sizes", LABELS, buckets=BUCKETS, **kw
        )
        self.source = source
        self.destinations = dict(destinations)
        self._local_principal = local_principal
        self._cache: dict[tuple, tuple] = {}
        # Observations wait here for the flusher (see ``observe``); deque appends and
        # pops are atomic, so request threads take no lock.
        self._pending: deque[tuple] = deque()
        self._flusher_pid = 0
        self._flush_lock = threading.Lock()  # one drain at a time (flusher or exit)

    def observe(
        self, exchange: Exchange, seconds: float, environ: Mapping, peer: Workload | None = None
    ) -> None:
        """Record one finished request (called when its response is closed).

        ``environ`` gives the request size (``CONTENT_LENGTH``). ``peer`` is the hook for
        what Istio learns of the destination workload by metadata exchange (name, app,
        version, principal...), once something gives it; without it the destination
        principal is the SPIFFE ID the chosen endpoint had to present (mesh mTLS), else
        ``unknown``, like every other destination workload label.
        """
        # The destination is the backend group's service when a rule or split chose one.
        service = exchange.route or exchange.service
        status = exchange.status
        if service is None and status != 404:
            return  # the gateway's own answers: not mesh traffic
        target = exchange.target
        # Only a target with an identity (``...#spiffe://...``) changes the labels.
        key = (
            service,
            status,
            exchange.error_kind,
            target if target and "#" in target else None,
            peer,
        )
        children = self._cache.get(key)
        if children is None:
            children = self._children(key)
        length = environ.get("CONTENT_LENGTH")
        size = int(length) if length and length.isdecimal() else 0
        # Like Envoy's stats flush: the request thread only queues its numbers; a flusher
        # thread writes them into the multi-process files every FLUSH_INTERVAL. Each
        # file write takes prometheus-client's process-wide lock and checks the pid: four
        # of them per request cost about 4% of a busy worker under concurrency.
        self._pending.append((children, seconds * 1000.0, size, exchange.response_bytes))
        if self._flusher_pid != os.getpid():
            self._start_flusher()

    def flush(self) -> None:
        """Write every queued observation (the flusher's work; also at exit)."""
        with self._flush_lock:
            pending = self._pending
            while pending:
                try:
                    children, ms, size, sent = pending.popleft()
                except IndexError:
                    return
                children[0].inc()
                children[1].observe(ms)
                children[2].observe(size)
                children[3].observe(sent)

    def _start_flusher(self) -> None:
        with self._flush_lock:
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()  # a forked child starts its own
        thread = threading.Thread(target=self._flush_loop, name="odin-istio-stats", daemon=True)
        thread.start()
        atexit.register(self.flush)

    def _flush_loop(self) -> None:
        stop = threading.Event()  # never set: the thread ends with its process
        while not stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except Exception:  # a metrics write must never end the flusher
                log.exception("istio telemetry flush failed")

    def _children(self, key: tuple) -> tuple:
        labels = self.labels_for(*key)
        children = (
            self.requests.labels(**labels),
            self.duration.labels(**labels),
            self.request_bytes.labels(**labels),
            self.response_bytes.labels(**labels),
        )
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = children
        return children

    def labels_for(
        self,
        service: str | None,
        status: int,
        error_kind: str | None = None,
        target: str | None = None,
        peer: Workload | None = None,
    ) -> dict[str, str]:
        """The labels of a request to route ``service`` (``None``: no route matched)."""
        if error_kind:
            flags = RESPONSE_FLAGS.get(error_kind, NO_FLAGS)
        else:
            flags = "NR" if service is None else NO_FLAGS
        destination = self.destinations.get(service, NO_DESTINATION)  # None: no route
        if peer is None:
            identity = target.partition("#")[2] if target else ""
            if identity and flags not in _UNCONNECTED:
                peer = Workload(principal=identity)  # the forwarder checked it was presented
            else:
                peer = NO_PEER
        # The filter takes the peer's namespace from its SPIFFE ID when there is one.
        peer_namespace = spiffe_namespace(peer.principal) or peer.namespace
        source = self.source
        # Our certificate was presented exactly when the peer's identity is known.
        source_principal = source.principal
        if peer.principal != UNKNOWN:
            source_principal = self._local_principal() or source_principal
        return {
            "reporter": "source",
            "source_workload": source.workload,
            "source_workload_namespace": source.namespace,
            "source_principal": source_principal,
            "source_app": source.app,
            "source_version": source.version,
            "source_canonical_service": source.canonical_service,
            "source_canonical_revision": source.canonical_revision,
            "source_cluster": source.cluster,
            "destination_workload": peer.workload,
            "destination_workload_namespace": peer_namespace,
            "destination_principal": peer.principal,
            "destination_app": peer.app,
            "destination_version": peer.version,
            "destination_service": destination.service,
            "destination_service_name": destination.name,
            "destination_service_namespace": destination.namespace,
            "destination_canonical_service": peer.canonical_service,
            "destination_canonical_revision": peer.canonical_revision,
            "destination_cluster": peer.cluster,
            "request_protocol": "http",  # gRPC needs HTTP/2, which the gateway does not speak
            "response_flags": flags,
            # A source reporter cannot know the server's policy: Istio says "unknown".
            "connection_security_policy": UNKNOWN,
            "response_code": str(status),
            "grpc_response_status": "",  # Istio's value for a request that is not gRPC
        }


def istio_telemetry(gateway) -> IstioTelemetry | None:
    """A new :class:`IstioTelemetry` for ``gateway``, or ``None`` (nothing registered)
    unless ``serviceMesh.type`` is ``istio`` with ``enableTelemetry`` and monitoring is on.

    Called once per app (by its request hooks): it registers the metrics.
    """
    config = gateway.config
    mesh = config.service_mesh
    if mesh.kind != "istio" or not mesh.istio.enable_telemetry:
        return None
    if not config.monitoring.enabled:
        log.warning(
            "serviceMesh.istio.enableTelemetry: monitoring is disabled, so Istio's standard "
            "metrics are not exported (set monitoring.enabled)"
        )
        return None
    destinations = {
        route.name: Destination.of(route.mesh_service, mesh.namespace) for route in gateway.routes
    }
    return IstioTelemetry(
        gateway.metrics.registry,
        Workload.from_node(NodeIdentity.from_env(mesh, os.environ)),
        destinations,
        local_principal=lambda: _spiffe_id(getattr(gateway.mesh, "tls", None)),
    )


def _spiffe_id(material) -> str | None:
    facts = getattr(material, "facts", None)
    return facts.spiffe_ids[0] if facts is not None and facts.spiffe_ids else None
