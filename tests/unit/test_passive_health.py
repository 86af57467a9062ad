"""Outlier ejection: 5xx runs, the maxEjectionPercent cap, and what passive health reports.
(Connect-failure ejection and its back-off are covered in test_balancer.py.)"""

from __future__ import annotations

import pytest

from odin_gw.config import parse_config
from odin_gw.config.model import PassiveHealthConfig
from odin_gw.passive_health import PassiveHealth

A, B, C, D = (f"http://10.0.0.{i}:80" for i in range(1, 5))


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health(clock=None, **kw) -> PassiveHealth:
    cfg = {"consecutive_failures": 2, "eject_for": 5.0, "max_eject_for": 60.0}
    cfg.update(kw)
    return PassiveHealth(PassiveHealthConfig(**cfg), clock=clock or Clock())


# -- 5xx answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("statuses", [(503, 503, 503), (502, 504, 503), (504, 504, 502)])
def test_a_run_of_gateway_failures_ejects(statuses):
    ph = health(consecutive_5xx=3)
    ph.answered(A, statuses[0])
    ph.answered(A, statuses[1])
    assert ph.status(A) == {"ejected": False, "recentFailures": 0, "recent5xx": 2}
    ph.answered(A, statuses[2])
    assert not ph.available(A)
    assert ph.status(A) == {"ejected": True, "ejectedFor": 5.0, "reason": "5xx"}


@pytest.mark.parametrize("status", [200, 204, 301, 404, 429, 500, 501])
def test_any_other_answer_ends_the_run(status):
    ph = health(consecutive_5xx=2)
    ph.answered(A, 503)
    ph.answered(A, status)
    ph.answered(A, 503)
    assert ph.available(A)
    assert ph.status(A)["recent5xx"] == 1


def test_with_consecutive_5xx_off_answers_never_eject_and_count_as_success():
    ph = health(consecutive_5xx=0)
    ph.failed(A)
    for _ in range(50):
        ph.answered(A, 503)
    assert ph.available(A)
    assert ph.status(A) == {"ejected": False, "recentFailures": 0}  # the 503 cleared it
    ph.failed(A)
    assert ph.available(A)  # one connect failure since the answer


def test_an_answer_ends_a_run_of_connect_failures_but_not_the_reverse():
    ph = health(consecutive_5xx=2)
    ph.failed(A)
    ph.answered(A, 503)  # the connect worked
    ph.failed(A)
    assert ph.available(A) and ph.status(A)["recentFailures"] == 1
    ph.answered(A, 502)  # a connect failure between two 5xx does not break their run
    assert not ph.available(A)
    assert ph.status(A)["reason"] == "5xx"


def test_both_kinds_of_ejection_share_the_back_off():
    clock = Clock()
    ph = health(clock, consecutive_5xx=1)
    ph.failed(A)
    ph.failed(A)  # first ejection: 5 s
    clock.now += 5.0
    ph.answered(A, 503)  # second: 10 s
    assert ph.status(A) == {"ejected": True, "ejectedFor": 10.0, "reason": "5xx"}
    clock.now += 10.0
    ph.answered(A, 200)  # a success clears the history
    ph.answered(A, 503)
    assert ph.status(A)["ejectedFor"] == 5.0


# -- maxEjectionPercent ------------------------------------------------------------------------


def test_never_more_than_max_ejection_percent_of_the_service():
    clock = Clock()
    ph = health(clock, consecutive_failures=1, max_ejection_percent=50.0)
    ph.prune({A, B, C, D})
    for key in (A, B, C):
        ph.failed(key)
    assert ph.ejected_keys() == [A, B]  # 2 of 4 is 50%; a third would be 75%
    assert ph.available(C)
    assert ph.status(C) == {"ejected": False, "recentFailures": 1, "heldByEjectionCap": True}
    assert (ph.ejected_total, ph.overflow_total) == (2, 1)
    ph.failed(C)  # its failures keep counting while it is held
    assert ph.status(C)["recentFailures"] == 2 and ph.available(C)
    clock.now += 5.0  # A and B are back: room again
    ph.failed(C)
    assert ph.ejected_keys() == [C]
    assert ph.status(C)["ejectedFor"] == 5.0


def test_one_endpoint_may_always_be_ejected():
    for percent in (0.0, 10.0):
        ph = health(consecutive_failures=1, max_ejection_percent=percent)
        ph.prune({A, B, C})
        ph.failed(A)
        ph.failed(B)
        assert ph.ejected_keys() == [A], percent


def test_the_cap_counts_what_prune_was_last_given():
    ph = health(consecutive_failures=1, max_ejection_percent=34.0)
    ph.prune({A, B, C, D, "http://10.0.0.5:80", "http://10.0.0.6:80"})
    ph.failed(A)
    ph.failed(B)
    assert ph.ejected_keys() == [A, B]  # 2 of 6 is 33%
    ph.prune({A, B, C, D})  # two instances left discovery
    assert ph.population == 4
    ph.failed(C)
    assert ph.ejected_keys() == [A, B]  # 3 of 4 would be 75%


def test_without_a_population_nothing_is_capped():
    ph = health(consecutive_failures=1, max_ejection_percent=10.0)
    assert ph.population is None
    for key in (A, B, C):
        ph.failed(key)
    assert ph.ejected_keys() == [A, B, C]


def test_ejections_reach_the_listener():
    seen = []
    ph = PassiveHealth(
        PassiveHealthConfig(1, 4.0, 60.0, consecutive_5xx=1),
        clock=Clock(),
        on_eject=lambda key, reason, seconds: seen.append((key, reason, seconds)),
    )
    ph.failed(A)
    ph.answered(B, 504)
    assert seen == [(A, "connect-failure", 4.0), (B, "5xx", 4.0)]


def test_settings_come_from_the_config():
    cfg = parse_config(
        "services:\n"
        " - name: web\n"
        "   basePath: /web\n"
        "   targets: ['http://127.0.0.1:9']\n"
        "   passiveHealth: {consecutive5xx: 2, maxEjectionPercent: 25, ejectFor: 3s}\n"
    )
    ph = PassiveHealth(cfg.services[0].passive_health, clock=Clock())
    ph.prune({A, B, C, D})
    for key in (A, B):
        ph.answered(key, 503)
        ph.answered(key, 503)
    assert ph.ejected_keys() == [A]
    assert ph.status(A)["ejectedFor"] == 3.0


# -- what status reports, and runs after an ejection ---------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
def test_status_of_a_target_never_seen_shows_the_5xx_run_when_it_is_on(limit):
    ph = health(consecutive_5xx=limit)
    assert ph.status(A) == {"ejected": False, "recentFailures": 0, "recent5xx": 0}


@pytest.mark.parametrize("limit", [1, 2])
def test_a_target_held_by_the_cap_after_exactly_its_5xx_run_says_so(limit):
    ph = health(consecutive_5xx=limit, max_ejection_percent=25.0)
    ph.prune({A, B, C, D})
    for _ in range(limit):
        ph.answered(A, 503)
    for _ in range(limit):
        ph.answered(B, 502)
    assert ph.ejected_keys() == [A]
    assert ph.status(B) == {
        "ejected": False,
        "recentFailures": 0,
        "recent5xx": limit,
        "heldByEjectionCap": True,
    }


def test_every_ejection_the_cap_refuses_is_counted():
    ph = health(consecutive_failures=1, max_ejection_percent=25.0)
    ph.prune({A, B, C, D})
    for key in (A, B, C, D):
        ph.failed(key)
    assert ph.ejected_keys() == [A]
    assert (ph.ejected_total, ph.overflow_total) == (1, 3)


def test_after_a_5xx_ejection_a_full_run_is_needed_again():
    clock = Clock()
    ph = health(clock, consecutive_5xx=3)
    for _ in range(3):
        ph.answered(A, 503)
    assert not ph.available(A)
    clock.now += 5.0
    ph.answered(A, 503)
    ph.answered(A, 503)
    assert ph.available(A)
    assert ph.status(A) == {"ejected": False, "recentFailures": 0, "recent5xx": 2}
    ph.answered(A, 503)
    assert ph.status(A) == {"ejected": True, "ejectedFor": 10.0, "reason": "5xx"}
