"""Active health checks through a real gunicorn gateway with two workers.

The backends here answer ``/healthz`` with a status the test sets and count the probes
they receive; any other path answers 200 with the backend's name, so where requests go
is seen whatever the checks say.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from odin_gw import __version__
from tests.doubles.consul import ConsulDouble
from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.integration.consul_helpers import MeshBackend, consul_config, eventually
from tests.support.gateway import one_session_per_worker

pytestmark = pytest.mark.integration


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        if self.path == "/healthz":
            with srv.lock:
                srv.probes.append(
                    (time.monotonic(), self.headers.get("User-Agent"), self.headers.get("Host"))
                )
                status = srv.health
            body = b""
        else:
            status, body = 200, json.dumps({"server": srv.name}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.health = 200
        self.probes: list[tuple[float, str | None, str | None]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class Backend:
    """A backend whose ``/healthz`` answers ``health`` (settable); counts its probes."""

    def __init__(self, name: str) -> None:
        self._server = _Server(name)
        self.name = name
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Backend:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_health(self, status: int) -> None:
        with self._server.lock:
            self._server.health = status

    def probes(self, since: float = 0.0) -> list[tuple[float, str | None, str | None]]:
        with self._server.lock:
            return [p for p in self._server.probes if p[0] >= since]


@pytest.fixture
def backends():
    with Backend("a") as a, Backend("b") as b, Backend("c") as c:
        yield a, b, c


def check(interval="200ms", **extra) -> dict:
    return {
        "path": "/healthz",
        "interval": interval,
        "timeout": "150ms",
        "healthyThreshold": 2,
        "unhealthyThreshold": 2,
        "expectedStatus": [200],
        **extra,
    }


def static_gateway(gateway_factory, tmp_path, targets, **check_opts):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    config = {
        "services": [
            {
                "name": "web",
                "basePath": "/web",
                "targets": [t.url for t in targets],
                "healthCheck": check(**check_opts),
            }
        ],
        "monitoring": {"enabled": True},
    }
    return gateway_factory(config, workers=2, env={"RUNTIME_DIRECTORY": str(runtime)})


def seen(session: requests.Session, url: str, n: int = 12) -> set[str]:
    out = set()
    for _ in range(n):
        r = session.get(url, timeout=10)
        out.add(r.json()["server"] if r.status_code == 200 else f"http-{r.status_code}")
    return out


def targets_of(gw) -> dict[int, dict]:
    entry = gw.admin("services").json()["services"][0]
    return {t["port"]: t for t in entry["targets"]}


def test_a_failing_static_target_leaves_both_workers_and_comes_back(
    tmp_path, gateway_factory, backends
):
    a, b, _ = backends
    gw = static_gateway(gateway_factory, tmp_path, backends)
    sessions = one_session_per_worker(gw)
    url = gw.url + "/web/x"
    for session in sessions.values():
        eventually(lambda s=session: seen(s, url) == {"a", "b", "c"}, what="all three routed")

    b.set_health(503)
    failed_at = time.monotonic()
    for pid, session in sessions.items():
        eventually(
            lambda s=session: seen(s, url, 6) == {"a", "c"},
            timeout=5,
            what=f"b excluded on worker {pid}",
        )
    excluded_in = time.monotonic() - failed_at
    assert excluded_in < 5
    # Excluded means no request at all, on either worker, for as long as it fails.
    for session in sessions.values():
        assert seen(session, url, 40) == {"a", "c"}
    target = targets_of(gw)[b.port]
    assert target["healthy"] is False and target["meshHealthy"] is True
    assert target["check"]["status"] == "failing"
    assert target["check"]["lastStatus"] == 503
    assert "503" in target["check"]["reason"]
    assert targets_of(gw)[a.port]["check"]["status"] == "passing"
    assert gw.admin("services").json()["services"][0]["source"] == "static"
    assert f"endpoint http://127.0.0.1:{b.port} is failing" in gw.log()

    b.set_health(200)
    for pid, session in sessions.items():
        eventually(
            lambda s=session: seen(s, url, 12) == {"a", "b", "c"},
            timeout=5,
            what=f"b back on worker {pid}",
        )
    assert targets_of(gw)[b.port]["check"]["status"] == "passing"
    assert "is passing again" in gw.log()


def test_probes_come_from_one_process_only(tmp_path, gateway_factory, backends):
    a, _, _ = backends
    gw = static_gateway(gateway_factory, tmp_path, [a], interval="250ms")
    assert len(gw.worker_pids()) == 2
    eventually(lambda: len(a.probes()) >= 2, what="probes started")
    start = time.monotonic()
    time.sleep(3.0)
    window = [p for p in a.probes(start) if p[0] < start + 3.0]
    # One checker: about 3.0 / 0.25 = 12 probes (interval +/- 10%, plus the probe's own
    # time); a checker in each of the two workers would make about 24.
    assert 8 <= len(window) <= 16, len(window)
    assert {p[1] for p in window} == {f"odin-gw-health/{__version__}"}
    assert {p[2] for p in window} == {f"127.0.0.1:{a.port}"}
    mesh = gw.admin("mesh").json()
    assert mesh["leaderPid"] in gw.worker_pids()
    assert mesh["healthChecks"]["services"] == ["web"]
    metrics = requests.get(gw.url + "/metrics", timeout=10).text
    line = next((m for m in metrics.splitlines() if m.startswith("odin_health_checks_total{")), "")
    assert 'result="pass"' in line and 'service="web"' in line, line
    assert float(line.rsplit(" ", 1)[1]) >= len(window)


def test_a_new_leader_starts_from_the_published_verdicts(tmp_path, gateway_factory, backends):
    _, b, _ = backends
    b.set_health(503)
    # Slow to judge: a leader starting from scratch would route to b for ~2 s.
    gw = static_gateway(
        gateway_factory, tmp_path, backends, interval="500ms", timeout="200ms", unhealthyThreshold=4
    )
    eventually(
        lambda: targets_of(gw)[b.port]["check"]["status"] == "failing",
        timeout=8,
        what="b failing",
    )
    time.sleep(0.6)  # every worker has read the snapshot that says so
    leader = gw.admin("mesh").json()["leaderPid"]
    os.kill(leader, signal.SIGKILL)
    got: list[str] = []
    deadline = time.monotonic() + 3.0
    session = requests.Session()
    while time.monotonic() < deadline:
        try:
            r = session.get(gw.url + "/web/x", timeout=5)
            got.append(r.json()["server"] if r.status_code == 200 else f"http-{r.status_code}")
        except requests.RequestException:
            session = requests.Session()  # the killed worker's connection
        time.sleep(0.01)
    assert len(got) > 50 and set(got) <= {"a", "c"}, sorted(set(got))
    new_leader = eventually(
        lambda: (pid := gw.admin("mesh").json()["leaderPid"]) != leader and pid,
        what="a new leader",
    )
    assert new_leader in gw.worker_pids()
    assert targets_of(gw)[b.port]["check"]["status"] == "failing"


def test_consul_passing_but_failing_its_check_is_not_routed(gateway_factory, backends):
    a, b, _ = backends
    a.set_health(503)
    with ConsulDouble() as consul:
        consul.register("web", id="web-a", port=a.port)
        consul.register("web", id="web-b", port=b.port)
        services = [{"name": "web", "basePath": "/web", "healthCheck": check()}]
        gw = gateway_factory(consul_config(consul, services), workers=2)
        sessions = one_session_per_worker(gw)
        url = gw.url + "/web/x"
        for pid, session in sessions.items():
            eventually(
                lambda s=session: seen(s, url, 8) == {"b"}, timeout=8, what=f"a out on {pid}"
            )
        targets = {t["serviceId"]: t for t in gw.admin("services").json()["services"][0]["targets"]}
        assert targets["web-a"]["status"] == "passing"  # Consul's verdict
        assert targets["web-a"]["meshHealthy"] is True
        assert targets["web-a"]["check"]["status"] == "failing"  # the active check's
        assert targets["web-a"]["healthy"] is False and targets["web-a"]["active"] is False
        assert targets["web-b"]["check"]["status"] == "passing"
        assert targets["web-b"]["healthy"] is True
        # Consul's critical wins over a passing check, and the check over Consul's passing.
        consul.set_status("web-b", "critical")
        eventually(
            lambda: (
                {
                    t["serviceId"]: (t["meshHealthy"], t["check"]["status"], t["healthy"])
                    for t in gw.admin("services").json()["services"][0]["targets"]
                }["web-b"]
                == (False, "passing", False)
            ),
            what="b critical in Consul",
        )
        a.set_health(200)
        for pid, session in sessions.items():
            eventually(
                lambda s=session: seen(s, url, 8) == {"a"}, timeout=8, what=f"a back on {pid}"
            )


def test_connect_mtls_probes_check_identity_like_requests(gateway_factory):
    ca = CertificateAuthority()
    with (
        ConsulDouble(ca=ca) as consul,
        MeshBackend(ca, "good", "web") as good,
        MeshBackend(ca, "evil", "web", identity_of="billing") as evil,
    ):
        consul.register("web", id="web-good", port=9, connect_proxy_port=good.port)
        consul.register("web", id="web-evil", port=9, connect_proxy_port=evil.port)
        cfg = consul_config(
            consul,
            [{"name": "web", "basePath": "/web", "healthCheck": check()}],
            enableConnect=True,
        )
        cfg["serviceMesh"]["mtlsEnabled"] = True
        gw = gateway_factory(cfg, workers=2)

        def checks():
            entry = gw.admin("services").json()["services"][0]
            return {t["port"]: t["check"] for t in entry["targets"]}

        eventually(
            lambda: (
                (c := checks())[evil.port]["status"] == "failing"
                and c[good.port]["status"] == "passing"
            ),
            timeout=8,
            what="verdicts",
        )
        # Both workers follow the leader's verdicts (the one asked above may be ahead).
        eventually(
            lambda: (
                "identity" in (checks()[evil.port]["reason"] or "")
                and "identity" in (checks()[evil.port]["reason"] or "")
            ),
            timeout=8,
            what="the identity failure on every worker",
        )
        assert evil.requests == 0  # neither probes nor requests reached the impostor
        probes = [s for s in good.seen if s["path"] == "/healthz"]
        assert probes, "the good backend was probed"
        gateway_id = consul_service_uri(ca.trust_domain, "odin-gateway")
        assert {tuple(p["peer"]) for p in probes} == {(gateway_id,)}  # our mesh certificate
        agents = {dict(p["headers"])["User-Agent"] for p in probes}
        assert agents == {f"odin-gw-health/{__version__}"}
        time.sleep(0.6)  # every worker has the snapshot that says so
        codes = [requests.get(gw.url + "/web/x", timeout=10).status_code for _ in range(20)]
        assert codes == [200] * 20
