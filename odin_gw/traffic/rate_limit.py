"""Rate limits from the configuration, checked with the ``limits`` library.

A service's ``rateLimit`` (and a rule's, applied when the rule matched, on top of the
service's) is compiled once into a :class:`Policy`; :meth:`RateLimits.check` runs per
request and either returns the response headers to add or raises :class:`RateLimited`
(429). :meth:`RateLimits.for_gateway` gives ``None`` when nothing is limited: the
request path then costs one ``is None`` test.

**What an operator gets.** Counting uses the library's *sliding window counter*
(``SlidingWindowCounterRateLimiter``): a request is allowed when ``floor(previous window
count * share of the previous window still inside the last period) + current window
count + 1 <= quota``. It approximates "at most ``quota`` in any period" without the
doubling a fixed window allows around its boundary; windows start on multiples of the
period (host storage) or at a key's first request (Redis). Requests refused do not count.

``{requests: R, per: P}``: at most R requests per period P.

``{requests: R, per: P, burst: B}`` (B > 0) is the composition of two sliding windows,
both of which must admit the request (checked in this order):

- ``R + B`` per ``P``: the most one period may take (a client that was quiet may send
  R + B at once);
- ``K * R`` per ``K * P`` with ``K = max(10, ceil((R + B) / R))``: the long-run average
  stays R per P, so a burst is paid back by sending less within the next K periods.

This is close to Envoy's token bucket ``{max_tokens: R + B, tokens_per_fill: R,
fill_interval: P}`` (at most ``R + B`` in one period, about ``R`` per period over many).
The one difference: a request the long window refuses was already counted by the short
one (the library has no atomic "both or neither").

**Keys.** ``ip``: the client address as ``server.trustedProxies`` decided it
(``exchange.client_addr``: ``X-Forwarded-For`` only from trusted proxies). ``global``:
one counter for everyone. ``header:<Name>``: the header's value, hashed (BLAKE2b) so that
API keys never reach the storage or its logs in clear; a request without the header (or
with an empty one) is counted under its client address instead, so a keyless client can
neither escape the limit nor use up a bucket every other keyless client shares.

**Headers** (draft-ietf-httpapi-ratelimit-headers-11, May 2026, whose fields are
Structured Field lists with String policy names): every answer of a limited route
carries ``RateLimit-Policy: "users";q=100;w=60`` (one item per window) and
``RateLimit: "users";r=42;t=3`` (``r``: requests left now; ``t``: seconds until at least
one more frees up, or the window's length when nothing is used). A 429 also has
``Retry-After`` (whole seconds, rounded up, >= 1): when a request would be allowed again
if none were sent meanwhile; the refused policy's ``t`` is the same.

**Storage.** ``rateLimit.storage: host`` (default): :mod:`odin_gw.traffic.host_storage`,
one file in the state dir with a slot per worker of the host: no syscall per check (a
few microseconds); exact for requests decided one after another, whichever workers take
them, and at most one request over per other worker deciding at the same instant. A
check there costs one storage call per window (the decision and the window's state
after it, for the headers). ``redis://...``: the library's Redis storage, shared by
every replica, with 100 ms socket timeouts and one immediate retry on a broken
connection (never on a timeout). When the storage fails, the worker stops asking it for
:data:`OUTAGE_RETRY` seconds, then lets one request try again; meanwhile ``failOpen:
true`` lets requests pass unchecked (no ``RateLimit`` headers) and ``false`` answers 503
``rate_limit_unavailable``. Each check not answered counts in
``odin_rate_limit_storage_errors``; the start and end of an outage are logged
once per worker, with the storage URL's password redacted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from ..config.model import redact_url
from ..config.traffic import GatewayRateLimitConfig, RateLimitConfig
from ..errors import GatewayError
from .host_storage import host_storage_uri  # also registers the odin-host:// scheme

log = logging.getLogger("odin_gw.traffic.rate_limit")

#: Storage keys remembered per window (identities seen recently).
KEY_CACHE = 4096
#: Periods the long window of a limit with a burst spans (at least).
LONG_PERIODS = 10
#: Seconds a worker stops asking a failed storage before one request tries again.
OUTAGE_RETRY = 1.0
#: Redis socket and connect timeouts (seconds): a dead Redis never stalls a request longer.
REDIS_TIMEOUT = 0.1
REDIS_KEY_PREFIX = "odin-rl"


class RateLimited(GatewayError):
    """A rate limit refused the request: 429 with ``Retry-After`` and the RateLimit
    fields in ``headers`` (``(name, value)`` pairs the error answer carries)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, headers: list[tuple[str, str]], **details: object):
        super().__init__(message, **details)
        self.headers = headers


class RateLimitUnavailable(GatewayError):
    """The counters' storage cannot answer and ``rateLimit.failOpen`` is false: 503."""

    status = 503
    code = "rate_limit_unavailable"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message, **details)
        self.headers = [("Retry-After", str(int(OUTAGE_RETRY) or 1))]


def sf_string(text: str) -> str:
    """``text`` as a Structured Field String (RFC 8941 section 3.3.3): quoted, ``\\`` and
    ``"`` escaped, characters outside printable ASCII replaced by ``_``."""
    text = "".join(c if " " <= c <= "~" else "_" for c in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def header_environ_key(name: str) -> str:
    """The WSGI environ key of request header ``name``."""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


class Window:
    """One sliding window of a policy: ``quota`` requests per ``seconds``."""

    __slots__ = ("_keys", "item", "name", "quota", "seconds", "sf_name")

    def __init__(self, name: str, quota: int, seconds: int) -> None:
        self.name = name
        self.sf_name = sf_string(name)
        self.quota = quota
        self.seconds = seconds
        self.item = RateLimitItemPerSecond(quota, seconds)
        self._keys: dict[tuple[str, str, str], str] = {}

    def key_for(self, route: str, scope: str, ident: str) -> str:
        """The library's storage key for this window (``item.key_for``: about 3 us of
        string work), remembered for the most recent identities."""
        k = (route, scope, ident)
        key = self._keys.get(k)
        if key is None:
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()  # simpler than LRU; refilled by the clients still active
            key = self._keys[k] = self.item.key_for(route, scope, ident)
        return key

    @property
    def policy_item(self) -> str:
        """This window as a ``RateLimit-Policy`` list member."""
        return f"{self.sf_name};q={self.quota};w={self.seconds}"

    def used(self, stats: tuple[int, float, int, float]) -> int:
        """The weighted count the library compares with the quota."""
        previous, previous_ttl, current, _ = stats
        return int(previous * previous_ttl / self.seconds) + current

    def wait(self, stats: tuple[int, float, int, float], ceiling: int) -> float:
        """Seconds until the weighted count is at most ``ceiling`` if no request comes."""
        previous, previous_ttl, current, current_ttl = stats
        length = self.seconds
        left = max(0.0, current_ttl - length)  # of the current window
        if current <= ceiling:
            if not previous:
                return 0.0
            # When floor(previous * (ttl - d) / length) + current <= ceiling: before the
            # current window ends, since the previous one weighs only until then.
            return max(0.0, previous_ttl - (ceiling - current + 1) * length / previous)
        # Else when the current window ends: from then on its count weighs as the previous
        # window's, below ``current`` at once, and ``current <= ceiling + 1`` in every use
        # here (a count never exceeds its quota, nor the weighted total it is part of).
        return left

    def status(self, stats: tuple[int, float, int, float]) -> str:
        """This window as a ``RateLimit`` list member, after an allowed request."""
        used = self.used(stats)
        remaining = max(0, self.quota - used)
        reset = self.seconds if used <= 0 else int(self.wait(stats, used - 1)) + 1
        return f"{self.sf_name};r={remaining};t={reset}"


class Policy:
    """One ``rateLimit`` compiled for a route and scope (``service`` or ``rule-<n>``)."""

    __slots__ = (
        "config",
        "environ_key",
        "global_key",
        "policy_header",
        "rejected",
        "route",
        "scope",
        "windows",
    )

    def __init__(self, route: str, scope: str, config: RateLimitConfig) -> None:
        self.route = route
        self.scope = scope
        self.config = config
        name = route if scope == "service" else f"{route}/{scope}"
        self.windows = windows_for(config, name)
        self.policy_header = ", ".join(w.policy_item for w in self.windows)
        self.global_key = config.key == "global"
        self.environ_key = (
            header_environ_key(config.key[len("header:") :])
            if config.key.startswith("header:")
            else None
        )
        self.rejected = None  # the metric's child, made at the first refusal

    def identity(self, exchange, environ: dict) -> str:
        """Whose counter the request counts in (see the module docstring)."""
        if self.global_key:
            return "*"
        if self.environ_key is not None:
            value = environ.get(self.environ_key)
            if value:
                digest = hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16)
                return "h:" + digest.hexdigest()
        return "ip:" + (exchange.client_addr or "-")


def windows_for(config: RateLimitConfig, name: str) -> tuple[Window, ...]:
    """The sliding windows a limit is made of (see the module docstring)."""
    r, b, period = config.requests, config.burst, config.period
    if not b:
        return (Window(name, r, period),)
    k = max(LONG_PERIODS, -(-(r + b) // r))
    return (Window(name, r + b, period), Window(f"{name}/sustained", k * r, k * period))


def has_limits(service) -> bool:
    """Whether a service or any of its rules has a ``rateLimit``."""
    return service.rate_limit is not None or any(
        rule.rate_limit is not None for rule in service.rules
    )


def redis_storage(uri: str) -> Storage:
    """The library's Redis storage with bounded waits (see the module docstring)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    return storage_from_string(
        uri,
        wrap_exceptions=True,
        key_prefix=REDIS_KEY_PREFIX,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


class RateLimits:
    """Every rate limit of a gateway, over one storage. Safe to share between threads.

    ``storage``: a ``limits`` storage with sliding-window support; ``fail_open``: what a
    storage failure means (see the module docstring); ``metrics``: the gateway's
    :class:`~odin_gw.metrics.GatewayMetrics` (or ``None``); ``where``: the storage as
    logs may show it (no password).
    """

    def __init__(
        self,
        storage: Storage,
        fail_open: bool = True,
        metrics=None,
        where: str = "",
        clock=time.monotonic,
    ) -> None:
        self.storage = storage
        self.limiter = SlidingWindowCounterRateLimiter(storage)
        # The host storage decides and reads the window after it in one call (the
        # strategy's ``hit`` is that call's first half); other storages: hit, then read.
        self._acquire = getattr(storage, "acquire_sliding_window", None)
        self.fail_open = fail_open
        self.metrics = metrics
        self.where = where or type(storage).__name__
        self.clock = clock
        self.policies: dict[tuple[str, str], Policy] = {}
        self.unanswered = 0  # checks the storage did not answer (this process)
        self._state_lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    @classmethod
    def for_gateway(cls, gateway) -> RateLimits | None:
        """The limits of ``gateway.config``, or ``None`` when no service or rule has one.

        Host storage lives in ``serviceMesh.stateDir`` when given, else the instance's
        default state dir (``gateway.mesh.state.path``)."""
        config = gateway.config
        if not any(has_limits(s) for s in config.services):
            return None
        settings: GatewayRateLimitConfig = config.rate_limit
        if settings.storage == "host":
            directory = config.service_mesh.state_dir or gateway.mesh.state.path
            storage = storage_from_string(host_storage_uri(directory), wrap_exceptions=True)
            where = f"host table in {directory}"
        else:
            storage = redis_storage(settings.storage)
            where = redact_url(settings.storage)
        limits = cls(storage, settings.fail_open, gateway.metrics, where)
        for service in config.services:
            if service.rate_limit is not None:
                limits.policy(service.name, "service", service.rate_limit)
            for rule in service.rules:
                if rule.rate_limit is not None:
                    limits.policy(service.name, f"rule-{rule.index}", rule.rate_limit)
        return limits

    def policy(self, route_name: str, scope: str, limit: RateLimitConfig) -> Policy:
        """The compiled policy of ``limit`` for a route and scope (compiled once)."""
        policy = self.policies.get((route_name, scope))
        if policy is None or policy.config is not limit:
            policy = self.policies[(route_name, scope)] = Policy(route_name, scope, limit)
        return policy

    # -- hot path -------------------------------------------------------------------------
    def check(
        self, route_name: str, limit: RateLimitConfig, scope: str, exchange, environ: dict
    ) -> list[tuple[str, str]]:
        """Count the request against ``limit`` (a route's ``rateLimit``, ``scope``
        ``"service"``, or a matched rule's, ``"rule-<index>"``).

        Returns the ``RateLimit-Policy``/``RateLimit`` headers for the answer (none when
        the storage failed and ``failOpen`` let the request pass); raises
        :class:`RateLimited` (429) or :class:`RateLimitUnavailable` (503).
        """
        policy = self.policies.get((route_name, scope))
        if policy is None or policy.config is not limit:
            policy = self.policy(route_name, scope, limit)
        if self._down_since is not None and not self._may_probe():
            return self._unanswered(None)
        ident = policy.identity(exchange, environ)
        statuses = []
        acquire = self._acquire
        try:
            for window in policy.windows:
                key = window.key_for(route_name, scope, ident)
                if acquire is not None:  # the decision and the window after it, in one pass
                    allowed, stats = acquire(key, window.quota, window.seconds)
                else:
                    allowed = self.limiter.hit(window.item, route_name, scope, ident)
                    stats = self.storage.get_sliding_window(key, window.seconds)
                if not allowed:
                    break
                statuses.append(window.status(stats))
        except StorageError as exc:
            return self._unanswered(exc)
        if self._down_since is not None:
            self._answered()
        if not allowed:
            self._refuse(policy, window, stats)
        return [("RateLimit-Policy", policy.policy_header), ("RateLimit", ", ".join(statuses))]

    def _refuse(self, policy: Policy, window: Window, stats) -> None:
        retry_after = int(window.wait(stats, window.quota - 1)) + 1
        if self.metrics is not None:
            if policy.rejected is None:
                policy.rejected = self.metrics.rate_limited.labels(policy.route, policy.scope)
            policy.rejected.inc()
        headers = [
            ("Retry-After", str(retry_after)),
            ("RateLimit-Policy", policy.policy_header),
            ("RateLimit", f"{window.sf_name};r=0;t={retry_after}"),
        ]
        raise RateLimited(
            "rate limit exceeded", headers, policy=window.name, retryAfter=retry_after
        )

    # -- storage failures -----------------------------------------------------------------
    def _may_probe(self) -> bool:
        """During an outage: whether this request may ask the storage (one per
        :data:`OUTAGE_RETRY` seconds per worker)."""
        now = self.clock()
        with self._state_lock:
            if self._down_since is None:
                return True
            if now < self._retry_at:
                return False
            self._retry_at = now + OUTAGE_RETRY
            return True

    def _unanswered(self, exc: Exception | None) -> list[tuple[str, str]]:
        self.unanswered += 1
        if self.metrics is not None:
            self.metrics.rate_limit_errors.inc()
        if exc is not None:
            now = self.clock()
            with self._state_lock:
                self._retry_at = now + OUTAGE_RETRY
                first = self._down_since is None
                if first:
                    self._down_since = now
            if first:
                cause = exc.storage_error if isinstance(exc, StorageError) else exc
                log.warning(
                    "rate-limit storage %s failed (%s: %s): %s until it answers",
                    self.where,
                    type(cause).__name__,
                    cause,
                    "requests pass unchecked"
                    if self.fail_open
                    else "requests are refused with 503",
                )
        if self.fail_open:
            return []
        raise RateLimitUnavailable("rate limit storage unavailable")

    def _answered(self) -> None:
        with self._state_lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning(
                "rate-limit storage %s answers again after %.1fs", self.where, self.clock() - since
            )

    def close(self) -> None:
        """Release the storage (the host table's mapping, Redis connections)."""
        close = getattr(self.storage, "close", None)
        if close is not None:
            close()
        else:
            pool = getattr(getattr(self.storage, "storage", None), "connection_pool", None)
            if pool is not None:
                pool.disconnect()
