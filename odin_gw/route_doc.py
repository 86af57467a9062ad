"""The admin view of one route (``/admin/routes``): its settings, backend groups, rules,
split with live per-group counts, and the request policy with each value's source."""

from __future__ import annotations

from dataclasses import asdict


def describe_route(route, gateway, split_counts: dict) -> dict:
    """``route`` as ``/admin/routes`` shows it; ``split_counts`` are the totals of
    ``odin_split_requests`` over every worker (``GatewayMetrics.totals``)."""
    svc = route.config
    doc = {
        "service": route.name,
        "basePath": route.base_path,
        "stripBasePath": route.strip_base_path,
        "meshService": route.mesh_service,
        "loadBalancing": route.balancer.name,
        "timeout": route.timeout.read_timeout,
        "connectTimeout": route.timeout.connect_timeout,
        "retries": route.retries,
        "preserveHost": route.preserve_host,
    }
    if svc is None:
        return doc
    doc["policy"] = _policy(route, gateway)
    doc["groups"] = {
        name: {
            "meshService": g.mesh_service if not g.config.targets else None,
            "targets": [t.url for t in g.config.targets],
            "loadBalancing": g.balancer.name,
        }
        for name, g in route.groups.items()
    }
    counts = _group_counts(route.name, split_counts)
    if svc.split is not None:
        total_weight = sum(w for _, w in svc.split.weights) or 1
        total = sum(counts.get(g, {}).get("weight", 0) for g, _ in svc.split.weights)
        doc["split"] = {
            "groups": [
                {
                    "group": g,
                    "weight": w,
                    "share": round(100 * w / total_weight, 2),
                    "requests": sum(counts.get(g, {}).values()),
                    "byReason": counts.get(g, {}),
                    "observedShare": (
                        round(100 * counts.get(g, {}).get("weight", 0) / total, 2)
                        if total
                        else None
                    ),
                }
                for g, w in svc.split.weights
            ],
            "sticky": (
                {"cookie": svc.split.sticky_cookie}
                if svc.split.sticky_cookie
                else {"header": svc.split.sticky_header}
                if svc.split.sticky_header
                else None
            ),
            "override": (
                {"header": svc.split.override_header, "values": dict(svc.split.override_values)}
                if svc.split.override_header
                else None
            ),
        }
    if svc.rules:
        doc["rules"] = [_rule(rule, counts) for rule in svc.rules]
    doc["requestsByGroup"] = {g: sum(c.values()) for g, c in counts.items()}
    if svc.rate_limit is not None:
        doc["rateLimit"] = _limit(svc.rate_limit)
    if svc.circuit_breaker is not None:
        doc["circuitBreaker"] = _plain(asdict(svc.circuit_breaker))
    doc["passiveHealth"] = _plain(asdict(svc.passive_health))
    doc["panicThreshold"] = svc.panic_threshold
    if svc.health_check is not None:
        hc = asdict(svc.health_check)
        hc["expected_status"] = sorted(hc["expected_status"])
        doc["healthCheck"] = _plain(hc)
    doc["upgrades"] = sorted(svc.upgrades)
    return doc


def _policy(route, gateway) -> dict:
    """The request policy: the route's own values (config) and, per mesh route, what
    the mesh changes; ``origins`` name each value's source."""
    described = gateway.policy(route).describe()
    described["tryTimeout"] = route.config.try_timeout
    rp = route.config.retry_policy
    retry_on = [w for w, on in (("connect-failure", rp.connect_failure), ("reset", rp.reset)) if on]
    described["retryOn"] = retry_on + sorted(rp.statuses)
    described["retryMethods"] = sorted(route.retry.idempotent)
    described["bufferBody"] = route.buffer_body
    return described


def _group_counts(service: str, split_counts: dict) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for labels, value in split_counts.items():
        d = dict(labels)
        if d.get("service") != service:
            continue
        out.setdefault(d.get("group", "?"), {})[d.get("reason", "?")] = int(value)
    return out


def _rule(rule, counts) -> dict:
    m = rule.match
    match: dict = {}
    if m.methods:
        match["methods"] = sorted(m.methods)
    if m.path is not None:
        match["path"] = {k: v for k, v in asdict(m.path).items() if v is not None}
    for key in ("headers", "query", "cookies"):
        items = getattr(m, key)
        if items:
            match[key] = [_condition(i) for i in items]
    doc: dict = {"index": rule.index, "match": match}
    if rule.direct is not None:
        doc["direct"] = {"status": rule.direct.status}
    else:
        doc["group"] = rule.group or "default"
    if rule.rewrite_prefix is not None:
        doc["rewritePrefix"] = {"from": rule.rewrite_prefix[0], "to": rule.rewrite_prefix[1]}
    if rule.request_headers:
        doc["requestHeaders"] = {
            "set": [n for n, _ in rule.request_headers.set],
            "remove": list(rule.request_headers.remove),
        }
    if rule.response_headers:
        doc["responseHeaders"] = {
            "set": [n for n, _ in rule.response_headers.set],
            "remove": list(rule.response_headers.remove),
        }
    if rule.rate_limit is not None:
        doc["rateLimit"] = _limit(rule.rate_limit)
    doc["requests"] = sum(c.get(f"rule-{rule.index}", 0) for c in counts.values())
    return doc


#: Parts of a header, parameter or cookie name whose matched value is not shown.
SECRET_HINTS = ("auth", "token", "key", "secret", "session", "password", "cookie")


def _condition(cond) -> dict:
    doc = {k: v for k, v in asdict(cond).items() if v is not None}
    if any(h in cond.name.lower() for h in SECRET_HINTS):
        for k in ("exact", "regex"):
            if k in doc:
                doc[k] = "<redacted>"
    return doc


def _limit(limit) -> dict:
    return {"requests": limit.requests, "per": limit.per, "burst": limit.burst, "key": limit.key}


def _plain(doc: dict) -> dict:
    """snake_case keys to the config's camelCase; durations stay seconds."""
    out = {}
    for key, value in doc.items():
        head, *rest = key.split("_")
        name = head + "".join(p.capitalize() if not p[:1].isdigit() else p for p in rest)
        out[name] = _plain(value) if isinstance(value, dict) else value
    return out
