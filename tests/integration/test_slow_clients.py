"""Slow clients cost a socket, not a thread: the edge worker under slowloris and slow uploads.

Raw sockets on loopback against a real gunicorn (one worker, four threads). Set
``ODIN_SLOW_TEST_WORKER=gthread`` to run the same tests on plain gthread: the starvation
test then fails (every thread waits on a slow client).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import statistics
import time

import pytest
import requests

from tests.doubles.pki import CertificateAuthority
from tests.support.gateway import GatewayProcess
from tests.support.raw_client import RawReader, connect, exchange

pytestmark = pytest.mark.integration

WORKER_CLASS = os.environ.get("ODIN_SLOW_TEST_WORKER", "edge")
HEADER_TIMEOUT = 2.0
GRACE = 1.0
MIN_RATE = 1000  # bytes/s: a 1 KB head start buys one second, the grace gives one
SLACK = 1.0  # a slow connection is closed within its timeout plus this

HALF_HEAD = b"GET /s/loris HTTP/1.1\r\nHost: gw\r\nX-Slow: "
SMALL_UPLOAD = b"POST /s/small HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n0123456789"
HELLO = b"GET /s/hello HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.fixture
def gw(gateway_factory, upstream):
    return gateway_factory(
        {
            "server": {
                "workerClass": WORKER_CLASS,
                "headerTimeout": f"{HEADER_TIMEOUT:g}s",
                "minBodyRate": MIN_RATE,
                "minBodyRateGrace": f"{GRACE:g}s",
            },
            "services": [{"name": "s", "basePath": "/s", "targets": [upstream.url]}],
        },
        workers=1,
        threads=4,
    )


def open_slow(port: int, first: bytes) -> socket.socket:
    sock = connect(port)
    sock.sendall(first)
    sock.setblocking(False)
    return sock


def timed_hello(port: int) -> float:
    """Seconds for one request on a new connection (inf when not answered within 2 s)."""
    start = time.monotonic()
    try:
        resp = exchange(port, HELLO, timeout=2.0)
    except OSError:
        return float("inf")
    assert resp.status == 200
    return time.monotonic() - start


def watch_until_closed(socks: dict, trickle: list, until: float) -> dict:
    """Read every socket until the gateway closes it; send a byte on ``trickle`` ones
    every 0.3 s. Returns {sock: (closed_at, bytes received)}."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    got = {sock: b"" for sock in socks}
    closed: dict = {}
    next_trickle = 0.0
    while len(closed) < len(socks) and time.monotonic() < until:
        for key, _ in sel.select(0.05):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                got[sock] += data
            else:
                closed[sock] = (time.monotonic(), got[sock])
                sel.unregister(sock)
        if time.monotonic() >= next_trickle:
            next_trickle = time.monotonic() + 0.3
            for sock in trickle:
                if sock not in closed:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")
    sel.close()
    return closed


def test_slow_clients_do_not_starve_the_worker(gw):
    opened: dict = {}
    try:
        for _ in range(50):
            opened[open_slow(gw.port, HALF_HEAD)] = ("head", time.monotonic())
        for _ in range(50):
            opened[open_slow(gw.port, SMALL_UPLOAD)] = ("body", time.monotonic())
        # All 100 are open (the first closes 1 s from now): normal requests go through.
        times = [timed_hello(gw.port) for _ in range(5)]
        assert statistics.median(times) < 0.1, f"normal requests took {times}"

        uploads = [s for s, (kind, _) in opened.items() if kind == "body"]
        closed = watch_until_closed(opened, uploads[:25], time.monotonic() + 8)
        assert len(closed) == len(opened), f"{len(opened) - len(closed)} never closed"
        for sock, (kind, at) in opened.items():
            closed_at, answer = closed[sock]
            limit = HEADER_TIMEOUT if kind == "head" else GRACE
            assert closed_at - at <= limit + SLACK, f"{kind} closed after {closed_at - at:.2f}s"
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            assert b'"code": "request_timeout"' in answer
    finally:
        for sock in opened:
            sock.close()
    assert timed_hello(gw.port) < 1.0  # and the worker is fine afterwards
    log = gw.log()
    assert "Traceback" not in log and "BlockingIOError" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "slow client" in line]
    assert 1 <= len(lines) <= 2, lines  # one line, the others counted in it or the next


def test_small_and_large_posts_go_through(gw):
    for size in (10_000, 1_000_000):
        body = os.urandom(size)
        r = requests.post(gw.url + "/s/upload", data=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["bodyBytes"] == size


def test_chunked_and_expect_continue_uploads_go_through(gw):
    r = requests.post(gw.url + "/s/chunked", data=iter([b"a" * 70_000, b"b" * 10]), timeout=10)
    assert r.status_code == 200 and r.json()["bodyBytes"] == 70_010
    with connect(gw.port) as sock:
        sock.sendall(
            b"POST /s/expect HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        reader = RawReader(sock, 5)
        assert reader.read_head().status == 100
        sock.sendall(b"hello")
        resp = reader.read_response()
        assert resp.status == 200 and json.loads(resp.body)["bodyBytes"] == 5


def test_pipelined_requests_on_one_connection(gw):
    with connect(gw.port) as sock:
        sock.sendall(
            b"GET /s/one HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"POST /s/two HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /s/three HTTP/1.1\r\nHost: gw\r\n\r\nGET /s/four HTTP/1.1\r\nHo"
        )
        reader = RawReader(sock, 5)
        seen = [json.loads(reader.read_response().body) for _ in range(3)]
        assert [s["path"] for s in seen] == ["/s/one", "/s/two", "/s/three"]
        assert seen[1]["bodyBytes"] == 3
        sock.sendall(b"st: gw\r\n\r\n")  # the rest of the fourth, after a pause
        assert json.loads(reader.read_response().body)["path"] == "/s/four"


def test_heads_over_gunicorn_limits_get_its_answers(gw):
    resp = exchange(gw.port, b"GET /s/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert resp.status == 414
    big = b"X-Big: " + b"b" * 9000 + b"\r\n"
    resp = exchange(gw.port, b"GET /s/a HTTP/1.1\r\nHost: gw\r\n" + big + b"\r\n")
    assert resp.status in (400, 431)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    resp = exchange(gw.port, b"GET /s/a HTTP/1.1\r\nHost: gw\r\n" + many + b"\r\n")
    assert resp.status in (400, 431)


def test_slow_head_on_a_kept_alive_connection(gw):
    with connect(gw.port) as sock:
        reader = RawReader(sock, 5)
        sock.sendall(HELLO)
        assert reader.read_response().status == 200
        time.sleep(0.5)  # idle between requests: not the head's time
        sock.sendall(b"GET /s/next HTTP/1.1\r\n")
        start = time.monotonic()
        resp = reader.read_response()
        took = time.monotonic() - start
        assert resp.status == 408 and resp.header("Connection") == "close"
        assert json.loads(resp.body)["code"] == "request_timeout"
        assert HEADER_TIMEOUT - 0.3 <= took <= HEADER_TIMEOUT + SLACK
        assert reader.closed(2)


def test_connection_that_never_sends_is_closed_quietly(gw):
    with connect(gw.port) as sock:
        reader = RawReader(sock, 5)
        start = time.monotonic()
        assert reader.closed(HEADER_TIMEOUT + SLACK + 0.5)
        assert time.monotonic() - start <= HEADER_TIMEOUT + SLACK
        assert reader.buf == b""


def test_small_body_too_slow_never_reaches_the_upstream(gw, upstream):
    with connect(gw.port) as sock:
        sock.sendall(SMALL_UPLOAD)
        reader = RawReader(sock, 5)
        resp = reader.read_response()
        assert resp.status == 408 and resp.header("Connection") == "close"
        assert reader.closed(2)
    assert not [s for s in upstream.seen if s["path"] == "/s/small"]
    assert upstream.incomplete_uploads == []


def test_large_upload_too_slow_aborts_the_upstream_request(gw, upstream):
    with connect(gw.port) as sock:
        sock.sendall(
            b"POST /s/large HTTP/1.1\r\nHost: gw\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 500
        )
        start = time.monotonic()
        reader = RawReader(sock, 5)
        resp = reader.read_response()
        took = time.monotonic() - start
        assert resp.status == 408 and resp.header("Connection") == "close"
        assert json.loads(resp.body)["code"] == "request_timeout"
        assert took <= GRACE + SLACK
        assert reader.closed(2)
    deadline = time.monotonic() + 3
    while not upstream.incomplete_uploads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.incomplete_uploads, "the upstream saw the upload as complete"
    assert not [s for s in upstream.seen if s["path"] == "/s/large"]


def test_tls_falls_back_to_gthread_behaviour(tmp_path, monkeypatch, upstream):
    ca = CertificateAuthority()
    cert, key = ca.issue(dns_names=["localhost"]).write(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.write_ca(tmp_path / "ca.pem")))
    gw = GatewayProcess(
        {"services": [{"name": "s", "basePath": "/s", "targets": [upstream.url]}]},
        workers=1,
        threads=4,
        env={"GUNICORN_CMD_ARGS": f"--certfile {cert} --keyfile {key}"},
    )
    gw.url = gw.url.replace("http://", "https://")
    try:
        gw.start()
        r = requests.get(gw.url + "/s/hello", timeout=5)
        assert r.status_code == 200 and r.json()["path"] == "/s/hello"
        assert "edge worker: TLS (certfile) on" in gw.log()
    finally:
        gw.cleanup()
