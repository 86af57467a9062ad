"""The forwarding rules, checked through real sockets against a real gunicorn."""

from __future__ import annotations

import gzip
import http.client
import json

import pytest
import requests

from tests.support.raw_client import RawReader, connect

pytestmark = pytest.mark.integration


def svc(name, base, targets, **extra):
    return {"name": name, "basePath": base, "targets": targets, **extra}


@pytest.fixture
def gw(gateway_factory, upstream, upstream_b):
    return gateway_factory(
        {
            "services": [
                svc(
                    "users",
                    "/api/users",
                    [upstream.url],
                    stripBasePath=True,
                    headers={"X-Added": "yes"},
                ),
                svc("api", "/api", [upstream_b.url]),
                svc("keephost", "/keep", [upstream.url], preserveHost=True),
            ]
        }
    )


def raw_request(gw, request_bytes: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(request_bytes)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_longest_prefix_and_segments(gw, upstream, upstream_b):
    assert requests.get(gw.url + "/api/users/42").json()["server"] == "a"
    assert requests.get(gw.url + "/api/usersX").json()["server"] == "b"
    assert requests.get(gw.url + "/api").json()["server"] == "b"
    r = requests.get(gw.url + "/apix/1")
    assert r.status_code == 404
    body = r.json()
    assert body["path"] == "/apix/1" and body["error"] and body["requestId"]


def test_strip_base_path_and_forwarded_prefix(gw):
    seen = requests.get(gw.url + "/api/users/42/x").json()
    assert seen["path"] == "/42/x"
    headers = dict(seen["headers"])
    assert headers["X-Forwarded-Prefix"] == "/api/users"
    assert headers["X-Added"] == "yes"
    unstripped = requests.get(gw.url + "/api/other").json()
    assert unstripped["path"] == "/api/other"
    assert "X-Forwarded-Prefix" not in dict(unstripped["headers"])


def test_query_string_passes_byte_for_byte(gw):
    # http.client sends the target as given (requests would normalise %2f to %2F).
    query = "b=%2F%2f&a=1+2&&flag&x=%E2%82%AC&y=a%3Db&z=%zz"
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", f"/api/users/q%2fx?{query}")
    seen = json.loads(conn.getresponse().read())
    conn.close()
    assert seen["query"] == query
    assert seen["rawPath"] == f"/q%2fx?{query}"


def test_host_and_forwarded_headers(gw, upstream):
    seen = requests.get(gw.url + "/api/users/1", headers={"X-Forwarded-For": "1.2.3.4"}).json()
    h = dict(seen["headers"])
    assert h["Host"] == f"127.0.0.1:{upstream.port}"
    # No server.trustedProxies: the client's X-Forwarded-For is replaced, not appended to.
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["X-Real-IP"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == f"127.0.0.1:{gw.port}"
    kept = requests.get(gw.url + "/keep/1", headers={"Host": "public.example"}).json()
    assert dict(kept["headers"])["Host"] == "public.example"


def test_hop_by_hop_stripped_both_ways(gw):
    r = requests.get(
        gw.url + "/api/users/cookies",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "no",
            "TE": "trailers",
            "Keep-Alive": "timeout=9",
            "Proxy-Authorization": "Basic eA==",
        },
    )
    assert "X-Hop" not in r.headers and "Keep-Alive" not in r.headers
    seen = requests.get(
        gw.url + "/api/users/echo",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "no",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
        },
    ).json()
    names = {k.lower() for k, _ in seen["headers"]}
    assert not names & {"x-private", "te", "proxy-authorization", "keep-alive"}


def test_repeated_set_cookie_preserved(gw):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/api/users/cookies")
    resp = conn.getresponse()
    cookies = [v for k, v in resp.getheaders() if k.lower() == "set-cookie"]
    assert cookies == ["a=1; Path=/", "b=2; Path=/"]
    resp.read()
    conn.close()


def test_gzip_passes_byte_identical(gw):
    r = requests.get(gw.url + "/api/users/gzip", headers={"Accept-Encoding": "gzip"}, stream=True)
    raw = r.raw.read(decode_content=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert raw == gzip.compress(b"hello gzip world " * 100, mtime=0)


def test_request_id_kept_or_generated(gw):
    r = requests.get(gw.url + "/api/users/1", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    assert dict(r.json()["headers"])["X-Request-Id"] == "abc-123"
    r = requests.get(gw.url + "/api/users/1")
    generated = r.headers["X-Request-Id"]
    assert len(generated) == 36 and dict(r.json()["headers"])["X-Request-Id"] == generated
    bad = requests.get(gw.url + "/api/users/1", headers={"X-Request-Id": "x" * 500})
    assert bad.headers["X-Request-Id"] != "x" * 500
    missing = requests.get(gw.url + "/nowhere")
    assert missing.json()["requestId"] == missing.headers["X-Request-Id"]


def test_post_body_and_chunked_upload(gw):
    body = b"0123456789" * 10000
    seen = requests.post(gw.url + "/api/users/up", data=body).json()
    assert seen["bodyBytes"] == len(body)

    def gen():
        for _ in range(50):
            yield b"z" * 5000

    seen = requests.post(gw.url + "/api/users/up", data=gen()).json()
    assert seen["bodyBytes"] == 250000
    assert "chunked" in dict(seen["headers"]).get("Transfer-Encoding", "")


def test_head_keeps_length_without_body(gw):
    # Raw bytes: a HEAD answer followed by any body byte would shift the next answer on
    # the connection, which a client library would hide.
    with connect(gw.port) as sock:
        sock.sendall(
            b"HEAD /api/users/1 HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"GET /api/users/2 HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        reader = RawReader(sock)
        head = reader.read_response(head_only=True)
        assert head.status == 200 and int(head.header("Content-Length")) > 0
        after = reader.read_response()
        assert after.status == 200 and json.loads(after.body)["path"] == "/2"


def test_response_without_length_is_streamed(gw):
    r = requests.get(gw.url + "/api/users/nolength")
    assert r.status_code == 200 and r.content == b"until close"


def test_status_and_no_content_type_added(gw):
    r = requests.get(gw.url + "/api/users/status/204")
    assert r.status_code == 204 and "Content-Type" not in r.headers
    assert requests.get(gw.url + "/api/users/status/418").status_code == 418


def test_dot_segments_refused(gw):
    for target in (b"/api/users/../../admin", b"/api/users/%2e%2e/x", b"/api/./users"):
        request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        out = raw_request(gw, request)
        assert out.startswith(b"HTTP/1.1 400"), target


def test_oversized_header_line_refused_and_worker_survives(gw):
    pid = requests.get(gw.url + "/health").json()["pid"]
    out = raw_request(
        gw, b"GET /api/users/1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    )
    assert out.split(b"\r\n", 1)[0].split()[1] in (b"400", b"431")
    assert requests.get(gw.url + "/health").json()["pid"] == pid


def test_methods_are_forwarded(gw):
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
        r = requests.request(method, gw.url + "/api/users/m", data=b"x")
        assert r.status_code == 200, method
        assert r.json()["method"] == method


def test_errors_are_json(gw):
    r = requests.get(gw.url + "/nothing/here")
    assert r.headers["Content-Type"] == "application/json"
    assert json.loads(r.content)["code"] == "no_route"
