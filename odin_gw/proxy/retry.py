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

The route's ``timeout`` is one deadline for the answer head that every attempt shares
(Envoy's route timeout covers all retries the same way): a retry gets what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

# RFC 9110 section 9.2.2.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Failure(Enum):
    """How an attempt failed, as far as retrying is concerned."""

    CONNECT = "connect"
    STALE = "stale"
    RESET = "reset"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``others``: further endpoints to try after a failure (the service's ``retries``);
    ``stale``: fresh-connection retries on the same endpoint after a stale keep-alive."""

    others: int = 1
    stale: int = 1
    idempotent: frozenset[str] = IDEMPOTENT

    def after(self, failure: Failure, method: str, replayable: bool) -> RetryPolicy | None:
        """The policy for the next attempt after ``failure``, or ``None`` to give up.

        ``replayable``: the request body can be sent again (buffered, or none).
        """
        if failure is Failure.CONNECT:
            # Nothing left the gateway: even a streamed body is still unread.
            return replace(self, others=self.others - 1) if self.others > 0 else None
        if failure is Failure.STALE:
            if self.stale > 0 and replayable:
                return replace(self, stale=self.stale - 1)
            return None
        if failure is Failure.RESET:
            if self.others > 0 and replayable and method in self.idempotent:
                return replace(self, others=self.others - 1)
            return None
        return None  # TIMEOUT, PROTOCOL

    @staticmethod
    def same_endpoint(failure: Failure) -> bool:
        """A stale connection is retried on the same endpoint; other failures move on."""
        return failure is Failure.STALE
