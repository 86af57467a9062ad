"""Tests of the Consul HTTP API stand-in, driven over real HTTP (requests and py-consul)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import consul
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.doubles.consul import ConsulDouble
from tests.doubles.pki import CertificateAuthority, consul_service_uri

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def cd() -> Iterator[ConsulDouble]:
    with ConsulDouble() as double:
        yield double


@pytest.fixture
def client(cd: ConsulDouble) -> Iterator[consul.Consul]:
    with consul.Consul(host="127.0.0.1", port=cd.port) as c:
        yield c


def get(cd: ConsulDouble, path: str, timeout: float = 10, **kwargs: Any) -> requests.Response:
    return requests.get(cd.url + path, timeout=timeout, **kwargs)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; the dict gets 'result' or 'error' and 'elapsed'."""
    out: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def ids(resp: requests.Response) -> list[str]:
    return [entry["Service"]["ID"] for entry in resp.json()]


# -- shapes and registration -------------------------------------------------------------


def test_health_entry_shape_and_headers(cd: ConsulDouble) -> None:
    cd.register("web", id="web-1", port=8080, tags=["v1"], meta={"version": "1"})
    resp = get(cd, "/v1/health/service/web")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["X-Consul-Index"]) >= 1
    assert resp.headers["X-Consul-KnownLeader"] == "true"
    assert resp.headers["X-Consul-LastContact"] == "0"
    [entry] = resp.json()
    node, svc, checks = entry["Node"], entry["Service"], entry["Checks"]
    assert {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta"} <= set(node)
    assert node["Node"] == "node-1" and node["Datacenter"] == "dc1"
    assert svc["ID"] == "web-1" and svc["Service"] == "web" and svc["Port"] == 8080
    assert svc["Tags"] == ["v1"] and svc["Meta"] == {"version": "1"}
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    assert "Kind" not in svc and svc["Connect"] == {}
    assert svc["ModifyIndex"] >= svc["CreateIndex"] >= 1
    assert [c["CheckID"] for c in checks] == ["serfHealth", "service:web-1"]
    assert checks[0]["Status"] == "passing" and checks[0]["ServiceID"] == ""
    assert checks[1]["ServiceName"] == "web" and checks[1]["ServiceTags"] == ["v1"]
    for check in checks:
        assert {"Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID"} <= set(check)
        assert {"ServiceName", "ServiceTags", "Type", "CreateIndex", "ModifyIndex"} <= set(check)


def test_unset_tags_and_meta_are_null_like_consul(cd: ConsulDouble) -> None:
    cd.register("bare", port=1)
    [entry] = get(cd, "/v1/health/service/bare").json()
    assert entry["Service"]["Tags"] is None and entry["Service"]["Meta"] is None


def test_node_address_fallback_data(cd: ConsulDouble) -> None:
    cd.register("web", port=8080, address="", node="node-9", node_address="10.1.2.3")
    [entry] = get(cd, "/v1/health/service/web").json()
    assert entry["Service"]["Address"] == ""
    assert entry["Node"]["Address"] == "10.1.2.3" and entry["Node"]["Node"] == "node-9"


def test_agent_register_ttl_check_and_deregister_with_py_consul(
    cd: ConsulDouble, client: consul.Consul
) -> None:
    assert client.agent.service.register(
        "api",
        service_id="api-1",
        address="127.0.0.2",
        port=9000,
        tags=["a"],
        check=consul.Check.ttl("30s"),
        weights={"Passing": 5, "Warning": 1},
    )
    _, nodes = client.health.service("api")
    [entry] = nodes
    [svc_check] = [c for c in entry["Checks"] if c["ServiceID"] == "api-1"]
    assert svc_check["CheckID"] == "service:api-1" and svc_check["Type"] == "ttl"
    assert svc_check["Status"] == "critical"  # TTL checks start critical
    assert entry["Service"]["Weights"] == {"Passing": 5, "Warning": 1}
    assert entry["Service"]["TaggedAddresses"]["lan_ipv4"] == {"Address": "127.0.0.2", "Port": 9000}
    assert client.health.service("api", passing=True)[1] == []
    assert client.agent.check.ttl_pass("service:api-1", notes="all good")
    [entry] = client.health.service("api", passing=True)[1]
    assert entry["Checks"][1]["Output"] == "all good"
    assert client.agent.check.ttl_warn("service:api-1")
    assert client.health.service("api", passing=True)[1] == []
    assert len(client.health.service("api")[1]) == 1
    assert client.agent.check.ttl_pass("nope") is False  # py-consul maps 404 to False
    resp = requests.put(cd.url + "/v1/agent/check/pass/nope", timeout=5)
    assert resp.status_code == 404 and resp.text.startswith('Unknown check ID "nope".')
    assert client.agent.service.deregister("api-1")
    assert client.health.service("api")[1] == []
    resp = requests.put(cd.url + "/v1/agent/service/deregister/api-1", timeout=5)
    assert resp.status_code == 404 and 'Unknown service ID "api-1"' in resp.text


def test_agent_register_raw_json_case_insensitive_and_multiple_checks(cd: ConsulDouble) -> None:
    body = {
        "name": "pay",
        "ID": "pay-1",
        "port": 7000,
        "checks": [{"ttl": "10s", "status": "passing"}, {"TTL": "10s", "Name": "second"}],
    }
    resp = requests.put(cd.url + "/v1/agent/service/register", json=body, timeout=5)
    assert resp.status_code == 200, resp.text
    [entry] = get(cd, "/v1/health/service/pay").json()
    got = {c["CheckID"]: c["Status"] for c in entry["Checks"]}
    assert got == {
        "serfHealth": "passing",
        "service:pay-1:1": "passing",
        "service:pay-1:2": "critical",
    }
    body["Tags"] = ["again"]  # re-registering keeps the checks' current status
    resp = requests.put(cd.url + "/v1/agent/service/register", json=body, timeout=5)
    [entry] = get(cd, "/v1/health/service/pay").json()
    assert entry["Service"]["Tags"] == ["again"]
    assert [c["Status"] for c in entry["Checks"]] == ["passing", "passing", "critical"]
    bad = requests.put(cd.url + "/v1/agent/service/register", json={"Port": 1}, timeout=5)
    assert bad.status_code == 400 and bad.text == "Missing service name"
    bad = requests.put(
        cd.url + "/v1/agent/service/register",
        json={"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}},
        timeout=5,
    )
    assert bad.status_code == 400 and bad.text.startswith("Invalid check:")


def test_ttl_check_expires_to_critical(cd: ConsulDouble, client: consul.Consul) -> None:
    client.agent.service.register("tick", port=1, check=consul.Check.ttl("1s"))
    client.agent.check.ttl_pass("service:tick")
    assert cd.check_status("tick") == "passing"
    deadline = time.monotonic() + 5
    while cd.check_status("tick") != "critical":
        assert time.monotonic() < deadline, "TTL never expired"
        time.sleep(0.05)
    [entry] = get(cd, "/v1/health/service/tick").json()
    assert entry["Checks"][1]["Output"] == "TTL expired"


def test_http_check_is_executed(cd: ConsulDouble, client: consul.Consul) -> None:
    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Ok) as srv:
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            url = f"http://127.0.0.1:{srv.server_address[1]}/health"
            client.agent.service.register("h", port=1, check=consul.Check.http(url, "200ms"))
            deadline = time.monotonic() + 5
            while cd.check_status("h") != "passing":
                assert time.monotonic() < deadline, "HTTP check never passed"
                time.sleep(0.05)
        finally:
            srv.shutdown()
            thread.join(5)
    [entry] = get(cd, "/v1/health/service/h").json()
    assert entry["Checks"][1]["Type"] == "http" and "200 OK" in entry["Checks"][1]["Output"]


def test_catalog_register_and_deregister_with_py_consul(
    cd: ConsulDouble, client: consul.Consul
) -> None:
    service = {"Service": "db", "ID": "db-1", "Tags": ["primary"], "Port": 5432, "Address": ""}
    check = {"CheckID": "service:db-1", "Name": "db", "Status": "passing", "ServiceID": "db-1"}
    assert client.catalog.register("ext-node", "10.0.0.5", service=service, check=check)
    [entry] = get(cd, "/v1/health/service/db?passing").json()
    assert entry["Node"]["Address"] == "10.0.0.5" and entry["Service"]["Address"] == ""
    assert entry["Node"]["TaggedAddresses"] is None  # catalog-registered, no agent
    [flat] = get(cd, "/v1/catalog/service/db").json()
    assert flat["ServiceID"] == "db-1" and flat["Address"] == "10.0.0.5"
    assert flat["ServiceAddress"] == "" and flat["ServiceTags"] == ["primary"]
    _, services = client.catalog.services()
    assert services["db"] == ["primary"] and "consul" in services
    resp = requests.put(cd.url + "/v1/catalog/register", json={"Address": "1.2.3.4"}, timeout=5)
    assert resp.status_code == 500 and "Must provide node" in resp.text
    assert client.catalog.deregister("ext-node", service_id="db-1")
    assert get(cd, "/v1/health/service/db").json() == []
    assert client.catalog.deregister("ext-node")
    assert "db" not in client.catalog.services()[1]


def test_passing_excludes_warning_and_critical(cd: ConsulDouble) -> None:
    cd.register("web", id="ok", port=1)
    cd.register("web", id="warn", port=2, status="warning")
    cd.register("web", id="crit", port=3, status="critical")
    cd.register("web", id="nocheck", port=4, status=None, node="node-2")
    assert sorted(ids(get(cd, "/v1/health/service/web"))) == ["crit", "nocheck", "ok", "warn"]
    assert sorted(ids(get(cd, "/v1/health/service/web?passing"))) == ["nocheck", "ok"]
    assert sorted(ids(get(cd, "/v1/health/service/web?passing=true"))) == ["nocheck", "ok"]
    assert len(ids(get(cd, "/v1/health/service/web?passing=false"))) == 4
    assert get(cd, "/v1/health/service/web?passing=maybe").status_code == 400
    cd.set_status("warn", "passing")
    assert sorted(ids(get(cd, "/v1/health/service/web?passing"))) == ["nocheck", "ok", "warn"]
    cd.set_node_status("node-2", "critical")  # serfHealth counts too
    assert sorted(ids(get(cd, "/v1/health/service/web?passing"))) == ["ok", "warn"]


def test_tag_and_filter_parameters(cd: ConsulDouble) -> None:
    cd.register("web", id="a", port=1, tags=["blue", "v1"], meta={"version": "1"})
    cd.register("web", id="b", port=2, tags=["green"], meta={"version": "2"})
    assert ids(get(cd, "/v1/health/service/web?tag=blue")) == ["a"]
    assert ids(get(cd, "/v1/health/service/web?tag=blue&tag=green")) == []
    params = {"filter": 'Service.Meta.version == "2"'}
    assert ids(get(cd, "/v1/health/service/web", params=params)) == ["b"]
    params = {"filter": '"v1" in Service.Tags or Service.Port == 2'}
    assert sorted(ids(get(cd, "/v1/health/service/web", params=params))) == ["a", "b"]
    params = {"filter": 'not (Service.Tags contains green) and Service.ID matches "^a"'}
    assert ids(get(cd, "/v1/health/service/web", params=params)) == ["a"]
    bad = get(cd, "/v1/health/service/web", params={"filter": "Service.Nope == 1"})
    assert bad.status_code == 500 and "Failed to create boolean expression evaluator" in bad.text
    unsupported = get(cd, "/v1/health/service/web", params={"filter": 'Checks.Status == "x"'})
    assert unsupported.status_code == 400


def test_datacenters(cd: ConsulDouble) -> None:
    with ConsulDouble(datacenters=("dc1", "dc2")) as multi:
        multi.register("web", id="w1", port=1)
        multi.register("web", id="w2", port=2, datacenter="dc2")
        assert ids(get(multi, "/v1/health/service/web")) == ["w1"]
        resp = get(multi, "/v1/health/service/web?dc=dc2")
        assert ids(resp) == ["w2"] and resp.json()[0]["Node"]["Datacenter"] == "dc2"
        assert get(multi, "/v1/catalog/datacenters").json() == ["dc1", "dc2"]
        resp = get(multi, "/v1/health/service/web?dc=dc9")
        assert resp.status_code == 500 and resp.text == "No path to datacenter"
    assert get(cd, "/v1/catalog/services?dc=dc2").status_code == 500


# -- blocking queries and indexes --------------------------------------------------------


def test_blocking_query_blocks_then_wakes_on_change(cd: ConsulDouble) -> None:
    cd.register("web", id="w1", port=1)
    first = get(cd, "/v1/health/service/web")
    index = int(first.headers["X-Consul-Index"])
    thread, out = in_thread(lambda: get(cd, f"/v1/health/service/web?index={index}&wait=10s"))
    time.sleep(0.5)
    assert thread.is_alive(), "blocking query returned without a change"
    cd.set_status("w1", "critical")
    thread.join(5)
    assert not thread.is_alive()
    resp = out["result"]
    assert int(resp.headers["X-Consul-Index"]) > index
    assert resp.json()[0]["Checks"][1]["Status"] == "critical"
    assert 0.4 < out["elapsed"] < 3


def test_blocking_query_times_out_with_same_index(cd: ConsulDouble) -> None:
    cd.register("web", port=1)
    index = int(get(cd, "/v1/health/service/web").headers["X-Consul-Index"])
    start = time.monotonic()
    resp = get(cd, f"/v1/health/service/web?index={index}&wait=300ms")
    elapsed = time.monotonic() - start
    assert int(resp.headers["X-Consul-Index"]) == index
    assert 0.3 <= elapsed < 0.3 * (1 + 1 / 16) + 0.5
    start = time.monotonic()
    get(cd, "/v1/health/service/web?index=0&wait=5s")
    assert time.monotonic() - start < 1, "index=0 must not block"


def test_index_is_per_result_and_never_zero(cd: ConsulDouble) -> None:
    resp = get(cd, "/v1/health/service/never-registered")
    assert resp.json() == [] and int(resp.headers["X-Consul-Index"]) >= 1
    cd.register("web", id="w1", port=1)
    services_index = get(cd, "/v1/catalog/services").headers["X-Consul-Index"]
    cd.set_status("w1", "warning")  # a health change does not touch the services table
    assert get(cd, "/v1/catalog/services").headers["X-Consul-Index"] == services_index
    assert cd.set_index_backwards(0) == 1
    for path in ("/v1/health/service/web", "/v1/catalog/services", "/v1/agent/connect/ca/roots"):
        assert get(cd, path).headers["X-Consul-Index"] == "1"


def test_index_goes_backwards_after_restore(cd: ConsulDouble) -> None:
    cd.register("web", id="w1", port=1)
    for i in range(5):
        cd.set_status("w1", "warning" if i % 2 else "passing")
    held = int(get(cd, "/v1/health/service/web").headers["X-Consul-Index"])
    thread, out = in_thread(lambda: get(cd, f"/v1/health/service/web?index={held}&wait=10s"))
    time.sleep(0.3)
    cd.set_index_backwards(3)
    thread.join(5)
    assert int(out["result"].headers["X-Consul-Index"]) == 3  # in-flight query returns at once
    assert out["elapsed"] < 2
    start = time.monotonic()
    resp = get(cd, f"/v1/health/service/web?index={held}&wait=400ms")
    assert time.monotonic() - start >= 0.4  # nothing newer than `held`: waits it out
    assert int(resp.headers["X-Consul-Index"]) == 3 < held
    cd.set_status("w1", "critical")  # new writes continue from the lower index
    assert 3 < int(get(cd, "/v1/health/service/web").headers["X-Consul-Index"]) < held


def test_invalid_wait_and_index(cd: ConsulDouble) -> None:
    resp = get(cd, "/v1/health/service/web?index=1&wait=soon")
    assert resp.status_code == 400 and resp.text == "Invalid wait time"
    resp = get(cd, "/v1/health/service/web?index=abc")
    assert resp.status_code == 400 and resp.text == "Invalid index"


# -- ACLs ------------------------------------------------------------------------------------


@pytest.fixture
def acl_cd() -> Iterator[ConsulDouble]:
    with ConsulDouble(acl_tokens={"reader": "read", "writer": "write"}) as double:
        double.register("web", port=1, connect_proxy_port=21000)
        yield double


def test_acl_unknown_token_is_403_acl_not_found(acl_cd: ConsulDouble) -> None:
    resp = get(acl_cd, "/v1/health/service/web", headers={"X-Consul-Token": "bogus"})
    assert resp.status_code == 403 and resp.text == "ACL not found"
    with (
        consul.Consul(host="127.0.0.1", port=acl_cd.port, token="bogus") as c,
        pytest.raises(consul.ACLPermissionDenied, match="ACL not found"),
    ):
        c.health.service("web")


def test_acl_anonymous_is_filtered_silently(acl_cd: ConsulDouble) -> None:
    resp = get(acl_cd, "/v1/health/service/web")
    assert resp.status_code == 200 and resp.json() == []
    assert resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    resp = get(acl_cd, "/v1/catalog/services")
    assert resp.status_code == 200 and resp.json() == {}
    assert resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    resp = get(acl_cd, "/v1/health/connect/web")  # Consul: empty, and no "filtered" header
    assert resp.json() == [] and "X-Consul-Results-Filtered-By-ACLs" not in resp.headers
    for how in (
        {"headers": {"X-Consul-Token": "reader"}},
        {"headers": {"Authorization": "Bearer reader"}},
        {"params": {"token": "reader"}},
    ):
        resp = get(acl_cd, "/v1/health/service/web", **how)
        assert len(resp.json()) == 1 and "X-Consul-Results-Filtered-By-ACLs" not in resp.headers
        assert len(get(acl_cd, "/v1/health/connect/web", **how).json()) == 1


def test_acl_leaf_needs_service_write(acl_cd: ConsulDouble) -> None:
    resp = get(acl_cd, "/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "reader"})
    assert resp.status_code == 403
    assert resp.text.startswith("Permission denied: token with AccessorID '")
    assert "lacks permission 'service:write' on \"web\"" in resp.text
    anon = get(acl_cd, "/v1/agent/connect/ca/leaf/web")
    assert (
        anon.status_code == 403 and "anonymous token lacks permission 'service:write'" in anon.text
    )
    ok = get(acl_cd, "/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "writer"})
    assert ok.status_code == 200 and ok.json()["Service"] == "web"
    assert get(acl_cd, "/v1/agent/connect/ca/roots").status_code == 200  # roots need no token
    reg = requests.put(
        acl_cd.url + "/v1/agent/service/register",
        json={"Name": "x"},
        headers={"X-Consul-Token": "reader"},
        timeout=5,
    )
    assert reg.status_code == 403 and "service:write" in reg.text


# -- HTTP surface ------------------------------------------------------------------------


def test_unknown_path_wrong_method_and_bad_json(cd: ConsulDouble) -> None:
    resp = get(cd, "/v1/nope")
    assert resp.status_code == 404
    assert resp.text == "Invalid URL path: not a recognized HTTP API endpoint\n"
    resp = requests.put(cd.url + "/v1/health/service/web", timeout=5)
    assert resp.status_code == 405 and resp.headers["Allow"] == "OPTIONS,GET"
    assert resp.text == "method PUT not allowed"
    resp = get(cd, "/v1/agent/service/register")
    assert resp.status_code == 405 and resp.headers["Allow"] == "OPTIONS,PUT"
    resp = requests.put(cd.url + "/v1/agent/service/register", data=b"{nope", timeout=5)
    assert resp.status_code == 400 and resp.text.startswith("Request decode failed:")
    resp = requests.put(
        cd.url + "/v1/agent/service/register", json={"Name": "x", "Port": "p"}, timeout=5
    )
    assert resp.status_code == 400 and resp.text.startswith("Request decode failed:")
    assert get(cd, "/v1/status/leader").json() == "127.0.0.1:8300"


def test_request_log(cd: ConsulDouble) -> None:
    get(cd, "/v1/health/service/web?passing&tag=x", headers={"User-Agent": "odin-gw/pid-4242"})
    [record] = cd.requests_matching("/v1/health/service/")
    assert record.method == "GET" and record.path == "/v1/health/service/web"
    assert record.query == {"passing": [""], "tag": ["x"]}
    assert record.headers["user-agent"] == "odin-gw/pid-4242"
    assert record.client_port > 0 and record.time <= time.time()
    assert cd.count("/v1/health") == 1 and cd.count("/v1/catalog") == 0
    assert cd.user_agents("/v1/health") == {"odin-gw/pid-4242"}
    cd.clear_log()
    assert cd.requests_seen == []


# -- failure switches --------------------------------------------------------------------


def test_go_down_refuses_then_come_up_on_same_port(cd: ConsulDouble) -> None:
    cd.register("web", port=1)
    port = cd.port
    cd.go_down()
    assert not cd.is_up
    with pytest.raises(requests.ConnectionError):
        get(cd, "/v1/health/service/web", timeout=2)
    cd.come_up()
    assert cd.port == port
    assert len(get(cd, "/v1/health/service/web").json()) == 1


def test_go_down_aborts_blocking_query(cd: ConsulDouble) -> None:
    index = get(cd, "/v1/health/service/web").headers["X-Consul-Index"]
    thread, out = in_thread(lambda: get(cd, f"/v1/health/service/web?index={index}&wait=20s"))
    cd.wait_for_requests("/v1/health/service/web", 2)
    time.sleep(0.2)
    cd.go_down()
    thread.join(5)
    assert isinstance(out.get("error"), requests.RequestException)
    assert out["elapsed"] < 3


def test_hang_is_released_by_unhang(cd: ConsulDouble) -> None:
    cd.hang()
    thread, out = in_thread(lambda: get(cd, "/v1/status/leader"))
    cd.wait_for_requests("/v1/status/leader")
    time.sleep(0.4)
    assert thread.is_alive(), "a hung double answered"
    cd.hang(False)
    thread.join(5)
    assert out["result"].status_code == 200


def test_hang_is_released_by_stop() -> None:
    double = ConsulDouble().start()
    double.hang()
    thread, out = in_thread(lambda: requests.get(double.url + "/v1/status/leader", timeout=10))
    double.wait_for_requests("/v1/status/leader")
    double.stop()
    thread.join(5)
    assert isinstance(out.get("error"), requests.RequestException)


def test_garbage_body(cd: ConsulDouble, client: consul.Consul) -> None:
    cd.garbage()
    resp = get(cd, "/v1/health/service/web")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["X-Consul-Index"]) >= 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)
    with pytest.raises(consul.ConsulException):
        client.health.service("web")
    cd.garbage(False)
    assert get(cd, "/v1/health/service/web").json() == []


def test_fail_with(cd: ConsulDouble) -> None:
    cd.fail_with(500, "rpc error: No cluster leader")
    resp = get(cd, "/v1/health/service/web")
    assert resp.status_code == 500 and resp.text == "rpc error: No cluster leader"
    cd.fail_with(None)
    assert get(cd, "/v1/health/service/web").status_code == 200


# -- Connect ---------------------------------------------------------------------------------


def test_health_connect_returns_sidecar_following_service_health(cd: ConsulDouble) -> None:
    cd.register("web", id="web-1", port=8080, connect_proxy_port=21000)
    cd.register("native", port=9000, connect_native=True)
    [entry] = get(cd, "/v1/health/connect/web?passing").json()
    svc = entry["Service"]
    assert svc["Kind"] == "connect-proxy" and svc["ID"] == "web-1-sidecar-proxy"
    assert svc["Service"] == "web-sidecar-proxy" and svc["Port"] == 21000
    assert svc["Proxy"]["DestinationServiceName"] == "web"
    assert svc["Proxy"]["DestinationServiceID"] == "web-1"
    assert svc["Proxy"]["LocalServicePort"] == 8080
    assert ids(get(cd, "/v1/health/connect/native")) == ["native"]
    assert "web-sidecar-proxy" in get(cd, "/v1/catalog/services").json()
    cd.set_status("web-1", "critical")
    assert get(cd, "/v1/health/connect/web?passing").json() == []
    [entry] = get(cd, "/v1/health/connect/web").json()
    assert entry["Checks"][1]["Type"] == "alias" and entry["Checks"][1]["Status"] == "critical"
    cd.deregister("web-1")
    assert get(cd, "/v1/health/connect/web").json() == []


def test_sidecar_registration_through_agent_api(cd: ConsulDouble, client: consul.Consul) -> None:
    client.agent.service.register(
        "api", service_id="api-1", port=9000, connect={"SidecarService": {}}
    )
    [entry] = get(cd, "/v1/health/connect/api").json()
    svc = entry["Service"]
    assert svc["ID"] == "api-1-sidecar-proxy" and svc["Port"] == 21000
    assert svc["Proxy"]["DestinationServiceID"] == "api-1"
    names = [c["Name"] for c in entry["Checks"][1:]]
    assert names == ["Connect Sidecar Listening", "Connect Sidecar Aliasing api-1"]
    client.agent.service.deregister("api-1")
    assert get(cd, "/v1/health/connect/api").json() == []


def test_roots_and_leaf_shapes_and_verification(cd: ConsulDouble, client: consul.Consul) -> None:
    roots = client.agent.connect.ca.roots()
    assert roots["TrustDomain"] == cd.trust_domain
    [root] = roots["Roots"]
    assert roots["ActiveRootID"] == root["ID"] == cd.ca.id and root["Active"] is True
    for key in ("Name", "SerialNumber", "SigningKeyID", "NotBefore", "NotAfter", "RootCert"):
        assert root[key]
    assert root["PrivateKeyType"] == "ec" and root["PrivateKeyBits"] == 256
    root_cert = x509.load_pem_x509_certificate(root["RootCert"].encode())

    leaf = client.agent.connect.ca.leaf("web")
    uri = consul_service_uri(cd.trust_domain, "web", "dc1")
    assert leaf["Service"] == "web" and leaf["ServiceURI"] == uri
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    cert.verify_directly_issued_by(root_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert leaf["SerialNumber"] == ":".join(
        f"{b:02x}" for b in cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8)
    )
    valid_after = datetime.fromisoformat(leaf["ValidAfter"])
    valid_before = datetime.fromisoformat(leaf["ValidBefore"])
    assert valid_after == cert.not_valid_before_utc and valid_before == cert.not_valid_after_utc
    assert valid_before - valid_after >= timedelta(hours=72)
    key = serialization.load_pem_private_key(leaf["PrivateKeyPEM"].encode(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    again = client.agent.connect.ca.leaf("web")
    assert again["SerialNumber"] == leaf["SerialNumber"]  # cached until rotation/renewal


def test_leaf_blocking_query_and_auto_renewal() -> None:
    with ConsulDouble(leaf_ttl=timedelta(seconds=3)) as double:
        first = get(double, "/v1/agent/connect/ca/leaf/web")
        issued = time.monotonic()
        index = int(first.headers["X-Consul-Index"])
        assert index == first.json()["ModifyIndex"]
        resp = get(double, f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10s")
        renewed_after = time.monotonic() - issued
        assert int(resp.headers["X-Consul-Index"]) > index
        assert resp.json()["SerialNumber"] != first.json()["SerialNumber"]
        assert 3 * 0.6 - 0.3 <= renewed_after <= 3 * 0.9 + 0.5


def test_rotate_leaf_wakes_blocked_leaf_query(cd: ConsulDouble) -> None:
    first = get(cd, "/v1/agent/connect/ca/leaf/web")
    index = first.headers["X-Consul-Index"]
    thread, out = in_thread(
        lambda: get(cd, f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10s")
    )
    time.sleep(0.3)
    assert thread.is_alive()
    cd.rotate_leaf()
    thread.join(5)
    assert out["result"].json()["SerialNumber"] != first.json()["SerialNumber"]
    assert cd.current_leaf("web").serial_hex == out["result"].json()["SerialNumber"]


def test_rotate_ca(cd: ConsulDouble) -> None:
    old_root_id = cd.ca.id
    get(cd, "/v1/agent/connect/ca/leaf/web")
    index = get(cd, "/v1/agent/connect/ca/roots").headers["X-Consul-Index"]
    thread, out = in_thread(lambda: get(cd, f"/v1/agent/connect/ca/roots?index={index}&wait=10s"))
    time.sleep(0.2)
    new_ca = CertificateAuthority(trust_domain=cd.trust_domain)
    cd.rotate_ca(new_ca)
    thread.join(5)
    roots = out["result"].json()
    assert roots["ActiveRootID"] == new_ca.id != old_root_id
    assert {r["ID"]: r["Active"] for r in roots["Roots"]} == {old_root_id: False, new_ca.id: True}
    leaf = get(cd, "/v1/agent/connect/ca/leaf/web").json()
    x509.load_pem_x509_certificate(leaf["CertPEM"].encode()).verify_directly_issued_by(
        new_ca.certificate
    )


# -- switches added for the discovery tests -----------------------------------------------


def test_namespace_refused_even_default_as_consul_ce_does(cd: ConsulDouble) -> None:
    cd.register("web", id="w1", port=1)
    for query in ("?ns=default", "?ns=team-a"):
        resp = get(cd, "/v1/health/service/web" + query)
        assert resp.status_code == 400
        assert resp.text.startswith('Invalid query parameter: "ns"')
    resp = get(cd, "/v1/health/service/web", headers={"X-Consul-Namespace": "default"})
    assert resp.status_code == 400 and "X-Consul-Namespace" in resp.text
    assert get(cd, "/v1/health/service/web?ns=").status_code == 200  # empty: none given


def test_failure_switch_per_path_and_datacenter() -> None:
    with ConsulDouble(datacenters=("dc1", "dc2")) as cd:
        cd.register("web", id="w1", port=1)
        cd.register("api", id="a1", port=2)
        cd.fail_with(500, "boom", path="/v1/health/service/api")
        cd.fail_with(503, "dc2 down", dc="dc2")
        assert get(cd, "/v1/health/service/web").status_code == 200
        assert get(cd, "/v1/health/service/api").text == "boom"
        assert get(cd, "/v1/catalog/services").status_code == 200
        assert get(cd, "/v1/catalog/services?dc=dc2").text == "dc2 down"
        cd.fail_with(None, path="/v1/health/service/api")
        assert get(cd, "/v1/health/service/api").status_code == 200
        assert get(cd, "/v1/health/service/web?dc=dc2").status_code == 503
        cd.fail_with(None)
        assert get(cd, "/v1/health/service/web?dc=dc2").status_code == 200


@pytest.mark.parametrize("switch", ["fail", "garbage", "hang"])
def test_switches_reach_blocking_queries_in_flight(cd: ConsulDouble, switch: str) -> None:
    cd.register("web", id="w1", port=1)
    index = get(cd, "/v1/health/service/web").headers["X-Consul-Index"]
    thread, out = in_thread(
        lambda: get(cd, f"/v1/health/service/web?index={index}&wait=20s", timeout=30)
    )
    time.sleep(0.3)
    if switch == "fail":
        cd.fail_with(500, "rpc error: No cluster leader", path="/v1/health/")
    elif switch == "garbage":
        cd.garbage(True)
    else:
        cd.hang(True)
        time.sleep(0.3)
        cd.register("web", id="w2", port=2)  # would wake the query: held by the hang
        time.sleep(0.5)
        assert thread.is_alive()
        cd.hang(False)
    thread.join(5)
    assert not thread.is_alive() and out["elapsed"] < 3, out
    resp = out["result"]
    if switch == "fail":
        assert resp.status_code == 500 and "No cluster leader" in resp.text
    elif switch == "garbage":
        assert resp.status_code == 200 and resp.content.startswith(b'[{"Node"')
    else:
        assert sorted(ids(resp)) == ["w1", "w2"]


def test_unrelated_switch_leaves_blocking_queries_blocked(cd: ConsulDouble) -> None:
    cd.register("web", id="w1", port=1)
    index = get(cd, "/v1/health/service/web").headers["X-Consul-Index"]
    thread, out = in_thread(lambda: get(cd, f"/v1/health/service/web?index={index}&wait=1s"))
    time.sleep(0.2)
    cd.fail_with(500, "x", path="/v1/health/service/api")
    thread.join(5)
    assert out["result"].status_code == 200 and out["elapsed"] >= 1.0


def test_index_zero_and_early_returns(cd: ConsulDouble) -> None:
    cd.register("web", id="w1", port=1)
    index = get(cd, "/v1/health/service/web").headers["X-Consul-Index"]
    cd.report_index_zero(True)
    assert get(cd, "/v1/health/service/web").headers["X-Consul-Index"] == "0"
    assert get(cd, "/v1/catalog/services").headers["X-Consul-Index"] == "0"
    cd.report_index_zero(False)
    cd.return_early(1.0)
    start = time.monotonic()
    resp = get(cd, f"/v1/health/service/web?index={index}&wait=10s")
    assert time.monotonic() - start < 1.0
    assert resp.headers["X-Consul-Index"] == index  # returned, nothing changed
    cd.return_early(0)
    start = time.monotonic()
    get(cd, f"/v1/health/service/web?index={index}&wait=300ms")
    assert time.monotonic() - start >= 0.3


def test_lag_sends_the_state_of_when_the_answer_was_computed(cd: ConsulDouble) -> None:
    cd.register("web", id="w1", port=1)
    cd.lag("/v1/health/service/web", 1.0)
    thread, out = in_thread(lambda: get(cd, "/v1/health/service/web"))
    deadline = time.monotonic() + 5
    while cd.lagged < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    cd.set_status("w1", "critical")
    thread.join(5)
    assert out["elapsed"] >= 1.0
    assert [c["Status"] for c in out["result"].json()[0]["Checks"]][-1] == "passing"
    index = get(cd, "/v1/health/service/web").headers["X-Consul-Index"]
    start = time.monotonic()
    get(cd, f"/v1/health/service/web?index={index}&wait=100ms")  # blocking: not lagged
    assert time.monotonic() - start < 0.9
    cd.lag(None)
