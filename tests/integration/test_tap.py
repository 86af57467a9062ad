"""The live tap through real gunicorn (2 workers) and raw sockets: events of both workers
on one stream, filters, limit, admin token, maxTaps over all workers, a reader that never
reads, a slow one that is told what it lost, and every way a stream ends freeing its slot.

No Kubernetes API here (discovery fails and is reported): Linkerd routes on static
targets, as the gateway's own Linkerd proxy would pick the pods."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import pytest

from tests.support.gateway import ADMIN_TOKEN, GatewayProcess, one_session_per_worker, started
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def tap_config(echo, **server) -> dict:
    return {
        "server": {"timeout": "5s", **server},
        "serviceMesh": {
            "enabled": True,
            "type": "linkerd",
            "namespace": "shop",
            "readyGracePeriod": 0,
            "kubeconfig": None,  # outside a cluster: discovery can only fail
            "linkerd": {"enableTap": True, "maxTaps": 2},
        },
        "services": [
            {"name": "orders", "basePath": "/orders", "targets": [echo.url]},
            {"name": "pay", "basePath": "/pay", "targets": [echo.url]},
        ],
    }


@pytest.fixture(scope="module")
def echo():
    with Upstream("echo") as up:
        yield up


def start(echo, **server) -> GatewayProcess:
    return started(
        tap_config(echo, **server), workers=2, env={"KUBECONFIG": "/nonexistent/kubeconfig"}
    )


@pytest.fixture(scope="module")
def gw(echo):
    gateway = start(echo)
    try:
        yield gateway
    finally:
        gateway.cleanup()


def taps_dir(gw) -> str:
    return os.path.join(gw.config["serviceMesh"]["stateDir"], "taps")


def tap_files(gw) -> list[str]:
    try:
        return sorted(n for n in os.listdir(taps_dir(gw)) if n.startswith("tap-"))
    except FileNotFoundError:
        return []


def wait_for(check, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s: {what}")


class Tap:
    """A raw-socket ``/admin/tap`` client that decodes the chunked NDJSON stream."""

    def __init__(self, gw, query="", token=ADMIN_TOKEN, rcvbuf=None, read_head=True):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connect: it sizes the window offered to the gateway
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", gw.port))
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.sock.sendall(f"GET /admin/tap{query} HTTP/1.1\r\nHost: gw.test\r\n{auth}\r\n".encode())
        self.raw = b""
        self.text = b""  # de-chunked body not yet split into lines
        self.ended = False  # the terminating chunk arrived
        self.events: list[dict] = []
        self.drops: list[int] = []
        self.status = 0
        self.headers: dict[str, str] = {}
        if read_head:
            self.read_head()

    def _recv(self, until: float) -> bool:
        self.sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.ended = True
            return False
        self.raw += data
        return True

    def read_head(self, timeout: float = 10.0) -> None:
        until = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.raw:
            assert self._recv(until) or not self.ended, "connection closed before the head"
            assert time.monotonic() < until, "no response head"
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if "content-length" in self.headers:  # an error answer, not a stream
            size = int(self.headers["content-length"])
            while len(self.raw) < size and self._recv(until):
                pass
            self.body = json.loads(self.raw[:size])
            self.ended = True

    def _dechunk(self) -> None:
        while not self.ended:
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            self.text += rest[:size]
            self.raw = rest[size + 2 :]
            if size == 0:
                self.ended = True
        *lines, self.text = self.text.split(b"\n")
        for line in lines:
            doc = json.loads(line)
            if set(doc) == {"dropped"}:
                self.drops.append(doc["dropped"])
            else:
                self.events.append(doc)

    def read(self, timeout: float = 10.0, until=lambda tap: False) -> Tap:
        """Read until ``until(self)`` holds, the stream ends or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not until(self) and not self.ended and time.monotonic() < deadline:
            if self._recv(deadline):
                self._dechunk()
        return self

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def taps():
    opened: list[Tap] = []

    def open_tap(gw, query="", **kw) -> Tap:
        tap = Tap(gw, query, **kw)
        opened.append(tap)
        return tap

    yield open_tap
    for tap in opened:
        tap.close()


def settle(gw, tap: Tap, sessions, path="/orders/probe", method="GET", timeout=10.0):
    """Send probes through every worker until the tap has seen one from each (a new tap
    is found by the other workers within their next listing of the taps dir)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while seen != set(sessions) and time.monotonic() < deadline:
        for pid, session in sessions.items():
            if pid not in seen:
                r = session.request(method, f"{gw.url}{path}-{pid}", timeout=5)
                assert r.status_code == 200
        tap.read(0.3)
        for e in tap.events:
            for pid in sessions:
                if e["path"].startswith(f"{path}-{pid}"):
                    seen.add(pid)
    assert seen == set(sessions), f"probes of {set(sessions) - seen} never reached the tap"
    tap.events.clear()


def test_one_tap_shows_the_requests_of_both_workers(gw, taps):
    sessions = one_session_per_worker(gw)
    tap = taps(gw, "?service=orders")
    assert tap.status == 200
    assert tap.headers["content-type"] == "application/x-ndjson"
    assert tap.headers["cache-control"] == "no-store"
    assert tap.headers["transfer-encoding"] == "chunked"
    settle(gw, tap, sessions)
    ids = {}
    for i in range(5):
        for pid, session in sessions.items():
            r = session.get(f"{gw.url}/orders/w{pid}/{i}", timeout=5)
            assert r.status_code == 200
            ids[f"/orders/w{pid}/{i}"] = (r.headers["X-Request-Id"], len(r.content))
    tap.read(10, until=lambda t: len(t.events) >= len(ids))
    got = {e["path"]: e for e in tap.events}
    assert set(got) == set(ids)
    for path, event in got.items():
        assert event["requestId"] == ids[path][0]
        assert event["bytes"] == ids[path][1]
        assert event["method"] == "GET"
        assert event["authority"] == f"127.0.0.1:{gw.port}"
        assert event["service"] == "orders"
        assert event["endpoint"] == gw.config["services"][0]["targets"][0]
        assert event["status"] == 200
        assert 0 < event["durationMs"] < 5000
        assert ISO.match(event["time"])
        assert "peerIdentity" in event


def test_filters(gw, taps):
    sessions = one_session_per_worker(gw)
    tap = taps(gw, "?service=orders&method=post&path=/orders/keep")
    settle(gw, tap, sessions, path="/orders/keep/probe", method="POST")
    (_, sa), (_, sb) = sessions.items()
    sa.post(f"{gw.url}/orders/keep/1", data=b"x", timeout=5)
    sa.get(f"{gw.url}/orders/keep/no-get", timeout=5)  # method
    sb.post(f"{gw.url}/orders/other", data=b"x", timeout=5)  # path prefix
    sb.post(f"{gw.url}/pay/keep", data=b"x", timeout=5)  # service
    sb.put(f"{gw.url}/orders/keep/no-put", data=b"x", timeout=5)  # method
    sb.post(f"{gw.url}/orders/keep/2", data=b"x", timeout=5)
    sa.post(f"{gw.url}/orders/keepsake", data=b"x", timeout=5)  # a prefix, not a segment

    def wanted(t):
        return [e["path"] for e in t.events if "/probe-" not in e["path"]]

    tap.read(10, until=lambda t: len(wanted(t)) >= 3)
    tap.read(1)  # anything that should not be there has had time to come
    assert wanted(tap) == ["/orders/keep/1", "/orders/keep/2", "/orders/keepsake"]
    assert {e["method"] for e in tap.events} == {"POST"}


def test_limit_ends_the_stream(gw, taps):
    sessions = one_session_per_worker(gw)
    tap = taps(gw, "?path=/orders/lim&limit=3")
    for i in range(100):  # until the other worker has found the tap too, and beyond
        for session in sessions.values():
            session.get(f"{gw.url}/orders/lim/{i}", timeout=5)
        if tap.read(0.05).ended:
            break
    assert tap.ended, "limit reached: the stream ends"
    assert len(tap.events) == 3
    assert all(e["path"].startswith("/orders/lim/") for e in tap.events)
    wait_for(lambda: tap_files(gw) == [], 5, "the tap's files removed")


def test_admin_token_required(gw, taps):
    for token in (None, "wrong-token"):
        tap = taps(gw, token=token)
        assert tap.status == 401
        assert tap.body["code"] == "unauthorized"
    bad = taps(gw, "?limit=100001")
    assert bad.status == 400 and bad.body["parameter"] == "limit"
    assert tap_files(gw) == []


def test_max_taps_over_all_workers_and_a_closed_tap_frees_its_slot(gw, taps):
    first = taps(gw)
    second = taps(gw)
    assert (first.status, second.status) == (200, 200)
    for _ in range(4):  # whichever worker takes the connection, the count is the host's
        refused = taps(gw)
        assert refused.status == 429
        assert refused.body["code"] == "too_many_taps"
        assert refused.body["maxTaps"] == 2
        assert "linkerd.maxTaps" in refused.body["error"]
        refused.close()
    assert len(tap_files(gw)) == 4  # two sockets and their filters
    before = set(tap_files(gw))
    first.close()  # the client goes away without a word
    wait_for(lambda: len(tap_files(gw)) == 2, 10, "the closed tap's socket and filter removed")
    again = taps(gw)
    assert again.status == 200
    assert set(tap_files(gw)) - before  # a new one
    second.close()
    again.close()
    wait_for(lambda: tap_files(gw) == [], 10, "every tap's files removed")


def run_traffic(gw, sessions, per_worker: int) -> float:
    """``per_worker`` GETs through each worker at once; every one must succeed."""
    failures: list[str] = []

    def send(session, pid):
        for i in range(per_worker):
            r = session.get(f"{gw.url}/orders/load/{pid}/{i}", timeout=10)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=send, args=(s, p)) for p, s in sessions.items()]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "traffic did not finish"
    assert failures == []
    return time.monotonic() - started


def test_a_reader_that_never_reads_costs_traffic_nothing(gw, taps):
    sessions = one_session_per_worker(gw)
    baseline = run_traffic(gw, sessions, 1000)
    # Reads nothing at all, not even the head, through a tiny receive window.
    stuck = taps(gw, rcvbuf=1024, read_head=False)
    wait_for(lambda: len(tap_files(gw)) == 2, 5, "the stuck tap is open")
    # A slow reader: reads its head, then nothing while the traffic flows.
    slow = taps(gw, "?service=orders", rcvbuf=4096)
    assert slow.status == 200
    settle(gw, slow, sessions)
    with_taps = run_traffic(gw, sessions, 1000)
    assert with_taps < 3 * baseline + 3, f"{with_taps:.1f}s with taps, {baseline:.1f}s without"
    # The slow reader catches up: what it did not get, it is told it lost.
    slow.read(15, until=lambda t: t.drops and t.drops[-1] > 0)
    assert slow.drops and slow.drops[-1] > 0, "no drops reported"
    for session in sessions.values():  # carries what the senders could not send
        session.get(f"{gw.url}/orders/load/last", timeout=5)

    def accounted(t):
        load = [e for e in t.events if e["path"].startswith("/orders/load/")]
        return len(load) + (t.drops[-1] if t.drops else 0) >= 2002

    slow.read(15, until=accounted)
    load = [e for e in slow.events if e["path"].startswith("/orders/load/")]
    assert len(load) + slow.drops[-1] == 2002  # every event: received or counted
    assert load[-1]["path"] == "/orders/load/last"
    # The stuck one leaves (its unread data resets the connection): its slot frees.
    stuck.close()
    wait_for(lambda: len(tap_files(gw)) == 2, 10, "the stuck tap's files removed")
    slow.close()
    wait_for(lambda: tap_files(gw) == [], 10, "the slow tap's files removed")


def test_worker_stop_ends_its_streams(gw, taps):
    tap = taps(gw)
    names = wait_for(lambda: tap_files(gw), 5, "tap files")
    pid = int(names[0].split("-")[1])
    assert pid in gw.worker_pids()
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)  # gunicorn's graceful stop: the stream must not hold it
    tap.read(10)
    assert tap.ended, "the stream did not end when its worker stopped"
    assert time.monotonic() - started < 5  # well inside gunicorn's graceful timeout
    wait_for(lambda: tap_files(gw) == [], 5, "the tap's files removed")
    wait_for(lambda: len(gw.worker_pids()) == 2 and pid not in gw.worker_pids(), 20, "respawn")


def test_write_timeout_ends_a_stuck_stream_and_a_killed_worker_leaves_no_slot(echo, taps):
    gw = start(echo, writeTimeout="2s")
    try:
        sessions = one_session_per_worker(gw)
        stuck = taps(gw, rcvbuf=1024, read_head=False)
        wait_for(lambda: len(tap_files(gw)) == 2, 5, "the stuck tap is open")
        run_traffic(gw, sessions, 300)  # fills the stuck stream's buffers: its send blocks
        wait_for(lambda: tap_files(gw) == [], 10, "the stuck stream cut after writeTimeout")
        stuck.close()
        # A SIGKILLed worker cannot clean up: its tap's files are stale, not counted.
        a = taps(gw)
        b = taps(gw)
        assert (a.status, b.status) == (200, 200)
        owners = {int(n.split("-")[1]) for n in tap_files(gw)}
        victim = next(iter(owners))
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(gw.worker_pids()) == 2 and victim not in gw.worker_pids(), 20, "respawn"
        )
        c = wait_for(
            lambda: (t := taps(gw)).status == 200 and t, 10, "a tap in the dead one's slot"
        )
        assert c.status == 200
        wait_for(
            lambda: victim not in {int(n.split("-")[1]) for n in tap_files(gw)},
            5,
            "the dead worker's tap files removed",
        )
    finally:
        gw.cleanup()
