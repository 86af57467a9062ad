"""Upstream failures: 502/504, retries on another target, passive health, disconnects."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from tests.support.upstream import Upstream, free_port

pytestmark = pytest.mark.integration


def test_refused_target_is_502_with_request_id(gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory({"services": [{"name": "d", "basePath": "/d", "targets": [dead]}]})
    r = requests.post(gw.url + "/d/x", data=b"hi")
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == "upstream_unreachable"
    assert body["requestId"] == r.headers["X-Request-Id"]
    assert "unreachable" in body["error"]


def test_slow_target_is_504(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [
                {"name": "s", "basePath": "/s", "targets": [upstream.url], "timeout": "300ms"}
            ]
        }
    )
    r = requests.get(gw.url + "/s/slow?ms=1500")
    assert r.status_code == 504
    assert r.json()["code"] == "upstream_timeout"
    assert requests.get(gw.url + "/s/slow?ms=10").status_code == 200


def test_idempotent_requests_retry_on_another_target(gateway_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory(
        {
            "services": [
                {
                    "name": "r",
                    "basePath": "/r",
                    "targets": [dead, upstream.url],
                    "passiveHealth": {"consecutiveFailures": 1000},
                }
            ]
        }
    )
    for _ in range(10):
        r = requests.get(gw.url + "/r/x")
        assert r.status_code == 200, r.text
    assert upstream.requests == 10


def test_connect_failures_retry_any_method(gateway_factory, upstream):
    # Nothing reached the dead target, so even a POST is safe to send to the next one
    # (a POST reset after it was sent is not retried: tests/unit/test_forwarder.py).
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory(
        {
            "services": [
                {
                    "name": "r",
                    "basePath": "/r",
                    "targets": [dead, upstream.url],
                    "loadBalancing": "round-robin",
                    "passiveHealth": {"consecutiveFailures": 1000},
                }
            ]
        }
    )
    codes = [requests.post(gw.url + "/r/x", data=b"1").status_code for _ in range(10)]
    assert codes == [200] * 10
    assert upstream.requests == 10


def test_passive_health_skips_then_restores_a_failing_target(gateway_factory):
    port = free_port()
    with Upstream("good") as good:
        gw = gateway_factory(
            {
                "services": [
                    {
                        "name": "p",
                        "basePath": "/p",
                        "targets": [f"http://127.0.0.1:{port}", good.url],
                        "retries": 0,
                        "passiveHealth": {"consecutiveFailures": 2, "ejectFor": "1s"},
                    }
                ]
            }
        )
        # No retries, so every 502 below is one connect to the dead target.
        codes = [requests.post(gw.url + "/p/x", data=b"1").status_code for _ in range(12)]
        assert codes.count(502) == 2, codes  # ejected after two failures
        services = gw.admin("services").json()["services"][0]["targets"]
        dead = next(t for t in services if t["port"] == port)
        assert dead["passive"]["ejected"] is True
        # The target comes back: after the back-off it receives traffic again.
        with Upstream("revived", port=port) as revived:
            deadline = time.monotonic() + 10
            while revived.requests == 0 and time.monotonic() < deadline:
                assert requests.post(gw.url + "/p/x", data=b"1").status_code == 200
                time.sleep(0.05)
            assert revived.requests > 0


def test_client_disconnect_mid_upload(gateway_factory, upstream):
    gw = gateway_factory({"services": [{"name": "u", "basePath": "/u", "targets": [upstream.url]}]})
    pid = requests.get(gw.url + "/health").json()["pid"]
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"POST /u/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        s.sendall(b"a" * 500_000)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while not upstream.incomplete_uploads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.incomplete_uploads, "upstream never saw the request cut short"
    assert upstream.requests == 1 and not upstream.seen  # it never completed
    r = requests.get(gw.url + "/u/after")
    assert r.status_code == 200
    assert requests.get(gw.url + "/health").json()["pid"] == pid


def test_chunked_upload_disconnect(gateway_factory, upstream):
    gw = gateway_factory({"services": [{"name": "u", "basePath": "/u", "targets": [upstream.url]}]})
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"POST /u/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            s.sendall(b"10000\r\n" + b"b" * 0x10000 + b"\r\n")
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while not upstream.incomplete_uploads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.incomplete_uploads
    assert requests.get(gw.url + "/u/after").status_code == 200


def test_upstream_closing_keepalive_connections_is_invisible(gateway_factory, upstream):
    gw = gateway_factory({"services": [{"name": "k", "basePath": "/k", "targets": [upstream.url]}]})
    for _ in range(3):
        assert requests.get(gw.url + "/k/nolength").status_code == 200  # upstream closes
        assert requests.get(gw.url + "/k/x").status_code == 200


def test_read_timeout_cuts_a_stalled_upload(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "server": {"readTimeout": "1s"},
            "services": [{"name": "u", "basePath": "/u", "targets": [upstream.url]}],
        }
    )
    pid = requests.get(gw.url + "/health").json()["pid"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /u/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
        s.sendall(b"a" * 100_000)  # more than the small-body buffer, then stall
        started = time.monotonic()
        answer = s.recv(65536)  # the gateway gives up on us; we never send the rest
        waited = time.monotonic() - started
    assert waited < 8
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]  # nginx: client_body_timeout
    deadline = time.monotonic() + 10
    while not upstream.incomplete_uploads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.incomplete_uploads, "upstream should see the request cut short"
    assert requests.get(gw.url + "/health").json()["pid"] == pid
