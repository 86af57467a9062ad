"""WebSocket and other HTTP/1.1 Upgrade tunnels through a real gateway.

Backends: a ``websockets`` echo server (the maintained library's sync server, in a
thread), a raw-socket server speaking a made-up ``echo`` protocol after its ``101``,
scripted raw upstreams for malformed answers, and the JSON echoing HTTP upstream.
Clients: ``websockets.sync.client`` and raw sockets. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve

from odin_gw.proxy.tunnel import CHUNK, Relay
from tests.doubles.consul import ConsulDouble
from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.integration.consul_helpers import consul_config, eventually
from tests.support.gateway import GatewayProcess
from tests.support.raw_client import RawReader, echoed_get
from tests.support.raw_client import connect as raw_connect
from tests.support.raw_upstream import RawUpstream, Reply
from tests.support.upstream import Upstream, mtls_server_context

pytestmark = pytest.mark.integration

IO = 10.0  # seconds: every client read and handshake


class EchoBackend:
    """A ``websockets`` server: ``/echo*`` echoes, ``/close`` says "bye" and closes with
    1000 "done", ``/record`` waits for the client's close and records its code,
    ``/refuse*`` answers 403 before any handshake. Records each request's headers."""

    def __init__(self, tls=None) -> None:
        self.requests: list[dict[str, str]] = []
        self.peer_uris: list[list[str]] = []
        self.closes: queue.Queue = queue.Queue()
        self._server = serve(
            self._handle,
            "127.0.0.1",
            0,
            ssl=tls,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            ping_interval=None,
        )
        self.port = self._server.socket.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _process_request(self, connection, request):
        self.requests.append({k.lower(): v for k, v in request.headers.raw_items()})
        peer = (
            connection.socket.getpeercert() if hasattr(connection.socket, "getpeercert") else None
        )
        self.peer_uris.append([v for k, v in (peer or {}).get("subjectAltName", ()) if k == "URI"])
        if request.path.startswith("/refuse"):
            return connection.respond(403, "no entry\n")
        return None

    def _handle(self, ws) -> None:
        path = ws.request.path
        if path.startswith("/close"):
            ws.send("bye")
            ws.close(1000, "done")
        elif path.startswith("/record"):
            try:
                for _ in ws:
                    pass
            except ConnectionClosed:
                pass
            self.closes.put((ws.close_code, ws.close_reason))
        else:
            for message in ws:
                ws.send(message)

    def __enter__(self) -> EchoBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)


class UpgradeEcho:
    """A raw server for ``Upgrade: echo``: answers 101, echoes every byte, and on the
    client's end of stream sends ``bye`` and closes. Records the request heads."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(IO)
        with sock:
            try:
                buf = b""
                while b"\r\n\r\n" not in buf and len(buf) < 65536:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, rest = buf.split(b"\r\n\r\n", 1)
                self.heads.append(head)
                sock.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                    b"Connection: Upgrade\r\nX-Backend: raw\r\n\r\n" + rest
                )
                for _ in range(100_000):
                    data = sock.recv(65536)
                    if not data:
                        break
                    sock.sendall(data)
                sock.sendall(b"bye")
            except OSError:
                pass

    def __enter__(self) -> UpgradeEcho:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


def service(name: str, url: str, **extra) -> dict:
    return {"name": name, "basePath": f"/{name}", "targets": [url], "stripBasePath": True, **extra}


@pytest.fixture(scope="module")
def backends():
    no_upgrade = RawUpstream(
        [Reply(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n", then="close")]
    )
    other = RawUpstream(
        [
            Reply(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                then="close",
            )
        ]
    )
    with (
        EchoBackend() as ws,
        UpgradeEcho() as raw,
        Upstream("http") as http,
        no_upgrade,
        other,
    ):
        yield {"ws": ws, "raw": raw, "http": http, "no_upgrade": no_upgrade, "other": other}


@pytest.fixture(scope="module")
def gw(backends):
    ws = backends["ws"].url
    config = {
        "server": {"maxTunnels": 4},
        "services": [
            service("ws", ws, upgrades=["websocket"]),
            service("idle", ws, upgrades=["WebSocket"], tunnelIdleTimeout="1s"),
            service("raw", backends["raw"].url, upgrades=["echo"]),
            service("plain", backends["http"].url),
            service("mixed", backends["http"].url, upgrades=["websocket"]),
            service("noupgrade", backends["no_upgrade"].url, upgrades=["websocket"]),
            service("other", backends["other"].url, upgrades=["websocket"]),
        ],
    }
    with GatewayProcess(config, workers=1, threads=8) as gateway:
        yield gateway


def ws_url(gw: GatewayProcess, path: str) -> str:
    return f"ws://127.0.0.1:{gw.port}{path}"


def open_ws(gw: GatewayProcess, path: str, **kwargs):
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", IO)
    kwargs.setdefault("ping_interval", None)
    return connect(ws_url(gw, path), **kwargs)


def handshake(path: str, protocol: str = "websocket", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: {protocol}\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")


def log_has(gw: GatewayProcess, text: str, timeout: float = 5.0) -> None:
    eventually(lambda: text in gw.log(), timeout=timeout, what=f"log line {text!r}")


# -- the proof: echo of a 10 MB message and of 1,000 small ones ------------------------------


def test_echo_of_10_mb_and_1000_small_messages(gw, backends):
    big = os.urandom(10 * 1024 * 1024)
    small = [f"message {i}".encode() for i in range(1000)]
    started = time.monotonic()
    with open_ws(gw, "/ws/echo?x=1", additional_headers={"X-Request-Id": "ws-echo-1"}) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["X-Request-Id"] == "ws-echo-1"
        ws.send(big)
        assert ws.recv(timeout=60) == big
        for message in small:  # all sent before any is read: the relay buffers and paces
            ws.send(message)
        assert [ws.recv(timeout=IO) for _ in small] == small
    elapsed = time.monotonic() - started
    seen = backends["ws"].requests[-1]
    assert seen["upgrade"] == "websocket" and "upgrade" in seen["connection"].lower()
    assert seen["sec-websocket-key"] and seen["sec-websocket-version"] == "13"
    assert seen["x-request-id"] == "ws-echo-1" and seen["x-forwarded-for"] == "127.0.0.1"
    log_has(gw, "ws-echo-1 GET /ws/echo 101")  # the access log sees the tunnel
    closed = re.search(
        r"tunnel to \S+ closed: (\w+ closed); (\d+) bytes to upstream, (\d+) to client, "
        r"[0-9.]+s \(request ws-echo-1\)",
        gw.log(),
    )
    assert closed is not None, gw.log()[-2000:]
    payload = len(big) + sum(map(len, small))  # frames add their headers to it
    assert int(closed.group(2)) > payload and int(closed.group(3)) > payload
    assert elapsed < 60


def test_custom_protocol_pipelined_bytes_and_half_close(gw, backends):
    """Bytes the client sent right behind its head reach the backend; each side's end of
    stream is passed on (half-close) and the other direction keeps flowing."""
    with raw_connect(gw.port, timeout=IO) as sock:
        sock.sendall(handshake("/raw/x", "echo") + b"early bytes;")
        reader = RawReader(sock, IO)
        head = reader.read_head()
        assert head.status == 101
        assert head.header("Upgrade") == "echo" and head.header("Connection") == "Upgrade"
        assert head.header("X-Backend") == "raw" and head.header("X-Request-Id")
        got = reader.buf
        while len(got) < len(b"early bytes;"):
            got += sock.recv(100)
        assert got == b"early bytes;"
        sock.sendall(b"later")
        assert sock.recv(100) == b"later"
        sock.shutdown(socket.SHUT_WR)  # client done sending; it still reads
        rest = b""
        while True:
            data = sock.recv(100)
            if not data:
                break
            rest += data
        assert rest == b"bye"  # sent by the backend after it saw our end of stream
    head = backends["raw"].heads[-1]
    assert head.startswith(b"GET /x HTTP/1.1\r\n")
    assert b"\r\nUpgrade: echo" in head and b"\r\nConnection: Upgrade" in head


# -- closing -------------------------------------------------------------------------------


def test_idle_tunnel_is_closed(gw):
    with open_ws(gw, "/idle/echo") as ws:
        ws.send("one")
        assert ws.recv(timeout=IO) == "one"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=IO)
        waited = time.monotonic() - started
    assert 0.9 <= waited < 5, waited
    log_has(gw, "closed: idle timeout")


def test_backend_close_reaches_the_client(gw):
    with open_ws(gw, "/ws/close") as ws:
        assert ws.recv(timeout=IO) == "bye"
        with pytest.raises(ConnectionClosedOK) as closed:
            ws.recv(timeout=IO)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "done")


def test_client_close_reaches_the_backend(gw, backends):
    with open_ws(gw, "/ws/record") as ws:
        ws.send("hello")
        ws.close(4001, "client done")
    assert backends["ws"].closes.get(timeout=IO) == (4001, "client done")


# -- what is not tunnelled ---------------------------------------------------------------------


def test_route_without_upgrades_does_not_tunnel(gw):
    resp, seen = echoed_get(
        gw.port, "Upgrade: websocket", "Sec-WebSocket-Version: 13", path="/plain/x"
    )
    assert resp.status == 200
    assert "upgrade" not in seen and seen.get("connection", "").lower() != "upgrade"
    with pytest.raises(InvalidStatus) as refused:
        open_ws(gw, "/plain/x")
    assert refused.value.response.status_code == 200


def test_h2c_is_never_tunnelled(gw):
    raw = (
        b"GET /mixed/x HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    with raw_connect(gw.port, timeout=IO) as sock:
        sock.sendall(raw)
        answer = RawReader(sock, IO).read_response()
    assert answer.status == 200  # served as HTTP/1.1, forwarded as any request
    seen = {name.lower() for name, _ in json.loads(answer.body)["headers"]}
    assert not seen & {"upgrade", "connection", "http2-settings"}


def test_refused_upgrade_is_relayed_and_the_connection_closed(gw):
    with pytest.raises(InvalidStatus) as refused:
        open_ws(gw, "/ws/refuse")
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"no entry\n"
    with raw_connect(gw.port, timeout=IO) as sock:
        sock.sendall(handshake("/ws/refuse"))
        reader = RawReader(sock, IO)
        answer = reader.read_response()
        assert answer.status == 403 and answer.body == b"no entry\n"
        assert answer.header("Connection") == "close" and answer.header("X-Request-Id")
        assert reader.closed(wait=5)


def test_upgrade_with_a_body_is_refused(gw, backends):
    before = len(backends["ws"].requests)
    raw = handshake("/ws/echo", extra="Content-Length: 5\r\n").replace(b"GET", b"POST", 1)
    with raw_connect(gw.port, timeout=IO) as sock:
        sock.sendall(raw + b"hello")
        answer = RawReader(sock, IO).read_response()
    assert answer.status == 400 and b"must not carry a body" in answer.body
    assert len(backends["ws"].requests) == before  # nothing went upstream


def test_101_without_upgrade_is_a_bad_gateway(gw, backends):
    with raw_connect(gw.port, timeout=IO) as sock:
        sock.sendall(handshake("/noupgrade/x"))
        answer = RawReader(sock, IO).read_response()
    assert answer.status == 502 and b'"upstream_protocol_error"' in answer.body
    assert b"without an Upgrade header" in answer.body
    assert backends["no_upgrade"].requests[-1].header("Upgrade") == "websocket"


def test_101_to_a_protocol_not_offered_is_a_bad_gateway(gw):
    with raw_connect(gw.port, timeout=IO) as sock:
        sock.sendall(handshake("/other/x"))
        answer = RawReader(sock, IO).read_response()
    assert answer.status == 502 and b"did not offer" in answer.body


# -- the cap, and ordinary requests beside open tunnels ------------------------------------


def test_tunnel_cap_and_plain_requests_while_tunnels_are_open(backends):
    config = {
        "server": {"maxTunnels": 2},
        "services": [
            service("ws", backends["ws"].url, upgrades=["websocket"]),
            service("plain", backends["http"].url),
        ],
    }
    with GatewayProcess(config, workers=1, threads=4) as gw, contextlib.ExitStack() as stack:
        first = stack.enter_context(open_ws(gw, "/ws/echo"))
        second = stack.enter_context(open_ws(gw, "/ws/echo"))
        with pytest.raises(InvalidStatus) as full:
            open_ws(gw, "/ws/echo")
        answer = full.value.response
        assert answer.status_code == 503 and b'"code":"tunnel_limit"' in answer.body
        # Two threads of four are tunnels: ordinary requests still come through, one
        # after another and two at a time.
        with requests.Session() as session:
            for i in range(50):
                assert session.get(f"{gw.url}/plain/{i}", timeout=IO).status_code == 200
        with ThreadPoolExecutor(2) as pool:
            codes = list(
                pool.map(
                    lambda i: requests.get(f"{gw.url}/plain/p{i}", timeout=IO).status_code,
                    range(40),
                )
            )
        assert codes == [200] * 40
        for ws in (first, second):  # the tunnels still work
            ws.send("still here")
            assert ws.recv(timeout=IO) == "still here"
        first.close()

        def reopened():
            try:
                return stack.enter_context(open_ws(gw, "/ws/echo"))
            except InvalidStatus:
                return None

        third = eventually(reopened, timeout=5, what="a freed tunnel slot")
        third.send("x")
        assert third.recv(timeout=IO) == "x"
        # A stopping worker ends its tunnels instead of waiting out gracefulTimeout.
        started = time.monotonic()
        gw.stop()
        with pytest.raises(ConnectionClosed):
            third.recv(timeout=IO)
        assert time.monotonic() - started < 8
        assert "closed: worker stopping" in gw.log()


# -- mesh mTLS ----------------------------------------------------------------------------------


def mesh_backend(ca: CertificateAuthority, directory: str, identity: str) -> EchoBackend:
    leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, identity))
    cert, key = leaf.write(directory)
    ca_path = os.path.join(directory, "ca.pem")
    ca.write_ca(ca_path)
    return EchoBackend(tls=mtls_server_context(str(cert), str(key), ca_path))


def mesh_config(consul) -> dict:
    web = [{"name": "web", "basePath": "/web", "upgrades": ["websocket"]}]
    cfg = consul_config(consul, web, enableConnect=True)
    cfg["serviceMesh"]["mtlsEnabled"] = True
    cfg["server"] = {"maxTunnels": 4}
    return cfg


def test_tunnel_over_mesh_mtls_and_identity_mismatch_refused(gateway_factory):
    ca = CertificateAuthority()
    with (
        tempfile.TemporaryDirectory() as good_dir,
        tempfile.TemporaryDirectory() as evil_dir,
        ConsulDouble(ca=ca) as consul,
        mesh_backend(ca, good_dir, "web") as good,
        mesh_backend(ca, evil_dir, "billing") as evil,
    ):
        consul.register("web", id="web-1", port=9, connect_proxy_port=good.port)
        gw = gateway_factory(mesh_config(consul), workers=1, threads=8)
        with open_ws(gw, "/web/echo") as ws:
            payload = os.urandom(256 * 1024)
            ws.send(payload)
            assert ws.recv(timeout=IO) == payload
        gateway_id = consul_service_uri(ca.trust_domain, "odin-gateway")
        assert good.peer_uris == [[gateway_id]]  # our workload certificate, over mTLS

        consul.deregister("web-1")
        consul.register("web", id="web-2", port=9, connect_proxy_port=evil.port)

        def refused():
            try:
                with open_ws(gw, "/web/echo"):
                    pass  # still the good backend
            except InvalidStatus as exc:
                return exc.response
            return None

        answer = eventually(refused, timeout=10, what="the impostor refused")
        assert answer.status_code == 502
        assert b'"upstream_identity_mismatch"' in answer.body
        assert consul_service_uri(ca.trust_domain, "billing").encode() in answer.body
        assert evil.requests == []  # the TLS session was cut before any byte of HTTP


# -- the relay itself, on socket pairs ------------------------------------------------------


def buffered(*socks: socket.socket) -> int:
    """What the kernel may hold for these sockets, both ways."""
    options = (socket.SO_SNDBUF, socket.SO_RCVBUF)
    return sum(s.getsockopt(socket.SOL_SOCKET, opt) for s in socks for opt in options)


def test_relay_reads_no_more_than_the_other_side_takes():
    client, client_end = socket.socketpair()
    upstream_end, upstream = socket.socketpair()
    results: list = []
    relay = threading.Thread(
        target=lambda: results.append(Relay(client_end, upstream_end, idle_timeout=20).run()),
        daemon=True,
    )
    relay.start()
    data = os.urandom(16 * 1024 * 1024)
    view = memoryview(data)
    pushed = 0
    client.setblocking(False)
    stalled_since = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the upstream reads nothing yet
        try:
            pushed += client.send(view[pushed : pushed + CHUNK])
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    bound = buffered(client, client_end, upstream_end, upstream) + CHUNK
    assert 0 < pushed <= bound < len(data), (pushed, bound)
    received = bytearray()

    def read_all() -> None:
        upstream.settimeout(IO)
        while True:
            piece = upstream.recv(CHUNK)
            if not piece:
                return
            received.extend(piece)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    client.setblocking(True)
    client.settimeout(IO)
    client.sendall(view[pushed:])
    client.shutdown(socket.SHUT_WR)  # passed on: the reader sees the end
    reader.join(timeout=IO)
    assert bytes(received) == data
    upstream.close()
    relay.join(timeout=IO)
    assert results[0].reason == "client closed"
    assert results[0].to_upstream == len(data) and results[0].to_client == 0
    for s in (client, client_end, upstream_end):
        s.close()
