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
