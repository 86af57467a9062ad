"""Traffic management keys of a service (issue 10) and the top-level ``rateLimit``.

Frozen models, built once at load and read on the request path, and the marshmallow
schemas that build them. The shapes are described in ``docs/design/traffic-management.md``
and in the README's configuration reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from .fields import Duration, Section, Size, bad_value_char, is_token

# -- models --------------------------------------------------------------------------

RETRY_ON_WORDS = ("connect-failure", "reset")
RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600}


@dataclass(frozen=True)
class BackoffConfig:
    base: float = 0.025
    max: float = 0.25


@dataclass(frozen=True)
class BudgetConfig:
    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0


@dataclass(frozen=True)
class RetryPolicyConfig:
    """``retryPolicy``: what the gateway itself retries (mesh policies may add to it)."""

    connect_failure: bool = True
    reset: bool = True
    statuses: frozenset[int] = frozenset()
    methods: frozenset[str] = frozenset()  # beyond the idempotent ones
    buffer_body: int = 64 * 1024
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    budget: BudgetConfig | None = field(default_factory=BudgetConfig)


@dataclass(frozen=True)
class GroupConfig:
    """A named backend group: mesh-discovered (``meshService``) or static ``targets``."""

    name: str
    mesh_service: str | None = None
    targets: tuple = ()  # of model.Target
    load_balancing: str | None = None


@dataclass(frozen=True)
class ValueMatch:
    """One header, query parameter or cookie condition."""

    name: str
    exact: str | None = None
    regex: str | None = None
    present: bool | None = None  # True: must be present; False: must be absent


@dataclass(frozen=True)
class PathMatch:
    prefix: str | None = None
    exact: str | None = None
    regex: str | None = None


@dataclass(frozen=True)
class RuleMatch:
    methods: frozenset[str] = frozenset()
    path: PathMatch | None = None
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    cookies: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True)
class HeaderEdits:
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)


@dataclass(frozen=True)
class DirectResponse:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""


@dataclass(frozen=True)
class RateLimitConfig:
    """``requests`` per ``period`` seconds with ``burst`` more, keyed by ``key``:
    ``ip`` (the client as ``server.trustedProxies`` decides it), ``global``, or
    ``header:<Name>``."""

    requests: int
    period: int  # seconds: 1, 60 or 3600
    per: str  # "second" | "minute" | "hour", as written
    burst: int = 0
    key: str = "ip"


@dataclass(frozen=True)
class RuleConfig:
    index: int
    match: RuleMatch = field(default_factory=RuleMatch)
    group: str | None = None
    rewrite_prefix: tuple[str, str] | None = None  # (from, to)
    request_headers: HeaderEdits = field(default_factory=HeaderEdits)
    response_headers: HeaderEdits = field(default_factory=HeaderEdits)
    direct: DirectResponse | None = None
    rate_limit: RateLimitConfig | None = None


@dataclass(frozen=True)
class SplitConfig:
    weights: tuple[tuple[str, int], ...]  # (group, weight)
    sticky_cookie: str | None = None
    sticky_header: str | None = None
    override_header: str | None = None
    override_values: tuple[tuple[str, str], ...] = ()  # header value -> group


@dataclass(frozen=True)
class FailureRateConfig:
    threshold: float = 50.0  # percent
    min_requests: int = 20
    window: float = 10.0


@dataclass(frozen=True)
class CircuitBreakerConfig:
    consecutive_failures: int = 5
    failure_rate: FailureRateConfig | None = None
    open_for: float = 10.0
    max_open_for: float = 120.0
    half_open_requests: int = 1
    max_concurrent: int | None = None


@dataclass(frozen=True)
class HealthCheckConfig:
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_status: frozenset[int] = frozenset(range(200, 400))


@dataclass(frozen=True)
class GatewayRateLimitConfig:
    """Top-level ``rateLimit``: where counters live."""

    storage: str = "host"
    fail_open: bool = True


# -- schemas -------------------------------------------------------------------------


def _header_map(value, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be a map of header name to value")
    out = []
    for name, text in value.items():
        if not isinstance(name, str) or not is_token(name):
            raise ValidationError(f"{where}: {name!r} is not a valid header name")
        if not isinstance(text, str | int | float) or isinstance(text, bool):
            raise ValidationError(f"{where}: value of {name} must be a string")
        text = str(text)
        bad = bad_value_char(text) if not any(c in text for c in "\r\n\0") else "CR/LF/NUL"
        if bad is not None:
            raise ValidationError(f"{where}: value of {name} contains {bad!r}")
        out.append((name, text))
    return tuple(out)


def check_regex(pattern: str) -> None:
    """Raise ``ValidationError`` when ``pattern`` is not an RE2 expression (the path and
    header regexes are matched by RE2: linear time, no backtracking)."""
    import re2

    try:
        re2.compile(pattern)
    except Exception as exc:  # re2.error
        raise ValidationError(f"not a valid RE2 regular expression {pattern!r}: {exc}") from exc


class ValueMatchSchema(Section):
    name = fields.String(required=True, validate=validate.Length(min=1))
    exact = fields.String(load_default=None)
    regex = fields.String(load_default=None)
    present = fields.Boolean(load_default=None)
    absent = fields.Boolean(load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        given = [k for k in ("exact", "regex", "present", "absent") if data.get(k) is not None]
        if len(given) != 1:
            raise ValidationError("give exactly one of exact, regex, present, absent")
        if data.get("regex") is not None:
            check_regex(data["regex"])
        if data.get("present") is False or data.get("absent") is False:
            raise ValidationError("present/absent take true (use the other one for false)")

    @post_load
    def build(self, data, **kwargs):
        present = True if data.pop("present") else (False if data.pop("absent") else None)
        data.pop("absent", None)
        return ValueMatch(present=present, **data)


class HeaderMatchSchema(ValueMatchSchema):
    @validates_schema
    def check_name(self, data, **kwargs):
        if "name" in data and not is_token(data["name"]):
            raise ValidationError(f"{data['name']!r} is not a valid header name", "name")


class PathMatchSchema(Section):
    prefix = fields.String(load_default=None)
    exact = fields.String(load_default=None)
    regex = fields.String(load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        given = [k for k in ("prefix", "exact", "regex") if data.get(k) is not None]
        if len(given) != 1:
            raise ValidationError("give exactly one of prefix, exact, regex")
        for key in ("prefix", "exact"):
            if data.get(key) is not None and not data[key].startswith("/"):
                raise ValidationError(f"must start with /: {data[key]!r}", key)
        if data.get("regex") is not None:
            check_regex(data["regex"])

    @post_load
    def build(self, data, **kwargs):
        return PathMatch(**data)


class RuleMatchSchema(Section):
    methods = fields.List(fields.String(validate=validate.Length(min=1)), load_default=list)
    path = fields.Nested(PathMatchSchema, load_default=None)
    headers = fields.List(fields.Nested(HeaderMatchSchema), load_default=list)
    query = fields.List(fields.Nested(ValueMatchSchema), load_default=list)
    cookies = fields.List(fields.Nested(ValueMatchSchema), load_default=list)

    @validates_schema
    def check(self, data, **kwargs):
        for m in data.get("methods") or ():
            if not is_token(m):
                raise ValidationError(f"{m!r} is not an HTTP method", "methods")

    @post_load
    def build(self, data, **kwargs):
        return RuleMatch(
            methods=frozenset(m.upper() for m in data["methods"]),
            path=data["path"],
            headers=tuple(data["headers"]),
            query=tuple(data["query"]),
            cookies=tuple(data["cookies"]),
        )


class HeaderEditsSchema(Section):
    set = fields.Raw(load_default=dict)
    remove = fields.List(fields.String(), load_default=list)

    @validates_schema
    def check(self, data, **kwargs):
        _header_map(data.get("set") or {}, "set")
        for name in data.get("remove") or ():
            if not is_token(name):
                raise ValidationError(f"{name!r} is not a valid header name", "remove")

    @post_load
    def build(self, data, **kwargs):
        return HeaderEdits(set=_header_map(data["set"] or {}, "set"), remove=tuple(data["remove"]))


class DirectSchema(Section):
    status = fields.Integer(required=True, validate=validate.Range(200, 599))
    headers = fields.Raw(load_default=dict)
    body = fields.String(load_default="")

    @validates_schema
    def check(self, data, **kwargs):
        _header_map(data.get("headers") or {}, "headers")

    @post_load
    def build(self, data, **kwargs):
        return DirectResponse(
            status=data["status"],
            headers=_header_map(data["headers"], "headers"),
            body=data["body"],
        )


class RateLimitSchema(Section):
    requests = fields.Integer(required=True, validate=validate.Range(1, 10**9))
    per = fields.String(required=True, validate=validate.OneOf(tuple(RATE_PERIODS)))
    burst = fields.Integer(load_default=0, validate=validate.Range(0, 10**9))
    key = fields.String(load_default="ip")

    @validates_schema
    def check(self, data, **kwargs):
        key = data.get("key", "ip")
        if key in ("ip", "global"):
            return
        name = key[len("header:") :] if key.startswith("header:") else ""
        if not name or not is_token(name):
            raise ValidationError(
                f"{key!r}: use ip, global or header:<Name> (e.g. header:X-Api-Key)", "key"
            )

    @post_load
    def build(self, data, **kwargs):
        return RateLimitConfig(period=RATE_PERIODS[data["per"]], **data)


class RewriteSchema(Section):
    from_ = fields.String(data_key="from", required=True)
    to = fields.String(required=True)

    @validates_schema
    def check(self, data, **kwargs):
        for key in ("from_", "to"):
            if key in data and not data[key].startswith("/"):
                raise ValidationError(f"must start with /: {data[key]!r}", key.rstrip("_"))

    @post_load
    def build(self, data, **kwargs):
        return (data["from_"], data["to"])


class RuleSchema(Section):
    match = fields.Nested(RuleMatchSchema, load_default=RuleMatch)
    group = fields.String(load_default=None)
    rewrite_prefix = fields.Nested(RewriteSchema, data_key="rewritePrefix", load_default=None)
    request_headers = fields.Nested(
        HeaderEditsSchema, data_key="requestHeaders", load_default=HeaderEdits
    )
    response_headers = fields.Nested(
        HeaderEditsSchema, data_key="responseHeaders", load_default=HeaderEdits
    )
    direct = fields.Nested(DirectSchema, load_default=None)
    rate_limit = fields.Nested(RateLimitSchema, data_key="rateLimit", load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        if data.get("direct") is not None and (
            data.get("group") or data.get("rewrite_prefix") or data.get("request_headers")
        ):
            raise ValidationError(
                "a rule that answers directly sends nothing upstream: drop group, "
                "rewritePrefix and requestHeaders",
                "direct",
            )

    @post_load
    def build(self, data, **kwargs):
        return RuleConfig(index=0, **data)


class SplitEntrySchema(Section):
    group = fields.String(required=True)
    weight = fields.Integer(required=True, validate=validate.Range(0, 10000))


class StickySchema(Section):
    cookie = fields.String(load_default=None)
    header = fields.String(load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        if (data.get("cookie") is None) == (data.get("header") is None):
            raise ValidationError("give exactly one of cookie, header")
        if data.get("header") is not None and not is_token(data["header"]):
            raise ValidationError(f"{data['header']!r} is not a valid header name", "header")
        cookie = data.get("cookie")
        if cookie is not None and (not is_token(cookie) or "=" in cookie):
            raise ValidationError(f"{cookie!r} is not a valid cookie name", "cookie")


class OverrideSchema(Section):
    header = fields.String(required=True)
    values = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)

    @validates_schema
    def check(self, data, **kwargs):
        if "header" in data and not is_token(data["header"]):
            raise ValidationError(f"{data['header']!r} is not a valid header name", "header")


class SplitSchema(Section):
    groups = fields.List(
        fields.Nested(SplitEntrySchema), required=True, validate=validate.Length(min=1)
    )
    sticky = fields.Nested(StickySchema, load_default=None)
    override = fields.Nested(OverrideSchema, load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        entries = data.get("groups") or []
        names = [e["group"] for e in entries]
        if len(set(names)) != len(names):
            raise ValidationError("a group appears twice", "groups")
        if entries and sum(e["weight"] for e in entries) <= 0:
            raise ValidationError("the weights add up to 0", "groups")

    @post_load
    def build(self, data, **kwargs):
        sticky = data["sticky"] or {}
        override = data["override"] or {}
        return SplitConfig(
            weights=tuple((e["group"], e["weight"]) for e in data["groups"]),
            sticky_cookie=sticky.get("cookie"),
            sticky_header=sticky.get("header"),
            override_header=override.get("header"),
            override_values=tuple((override.get("values") or {}).items()),
        )


class BackoffSchema(Section):
    base = Duration(load_default=0.025)
    max = Duration(load_default=0.25)

    @post_load
    def build(self, data, **kwargs):
        if data["max"] < data["base"]:
            raise ValidationError("max must not be shorter than base", "max")
        return BackoffConfig(**data)


class BudgetSchema(Section):
    ratio = fields.Float(load_default=0.2, validate=validate.Range(0, 1000))
    min_per_second = fields.Float(
        data_key="minPerSecond", load_default=10.0, validate=validate.Range(0, 10**6)
    )
    ttl = Duration(load_default=10.0)

    @post_load
    def build(self, data, **kwargs):
        if not 1 <= data["ttl"] <= 60:
            raise ValidationError("ttl must be between 1s and 60s", "ttl")
        return BudgetConfig(**data)


class RetryOnField(fields.Field):
    """``retryOn``: ``connect-failure``, ``reset`` and HTTP statuses (or ``5xx``)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("must be a list such as [connect-failure, reset, 503]")
        words: set[str] = set()
        statuses: set[int] = set()
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
                statuses.add(item)
            elif isinstance(item, str) and item.strip().lower() in RETRY_ON_WORDS:
                words.add(item.strip().lower())
            elif isinstance(item, str) and item.strip().lower() == "5xx":
                statuses.update(range(500, 600))
            elif isinstance(item, str) and item.strip().isdigit() and 100 <= int(item) <= 599:
                statuses.add(int(item))
            else:
                raise ValidationError(
                    f"{item!r}: use connect-failure, reset, 5xx or a status such as 503"
                )
        return words, frozenset(statuses)


class RetryPolicySchema(Section):
    retry_on = RetryOnField(data_key="retryOn", load_default=None)
    methods = fields.List(fields.String(), load_default=list)
    buffer_body = Size(data_key="bufferBody", load_default=64 * 1024)
    backoff = fields.Nested(BackoffSchema, load_default=BackoffConfig)
    budget = fields.Raw(load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        for m in data.get("methods") or ():
            if not is_token(m):
                raise ValidationError(f"{m!r} is not an HTTP method", "methods")
        if data.get("buffer_body", 0) > 16 << 20:
            raise ValidationError("at most 16MiB: a replay copy is kept in memory", "bufferBody")

    @post_load
    def build(self, data, **kwargs):
        words, statuses = data["retry_on"] or (set(RETRY_ON_WORDS), frozenset())
        budget = data["budget"]
        if budget is False:
            budget_cfg = None
        elif budget is None:
            budget_cfg = BudgetConfig()
        else:
            budget_cfg = BudgetSchema().load(budget)
        return RetryPolicyConfig(
            connect_failure="connect-failure" in words,
            reset="reset" in words,
            statuses=statuses,
            methods=frozenset(m.upper() for m in data["methods"]),
            buffer_body=data["buffer_body"],
            backoff=data["backoff"],
            budget=budget_cfg,
        )


class GroupSchema(Section):
    mesh_service = fields.String(data_key="meshService", load_default=None)
    targets = fields.List(fields.Raw(), load_default=list)  # checked by the service schema
    load_balancing = fields.String(data_key="loadBalancing", load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        if bool(data.get("mesh_service")) == bool(data.get("targets")):
            raise ValidationError("give exactly one of meshService, targets")


class FailureRateSchema(Section):
    threshold = fields.Float(load_default=50.0, validate=validate.Range(1, 100))
    min_requests = fields.Integer(
        data_key="minRequests", load_default=20, validate=validate.Range(1, 10**6)
    )
    window = Duration(load_default=10.0)

    @post_load
    def build(self, data, **kwargs):
        return FailureRateConfig(**data)


class CircuitBreakerSchema(Section):
    consecutive_failures = fields.Integer(
        data_key="consecutiveFailures", load_default=5, validate=validate.Range(0, 10**6)
    )
    failure_rate = fields.Nested(FailureRateSchema, data_key="failureRate", load_default=None)
    open_for = Duration(data_key="openFor", load_default=10.0)
    max_open_for = Duration(data_key="maxOpenFor", load_default=120.0)
    half_open_requests = fields.Integer(
        data_key="halfOpenRequests", load_default=1, validate=validate.Range(1, 1000)
    )
    max_concurrent = fields.Integer(
        data_key="maxConcurrent", load_default=None, validate=validate.Range(1, 10**6)
    )

    @post_load
    def build(self, data, **kwargs):
        if data["max_open_for"] < data["open_for"]:
            raise ValidationError("maxOpenFor must not be shorter than openFor", "maxOpenFor")
        return CircuitBreakerConfig(**data)


class StatusSet(fields.Field):
    """``expectedStatus``: a status, a list of statuses, or a range ``"200-399"``."""

    def _deserialize(self, value, attr, data, **kwargs) -> frozenset[int]:
        items = value if isinstance(value, list) else [value]
        out: set[int] = set()
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
                out.add(item)
                continue
            if isinstance(item, str):
                low, dash, high = item.strip().partition("-")
                if low.isdigit() and (not dash or high.isdigit()):
                    a, b = int(low), int(high or low)
                    if 100 <= a <= b <= 599:
                        out.update(range(a, b + 1))
                        continue
            raise ValidationError(f"{item!r}: use a status such as 200 or a range 200-399")
        if not out:
            raise ValidationError("name at least one status")
        return frozenset(out)


class HealthCheckSchema(Section):
    path = fields.String(load_default="/health")
    interval = Duration(load_default=5.0)
    timeout = Duration(load_default=1.0)
    healthy_threshold = fields.Integer(
        data_key="healthyThreshold", load_default=2, validate=validate.Range(1, 100)
    )
    unhealthy_threshold = fields.Integer(
        data_key="unhealthyThreshold", load_default=3, validate=validate.Range(1, 100)
    )
    expected_status = StatusSet(data_key="expectedStatus", load_default=None)

    @validates_schema
    def check(self, data, **kwargs):
        path = data.get("path", "/")
        if not path.startswith("/") or any(c in path for c in " \r\n\t\0#"):
            raise ValidationError("must be a path such as /healthz", "path")
        if "interval" in data and data["interval"] < 0.1:
            raise ValidationError("at least 100ms", "interval")
        if "timeout" in data and "interval" in data and data["timeout"] > data["interval"]:
            raise ValidationError("must not be longer than interval", "timeout")

    @post_load
    def build(self, data, **kwargs):
        if data["expected_status"] is None:
            data["expected_status"] = frozenset(range(200, 400))
        return HealthCheckConfig(**data)


class PanicThreshold(fields.Field):
    """``panicThreshold``: a percentage 0-100, or ``off``."""

    def _deserialize(self, value, attr, data, **kwargs) -> float | None:
        if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
            return None
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100:
            return float(value)
        raise ValidationError("a percentage 0-100 (0: only when none is healthy), or off")


class GatewayRateLimitSchema(Section):
    storage = fields.String(load_default="host")
    fail_open = fields.Boolean(data_key="failOpen", load_default=True)

    @validates_schema
    def check(self, data, **kwargs):
        storage = data.get("storage", "host")
        if storage == "host":
            return
        if not storage.startswith(("redis://", "rediss://", "redis+unix://")):
            raise ValidationError(
                f"{storage!r}: use host (the workers of this host) or redis://host:port/db",
                "storage",
            )

    @post_load
    def build(self, data, **kwargs):
        return GatewayRateLimitConfig(**data)
