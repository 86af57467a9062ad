"""Active health checks without sockets: the threshold state machine, folding verdicts
into snapshots, the bounded runner, and the leader's manager publishing them.

Probes are plain functions given to the checker (``probe=``); managers are driven by
calling their sync step, as ``test_state.py`` does. Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from odin_gw.config import parse_config
from odin_gw.config.traffic import HealthCheckConfig
from odin_gw.mesh.client import Discovery, StaticClient
from odin_gw.mesh.health_checks import (
    CheckedService,
    EndpointHealth,
    HealthChecker,
    ProbeResult,
    checked_services,
)
from odin_gw.mesh.manager import MeshManager, state_dir_for
from odin_gw.mesh.scheduler import MonotonicScheduler
from odin_gw.mesh.snapshot import (
    Endpoint,
    EndpointCheck,
    ServiceEndpoints,
    Snapshot,
    fingerprints,
)
from odin_gw.metrics import GatewayMetrics

CHECK = HealthCheckConfig(
    path="/healthz",
    interval=0.1,
    timeout=0.05,
    healthy_threshold=2,
    unhealthy_threshold=3,
    expected_status=frozenset({200}),
)
PASS = ProbeResult(True, None, 200)
FAIL = ProbeResult(False, "GET /healthz answered 503", 503)


def wait_for(check, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout}s")


# -- the state machine ---------------------------------------------------------------------
def run(results, start=None):
    state = EndpointHealth(start or EndpointCheck())
    changes = []
    for i, r in enumerate(results):
        verdict = state.record(r, CHECK, float(i))
        if verdict is not None:
            changes.append((i, verdict.status))
    return state, changes


def test_unknown_becomes_passing_on_the_first_pass():
    state, changes = run([PASS, PASS, PASS])
    assert changes == [(0, "passing")]
    assert state.verdict == EndpointCheck("passing", 0.0, None, 200)


def test_failing_after_unhealthy_threshold_failures_in_a_row():
    state, changes = run([PASS, FAIL, FAIL, PASS, FAIL, FAIL, FAIL, FAIL])
    assert changes == [(0, "passing"), (6, "failing")]  # the pass at 3 restarted the count
    assert state.verdict.reason == "GET /healthz answered 503"
    assert state.verdict.last_status == 503 and state.verdict.since == 6.0


def test_unknown_fails_only_at_the_threshold_too():
    _, changes = run([FAIL, FAIL, FAIL])
    assert changes == [(2, "failing")]


def test_failing_needs_healthy_threshold_passes_in_a_row():
    start = EndpointCheck("failing", 1.0, "refused", None)
    state, changes = run([PASS, FAIL, PASS, PASS, PASS], start)
    assert changes == [(3, "passing")]
    assert state.verdict.reason is None and state.verdict.last_status == 200


# -- folding into endpoints and snapshots --------------------------------------------------
def test_a_check_folds_into_healthy_and_keeps_the_mesh_verdict():
    e = Endpoint("10.0.0.1", 80, status="passing")
    failing = e.with_check(EndpointCheck("failing", 5.0, "timeout", None))
    assert failing.healthy is False and failing.mesh_healthy is True
    assert failing.key == e.key and failing.pool_key == e.pool_key
    unknown = failing.with_check(EndpointCheck("unknown", 6.0))
    assert unknown.healthy is True and unknown.mesh_healthy is True
    assert failing.with_check(None) == e
    mesh_down = Endpoint("10.0.0.2", 80, healthy=False, status="critical")
    passing = mesh_down.with_check(EndpointCheck("passing", 7.0))
    assert passing.healthy is False and passing.mesh_healthy is False
    # Whatever is passed, the two verdicts cannot disagree.
    odd = Endpoint("10.0.0.3", 80, healthy=True, check=EndpointCheck("failing"))
    assert odd.healthy is False and odd.mesh_healthy is True


def test_active_routes_mesh_healthy_and_not_failing():
    ok = Endpoint("10.0.0.1", 80).with_check(EndpointCheck("passing"))
    new = Endpoint("10.0.0.2", 80).with_check(EndpointCheck("unknown"))
    bad = Endpoint("10.0.0.3", 80).with_check(EndpointCheck("failing"))
    down = Endpoint("10.0.0.4", 80, healthy=False).with_check(EndpointCheck("passing"))
    svc = ServiceEndpoints("web", (ok, new, bad, down))
    assert svc.active() == ((ok, new), None)


def test_checks_and_static_targets_round_trip_through_json():
    static = Endpoint(
        "127.0.0.1", 8443, scheme="https", static=True, ca_file="/etc/ca.pem"
    ).with_check(EndpointCheck("failing", 12.5, "connect failed: refused", None))
    mesh = Endpoint("10.0.0.1", 80, status="warning", healthy=False).with_check(
        EndpointCheck("passing", 3.0, None, 204)
    )
    snap = Snapshot(mesh="consul").with_services(
        {
            "web": ServiceEndpoints("web", (static,), source="static"),
            "api": ServiceEndpoints("api", (mesh,), source="consul"),
        }
    )
    doc = json.loads(snap.to_json())
    web = doc["services"]["web"]["endpoints"][0]
    assert web["static"] is True and web["caFile"] == "/etc/ca.pem"
    assert web["healthy"] is False and web["meshHealthy"] is True
    assert web["check"] == {
        "status": "failing",
        "since": 12.5,
        "reason": "connect failed: refused",
        "lastStatus": None,
    }
    back = Snapshot.from_json(snap.to_json())
    assert back.services == snap.services
    assert back.services["web"].endpoints[0].pool_key == static.pool_key
    # A service without checks keeps its JSON form exactly.
    plain = Endpoint("10.0.0.9", 80).to_dict()
    assert "check" not in plain and "meshHealthy" not in plain and "static" not in plain


def test_a_bad_check_in_a_snapshot_is_refused():
    snap = Snapshot(mesh="none").with_services(
        {"web": ServiceEndpoints("web", (Endpoint("10.0.0.1", 80, check=EndpointCheck()),))}
    )
    doc = json.loads(snap.to_json())
    doc["services"]["web"]["endpoints"][0]["check"]["status"] = "sick"
    try:
        Snapshot.from_json(json.dumps(doc))
    except ValueError as exc:
        assert "check status" in str(exc)
    else:
        raise AssertionError("a bad check status was accepted")


# -- the checker (no thread) ----------------------------------------------------------------
def checker(published, **kw):
    static = ServiceEndpoints(
        "web",
        tuple(Endpoint("127.0.0.1", p, static=True) for p in (8001, 8002)),
        source="static",
    )
    services = {"web": CheckedService("web", CHECK, static, mesh=False)}
    return HealthChecker(services, published.append, probe=lambda e, c: PASS, **kw), static


def test_fold_marks_new_endpoints_unknown_and_keeps_unchanged_objects():
    published: list = []
    hc, _ = checker(published)
    folded = hc.entry("web", None)
    assert folded.source == "static"
    assert [e.check.status for e in folded.endpoints] == ["unknown", "unknown"]
    assert all(e.healthy for e in folded.endpoints)
    assert hc.entry("web", folded) is folded  # nothing changed: the same object
    other = ServiceEndpoints("api", (Endpoint("10.0.0.1", 80),), source="consul")
    assert hc.fold("api", other) is other  # not checked


def test_only_a_change_of_verdict_marks_a_service_to_publish():
    published: list = []
    hc, static = checker(published)
    hc.track(Snapshot().with_services({"web": hc.entry("web", None)}))
    key = static.endpoints[0].key
    assert hc.record("web", key, PASS).status == "passing"
    assert hc.record("web", key, PASS) is None
    assert [hc.record("web", key, FAIL) for _ in range(2)] == [None, None]
    verdict = hc.record("web", key, FAIL)
    assert verdict.status == "failing"
    folded = hc.entry("web", None)
    assert [e.healthy for e in folded.endpoints] == [False, True]
    assert folded.endpoints[0].check == verdict
    assert hc.record("web", "http://elsewhere:1", FAIL) is None  # not an endpoint of web


def test_endpoints_that_leave_are_no_longer_checked():
    published: list = []
    hc, static = checker(published)
    hc.track(Snapshot().with_services({"web": hc.entry("web", None)}))
    assert hc.describe()["endpoints"] == 2
    gone, kept = static.endpoints
    fewer = ServiceEndpoints("web", (kept,), source="static")
    hc.track(Snapshot().with_services({"web": hc.fold("web", fewer)}))
    assert hc.describe()["endpoints"] == 1
    assert hc.record("web", gone.key, FAIL) is None
    assert hc.record("web", kept.key, PASS).status == "passing"


def test_seed_carries_the_previous_leaders_verdicts():
    published: list = []
    hc, static = checker(published)
    bad = static.endpoints[1].with_check(EndpointCheck("failing", 9.0, "refused", None))
    prev = ServiceEndpoints("web", (static.endpoints[0], bad), source="static")
    hc.seed(Snapshot().with_services({"web": prev}))
    folded = hc.entry("web", prev)
    assert folded.endpoints[1].check == bad.check and folded.endpoints[1].healthy is False
    assert folded.endpoints[0].check.status == "unknown"


# -- the runner: bounded, spread, publishing only changes -----------------------------------
def test_the_runner_never_has_more_than_max_in_flight_and_spreads_first_probes():
    lock = threading.Lock()
    now_in, peak, first = [0], [0], {}
    started = time.monotonic()

    def probe(endpoint, check):
        with lock:
            now_in[0] += 1
            peak[0] = max(peak[0], now_in[0])
            first.setdefault(endpoint.port, time.monotonic() - started)
        time.sleep(0.01)
        with lock:
            now_in[0] -= 1
        return PASS

    check = HealthCheckConfig(path="/h", interval=0.4, timeout=0.1)
    static = ServiceEndpoints(
        "web", tuple(Endpoint("127.0.0.1", 9000 + i, static=True) for i in range(40))
    )
    published: list = []
    hc = HealthChecker(
        {"web": CheckedService("web", check, static, False)},
        published.append,
        probe=probe,
        max_in_flight=3,
    )
    hc.track(Snapshot().with_services({"web": hc.entry("web", None)}))
    hc.start()
    try:
        wait_for(lambda: len(first) == 40, timeout=5, what="every endpoint probed")
        wait_for(lambda: published, timeout=2, what="a publish")
    finally:
        hc.stop()
    assert peak[0] <= 3
    spread = sorted(first.values())
    assert spread[-1] - spread[0] > 0.15, spread  # not all at once: jitter over the interval
    # 40 first passes (unknown -> passing), published in a few batches, not 40 times.
    assert 1 <= hc.publishes <= 10 and hc.publishes < hc.probes


def test_the_runner_starts_no_more_than_max_rate_probes_a_second(caplog):
    starts: list[float] = []
    check = HealthCheckConfig(path="/h", interval=0.1, timeout=0.05)
    static = ServiceEndpoints(
        "web", tuple(Endpoint("127.0.0.1", 9000 + i, static=True) for i in range(40))
    )
    hc = HealthChecker(
        {"web": CheckedService("web", check, static, False)},
        lambda names: None,
        probe=lambda e, c: starts.append(time.monotonic()) or PASS,
        max_rate=20,
    )
    hc.track(Snapshot().with_services({"web": hc.entry("web", None)}))
    with caplog.at_level(logging.WARNING, "odin_gw.mesh.health"):
        began = time.monotonic()
        hc.start()
        time.sleep(1.0)
        hc.stop()
    in_a_second = [t for t in starts if t - began <= 1.0]
    # 40 endpoints every 0.1 s would be 400 a second; 20 a second (and a burst of 2).
    assert 12 <= len(in_a_second) <= 23, len(in_a_second)
    assert hc.describe()["lateProbes"] > 0
    assert caplog.text.count("health checks fall behind their interval") == 1


def test_the_runner_stops_cleanly_and_drops_late_results():
    release = threading.Event()

    def probe(endpoint, check):
        release.wait(2)
        return FAIL

    published: list = []
    hc, _ = checker(published)
    hc = HealthChecker(hc.services, published.append, probe=probe, max_in_flight=2)
    hc.track(Snapshot().with_services({"web": hc.entry("web", None)}))
    hc.start()
    wait_for(lambda: hc.describe()["inFlight"] == 2, timeout=2, what="probes in flight")
    began = time.monotonic()
    hc.stop()
    assert time.monotonic() - began < 1.5
    release.set()
    wait_for(lambda: hc.describe()["inFlight"] == 0, timeout=2, what="probes ended")
    assert published == [] and hc.describe()["probes"] == 2


# -- which services are checked --------------------------------------------------------------
HC = "healthCheck: {path: /healthz, interval: 1s, timeout: 500ms}"


def test_checked_services_by_mesh_mode():
    none = parse_config(
        "services:\n"
        f" - name: web\n   basePath: /web\n   targets: ['http://127.0.0.1:1']\n   {HC}\n"
        "   groups: {canary: {targets: ['http://127.0.0.1:2']}, m: {meshService: web-m}}\n"
        " - {name: api, basePath: /api, targets: ['http://127.0.0.1:3']}\n"
    )
    checked = checked_services(none)
    assert set(checked) == {"web", "web/canary"}  # no mesh: web/m has nothing to probe
    assert [e.port for e in checked["web/canary"].static.endpoints] == [2]
    assert not checked["web"].mesh
    consul = parse_config(
        "serviceMesh: {enabled: true, type: consul}\nservices:\n"
        f" - name: web\n   basePath: /web\n   targets: ['http://127.0.0.1:1']\n   {HC}\n"
        "   groups: {canary: {targets: ['http://127.0.0.1:2']}, m: {meshService: web-m}}\n"
    )
    checked = checked_services(consul)
    assert set(checked) == {"web", "web/canary", "web-m"}
    assert checked["web"].mesh and checked["web"].static is not None
    assert checked["web-m"].mesh and checked["web-m"].static is None
    assert not checked["web/canary"].mesh


def test_sidecar_modes_ignore_checks_with_a_warning(caplog):
    cfg = parse_config(
        "serviceMesh: {enabled: true, type: consul, consul: {connectMode: sidecar}}\n"
        f"services:\n - name: web\n   basePath: /web\n   {HC}\n"
    )
    with caplog.at_level(logging.WARNING, "odin_gw.mesh.health"):
        assert checked_services(cfg) == {}
    assert "healthCheck is ignored for web" in caplog.text


def test_fingerprint_covers_checked_targets_only_when_there_are_checks():
    base = "services:\n - {name: web, basePath: /web, targets: ['http://127.0.0.1:1']}\n"
    plain = parse_config(base)
    other_target = parse_config(base.replace(":1'", ":2'"))
    assert fingerprints(plain) == fingerprints(other_target)  # unchanged without checks
    checked = parse_config(base.replace("]}", f"], {HC}}}"))
    moved = parse_config(base.replace(":1'", ":2'").replace("]}", f"], {HC}}}"))
    assert fingerprints(checked)[0] == fingerprints(plain)[0]  # same origin
    assert len({fingerprints(plain)[1], fingerprints(checked)[1], fingerprints(moved)[1]}) == 3


# -- the manager: leader only, folded into what it publishes ---------------------------------
def none_config(state, check=HC):
    return parse_config(
        f"serviceMesh: {{stateDir: '{state}'}}\nservices:\n"
        " - name: web\n   basePath: /web\n"
        "   targets: ['http://127.0.0.1:8001', 'http://127.0.0.1:8002', 'http://127.0.0.1:8003']\n"
        f"   {check}\n"
    )


def manager(cfg, probe):
    seen: list = []
    mgr = MeshManager(
        cfg, GatewayMetrics(), lambda s, t: seen.append(s), StaticClient(), probe=probe
    )
    mgr._scheduler = MonotonicScheduler()  # not started: the sync step is called directly
    return mgr, seen


def verdicts(snap, name="web"):
    svc = snap.services.get(name)
    return {e.port: (e.healthy, e.check.status) for e in svc.endpoints} if svc else {}


FAST = "healthCheck: {path: /healthz, interval: 100ms, timeout: 50ms, unhealthyThreshold: 2}"


def test_no_mesh_with_checks_elects_a_leader_that_publishes_static_verdicts(tmp_path):
    state = tmp_path / "state"
    bad = {8002}
    calls: list = []

    def probe(endpoint, check):
        calls.append((endpoint.port, endpoint.host_header, check.path))
        return FAIL if endpoint.port in bad else PASS

    cfg = none_config(state, FAST)
    assert state_dir_for(cfg) == str(state)
    leader, _ = manager(cfg, probe)
    follower, seen = manager(cfg, lambda e, c: PASS)
    try:
        leader._sync()
        assert leader.leading and leader.health is not None
        assert verdicts(leader.snapshot) == {
            8001: (True, "unknown"),
            8002: (True, "unknown"),
            8003: (True, "unknown"),
        }
        wait_for(
            lambda: (
                verdicts(leader.snapshot)
                == {8001: (True, "passing"), 8002: (False, "failing"), 8003: (True, "passing")}
            ),
            what="verdicts published",
        )
        assert ("127.0.0.1", 8002) not in [(e.address, e.port) for e in _active(leader)]
        assert {c[1:] for c in calls} >= {("127.0.0.1:8001", "/healthz")}
        follower._sync()
        assert not follower.leading and follower.health is None
        assert verdicts(follower.snapshot) == verdicts(leader.snapshot)
        assert follower.snapshot.services["web"].source == "static"
        assert all(e.static for e in follower.snapshot.services["web"].endpoints)
        doc = follower.status()["healthChecks"]
        assert doc["endpoints"] == {"unknown": 0, "passing": 2, "failing": 1}
        assert "leader" not in doc and leader.status()["healthChecks"]["leader"]["probes"] > 3
        # Verdicts that do not change are not published again.
        version = leader.snapshot.version
        time.sleep(0.5)
        assert leader.snapshot.version == version
        # The leader steps down: the follower takes over from the verdicts published.
        leader.stop()
        follower._sync()
        assert follower.leading
        assert verdicts(follower.snapshot)[8002] == (False, "failing")  # before any probe
        wait_for(
            lambda: verdicts(follower.snapshot)[8002] == (True, "passing"),
            what="healed under the new leader",
        )
        assert seen[-1] is follower.snapshot
    finally:
        leader.stop()
        follower.stop()
    assert leader.health is None and follower.health is None


def _active(mgr):
    return mgr.snapshot.services["web"].active()[0]


def test_without_checks_no_mesh_still_needs_no_leader(tmp_path):
    cfg = none_config(tmp_path / "never", check="retries: 1")
    mgr, _ = manager(cfg, None)
    assert state_dir_for(cfg) is None and not mgr.leads and not mgr.checked
    mgr._scheduler = None
    mgr.start()
    mgr.stop()
    assert not (tmp_path / "never").exists()


def test_mesh_answers_are_folded_and_unchanged_answers_keep_their_object(tmp_path):
    cfg = parse_config(
        f"serviceMesh: {{enabled: true, type: consul, stateDir: '{tmp_path}'}}\n"
        f"services:\n - name: web\n   basePath: /web\n   {FAST}\n"
        " - {name: api, basePath: /api}\n"
    )
    mgr, _ = manager(cfg, lambda e, c: FAIL if e.port == 81 else PASS)
    answer = ServiceEndpoints(
        "web",
        (
            Endpoint("10.0.0.1", 80),
            Endpoint("10.0.0.1", 81),
            Endpoint("10.0.0.1", 82, healthy=False, status="critical"),
        ),
        source="consul",
    )
    api = ServiceEndpoints("api", (Endpoint("10.0.0.2", 80),), source="consul")
    try:
        mgr._sync()
        assert mgr.leading
        mgr.publish(Discovery(services={"web": answer, "api": api}))
        assert mgr.snapshot.services["api"] == api  # not checked: as the mesh said
        wait_for(
            lambda: (
                verdicts(mgr.snapshot)
                == {80: (True, "passing"), 81: (False, "failing"), 82: (False, "passing")}
            ),
            what="verdicts folded",
        )
        web = mgr.snapshot.services["web"]
        assert [e.mesh_healthy for e in web.endpoints] == [True, True, False]
        mgr.publish(Discovery(services={"web": answer, "api": api}))
        assert mgr.snapshot.services["web"] is web  # the same answer: the same object
        on_disk = json.loads((tmp_path / "snapshot.json").read_text())
        journal = (tmp_path / "snapshot.journal").read_text()
        assert '"failing"' in journal or '"failing"' in json.dumps(on_disk)
    finally:
        mgr.stop()
