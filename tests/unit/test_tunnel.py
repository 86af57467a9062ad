"""Upgrade tunnels without sockets: what is an upgrade, the backend's answer head, the
101 the client gets, the per-worker cap, and the worker's connection handover."""

from __future__ import annotations

import logging
import ssl
from time import monotonic
from types import SimpleNamespace

import pytest
from gunicorn.http.unreader import Unreader
from gunicorn.http.wsgi import Response as GunicornResponse
from werkzeug.wrappers import Response

from odin_gw.config.model import GatewayConfig, ServerConfig, ServiceConfig
from odin_gw.edge_reader import HANDOVER, ConnectionHandover, CurrentRequest, TimeoutAnswer
from odin_gw.proxy.transport import (
    ConnectFailed,
    HeadTimeout,
    InvalidResponse,
    ResetAfterSend,
    StaleConnection,
)
from odin_gw.proxy.tunnel import (
    CHUNK,
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
        (",websocket, ,\techo/1\t,", ("websocket", "echo")),  # empty items are skipped
        ("XMPP", ("xmpp",)),
        # Only SP and HTAB are optional white space (RFC 9110 5.6.3), not VT or FF.
        ("websocket\x0b", ()),
        ("\x0cwebsocket", ()),
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


@pytest.mark.parametrize(
    "connection",
    [
        "Upgrade, keep-alive",
        "keep-alive,Upgrade",  # gunicorn joins repeated fields with a bare comma
        "keep-alive,\tupgrade ,",
        ", ,Upgrade",
    ],
)
def test_the_upgrade_option_anywhere_in_a_connection_list(connection):
    assert upgrade_request(environ(upgrade="websocket", connection=connection)) == ("websocket",)


@pytest.mark.parametrize("connection", ["upgrade\x0b", "\x0cupgrade", "XUpgrade", "up grade"])
def test_a_connection_option_is_a_whole_token(connection):
    assert upgrade_request(environ(upgrade="websocket", connection=connection)) == ()


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


def test_parse_head_takes_bare_lf_line_ends_and_values_as_they_are():
    head = parse_head(
        b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\n"
        b"Location: http://a.example:8080/x\nX-Time:12:30:00\nX-Mark: XOX \n\n"
    )
    assert head.all("upgrade") == ["websocket"]
    assert head.all("connection") == ["Upgrade"]
    # The name ends at the first colon; the value keeps every other one.
    assert head.all("location") == ["http://a.example:8080/x"]
    assert head.all("x-time") == ["12:30:00"]
    assert head.all("x-mark") == ["XOX"]


def test_an_invalid_status_line_is_quoted_in_the_error():
    with pytest.raises(BadAnswer) as info:
        parse_head(b"ICY 200 OK\r\nX-Second: line\r\n\r\n")
    assert "b'ICY 200 OK\\r'" in str(info.value)
    assert "X-Second" not in str(info.value)  # only the first line


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"HTTP/2 101 OK\r\n\r\n", "status line"),
        (b"ICY 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n folded\r\n\r\n", "obs-fold"),
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\tfolded: x\r\n\r\n", "obs-fold"),
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


def test_a_101_switching_several_layers_keeps_their_order():
    # RFC 9110 7.8: several protocols in layer-ascending order; repeated Upgrade fields
    # are one list.
    layered = parse_head(b"HTTP/1.1 101 S\r\nUpgrade: echo/2\r\nUpgrade: websocket\r\n\r\n")
    sent = switch_head(layered, ("websocket", "echo"), "r")
    assert b"\r\nUpgrade: echo/2, websocket\r\n" in sent
    with pytest.raises(BadAnswer, match="did not offer"):
        switch_head(layered, ("websocket",), "r")


class ScriptedSocket:
    """Gives ``recv`` the scripted pieces in turn (an exception is raised); then EOF.

    As a socket does, ``recv`` returns at most ``size`` bytes (the rest of a piece comes
    next) and wants an ``int`` size."""

    def __init__(self, *pieces) -> None:
        self.pieces = list(pieces)
        self.timeouts: list[float] = []

    def settimeout(self, value: float) -> None:
        self.timeouts.append(value)

    def recv(self, size: int) -> bytes:
        if not isinstance(size, int) or size <= 0:
            raise TypeError(f"recv size {size!r}")
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if isinstance(piece, BaseException):
            raise piece
        if len(piece) > size:
            self.pieces.insert(0, piece[size:])
        return piece[:size]


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


def test_each_read_waits_at_most_what_is_left_of_the_deadline():
    sock = ScriptedSocket(b"HTTP/1.1 101 S\r\n", b"Upgrade: websocket\r\n\r\n")
    # Less than a second left is time enough to read an answer that is there.
    head, _ = read_answer(sock, monotonic() + 0.5)
    assert head.startswith(b"HTTP/1.1 101 S")
    assert len(sock.timeouts) == 2
    assert all(t is not None and 0 < t <= 0.5 for t in sock.timeouts), sock.timeouts


def test_read_answer_returns_a_final_answer_with_its_body_start():
    head, early = read_answer(
        ScriptedSocket(b"HTTP/1.1 403 No\r\nContent-Length: 2\r\n\r\nno"), FAR
    )
    assert head.startswith(b"HTTP/1.1 403") and early == b"no"


def test_a_200_is_a_final_answer_and_199_an_interim_one():
    head, early = read_answer(
        ScriptedSocket(b"HTTP/1.1 199 Odd\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        FAR,
    )
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" and early == b"ok"


def test_up_to_max_interim_answers_are_skipped():
    interim = b"HTTP/1.1 103 Hints\r\n\r\n" * MAX_INTERIM
    head, _ = read_answer(ScriptedSocket(interim + b"HTTP/1.1 101 S\r\n\r\n"), FAR)
    assert head == b"HTTP/1.1 101 S\r\n\r\n"


def test_a_head_that_is_no_answer_is_returned_for_parse_head_to_refuse():
    head, early = read_answer(ScriptedSocket(b"SSH-2.0-OpenSSH_9.6\r\n\r\nrest"), FAR)
    assert (head, early) == (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"rest")
    # An empty line first ends the head there: no status line is looked for behind it.
    answer = b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\n\r\n"
    head, early = read_answer(ScriptedSocket(b"\n\n" + answer), FAR)
    assert (head, early) == (b"\n\n", answer)
    for refused in (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"\n\n"):
        with pytest.raises(BadAnswer, match="status line"):
            parse_head(refused)


def head_of(size: int, status: bytes = b"101 Switching Protocols") -> bytes:
    """An answer head of exactly ``size`` bytes."""
    start = b"HTTP/1.1 " + status + b"\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_a_head_of_max_head_bytes_is_read_in_pieces_or_at_once():
    exact = head_of(MAX_HEAD)
    assert len(exact) == MAX_HEAD and MAX_HEAD <= CHUNK
    assert read_answer(ScriptedSocket(exact), FAR) == (exact, b"")
    half = MAX_HEAD // 2
    assert read_answer(ScriptedSocket(exact[:half], exact[half:]), FAR) == (exact, b"")
    assert read_answer(ScriptedSocket(exact[:-1], exact[-1:]), FAR) == (exact, b"")
    # Each head on its own: an interim one of MAX_HEAD bytes, then the answer.
    interim = head_of(MAX_HEAD, b"103 Early Hints")
    assert read_answer(ScriptedSocket(interim, exact), FAR) == (exact, b"")


@pytest.mark.parametrize(
    "pieces",
    [
        (head_of(MAX_HEAD + 1),),
        # However it arrives: two reads each well below the limit (as nginx's fixed
        # proxy_buffer_size and Envoy's header limit refuse it: 502).
        (head_of(100 * 1024)[:60000], head_of(100 * 1024)[60000:]),
        (head_of(MAX_HEAD + 1)[:-11], head_of(MAX_HEAD + 1)[-11:]),
        # Refused once it cannot end within the limit, without waiting for more.
        (head_of(MAX_HEAD + 1)[:MAX_HEAD],),
    ],
    ids=["one-piece", "two-pieces", "one-byte-over", "at-the-limit"],
)
def test_a_head_larger_than_max_head_is_refused(pieces):
    with pytest.raises(InvalidResponse, match="KiB"):
        read_answer(ScriptedSocket(*pieces), FAR)


def test_a_tls_alert_before_any_answer_is_a_connect_failure():
    def alert() -> ssl.SSLError:
        exc = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")
        exc.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        return exc

    # The peer's TLS stack refused our certificate: another endpoint may be tried.
    with pytest.raises(ConnectFailed, match="the peer refused the TLS session"):
        read_answer(ScriptedSocket(alert()), FAR)
    # After part of an answer, the request was taken: never a connect failure.
    with pytest.raises(ResetAfterSend):
        read_answer(ScriptedSocket(b"HTTP/1.1 101 S\r\n", alert()), FAR)


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
    with pytest.raises(HeadTimeout, match="before the deadline"):
        read_answer(ScriptedSocket(b"HTTP/1.1 101 X\r\n"), 0.0)


# -- per worker ----------------------------------------------------------------------------


def test_slots_count_up_to_the_limit():
    slots = TunnelSlots(2)
    assert slots.acquire() and slots.acquire() and not slots.acquire()
    slots.release()
    assert slots.active == 1 and slots.acquire()
    assert not TunnelSlots(0).acquire()  # maxTunnels: 0 refuses every tunnel


def test_a_released_slot_is_one_slot():
    slots = TunnelSlots(3)
    assert all(slots.acquire() for _ in range(3))
    slots.release()
    assert slots.active == 2
    slots.release()
    slots.release()
    assert slots.active == 0
    assert all(slots.acquire() for _ in range(3)) and not slots.acquire()


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


@pytest.mark.parametrize("upgrade", ["web socket", "websocket/", ", ,", "websocket\x0b"])
def test_an_upgrade_value_that_names_no_protocol_is_not_tunnelled(upgrade):
    gw = gateway(upgrades=frozenset({"websocket"}))
    route = SimpleNamespace(name="ws", config=gw.config.services[0])
    assert not Tunnels(gw).accepts(upgrade_environ(upgrade), route)


def test_h2c_is_never_tunnelled_even_when_a_service_lists_it():
    # The config schema refuses h2c in upgrades; a ServiceConfig built in code is not
    # checked, and the tunnel must not depend on that.
    gw = gateway(upgrades=frozenset({"websocket", "h2c"}))
    tunnels = Tunnels(gw)
    route = SimpleNamespace(name="ws", config=gw.config.services[0])
    assert tunnels.accepts(upgrade_environ("websocket"), route)
    assert not tunnels.accepts(upgrade_environ("h2c"), route)
    assert not tunnels.accepts(upgrade_environ("H2C, websocket"), route)


def test_the_routes_own_config_wins_over_the_one_of_the_same_name():
    tunnels = Tunnels(gateway(upgrades=frozenset({"websocket"})))
    own = ServiceConfig(name="ws", base_path="/ws", upgrades=frozenset({"echo"}))
    route = SimpleNamespace(name="ws", config=own)
    assert tunnels.accepts(upgrade_environ("echo"), route)
    assert not tunnels.accepts(upgrade_environ("websocket"), route)


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


def test_a_101_answer_runs_its_close_callbacks():
    # The access log and the concurrency cap's release hang on call_on_close.
    closed: list[str] = []
    response = TunnelResponse([b"relay"], status=101)
    response.call_on_close(lambda: closed.append("done"))
    body = response.get_app_iter({"REQUEST_METHOD": "GET"})
    assert list(body) == [b"relay"]
    body.close()
    assert closed == ["done"]


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
