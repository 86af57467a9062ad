"""Per-endpoint circuit breakers: triggers, open/half-open/closed, back-off, tickets."""

from __future__ import annotations

import logging
import threading

import pytest

from odin_gw.config import parse_config
from odin_gw.config.traffic import CircuitBreakerConfig, FailureRateConfig
from odin_gw.traffic.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreakers

A, B = "http://10.0.0.1:80", "http://10.0.0.2:80"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def breakers(clock=None, **kw) -> CircuitBreakers:
    cfg = {"consecutive_failures": 3, "open_for": 10.0, "max_open_for": 35.0}
    cfg.update(kw)
    return CircuitBreakers(CircuitBreakerConfig(**cfg), clock=clock or Clock())


def attempt(cb: CircuitBreakers, key: str, ok: bool) -> bool:
    """One request as the forwarder makes it: admitted or not, then its outcome."""
    ticket = cb.allow(key)
    if ticket:
        cb.record(key, ok, ticket)
    return bool(ticket)


# -- closed -> open ------------------------------------------------------------------------


def test_consecutive_failures_open_the_circuit():
    cb = breakers()
    attempt(cb, A, False)
    attempt(cb, A, False)
    assert cb.state(A) == CLOSED and cb.status(A) == {"state": "closed", "failures": 2}
    attempt(cb, A, False)
    assert cb.state(A) == OPEN
    assert not cb.available(A)
    assert cb.allow(A) == 0
    assert (cb.opened, cb.rejected) == (1, 1)
    assert cb.available(B) and cb.allow(B)  # other endpoints unaffected


def test_a_success_breaks_the_run_of_failures():
    cb = breakers()
    for ok in (False, False, True, False, False):
        attempt(cb, A, ok)
    assert cb.state(A) == CLOSED and cb.status(A)["failures"] == 2
    attempt(cb, A, False)
    assert cb.state(A) == OPEN


def test_failure_rate_opens_once_enough_requests_are_in_the_window():
    rate = FailureRateConfig(threshold=50.0, min_requests=10, window=10.0)
    cb = breakers(consecutive_failures=0, failure_rate=rate)
    for i in range(9):
        attempt(cb, A, i % 2 == 0)  # 5 ok, 4 failed: 44%
    assert cb.state(A) == CLOSED
    assert cb.status(A) == {
        "state": "closed",
        "failures": 0,
        "requests": 9,
        "failurePercent": 44.4,
    }
    attempt(cb, A, False)  # 10 requests, 5 failed: 50% >= threshold
    assert cb.state(A) == OPEN


def test_failure_rate_needs_min_requests_even_when_all_fail():
    rate = FailureRateConfig(threshold=10.0, min_requests=5, window=10.0)
    cb = breakers(consecutive_failures=0, failure_rate=rate)
    for _ in range(4):
        attempt(cb, A, False)
    assert cb.state(A) == CLOSED  # consecutiveFailures 0: that trigger is off
    attempt(cb, A, False)
    assert cb.state(A) == OPEN


def test_failure_rate_window_slides():
    clock = Clock(0.5)
    rate = FailureRateConfig(threshold=50.0, min_requests=4, window=10.0)
    cb = breakers(clock, consecutive_failures=0, failure_rate=rate)
    attempt(cb, A, False)
    attempt(cb, A, False)
    clock.now = 10.6  # the first second's outcomes have left the window
    attempt(cb, A, True)
    attempt(cb, A, True)
    attempt(cb, A, False)
    assert cb.status(A)["requests"] == 3
    assert cb.state(A) == CLOSED
    attempt(cb, A, True)  # 4 requests, 1 failed: 25%
    assert cb.state(A) == CLOSED
    attempt(cb, A, False)  # 5 requests, 2 failed: 40%
    attempt(cb, A, False)  # 6 requests, 3 failed: 50%
    assert cb.state(A) == OPEN


def test_either_trigger_opens():
    rate = FailureRateConfig(threshold=90.0, min_requests=100, window=10.0)
    cb = breakers(consecutive_failures=2, failure_rate=rate)
    attempt(cb, A, False)
    attempt(cb, A, False)
    assert cb.state(A) == OPEN


def test_no_trigger_configured_never_opens():
    cb = breakers(consecutive_failures=0)  # a breaker for maxConcurrent only
    for _ in range(50):
        attempt(cb, A, False)
    assert cb.state(A) == CLOSED and cb.open_keys() == []


# -- open -> half-open -> closed / open ------------------------------------------------------


def test_open_for_then_half_open_admits_probes_up_to_the_limit():
    clock = Clock()
    cb = breakers(clock, half_open_requests=2)
    for _ in range(3):
        attempt(cb, A, False)
    assert cb.status(A) == {"state": "open", "openFor": 10.0, "retryIn": 10.0}
    clock.now += 9.5
    assert not cb.available(A) and cb.status(A)["retryIn"] == 0.5
    clock.now += 0.5
    assert cb.available(A) and cb.state(A) == HALF_OPEN
    first, second = cb.allow(A), cb.allow(A)
    assert first and second
    assert not cb.available(A) and cb.allow(A) == 0
    assert cb.status(A) == {"state": "half-open", "probes": 2, "maxProbes": 2}
    cb.record(A, True, first)
    assert cb.state(A) == CLOSED and cb.status(A) == {"state": "closed", "failures": 0}
    cb.record(A, False, second)  # the other probe's outcome comes too late to matter
    assert cb.state(A) == CLOSED and cb.status(A)["failures"] == 0


def test_a_failed_probe_reopens_for_twice_as_long_up_to_max_open_for():
    clock = Clock()
    cb = breakers(clock)
    for _ in range(3):
        attempt(cb, A, False)
    for expected in (20.0, 35.0, 35.0):  # 10 -> 20 -> 40 capped at 35
        clock.now += cb.status(A)["retryIn"]
        assert attempt(cb, A, False)  # the probe fails
        assert cb.status(A)["openFor"] == expected
    assert cb.status(A)["reopens"] == 3
    assert cb.opened == 4


def test_a_close_resets_the_back_off():
    clock = Clock()
    cb = breakers(clock)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    attempt(cb, A, False)  # re-opened for 20 s
    clock.now += 20.0
    attempt(cb, A, True)  # closed
    for _ in range(3):
        attempt(cb, A, False)
    assert cb.status(A) == {"state": "open", "openFor": 10.0, "retryIn": 10.0}


def test_a_close_needs_a_full_run_again():
    clock = Clock()
    cb = breakers(clock)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    attempt(cb, A, True)
    attempt(cb, A, False)
    attempt(cb, A, False)
    assert cb.state(A) == CLOSED


def test_release_frees_a_probe_slot_without_an_outcome():
    clock = Clock()
    cb = breakers(clock)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    ticket = cb.allow(A)
    assert ticket and not cb.available(A)
    cb.release(A, ticket)
    assert cb.available(A) and cb.state(A) == HALF_OPEN
    assert attempt(cb, A, True)
    assert cb.state(A) == CLOSED


def test_outcomes_admitted_before_the_circuit_opened_change_nothing():
    clock = Clock()
    cb = breakers(clock)
    slow = cb.allow(A)  # started while closed; still running when the circuit opens
    for _ in range(3):
        attempt(cb, A, False)
    cb.record(A, True, slow)  # a success from before must not close it
    assert cb.state(A) == OPEN
    clock.now += 10.0
    probe = cb.allow(A)
    cb.record(A, False, slow)  # nor may an old failure decide the probe
    assert cb.state(A) == HALF_OPEN
    cb.record(A, True, probe)
    assert cb.state(A) == CLOSED


def test_a_refused_ticket_records_nothing():
    cb = breakers()
    for _ in range(3):
        attempt(cb, A, False)
    cb.record(A, True, cb.allow(A))
    assert cb.state(A) == OPEN


# -- views, pruning, listeners ----------------------------------------------------------------


def test_open_keys_and_prune():
    clock = Clock()
    cb = breakers(clock)
    for key in (A, B):
        for _ in range(3):
            attempt(cb, key, False)
    assert cb.open_keys() == [A, B]
    clock.now += 10.0
    assert cb.open_keys() == [A, B]  # due for probing is still not closed
    cb.prune({B})
    assert cb.open_keys() == [B]
    assert cb.state(A) == CLOSED and cb.available(A)


def test_state_changes_reach_the_listener_and_the_log(caplog):
    clock = Clock()
    seen = []
    cb = CircuitBreakers(
        CircuitBreakerConfig(consecutive_failures=1, open_for=5.0, max_open_for=60.0),
        clock=clock,
        on_change=lambda key, old, new: seen.append((key, old, new)),
        service="users",
    )
    with caplog.at_level(logging.INFO, "odin_gw.traffic.breaker"):
        attempt(cb, A, False)
        clock.now += 5.0
        attempt(cb, A, False)
        clock.now += 10.0
        attempt(cb, A, True)
    assert seen == [
        (A, CLOSED, OPEN),
        (A, OPEN, HALF_OPEN),
        (A, HALF_OPEN, OPEN),
        (A, OPEN, HALF_OPEN),
        (A, HALF_OPEN, CLOSED),
    ]
    assert f"users: circuit of {A} opened for 5s" in caplog.text
    assert f"users: circuit of {A} re-opened for 10s" in caplog.text
    assert f"users: circuit of {A} closed" in caplog.text


def test_the_closed_path_takes_no_lock():
    cb = breakers()
    attempt(cb, A, True)
    done = []

    def hot_path():
        ticket = cb.allow(A)
        done.append((cb.available(A), ticket, cb.allow(B)))
        cb.record(A, True, ticket)
        done.append("recorded")

    with cb._lock:  # another thread in the middle of a state change
        worker = threading.Thread(target=hot_path)
        worker.start()
        worker.join(timeout=5)
        assert done == [(True, 1, 1), "recorded"]


def test_threads_racing_for_probe_slots_get_exactly_the_limit():
    clock = Clock()
    cb = breakers(clock, half_open_requests=3)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    start = threading.Barrier(8)
    tickets = []
    guard = threading.Lock()

    def race():
        start.wait(timeout=10)
        for _ in range(50):
            ticket = cb.allow(A)
            if ticket:
                with guard:
                    tickets.append(ticket)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(tickets) == 3
    assert cb.rejected == 8 * 50 - 3


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"open_for": 0.0}, "openFor"),
        ({"open_for": 30.0, "max_open_for": 10.0}, "maxOpenFor"),
        ({"half_open_requests": 0}, "halfOpenRequests"),
        ({"consecutive_failures": -1}, "consecutiveFailures"),
        ({"failure_rate": FailureRateConfig(window=0.0)}, "failureRate"),
    ],
)
def test_bad_settings_are_refused_by_name(kw, words):
    with pytest.raises(ValueError, match=words):
        breakers(**kw)


def test_built_from_a_loaded_config():
    cfg = parse_config(
        "services:\n"
        " - name: web\n"
        "   basePath: /web\n"
        "   targets: ['http://127.0.0.1:9']\n"
        "   circuitBreaker: {consecutiveFailures: 2, openFor: 1s, maxOpenFor: 4s,\n"
        "                    failureRate: {threshold: 50, minRequests: 4, window: 2s}}\n"
    )
    clock = Clock()
    cb = CircuitBreakers(cfg.services[0].circuit_breaker, clock=clock)
    attempt(cb, A, False)
    attempt(cb, A, False)
    assert cb.status(A)["openFor"] == 1.0
