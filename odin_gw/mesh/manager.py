"""MeshManager: one per process; keeps the current ``Snapshot`` and TLS material.

Every worker runs a cheap ``sync`` job (APScheduler, twice a second) that tries to take
the instance's leader lock and otherwise picks up the leader's snapshot file when it
changes. The leader alone talks to the control plane: a periodic full ``discover`` job
every ``serviceMesh.refreshInterval`` plus the client's own ``watch`` thread (blocking
queries for Consul). Request threads only ever read ``manager.snapshot``.

Leader health (see ``state.py`` for the files): the leader's sync rewrites its heartbeat
and checks that its lock is still the leader lock (a tmp cleaner may delete the file or
the directory; then it steps down and leadership is taken again through the lock).
A follower that finds the heartbeat older than ``stale_after`` (``max(refreshInterval,
10 sync intervals)``) reports the leader stale (``/admin/mesh``, the
``odin_mesh_leader_stale`` gauge, ``ready()``) and takes over in a new lock generation;
the hung leader, if it ever runs again, sees the new generation and steps down. Each
leadership term has its own stop event and callbacks, so a deposed term's threads can
no longer publish. The scheduler is a ``MonotonicScheduler``: a wall-clock step does
not stop the jobs.

Snapshots are stamped with ``fingerprints(config)``: a follower loads only a snapshot of
its own fingerprint; at start (warm cache) and when taking the lead, one of the same
origin is used for the services both configs share; anything else is ignored.

At scale: the watch's answers go through a ``_Batcher`` (one thread per term) that
publishes everything arriving within ``COALESCE_WINDOW`` as one snapshot, one write and
one route rebuild; a service whose answer did not change keeps its object, so the state
dir's journal (``state.py``), the gauges and the gateway's route views all find what
changed by identity and touch only that.

Active health checks (``healthCheck``, :mod:`.health_checks`) run in the leader only, in a
``HealthChecker`` of its term: answers are folded with its verdicts before they are
published, and a change of verdict publishes the services it touches. A gateway with
health checks and no mesh still elects a leader and shares a snapshot (its checked static
targets, ``source: static``), with no discovery job and no watch.

Locking rule: every change of ``snapshot``/``tls`` goes through ``_set`` under
``_publish_lock``, so no writer can put back what another just replaced; the lock is never
held across a network call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError

from ..config.model import GatewayConfig
from ..errors import GatewayError
from .client import Discovery, MeshClient, StaticClient
from .health_checks import HealthChecker, Probe, checked_services, names_to_keep
from .scheduler import MonotonicScheduler
from .snapshot import ServiceEndpoints, Snapshot, fingerprints
from .state import StateDir, StateDirError, default_state_dir, monotonic
from .tls import TlsMaterial, TlsMaterialError

log = logging.getLogger("odin_gw.mesh")

SYNC_INTERVAL = 0.5
#: Call timeout assumed for a mesh client that does not say its own (``call_timeout``).
DEFAULT_CALL_TIMEOUT = 10.0
#: Answers from watches arriving within this window are published (written) together.
COALESCE_WINDOW = 0.05


def make_client(config: GatewayConfig) -> MeshClient:
    """The control-plane client for ``serviceMesh.type``."""
    kind = config.service_mesh.kind
    if kind == "consul":
        from .consul import ConsulClient

        if config.service_mesh.consul.sidecar:
            from .consul_sidecar import describe, discovery_view

            log.info(
                "consul connectMode sidecar: plain HTTP to the gateway's own Consul sidecar "
                "(%s), which does mTLS and load balancing; no leaf or roots are fetched",
                describe(config),
            )
            return ConsulClient(discovery_view(config.service_mesh))
        return ConsulClient(config.service_mesh)
    if kind == "istio":
        if config.service_mesh.istio.inject_sidecar:
            log.info(
                "istio injectSidecar: plain HTTP to each service's Kubernetes name through "
                "the gateway's own Istio sidecar (discovery, balancing and mTLS are its "
                "job); no xDS connection is made"
            )
            return StaticClient()
        if config.service_mesh.istio.discovery == "kubernetes":
            from .istio import kubernetes_endpoints
            from .kubernetes import KubernetesDiscovery

            log.info(
                "istio direct mode with discovery: kubernetes: endpoints from EndpointSlices "
                "(no xDS connection); mTLS to every endpoint only with mtlsEnabled"
            )
            return KubernetesDiscovery(
                config, source="istio", endpoint_factory=kubernetes_endpoints(config)
            )
        from .istio import IstioClient

        return IstioClient(config)
    if kind == "linkerd":
        from .kubernetes import KubernetesDiscovery
        from .linkerd import describe

        for line in describe(config):
            log.info("%s", line)
        return KubernetesDiscovery(config, source="linkerd")
    return StaticClient()


def follows_mesh(config: GatewayConfig) -> bool:
    """Whether ``config`` has a control plane or mTLS files to follow (a state dir)."""
    m = config.service_mesh
    return m.kind != "none" or m.uses_cert_files


def has_health_checks(config: GatewayConfig) -> bool:
    """Whether some backend of ``config`` has ``healthCheck`` (then a leader probes)."""
    return any(b.health_check is not None for b in config.backends)


def needs_state_dir(config: GatewayConfig) -> bool:
    """Whether the processes of ``config`` share a state dir: a mesh to follow, or
    active health checks (probed by a leader, shared through its snapshot)."""
    return follows_mesh(config) or has_health_checks(config)


def state_dir_for(config: GatewayConfig, config_path: str | None = None) -> str | None:
    """The state dir ``config`` uses (``serviceMesh.stateDir`` or the instance default),
    ``None`` when it needs none (no mesh and no health checks)."""
    if not needs_state_dir(config):
        return None
    return config.service_mesh.state_dir or default_state_dir(config.server.port, config_path)


class MeshManager:
    """Owns discovery for this process; see the module docstring for the threads."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics,
        on_change: Callable[[Snapshot, TlsMaterial | None], None],
        client: MeshClient | None = None,
        probe: Probe | None = None,
    ) -> None:
        """``probe``: how the health checks probe an endpoint (default: HTTP)."""
        self.config = config
        self.mesh = config.service_mesh
        self.metrics = metrics
        self.on_change = on_change
        self.client = client or make_client(config)
        self.services: tuple[str, ...] = tuple(
            dict.fromkeys(s.mesh_service or s.name for s in config.discovered)
        )
        #: Services with active checks, by snapshot name; probed by the leader only.
        self.checked = checked_services(config)
        # What a snapshot may hold: discovered services and checked static targets.
        self._kept = names_to_keep(self.services, self.checked)
        self._probe = probe
        self._check_counter = _check_counter(metrics) if self.checked else None
        self.health: HealthChecker | None = None  # the leader's checks, this term
        # Nothing is created on disk until start() (and only with a mesh to follow).
        self.state = StateDir(state_dir_for(config) or default_state_dir(config.server.port))
        self.origin, self.fingerprint = fingerprints(config)
        self.snapshot = Snapshot(
            mesh=self.mesh.kind, origin=self.origin, fingerprint=self.fingerprint
        )
        self.state_error: str | None = None
        #: Seconds without a leader heartbeat after which the leader counts as hung.
        self.stale_after = max(self.mesh.refresh_interval, 10 * SYNC_INTERVAL)
        #: Seconds without a finished discovery pass after which a leader whose sync still
        #: beats counts as stuck (three missed passes, each allowed a few call timeouts).
        self.discovery_stale_after = 3 * self.mesh.refresh_interval + 3 * float(
            getattr(self.client, "call_timeout", DEFAULT_CALL_TIMEOUT)
        )
        self._attempt_mono = monotonic()  # when this process last finished a pass
        # Istio direct mode: a sidecar's inbound mTLS chain is chosen by this ALPN.
        self._alpn: tuple[str, ...] = ("istio-http/1.1",) if self.mesh.istio_direct else ()
        self.leader_stale: str | None = None
        self._term = 0  # counts this process's leadership terms
        self._term_stop = threading.Event()
        self._no_heartbeat_since: tuple[int, float] | None = None
        self._ignored_snapshot = 0
        self._tls_unsaved: TlsMaterial | None = None
        self._tls_warned: TlsMaterial | None = None
        self._unsaved = False
        self.tls: TlsMaterial | None = None
        self.tls_error: str | None = None
        self.started_at = time.monotonic()
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._scheduler: MonotonicScheduler | None = None
        self._watch_thread: threading.Thread | None = None
        self._seen_snapshot = 0
        self._seen_tls = 0
        self._seen_trigger = 0
        self._tls_files_seen: tuple = ()
        self._failing_since: str | None = None
        # Per service, the client's stamp of the last view published (see publish()).
        self._applied_stamps: dict[str, int] = {}
        self._exported: Snapshot | None = None  # the snapshot the gauges show
        self.coalesce_window = COALESCE_WINDOW
        self._batcher: _Batcher | None = None

    # -- properties -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether this mesh has a control plane or files to follow at all."""
        return follows_mesh(self.config)

    @property
    def leads(self) -> bool:
        """Whether one process of the instance leads: a control plane to ask, or
        active health checks to run (see ``needs_state_dir``)."""
        return self.mesh.kind != "none" or bool(self.checked)

    @property
    def leading(self) -> bool:
        return self.state.leading

    def needs_tls(self) -> bool:
        m = self.mesh
        if m.kind == "consul" and m.consul.sidecar:
            return False  # the gateway's own sidecar does mTLS
        if m.kind == "consul" and m.consul.enable_connect:
            return True
        return m.kind != "none" and self._uses_tls_files()

    def _uses_tls_files(self) -> bool:
        return self.mesh.uses_cert_files

    def ready(self) -> tuple[bool, str]:
        """(ready, why): discovery answered once (or a warm cache), TLS loaded if needed."""
        if self.mesh.kind == "none" and not self._uses_tls_files():
            return True, "static routing"
        if self.state_error:
            return False, self.state_error
        if self.needs_tls() and self.tls is None:
            why = self.tls_error or self.snapshot.last_error or "not loaded yet"
            return False, f"waiting for TLS material ({why})"
        if self.mesh.kind == "none":
            return True, "static routing"
        if self.mesh.kind == "linkerd":
            # Ingress mode: the Linkerd proxy picks the pods; discovery is only shown.
            return True, "the linkerd proxy routes (discovery is shown, not used to route)"
        if self.leader_stale:
            return False, self.leader_stale
        snap = self.snapshot
        if snap.refreshed_at:
            return True, "discovery answered" if not snap.warm else "warm cache"
        if time.monotonic() - self.started_at >= self.mesh.ready_grace_period:
            if any(s.targets for s in self.config.services):
                return True, "grace period over, using static targets"
            return False, "no discovery yet and no static targets to fall back on"
        return False, "waiting for the first discovery"

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Load the warm cache and start the sync job (no-op without a mesh; idempotent).

        An unusable state dir is logged once (one line naming the path and the problem)
        and reported by ``ready()``; the sync job keeps checking it.
        """
        if not (self.active or self.leads) or self._scheduler is not None:
            return
        if not self.state.leading:
            # Built in the gunicorn master (--preload) before it exported ODIN_BIND: the
            # default dir is known only now, in the worker.
            self.state = StateDir(state_dir_for(self.config) or self.state.path)
        if self._check_state_dir():
            self._load_from_disk(initial=True)
        self._load_tls_files()
        sched = MonotonicScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        sched.add_job(
            self._sync,
            "interval",
            seconds=SYNC_INTERVAL,
            id="sync",
            next_run_time=datetime.now(UTC),
        )
        # Assigned before start: the first sync runs at once and, as leader, adds its
        # discovery job to this scheduler (a slow machine ran it before the assignment).
        self._scheduler = sched
        sched.start()

    def stop(self) -> None:
        self._stop.set()
        self._term_stop.set()
        self._stop_checks()
        if self._scheduler is not None:
            with contextlib.suppress(SchedulerNotRunningError):
                self._scheduler.shutdown(wait=False)
            self._scheduler = None
        try:
            self.client.close()
        finally:
            self.state.resign()

    # -- the sync job (every worker) ------------------------------------------------------
    def _sync(self) -> None:
        try:
            if self.leads:
                self._sync_leadership()
            if not self.state.leading:
                self._load_from_disk()
            else:
                trig = self.state.mtime(self.state.trigger_path)
                if trig and trig != self._seen_trigger:
                    self._seen_trigger = trig
                    self.refresh_now()
                if self._tls_unsaved is not None or self._unsaved:
                    with self._publish_lock:
                        self._persist_tls()
                        if self._unsaved:
                            self._set(self.snapshot, self.tls, write=True)
            self._load_tls_files()
            age = self.snapshot.age()
            self.metrics.snapshot_age.set(-1 if age is None else age)
            self.metrics.leader_stale.set(1 if self.leader_stale else 0)
        except Exception:  # the job must survive anything; say what happened
            log.exception("mesh sync failed")

    def _check_state_dir(self) -> bool:
        """Check (and create) the state dir; log once per new problem. True when usable."""
        try:
            self.state.ensure()
        except StateDirError as exc:
            if str(exc) != self.state_error:
                log.error("%s", exc)
            self.state_error = str(exc)
            return False
        if self.state_error:
            log.info("state dir %s is usable again", self.state.path)
        self.state_error = None
        return True

    def _sync_leadership(self) -> None:
        """Keep one live leader: check ours, or take the lock, or replace a hung leader."""
        if self.state.leading:
            problem = self.state.check_lock()
            if problem is None:
                if self.mesh.kind == "none":
                    self._attempt_mono = monotonic()  # no discovery pass to wait for
                try:
                    self.state.beat(
                        attempt=self.snapshot.attempted_at, attempt_mono=self._attempt_mono
                    )
                    return
                except OSError as exc:
                    problem = f"cannot write the heartbeat: {exc}"
            self._resign(problem)
        if not self._check_state_dir():
            return
        try:
            led = self.state.try_lead()
        except (OSError, StateDirError) as exc:
            if f"state dir {self.state.path}: {exc}" != self.state_error:
                log.error("state dir %s: cannot take the leader lock: %s", self.state.path, exc)
            self.state_error = f"state dir {self.state.path}: {exc}"
            return
        if led:
            self.leader_stale = None
            self._become_leader()
            return
        why, judged = self._leader_is_hung()
        if why != self.leader_stale:
            if why:
                log.warning("%s; taking over", why)
            else:
                log.info("the leader is alive again")
        self.leader_stale = why
        # take_over(judged): only the generation found hung is replaced (another follower
        # may have replaced it already; its successor is not judged yet).
        if why and self.state.take_over(judged) and self.state.try_lead():
            log.warning("pid %d took over discovery in generation %d", os.getpid(), self.state.term)
            self.leader_stale = None
            self._become_leader()

    def _leader_is_hung(self) -> tuple[str | None, int]:
        """(why the leader counts as not alive or ``None``, the generation judged).

        Its heartbeat (host-wide monotonic time) must be younger than ``stale_after``;
        a generation whose lock is held but that never wrote one gets as long. A leader
        whose sync beats but whose discovery pass is stuck (a call that never returns)
        is not alive either: the heartbeat carries when its last pass finished, which
        must be younger than ``discovery_stale_after``.
        """
        gen = self.state.generation()
        beat = self.state.heartbeat(gen)
        now = monotonic()
        if beat is None:
            if self._no_heartbeat_since is None or self._no_heartbeat_since[0] != gen:
                self._no_heartbeat_since = (gen, now)
            age = now - self._no_heartbeat_since[1]
            pid = None
        else:
            self._no_heartbeat_since = None
            age = now - float(beat["mono"])
            pid = beat.get("pid")
        if age <= self.stale_after:
            attempt = beat.get("attempt_mono") if beat is not None else None
            if isinstance(attempt, int | float) and not isinstance(attempt, bool):
                stuck = now - float(attempt)
                if stuck > self.discovery_stale_after:
                    return (
                        f"leader pid {pid} is not alive: its sync runs but no discovery pass "
                        f"finished for {stuck:.1f}s (limit {self.discovery_stale_after:g}s: "
                        "3 refresh intervals and 3 call timeouts)",
                        gen,
                    )
            return None, gen
        return (
            f"leader pid {pid} is not alive: no heartbeat for {age:.1f}s "
            f"(limit {self.stale_after:g}s)",
            gen,
        )

    def _resign(self, why: str) -> None:
        """Stop leading: the discovery job and this term's watch end, the lock is freed."""
        log.warning("pid %d stops leading discovery: %s", os.getpid(), why)
        self._term_stop.set()
        self._stop_checks()
        if self._scheduler is not None:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job("discover")
        self.state.resign()

    def _become_leader(self) -> None:
        scheduler = self._scheduler
        if self._stop.is_set() or scheduler is None:
            # stop() ran while this sync was taking the lock (a reload's old worker):
            # give the lead straight back rather than start a term nobody will end.
            self.state.resign()
            return
        log.info(
            "pid %d leads %s for %s (state dir %s)",
            os.getpid(),
            "discovery" if self.mesh.kind != "none" else "health checks",
            self.mesh.kind,
            self.state.path,
        )
        self._attempt_mono = monotonic()  # the first pass gets its full allowance
        # Start from what the previous leader published: no gap in routing.
        self._load_from_disk(adopt=True)
        getattr(self.client, "seed", lambda _snapshot: None)(self.snapshot)  # per-dc answers
        self._seen_trigger = self.state.mtime(self.state.trigger_path)
        # A term of its own: a watch (still in a blocking query when this process lost
        # the lead) or a health check of an earlier term can no longer publish.
        self._term += 1
        self._term_stop = threading.Event()
        if self._stop.is_set():
            self._term_stop.set()
        term = self._term
        if self.checked:
            self._start_checks(term)  # seeded from the snapshot just adopted
        with self._publish_lock:
            snap = self._with_checks(self.snapshot)
            self._set(snap.evolve(leader_pid=os.getpid()), self.tls, write=True)
        if self.health is not None:
            self.health.start(self._term_stop)
        if self.mesh.kind == "none":
            return  # no control plane: health checks only
        scheduler.add_job(
            self._discover,
            "interval",
            seconds=self.mesh.refresh_interval,
            id="discover",
            next_run_time=datetime.now(UTC),
            replace_existing=True,
        )

        def apply(batch: list[Discovery]) -> None:
            if term == self._term and self.state.leading:
                self.publish_many(batch)

        self._batcher = _Batcher(self.coalesce_window, apply, self._term_stop)
        self._batcher.start()
        self._watch_thread = threading.Thread(
            target=self._watch,
            args=(self._term, self._term_stop, self._batcher),
            name="odin-mesh-watch",
            daemon=True,
        )
        self._watch_thread.start()

    # -- active health checks (leader only) ------------------------------------------------
    def _start_checks(self, term: int) -> None:
        self._stop_checks()

        def publish(names: set[str]) -> None:
            self._publish_checks(term, names)

        checker = HealthChecker(
            self.checked,
            publish,
            probe=self._probe,
            material=self.tls,
            counter=self._check_counter,
        )
        checker.seed(self.snapshot)
        self.health = checker

    def _stop_checks(self) -> None:
        checker, self.health = self.health, None
        if checker is not None:
            checker.stop()

    def _with_checks(self, snap: Snapshot) -> Snapshot:
        """``snap`` with every checked service's entry folded (``_publish_lock`` held):
        the mesh's answer, else its static targets."""
        checker = self.health
        if checker is None:
            return snap
        services = dict(snap.services)
        changed = False
        for name in self.checked:
            entry = checker.entry(name, services.get(name))
            if entry is not None and entry is not services.get(name):
                services[name] = entry
                changed = True
        return replace(snap, services=MappingProxyType(services)) if changed else snap

    def _publish_checks(self, term: int, names: set[str]) -> None:
        """Share changed verdicts of ``names`` (the checker's thread)."""
        with self._publish_lock:
            checker = self.health
            if term != self._term or not self.state.leading or checker is None:
                return
            snap = self.snapshot
            services = dict(snap.services)
            for name in names:
                entry = checker.entry(name, services.get(name))
                if entry is not None:
                    services[name] = entry
            self._set(
                snap.with_services(services, leader_pid=os.getpid(), warm=False),
                self.tls,
                write=True,
            )

    def _watch(
        self, term: int = 0, stop: threading.Event | None = None, batcher: _Batcher | None = None
    ) -> None:
        def publish(result: Discovery) -> None:
            if term == self._term and self.state.leading:
                if batcher is not None:
                    batcher.put(result)  # coalesced: one publish per window
                else:
                    self.publish(result)

        def publish_tls(material: TlsMaterial) -> None:
            if term == self._term and self.state.leading:
                self.publish_tls(material)

        try:
            self.client.watch(self.services, publish, publish_tls, stop or self._stop)
        except Exception:
            log.exception("mesh watch thread ended with an error")

    def _load_from_disk(self, initial: bool = False, adopt: bool = False) -> None:
        """Pick up the snapshot file when it changed.

        A follower takes only a snapshot of its own ``fingerprint``. ``initial`` (the warm
        cache at start) and ``adopt`` (taking the lead) also take one of the same
        ``origin``, restricted to the services this config shares with it. Services not in
        this config are always dropped. Anything else is ignored, logged once per file.
        """
        # Base file identity and journal length: a change costs a follower a small read.
        mtime = self.state.disk_stamp()
        if not mtime:
            return
        retry = (adopt or initial) and mtime == self._ignored_snapshot
        if mtime == self._seen_snapshot and not retry:
            return
        self._seen_snapshot = mtime
        try:
            snap = self.state.read_snapshot()
        except (OSError, ValueError) as exc:
            if self._ignored_snapshot != mtime:
                log.warning("ignoring snapshot file %s: %s", self.state.snapshot_path, exc)
            self._ignored_snapshot = mtime
            return
        if snap is None:
            return
        if snap.fingerprint != self.fingerprint:
            if not (initial or adopt) or snap.origin != self.origin or snap.mesh != self.mesh.kind:
                if self._ignored_snapshot != mtime:
                    log.warning(
                        "ignoring snapshot file %s: discovered for another configuration "
                        "(fingerprint %s, ours %s)",
                        self.state.snapshot_path,
                        snap.fingerprint or "none",
                        self.fingerprint,
                    )
                self._ignored_snapshot = mtime
                return
            log.info("using the snapshot of a previous configuration for the services kept")
            snap = replace(
                _of_another_config(snap.only(self._kept), self.checked),
                fingerprint=self.fingerprint,
                warm=True,
            )
        snap = snap.only(self._kept)
        if self._ignored_snapshot == mtime:
            self._ignored_snapshot = 0
        if initial:
            snap = snap.evolve(warm=True)
        tls = self.tls
        tls_version = (snap.tls or {}).get("version")
        stale = tls is None or tls.version != tls_version
        if tls_version and stale and not self._uses_tls_files():
            try:
                tls = self.state.read_tls() or tls
            except (OSError, ValueError, KeyError, TypeError, TlsMaterialError) as exc:
                log.warning("ignoring unreadable TLS material file: %s", exc)
        with self._publish_lock:
            self._set(snap, tls, write=False)

    def _load_tls_files(self) -> None:
        if not self._uses_tls_files():
            return
        m = self.mesh
        stamp = tuple(self.state.mtime(p) for p in (m.cert_file, m.key_file, m.ca_file))
        if stamp == self._tls_files_seen:
            return
        try:
            material = TlsMaterial.from_files(
                m.cert_file, m.key_file, m.ca_file, trust_domain=m.trust_domain, alpn=self._alpn
            )
        except TlsMaterialError as exc:
            # Mid-rotation the key may be newer than the cert: keep the old pair, retry.
            if exc.message != self.tls_error:
                log.warning("TLS files not (re)loaded, keeping the previous material: %s", exc)
            self.tls_error = exc.message
            return
        self._tls_files_seen = stamp
        self.tls_error = None
        if self.tls is None or material.version != self.tls.version:
            log.info("TLS material loaded from files (version %s)", material.version)
            with self._publish_lock:  # a concurrent publish must not put the old pair back
                self._set(self.snapshot, material, write=False)

    # -- the leader's side ----------------------------------------------------------------
    def _discover(self) -> None:
        term = self._term
        try:
            result = self.client.discover(self.services)
        except GatewayError as exc:
            result = exc.message
        except Exception as exc:
            log.exception("discovery raised")
            result = f"{type(exc).__name__}: {exc}"
        self._attempt_mono = monotonic()  # a pass finished, well or not: alive
        if term != self._term or not self.state.leading:
            # A pass that outlived its term (the leader was replaced while it hung): the
            # new leader's snapshot, read from disk, is the truth now.
            log.info("dropping a discovery pass that outlived leadership term %d", term)
            return
        if isinstance(result, str):
            self.failed(result)
        else:
            self.publish(result)

    def refresh_now(self) -> None:
        """Run a full discovery soon: here if leading, else by asking the leader."""
        if self.state.leading and self._scheduler is not None:
            job = self._scheduler.get_job("discover")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC) + timedelta(milliseconds=1))
            return  # no job: no control plane (health checks only), nothing to refresh
        self.state.trigger_refresh()

    def failed(self, reason: str) -> None:
        """Record a failed discovery: the last good snapshot stays (last known good)."""
        with self._publish_lock:
            self._set(self._failed(self.snapshot, reason), self.tls, write=True)

    def _failed(self, snap: Snapshot, reason: str) -> Snapshot:
        """``snap`` with a failure recorded (``_publish_lock`` held)."""
        self.metrics.discovery.labels(self.mesh.kind, "error").inc()
        if self._failing_since is None:  # log changes of state, not every poll
            log.warning(
                "mesh %s discovery failing, serving the last good snapshot: %s",
                self.mesh.kind,
                reason,
            )
            self._failing_since = reason
        return snap.evolve(
            last_error=reason,
            consecutive_failures=snap.consecutive_failures + 1,
            attempted_at=time.time(),
        )

    def publish(self, result: Discovery) -> None:
        """Merge a discovery answer into the snapshot and share it (leader only).

        An answer that carries only errors is a failure: the snapshot keeps its services
        and its refresh time, and the failure is counted.
        """
        self.publish_many([result])

    def publish_many(self, results: Sequence[Discovery]) -> None:
        """Merge answers in order, as ``publish`` would one by one, and share the result
        once: one snapshot, one file write, one route rebuild (watch answers arriving
        within ``coalesce_window`` come here together)."""
        if not results:
            return
        with self._publish_lock:
            snap = self.snapshot
            for result in results:
                snap = self._merge(snap, result)
            self._set(snap, self.tls, write=True)

    def _merge(self, snap: Snapshot, result: Discovery) -> Snapshot:
        """``snap`` with one answer merged (``_publish_lock`` held)."""
        now = time.time()
        errors = dict(result.errors)
        if errors and not result.services and result.catalog is None:
            return self._failed(snap, "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
        self.metrics.discovery.labels(self.mesh.kind, "partial" if errors else "ok").inc()
        services: dict[str, ServiceEndpoints] = dict(snap.services)
        # Never newer with older: a view merged before one already applied (a full
        # pass racing a blocking query) is dropped. Stamps come from the client.
        applied = self._applied_stamps
        for name, svc in result.services.items():
            stamp = result.stamps.get(name)
            if stamp is not None:
                if stamp < applied.get(name, stamp):
                    continue
                applied[name] = stamp
            if self.health is not None:
                svc = self.health.fold(name, svc)  # active check verdicts
            old = services.get(name)
            # An unchanged view keeps its object: sharing and route rebuilds compare
            # services by identity to find what changed.
            services[name] = old if old is not None and old == svc else svc
        for name in result.absent:
            # Known to the mesh, now gone: no instances (and no fallback to static
            # targets, which serve only while the mesh never answered for a service).
            gone = ServiceEndpoints(name, (), source=self.mesh.kind)
            if services.get(name) != gone:
                services[name] = gone
        if errors:
            reason = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
            if self._failing_since is None:
                log.warning(
                    "mesh %s: some services could not be refreshed: %s", self.mesh.kind, reason
                )
                self._failing_since = reason
        elif self._failing_since is not None:
            log.info("mesh %s discovery recovered", self.mesh.kind)
            self._failing_since = None
        catalog = snap.catalog
        if result.catalog is not None and tuple(result.catalog) != catalog:
            catalog = tuple(result.catalog)
        return snap.with_services(
            services,
            catalog=catalog,
            # Catalog-only news is not a refresh of the routed services.
            refreshed_at=now if (result.services or result.absent) else snap.refreshed_at,
            attempted_at=now,
            last_error=reason if errors else None,
            consecutive_failures=snap.consecutive_failures + 1 if errors else 0,
            leader_pid=os.getpid(),
            warm=False,
        )

    def publish_tls(self, material: TlsMaterial) -> None:
        """New TLS material from the control plane (leader only): use it, then share it.

        Applied in memory first; writing it to the state dir is best-effort and retried
        on every sync until it succeeds (followers keep their previous material, still
        valid, meanwhile): a full or vanished state dir never loses a rotation.
        """
        with self._publish_lock:
            if self.tls is not None and self.tls.version == material.version:
                return
            try:
                material.context()
            except TlsMaterialError as exc:
                log.warning("control plane sent unusable TLS material: %s", exc)
                self.tls_error = exc.message
                return
            self.tls_error = None
            log.info(
                "TLS material rotated to version %s (%s)",
                material.version,
                material.facts.subject if material.facts else "?",
            )
            self._set(self.snapshot.evolve(tls=material.describe()), material, write=False)
            self._tls_unsaved = material
            self._persist_tls()

    def _persist_tls(self) -> None:
        """Write unsaved TLS material, then the snapshot naming it (``_publish_lock`` held)."""
        material = self._tls_unsaved
        if material is None:
            return
        try:
            self.state.write_tls(material)
        except OSError as exc:
            if self._tls_unsaved is not self._tls_warned:
                log.warning("TLS material not saved to the state dir yet (will retry): %s", exc)
                self._tls_warned = material
            return
        self._tls_unsaved = None
        self._set(self.snapshot, self.tls, write=True)

    # -- applying ---------------------------------------------------------------------
    def _set(self, snap: Snapshot, tls: TlsMaterial | None, write: bool) -> None:
        if write and self.state.deposed():
            # Not (or no longer) the leader, e.g. a hung leader's late answer after a
            # takeover: the new leader's file counts; the next sync steps down.
            write = False
        if write:
            try:
                self.state.save_snapshot(snap)  # what changed, appended to the journal
                self._seen_snapshot = self.state.disk_stamp()
                self._unsaved = False
            except OSError as exc:
                if not self._unsaved:
                    log.warning("could not write the snapshot file (will retry): %s", exc)
                self._unsaved = True
        # Routing tables and TLS pools first: /ready (which reads self.tls) must not say
        # yes before requests can use what it reports.
        self.on_change(snap, tls)
        self.snapshot = snap
        self.tls = tls
        self._export(snap, tls)
        checker = self.health
        if checker is not None and self.state.leading:
            checker.use_material(tls)
            checker.track(snap)  # probe what was just published

    def _export(self, snap: Snapshot, tls: TlsMaterial | None) -> None:
        gauge = self.metrics.endpoints
        before = self._exported.services if self._exported is not None else None
        self._exported = snap
        for name in self.services:
            svc = snap.services.get(name)
            if before is not None and name in before and before[name] is svc:
                continue  # unchanged (the same object): its gauges are right
            eps: Sequence = svc.endpoints if svc else ()
            healthy = sum(1 for e in eps if e.healthy)
            gauge.labels(name, "healthy").set(healthy)
            gauge.labels(name, "unhealthy").set(len(eps) - healthy)
        if tls is not None and tls.facts is not None:
            self.metrics.cert_expiry.set(tls.facts.not_after)

    # -- admin ------------------------------------------------------------------------
    def status(self) -> dict:
        """The ``/admin/mesh`` document (no secrets)."""
        snap = self.snapshot
        age = snap.age()
        ready, why = self.ready()
        return {
            "type": self.mesh.kind,
            "enabled": self.mesh.enabled,
            "pid": os.getpid(),
            "leader": self.state.leading,
            "leaderPid": snap.leader_pid or self.state.leader_pid(),
            "stateDir": self.state.path,
            "stateDirError": self.state_error,
            "generation": self.state.generation() if self.state_error is None else None,
            "leaderStale": self.leader_stale,
            "leaderHeartbeatAgeSeconds": self._heartbeat_age(),
            "fingerprint": self.fingerprint,
            "refreshInterval": self.mesh.refresh_interval,
            "lastRefresh": _iso(snap.refreshed_at),
            "lastAttempt": _iso(snap.attempted_at),
            "snapshotAgeSeconds": None if age is None else round(age, 3),
            "snapshotVersion": snap.version,
            "warmCache": snap.warm,
            "lastError": snap.last_error,
            "consecutiveFailures": snap.consecutive_failures,
            "ready": ready,
            "readyReason": why,
            "catalog": list(snap.catalog),
            "certificate": self.tls.describe() if self.tls else None,
            "certificateError": self.tls_error,
            **({"healthChecks": self._checks_status()} if self.checked else {}),
            # What the client says of itself (Istio: node id, istiod, clusters); no secrets.
            **({"client": self.client.describe()} if hasattr(self.client, "describe") else {}),
        }

    def _checks_status(self) -> dict:
        """Verdict counts from the snapshot (any worker), probe counts from the leader."""
        counts = {"unknown": 0, "passing": 0, "failing": 0}
        for name in self.checked:
            svc = self.snapshot.services.get(name)
            for e in svc.endpoints if svc is not None else ():
                if e.check is not None:
                    counts[e.check.status] += 1
        doc: dict = {"services": list(self.checked), "endpoints": counts}
        checker = self.health
        if checker is not None:
            doc["leader"] = checker.describe()
        return doc

    def _heartbeat_age(self) -> float | None:
        if not self.leads or self.state_error:
            return None
        beat = self.state.heartbeat()
        return None if beat is None else round(max(0.0, monotonic() - float(beat["mono"])), 3)


class _Batcher:
    """Coalesces watch answers: the first one opens a window of ``window`` seconds, and
    everything that arrived by its end is applied together (one thread per term)."""

    def __init__(
        self, window: float, apply: Callable[[list[Discovery]], None], stop: threading.Event
    ) -> None:
        self.window = window
        self.apply = apply
        self.stop = stop
        self._items: list[Discovery] = []
        self._cond = threading.Condition()
        self.batches = 0

    def start(self) -> None:
        threading.Thread(target=self._run, name="odin-mesh-publish", daemon=True).start()

    def put(self, item: Discovery) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self._cond:
                if not self._items:
                    self._cond.wait(0.5)
                    continue
            self.stop.wait(self.window)  # let the answers of this window arrive
            with self._cond:
                batch, self._items = self._items, []
            if self.stop.is_set():
                return
            try:
                self.apply(batch)
                self.batches += 1
            except Exception:  # the thread must survive anything; say what happened
                log.exception("publishing discovery answers failed")


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _of_another_config(snap: Snapshot, checked) -> Snapshot:
    """``snap`` (adopted from a previous configuration) without what came from that
    configuration: its static entries (the targets may have changed) and the verdicts
    of services this one does not check."""
    services = {}
    for name, svc in snap.services.items():
        if svc.source == "static":
            continue
        if name not in checked and any(e.check is not None for e in svc.endpoints):
            svc = svc.with_checks({})
        services[name] = svc
    return replace(snap, services=MappingProxyType(services))


def _check_counter(metrics):
    """The probe counter (``service``, ``result``): the metrics object's
    ``health_checks`` when it has one, else one registered where its metrics are."""
    counter = getattr(metrics, "health_checks", None)
    if counter is not None or not hasattr(metrics, "registry"):
        return counter
    from prometheus_client import Counter

    try:
        return Counter(
            "odin_health_checks",
            "Active health check probes by service and result (pass, fail)",
            ["service", "result"],
            registry=metrics.registry,
        )
    except ValueError:  # already registered there (a second manager on these metrics)
        return None
