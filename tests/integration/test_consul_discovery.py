"""Consul discovery: registrations, health, datacenters, outages, leadership, headers."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.doubles.consul import ConsulDouble
from tests.integration.consul_helpers import Traffic, consul_config, eventually, servers

pytestmark = pytest.mark.integration

WEB = [{"name": "web", "basePath": "/web"}]


@pytest.fixture
def consul():
    with ConsulDouble() as c:
        yield c


def test_routing_follows_registrations_and_health(consul, gateway_factory, upstream, upstream_b):
    consul.register("web", id="web-a", port=upstream.port)
    gw = gateway_factory(consul_config(consul, WEB), workers=2)
    assert servers(gw, "/web/x") == {"a"}
    consul.register("web", id="web-b", port=upstream_b.port)
    eventually(lambda: servers(gw, "/web/x", 12) == {"a", "b"}, what="b registered")
    consul.set_status("web-a", "critical")
    eventually(lambda: servers(gw, "/web/x") == {"b"}, what="a critical")
    consul.set_status("web-a", "warning")
    eventually(
        lambda: (
            {
                t["serviceId"]: t["status"]
                for t in gw.admin("services").json()["services"][0]["targets"]
            }["web-a"]
            == "warning"
        ),
        what="warning arrived",
    )
    time.sleep(0.6)  # every worker has the snapshot that says so
    assert servers(gw, "/web/x") == {"b"}, "warning is not healthy by default"
    consul.set_status("web-a", "passing")
    eventually(lambda: servers(gw, "/web/x", 12) == {"a", "b"}, what="a passing again")
    consul.deregister("web-b")
    eventually(lambda: servers(gw, "/web/x") == {"a"}, what="b deregistered")
    entry = gw.admin("services").json()["services"][0]
    assert entry["source"] == "consul"
    assert [t["serviceId"] for t in entry["targets"]] == ["web-a"]
    consul.deregister("web-a")
    eventually(lambda: servers(gw, "/web/x") == {"http-503"}, what="all gone")
    assert requests.get(gw.url + "/web/x").json()["code"] == "no_healthy_target"


def test_accept_warning_and_weights(consul, gateway_factory, upstream, upstream_b):
    consul.register(
        "web",
        id="web-a",
        port=upstream.port,
        status="warning",
        weights={"Passing": 1, "Warning": 1},
    )
    consul.register("web", id="web-b", port=upstream_b.port, weights={"Passing": 9, "Warning": 1})
    gw = gateway_factory(
        consul_config(
            consul,
            [{"name": "web", "basePath": "/web", "loadBalancing": "weighted"}],
            acceptWarning=True,
        )
    )
    seen = [requests.get(gw.url + "/web/x").json()["server"] for _ in range(200)]
    assert 0 < seen.count("a") < seen.count("b")
    targets = {t["serviceId"]: t for t in gw.admin("services").json()["services"][0]["targets"]}
    assert targets["web-a"]["status"] == "warning" and targets["web-a"]["healthy"] is True
    assert targets["web-b"]["weight"] == 9


def test_empty_service_address_falls_back_to_node_address(consul, gateway_factory, upstream):
    consul.register("web", id="web-a", port=upstream.port, address="", node_address="127.0.0.1")
    gw = gateway_factory(consul_config(consul, WEB))
    assert servers(gw, "/web/x") == {"a"}


def test_mesh_service_name_and_static_fallback_until_mesh_answers(
    gateway_factory, upstream, upstream_b
):
    consul = ConsulDouble()
    consul.start()
    port = consul.port
    consul.go_down()
    try:
        services = [
            {
                "name": "web",
                "basePath": "/web",
                "meshService": "web-v2",
                "targets": [upstream_b.url],
            }
        ]
        gw = gateway_factory(consul_config(consul, services))  # ready after grace period
        assert servers(gw, "/web/x") == {"b"}, "static targets while Consul never answered"
        assert gw.admin("services").json()["services"][0]["source"] == "static"
        consul.come_up()
        assert consul.port == port
        consul.register("web-v2", id="v2", port=upstream.port)
        eventually(lambda: servers(gw, "/web/x") == {"a"}, timeout=15, what="mesh took over")
        # Once the mesh has answered, no instances means 503, never the static targets.
        consul.deregister("v2")
        eventually(lambda: servers(gw, "/web/x") == {"http-503"}, what="no instances")
        time.sleep(2.5)  # a full pass too
        assert servers(gw, "/web/x") == {"http-503"}
    finally:
        consul.stop()


def test_datacenter_failover(gateway_factory, upstream, upstream_b):
    with ConsulDouble(datacenters=("dc1", "dc2")) as consul:
        consul.register("web", id="a1", port=upstream.port, datacenter="dc1")
        consul.register("web", id="b2", port=upstream_b.port, datacenter="dc2", node="n2")
        gw = gateway_factory(consul_config(consul, WEB, datacenters=["dc1", "dc2"]))
        r = requests.get(gw.url + "/web/x")
        assert r.json()["server"] == "a"
        assert dict(r.json()["headers"])["X-Consul-Datacenter"] == "dc1"
        consul.set_status("a1", "critical")
        eventually(lambda: servers(gw, "/web/x") == {"b"}, what="failover to dc2")
        r = requests.get(gw.url + "/web/x")
        assert dict(r.json()["headers"])["X-Consul-Datacenter"] == "dc2"
        entry = gw.admin("services").json()["services"][0]
        assert entry["servingDatacenter"] == "dc2"
        consul.set_status("a1", "passing")
        eventually(lambda: servers(gw, "/web/x") == {"a"}, what="back to dc1")
        dcs = {q.query.get("dc", [None])[0] for q in consul.requests_matching("/v1/health/")}
        assert dcs == {"dc1", "dc2"}


def test_outage_keeps_last_snapshot_and_reports(consul, gateway_factory, upstream):
    consul.register("web", id="web-a", port=upstream.port)
    gw = gateway_factory(consul_config(consul, WEB, timeout="1s"), workers=2)
    with Traffic(gw.url + "/web/x") as traffic:
        time.sleep(0.5)
        consul.go_down()
        mesh = eventually(
            lambda: (m := gw.admin("mesh").json())["consecutiveFailures"] > 0 and m,
            what="failure reported",
        )
        assert "cannot reach Consul" in mesh["lastError"]
        time.sleep(1)
        consul.come_up()
        consul.garbage(True)
        eventually(
            lambda: "JSON" in (gw.admin("mesh").json()["lastError"] or ""), what="garbage reported"
        )
        consul.garbage(False)
        consul.hang(True)
        eventually(  # the full pass's calls end at consul.timeout, not never
            lambda: "did not answer in time" in (gw.admin("mesh").json()["lastError"] or ""),
            what="per-call timeout reported",
        )
        consul.hang(False)
        consul.fail_with(500, "rpc error: No cluster leader")
        eventually(
            lambda: "No cluster leader" in (gw.admin("mesh").json()["lastError"] or ""),
            what="500 reported",
        )
        consul.fail_with(None)
        eventually(
            lambda: gw.admin("mesh").json()["lastError"] is None, timeout=15, what="recovered"
        )
    assert traffic.codes and set(traffic.codes) == {200}, traffic.errors[:3]
    assert len(traffic.codes) > 50
    # Logged once per change of state, not once per poll.
    assert gw.log().count("discovery failing, serving the last good snapshot") <= 4


def test_index_going_backwards_is_handled(consul, gateway_factory, upstream, upstream_b):
    consul.register("web", id="web-a", port=upstream.port)
    gw = gateway_factory(consul_config(consul, WEB))
    assert servers(gw, "/web/x") == {"a"}
    consul.set_index_backwards()
    consul.register("web", id="web-b", port=upstream_b.port)
    consul.deregister("web-a")
    eventually(lambda: servers(gw, "/web/x") == {"b"}, what="update after index reset")


def test_exactly_one_process_polls_and_leader_kill(consul, gateway_factory, upstream):
    consul.register("web", id="web-a", port=upstream.port)
    gw = gateway_factory(consul_config(consul, WEB), workers=3)
    time.sleep(1.5)
    leader = gw.admin("mesh").json()["leaderPid"]
    workers = set(gw.worker_pids())
    assert leader in workers
    agents = consul.user_agents("/v1/")
    assert agents == {f"odin-gw/0.1.0 (pid {leader})"}, agents
    with Traffic(gw.url + "/web/x") as traffic:
        time.sleep(0.3)
        os.kill(leader, signal.SIGKILL)
        new = eventually(
            lambda: (p := gw.admin("mesh").json()["leaderPid"]) not in (None, leader) and p,
            timeout=15,
            what="new leader",
        )
        consul.clear_log()
        consul.register("web", id="web-a2", port=upstream.port)  # wakes blocking queries
        consul.wait_for_requests("/v1/health/", n=1, timeout=10)
        time.sleep(1)
    assert new in set(gw.worker_pids())
    assert consul.user_agents("/v1/") == {f"odin-gw/0.1.0 (pid {new})"}
    # Requests that were on the killed worker's sockets may fail; routing never stopped.
    failures = [c for c in traffic.codes if c != 200]
    assert len(failures) <= 2, traffic.errors
    assert traffic.codes[-20:] == [200] * 20


def test_token_goes_to_consul_only(gateway_factory, upstream):
    with ConsulDouble(acl_tokens={"gw-secret-token": "read"}) as consul:
        consul.register("web", id="web-a", port=upstream.port)
        gw = gateway_factory(consul_config(consul, WEB, token="gw-secret-token"))
        r = requests.get(gw.url + "/web/x", headers={"X-Consul-Token": "client-spoof"})
        names = {k.lower() for k, _ in r.json()["headers"]}
        assert "x-consul-token" not in names
        assert consul.requests_matching("/v1/health/")[-1].headers["x-consul-token"] == (
            "gw-secret-token"
        )
        for path in ("config", "mesh", "services"):
            assert "gw-secret-token" not in gw.admin(path).text
        assert "gw-secret-token" not in gw.log()
        assert "gw-secret-token" not in str(upstream.seen)


def test_forward_token_opt_in(gateway_factory, upstream):
    with ConsulDouble(acl_tokens={"gw-secret-token": "read"}) as consul:
        consul.register("web", id="web-a", port=upstream.port)
        gw = gateway_factory(consul_config(consul, WEB, token="gw-secret-token", forwardToken=True))
        r = requests.get(gw.url + "/web/x", headers={"X-Consul-Token": "client-spoof"})
        assert dict(r.json()["headers"])["X-Consul-Token"] == "gw-secret-token"
        assert "consul.forwardToken is on" in gw.log()


def test_bad_token_is_reported_without_leaking(gateway_factory, upstream):
    with ConsulDouble(acl_tokens={"good": "read"}) as consul:
        consul.register("web", id="web-a", port=upstream.port)
        gw = gateway_factory(
            consul_config(
                consul,
                [{"name": "web", "basePath": "/web", "targets": [upstream.url]}],
                token="wrong-token",
            ),
        )
        mesh = eventually(
            lambda: (m := gw.admin("mesh").json())["lastError"] and m, what="ACL error shown"
        )
        assert "ACL" in mesh["lastError"] and "403" in mesh["lastError"]
        assert "wrong-token" not in gw.admin("mesh").text and "wrong-token" not in gw.log()
        assert servers(gw, "/web/x") == {"a"}  # static targets: the mesh never answered


def full_passes(consul) -> int:
    """Catalog listings without ``index``: only a full pass asks those (watches block)."""
    return sum(
        1 for q in consul.requests_matching("/v1/catalog/services") if "index" not in q.query
    )


def test_refresh_endpoint_and_metrics(consul, gateway_factory, upstream):
    consul.register("web", id="web-a", port=upstream.port)
    cfg = consul_config(consul, WEB, blockingWait="10s")
    cfg["serviceMesh"]["refreshInterval"] = "60s"
    gw = gateway_factory(cfg, workers=2)
    eventually(lambda: full_passes(consul) >= 1, what="first full pass")
    time.sleep(1.0)
    before = full_passes(consul)
    time.sleep(1.0)
    assert full_passes(consul) == before, "no pass happens on its own in this window"
    for _ in range(2):  # whichever worker answers: the leader itself, or via the trigger
        r = gw.admin("mesh/refresh", method="POST")
        assert r.status_code == 202
        eventually(lambda b=before: full_passes(consul) > b, timeout=5, what="refresh ran")
        time.sleep(0.3)
        before = full_passes(consul)
    text = requests.get(gw.url + "/metrics").text
    assert 'odin_mesh_endpoints{health="healthy",service="web"} 1.0' in text
    assert 'odin_mesh_discovery_attempts_total{mesh="consul",result="ok"}' in text
    assert "odin_mesh_snapshot_age_seconds" in text


def test_warm_cache_after_restart_with_consul_down(tmp_path, gateway_factory, upstream):
    state = str(tmp_path / "state")
    with ConsulDouble() as consul:
        consul.register("web", id="web-a", port=upstream.port)
        cfg = consul_config(consul, WEB)
        cfg["serviceMesh"]["stateDir"] = state
        cfg["serviceMesh"]["readyGracePeriod"] = "60s"
        first = gateway_factory(cfg)
        assert servers(first, "/web/x") == {"a"}
        first.stop()
        consul.go_down()
        second = gateway_factory(cfg)  # ready at once from the warm cache
        assert second.admin("mesh").json()["readyReason"] in ("warm cache", "discovery answered")
        assert servers(second, "/web/x") == {"a"}


def test_https_consul_verified_by_mesh_ca(tmp_path, gateway_factory, upstream):
    import ssl

    from tests.doubles.pki import CertificateAuthority

    ca = CertificateAuthority()
    cert, key = ca.issue(dns_names=("localhost",)).write(tmp_path, "consul.pem", "consul.key")
    ca_path = tmp_path / "ca.pem"
    ca.write_ca(ca_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    with ConsulDouble(tls=ctx) as consul:
        consul.register("web", id="web-a", port=upstream.port)
        cfg = consul_config(consul, WEB)
        cfg["serviceMesh"]["caFile"] = str(ca_path)
        gw = gateway_factory(cfg)
        assert consul.url.startswith("https://")
        assert servers(gw, "/web/x") == {"a"}
    # The same Consul with a CA the gateway does not trust is refused, never trusted.
    other = CertificateAuthority()
    other_path = tmp_path / "other.pem"
    other.write_ca(other_path)
    with ConsulDouble(tls=ctx) as consul:
        consul.register("web", id="web-a", port=upstream.port)
        cfg = consul_config(
            consul, [{"name": "web", "basePath": "/web", "targets": [upstream.url]}]
        )
        cfg["serviceMesh"]["caFile"] = str(other_path)
        gw = gateway_factory(cfg)
        mesh = eventually(
            lambda: (m := gw.admin("mesh").json())["lastError"] and m, what="TLS failure reported"
        )
        assert "cannot reach Consul" in mesh["lastError"]
        assert consul.count("/v1/") == 0


def test_namespace_sent_only_when_set(gateway_factory, upstream):
    with ConsulDouble() as consul:
        consul.register("web", id="web-a", port=upstream.port)
        gateway_factory(consul_config(consul, WEB))
        assert all("ns" not in q.query for q in consul.requests_matching("/v1/"))
    with ConsulDouble() as consul:
        consul.register("web", id="web-a", port=upstream.port)
        gateway_factory(consul_config(consul, WEB, namespace="team-a"), wait_ready=False)
        consul.wait_for_requests("/v1/health/", n=1, timeout=10)
        assert all(q.query.get("ns") == ["team-a"] for q in consul.requests_matching("/v1/"))


def test_one_service_failing_keeps_its_last_good(consul, gateway_factory, upstream, upstream_b):
    consul.register("web", id="web-a", port=upstream.port)
    consul.register("api", id="api-b", port=upstream_b.port)
    services = [{"name": "web", "basePath": "/web"}, {"name": "api", "basePath": "/api"}]
    gw = gateway_factory(consul_config(consul, services))
    assert servers(gw, "/api/x") == {"b"}
    consul.fail_with(500, "rpc error: api broken", path="/v1/health/service/api")
    consul.register("web", id="web-b", port=upstream_b.port)
    eventually(lambda: servers(gw, "/web/x", 12) == {"a", "b"}, what="web still refreshed")
    attempts = gw.admin("mesh").json()["lastAttempt"]
    eventually(  # a full pass ran with api failing
        lambda: (
            (m := gw.admin("mesh").json())["lastAttempt"] != attempts
            and "api broken" in (m["lastError"] or "")
        ),
        what="api failure reported by a full pass",
    )
    time.sleep(2.5)  # and another one
    assert servers(gw, "/api/x") == {"b"}, "the last good answer for api stays"
    consul.fail_with(None)


def test_full_pass_never_puts_back_an_older_answer(consul, gateway_factory, upstream, upstream_b):
    # The full pass asks web then api. web's instance goes critical after the pass computed
    # its view: the blocking query brings the change; the pass must not undo it, neither by
    # storing its older answer (index) nor by publishing a view merged before (stamp).
    consul.register("web", id="web-a", port=upstream.port)
    consul.register("web", id="web-b", port=upstream_b.port)
    consul.register("api", id="api-a", port=upstream.port)
    services = [{"name": "web", "basePath": "/web"}, {"name": "api", "basePath": "/api"}]
    gw = gateway_factory(consul_config(consul, services))

    def healthy_a() -> bool:
        web = next(s for s in gw.admin("services").json()["services"] if s["name"] == "web")
        return {t["serviceId"]: t["healthy"] for t in web["targets"]}["web-a"]

    for lagged in ("/v1/health/service/web", "/v1/health/service/api"):
        consul.lag(lagged, 1.2)  # the next full pass's answer arrives late
        start = consul.lagged
        eventually(lambda start=start: consul.lagged > start, what="full pass asked")
        consul.set_status("web-a", "critical")
        eventually(lambda: not healthy_a(), what="blocking query brought the change")
        deadline = time.monotonic() + 3.0  # covers the late answer and the pass's publish
        while time.monotonic() < deadline:
            assert not healthy_a(), f"an older answer came back ({lagged} lagged)"
            time.sleep(0.1)
        consul.lag(None)
        consul.set_status("web-a", "passing")
        eventually(healthy_a, what="web-a passing again")


def test_new_leader_keeps_datacenters_that_do_not_answer(gateway_factory, upstream, upstream_b):
    with ConsulDouble(datacenters=("dc1", "dc2")) as consul:
        consul.register("web", id="a1", port=upstream.port, datacenter="dc1", status="critical")
        consul.register("web", id="b2", port=upstream_b.port, datacenter="dc2", node="n2")
        gw = gateway_factory(consul_config(consul, WEB, datacenters=["dc1", "dc2"]), workers=2)
        assert servers(gw, "/web/x") == {"b"}
        leader = gw.admin("mesh").json()["leaderPid"]
        consul.fail_with(500, "rpc error: dc2 unreachable", dc="dc2")
        with Traffic(gw.url + "/web/x") as traffic:
            time.sleep(0.3)
            os.kill(leader, signal.SIGKILL)
            eventually(
                lambda: gw.admin("mesh").json()["leaderPid"] not in (None, leader),
                timeout=15,
                what="new leader",
            )
            consul.clear_log()
            consul.wait_for_requests("/v1/health/", n=2, timeout=10)  # dc1 answered
            time.sleep(2.5)  # and a full pass with dc2 failing
        failures = [c for c in traffic.codes if c != 200]
        assert len(failures) <= 2, traffic.errors[:5]  # the killed worker's sockets
        assert traffic.codes[-20:] == [200] * 20
        assert servers(gw, "/web/x") == {"b"}
        consul.fail_with(None)


def test_one_failing_datacenter_does_not_flap(gateway_factory, upstream, upstream_b):
    with ConsulDouble(datacenters=("dc1", "dc2")) as consul:
        consul.register("web", id="a1", port=upstream.port, datacenter="dc1")
        gw = gateway_factory(consul_config(consul, WEB, datacenters=["dc1", "dc2"]))
        consul.fail_with(500, "rpc error: dc2 unreachable", dc="dc2")
        eventually(lambda: gw.admin("mesh").json()["lastError"], what="dc2 failure shown")
        errors = []
        for i in range(8):  # dc1 keeps answering with news
            consul.set_status("a1", "warning" if i % 2 == 0 else "passing")
            time.sleep(0.4)
            errors.append(gw.admin("mesh").json()["lastError"])
        assert all(e and "dc2 unreachable" in e for e in errors), errors
        consul.fail_with(None)
        eventually(lambda: gw.admin("mesh").json()["lastError"] is None, timeout=15, what="clear")
        log = gw.log()
        assert log.count("discovery recovered") == 1, log[-3000:]
        assert log.count("discovery failing") + log.count("could not be refreshed") == 1
