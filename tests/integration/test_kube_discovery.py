"""Kubernetes discovery against the kube-apiserver stand-in, over real HTTPS on 127.0.0.1.

The client under test is the real one (lightkube underneath); only the API server is a
double (``tests/doubles/kube_apiserver.py``): its certificate comes from a CA minted for
the test, bearer tokens are checked, lists and watches keep resourceVersion semantics.
Every wait is bounded; every watch thread is stopped and joined.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from odin_gw.config import parse_config
from odin_gw.errors import MeshError
from odin_gw.mesh.client import Discovery
from odin_gw.mesh.kubernetes import KubernetesDiscovery
from tests.doubles.kube_apiserver import KubeApiServerDouble, SliceEndpoint
from tests.doubles.pki import CertificateAuthority

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "t0k3n-gateway-one"
USER = "system:serviceaccount:shop:odin"
PROFILE = "web.shop.svc.cluster.local"
ROUTES = {"routes": [{"name": "GET /", "condition": {"method": "GET"}, "timeout": "1s"}]}


@pytest.fixture
def kube() -> Iterator[KubeApiServerDouble]:
    with KubeApiServerDouble(tokens={TOKEN: USER}) as server:
        yield server


@pytest.fixture(autouse=True)
def outside_a_pod(monkeypatch):
    for key in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("ODIN_K8S_SERVICE_ACCOUNT_DIR", raising=False)
    return monkeypatch


def gateway_config(kubeconfig: Path | None, services: str, kind: str = "linkerd"):
    where = f", kubeconfig: '{kubeconfig}'" if kubeconfig else ""
    if kind == "linkerd":
        mesh = f"{{enabled: true, type: linkerd, namespace: shop{where}}}"
    else:
        mesh = (
            "{enabled: true, type: istio, namespace: shop, certFile: c, keyFile: k, caFile: r,"
            f" istio: {{injectSidecar: false, discovery: kubernetes}}{where}}}"
        )
    return parse_config(f"serviceMesh: {mesh}\nservices:\n{services}\n", env={})


WEB_ONLY = "- {name: web, basePath: /web, port: 80}"
WEB_AND_GONE = WEB_ONLY + "\n- {name: gone, basePath: /gone}"


def discovery(
    kube: KubeApiServerDouble, tmp_path: Path, services: str = WEB_AND_GONE, **kw
) -> KubernetesDiscovery:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN, namespace="shop")
    disc = KubernetesDiscovery(gateway_config(kubeconfig, services, **kw))
    disc.watch_seconds = 2  # the server ends each watch request soon: resumes get tested
    return disc


def seed_web(kube: KubeApiServerDouble, **annotations: str) -> None:
    kube.upsert_service(
        "shop",
        "web",
        ports=[{"name": "metrics", "port": 9090}, {"name": "http", "port": 80, "targetPort": 8080}],
        annotations=annotations,
    )
    kube.upsert_endpoint_slice(
        "shop",
        "web-a",
        "web",
        endpoints=[
            SliceEndpoint("10.0.0.1", zone="eu-1a", node_name="node-1", target_ref="web-1"),
            SliceEndpoint("10.0.0.2", zone="eu-1b", node_name="node-2", target_ref="web-2"),
        ],
        ports=[{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
    )


class Published:
    """What a watch published, merged in order as the manager would (latest per service,
    absent as None), and the error of the last answer."""

    def __init__(self) -> None:
        self.items: list[Discovery] = []
        self.cond = threading.Condition()

    def __call__(self, result: Discovery) -> None:
        with self.cond:
            self.items.append(result)
            self.cond.notify_all()

    def state(self) -> dict:
        out: dict = {}
        with self.cond:
            for d in self.items:
                out.update(d.services)
                out.update(dict.fromkeys(d.absent))
        return out

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
        """Seconds it took for ``predicate`` to hold; fails after ``timeout``."""
        start = time.monotonic()
        with self.cond:
            while not predicate():
                left = timeout - (time.monotonic() - start)
                assert left > 0, f"not published within {timeout} s: {what}"
                self.cond.wait(min(left, 0.1))
        return time.monotonic() - start

    def addresses(self, name: str = "web") -> dict[str, str]:
        svc = self.state().get(name)
        return {e.address: e.status for e in svc.endpoints} if svc else {}


@contextlib.contextmanager
def watching(disc: KubernetesDiscovery, services=("web", "gone")) -> Iterator[Published]:
    published = Published()
    stop = threading.Event()
    thread = threading.Thread(
        target=disc.watch, args=(list(services), published, None, stop), daemon=True
    )
    thread.start()
    try:
        yield published
    finally:
        stop.set()
        started = time.monotonic()
        thread.join(10)
    # Checked only when the test body passed (a failure there is the one to see).
    assert not thread.is_alive(), "watch did not end with stop"
    assert time.monotonic() - started < 3.0, "watch took long to end after stop"


# -- full pass ----------------------------------------------------------------------------
def test_discover_over_https(kube, tmp_path):
    seed_web(kube, **{"timeout.linkerd.io/request": "2s", "linkerd.io/inject": "enabled"})
    kube.upsert_service_profile("shop", PROFILE, ROUTES)
    kube.upsert_service("shop", "other", ports=[80])
    found = discovery(kube, tmp_path).discover(["web", "gone"])
    assert found.errors == {} and found.absent == {"gone"}
    web = found.services["web"]
    assert web.source == "kubernetes"
    assert [(e.address, e.port, e.locality, e.node, e.service_id) for e in web.endpoints] == [
        ("10.0.0.1", 8080, "eu-1a", "node-1", "web-1"),
        ("10.0.0.2", 8080, "eu-1b", "node-2", "web-2"),
    ]  # the slice port named as the Service's port 80 ("http"), not the first (9090)
    assert json.loads(web.policy) == {
        "profile": {"name": PROFILE, "namespace": "shop", "spec": ROUTES},
        "annotations": {"timeout.linkerd.io/request": "2s"},
    }
    assert found.catalog == ("other.shop.svc.cluster.local", "web.shop.svc.cluster.local")
    assert set(found.stamps) == {"web", "gone"}
    # Only what the API server checks: every request carried the token.
    assert {r.user for r in kube.requests} == {USER}


def test_istio_source_reads_no_profiles(kube, tmp_path):
    seed_web(kube, **{"retry.linkerd.io/http": "5xx"})
    disc = discovery(kube, tmp_path, WEB_ONLY, kind="istio")
    disc.source = "istio"
    found = disc.discover(["web"])
    assert found.services["web"].policy == "" and found.services["web"].source == "istio"
    assert not kube.requests_matching("/apis/linkerd.io")


def test_forbidden_kind_is_an_error_for_its_services_only(kube, tmp_path):
    seed_web(kube)
    kube.forbid("endpointslices")
    found = discovery(kube, tmp_path).discover(["web", "gone"])
    assert found.services == {} and found.absent == frozenset()  # errors, not absent
    message = found.errors["kubernetes endpointslices shop"]
    assert "403" in message and "RBAC must allow get, list and watch" in message
    assert "endpointslices.discovery.k8s.io in namespace shop" in message


def test_without_the_service_profile_crd_services_are_found_with_their_annotations(kube, tmp_path):
    seed_web(kube, **{"timeout.linkerd.io/request": "2s"})
    kube.uninstall("serviceprofiles")  # Linkerd's CRDs are not in this cluster
    found = discovery(kube, tmp_path).discover(["web", "gone"])
    assert found.errors == {} and found.absent == {"gone"}
    web = found.services["web"]
    assert len(web.endpoints) == 2
    assert json.loads(web.policy) == {
        "profile": None,
        "annotations": {"timeout.linkerd.io/request": "2s"},
    }
    assert kube.requests_matching("/apis/linkerd.io")  # it asked, and took 404 as "none"


def test_refused_token_and_unreachable_server_say_so(kube, tmp_path):
    bad = kube.write_kubeconfig(tmp_path / "bad", "not-the-token")
    disc = KubernetesDiscovery(gateway_config(bad, WEB_ONLY))
    with pytest.raises(MeshError, match=r"refused the credentials .*401 Unauthorized") as err:
        disc.discover(["web"])
    assert "not-the-token" not in err.value.message
    # A CA that did not sign the server's certificate.
    wrong_ca = kube.write_kubeconfig(tmp_path / "wrong-ca", TOKEN)
    doc = yaml.safe_load(wrong_ca.read_text())
    other = CertificateAuthority(common_name="someone else").root_pem.encode()
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(other).decode()
    wrong_ca.write_text(yaml.safe_dump(doc))
    with pytest.raises(MeshError, match=rf"TLS to the Kubernetes API at {kube.url} failed"):
        KubernetesDiscovery(gateway_config(wrong_ca, WEB_ONLY)).discover(["web"])
    good = discovery(kube, tmp_path, WEB_ONLY)
    kube.go_down()
    with pytest.raises(MeshError, match=rf"cannot connect to the Kubernetes API at {kube.url}"):
        good.discover(["web"])


# -- watch --------------------------------------------------------------------------------
def test_watch_publishes_a_slice_change_within_two_seconds(kube, tmp_path):
    seed_web(kube)
    with watching(discovery(kube, tmp_path)) as seen:
        seen.wait(lambda: seen.addresses() == {"10.0.0.1": "passing", "10.0.0.2": "passing"})
        seen.wait(lambda: seen.state().get("gone", 1) is None, what="gone absent")
        kube.upsert_endpoint_slice(
            "shop", "web-b", "web", endpoints=["10.0.0.3"], ports=[{"name": "http", "port": 8080}]
        )
        took = seen.wait(lambda: "10.0.0.3" in seen.addresses(), timeout=2.0, what="new slice")
        assert took < 2.0
        kube.delete_endpoint_slice("shop", "web-a")
        seen.wait(lambda: set(seen.addresses()) == {"10.0.0.3"}, timeout=2.0)
        # The gone service appears: no longer absent.
        kube.upsert_service("shop", "gone", ports=[80])
        seen.wait(lambda: seen.state().get("gone") is not None, timeout=2.0)
        assert all(d.stamps.keys() == {*d.services, *d.absent} for d in seen.items)


def test_terminating_endpoint_is_draining(kube, tmp_path):
    seed_web(kube)
    with watching(discovery(kube, tmp_path)) as seen:
        seen.wait(lambda: len(seen.addresses()) == 2)
        kube.upsert_endpoint_slice(
            "shop",
            "web-a",
            "web",
            endpoints=[
                SliceEndpoint("10.0.0.1", ready=False, serving=True, terminating=True),
                SliceEndpoint("10.0.0.2", ready=False, serving=False, terminating=True),
            ],
            ports=[{"name": "http", "port": 8080}],
        )
        seen.wait(
            lambda: seen.addresses() == {"10.0.0.1": "draining", "10.0.0.2": "critical"},
            timeout=2.0,
        )
        assert not any(e.healthy for e in seen.state()["web"].endpoints)


def test_profile_and_annotation_changes_reach_the_policy(kube, tmp_path):
    seed_web(kube)

    def policy() -> dict | None:
        svc = seen.state().get("web")
        return json.loads(svc.policy) if svc and svc.policy else None

    with watching(discovery(kube, tmp_path)) as seen:
        seen.wait(lambda: len(seen.addresses()) == 2)
        assert policy() is None
        kube.upsert_service(
            "shop",
            "web",
            ports=[{"name": "http", "port": 80, "targetPort": 8080}],
            annotations={"retry.linkerd.io/http": "5xx", "retry.linkerd.io/limit": "2"},
        )
        seen.wait(lambda: (policy() or {}).get("annotations", {}).get("retry.linkerd.io/limit"))
        kube.upsert_service_profile("shop", PROFILE, ROUTES)
        seen.wait(lambda: (policy() or {}).get("profile") is not None, timeout=2.0)
        assert policy()["profile"] == {"name": PROFILE, "namespace": "shop", "spec": ROUTES}
        kube.upsert_service_profile("shop", PROFILE, "not an object")  # passed on, flagged
        seen.wait(lambda: (policy()["profile"] or {}).get("spec", 1) is None, timeout=2.0)
        assert "has no spec object" in policy()["profile"]["error"]
        kube.delete_service_profile("shop", PROFILE)
        seen.wait(lambda: policy()["profile"] is None, timeout=2.0)


def test_expired_version_relists_and_loses_no_change(kube, tmp_path):
    seed_web(kube)
    with watching(discovery(kube, tmp_path)) as seen:
        seen.wait(lambda: len(seen.addresses()) == 2)
        kube.wait_for_watches(3)
        lists_before = len(kube.requests_matching("/", verb="list"))
        # Hold every request: the watches end (timeoutSeconds) and their resumes wait.
        kube.hang(True)
        kube.wait_for(lambda: kube.watches_open() == 0, timeout=10, what="watches ended")
        kube.upsert_endpoint_slice(
            "shop",
            "web-a",
            "web",
            endpoints=["10.0.0.1", "10.0.0.9"],
            ports=[{"name": "http", "port": 8080}],
        )
        kube.upsert_service("shop", "unrelated", ports=[80])
        kube.compact()  # the resumes' versions are gone: 410
        kube.hang(False)
        seen.wait(lambda: set(seen.addresses()) == {"10.0.0.1", "10.0.0.9"}, timeout=10.0)
        relists = kube.requests_matching("/", verb="list")[lists_before:]
        assert any("endpointslices" in r.path for r in relists)
        assert not any(d.errors for d in seen.items)  # a 410 is routine, not a failure
        kube.wait_for_watches(3)


def test_api_server_away_keeps_last_known_good_then_recovers(kube, tmp_path):
    seed_web(kube)
    with watching(discovery(kube, tmp_path)) as seen:
        seen.wait(lambda: len(seen.addresses()) == 2)
        count = len(seen.items)
        kube.go_down()
        seen.wait(lambda: any(d.errors for d in seen.items[count:]), what="an error")
        failures = [d for d in seen.items[count:] if d.errors]
        # Only error-only answers while it is away: the manager keeps the snapshot.
        assert all(not d.services and not d.absent and d.catalog is None for d in failures)
        keys = set().union(*(d.errors for d in failures))
        assert keys <= {
            f"kubernetes {k} shop" for k in ("endpointslices", "services", "serviceprofiles")
        }
        assert any(kube.url in m for d in failures for m in d.errors.values())
        kube.upsert_endpoint_slice(  # changed while away: seen after the relist
            "shop", "web-a", "web", endpoints=["10.0.0.7"], ports=[{"name": "http", "port": 8080}]
        )
        kube.come_up()
        seen.wait(lambda: seen.addresses() == {"10.0.0.7": "passing"}, timeout=40.0)
        seen.wait(lambda: not seen.items[-1].errors, timeout=40.0, what="recovered")


def test_service_account_token_rotation_is_picked_up(kube, tmp_path, outside_a_pod):
    seed_web(kube)
    sa = kube.write_service_account_dir(tmp_path / "sa", TOKEN, "shop")
    outside_a_pod.setenv("ODIN_K8S_SERVICE_ACCOUNT_DIR", str(sa))
    for key, value in kube.in_cluster_env().items():
        outside_a_pod.setenv(key, value)
    disc = KubernetesDiscovery(gateway_config(None, WEB_AND_GONE))
    disc.watch_seconds = 1
    assert disc.connection().mode == "in-cluster"
    with watching(disc) as seen:
        seen.wait(lambda: len(seen.addresses()) == 2)
        # The kubelet writes the new token; the old one is refused soon after.
        new = "t0k3n-gateway-two"
        kube.add_token(new, USER)
        kube.write_service_account_dir(sa, new, "shop")
        kube.wait_for(lambda: any(r.token == new for r in kube.requests), what="new token used")
        kube.revoke_token(TOKEN)
        mark = len(kube.requests)
        kube.upsert_endpoint_slice(
            "shop", "web-b", "web", endpoints=["10.0.0.5"], ports=[{"name": "http", "port": 8080}]
        )
        seen.wait(lambda: "10.0.0.5" in seen.addresses(), timeout=5.0)
        kube.wait_for(lambda: len(kube.requests) > mark + 3, what="resumed watches")
        later = kube.requests[mark:]
        assert {r.token for r in later} == {new} and 401 not in {r.status for r in later}
        assert not any(d.errors for d in seen.items)
    # A revoked token that the file still holds: the 401 is named, the token is not.
    kube.revoke_token(new)
    with pytest.raises(MeshError) as err:
        KubernetesDiscovery(gateway_config(None, WEB_ONLY)).discover(["web"])
    assert err.value.message.startswith(
        "Kubernetes API refused the service-account token (401 Unauthorized) (kubernetes "
    )
    assert new not in err.value.message


def test_one_watch_per_kind_and_namespace_for_200_services(kube, tmp_path):
    rows = "\n".join(f"- {{name: s{i}, basePath: /s{i}}}" for i in range(200))
    for i in range(0, 200, 2):  # half exist, with one endpoint each
        kube.upsert_service("shop", f"s{i}", ports=[80])
        kube.upsert_endpoint_slice(
            "shop", f"s{i}-x", f"s{i}", endpoints=[f"10.1.{i // 250}.{i % 250}"], ports=[80]
        )
    disc = discovery(kube, tmp_path, rows)
    disc.watch_seconds = 30
    names = [f"s{i}" for i in range(200)]
    with watching(disc, names) as seen:
        seen.wait(lambda: len(seen.state()) == 200, timeout=20.0, what="200 services")
        kube.wait_for_watches(3)
        time.sleep(0.5)  # no more watches open later
        assert kube.watches_open() == 3
        watch_paths = {r.path for r in kube.requests_matching("/", verb="watch")}
        assert len(watch_paths) == 3
        state = seen.state()
        assert sum(1 for v in state.values() if v is None) == 100  # absent
        assert all(len(state[f"s{i}"].endpoints) == 1 for i in range(0, 200, 2))
        kube.upsert_endpoint_slice("shop", "s7-x", "s7", endpoints=["10.2.0.7"], ports=[80])
        seen.wait(lambda: seen.state().get("s7") is not None, timeout=2.0)
    lists = kube.requests_matching("/", verb="list")
    assert len(lists) == 3  # one list per feed, not per service
