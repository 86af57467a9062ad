"""Health, readiness, admin API, metrics across workers, access logs, config errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import requests

from tests.support.gateway import ROOT, GatewayProcess, one_session_per_worker

pytestmark = pytest.mark.integration


def svc(url, **extra):
    return {"name": "web", "basePath": "/web", "targets": [url], **extra}


def test_health_ready_live(gateway_factory, upstream):
    gw = gateway_factory({"services": [svc(upstream.url)]})
    assert requests.get(gw.url + "/health").json()["status"] == "ok"
    assert requests.get(gw.url + "/live").status_code == 200
    ready = requests.get(gw.url + "/ready")
    assert ready.status_code == 200 and ready.json()["routes"] == 1


def test_admin_refused_without_configured_token(gateway_factory, upstream):
    gw = gateway_factory({"services": [svc(upstream.url)], "admin": {}})
    r = requests.get(gw.url + "/admin/routes", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and r.json()["code"] == "admin_disabled"


def test_admin_token_checked(gateway_factory, upstream):
    gw = gateway_factory({"services": [svc(upstream.url)]})
    assert requests.get(gw.url + "/admin/routes").status_code == 401
    wrong = requests.get(gw.url + "/admin/routes", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    assert gw.admin("routes").status_code == 200
    assert gw.admin("nonexistent").status_code == 404


def test_admin_routes_services_config(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [svc(upstream.url, headers={"Authorization": "Basic c2VjcmV0"})],
            "serviceMesh": {"consul": {"token": "consul-secret-token"}},
        }
    )
    routes = gw.admin("routes").json()["routes"]
    assert routes[0]["service"] == "web" and routes[0]["basePath"] == "/web"
    services = gw.admin("services").json()
    entry = services["services"][0]
    assert entry["source"] == "static"
    assert entry["targets"][0]["url"] == upstream.url
    assert entry["targets"][0]["healthy"] is True
    cfg = gw.admin("config")
    text = cfg.text
    assert cfg.status_code == 200
    for secret in ("consul-secret-token", "c2VjcmV0", gw.config["admin"]["token"]):
        assert secret not in text
    assert cfg.json()["services"][0]["basePath"] == "/web"


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled_metric(gw, name: str, expected: float, **labels) -> float:
    """The metric once it reaches ``expected`` (or after 5 s): a request is counted when
    its response is closed, which is just after the client has read it."""
    deadline = time.monotonic() + 5
    while True:
        value = metric(requests.get(gw.url + "/metrics").text, name, **labels)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_metrics_add_up_across_workers(gateway_factory, upstream):
    gw = gateway_factory(
        {"services": [svc(upstream.url)], "monitoring": {"enabled": True}}, workers=2
    )
    # One kept-alive session per worker: each worker serves exactly 20 of the 40 requests.
    sessions = one_session_per_worker(gw)
    for pid, session in sessions.items():
        for _ in range(20):
            r = session.get(gw.url + "/web/x")
            assert r.status_code == 200
        assert session.get(gw.url + "/health").json()["pid"] == pid  # same worker all along
    next(iter(sessions.values())).get(gw.url + "/web/status/503")
    for session in sessions.values():
        session.close()
    assert settled_metric(gw, "odin_requests_total", 40, service="web", status_class="2xx") == 40
    assert settled_metric(gw, "odin_requests_total", 1, service="web", status_class="5xx") == 1
    assert settled_metric(gw, "odin_request_duration_seconds_count", 41, service="web") == 41


def test_upstream_errors_counted(gateway_factory):
    from tests.support.upstream import free_port

    gw = gateway_factory(
        {"services": [svc(f"http://127.0.0.1:{free_port()}")], "monitoring": {"enabled": True}}
    )
    assert requests.post(gw.url + "/web/x", data=b"1").status_code == 502
    errors = settled_metric(
        gw, "odin_upstream_errors_total", 1, service="web", kind="upstream_unreachable"
    )
    assert errors == 1


def test_access_log_lines(gateway_factory, upstream):
    gw = gateway_factory({"services": [svc(upstream.url)]})
    r = requests.get(gw.url + "/web/hello")
    rid = r.headers["X-Request-Id"]
    deadline = time.monotonic() + 5
    while rid not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in gw.log().splitlines() if rid in line)
    assert "odin_gw.access" in line and "GET /web/hello 200" in line
    assert "service=web" in line and f"target=http://127.0.0.1:{upstream.port}" in line
    assert re.search(r" \d+\.\dms ", line)


def test_json_logs(gateway_factory, upstream):
    gw = gateway_factory({"services": [svc(upstream.url)], "logging": {"json": True}})
    rid = requests.get(gw.url + "/web/hello").headers["X-Request-Id"]
    deadline = time.monotonic() + 5
    while rid not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    doc = next(json.loads(x) for x in gw.log().splitlines() if rid in x)
    assert doc["requestId"] == rid and doc["status"] == 200 and doc["service"] == "web"
    assert doc["target"] == f"http://127.0.0.1:{upstream.port}" and doc["durationMs"] >= 0


def test_secrets_never_logged(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [svc(upstream.url)],
            "logging": {"level": "debug"},
            "serviceMesh": {"consul": {"token": "consul-secret-token"}},
        }
    )
    requests.get(
        gw.url + "/web/x",
        headers={"Authorization": "Bearer client-secret", "X-Request-Id": "proxied-1"},
    )
    token = gw.config["admin"]["token"]
    requests.get(
        gw.url + "/admin/config",
        headers={"Authorization": f"Bearer {token}", "X-Request-Id": "admin-1"},
    )
    # Wait for the access lines of both requests (written in batches), so the check
    # below reads a log that holds them, not one written before anything happened.
    deadline = time.monotonic() + 10
    log = gw.log()
    while not ("proxied-1" in log and "admin-1" in log) and time.monotonic() < deadline:
        time.sleep(0.05)
        log = gw.log()
    assert "proxied-1" in log and "admin-1" in log, log[-2000:]
    assert "DEBUG" in log  # logging at debug level, the most talkative
    for secret in ("consul-secret-token", "client-secret", token):
        assert secret not in log


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "odin_gw.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("services:\n - {name: a, basePath: /a, targets: ['http://h:1']}\n")
    ok = run_cli("check-config", str(good))
    assert ok.returncode == 0 and "ok (1 services" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("serviceMesh:\n  istio:\n    pilotAdr: x\nserver: {timeout: soon}\n")
    out = run_cli("check-config", str(bad))
    assert out.returncode == 2
    assert "serviceMesh.istio.pilotAdr: unknown field" in out.stderr
    assert "server.timeout: not a duration" in out.stderr
    assert "Traceback" not in out.stderr


def test_gunicorn_refuses_bad_config(tmp_path):
    gw = GatewayProcess(
        {"services": [{"name": "a", "basePath": "/admin/x", "targets": ["nope://"]}]}
    )
    try:
        with pytest.raises(RuntimeError) as info:
            gw.start(timeout=20)
        text = str(info.value)
        assert "services[0].basePath: /admin/x is under the reserved path /admin" in text
        assert "services[0].targets[0]: invalid URL 'nope://'" in text
        assert "Traceback" not in text
        assert gw.proc.returncode == 2
    finally:
        gw.cleanup()


def test_obsolete_keys_logged_once(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [svc(upstream.url)],
            "serviceMesh": {"istio": {"mixerAddr": "istio-telemetry:15004"}},
        },
        workers=2,
    )
    assert gw.log().count("Mixer was removed in Istio 1.8") == 1
