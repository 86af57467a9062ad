"""ConsulClient against the Consul stand-in over real HTTP: health, indexes, timeouts,
rate limits, tokens, and answers that must never replace newer ones."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import pytest

from odin_gw.config.model import ConsulConfig, MeshConfig
from odin_gw.errors import MeshError
from odin_gw.mesh.client import Discovery
from odin_gw.mesh.consul import ConsulClient, go_duration
from odin_gw.mesh.snapshot import Endpoint, ServiceEndpoints, Snapshot
from tests.doubles.consul import ConsulDouble

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def make_client(consul: ConsulDouble, **opts) -> ConsulClient:
    base = {"http_addr": consul.url, "timeout": 2.0, "blocking_wait": 5.0}
    base["min_query_interval"] = 0.05
    base.update(opts)
    return ConsulClient(MeshConfig(enabled=True, type="consul", consul=ConsulConfig(**base)))


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout}s")


class Watching:
    """``client.watch`` in a thread; every published ``Discovery`` lands in ``seen``."""

    def __init__(self, client: ConsulClient, services: list[str]) -> None:
        self.client = client
        self.services = services
        self.seen: list[Discovery] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=client.watch,
            args=(services, self.seen.append, lambda m: None, self.stop),
            daemon=True,
        )

    def __enter__(self) -> Watching:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.client.close()
        self.thread.join(10)

    def latest(self, name: str) -> ServiceEndpoints | None:
        for d in reversed(list(self.seen)):
            if name in d.services:
                return d.services[name]
        return None

    def status_of(self, name: str, service_id: str) -> str | None:
        svc = self.latest(name)
        for e in svc.endpoints if svc else ():
            if e.service_id == service_id:
                return e.status
        return None


@pytest.fixture
def consul():
    with ConsulDouble() as c:
        yield c


def health_requests(consul: ConsulDouble, name: str = "web"):
    return consul.requests_matching(f"/v1/health/service/{name}")


# -- health -----------------------------------------------------------------------------


def test_node_check_critical_makes_instances_unhealthy(consul):
    consul.register("web", id="web-a", port=1, node="n1")
    consul.register("web", id="web-b", port=2, node="n2")
    client = make_client(consul)
    consul.set_node_status("n1", "critical")  # serfHealth: a node check, no ServiceID
    _, eps = client.instances("web", None)
    by_id = {e.service_id: e for e in eps}
    assert by_id["web-a"].status == "critical" and not by_id["web-a"].healthy
    assert by_id["web-b"].healthy


def test_empty_service_address_means_node_address(consul):
    consul.register("web", id="web-a", port=8080, address="", node="n2", node_address="127.0.0.2")
    _, eps = make_client(consul).instances("web", None)
    assert (eps[0].address, eps[0].port) == ("127.0.0.2", 8080)


def test_warning_instances_take_the_warning_weight(consul):
    consul.register("web", id="w", port=1, status="warning", weights={"Passing": 5, "Warning": 2})
    consul.register("web", id="p", port=2, weights={"Passing": 7, "Warning": 3})
    _, eps = make_client(consul, accept_warning=True).instances("web", None)
    assert {e.service_id: e.weight for e in eps} == {"w": 2, "p": 7}


# -- timeouts and query parameters --------------------------------------------------------


def test_every_call_has_a_timeout(consul):
    consul.register("web", id="web-a", port=1)
    client = make_client(consul, timeout=0.5, blocking_wait=1.0)
    consul.hang(True)
    try:
        for call, limit in (
            (lambda: client.catalog(None), 2.0),
            (lambda: client.instances("web", None), 2.0),
            (lambda: client.instances("web", None, index=5), 3.5),  # timeout + wait + wait/16
        ):
            out: dict = {}

            def run(call=call, out=out):
                try:
                    call()
                except MeshError as exc:
                    out["error"] = exc.message

            start = time.monotonic()
            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join(limit + 2)
            assert not t.is_alive(), "a call to a hung Consul never returned"
            assert time.monotonic() - start < limit
            assert "did not answer in time" in out["error"]
    finally:
        consul.hang(False)


def test_sub_second_wait_is_sent_in_ms(consul):
    assert go_duration(300) == "300s" and go_duration(0.5) == "500ms"
    assert go_duration(1.25) == "1250ms"
    consul.register("web", id="web-a", port=1)
    idx, _ = make_client(consul).instances("web", None)
    start = time.monotonic()
    make_client(consul, blocking_wait=0.5).instances("web", None, index=idx)
    assert time.monotonic() - start < 1.5  # not Consul's 5 min default for wait=0s
    assert health_requests(consul)[-1].query["wait"] == ["500ms"]


def test_namespace_not_sent_unless_configured(consul):
    consul.register("web", id="web-a", port=1)
    make_client(consul).instances("web", None)  # the stand-in answers 400 to any ns
    assert "ns" not in health_requests(consul)[-1].query
    with pytest.raises(MeshError, match="Namespaces are a Consul Enterprise feature"):
        make_client(consul, namespace="default").instances("web", None)


# -- the blocking-query loop ----------------------------------------------------------------


def test_index_zero_is_never_used(consul):
    consul.register("web", id="web-a", port=1)
    with Watching(make_client(consul), ["web"]) as w:
        wait_until(lambda: w.latest("web"), 5, "first answer")
        consul.report_index_zero(True)
        consul.register("web", id="web-b", port=2)  # wakes the watch: it answers index 0
        wait_until(lambda: len(health_requests(consul)) >= 6, 5, "more queries")
        consul.report_index_zero(False)
        queries = health_requests(consul)
    after_zero = [q for q in queries[2:] if q.query.get("index") != ["0"]]
    assert all("index" in q.query for q in after_zero), [q.query for q in queries]
    assert any(q.query["index"] == ["1"] for q in after_zero)
    assert not any(q.query.get("index") == ["0"] for q in queries)


def test_index_reset_when_it_goes_backwards_within_the_wait(consul):
    consul.register("web", id="web-a", port=1)
    client = make_client(consul, blocking_wait=4.0)
    with Watching(client, ["web"]) as w:
        wait_until(lambda: w.status_of("web", "web-a") == "passing", 5, "first answer")
        time.sleep(0.3)
        consul.set_index_backwards()
        time.sleep(0.2)
        start = time.monotonic()
        consul.register("web", id="web-b", port=2)
        # A loop that kept its old (higher) index would wait out the 4 s blocking wait.
        wait_until(lambda: w.status_of("web", "web-b") == "passing", 2.0, "change after reset")
        assert time.monotonic() - start < 2.0


def test_loop_is_rate_limited_and_early_returns_change_nothing(consul):
    consul.register("web", id="web-a", port=1)
    client = make_client(consul, min_query_interval=0.5)
    with Watching(client, ["web"]) as w:
        wait_until(lambda: w.latest("web"), 5, "first answer")
        time.sleep(0.6)
        published = len(w.seen)
        consul.clear_log()
        consul.return_early(1.0)  # every blocking query returns at once, index unchanged
        time.sleep(2.0)
        queries = health_requests(consul)
        assert 2 <= len(queries) <= 6, len(queries)  # 0.5 s apart, not a busy loop
        assert len({q.query["index"][0] for q in queries}) == 1  # same index asked again
        assert len(w.seen) == published  # nothing changed: nothing published
        consul.register("web", id="web-b", port=2)
        wait_until(lambda: w.status_of("web", "web-b") == "passing", 3, "real change")
        consul.return_early(0)


def test_pool_holds_every_watch(consul, caplog):
    names = [f"svc{i}" for i in range(14)]
    for i, name in enumerate(names):
        consul.register(name, id=name, port=1000 + i)
    client = make_client(consul, blocking_wait=1.0, min_query_interval=0.5)
    caplog.set_level(logging.WARNING, logger="urllib3")
    consul.return_early(1.0)  # every watch answers at once and rests 0.5 s: all idle together
    with Watching(client, names):
        time.sleep(2.5)
    consul.return_early(0)
    assert "Connection pool is full" not in caplog.text
    ports = {r.client_port for r in consul.requests_seen}
    assert len(ports) <= len(names) + 4, len(ports)  # connections kept, not re-opened


# -- never go backwards ----------------------------------------------------------------------


def test_full_pass_answer_older_than_a_blocking_answer_does_not_replace_it(consul):
    consul.register("web", id="web-a", port=1)
    consul.register("web", id="web-b", port=2)
    client = make_client(consul)
    with Watching(client, ["web"]) as w:
        wait_until(lambda: w.status_of("web", "web-a") == "passing", 5, "first answer")
        consul.lag("/v1/health/service/web", 1.0)  # the full pass's answer arrives late
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("d", client.discover(["web"])))
        t.start()
        wait_until(lambda: consul.lagged >= 1, 5, "full pass asked")
        consul.set_status("web-a", "critical")  # after the full pass's answer was computed
        wait_until(lambda: w.status_of("web", "web-a") == "critical", 3, "blocking answer")
        t.join(10)
        consul.lag(None)
    d = result["d"]
    status = {e.service_id: e.status for e in d.services["web"].endpoints}
    assert status["web-a"] == "critical"  # the older (passing) answer was not stored
    watch_stamp = max(x.stamps["web"] for x in w.seen if "web" in x.services)
    assert d.stamps["web"] >= watch_stamp


def test_seed_keeps_other_datacenters_until_they_answer():
    with ConsulDouble(datacenters=("dc1", "dc2")) as consul:
        consul.register("web", id="a1", port=1, datacenter="dc1", status="critical")
        consul.register("web", id="b2", port=2, datacenter="dc2", node="n2")
        client = make_client(consul, datacenters=("dc1", "dc2"), datacenter="dc1")
        seeded = ServiceEndpoints(
            "web",
            (
                Endpoint("127.0.0.1", 1, healthy=False, status="critical", datacenter="dc1"),
                Endpoint("127.0.0.1", 2, datacenter="dc2", service_id="b2"),
            ),
            source="consul",
            datacenters=("dc1", "dc2"),
        )
        client.seed(Snapshot(mesh="consul").with_services({"web": seeded}))
        consul.fail_with(500, "dc2 unreachable", dc="dc2")
        with Watching(client, ["web"]) as w:
            wait_until(lambda: w.latest("web"), 5, "dc1 answered")
            wait_until(lambda: any(d.errors for d in w.seen), 5, "dc2 failure reported")
            active, dc = w.latest("web").active()
            assert dc == "dc2" and [e.port for e in active] == [2]
        consul.fail_with(None)


# -- tokens ------------------------------------------------------------------------------


def test_config_token_beats_consul_http_token(monkeypatch, caplog):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    with ConsulDouble(acl_tokens={"cfg-token": "read", "env-token": "read"}) as consul:
        consul.register("web", id="web-a", port=1)
        make_client(consul, token="cfg-token").instances("web", None)
        assert health_requests(consul)[-1].headers["x-consul-token"] == "cfg-token"
        assert "CONSUL_HTTP_TOKEN is set in the environment but not used" in caplog.text
        caplog.clear()
        make_client(consul).catalog(None)
        assert "x-consul-token" not in consul.requests_matching("/v1/catalog")[-1].headers
        make_client(consul, token="env-token")  # token: ${CONSUL_HTTP_TOKEN}: no warning
        assert "env-token" not in caplog.text


def test_token_file_is_read_and_reread_when_it_changes(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "token"
    path.write_text("tok-1\n")
    with ConsulDouble(acl_tokens={"tok-1": "read", "tok-2": "read"}) as consul:
        consul.register("web", id="web-a", port=1)
        client = make_client(consul, token_file=str(path))
        client.instances("web", None)
        assert health_requests(consul)[-1].headers["x-consul-token"] == "tok-1"
        # A Kubernetes Secret update: a new file renamed over the old one.
        (tmp_path / "new").write_text("tok-2")
        os.replace(tmp_path / "new", path)
        client.instances("web", None)
        assert health_requests(consul)[-1].headers["x-consul-token"] == "tok-2"
        path.unlink()  # gone for a moment: the last token read stays in use
        client.instances("web", None)
        assert health_requests(consul)[-1].headers["x-consul-token"] == "tok-2"
    assert "tok-1" not in caplog.text and "tok-2" not in caplog.text
    assert "tokenFile" in caplog.text


def test_no_local_agent_says_what_to_do_in_an_agentless_install():
    from tests.support.upstream import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    client = ConsulClient(
        MeshConfig(
            enabled=True,
            type="consul",
            consul=ConsulConfig(http_addr=closed, timeout=2.0, enable_connect=True),
        )
    )
    try:
        for call in (lambda: client.catalog(None), lambda: client.leaf()):
            with pytest.raises(MeshError) as info:
                call()
            message = info.value.message
            assert f"cannot reach Consul at {closed}" in message
            assert "consul-dataplane" in message and "connectMode: sidecar" in message
    finally:
        client.close()
