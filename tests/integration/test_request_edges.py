"""What reaches a backend, and what never does: raw bytes in, the echo upstream's view out.

Every request here is written byte for byte with ``tests.support.raw_client``, so nothing
between the test and the gateway normalises names, targets or framing.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.raw_client import RawResponse, exchange
from tests.support.upstream import Upstream, _Handler

pytestmark = pytest.mark.integration


class _AnyMethodHandler(_Handler):
    """The echo handler for every method (http.server only knows the ones it defines)."""

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)


@pytest.fixture
def echo():
    up = Upstream("a")
    up._server.RequestHandlerClass = _AnyMethodHandler
    with up:
        yield up


@pytest.fixture
def root(upstream_b):
    return upstream_b


@pytest.fixture
def gw(gateway_factory, echo, root):
    return gateway_factory(
        {
            "services": [
                {
                    "name": "a",
                    "basePath": "/api/a",
                    "targets": [echo.url],
                    "headers": {"X-API-Key": "secret"},
                },
                {"name": "root", "basePath": "/", "targets": [root.url]},
            ]
        }
    )


def send(gw, head: str, body: bytes = b"") -> RawResponse:
    raw = head.replace("\n", "\r\n").encode("latin-1")
    if not raw.endswith(b"\r\n\r\n"):
        raw += b"\r\n" if raw.endswith(b"\r\n") else b"\r\n\r\n"
    return exchange(gw.port, raw + body, timeout=10)


def get(gw, target: str, *headers: str, method: str = "GET") -> RawResponse:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw.example", *headers, "Connection: close"]
    return send(gw, "\n".join(lines) + "\n\n")


def seen(resp: RawResponse) -> dict:
    assert resp.status == 200, (resp.status, resp.body[:300])
    return json.loads(resp.body)


def values(record: dict, name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


def log_lines(gw, needle: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in gw.log().splitlines() if needle in line]
        if lines:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never logged:\n{gw.log()[-2000:]}")


# -- request integrity ---------------------------------------------------------------


def test_configured_header_replaces_client_copy_in_any_case(gw, echo):
    for spelling in ("X-Api-Key", "x-api-key", "X-API-KEY"):
        record = seen(get(gw, "/api/a/x", f"{spelling}: attacker"))
        assert values(record, "X-API-Key") == ["secret"], spelling
        assert [k for k, _ in record["headers"] if k.lower() == "x-api-key"] == ["X-API-Key"]


def test_same_header_twice_in_two_cases_arrives_once(gw):
    record = seen(get(gw, "/api/a/x", "X-Dup: 1", "x-dup: 2", "X-DUP: 3"))
    assert values(record, "X-Dup") == ["1,2,3"]


def test_chunked_in_any_case_is_forwarded(gw, echo):
    resp = send(
        gw,
        "POST /api/a/up HTTP/1.1\nHost: x\nTransfer-Encoding: Chunked\nConnection: close\n\n",
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    assert seen(resp)["bodyBytes"] == 3


@pytest.mark.parametrize(
    ("coding", "status", "who"),
    [
        # Refused by the gateway, as nginx does (501, JSON with a request id).
        ("gzip, chunked", 501, "gateway"),
        ("identity, chunked", 501, "gateway"),
        ("deflate,chunked", 501, "gateway"),
        # Refused by gunicorn 27 before the app runs (gunicorn/http/message.py).
        ("identity", 400, "gunicorn"),
        ("chunked, chunked", 400, "gunicorn"),
        ("gzip", 400, "gunicorn"),
        ("foo, chunked", 501, "gunicorn"),
    ],
)
def test_transfer_encoding_other_than_chunked_refused(gw, echo, root, coding, status, who):
    before = echo.requests + root.requests
    resp = send(
        gw,
        f"POST /api/a/up HTTP/1.1\nHost: x\nTransfer-Encoding: {coding}\nConnection: close\n\n",
        b"0\r\n\r\n",
    )
    assert resp.status == status
    assert b"Traceback" not in resp.body
    if who == "gateway":
        doc = json.loads(resp.body)
        assert doc["code"] == "unsupported_transfer_encoding" and doc["requestId"]
    assert echo.requests + root.requests == before


def test_transfer_encoding_header_repeated_is_not_chunked_alone(gw, echo):
    # Two header lines are one list ("gzip,chunked") to gunicorn and to the gateway.
    resp = send(
        gw,
        "POST /api/a/up HTTP/1.1\nHost: x\nTransfer-Encoding: gzip\n"
        "Transfer-Encoding: chunked\nConnection: close\n\n",
        b"0\r\n\r\n",
    )
    assert resp.status == 501 and echo.requests == 0


def test_fragment_in_target_refused(gw, echo, root):
    for target in ("/api/a/x#/../../admin/x", "/api/a/x?q=1#frag", "/x#"):
        resp = get(gw, target)
        assert resp.status == 400, target
        assert json.loads(resp.body)["code"] == "bad_request"
    assert echo.requests == 0 and root.requests == 0


@pytest.mark.parametrize(
    "target",
    [
        "/api/a/..;/admin",
        "/api/a/..;jsessionid=1/admin",
        "/api/a/%2e%2e;/admin",
        "/api/a/%2E%2e;x/admin",
        "/api/a/.;/x",
        "/api/a/%2e;/x",
        "/api/a/..\\admin",
        "/api/a/..%5cadmin",
        "/api/a/..%5Cadmin",
        "/api/a/x\\..\\..\\admin",
        "/api/a/%2e%2e%5c%2e%2e%5cadmin",
        "/api/a/..%3b/admin",
        "/api/a/..%2F..%2Fadmin",
        "/api/a/x%2f%2e%2e%2f%2e%2e%2fadmin",
    ],
)
def test_dot_segment_spellings_refused(gw, echo, root, target):
    resp = get(gw, target)
    assert resp.status == 400
    assert json.loads(resp.body)["code"] == "bad_request"
    assert echo.requests == 0 and root.requests == 0


def test_lookalike_segments_still_forwarded(gw):
    for target in ("/api/a/.well-known/x", "/api/a/x;v=1/y", "/api/a/...", "/api/a/a..b"):
        assert seen(get(gw, target))["rawPath"] == target


def test_routing_uses_the_forwarded_target_only(gw, echo, root):
    # CGI-style and forwarding headers from the client change neither route nor scheme.
    record = seen(
        get(
            gw,
            "/api/a/x",
            "SCRIPT_NAME: /elsewhere",
            "PATH_INFO: /elsewhere",
            "Script-Name: /api",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: evil.example",
            "X-Forwarded-Prefix: /evil",
            "X-Original-URL: /elsewhere",
        )
    )
    assert record["server"] == "a" and record["rawPath"] == "/api/a/x"
    assert values(record, "X-Forwarded-Proto") == ["http"]
    assert values(record, "X-Forwarded-Host") == ["gw.example"]
    assert values(record, "X-Forwarded-Prefix") == []
    # The route is chosen on the decoded raw target, which is what travels upstream.
    encoded = seen(get(gw, "/api/%61/x%2Fy"))
    assert encoded["server"] == "a" and encoded["rawPath"] == "/api/%61/x%2Fy"
    absolute = seen(get(gw, "http://other.example/api/a/z?q=1"))
    assert absolute["server"] == "a" and absolute["rawPath"] == "/api/a/z?q=1"
    assert seen(get(gw, "/apix/1"))["server"] == "b"
    # An encoded slash stays inside its segment: "api%2Fa" is not "api" then "a".
    slash = seen(get(gw, "/api%2Fa/x"))
    assert slash["server"] == "b" and slash["rawPath"] == "/api%2Fa/x"
    assert seen(get(gw, "/api/a%2fx"))["server"] == "b"


# -- methods -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "PURGE", "REPORT", "M-SEARCH", "BREW"])
def test_any_token_method_forwarded(gw, method):
    resp = send(
        gw,
        f"{method} /api/a/dav HTTP/1.1\nHost: x\nContent-Length: 5\nConnection: close\n\n",
        b"<x/>\n",
    )
    record = seen(resp)
    assert record["method"] == method and record["bodyBytes"] == 5


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT 127.0.0.1:22 HTTP/1.1",
        "CONNECT /api/a/x HTTP/1.1",
        "TRACE /api/a/x HTTP/1.1",
        "TRACE / HTTP/1.1",
    ],
)
def test_connect_and_trace_refused(gw, echo, root, request_line):
    resp = send(gw, f"{request_line}\nHost: x\nConnection: close\n\n")
    assert resp.status == 405
    assert json.loads(resp.body)["code"] == "method_not_allowed"
    assert echo.requests == 0 and root.requests == 0


def test_gateway_paths_never_reach_a_root_service(gw, root):
    for method, target, status in (
        ("PROPFIND", "/health", 405),
        ("PROPFIND", "/admin/routes", 405),
        ("MKCOL", "/admin", 405),
        ("DELETE", "/ready", 405),
        ("GET", "/health/x", 404),
        ("PROPFIND", "/%68ealth", 405),
    ):
        assert get(gw, target, method=method).status == status, (method, target)
    assert root.requests == 0
    assert seen(get(gw, "/healthz"))["server"] == "b"


# -- forwarding trust ----------------------------------------------------------------

SPOOFED = (
    "X-Forwarded-For: 6.6.6.6",
    "Forwarded: for=6.6.6.6;proto=https;host=evil.example",
    "X-Real-IP: 6.6.6.6",
    'X-Forwarded-Client-Cert: Hash=00;Subject="CN=admin"',
    "X-Forwarded-Ssl: on",
    "X-Forwarded-Port: 443",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Host: evil.example",
)


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8"]], ids=["none", "other-network"])
def test_untrusted_peer_cannot_state_forwarding_facts(gateway_factory, echo, trusted):
    gw = gateway_factory(
        {
            "server": {"trustedProxies": trusted},
            "services": [{"name": "a", "basePath": "/api/a", "targets": [echo.url]}],
        }
    )
    resp = get(gw, "/api/a/x", *SPOOFED)
    record = seen(resp)
    assert values(record, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(record, "X-Real-IP") == ["127.0.0.1"]
    assert values(record, "X-Forwarded-Proto") == ["http"]
    assert values(record, "X-Forwarded-Host") == ["gw.example"]
    for dropped in ("Forwarded", "X-Forwarded-Client-Cert", "X-Forwarded-Ssl", "X-Forwarded-Port"):
        assert values(record, dropped) == [], dropped
    rid = resp.header("X-Request-Id")
    assert "client=127.0.0.1 " in log_lines(gw, rid)[0]


def test_trusted_proxy_is_believed(gateway_factory, echo):
    gw = gateway_factory(
        {
            "server": {"trustedProxies": ["127.0.0.1/32", "10.0.0.0/8"]},
            "services": [{"name": "a", "basePath": "/api/a", "targets": [echo.url]}],
        }
    )
    resp = get(
        gw,
        "/api/a/x",
        "X-Forwarded-For: 7.7.7.7, 6.6.6.6, 10.1.1.1",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: public.example",
        "X-Forwarded-Client-Cert: Hash=00",
        "X-Real-IP: 1.1.1.1",
    )
    record = seen(resp)
    assert values(record, "X-Forwarded-For") == ["7.7.7.7, 6.6.6.6, 10.1.1.1, 127.0.0.1"]
    assert values(record, "X-Real-IP") == ["6.6.6.6"]  # right-most untrusted
    assert values(record, "X-Forwarded-Proto") == ["https"]
    assert values(record, "X-Forwarded-Host") == ["public.example"]
    assert values(record, "X-Forwarded-Client-Cert") == ["Hash=00"]
    assert values(record, "Host") == [f"127.0.0.1:{echo.port}"]
    assert "client=6.6.6.6 " in log_lines(gw, resp.header("X-Request-Id"))[0]
    # A malformed entry ends the walk: nothing left of it is believed.
    record = seen(get(gw, "/api/a/x", "X-Forwarded-For: 6.6.6.6, bogus, 10.1.1.1"))
    assert values(record, "X-Real-IP") == ["10.1.1.1"]
    # Without X-Forwarded-For, RFC 7239 Forwarded is believed.
    record = seen(get(gw, "/api/a/x", 'Forwarded: for="[2001:db8::1]:4711";proto=https'))
    assert values(record, "X-Real-IP") == ["2001:db8::1"]
    assert values(record, "X-Forwarded-Proto") == ["https"]
    assert values(record, "Forwarded") == ['for="[2001:db8::1]:4711";proto=https']


# -- access log ----------------------------------------------------------------------


def test_access_log_counts_streamed_bytes_once(gateway_factory, upstream):
    gw = gateway_factory({"services": [{"name": "a", "basePath": "/a", "targets": [upstream.url]}]})
    size = 300_000  # above the 64 KiB read-whole limit: streamed, with Content-Length
    resp = get(gw, f"/a/big?bytes={size}")
    assert resp.status == 200 and len(resp.body) == size
    assert resp.header("Content-Length") == str(size)
    line = log_lines(gw, resp.header("X-Request-Id"))[0]
    assert f" {size}B" in line
    small = get(gw, "/a/echo")
    assert f" {len(small.body)}B" in log_lines(gw, small.header("X-Request-Id"))[0]
    missing = get(gw, "/nowhere")
    assert f" {len(missing.body)}B" in log_lines(gw, missing.header("X-Request-Id"))[0]


def test_text_access_log_cannot_be_forged(gateway_factory, upstream):
    gw = gateway_factory({"services": [{"name": "a", "basePath": "/a", "targets": [upstream.url]}]})
    forged = "2026-01-01 00:00:00,000 INFO [1] odin_gw.access: forged GET /admin 200"
    target = "/a/x%0D%0A" + forged.replace(" ", "%20") + "%00%1b%7f%C3%A9%22%5C"
    resp = get(gw, target)
    assert resp.status == 200
    rid = resp.header("X-Request-Id")
    lines = log_lines(gw, rid)
    assert len(lines) == 1
    assert "/a/x\\x0D\\x0A2026-01-01\\x2000:00:00,000" in lines[0]
    assert "\\x00\\x1B\\x7F\\xC3\\xA9\\x22\\x5C 200 " in lines[0]
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in gw.log().splitlines())


def test_json_access_log_keeps_the_path_in_its_string(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [{"name": "a", "basePath": "/a", "targets": [upstream.url]}],
            "logging": {"json": True},
        }
    )
    resp = get(gw, "/a/x%0A%7B%22level%22:%22forged%22%7D")
    rid = resp.header("X-Request-Id")
    lines = log_lines(gw, rid)
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["path"] == '/a/x\n{"level":"forged"}' and doc["client"] == "127.0.0.1"
    assert not any('"level":"forged"' in line and rid not in line for line in gw.log().splitlines())
