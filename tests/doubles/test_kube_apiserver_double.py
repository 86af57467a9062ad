"""Tests of the kube-apiserver stand-in, driven over real HTTPS (requests, http.client,
and lightkube when installed)."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from tests.doubles import kube_store
from tests.doubles.kube_apiserver import KubeApiServerDouble, SliceEndpoint
from tests.doubles.pki import CertificateAuthority

pytestmark = pytest.mark.timeout(30)

TOKEN = "t0k3n-gateway"
USER = "system:serviceaccount:shop:odin"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
SERVICES = "/api/v1/namespaces/shop/services"
PROFILES = "/apis/linkerd.io/v1alpha2/namespaces/shop/serviceprofiles"
UNAUTHORIZED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Unauthorized",
    "reason": "Unauthorized",
    "code": 401,
}


@pytest.fixture
def kube() -> Iterator[KubeApiServerDouble]:
    with KubeApiServerDouble(tokens={TOKEN: USER}, bookmark_interval=None) as double:
        yield double
    assert double.errors == []


def session(kube: KubeApiServerDouble, token: str | None = TOKEN) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify= otherwise
    s.verify = kube.ca_file
    if token is not None:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def get(kube: KubeApiServerDouble, path: str, token: str | None = TOKEN, **params: Any):
    with session(kube, token) as s:
        return s.get(kube.url + path, params=params, timeout=10)


def orders_slice(kube: KubeApiServerDouble, name: str = "orders-a", ip: str = "10.0.0.1", **kw):
    return kube.upsert_endpoint_slice(
        "shop", name, "orders", endpoints=[ip], ports=[{"name": "http", "port": 8080}], **kw
    )


class WatchReader:
    """A watch stream read line by line in a thread over ``http.client``."""

    def __init__(self, kube: KubeApiServerDouble, path: str, token: str = TOKEN, **params: Any):
        ctx = ssl.create_default_context(cafile=kube.ca_file)
        self.conn = http.client.HTTPSConnection("127.0.0.1", kube.port, context=ctx, timeout=15)
        query = urlencode({"watch": "true", **params})
        self.conn.request("GET", f"{path}?{query}", headers={"Authorization": f"Bearer {token}"})
        self.sock = self.conn.sock  # kept: the response's reader holds it open past close()
        self.response = self.conn.getresponse()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in range(10_000):
                line = self.response.readline()
                if not line:
                    self.events.put(("END", None))
                    return
                event = json.loads(line)
                self.events.put((event["type"], event["object"]))
        except (OSError, http.client.HTTPException) as exc:
            self.events.put(("CUT", exc))

    def next(self, timeout: float = 5.0) -> tuple[str, Any]:
        return self.events.get(timeout=timeout)

    def take(self, n: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
        return [self.next(timeout) for _ in range(n)]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.response.close()
        self.conn.close()


@pytest.fixture
def watches() -> Iterator[list[WatchReader]]:
    opened: list[WatchReader] = []
    yield opened
    for reader in opened:
        reader.close()


# -- transport and authentication -----------------------------------------------------
def test_serves_tls_for_ip_and_service_dns_signed_by_the_test_ca(kube):
    ctx = ssl.create_default_context(cafile=kube.ca_file)
    for name in ("127.0.0.1", "kubernetes.default.svc"):
        with (
            socket.create_connection(("127.0.0.1", kube.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    other = ssl.create_default_context(cadata=CertificateAuthority().root_pem)
    with (
        socket.create_connection(("127.0.0.1", kube.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        other.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_burst_of_connections_is_not_dropped_by_a_short_backlog(kube):
    socks = []
    started = time.monotonic()
    try:
        for _ in range(200):  # a backlog of 5 would drop SYNs: 1 s retransmits, timeouts
            socks.append(socket.create_connection(("127.0.0.1", kube.port), timeout=1))
        assert time.monotonic() - started < 1
    finally:
        for sock in socks:
            sock.close()


def test_unknown_or_missing_token_gets_401_status(kube):
    for token in (None, "wrong"):
        reply = get(kube, SLICES, token)
        assert reply.status_code == 401
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.json() == UNAUTHORIZED
    assert get(kube, SLICES).status_code == 200
    assert get(kube, "/version", None).json()["major"] == "1"
    assert [r.token for r in kube.requests][:3] == [None, "wrong", TOKEN]
    assert [r.user for r in kube.requests][:3] == [None, None, USER]


def test_rotated_token_replaces_the_old_one_and_revoked_is_refused(kube):
    kube.rotate_token(TOKEN, "t0k3n-2")
    assert get(kube, SLICES).status_code == 401
    assert get(kube, SLICES, "t0k3n-2").status_code == 200
    assert kube.requests[-1].user == USER
    kube.revoke_token("t0k3n-2")
    assert get(kube, SLICES, "t0k3n-2").status_code == 401
    kube.add_token("t0k3n-3", "someone")
    assert get(kube, SLICES, "t0k3n-3").status_code == 200
    assert "t0k3n" not in repr(kube.requests[-1])


def test_forbid_answers_rbac_403_status(kube):
    kube.forbid("endpointslices", verbs=["list", "watch"])
    reply = get(kube, SLICES)
    assert reply.status_code == 403
    body = reply.json()
    assert (body["reason"], body["code"]) == ("Forbidden", 403)
    assert body["message"] == (
        f'endpointslices.discovery.k8s.io is forbidden: User "{USER}" cannot list resource '
        '"endpointslices" in API group "discovery.k8s.io" in the namespace "shop"'
    )
    assert get(kube, SLICES, watch="true").status_code == 403
    assert get(kube, SERVICES).status_code == 200
    kube.allow("EndpointSlice")
    assert get(kube, SLICES).status_code == 200


# -- objects, lists, selectors ----------------------------------------------------------
def test_list_endpoint_slices_in_the_v1_shape(kube):
    kube.upsert_service("shop", "orders", ports=[{"name": "http", "port": 80, "targetPort": 8080}])
    kube.upsert_endpoint_slice(
        "shop",
        "orders-abc",
        "orders",
        endpoints=[
            SliceEndpoint("10.0.0.7", zone="zone-a", node_name="node-1", target_ref="orders-1"),
            {"address": "10.0.0.8", "ready": False, "serving": True, "terminating": True},
        ],
        ports=[{"name": "http", "port": 8080, "appProtocol": "http"}],
    )
    reply = get(kube, SLICES)
    assert reply.status_code == 200
    body = reply.json()
    assert (body["kind"], body["apiVersion"]) == ("EndpointSliceList", "discovery.k8s.io/v1")
    assert body["metadata"] == {"resourceVersion": str(kube.resource_version)}
    (item,) = body["items"]
    assert "kind" not in item and "apiVersion" not in item
    meta = item["metadata"]
    assert meta["name"] == "orders-abc" and meta["namespace"] == "shop"
    assert meta["resourceVersion"] == str(kube.resource_version) and meta["generation"] == 1
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["labels"] == {
        "kubernetes.io/service-name": "orders",
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
    }
    assert meta["ownerReferences"][0]["kind"] == "Service"
    assert item["addressType"] == "IPv4"
    assert item["ports"] == [
        {"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"}
    ]
    first, second = item["endpoints"]
    assert first["addresses"] == ["10.0.0.7"]
    assert first["conditions"] == {"ready": True, "serving": True, "terminating": False}
    assert (first["zone"], first["nodeName"]) == ("zone-a", "node-1")
    assert first["targetRef"]["kind"] == "Pod" and first["targetRef"]["name"] == "orders-1"
    assert second["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert "zone" not in second and "targetRef" not in second


def test_get_single_objects_and_not_found(kube):
    kube.upsert_service(
        "shop", "orders", ports=[80], annotations={"timeout.linkerd.io/request": "2s"}
    )
    kube.upsert_service_profile("shop", "orders.shop.svc.cluster.local", {"routes": "not-a-list"})
    svc = get(kube, f"{SERVICES}/orders").json()
    assert (svc["kind"], svc["apiVersion"]) == ("Service", "v1")
    assert svc["metadata"]["annotations"] == {"timeout.linkerd.io/request": "2s"}
    assert svc["spec"]["ports"] == [{"protocol": "TCP", "port": 80, "targetPort": 80}]
    profile = get(kube, f"{PROFILES}/orders.shop.svc.cluster.local").json()
    assert profile["spec"] == {"routes": "not-a-list"}  # stored as given
    assert profile["kind"] == "ServiceProfile" and profile["apiVersion"] == "linkerd.io/v1alpha2"
    missing = get(kube, f"{SERVICES}/nope")
    assert missing.status_code == 404
    assert missing.json()["message"] == 'services "nope" not found'
    missing = get(kube, f"{PROFILES}/nope").json()
    assert (missing["reason"], missing["message"]) == (
        "NotFound",
        'serviceprofiles.linkerd.io "nope" not found',
    )
    listed = get(kube, PROFILES).json()
    assert listed["kind"] == "ServiceProfileList"
    assert listed["items"][0]["kind"] == "ServiceProfile"  # CRD list items keep TypeMeta
    assert get(kube, "/apis/nope.io/v1/namespaces/shop/things").status_code == 404


def test_label_selectors(kube):
    orders_slice(kube, "orders-a", labels={"tier": "web", "zone": "a"})
    orders_slice(kube, "orders-b", labels={"tier": "db"})
    kube.upsert_endpoint_slice("shop", "users-a", "users", endpoints=["10.0.1.1"], ports=[80])

    def names(selector: str) -> list[str]:
        reply = get(kube, SLICES, labelSelector=selector)
        assert reply.status_code == 200, reply.text
        return [i["metadata"]["name"] for i in reply.json()["items"]]

    assert names("kubernetes.io/service-name=orders") == ["orders-a", "orders-b"]
    assert names("kubernetes.io/service-name==users") == ["users-a"]
    assert names("tier!=web") == ["orders-b", "users-a"]
    assert names("zone") == ["orders-a"]
    assert names("!zone") == ["orders-b", "users-a"]
    assert names("kubernetes.io/service-name=orders,tier=db") == ["orders-b"]
    assert names("tier in (web,db),!zone") == ["orders-b"]
    assert names("tier notin (web)") == ["orders-b", "users-a"]
    bad = get(kube, SLICES, labelSelector="tier=a b")
    assert bad.status_code == 400 and bad.json()["reason"] == "BadRequest"


def test_field_selectors_and_namespaces(kube):
    orders_slice(kube, "orders-a")
    kube.upsert_endpoint_slice("other", "orders-a", "orders", endpoints=["10.9.0.1"], ports=[80])
    by_name = get(kube, SLICES, fieldSelector="metadata.name=orders-a").json()["items"]
    assert [i["metadata"]["namespace"] for i in by_name] == ["shop"]
    everywhere = get(kube, "/apis/discovery.k8s.io/v1/endpointslices").json()["items"]
    assert [i["metadata"]["namespace"] for i in everywhere] == ["other", "shop"]
    assert get(kube, SLICES, fieldSelector="metadata.namespace!=shop").json()["items"] == []
    bad = get(kube, SLICES, fieldSelector="spec.nodeName=x")
    assert bad.status_code == 400
    assert bad.json()["message"] == "field label not supported: spec.nodeName"


def test_one_global_resource_version_and_no_op_updates(kube):
    start = kube.resource_version
    svc = kube.upsert_service("shop", "orders", ports=[80])
    first = orders_slice(kube)
    assert int(svc["metadata"]["resourceVersion"]) == start + 1
    assert int(first["metadata"]["resourceVersion"]) == start + 2
    assert "generation" not in svc["metadata"]
    same = orders_slice(kube)  # identical content: no write, no new revision
    assert same["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    changed = orders_slice(kube, ip="10.0.0.2")
    assert int(changed["metadata"]["resourceVersion"]) == start + 3
    assert changed["metadata"]["generation"] == 2
    assert changed["metadata"]["uid"] == first["metadata"]["uid"]
    assert kube.delete_endpoint_slice("shop", "orders-a") and kube.resource_version == start + 4
    assert not kube.delete_endpoint_slice("shop", "orders-a")


def test_pagination_and_exact_list_at_an_older_version(kube):
    for n in range(5):
        orders_slice(kube, f"orders-{n}")
    first = get(kube, SLICES, limit=2).json()
    assert [i["metadata"]["name"] for i in first["items"]] == ["orders-0", "orders-1"]
    assert first["metadata"]["remainingItemCount"] == 3
    orders_slice(kube, "orders-00")  # written after page 1: not in the paged snapshot
    second = get(kube, SLICES, limit=10, **{"continue": first["metadata"]["continue"]}).json()
    assert [i["metadata"]["name"] for i in second["items"]] == ["orders-2", "orders-3", "orders-4"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    old_rv = first["metadata"]["resourceVersion"]
    exact = get(kube, SLICES, resourceVersion=old_rv, resourceVersionMatch="Exact").json()
    assert len(exact["items"]) == 5 and exact["metadata"]["resourceVersion"] == old_rv
    kube.compact()
    gone = get(kube, SLICES, **{"continue": first["metadata"]["continue"]})
    assert gone.status_code == 410 and gone.json()["reason"] == "Expired"
    gone = get(kube, SLICES, resourceVersion=old_rv, resourceVersionMatch="Exact")
    assert gone.status_code == 410
    # NotOlderThan an old RV is served from the current state.
    assert len(get(kube, SLICES, resourceVersion=old_rv).json()["items"]) == 6


# -- watch ------------------------------------------------------------------------------
def test_watch_from_a_version_sends_changes_in_order(kube, watches):
    orders_slice(kube, "orders-a")
    listed = get(kube, SLICES, labelSelector="kubernetes.io/service-name=orders").json()
    rv = listed["metadata"]["resourceVersion"]
    reader = WatchReader(
        kube, SLICES, resourceVersion=rv, labelSelector="kubernetes.io/service-name=orders"
    )
    watches.append(reader)
    assert reader.response.status == 200
    assert reader.response.getheader("Content-Type") == "application/json"
    assert reader.response.getheader("Transfer-Encoding") == "chunked"
    kube.wait_for_watches(1)
    orders_slice(kube, "orders-b")
    kube.upsert_endpoint_slice("shop", "users-a", "users", endpoints=["10.0.1.1"], ports=[80])
    orders_slice(kube, "orders-a", ip="10.0.0.9")
    kube.delete_endpoint_slice("shop", "orders-b")
    events = reader.take(3)
    assert [(t, o["metadata"]["name"]) for t, o in events] == [
        ("ADDED", "orders-b"),
        ("MODIFIED", "orders-a"),
        ("DELETED", "orders-b"),
    ]
    rvs = [int(o["metadata"]["resourceVersion"]) for _, o in events]
    assert rvs == sorted(rvs) and rvs[-1] == kube.resource_version
    assert events[0][1]["kind"] == "EndpointSlice"  # watch objects carry TypeMeta
    # Relabelled out of the selection: the watch sees it go.
    kube.upsert_endpoint_slice("shop", "orders-a", "payments", endpoints=["10.0.0.9"], ports=[80])
    kind, obj = reader.next()
    assert (kind, obj["metadata"]["name"]) == ("DELETED", "orders-a")


@pytest.mark.parametrize("rv", [None, "0"])
def test_watch_without_a_version_starts_with_the_current_state(kube, watches, rv):
    orders_slice(kube, "orders-a")
    orders_slice(kube, "orders-b")
    params = {} if rv is None else {"resourceVersion": rv}
    reader = WatchReader(kube, SLICES, **params)
    watches.append(reader)
    assert [(t, o["metadata"]["name"]) for t, o in reader.take(2)] == [
        ("ADDED", "orders-a"),
        ("ADDED", "orders-b"),
    ]
    orders_slice(kube, "orders-c")
    assert reader.next()[0] == "ADDED"


def test_watch_from_a_compacted_version_gets_410_error_event(kube, watches):
    orders_slice(kube, "orders-a")
    old = kube.resource_version
    orders_slice(kube, "orders-b")
    compacted = kube.compact()
    reader = WatchReader(kube, SLICES, resourceVersion=str(old - 1))
    watches.append(reader)
    assert reader.response.status == 200  # as the real cacher: an ERROR event, not HTTP 410
    kind, status = reader.next()
    assert kind == "ERROR"
    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {old - 1} ({compacted})",
        "reason": "Expired",
        "code": 410,
    }
    assert reader.next() == ("END", None)
    fresh = WatchReader(kube, SLICES, resourceVersion=str(compacted))
    watches.append(fresh)
    orders_slice(kube, "orders-c")
    assert fresh.next()[0] == "ADDED"


def test_history_window_expires_old_versions(watches):
    with KubeApiServerDouble(tokens={TOKEN: USER}, history_limit=2) as kube:
        start = kube.resource_version
        for n in range(4):
            orders_slice(kube, f"orders-{n}")
        reader = WatchReader(kube, SLICES, resourceVersion=str(start))
        watches.append(reader)
        kind, status = reader.next()
        assert (kind, status["code"]) == ("ERROR", 410)
        assert status["message"] == f"too old resource version: {start} ({start + 2})"
        ok = WatchReader(kube, SLICES, resourceVersion=str(start + 2))
        watches.append(ok)
        assert [o["metadata"]["name"] for _, o in ok.take(2)] == ["orders-2", "orders-3"]


def test_watch_for_a_future_version_gives_up_with_504(kube, watches, monkeypatch):
    monkeypatch.setattr(kube_store, "FRESH_WAIT", 0.2)
    reader = WatchReader(kube, SLICES, resourceVersion=str(kube.resource_version + 50))
    kind, status = reader.next()
    watches.append(reader)
    assert (kind, status["code"], status["reason"]) == ("ERROR", 504, "Timeout")
    assert status["message"].startswith("Too large resource version")


def test_timeout_seconds_ends_the_stream_cleanly_and_keeps_the_connection(kube):
    ctx = ssl.create_default_context(cafile=kube.ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", kube.port, context=ctx, timeout=10)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        started = time.monotonic()
        conn.request("GET", f"{SLICES}?watch=1&timeoutSeconds=1", headers=headers)
        body = conn.getresponse().read()  # returns only at the closing chunk
        assert body == b"" and 0.9 < time.monotonic() - started < 3
        conn.request("GET", SLICES, headers=headers)  # same connection, kept alive
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert len(kube.requests_matching(SLICES)) == 2
    kube.wait_for(lambda: kube.watches_open() == 0, 5, "watch closed")


def test_default_watch_timeout_is_configurable(watches):
    with KubeApiServerDouble(tokens=[TOKEN], watch_timeout=0.5) as kube:
        reader = WatchReader(kube, SLICES)
        watches.append(reader)
        assert reader.next(timeout=3) == ("END", None)


def test_bookmarks_only_when_allowed(kube, watches):
    plain = WatchReader(kube, SLICES)
    with_bookmarks = WatchReader(kube, SLICES, allowWatchBookmarks="true")
    profiles = WatchReader(kube, PROFILES, allowWatchBookmarks="true")
    watches.extend([plain, with_bookmarks, profiles])
    kube.wait_for_watches(3)
    orders_slice(kube)
    kube.send_bookmarks()
    assert with_bookmarks.next()[0] == "ADDED"
    kind, obj = with_bookmarks.next()
    assert kind == "BOOKMARK"
    assert obj == {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": str(kube.resource_version), "creationTimestamp": None},
        "addressType": "",
        "endpoints": None,
        "ports": None,
    }
    assert profiles.next()[1]["metadata"] == {"resourceVersion": str(kube.resource_version)}
    assert plain.next()[0] == "ADDED"
    with pytest.raises(queue.Empty):
        plain.next(timeout=0.3)


def test_send_initial_events_ends_with_an_annotated_bookmark(kube, watches):
    orders_slice(kube, "orders-a")
    reader = WatchReader(
        kube,
        SLICES,
        sendInitialEvents="true",
        allowWatchBookmarks="true",
        resourceVersionMatch="NotOlderThan",
    )
    watches.append(reader)
    assert reader.next()[0] == "ADDED"
    kind, obj = reader.next()
    assert kind == "BOOKMARK"
    assert obj["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_deprecated_watch_path_follows_one_object(kube, watches):
    path = "/apis/discovery.k8s.io/v1/watch/namespaces/shop/endpointslices/orders-b"
    reader = WatchReader(kube, path, resourceVersion=str(kube.resource_version))
    watches.append(reader)
    kube.wait_for_watches(1)
    orders_slice(kube, "orders-a")
    orders_slice(kube, "orders-b")
    kind, obj = reader.next()
    assert (kind, obj["metadata"]["name"]) == ("ADDED", "orders-b")


def test_bookmarks_at_the_interval(watches):
    with KubeApiServerDouble(tokens=[TOKEN], bookmark_interval=0.2) as kube:
        reader = WatchReader(kube, SLICES, allowWatchBookmarks="1", timeoutSeconds="5")
        watches.append(reader)
        kinds = [reader.next(timeout=2)[0] for _ in range(3)]
        assert kinds == ["BOOKMARK"] * 3


def test_go_down_cuts_watches_and_come_up_serves_on_the_same_port(kube, watches):
    orders_slice(kube, "orders-a")
    rv = kube.resource_version
    reader = WatchReader(kube, SLICES, resourceVersion=str(rv))
    watches.append(reader)
    kube.wait_for_watches(1)
    port = kube.port
    kube.go_down()
    assert reader.next()[0] in ("CUT", "END")
    kube.wait_for(lambda: kube.watches_open() == 0, 5, "watches cut")
    with pytest.raises(requests.ConnectionError):
        get(kube, SLICES)
    orders_slice(kube, "orders-b")  # written while away
    kube.come_up()
    assert kube.port == port and get(kube, SLICES).status_code == 200
    resumed = WatchReader(kube, SLICES, resourceVersion=str(rv))
    watches.append(resumed)
    kind, obj = resumed.next()
    assert (kind, obj["metadata"]["name"]) == ("ADDED", "orders-b")


def test_hang_holds_requests_until_released(kube):
    kube.hang()
    with session(kube) as s, pytest.raises(requests.ReadTimeout):
        s.get(kube.url + SLICES, timeout=0.5)
    kube.hang(False)
    assert get(kube, SLICES).status_code == 200


def test_vanished_watch_client_is_noticed(kube):
    reader = WatchReader(kube, SLICES)
    kube.wait_for_watches(1)
    reader.close()
    kube.wait_for(lambda: kube.watches_open() == 0, 5, "the server noticing the client left")


def test_stop_leaves_no_threads_behind():
    before = set(threading.enumerate())
    kube = KubeApiServerDouble(tokens=[TOKEN]).start()
    reader = WatchReader(kube, SLICES)
    kube.wait_for_watches(1)
    get(kube, SLICES)
    started = time.monotonic()
    kube.stop()
    assert time.monotonic() - started < 3
    reader.close()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()


# -- client credentials -----------------------------------------------------------------
def test_kubeconfig_and_service_account_files(kube, tmp_path):
    import yaml

    path = kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN, namespace="shop")
    config = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == kube.url
    assert config["users"][0]["user"] == {"token": TOKEN}
    assert config["contexts"][0]["context"]["namespace"] == "shop"
    assert config["current-context"] == config["contexts"][0]["name"]
    sa = kube.write_service_account_dir(tmp_path / "sa", TOKEN, "shop")
    assert (sa / "token").read_text() == TOKEN and (sa / "namespace").read_text() == "shop"
    assert (sa / "ca.crt").read_text() == kube.ca_pem
    assert kube.in_cluster_env() == {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(kube.port),
    }


def test_lightkube_lists_and_watches_over_https(kube, tmp_path, monkeypatch):
    pytest.importorskip("lightkube")
    from lightkube import ApiError, Client, KubeConfig
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.resources.discovery_v1 import EndpointSlice

    kube.upsert_service_profile("shop", "orders.shop.svc.cluster.local", {"routes": []})
    orders_slice(kube, "orders-a")
    config = KubeConfig.from_file(kube.write_kubeconfig(tmp_path / "kc", TOKEN, "shop"))
    with Client(config) as client:
        slices = client.list(EndpointSlice, labels={"kubernetes.io/service-name": "orders"})
        assert [s.metadata.name for s in slices] == ["orders-a"]
        rv = slices.resourceVersion
        orders_slice(kube, "orders-b")
        events = client.watch(EndpointSlice, resource_version=rv, server_timeout=5)
        kind, obj = next(events)
        assert (kind, obj.metadata.name, obj.endpoints[0].addresses) == (
            "ADDED",
            "orders-b",
            ["10.0.0.1"],
        )
        events.close()
        profile_cls = create_namespaced_resource(
            "linkerd.io", "v1alpha2", "ServiceProfile", "serviceprofiles"
        )
        profile = client.get(profile_cls, "orders.shop.svc.cluster.local")
        assert profile["spec"] == {"routes": []}
        kube.compact()
        with pytest.raises(ApiError) as err:
            next(client.watch(EndpointSlice, resource_version=rv))
        assert err.value.status.code == 410
    # In-cluster: service-account files plus KUBERNETES_SERVICE_HOST/PORT.
    sa_dir = kube.write_service_account_dir(tmp_path / "sa", TOKEN, "shop")
    for key, value in kube.in_cluster_env().items():
        monkeypatch.setenv(key, value)
    with Client(KubeConfig.from_service_account(sa_dir)) as in_cluster:
        assert len(list(in_cluster.list(EndpointSlice))) == 2
    assert {r.token for r in kube.requests} == {TOKEN}
