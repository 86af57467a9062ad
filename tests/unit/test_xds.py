"""odin_gw.mesh.xds and xds_node without sockets: decoding istiod's CDS/EDS resources,
the ACK/NACK conversation, the node identity, pilotAddr rules, token and CA files,
back-off bounds. Resources are built here as istiod shapes them (see the module
docstring of odin_gw.mesh.xds for the istio sources)."""

from __future__ import annotations

import json
import re
import socket

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from odin_gw.config.model import MeshConfig
from odin_gw.errors import MeshError
from odin_gw.mesh.xds import AdsClient, Backoff, StreamLost, _scrub
from odin_gw.mesh.xds_decode import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    Rejected,
    XdsCluster,
    XdsEndpoint,
    cluster_name,
    decode_clusters,
    decode_endpoints,
)
from odin_gw.mesh.xds_node import NodeIdentity, PilotTarget, read_ca, read_token
from odin_gw.mesh.xds_protocol import AdsProtocol, node_message

WEB = "web.default.svc.cluster.local"
WEB_80 = "outbound|80||web.default.svc.cluster.local"
API_90 = "outbound|90||api.shop.svc.cluster.local"
SAN_WEB = "spiffe://cluster.local/ns/default/sa/web"
COMBINED = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext


# -- builders: resources as istiod shapes them ------------------------------------------


def pack(message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def struct(values: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def tls_context(sni: str, sans=(SAN_WEB,), alpn=("istio-peer-exchange", "istio")):
    return tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=list(alpn),
            combined_validation_context=COMBINED(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_subject_alt_names=[string_pb2.StringMatcher(exact=s) for s in sans]
                )
            ),
        ),
    )


def tls_socket(context) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))


def raw_socket() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
    )


def auto_mtls_cluster(host: str, port: int, sans=(SAN_WEB,)) -> cluster_pb2.Cluster:
    """An outbound EDS cluster with auto mTLS (cluster_tls.go applyUpstreamTLSSettings)."""
    name = cluster_name(host, port)
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(service_name=name),
        transport_socket_matches=[
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-istio",
                match=struct({"tlsMode": "istio"}),
                transport_socket=tls_socket(tls_context(f"outbound_.{port}_._.{host}", sans)),
            ),
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-disabled", match=struct({}), transport_socket=raw_socket()
            ),
        ],
    )


def lb_endpoint(address="10.0.0.5", port=8080, health="HEALTHY", weight=1, tls_mode="istio"):
    meta = {}
    if tls_mode:
        meta["envoy.transport_socket_match"] = struct({"tlsMode": tls_mode})
    meta["istio"] = struct({"workload": "web;default;web;;Kubernetes"})
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            )
        ),
        health_status=health_check_pb2.HealthStatus.Value(health),
        metadata=base_pb2.Metadata(filter_metadata=meta),
    )
    if weight is not None:
        lb.load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=weight))
    return lb


def assignment(name: str, *lbs, locality=("eu", "eu-1a", "")):
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if lbs:
        group = cla.endpoints.add(
            locality=base_pb2.Locality(region=locality[0], zone=locality[1], sub_zone=locality[2])
        )
        group.lb_endpoints.extend(lbs)
    return cla


def response(type_url: str, resources, version="v1", nonce="n1"):
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url,
        version_info=version,
        nonce=nonce,
        resources=[r if isinstance(r, any_pb2.Any) else pack(r) for r in resources],
    )


def cds(*clusters, version="c1", nonce="cn1"):
    blackhole = cluster_pb2.Cluster(name="BlackHoleCluster", type=cluster_pb2.Cluster.STATIC)
    return response(CLUSTER_TYPE, [*clusters, blackhole], version, nonce)


def eds(*assignments, version="e1", nonce="en1"):
    return response(ENDPOINT_TYPE, assignments, version, nonce)


@pytest.fixture
def node() -> NodeIdentity:
    env = {
        "POD_NAME": "odin-5d8f7c9b6d-x2k4q",
        "POD_NAMESPACE": "edge",
        "INSTANCE_IP": "10.8.0.12",
        "SERVICE_ACCOUNT": "odin",
    }
    return NodeIdentity.from_env(MeshConfig(namespace="default"), env)


# -- names ------------------------------------------------------------------------------


def test_cluster_name_is_istio_outbound_subset_key():
    assert cluster_name(WEB, 80) == WEB_80


# -- CDS --------------------------------------------------------------------------------


def test_auto_mtls_cluster_gives_sni_sans_alpn_of_the_istio_match():
    clusters, eds_names = decode_clusters(cds(auto_mtls_cluster(WEB, 80)), {WEB_80})
    assert clusters == {
        WEB_80: XdsCluster(
            name=WEB_80,
            sni="outbound_.80_._.web.default.svc.cluster.local",
            sans=(SAN_WEB,),
            alpn=("istio-peer-exchange", "istio"),
        )
    }
    assert eds_names == {WEB_80: WEB_80}


def test_only_the_asked_clusters_are_kept():
    response_ = cds(auto_mtls_cluster(WEB, 80), auto_mtls_cluster("api.shop.svc.cluster.local", 90))
    clusters, eds_names = decode_clusters(response_, {API_90, "outbound|1||absent"})
    assert list(clusters) == [API_90]
    assert list(eds_names) == [API_90]


def test_eds_name_comes_from_eds_cluster_config_and_non_eds_clusters_get_none():
    c = auto_mtls_cluster(WEB, 80)
    c.eds_cluster_config.service_name = "other-name"
    static = cluster_pb2.Cluster(name="outbound|81||static", type=cluster_pb2.Cluster.STRICT_DNS)
    clusters, eds_names = decode_clusters(cds(c, static), {WEB_80, "outbound|81||static"})
    assert eds_names == {WEB_80: "other-name"}
    assert clusters["outbound|81||static"] == XdsCluster("outbound|81||static", None, (), ())


def test_destination_rule_transport_socket_and_hbone_unnamed_match_are_read():
    explicit = cluster_pb2.Cluster(
        name=WEB_80,
        type=cluster_pb2.Cluster.EDS,
        transport_socket=tls_socket(tls_context("custom-sni", ("spiffe://td/ns/a/sa/b",))),
    )
    clusters, _ = decode_clusters(cds(explicit), {WEB_80})
    assert clusters[WEB_80].sni == "custom-sni"
    assert clusters[WEB_80].sans == ("spiffe://td/ns/a/sa/b",)
    # With HBONE and a user ISTIO_MUTUAL, "tlsMode-istio" has no criteria (cluster_tls.go).
    hbone = cluster_pb2.Cluster(
        name=WEB_80,
        type=cluster_pb2.Cluster.EDS,
        transport_socket_matches=[
            cluster_pb2.Cluster.TransportSocketMatch(
                name="hbone", match=struct({"tunnel": "http"}), transport_socket=raw_socket()
            ),
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-istio", transport_socket=tls_socket(tls_context("s"))
            ),
        ],
    )
    clusters, _ = decode_clusters(cds(hbone), {WEB_80})
    assert clusters[WEB_80].sni == "s"


def test_san_matchers_exact_prefix_and_typed_are_collected_others_ignored():
    context = tls_context("s", sans=())
    vc = context.common_tls_context.combined_validation_context.default_validation_context
    vc.match_subject_alt_names.extend(
        [
            string_pb2.StringMatcher(exact="spiffe://a"),
            string_pb2.StringMatcher(prefix="spiffe://td/ns/x/"),
            string_pb2.StringMatcher(suffix="/sa/web"),
            string_pb2.StringMatcher(exact="spiffe://a"),
        ]
    )
    vc.match_typed_subject_alt_names.add(
        san_type=common_pb2.SubjectAltNameMatcher.URI,
        matcher=string_pb2.StringMatcher(exact="spiffe://typed"),
    )
    c = cluster_pb2.Cluster(name=WEB_80, transport_socket=tls_socket(context))
    clusters, _ = decode_clusters(cds(c), {WEB_80})
    assert clusters[WEB_80].sans == ("spiffe://a", "spiffe://td/ns/x/", "spiffe://typed")


def test_plaintext_cluster_has_no_tls_details():
    c = cluster_pb2.Cluster(
        name=WEB_80, type=cluster_pb2.Cluster.EDS, transport_socket=raw_socket()
    )
    clusters, _ = decode_clusters(cds(c), {WEB_80})
    assert clusters[WEB_80] == XdsCluster(WEB_80, None, (), ())


@pytest.mark.parametrize(
    "resources, reason",
    [
        ([pack(endpoint_pb2.ClusterLoadAssignment(cluster_name="x"))], "of type"),
        ([any_pb2.Any(type_url=CLUSTER_TYPE, value=b"\xff\xff\xff")], "cannot parse"),
        ([cluster_pb2.Cluster(name=WEB_80), cluster_pb2.Cluster(name=WEB_80)], "twice"),
        ([cluster_pb2.Cluster()], "Cluster without name"),
    ],
)
def test_unusable_cds_responses_are_rejected(resources, reason):
    with pytest.raises(Rejected, match=reason):
        decode_clusters(response(CLUSTER_TYPE, resources), {WEB_80})


def test_unparseable_tls_context_of_an_asked_cluster_is_rejected():
    socket_ = base_pb2.TransportSocket(
        name="tls",
        typed_config=any_pb2.Any(type_url=tls_socket(tls_context("s")).typed_config.type_url),
    )
    socket_.typed_config.value = b"\x0a\xff"
    c = cluster_pb2.Cluster(name=WEB_80, transport_socket=socket_)
    with pytest.raises(Rejected, match="UpstreamTlsContext"):
        decode_clusters(cds(c), {WEB_80})


def test_resources_wrapped_in_discovery_resource_are_unwrapped():
    wrapped = discovery_pb2.Resource(name=WEB_80, resource=pack(auto_mtls_cluster(WEB, 80)))
    clusters, _ = decode_clusters(response(CLUSTER_TYPE, [wrapped]), {WEB_80})
    assert list(clusters) == [WEB_80]


# -- EDS --------------------------------------------------------------------------------


def test_endpoints_decode_health_weight_locality_and_tls_mode():
    cla = assignment(
        WEB_80,
        lb_endpoint("10.0.0.5", 8080, "HEALTHY", 3),
        lb_endpoint("10.0.0.6", 8080, "DRAINING", None, tls_mode=None),
        lb_endpoint("fd00::7", 9090, "UNHEALTHY", 1),
        locality=("eu-west1", "eu-west1-b", "rack9"),
    )
    got = decode_endpoints(eds(cla), {WEB_80})
    loc = ("eu-west1", "eu-west1-b", "rack9")
    assert got == {
        WEB_80: (
            XdsEndpoint("10.0.0.5", 8080, "HEALTHY", 3, loc, "istio", None),
            XdsEndpoint("10.0.0.6", 8080, "DRAINING", 1, loc, None, None),
            XdsEndpoint("fd00::7", 9090, "UNHEALTHY", 1, loc, "istio", None),
        )
    }


def test_every_health_status_name_and_an_unknown_value():
    names = ["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED"]
    lbs = [lb_endpoint(f"10.0.0.{i}", 80, name) for i, name in enumerate(names, 1)]
    odd = lb_endpoint("10.0.0.99", 80)
    odd.health_status = 42  # a value newer than these protos
    got = decode_endpoints(eds(assignment(WEB_80, *lbs, odd)), {WEB_80})[WEB_80]
    assert [e.health for e in got] == [*names, "UNKNOWN"]


def test_empty_assignment_means_no_endpoints_and_unasked_ones_are_skipped():
    bad_other = assignment("outbound|1||other", lb_endpoint("not-an-ip"))
    got = decode_endpoints(eds(assignment(WEB_80), bad_other), {WEB_80})
    assert got == {WEB_80: ()}


def _with_address(**fields):
    lb = lb_endpoint()
    lb.endpoint.address.Clear()
    if "socket" in fields:
        lb.endpoint.address.socket_address.CopyFrom(fields["socket"])
    if "pipe" in fields:
        lb.endpoint.address.pipe.path = fields["pipe"]
    if "internal" in fields:
        lb.endpoint.address.envoy_internal_address.server_listener_name = fields["internal"]
    return lb


@pytest.mark.parametrize(
    "lb, reason",
    [
        (lb_endpoint("web-0.web.default.svc"), "not an IP address"),
        (lb_endpoint("10.0.0.5", 0), "no usable port"),
        (lb_endpoint("10.0.0.5", 65536), "no usable port"),
        (lb_endpoint("10.0.0.5", 8080, weight=0), "load_balancing_weight 0"),
        (_with_address(pipe="/var/run/x.sock"), "pipe"),
        (_with_address(internal="connect_originate"), "HBONE"),
        (_with_address(), "without an address"),
        (
            _with_address(socket=address_pb2.SocketAddress(address="10.0.0.5", named_port="http")),
            "no usable port",
        ),
        (endpoint_components_pb2.LbEndpoint(endpoint_name="ep-1"), "endpoint_name"),
    ],
)
def test_endpoints_the_gateway_cannot_dial_reject_the_update(lb, reason):
    with pytest.raises(Rejected, match=reason):
        decode_endpoints(eds(assignment(WEB_80, lb_endpoint("10.0.0.9"), lb)), {WEB_80})


def test_duplicate_or_nameless_assignments_are_rejected():
    with pytest.raises(Rejected, match="twice"):
        decode_endpoints(eds(assignment(WEB_80), assignment(WEB_80)), {WEB_80})
    with pytest.raises(Rejected, match="without cluster_name"):
        decode_endpoints(eds(assignment("")), {WEB_80})


# -- the conversation -------------------------------------------------------------------


def test_first_request_is_wildcard_cds_with_the_node(node):
    (first,) = AdsProtocol(node, [WEB_80]).start()
    assert first.type_url == CLUSTER_TYPE
    assert list(first.resource_names) == []
    assert first.response_nonce == "" and first.version_info == ""
    assert first.node.id == node.node_id
    assert first.node.metadata.fields["NAMESPACE"].string_value == "edge"


def test_cds_then_eds_then_complete_state(node):
    protocol = AdsProtocol(node, [WEB_80, API_90])
    protocol.start()
    step = protocol.on_response(cds(auto_mtls_cluster(WEB, 80)))
    ack, sub = step.requests
    assert (ack.type_url, ack.version_info, ack.response_nonce) == (CLUSTER_TYPE, "c1", "cn1")
    assert not ack.HasField("node") and not ack.HasField("error_detail")
    assert (sub.type_url, list(sub.resource_names), sub.response_nonce) == (
        ENDPOINT_TYPE,
        [WEB_80],
        "",
    )
    assert step.state is None  # EDS still missing
    step = protocol.on_response(eds(assignment(WEB_80, lb_endpoint())))
    (ack,) = step.requests
    assert (ack.version_info, ack.response_nonce, list(ack.resource_names)) == (
        "e1",
        "en1",
        [WEB_80],
    )
    state = step.state
    assert state is not None
    assert list(state.clusters) == [WEB_80]  # API_90 is not in the mesh
    assert [e.address for e in state.endpoints[WEB_80]] == ["10.0.0.5"]
    assert dict(state.versions) == {CLUSTER_TYPE: "c1", ENDPOINT_TYPE: "e1"}


def _running(node) -> AdsProtocol:
    protocol = AdsProtocol(node, [WEB_80, API_90])
    protocol.start()
    protocol.on_response(
        cds(auto_mtls_cluster(WEB, 80), auto_mtls_cluster("api.shop.svc.cluster.local", 90))
    )
    protocol.on_response(eds(assignment(WEB_80, lb_endpoint()), assignment(API_90)))
    return protocol


def test_partial_eds_push_is_merged_and_an_unchanged_one_delivers_nothing(node):
    protocol = _running(node)
    step = protocol.on_response(
        eds(assignment(API_90, lb_endpoint("10.1.0.1")), version="e2", nonce="en2")
    )
    assert step.state is not None
    assert [e.address for e in step.state.endpoints[WEB_80]] == ["10.0.0.5"]
    assert [e.address for e in step.state.endpoints[API_90]] == ["10.1.0.1"]
    step = protocol.on_response(
        eds(assignment(API_90, lb_endpoint("10.1.0.1")), version="e3", nonce="en3")
    )
    assert step.state is None and step.requests[0].response_nonce == "en3"


def test_cluster_removed_from_cds_is_dropped_and_eds_narrowed(node):
    protocol = _running(node)
    step = protocol.on_response(cds(auto_mtls_cluster(WEB, 80), version="c2", nonce="cn2"))
    ack, sub = step.requests
    assert ack.version_info == "c2"
    assert list(sub.resource_names) == [WEB_80]
    assert sub.response_nonce == "en1" and sub.version_info == "e1"
    assert step.state is not None
    assert set(step.state.clusters) == set(step.state.endpoints) == {WEB_80}
    step = protocol.on_response(cds(version="c3", nonce="cn3"))
    ack, unsubscribe = step.requests
    assert unsubscribe.type_url == ENDPOINT_TYPE and list(unsubscribe.resource_names) == []
    assert step.state is not None and not step.state.clusters and not step.state.endpoints


def test_bad_eds_update_is_nacked_with_last_version_and_state_kept(node):
    protocol = _running(node)
    bad = eds(assignment(WEB_80, lb_endpoint("not-an-ip.invalid")), version="e9", nonce="en9")
    step = protocol.on_response(bad)
    (nack,) = step.requests
    assert nack.type_url == ENDPOINT_TYPE
    assert (nack.version_info, nack.response_nonce) == ("e1", "en9")
    assert "not an IP address" in nack.error_detail.message and nack.error_detail.code == 13
    assert step.state is None
    assert "rejected istiod's EDS update (version 'e9'" in step.rejected
    assert "keeping version 'e1'" in step.rejected
    assert [e.address for e in protocol.endpoints[WEB_80]] == ["10.0.0.5"]
    # the next good update is taken, and clears the rejection
    step = protocol.on_response(eds(assignment(WEB_80), version="e10", nonce="en10"))
    assert step.state is not None and step.state.endpoints[WEB_80] == ()
    assert protocol.rejected is None


def test_subscription_change_after_a_nack_carries_the_latest_nonce(node):
    protocol = _running(node)
    protocol.on_response(eds(assignment(WEB_80, lb_endpoint("bad")), version="e5", nonce="en5"))
    step = protocol.on_response(cds(auto_mtls_cluster(WEB, 80), version="c2", nonce="cn2"))
    sub = step.requests[1]
    # istiod drops a request whose nonce is not the last it sent (ShouldRespond)
    assert (sub.response_nonce, sub.version_info) == ("en5", "e1")


def test_nack_of_wrong_type_url_and_first_cds(node):
    protocol = AdsProtocol(node, [WEB_80], versions={CLUSTER_TYPE: "old"})
    protocol.start()
    step = protocol.on_response(
        response("type.googleapis.com/envoy.config.listener.v3.Listener", [])
    )
    assert "unexpected type_url" in step.requests[0].error_detail.message
    step = protocol.on_response(response(CLUSTER_TYPE, [endpoint_pb2.ClusterLoadAssignment()]))
    nack = step.requests[0]
    assert nack.version_info == "old"  # accepted on an earlier stream
    assert protocol.clusters is None and protocol.progress() == "no CDS update accepted"


def test_no_eds_subscription_when_no_asked_cluster_exists(node):
    protocol = AdsProtocol(node, ["outbound|1||nothing"])
    protocol.start()
    step = protocol.on_response(cds(auto_mtls_cluster(WEB, 80)))
    assert [r.type_url for r in step.requests] == [CLUSTER_TYPE]
    assert step.state is not None and not step.state.clusters


# -- node identity ----------------------------------------------------------------------


def test_node_id_and_metadata_from_the_injected_environment():
    env = {
        "POD_NAME": "odin-5d8f7c9b6d-x2k4q",
        "POD_NAMESPACE": "edge",
        "INSTANCE_IP": "10.8.0.12",
        "SERVICE_ACCOUNT": "odin-sa",
        "ISTIO_META_CLUSTER_ID": "east",
        "ISTIO_META_MESH_ID": "mesh1",
        "ISTIO_META_NETWORK": "net-a",
        "ISTIO_META_WORKLOAD_NAME": "odin",
        "ISTIO_META_DNS_CAPTURE": "true",
        "ISTIO_META_NAMESPACE": "spoofed",
        "ISTIO_METAJSON_LABELS": '{"app": "odin", "version": "v1"}',
    }
    node = NodeIdentity.from_env(MeshConfig(namespace="default"), env)
    assert node.node_id == "router~10.8.0.12~odin-5d8f7c9b6d-x2k4q.edge~edge.svc.cluster.local"
    assert len(node.node_id.split("~")) == 4
    meta = node.metadata
    assert meta["NAMESPACE"] == "edge" and meta["SERVICE_ACCOUNT"] == "odin-sa"
    assert meta["CLUSTER_ID"] == "east" and node.cluster_id == "east"
    assert meta["MESH_ID"] == "mesh1" and meta["NETWORK"] == "net-a"
    assert meta["WORKLOAD_NAME"] == "odin" and meta["INSTANCE_IPS"] == "10.8.0.12"
    assert meta["DNS_CAPTURE"] == "true" and meta["NAME"] == "odin-5d8f7c9b6d-x2k4q"
    assert dict(meta["LABELS"]) == {"app": "odin", "version": "v1"}
    assert node.service_cluster == "odin.edge"


def test_node_defaults_when_the_pod_env_is_absent():
    mesh = MeshConfig(namespace="gateways", trust_domain="corp.example")
    node = NodeIdentity.from_env(mesh, {"INSTANCE_IP": "not-an-ip"})
    meta = node.metadata
    assert node.namespace == "gateways" and meta["NAMESPACE"] == "gateways"
    assert node.pod_name == socket.gethostname().split(".")[0]
    assert meta["SERVICE_ACCOUNT"] == "default" and meta["CLUSTER_ID"] == "Kubernetes"
    assert meta["MESH_ID"] == "corp.example" and "NETWORK" not in meta
    assert meta["ISTIO_VERSION"] and "LABELS" not in meta
    parts = node.node_id.split("~")
    assert parts[0] == "router" and parts[1] == node.pod_ip != "not-an-ip"
    assert parts[3] == "gateways.svc.cluster.local"


def test_workload_name_strips_a_deployments_hashes_only():
    mesh = MeshConfig()
    assert (
        NodeIdentity.from_env(mesh, {"POD_NAME": "odin-gw-7c9d8f6b5-q2w3e"}).metadata[
            "WORKLOAD_NAME"
        ]
        == "odin-gw"
    )
    assert NodeIdentity.from_env(mesh, {"POD_NAME": "odin-0"}).metadata["WORKLOAD_NAME"] == (
        "odin-0"
    )


def test_metadata_has_istiod_json_types_and_bad_labels_are_ignored():
    env = {"POD_NAME": "p", "ISTIO_METAJSON_LABELS": '{"a": 1}', "INSTANCE_IP": "10.0.0.1"}
    node = NodeIdentity.from_env(MeshConfig(), env)
    assert "LABELS" not in node.metadata
    node = NodeIdentity.from_env(MeshConfig(), {**env, "ISTIO_METAJSON_LABELS": '{"a": "b"}'})
    message = node_message(node)
    for key, value in message.metadata.fields.items():
        kind = value.WhichOneof("kind")
        assert kind == ("struct_value" if key == "LABELS" else "string_value"), key
    assert message.id == node.node_id and message.user_agent_name == "odin-gw"
    described = node.describe()
    assert json.loads(json.dumps(described))["metadata"]["LABELS"] == {"a": "b"}
    assert described["id"] == node.node_id


# -- where istiod is ------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr, mode, tls, server_name",
    [
        ("istiod.istio-system.svc:15012", "auto", True, None),
        ("istiod.istio-system.svc:15010", "auto", False, None),
        ("10.0.0.1:443", "auto", True, None),
        ("[fd00::1]:15012", "auto", True, None),
        ("unix:///etc/istio/proxy/XDS", "auto", False, None),
        ("istiod:15010", "true", True, None),
        ("istiod:15012", "false", False, None),
        ("localhost:15012", "auto", True, "istiod.istio-system.svc"),
        ("unix:///etc/istio/proxy/XDS", "true", True, "istiod.istio-system.svc"),
    ],
)
def test_pilot_tls_rules(addr, mode, tls, server_name):
    target = PilotTarget.parse(addr, mode)
    assert (target.address, target.tls, target.server_name) == (addr, tls, server_name)


@pytest.mark.parametrize("addr", [None, "", "istiod", "istiod:0", "istiod:99999", ":15012"])
def test_bad_pilot_addr_is_a_mesh_error(addr):
    with pytest.raises(MeshError, match="pilotAddr"):
        PilotTarget.parse(addr, "auto")


def test_bad_pilot_tls_is_a_mesh_error():
    with pytest.raises(MeshError, match="pilotTls"):
        PilotTarget.parse("istiod:15012", "yes")


# -- token and CA files ---------------------------------------------------------------


def test_token_is_read_and_stripped(tmp_path):
    path = tmp_path / "istio-token"
    path.write_text("eyJhbGciOi.payload.sig\n")
    assert read_token(str(path)) == "eyJhbGciOi.payload.sig"


def test_missing_empty_or_unreadable_token_names_the_file_not_the_token(tmp_path):
    missing = tmp_path / "none"
    with pytest.raises(MeshError, match=re.escape(f"istio.tokenFile {missing}: cannot read")):
        read_token(str(missing))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(MeshError, match="is empty"):
        read_token(str(empty))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfesecret")
    with pytest.raises(MeshError) as info:
        read_token(str(binary))
    assert "secret" not in info.value.message and str(binary) in info.value.message


def test_ca_file_must_exist_and_hold_pem(tmp_path):
    with pytest.raises(MeshError, match=r"serviceMesh\.caFile .*cannot read"):
        read_ca(str(tmp_path / "nope.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(MeshError, match="no PEM certificate"):
        read_ca(str(junk))


def test_fetch_over_tls_fails_fast_on_a_missing_token_file(tmp_path, node):
    client = AdsClient(
        pilot_addr="127.0.0.1:9",  # nothing is dialled: the token is read first
        pilot_tls="true",
        ca_file=None,
        token_file=str(tmp_path / "istio-token"),
        node=node,
    )
    with pytest.raises(MeshError, match=r"istio\.tokenFile .*istio-token"):
        client.fetch([WEB_80], timeout=5)
    client.close()


def test_stream_errors_name_the_status_and_never_the_token(node):
    client = AdsClient(
        pilot_addr="istiod:15012", pilot_tls="auto", ca_file=None, token_file=None, node=node
    )
    client._token = "eyJtoken.abc.def"
    fresh = AdsProtocol(node, [WEB_80])
    refused = client._ended(
        fresh, grpc_code("PERMISSION_DENIED"), "authorization failed: token eyJtoken.abc.def"
    )
    assert refused.message.startswith(
        "istiod refused the stream: PERMISSION_DENIED: authorization failed: token <redacted>"
    )
    assert "eyJtoken" not in refused.message
    assert (
        "refused the stream: CANCELLED" in client._ended(fresh, grpc_code("CANCELLED"), "").message
    )
    unreachable = client._ended(fresh, grpc_code("UNAVAILABLE"), "failed to connect")
    assert unreachable.message.startswith("cannot reach istiod at istiod:15012: UNAVAILABLE")
    fresh.responses = 2
    assert isinstance(client._ended(fresh, grpc_code("UNAVAILABLE"), "goaway"), StreamLost)
    assert isinstance(client._ended(fresh, grpc_code("CANCELLED"), ""), StreamLost)
    assert isinstance(client._ended(fresh, None, None), StreamLost)
    assert not isinstance(client._ended(fresh, grpc_code("INTERNAL"), "boom"), StreamLost)


def test_timeout_messages_say_how_far_the_stream_got(node):
    client = AdsClient(
        pilot_addr="istiod:15010", pilot_tls="auto", ca_file=None, token_file=None, node=node
    )
    protocol = AdsProtocol(node, [WEB_80])
    assert (
        client._timed_out(protocol, 2).message
        == "istiod at istiod:15010 answered nothing within 2s"
    )
    protocol.on_response(cds(auto_mtls_cluster(WEB, 80)))
    protocol.on_response(eds(assignment(WEB_80, lb_endpoint("bad")), nonce="x"))
    message = client._timed_out(protocol, 2.5).message
    assert message.startswith(
        "istiod at istiod:15010 sent no complete state within 2.5s (CDS accepted, EDS 0/1"
    )
    assert "last update rejected istiod's EDS update" in message


def grpc_code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name)


def test_scrub_removes_token_and_jwt_shapes_and_caps_length():
    text = "token abc123 and eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\nnext"
    assert _scrub(text, "abc123") == "token <redacted> and <redacted> next"
    assert len(_scrub("x" * 1000, None)) == 403


# -- back-off -------------------------------------------------------------------------


def test_backoff_grows_and_stays_within_jitter_and_cap():
    policy = Backoff(initial=1.0, cap=30.0, factor=2.0, jitter=0.2)
    assert policy.delay(0, lambda: 0.0) == pytest.approx(0.8)
    assert policy.delay(0, lambda: 1.0) == pytest.approx(1.2)
    assert policy.delay(3, lambda: 0.5) == pytest.approx(8.0)
    for failures in (5, 10, 1000):
        assert policy.delay(failures, lambda: 1.0) == 30.0
        assert 24.0 <= policy.delay(failures) <= 30.0
    assert 0.8 <= policy.delay(-1) <= 1.2


def test_a_destination_rules_own_tls_socket_and_plain_validation_context_give_sans():
    """ISTIO_MUTUAL set by a DestinationRule: the cluster's own transport socket, its
    SANs in a plain validation_context (not the combined one) - still the accepted IDs."""
    name = cluster_name(WEB, 80)
    context = tls_pb2.UpstreamTlsContext(
        sni="web.example",
        common_tls_context=tls_pb2.CommonTlsContext(
            validation_context=common_pb2.CertificateValidationContext(
                match_subject_alt_names=[
                    string_pb2.StringMatcher(exact=SAN_WEB),
                    string_pb2.StringMatcher(prefix="spiffe://cluster.local/ns/web/"),
                    string_pb2.StringMatcher(suffix="/sa/ignored"),  # not expressible here
                ]
            )
        ),
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        transport_socket=tls_socket(context),
        # A match that is not Istio's (no criteria, another name) is not the mTLS one.
        transport_socket_matches=[
            cluster_pb2.Cluster.TransportSocketMatch(
                name="other", match=struct({}), transport_socket=raw_socket()
            )
        ],
    )
    clusters, _ = decode_clusters(cds(cluster), {name})
    got = clusters[name]
    assert got.sni == "web.example"
    assert got.sans == (SAN_WEB, "spiffe://cluster.local/ns/web/")


def test_the_istio_match_wins_over_the_clusters_own_socket():
    cluster = auto_mtls_cluster(WEB, 80)
    cluster.transport_socket.CopyFrom(tls_socket(tls_context("other-sni", sans=("spiffe://x/y",))))
    clusters, _ = decode_clusters(cds(cluster), {WEB_80})
    assert clusters[WEB_80].sni == f"outbound_.80_._.{WEB}"
    assert clusters[WEB_80].sans == (SAN_WEB,)


def test_port_one_is_a_port():
    (ep,) = decode_endpoints(eds(assignment(WEB_80, lb_endpoint(port=1))), {WEB_80})[WEB_80]
    assert ep.port == 1
