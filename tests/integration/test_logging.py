"""Logs an operator greps: JSON lines with request and trace ids, the debug lines that
explain each routing decision, and the ``mesh``/``tls`` lines of the troubleshooting
guide (docs/service-mesh.md)."""

from __future__ import annotations

import json
import ssl
import time

import pytest
import requests

from tests.doubles.pki import CertificateAuthority
from tests.support.upstream import Upstream, free_port

pytestmark = pytest.mark.integration

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def json_lines(log: str) -> list[dict]:
    """Every line of the gateway's own loggers, parsed (gunicorn's lines are not ours)."""
    out = []
    for line in log.splitlines():
        if '"logger": "odin_gw' in line:
            out.append(json.loads(line))
    return out


def dead_and_alive(dead: str, upstream, **extra) -> dict:
    """Service ``web``: a target that refuses connections, then a live one, round robin
    with retries (so some request meets the dead one first)."""
    return {
        "name": "web",
        "basePath": "/web",
        "targets": [dead, upstream.url],
        "loadBalancing": "round-robin",
        "retries": 2,
        **extra,
    }


def wait_for(gw, check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        found = check(gw.log())
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_json_lines_carry_request_and_trace_ids(gateway_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory({"services": [dead_and_alive(dead, upstream)], "logging": {"json": True}})
    ids = set()
    for _ in range(3):  # round robin: one of the first two requests meets the dead target
        r = requests.get(
            gw.url + "/web/x",
            headers={"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"},
            timeout=5,
        )
        assert r.status_code == 200
        ids.add(r.headers["X-Request-Id"])

    def warned(log):
        return [
            d for d in json_lines(log) if d["level"] == "warning" and "unreachable" in d["message"]
        ]

    lines = wait_for(gw, warned)
    assert lines, gw.log()
    assert lines[0]["requestId"] in ids and lines[0]["traceId"] == CALLER_TRACE
    access = wait_for(
        gw, lambda log: [d for d in json_lines(log) if d["logger"] == "odin_gw.access"]
    )
    assert {d["requestId"] for d in access if d["path"] == "/web/x"} == ids
    assert {d["traceId"] for d in access if d["path"] == "/web/x"} == {CALLER_TRACE}
    # Lines outside any request (start-up, background threads) carry no request id.
    assert all("requestId" not in d for d in json_lines(gw.log()) if "started" in d["message"])


def test_debug_explains_each_pick_and_every_skip(gateway_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    service = dead_and_alive(
        dead, upstream, passiveHealth={"consecutiveFailures": 1, "ejectFor": "30s"}
    )
    gw = gateway_factory({"services": [service], "logging": {"level": "debug"}})
    for _ in range(4):
        assert requests.get(gw.url + "/web/x", timeout=5).status_code == 200

    def decisions(log):
        return [line for line in log.splitlines() if "mesh decision web:" in line]

    lines = wait_for(gw, lambda log: len(decisions(log)) >= 5 and decisions(log))
    text = "\n".join(lines)
    assert f"attempt 1 -> {dead} (round-robin over 2 of 2 endpoints)" in text
    assert f"attempt 2 -> {upstream.url}" in text
    assert f"skipped {dead}: already tried by this request" in text
    assert f"skipped {dead}: ejected by passive health" in text
    assert all("odin_gw.mesh.decision" in line for line in lines)  # grep -i mesh finds them


def test_info_level_writes_no_decision_lines(gateway_factory, upstream):
    gw = gateway_factory(
        {"services": [{"name": "web", "basePath": "/web", "targets": [upstream.url]}]}
    )
    for _ in range(3):
        requests.get(gw.url + "/web/x", timeout=5)
    assert wait_for(gw, lambda log: "odin_gw.access" in log)
    assert "mesh decision" not in gw.log()


def test_a_tls_failure_is_a_line_grep_tls_finds(gateway_factory, tmp_path):
    untrusted = CertificateAuthority(trust_domain="elsewhere.example", common_name="Other Root")
    cert, key = untrusted.issue(dns_names=["localhost"]).write(tmp_path / "srv")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    with Upstream("tls", tls=ctx) as up:
        gw = gateway_factory(
            {
                "services": [{"name": "web", "basePath": "/web", "targets": [up.url]}],
                "logging": {"json": True},
            }
        )
        r = requests.get(gw.url + "/web/x", timeout=10)
        assert r.status_code == 502 and r.json()["code"] == "upstream_tls_error"
        lines = wait_for(
            gw,
            lambda log: [d for d in json_lines(log) if "tls" in json.dumps(d).lower()],
        )
    assert lines, gw.log()
    assert "TLS handshake failed" in lines[0]["message"]
    assert lines[0]["requestId"] == r.json()["requestId"]
    assert up.requests == 0
