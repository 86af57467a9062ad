"""istiod over xDS: an ADS client that follows the gateway's clusters (CDS + EDS).

Three layers, each usable on its own:

* decoding (:func:`decode_clusters`, :func:`decode_endpoints`): protobuf resources from
  ``xds-protos`` into the frozen dataclasses below, or :class:`Rejected` with the reason
  the update is unusable. No protobuf object leaves this module.
* :class:`AdsProtocol`: the conversation of one stream, without I/O: which requests to
  send, ACK or NACK of each response, and when the state is complete.
* :class:`AdsClient`: the gRPC stream to istiod (TLS + token on 15012, plaintext on
  15010, or a local istio-agent's unix socket), ``fetch`` and ``watch``.

Facts from istio's source this relies on: a ``router`` node gets every cluster of the
mesh from CDS (wildcard, state of the world: a cluster missing from a CDS update is gone);
EDS pushes may carry only the clusters that changed (``pilot/pkg/xds/eds.go``), so EDS
updates are merged; every requested EDS name gets an assignment, empty when the service
has no endpoints; istiod ignores a request with a stale nonce and does not answer a NACK
(``pkg/xds/server.go`` ``ShouldRespond``). Endpoint metadata holds
``envoy.transport_socket_match: {tlsMode: istio}`` for endpoints with a sidecar and
``istio: {workload: "<name>;<ns>;<canonical svc>;<rev>;<cluster>"}``; no service account
(``pilot/pkg/networking/util/util.go`` ``AppendLbEndpointMetadata``), so
:attr:`XdsEndpoint.service_account` stays ``None`` with istiod: the identities a cluster
accepts are its SANs. Auto-mTLS clusters carry transport socket matches ``tlsMode-istio``
(an ``UpstreamTlsContext`` with SNI ``outbound_.<port>_._.<host>``, ALPN ``istio-peer-
exchange, istio`` and SAN matchers) and ``tlsMode-disabled`` (raw buffer)
(``pilot/pkg/networking/core/cluster_tls.go``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import message as pb_message
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from .. import __version__
from ..errors import MeshError
from .xds_node import NodeIdentity, PilotTarget, read_ca, read_token

log = logging.getLogger("odin_gw.mesh.xds")

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TLS_CONTEXT_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
#: A state-of-the-world response may wrap each resource in ``discovery.v3.Resource``.
RESOURCE_TYPE = "type.googleapis.com/envoy.service.discovery.v3.Resource"
SHORT_TYPES = {CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS"}
#: Where istiod marks an endpoint that has a sidecar (``tlsMode: istio``).
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
#: The status code Envoy puts in a NACK's ``error_detail``.
NACK_CODE = grpc.StatusCode.INTERNAL.value[0]
#: How often a stream's guard looks at the stop event, close() and the deadline.
POLL = 0.1
#: How long ``fetch`` waits for its last ACK to leave and istiod to close the stream.
FLUSH_WAIT = 1.0
#: Keepalive as pilot-agent's dial options (istio ``pkg/keepalive`` defaults).
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class XdsEndpoint:
    """One endpoint of an EDS cluster load assignment."""

    address: str
    port: int
    #: "HEALTHY" | "UNHEALTHY" | "DRAINING" | "UNKNOWN" | "TIMEOUT" | "DEGRADED"
    health: str
    #: load_balancing_weight (1 when unset)
    weight: int
    #: region, zone, subzone
    locality: tuple[str, str, str]
    #: ``filter_metadata["envoy.transport_socket_match"]["tlsMode"]``: "istio" = has a sidecar
    tls_mode: str | None
    #: Never sent by istiod (see the module docstring); kept for other control planes.
    service_account: str | None = None


@dataclass(frozen=True)
class XdsCluster:
    """What the gateway needs of a CDS cluster to talk mTLS to its endpoints: the SNI,
    the SAN values (exact or prefix matchers) and ALPN of its ``tlsMode-istio`` transport
    socket (or its only TLS transport socket when a DestinationRule sets one)."""

    name: str
    sni: str | None
    sans: tuple[str, ...]
    alpn: tuple[str, ...]


@dataclass(frozen=True)
class XdsState:
    """A complete view: every asked cluster CDS lists, and the endpoints of each of them
    that is an EDS cluster. A cluster not in ``clusters`` does not exist in the mesh (a
    successful answer omitted it). ``versions`` maps type_url to the accepted version."""

    clusters: Mapping[str, XdsCluster]
    endpoints: Mapping[str, tuple[XdsEndpoint, ...]]
    versions: Mapping[str, str]


def cluster_name(host: str, port: int) -> str:
    """istiod's outbound cluster of ``host:port``: ``outbound|<port>||<host>``
    (``model.BuildSubsetKey`` with no subset)."""
    return f"outbound|{port}||{host}"


class Rejected(Exception):
    """An update the gateway cannot use; the message goes into the NACK."""


class StreamLost(MeshError):
    """istiod ended a stream that had answered (restart, GOAWAY, connection age)."""


# -- decoding ---------------------------------------------------------------------------


def _unpack(resource, type_url: str, message_class):
    """The resource of ``type_url`` inside an ``Any`` (or ``Any(Resource(Any))``)."""
    if resource.type_url == RESOURCE_TYPE:
        wrapper = discovery_pb2.Resource()
        _parse(wrapper, resource.value, "Resource wrapper")
        resource = wrapper.resource
    if resource.type_url != type_url:
        raise Rejected(f"a resource of type {resource.type_url!r} in a {type_url} response")
    message = message_class()
    _parse(message, resource.value, message_class.__name__)
    return message


def _named(response, type_url: str, message_class, name_field: str):
    """``(name, resource)`` for each resource of ``response``: every one parsed, named,
    and named once (Envoy rejects an update that repeats a name)."""
    seen: set[str] = set()
    what = message_class.__name__
    for resource in response.resources:
        message = _unpack(resource, type_url, message_class)
        name = getattr(message, name_field)
        if not name:
            raise Rejected(f"a {what} without {name_field}")
        if name in seen:
            raise Rejected(f"{what} {name!r} is listed twice")
        seen.add(name)
        yield name, message


def _parse(message, data: bytes, what: str) -> None:
    try:
        message.ParseFromString(data)
    except pb_message.DecodeError as exc:
        raise Rejected(f"cannot parse a {what}: {exc}") from None


def decode_clusters(
    response: discovery_pb2.DiscoveryResponse, wanted: Collection[str]
) -> tuple[dict[str, XdsCluster], dict[str, str]]:
    """The ``wanted`` clusters of a CDS response, and for those of type EDS the EDS
    resource name to ask (``eds_cluster_config.service_name``, else the cluster name).
    Every resource is parsed (a broken one rejects the update, as Envoy would); only the
    wanted ones are decoded further. Raises :class:`Rejected`."""
    clusters: dict[str, XdsCluster] = {}
    eds: dict[str, str] = {}
    for name, cluster in _named(response, CLUSTER_TYPE, cluster_pb2.Cluster, "name"):
        if name not in wanted:
            continue
        clusters[name] = _decode_cluster(cluster)
        if cluster.WhichOneof("cluster_discovery_type") == "type" and (
            cluster.type == cluster_pb2.Cluster.EDS
        ):
            eds[name] = cluster.eds_cluster_config.service_name or name
    return clusters, eds


def _decode_cluster(cluster: cluster_pb2.Cluster) -> XdsCluster:
    context = _istio_tls_context(cluster)
    if context is None:
        return XdsCluster(name=cluster.name, sni=None, sans=(), alpn=())
    common = context.common_tls_context
    return XdsCluster(
        name=cluster.name,
        sni=context.sni or None,
        sans=_sans(cluster.name, common),
        alpn=tuple(common.alpn_protocols),
    )


def _istio_tls_context(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext | None:
    """The TLS context used for ``tlsMode: istio`` endpoints: the transport socket match
    whose criteria say so (auto mTLS), or the one named ``tlsMode-istio`` (with HBONE it
    has no criteria), else the cluster's own transport socket (a DestinationRule's TLS)."""
    socket = None
    for match in cluster.transport_socket_matches:
        criteria = match.match.fields
        if "tlsMode" in criteria and criteria["tlsMode"].string_value == "istio":
            socket = match.transport_socket
            break
        if match.name == "tlsMode-istio" and not criteria:
            socket = match.transport_socket
            break
    if socket is None and cluster.HasField("transport_socket"):
        socket = cluster.transport_socket
    if socket is None or not socket.HasField("typed_config"):
        return None
    if socket.typed_config.type_url != TLS_CONTEXT_TYPE:
        return None  # raw buffer, HBONE internal upstream...: no TLS of ours
    context = tls_pb2.UpstreamTlsContext()
    _parse(context, socket.typed_config.value, f"UpstreamTlsContext of {cluster.name}")
    return context


def _sans(name: str, common: tls_pb2.CommonTlsContext) -> tuple[str, ...]:
    kind = common.WhichOneof("validation_context_type")
    if kind == "combined_validation_context":
        context = common.combined_validation_context.default_validation_context
    elif kind == "validation_context":
        context = common.validation_context
    else:
        return ()
    matchers = list(context.match_subject_alt_names)
    matchers += [typed.matcher for typed in context.match_typed_subject_alt_names]
    values: list[str] = []
    for matcher in matchers:
        pattern = matcher.WhichOneof("match_pattern")
        if pattern in ("exact", "prefix"):
            values.append(getattr(matcher, pattern))
        else:
            # istiod only writes exact matchers; a suffix/regex SAN from an EnvoyFilter
            # cannot be expressed here, and is left to the trust-domain check.
            log.debug("cluster %s: SAN matcher %s not used", name, pattern)
    return tuple(dict.fromkeys(values))


def decode_endpoints(
    response: discovery_pb2.DiscoveryResponse, wanted: Collection[str]
) -> dict[str, tuple[XdsEndpoint, ...]]:
    """The endpoints of each ``wanted`` assignment in an EDS response (by EDS name).
    An endpoint the gateway cannot dial rejects the update: an address that is not an
    IP address (a pipe, a DNS name, an HBONE internal address), a port outside 1-65535,
    a weight of 0. Raises :class:`Rejected`."""
    out: dict[str, tuple[XdsEndpoint, ...]] = {}
    cla = endpoint_pb2.ClusterLoadAssignment
    for name, assignment in _named(response, ENDPOINT_TYPE, cla, "cluster_name"):
        if name in wanted:
            out[name] = tuple(_decode_assignment(assignment))
    return out


def _decode_assignment(assignment: endpoint_pb2.ClusterLoadAssignment):
    name = assignment.cluster_name
    for group in assignment.endpoints:
        locality = (group.locality.region, group.locality.zone, group.locality.sub_zone)
        if group.WhichOneof("lb_config") == "leds_cluster_locality_config":
            raise Rejected(f"{name}: LEDS locality endpoints are not supported")
        for lb in group.lb_endpoints:
            yield _decode_endpoint(name, lb, locality)


def _decode_endpoint(name: str, lb, locality: tuple[str, str, str]) -> XdsEndpoint:
    if lb.WhichOneof("host_identifier") != "endpoint":
        raise Rejected(f"{name}: a named endpoint reference (endpoint_name) is not supported")
    address = lb.endpoint.address
    kind = address.WhichOneof("address")
    if kind is None:
        raise Rejected(f"{name}: an endpoint without an address")
    if kind != "socket_address":
        why = (
            " (an HBONE tunnel to an ambient workload)" if kind == "envoy_internal_address" else ""
        )
        raise Rejected(f"{name}: endpoint address is a {kind}{why}, not an IP address")
    socket_address = address.socket_address
    try:
        ip = ipaddress.ip_address(socket_address.address)
    except ValueError:
        raise Rejected(
            f"{name}: endpoint address {socket_address.address!r} is not an IP address"
        ) from None
    port = socket_address.port_value
    if socket_address.WhichOneof("port_specifier") != "port_value" or not 0 < port < 65536:
        raise Rejected(f"{name}: endpoint {ip} has no usable port ({port})")
    weight = lb.load_balancing_weight.value if lb.HasField("load_balancing_weight") else 1
    if weight < 1:
        raise Rejected(f"{name}: endpoint {ip}:{port} has load_balancing_weight 0")
    status = lb.health_status
    health = (
        health_check_pb2.HealthStatus.Name(status)
        if status in health_check_pb2.HealthStatus.values()
        else "UNKNOWN"
    )
    tls_mode = None
    match = lb.metadata.filter_metadata.get(TRANSPORT_SOCKET_MATCH)
    if match is not None and "tlsMode" in match.fields:
        tls_mode = match.fields["tlsMode"].string_value or None
    return XdsEndpoint(
        address=str(ip),
        port=port,
        health=health,
        weight=weight,
        locality=locality,
        tls_mode=tls_mode,
    )


def node_message(node: NodeIdentity) -> base_pb2.Node:
    """The ``core.v3.Node`` sent on a stream's first request."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in node.metadata.items()}
    )
    return base_pb2.Node(
        id=node.node_id,
        cluster=node.service_cluster,
        metadata=metadata,
        user_agent_name="odin-gw",
        user_agent_version=__version__,
    )


# -- the conversation of one stream -----------------------------------------------------


@dataclass
class Step:
    """What to do after a response: send ``requests`` (ACK/NACK, subscription), report
    ``rejected`` (the NACK's message), deliver ``state`` (a new complete state)."""

    requests: list[discovery_pb2.DiscoveryRequest] = field(default_factory=list)
    rejected: str | None = None
    state: XdsState | None = None


class AdsProtocol:
    """The ADS conversation of one stream, without I/O.

    ``start()`` gives the first request (CDS, wildcard, with the node); ``on_response``
    decodes a response and says what to send and deliver. A CDS update replaces the
    clusters and (re)subscribes EDS to the asked clusters that are EDS clusters; an EDS
    update is merged. A state is delivered once complete (CDS accepted and an assignment
    for every subscribed cluster), then after every accepted change of clusters or
    endpoints. ``versions`` (type_url -> accepted version) may come from an earlier
    stream: a NACK names the last accepted version, as Envoy does.
    """

    def __init__(
        self,
        node: NodeIdentity,
        clusters: Sequence[str],
        versions: Mapping[str, str] | None = None,
    ) -> None:
        self.node = node
        self.wanted = frozenset(clusters)
        self.versions: dict[str, str] = dict(versions or {})
        self.nonces: dict[str, str] = {}
        self.clusters: dict[str, XdsCluster] | None = None  # None: no CDS accepted yet
        self.eds: dict[str, str] = {}  # cluster -> EDS name, as subscribed
        self.endpoints: dict[str, tuple[XdsEndpoint, ...]] = {}
        self.responses = 0
        self.delivered = 0
        self.rejected: str | None = None
        self._node_sent = False
        self._last: tuple | None = None

    def start(self) -> list[discovery_pb2.DiscoveryRequest]:
        """The first request of the stream: CDS, wildcard (no names), as Envoy asks."""
        return [self._request(CLUSTER_TYPE, (), nonce="")]

    def on_response(self, response: discovery_pb2.DiscoveryResponse) -> Step:
        """ACK or NACK ``response``; see the class docstring."""
        self.responses += 1
        type_url = response.type_url
        if type_url in SHORT_TYPES:
            # The latest nonce, ACKed or not: istiod ignores a request with an older one.
            self.nonces[type_url] = response.nonce
        try:
            if type_url == CLUSTER_TYPE:
                step = self._on_clusters(response)
            elif type_url == ENDPOINT_TYPE:
                step = self._on_endpoints(response)
            else:
                raise Rejected(f"unexpected type_url {type_url!r}: only CDS and EDS were asked")
        except Rejected as exc:
            return self._nack(response, str(exc))
        step.state = self._state_if_changed()
        return step

    def progress(self) -> str:
        """What has arrived so far, for a timeout message."""
        if self.clusters is None:
            return "no CDS update accepted"
        have = sum(1 for c in self.eds if c in self.endpoints)
        return f"CDS accepted, EDS {have}/{len(self.eds)} clusters"

    def _on_clusters(self, response) -> Step:
        clusters, eds = decode_clusters(response, self.wanted)
        self._accept(response)
        self.clusters = clusters
        step = Step(requests=[self._ack(response)])
        if eds != self.eds:
            previous = set(self.eds.values())
            self.eds = eds
            self.endpoints = {c: e for c, e in self.endpoints.items() if c in eds}
            if eds or previous:
                # An empty EDS request unsubscribes (istiod drops the watch).
                step.requests.append(self._eds_request())
        return step

    def _on_endpoints(self, response) -> Step:
        decoded = decode_endpoints(response, set(self.eds.values()))
        self._accept(response)
        for cluster, eds_name in self.eds.items():
            if eds_name in decoded:
                self.endpoints[cluster] = decoded[eds_name]
        return Step(requests=[self._ack(response)])

    def _accept(self, response) -> None:
        self.versions[response.type_url] = response.version_info
        self.rejected = None

    def _state_if_changed(self) -> XdsState | None:
        if self.clusters is None or any(c not in self.endpoints for c in self.eds):
            return None
        content = (self.clusters, self.endpoints)
        if content == self._last:
            return None
        self._last = (dict(self.clusters), dict(self.endpoints))
        self.delivered += 1
        return XdsState(
            clusters=MappingProxyType(dict(self.clusters)),
            endpoints=MappingProxyType(dict(self.endpoints)),
            versions=MappingProxyType(dict(self.versions)),
        )

    def _names(self, type_url: str) -> Sequence[str]:
        return sorted(set(self.eds.values())) if type_url == ENDPOINT_TYPE else ()

    def _request(
        self, type_url: str, names: Sequence[str], *, nonce: str
    ) -> discovery_pb2.DiscoveryRequest:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=self.versions.get(type_url, ""),
            resource_names=list(names),
            response_nonce=nonce,
        )
        if not self._node_sent:  # istiod reads the node of the first request only
            request.node.CopyFrom(node_message(self.node))
            self._node_sent = True
        return request

    def _ack(self, response) -> discovery_pb2.DiscoveryRequest:
        return self._request(
            response.type_url, self._names(response.type_url), nonce=response.nonce
        )

    def _eds_request(self) -> discovery_pb2.DiscoveryRequest:
        return self._request(
            ENDPOINT_TYPE, self._names(ENDPOINT_TYPE), nonce=self.nonces.get(ENDPOINT_TYPE, "")
        )

    def _nack(self, response, reason: str) -> Step:
        type_url = response.type_url
        request = self._request(type_url, self._names(type_url), nonce=response.nonce)
        request.error_detail.CopyFrom(status_pb2.Status(code=NACK_CODE, message=reason))
        kept = self.versions.get(type_url) or "none"
        what = SHORT_TYPES.get(type_url, type_url)
        self.rejected = (
            f"rejected istiod's {what} update (version {response.version_info!r}, nonce "
            f"{response.nonce!r}): {reason}; keeping version {kept!r}"
        )
        return Step(requests=[request], rejected=self.rejected)


# -- back-off and the stream -----------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential back-off between reconnects: ``initial * factor**failures``,
    capped at ``cap``, spread by +-``jitter`` (a share) and never above ``cap``."""

    initial: float = 1.0
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``failures`` failures in a row (0 = the first)."""
        base = min(self.cap, self.initial * self.factor ** min(max(failures, 0), 64))
        spread = base * self.jitter
        return max(0.0, min(self.cap, base - spread + 2 * spread * rand()))


def _scrub(text: str, secret: str | None, limit: int = 400) -> str:
    """``text`` without the token (or anything shaped like a JWT), on one line, capped."""
    if secret:
        text = text.replace(secret, "<redacted>")
    text = " ".join(_JWT.sub("<redacted>", text).split())
    return text if len(text) <= limit else text[:limit] + "..."


_FINISH = object()  # send the queued requests, then half-close
_CLOSE = object()  # end the iterator now


class _Outbox:
    """The request iterator of one stream, which grpc consumes in a thread of its own.

    ``put`` queues a request; ``_FINISH`` half-closes the stream once the requests
    before it are written (``flushed`` is then set); ``_CLOSE`` ends it at once. The
    stream always puts ``_CLOSE`` when it ends, so the blocking ``get`` returns.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.flushed = threading.Event()

    def put(self, item) -> None:
        self._queue.put(item)

    def __iter__(self) -> _Outbox:
        return self

    def __next__(self) -> discovery_pb2.DiscoveryRequest:
        item = self._queue.get()
        if item is _FINISH:
            # grpc asks for the next request only once the previous one is written.
            self.flushed.set()
            raise StopIteration
        if item is _CLOSE:
            raise StopIteration
        return item


class _Guard:
    """Ends a stream from outside: the thread reading responses is blocked in grpc, and
    grpc's request thread may be too (a send waits while the channel connects), so a
    small thread of its own cancels the call when ``stop`` is set, the client is closed
    or ``deadline`` (``time.monotonic()``; cleared once a state is delivered) passes."""

    def __init__(
        self,
        call: grpc.Call,
        stop: threading.Event | None,
        closed: threading.Event,
        deadline: float | None,
    ) -> None:
        self._call = call
        self._stop = stop
        self._closed = closed
        self.deadline = deadline
        self.expired = False
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xds-stream-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._ended.wait(POLL):
            if self._closed.is_set() or (self._stop is not None and self._stop.is_set()):
                break
            deadline = self.deadline
            if deadline is not None and time.monotonic() >= deadline:
                self.expired = True
                break
        else:
            return
        self._call.cancel()

    def end(self) -> None:
        self._ended.set()
        self._thread.join(2 * POLL)


class AdsClient:
    """An ADS client of istiod for the gateway's clusters (see the module docstring).

    ``fetch`` is one stream that returns the first complete state; ``watch`` keeps a
    stream, reconnecting with :class:`Backoff`. Each connect re-reads the CA file and the
    token (both rotate) and opens a new channel. The token goes only over TLS, as
    ``authorization: Bearer``; it is never logged nor put in an error message.
    """

    def __init__(
        self,
        *,
        pilot_addr: str,
        pilot_tls: str,
        ca_file: str | None,
        token_file: str | None,
        node: NodeIdentity,
        timeout: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        """``timeout`` bounds how long a new ``watch`` stream may wait for istiod's first
        response before it counts as failed (after that, gRPC keepalive pings notice a
        dead connection). Raises ``MeshError`` when ``pilot_addr``/``pilot_tls`` are
        unusable."""
        self.target = PilotTarget.parse(pilot_addr, pilot_tls)
        self.ca_file = ca_file
        self.token_file = token_file
        self.node = node
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self._versions: dict[str, str] = {}
        self._closed = threading.Event()
        self._calls: set = set()
        self._lock = threading.Lock()  # guards _calls (close() runs in another thread)
        self._token: str | None = None  # the last token read, only to scrub messages
        if self.target.tls and not ca_file:
            log.info("istiod at %s: no serviceMesh.caFile, using the system roots", pilot_addr)

    # -- public API -----------------------------------------------------------------------
    def fetch(self, clusters: Sequence[str], timeout: float) -> XdsState:
        """One stream: CDS, then EDS for the asked ``clusters`` (names from
        :func:`cluster_name`), each ACKed; returns the first complete state and closes
        the stream. Raises ``MeshError`` on refusal, failure or after ``timeout`` s."""
        protocol = AdsProtocol(self.node, clusters, self._versions)
        got: list[XdsState] = []

        def deliver(state: XdsState) -> bool:
            got.append(state)
            return True

        try:
            self._stream(protocol, deliver, lambda error: None, None, timeout, whole=True)
        finally:
            self._versions.update(protocol.versions)
        if not got:
            raise MeshError("the istiod client was closed")
        return got[0]

    def watch(
        self,
        clusters: Sequence[str],
        on_state: Callable[[XdsState], None],
        on_error: Callable[[MeshError], None],
        stop: threading.Event,
    ) -> None:
        """Follow ``clusters`` until ``stop`` is set (or ``close()``); blocks, so run it
        in a thread of its own, which calls both callbacks. ``on_state`` gets the full
        state after each accepted change (the first complete state of every stream
        always); ``on_error`` each failure, refusal or NACK. A stream that had answered
        and then ends (istiod restarting, connection age) is reopened after the first
        back-off step, and only reported if reopening fails. Returns within about
        ``POLL`` of ``stop``."""

        def deliver(state: XdsState) -> bool:
            _call(on_state, state)
            return False  # keep the stream

        def report(error: MeshError) -> None:
            _call(on_error, error)

        failures = 0
        failing = False
        while not self._stopping(stop):
            protocol = AdsProtocol(self.node, clusters, self._versions)
            error: MeshError | None = None
            try:
                self._stream(protocol, deliver, report, stop, self.timeout, whole=False)
            except MeshError as exc:
                error = exc
            self._versions.update(protocol.versions)
            if self._stopping(stop):
                break
            if protocol.delivered:
                failures = 0
                if failing:
                    log.info("istiod at %s: stream working again", self.target.address)
                    failing = False
            if error is not None and not isinstance(error, StreamLost):
                if not failing:
                    log.warning("%s (retrying with back-off)", error.message)
                    failing = True
                _call(on_error, error)
            elif error is not None:
                log.info("%s: reconnecting", error.message)
            self._sleep(stop, self.backoff.delay(failures))
            failures += 1

    def describe(self) -> dict[str, object]:
        """A JSON-ready view for the admin endpoint: where istiod is, how it is reached
        (file paths, never the token), the node and the versions last accepted."""
        return {
            "pilotAddr": self.target.address,
            "tls": self.target.tls,
            "serverName": self.target.server_name,
            "caFile": self.ca_file if self.target.tls else None,
            "tokenFile": self.token_file if self.target.tls else None,
            "node": self.node.describe(),
            "versions": {SHORT_TYPES.get(t, t): v for t, v in self._versions.items()},
        }

    def close(self) -> None:
        """Cancel every open stream; ``watch`` returns and ``fetch`` raises."""
        self._closed.set()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    # -- internals ------------------------------------------------------------------------
    def _stopping(self, stop: threading.Event | None) -> bool:
        return self._closed.is_set() or (stop is not None and stop.is_set())

    def _sleep(self, stop: threading.Event, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping(stop):
            left = end - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, POLL))

    def _channel(self) -> tuple[grpc.Channel, list[tuple[str, str]]]:
        """A new channel and the call metadata, reading the CA and token files now."""
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", -1),  # CDS of a big mesh; istio: MaxInt32
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.use_local_subchannel_pool", 1),  # a new connection for a new channel
            ("grpc.primary_user_agent", f"odin-gw/{__version__}"),
        ]
        metadata = [("clusterid", self.node.cluster_id)]
        if not self.target.tls:
            return grpc.insecure_channel(self.target.address, options=options), metadata
        roots = read_ca(self.ca_file) if self.ca_file else None
        if self.token_file:
            self._token = read_token(self.token_file)
            metadata.append(("authorization", f"Bearer {self._token}"))
        if self.target.server_name:
            options.append(("grpc.ssl_target_name_override", self.target.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.secure_channel(self.target.address, credentials, options=options), metadata

    def _stream(
        self,
        protocol: AdsProtocol,
        deliver: Callable[[XdsState], bool],
        report: Callable[[MeshError], None],
        stop: threading.Event | None,
        timeout: float,
        *,
        whole: bool,
    ) -> None:
        """Run one stream until ``deliver`` returns True (then ACKs are flushed and the
        stream closed), ``stop``/``close()``, or a failure (``MeshError``; a stream
        that had answered and ended is ``StreamLost``). ``timeout`` bounds the wait for
        the first complete state (``whole``) or for the first response."""
        if self._stopping(stop):
            return
        channel, metadata = self._channel()
        deadline = time.monotonic() + timeout
        outbox = _Outbox()
        call = guard = None
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(outbox, metadata=metadata)
            guard = _Guard(call, stop, self._closed, deadline)
            with self._lock:
                self._calls.add(call)
            for request in protocol.start():
                outbox.put(request)
            for response in call:
                step = protocol.on_response(response)
                if not whole:
                    guard.deadline = None
                for request in step.requests:
                    outbox.put(request)
                if step.rejected:
                    log.warning("istiod at %s: %s", self.target.address, step.rejected)
                    report(MeshError(step.rejected))
                if step.state is None:
                    continue
                guard.deadline = None
                if deliver(step.state):
                    outbox.put(_FINISH)
                    # Let the ACKs go out and istiod end the stream; then cancel anyway.
                    if outbox.flushed.wait(FLUSH_WAIT):
                        with contextlib.suppress(grpc.FutureTimeoutError):
                            call.exception(timeout=FLUSH_WAIT)
                    return
            raise self._ended(protocol, None, None)
        except grpc.RpcError as exc:
            if self._stopping(stop):
                return
            if guard is not None and guard.expired and not protocol.delivered:
                raise self._timed_out(protocol, timeout) from None
            raise self._ended(protocol, exc.code(), exc.details()) from None
        finally:
            outbox.put(_CLOSE)
            if guard is not None:
                guard.end()
            if call is not None:
                call.cancel()
                with self._lock:
                    self._calls.discard(call)
            channel.close()

    def _timed_out(self, protocol: AdsProtocol, timeout: float) -> MeshError:
        where = self.target.address
        if not protocol.responses:
            return MeshError(f"istiod at {where} answered nothing within {timeout:g}s")
        return MeshError(
            f"istiod at {where} sent no complete state within {timeout:g}s "
            f"({protocol.progress()})"
            + (f"; last update {protocol.rejected}" if protocol.rejected else "")
        )

    def _ended(
        self, protocol: AdsProtocol, code: grpc.StatusCode | None, details: str | None
    ) -> MeshError:
        """The error for a stream istiod (or the connection) ended."""
        where = self.target.address
        name = code.name if code is not None else "OK"
        text = _scrub(details or "", self._token) or "no details"
        if code is None or code == grpc.StatusCode.OK:
            if protocol.responses:
                return StreamLost(f"istiod at {where} closed the stream")
            return MeshError(f"istiod at {where} closed the stream without answering")
        if protocol.responses and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            # What pilot-agent counts as an expected end (a restart, GOAWAY, a closed
            # transport): routine once istiod has answered.
            return StreamLost(f"istiod at {where} ended the stream: {name}: {text}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return MeshError(f"cannot reach istiod at {where}: {name}: {text}")
        if protocol.responses:
            return MeshError(f"istiod at {where} ended the stream: {name}: {text}")
        return MeshError(f"istiod refused the stream: {name}: {text} (pilotAddr {where})")


def _call(callback: Callable, value: object) -> object:
    """Run a caller's callback; its exception is logged, never ends the stream."""
    try:
        return callback(value)
    except Exception:
        log.exception("xds callback %r raised", callback)
        return None
