import collections

import pytest

from odin_gw.balancer import LeastRequest, RandomChoice, RoundRobin, Weighted, make_balancer
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
    assert ph.status(A.key) == {"ejected": True, "ejectedFor": 4.0}
    now[0] += 4.0  # exactly at the end: back in
    assert ph.available(A.key)
    assert ph.status(A.key) == {"ejected": False, "recentFailures": 0}
    ph.failed(A.key)  # one failure after an ejection is not a run of two
    assert ph.available(A.key)
    ph.failed(A.key)  # second ejection: 8 s, not 12 (x3) or 16 (two steps)
    assert ph.status(A.key) == {"ejected": True, "ejectedFor": 8.0}
    now[0] += 8.0
    assert ph.available(A.key)
    assert ph.status(B.key) == {"ejected": False, "recentFailures": 0}
    now[0] += 0.1234
    ph.failed(A.key)
    ph.failed(A.key)  # third: 16 s, reported rounded to the millisecond
    now[0] += 0.2004
    assert ph.status(A.key) == {"ejected": True, "ejectedFor": 15.8}


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
