"""Active health checks: probed by the discovery leader only, shared through the snapshot.

A service with ``healthCheck`` has each of its endpoints probed with ``GET <path>`` every
``interval`` (``Host`` as requests send it, ``User-Agent: odin-gw-health/<version>``,
``timeout`` for the whole exchange). The probes go through an
:class:`~odin_gw.proxy.transport.UpstreamSession` of their own: the very TLS stack and
SPIFFE identity check requests use, with the mesh material the leader holds.

**Verdicts.** Each endpoint starts ``unknown``, which routes like ``passing``: a restart
or a leadership move must not turn every endpoint away until it has been probed (Envoy
starts hosts unhealthy; here that would answer 503 everywhere for an interval). The first
pass makes it ``passing`` (as Envoy's first check at start-up does);
``unhealthyThreshold`` failures in a row make it ``failing`` (a status not in
``expectedStatus``, a timeout, a refused connection, a TLS or identity failure); a
failing endpoint needs ``healthyThreshold`` passes in a row to be ``passing`` again.

**Sharing.** Only the leader probes. It folds the verdicts into the snapshot it
publishes (:meth:`ServiceEndpoints.with_checks <odin_gw.mesh.snapshot.ServiceEndpoints.
with_checks>`): a failing endpoint is published ``healthy: false`` beside the mesh's
own verdict, so every worker routes on it with no change. Services with static targets
(no mesh, a backend group given as targets, a mesh service not answered yet) are
published as ``source: static`` entries of the snapshot. Only a change of verdict is
published: a change that moves routing (to or from ``failing``) within
``publish_window``, a first pass (``unknown`` to ``passing``, which routes the same)
within ``NEUTRAL_WINDOW``; everything due by then goes out as one snapshot. A new
leader starts from the verdicts of the last published snapshot (:meth:`seed`).

**Cost.** Probes run on a small thread pool, never more than ``max_in_flight`` at once
and never more than ``max_rate`` started per second (a probe costs the leader about half
a millisecond of CPU, mostly parsing the answer head: 500 a second is a quarter of a
core); first probes are spread over one interval, later ones ``interval`` (+/- 10%)
after the previous probe ended. When the endpoints need more than that (1,000 services
of 10 endpoints every 5 s would be 2,000 a second) or probes are slow (many endpoints
timing out), checks fall behind, logged once per term, rather than take more CPU,
threads or sockets. Every probe opens its own connection and closes it (as HAProxy
does): a leader checking thousands of endpoints keeps no idle socket per endpoint, and a
server's keep-alive timeout can never fail a probe.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import __version__
from ..config.model import GatewayConfig, HealthCheckConfig
from .snapshot import (
    CHECK_FAILING,
    CHECK_PASSING,
    CHECK_UNKNOWN,
    Endpoint,
    EndpointCheck,
    ServiceEndpoints,
    Snapshot,
)
from .tls import TlsMaterial

log = logging.getLogger("odin_gw.mesh.health")

USER_AGENT = f"odin-gw-health/{__version__}"
#: Probes in flight at once, whatever the number of endpoints.
MAX_IN_FLIGHT = 32
#: Probes started per second at most (checks fall behind beyond it).
MAX_RATE = 500.0
#: A change of routing (to or from failing) is published within this window, with
#: every other change pending by then, as one snapshot.
PUBLISH_WINDOW = 0.1
#: A first pass (unknown -> passing: routing does not change) waits up to this long.
NEUTRAL_WINDOW = 1.0
#: Later probes are ``interval`` apart, give or take this share of it.
JITTER = 0.1
#: The runner wakes at least this often (a stop is seen within it).
MAX_WAIT = 0.5


@dataclass(frozen=True)
class CheckedService:
    """One service the leader checks, under its name in the snapshot.

    ``static``: its targets from the config (published as ``source: static`` while the
    mesh has not answered for it, always when ``mesh`` is false); ``mesh``: the mesh's
    endpoints are checked once it answers.
    """

    name: str
    check: HealthCheckConfig
    static: ServiceEndpoints | None
    mesh: bool


def checked_services(config: GatewayConfig) -> dict[str, CheckedService]:
    """The services of ``config`` with active checks, by snapshot name (the backend's
    ``meshService`` or name); empty when the mesh mode does not let the gateway reach
    endpoints itself (a sidecar or the Linkerd proxy picks them). A name shared by two
    backends takes the first one's targets and check."""
    mesh = config.service_mesh
    backends = [b for b in config.backends if b.health_check is not None]
    if not backends:
        return {}
    if mesh.kind == "linkerd" or (mesh.kind == "consul" and mesh.consul.sidecar):
        log.warning(
            "healthCheck is ignored for %s: with serviceMesh %s the %s picks the endpoints",
            ", ".join(b.name for b in backends),
            mesh.kind,
            "Linkerd proxy" if mesh.kind == "linkerd" else "gateway's Consul sidecar",
        )
        return {}
    # Istio with injectSidecar: requests go to the sidecar, or to the static targets.
    mesh_routes = mesh.kind != "none" and not (mesh.kind == "istio" and mesh.istio.inject_sidecar)
    out: dict[str, CheckedService] = {}
    for b in backends:
        name = b.mesh_service or b.name
        if name in out:
            continue
        discovered = b.group_of is None or not b.targets  # as GatewayConfig.discovered
        uses_mesh = mesh_routes and discovered
        static = _static_endpoints(b, config) if b.targets else None
        if static is None and not uses_mesh:
            continue
        out[name] = CheckedService(name, b.health_check, static, uses_mesh)
    return out


def _static_endpoints(backend, config: GatewayConfig) -> ServiceEndpoints:
    # The route's own static endpoints: the same keys, host headers and TLS settings.
    from ..routing import Route

    static = Route.from_config(backend, config).static
    return ServiceEndpoints(backend.mesh_service or backend.name, static.endpoints, "static")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe saw: passed or not, why not, the HTTP status (``None``: none)."""

    ok: bool
    reason: str | None = None
    status: int | None = None


Probe = Callable[[Endpoint, HealthCheckConfig], ProbeResult]


class EndpointHealth:
    """The threshold state machine of one endpoint (see the module docstring).

    ``verdict`` is what was last published; ``passes``/``failures`` count the probes in a
    row since the last change of result.
    """

    __slots__ = ("failures", "passes", "verdict")

    def __init__(self, verdict: EndpointCheck) -> None:
        self.verdict = verdict
        self.passes = 0
        self.failures = 0

    def record(
        self, result: ProbeResult, check: HealthCheckConfig, now: float
    ) -> EndpointCheck | None:
        """Count one probe; the new verdict when it changes, else ``None``."""
        status = self.verdict.status
        if result.ok:
            self.failures = 0
            self.passes += 1
            if status == CHECK_UNKNOWN or (
                status == CHECK_FAILING and self.passes >= check.healthy_threshold
            ):
                self.verdict = EndpointCheck(CHECK_PASSING, now, None, result.status)
                return self.verdict
            return None
        self.passes = 0
        self.failures += 1
        if status != CHECK_FAILING and self.failures >= check.unhealthy_threshold:
            self.verdict = EndpointCheck(CHECK_FAILING, now, result.reason, result.status)
            return self.verdict
        return None


class _Target:
    __slots__ = ("check", "endpoint", "gen", "name")

    def __init__(self, name: str, endpoint: Endpoint, check: HealthCheckConfig, gen: int):
        self.name = name
        self.endpoint = endpoint
        self.check = check
        self.gen = gen


class HealthChecker:
    """The leader's checks for one leadership term (see the module docstring).

    ``publish(names)`` is called, from the checker's thread, with the services whose
    verdicts changed; the caller folds them in with :meth:`fold` and shares the result.
    ``probe`` defaults to an HTTP probe through the checker's own ``UpstreamSession``;
    ``counter`` (optional) is a Prometheus counter labelled ``service, result``.
    """

    def __init__(
        self,
        services: Mapping[str, CheckedService],
        publish: Callable[[set[str]], None],
        *,
        probe: Probe | None = None,
        material: TlsMaterial | None = None,
        counter=None,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_rate: float = MAX_RATE,
        publish_window: float = PUBLISH_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if max_rate <= 0:
            raise ValueError("max_rate must be a positive number of probes per second")
        self.services = dict(services)
        self._publish = publish
        self.max_in_flight = max_in_flight
        self.max_rate = max_rate
        self._burst = max(1.0, max_rate / 10)  # starts allowed at once after a pause
        self._tokens = self._burst
        self._refilled = clock()
        self.publish_window = publish_window
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._counter = counter
        self._session = None
        if probe is None:
            from ..proxy.transport import UpstreamSession

            # One connection per probe, closed after it: pools of one.
            self._session = UpstreamSession(pool_size=1, material=material)
            probe = self._http_probe
        self._probe = probe
        self._cond = threading.Condition()  # guards everything below; never held over I/O
        self._states: dict[str, dict[str, EndpointHealth]] = {}
        self._targets: dict[str, dict[str, _Target]] = {}  # service -> endpoint key ->
        self._count = 0  # targets in all
        self._tracked: dict[str, ServiceEndpoints] = {}
        self._heap: list[tuple[float, int, tuple[str, str], int]] = []
        self._seq = 0
        self._dirty: set[str] = set()
        self._flush_at = 0.0  # when the pending changes are published
        self._in_flight = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.probes = 0
        self.failures = 0
        self.publishes = 0
        self.late = 0  # probes started more than an interval after they were due

    # -- verdicts ---------------------------------------------------------------------
    def seed(self, snapshot: Snapshot) -> None:
        """Start from the verdicts ``snapshot`` carries (the previous leader's)."""
        with self._cond:
            for name in self.services:
                svc = snapshot.services.get(name)
                if svc is None:
                    continue
                states = self._states.setdefault(name, {})
                for e in svc.endpoints:
                    if e.check is not None and e.key not in states:
                        states[e.key] = EndpointHealth(e.check)

    def fold(self, name: str, svc: ServiceEndpoints) -> ServiceEndpoints:
        """``svc`` with this checker's verdicts (``unknown`` for endpoints not seen yet);
        ``svc`` itself when ``name`` is not checked here or nothing changes."""
        if name not in self.services:
            return svc
        now = self._wall()
        with self._cond:
            states = self._states.setdefault(name, {})
            checks = {}
            for e in svc.endpoints:
                state = states.get(e.key)
                if state is None:
                    state = states[e.key] = EndpointHealth(EndpointCheck(CHECK_UNKNOWN, now))
                checks[e.key] = state.verdict
        return svc.with_checks(checks)

    def entry(self, name: str, published: ServiceEndpoints | None) -> ServiceEndpoints | None:
        """What to publish for ``name`` given its ``published`` entry: the mesh's answer
        folded, or (no answer, or a static entry) its static targets folded; ``None``
        when it has neither."""
        checked = self.services.get(name)
        if checked is None:
            return published
        if published is None or published.source == "static":
            if checked.static is None:
                return published
            folded = self.fold(name, checked.static)
            return published if folded == published else folded
        return self.fold(name, published)

    def record(self, name: str, endpoint_key: str, result: ProbeResult) -> EndpointCheck | None:
        """Count one probe result for an endpoint being checked; the new verdict when it
        changed (then ``name`` is published, see the module docstring)."""
        with self._cond:
            return self._record(name, endpoint_key, result)

    def _record(self, name: str, key: str, result: ProbeResult) -> EndpointCheck | None:
        checked = self.services.get(name)
        state = self._states.get(name, {}).get(key)
        if checked is None or state is None:
            return None
        before = state.verdict.status
        verdict = state.record(result, checked.check, self._wall())
        if verdict is None:
            return None
        moves = verdict.status == CHECK_FAILING or before == CHECK_FAILING
        flush_at = self._clock() + (self.publish_window if moves else NEUTRAL_WINDOW)
        self._flush_at = min(self._flush_at, flush_at) if self._dirty else flush_at
        self._dirty.add(name)
        self._cond.notify()
        if verdict.status == CHECK_FAILING:
            log.warning(
                "health check: service %s endpoint %s is failing (%d in a row): %s",
                name,
                key,
                state.failures,
                verdict.reason,
            )
        elif before == CHECK_FAILING:
            log.info(
                "health check: service %s endpoint %s is passing again (%d in a row)",
                name,
                key,
                state.passes,
            )
        else:  # unknown -> passing: routing does not change; one line per endpoint at start
            log.debug("health check: service %s endpoint %s is passing", name, key)
        return verdict

    # -- what to probe ----------------------------------------------------------------
    def track(self, snapshot: Snapshot) -> None:
        """Probe the endpoints ``snapshot`` publishes for the checked services (new ones
        first within one interval, at random); forget those it no longer has."""
        now = self._clock()
        removed = False
        with self._cond:
            for name, checked in self.services.items():
                svc = snapshot.services.get(name)
                if svc is None and checked.static is not None:
                    svc = checked.static
                if svc is self._tracked.get(name):
                    continue
                removed |= self._retarget(name, checked, svc, now)
            if removed and self._session is not None:
                keys = {k for targets in self._targets.values() for k in targets}
            else:
                keys = None
            self._cond.notify()
        if keys is not None:
            self._session.adapter.retain(keys)

    def _retarget(
        self, name: str, checked: CheckedService, svc: ServiceEndpoints | None, now: float
    ) -> bool:
        if svc is None:
            self._tracked.pop(name, None)
        else:
            self._tracked[name] = svc
        endpoints = {e.key: e for e in svc.endpoints} if svc is not None else {}
        states = self._states.setdefault(name, {})
        removed = False
        targets = self._targets.setdefault(name, {})
        before = len(targets)
        for key in [k for k in targets if k not in endpoints]:
            del targets[key]
            removed = True
        for key in [k for k in states if k not in endpoints]:
            del states[key]
        interval = checked.check.interval
        for key, endpoint in endpoints.items():
            target = targets.get(key)
            if target is not None:
                target.endpoint = endpoint  # weight or metadata changed: probe the new one
                continue
            if key not in states:
                states[key] = EndpointHealth(EndpointCheck(CHECK_UNKNOWN, self._wall()))
            self._seq += 1
            targets[key] = _Target(name, endpoint, checked.check, self._seq)
            self._push(now + self._rng.uniform(0, interval), (name, key), self._seq)
        self._count += len(targets) - before
        return removed

    def _push(self, due: float, tkey: tuple[str, str], gen: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, tkey, gen))

    # -- running ----------------------------------------------------------------------
    def use_material(self, material: TlsMaterial | None) -> None:
        """Probe mesh endpoints with ``material`` from now on (the leader's TLS)."""
        if self._session is not None:
            try:
                self._session.use_material(material)
            except Exception as exc:  # keep probing with the previous material
                log.warning("health checks keep the previous TLS material: %s", exc)

    def start(self, stop: threading.Event | None = None) -> None:
        """Start the runner thread; it ends on :meth:`stop` or when ``stop`` is set."""
        if self._thread is not None:
            return
        self._executor = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="odin-health")
        self._thread = threading.Thread(
            target=self._run, args=(stop,), name="odin-health-checks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop probing: nothing new starts, results still arriving are dropped."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2 * MAX_WAIT)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._session is not None:
            self._session.close()

    def _stopped(self, stop: threading.Event | None) -> bool:
        return self._stop.is_set() or (stop is not None and stop.is_set())

    def _run(self, stop: threading.Event | None) -> None:
        while not self._stopped(stop):
            try:
                starting, flush = self._next()
                for target in starting:
                    self._executor.submit(self._check, target, stop)
                if flush:
                    self._flush(flush)
            except Exception:  # the thread must survive anything; say what happened
                if self._stopped(stop):
                    return  # e.g. the executor was shut down under us
                log.exception("health check runner failed")
                self._stop.wait(MAX_WAIT)

    def _flush(self, names: set[str]) -> None:
        try:
            self._publish(names)
        except Exception:
            with self._cond:  # published with the next batch, or retried after a pause
                if not self._dirty:
                    self._flush_at = self._clock() + self.publish_window
                self._dirty |= names
            raise
        self.publishes += 1

    def _next(self) -> tuple[list[_Target], set[str] | None]:
        """Wait until a probe is due (and a slot free) or verdicts are to be published;
        take them (at most ``MAX_WAIT`` of waiting)."""
        with self._cond:
            now = self._clock()
            starting = self._due(now)
            flush = None
            if self._dirty and now >= self._flush_at:
                flush, self._dirty = self._dirty, set()
            if starting or flush:
                return starting, flush
            wait = MAX_WAIT
            if self._heap and self._in_flight < self.max_in_flight:
                wait = min(wait, self._heap[0][0] - now)
                if self._tokens < 1:
                    wait = max(wait, (1 - self._tokens) / self.max_rate)
            if self._dirty:
                wait = min(wait, self._flush_at - now)
            self._cond.wait(max(0.001, wait))
            return [], None

    def _due(self, now: float) -> list[_Target]:
        """Take the probes due at ``now``, as many as free slots and the rate allow
        (lock held)."""
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self.max_rate)
        self._refilled = now
        starting = []
        heap = self._heap
        while (
            heap
            and heap[0][0] <= now
            and self._in_flight < self.max_in_flight
            and self._tokens >= 1
        ):
            due, _, tkey, gen = heapq.heappop(heap)
            target = self._targets.get(tkey[0], {}).get(tkey[1])
            if target is None or target.gen != gen:
                continue  # the endpoint left, or came back as a new target
            if now - due > target.check.interval:
                self.late += 1
                if self.late == 1:
                    log.warning(
                        "health checks fall behind their interval (%d endpoints, at most %d "
                        "probes in flight and %g started a second): probes start late",
                        self._count,
                        self.max_in_flight,
                        self.max_rate,
                    )
            self._tokens -= 1
            self._in_flight += 1
            starting.append(target)
        return starting

    def _check(self, target: _Target, stop: threading.Event | None) -> None:
        try:
            result = self._probe(target.endpoint, target.check)
        except Exception as exc:  # a probe must never kill the pool's thread
            result = ProbeResult(False, f"{type(exc).__name__}: {exc}")
        self.finished(target, result, stop)

    def finished(
        self, target: _Target, result: ProbeResult, stop: threading.Event | None = None
    ) -> None:
        """A probe of ``target`` ended with ``result``: count it, schedule the next one."""
        if self._counter is not None:
            self._counter.labels(target.name, "pass" if result.ok else "fail").inc()
        with self._cond:
            self._in_flight -= 1
            self.probes += 1
            self.failures += 0 if result.ok else 1
            tkey = (target.name, target.endpoint.key)
            current = self._targets.get(target.name, {}).get(target.endpoint.key)
            if self._stopped(stop) or current is not target:
                self._cond.notify()
                return
            self._record(target.name, target.endpoint.key, result)
            interval = target.check.interval
            due = self._clock() + interval * self._rng.uniform(1 - JITTER, 1 + JITTER)
            self._push(due, tkey, target.gen)
            self._cond.notify()

    # -- the probe --------------------------------------------------------------------
    def _http_probe(self, endpoint: Endpoint, check: HealthCheckConfig) -> ProbeResult:
        return http_probe(self._session, endpoint, check)

    def describe(self) -> dict:
        """Counts for ``/admin/mesh`` (this process, this term)."""
        with self._cond:
            return {
                "endpoints": self._count,
                "inFlight": self._in_flight,
                "probes": self.probes,
                "probeFailures": self.failures,
                "publishes": self.publishes,
                "lateProbes": self.late,
            }


def http_probe(session, endpoint: Endpoint, check: HealthCheckConfig) -> ProbeResult:
    """``GET check.path`` to ``endpoint`` on a new connection through ``session``, all
    of it within ``check.timeout``; passes when the status is in ``expectedStatus``."""
    from ..proxy.headers import OutboundHeaders
    from ..proxy.transport import (
        ConnectFailed,
        HeadTimeout,
        TransportError,
        open_response,
        release,
    )

    headers = OutboundHeaders()
    headers["Host"] = endpoint.host_header
    headers["User-Agent"] = USER_AGENT
    headers["Accept"] = "*/*"
    headers["Connection"] = "close"
    timeout = check.timeout
    deadline = time.monotonic() + timeout
    try:
        response = open_response(
            session,
            endpoint,
            "GET",
            check.path,
            None,
            headers,
            False,
            deadline,
            timeout,
            timeout,
            timeout,
            fresh=True,
        )
    except ConnectFailed as exc:
        return ProbeResult(False, f"connect failed: {exc}")
    except HeadTimeout as exc:
        return ProbeResult(False, f"timeout after {timeout:g}s: {exc}")
    except TransportError as exc:  # reset, invalid answer head
        return ProbeResult(False, f"{exc.failure.value}: {exc}")
    try:
        status = response.status
    finally:
        if response.connection is not None:
            response.connection.keep_alive = False
        release(response)  # body unread: the connection is closed
    if status in check.expected_status:
        return ProbeResult(True, None, status)
    return ProbeResult(False, f"GET {check.path} answered {status}", status)


def names_to_keep(services: Iterable[str], checked: Mapping[str, CheckedService]) -> tuple:
    """The snapshot names a process keeps: the discovered services and the checked
    ones published as static entries."""
    return tuple(dict.fromkeys([*services, *checked]))
