"""MeshManager's merge rules, without threads or sockets: last known good, absence."""

import json

from odin_gw.config import parse_config
from odin_gw.mesh.client import Discovery, StaticClient
from odin_gw.mesh.manager import MeshManager
from odin_gw.mesh.snapshot import Endpoint, ServiceEndpoints
from odin_gw.metrics import GatewayMetrics


def manager(tmp_path, extra=""):
    cfg = parse_config(
        "serviceMesh:\n  enabled: true\n  type: consul\n  readyGracePeriod: 0s\n"
        f"  stateDir: {tmp_path}\n{extra}"
        "services:\n - {name: web, basePath: /web}\n - {name: api, basePath: /api}\n"
    )
    seen = []
    mgr = MeshManager(
        cfg, GatewayMetrics(), lambda snap, tls: seen.append(snap), client=StaticClient()
    )
    assert mgr.state.try_lead()
    return mgr, seen


def svc(name, *ports, healthy=True):
    return ServiceEndpoints(
        name, tuple(Endpoint("10.0.0.1", p, healthy=healthy) for p in ports), source="consul"
    )


def test_publish_merges_and_writes_the_state_file(tmp_path):
    mgr, seen = manager(tmp_path)
    mgr.publish(Discovery(services={"web": svc("web", 80)}, catalog=("web",)))
    mgr.publish(Discovery(services={"api": svc("api", 81)}))
    assert set(mgr.snapshot.services) == {"web", "api"}
    assert mgr.snapshot.catalog == ("web",)
    on_disk = json.loads((tmp_path / "snapshot.json").read_text())
    assert set(on_disk["services"]) == {"web", "api"}
    assert seen[-1] is mgr.snapshot


def test_failures_keep_the_last_good_snapshot(tmp_path):
    mgr, _ = manager(tmp_path)
    mgr.publish(Discovery(services={"web": svc("web", 80)}))
    refreshed = mgr.snapshot.refreshed_at
    mgr.failed("cannot reach Consul")
    mgr.publish(Discovery(errors={"health web": "500 No cluster leader"}))
    snap = mgr.snapshot
    assert snap.services["web"] == svc("web", 80)
    assert snap.refreshed_at == refreshed
    assert snap.consecutive_failures == 2
    assert "No cluster leader" in snap.last_error
    mgr.publish(Discovery(services={"web": svc("web", 80, 81)}))
    assert mgr.snapshot.consecutive_failures == 0 and mgr.snapshot.last_error is None


def test_a_partial_answer_does_not_drop_other_services(tmp_path):
    mgr, _ = manager(tmp_path)
    mgr.publish(Discovery(services={"web": svc("web", 80), "api": svc("api", 81)}))
    mgr.publish(Discovery(services={"web": svc("web", 82)}, errors={"api": "timeout"}))
    assert mgr.snapshot.services["api"] == svc("api", 81)
    assert mgr.snapshot.last_error == "api: timeout"


def test_only_a_successful_omission_removes_instances(tmp_path):
    mgr, _ = manager(tmp_path)
    mgr.publish(Discovery(services={"web": svc("web", 80)}))
    mgr.publish(Discovery(absent=frozenset({"web"}), catalog=("api",)))
    web = mgr.snapshot.services["web"]
    assert web.endpoints == () and web.source == "consul"  # no fallback to static targets


def test_ready_needs_something_to_route(tmp_path):
    mgr, _ = manager(tmp_path)  # grace period 0, no static targets anywhere
    ok, why = mgr.ready()
    assert ok is False and "no static targets" in why
    mgr.publish(Discovery(services={"web": svc("web", 80)}))
    assert mgr.ready() == (True, "discovery answered")


def test_warm_cache_is_loaded_at_start(tmp_path):
    first, _ = manager(tmp_path)
    first.publish(Discovery(services={"web": svc("web", 80)}))
    first.state.resign()
    second, _ = manager(tmp_path)
    second._load_from_disk(initial=True)
    assert second.snapshot.services["web"] == svc("web", 80)
    assert second.snapshot.warm is True
    assert second.ready() == (True, "warm cache")


def test_a_corrupt_state_file_is_ignored(tmp_path):
    (tmp_path / "snapshot.json").write_text("{not json")
    mgr, _ = manager(tmp_path)
    mgr._load_from_disk(initial=True)
    assert dict(mgr.snapshot.services) == {}
