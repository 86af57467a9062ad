"""Linkerd ServiceProfiles and 2.16 annotations through real gunicorn (two workers).

The policy arrives the honest way: the gateway in Linkerd mode watches the
kube-apiserver stand-in (``tests/doubles/kube_apiserver.py``) over real HTTPS with a
kubeconfig; the leader puts each service's profile and annotations in the snapshot,
and every worker compiles them. Every request goes to one real upstream, which counts
what it receives: retries are counted at the backend, never timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.doubles.kube_apiserver import KubeApiServerDouble
from tests.support.gateway import ADMIN_TOKEN, GatewayProcess, one_session_per_worker
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOKEN = "t0k3n-odin-profiles"
USER = "system:serviceaccount:shop:odin"
NS = "shop"
SERVICES = ("books", "uploads", "authors", "broken")
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# Reserve 1 retry/s * 60 s = 60, plus 0.1 per request; ttl 60 s outlasts the test.
BOOKS = {
    "routes": [
        {"name": "slow", "condition": {"pathRegex": "/books/slow/.*"}, "timeout": "300ms"},
        {
            "name": "failing",
            "condition": {"all": [{"method": "GET"}, {"pathRegex": "/books/status/5.."}]},
            "isRetryable": True,
        },
        {"name": "everything else", "condition": {"pathRegex": "/books/.*"}},
    ],
    "retryBudget": {"retryRatio": 0.1, "minRetriesPerSecond": 1, "ttl": "60s"},
}
# Reserve 1 * 5 = 5 retries, nothing earned per request.
UPLOADS = {
    "routes": [{"name": "uploads", "condition": {"method": "POST"}, "isRetryable": True}],
    "retryBudget": {"retryRatio": 0.0, "minRetriesPerSecond": 1, "ttl": "5s"},
}
AUTHOR_ANNOTATIONS = {
    "retry.linkerd.io/http": "5xx",
    "retry.linkerd.io/limit": "2",
    "timeout.linkerd.io/request": "300ms",
}


def profile_name(service: str) -> str:
    return f"{service}.{NS}.svc.cluster.local"


@pytest.fixture(scope="module")
def backend() -> Iterator[Upstream]:
    with Upstream("backend") as up:
        yield up


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApiServerDouble]:
    with KubeApiServerDouble(tokens={TOKEN: USER}) as server:
        for name in SERVICES:
            annotations = AUTHOR_ANNOTATIONS if name == "authors" else {}
            server.upsert_service(NS, name, ports=[80], annotations=annotations)
        server.upsert_service_profile(NS, profile_name("books"), BOOKS)
        server.upsert_service_profile(NS, profile_name("uploads"), UPLOADS)
        server.upsert_service_profile(
            NS,
            profile_name("broken"),
            {"routes": [{"name": "bad", "condition": {"pathRegex": "/broken/(?=x)"}}]},
        )
        yield server


@pytest.fixture(scope="module")
def gw(kube, backend, tmp_path_factory) -> Iterator[GatewayProcess]:
    kubeconfig = kube.write_kubeconfig(
        tmp_path_factory.mktemp("kube") / "kubeconfig", TOKEN, namespace=NS
    )
    config = {
        "server": {"timeout": "10s"},
        "serviceMesh": {
            "enabled": True,
            "type": "linkerd",
            "namespace": NS,
            "kubeconfig": str(kubeconfig),
            "linkerd": {"legacyHeaders": False},
        },
        "services": [
            {"name": name, "basePath": f"/{name}", "targets": [backend.url]} for name in SERVICES
        ],
    }
    gateway = GatewayProcess(config, workers=2, env={"KUBECONFIG": "/nonexistent/kubeconfig"})
    try:
        yield gateway.start()
    finally:
        gateway.cleanup()


@pytest.fixture(scope="module")
def sessions(gw) -> dict[int, requests.Session]:
    made = one_session_per_worker(gw, workers=2)
    yield made
    for s in made.values():
        s.close()


def wait_policy(
    gw: GatewayProcess,
    sessions: dict[int, requests.Session],
    name: str,
    ready: Callable[[dict], bool],
    timeout: float = 20.0,
) -> dict:
    """The service's admin view once ``ready`` holds for it in every worker."""
    deadline = time.monotonic() + timeout
    pending = dict(sessions)
    doc: dict = {}
    while pending and time.monotonic() < deadline:
        for pid, session in list(pending.items()):
            doc = session.get(f"{gw.url}/admin/services/{name}", headers=AUTH, timeout=10).json()
            if ready(doc):
                del pending[pid]
        if pending:
            time.sleep(0.1)
    assert not pending, f"{name}: policy not in workers {sorted(pending)}: {doc}"
    return doc


def from_profile(name: str) -> Callable[[dict], bool]:
    return lambda doc: doc["policy"]["source"] == f"serviceprofile {NS}/{profile_name(name)}"


def hits(backend: Upstream, prefix: str) -> int:
    return sum(1 for r in backend.seen if r["path"].startswith(prefix))


def test_profile_route_timeout_is_enforced_per_route(gw, sessions, backend):
    doc = wait_policy(gw, sessions, "books", from_profile("books"))
    slow = doc["policy"]["routes"][0]
    assert (slow["name"], slow["timeout"], slow["retryable"]) == ("slow", 0.3, False)
    assert slow["condition"] == {"pathRegex": "/books/slow/.*"}
    for session in sessions.values():
        started = time.monotonic()
        r = session.get(f"{gw.url}/books/slow/x", params={"ms": "3000"}, timeout=10)
        assert r.status_code == 504, r.text
        assert time.monotonic() - started < 2.5  # the profile's 300 ms, not the 10 s
        assert f"serviceprofile {NS}/{profile_name('books')} route slow" in r.json()["error"]
        # another route of the same service: no such timeout
        r = session.get(f"{gw.url}/books/other/slow/x", params={"ms": "600"}, timeout=10)
        assert r.status_code == 200


def test_always_failing_route_retries_within_one_budget_shared_by_both_workers(
    gw, sessions, backend
):
    doc = wait_policy(gw, sessions, "books", from_profile("books"))
    failing = doc["policy"]["routes"][1]
    assert failing["retryable"] and failing["retryOn"] == ["500-599"]
    assert failing["budget"]["shared"] is True
    before = hits(backend, "/books/status/")
    n = 100
    ordered = list(sessions.values())
    for i in range(n):  # alternate between the workers, one request at a time
        r = ordered[i % 2].get(f"{gw.url}/books/status/500", timeout=30)
        assert r.status_code == 500  # the last failure is relayed
    got = hits(backend, "/books/status/") - before
    allowance = 1 * 60 + 0.1 * n  # minRetriesPerSecond * ttl + retryRatio * requests
    # One budget for the host: two per-worker budgets would allow 60 more.
    assert n < got <= n + allowance, got
    assert got >= n + allowance - 2, got  # and it was spent (sequential requests: no race)
    budget = wait_policy(gw, sessions, "books", from_profile("books"))["policy"]["routes"][1]
    assert budget["budget"]["balance"] < 1
    assert "count per worker" not in gw.log()  # both workers mapped the shared file


def test_a_body_over_64_kib_is_never_retried(gw, sessions, backend):
    wait_policy(gw, sessions, "uploads", from_profile("uploads"))
    session = next(iter(sessions.values()))
    before = hits(backend, "/uploads/")
    r = session.post(f"{gw.url}/uploads/status/503", data=b"x" * (64 * 1024 + 1), timeout=30)
    assert r.status_code == 503
    assert hits(backend, "/uploads/") - before == 1
    r = session.post(f"{gw.url}/uploads/status/503", data=b"x" * 1024, timeout=30)
    assert r.status_code == 503
    assert hits(backend, "/uploads/") - before == 1 + 1 + 5  # the reserve: 5 retries


def test_annotations_apply_without_a_profile_and_a_profile_wins(gw, sessions, kube, backend):
    doc = wait_policy(
        gw,
        sessions,
        "authors",
        lambda d: d["policy"]["source"] == f"annotations on Service {NS}/authors",
    )
    assert doc["policy"]["annotations"] == AUTHOR_ANNOTATIONS
    (route,) = doc["policy"]["routes"]
    assert (route["timeout"], route["limit"], route["budget"]) == (0.3, 2, None)
    session = next(iter(sessions.values()))
    before = hits(backend, "/authors/status/")
    assert session.get(f"{gw.url}/authors/status/502", timeout=30).status_code == 502
    assert hits(backend, "/authors/status/") - before == 3  # limit 2: three attempts
    r = session.get(f"{gw.url}/authors/slow/x", params={"ms": "3000"}, timeout=10)
    assert r.status_code == 504
    assert f"annotations on Service {NS}/authors" in r.json()["error"]

    kube.upsert_service_profile(
        NS,
        profile_name("authors"),
        {"routes": [{"name": "reads", "condition": {"method": "GET"}}]},
    )
    doc = wait_policy(gw, sessions, "authors", from_profile("authors"))
    assert any("annotations ignored" in note for note in doc["policy"]["notes"])
    before = hits(backend, "/authors/status/")
    for session in sessions.values():
        assert session.get(f"{gw.url}/authors/status/502", timeout=30).status_code == 502
        r = session.get(f"{gw.url}/authors/slow/x", params={"ms": "600"}, timeout=10)
        assert r.status_code == 200  # the profile's route has no timeout
    assert hits(backend, "/authors/status/") - before == 2  # no retries: not isRetryable


def test_a_profile_that_does_not_parse_is_reported_and_the_service_keeps_serving(
    gw, sessions, backend
):
    doc = wait_policy(gw, sessions, "broken", lambda d: bool(d["policy"]["errors"]))
    (error,) = doc["policy"]["errors"]
    assert error.startswith(
        f"ServiceProfile {NS}/{profile_name('broken')}: routes[0].condition.pathRegex: "
        "invalid regex '/broken/(?=x)'"
    )
    # Nothing of the profile applies: only the gateway's own policy (retries: 1 gives
    # the default retry budget) is left.
    (own,) = doc["policy"]["routes"]
    assert doc["policy"]["source"] == "config" and own["source"] == "config"
    assert not own["retryable"] and own["budget"]["key"] == "config:broken"
    assert doc["name"] == "broken" and doc["basePath"] == "/broken"
    for session in sessions.values():
        assert session.get(f"{gw.url}/broken/anything", timeout=10).status_code == 200


def test_unknown_service_is_a_404(gw):
    r = gw.admin("services/nope")
    assert r.status_code == 404
    assert r.json()["code"] == "unknown_service"
