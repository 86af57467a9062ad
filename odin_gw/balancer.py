"""Load-balancing policies: pick one endpoint among a route's healthy candidates."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Sequence

from .mesh.snapshot import Endpoint

Available = Callable[[str], bool]


class Balancer:
    """Base policy. ``pick`` never blocks and never does I/O."""

    name = "base"

    def pick(
        self, candidates: Sequence[Endpoint], exclude: Sequence[str], available: Available
    ) -> Endpoint | None:
        """Choose among ``candidates`` not in ``exclude`` (endpoint keys already tried).

        Endpoints that passive health has ejected are skipped; if every remaining one is
        ejected, they are all used anyway (panic mode: better a likely failure than a
        certain 503).
        """
        pool = [e for e in candidates if e.key not in exclude] if exclude else list(candidates)
        if not pool:
            return None
        fit = [e for e in pool if available(e.key)]
        return self._choose(fit or pool)

    def _choose(self, pool: list[Endpoint]) -> Endpoint:
        raise NotImplementedError

    def started(self, endpoint: Endpoint) -> None:
        """A request to ``endpoint`` begins (used by least-request)."""

    def finished(self, endpoint: Endpoint) -> None:
        """A request to ``endpoint`` ended, whatever its outcome."""


class RoundRobin(Balancer):
    name = "round-robin"

    def __init__(self) -> None:
        # next() on itertools.count is atomic in CPython: no lock on the hot path.
        self._counter = itertools.count(random.randrange(1024))

    def _choose(self, pool: list[Endpoint]) -> Endpoint:
        return pool[next(self._counter) % len(pool)]


class RandomChoice(Balancer):
    name = "random"

    def _choose(self, pool: list[Endpoint]) -> Endpoint:
        return random.choice(pool)


class Weighted(Balancer):
    """Random choice in proportion to ``Endpoint.weight`` (Consul ``Weights.Passing``)."""

    name = "weighted"

    def _choose(self, pool: list[Endpoint]) -> Endpoint:
        return random.choices(pool, weights=[max(e.weight, 0) or 1 for e in pool])[0]


class LeastRequest(Balancer):
    """Power of two choices on in-flight request counts (this worker's view)."""

    name = "least-request"

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}
        self._lock = threading.Lock()  # held for a dict update only, never across I/O

    def _choose(self, pool: list[Endpoint]) -> Endpoint:
        if len(pool) == 1:
            return pool[0]
        a, b = random.sample(pool, 2)
        counts = self._inflight
        return a if counts.get(a.key, 0) <= counts.get(b.key, 0) else b

    def started(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._inflight[endpoint.key] = self._inflight.get(endpoint.key, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        with self._lock:
            left = self._inflight.get(endpoint.key, 1) - 1
            if left > 0:
                self._inflight[endpoint.key] = left
            else:
                self._inflight.pop(endpoint.key, None)

    def inflight(self, key: str) -> int:
        return self._inflight.get(key, 0)


POLICIES: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (RoundRobin, RandomChoice, Weighted, LeastRequest)
}


def make_balancer(name: str) -> Balancer:
    """A fresh balancer for the policy ``name`` (validated by the config schema)."""
    return POLICIES[name]()
