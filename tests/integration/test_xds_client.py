"""AdsClient against the istiod stand-in over real gRPC on loopback: fetch, watch and
pushes, ACK/NACK as istiod sees them, TLS with a bearer token and istiod's refusals, the
istio-agent's unix socket, istiod going away and coming back, and stopping."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from odin_gw.config.model import MeshConfig
from odin_gw.errors import MeshError
from odin_gw.mesh.xds import AdsClient, Backoff
from odin_gw.mesh.xds_decode import CLUSTER_TYPE, ENDPOINT_TYPE, XdsState, cluster_name
from odin_gw.mesh.xds_node import NodeIdentity
from tests.doubles.istiod import EdsEndpoint, IstiodDouble
from tests.doubles.pki import CertificateAuthority

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WEB = "web.default.svc.cluster.local"
API = "api.shop.svc.cluster.local"
WEB_80 = cluster_name(WEB, 80)
API_90 = cluster_name(API, 90)
FAST = Backoff(initial=0.05, cap=0.3, jitter=0.2)
POD_ENV = {
    "POD_NAME": "odin-5d8f7c9b6d-x2k4q",
    "POD_NAMESPACE": "edge",
    "INSTANCE_IP": "10.8.0.12",
    "SERVICE_ACCOUNT": "odin",
}


@pytest.fixture
def node() -> NodeIdentity:
    return NodeIdentity.from_env(MeshConfig(namespace="edge"), POD_ENV)


@pytest.fixture
def istiod() -> Iterator[IstiodDouble]:
    with IstiodDouble() as double:
        double.set_service(WEB, 80, [EdsEndpoint("10.0.0.5", 8080, service_account="web")])
        yield double


def plain_client(istiod: IstiodDouble, node: NodeIdentity, **opts) -> AdsClient:
    base = dict(
        pilot_addr=istiod.address,
        pilot_tls="false",  # the double's random port is not 15010
        ca_file=None,
        token_file=None,
        node=node,
        timeout=5.0,
        backoff=FAST,
    )
    base.update(opts)
    return AdsClient(**base)


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout}s")


def addresses(state: XdsState, cluster: str) -> list[str]:
    return [f"{e.address}:{e.port}" for e in state.endpoints.get(cluster, ())]


class Watching:
    """``client.watch`` in a thread; states and errors land in lists."""

    def __init__(self, client: AdsClient, clusters: list[str]) -> None:
        self.client = client
        self.states: list[XdsState] = []
        self.errors: list[MeshError] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=client.watch,
            args=(clusters, self.states.append, self.errors.append, self.stop),
            daemon=True,
        )

    def __enter__(self) -> Watching:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        self.client.close()
        assert not self.thread.is_alive()

    def state(self, check: Callable[[XdsState], bool], timeout: float, what: str) -> XdsState:
        return wait_until(lambda: next((s for s in self.states if check(s)), None), timeout, what)

    def stopped_within(self) -> float:
        started = time.monotonic()
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return time.monotonic() - started


# -- fetch --------------------------------------------------------------------------------


def test_fetch_returns_asked_clusters_and_acks_cds_and_eds(istiod, node):
    istiod.set_service(API, 90, [EdsEndpoint("10.1.0.1", 9090, locality=("eu", "eu-1", "a"))])
    client = plain_client(istiod, node)
    started = time.monotonic()
    state = client.fetch([WEB_80, API_90, cluster_name("absent.x.svc.cluster.local", 1)], 5)
    assert time.monotonic() - started < 2
    assert set(state.clusters) == {WEB_80, API_90}
    web = state.clusters[WEB_80]
    assert web.sni == "outbound_.80_._.web.default.svc.cluster.local"
    assert web.sans == ("spiffe://cluster.local/ns/default/sa/web",)
    assert web.alpn == ("istio-peer-exchange", "istio")
    (api,) = state.endpoints[API_90]
    assert (api.address, api.port, api.health, api.weight) == ("10.1.0.1", 9090, "HEALTHY", 1)
    assert api.locality == ("eu", "eu-1", "a") and api.tls_mode == "istio"
    assert api.service_account is None  # istiod does not put it in EDS
    acked = {(t, v) for t, v, _ in istiod.acks}
    assert (CLUSTER_TYPE, state.versions[CLUSTER_TYPE]) in acked
    assert (ENDPOINT_TYPE, state.versions[ENDPOINT_TYPE]) in acked
    assert istiod.subscribed(ENDPOINT_TYPE) == set()  # the stream is closed
    node_id, metadata = istiod.nodes[-1]
    assert node_id == "router~10.8.0.12~odin-5d8f7c9b6d-x2k4q.edge~edge.svc.cluster.local"
    assert metadata["NAMESPACE"] == "edge" and metadata["SERVICE_ACCOUNT"] == "odin"
    assert metadata["INSTANCE_IPS"] == "10.8.0.12" and metadata["CLUSTER_ID"] == "Kubernetes"
    assert istiod.refusals == []
    described = client.describe()
    assert described["versions"] == {
        "CDS": state.versions[CLUSTER_TYPE],
        "EDS": state.versions[ENDPOINT_TYPE],
    }
    assert described["tls"] is False and described["tokenFile"] is None
    assert described["node"]["id"] == node_id
    client.close()


def test_fetch_times_out_against_a_server_that_never_speaks(node):
    with silent_listener() as address:
        client = AdsClient(
            pilot_addr=address, pilot_tls="false", ca_file=None, token_file=None, node=node
        )
        started = time.monotonic()
        with pytest.raises(
            MeshError, match=r"istiod at 127\.0\.0\.1:\d+ answered nothing within 0\.5s"
        ):
            client.fetch([WEB_80], 0.5)
        assert time.monotonic() - started < 1.5


def test_fetch_when_nothing_listens_says_unreachable(node):
    port = free_port()
    client = AdsClient(
        pilot_addr=f"127.0.0.1:{port}", pilot_tls="false", ca_file=None, token_file=None, node=node
    )
    with pytest.raises(MeshError, match=f"cannot reach istiod at 127.0.0.1:{port}: UNAVAILABLE"):
        client.fetch([WEB_80], 3)


# -- watch ----------------------------------------------------------------------------------


def test_watch_reflects_pushes_within_two_seconds(istiod, node):
    with Watching(plain_client(istiod, node), [WEB_80, API_90]) as w:
        w.state(lambda s: addresses(s, WEB_80) == ["10.0.0.5:8080"], 3, "first state")
        assert API_90 not in w.states[0].clusters

        istiod.set_service(WEB, 80, [EdsEndpoint("10.0.0.5", 8080), EdsEndpoint("10.0.0.6", 8080)])
        w.state(lambda s: len(addresses(s, WEB_80)) == 2, 2, "endpoint added")

        istiod.set_service(API, 90, [EdsEndpoint("10.1.0.1", 9090, health="UNHEALTHY")])
        state = w.state(lambda s: API_90 in s.endpoints, 2, "new cluster with its endpoints")
        assert state.endpoints[API_90][0].health == "UNHEALTHY"

        istiod.remove_service(WEB, 80)
        state = w.state(lambda s: WEB_80 not in s.clusters, 2, "cluster removed")
        assert WEB_80 not in state.endpoints and API_90 in state.clusters
        # every delivered state is complete: each of its EDS clusters has its endpoints
        assert all(set(s.clusters) <= set(s.endpoints) for s in w.states)
        assert w.errors == []
        assert istiod.subscribed(ENDPOINT_TYPE) == {API_90}
        acks = istiod.acks
        assert acks and all(nonce for _, _, nonce in acks)


def test_invalid_push_is_nacked_with_last_version_and_state_kept(istiod, node):
    with Watching(plain_client(istiod, node), [WEB_80]) as w:
        first = w.state(lambda s: WEB_80 in s.endpoints, 3, "first state")
        accepted = first.versions[ENDPOINT_TYPE]
        istiod.push_invalid(WEB, 80)
        wait_until(lambda: istiod.nacks, 2, "NACK at istiod")
        type_url, version, nonce, message = istiod.nacks[-1]
        assert type_url == ENDPOINT_TYPE and version == accepted
        assert nonce and nonce not in {n for _, _, n in istiod.acks}
        assert "not-an-ip.invalid" in message and "not an IP address" in message
        wait_until(lambda: w.errors, 2, "NACK reported")
        assert "rejected istiod's EDS update" in w.errors[-1].message
        assert len(w.states) == 1  # the last accepted state stands
        istiod.set_service(WEB, 80, [EdsEndpoint("10.0.0.7", 8080)])
        w.state(lambda s: addresses(s, WEB_80) == ["10.0.0.7:8080"], 2, "good update after NACK")


def test_istiod_restart_is_reported_then_the_stream_comes_back(istiod, node):
    with Watching(plain_client(istiod, node), [WEB_80]) as w:
        w.state(lambda s: WEB_80 in s.endpoints, 3, "first state")
        istiod.stop()
        wait_until(lambda: w.errors, 3, "failure reported while istiod is away")
        assert "cannot reach istiod" in w.errors[0].message
        count = len(w.states)
        istiod.set_service(WEB, 80, [EdsEndpoint("10.0.0.8", 8080)])
        istiod.start()
        state = w.state(lambda s: addresses(s, WEB_80) == ["10.0.0.8:8080"], 3, "reconnected")
        assert w.states.index(state) >= count
        wait_until(lambda: istiod.streams() == 1, 2, "one stream again")


def test_stop_ends_watch_within_a_second_in_every_phase(istiod, node):
    # streaming
    w = Watching(plain_client(istiod, node), [WEB_80]).__enter__()
    w.state(lambda s: True, 3, "first state")
    assert w.stopped_within() < 1.0
    # connecting to a peer that accepts TCP but never speaks HTTP/2
    with silent_listener() as address:
        client = AdsClient(
            pilot_addr=address, pilot_tls="false", ca_file=None, token_file=None, node=node
        )
        w = Watching(client, [WEB_80]).__enter__()
        time.sleep(0.5)
        assert w.stopped_within() < 1.0
    # backing off between attempts
    slow = Backoff(initial=20, cap=30)
    client = AdsClient(
        pilot_addr=f"127.0.0.1:{free_port()}",
        pilot_tls="false",
        ca_file=None,
        token_file=None,
        node=node,
        backoff=slow,
    )
    w = Watching(client, [WEB_80]).__enter__()
    wait_until(lambda: w.errors, 3, "first failure")
    assert w.stopped_within() < 1.0


def test_close_ends_watch(istiod, node):
    client = plain_client(istiod, node)
    with Watching(client, [WEB_80]) as w:
        w.state(lambda s: True, 3, "first state")
        client.close()
        w.thread.join(2)
        assert not w.thread.is_alive()


# -- TLS, tokens, refusals ---------------------------------------------------------------


@pytest.fixture
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority("cluster.local", common_name="istio-ca")


def tls_client(istiod: IstiodDouble, node: NodeIdentity, tmp_path, token: str | None):
    ca_file = tmp_path / "root-cert.pem"
    ca_file.write_text(istiod.root_cert_pem or "")
    token_file = tmp_path / "istio-token"
    if token is not None:
        token_file.write_text(token + "\n")
    return AdsClient(
        pilot_addr=istiod.address,
        pilot_tls="auto",  # not 15010: TLS
        ca_file=str(ca_file),
        token_file=str(token_file),
        node=node,
        backoff=FAST,
    )


def test_tls_with_bearer_token_reread_on_every_connect(mesh_ca, node, tmp_path):
    tokens = {"token-one": ("edge", "odin")}
    with IstiodDouble(ca=mesh_ca, tokens=tokens) as istiod:
        istiod.set_service(WEB, 80, [EdsEndpoint("10.0.0.5", 8080)])
        client = tls_client(istiod, node, tmp_path, "token-one")
        assert addresses(client.fetch([WEB_80], 5), WEB_80) == ["10.0.0.5:8080"]
        # the kubelet rotates the projected token: the next connect reads the new one
        istiod.tokens["token-two"] = ("edge", "odin")
        del istiod.tokens["token-one"]
        (tmp_path / "istio-token").write_text("token-two")
        assert addresses(client.fetch([WEB_80], 5), WEB_80) == ["10.0.0.5:8080"]
        assert istiod.refusals == []
        described = json.dumps(client.describe())
        assert "token-two" not in described and str(tmp_path / "istio-token") in described


def test_refusals_name_the_status_and_istiods_text_never_the_token(mesh_ca, node, tmp_path):
    tokens = {"token-of-another-sa": ("edge", "someone-else")}
    with IstiodDouble(ca=mesh_ca, tokens=tokens) as istiod:
        client = tls_client(istiod, node, tmp_path, "token-of-another-sa")
        with pytest.raises(MeshError) as info:
            client.fetch([WEB_80], 5)
        message = info.value.message
        assert message.startswith(
            "istiod refused the stream: PERMISSION_DENIED: authorization failed: no identities"
        )
        assert "edge/odin" in message and "token-of-another-sa" not in message
        # an unknown token, through watch
        (tmp_path / "istio-token").write_text("forged")
        with Watching(client, [WEB_80]) as w:
            wait_until(lambda: w.errors, 3, "refusal reported")
        assert w.errors[0].message.startswith(
            "istiod refused the stream: UNAUTHENTICATED: authentication failure"
        )
        assert all("forged" not in e.message for e in w.errors)
        assert w.states == []


def test_missing_token_file_is_reported_by_watch(mesh_ca, node, tmp_path):
    with IstiodDouble(ca=mesh_ca, tokens={}) as istiod:
        client = tls_client(istiod, node, tmp_path, None)
        with Watching(client, [WEB_80]) as w:
            wait_until(lambda: w.errors, 3, "token error")
        assert "istio.tokenFile" in w.errors[0].message
        assert str(tmp_path / "istio-token") in w.errors[0].message
        assert istiod.nodes == []  # nothing was sent without the token


def test_istiod_certificate_from_another_ca_is_refused(mesh_ca, node, tmp_path):
    with IstiodDouble(ca=mesh_ca) as istiod:
        client = tls_client(istiod, node, tmp_path, "t")
        (tmp_path / "root-cert.pem").write_text(CertificateAuthority("cluster.local").root_pem)
        with pytest.raises(MeshError, match=r"cannot reach istiod .*UNAVAILABLE"):
            client.fetch([WEB_80], 5)
        assert istiod.nodes == []


# -- the local istio-agent ---------------------------------------------------------------


def test_unix_socket_of_a_local_istio_agent_needs_no_credentials(node):
    directory = tempfile.mkdtemp(prefix="xds-", dir="/tmp")  # short: AF_UNIX path limit
    try:
        path = os.path.join(directory, "XDS")
        with IstiodDouble(unix_path=path) as istiod:
            istiod.set_service(WEB, 80, [EdsEndpoint("10.0.0.5", 8080)])
            client = AdsClient(
                pilot_addr=f"unix://{path}",
                pilot_tls="auto",
                ca_file="/nonexistent/root-cert.pem",  # not read: no TLS on a unix socket
                token_file="/nonexistent/istio-token",  # not read either
                node=node,
            )
            state = client.fetch([WEB_80], 5)
            assert addresses(state, WEB_80) == ["10.0.0.5:8080"]
            assert istiod.nodes[-1][0] == node.node_id
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class silent_listener:
    """A loopback TCP listener that completes handshakes (the kernel does) and never
    answers: a gRPC client stays connecting until its connect timeout."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.sock.close()
