"""Upstream edge cases through a real gateway: raw client in, scripted raw upstream out."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from tests.support.raw_client import RawReader, connect, exchange
from tests.support.raw_upstream import RawUpstream, Reply

pytestmark = pytest.mark.integration


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()


def service(up: RawUpstream, **extra) -> dict:
    svc = {"name": "e", "basePath": "/e", "targets": [up.url]}
    svc.update(extra)
    return {"services": [svc]}


def test_interim_answers_never_reach_the_next_client(gateway_factory):
    first = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + ok(b"for-client-1")
    )
    with RawUpstream([Reply(first), Reply(ok(b"for-client-2"))]) as up:
        gw = gateway_factory(service(up), threads=1)
        one = exchange(gw.port, get("/e/1"))
        two = exchange(gw.port, get("/e/2"))
        assert (one.status, one.body) == (200, b"for-client-1")
        assert one.header("Link") is None
        assert (two.status, two.body) == (200, b"for-client-2")
        assert len(up.connections) == 1  # the second went over the pooled connection


@pytest.mark.parametrize(
    "bad",
    [b"Set-Cookie: a=1\rSet-Cookie: injected=1\r\n", b"X-A: a\x00b\r\n"],
    ids=["bare-CR", "NUL"],
)
def test_control_characters_in_upstream_headers_are_a_502_json_error(gateway_factory, bad):
    head = b"HTTP/1.1 200 OK\r\nSet-Cookie: ok=1\r\n" + bad + b"Content-Length: 2\r\n\r\nhi"
    with RawUpstream([Reply(head)], default=[Reply(ok(b"fine"))]) as up:
        gw = gateway_factory(service(up))
        r = exchange(gw.port, get("/e/x"))
        assert r.status == 502
        assert r.header("Content-Type") == "application/json"
        assert r.all("Set-Cookie") == []
        assert b"upstream_protocol_error" in r.body
        assert r.header("X-Request-Id") and r.header("X-Request-Id").encode() in r.body
        assert up.wait_closed(0)  # not pooled
        assert exchange(gw.port, get("/e/y")).body == b"fine"


def test_different_content_lengths_are_502_not_500(gateway_factory):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\nhiya"
    with RawUpstream([Reply(head)]) as up:
        gw = gateway_factory(service(up))
        r = exchange(gw.port, get("/e/x"))
        assert r.status == 502 and b"upstream_protocol_error" in r.body


def test_length_with_chunked_keeps_the_client_connection_in_step(gateway_factory):
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    with RawUpstream([Reply(answer)], default=[Reply(ok(b"next"))]) as up:
        gw = gateway_factory(service(up))
        with connect(gw.port) as sock:
            reader = RawReader(sock)
            sock.sendall(get("/e/1"))
            first = reader.read_response()
            assert first.header("Content-Length") != "3"
            assert first.body == b"hello world"
            sock.sendall(get("/e/2"))  # same client connection: still in step
            second = reader.read_response()
            assert (second.status, second.body) == (200, b"next")
        assert len(up.connections) == 2  # the suspect upstream connection was not reused


def test_upstream_request_id_is_not_duplicated(gateway_factory):
    with RawUpstream([Reply(ok(b"x", b"X-Request-Id: from-upstream\r\n"))]) as up:
        gw = gateway_factory(service(up))
        r = exchange(gw.port, b"GET /e/x HTTP/1.1\r\nHost: gw\r\nX-Request-Id: abc-123\r\n\r\n")
        assert r.all("X-Request-Id") == ["abc-123"]


def test_gateway_adds_no_user_agent_or_accept_encoding(gateway_factory):
    # nginx and Envoy add neither; a client without them reaches the backend without them.
    with RawUpstream([Reply(ok(b"x")), Reply(ok(b"y"))]) as up:
        gw = gateway_factory(service(up))
        assert exchange(gw.port, b"GET /e/bare HTTP/1.1\r\nHost: gw\r\n\r\n").status == 200
        raw = b"GET /e/ua HTTP/1.1\r\nHost: gw\r\nuser-agent: c/1\r\nACCEPT-ENCODING: br\r\n\r\n"
        assert exchange(gw.port, raw).status == 200
        bare, given = up.requests
        assert bare.headers("User-Agent") == [] and bare.headers("Accept-Encoding") == []
        assert given.headers("User-Agent") == ["c/1"] and given.headers("Accept-Encoding") == ["br"]


def test_early_413_during_a_large_upload_reaches_the_client(gateway_factory):
    refused = (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntoo big"
    )
    with RawUpstream([Reply(refused, read_body=False, then="close")]) as up:
        gw = gateway_factory(service(up))
        r = requests.post(gw.url + "/e/upload", data=b"u" * (10 * 1024 * 1024), timeout=30)
        assert (r.status_code, r.content) == (413, b"too big")


def test_dripping_upstream_cannot_stretch_the_timeout(gateway_factory):
    slow = Reply(ok(b"late", b"X-Pad: " + b"p" * 60 + b"\r\n"), drip=0.05)
    with RawUpstream([slow]) as up:
        gw = gateway_factory(service(up, timeout="1s"))
        started = time.monotonic()
        r = exchange(gw.port, get("/e/x"))
        assert r.status == 504 and b"upstream_timeout" in r.body
        assert time.monotonic() - started < 2.5


def test_static_https_target_with_mesh_material_present(gateway_factory, tmp_path):
    """Mesh mTLS material in use; a static https target is verified by its caFile, gets
    no mesh client certificate, and the mesh service next to it still gets mesh TLS."""
    import ssl

    from tests.doubles.pki import CertificateAuthority, consul_service_uri

    mesh = CertificateAuthority()
    public = CertificateAuthority(trust_domain="public.example", common_name="Public Root")
    ours = mesh.issue(uri=consul_service_uri(mesh.trust_domain, "odin-gateway"))
    cert, key = ours.write(tmp_path / "ours")
    mesh_ca = mesh.write_ca(tmp_path / "mesh-ca.pem")
    public_ca = public.write_ca(tmp_path / "public-ca.pem")
    server_cert, server_key = public.issue(dns_names=["localhost"]).write(tmp_path / "srv")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(server_cert), str(server_key))
    ctx.load_verify_locations(str(mesh_ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # a client certificate, if sent, is recorded
    with RawUpstream([Reply(ok(b"public"))], tls=ctx) as up:
        services = [
            {"name": "pub", "basePath": "/pub", "targets": [up.url], "caFile": str(public_ca)}
        ]
        # Mesh TLS from files, no discovery: every route serves its static targets.
        cfg = {
            "services": services,
            "serviceMesh": {
                "enabled": True,
                "type": "none",
                "mtlsEnabled": True,
                "trustDomain": mesh.trust_domain,
                "certFile": str(cert),
                "keyFile": str(key),
                "caFile": str(mesh_ca),
            },
        }
        gw = gateway_factory(cfg)
        assert gw.admin("mesh").json()["certificate"]["spiffeId"]  # material in use
        r = requests.get(gw.url + "/pub/x", timeout=10)
        assert (r.status_code, r.content) == (200, b"public"), r.text
        assert up.connections[0].peer_cert in (None, {})  # not shown our certificate


def test_a_trickling_body_reaches_the_client_as_it_arrives(gateway_factory):
    # Larger than the small-body buffer, so it is streamed; its first bytes must not wait
    # for a full read buffer (64 KiB) when the upstream pauses, as an event stream does.
    total, first = 200_000, b"data: first event\n\n"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    pause = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (total, first))
            pause.wait(5)  # the rest only once the client has seen the first event
            conn.sendall(b"x" * (total - len(first)))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        gw = gateway_factory(
            {
                "services": [
                    {
                        "name": "e",
                        "basePath": "/e",
                        "targets": [f"http://127.0.0.1:{listener.getsockname()[1]}"],
                    }
                ]
            }
        )
        with connect(gw.port) as sock:
            sock.sendall(get("/e/events"))
            reader = RawReader(sock, deadline=3)
            resp = reader.read_head()
            assert resp.status == 200 and resp.header("Content-Length") == str(total)
            started = time.monotonic()
            while first not in reader.buf and time.monotonic() - started < 3:
                reader._fill(started + 3)
            assert reader.buf.startswith(first), "the first event was held back"
            pause.set()
            got = len(reader.buf)
            while got < total and time.monotonic() - started < 10:
                reader._fill(started + 10)
                got = len(reader.buf)
            assert got == total
    finally:
        pause.set()
        server.join(timeout=5)
        listener.close()
