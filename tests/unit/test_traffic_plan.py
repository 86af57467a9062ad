"""TrafficPlan: the order of limits, rules and split, and the edits on the way back."""

from __future__ import annotations

import pytest
from werkzeug.test import EnvironBuilder

from odin_gw.config import parse_config
from odin_gw.metrics import GatewayMetrics
from odin_gw.proxy.exchange import Exchange
from odin_gw.proxy.forwarder import ProxyResponse
from odin_gw.routing import RouteTable
from odin_gw.traffic.plan import TrafficPlan
from odin_gw.traffic.rate_limit import RateLimited, RateLimits
from odin_gw.traffic.split import Split

BASE = """
services:
  - name: shop
    basePath: /shop
    targets: [http://127.0.0.1:9001]
    groups:
      canary: {targets: [http://127.0.0.1:9002]}
"""


class Forwarder:
    """Records what the plan sends where; answers 200 with one upstream header."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def forward(self, environ, route, exchange, rule=None):
        self.calls.append((route.name, rule))
        return ProxyResponse.relay([b"up"], 200, [("Server", "up"), ("Content-Length", "2")])


class MemoryLimits(RateLimits):
    """RateLimits over the library's memory storage (per process), as the real ones."""

    def __init__(self, metrics) -> None:
        from limits.storage import MemoryStorage

        super().__init__(MemoryStorage(), metrics=metrics)


def build(extra: str = "", limited: bool = False):
    config = parse_config(BASE + extra)
    metrics = GatewayMetrics()
    routes = RouteTable.from_config(config)
    limits = MemoryLimits(metrics) if limited else None
    return TrafficPlan.for_route(routes.entries[0], limits, metrics), metrics


def env(path="/shop/x", method="GET", headers=None):
    e = EnvironBuilder(path=path, method=method, headers=headers).get_environ()
    e["REMOTE_ADDR"] = "10.1.2.3"
    return e


def handle(plan, environ, fwd=None):
    fwd = fwd or Forwarder()
    exchange = Exchange(environ)
    response = plan.handle(environ, exchange, environ["PATH_INFO"], fwd)
    return response, exchange, fwd


def counts(metrics) -> dict:
    return {
        (dict(k)["group"], dict(k)["reason"]): v
        for k, v in metrics.totals("odin_split_requests").items()
    }


def test_nothing_configured_is_no_plan():
    plan, _ = build()
    assert plan is None
    # A limit with no limiter (none configured on the gateway) is no plan either.
    plan, _ = build("    rateLimit: {requests: 5, per: second}\n")
    assert plan is None


def test_direct_answer_sends_nothing_upstream():
    plan, metrics = build(
        """    rules:
      - match: {path: {prefix: /shop/down}}
        direct: {status: 503, headers: {Retry-After: "60"}, body: "later"}
"""
    )
    response, exchange, fwd = handle(plan, env("/shop/down/x"))
    assert fwd.calls == []
    assert response.status_code == 503 and b"".join(response.response) == b"later"
    headers = dict(response.headers)
    assert headers["Retry-After"] == "60" and headers["Content-Length"] == "5"
    assert headers["X-Request-Id"] == exchange.request_id
    assert (exchange.status, exchange.response_bytes, exchange.target) == (503, 5, None)
    assert counts(metrics) == {("direct", "rule-0"): 1.0}
    # HEAD: the same head, no body bytes.
    response, exchange, _ = handle(plan, env("/shop/down/x", method="HEAD"))
    assert list(response.response) == [] and exchange.response_bytes == 0
    assert dict(response.headers)["Content-Length"] == "5"


def test_a_rule_picks_the_group_and_edits_the_answer():
    plan, metrics = build(
        """    rules:
      - match: {headers: [{name: X-Beta, present: true}]}
        group: canary
        responseHeaders: {set: {X-Side: canary}, remove: [Server]}
"""
    )
    response, _, fwd = handle(plan, env(headers={"X-Beta": "1"}))
    ((route, rule),) = fwd.calls
    assert route == "shop/canary" and rule.index == 0
    headers = dict(response.headers)
    assert headers["X-Side"] == "canary" and "Server" not in headers
    # No match: the default group, the rule is not passed, nothing edited.
    response, _, fwd = handle(plan, env())
    assert fwd.calls == [("shop", None)] and dict(response.headers)["Server"] == "up"
    assert counts(metrics) == {("canary", "rule-0"): 1.0, ("default", "default"): 1.0}


def test_a_rule_without_group_goes_to_default_with_its_edits():
    plan, _ = build(
        """    rules:
      - match: {methods: [POST]}
        requestHeaders: {set: {X-Post: "1"}}
"""
    )
    _, _, fwd = handle(plan, env(method="POST"))
    ((route, rule),) = fwd.calls
    assert route == "shop" and rule is not None and rule.index == 0


def test_the_split_chooses_and_its_cookie_is_set():
    plan, metrics = build(
        """    split:
      groups: [{group: default, weight: 0}, {group: canary, weight: 1}]
      sticky: {cookie: side}
"""
    )
    response, _, fwd = handle(plan, env())
    assert fwd.calls == [("shop/canary", None)]
    cookies = [v for k, v in response.headers.items() if k == "Set-Cookie"]
    assert len(cookies) == 1 and cookies[0].startswith("side=canary")
    assert counts(metrics) == {("canary", "weight"): 1.0}
    # The cookie held: no new one.
    response, _, _ = handle(plan, env(headers={"Cookie": "side=canary"}))
    assert "Set-Cookie" not in response.headers
    assert counts(metrics)[("canary", "sticky")] == 1.0


def test_a_rule_wins_over_the_split():
    plan, _ = build(
        """    rules:
      - match: {query: [{name: stable, present: true}]}
        group: default
    split:
      groups: [{group: canary, weight: 1}]
"""
    )
    _, _, fwd = handle(plan, env("/shop/x?stable"))
    assert fwd.calls[0][0] == "shop"
    assert isinstance(plan.split, Split)


def test_limits_come_first_and_their_headers_are_added():
    plan, metrics = build(
        """    rateLimit: {requests: 2, per: hour}
    rules:
      - match: {path: {prefix: /shop/down}}
        direct: {status: 503}
""",
        limited=True,
    )
    response, _, _ = handle(plan, env())
    names = [k for k, _ in response.headers.items()]
    assert names.count("RateLimit-Policy") == 1 and names.count("RateLimit") == 1
    response, _, _ = handle(plan, env("/shop/down"))  # a direct answer is counted too
    assert response.status_code == 503 and "RateLimit" in dict(response.headers)
    assert metrics.totals("odin_rate_limited") == {}
    fwd = Forwarder()
    with pytest.raises(RateLimited):
        handle(plan, env(), fwd)
    assert fwd.calls == []  # refused before any rule or upstream
    with pytest.raises(RateLimited):
        plan.check_service_limit(env(), Exchange(env()))  # tunnels count the same
    assert sum(metrics.totals("odin_rate_limited").values()) == 2


def test_an_upgrade_counts_under_its_header_key():
    # Tunnels take the service's limit alone, keyed as ordinary requests: here per API key.
    plan, _ = build(
        "    rateLimit: {requests: 1, per: hour, key: 'header:X-Api-Key'}\n", limited=True
    )
    first = env(headers={"X-Api-Key": "alice"})
    plan.check_service_limit(first, Exchange(first))
    with pytest.raises(RateLimited):
        plan.check_service_limit(first, Exchange(first))
    other = env(headers={"X-Api-Key": "bob"})  # same address, another key: its own count
    plan.check_service_limit(other, Exchange(other))


def test_a_rule_limit_applies_on_top_of_the_service_limit():
    plan, _ = build(
        """    rules:
      - match: {path: {prefix: /shop/search}}
        rateLimit: {requests: 1, per: hour}
""",
        limited=True,
    )
    handle(plan, env("/shop/search"))
    with pytest.raises(RateLimited):
        handle(plan, env("/shop/search"))
    handle(plan, env("/shop/other"))  # other paths: no rule, no limit
    # The service has no limit of its own: only the rule's headers.
    response, _, _ = handle(plan, env("/shop/other"))
    assert "RateLimit" not in dict(response.headers)


def test_service_and_rule_limits_each_add_their_headers_and_count_apart():
    plan, _ = build(
        """    rateLimit: {requests: 5, per: hour}
    rules:
      - match: {path: {prefix: /shop/a}}
        rateLimit: {requests: 1, per: hour, key: "header:X-Api-Key"}
      - match: {path: {prefix: /shop/b}}
        rateLimit: {requests: 1, per: hour}
""",
        limited=True,
    )
    response, _, _ = handle(plan, env("/shop/a", headers={"X-Api-Key": "k1"}))
    policies = [v for k, v in response.headers.items() if k == "RateLimit-Policy"]
    assert len(policies) == 2 and any("rule-0" in p for p in policies)
    # Another key for rule 0, and rule 1: their own counters.
    handle(plan, env("/shop/a", headers={"X-Api-Key": "k2"}))
    handle(plan, env("/shop/b"))
    with pytest.raises(RateLimited):
        handle(plan, env("/shop/a", headers={"X-Api-Key": "k1"}))
    with pytest.raises(RateLimited):
        handle(plan, env("/shop/b"))


def test_a_rule_that_only_removes_response_headers_is_applied():
    plan, _ = build(
        """    rules:
      - match: {methods: [GET]}
        responseHeaders: {remove: [Server]}
"""
    )
    response, _, _ = handle(plan, env())
    assert "Server" not in response.headers


def test_the_split_cookie_is_scoped_to_the_service_path():
    plan, _ = build(
        """    split:
      groups: [{group: canary, weight: 1}]
      sticky: {cookie: side}
"""
    )
    response, _, _ = handle(plan, env())
    (cookie,) = [v for k, v in response.headers.items() if k == "Set-Cookie"]
    assert "Path=/shop" in cookie
