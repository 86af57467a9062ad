"""Live reload (``SIGHUP``, ``POST /admin/reload``) and graceful shutdown, with real gunicorn.

Reloads under continuous load must fail no request (kept-alive and new connections,
uploads, connections left idle while the old workers stop); a route added or removed is
served within seconds, the discovery leader included (it hands over at once even with a
request still running on it); a broken file changes nothing and is reported; requests
in flight get ``server.gracefulTimeout`` to finish, on shutdown and on reload, and are
cut past it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.doubles.consul import ConsulDouble
from tests.integration.consul_helpers import Traffic, consul_config, eventually, servers
from tests.support.gateway import ROOT

pytestmark = pytest.mark.integration

UPLOAD = b"u" * 4096


def svc(name, url, **extra):
    return {"name": name, "basePath": f"/{name}", "targets": [url], **extra}


def reload_status(gw) -> dict:
    return gw.admin("reload").json()  # a new connection: a worker that still accepts


def wait_reloaded(gw, old_pids, generation, timeout=20.0) -> dict:
    """Until the master serves ``generation`` and every worker is a new one."""

    def done():
        pids = set(gw.worker_pids())
        status = reload_status(gw)
        served = status["served"] or {}
        if served.get("generation") == generation and pids and not pids & set(old_pids):
            return status
        return None

    return eventually(done, timeout=timeout, what=f"generation {generation} served")


def check_config_problems(path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "odin_gw.cli", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    lines = out.stderr.splitlines()
    assert lines[0] == f"{path}: invalid configuration"
    return [line.strip() for line in lines[1:]]


class Load:
    """Client threads sending requests until stopped (each bounded to 120 s).

    Kinds: ``keepalive`` (one kept-alive session), ``fresh`` (a new connection per
    request), ``upload`` (4 KiB POSTs on a kept-alive session), ``idle`` (a kept-alive
    session left idle up to 2.5 s between requests: its connection may be idle when its
    worker stops). Every answer must be a 200 from the expected upstream; anything else
    (status, exception, wrong body) is kept in ``failures``.
    """

    def __init__(self, url: str, kinds: list[str], server: str = "a") -> None:
        self.url = url
        self.server = server
        self.count = 0
        self.slowest = 0.0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(kind, i), daemon=True)
            for i, kind in enumerate(kinds)
        ]

    def _one(self, kind: str, session: requests.Session) -> str | None:
        if kind == "fresh":
            r = requests.get(self.url, timeout=15, headers={"Connection": "close"})
        elif kind == "upload":
            r = session.post(self.url, data=UPLOAD, timeout=15)
        else:
            r = session.get(self.url, timeout=15)
        if r.status_code != 200:
            return f"{kind}: {r.status_code} {r.text[:200]}"
        body = r.json()
        if body["server"] != self.server:
            return f"{kind}: answered by {body['server']}"
        if kind == "upload" and body["bodyBytes"] != len(UPLOAD):
            return f"upload: {body['bodyBytes']} bytes arrived"
        return None

    def _run(self, kind: str, seed: int) -> None:
        rnd = random.Random(seed)
        session = requests.Session()
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                failure = self._one(kind, session)
            except requests.RequestException as exc:
                failure = f"{kind}: {exc!r}"
            took = time.monotonic() - start
            with self._lock:
                self.count += 1
                self.slowest = max(self.slowest, took)
                if failure:
                    self.failures.append(failure)
            self._stop.wait(rnd.uniform(0.2, 2.5) if kind == "idle" else 0.005)
        session.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)


def test_reloads_under_load_fail_no_request(gateway_factory, upstream, upstream_b):
    config = {"services": [svc("web", upstream.url)], "server": {"gracefulTimeout": "10s"}}
    gw = gateway_factory(config, workers=2, threads=8)
    assert reload_status(gw)["served"]["generation"] == 1
    kinds = ["keepalive", "keepalive", "fresh", "fresh", "upload", "idle", "idle", "idle"]
    with Load(gw.url + "/web/x", kinds) as load:
        time.sleep(1.0)
        for generation in range(2, 6):
            extra = [svc("extra", upstream_b.url)] if generation % 2 == 0 else []
            gw.write_config({**gw.config, "services": [svc("web", upstream.url), *extra]})
            old = gw.worker_pids()
            if generation % 2 == 0:
                gw.reload()  # SIGHUP
            else:
                assert gw.admin("reload", method="POST").status_code == 202
            wait_reloaded(gw, old, generation)
            expected = 200 if extra else 404
            assert requests.get(gw.url + "/extra/x", timeout=5).status_code == expected
            time.sleep(1.0)  # load on the new workers before the next reload
    assert load.failures == [], load.failures[:10]
    assert load.count > 300, load.count
    assert gw.log().count("reloaded (generation") == 4
    assert "Traceback" not in gw.log()


def test_admin_reload_adds_and_removes_routes(gateway_factory, upstream, upstream_b):
    gw = gateway_factory({"services": [svc("web", upstream.url), svc("old", upstream_b.url)]})
    before = reload_status(gw)
    assert before["masterPid"] == gw.proc.pid
    assert before["lastAttempt"]["outcome"] == "applied"
    assert servers(gw, "/old/x", 2) == {"b"}
    gw.write_config(
        {**gw.config, "services": [svc("web", upstream.url), svc("new", upstream_b.url)]}
    )
    old = gw.worker_pids()
    r = gw.admin("reload", method="POST")
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["status"] == "reloading" and answer["masterPid"] == gw.proc.pid
    assert answer["changed"] is True and answer["services"] == 2
    assert answer["servedGeneration"] == 1 and answer["path"] == gw.config_path
    started = time.monotonic()
    after = wait_reloaded(gw, old, 2, timeout=10)
    assert servers(gw, "/new/x", 4) == {"b"}
    assert servers(gw, "/old/x", 4) == {"http-404"}
    assert servers(gw, "/web/x", 4) == {"a"}
    assert time.monotonic() - started < 10
    assert after["served"]["digest"] == answer["digest"] != before["served"]["digest"]
    assert after["served"]["loadedAt"] > before["served"]["loadedAt"]
    assert after["lastAttempt"] == {
        **after["lastAttempt"],
        "outcome": "applied",
        "generation": 2,
        "problems": [],
    }
    assert "reload requested (POST /admin/reload)" in gw.log()
    # The same file again: reloaded all the same, and said to be unchanged.
    again = gw.admin("reload", method="POST").json()
    assert again["changed"] is False and again["digest"] == answer["digest"]


def test_a_broken_reload_changes_nothing(gateway_factory, upstream, upstream_b):
    gw = gateway_factory({"services": [svc("web", upstream.url)]}, workers=2)
    before = reload_status(gw)
    served_config = gw.admin("config").json()
    broken = {
        **gw.config,
        "server": {**gw.config["server"], "gracefulTimeout": "soon"},
        "services": [
            {"name": "web", "basePath": "/web", "targetz": [upstream_b.url]},
            svc("creds", "http://alice:pa55w0rd-xyz@127.0.0.1:9"),
        ],
    }
    gw.write_config(broken)
    expected = [
        p.replace("alice:pa55w0rd-xyz@", "<redacted>@")
        for p in check_config_problems(gw.config_path)
    ]
    assert len(expected) == 4, expected
    pids = gw.worker_pids()

    r = gw.admin("reload", method="POST")
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "invalid_config" and body["problems"] == expected
    assert "pa55w0rd" not in r.text
    time.sleep(1.0)
    assert sorted(gw.worker_pids()) == sorted(pids), "nothing was signalled"
    now = reload_status(gw)
    assert (now["served"], now["lastAttempt"]) == (before["served"], before["lastAttempt"])
    assert servers(gw, "/web/x", 6) == {"a"}
    assert "reload refused (POST /admin/reload)" in gw.log()

    gw.reload()  # SIGHUP with the same file: the master refuses it too
    eventually(lambda: "reload refused, the running" in gw.log(), what="refusal logged")
    status = wait_reloaded(gw, pids, 1)
    assert status["served"] == before["served"]
    assert status["lastAttempt"]["outcome"] == "refused"
    assert status["lastAttempt"]["problems"] == expected
    assert servers(gw, "/web/x", 6) == {"a"}
    assert gw.admin("config").json() == served_config
    assert requests.get(gw.url + "/ready", timeout=5).status_code == 200
    assert "pa55w0rd" not in gw.log()
    assert gw.proc.poll() is None


@pytest.fixture
def consul():
    with ConsulDouble() as c:
        yield c


def test_reload_hands_discovery_over_at_once(consul, gateway_factory, upstream, upstream_b):
    """One worker, so it is the leader; a slow request keeps it draining for 6 s."""
    consul.register("web", id="web-a", port=upstream.port)
    consul.register("api", id="api-b", port=upstream_b.port)
    consul.register("gone", id="gone-b", port=upstream_b.port)
    config = consul_config(consul, [{"name": n, "basePath": f"/{n}"} for n in ("web", "gone")])
    config["server"] = {"gracefulTimeout": "15s"}
    gw = gateway_factory(config, workers=1)
    mesh = gw.admin("mesh").json()
    assert mesh["leaderPid"] == gw.worker_pids()[0]
    assert servers(gw, "/gone/x", 2) == {"b"}

    slow: dict = {}

    def slow_request():
        try:
            slow["status"] = requests.get(gw.url + "/web/slow?ms=6000", timeout=30).status_code
        except requests.RequestException as exc:
            slow["status"] = repr(exc)

    thread = threading.Thread(target=slow_request, daemon=True)
    thread.start()
    eventually(lambda: any(s["path"] == "/web/slow" for s in upstream.seen), what="slow sent")
    new = {**gw.config, "services": [{"name": n, "basePath": f"/{n}"} for n in ("web", "api")]}
    with Traffic(gw.url + "/web/x") as traffic:
        gw.write_config(new)
        assert gw.admin("reload", method="POST").status_code == 202
        started = time.monotonic()
        eventually(lambda: servers(gw, "/api/x", 2) == {"b"}, timeout=5, what="api discovered")
        took = time.monotonic() - started
        assert thread.is_alive(), "the old leader is still draining its slow request"
        assert servers(gw, "/gone/x", 2) == {"http-404"}
        # The new leader shares only what its configuration discovers.
        snapshot = os.path.join(gw.config["serviceMesh"]["stateDir"], "snapshot.json")
        eventually(
            lambda: set(json.loads(Path(snapshot).read_text())["services"]) == {"web", "api"},
            what="gone dropped from the shared snapshot",
        )
        # The new leader follows the services it kept, too.
        consul.register("web", id="web-b", port=upstream_b.port)
        eventually(lambda: servers(gw, "/web/x", 12) == {"a", "b"}, what="web-b followed")
    thread.join(15)
    assert slow["status"] == 200
    assert took < 5
    assert traffic.errors == [] and len(traffic.codes) > 20, traffic.errors[:5]
    after = gw.admin("mesh").json()
    assert after["leaderPid"] in gw.worker_pids() and after["leaderPid"] != mesh["leaderPid"]
    assert after["fingerprint"] != mesh["fingerprint"]
    assert "hands discovery over" in gw.log()


def slow_pair(gw, upstream, short_ms, long_ms) -> tuple[dict, list[threading.Thread]]:
    """Two slow requests in flight (both arrived upstream); their outcomes land in the dict
    as ``(status or exception, seconds)``."""
    results: dict = {}

    def call(name, ms):
        start = time.monotonic()
        try:
            r = requests.get(f"{gw.url}/web/slow?ms={ms}", timeout=30)
            results[name] = (r.status_code, time.monotonic() - start)
        except requests.RequestException as exc:
            results[name] = (type(exc).__name__, time.monotonic() - start)

    threads = [
        threading.Thread(target=call, args=(name, ms), daemon=True)
        for name, ms in (("short", short_ms), ("long", long_ms))
    ]
    for t in threads:
        t.start()
    eventually(
        lambda: sum(s["path"] == "/web/slow" for s in upstream.seen) == 2, what="both in flight"
    )
    return results, threads


GRACEFUL = 3.0
SLOW_SERVICE = {"timeout": "30s"}


def test_shutdown_drains_within_graceful_timeout_and_cuts_the_rest(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [svc("web", upstream.url, **SLOW_SERVICE)],
            "server": {"gracefulTimeout": f"{GRACEFUL:g}s"},
        }
    )
    results, threads = slow_pair(gw, upstream, 1500, 12000)
    started = time.monotonic()
    os.kill(gw.proc.pid, signal.SIGTERM)
    gw.proc.wait(timeout=GRACEFUL + 5)
    stopped = time.monotonic() - started
    for t in threads:
        t.join(15)
    assert results["short"][0] == 200
    kind, when = results["long"]
    assert kind == "ConnectionError", results
    assert GRACEFUL - 0.5 < when < GRACEFUL + 2.5, results
    assert stopped < GRACEFUL + 2.5


def test_reload_cuts_old_requests_past_graceful_timeout(gateway_factory, upstream):
    gw = gateway_factory(
        {
            "services": [svc("web", upstream.url, **SLOW_SERVICE)],
            "server": {"gracefulTimeout": f"{GRACEFUL:g}s"},
        }
    )
    old = gw.worker_pids()
    results, threads = slow_pair(gw, upstream, 1500, 12000)
    started = time.monotonic()
    gw.reload()
    wait_reloaded(gw, old, 2, timeout=GRACEFUL + 5)
    gone = time.monotonic() - started
    for t in threads:
        t.join(15)
    assert results["short"][0] == 200
    kind, when = results["long"]
    assert kind == "ConnectionError", results
    assert GRACEFUL - 0.5 < when < GRACEFUL + 2.5, results
    assert gone < GRACEFUL + 2.5
    assert "graceful timeout (3s) over: closing 1 connection(s)" in gw.log()
    assert servers(gw, "/web/x", 2) == {"a"}


def test_preloaded_app_is_built_again_on_reload(gateway_factory, upstream, upstream_b):
    gw = gateway_factory({"services": [svc("web", upstream.url)]}, workers=2, args=["--preload"])
    old = gw.worker_pids()
    gw.write_config(
        {**gw.config, "services": [svc("web", upstream.url), svc("new", upstream_b.url)]}
    )
    gw.reload()
    status = wait_reloaded(gw, old, 2)
    assert status["served"]["generation"] == 2  # the workers run the master's new copy
    assert servers(gw, "/new/x", 6) == {"b"}
    assert "preloaded app built again" in gw.log()
