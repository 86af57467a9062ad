"""Load-balancing policies: pick one endpoint among a route's healthy candidates.

**Panic mode** (Envoy's panic threshold). An endpoint is *healthy* when discovery or the
active health checks say so (it is in the ``healthy`` sequence the caller passes) and
this worker has not set it aside (``available(key)``: not ejected by passive health,
circuit not open). When fewer than ``panicThreshold`` percent of all the service's
endpoints are healthy (``0``: when none is), traffic is spread over *all* of them,
whatever their health: better a likely failure than a certain 503 for everyone.
``None`` turns panic off: with no healthy endpoint there is nothing to pick.
:func:`choose_pool` decides; :meth:`Balancer.select` picks and says whether it panicked.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .mesh.snapshot import Endpoint

Available = Callable[[str], bool]


class Pick(NamedTuple):
    """What :meth:`Balancer.select` chose: ``endpoint`` (``None``: nothing left to try)
    and ``panic`` (the service is below its panic threshold: chosen among all)."""

    endpoint: Endpoint | None
    panic: bool


def choose_pool(
    healthy: Sequence[Endpoint],
    everyone: Sequence[Endpoint],
    available: Available,
    threshold: float | None,
) -> tuple[list[Endpoint], bool]:
    """The endpoints to balance over, and whether that is panic mode.

    ``healthy``: the endpoints discovery / active checks call healthy (a subset of
    ``everyone``); ``everyone``: all the service's endpoints, healthy or not;
    ``available``: this worker's verdict per key (passive health, circuit breaker);
    ``threshold``: ``panicThreshold`` percent, ``0`` for "only when none is healthy",
    ``None`` for never. Healthy means in ``healthy`` and ``available``. Not in panic:
    the healthy ones (possibly none, when ``threshold`` is ``None``); in panic: all of
    ``everyone``.
    """
    fit = [e for e in healthy if available(e.key)]
    total = len(everyone)
    if threshold is None or not total:
        return fit, False
    panic = not fit if threshold <= 0 else len(fit) * 100.0 < threshold * total
    return (list(everyone), True) if panic else (fit, False)


class Balancer:
    """Base policy. ``pick`` never blocks and never does I/O."""

    name = "base"

    def pick(
        self, candidates: Sequence[Endpoint], exclude: Sequence[str], available: Available
    ) -> Endpoint | None:
        """Choose among ``candidates`` not in ``exclude`` (endpoint keys already tried).

        Endpoints that passive health has ejected are skipped; if every remaining one is
        ejected, they are all used anyway (panic mode: better a likely failure than a
        certain 503). Neither the panic nor its threshold is visible here: :meth:`select`
        is the panic-aware form.
        """
        pool = [e for e in candidates if e.key not in exclude] if exclude else list(candidates)
        if not pool:
            return None
        fit = [e for e in pool if available(e.key)]
        return self._choose(fit or pool)

    def select(
        self,
        healthy: Sequence[Endpoint],
        everyone: Sequence[Endpoint],
        exclude: Sequence[str],
        available: Available,
        threshold: float | None,
    ) -> Pick:
        """Choose one endpoint, panic-aware (see the module and :func:`choose_pool`).

        Whether the service is in panic is decided on its state alone; then the
        endpoints in ``exclude`` (keys already tried by this request) are left out, and
        when none is left the pick is ``None`` (a caller that may go back to a tried
        endpoint asks again with ``exclude=()``).
        """
        pool, panic = choose_pool(healthy, everyone, available, threshold)
        if exclude and pool:
            pool = [e for e in pool if e.key not in exclude]
        return Pick(self._choose(pool) if pool else None, panic)

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
