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
