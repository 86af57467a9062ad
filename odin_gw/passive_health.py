"""Passive health (outlier ejection): a target that keeps failing is skipped for a while."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .config.model import PassiveHealthConfig

#: Answers that count toward ``consecutive5xx`` (Envoy's "gateway failures").
GATEWAY_FAILURES = frozenset({502, 503, 504})
CONNECT_FAILURE = "connect-failure"
ANSWERS_5XX = "5xx"
_EPSILON = 1e-9

EjectListener = Callable[[str, str, float], None]


@dataclass(slots=True)
class _State:
    failures: int = 0  # connect failures in a row
    answers_5xx: int = 0  # 502/503/504 answers in a row
    ejected_until: float = 0.0
    ejections: int = 0
    reason: str = ""


class PassiveHealth:
    """Per-worker record of failures, keyed by ``Endpoint.key`` (per worker as Envoy's
    outlier detection is per Envoy).

    After ``consecutive_failures`` failed connects in a row (:meth:`failed`), or
    ``consecutive_5xx`` answers 502/503/504 in a row (:meth:`answered`; 0: answers never
    eject), a target is ejected for ``eject_for`` seconds, doubling on each further
    ejection up to ``max_eject_for``. One successful request clears it. An answer of any
    status proves the connect worked (it ends a run of connect failures); a connect
    failure does not end a run of 5xx answers.

    Never more than ``max_ejection_percent`` of the service's endpoints are ejected at
    once, but one always may be (Envoy's rule): a target whose ejection would pass the
    cap stays in, and its failures keep counting, so it is ejected as soon as there is
    room. The service's endpoint count is what the last :meth:`prune` was given (the
    gateway calls it on every snapshot); before any, nothing is capped.

    Updates are single dict operations (atomic under the GIL); a lost race only shifts a
    count by one, never corrupts state. ``ejected_total`` and ``overflow_total`` count
    ejections and ejections the cap refused; ``on_eject(key, reason, seconds)`` is
    called on each ejection (for metrics).
    """

    def __init__(
        self,
        policy: PassiveHealthConfig,
        clock=time.monotonic,
        on_eject: EjectListener | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._on_eject = on_eject
        self._states: dict[str, _State] = {}
        self._population: int | None = None
        self.ejected_total = 0
        self.overflow_total = 0

    def available(self, key: str) -> bool:
        state = self._states.get(key)
        return state is None or state.ejected_until <= self._clock()

    def failed(self, key: str) -> None:
        """A connect to ``key`` failed."""
        state = self._states.get(key)
        if state is None:
            state = self._states.setdefault(key, _State())
        state.failures += 1
        if state.failures >= self.policy.consecutive_failures:
            self._eject(key, state, CONNECT_FAILURE)

    def answered(self, key: str, status: int) -> None:
        """``key`` answered with ``status``: a 502/503/504 counts toward
        ``consecutive_5xx`` (when on); anything else is a success."""
        limit = self.policy.consecutive_5xx
        if status not in GATEWAY_FAILURES or limit <= 0:
            self.succeeded(key)
            return
        state = self._states.get(key)
        if state is None:
            state = self._states.setdefault(key, _State())
        state.failures = 0
        state.answers_5xx += 1
        if state.answers_5xx >= limit:
            self._eject(key, state, ANSWERS_5XX)

    def succeeded(self, key: str) -> None:
        if key in self._states:
            self._states.pop(key, None)

    def prune(self, keep: set[str] | frozenset[str]) -> None:
        """Forget targets not in ``keep`` (they left discovery): the state would otherwise
        grow with every instance ever seen, and a returning address would start ejected.
        ``keep`` is every endpoint of the service: its size bounds the ejections."""
        self._population = len(keep)
        for key in [k for k in self._states if k not in keep]:
            self._states.pop(key, None)

    @property
    def population(self) -> int | None:
        """The service's endpoint count as the last :meth:`prune` said (``None``: never)."""
        return self._population

    def ejected_keys(self) -> list[str]:
        """Targets ejected now, sorted."""
        now = self._clock()
        return sorted(k for k, s in list(self._states.items()) if s.ejected_until > now)

    def status(self, key: str) -> dict[str, object]:
        """Admin view of one target: ``{"ejected": True, "ejectedFor": seconds, "reason":
        "connect-failure" | "5xx"}``, or ``{"ejected": False, "recentFailures": n}`` plus
        ``recent5xx`` when ``consecutive5xx`` is on and ``heldByEjectionCap: True`` when
        only ``maxEjectionPercent`` keeps it in."""
        state = self._states.get(key)
        now = self._clock()
        if state is None or state.ejected_until <= now:
            doc: dict[str, object] = {
                "ejected": False,
                "recentFailures": state.failures if state else 0,
            }
            if self.policy.consecutive_5xx > 0:
                doc["recent5xx"] = state.answers_5xx if state else 0
            if state is not None and self._due(state):
                doc["heldByEjectionCap"] = True
            return doc
        return {
            "ejected": True,
            "ejectedFor": round(state.ejected_until - now, 3),
            "reason": state.reason,
        }

    # -- internals --------------------------------------------------------------------
    def _due(self, state: _State) -> bool:
        policy = self.policy
        return state.failures >= policy.consecutive_failures or (
            policy.consecutive_5xx > 0 and state.answers_5xx >= policy.consecutive_5xx
        )

    def _eject(self, key: str, state: _State, reason: str) -> None:
        now = self._clock()
        population = self._population
        if population:
            others = sum(
                1 for k, s in list(self._states.items()) if k != key and s.ejected_until > now
            )
            # Envoy: eject if (ejected + 1) / total <= max%, and one may always be.
            if others and (others + 1) * 100.0 > (
                self.policy.max_ejection_percent * population + _EPSILON
            ):
                self.overflow_total += 1
                return
        policy = self.policy
        backoff = min(policy.eject_for * (2**state.ejections), policy.max_eject_for)
        state.ejected_until = now + backoff
        state.ejections += 1
        state.failures = 0
        state.answers_5xx = 0
        state.reason = reason
        self.ejected_total += 1
        if self._on_eject is not None:
            self._on_eject(key, reason, backoff)
