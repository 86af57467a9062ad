"""The thread side of the edge worker without sockets: bounded waits and the 408 answer."""

from __future__ import annotations

import json
import struct
import time

import pytest

from odin_gw.edge_limits import BodyTooSlow, EdgeLimits, HeadTimeout, MinRate
from odin_gw.edge_reader import CurrentRequest, EdgeUnreader, TimeoutAnswer

LIMITS = EdgeLimits(header_timeout=0.05, min_rate=MinRate(1000, 0.05))


class SilentSocket:
    """A client that sends nothing (a recv without waiting finds nothing)."""

    receive_timeout = (0, 0)  # SO_RCVTIMEO as a timeval; (0, 0): not set

    def recv(self, size, flags=0):
        raise BlockingIOError

    def getsockopt(self, level, option, size):
        return struct.pack("ll", *self.receive_timeout)


class Request:
    closed = False

    def force_close(self):
        self.closed = True


def unreader(waits: list[float]) -> tuple[EdgeUnreader, list]:
    reports: list = []
    u = EdgeUnreader(SilentSocket(), LIMITS, lambda phase, detail: reports.append(phase))

    def readable(timeout: float) -> bool:  # the client stays silent for the whole wait
        waits.append(timeout)
        time.sleep(timeout)
        return False

    u._readable = readable
    return u, reports


def test_buffered_bytes_come_first_without_touching_the_socket():
    u, _ = unreader([])
    u.prime(b"GET / HTTP/1.1\r\n\r\n", time.monotonic() + 10)
    assert u.read() == b"GET / HTTP/1.1\r\n\r\n"


def test_head_wait_ends_at_the_head_deadline():
    waits: list[float] = []
    u, reports = unreader(waits)
    u.prime(b"", time.monotonic() + 0.05)
    with pytest.raises(HeadTimeout):
        u.read()
    assert reports == ["head"] and u.too_slow
    assert 0 < waits[0] <= 0.05


def test_body_wait_follows_the_rate_rule_and_closes_the_request():
    waits: list[float] = []
    u, reports = unreader(waits)
    u.prime(b"", time.monotonic() + 10)
    req = Request()
    u.begin_body(req)
    with pytest.raises(BodyTooSlow):
        u.read(10)
    assert reports == ["body"] and u.too_slow and req.closed
    assert waits == [pytest.approx(0.05)]  # the grace period, nothing more


def test_time_the_app_spends_not_reading_is_not_the_clients():
    waits: list[float] = []
    u, _ = unreader(waits)
    u.prime(b"", time.monotonic() + 10)
    u.begin_body(Request())
    time.sleep(0.1)  # longer than the grace: the app was busy, the client was not asked
    with pytest.raises(BodyTooSlow):
        u.read(10)
    assert waits and waits[0] == pytest.approx(0.05)


def test_the_kernel_receive_timeout_bounds_the_wait_too():
    waits: list[float] = []
    u, reports = unreader(waits)
    u.sock.receive_timeout = (0, 20_000)  # server.readTimeout 20 ms, set by the forwarder
    u.prime(b"", time.monotonic() + 10)
    u.begin_body(Request())
    u.received = 10_000  # the rate rule alone would allow 10 s
    with pytest.raises(BodyTooSlow, match=r"no request body received for 0\.02s"):
        u.read(10)
    assert waits == [pytest.approx(0.02)] and reports == ["body"]


def wsgi_call(app, current_unreader):
    current = CurrentRequest()
    current.unreader = current_unreader
    wrapped = TimeoutAnswer(app, current)
    started: list = []

    def start_response(status, headers, exc_info=None):
        started.append((status, headers))

    body = b"".join(wrapped(dict(), start_response))
    return started, body


def test_app_answer_to_a_slow_body_becomes_408():
    u, _ = unreader([])

    def app(environ, start_response):
        u.too_slow = True  # the body read failed inside the app
        start_response("400 Bad Request", [("Content-Type", "application/json")])
        return [b'{"code": "client_disconnected"}']

    started, body = wsgi_call(app, u)
    assert [s for s, _ in started] == ["408 Request Timeout"]
    assert json.loads(body)["code"] == "request_timeout"


def test_other_answers_pass_through():
    u, _ = unreader([])

    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"fine"]

    assert wsgi_call(app, u) == ([("200 OK", [])], b"fine")
    assert wsgi_call(app, None) == ([("200 OK", [])], b"fine")


def _trickle(sock, piece: bytes, every: float, until: float) -> None:
    while time.monotonic() < until:
        try:
            sock.sendall(piece)
        except OSError:
            return
        time.sleep(every)


def _body_reader(rate: float, grace: float):
    import socket
    import threading

    ours, theirs = socket.socketpair()
    ours.settimeout(None)
    limits = EdgeLimits(header_timeout=5, min_rate=MinRate(rate, grace))
    reports: list = []
    u = EdgeUnreader(ours, limits, lambda phase, detail: reports.append(phase))
    u.prime(b"", time.monotonic() + 5)
    u.begin_body(Request())
    return u, ours, theirs, reports, threading


@pytest.mark.parametrize(
    ("piece", "trips"),
    [(b"x" * 100, False), (b"x" * 10, True)],  # 2000 B/s is fine; 200 B/s is too slow
    ids=["fast enough", "too slow"],
)
def test_the_minimum_rate_counts_every_byte_and_every_wait(piece, trips):
    u, ours, theirs, reports, threading = _body_reader(rate=1000, grace=0.2)
    until = time.monotonic() + 1.2
    sender = threading.Thread(target=_trickle, args=(theirs, piece, 0.05, until), daemon=True)
    sender.start()
    got = 0
    tripped = None
    started = time.monotonic()
    try:
        while time.monotonic() < until - 0.1:
            got += len(u.chunk())
    except BodyTooSlow as exc:
        tripped = exc
    took = time.monotonic() - started
    theirs.close()
    sender.join(timeout=2)
    ours.close()
    if trips:
        assert tripped is not None and u.too_slow and reports == ["body"]
        assert 0.15 < took < 0.8  # about the grace period: waited > max(grace, got/rate)
        assert "1000 bytes/s" in tripped.message
    else:
        assert tripped is None and not reports
        assert u.received == got > 1000  # every byte counted


class _CountingSocket:
    """A socket whose timeout changes are counted (gunicorn's drain sets and restores)."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.timeouts = 0

    def settimeout(self, value) -> None:
        self.timeouts += 1
        self.sock.settimeout(value)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def _parsed(request: bytes):
    import socket

    from gunicorn.config import Config

    from odin_gw.edge_reader import EdgeParser

    ours, theirs = socket.socketpair()
    counting = _CountingSocket(ours)
    u = EdgeUnreader(ours, LIMITS, lambda phase, detail: None)
    u.sock = counting
    u.prime(request, time.monotonic() + 5)
    parser = EdgeParser(Config(), counting, ("127.0.0.1", 1), u)
    req = next(parser)
    return parser, req, counting, (ours, theirs)


def test_a_body_read_to_its_end_needs_no_drain():
    parser, _req, counting, socks = _parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert parser.finish_body(deadline=time.monotonic() + 1) is True
        assert counting.timeouts == 0  # no settimeout pair: nothing to drain
    finally:
        for s in socks:
            s.close()


def test_an_unread_body_is_still_drained_by_gunicorn():
    parser, req, counting, socks = _parsed(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    try:
        assert parser.finish_body(deadline=time.monotonic() + 1) is True
        assert counting.timeouts >= 2  # gunicorn drains: timeouts set, then restored
        assert req.body.read() == b""  # drained
    finally:
        for s in socks:
            s.close()
