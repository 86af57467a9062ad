"""The ext_authz check: its header rules alone, and its decisions against a scripted
authorizer on loopback (:mod:`tests.doubles.ext_authz`)."""

from __future__ import annotations

import logging
import time
from urllib.parse import unquote

import pytest
from urllib3.util import SKIP_HEADER
from urllib3.util.url import _encode_target
from werkzeug.test import EnvironBuilder

from odin_gw.config.loader import build_config
from odin_gw.ext_authz import (
    MAX_BODY,
    ExtAuthz,
    PolicyCheckFailed,
    check_target,
    client_headers,
    denied_response,
    headers_to_remove,
    upstream_additions,
)
from odin_gw.proxy.exchange import Exchange
from odin_gw.proxy.outbound import OutboundBuilder
from odin_gw.proxy.trust import Forwarding
from odin_gw.routing import RouteTable
from tests.doubles.ext_authz import Allow, Authorizer, Deny, Drop, Fail, Hang, Raw, closed_port

NO_STRIP = OutboundBuilder(frozenset(), ())
CONSUL_STRIP = OutboundBuilder(frozenset({"HTTP_X_CONSUL_TOKEN"}), ("HTTP_L5D_",))


def environ(path="/svc/x", method="GET", query="", headers=None, raw=None):
    env = EnvironBuilder(
        path=path, method=method, query_string=query or None, headers=headers
    ).get_environ()
    env["RAW_URI"] = (raw or path) + (f"?{query}" if query else "")
    env["odin.raw_path"] = raw or path
    env["REMOTE_ADDR"] = "192.0.2.7"
    return env


def route(headers=None):
    svc = {"name": "svc", "basePath": "/svc", "targets": ["http://127.0.0.1:9"]}
    if headers:
        svc["headers"] = headers
    return RouteTable.from_config(build_config({"services": [svc]})).routes[0]


def checker(addr, timeout=1.0, fail_open=False, outbound=NO_STRIP) -> ExtAuthz:
    return ExtAuthz(addr, timeout, fail_open, outbound, pool_size=4)


@pytest.fixture
def authz():
    with Authorizer() as a:
        yield a


@pytest.fixture
def check(authz):
    c = checker(authz.url + "/authz/")
    yield c
    c.close()


# -- the check request ---------------------------------------------------------------------


def test_target_is_prefix_path_and_query_as_received():
    env = environ("/svc/a%2fb", query="x=1&y=%41")
    assert check_target("/authz", env) == "/authz/svc/a%2fb?x=1&y=%41"
    assert check_target("", environ("/svc/x")) == "/svc/x"


@pytest.mark.parametrize(
    "raw, query",
    [
        ("/svc/%61dmin%zz", ""),  # a stray "%" made urllib3 re-escape every "%"
        ("/svc/x", "a=%e2%zz&b=%"),
        ("/svc/caf\xe9", ""),  # a raw non-ASCII byte (latin-1 in the environ)
        ("/svc/a|b/%7c", "q=<x>"),
    ],
)
def test_target_means_what_the_gateway_routes_on(raw, query):
    # Pins urllib3's target encoding: whatever it changes, the path still decodes to the
    # one the gateway routes on (a mismatch would let the authorizer judge another path).
    target = check_target("", environ(raw=raw, query=query))
    sent = _encode_target(target)
    path, _, sent_query = sent.partition("?")
    assert unquote(path, encoding="latin-1") == unquote(raw, encoding="latin-1")
    assert unquote(sent_query, encoding="latin-1") == unquote(query, encoding="latin-1")


def test_check_headers_carry_the_client_request_not_the_gateway_secrets():
    env = environ(
        headers={
            "Authorization": "Bearer client-token",
            "Cookie": "session=abc",
            "X-Forwarded-For": "6.6.6.6",
            "X-Request-Id": "req-1",
            "Forwarded": "for=6.6.6.6",
            "Connection": "keep-alive, X-Private",
            "X-Private": "hop",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Expect": "100-continue",
            "X-Consul-Token": "spoofed",
            "L5d-Dst-Override": "spoofed",
            "Host": "public.example",
            "User-Agent": "curl/8",
        },
    )
    exchange = Exchange(env)
    headers = checker("http://127.0.0.1:9", outbound=CONSUL_STRIP).check_headers(env, exchange)
    assert headers["Authorization"] == "Bearer client-token"
    assert headers["Cookie"] == "session=abc"
    assert headers["Host"] == "public.example"
    assert headers["User-Agent"] == "curl/8"
    assert headers["X-Forwarded-For"] == "192.0.2.7"  # the peer, not the client's claim
    assert headers["X-Real-IP"] == "192.0.2.7"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Request-Id"] == exchange.request_id == "req-1"
    assert headers["Content-Length"] == "0"
    assert headers["X-Envoy-Expected-Rq-Timeout-Ms"] == "1000"
    names = {n.lower() for n in headers}
    gone = {"connection", "x-private", "te", "proxy-authorization", "expect", "forwarded"}
    assert not names & (gone | {"x-consul-token", "l5d-dst-override"})


def test_check_headers_from_a_trusted_proxy_and_without_defaults():
    env = environ(headers={"Forwarded": "for=1.2.3.4"})
    exchange = Exchange(env)
    exchange.forwarding = Forwarding("1.2.3.4", "1.2.3.4, 192.0.2.7", "https", "shop.example")
    exchange.client_addr = "1.2.3.4"
    headers = checker("http://127.0.0.1:9", timeout=0.25).check_headers(env, exchange)
    assert headers["X-Forwarded-For"] == "1.2.3.4, 192.0.2.7"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Real-IP"] == "1.2.3.4"
    assert headers["Forwarded"] == "for=1.2.3.4"  # a trusted proxy may state it
    assert headers["X-Envoy-Expected-Rq-Timeout-Ms"] == "250"
    # No client User-Agent/Accept-Encoding: urllib3 must not add its own.
    assert headers["User-Agent"] is SKIP_HEADER and headers["Accept-Encoding"] is SKIP_HEADER


# -- the answer's headers ------------------------------------------------------------------


def test_upstream_additions_keep_what_the_authorizer_means_for_the_upstream():
    items = [
        ("X-User", "alice"),
        ("X-Groups", "a"),
        ("x-groups", "b"),
        ("Authorization", "Bearer internal-jwt"),
        ("Content-Type", "text/plain"),
        ("Content-Length", "0"),
        ("Content-Encoding", "gzip"),
        ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("Server", "authz/1"),
        ("Set-Cookie", "a=1"),
        ("Host", "evil.example"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Request-Id", "forged"),
        ("X-Forwarded-Client-Cert", "forged"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("X-Consul-Token", "forged"),
        ("L5d-Dst-Override", "forged"),
        ("x-envoy-auth-headers-to-remove", "cookie"),
        ("X-Bad", "a\x01b"),
    ]
    kept = upstream_additions(items, frozenset({"x-consul-token"}), ("l5d-",))
    assert kept == [
        ("X-User", "alice"),
        ("X-Groups", "a, b"),
        ("Authorization", "Bearer internal-jwt"),
    ]


def test_headers_to_remove_never_host_nor_hop_by_hop():
    items = [
        ("X-Envoy-Auth-Headers-To-Remove", "Cookie, x-debug"),
        ("x-envoy-auth-headers-to-remove", "host, connection, transfer-encoding, ,bad name"),
    ]
    assert headers_to_remove(items) == {"cookie", "x-debug"}
    assert headers_to_remove([("X-User", "a")]) == frozenset()


def test_client_headers_on_denial():
    items = [
        ("Content-Type", "text/html"),
        ("Content-Length", "99"),
        ("WWW-Authenticate", 'Bearer realm="api"'),
        ("Location", "https://login.example/?rd=/svc"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Host", "authz.internal"),
        ("Date", "x"),
        ("Server", "authz/1"),
        ("X-Request-Id", "authz-own"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "hop"),
        ("Transfer-Encoding", "chunked"),
        ("x-envoy-auth-headers-to-remove", "cookie"),
    ]
    assert client_headers(items) == [
        ("Content-Type", "text/html"),
        ("WWW-Authenticate", 'Bearer realm="api"'),
        ("Location", "https://login.example/?rd=/svc"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_denied_response_is_the_authorizers():
    r = denied_response(401, [("WWW-Authenticate", "Basic")], b"who are you?")
    assert (r.status_code, r.get_data(), r.headers["WWW-Authenticate"]) == (
        401,
        b"who are you?",
        "Basic",
    )
    assert "Content-Type" not in r.headers  # none of our own
    assert denied_response(204, [], b"ignored").get_data() == b""


# -- configuration ---------------------------------------------------------------------------


def mesh_config(kind="istio", enabled=True, **istio):
    istio.setdefault("enablePolicyCheck", True)
    istio.setdefault("authzAddr", "http://user:secret@authz.local:9000/check/")
    return build_config({"serviceMesh": {"enabled": enabled, "type": kind, "istio": istio}})


def test_built_only_for_istio_with_policy_check():
    assert ExtAuthz.from_config(mesh_config(enablePolicyCheck=False), NO_STRIP, 4) is None
    assert ExtAuthz.from_config(mesh_config(enabled=False), NO_STRIP, 4) is None
    assert ExtAuthz.from_config(build_config({}), NO_STRIP, 4) is None
    check = ExtAuthz.from_config(mesh_config(authzTimeout="250ms"), NO_STRIP, 4)
    assert check is not None
    try:
        assert check.path_prefix == "/check"
        assert check.where == "http://authz.local:9000"  # no user info in logs
        assert (check.pool.host, check.pool.port) == ("authz.local", 9000)
        assert check.timeout == 0.25 and not check.fail_open
        assert check.pool.pool.maxsize == 4 and not check.pool.block
    finally:
        check.close()


# -- decisions against a live authorizer ---------------------------------------------------


def test_allow_sets_headers_upstream_and_removes_named_ones(authz, check):
    authz.answer = Allow(
        headers=(
            ("X-User", "alice"),
            ("X-Api-Key", "from-authz"),
            ("X-Envoy-Auth-Headers-To-Remove", "cookie, x-user"),
        )
    )
    env = environ(method="POST", query="a=1", headers={"Cookie": "s=1", "Authorization": "B t"})
    exchange = Exchange(env)
    assert check.check(env, route({"X-Api-Key": "configured"}), exchange) is None
    # The route's configured header wins; a header both set and removed is removed.
    assert exchange.mesh_headers == []
    assert "HTTP_COOKIE" not in env and env["HTTP_AUTHORIZATION"] == "B t"
    (seen,) = authz.seen
    assert (seen.method, seen.target, seen.body) == ("POST", "/authz/svc/x?a=1", b"")
    assert seen.header("Authorization") == "B t" and seen.header("Content-Length") == "0"
    assert "user-agent" not in seen.names and "accept-encoding" not in seen.names

    authz.answer = Allow(headers=(("X-User", "bob"),))
    exchange = Exchange(env)
    assert check.check(env, route(), exchange) is None
    assert exchange.mesh_headers == [("X-User", "bob")]
    assert check.counters() == {"ok": 2, "denied": 0, "error": 0, "failure_mode_allowed": 0}


def test_keep_alive_one_connection_for_sequential_checks(authz, check):
    authz.answer = Allow(body=b"ok, with a body to drain")
    for _ in range(5):
        env = environ()
        assert check.check(env, route(), Exchange(env)) is None
    assert authz.connections == 1


@pytest.mark.parametrize("status", [401, 403, 302, 404, 429, 201])
def test_every_other_status_below_500_denies(authz, check, status):
    # Envoy's rule: only 200 allows (even a 201 denies); the client gets the answer.
    authz.answer = Deny(status, b"no", (("Location", "/login"), ("Content-Type", "text/plain")))
    env = environ()
    denied = check.check(env, route(), Exchange(env))
    assert denied is not None and denied.status_code == status
    assert denied.get_data() == b"no" and denied.headers["Location"] == "/login"
    assert check.counters()["denied"] == 1


def test_head_denial_has_no_body(authz, check):
    authz.answer = Deny(403, b"no")
    env = environ(method="HEAD")
    denied = check.check(env, route(), Exchange(env))
    assert denied.status_code == 403 and denied.get_data() == b""
    assert authz.seen[0].method == "HEAD"


@pytest.mark.parametrize(
    "answer",
    [
        Fail(500),
        Fail(503),
        Raw(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        Raw(b"garbage\r\n\r\n"),
        Drop(),
    ],
    ids=["500", "503", "1xx-final", "garbage", "closed"],
)
def test_errors_fail_closed_with_403(authz, check, answer):
    authz.answer = answer
    env = environ()
    with pytest.raises(PolicyCheckFailed) as info:
        check.check(env, route(), Exchange(env))
    assert (info.value.status, info.value.code) == (403, "policy_check_failed")
    assert check.counters()["error"] == 1 and check.failing
    # Only a connection closed before any answer is asked again.
    assert len(authz.seen) == (2 if isinstance(answer, Drop) else 1)


def test_errors_fail_open_when_configured(authz):
    authz.answer = Fail(500)
    check = checker(authz.url, fail_open=True)
    try:
        env = environ()
        assert check.check(env, route(), Exchange(env)) is None
        assert check.counters() == {"ok": 0, "denied": 0, "error": 1, "failure_mode_allowed": 1}
    finally:
        check.close()


def test_a_denial_is_never_forwarded_even_failing_open(authz):
    authz.answer = Deny(403, b"x" * (MAX_BODY + 1))
    check = checker(authz.url, fail_open=True)
    try:
        env = environ()
        with pytest.raises(PolicyCheckFailed):
            check.check(env, route(), Exchange(env))
        assert check.counters()["denied"] == 1
    finally:
        check.close()


def test_hang_fails_within_the_timeout(authz):
    authz.answer = Hang(5.0)
    check = checker(authz.url, timeout=0.3)
    try:
        env = environ()
        started = time.monotonic()
        with pytest.raises(PolicyCheckFailed):
            check.check(env, route(), Exchange(env))
        assert 0.25 <= time.monotonic() - started < 1.0
    finally:
        check.close()


def test_unreachable_authorizer_fails_fast():
    check = checker(f"http://127.0.0.1:{closed_port()}")
    try:
        env = environ()
        started = time.monotonic()
        with pytest.raises(PolicyCheckFailed):
            check.check(env, route(), Exchange(env))
        assert time.monotonic() - started < 0.5
    finally:
        check.close()


def test_a_connection_closed_before_answering_is_asked_once_more(authz, check):
    authz.script(Drop())
    env = environ()
    assert check.check(env, route(), Exchange(env)) is None
    assert len(authz.seen) == 2 and check.counters()["error"] == 0
    authz.script(Drop(), Drop())  # twice in a row is an error, not a race
    with pytest.raises(PolicyCheckFailed):
        check.check(env, route(), Exchange(env))
    assert len(authz.seen) == 4


def test_state_changes_are_logged_once(authz, caplog):
    caplog.set_level(logging.DEBUG, logger="odin_gw.ext_authz")
    check = checker(authz.url.replace("http://", "http://user:secret@"))
    authz.answer = Fail(500)
    for _ in range(3):
        env = environ()
        with pytest.raises(PolicyCheckFailed):
            check.check(env, route(), Exchange(env))
    authz.answer = Allow()
    for _ in range(2):
        env = environ()
        check.check(env, route(), Exchange(env))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "answered 500" in warnings[0] and "refused with 403" in warnings[0]
    assert "answers again" in warnings[1]
    assert not check.failing
    check.close()
    text = caplog.text
    assert "secret" not in text and str(authz.port) in text  # the address, never its user info
