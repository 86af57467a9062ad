"""The mesh state dir with real gunicorn: ownership, one dir per instance, a hung leader,
``--preload`` and ``kill -HUP`` with a bad config."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.doubles.consul import ConsulDouble
from tests.integration.consul_helpers import consul_config, eventually, servers
from tests.support.gateway import GatewayProcess
from tests.support.upstream import free_port

pytestmark = pytest.mark.integration

WEB = [{"name": "web", "basePath": "/web"}]


@pytest.fixture
def consul():
    with ConsulDouble() as c:
        yield c


def test_a_state_dir_open_to_others_is_refused(tmp_path, consul, upstream):
    shared = tmp_path / "odin-gw-8080"
    shared.mkdir()
    shared.chmod(0o777)  # as a local user who got there first would leave it
    (shared / "snapshot.json").write_text('{"services": {}}')
    consul.register("web", id="web-a", port=upstream.port)
    cfg = consul_config(consul, WEB)
    cfg["serviceMesh"]["stateDir"] = str(shared)
    gw = GatewayProcess(cfg, workers=2)
    try:
        with pytest.raises(RuntimeError) as info:
            gw.start(timeout=15)
        text = str(info.value)
        assert f"state dir {shared}" in text and "0777" in text, text
        assert "Traceback" not in text
        assert gw.proc.returncode != 0
        assert consul.count("/v1/") == 0
    finally:
        gw.cleanup()


def test_no_state_dir_without_a_mesh(tmp_path, gateway_factory, upstream):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    gw = gateway_factory(
        {"services": [{"name": "web", "basePath": "/web", "targets": [upstream.url]}]},
        env={"RUNTIME_DIRECTORY": str(runtime)},
    )
    assert servers(gw, "/web/x") == {"a"}
    # No discovery state: only the shared retry-budget counts (retries: 1 has the
    # default budget), in a private dir of this instance.
    (state,) = runtime.iterdir()
    assert state.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in state.iterdir()] == [
        next(p.name for p in state.iterdir() if p.name.startswith("retry-budget-"))
    ]


def test_no_state_dir_without_a_mesh_or_shared_counts(tmp_path, gateway_factory, upstream):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    gw = gateway_factory(
        {
            "services": [
                {"name": "web", "basePath": "/web", "targets": [upstream.url], "retries": 0}
            ]
        },
        env={"RUNTIME_DIRECTORY": str(runtime)},
    )
    assert servers(gw, "/web/x") == {"a"}
    assert list(runtime.iterdir()) == []


def test_two_gateways_bound_with_b_do_not_share_state(
    tmp_path, consul, gateway_factory, upstream, upstream_b
):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    consul.register("web", id="web-a", port=upstream.port)
    consul.register("web2", id="web2-b", port=upstream_b.port)
    same_port = free_port()  # both configs say the same server.port; -b wins
    gateways = []
    for svc in ("web", "web2"):
        cfg = consul_config(consul, [{"name": "web", "basePath": "/web", "meshService": svc}])
        cfg["server"] = {"host": "127.0.0.1", "port": same_port}
        cfg["serviceMesh"]["stateDir"] = None  # the instance default
        gateways.append(
            gateway_factory(
                cfg,
                workers=2,
                bind=f"127.0.0.1:{free_port()}",
                env={"RUNTIME_DIRECTORY": str(runtime)},
            )
        )
    one, two = gateways
    assert servers(one, "/web/x") == {"a"}
    assert servers(two, "/web/x") == {"b"}
    m1, m2 = one.admin("mesh").json(), two.admin("mesh").json()
    assert m1["stateDir"] != m2["stateDir"]
    assert os.path.dirname(m1["stateDir"]) == str(runtime)
    assert m1["leaderPid"] in one.worker_pids() and m2["leaderPid"] in two.worker_pids()
    assert m1["fingerprint"] != m2["fingerprint"]
    for m in (m1, m2):
        assert os.stat(m["stateDir"]).st_mode & 0o777 == 0o700
    # Both keep discovering: a change reaches each through its own leader.
    consul.register("web2", id="web2-a", port=upstream.port)
    eventually(lambda: servers(two, "/web/x", 12) == {"a", "b"}, what="gateway two updated")
    assert servers(one, "/web/x") == {"a"}


def test_a_hung_leader_is_reported_and_replaced(consul, gateway_factory, upstream, upstream_b):
    consul.register("web", id="web-a", port=upstream.port)
    gw = gateway_factory(consul_config(consul, WEB), workers=3)
    leader = eventually(lambda: gw.admin("mesh").json()["leaderPid"], what="a leader")
    assert leader in gw.worker_pids()
    os.kill(leader, signal.SIGSTOP)
    try:
        mesh = eventually(
            lambda: (
                (m := gw.admin("mesh").json())["leaderPid"] not in (None, leader)
                and m["generation"] >= 1
                and m
            ),
            timeout=20,
            what="a new leader",
        )
        new = mesh["leaderPid"]
        assert new in gw.worker_pids()
        assert "is not alive" in gw.log() and "took over discovery" in gw.log()
        # The new leader discovers: a registration made now reaches the routing.
        consul.register("web", id="web-b", port=upstream_b.port)
        eventually(lambda: "b" in servers(gw, "/web/x", 12), what="update after takeover")
    finally:
        os.kill(leader, signal.SIGCONT)
    eventually(
        lambda: "stops leading discovery: leadership generation moved" in gw.log(),
        what="the old leader stepped down",
    )
    time.sleep(1)
    mesh = gw.admin("mesh").json()
    assert mesh["leaderPid"] == new
    assert requests.get(gw.url + "/ready", timeout=5).status_code == 200


def test_preload_starts_discovery_in_the_workers(consul, gateway_factory, upstream, upstream_b):
    consul.register("web", id="web-a", port=upstream.port)
    gw = gateway_factory(consul_config(consul, WEB), workers=2, args=["--preload"])
    assert servers(gw, "/web/x") == {"a"}
    leader = gw.admin("mesh").json()["leaderPid"]
    assert leader in gw.worker_pids() and leader != gw.proc.pid
    consul.register("web", id="web-b", port=upstream_b.port)
    # Every worker follows (a frozen view would keep answering "a" only on some).
    eventually(lambda: servers(gw, "/web/x", 16) == {"a", "b"}, what="workers follow")


def test_hup_with_a_bad_config_keeps_the_running_one(gateway_factory, upstream, upstream_b):
    good = {"services": [{"name": "web", "basePath": "/web", "targets": [upstream.url]}]}
    gw = gateway_factory(good, workers=2)
    assert servers(gw, "/web/x") == {"a"}
    bad = dict(gw.config)
    bad["services"] = [{"name": "web", "basePath": "/web", "targetz": [upstream_b.url]}]
    gw.write_config(bad)
    gw.reload()
    eventually(lambda: "reload refused" in gw.log(), what="refusal logged")
    assert "services[0].targetz: unknown field" in gw.log()
    time.sleep(2)  # the reload's new workers are up and the old ones gone
    assert gw.proc.poll() is None
    assert servers(gw, "/web/x", 12) == {"a"}
    assert requests.get(gw.url + "/ready", timeout=5).status_code == 200
    fixed = dict(gw.config)
    fixed["services"] = [
        {"name": "web", "basePath": "/web", "targets": [upstream.url]},
        {"name": "other", "basePath": "/other", "targets": [upstream_b.url]},
    ]
    gw.write_config(fixed)
    gw.reload()
    eventually(lambda: servers(gw, "/other/x", 12) == {"b"}, what="the good config applied")
    assert gw.proc.poll() is None


def test_a_metrics_dir_not_ours_is_not_deleted(tmp_path, gateway_factory, upstream):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "keep.txt").write_text("someone else's file")
    (metrics / "counter_1.db").write_bytes(b"")  # samples of an earlier run
    gw = gateway_factory(
        {"services": [{"name": "web", "basePath": "/web", "targets": [upstream.url]}]},
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics)},
    )
    assert servers(gw, "/web/x") == {"a"}
    assert (metrics / "keep.txt").read_text() == "someone else's file"
    assert not (metrics / "counter_1.db").exists()
