"""The retry policy value: which failures are tried again, for which methods and bodies."""

from __future__ import annotations

import pytest

from odin_gw.proxy.retry import Failure, RetryPolicy


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("replayable", [True, False])
def test_connect_failure_retries_any_method_and_body_on_another_endpoint(method, replayable):
    policy = RetryPolicy(others=2)
    nxt = policy.after(Failure.CONNECT, method, replayable)
    assert nxt is not None and nxt.others == 1
    assert not policy.same_endpoint(Failure.CONNECT)
    assert (
        nxt.after(Failure.CONNECT, method, replayable).after(Failure.CONNECT, method, replayable)
        is None
    )


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_stale_connection_retries_once_when_the_body_can_be_replayed(method):
    policy = RetryPolicy(others=0)
    nxt = policy.after(Failure.STALE, method, True)
    assert nxt is not None and nxt.others == 0  # does not use up the service's retries
    assert policy.same_endpoint(Failure.STALE)
    assert nxt.after(Failure.STALE, method, True) is None  # once per request
    assert policy.after(Failure.STALE, method, False) is None  # a streamed body is spent


@pytest.mark.parametrize(
    ("method", "replayable", "retried"),
    [
        ("GET", True, True),
        ("PUT", True, True),
        ("DELETE", True, True),
        ("PUT", False, False),
        ("POST", True, False),
        ("PATCH", True, False),
    ],
)
def test_reset_after_send_retries_idempotent_replayable_requests_only(method, replayable, retried):
    nxt = RetryPolicy(others=1).after(Failure.RESET, method, replayable)
    assert (nxt is not None) is retried
    assert RetryPolicy(others=0).after(Failure.RESET, method, replayable) is None


@pytest.mark.parametrize("failure", [Failure.TIMEOUT, Failure.PROTOCOL])
def test_timeouts_and_invalid_answers_are_never_retried(failure):
    assert RetryPolicy(others=5).after(failure, "GET", True) is None


def test_policy_is_a_shared_value():
    policy = RetryPolicy(others=1)
    policy.after(Failure.CONNECT, "GET", True)
    assert policy.others == 1  # untouched: each request holds its own successor
    with pytest.raises(AttributeError):
        policy.others = 3  # type: ignore[misc]


def test_each_retry_uses_exactly_one_of_the_services_retries():
    # Two resets, then a connect failure, with retries: 3 -> the fourth failure gives up.
    policy = RetryPolicy(others=3)
    first = policy.after(Failure.RESET, "GET", True)
    assert first is not None and first.others == 2 and first.stale == 1
    second = first.after(Failure.RESET, "GET", True)
    assert second is not None and second.others == 1
    third = second.after(Failure.CONNECT, "GET", True)
    assert third is not None and third.others == 0
    assert third.after(Failure.RESET, "GET", True) is None
    assert third.after(Failure.CONNECT, "GET", True) is None


def test_stale_retries_count_down_by_one():
    policy = RetryPolicy(others=0, stale=2)
    once = policy.after(Failure.STALE, "GET", True)
    assert once is not None and once.stale == 1
    assert once.after(Failure.STALE, "GET", True) is not None


# -- the service's own retryPolicy ------------------------------------------------------


def service_policy(retry_policy: dict | None = None, retries: int = 2) -> RetryPolicy:
    from odin_gw.config import parse_config

    svc = {"name": "s", "basePath": "/s", "targets": ["http://127.0.0.1:9"], "retries": retries}
    if retry_policy is not None:
        svc["retryPolicy"] = retry_policy
    import yaml

    config = parse_config(yaml.safe_dump({"services": [svc]}))
    return RetryPolicy.from_config(config.services[0])


class ConfigRoute:
    """What ``with_route`` reads of a RoutePolicy."""

    def __init__(self, statuses, limit, shared_limit):
        self.retry_statuses = frozenset(statuses)
        self.limit = limit
        self.shared_limit = shared_limit


def test_from_config_takes_retries_methods_and_retry_on():
    p = service_policy({"retryOn": [503], "methods": ["POST"]}, retries=3)
    assert p.others == 3
    assert "POST" in p.idempotent and "GET" in p.idempotent and "PATCH" not in p.idempotent
    assert not p.on_connect and not p.on_reset  # retryOn names neither
    assert p.after(Failure.CONNECT, "GET", True) is None
    assert p.after(Failure.RESET, "GET", True) is None
    d = service_policy()
    assert (
        d.on_connect
        and d.on_reset
        and d.idempotent == frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
    )
    only_reset = service_policy({"retryOn": ["reset"]})
    assert not only_reset.on_connect and only_reset.on_reset
    assert only_reset.after(Failure.RESET, "GET", True).others == 1


def test_a_listed_method_is_retried_after_a_reset_and_others_are_not():
    p = service_policy({"methods": ["POST"]})
    assert p.after(Failure.RESET, "POST", True).others == 1
    assert p.after(Failure.RESET, "PATCH", True) is None
    assert service_policy().after(Failure.RESET, "POST", True) is None


def test_config_answer_retries_share_the_count_with_every_other_retry():
    p = service_policy({"retryOn": ["reset", 503]}, retries=2)
    p = p.with_route(ConfigRoute({503}, 2, True))
    assert p.shared and p.statuses == frozenset({503}) and p.answers == 2
    one = p.after(Failure.STATUS, "GET", True)
    assert (one.others, one.answers) == (1, 1)
    two = one.after(Failure.RESET, "GET", True)  # a reset spends the same count
    assert (two.others, two.answers) == (0, 0)
    assert two.after(Failure.STATUS, "GET", True) is None
    assert two.after(Failure.CONNECT, "GET", True) is None
    assert two.last_answer


def test_config_answer_retries_are_for_idempotent_methods_only():
    p = service_policy({"retryOn": [503]}).with_route(ConfigRoute({503}, 2, True))
    assert p.after(Failure.STATUS, "POST", True) is None
    assert p.after(Failure.TRY_TIMEOUT, "POST", True) is None
    assert p.after(Failure.STATUS, "GET", False) is None  # a streamed body is spent
    listed = service_policy({"retryOn": [503], "methods": ["POST"]})
    assert (
        listed.with_route(ConfigRoute({503}, 2, True)).after(Failure.STATUS, "POST", True).answers
        == 1
    )


def test_mesh_answer_retries_keep_their_own_limit_and_any_method():
    p = RetryPolicy(others=1).with_route(ConfigRoute({500}, 3, False))
    assert not p.shared and p.answers == 3
    nxt = p.after(Failure.STATUS, "POST", True)  # declared retryable by the mesh
    assert (nxt.others, nxt.answers) == (1, 2)
    unlimited = RetryPolicy(others=0).with_route(ConfigRoute({500}, None, False))
    assert unlimited.after(Failure.STATUS, "GET", True) is unlimited
