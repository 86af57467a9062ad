"""Rules, backend groups and weighted splits through real gunicorn (two workers)."""

from __future__ import annotations

import pytest
import requests

from tests.doubles.consul import ConsulDouble
from tests.integration.consul_helpers import consul_config, eventually
from tests.support.gateway import one_session_per_worker
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration


@pytest.fixture
def stable():
    with Upstream("stable") as up:
        yield up


@pytest.fixture
def canary():
    with Upstream("canary") as up:
        yield up


def shop(stable, canary, **extra) -> dict:
    svc = {
        "name": "shop",
        "basePath": "/shop",
        "targets": [stable.url],
        "groups": {"canary": {"targets": [canary.url]}},
    }
    svc.update(extra)
    return {"services": [svc]}


SPLIT = {"groups": [{"group": "default", "weight": 90}, {"group": "canary", "weight": 10}]}


def test_a_90_10_split_holds_over_2000_requests_and_admin_sums_the_workers(
    gateway_factory, stable, canary
):
    gw = gateway_factory(shop(stable, canary, split=SPLIT), workers=2)
    sessions = list(one_session_per_worker(gw).values())
    seen = {"stable": 0, "canary": 0}
    for i in range(2000):
        r = sessions[i % 2].get(f"{gw.url}/shop/item", timeout=10)
        assert r.status_code == 200
        seen[r.json()["server"]] += 1
    share = 100 * seen["canary"] / 2000
    assert 7 <= share <= 13, seen  # 90/10 within +-3 points
    (route,) = gw.admin("routes").json()["routes"]
    groups = {g["group"]: g for g in route["split"]["groups"]}
    # Counted by both workers, summed: exactly what the backends saw.
    assert groups["canary"]["requests"] == seen["canary"]
    assert groups["default"]["requests"] == seen["stable"]
    assert groups["canary"]["weight"] == 10 and groups["canary"]["share"] == 10.0
    assert abs(groups["canary"]["observedShare"] - share) < 0.01


def test_sticky_cookie_keeps_a_client_on_one_side(gateway_factory, stable, canary):
    split = dict(SPLIT, sticky={"cookie": "shop-side"})
    gw = gateway_factory(shop(stable, canary, split=split), workers=2)
    sides = set()
    for _ in range(40):
        with requests.Session() as s:
            first = s.get(f"{gw.url}/shop/a", timeout=10)
            side = first.json()["server"]
            assert "shop-side=" in first.headers["Set-Cookie"]
            for _ in range(5):
                r = s.get(f"{gw.url}/shop/b", timeout=10)
                assert r.json()["server"] == side
                assert "Set-Cookie" not in r.headers  # the cookie holds: nothing to set
            sides.add(side)
    assert sides == {"stable", "canary"} or sides == {"stable"}


def test_sticky_header_maps_each_user_to_one_side_on_every_worker(gateway_factory, stable, canary):
    split = dict(SPLIT, sticky={"header": "X-User-Id"})
    gw = gateway_factory(shop(stable, canary, split=split), workers=2)
    sessions = list(one_session_per_worker(gw).values())
    canaries = 0
    for user in range(60):
        sides = {
            sessions[i % 2]
            .get(f"{gw.url}/shop/x", headers={"X-User-Id": f"user-{user}"}, timeout=10)
            .json()["server"]
            for i in range(4)
        }
        assert len(sides) == 1, (user, sides)
        canaries += sides == {"canary"}
    assert 0 < canaries < 20


def test_override_header_forces_a_side(gateway_factory, stable, canary):
    split = dict(
        SPLIT, override={"header": "X-Canary", "values": {"always": "canary", "never": "default"}}
    )
    gw = gateway_factory(shop(stable, canary, split=split))
    for _ in range(10):
        always = requests.get(f"{gw.url}/shop/x", headers={"X-Canary": "always"}, timeout=10)
        never = requests.get(f"{gw.url}/shop/x", headers={"X-Canary": "never"}, timeout=10)
        assert always.json()["server"] == "canary"
        assert never.json()["server"] == "stable"


RULES = [
    {
        "match": {"path": {"prefix": "/shop/maintenance"}},
        "direct": {"status": 503, "headers": {"Retry-After": "120"}, "body": "back soon"},
    },
    {
        "match": {"headers": [{"name": "X-Beta", "exact": "1"}], "methods": ["GET"]},
        "group": "canary",
        "rewritePrefix": {"from": "/shop", "to": "/v2/shop"},
        "requestHeaders": {"set": {"X-Route": "beta"}, "remove": ["X-Internal"]},
        "responseHeaders": {"set": {"X-Served-By": "canary"}, "remove": ["Content-Type"]},
    },
    {"match": {"query": [{"name": "preview", "present": True}]}, "group": "canary"},
    {"match": {"cookies": [{"name": "beta", "exact": "yes"}]}, "group": "canary"},
    {
        "match": {"path": {"regex": "/shop/legacy/[0-9]+"}},
        "direct": {"status": 301, "headers": {"Location": "/shop/items"}},
    },
]


def test_rules_route_rewrite_edit_and_answer_directly(gateway_factory, stable, canary):
    gw = gateway_factory(shop(stable, canary, rules=RULES))
    r = requests.get(f"{gw.url}/shop/maintenance/x", timeout=10)
    assert (r.status_code, r.text, r.headers["Retry-After"]) == (503, "back soon", "120")
    assert r.headers["X-Request-Id"]
    assert stable.requests == 0 and canary.requests == 0  # nothing went upstream

    r = requests.get(
        f"{gw.url}/shop/items?id=1",
        headers={"X-Beta": "1", "X-Internal": "secret"},
        timeout=10,
    )
    seen = r.json()
    assert seen["server"] == "canary" and seen["rawPath"] == "/v2/shop/items?id=1"
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert sent["x-route"] == "beta" and "x-internal" not in sent
    assert r.headers["X-Served-By"] == "canary" and "Content-Type" not in r.headers

    # X-Beta on a POST: the rule is for GET only; the default group takes it.
    assert (
        requests.post(f"{gw.url}/shop/items", headers={"X-Beta": "1"}).json()["server"] == "stable"
    )
    assert requests.get(f"{gw.url}/shop/items?preview").json()["server"] == "canary"
    assert (
        requests.get(f"{gw.url}/shop/items", cookies={"beta": "yes"}).json()["server"] == "canary"
    )
    assert requests.get(f"{gw.url}/shop/items", cookies={"beta": "no"}).json()["server"] == "stable"
    r = requests.get(f"{gw.url}/shop/legacy/42", allow_redirects=False, timeout=10)
    assert (r.status_code, r.headers["Location"], r.content) == (301, "/shop/items", b"")
    # A regex is a full match: /shop/legacy/42x is not a legacy item.
    assert requests.get(f"{gw.url}/shop/legacy/42x").json()["server"] == "stable"

    (route,) = gw.admin("routes").json()["routes"]
    by_index = {r["index"]: r for r in route["rules"]}
    assert by_index[0]["direct"] == {"status": 503}
    assert by_index[1]["group"] == "canary" and by_index[1]["requests"] == 1


def test_a_group_can_be_a_mesh_service(gateway_factory, stable, canary):
    with ConsulDouble() as consul:
        consul.register("shop", id="shop-1", port=stable.port)
        consul.register("shop-canary", id="shop-c1", port=canary.port)
        config = consul_config(
            consul,
            [
                {
                    "name": "shop",
                    "basePath": "/shop",
                    "groups": {"canary": {"meshService": "shop-canary"}},
                    "split": SPLIT,
                }
            ],
        )
        gw = gateway_factory(config, workers=2)

        def both() -> bool:
            servers = {
                requests.get(f"{gw.url}/shop/x", timeout=10).json()["server"] for _ in range(60)
            }
            return servers == {"stable", "canary"}

        eventually(both, timeout=15, what="both groups served")
        services = {s["name"]: s for s in gw.admin("services").json()["services"]}
        assert services["shop/canary"]["meshService"] == "shop-canary"
        assert [t["port"] for t in services["shop/canary"]["targets"]] == [canary.port]
