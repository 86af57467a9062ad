import collections
import random

import pytest

from odin_gw.balancer import (
    LeastRequest,
    Pick,
    RandomChoice,
    RoundRobin,
    Weighted,
    choose_pool,
    make_balancer,
)
from odin_gw.config.model import PassiveHealthConfig
from odin_gw.mesh.snapshot import Endpoint
from odin_gw.passive_health import PassiveHealth

A = Endpoint("10.0.0.1", 80)
B = Endpoint("10.0.0.2", 80)
C = Endpoint("10.0.0.3", 80, weight=8)


def always(_key):
    return True


def test_round_robin_cycles():
    rr = RoundRobin()
    picks = [rr.pick((A, B), (), always) for _ in range(10)]
    assert collections.Counter(picks) == {A: 5, B: 5}
    assert all(picks[i] != picks[i + 1] for i in range(9))


def test_exclude_tried_targets():
    for bal in (RoundRobin(), RandomChoice(), Weighted(), LeastRequest()):
        for _ in range(20):
            assert bal.pick((A, B), (A.key,), always) is B
        assert bal.pick((A,), (A.key,), always) is None


def test_weighted_follows_weights():
    w = Weighted()
    counts = collections.Counter(w.pick((A, C), (), always) for _ in range(9000))
    assert 6.0 < counts[C] / counts[A] < 10.5


def test_least_request_prefers_idle():
    lr = LeastRequest()
    lr.started(A)
    lr.started(A)
    assert all(lr.pick((A, B), (), always) is B for _ in range(50))
    lr.finished(A)
    lr.finished(A)
    assert lr.inflight(A.key) == 0


def test_ejected_targets_skipped_unless_all_are():
    rr = RoundRobin()
    assert all(rr.pick((A, B), (), lambda k: k != A.key) is B for _ in range(10))
    assert rr.pick((A, B), (), lambda k: False) in (A, B)  # panic: try anyway


def test_passive_health_ejects_and_backs_off():
    now = [100.0]
    ph = PassiveHealth(PassiveHealthConfig(2, 5.0, 12.0), clock=lambda: now[0])
    ph.failed(A.key)
    assert ph.available(A.key)
    ph.failed(A.key)
    assert not ph.available(A.key)
    now[0] += 5.01
    assert ph.available(A.key)
    ph.failed(A.key)
    ph.failed(A.key)  # second ejection: 10 s
    now[0] += 9.9
    assert not ph.available(A.key)
    now[0] += 0.2
    ph.failed(A.key)
    ph.failed(A.key)  # third: capped at 12 s
    assert ph.status(A.key)["ejectedFor"] == pytest.approx(12.0)
    ph.succeeded(A.key)
    assert ph.available(A.key)


def test_make_balancer_names():
    assert make_balancer("least-request").name == "least-request"


def test_passive_health_success_resets_the_failure_count():
    now = [100.0]
    ph = PassiveHealth(PassiveHealthConfig(2, 5.0, 12.0), clock=lambda: now[0])
    ph.failed(A.key)
    ph.succeeded(A.key)
    ph.failed(A.key)  # one failure since the success: not two in a row
    assert ph.available(A.key)
    assert ph.status(A.key) == {"ejected": False, "recentFailures": 1}
    ph.failed(A.key)
    assert not ph.available(A.key)


def test_passive_health_backoff_doubles_and_each_ejection_needs_a_full_run():
    now = [100.0]
    ph = PassiveHealth(PassiveHealthConfig(2, 4.0, 60.0), clock=lambda: now[0])
    ph.failed(A.key)
    ph.failed(A.key)  # first ejection: 4 s
    assert ph.status(A.key) == {"ejected": True, "ejectedFor": 4.0, "reason": "connect-failure"}
    now[0] += 4.0  # exactly at the end: back in
    assert ph.available(A.key)
    assert ph.status(A.key) == {"ejected": False, "recentFailures": 0}
    ph.failed(A.key)  # one failure after an ejection is not a run of two
    assert ph.available(A.key)
    ph.failed(A.key)  # second ejection: 8 s, not 12 (x3) or 16 (two steps)
    assert ph.status(A.key) == {"ejected": True, "ejectedFor": 8.0, "reason": "connect-failure"}
    now[0] += 8.0
    assert ph.available(A.key)
    assert ph.status(B.key) == {"ejected": False, "recentFailures": 0}
    now[0] += 0.1234
    ph.failed(A.key)
    ph.failed(A.key)  # third: 16 s, reported rounded to the millisecond
    now[0] += 0.2004
    assert ph.status(A.key) == {"ejected": True, "ejectedFor": 15.8, "reason": "connect-failure"}


def test_passive_health_forgets_targets_that_left():
    ph = PassiveHealth(PassiveHealthConfig(1, 5.0, 60.0), clock=lambda: 0.0)
    ph.failed("http://a:1")
    ph.failed("http://b:1")
    ph.prune({"http://b:1"})
    assert ph.available("http://a:1") and ph.status("http://a:1")["recentFailures"] == 0
    assert not ph.available("http://b:1")


def test_gateway_prunes_passive_health_on_a_new_snapshot(tmp_path):
    from odin_gw.config import parse_config
    from odin_gw.gateway import Gateway
    from odin_gw.mesh.snapshot import ServiceEndpoints, Snapshot

    cfg = parse_config(
        "services:\n - {name: web, basePath: /web, targets: ['http://127.0.0.1:9']}\n"
    )
    gw = Gateway(cfg)
    try:
        route = next(iter(gw.routes))
        a, b = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)
        gw._on_snapshot(
            Snapshot().with_services({"web": ServiceEndpoints("web", (a, b), "consul")}), None
        )
        route.health.failed(a.key)
        route.health.failed(b.key)
        gw._on_snapshot(
            Snapshot().with_services({"web": ServiceEndpoints("web", (b,), "consul")}), None
        )
        assert set(route.health._states) == {b.key}
    finally:
        gw.session.close()


# -- panic mode ---------------------------------------------------------------------------------

D = Endpoint("10.0.0.4", 80)


def keys(endpoints):
    return sorted(e.key for e in endpoints)


def test_threshold_zero_panics_only_when_no_endpoint_is_healthy():
    pool, panic = choose_pool((A, B), (A, B), lambda k: k == B.key, 0.0)
    assert (pool, panic) == ([B], False)
    pool, panic = choose_pool((A, B), (A, B), lambda k: False, 0.0)
    assert (keys(pool), panic) == (keys((A, B)), True)


def test_below_the_threshold_all_endpoints_are_used_even_unhealthy_ones():
    # discovery says A and B are healthy, C is not; passive health or a breaker may
    # set more aside: 2 of 3 healthy is 66%, 1 of 3 is 33%.
    pool, panic = choose_pool((A, B), (A, B, C), always, 50.0)
    assert (keys(pool), panic) == (keys((A, B)), False)
    pool, panic = choose_pool((A, B), (A, B, C), lambda k: k != A.key, 50.0)
    assert (keys(pool), panic) == (keys((A, B, C)), True)
    pool, panic = choose_pool((A, B), (A, B, C), lambda k: k != A.key, 33.0)
    assert (pool, panic) == ([B], False)  # 33.3% is not below 33


def test_a_threshold_of_100_panics_unless_every_endpoint_is_healthy():
    assert choose_pool((A, B, C), (A, B, C), always, 100.0)[1] is False
    assert choose_pool((A, B), (A, B, C), always, 100.0)[1] is True


def test_panic_off_means_nothing_to_pick_when_none_is_healthy():
    rr = RoundRobin()
    assert choose_pool((A, B), (A, B, C), lambda k: False, None) == ([], False)
    assert rr.select((A, B), (A, B, C), (), lambda k: False, None) == Pick(None, False)
    assert rr.select((), (A, B), (), always, None) == Pick(None, False)


def test_no_endpoint_at_all_is_no_panic():
    assert choose_pool((), (), always, 50.0) == ([], False)
    assert RoundRobin().select((), (), (), always, 0.0) == Pick(None, False)


def test_select_spreads_over_everyone_in_panic_and_says_so():
    rr = RoundRobin()
    picks = [rr.select((A,), (A, B, C, D), (), always, 50.0) for _ in range(8)]
    assert all(p.panic for p in picks)
    assert collections.Counter(p.endpoint for p in picks) == {A: 2, B: 2, C: 2, D: 2}
    calm = [rr.select((A, B), (A, B, C, D), (), always, 50.0) for _ in range(4)]
    assert {p.endpoint for p in calm} == {A, B} and not any(p.panic for p in calm)


def test_select_decides_panic_before_leaving_out_tried_endpoints():
    for bal in (RoundRobin(), RandomChoice(), Weighted(), LeastRequest()):
        # A healthy, B not: no panic; A tried already: nothing left, still no panic.
        assert bal.select((A, B), (A, B), (A.key,), lambda k: k == A.key, 0.0) == Pick(None, False)
        for _ in range(10):
            pick = bal.select((A, B), (A, B), (A.key,), lambda k: False, 0.0)
            assert pick == Pick(B, True)


def test_ejected_endpoints_and_open_circuits_count_as_unhealthy():
    from odin_gw.config.traffic import CircuitBreakerConfig
    from odin_gw.traffic.breaker import CircuitBreakers

    ph = PassiveHealth(PassiveHealthConfig(1, 5.0, 60.0), clock=lambda: 0.0)
    cb = CircuitBreakers(CircuitBreakerConfig(consecutive_failures=1), clock=lambda: 0.0)
    ph.failed(A.key)
    cb.record(B.key, False, cb.allow(B.key))

    def available(key):
        return ph.available(key) and cb.available(key)

    rr = RoundRobin()
    assert {rr.select((A, B, D), (A, B, D), (), available, 30.0).endpoint for _ in range(4)} == {D}
    panic = [rr.select((A, B, D), (A, B, D), (), available, 50.0) for _ in range(6)]
    assert all(p.panic for p in panic) and {p.endpoint for p in panic} == {A, B, D}


def test_one_failing_endpoint_of_three_loses_its_traffic_and_gets_it_back_when_healed():
    """The issue's proof, in one worker with an injected clock: C answers 503, its
    circuit opens, traffic moves to A and B; once C heals, a probe closes it."""
    from odin_gw.config.traffic import CircuitBreakerConfig
    from odin_gw.traffic.breaker import CircuitBreakers

    now = [0.0]
    cb = CircuitBreakers(
        CircuitBreakerConfig(consecutive_failures=3, open_for=10.0, max_open_for=60.0),
        clock=lambda: now[0],
    )
    rr = RoundRobin()
    sick = {C.key}
    served = collections.Counter()

    def request():
        pick = rr.select((A, B, C), (A, B, C), (), cb.available, 0.0)
        ticket = cb.allow(pick.endpoint.key)
        assert ticket and not pick.panic
        cb.record(pick.endpoint.key, pick.endpoint.key not in sick, ticket)
        served[pick.endpoint] += 1
        now[0] += 0.1

    for _ in range(30):  # C fails 3 times in its first 9 requests' worth of turns
        request()
    assert cb.open_keys() == [C.key] and served[C] == 3
    served.clear()
    for _ in range(60):  # 6 s, C still open: all traffic to A and B
        request()
    assert served == {A: 30, B: 30}
    sick.clear()  # C heals
    now[0] += 4.0  # its openFor has passed: the next turn probes it
    served.clear()
    for _ in range(30):
        request()
    assert cb.open_keys() == [] and served == {A: 10, B: 10, C: 10}


def many(count):
    return tuple(Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 80) for i in range(count))


def test_a_threshold_below_one_percent_still_panics_above_zero_healthy():
    everyone = many(101)
    pool, panic = choose_pool(everyone[:1], everyone, always, 1.0)  # 0.99% < 1%
    assert panic and len(pool) == 101
    pool, panic = choose_pool(everyone[:2], everyone, always, 1.0)  # 1.98%
    assert not panic and pool == list(everyone[:2])


def test_exactly_at_the_threshold_is_not_panic_and_just_below_it_is():
    assert choose_pool((A,), (A, B), always, 50.0) == ([A], False)  # 50% is not below 50%
    assert choose_pool((A,), (A, B), always, 50.5)[1] is True


def test_weighted_counts_a_weight_of_zero_or_less_as_one():
    zero, negative = Endpoint("10.0.0.5", 80, weight=0), Endpoint("10.0.0.6", 80, weight=-3)
    state = random.getstate()
    random.seed(20240611)
    try:
        w = Weighted()
        counts = collections.Counter(w.pick((zero, negative, A), (), always) for _ in range(9000))
    finally:
        random.setstate(state)
    for endpoint in (zero, negative, A):  # 1/3 each; sd of a share ~0.005
        assert 0.30 < counts[endpoint] / 9000 < 0.37


def test_least_request_prefers_the_less_busy_of_two_busy_endpoints():
    lr = LeastRequest()
    lr.started(A)
    for _ in range(3):
        lr.started(B)
    assert all(lr.pick((A, B), (), always) is A for _ in range(50))


def test_least_request_prefers_an_idle_endpoint_over_one_request_in_flight():
    lr = LeastRequest()
    lr.started(A)
    assert all(lr.pick((A, B), (), always) is B for _ in range(50))


def test_least_request_counts_each_start_and_finish():
    lr = LeastRequest()
    lr.started(A)
    lr.started(A)
    lr.started(A)
    assert lr.inflight(A.key) == 3
    lr.finished(A)
    assert lr.inflight(A.key) == 2
    lr.finished(A)
    assert lr.inflight(A.key) == 1
    lr.finished(A)
    assert lr.inflight(A.key) == 0


def test_least_request_ignores_a_finish_without_a_start():
    lr = LeastRequest()
    lr.finished(B)
    assert lr.inflight(B.key) == 0
    lr.started(B)
    assert lr.inflight(B.key) == 1
