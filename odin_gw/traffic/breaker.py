"""Per-endpoint circuit breakers (``circuitBreaker``), one set per service and worker.

Like Envoy's outlier detection, which each Envoy runs on its own, every worker keeps its
own breakers: a failing endpoint is found by each worker within a few requests, and no
state has to be shared on the request path. (The per-service cap on concurrent
requests, which must hold for the host, is :mod:`odin_gw.traffic.concurrency`.)

**States.** An endpoint's circuit is *closed* (requests flow and outcomes are counted)
until ``consecutiveFailures`` failures in a row (0: that trigger is off) or, with
``failureRate``, at least ``minRequests`` outcomes within the sliding ``window`` of
which ``threshold`` percent or more failed. It is then *open* for ``openFor`` seconds
(doubling on each re-open without a close in between, up to ``maxOpenFor``): no request
is admitted. After that it is *half-open*: at most ``halfOpenRequests`` probes at once;
the first probe to succeed closes it (all counts reset), the first to fail opens it
again. Outcomes of requests admitted under an earlier state (a slow request that
started while the circuit was closed and ends after it opened) change nothing: each
admission carries a *ticket*, the circuit's epoch, and outcomes with a stale ticket are
dropped.

**What counts as a failure** is the caller's choice; the forwarder's mapping is: connect
failures, resets, timeouts (the route's and the per-try one) and 502/503/504 answers
fail; any other answer (2xx-4xx, 500, 501...) succeeds; a request that never reached
the endpoint (stale keep-alive retried elsewhere, the client gone before sending)
releases its ticket without an outcome.

**Costs.** :meth:`CircuitBreakers.allow` and :meth:`CircuitBreakers.available` for a
closed circuit are one dict lookup, no lock; a success on a closed circuit without
``failureRate`` and without recent failures takes no lock either. Failures, window
counts and state changes take this set's lock, held for arithmetic only (no I/O; the
``on_change`` callback and the log run after it is released).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from ..config.traffic import CircuitBreakerConfig

log = logging.getLogger("odin_gw.traffic.breaker")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
#: Buckets of the failure-rate window (each ``window / BUCKETS`` seconds long).
BUCKETS = 10
#: The ticket of an endpoint never seen (every circuit's first epoch).
FIRST_TICKET = 1

StateListener = Callable[[str, str, str], None]


class _Circuit:
    __slots__ = (
        "buckets",
        "epoch",
        "failures",
        "open_for",
        "probes",
        "reopens",
        "state",
        "until",
    )

    def __init__(self) -> None:
        self.state = CLOSED
        self.epoch = FIRST_TICKET  # bumped on every state change: tickets go stale
        self.failures = 0  # consecutive failures while closed
        self.until = 0.0  # open: when it turns half-open
        self.open_for = 0.0  # open: how long this opening lasts
        self.reopens = 0  # openings since the last close (the back-off exponent)
        self.probes = 0  # half-open: probes in flight
        self.buckets: list[list[int]] | None = None  # [stamp, requests, failures] each


class CircuitBreakers:
    """The per-endpoint circuits of one service in this worker, keyed by
    ``Endpoint.key``.

    Use: ``available`` as (part of) the balancer's filter; ``allow`` once the endpoint
    is chosen (a falsy ticket: not admitted, choose another); then exactly one of
    ``record(key, ok, ticket)`` or ``release(key, ticket)`` per admitted attempt.
    ``on_change(key, old_state, new_state)`` is called after every state change, outside
    the lock (for metrics); ``opened`` and ``rejected`` count openings and refused
    admissions since start. Safe to share between threads.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: StateListener | None = None,
        service: str = "",
    ) -> None:
        if config.consecutive_failures < 0:
            raise ValueError(f"consecutiveFailures: {config.consecutive_failures} is negative")
        if not 0 < config.open_for <= config.max_open_for:
            raise ValueError(
                f"openFor {config.open_for}s / maxOpenFor {config.max_open_for}s: "
                "openFor must be positive and not longer than maxOpenFor"
            )
        if config.half_open_requests < 1:
            raise ValueError(f"halfOpenRequests: {config.half_open_requests} is below 1")
        rate = config.failure_rate
        if rate is not None and not (rate.window > 0 and rate.min_requests >= 1):
            raise ValueError("failureRate: window must be positive and minRequests >= 1")
        self.config = config
        self.service = service
        self._clock = clock
        self._on_change = on_change
        self._limit = config.half_open_requests
        self._consecutive = config.consecutive_failures
        self._rate = rate
        self._width = rate.window / BUCKETS if rate is not None else 0.0
        # Neither trigger on (a breaker configured for maxConcurrent only): never opens.
        self._tracks = self._consecutive > 0 or rate is not None
        self._circuits: dict[str, _Circuit] = {}
        self._lock = threading.Lock()
        self.opened = 0
        self.rejected = 0

    # -- hot path ---------------------------------------------------------------------
    def available(self, key: str) -> bool:
        """Whether ``allow`` would admit a request to ``key`` now (no side effect): closed,
        or open long enough to be probed, or half-open with a probe slot free."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return True
        state = circuit.state
        if state is CLOSED:
            return True
        if state is OPEN:
            return self._clock() >= circuit.until
        return circuit.probes < self._limit

    def allow(self, key: str) -> int:
        """Admit one attempt to ``key``: a ticket (a positive int) to hand back to
        ``record`` or ``release``, or 0 (counted in ``rejected``) when the circuit is
        open or every probe slot of the half-open circuit is taken."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return FIRST_TICKET
        if circuit.state is CLOSED:
            return circuit.epoch
        events: list[tuple[str, str, str]] = []
        with self._lock:
            ticket = 0
            if circuit.state is CLOSED:
                ticket = circuit.epoch
            else:
                if circuit.state is OPEN and self._clock() >= circuit.until:
                    self._move(key, circuit, HALF_OPEN, events)
                if circuit.state is HALF_OPEN and circuit.probes < self._limit:
                    circuit.probes += 1
                    ticket = circuit.epoch
            if not ticket:
                self.rejected += 1
        self._announce(events)
        return ticket

    def record(self, key: str, ok: bool, ticket: int) -> None:
        """The outcome of an attempt ``allow`` admitted with ``ticket``: ``ok`` False for
        a failure (see the module's mapping). A stale ticket changes nothing."""
        if not self._tracks or not ticket:
            return
        circuit = self._circuits.get(key)
        if circuit is None:
            if ok and self._rate is None:
                return  # nothing to remember
            with self._lock:
                circuit = self._circuits.setdefault(key, _Circuit())
        elif (
            ok
            and circuit.state is CLOSED
            and circuit.failures == 0
            and self._rate is None
            and ticket == circuit.epoch
        ):
            return  # the common case: nothing changes
        events: list[tuple[str, str, str]] = []
        with self._lock:
            if ticket != circuit.epoch or self._circuits.get(key) is not circuit:
                return  # admitted under another state (or pruned since)
            if circuit.state is CLOSED:
                now = self._clock()
                if ok:
                    circuit.failures = 0
                else:
                    circuit.failures += 1
                tripped = not ok and 0 < self._consecutive <= circuit.failures
                if self._rate is not None:
                    tripped = self._count(circuit, now, ok) or tripped
                if tripped:
                    self._open(key, circuit, now, events)
            elif circuit.state is HALF_OPEN:  # a probe's outcome (_move resets the probes)
                if ok:
                    self._move(key, circuit, CLOSED, events)
                else:
                    self._open(key, circuit, self._clock(), events)
        self._announce(events)

    def release(self, key: str, ticket: int) -> None:
        """An admitted attempt that never reached ``key`` (or whose outcome says nothing
        about it): frees its probe slot, counts nothing."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state is not HALF_OPEN or ticket != circuit.epoch:
            return
        with self._lock:
            if circuit.state is HALF_OPEN and ticket == circuit.epoch and circuit.probes:
                circuit.probes -= 1

    # -- views ------------------------------------------------------------------------
    def state(self, key: str) -> str:
        """``closed``, ``open`` or ``half-open`` (an open circuit due for probing says
        ``half-open``)."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return CLOSED
        if circuit.state is OPEN and self._clock() >= circuit.until:
            return HALF_OPEN
        return circuit.state

    def open_keys(self) -> list[str]:
        """Endpoints whose circuit is open or half-open (not closed), sorted."""
        return sorted(k for k, c in list(self._circuits.items()) if c.state is not CLOSED)

    def status(self, key: str) -> dict[str, object]:
        """Admin view of one endpoint: ``state``; closed: ``failures`` (in a row) and,
        with ``failureRate``, ``requests`` and ``failurePercent`` in the window; open:
        ``openFor`` (this opening) and ``retryIn`` (seconds until probing); half-open:
        ``probes`` in flight of ``maxProbes``; ``reopens`` when it re-opened without
        closing (the back-off exponent)."""
        now = self._clock()
        with self._lock:
            circuit = self._circuits.get(key)
            if circuit is None:
                circuit = _Circuit()
            state = self.state(key)
            doc: dict[str, object] = {"state": state}
            if state == CLOSED:
                doc["failures"] = circuit.failures
                if self._rate is not None:
                    requests, failures = self._window(circuit, now)
                    doc["requests"] = requests
                    doc["failurePercent"] = (
                        round(100.0 * failures / requests, 1) if requests else 0.0
                    )
            elif state == OPEN:
                doc["openFor"] = round(circuit.open_for, 3)
                doc["retryIn"] = round(max(circuit.until - now, 0.0), 3)
            else:
                doc["probes"] = circuit.probes if circuit.state is HALF_OPEN else 0
                doc["maxProbes"] = self._limit
            if circuit.reopens > 1:
                doc["reopens"] = circuit.reopens - 1
            return doc

    def prune(self, keep: Iterable[str]) -> None:
        """Forget endpoints not in ``keep`` (they left discovery)."""
        keep = keep if isinstance(keep, set | frozenset) else set(keep)
        with self._lock:
            for key in [k for k in self._circuits if k not in keep]:
                del self._circuits[key]

    # -- internals (caller holds the lock) --------------------------------------------
    def _open(self, key: str, circuit: _Circuit, now: float, events: list) -> None:
        cfg = self.config
        circuit.open_for = min(cfg.open_for * (2**circuit.reopens), cfg.max_open_for)
        circuit.until = now + circuit.open_for
        circuit.reopens += 1
        self.opened += 1
        self._move(key, circuit, OPEN, events)

    def _move(self, key: str, circuit: _Circuit, state: str, events: list) -> None:
        events.append((key, circuit.state, state))
        circuit.state = state
        circuit.epoch += 1
        circuit.probes = 0
        circuit.failures = 0
        circuit.buckets = None
        if state is CLOSED:
            circuit.reopens = 0

    def _count(self, circuit: _Circuit, now: float, ok: bool) -> bool:
        """Count one outcome in the window; True when the failure rate trips."""
        rate = self._rate
        assert rate is not None
        stamp = int(now / self._width) + 1
        buckets = circuit.buckets
        if buckets is None:
            buckets = circuit.buckets = [[0, 0, 0] for _ in range(BUCKETS)]
        bucket = buckets[stamp % BUCKETS]
        if bucket[0] != stamp:
            bucket[0], bucket[1], bucket[2] = stamp, 0, 0
        bucket[1] += 1
        if ok:
            return False
        bucket[2] += 1
        requests, failures = self._window(circuit, now)
        return requests >= rate.min_requests and failures * 100.0 >= rate.threshold * requests

    def _window(self, circuit: _Circuit, now: float) -> tuple[int, int]:
        buckets = circuit.buckets
        if not buckets:
            return 0, 0
        stamp = int(now / self._width) + 1
        requests = failures = 0
        for bucket_stamp, count, failed in buckets:
            if stamp - BUCKETS < bucket_stamp <= stamp:
                requests += count
                failures += failed
        return requests, failures

    def _announce(self, events: list[tuple[str, str, str]]) -> None:
        for key, old, new in events:
            if new is OPEN:
                circuit = self._circuits.get(key)
                log.warning(
                    "%scircuit of %s %s for %.3gs",
                    f"{self.service}: " if self.service else "",
                    key,
                    "opened" if old is CLOSED else "re-opened",
                    circuit.open_for if circuit is not None else 0.0,
                )
            elif new is CLOSED:
                log.info("%scircuit of %s closed", f"{self.service}: " if self.service else "", key)
            if self._on_change is not None:
                self._on_change(key, old, new)
