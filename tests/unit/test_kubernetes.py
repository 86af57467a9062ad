"""Kubernetes discovery without sockets: EndpointSlices to endpoints, the policy text,
feeds (which watches, what each holds), configuration choices and errors, the token file.

Everything that needs HTTP is in ``tests/integration/test_kube_discovery.py``.
"""

from __future__ import annotations

import json
import os
import threading

import httpx2 as httpx
import pytest
from lightkube import ApiError
from lightkube.models.meta_v1 import Status
from lightkube.resources.core_v1 import Service
from lightkube.resources.discovery_v1 import EndpointSlice

from odin_gw.config import parse_config
from odin_gw.errors import MeshError
from odin_gw.mesh.cluster_names import ClusterService
from odin_gw.mesh.kube_connect import (
    KubeConnection,
    ServiceAccountToken,
    connect,
    status_code,
)
from odin_gw.mesh.kube_feed import PROFILES, SERVICES, SLICES, Feed, ServiceProfile
from odin_gw.mesh.kube_mapping import (
    SliceEndpoint,
    policy_text,
    service_view,
    slice_endpoints,
    slice_port,
)
from odin_gw.mesh.kubernetes import KubernetesDiscovery

WEB = ClusterService(name="web", namespace="shop", port=80)
TOKEN = "s3cr3t-token-value"


def eslice(name="web-abc", endpoints=(), ports=(("http", 8080),), service="web"):
    return EndpointSlice.from_dict(
        {
            "addressType": "IPv4",
            "metadata": {
                "name": name,
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": service},
                "resourceVersion": "7",
            },
            "endpoints": list(endpoints),
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        }
    )


def ep(address="10.0.0.1", *more, ready=None, serving=None, terminating=None, **extra):
    cond = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    return {"addresses": [address, *more], "conditions": cond, **extra}


def service(name="web", ports=(("http", 80),), annotations=None):
    return Service.from_dict(
        {
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations or {}},
            "spec": {"ports": [{"name": n, "port": p} for n, p in ports]},
        }
    )


def profile(name="web.shop.svc.cluster.local", namespace="shop", spec=None):
    body = {"metadata": {"name": name, "namespace": namespace}}
    if spec is not ...:
        body["spec"] = (
            spec if spec is not None else {"routes": [{"name": "GET /", "timeout": "1s"}]}
        )
    return ServiceProfile.from_dict(body)


def config(kind="linkerd", extra="", services="- {name: web, basePath: /web, port: 80}"):
    mesh = {
        "linkerd": f"serviceMesh: {{enabled: true, type: linkerd, namespace: shop{extra}}}",
        "istio": (
            "serviceMesh: {enabled: true, type: istio, namespace: shop, certFile: c, keyFile: k,"
            f" caFile: r, istio: {{injectSidecar: false, discovery: kubernetes}}{extra}}}"
        ),
    }[kind]
    return parse_config(f"{mesh}\nservices:\n{services}\n", env={})


# -- slices to endpoints ------------------------------------------------------------------
def test_conditions_map_to_health_and_status():
    found = slice_endpoints(
        WEB,
        [
            eslice(
                endpoints=[
                    ep("10.0.0.1", ready=True),
                    ep("10.0.0.2"),  # no conditions: ready (the API says unset is ready)
                    ep("10.0.0.3", ready=False, serving=True, terminating=True),
                    ep("10.0.0.4", ready=False, serving=False, terminating=True),
                    ep("10.0.0.5", ready=False),
                ]
            )
        ],
    )
    got = {s.address: (s.ready, s.status) for s in found}
    assert got == {
        "10.0.0.1": (True, "passing"),
        "10.0.0.2": (True, "passing"),
        "10.0.0.3": (False, "draining"),
        "10.0.0.4": (False, "critical"),
        "10.0.0.5": (False, "critical"),
    }
    endpoints = [s.endpoint() for s in found]
    assert [e.healthy for e in endpoints] == [True, True, False, False, False]
    assert {e.scheme for e in endpoints} == {"http"} and {e.port for e in endpoints} == {8080}


def test_zone_node_and_pod_are_kept_and_each_address_is_an_endpoint():
    (one, two) = slice_endpoints(
        WEB,
        [
            eslice(
                endpoints=[
                    ep(
                        "10.0.0.1",
                        "10.0.0.9",
                        zone="eu-1a",
                        nodeName="node-3",
                        targetRef={"kind": "Pod", "name": "web-7f9", "namespace": "shop"},
                    )
                ]
            )
        ],
    )
    assert (one.address, two.address) == ("10.0.0.1", "10.0.0.9")
    e = one.endpoint()
    assert (e.locality, e.node, e.service_id, e.datacenter) == ("eu-1a", "node-3", "web-7f9", None)
    assert e.to_dict()["locality"] == "eu-1a"


def test_an_address_in_two_slices_appears_once_in_its_best_state():
    old = eslice("web-a", [ep("10.0.0.1", ready=False, serving=True, terminating=True)])
    new = eslice("web-b", [ep("10.0.0.1", ready=True), ep("10.0.0.2", ready=False)])
    again = eslice("web-c", [ep("10.0.0.2", ready=False, serving=True, terminating=True)])
    found = slice_endpoints(WEB, [old, new, again])
    assert [(s.address, s.status) for s in found] == [
        ("10.0.0.1", "passing"),
        ("10.0.0.2", "draining"),
    ]


def test_slice_port_is_chosen_by_the_service_port_name():
    two = (("metrics", 9090), ("http", 8080))
    svc = service(ports=(("metrics", 9090), ("http", 80)))
    (s,) = slice_endpoints(WEB, [eslice(endpoints=[ep()], ports=two)], svc)
    assert (s.port, s.port_name) == (8080, "http")
    # Without the Service (or with no port matching the configured one): the first.
    (s,) = slice_endpoints(WEB, [eslice(endpoints=[ep()], ports=two)], None)
    assert s.port == 9090
    # One port: that one, whatever its name.
    (s,) = slice_endpoints(WEB, [eslice(endpoints=[ep()], ports=(("other", 7000),))], svc)
    assert s.port == 7000


def test_slice_port_skips_udp_and_falls_back_to_the_configured_port():
    class P:
        def __init__(self, name, port, protocol="TCP"):
            self.name, self.port, self.protocol = name, port, protocol

    assert slice_port([P("dns", 53, "UDP"), P("http", 8080)], "dns", 80) == (8080, "http")
    assert slice_port([P("dns", 53, "UDP")], None, 80) is None  # no TCP port: skipped
    assert slice_port([], None, 80) == (80, "")  # a custom slice without ports
    assert slice_port([P("", 8080), P("b", 9)], "", 80) == (8080, "")  # unnamed port


def test_endpoint_factory_builds_each_endpoint():
    def mtls(cs, seen: SliceEndpoint):
        return seen.endpoint(scheme="https", identity=f"spiffe://td/ns/{cs.namespace}/sa/web")

    view = service_view(
        WEB,
        "web",
        [eslice(endpoints=[ep()])],
        service(),
        None,
        source="istio",
        factory=mtls,
        with_policy=False,
    )
    (e,) = view.endpoints
    assert (e.scheme, e.identity, view.source, view.policy) == (
        "https",
        "spiffe://td/ns/shop/sa/web",
        "istio",
        "",
    )
    assert e.key == "https://10.0.0.1:8080#spiffe://td/ns/shop/sa/web"  # derived anew


# -- policy text --------------------------------------------------------------------------
def test_policy_text_is_canonical_json_of_profile_and_linkerd_annotations():
    ann = {
        "retry.linkerd.io/http": "5xx",
        "timeout.linkerd.io/request": "2s",
        "linkerd.io/inject": "enabled",  # not policy: left out
    }
    text = policy_text(profile(), service(annotations=ann))
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert json.loads(text) == {
        "profile": {
            "name": "web.shop.svc.cluster.local",
            "namespace": "shop",
            "spec": {"routes": [{"name": "GET /", "timeout": "1s"}]},
        },
        "annotations": {"retry.linkerd.io/http": "5xx", "timeout.linkerd.io/request": "2s"},
    }
    assert json.loads(policy_text(None, service(annotations=ann)))["profile"] is None
    assert json.loads(policy_text(profile(), service()))["annotations"] == {}


def test_no_profile_and_no_policy_annotations_is_no_policy():
    assert policy_text(None, service(annotations={"linkerd.io/inject": "x"})) == ""
    assert policy_text(None, None) == ""


def test_a_profile_without_a_spec_object_is_passed_with_an_error():
    for bad in (..., "routes: []", ["x"]):
        entry = json.loads(policy_text(profile(spec=bad), None))["profile"]
        assert entry["spec"] is None and entry["name"] == "web.shop.svc.cluster.local"
        assert "has no spec object" in entry["error"] and "shop/web." in entry["error"]


# -- feeds and views ----------------------------------------------------------------------
def test_one_feed_per_kind_and_namespace_for_many_services():
    rows = "\n".join(f"- {{name: s{i}, basePath: /s{i}}}" for i in range(200))
    disc = KubernetesDiscovery(config(services=rows))
    wanted, feeds = disc._plan([f"s{i}" for i in range(200)])
    assert len(wanted) == 200
    assert sorted(feeds) == [
        ("endpointslices", "shop"),
        ("serviceprofiles", "shop"),
        ("services", "shop"),
    ]
    assert len(feeds[("services", "shop")].owners) == 200


def test_profiles_are_read_from_profile_namespace_and_istio_reads_none():
    rows = "- {name: web, basePath: /web}\n- {name: api, basePath: /api, namespace: other}"
    disc = KubernetesDiscovery(config(extra=", linkerd: {profileNamespace: gw}", services=rows))
    _, feeds = disc._plan(["web", "api"])
    assert sorted(feeds) == [
        ("endpointslices", "other"),
        ("endpointslices", "shop"),
        ("serviceprofiles", "gw"),
        ("services", "other"),
        ("services", "shop"),
    ]
    assert sorted(feeds[("serviceprofiles", "gw")].owners) == [
        "api.other.svc.cluster.local",
        "web.shop.svc.cluster.local",
    ]
    # Without profileNamespace: the service's own namespace.
    _, feeds = KubernetesDiscovery(config(services=rows))._plan(["web", "api"])
    assert ("serviceprofiles", "other") in feeds and ("serviceprofiles", "shop") in feeds
    _, feeds = KubernetesDiscovery(config("istio"), source="istio")._plan(["web"])
    assert sorted(feeds) == [("endpointslices", "shop"), ("services", "shop")]


def test_feed_keeps_only_configured_owners_and_follows_events():
    feed = Feed(SLICES, "shop")
    feed.owners = {"web": ["web"]}
    assert feed.replace([eslice("web-a"), eslice("db-a", service="db")], "10") == {"web"}
    assert feed.rv == "10" and feed.synced and feed.names == {"web-a", "db-a"}
    assert [s.metadata.name for s in feed.objects("web")] == ["web-a"]
    assert feed.apply("ADDED", eslice("db-b", service="db")) == set()
    assert feed.apply("MODIFIED", eslice("web-b")) == {"web"}
    assert feed.rv == "7"  # the event's version: the watch resumes from it
    # A slice relabelled to another service leaves this one.
    assert feed.apply("MODIFIED", eslice("web-a", service="db")) == {"web"}
    assert [s.metadata.name for s in feed.objects("web")] == ["web-b"]
    assert feed.apply("DELETED", eslice("web-b")) == {"web"}
    assert feed.objects("web") == []


def test_view_is_absent_without_service_and_slices_and_waits_for_every_feed():
    disc = KubernetesDiscovery(config())
    _, feeds = disc._plan(["web"])
    assert disc._view(disc.cluster["web"], feeds) is False  # nothing listed yet
    feeds[("endpointslices", "shop")].replace([], "1")
    feeds[("services", "shop")].replace([], "1")
    assert disc._view(disc.cluster["web"], feeds) is False  # profiles not listed yet
    feeds[("serviceprofiles", "shop")].replace([], "1")
    assert disc._view(disc.cluster["web"], feeds) is None  # listed, and nothing: absent
    feeds[("services", "shop")].replace([service(annotations={"retry.linkerd.io/limit": "2"})], "2")
    view = disc._view(disc.cluster["web"], feeds)
    assert view.endpoints == () and view.source == "kubernetes"
    assert json.loads(view.policy)["annotations"] == {"retry.linkerd.io/limit": "2"}
    feeds[("serviceprofiles", "shop")].replace([profile()], "3")
    feeds[("endpointslices", "shop")].replace([eslice(endpoints=[ep()])], "3")
    view = disc._view(disc.cluster["web"], feeds)
    assert json.loads(view.policy)["profile"]["name"] == "web.shop.svc.cluster.local"
    assert [e.port for e in view.endpoints] == [8080]


def test_kinds_name_their_rbac_resources():
    assert SLICES.rbac == "endpointslices.discovery.k8s.io"
    assert SERVICES.rbac == "services"
    assert PROFILES.rbac == "serviceprofiles.linkerd.io"


# -- configuration ------------------------------------------------------------------------
@pytest.fixture
def no_kube_env(monkeypatch):
    for key in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("ODIN_K8S_SERVICE_ACCOUNT_DIR", raising=False)
    return monkeypatch


def write_kubeconfig(path, server="https://127.0.0.1:6443", token=TOKEN):
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters:\n- name: c\n  cluster: {{server: '{server}'}}\n"
        f"users:\n- name: u\n  user: {{token: '{token}'}}\n"
        "contexts:\n- name: test\n  context: {cluster: c, user: u, namespace: shop}\n"
    )
    return path


def service_account(tmp_path, token=TOKEN, files=("token", "ca.crt", "namespace")):
    sa = tmp_path / "sa"
    sa.mkdir()
    for f in files:
        (sa / f).write_text({"token": token, "namespace": "shop"}.get(f, "not a real CA\n"))
    return sa


def test_no_configuration_names_both_options(no_kube_env):
    with pytest.raises(MeshError) as err:
        connect(config().service_mesh)
    for word in ("serviceMesh.kubeconfig", "KUBECONFIG", "pod", "KUBERNETES_SERVICE_HOST"):
        assert word in err.value.message
    with pytest.raises(MeshError):
        KubernetesDiscovery(config()).discover(["web"])


def test_watch_without_configuration_reports_and_ends_with_stop(no_kube_env):
    stop = threading.Event()
    seen = []

    def publish(d):
        seen.append(d)
        stop.set()

    t = threading.Thread(
        target=KubernetesDiscovery(config()).watch, args=(["web"], publish, None, stop)
    )
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert seen and not seen[0].services and "KUBECONFIG" in seen[0].errors["kubernetes"]


def test_kubeconfig_setting_wins_over_env_and_pod(no_kube_env, tmp_path):
    mine = write_kubeconfig(tmp_path / "mine.yaml", server="https://10.1.1.1:6443")
    other = write_kubeconfig(tmp_path / "other.yaml", server="https://10.2.2.2:6443")
    no_kube_env.setenv("KUBECONFIG", str(other))
    no_kube_env.setenv("KUBERNETES_SERVICE_HOST", "10.3.3.3")
    no_kube_env.setenv("KUBERNETES_SERVICE_PORT", "443")
    api = connect(config(extra=f", kubeconfig: '{mine}'").service_mesh)
    assert (api.mode, api.server) == ("kubeconfig", "https://10.1.1.1:6443")
    assert "serviceMesh.kubeconfig" in api.origin and api.token is None


def test_kubeconfig_env_is_used_outside_a_pod(no_kube_env, tmp_path):
    path = write_kubeconfig(tmp_path / "kc.yaml")
    no_kube_env.setenv("KUBECONFIG", f"{path}{os.pathsep}/nonexistent")
    api = connect(config().service_mesh)
    assert (api.mode, api.server) == ("kubeconfig", "https://127.0.0.1:6443")
    assert TOKEN not in json.dumps(api.describe()) + repr(api)


def test_bad_kubeconfig_is_named(no_kube_env, tmp_path):
    with pytest.raises(MeshError, match=r"serviceMesh.kubeconfig .*missing.yaml.*not found"):
        connect(config(extra=f", kubeconfig: '{tmp_path}/missing.yaml'").service_mesh)
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: 3\n")
    no_kube_env.setenv("KUBECONFIG", str(bad))
    with pytest.raises(MeshError, match=r"KUBECONFIG .*bad.yaml is not a usable kubeconfig"):
        connect(config().service_mesh)


def test_in_cluster_reads_the_service_account_dir(no_kube_env, tmp_path):
    sa = service_account(tmp_path)
    no_kube_env.setenv("ODIN_K8S_SERVICE_ACCOUNT_DIR", str(sa))
    no_kube_env.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    no_kube_env.setenv("KUBERNETES_SERVICE_PORT", "443")
    api = connect(config().service_mesh)
    assert (api.mode, api.server) == ("in-cluster", "https://10.96.0.1:443")
    assert api.token.path == f"{sa}/token"
    assert api.config.user.token is None  # lightkube's copy is dropped: ours re-reads
    assert api.token.header() == f"Bearer {TOKEN}"
    text = json.dumps(KubernetesDiscovery(config()).describe()) + repr(api.token) + repr(api)
    assert TOKEN not in text
    # ca.crt here is no certificate: said before any call is made.
    with pytest.raises(MeshError, match=r"cannot load the TLS settings .*https://10.96.0.1:443"):
        api.check()


def test_in_cluster_without_token_says_so(no_kube_env, tmp_path):
    sa = service_account(tmp_path, files=("ca.crt", "namespace"))
    no_kube_env.setenv("ODIN_K8S_SERVICE_ACCOUNT_DIR", str(sa))
    no_kube_env.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    no_kube_env.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(MeshError, match=r"service account directory .*sa has no token"):
        connect(config().service_mesh)
    no_kube_env.delenv("KUBERNETES_SERVICE_PORT")
    with pytest.raises(MeshError, match="KUBERNETES_SERVICE_PORT is not"):
        connect(config().service_mesh)


# -- the token file -----------------------------------------------------------------------
def test_token_is_reread_when_the_file_changes(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    token = ServiceAccountToken(str(path))
    assert token.header() == f"Bearer {TOKEN}"
    # The kubelet swaps a symlink to a new file: a new inode, whatever the mtime.
    fresh = tmp_path / "token.new"
    fresh.write_text("rotated")
    os.replace(fresh, path)
    assert token.header() == "Bearer rotated"
    assert token.reread() is False  # unchanged
    path.unlink()  # unreadable mid-rotation: the last token read stays
    assert token.header() == "Bearer rotated"
    assert TOKEN not in repr(token)


def test_token_never_read_is_a_clear_error(tmp_path):
    with pytest.raises(MeshError, match=r"cannot read the service-account token .*nope"):
        ServiceAccountToken(str(tmp_path / "nope")).header()


# -- errors -------------------------------------------------------------------------------
def _answer(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://127.0.0.1:6443/apis/discovery.k8s.io/v1")
    return httpx.HTTPStatusError(
        "x", request=request, response=httpx.Response(code, request=request)
    )


def _api(mode="in-cluster") -> KubeConnection:
    from lightkube.config.kubeconfig import KubeConfig

    single = KubeConfig.from_server("https://127.0.0.1:6443").get()
    token = ServiceAccountToken("/sa/token") if mode == "in-cluster" else None
    return KubeConnection(mode, single, "service account /sa", token)


def test_errors_say_what_to_fix():
    api = _api()
    rbac = SLICES.rbac
    assert api.explain(_answer(401), "list", rbac, "shop") == (
        "Kubernetes API refused the service-account token (401 Unauthorized)"
    )
    forbidden = api.explain(_answer(403), "list", rbac, "shop")
    assert "endpointslices.discovery.k8s.io in namespace shop" in forbidden
    assert "RBAC must allow get, list and watch" in forbidden
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    assert api.explain(refused, "list", rbac, "shop") == (
        "cannot connect to the Kubernetes API at https://127.0.0.1:6443: [Errno 111] "
        "Connection refused"
    )
    tls = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert "TLS to the Kubernetes API at https://127.0.0.1:6443 failed" in api.explain(
        tls, "list", rbac, "shop"
    )
    assert "Linkerd" in api.explain(_answer(404), "list", PROFILES.rbac, "shop")
    assert "401" in _api("kubeconfig").explain(_answer(401), "list", rbac, "shop")


def test_status_codes_come_from_answers_and_watch_error_events():
    assert status_code(_answer(410)) == 410
    gone = ApiError(status=Status(code=410, message="too old resource version: 5 (9)"))
    assert status_code(gone) == 410
    assert status_code(ValueError("x")) is None


# -- mutation testing found these data rules unpinned ------------------------------------------


def test_serving_is_read_when_given_and_follows_ready_when_not():
    got = {
        s.address: s
        for s in slice_endpoints(
            WEB,
            [
                eslice(
                    endpoints=[
                        ep("10.0.0.1", ready=False, serving=False, terminating=True),
                        ep("10.0.0.2", ready=False, terminating=True),  # serving unset
                        ep("10.0.0.3", ready=False, serving=True, terminating=True),
                        ep("10.0.0.4"),  # no conditions: ready, so serving
                    ]
                )
            ],
        )
    }
    assert got["10.0.0.1"].status == "critical"  # terminating and no longer serving
    assert got["10.0.0.2"].serving is False and got["10.0.0.2"].status == "critical"
    assert got["10.0.0.3"].status == "draining"
    assert got["10.0.0.4"].serving and got["10.0.0.4"].status == "passing"
    assert [a for a, s in sorted(got.items()) if s.endpoint().healthy] == ["10.0.0.4"]


def test_a_slice_without_a_usable_port_is_skipped_not_the_rest():
    udp_only = EndpointSlice.from_dict(
        {
            "addressType": "IPv4",
            "metadata": {"name": "web-udp", "namespace": "shop"},
            "endpoints": [ep("10.0.0.9")],
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
        }
    )
    found = slice_endpoints(WEB, [udp_only, eslice(endpoints=[ep("10.0.0.1")])])
    assert [(s.address, s.port) for s in found] == [("10.0.0.1", 8080)]


@pytest.mark.parametrize("ready_first", [True, False])
def test_an_address_in_two_slices_keeps_its_best_state_whatever_the_order(ready_first):
    ready = eslice("web-a", endpoints=[ep("10.0.0.1", ready=True)])
    gone = eslice("web-b", endpoints=[ep("10.0.0.1", ready=False, serving=False)])
    slices = [ready, gone] if ready_first else [gone, ready]
    (only,) = slice_endpoints(WEB, slices)
    assert only.status == "passing" and only.ready


def test_the_service_view_names_the_service_and_maps_the_port_by_the_services_name():
    slices = [eslice(endpoints=[ep("10.0.0.1")], ports=(("metrics", 9090), ("http", 8080)))]
    view = service_view(WEB, "web", slices, service(), None, source="linkerd")
    assert view.name == "web" and view.source == "linkerd"
    assert [(e.address, e.port) for e in view.endpoints] == [("10.0.0.1", 8080)]
    bare = service_view(WEB, "web", slices, None, None, source="linkerd")
    assert [e.port for e in bare.endpoints] == [9090]  # no Service: the first port
