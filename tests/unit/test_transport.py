"""The transport module: the private library behaviour it relies on, pinned; pools and TLS.

``odin_gw.proxy.transport`` is the one place that touches private parts of urllib3,
http.client, socket and werkzeug. Each ``test_pin_*`` states one such behaviour, so an
upgrade that changes it fails here, by name, and nowhere else.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from pathlib import Path

import pytest
import requests
from urllib3 import HTTPConnectionPool, HTTPResponse
from urllib3.exceptions import ClosedPoolError
from werkzeug.datastructures import Headers

from odin_gw.mesh.identity import PeerIdentityError
from odin_gw.mesh.snapshot import Endpoint
from odin_gw.mesh.tls import TlsMaterial
from odin_gw.proxy.forwarder import ProxyResponse
from odin_gw.proxy.transport import (
    ConnectFailed,
    HeadTimeout,
    MeshAdapter,
    MeshHTTPSConnection,
    UpstreamHTTPConnection,
    UpstreamHTTPSConnection,
    UpstreamSession,
    _FinalResponse,
    _TimedReader,
    open_response,
    relay_headers,
    release,
)
from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.support.raw_upstream import RawUpstream, Reply


def ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def exchange(session, endpoint, *, deadline=5.0, timeout=5.0, method="GET", body=None):
    return open_response(
        session,
        endpoint,
        method,
        "/x",
        body,
        {"Host": endpoint.host_header},
        False,
        time.monotonic() + deadline,
        timeout,
        2.0,
        timeout,
    )


@pytest.fixture
def session():
    s = UpstreamSession(pool_size=4)
    yield s
    s.close()


# -- pinned behaviour of the libraries ------------------------------------------------------


def test_pin_urllib3_pool_hands_out_and_takes_back_connections():
    pool = HTTPConnectionPool("127.0.0.1", 9, maxsize=2, block=False)
    pool.ConnectionCls = UpstreamHTTPConnection
    conn = pool._get_conn()
    assert isinstance(conn, UpstreamHTTPConnection) and conn.sock is None
    pool._put_conn(conn)
    assert pool._get_conn() is conn  # what was put back comes out again
    pool.close()
    with pytest.raises(ClosedPoolError):
        pool._get_conn()
    pool._put_conn(conn)  # into a closed pool: closed, no error


def test_pin_urllib3_response_without_pool_never_puts_its_connection_back():
    conn = object()
    response = HTTPResponse(body=b"", preload_content=False, connection=conn)
    assert response.connection is conn and response._connection is conn
    response.release_conn()  # no _pool: nothing happens
    assert response._connection is conn


def test_pin_http_client_builds_the_answer_through_the_connections_response_class():
    with RawUpstream([Reply(ok(b"pinned"))]) as up:
        conn = UpstreamHTTPConnection("127.0.0.1", up.port, timeout=5)
        conn.head_deadline = time.monotonic() + 5
        conn.request("GET", "/", preload_content=False)
        response = conn.getresponse()
        assert isinstance(conn.answer, _FinalResponse)
        assert isinstance(conn.reader, _TimedReader)
        assert response.read() == b"pinned"
        conn.close()


def test_pin_http_client_internals_the_head_parser_uses():
    assert isinstance(http.client._MAXLINE, int) and isinstance(http.client._MAXHEADERS, int)
    assert callable(http.client.HTTPResponse._read_status)
    assert callable(http.client.HTTPResponse._check_close)
    assert callable(http.client.parse_headers)


def test_pin_socket_makefile_counts_io_refs_and_socketio_keeps_its_socket():
    a, b = socket.socketpair()
    with a, b:
        before = a._io_refs
        f = a.makefile("rb")
        assert a._io_refs == before + 1
        f.close()
        assert a._io_refs == before
        reader = _TimedReader(a, time.monotonic() + 1)
        assert reader._sock is a and a._io_refs == before + 1
        a.close()  # the fd stays open while the reader holds it, as with makefile()
        b.sendall(b"x")
        buf = bytearray(1)
        assert reader.readinto(buf) == 1
        reader.close()
        assert a.fileno() == -1


def test_pin_urllib3_sets_its_alpn_at_every_handshake():
    """Why TlsMaterial's context keeps its own ALPN (``_MeshContext``)."""
    from urllib3.util import ssl_ as urllib3_ssl

    asked = []

    class Recording(ssl.SSLContext):
        def set_alpn_protocols(self, protocols):
            asked.append(list(protocols))
            super().set_alpn_protocols(protocols)

    ctx = Recording(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    a, b = socket.socketpair()
    try:
        a.settimeout(0.2)
        with pytest.raises((ssl.SSLError, OSError)):
            urllib3_ssl.ssl_wrap_socket(a, ssl_context=ctx, server_hostname="x")  # no server
    finally:
        a.close()
        b.close()
    assert asked == [["http/1.1"]]


def test_pin_werkzeug_headers_list_is_what_the_wsgi_response_sends():
    items = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Odd", "keep  spacing")]
    headers = Headers()
    relay_headers(headers, items)
    assert headers._list is items
    response = ProxyResponse.relay([b"body"], 200, items)
    sent = {}

    def start_response(status, header_list, exc_info=None):
        sent["status"], sent["headers"] = status, header_list

    body = b"".join(response({"REQUEST_METHOD": "GET"}, start_response))
    assert body == b"body" and sent["status"].startswith("200")
    assert sent["headers"] == items


# -- the answer head ------------------------------------------------------------------------


def test_head_deadline_holds_against_a_dripping_upstream(session):
    with RawUpstream([Reply(ok(b"x" * 50), drip=0.05)]) as up:
        endpoint = Endpoint("127.0.0.1", up.port)
        started = time.monotonic()
        with pytest.raises(HeadTimeout):
            exchange(session, endpoint, deadline=0.4)
        assert 0.3 < time.monotonic() - started < 1.2
        assert up.wait_closed(0)


def test_answer_read_to_its_end_goes_back_to_the_pool(session):
    with RawUpstream([Reply(ok(b"one")), Reply(ok(b"two"))]) as up:
        endpoint = Endpoint("127.0.0.1", up.port)
        for expected in (b"one", b"two"):
            response = exchange(session, endpoint)
            assert response.read(decode_content=False) == expected
            release(response)
            release(response)  # twice is harmless
        assert len(up.connections) == 1


def test_answer_abandoned_halfway_closes_its_connection(session):
    body = b"y" * 100_000
    with RawUpstream([Reply(ok(body))], default=[Reply(ok(b"fresh"))]) as up:
        endpoint = Endpoint("127.0.0.1", up.port)
        response = exchange(session, endpoint)
        assert response.read(10, decode_content=False) == b"y" * 10
        release(response)
        assert up.wait_closed(0)
        response = exchange(session, endpoint)
        assert response.read(decode_content=False) == b"fresh"
        release(response)


def test_head_and_204_answers_complete_without_reading(session):
    no_body = b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"
    with RawUpstream([Reply(no_body), Reply(ok(b"after"))]) as up:
        endpoint = Endpoint("127.0.0.1", up.port)
        response = exchange(session, endpoint)
        assert response.status == 204
        assert response.read(decode_content=False) == b""
        release(response)
        response = exchange(session, endpoint)
        assert response.read(decode_content=False) == b"after"
        release(response)
        assert len(up.connections) == 1


# -- sessions, pools and TLS ------------------------------------------------------------------


def test_session_mounts_one_adapter_and_refuses_session_request(session):
    assert session.get_adapter("http://x") is session.adapter
    assert session.get_adapter("https://x") is session.adapter
    with pytest.raises(NotImplementedError):
        session.get("http://127.0.0.1:9/")


def test_pools_are_keyed_by_what_makes_a_connection_different(session):
    adapter = session.adapter
    plain = Endpoint("10.0.0.1", 443, scheme="https")
    static = Endpoint("10.0.0.1", 443, scheme="https", static=True)
    static_ca = Endpoint("10.0.0.1", 443, scheme="https", static=True, ca_file="/ca.pem")
    assert plain.key == static.key == static_ca.key  # one target, as logs show it
    assert len({plain.pool_key, static.pool_key, static_ca.pool_key}) == 3
    assert adapter.pool_for(static) is adapter.pool_for(
        Endpoint("10.0.0.1", 443, scheme="https", static=True)
    )
    adapter.retain({"https://10.0.0.1:443"})
    assert adapter._pools
    adapter.retain(set())
    assert not adapter._pools


def test_closed_adapter_refuses_new_pools():
    adapter = MeshAdapter(None, 2)
    adapter.close()
    with pytest.raises(ClosedPoolError):
        adapter.pool_for(Endpoint("127.0.0.1", 80))


@pytest.fixture
def pki(tmp_path):
    """A mesh CA with our workload certificate, and an unrelated 'public' CA."""
    mesh = CertificateAuthority()
    public = CertificateAuthority(trust_domain="public.example", common_name="Public Root")
    ours = mesh.issue(uri=consul_service_uri(mesh.trust_domain, "odin-gateway"))
    material = TlsMaterial(
        ours.chain_pem, ours.key_pem, mesh.root_pem, source="test", trust_domain=mesh.trust_domain
    )
    public_ca = public.write_ca(tmp_path / "public-ca.pem")
    mesh_ca = mesh.write_ca(tmp_path / "mesh-ca.pem")

    def server(ca, name, **issue) -> ssl.SSLContext:
        cert, key = ca.issue(**issue).write(tmp_path / name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        # Ask for a client certificate (optional), so one that is sent gets recorded.
        ctx.load_verify_locations(str(mesh_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    return mesh, public, material, str(public_ca), server


def test_static_https_target_is_verified_by_its_ca_file_and_never_sees_the_mesh_cert(pki):
    _mesh, public, material, public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)
    try:
        with RawUpstream([Reply(ok(b"public"))], tls=server(public, "pub")) as up:
            target = Endpoint("127.0.0.1", up.port, scheme="https", static=True, ca_file=public_ca)
            response = exchange(session, target)
            assert response.read(decode_content=False) == b"public"
            release(response)
            assert up.connections[0].peer_cert in (None, {})  # no client certificate shown
            pool = session.adapter.pool_for(target)
            assert pool.ConnectionCls is UpstreamHTTPSConnection
    finally:
        session.close()


def test_static_https_target_checks_the_hostname(pki):
    _mesh, public, material, public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)
    ctx = server(public, "other", dns_names=["other.example"], ips=())
    try:
        with RawUpstream([Reply(ok())], tls=ctx) as up:
            target = Endpoint("127.0.0.1", up.port, scheme="https", static=True, ca_file=public_ca)
            with pytest.raises(ConnectFailed) as info:
                exchange(session, target)
            assert "mismatch" in str(info.value)
    finally:
        session.close()


def test_static_https_target_without_ca_file_uses_the_system_cas(pki):
    _mesh, public, material, _public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)
    try:
        with RawUpstream([Reply(ok())], tls=server(public, "pub2")) as up:
            target = Endpoint("127.0.0.1", up.port, scheme="https", static=True)
            with pytest.raises(ConnectFailed) as info:
                exchange(session, target)
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    finally:
        session.close()


def test_mesh_endpoint_gets_mesh_tls_and_presents_the_gateway_identity(pki):
    mesh, _public, material, _public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)
    web = consul_service_uri(mesh.trust_domain, "web")
    try:
        with RawUpstream([Reply(ok(b"meshed"))], tls=server(mesh, "web", uri=web)) as up:
            endpoint = Endpoint("127.0.0.1", up.port, scheme="https", identity=web)
            response = exchange(session, endpoint)
            assert response.read(decode_content=False) == b"meshed"
            release(response)
            assert session.adapter.pool_for(endpoint).ConnectionCls is MeshHTTPSConnection
            sans = dict(up.connections[0].peer_cert["subjectAltName"])
            assert sans["URI"] == consul_service_uri(mesh.trust_domain, "odin-gateway")
    finally:
        session.close()


def _istio_server(mesh, tmp_name, server, uri, seen):
    """A sidecar-like TLS server: records the SNI and ALPN the client offered."""
    ctx = server(mesh, tmp_name, uri=uri)
    ctx.set_alpn_protocols(["istio-http/1.1", "http/1.1"])

    def note_sni(sock, name, _ctx):
        seen["sni"] = name

    ctx.sni_callback = note_sni
    return ctx


def test_istio_endpoint_sends_sni_and_alpn_and_accepts_any_listed_san(pki):
    mesh, _public, material, _public_ca, server = pki
    istio = TlsMaterial(
        material.cert_pem,
        material.key_pem,
        material.ca_pem,
        source="test",
        trust_domain=mesh.trust_domain,
        alpn=("istio-http/1.1",),
    )
    session = UpstreamSession(pool_size=2, material=istio)
    td = mesh.trust_domain
    reviews = f"spiffe://{td}/ns/shop/sa/reviews-v2"
    seen: dict = {}
    sni = "outbound_.9080_._.reviews.shop.svc.cluster.local"
    try:
        ctx = _istio_server(mesh, "rv", server, reviews, seen)
        with RawUpstream([Reply(ok(b"istio"))], tls=ctx) as up:
            endpoint = Endpoint(
                "127.0.0.1",
                up.port,
                scheme="https",
                sni=sni,
                identities=(f"spiffe://{td}/ns/shop/sa/reviews-v1", reviews),
            )
            response = exchange(session, endpoint)
            assert response.read(decode_content=False) == b"istio"
            release(response)
            assert seen["sni"] == sni
            assert up.connections[0].alpn == "istio-http/1.1"
    finally:
        session.close()


def test_istio_endpoint_outside_the_listed_sans_is_refused_before_sending(pki):
    mesh, _public, material, _public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)
    td = mesh.trust_domain
    try:
        ctx = server(mesh, "ev", uri=f"spiffe://{td}/ns/shop/sa/evil")
        with RawUpstream([Reply(ok())], tls=ctx) as up:
            listed = (f"spiffe://{td}/ns/shop/sa/a", f"spiffe://{td}/ns/shop/sa/b")
            endpoint = Endpoint("127.0.0.1", up.port, scheme="https", identities=listed)
            with pytest.raises(ConnectFailed) as info:
                exchange(session, endpoint)
            assert isinstance(info.value.__cause__, PeerIdentityError)
            assert "expected one of " + ", ".join(listed) in str(info.value)
            assert f"presented spiffe://{td}/ns/shop/sa/evil" in str(info.value)
            assert all(c.requests == [] for c in up.connections)  # nothing was sent
    finally:
        session.close()


def test_new_material_mounts_a_new_adapter_and_closes_the_old(pki):
    _mesh, _public, material, _public_ca, _server = pki
    session = UpstreamSession(pool_size=2)
    old = session.adapter
    session.use_material(material)
    assert session.adapter is not old and session.adapter.material is material
    assert old.closed
    assert isinstance(session, requests.Session)
    session.close()


# -- send_head: urllib3's request() without its per-header cost ------------------------


def _connection_on_a_socketpair():
    ours, theirs = socket.socketpair()
    conn = UpstreamHTTPConnection("127.0.0.1", 9)
    conn.sock = ours
    conn.timeout = 5
    theirs.settimeout(5)
    return conn, theirs


def _wire(theirs, at_least: int) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got or len(got) < at_least:
        got += theirs.recv(65536)
    return got


def test_pin_send_head_puts_the_same_request_on_the_wire_as_urllib3():
    from urllib3.util import SKIP_HEADER

    from odin_gw.proxy.headers import OutboundHeaders
    from odin_gw.proxy.transport import send_head

    headers = OutboundHeaders()
    for name, value in (("Host", "svc:80"), ("X-A", "1\t2"), ("Content-Length", "3")):
        headers[name] = value
    fast, fast_peer = _connection_on_a_socketpair()
    send_head(fast, "POST", "/p?q=%20", headers, b"abc")
    slow, slow_peer = _connection_on_a_socketpair()
    skipped = dict(headers, **{"User-Agent": SKIP_HEADER, "Accept-Encoding": SKIP_HEADER})
    slow.request("POST", "/p?q=%20", body=b"abc", headers=skipped, preload_content=False)
    sent = _wire(fast_peer, 0)
    assert sent == _wire(slow_peer, 0)
    assert sent.startswith(b"POST /p?q=%20 HTTP/1.1\r\nHost: svc:80\r\nX-A: 1\t2\r\n")
    assert sent.endswith(b"\r\n\r\nabc")
    # http.client and urllib3 are ready for the answer, as after request().
    fast_peer.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    answer = fast.getresponse()
    assert answer.status == 201 and answer.read() == b"ok"
    for sock in (fast_peer, slow_peer, fast.sock, slow.sock):
        sock.close()


@pytest.mark.parametrize(
    ("method", "length"),
    [
        ("POST", b"Content-Length: 0"),
        ("PATCH", b"Content-Length: 0"),
        ("GET", None),
        ("DELETE", None),
    ],
)
def test_send_head_gives_a_length_to_bodiless_methods_that_expect_one(method, length):
    from odin_gw.proxy.headers import OutboundHeaders
    from odin_gw.proxy.transport import send_head

    conn, peer = _connection_on_a_socketpair()
    headers = OutboundHeaders()
    headers["Host"] = "h"
    send_head(conn, method, "/", headers, None)
    sent = _wire(peer, 0)
    assert (b"Content-Length" in sent) is (length is not None)
    if length:
        assert length in sent
    assert b"User-Agent" not in sent and b"Accept-Encoding" not in sent
    peer.close()
    conn.sock.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "a\r\nInjected: 1"),
        ("X-A", "a\nb"),
        ("X-A", "a\rb"),
        ("X-A", "a\x00b"),
        ("X-B\r\nX-C", "v"),
        ("X-A", "\x7f"),
    ],
)
def test_send_head_refuses_line_breaks_and_control_characters(name, value):
    from odin_gw.proxy.headers import OutboundHeaders
    from odin_gw.proxy.transport import send_head

    conn, peer = _connection_on_a_socketpair()
    headers = OutboundHeaders()
    headers["Host"] = "h"
    headers[name] = value
    with pytest.raises(ValueError, match="control character"):
        send_head(conn, "GET", "/", headers, None)
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.recv(1)  # nothing was sent
    peer.close()
    conn.sock.close()


def test_a_peer_refusing_our_certificate_after_the_handshake_is_a_connect_failure(pki):
    """TLS 1.3: our side of the handshake completes before the peer checks our certificate;
    its refusal meets the first write or read. That is a TLS failure before any request
    reached the application (retryable like a refused connection), not a reset after
    sending and never an unexpected error."""
    mesh, public, material, _public_ca, _server = pki
    web = consul_service_uri(mesh.trust_domain, "web")
    strict = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = mesh.issue(uri=web).write(Path(_public_ca).parent / "strict")
    strict.load_cert_chain(str(cert), str(key))
    strict.load_verify_locations(cadata=public.root_pem)  # trusts the public CA only:
    strict.verify_mode = ssl.CERT_REQUIRED  # our mesh certificate is refused
    session = UpstreamSession(pool_size=2, material=material)
    try:
        with RawUpstream([Reply(ok())], tls=strict) as up:
            endpoint = Endpoint("127.0.0.1", up.port, scheme="https", identity=web)
            with pytest.raises(ConnectFailed) as info:
                exchange(session, endpoint)
            assert "TLS session" in str(info.value)
            assert isinstance(info.value.__cause__, ssl.SSLError)
    finally:
        session.close()


def _refused(session, endpoint) -> PeerIdentityError:
    with pytest.raises(ConnectFailed) as info:
        exchange(session, endpoint)
    cause = info.value.__cause__
    assert isinstance(cause, PeerIdentityError), cause
    return cause


def test_mesh_peer_with_another_exact_identity_is_refused_before_sending(pki):
    mesh, _public, material, _public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)
    web, db = (consul_service_uri(mesh.trust_domain, n) for n in ("web", "db"))
    try:
        with RawUpstream([Reply(ok())], tls=server(mesh, "db", uri=db)) as up:
            cause = _refused(session, Endpoint("127.0.0.1", up.port, scheme="https", identity=web))
            assert (cause.expected, cause.presented) == (web, (db,))
            assert f"expected {web}, peer presented {db}" in str(cause)
            assert all(c.requests == [] for c in up.connections)
    finally:
        session.close()


def test_listed_identities_are_checked_without_a_trust_domain(pki):
    mesh, _public, material, _public_ca, server = pki
    bare = TlsMaterial(material.cert_pem, material.key_pem, material.ca_pem, source="test")
    session = UpstreamSession(pool_size=2, material=bare)  # no trustDomain configured
    web, db = (consul_service_uri(mesh.trust_domain, n) for n in ("web", "db"))
    try:
        with RawUpstream([Reply(ok())], tls=server(mesh, "db2", uri=db)) as up:
            endpoint = Endpoint("127.0.0.1", up.port, scheme="https", identities=(web,))
            cause = _refused(session, endpoint)
            assert (cause.expected, cause.presented) == (web, (db,))
    finally:
        session.close()


def test_a_peer_outside_the_trust_domain_is_refused(pki):
    mesh, _public, material, _public_ca, server = pki
    session = UpstreamSession(pool_size=2, material=material)  # trustDomain of the mesh CA
    stranger = "spiffe://other.example/ns/default/sa/web"
    try:
        with RawUpstream([Reply(ok())], tls=server(mesh, "st", uri=stranger)) as up:
            cause = _refused(session, Endpoint("127.0.0.1", up.port, scheme="https"))
            assert cause.expected == f"an identity in spiffe://{mesh.trust_domain}/"
            assert cause.presented == (stranger,)
    finally:
        session.close()


def test_pin_http_message_reads_the_headers_list_the_fast_parse_fills():
    import http.client

    msg = http.client.HTTPMessage()
    msg._headers.append(("Content-Length", "5"))
    msg._headers.append(("set-cookie", "a=1"))
    msg._headers.append(("Set-Cookie", "b=2"))
    assert msg.get("content-length") == "5"
    assert msg.get_all("SET-COOKIE") == ["a=1", "b=2"]
    assert msg.items()[:2] == [("Content-Length", "5"), ("set-cookie", "a=1")]
    del msg["set-cookie"]
    assert msg.get_all("Set-Cookie") is None
    assert (http.client._MAXLINE, http.client._MAXHEADERS) == (65536, 100)
