"""The tap (tap.py, tap_hub.py, tap_stream.py): query parsing, filters, event shape, the
bounded buffer and drop accounting, and the cross-process channel (unix datagram sockets
in a private dir) with two hubs standing for two workers, in one process."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from odin_gw.errors import BadRequest
from odin_gw.proxy.exchange import Exchange
from odin_gw.tap import (
    MAX_LIMIT,
    TapFilter,
    TapLimitReached,
    iso_utc,
    parse_limit,
    parse_query,
    tap_event,
)
from odin_gw.tap_hub import TapHub
from odin_gw.tap_stream import TapBuffer, client_gone
from tests.unit.conftest import admin_app

TOKEN = "tap-admin-token-0123"


# -- query ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, ""])
def test_no_limit_means_unbounded(value):
    assert parse_query({"limit": value} if value is not None else {})[1] is None


@pytest.mark.parametrize("value, expected", [("1", 1), ("250", 250), (str(MAX_LIMIT), MAX_LIMIT)])
def test_limit_accepts_whole_numbers_up_to_the_cap(value, expected):
    assert parse_limit(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "100001", "1.5", " 5", "5 ", "abc", "1e3", "٣", "+3"])
def test_limit_refuses_anything_else_naming_the_parameter(value):
    with pytest.raises(BadRequest) as info:
        parse_limit(value)
    assert info.value.details == {"parameter": "limit"}
    assert info.value.message.startswith("limit:")


def test_filters_from_the_query():
    tap_filter, limit = parse_query({"service": "orders", "method": "post", "path": "/orders/"})
    assert tap_filter == TapFilter("orders", "POST", "/orders/")
    assert limit is None
    assert parse_query({"service": "", "method": "", "path": ""})[0] == TapFilter()


@pytest.mark.parametrize(
    "args, parameter",
    [
        ({"path": "orders"}, "path"),
        ({"service": "s" * 2000}, "service"),
        ({"method": "G" * 2000}, "method"),
    ],
)
def test_bad_filters_are_refused_naming_the_parameter(args, parameter):
    with pytest.raises(BadRequest) as info:
        parse_query(args)
    assert info.value.details == {"parameter": parameter}


def test_filter_matching():
    everything = TapFilter()
    assert everything.matches(None, "GET", "/")
    f = TapFilter("orders", "GET", "/orders/a")
    assert f.matches("orders", "GET", "/orders/abc")
    assert not f.matches("orders", "POST", "/orders/abc")
    assert not f.matches("order", "GET", "/orders/abc")
    assert not f.matches(None, "GET", "/orders/abc")
    assert not f.matches("orders", "GET", "/orders/")
    assert TapFilter.from_json(json.loads(json.dumps(f.to_json()))) == f


# -- the event --------------------------------------------------------------------------------
def test_event_shape():
    environ = {
        "REQUEST_METHOD": "PUT",
        "PATH_INFO": "/orders/7",
        "QUERY_STRING": "token=secret",
        "HTTP_HOST": "shop.example:8443",
        "HTTP_X_REQUEST_ID": "req-42",
    }
    ex = Exchange(environ)
    ex.service, ex.target, ex.status, ex.response_bytes = "orders", "10.0.0.7:8080", 201, 512
    ex.peer_identity = "orders.shop.serviceaccount.identity.linkerd.cluster.local"
    event = tap_event(ex, 0.0034121, environ, now=1738324800.5)
    assert event == {
        "requestId": "req-42",
        "time": "2025-01-31T12:00:00.496Z",
        "method": "PUT",
        "authority": "shop.example:8443",
        "path": "/orders/7",
        "service": "orders",
        "endpoint": "10.0.0.7:8080",
        "status": 201,
        "durationMs": 3.412,
        "bytes": 512,
        "peerIdentity": "orders.shop.serviceaccount.identity.linkerd.cluster.local",
    }
    assert list(event) == [
        "requestId", "time", "method", "authority", "path", "service", "endpoint",
        "status", "durationMs", "bytes", "peerIdentity",
    ]  # fmt: skip
    assert "secret" not in json.dumps(event)


def test_iso_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1738324800.0071) == "2025-01-31T12:00:00.007Z"


# -- the buffer -------------------------------------------------------------------------------
def test_buffer_drops_the_oldest_when_full_and_counts():
    buf = TapBuffer(capacity=3)
    for i in range(5):
        buf.put(b"%d" % i)
    assert buf.reader_dropped == 2 and buf.dropped == 2
    assert buf.take(10, 0) == [b"2", b"3", b"4"]
    buf.put(b"5", sender_dropped=7)
    assert buf.dropped == 9 and buf.sender_dropped == 7


def test_buffer_take_respects_most_and_waits_at_most_its_timeout():
    buf = TapBuffer(capacity=10)
    for i in range(4):
        buf.put(b"%d" % i)
    assert buf.take(3, 0) == [b"0", b"1", b"2"]
    assert buf.take(3, 0) == [b"3"]
    started = time.monotonic()
    assert buf.take(3, 0.05) == []
    assert 0.04 <= time.monotonic() - started < 1.0
    threading.Timer(0.05, buf.put, (b"late",)).start()
    assert buf.take(3, 5.0) == [b"late"]  # woken by the put, not by the timeout


# -- hub and streams in one process -----------------------------------------------------------
@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return str(path)


@pytest.fixture
def hubs(state):
    """Two hubs on one state dir: two workers of a gateway, as far as the tap goes."""
    made = [TapHub(lambda: state, max_taps=2) for _ in range(2)]
    yield made
    for hub in made:
        hub.stop()


def exchange(path="/orders/1", method="GET", service="orders", status=200):
    ex = Exchange({"REQUEST_METHOD": method, "PATH_INFO": path, "HTTP_HOST": "gw"})
    ex.service, ex.status, ex.target = service, status, "127.0.0.1:9"
    return ex


def read_events(body, n, timeout=5.0):
    """The first ``n`` event lines (and the drop lines met) from a stream body."""
    events, drops, deadline = [], [], time.monotonic() + timeout
    buffered = b""
    for chunk in body:
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            doc = json.loads(line)
            (drops if set(doc) == {"dropped"} else events).append(doc)
        if len(events) >= n or time.monotonic() > deadline:
            break
    return events, drops


def test_events_from_every_hub_reach_a_stream_with_its_filter(hubs):
    serving, other = hubs
    stream = serving.open(TapFilter(service="orders", path="/orders/"), limit=3)
    other.scan()  # the background thread does this every SCAN_INTERVAL
    assert serving.active and other.active
    other.publish(exchange("/orders/a"), 0.001, {"HTTP_HOST": "gw"})
    other.publish(exchange("/pay/a", service="pay"), 0.001, {})  # filtered at the sender
    other.publish(exchange("/ordersX"), 0.001, {})  # prefix is /orders/
    serving.publish(exchange("/orders/b", method="POST"), 0.002, {})
    other.publish(exchange("/orders/c", status=503), 0.003, {})
    body = stream.lines()
    events, _ = read_events(body, 3)
    assert [(e["path"], e["method"], e["status"]) for e in events] == [
        ("/orders/a", "GET", 200),
        ("/orders/b", "POST", 200),
        ("/orders/c", "GET", 503),
    ]
    assert list(body) == []  # the limit ends the stream
    assert os.listdir(os.path.join(hubs[0].directory)) == [".lock"]
    other.scan()
    assert not other.active and not serving.active


def test_max_taps_counts_every_process_and_frees_on_close(hubs):
    a, b = hubs
    first = a.open(TapFilter(), None)
    second = b.open(TapFilter(), None)
    with pytest.raises(TapLimitReached) as info:
        a.open(TapFilter(), None)
    assert info.value.details == {"maxTaps": 2}
    assert "linkerd.maxTaps is 2" in info.value.message
    second.close()
    third = a.open(TapFilter(), None)
    for s in (first, third):
        s.close()
    assert sorted(os.listdir(a.directory)) == [".lock"]


def test_stale_taps_of_a_dead_worker_are_removed(hubs, state):
    a, b = hubs
    directory = os.path.join(state, "taps")
    a.open(TapFilter(), None).close()  # creates the dir
    # What a SIGKILLed worker leaves: a filter file and a socket nobody reads.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(os.path.join(directory, "tap-999999-1.sock"))
    dead.close()
    with open(os.path.join(directory, "tap-999999-1.json"), "w") as fh:
        json.dump(TapFilter().to_json(), fh)
    b.scan()  # refused: not a subscriber, and cleaned under the lock
    assert not b.active
    assert sorted(os.listdir(directory)) == [".lock"]
    # Same again, cleaned by the next open this time (and not counted against maxTaps).
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(os.path.join(directory, "tap-999999-2.sock"))
    dead.close()
    s1, s2 = a.open(TapFilter(), None), a.open(TapFilter(), None)
    assert not os.path.exists(os.path.join(directory, "tap-999999-2.sock"))
    s1.close()
    s2.close()


def test_sender_drops_travel_with_the_next_event_and_reader_drops_are_added(hubs):
    serving, other = hubs
    stream = serving.open(TapFilter(), None)
    stream.buffer.capacity = 5
    other.scan()
    stream._closed = True  # stop the receiver: the socket's queue fills, senders drop
    stream._receiver.join(2)
    sent = 200
    for i in range(sent):
        other.publish(exchange(f"/orders/{i}"), 0.001, {})
    sub = other._subs[0]
    assert sub.dropped > 0
    queued = sent - sub.dropped
    # Drain the socket as the receiver would.
    stream._closed = False
    stream._receiver = threading.Thread(target=stream._receive, daemon=True)
    stream._receiver.start()
    deadline = time.monotonic() + 5
    while len(stream.buffer) < min(queued, 5) and time.monotonic() < deadline:
        time.sleep(0.01)
    other.publish(exchange("/orders/last"), 0.001, {})  # carries the sender's count
    deadline = time.monotonic() + 5
    while stream.buffer.sender_dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.buffer.sender_dropped == sent - queued
    assert stream.buffer.reader_dropped == queued + 1 - 5
    assert stream.buffer.dropped == sent + 1 - 5
    events, _ = read_events(stream.lines(), 5)
    assert [e["path"] for e in events][-1] == "/orders/last"
    stream.close()


def test_dropped_lines_report_the_running_total(hubs, monkeypatch):
    import odin_gw.tap_stream as ts

    monkeypatch.setattr(ts, "REPORT_EVERY", 0.0)
    serving, _ = hubs
    stream = serving.open(TapFilter(), None)
    stream.buffer.put(b'{"n":1}', sender_dropped=3)
    body = stream.lines()
    assert next(body) == b""
    assert next(body) == b'{"n":1}\n{"dropped":3}\n'
    stream.close()
    assert list(body) == []  # closed: the stream ends


def test_a_quiet_stream_sends_keepalives(hubs, monkeypatch):
    import odin_gw.tap_stream as ts

    monkeypatch.setattr(ts, "KEEPALIVE", 0.05)
    monkeypatch.setattr(ts, "WAKE", 0.02)
    stream = hubs[0].open(TapFilter(), None)
    body = stream.lines()
    assert next(body) == b""
    assert next(body) == b'{"dropped":0}\n'
    body.close()  # the client went away: gunicorn closes the body
    assert os.listdir(hubs[0].directory) == [".lock"]


def test_hub_stop_ends_streams_and_removes_their_files(state):
    hub = TapHub(lambda: state, max_taps=4)
    streams = [hub.open(TapFilter(), None) for _ in range(2)]
    hub.stop()
    assert all(s._closed for s in streams)
    assert os.listdir(os.path.join(state, "taps")) == [".lock"]


def test_a_long_state_dir_is_reached_through_proc(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    os.chmod(deep.parent, 0o700)
    hubs = [TapHub(lambda: str(deep), max_taps=2) for _ in range(2)]
    try:
        stream = hubs[0].open(TapFilter(), limit=1)
        hubs[1].scan()
        hubs[1].publish(exchange(), 0.001, {})
        events, _ = read_events(stream.lines(), 1)
        assert events[0]["path"] == "/orders/1"
    finally:
        for hub in hubs:
            hub.stop()


def test_client_gone():
    a, b = socket.socketpair()
    with a, b:
        assert not client_gone(a)
        b.sendall(b"x")
        assert not client_gone(a)  # pipelined bytes are not an end
        assert a.recv(1) == b"x"
        b.close()
        assert client_gone(a)
    assert not client_gone(None)


# -- the view ---------------------------------------------------------------------------------
@pytest.fixture
def app():
    with admin_app(TOKEN) as app:
        yield app


def get(client, query="", token=TOKEN, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(f"/admin/tap{query}", headers=headers, **kw)


def test_view_when_the_tap_is_off(app):
    r = get(app.test_client())
    assert r.status_code == 404
    assert r.json["code"] == "tap_disabled"
    assert "linkerd.enableTap is off" in r.json["error"]


def test_view_needs_the_admin_token(app):
    assert get(app.test_client(), token=None).status_code == 401
    assert get(app.test_client(), token="wrong").status_code == 401


def test_view_streams_and_validates(app, state):
    app.extensions["odin"].tap = hub = TapHub(lambda: state, max_taps=1)
    client = app.test_client()
    r = get(client, "?limit=0")
    assert r.status_code == 400 and r.json["parameter"] == "limit"
    r = get(client, "?limit=2&service=web", buffered=False)
    assert r.status_code == 200
    assert r.mimetype == "application/x-ndjson"
    assert r.headers["Cache-Control"] == "no-store"
    busy = get(client)
    assert busy.status_code == 429 and busy.json["maxTaps"] == 1
    hub.publish(exchange("/web/1", service="web"), 0.001, {})
    hub.publish(exchange("/other", service=None), 0.001, {})
    hub.publish(exchange("/web/2", service="web"), 0.001, {})
    events, _ = read_events(r.response, 2)
    assert [e["path"] for e in events] == ["/web/1", "/web/2"]
    r.close()
    assert get(client, "?limit=1", buffered=False).status_code == 200  # slot freed
