"""When a failed upstream attempt is tried again: one policy value, read top to bottom.

Shaped like urllib3's ``Retry``: a frozen value shared by every request of a route;
:meth:`RetryPolicy.after` returns the successor policy for the next attempt (or ``None``:
give up), so per-request state lives in the value a request holds, never in shared state.

| failure                     | what was sent        | retried                                   |
|-----------------------------|----------------------|-------------------------------------------|
| ``connect`` refused/failed, | nothing              | any method, on another endpoint           |
| TLS handshake or identity   |                      | (counts against ``retries``)              |
| ``stale`` pooled connection | request, but the     | once per request, same endpoint, fresh    |
| (closed before any byte of  | peer had closed the  | connection, any method whose body is      |
| the answer)                 | connection already   | replayable (as browsers and urllib3 do);  |
|                             |                      | does not count against ``retries``        |
| ``reset`` after the request | request, maybe       | idempotent methods with a replayable body |
| was sent                    | processed            | only, on another endpoint                 |
| ``timeout``                 | request              | never: the deadline is spent              |
| ``protocol`` (invalid head) | request              | never: the backend answered, badly        |
| ``status``: an answer whose | request, answered    | when the route's policy retries that      |
| status the route retries    |                      | status and the body is replayable (none,  |
| (mesh route policy)         |                      | or buffered: at most 64 KiB, Linkerd's    |
|                             |                      | limit); counts against ``answers``        |
| ``try_timeout``: one        | request              | as ``status``; the attempt's connection   |
| attempt's own time ran out  |                      | is closed                                 |

The route's ``timeout`` is one deadline for the answer head that every attempt shares
(Envoy's route timeout covers all retries the same way): a retry gets what is left.
Answer retries and resets also need the route's retry budget to allow them (the
forwarder asks it last, so a retry refused for another reason spends nothing); a
connect failure sent nothing, so it costs the upstream nothing and spends no budget
(``retries`` and passive health bound it). See :mod:`odin_gw.route_policy` for where
``statuses`` and ``answers`` come from.

The service's ``retryPolicy`` (:meth:`RetryPolicy.from_config`) chooses which of
``connect`` and ``reset`` are retried at all (``retryOn``) and which non-idempotent
methods are retried as if idempotent (``methods``). Retries of answers it names share
the ``retries`` count with connect failures and resets (``shared``): ``retries: 2``
means at most three attempts, whatever failed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.model import ServiceConfig

# RFC 9110 section 9.2.2.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Failure(Enum):
    """How an attempt failed, as far as retrying is concerned."""

    CONNECT = "connect"
    STALE = "stale"
    RESET = "reset"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    STATUS = "status"
    TRY_TIMEOUT = "try_timeout"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``others``: further endpoints to try after a failure (the service's ``retries``);
    ``stale``: fresh-connection retries on the same endpoint after a stale keep-alive;
    ``statuses``: answers that are retried; ``answers``: retries left for those and for
    per-try timeouts (``None``: no count, the route's budget alone limits them)."""

    others: int = 1
    stale: int = 1
    idempotent: frozenset[str] = IDEMPOTENT
    statuses: frozenset[int] = frozenset()
    answers: int | None = 0
    on_connect: bool = True
    on_reset: bool = True
    shared: bool = False

    @classmethod
    def from_config(cls, svc: ServiceConfig) -> RetryPolicy:
        """The service's ``retries`` and ``retryPolicy`` (statuses come per request from
        its :class:`~odin_gw.route_policy.RoutePolicy`)."""
        rp = svc.retry_policy
        return cls(
            others=svc.retries,
            idempotent=IDEMPOTENT | rp.methods,
            on_connect=rp.connect_failure,
            on_reset=rp.reset,
        )

    def with_route(self, route) -> RetryPolicy:
        """This policy plus a :class:`~odin_gw.route_policy.RoutePolicy`'s answer retries
        (its statuses and limit): the value one request of that route starts from.

        The gateway's own ``retryPolicy`` (``route.shared_limit``) counts answer retries
        against ``retries``, as every other retry; a mesh policy has its own limit."""
        if route.shared_limit:
            return replace(self, statuses=route.retry_statuses, answers=self.others, shared=True)
        return replace(self, statuses=route.retry_statuses, answers=route.limit, shared=False)

    def retries_status(self, status: int) -> bool:
        """Whether an answer with ``status`` is one this policy tries again."""
        return status in self.statuses

    @property
    def last_answer(self) -> bool:
        """No answer retry left: the next attempt is the last (no per-try timeout)."""
        return self.answers == 0

    def after(self, failure: Failure, method: str, replayable: bool) -> RetryPolicy | None:
        """The policy for the next attempt after ``failure``, or ``None`` to give up.

        ``replayable``: the request body can be sent again (buffered, or none).
        """
        if failure is Failure.CONNECT:
            # Nothing left the gateway: even a streamed body is still unread.
            return self._spent() if self.on_connect and self.others > 0 else None
        if failure is Failure.STALE:
            if self.stale > 0 and replayable:
                return replace(self, stale=self.stale - 1)
            return None
        if failure is Failure.RESET:
            if self.on_reset and self.others > 0 and replayable and method in self.idempotent:
                return self._spent()
            return None
        if failure is Failure.STATUS or failure is Failure.TRY_TIMEOUT:
            # The upstream has seen the request: only a body the gateway still holds
            # can go again. The gateway's own policy retries only methods that may be
            # repeated; a mesh route marked retryable (ServiceProfile isRetryable) was
            # declared safe to retry whatever its method, as Linkerd applies it.
            if not replayable or (self.shared and method not in self.idempotent):
                return None
            if self.answers is None:
                return self
            if self.answers <= 0:
                return None
            if self.shared:
                return self._spent()
            return replace(self, answers=self.answers - 1)
        return None  # TIMEOUT, PROTOCOL

    def _spent(self) -> RetryPolicy:
        """One retry counted: ``others`` (and ``answers`` too when they share a count)."""
        if self.shared:
            return replace(self, others=self.others - 1, answers=(self.answers or 0) - 1)
        return replace(self, others=self.others - 1)

    @staticmethod
    def same_endpoint(failure: Failure) -> bool:
        """A stale connection is retried on the same endpoint; other failures move on."""
        return failure is Failure.STALE
