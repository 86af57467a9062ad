"""Circuit breakers, the concurrency cap, outlier ejection and panic mode under injected
faults, through real gunicorn and backend processes."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from tests.integration.consul_helpers import eventually
from tests.support.fault_backend import FaultBackend
from tests.support.upstream import free_port

pytestmark = pytest.mark.integration


def service(backends, **extra) -> dict:
    svc = {
        "name": "svc",
        "basePath": "/svc",
        "targets": [b.url for b in backends],
        "timeout": "5s",
        "retries": 0,
        "loadBalancing": "round-robin",
    }
    svc.update(extra)
    return {"services": [svc], "monitoring": {"enabled": True}}


def metric(gw, name: str, **labels) -> float:
    text = requests.get(f"{gw.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def svc_doc(gw) -> dict:
    (doc,) = gw.admin("services").json()["services"]
    return doc


BREAKER = {"consecutiveFailures": 3, "openFor": "1s", "maxOpenFor": "4s"}


def test_a_503_endpoint_opens_its_circuit_traffic_moves_and_it_recovers(gateway_factory, backends):
    bad = backends[0]
    bad.mode(status=503)
    gw = gateway_factory(service(backends, circuitBreaker=BREAKER))
    with requests.Session() as s:
        codes = [s.get(f"{gw.url}/svc/x", timeout=10).status_code for _ in range(30)]
    # Round robin over three: the bad one answers 503 three times, then its circuit
    # opens and the rest of the traffic goes to the two others.
    assert codes.count(503) == 3, codes
    assert bad.requests() == 3
    doc = svc_doc(gw)
    (opened,) = doc["openCircuits"]
    assert opened.endswith(f":{bad.port}")
    target = next(t for t in doc["targets"] if t["port"] == bad.port)
    assert target["circuit"]["state"] == "open"
    assert metric(gw, "odin_circuit_opened_total", service="svc") == 1
    assert metric(gw, "odin_circuit_open", service="svc") == 1

    # Still failing when the circuit half-opens: one probe, open again (for longer).
    time.sleep(1.2)
    with requests.Session() as s:
        codes = [s.get(f"{gw.url}/svc/x", timeout=10).status_code for _ in range(10)]
    assert codes.count(503) == 1 and bad.requests() == 4

    # Healed: the next probe closes the circuit and it takes its share again.
    bad.mode(status=200)

    def back() -> bool:
        with requests.Session() as s:
            for _ in range(6):
                assert s.get(f"{gw.url}/svc/x", timeout=10).status_code == 200
        return svc_doc(gw)["openCircuits"] == []

    eventually(back, timeout=10, what="the circuit closes")
    before = bad.requests()
    with requests.Session() as s:
        for _ in range(30):
            assert s.get(f"{gw.url}/svc/x", timeout=10).status_code == 200
    assert bad.requests() - before == 10
    assert metric(gw, "odin_circuit_open", service="svc") == 0


def test_a_slow_endpoint_times_out_opens_and_traffic_moves(gateway_factory, backends):
    slow = backends[1]
    slow.mode(delay_ms=2000)
    gw = gateway_factory(service(backends, circuitBreaker=BREAKER, tryTimeout="200ms", retries=2))
    started = time.monotonic()
    with requests.Session() as s:
        for _ in range(30):
            r = s.get(f"{gw.url}/svc/x", timeout=10)
            assert r.status_code == 200 and r.json()["server"] != "b"
    assert slow.requests() == 3  # three per-try timeouts, then the circuit is open
    assert time.monotonic() - started < 5


def test_failure_rate_opens_a_circuit(gateway_factory, backends):
    flaky = backends[2]
    flaky.mode(status=502)
    breaker = {
        "consecutiveFailures": 0,
        "failureRate": {"threshold": 50, "minRequests": 4, "window": "10s"},
        "openFor": "30s",
        "maxOpenFor": "30s",
    }
    gw = gateway_factory(service(backends, circuitBreaker=breaker))
    with requests.Session() as s:
        for _ in range(36):
            s.get(f"{gw.url}/svc/x", timeout=10)
    assert flaky.requests() == 4


def test_the_concurrency_cap_holds_for_the_host_and_refuses_at_once(gateway_factory, backends):
    for b in backends:
        b.mode(delay_ms=1500)
    gw = gateway_factory(
        service(backends, circuitBreaker={"consecutiveFailures": 0, "maxConcurrent": 2}),
        workers=2,
    )
    results: list[tuple[int, float, str]] = []
    lock = threading.Lock()

    def one() -> None:
        started = time.monotonic()
        r = requests.get(f"{gw.url}/svc/x", timeout=10)
        with lock:
            results.append((r.status_code, time.monotonic() - started, r.text))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=15)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    # Over both workers: 2, plus at most one per other worker deciding at the same instant.
    assert 2 <= len(ok) <= 3 and len(ok) + len(refused) == 8, results
    assert all(r[1] < 1.0 and "service_overloaded" in r[2] for r in refused)
    assert sum(b.requests() for b in backends) == len(ok)
    assert metric(gw, "odin_circuit_rejections_total", reason="max_concurrent") == len(refused)
    # Slots are given back when the answers are done.
    assert requests.get(f"{gw.url}/svc/y", timeout=10).status_code == 200


def test_outlier_ejection_never_takes_more_than_max_ejection_percent(gateway_factory):
    four = [FaultBackend(n, free_port()).start() for n in "wxyz"]
    try:
        for b in four[:3]:
            b.mode(status=503)
        gw = gateway_factory(
            service(
                four,
                passiveHealth={"consecutive5xx": 2, "maxEjectionPercent": 50, "ejectFor": "30s"},
            )
        )
        with requests.Session() as s:
            for _ in range(40):
                s.get(f"{gw.url}/svc/x", timeout=10)
        doc = svc_doc(gw)
        assert len(doc["ejected"]) == 2, doc["ejected"]
        reasons = {t["passive"].get("reason") for t in doc["targets"] if t["passive"]["ejected"]}
        assert reasons == {"5xx"}
        assert metric(gw, "odin_outlier_ejections_total", service="svc") == 2
        # The third bad one is held in by the cap and keeps being used.
        held = [t for t in doc["targets"] if t["passive"].get("heldByEjectionCap")]
        assert len(held) == 1
    finally:
        for b in four:
            b.stop()


def test_panic_mode_spreads_traffic_when_every_circuit_is_open(gateway_factory, backends):
    for b in backends:
        b.mode(status=503)
    gw = gateway_factory(
        service(backends, circuitBreaker=dict(BREAKER, openFor="30s", maxOpenFor="60s"))
    )
    with requests.Session() as s:
        for _ in range(9):  # three failures each: every circuit opens
            s.get(f"{gw.url}/svc/x", timeout=10)
        assert len(svc_doc(gw)["openCircuits"]) == 3
        for b in backends:
            b.mode(status=200)
        # Every endpoint is out: rather than 503 for everyone, all of them are used.
        codes = {s.get(f"{gw.url}/svc/x", timeout=10).status_code for _ in range(6)}
    assert codes == {200}
    assert svc_doc(gw)["panic"] is True
    assert metric(gw, "odin_panic_requests_total", service="svc") >= 6
    log = gw.log()
    assert re.search(r"svc: panic mode, too few healthy endpoints; balancing over all 3", log)


def test_without_panic_mode_every_circuit_open_is_a_503(gateway_factory, backends):
    for b in backends:
        b.mode(status=503)
    gw = gateway_factory(
        service(
            backends,
            circuitBreaker=dict(BREAKER, openFor="30s", maxOpenFor="60s"),
            panicThreshold="off",
        )
    )
    with requests.Session() as s:
        for _ in range(9):
            s.get(f"{gw.url}/svc/x", timeout=10)
        for b in backends:
            b.mode(status=200)
        r = s.get(f"{gw.url}/svc/x", timeout=10)
    assert r.status_code == 503 and r.json()["code"] == "no_healthy_target"
    assert sum(b.requests() for b in backends) == 9
