"""Rate limits: keys, the RateLimit header syntax, exact boundaries and bursts (injected
clock), storage failures, and the host table shared by real processes through a file."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import stat
import sys
import threading
import warnings

import pytest
from limits.storage import SlidingWindowCounterSupport, Storage, storage_from_string

from odin_gw.config import parse_config
from odin_gw.config.traffic import RateLimitConfig
from odin_gw.metrics import GatewayMetrics
from odin_gw.traffic.host_storage import HostStorage, host_storage_uri
from odin_gw.traffic.rate_limit import (
    OUTAGE_RETRY,
    RateLimited,
    RateLimits,
    RateLimitUnavailable,
    header_environ_key,
    sf_string,
    windows_for,
)

HOUR = 3600


class Clock:
    """A settable clock (picklable, for spawned processes)."""

    def __init__(self, now: float = 36000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Client:
    """What ``check`` reads of the exchange: the client address trust decided."""

    def __init__(self, addr: str = "192.0.2.1") -> None:
        self.client_addr = addr


def limit(requests: int, per: str = "hour", burst: int = 0, key: str = "ip") -> RateLimitConfig:
    periods = {"second": 1, "minute": 60, "hour": HOUR}
    return RateLimitConfig(requests, periods[per], per, burst, key)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limits(clock):
    """Limits over a table of this process (the clock drives its windows)."""
    return RateLimits(HostStorage(clock=clock), clock=clock)


def allowed_count(limits, cfg, client=None, environ=None, attempts=1000, scope="service"):
    """Requests allowed before the first refusal (the refusal is returned too)."""
    client = client or Client()
    for n in range(attempts):
        try:
            limits.check("svc", cfg, scope, client, environ or {})
        except RateLimited as refused:
            return n, refused
    raise AssertionError(f"never refused in {attempts} requests")


def rate_limit_fields(headers) -> dict[str, str]:
    return {name: value for name, value in headers}


# -- boundary -----------------------------------------------------------------------------


@pytest.mark.parametrize("requests", [1, 5, 100])
def test_request_n_is_allowed_and_n_plus_one_refused(limits, requests):
    n, refused = allowed_count(limits, limit(requests))
    assert n == requests
    assert refused.status == 429 and refused.code == "rate_limited"


def test_refused_requests_do_not_count(limits, clock):
    cfg = limit(3, "second")
    assert allowed_count(limits, cfg)[0] == 3
    for _ in range(20):  # hammering while refused
        with pytest.raises(RateLimited):
            limits.check("svc", cfg, "service", Client(), {})
    clock.now += 2.0  # two windows on: the 3 allowed ones no longer weigh, nor anything else
    assert allowed_count(limits, cfg)[0] == 3


def test_keys_and_scopes_count_apart(limits):
    cfg = limit(2)
    assert allowed_count(limits, cfg, Client("192.0.2.1"))[0] == 2
    assert allowed_count(limits, cfg, Client("192.0.2.2"))[0] == 2
    assert allowed_count(limits, cfg, Client("192.0.2.1"), scope="rule-0")[0] == 2


def test_global_key_is_one_counter_for_every_client(limits):
    cfg = limit(3, key="global")
    for addr in ("192.0.2.1", "192.0.2.2", "2001:db8::1"):
        limits.check("svc", cfg, "service", Client(addr), {})
    with pytest.raises(RateLimited):
        limits.check("svc", cfg, "service", Client("192.0.2.99"), {})


def test_header_key_counts_per_value_and_falls_back_to_the_client_address(limits):
    cfg = limit(2, key="header:X-Api-Key")
    a, b = {"HTTP_X_API_KEY": "key-a"}, {"HTTP_X_API_KEY": "key-b"}
    assert allowed_count(limits, cfg, Client("192.0.2.1"), a)[0] == 2
    # The same key from elsewhere shares its bucket; another key has its own.
    with pytest.raises(RateLimited):
        limits.check("svc", cfg, "service", Client("192.0.2.7"), a)
    assert allowed_count(limits, cfg, Client("192.0.2.1"), b)[0] == 2
    # No header, or an empty one: the client's address is the key (not one shared bucket).
    assert allowed_count(limits, cfg, Client("192.0.2.1"), {})[0] == 2
    with pytest.raises(RateLimited):
        limits.check("svc", cfg, "service", Client("192.0.2.1"), {"HTTP_X_API_KEY": ""})
    assert allowed_count(limits, cfg, Client("192.0.2.2"), {})[0] == 2


def test_header_values_are_hashed_in_the_identity():
    limits = RateLimits(HostStorage())
    policy = limits.policy("svc", "service", limit(2, key="header:X-Api-Key"))
    ident = policy.identity(Client(), {"HTTP_X_API_KEY": "sk_live_secret"})
    assert "secret" not in ident and re.fullmatch(r"h:[0-9a-f]{32}", ident)
    assert policy.identity(Client("2001:db8::5"), {}) == "ip:2001:db8::5"
    assert limits.policy("s", "service", limit(1, key="global")).identity(Client(), {}) == "*"


def test_header_environ_keys():
    assert header_environ_key("X-Api-Key") == "HTTP_X_API_KEY"
    assert header_environ_key("content-type") == "CONTENT_TYPE"
    assert header_environ_key("Content-Length") == "CONTENT_LENGTH"  # no HTTP_ in WSGI
    assert header_environ_key("Authorization") == "HTTP_AUTHORIZATION"


# -- burst ---------------------------------------------------------------------------------


def test_burst_is_two_windows_short_and_sustained():
    (short,) = windows_for(limit(100, "minute"), "users")
    assert (short.quota, short.seconds) == (100, 60)
    short, long = windows_for(limit(100, "minute", burst=20), "users")
    assert (short.name, short.quota, short.seconds) == ("users", 120, 60)
    assert (long.name, long.quota, long.seconds) == ("users/sustained", 1000, 600)
    # A burst larger than 9 periods' worth stretches the long window instead.
    short, long = windows_for(limit(1, "minute", burst=20), "u")
    assert (short.quota, long.quota, long.seconds) == (21, 21, 21 * 60)


def test_burst_allows_requests_plus_burst_in_one_period(limits):
    n, refused = allowed_count(limits, limit(10, "second", burst=5))
    assert n == 15
    assert refused.details["policy"] == "svc"


def test_a_burst_is_paid_back_within_the_sustained_window(limits, clock):
    # 2/s with a burst of 3: 5 in one second, 20 per 10 s. The clock starts on a multiple
    # of 10 s, so both windows start together; every other second is skipped so the short
    # window's previous count never weighs.
    cfg = limit(2, "second", burst=3)
    for second in (0, 2, 4, 6):
        clock.now = 100000.0 + second + 0.25
        assert allowed_count(limits, cfg)[0] == 5, second
    clock.now = 100008.25
    n, refused = allowed_count(limits, cfg)
    assert n == 0 and refused.details["policy"] == "svc/sustained"
    # The long window ends at +10; right after, its 20 weigh floor(20 * 0.99...) = 19 and
    # one request fits: from +8.25 that is 1.75 s, rounded up.
    assert refused.details["retryAfter"] == 2
    clock.now = 100010.25
    assert allowed_count(limits, cfg)[0] == 1


def send(limits, cfg, client, count):
    for _ in range(count):
        limits.check("svc", cfg, "service", client, {})


@pytest.mark.parametrize(
    "before, into, now",
    [
        (0, None, 13.4),  # only the current window counts: wait for its end
        (4, 50.0, 10.3),  # 4 in the previous window, decaying: wait for one to fade
        (6, 59.0, 0.7),  # the previous window full, just ended
    ],
)
def test_retry_after_is_the_first_whole_second_a_request_fits(limits, clock, before, into, now):
    cfg = limit(6, "minute")
    client = Client()
    if before:
        clock.now = 60000.0 + into  # in the window before
        send(limits, cfg, client, before)
    clock.now = 60060.0 + now
    n, refused = allowed_count(limits, cfg, client)
    assert n >= 1 or before == 6
    wait = refused.details["retryAfter"]
    assert rate_limit_fields(refused.headers)["Retry-After"] == str(wait)
    start = clock.now
    clock.now = start + wait - 1
    with pytest.raises(RateLimited):
        limits.check("svc", cfg, "service", client, {})
    clock.now = start + wait
    limits.check("svc", cfg, "service", client, {})


def test_retry_after_rounds_up_to_at_least_one_second(limits, clock):
    clock.now = 1000.9  # 0.1 s before the next one-second window
    cfg = limit(1, "second")
    limits.check("svc", cfg, "service", Client(), {})
    with pytest.raises(RateLimited) as refused:
        limits.check("svc", cfg, "service", Client(), {})
    assert refused.value.details["retryAfter"] == 1


# -- headers --------------------------------------------------------------------------------

SF_ITEM = r'"[^"\\]*";(q=\d+;w=\d+|r=\d+;t=\d+)'


def test_rate_limit_fields_follow_the_draft_syntax(limits, clock):
    clock.now = 7200.0 + 600.0  # 10 minutes into an hour window
    headers = limits.check("svc", limit(5), "service", Client(), {})
    fields = rate_limit_fields(headers)
    assert fields["RateLimit-Policy"] == '"svc";q=5;w=3600'
    # The one request weighs fully until the window ends (+3000 s), then decays: t is
    # the first whole second after which one more is free.
    assert fields["RateLimit"] == '"svc";r=4;t=3001'
    headers = limits.check("svc", limit(5, burst=2), "service", Client("192.0.2.9"), {})
    fields = rate_limit_fields(headers)
    assert fields["RateLimit-Policy"] == '"svc";q=7;w=3600, "svc/sustained";q=50;w=36000'
    for field in fields.values():
        assert re.fullmatch(rf"{SF_ITEM}(, {SF_ITEM})*", field), field


def test_remaining_counts_down_and_the_429_says_zero(limits):
    cfg = limit(3)
    remaining = [
        re.search(
            r";r=(\d+)",
            rate_limit_fields(limits.check("svc", cfg, "service", Client(), {}))["RateLimit"],
        ).group(1)
        for _ in range(3)
    ]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        limits.check("svc", cfg, "service", Client(), {})
    fields = rate_limit_fields(refused.value.headers)
    wait = fields["Retry-After"]
    assert fields["RateLimit"] == f'"svc";r=0;t={wait}'
    assert fields["RateLimit-Policy"] == '"svc";q=3;w=3600'


def test_policy_names_are_structured_field_strings():
    assert sf_string("users") == '"users"'
    assert sf_string('we"ird\\name') == '"we\\"ird\\\\name"'
    assert sf_string("caf\u00e9\n") == '"caf__"'


def test_refusals_are_counted_by_service_and_scope(clock):
    metrics = GatewayMetrics()
    limits = RateLimits(HostStorage(clock=clock), metrics=metrics, clock=clock)
    allowed_count(limits, limit(1))
    allowed_count(limits, limit(1), scope="rule-0")
    with pytest.raises(RateLimited):
        limits.check("svc", limit(1), "rule-0", Client(), {})
    totals = metrics.totals("odin_rate_limited")
    assert totals[(("scope", "service"), ("service", "svc"))] == 1
    assert totals[(("scope", "rule-0"), ("service", "svc"))] == 2


# -- storage failures -----------------------------------------------------------------------


class FlakyStorage(Storage, SlidingWindowCounterSupport):
    """A storage that answers from a table of this process, or fails while ``down``."""

    def __init__(self, clock) -> None:
        super().__init__(None, wrap_exceptions=True)
        self.table = HostStorage(clock=clock)
        self.down = False
        self.calls = 0

    @property
    def base_exceptions(self):
        return ConnectionError

    def _use(self):
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        return self.table

    def acquire_sliding_window_entry(self, key, limit, expiry, amount=1):
        return self._use().acquire_sliding_window_entry(key, limit, expiry, amount)

    def get_sliding_window(self, key, expiry):
        return self._use().get_sliding_window(key, expiry)

    def clear_sliding_window(self, key, expiry):
        self._use().clear_sliding_window(key, expiry)

    def incr(self, key, expiry, amount=1):
        return self._use().incr(key, expiry, amount)

    def get(self, key):
        return self._use().get(key)

    def get_expiry(self, key):
        return self._use().get_expiry(key)

    def check(self):
        return not self.down

    def reset(self):
        return self._use().reset()

    def clear(self, key):
        self._use().clear(key)


def test_fail_open_passes_requests_logs_once_and_recovers(clock, caplog):
    storage = FlakyStorage(clock)
    metrics = GatewayMetrics()
    limits = RateLimits(
        storage, fail_open=True, metrics=metrics, where="redis://<redacted>@h:1/0", clock=clock
    )
    cfg = limit(2)
    assert allowed_count(limits, cfg)[0] == 2
    storage.down = True
    with caplog.at_level(logging.WARNING, "odin_gw.traffic.rate_limit"):
        for _ in range(50):  # allowed, unchecked, without headers
            assert limits.check("svc", cfg, "service", Client(), {}) == []
        # Only the first asked the storage: the others within OUTAGE_RETRY did not wait on it.
        assert storage.calls == 2 + 2 * 2 + 1
        clock.now += OUTAGE_RETRY
        assert limits.check("svc", cfg, "service", Client(), {}) == []  # one probe, failed
        assert storage.calls == 2 + 2 * 2 + 2
        storage.down = False
        clock.now += OUTAGE_RETRY
        with pytest.raises(RateLimited):  # the probe is answered: limits apply again
            limits.check("svc", cfg, "service", Client(), {})
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "pass unchecked" in failed[0].getMessage()
    assert "<redacted>" in failed[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert limits.unanswered == 51
    assert metrics.totals("odin_rate_limit_storage_errors")[()] == 51


def test_fail_closed_answers_503_until_the_storage_is_back(clock):
    storage = FlakyStorage(clock)
    limits = RateLimits(storage, fail_open=False, clock=clock)
    cfg = limit(2)
    storage.down = True
    for _ in range(3):
        with pytest.raises(RateLimitUnavailable) as unavailable:
            limits.check("svc", cfg, "service", Client(), {})
        assert unavailable.value.status == 503
        assert unavailable.value.code == "rate_limit_unavailable"
        assert dict(unavailable.value.headers)["Retry-After"] == "1"
    storage.down = False
    clock.now += OUTAGE_RETRY
    assert allowed_count(limits, cfg)[0] == 2


class HeldStorage(FlakyStorage):
    """A FlakyStorage whose next call, once ``hold()`` was called, waits until
    ``release()``: a probe still in flight while other requests come."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self._holding = False
        self.entered = threading.Event()
        self._released = threading.Event()

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        self._released.set()

    def _use(self):
        if self._holding:
            self._holding = False
            self.entered.set()
            assert self._released.wait(5), "never released"
        return super()._use()


def check_in_thread(limits, cfg) -> tuple[threading.Thread, list]:
    """``check`` in another thread (a request of another of the worker's threads), not
    started yet; its headers or its exception go to the list."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(limits.check("svc", cfg, "service", Client(), {}))
        except Exception as exc:
            outcome.append(exc)

    return threading.Thread(target=run, daemon=True), outcome


def test_one_probe_at_a_time_while_the_storage_is_down(clock):
    storage = HeldStorage(clock)
    metrics = GatewayMetrics()
    limits = RateLimits(storage, fail_open=True, metrics=metrics, clock=clock)
    cfg = limit(5)
    storage.down = True
    assert limits.check("svc", cfg, "service", Client(), {}) == []  # the outage starts
    clock.now += OUTAGE_RETRY
    storage.down = False
    storage.hold()
    probe, outcome = check_in_thread(limits, cfg)
    probe.start()
    try:
        assert storage.entered.wait(5)
        calls = storage.calls
        # While the probe waits on the storage, the others do not ask it too.
        for _ in range(5):
            assert limits.check("svc", cfg, "service", Client(), {}) == []
        assert storage.calls == calls
    finally:
        storage.release()
        probe.join(5)
    assert not probe.is_alive()
    assert [name for name, _ in outcome[0]] == ["RateLimit-Policy", "RateLimit"]
    assert limits.unanswered == 1 + 5
    assert metrics.totals("odin_rate_limit_storage_errors")[()] == 6
    # The probe was answered: the next request is checked again.
    assert [name for name, _ in limits.check("svc", cfg, "service", Client(), {})] == [
        "RateLimit-Policy",
        "RateLimit",
    ]


class PausingClock(Clock):
    """A Clock that, once told, stops the first thread that reads it until resumed:
    to force one interleaving of two requests."""

    def __init__(self, now: float = 36000.25) -> None:
        super().__init__(now)
        self.thread: threading.Thread | None = None
        self.paused = threading.Event()
        self.resumed = threading.Event()

    def __call__(self) -> float:
        if self.thread is not None and threading.current_thread() is self.thread:
            self.thread = None
            self.paused.set()
            assert self.resumed.wait(5), "never resumed"
        return self.now


def test_a_request_that_finds_the_outage_over_is_checked():
    # Request B saw the outage, then request A's probe was answered before B decided
    # whether to probe: B asks the storage as any request, instead of being refused.
    clock = PausingClock()
    storage = FlakyStorage(clock)
    limits = RateLimits(storage, fail_open=False, clock=clock)
    cfg = limit(5)
    storage.down = True
    with pytest.raises(RateLimitUnavailable):
        limits.check("svc", cfg, "service", Client(), {})
    storage.down = False
    clock.now += OUTAGE_RETRY
    b, outcome = check_in_thread(limits, cfg)
    clock.thread = b  # B stops at its first reading of the clock: when it may probe
    b.start()
    try:
        assert clock.paused.wait(5)
        assert limits.check("svc", cfg, "service", Client(), {})  # A: the probe, answered
    finally:
        clock.resumed.set()
        b.join(5)
    assert not b.is_alive()
    assert isinstance(outcome[0], list) and "RateLimit" in dict(outcome[0]), outcome
    assert limits.unanswered == 1


def test_the_outage_log_names_the_cause_and_what_requests_get(clock, caplog):
    storage = FlakyStorage(clock)
    limits = RateLimits(storage, fail_open=False, where="redis://<redacted>@h:1/0", clock=clock)
    cfg = limit(5)
    storage.down = True
    with caplog.at_level(logging.WARNING, "odin_gw.traffic.rate_limit"):
        for _ in range(3):
            with pytest.raises(RateLimitUnavailable) as unavailable:
                limits.check("svc", cfg, "service", Client(), {})
            assert "storage unavailable" in unavailable.value.message
        clock.now += 2.5 * OUTAGE_RETRY
        storage.down = False
        assert limits.check("svc", cfg, "service", Client(), {})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    failed, back = messages
    assert "redis://<redacted>@h:1/0" in failed
    assert "(ConnectionError: connection refused)" in failed  # the storage's own error
    assert "requests are refused with 503" in failed and "unchecked" not in failed
    assert back == (
        f"rate-limit storage redis://<redacted>@h:1/0 answers again after {2.5 * OUTAGE_RETRY:.1f}s"
    )


def test_rate_limit_unavailable_keeps_its_details_and_says_when_to_retry():
    exc = RateLimitUnavailable("storage down", storage="redis://<redacted>@h:1/0")
    assert (exc.status, exc.code, exc.message) == (503, "rate_limit_unavailable", "storage down")
    assert exc.details == {"storage": "redis://<redacted>@h:1/0"}
    assert exc.headers == [("Retry-After", str(max(1, int(OUTAGE_RETRY))))]


# -- wiring ---------------------------------------------------------------------------------


def test_no_limit_configured_means_no_limiter(tmp_path):
    from odin_gw.gateway import Gateway

    cfg = parse_config(
        "services:\n - {name: web, basePath: /web, targets: ['http://127.0.0.1:9']}\n"
    )
    gw = Gateway(cfg)
    try:
        assert gw.rate_limits is None
    finally:
        gw.stop()


def test_gateway_limits_use_the_state_dir_and_compile_every_scope(state_dir):
    from odin_gw.gateway import Gateway

    cfg = parse_config(
        f"serviceMesh: {{stateDir: {state_dir}}}\n"
        "services:\n"
        " - name: web\n"
        "   basePath: /web\n"
        "   targets: ['http://127.0.0.1:9']\n"
        "   rateLimit: {requests: 3, per: minute}\n"
        "   rules:\n"
        "    - {match: {path: {prefix: /web/a}}, rateLimit: {requests: 1, per: second, burst: 1}}\n"
        " - {name: other, basePath: /other, targets: ['http://127.0.0.1:9']}\n"
    )
    gw = Gateway(cfg)
    try:
        limits = gw.rate_limits
        assert sorted(limits.policies) == [("web", "rule-0"), ("web", "service")]
        assert limits.policies[("web", "service")].policy_header == '"web";q=3;w=60'
        rule = limits.policies[("web", "rule-0")]
        assert [w.name for w in rule.windows] == ["web/rule-0", "web/rule-0/sustained"]
        limits.check("web", cfg.services[0].rate_limit, "service", Client(), {})
        assert limits.storage.shared
        assert os.path.dirname(limits.storage.file) == state_dir
    finally:
        gw.stop()


def test_redis_storage_url_is_redacted_where_logs_show_it(state_dir):
    from odin_gw.gateway import Gateway

    cfg = parse_config(
        "rateLimit: {storage: 'redis://:hunter2@127.0.0.1:9/0', failOpen: false}\n"
        "services:\n"
        " - {name: web, basePath: /web, targets: ['http://127.0.0.1:9'],"
        " rateLimit: {requests: 3, per: minute}}\n"
    )
    gw = Gateway(cfg)
    try:
        assert "hunter2" not in gw.rate_limits.where
        assert gw.rate_limits.where == "redis://<redacted>@127.0.0.1:9/0"
        assert gw.rate_limits.fail_open is False
    finally:
        gw.stop()


# -- the host table -------------------------------------------------------------------------


def test_host_table_is_a_private_file_in_the_state_dir(state_dir, clock):
    storage = storage_from_string(host_storage_uri(state_dir), clock=clock)
    assert isinstance(storage, HostStorage)
    assert storage.acquire_sliding_window_entry("k", 5, 60)
    assert storage.shared
    st = os.stat(storage.file)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    other = HostStorage(host_storage_uri(state_dir), clock=clock)  # another worker's view
    assert other.get_sliding_window("k", 60)[2] == 1
    storage.close()
    other.close()


def test_a_missing_state_dir_is_created_private(tmp_path, clock):
    directory = tmp_path / "new" / "state"
    storage = HostStorage(host_storage_uri(str(directory)), clock=clock)
    assert storage.incr("k", 60) == 1
    assert storage.shared and stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    storage.close()


def test_an_unsafe_table_file_is_refused_and_counting_stays_per_worker(state_dir, clock, caplog):
    probe = HostStorage(host_storage_uri(state_dir), clock=clock)
    probe.incr("k", 60)
    path = probe.file
    probe.close()
    os.chmod(path, 0o644)
    storage = HostStorage(host_storage_uri(state_dir), clock=clock)
    with caplog.at_level(logging.WARNING, "odin_gw.traffic.host_storage"):
        assert storage.incr("k", 60) == 1  # a table of its own, not the shared one
    assert not storage.shared
    assert "count per worker" in caplog.text and "not a private file" in caplog.text
    os.unlink(path)
    os.symlink(os.path.join(state_dir, "elsewhere"), path)
    linked = HostStorage(host_storage_uri(state_dir), clock=clock)
    assert linked.incr("k", 60) == 1 and not linked.shared
    assert not os.path.exists(os.path.join(state_dir, "elsewhere"))


def test_an_open_state_dir_is_refused(tmp_path, clock, caplog):
    directory = tmp_path / "open"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    storage = HostStorage(host_storage_uri(str(directory)), clock=clock)
    with caplog.at_level(logging.WARNING, "odin_gw.traffic.host_storage"):
        storage.incr("k", 60)
    assert not storage.shared and "group/other access" in caplog.text
    assert os.listdir(directory) == []


def test_windows_slide_and_expire(clock):
    storage = HostStorage(clock=clock)
    clock.now = 600.0 + 15.0  # 15 s into a minute window
    for _ in range(4):
        assert storage.acquire_sliding_window_entry("k", 4, 60)
    assert not storage.acquire_sliding_window_entry("k", 4, 60)
    assert storage.get_sliding_window("k", 60) == (0, 0.0, 4, 105.0)
    clock.now = 660.0 + 30.0  # half-way through the next window: 4 * 0.5 = 2 still weigh
    assert storage.get_sliding_window("k", 60) == (4, 30.0, 0, 90.0)
    assert storage.acquire_sliding_window_entry("k", 4, 60)
    assert storage.acquire_sliding_window_entry("k", 4, 60)
    assert not storage.acquire_sliding_window_entry("k", 4, 60)
    clock.now = 780.0  # two windows on: nothing counts
    assert storage.get_sliding_window("k", 60) == (0, 0.0, 0, 120.0)


def test_fixed_window_operations(clock):
    storage = HostStorage(clock=clock)
    clock.now = 600.0 + 15.0
    assert [storage.incr("f", 60) for _ in range(3)] == [1, 2, 3]
    assert storage.get("f") == 3 and storage.get("absent") == 0
    clock.now = 660.0
    assert storage.get("f") == 0 and storage.incr("f", 60) == 1
    storage.clear("f")
    assert storage.get("f") == 0
    storage.incr("g", 60)
    assert storage.reset() == 1 and storage.get("g") == 0


def test_full_bucket_evicts_the_least_recently_counted_key(clock, caplog):
    storage = HostStorage(entries=4, ways=4, clock=clock)  # one bucket of four
    clock.now = 10 * HOUR + 100.0
    storage.incr("a", HOUR)  # counted in hour 10: still weighs through hour 11
    clock.now = 11 * HOUR + 100.0
    for key in "bcd":
        storage.incr(key, HOUR)
    with caplog.at_level(logging.WARNING, "odin_gw.traffic.host_storage"):
        storage.incr("e", HOUR)
    assert storage.evictions == 1 and "table full" in caplog.text
    assert storage.get_sliding_window("a", HOUR)[0] == 0  # a's hour-10 count is gone
    assert [storage.get(k) for k in "bcde"] == [1, 1, 1, 1]


def test_expired_entries_are_reused_without_eviction(clock):
    storage = HostStorage(entries=2, ways=2, clock=clock)
    clock.now = 6000.0
    storage.incr("a", 1)
    storage.incr("b", 1)
    clock.now += 2.5  # both one-second windows (and the ones after) have passed
    storage.incr("c", 1)
    storage.incr("d", 1)
    assert storage.evictions == 0
    assert (storage.get("c"), storage.get("d")) == (1, 1)


def test_a_new_window_length_starts_the_key_afresh(clock):
    storage = HostStorage(clock=clock)
    storage.incr("k", 60)
    storage.incr("k", 60)
    assert storage.incr("k", 3600) == 1


def test_the_combined_call_is_the_decision_then_the_window(clock):
    storage = HostStorage(clock=clock)
    clock.now = 600.0 + 15.0
    for n in range(1, 4):
        allowed, window = storage.acquire_sliding_window("k", 3, 60)
        assert allowed and window == storage.get_sliding_window("k", 60) == (0, 0.0, n, 105.0)
    assert storage.acquire_sliding_window("k", 3, 60) == (False, (0, 0.0, 3, 105.0))
    clock.now = 660.0 + 45.0  # a quarter of the window left: 3 * 0.25 weighs 0
    assert storage.acquire_sliding_window("k", 3, 60) == (True, (3, 15.0, 1, 75.0))


def test_threads_of_one_worker_count_exactly(state_dir, clock):
    storage = HostStorage(host_storage_uri(state_dir), clock=clock)
    start = threading.Barrier(8)
    allowed = []

    def hammer():
        start.wait(timeout=10)
        allowed.append(sum(storage.acquire_sliding_window_entry("k", 500, 60) for _ in range(300)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(allowed) == 500  # 2400 attempts; one lock per worker: never over
    assert storage.get_sliding_window("k", 60)[2] == 500
    storage.close()


_audited: list[str] | None = None


def _audit(event: str, _args) -> None:
    if _audited is not None and event.startswith(("fcntl.", "os.", "mmap.", "open", "time.")):
        _audited.append(event)


def test_a_decision_makes_no_system_call(state_dir, clock):
    global _audited
    storage = HostStorage(host_storage_uri(state_dir), clock=clock)
    other = HostStorage(host_storage_uri(state_dir), clock=clock)  # another worker's slot
    assert storage.acquire_sliding_window_entry("k", 100, 60)
    assert other.acquire_sliding_window_entry("k", 100, 60)
    assert storage.shared and other.shared and storage.slot != other.slot
    sys.addaudithook(_audit)  # stays for the process; records only while the list is set
    _audited = []
    try:
        for _ in range(50):
            storage.acquire_sliding_window("k", 100, 60)
            storage.get_sliding_window("k", 60)
        seen = _audited
    finally:
        _audited = None
    assert seen == []  # no fcntl lock, no file access
    assert storage.get_sliding_window("k", 60)[2] == 52
    storage.close()
    other.close()


def test_a_dead_workers_counts_weigh_until_their_windows_pass(state_dir, clock):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=_count_and_die, args=(state_dir, clock.now, 4, child))
    worker.start()
    try:
        assert parent.poll(60)
        dead_slot, shared = parent.recv()
    finally:
        worker.join(timeout=30)
    assert shared and worker.exitcode == 0
    storage = HostStorage(host_storage_uri(state_dir), clock=clock)
    assert storage.acquire_sliding_window("svc/ip", 6, HOUR) == (True, (0, 0.0, 5, 7200.0 - 0.25))
    assert storage.slot != dead_slot  # a never-used slot first: the dead one keeps counting
    assert storage.acquire_sliding_window_entry("svc/ip", 6, HOUR)
    assert not storage.acquire_sliding_window_entry("svc/ip", 6, HOUR)
    clock.now += 2 * HOUR  # both windows passed: nothing weighs
    assert allowed_count(RateLimits(storage, clock=clock), limit(6))[0] == 6
    storage.close()


def test_a_reused_slot_starts_clean(state_dir, clock):
    first = HostStorage(host_storage_uri(state_dir), slots=2, clock=clock)
    for _ in range(3):
        assert first.acquire_sliding_window_entry("k", 5, 60)
    first.close()  # its slot is free; its counts still weigh
    second = HostStorage(host_storage_uri(state_dir), slots=2, clock=clock)
    assert second.acquire_sliding_window("k", 5, 60)[1][2] == 4
    assert second.slot != 0
    third = HostStorage(host_storage_uri(state_dir), slots=2, clock=clock)
    assert third.get_sliding_window("k", 60)[2] == 1  # slot 0 reused and cleared
    assert third.slot == 0 and third.shared
    second.close()
    third.close()


# -- real processes -------------------------------------------------------------------------


def _count_and_die(state_dir, now, count, conn):
    storage = HostStorage(host_storage_uri(state_dir), clock=Clock(now))
    for _ in range(count):
        storage.acquire_sliding_window_entry("svc/ip", 6, HOUR)
    conn.send((storage.slot, storage.shared))
    os._exit(0)  # no cleanup: as a worker killed


def _hammer(state_dir, start, results, attempts):
    storage = HostStorage(host_storage_uri(state_dir), clock=Clock(90000.5))
    storage.check()  # map the table before the race
    start.wait(timeout=30)
    allowed = sum(
        storage.acquire_sliding_window_entry("svc/ip", 250, HOUR) for _ in range(attempts)
    )
    results.put((storage.shared, allowed))


def test_three_processes_hammering_overshoot_by_at_most_one_each_other(state_dir):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(state_dir, start, results, 200)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(shared for shared, _ in got), got
    total = sum(allowed for _, allowed in got)
    # 600 attempts at once against 250: each decision reads every other worker's counts,
    # so only a decision racing another worker's may pass too (one per other worker).
    assert 250 <= total <= 252, got
    view = HostStorage(host_storage_uri(state_dir), clock=Clock(90000.5))
    assert view.get_sliding_window("svc/ip", HOUR)[2] == total  # nothing counted was lost
    view.close()


def _take_turns(state_dir, conn):
    storage = HostStorage(host_storage_uri(state_dir), clock=Clock(90000.5))
    storage.check()
    conn.send((storage.slot, storage.shared))
    for _ in range(1000):
        if not conn.poll(60):
            break
        limit = conn.recv()
        if limit is None:
            break
        conn.send(storage.acquire_sliding_window("svc/ip", limit, HOUR))
    conn.close()


def test_requests_alternating_between_processes_count_exactly(state_dir):
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(3)]
    procs = [ctx.Process(target=_take_turns, args=(state_dir, child)) for _, child in pipes]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pipes]
    try:
        slots = []
        for conn in conns:
            assert conn.poll(60)
            slots.append(conn.recv())
        assert all(shared for _, shared in slots) and len({s for s, _ in slots}) == 3
        answers = []
        for i in range(20 + 6):  # one at a time, each process in turn
            conn = conns[i % 3]
            conn.send(20)
            assert conn.poll(30)
            answers.append(conn.recv())
    finally:
        for conn in conns:
            conn.send(None)
        for p in procs:
            p.join(timeout=30)
    assert [allowed for allowed, _ in answers] == [True] * 20 + [False] * 6
    # Each process saw the others' counts: the window's count after each request.
    assert [window[2] for _, window in answers] == [*range(1, 21)] + [20] * 6


def test_a_forked_worker_claims_a_slot_itself_and_shares_the_counts(state_dir):
    clock = Clock()
    storage = HostStorage(host_storage_uri(state_dir), clock=clock)
    assert storage.acquire_sliding_window_entry("k", 100, 60)  # mapped before the fork
    parent_slot = storage.slot
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads around
        pid = os.fork()
    if pid == 0:
        try:
            ok = storage.acquire_sliding_window_entry("k", 100, 60)
            own = storage.shared and storage.slot not in (None, parent_slot)
            os.write(write, bytes([ok and own]))
        finally:
            os._exit(0)
    os.close(write)
    child_ok = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert child_ok == b"\x01"
    assert storage.slot == parent_slot
    assert storage.get_sliding_window("k", 60)[2] == 2
    storage.close()
