"""Decoding istiod's CDS and EDS resources (:func:`decode_clusters`,
:func:`decode_endpoints`): protobuf resources from ``xds-protos`` into the frozen
dataclasses below, or :class:`Rejected` with the reason the update is unusable. No
protobuf object leaves this module. The conversation that uses them is in
:mod:`.xds_protocol`, the client in :mod:`.xds`.

Facts from istio's source this relies on: endpoint metadata holds
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

import ipaddress
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message as pb_message

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
