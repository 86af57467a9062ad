"""The state dir and its snapshot: ownership, identity, fingerprints, leader health, clock.

No gunicorn here: managers are driven by calling their sync step directly; two managers
in one process compete for the same lock files as two workers would (``flock`` is per
open file, so two opens in one process exclude each other).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from odin_gw.config import parse_config
from odin_gw.mesh import scheduler as scheduler_mod
from odin_gw.mesh.client import Discovery, StaticClient
from odin_gw.mesh.manager import MeshManager, state_dir_for
from odin_gw.mesh.scheduler import MonotonicScheduler
from odin_gw.mesh.snapshot import SNAPSHOT_FORMAT, Endpoint, ServiceEndpoints, Snapshot
from odin_gw.mesh.state import StateDir, StateDirError, check_private_dir, default_state_dir
from odin_gw.mesh.tls import TlsMaterial
from odin_gw.metrics import GatewayMetrics
from tests.doubles.pki import CertificateAuthority, consul_service_uri

SERVICES = "services:\n - {name: web, basePath: /web}\n - {name: api, basePath: /api}\n"


def make_config(state, services=SERVICES, http_addr="http://127.0.0.1:8500", enabled=True):
    return parse_config(
        f"serviceMesh:\n  enabled: {str(enabled).lower()}\n  type: consul\n"
        f"  readyGracePeriod: 0s\n  refreshInterval: 1s\n  stateDir: {state}\n"
        f"  consul: {{httpAddr: '{http_addr}'}}\n{services}"
    )


def make_manager(state, **kw) -> MeshManager:
    mgr = MeshManager(make_config(state, **kw), GatewayMetrics(), lambda s, t: None, StaticClient())
    mgr._scheduler = MonotonicScheduler()  # not started: jobs stay pending
    return mgr


def svc(name, port=80):
    return ServiceEndpoints(name, (Endpoint("10.0.0.1", port),), source="consul")


# -- ownership -----------------------------------------------------------------------------
def test_state_dir_is_created_private(tmp_path):
    path = tmp_path / "parent" / "state"
    check_private_dir(str(path))
    assert path.stat().st_mode & 0o777 == 0o700


def test_a_world_writable_state_dir_is_refused(tmp_path):
    path = tmp_path / "odin-gw-8080"
    path.mkdir()
    path.chmod(0o777)
    (path / "snapshot.json").write_text("{}")
    with pytest.raises(StateDirError) as info:
        check_private_dir(str(path))
    assert str(path) in str(info.value) and "0777" in str(info.value)


def test_a_state_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "s"
    path.mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(StateDirError, match="owned by uid"):
        check_private_dir(str(path))


def test_symlinks_are_not_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateDirError, match="symbolic link"):
        check_private_dir(str(link))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (tmp_path / "elsewhere.json").write_text(Snapshot(mesh="consul").to_json())
    (state / "snapshot.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(OSError):
        StateDir(str(state)).read_snapshot()


def test_no_state_dir_without_a_mesh(tmp_path):
    state = tmp_path / "never"
    mgr = MeshManager(
        make_config(
            state,
            enabled=False,
            services="services:\n - {name: web, basePath: /web, targets: ['http://127.0.0.1:9']}\n",
        ),
        GatewayMetrics(),
        lambda s, t: None,
        StaticClient(),
    )
    assert state_dir_for(mgr.config) is None
    mgr.start()
    mgr.stop()
    assert not state.exists()


def test_an_unusable_state_dir_is_one_error_and_not_ready(tmp_path, caplog):
    state = tmp_path / "shared"
    state.mkdir()
    state.chmod(0o777)
    mgr = make_manager(state)
    mgr._scheduler = None
    with caplog.at_level(logging.ERROR, "odin_gw.mesh"):
        mgr.start()
        for _ in range(5):
            mgr._sync()
        mgr.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(state) in errors[0].getMessage()
    ok, why = mgr.ready()
    assert ok is False and "0777" in why and str(state) in why
    assert not mgr.state.leading


def test_key_material_is_written_0600(tmp_path):
    ca = CertificateAuthority()
    leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, "odin-gateway"))
    state = StateDir(str(tmp_path / "s"))
    state.ensure()
    state.write_tls(TlsMaterial(leaf.cert_pem, leaf.key_pem, ca.cert_pem, source="test"))
    assert os.stat(state.tls_path).st_mode & 0o777 == 0o600


# -- one state dir per instance ------------------------------------------------------------
def test_default_state_dir_is_keyed_on_binds_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    a = default_state_dir(8080, "/etc/a.yaml", "http://127.0.0.1:9001")
    b = default_state_dir(8080, "/etc/b.yaml", "http://127.0.0.1:9002")
    c = default_state_dir(8080, "/etc/b.yaml", "http://127.0.0.1:9001")
    assert len({a, b, c}) == 3
    assert a == default_state_dir(8080, "/etc/a.yaml", "http://127.0.0.1:9001")
    assert os.path.dirname(a) == str(tmp_path)
    assert os.path.basename(a).startswith("odin-gw-9001-")


# -- snapshot format and fingerprint ---------------------------------------------------------
BAD_DOCUMENTS = [
    "[]",
    "{}",
    '{"services": {}}',  # no format: an older gateway's file
    json.dumps({"format": 1, "services": {}}),
    json.dumps({"format": SNAPSHOT_FORMAT, "mesh": "consul", "origin": "", "fingerprint": ""}),
]


def _doc(**changes):
    doc = json.loads(Snapshot(mesh="consul").with_services({"web": svc("web")}).to_json())
    doc.update(changes)
    return json.dumps(doc)


BAD_DOCUMENTS += [
    _doc(tls=5),
    _doc(catalog=5),
    _doc(leaderPid="x"),
    _doc(refreshedAt="yesterday"),
    _doc(services={"web": 5}),
    _doc(services={"web": {"name": "web", "endpoints": 5}}),
    _doc(services={"web": {"name": "web", "endpoints": [[1]]}}),
    _doc(services={"web": {"name": "web", "endpoints": [{"address": "a", "port": "x"}]}}),
    _doc(services={"web": {"name": "api", "endpoints": []}}),
]


@pytest.mark.parametrize("text", BAD_DOCUMENTS)
def test_a_document_of_the_wrong_shape_is_a_value_error(text):
    with pytest.raises(ValueError):
        Snapshot.from_json(text)


def test_a_wrong_shape_snapshot_does_not_break_start(tmp_path, caplog):
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "snapshot.json").write_text(_doc(tls=5))
    mgr = make_manager(state)
    mgr._scheduler = None
    with caplog.at_level(logging.WARNING, "odin_gw.mesh"):
        mgr.start()  # the sync job starts too; it must not log the file again
        time.sleep(0.3)
        mgr.stop()
    assert dict(mgr.snapshot.services) == {}
    assert sum("ignoring snapshot file" in r.getMessage() for r in caplog.records) == 1


def _published(state, **kw) -> MeshManager:
    mgr = make_manager(state, **kw)
    assert mgr.state.try_lead()
    mgr.publish(Discovery(services={"web": svc("web"), "api": svc("api")}))
    mgr.state.resign()
    return mgr


def test_a_follower_never_loads_another_fingerprint(tmp_path):
    _published(tmp_path)
    other = make_manager(tmp_path, services="services:\n - {name: web, basePath: /web}\n")
    other._load_from_disk()
    assert dict(other.snapshot.services) == {}


def test_warm_cache_of_a_changed_config_keeps_only_unchanged_services(tmp_path):
    _published(tmp_path)
    fewer = make_manager(
        tmp_path,
        services="services:\n - {name: web, basePath: /web}\n - {name: db, basePath: /db}\n",
    )
    fewer._load_from_disk(initial=True)
    assert set(fewer.snapshot.services) == {"web"}  # api left the config, db is new
    assert fewer.snapshot.warm and fewer.snapshot.fingerprint == fewer.fingerprint
    moved = make_manager(tmp_path, http_addr="http://127.0.0.2:8500")
    moved._load_from_disk(initial=True)
    assert dict(moved.snapshot.services) == {}  # another control plane: nothing is valid


# -- lock identity and leader health -----------------------------------------------------------
def test_a_deleted_lock_or_dir_is_recreated_and_one_leader_stays(tmp_path):
    state = tmp_path / "s"
    a, b = make_manager(state), make_manager(state)
    a._sync_leadership()
    b._sync_leadership()
    assert a.state.leading and not b.state.leading
    os.unlink(a.state.lock_path_for(0))
    b._sync_leadership()  # creates a new lock file and takes it
    a._sync_leadership()  # sees its lock is no longer the lock file: steps down
    assert [a.state.leading, b.state.leading].count(True) == 1
    for path in state.iterdir():
        path.unlink()
    state.rmdir()
    a._sync_leadership()
    b._sync_leadership()
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    assert [a.state.leading, b.state.leading].count(True) == 1
    a.stop()
    b.stop()


def test_a_hung_leader_is_replaced_in_a_new_generation(tmp_path):
    state = tmp_path / "s"
    a, b = make_manager(state), make_manager(state)
    a._sync_leadership()
    b.stale_after = 0.3
    b._sync_leadership()
    assert a.state.leading and not b.state.leading and b.leader_stale is None
    time.sleep(0.5)  # a is "stopped": no sync, no heartbeat
    b._sync_leadership()
    assert b.state.leading and b.state.term == 1
    assert a.state.generation() == 1
    status = b.status()
    assert status["generation"] == 1 and status["leaderPid"] == os.getpid()
    a._sync_leadership()  # a runs again: the generation moved, it steps down
    assert not a.state.leading
    a.stop()
    b.stop()


def test_a_stale_leader_is_reported(tmp_path):
    state = tmp_path / "s"
    a, b = make_manager(state), make_manager(state)
    a._sync_leadership()
    b.stale_after = 0.2
    time.sleep(0.3)
    guard = os.open(os.path.join(state, "generation.lock"), os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(guard, fcntl.LOCK_EX)  # another follower is mid-takeover
    try:
        b._sync_leadership()
        assert "not alive" in b.leader_stale
        ok, why = b.ready()
        assert not ok and "not alive" in why
        assert b.status()["leaderStale"] == b.leader_stale
    finally:
        os.close(guard)
    a.stop()
    b.stop()


def test_a_tls_rotation_survives_a_failed_write(tmp_path, monkeypatch):
    ca = CertificateAuthority()
    leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, "odin-gateway"))
    material = TlsMaterial(leaf.cert_pem, leaf.key_pem, ca.cert_pem, source="consul")
    mgr = make_manager(tmp_path / "s")
    mgr._sync_leadership()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mgr.state, "write_tls", full)
    mgr.publish_tls(material)
    assert mgr.tls is material  # in use at once
    assert not os.path.exists(mgr.state.tls_path)
    monkeypatch.undo()
    mgr._sync()
    assert mgr.state.read_tls().version == material.version
    assert (
        json.loads(Path(mgr.state.snapshot_path).read_text())["tls"]["version"] == material.version
    )
    mgr.stop()


# -- the scheduler ---------------------------------------------------------------------------
class _Clock:
    offset = timedelta(0)


class _FakeDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + _Clock.offset


def _runs_after_a_step(monkeypatch, cls) -> int:
    import apscheduler.executors.base as executors
    import apscheduler.schedulers.base as base

    monkeypatch.setattr(base, "datetime", _FakeDatetime)
    monkeypatch.setattr(executors, "datetime", _FakeDatetime)
    monkeypatch.setattr(scheduler_mod, "datetime", _FakeDatetime)
    monkeypatch.setattr(_Clock, "offset", timedelta(0))
    runs: list[float] = []
    sched = cls(timezone="UTC")
    sched.add_job(lambda: runs.append(time.monotonic()), "interval", seconds=0.1, id="t")
    sched.start()
    try:
        deadline = time.monotonic() + 5
        while len(runs) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(runs) >= 3
        _Clock.offset = timedelta(hours=-1)  # the wall clock steps back an hour
        before = len(runs)
        time.sleep(2.0)
        return len(runs) - before
    finally:
        sched.shutdown(wait=False)


def test_jobs_keep_running_after_a_backward_clock_step(monkeypatch):
    assert _runs_after_a_step(monkeypatch, MonotonicScheduler) >= 5


def test_the_plain_scheduler_stalls_on_a_backward_clock_step(monkeypatch):
    # The failure MonotonicScheduler exists for (keeps the test above honest).
    assert _runs_after_a_step(monkeypatch, BackgroundScheduler) <= 1


def test_ready_when_the_sync_runs_threads_are_not_leaked(tmp_path):
    mgr = make_manager(tmp_path / "s")
    mgr._scheduler = None
    mgr.start()
    mgr.start()  # idempotent (post_worker_init calls it again)
    deadline = time.monotonic() + 5
    while not mgr.state.leading and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mgr.state.leading
    mgr.stop()
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "odin-mesh-watch" and t.is_alive()]


# -- prometheus files of dead workers ----------------------------------------------------------
def test_dead_workers_sample_files_are_folded_into_an_archive(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client import multiprocess as prom_mp
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from odin_gw.metrics import mark_process_dead

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    key = mmap_key("odin_requests", "odin_requests_total", ["service"], ["web"], "Requests")
    for pid, value in ((101, 3.0), (102, 4.0)):
        f = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        f.write_value(key, value, 0.0)
        f.close()
    (tmp_path / "gauge_livemax_101.db").write_bytes(b"")
    mark_process_dead(101)
    mark_process_dead(102)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_archive.db"]
    registry = CollectorRegistry()
    prom_mp.MultiProcessCollector(registry, path=str(tmp_path))
    assert 'odin_requests_total{service="web"} 7.0' in generate_latest(registry).decode()


class _StuckClient(StaticClient):
    """A discovery pass that does not return until released (a call with no timeout)."""

    call_timeout = 0.05

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def discover(self, services):
        self.entered.set()
        self.release.wait(10)
        return Discovery(services={"web": svc("web", 99)})


def test_a_leader_whose_discovery_is_stuck_is_replaced(tmp_path):
    state = tmp_path / "s"
    stuck = _StuckClient()
    a = MeshManager(make_config(state), GatewayMetrics(), lambda s, t: None, stuck)
    a._scheduler = MonotonicScheduler()
    b = make_manager(state)
    assert b.discovery_stale_after == 3 * 1.0 + 3 * 10.0  # refreshInterval 1s, default calls
    b.discovery_stale_after = 0.4
    a._sync_leadership()
    pass_thread = threading.Thread(target=a._discover, daemon=True)
    pass_thread.start()
    assert stuck.entered.wait(5)
    a._sync_leadership()  # the sync still beats
    b._sync_leadership()
    assert a.state.leading and not b.state.leading and b.leader_stale is None
    time.sleep(0.6)
    a._sync_leadership()  # heartbeat fresh, pass stuck
    b._sync_leadership()
    assert b.state.leading and b.state.term == 1
    a._sync_leadership()  # the generation moved: a steps down
    assert not a.state.leading
    stuck.release.set()
    pass_thread.join(5)
    assert "web" not in a.snapshot.services or a.snapshot.services["web"].endpoints[0].port != 99
    a.stop()
    b.stop()


def test_a_stuck_discovery_is_reported_before_the_takeover(tmp_path):
    state = tmp_path / "s"
    a, b = make_manager(state), make_manager(state)
    a._sync_leadership()
    a._attempt_mono -= 100  # its last pass finished long ago; its sync beats now
    a._sync_leadership()
    guard = os.open(os.path.join(state, "generation.lock"), os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(guard, fcntl.LOCK_EX)  # another follower is mid-takeover
    try:
        b._sync_leadership()
        assert "no discovery pass finished for 10" in b.leader_stale
        ok, why = b.ready()
        assert not ok and "no discovery pass finished" in why
        assert b.status()["leaderStale"] == b.leader_stale
    finally:
        os.close(guard)
    a.stop()
    b.stop()


def test_tls_material_round_trips_through_the_state_dir_whole(tmp_path):
    """Followers use what the leader shared: the trust domain (the identity check) and
    the ALPN (Istio's sidecars choose their mTLS chain by it) must survive the trip."""
    ca = CertificateAuthority()
    leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, "odin-gateway"))
    material = TlsMaterial(
        leaf.cert_pem,
        leaf.key_pem,
        ca.cert_pem,
        source="consul-connect",
        trust_domain=ca.trust_domain,
        alpn=("istio-http/1.1",),
    )
    state = StateDir(str(tmp_path / "s"))
    state.ensure()
    state.write_tls(material)
    back = state.read_tls()
    assert back.version == material.version and back.source == "consul-connect"
    assert back.trust_domain == ca.trust_domain and back.alpn == ("istio-http/1.1",)
    assert os.stat(state.tls_path).st_mode & 0o777 == 0o600


def test_tls_and_heartbeat_files_are_read_without_following_symlinks(tmp_path):
    ca = CertificateAuthority()
    leaf = ca.issue(uri=consul_service_uri(ca.trust_domain, "odin-gateway"))
    theirs = StateDir(str(tmp_path / "theirs"))
    theirs.ensure()
    theirs.write_tls(TlsMaterial(leaf.cert_pem, leaf.key_pem, ca.cert_pem, source="x"))
    ours = StateDir(str(tmp_path / "ours"))
    ours.ensure()
    os.symlink(theirs.tls_path, ours.tls_path)  # someone else's material, by a link
    with pytest.raises(OSError):
        ours.read_tls()
    (tmp_path / "beat.json").write_text('{"pid": 1, "mono": 1.0}')
    os.symlink(tmp_path / "beat.json", ours.lock_path_for(0))
    assert ours.heartbeat(0) is None  # a linked heartbeat is not believed
