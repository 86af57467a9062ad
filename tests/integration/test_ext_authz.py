"""Istio ``enablePolicyCheck`` end to end: a real gunicorn gateway, a scripted ext_authz
authorizer and an echo upstream, all on loopback."""

from __future__ import annotations

import concurrent.futures
import http.client
import time
from urllib.parse import unquote

import pytest
import requests

from tests.doubles.ext_authz import Allow, Authorizer, Deny, Fail, Hang, closed_port
from tests.support.gateway import ADMIN_TOKEN, GatewayProcess
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

SERVICE_KEY = "svc-api-key-never-for-the-authorizer"


def config(authz_addr: str, upstream: Upstream, **istio) -> dict:
    return {
        "monitoring": {"enabled": True},
        "serviceMesh": {
            "enabled": True,
            "type": "istio",
            "readyGracePeriod": "50ms",  # no istiod here: ready on the static targets at once
            "istio": {"enablePolicyCheck": True, "authzAddr": authz_addr, **istio},
        },
        "services": [
            {
                "name": "orders",
                "basePath": "/api/orders",
                "targets": [upstream.url],
                "stripBasePath": True,
                "headers": {"X-Api-Key": SERVICE_KEY},
            }
        ],
    }


@pytest.fixture(scope="module")
def upstream():
    with Upstream("orders") as up:
        yield up


@pytest.fixture(scope="module")
def authz():
    with Authorizer() as a:
        yield a


@pytest.fixture(scope="module")
def gw(authz, upstream):
    """One gateway for the decisions; each test scripts the authorizer afresh."""
    with GatewayProcess(config(authz.url + "/ext-authz", upstream)) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh(request):
    if "authz" in request.fixturenames:
        request.getfixturevalue("authz").reset()
    yield


def upstream_saw(upstream: Upstream, before: int) -> list[dict]:
    return upstream.seen[before:]


def test_allow_forwards_with_the_authorizers_headers(gw, authz, upstream):
    authz.answer = Allow(
        headers=(("X-User", "alice"), ("Authorization", "Bearer internal"), ("Server", "az"))
    )
    before = len(upstream.seen)
    r = requests.post(
        gw.url + "/api/orders/42?expand=items",
        data=b"order body",
        headers={"Authorization": "Bearer client", "Cookie": "sid=1", "X-Trace": "t1"},
        timeout=10,
    )
    assert r.status_code == 200
    (seen,) = upstream_saw(upstream, before)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-user"] == "alice"
    assert headers["authorization"] == "Bearer internal"  # the authorizer's replaced it
    assert headers["x-api-key"] == SERVICE_KEY
    assert "server" not in headers  # the authorizer's own answer header stays behind
    assert seen["method"] == "POST" and seen["bodyBytes"] == len(b"order body")

    (check,) = authz.seen
    assert check.method == "POST"
    assert check.target == "/ext-authz/api/orders/42?expand=items"  # the client's path
    assert check.body == b"" and check.header("Content-Length") == "0"
    assert check.header("Authorization") == "Bearer client"
    assert check.header("Cookie") == "sid=1" and check.header("X-Trace") == "t1"
    assert check.header("Host") == f"127.0.0.1:{gw.port}"
    assert check.header("X-Forwarded-For") == "127.0.0.1"
    assert check.header("X-Request-Id") == r.headers["X-Request-Id"]
    # The gateway's own secrets never go to the authorizer.
    values = " ".join(v for _, v in check.headers)
    assert SERVICE_KEY not in values and ADMIN_TOKEN not in values
    assert "x-api-key" not in check.names


def test_deny_answers_with_the_authorizers_status_body_and_headers(gw, authz, upstream):
    authz.answer = Deny(
        401,
        b'{"message": "login first"}',
        (
            ("Content-Type", "application/json"),
            ("WWW-Authenticate", 'Bearer realm="orders"'),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ),
    )
    before = len(upstream.seen)
    r = requests.get(gw.url + "/api/orders/42", timeout=10)
    assert r.status_code == 401
    assert r.content == b'{"message": "login first"}'
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="orders"'
    assert r.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert r.headers["X-Request-Id"]  # the gateway's, as on every answer
    assert upstream_saw(upstream, before) == []


def test_authorizer_error_fails_closed(gw, authz, upstream):
    authz.answer = Fail(500)
    before = len(upstream.seen)
    r = requests.get(gw.url + "/api/orders/1", timeout=10)
    assert r.status_code == 403
    body = r.json()
    assert body["code"] == "policy_check_failed" and body["requestId"]
    assert upstream_saw(upstream, before) == []


def test_gateway_paths_and_unrouted_requests_are_not_checked(gw, authz):
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert requests.get(gw.url + "/health", timeout=10).status_code == 200
    assert requests.get(gw.url + "/ready", timeout=10).status_code == 200
    assert requests.get(gw.url + "/metrics", timeout=10).status_code == 200
    assert requests.get(gw.url + "/admin/routes", headers=auth, timeout=10).status_code == 200
    assert requests.get(gw.url + "/nowhere", timeout=10).status_code == 404
    assert authz.seen == []


def test_timeout_fails_closed_within_the_timeout(authz, upstream, gateway_factory):
    gw = gateway_factory(config(authz.url, upstream, authzTimeout="300ms"))
    authz.answer = Hang(5.0)
    before = len(upstream.seen)
    started = time.monotonic()
    r = requests.get(gw.url + "/api/orders/1", timeout=10)
    took = time.monotonic() - started
    assert r.status_code == 403 and r.json()["code"] == "policy_check_failed"
    assert 0.3 <= took < 1.5, took
    assert upstream_saw(upstream, before) == []


def test_authorizer_down_fails_closed(upstream, gateway_factory):
    gw = gateway_factory(config(f"http://127.0.0.1:{closed_port()}", upstream))
    r = requests.get(gw.url + "/api/orders/1", timeout=10)
    assert r.status_code == 403 and r.json()["code"] == "policy_check_failed"
    assert "policy check failed" in r.json()["error"]


def test_fail_open_forwards_unchecked_and_logs_once(upstream, gateway_factory):
    gw = gateway_factory(config(f"http://127.0.0.1:{closed_port()}", upstream, authzFailOpen=True))
    before = len(upstream.seen)
    for _ in range(3):
        assert requests.get(gw.url + "/api/orders/1", timeout=10).status_code == 200
    assert len(upstream_saw(upstream, before)) == 3
    assert gw.log().count("requests go upstream unchecked") == 1


def test_the_authorizer_judges_the_path_the_upstream_gets(gw, authz, upstream):
    # A stray "%" must not make the check target decode to another path than the one
    # routed and forwarded (urllib3 would escape every "%" in it otherwise).
    before = len(upstream.seen)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", "/api/orders/%61dmin%zz?q=%e2%zz")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        conn.close()
    (check,) = authz.seen
    assert check.target == "/ext-authz/api/orders/%61dmin%25zz?q=%E2%25zz"
    (seen,) = upstream_saw(upstream, before)
    assert unquote(seen["rawPath"]) == "/admin%zz?q=\ufffd%zz"
    assert unquote(check.target.removeprefix("/ext-authz/api/orders")) == unquote(seen["rawPath"])


def test_concurrent_checks_keep_one_connection_per_thread(gw, authz):
    # gunicorn runs this worker with 8 threads: at most 8 keep-alive connections.
    opened = authz.connections
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(
            pool.map(
                lambda i: requests.get(f"{gw.url}/api/orders/{i}", timeout=10).status_code,
                range(60),
            )
        )
    assert codes == [200] * 60
    assert len(authz.seen) == 60
    assert authz.connections - opened <= 8
