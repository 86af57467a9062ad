"""Upgrade tunnels without sockets: what is an upgrade, the backend's answer head, the
101 the client gets, the per-worker cap, and the worker's connection handover."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from gunicorn.http.unreader import Unreader
from gunicorn.http.wsgi import Response as GunicornResponse
from werkzeug.wrappers import Response

from odin_gw.config.model import GatewayConfig, ServerConfig, ServiceConfig
from odin_gw.edge_reader import HANDOVER, ConnectionHandover, CurrentRequest, TimeoutAnswer
from odin_gw.proxy.transport import HeadTimeout, InvalidResponse, ResetAfterSend, StaleConnection
from odin_gw.proxy.tunnel import (
    MAX_HEAD,
    MAX_INTERIM,
    BadAnswer,
    TunnelResponse,
    Tunnels,
    TunnelSlots,
    has_body,
    parse_head,
    protocol_names,
    read_answer,
    switch_head,
    upgrade_request,
)


def environ(protocol: str = "HTTP/1.1", **headers: str) -> dict:
    env = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": protocol, "PATH_INFO": "/"}
    for name, value in headers.items():
        env["HTTP_" + name.upper()] = value
    return env


# -- what the client asks for ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("websocket", ("websocket",)),
        ("WebSocket", ("websocket",)),
        ("HTTP/2.0, SHTTP/1.3, IRC/6.9, RTA/x11", ("http", "shttp", "irc", "rta")),
        (" websocket ,  ", ("websocket",)),
        ("web socket", ()),
        ("websocket/", ()),
        ("a/b/c", ()),
        ("", ()),
    ],
)
def test_protocol_names(value, names):
    assert protocol_names(value) == names


def test_an_upgrade_needs_http_1_1_and_the_connection_option():
    assert upgrade_request(environ(upgrade="websocket", connection="Upgrade")) == ("websocket",)
    assert upgrade_request(environ(upgrade="websocket", connection="keep-alive, UPGRADE")) == (
        "websocket",
    )
    assert upgrade_request(environ(upgrade="websocket")) == ()
    assert upgrade_request(environ(upgrade="websocket", connection="upgrades")) == ()
    assert upgrade_request(environ("HTTP/1.0", upgrade="websocket", connection="Upgrade")) == ()
    assert upgrade_request(environ("HTTP/2", upgrade="websocket", connection="Upgrade")) == ()
    assert upgrade_request(environ(connection="Upgrade")) == ()


def test_has_body():
    assert not has_body({})
    assert not has_body({"CONTENT_LENGTH": "0"})
    assert not has_body({"CONTENT_LENGTH": ""})
    assert has_body({"CONTENT_LENGTH": "5"})
    assert has_body({"HTTP_TRANSFER_ENCODING": "chunked"})


# -- the backend's answer ------------------------------------------------------------------

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nKeep-Alive: timeout=5\r\n"
    b"Content-Length: 0\r\nX-Request-Id: theirs\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
)


def test_parse_head():
    head = parse_head(SWITCH)
    assert (head.status, head.reason) == (101, "Switching Protocols")
    assert head.all("set-cookie") == ["a=1", "b=2"]
    assert head.all("UPGRADE") == ["websocket"]
    bare = parse_head(b"HTTP/1.0 403\nX-A:  spaced \t\n\n")
    assert (bare.status, bare.reason, bare.headers) == (403, "", (("X-A", "spaced"),))


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"HTTP/2 101 OK\r\n\r\n", "status line"),
        (b"ICY 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n folded\r\n\r\n", "obs-fold"),
        (b"HTTP/1.1 101 OK\r\nX-A: a\x00b\r\n\r\n", "control character"),
        (b"HTTP/1.1 101 OK\r\nX-A: a\rb\r\n\r\n", "control character"),
        (b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 101 OK\r\nno colon\r\n\r\n", "invalid header line"),
    ],
)
def test_parse_head_refuses_what_breaks_rfc_9112(head, why):
    with pytest.raises(BadAnswer, match=why):
        parse_head(head)


def test_switch_head_relays_end_to_end_headers_with_its_own_framing():
    sent = switch_head(parse_head(SWITCH), ("websocket",), "req-1").decode("latin-1")
    assert sent.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert sent.endswith("\r\n\r\n")
    lines = sent[:-4].split("\r\n")[1:]
    assert lines == [
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "Set-Cookie: a=1",
        "Set-Cookie: b=2",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "X-Request-Id: req-1",
    ]


def test_a_101_without_upgrade_or_to_another_protocol_is_refused():
    no_upgrade = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n")
    with pytest.raises(BadAnswer, match="without an Upgrade header"):
        switch_head(no_upgrade, ("websocket",), "r")
    other = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
    with pytest.raises(BadAnswer, match="did not offer"):
        switch_head(other, ("websocket",), "r")
    garbage = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: a b\r\n\r\n")
    with pytest.raises(BadAnswer, match="did not offer"):
        switch_head(garbage, ("websocket",), "r")
    # The client's own second choice is fine.
    chosen = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo/2\r\n\r\n")
    assert b"\r\nUpgrade: echo/2\r\n" in switch_head(chosen, ("websocket", "echo"), "r")


class ScriptedSocket:
    """Gives ``recv`` the scripted pieces in turn (an exception is raised); then EOF."""

    def __init__(self, *pieces) -> None:
        self.pieces = list(pieces)
        self.timeouts: list[float] = []

    def settimeout(self, value: float) -> None:
        self.timeouts.append(value)

    def recv(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if isinstance(piece, BaseException):
            raise piece
        return piece


FAR = 1e12  # a deadline that never passes


def test_read_answer_skips_interim_answers_and_keeps_what_follows():
    sock = ScriptedSocket(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n",
        b"\r\nHTTP/1.1 101 Switching",
        b" Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi",
    )
    head, early = read_answer(sock, FAR)
    assert head == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    assert early == b"\x81\x02hi"
    assert len(sock.timeouts) == 3  # each read bounded by what is left of the deadline


def test_read_answer_returns_a_final_answer_with_its_body_start():
    head, early = read_answer(
        ScriptedSocket(b"HTTP/1.1 403 No\r\nContent-Length: 2\r\n\r\nno"), FAR
    )
    assert head.startswith(b"HTTP/1.1 403") and early == b"no"


@pytest.mark.parametrize(
    ("pieces", "error", "why"),
    [
        ((), StaleConnection, "closed without answering"),
        ((b"HTTP/1.1 101 Swi",), InvalidResponse, "in the middle of the answer head"),
        ((b"HTTP/1.1 101 X\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1),), InvalidResponse, "KiB"),
        ((b"HTTP/1.1 103 Hints\r\n\r\n" * (MAX_INTERIM + 1),), InvalidResponse, "interim"),
        ((TimeoutError("slow"),), HeadTimeout, "deadline"),
        ((ConnectionResetError("reset"),), ResetAfterSend, "reset"),
    ],
)
def test_read_answer_failures(pieces, error, why):
    with pytest.raises(error, match=why):
        read_answer(ScriptedSocket(*pieces), FAR)


def test_read_answer_stops_at_the_deadline():
    with pytest.raises(HeadTimeout):
        read_answer(ScriptedSocket(b"HTTP/1.1 101 X\r\n"), 0.0)


# -- per worker ----------------------------------------------------------------------------


def test_slots_count_up_to_the_limit():
    slots = TunnelSlots(2)
    assert slots.acquire() and slots.acquire() and not slots.acquire()
    slots.release()
    assert slots.active == 1 and slots.acquire()
    assert not TunnelSlots(0).acquire()  # maxTunnels: 0 refuses every tunnel


def gateway(max_tunnels: int = 16, **service) -> SimpleNamespace:
    svc = ServiceConfig(name="ws", base_path="/ws", **service)
    return SimpleNamespace(
        config=GatewayConfig(server=ServerConfig(max_tunnels=max_tunnels), services=(svc,))
    )


def upgrade_environ(upgrade: str = "websocket", available: bool = True) -> dict:
    env = environ(upgrade=upgrade, connection="Upgrade")
    env[HANDOVER] = SimpleNamespace(available=lambda: available)
    return env


def test_accepts_only_the_protocols_the_service_lists():
    gw = gateway(upgrades=frozenset({"websocket", "echo"}))
    tunnels = Tunnels(gw)
    route = SimpleNamespace(name="ws", config=gw.config.services[0])
    assert tunnels.accepts(upgrade_environ("WebSocket"), route)
    assert tunnels.accepts(upgrade_environ("echo/1, websocket"), route)
    assert not tunnels.accepts(upgrade_environ("websocket, other"), route)
    assert not tunnels.accepts(upgrade_environ("h2c"), route)
    assert not tunnels.accepts(environ(upgrade="websocket"), route)  # no Connection option
    plain = Tunnels(gateway())
    assert not plain.accepts(upgrade_environ(), SimpleNamespace(name="ws", config=None))


def test_a_route_without_its_config_is_looked_up_by_name():
    tunnels = Tunnels(gateway(upgrades=frozenset({"websocket"})))
    assert tunnels.accepts(upgrade_environ(), SimpleNamespace(name="ws", config=None))
    assert not tunnels.accepts(upgrade_environ(), SimpleNamespace(name="other", config=None))


def test_without_a_handover_upgrades_are_forwarded_and_that_is_said_once(caplog):
    tunnels = Tunnels(gateway(upgrades=frozenset({"websocket"})))
    route = SimpleNamespace(name="ws", config=None)
    with caplog.at_level(logging.WARNING, logger="odin_gw.proxy"):
        assert not tunnels.accepts(upgrade_environ(available=False), route)
        assert not tunnels.accepts(environ(upgrade="websocket", connection="Upgrade"), route)
    assert [r.message for r in caplog.records].count(
        "ws: Upgrade requests are forwarded without upgrading: tunnels need the edge worker "
        "(server.workerClass: edge) and HTTP/1.1"
    ) == 1


def test_too_many_tunnels_for_the_threads_is_warned(caplog, monkeypatch):
    monkeypatch.setenv("ODIN_THREADS", "8")  # the environment, not the code under test
    with caplog.at_level(logging.WARNING, logger="odin_gw.proxy"):
        Tunnels(gateway(max_tunnels=8, upgrades=frozenset({"websocket"})))
        Tunnels(gateway(max_tunnels=7, upgrades=frozenset({"websocket"})))
        Tunnels(gateway(max_tunnels=8))  # no service tunnels: nothing to say
    assert len([r for r in caplog.records if "maxTunnels (8)" in r.message]) == 1


def test_a_101_answer_keeps_its_body_for_gunicorn():
    body = [b"relay"]
    env = {"REQUEST_METHOD": "GET"}
    # werkzeug drops the body of any 1xx answer; the tunnel is that body.
    assert list(Response(body, status=101).get_app_iter(env)) == []
    assert list(TunnelResponse(body, status=101).get_app_iter(env)) == [b"relay"]


# -- the worker's connection handover ---------------------------------------------------------


class RecordingSocket:
    def __init__(self) -> None:
        self.sent = b""

    def sendall(self, data: bytes) -> None:
        self.sent += data


def gunicorn_response(sock) -> GunicornResponse:
    req = SimpleNamespace(method="GET", version=(1, 1), should_close=lambda: False)
    return GunicornResponse(req, sock, SimpleNamespace(protocol="http"))


def serve(app, conn, start_response):
    """Call ``app`` as the edge worker does for one HTTP/1.1 request on ``conn``."""
    current = CurrentRequest()
    handover = ConnectionHandover(current, lambda: True)
    current.conn = conn
    return list(TimeoutAnswer(app, current, handover)(environ(), start_response))


def test_handover_gives_the_socket_and_the_bytes_read_past_the_head():
    sock = RecordingSocket()
    unreader = Unreader()
    unreader.unread(b"early frame")
    conn = SimpleNamespace(sock=sock, parser=SimpleNamespace(unreader=unreader))
    resp = gunicorn_response(sock)
    taken: list = []

    def app(env, start_response):
        handover = env[HANDOVER]
        assert handover.available() and not handover.stopping()
        start_response("101 SWITCHING PROTOCOLS", [("Connection", "Upgrade")])
        taken.append(handover.take())
        return []

    serve(app, conn, resp.start_response)
    assert taken == [(sock, b"early frame")]
    resp.close()  # what gthread does after the body
    assert sock.sent == b""  # gunicorn wrote nothing: the head was the app's to write
    assert resp.should_close()  # and the connection is closed after the request


def test_handover_close_after_closes_the_connection_after_an_ordinary_answer():
    sock = RecordingSocket()
    conn = SimpleNamespace(sock=sock, parser=SimpleNamespace(unreader=Unreader()))
    resp = gunicorn_response(sock)

    def app(env, start_response):
        env[HANDOVER].close_after()
        start_response("403 FORBIDDEN", [("Content-Length", "0")])
        return []

    serve(app, conn, resp.start_response)
    resp.close()
    assert b"Connection: close" in sock.sent and resp.should_close()


def test_no_handover_for_another_kind_of_answer_or_without_a_connection():
    conn = SimpleNamespace(sock=RecordingSocket(), parser=SimpleNamespace(unreader=Unreader()))
    seen: list = []

    def app(env, start_response):
        handover = env[HANDOVER]
        seen.append(handover.available())
        with pytest.raises(RuntimeError, match=r"no HTTP/1\.x connection"):
            handover.take()
        return []

    serve(app, conn, lambda status, headers, exc_info=None: None)  # e.g. an HTTP/2 stream
    serve(app, None, gunicorn_response(RecordingSocket()).start_response)
    assert seen == [False, False]


def test_handover_after_the_head_was_sent_is_refused():
    sock = RecordingSocket()
    conn = SimpleNamespace(sock=sock, parser=SimpleNamespace(unreader=Unreader()))
    resp = gunicorn_response(sock)

    def app(env, start_response):
        start_response("200 OK", [("Content-Length", "0")])
        resp.send_headers()
        with pytest.raises(RuntimeError, match="sent already"):
            env[HANDOVER].take()
        return []

    serve(app, conn, resp.start_response)
