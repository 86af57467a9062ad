"""Per-endpoint circuit breakers: triggers, open/half-open/closed, back-off, tickets."""

from __future__ import annotations

import logging
import sys
import threading
import time

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


# -- settings at their limits ---------------------------------------------------------------


def test_open_for_may_be_as_long_as_max_open_for():
    clock = Clock()
    cb = breakers(clock, open_for=10.0, max_open_for=10.0)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    attempt(cb, A, False)  # re-opened: doubling is capped at once
    assert cb.status(A) == {"state": "open", "openFor": 10.0, "retryIn": 10.0, "reopens": 1}


def test_a_sub_second_window_and_min_requests_of_one_are_accepted():
    rate = FailureRateConfig(threshold=100.0, min_requests=1, window=0.5)
    cb = breakers(consecutive_failures=0, failure_rate=rate)
    attempt(cb, A, True)
    assert cb.state(A) == CLOSED
    attempt(cb, B, False)  # one outcome is enough, and it failed: 100%
    assert cb.state(B) == OPEN


# -- which outcomes count --------------------------------------------------------------------


def test_a_success_after_one_failure_restarts_the_run():
    cb = breakers()
    for ok in (False, True, False, False):
        attempt(cb, A, ok)
    assert cb.status(A) == {"state": "closed", "failures": 2}
    attempt(cb, A, False)
    assert cb.state(A) == OPEN


def test_a_breaker_without_triggers_remembers_no_outcome_and_takes_no_lock():
    cb = breakers(consecutive_failures=0)  # a breaker for maxConcurrent only
    done = []

    def hot_path():
        for _ in range(5):
            cb.record(A, False, cb.allow(A))
        done.append("recorded")

    with cb._lock:
        worker = threading.Thread(target=hot_path)
        worker.start()
        worker.join(timeout=5)
        assert done == ["recorded"]
    assert cb.status(A) == {"state": "closed", "failures": 0}


def test_a_closed_circuit_that_failed_before_serves_successes_without_the_lock():
    cb = breakers()
    attempt(cb, A, False)
    attempt(cb, A, True)  # the run of failures is over; the circuit is remembered
    done = []

    def hot_path():
        ticket = cb.allow(A)
        cb.record(A, True, ticket)
        cb.release(A, cb.allow(A))  # an attempt that never reached A
        done.append((ticket, cb.available(A)))

    with cb._lock:
        worker = threading.Thread(target=hot_path)
        worker.start()
        worker.join(timeout=5)
        assert done == [(1, True)]


# -- tickets -----------------------------------------------------------------------------------


def test_tickets_stay_positive_over_many_open_and_close_cycles():
    clock = Clock()
    cb = breakers(clock, consecutive_failures=1)
    seen = set()
    for _ in range(5):
        closed = cb.allow(A)
        cb.record(A, False, closed)  # opens
        clock.now += cb.status(A)["retryIn"]
        probe = cb.allow(A)
        cb.record(A, True, probe)  # closes
        seen.update((closed, probe))
    assert all(isinstance(t, int) and t > 0 for t in seen)
    assert len(seen) == 10  # every state has its own ticket


def test_a_probe_ticket_released_twice_frees_one_slot_only():
    clock = Clock()
    cb = breakers(clock)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    probe = cb.allow(A)
    cb.release(A, probe)
    cb.release(A, probe)  # a caller's mistake must not open a second probe slot
    assert cb.allow(A) and cb.allow(A) == 0
    assert cb.status(A) == {"state": "half-open", "probes": 1, "maxProbes": 1}


def test_a_release_frees_exactly_one_of_several_probes():
    clock = Clock()
    cb = breakers(clock, half_open_requests=2)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    first, second = cb.allow(A), cb.allow(A)
    assert first and second
    cb.release(A, first)
    assert cb.status(A)["probes"] == 1
    assert cb.allow(A) and cb.allow(A) == 0


def test_releasing_for_an_endpoint_never_seen_or_with_a_stale_ticket_changes_nothing():
    clock = Clock()
    cb = breakers(clock)
    cb.release(B, cb.allow(B))  # no circuit yet: nothing to free
    assert cb.status(B) == {"state": "closed", "failures": 0}
    old = cb.allow(A)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    probe = cb.allow(A)
    cb.release(A, old)  # admitted while closed: not a probe
    assert cb.allow(A) == 0
    cb.release(A, probe)
    assert cb.available(A)


def _wait_until_waiting(thread: threading.Thread, function: str) -> None:
    """Until ``thread`` is inside ``function`` (there: waiting for the breaker's lock).

    Matched as a suffix of the code's name: under mutation testing the method runs as
    ``xǁCircuitBreakersǁrecord__mutmut_orig`` and the like."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and not _named(frame.f_code.co_name, function):
            frame = frame.f_back
        if frame is not None:
            time.sleep(0.01)  # a few bytecodes on, it waits for the lock
            return
        time.sleep(0.001)
    raise AssertionError(f"{thread.name} never reached {function}")


def _named(code_name: str, function: str) -> bool:
    return code_name == function or f"ǁ{function}__mutmut_" in code_name


def _allow_into(cb: CircuitBreakers, key: str, tickets: list) -> None:
    tickets.append(cb.allow(key))


def test_a_request_waiting_while_the_probe_closes_the_circuit_is_admitted():
    # allow() looks at the state without the lock, then waits for it while the probe's
    # success closes the circuit: it must then admit with the closed circuit's ticket.
    admitted_after_close = 0
    for trial in range(6):
        clock = Clock()
        cb = breakers(clock)
        for _ in range(3):
            attempt(cb, A, False)
        clock.now += 10.0
        probe = cb.allow(A)
        got = []
        closer = threading.Thread(target=cb.record, args=(A, True, probe), name="closer")
        waiter = threading.Thread(target=_allow_into, args=(cb, A, got), name="waiter")
        # Alternate who queues first, so either order of the lock hand-over is seen.
        first, second = (closer, waiter) if trial % 2 == 0 else (waiter, closer)
        with cb._lock:
            first.start()
            _wait_until_waiting(first, "record" if first is closer else "allow")
            second.start()
            _wait_until_waiting(second, "record" if second is closer else "allow")
        closer.join(timeout=5)
        waiter.join(timeout=5)
        assert cb.state(A) == CLOSED
        (ticket,) = got
        assert isinstance(ticket, int), ticket  # 0 (refused) or a ticket, never None
        if ticket:  # the circuit had closed: the ticket counts as a closed one
            admitted_after_close += 1
            cb.record(A, False, ticket)
            assert cb.status(A) == {"state": "closed", "failures": 1}
        else:  # it was still half-open with its one probe slot taken
            assert cb.rejected == 1
    assert admitted_after_close > 0


# -- the failure-rate window -------------------------------------------------------------------


def rate_breaker(clock, threshold=50.0, min_requests=4, window=10.0) -> CircuitBreakers:
    rate = FailureRateConfig(threshold=threshold, min_requests=min_requests, window=window)
    return breakers(clock, consecutive_failures=0, failure_rate=rate)


def window(cb: CircuitBreakers, key: str = A) -> tuple[object, object]:
    doc = cb.status(key)
    return doc["requests"], doc["failurePercent"]


def test_the_window_sums_every_bucket_and_drops_each_after_window_seconds():
    clock = Clock(100.5)
    cb = rate_breaker(clock, min_requests=100)  # 1 s buckets
    attempt(cb, A, False)
    attempt(cb, A, False)
    clock.now = 103.5
    for _ in range(3):
        attempt(cb, A, True)
    assert window(cb) == (5, 40.0)
    clock.now = 109.9  # the first bucket is still inside the 10 s window
    assert window(cb) == (5, 40.0)
    clock.now = 110.5  # ... and now it is not, though nothing was recorded since
    assert window(cb) == (3, 0.0)
    clock.now = 113.5
    assert window(cb) == (0, 0.0)


def test_a_window_of_other_than_ten_seconds_slides_by_its_own_buckets():
    clock = Clock(100.1)
    cb = rate_breaker(clock, window=2.0, min_requests=100)  # 0.2 s buckets
    attempt(cb, A, False)
    clock.now = 100.5
    attempt(cb, A, False)
    clock.now = 101.1
    attempt(cb, A, True)
    assert window(cb) == (3, 66.7)
    clock.now = 102.15  # 2 s after the first outcome's bucket
    assert window(cb) == (2, 50.0)


def test_a_clock_near_zero_counts_only_real_outcomes():
    clock = Clock(0.5)  # time.monotonic() just after boot
    cb = rate_breaker(clock, min_requests=100)
    attempt(cb, A, False)
    assert window(cb) == (1, 100.0)
    assert cb.status(B) == {"state": "closed", "failures": 0, "requests": 0, "failurePercent": 0.0}


def test_below_the_threshold_the_circuit_stays_closed_however_many_requests():
    cb = rate_breaker(Clock())
    for _ in range(4):
        attempt(cb, A, True)
    attempt(cb, A, False)  # 5 requests, 1 failed: 20%
    assert cb.state(A) == CLOSED


def test_the_threshold_is_compared_exactly():
    cb = rate_breaker(Clock(), threshold=50.5, min_requests=10)
    for _ in range(5):
        attempt(cb, A, True)
        attempt(cb, A, False)
    assert window(cb) == (10, 50.0)
    assert cb.state(A) == CLOSED  # 50% is below 50.5%
    attempt(cb, A, False)  # 6 of 11: 54.5%
    assert cb.state(A) == OPEN


def test_a_close_starts_the_window_afresh():
    clock = Clock()
    cb = rate_breaker(clock)
    for _ in range(4):
        attempt(cb, A, False)
    assert cb.state(A) == OPEN
    clock.now += 10.0
    attempt(cb, A, True)  # the probe closes it: all counts reset
    assert cb.status(A) == {"state": "closed", "failures": 0, "requests": 0, "failurePercent": 0.0}
    for _ in range(3):
        attempt(cb, A, False)
    assert window(cb) == (3, 100.0) and cb.state(A) == CLOSED  # 3 < minRequests
    attempt(cb, A, False)
    assert cb.state(A) == OPEN


# -- views, pruning, logs ---------------------------------------------------------------------


def test_status_of_an_endpoint_never_seen():
    assert breakers().status(A) == {"state": "closed", "failures": 0}


def test_status_of_an_open_circuit_due_for_probing_shows_no_probe_yet():
    clock = Clock()
    cb = breakers(clock, half_open_requests=2)
    for _ in range(3):
        attempt(cb, A, False)
    clock.now += 10.0
    assert cb.status(A) == {"state": "half-open", "probes": 0, "maxProbes": 2}


def test_status_counts_reopens_from_the_first_one():
    clock = Clock()
    cb = breakers(clock)
    for _ in range(3):
        attempt(cb, A, False)
    assert "reopens" not in cb.status(A)
    clock.now += 10.0
    attempt(cb, A, False)
    assert cb.status(A) == {"state": "open", "openFor": 20.0, "retryIn": 20.0, "reopens": 1}


def test_status_rounds_times_to_the_millisecond():
    clock = Clock()
    cb = breakers(clock, open_for=1.23456, max_open_for=10.0)
    for _ in range(3):
        attempt(cb, A, False)
    assert cb.status(A) == {"state": "open", "openFor": 1.235, "retryIn": 1.235}
    clock.now += 0.0001
    assert cb.status(A)["retryIn"] == 1.234


def test_prune_takes_any_iterable_of_keys():
    cb = breakers()
    for key in (A, B, "http://10.0.0.3:80"):
        attempt(cb, key, False)
    cb.prune(key for key in (B, A))  # a one-shot iterable, in another order
    assert cb.status(A)["failures"] == cb.status(B)["failures"] == 1
    assert cb.status("http://10.0.0.3:80")["failures"] == 0
    cb.prune([B])
    assert (cb.status(A)["failures"], cb.status(B)["failures"]) == (0, 1)


def test_each_state_change_is_logged_once_and_a_half_open_is_not(caplog):
    clock = Clock()
    cb = CircuitBreakers(
        CircuitBreakerConfig(consecutive_failures=1, open_for=5.0, max_open_for=60.0),
        clock=clock,
        service="users",
    )
    with caplog.at_level(logging.INFO, "odin_gw.traffic.breaker"):
        attempt(cb, A, False)
        clock.now += 5.0
        attempt(cb, A, False)
        clock.now += 10.0
        attempt(cb, A, True)
    assert [r.getMessage() for r in caplog.records] == [
        f"users: circuit of {A} opened for 5s",
        f"users: circuit of {A} re-opened for 10s",
        f"users: circuit of {A} closed",
    ]
