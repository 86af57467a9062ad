"""What happens to a routed request before it is forwarded: rate limits, rules, the
split, and the edits on the way back. One :class:`TrafficPlan` per service that
configures any of them, compiled once; a service without is forwarded directly.

Order, for a request on a service's route (Envoy's HTTP filter order in spirit: limits
before routing decisions, so a refused request costs nothing upstream):

1. the service's ``rateLimit`` (429 before anything else);
2. the first matching rule (``rules:``), then that rule's own ``rateLimit``;
3. a rule with ``direct`` answers itself (its response header edits applied);
4. the backend group: the rule's ``group``, else the split's choice (override header,
   stickiness, weights), else the service's own targets (``default``);
5. the request goes to that group's route, with the rule's path rewrite and request
   header edits; the answer gets the rule's response header edits, the split's
   ``Set-Cookie`` and the ``RateLimit`` headers.

Each choice counts in ``odin_split_requests{service, group, reason}`` (reason:
``rule-<i>``, ``override``, ``sticky``, ``weight`` or ``default``): ``/admin/routes``
sums it over the workers.
"""

from __future__ import annotations

from ..proxy.forwarder import ProxyResponse
from ..proxy.transport import relay_headers
from ..routing import Route
from .rules import NO_RULES, CompiledRule, RuleSet
from .split import Split


class TrafficPlan:
    """The compiled traffic settings of one service's route."""

    __slots__ = ("_metrics", "counters", "limit", "limits", "route", "rules", "split")

    def __init__(self, route: Route, limits, metrics) -> None:
        svc = route.config
        self.route = route
        self.rules: RuleSet = RuleSet.compile(svc.rules) if svc.rules else NO_RULES
        self.split: Split | None = (
            Split.compile(svc.split, route.name, path=route.base_path)
            if svc.split is not None
            else None
        )
        self.limits = limits  # RateLimits, or None when nothing on the gateway is limited
        self.limit = svc.rate_limit if limits is not None else None
        # (group, reason) -> counter child, resolved once per pair.
        self.counters: dict[tuple[str, str], object] = {}
        self._metrics = metrics

    @classmethod
    def for_route(cls, route: Route, limits, metrics) -> TrafficPlan | None:
        """The plan of ``route``, or ``None`` when it has nothing to do."""
        svc = route.config
        if svc is None:
            return None
        limited = limits is not None and (
            svc.rate_limit is not None or any(r.rate_limit for r in svc.rules)
        )
        if not (svc.rules or svc.split is not None or limited):
            return None
        return cls(route, limits, metrics)

    def check_service_limit(self, environ: dict, exchange) -> None:
        """The service's rate limit alone (an Upgrade request: tunnels take no rule or
        split); raises ``RateLimited``."""
        if self.limit is not None:
            self.limits.check(self.route.name, self.limit, "service", exchange, environ)

    def handle(self, environ: dict, exchange, routed: str, forwarder):
        """Decide, forward and edit: the response for the request in ``environ``.

        ``routed`` is the decoded path the route was matched on; raises the gateway
        errors the forwarder raises, and ``RateLimited``.
        """
        route = self.route
        extra: list[tuple[str, str]] = []
        limits = self.limits
        if self.limit is not None:
            extra += limits.check(route.name, self.limit, "service", exchange, environ)
        rule: CompiledRule | None = self.rules.match(environ, routed) if self.rules else None
        if rule is not None and rule.rate_limit is not None and limits is not None:
            extra += limits.check(
                route.name, rule.rate_limit, f"rule-{rule.index}", exchange, environ
            )
        cookie = None
        if rule is not None:
            if rule.direct is not None:
                self._count("direct", f"rule-{rule.index}")
                return self._direct(rule, exchange, extra)
            group, reason = rule.group or "default", f"rule-{rule.index}"
        elif self.split is not None:
            choice = self.split.choose(environ)
            group, reason, cookie = choice.group, choice.reason, choice.set_cookie
        else:
            group, reason = "default", "default"
        self._count(group, reason)
        backend = route.backend(group)
        response = forwarder.forward(environ, backend, exchange, rule)
        # The gateway's own header values, built and checked here: added to the list
        # werkzeug's Headers wraps, without its per-item validation (relay_headers).
        items = response.headers._list
        if rule is not None and (rule.response_set or rule.response_remove):
            items = rule.apply_response(list(items))
            relay_headers(response.headers, items)
        if cookie is not None:
            items.append(("Set-Cookie", cookie))
        if extra:
            items.extend(extra)
        return response

    def _count(self, group: str, reason: str) -> None:
        child = self.counters.get((group, reason))
        if child is None:
            child = self._metrics.split_requests.labels(self.route.name, group, reason)
            self.counters[(group, reason)] = child
        child.inc()

    @staticmethod
    def _direct(rule: CompiledRule, exchange, extra: list[tuple[str, str]]):
        """The rule's own answer (maintenance pages, redirects): nothing goes upstream."""
        answer = rule.direct
        exchange.status = answer.status
        exchange.target = None
        headers = list(answer.headers)
        headers.append(("Content-Length", str(len(answer.body))))
        headers.append(("X-Request-Id", exchange.request_id))
        headers.extend(extra)
        body = answer.body if exchange.method != "HEAD" else b""
        exchange.response_bytes = len(body)
        return ProxyResponse.relay([body] if body else (), answer.status, headers)
