"""Passive health: a target that keeps refusing connections is skipped for a while."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config.model import PassiveHealthConfig


@dataclass(slots=True)
class _State:
    failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0


class PassiveHealth:
    """Per-worker record of connect failures, keyed by ``Endpoint.key``.

    After ``consecutive_failures`` failed connects in a row a target is ejected for
    ``eject_for`` seconds, doubling on each further ejection up to ``max_eject_for``. One
    successful request clears it. Updates are single dict operations (atomic under the
    GIL); a lost race only shifts a count by one, never corrupts state.
    """

    def __init__(self, policy: PassiveHealthConfig, clock=time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._states: dict[str, _State] = {}

    def available(self, key: str) -> bool:
        state = self._states.get(key)
        return state is None or state.ejected_until <= self._clock()

    def failed(self, key: str) -> None:
        state = self._states.get(key)
        if state is None:
            state = self._states.setdefault(key, _State())
        state.failures += 1
        if state.failures >= self.policy.consecutive_failures:
            backoff = min(self.policy.eject_for * (2**state.ejections), self.policy.max_eject_for)
            state.ejected_until = self._clock() + backoff
            state.ejections += 1
            state.failures = 0

    def succeeded(self, key: str) -> None:
        if key in self._states:
            self._states.pop(key, None)

    def prune(self, keep: set[str] | frozenset[str]) -> None:
        """Forget targets not in ``keep`` (they left discovery): the state would otherwise
        grow with every instance ever seen, and a returning address would start ejected."""
        for key in [k for k in self._states if k not in keep]:
            self._states.pop(key, None)

    def status(self, key: str) -> dict[str, object]:
        """Admin view of one target: ``{"ejected": bool, "ejectedFor": seconds}``."""
        state = self._states.get(key)
        now = self._clock()
        if state is None or state.ejected_until <= now:
            return {"ejected": False, "recentFailures": state.failures if state else 0}
        return {"ejected": True, "ejectedFor": round(state.ejected_until - now, 3)}
