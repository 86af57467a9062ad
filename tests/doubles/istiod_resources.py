"""xDS resources shaped as istiod builds them for a gateway (``router``) proxy.

Outbound cluster (``pilot/pkg/networking/core/cluster*.go``), for a service port with
no DestinationRule, auto mTLS on, PERMISSIVE peers:

* name ``outbound|<port>||<host>``, ``type: EDS``, ``eds_cluster_config`` with
  ``service_name`` = the name and ``eds_config: {ads: {}, initial_fetch_timeout: 0s,
  resource_api_version: V3}``; ``connect_timeout: 10s`` (mesh default);
  ``lb_policy: LEAST_REQUEST``; circuit breaker thresholds at 2^32-1 with
  ``track_remaining``; ``common_lb_config.healthy_panic_threshold: 0`` (istiod sends
  unhealthy endpoints by default, so it turns Envoy's panic mode off);
  ``alt_stat_name: <name>;``; metadata ``istio.services: [{host, name, namespace}]``.
* ``transport_socket_matches``: ``tlsMode-istio`` (match ``{tlsMode: istio}``) ->
  ``UpstreamTlsContext`` with SNI ``outbound_.<port>_._.<host>``, TLS 1.2-1.3, ALPN
  ``[istio-peer-exchange, istio]`` (``[..., h2]`` on HTTP/2 ports), the certificate from
  SDS ``default`` and the trust roots from SDS ``ROOTCA`` (both over the ``sds-grpc``
  cluster: the istio-agent's SDS socket), ``match_subject_alt_names`` exact SPIFFE IDs;
  then ``tlsMode-disabled`` (match ``{}``) -> raw buffer.
* The per-request ALPN ``istio-http/1.0``, ``istio-http/1.1``, ``istio-h2`` comes from
  the ``istio.alpn`` HTTP filter in the *listener*, not from CDS.
* Left out: the ``istio.metadata_exchange`` cluster filter, an istio-proxy extension
  that upstream Envoy (and so the faithfulness test) does not have.

A router also gets the ``BlackHoleCluster`` (STATIC, no endpoints).

ClusterLoadAssignment (``pilot/pkg/xds/endpoints/endpoint_builder.go``): endpoints
grouped by locality label, groups sorted by label, each group weighted by the sum of its
endpoints' weights; each ``LbEndpoint`` has ``health_status``,
``load_balancing_weight`` and the metadata described in :class:`EdsEndpoint`. DRAINING
endpoints are only sent for persistent-session services (which also get
``override_host_status`` in CDS); istiod drops them for any other service. An unknown
cluster gets an empty assignment with just ``cluster_name``.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from tests.doubles.istiod_model import EdsEndpoint

__all__ = [
    "BLACKHOLE_CLUSTER",
    "CDS",
    "EDS",
    "LDS",
    "SDS",
    "SDS_CLUSTER",
    "blackhole_cluster",
    "cluster_name",
    "invalid_load_assignment",
    "load_assignment",
    "outbound_cluster",
    "pack",
    "root_secret",
    "sni",
    "workload_secret",
]

_TYPE = "type.googleapis.com/"
CDS = _TYPE + "envoy.config.cluster.v3.Cluster"
EDS = _TYPE + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = _TYPE + "envoy.config.listener.v3.Listener"
SDS = _TYPE + "envoy.extensions.transport_sockets.tls.v3.Secret"

BLACKHOLE_CLUSTER = "BlackHoleCluster"
#: The bootstrap cluster through which Envoy reaches the istio-agent's SDS server.
SDS_CLUSTER = "sds-grpc"
#: ``ALPNInMeshWithMxc`` / ``ALPNInMeshH2WithMxc``.
ALPN_IN_MESH = ("istio-peer-exchange", "istio")
ALPN_IN_MESH_H2 = ("istio-peer-exchange", "istio", "h2")
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_MAX = 2**32 - 1
_HTTP2_PROTOCOLS = ("http2", "grpc", "grpc-web")


def cluster_name(host: str, port: int) -> str:
    """``outbound|<port>||<host>`` (``model.BuildSubsetKey``, no subset)."""
    return f"outbound|{port}||{host}"


def sni(host: str, port: int) -> str:
    """``outbound_.<port>_._.<host>`` (``model.BuildDNSSrvSubsetKey``)."""
    return f"outbound_.{port}_._.{host}"


def pack(message: Message) -> any_pb2.Any:
    """Wrap ``message`` in an ``Any`` (``type.googleapis.com/<full name>``)."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _struct(values: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def _sds_config(name: str) -> secret_pb2.SdsSecretConfig:
    """``defaultSDSConfig`` / ``rootSDSConfig``: SDS over gRPC to ``sds-grpc``."""
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            api_config_source=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.GRPC,
                set_node_on_first_message_only=True,
                transport_api_version=config_source_pb2.V3,
                grpc_services=[
                    grpc_service_pb2.GrpcService(
                        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER)
                    )
                ],
            ),
            resource_api_version=config_source_pb2.V3,
            initial_fetch_timeout=duration_pb2.Duration(seconds=0),
        ),
    )


def _istio_mtls_socket(
    host: str, port: int, sans: list[str], http2: bool
) -> base_pb2.TransportSocket:
    params = common_pb2.TlsParameters(
        tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2,
        tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
    )
    context = tls_pb2.UpstreamTlsContext(
        sni=sni(host, port),
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_params=params,
            alpn_protocols=ALPN_IN_MESH_H2 if http2 else ALPN_IN_MESH,
            tls_certificate_sds_secret_configs=[_sds_config("default")],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    # istiod still fills the deprecated untyped field (StringToExactMatch).
                    match_subject_alt_names=[string_pb2.StringMatcher(exact=s) for s in sans]
                ),
                validation_context_sds_secret_config=_sds_config("ROOTCA"),
            ),
        ),
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))


def _raw_buffer_socket() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
    )


def outbound_cluster(
    host: str,
    port: int,
    sans: list[str],
    *,
    protocol: str = "http",
    persistent_session: bool = False,
) -> cluster_pb2.Cluster:
    """The outbound EDS cluster istiod sends a gateway for ``host:port`` (module doc)."""
    name = cluster_name(host, port)
    http2 = protocol.lower() in _HTTP2_PROTOCOLS
    labels = host.split(".")
    service_meta = {
        "host": host,
        "name": labels[0],
        "namespace": labels[1] if len(labels) > 1 else "",
    }
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            service_name=name,
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                initial_fetch_timeout=duration_pb2.Duration(seconds=0),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        connect_timeout=duration_pb2.Duration(seconds=10),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_connections=wrappers_pb2.UInt32Value(value=_MAX),
                    max_pending_requests=wrappers_pb2.UInt32Value(value=_MAX),
                    max_requests=wrappers_pb2.UInt32Value(value=_MAX),
                    max_retries=wrappers_pb2.UInt32Value(value=_MAX),
                    track_remaining=True,
                )
            ]
        ),
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0)
        ),
        alt_stat_name=name + ";",
        metadata=base_pb2.Metadata(
            filter_metadata={"istio": _struct({"services": [service_meta]})}
        ),
        transport_socket_matches=[
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-istio",
                match=_struct({"tlsMode": "istio"}),
                transport_socket=_istio_mtls_socket(host, port, sans, http2),
            ),
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-disabled", match=_struct({}), transport_socket=_raw_buffer_socket()
            ),
        ],
    )
    if http2:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        cluster.typed_extension_protocol_options[_HTTP_OPTIONS_KEY].CopyFrom(pack(options))
    if persistent_session:
        # SupportsDrainingEndpoints: keep DRAINING hosts for cookie/header selection.
        status = health_check_pb2
        cluster.common_lb_config.override_host_status.statuses.extend(
            [status.HEALTHY, status.DRAINING, status.UNKNOWN, status.DEGRADED]
        )
    return cluster


def blackhole_cluster() -> cluster_pb2.Cluster:
    """``BlackHoleCluster``: STATIC, no endpoints (traffic to it fails)."""
    return cluster_pb2.Cluster(
        name=BLACKHOLE_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=10),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        alt_stat_name=BLACKHOLE_CLUSTER + ";",
    )


def _lb_endpoint(ep: EdsEndpoint) -> endpoint_components_pb2.LbEndpoint:
    filter_metadata: dict[str, struct_pb2.Struct] = {}
    if ep.tls_mode and ep.tls_mode != "disabled":
        filter_metadata["envoy.transport_socket_match"] = _struct({"tlsMode": ep.tls_mode})
    # Telemetry label: workload;namespace;canonical name;revision ("latest" -> "");cluster.
    filter_metadata["istio"] = _struct(
        {"workload": f"{ep.workload};{ep.namespace};{ep.workload};;Kubernetes"}
    )
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=ep.address, port_value=ep.port)
            )
        ),
        health_status=health_check_pb2.HealthStatus.Value(ep.health),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=ep.weight or 1),
        metadata=base_pb2.Metadata(filter_metadata=filter_metadata),
    )


def load_assignment(
    name: str, endpoints: Iterable[EdsEndpoint], *, persistent_session: bool = False
) -> endpoint_pb2.ClusterLoadAssignment:
    """The ``ClusterLoadAssignment`` istiod builds for cluster ``name`` (module doc)."""
    groups: dict[str, list[EdsEndpoint]] = {}
    for ep in endpoints:
        if ep.health == "DRAINING" and not persistent_session:
            continue
        groups.setdefault(ep.locality_label, []).append(ep)
    return _assemble(name, groups)


def invalid_load_assignment(
    name: str, endpoints: Iterable[EdsEndpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    """The assignment for ``name`` plus one endpoint whose address is a host name.

    Envoy resolves every EDS address as an IP literal and rejects the whole update
    ("malformed IP address"), so a correct client NACKs it. istiod itself never sends
    this: ``BuildClusterLoadAssignment`` drops endpoints whose address is not an IP.
    """
    endpoints = list(endpoints) or [EdsEndpoint("0.0.0.0", 1)]
    bad = EdsEndpoint("not-an-ip.invalid", endpoints[0].port, locality=endpoints[0].locality)
    groups: dict[str, list[EdsEndpoint]] = {}
    for ep in [*endpoints, bad]:
        groups.setdefault(ep.locality_label, []).append(ep)
    return _assemble(name, groups)


def _assemble(
    name: str, groups: dict[str, list[EdsEndpoint]]
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for label in sorted(groups):
        members = groups[label]
        region, zone, subzone = members[0].locality
        group = cla.endpoints.add(
            locality=base_pb2.Locality(region=region, zone=zone, sub_zone=subzone),
            load_balancing_weight=wrappers_pb2.UInt32Value(
                value=min(sum(ep.weight or 1 for ep in members), _MAX)
            ),
        )
        group.lb_endpoints.extend(_lb_endpoint(ep) for ep in members)
    return cla


def workload_secret(chain_pem: str, key_pem: str) -> secret_pb2.Secret:
    """SDS ``default``: the workload certificate chain and key (inline bytes)."""
    return secret_pb2.Secret(
        name="default",
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=chain_pem.encode()),
            private_key=base_pb2.DataSource(inline_bytes=key_pem.encode()),
        ),
    )


def root_secret(root_pem: str) -> secret_pb2.Secret:
    """SDS ``ROOTCA``: the mesh trust roots as a validation context."""
    return secret_pb2.Secret(
        name="ROOTCA",
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=root_pem.encode())
        ),
    )
