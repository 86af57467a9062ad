"""MeshManager: one per process; keeps the current ``Snapshot`` and TLS material.

Every worker runs a cheap ``sync`` job (APScheduler, twice a second) that tries to take
the host's leader lock and otherwise picks up the leader's snapshot file when it
changes. The leader alone talks to the control plane: a periodic full ``discover`` job
every ``serviceMesh.refreshInterval`` plus the client's own ``watch`` thread (blocking
queries for Consul). Request threads only ever read ``manager.snapshot``.

Locking rule: every change of ``snapshot``/``tls`` goes through ``_set`` under
``_publish_lock``, so no writer can put back what another just replaced; the lock is never
held across a network call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from ..config.model import GatewayConfig
from ..errors import GatewayError
from .client import Discovery, MeshClient, StaticClient
from .snapshot import ServiceEndpoints, Snapshot
from .state import StateDir, default_state_dir
from .tls import TlsMaterial, TlsMaterialError

log = logging.getLogger("odin_gw.mesh")

SYNC_INTERVAL = 0.5


def make_client(config: GatewayConfig) -> MeshClient:
    """The control-plane client for ``serviceMesh.type``."""
    kind = config.service_mesh.kind
    if kind == "consul":
        from .consul import ConsulClient

        return ConsulClient(config.service_mesh)
    if kind in ("istio", "linkerd"):
        log.warning(
            "serviceMesh.type %s: discovery for this mesh is not built yet; routes use "
            "their static targets",
            kind,
        )
    return StaticClient()


class MeshManager:
    """Owns discovery for this process; see the module docstring for the threads."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics,
        on_change: Callable[[Snapshot, TlsMaterial | None], None],
        client: MeshClient | None = None,
    ) -> None:
        self.config = config
        self.mesh = config.service_mesh
        self.metrics = metrics
        self.on_change = on_change
        self.client = client or make_client(config)
        self.services: tuple[str, ...] = tuple(
            dict.fromkeys(s.mesh_service or s.name for s in config.services)
        )
        self.state = StateDir(self.mesh.state_dir or default_state_dir(config.server.port))
        self.snapshot = Snapshot(mesh=self.mesh.kind)
        self.tls: TlsMaterial | None = None
        self.tls_error: str | None = None
        self.started_at = time.monotonic()
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._scheduler: BackgroundScheduler | None = None
        self._watch_thread: threading.Thread | None = None
        self._seen_snapshot = 0
        self._seen_tls = 0
        self._seen_trigger = 0
        self._tls_files_seen: tuple = ()
        self._failing_since: str | None = None

    # -- properties -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether this mesh has a control plane or files to follow at all."""
        return self.mesh.kind != "none" or self._uses_tls_files()

    @property
    def leading(self) -> bool:
        return self.state.leading

    def needs_tls(self) -> bool:
        m = self.mesh
        if m.kind == "consul" and m.consul.enable_connect:
            return True
        return m.kind != "none" and m.mtls_enabled and self._uses_tls_files()

    def _uses_tls_files(self) -> bool:
        m = self.mesh
        return bool(m.enabled and m.mtls_enabled and m.cert_file and m.key_file and m.ca_file)

    def ready(self) -> tuple[bool, str]:
        """(ready, why): discovery answered once (or a warm cache), TLS loaded if needed."""
        if self.mesh.kind == "none" and not self._uses_tls_files():
            return True, "static routing"
        if self.needs_tls() and self.tls is None:
            return False, f"waiting for TLS material ({self.tls_error or 'not loaded yet'})"
        if self.mesh.kind == "none":
            return True, "static routing"
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
        """Load the warm cache and start the sync job (no-op without a mesh)."""
        if not self.active:
            return
        self._load_from_disk(initial=True)
        self._load_tls_files()
        sched = BackgroundScheduler(
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
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        try:
            self.client.close()
        finally:
            self.state.resign()

    # -- the sync job (every worker) ------------------------------------------------------
    def _sync(self) -> None:
        try:
            if not self.state.leading and self.mesh.kind != "none" and self.state.try_lead():
                self._become_leader()
            if not self.state.leading:
                self._load_from_disk()
            else:
                trig = self.state.mtime(self.state.trigger_path)
                if trig and trig != self._seen_trigger:
                    self._seen_trigger = trig
                    self.refresh_now()
            self._load_tls_files()
            age = self.snapshot.age()
            self.metrics.snapshot_age.set(-1 if age is None else age)
        except Exception:  # the job must survive anything; say what happened
            log.exception("mesh sync failed")

    def _become_leader(self) -> None:
        log.info(
            "pid %d leads discovery for %s (state dir %s)",
            os.getpid(),
            self.mesh.kind,
            self.state.path,
        )
        # Start from what the previous leader published: no gap in routing.
        self._load_from_disk()
        self._seen_trigger = self.state.mtime(self.state.trigger_path)
        with self._publish_lock:
            self._set(self.snapshot.evolve(leader_pid=os.getpid()), self.tls, write=True)
        assert self._scheduler is not None
        self._scheduler.add_job(
            self._discover,
            "interval",
            seconds=self.mesh.refresh_interval,
            id="discover",
            next_run_time=datetime.now(UTC),
        )
        self._watch_thread = threading.Thread(
            target=self._watch, name="odin-mesh-watch", daemon=True
        )
        self._watch_thread.start()

    def _watch(self) -> None:
        try:
            self.client.watch(self.services, self.publish, self.publish_tls, self._stop)
        except Exception:
            log.exception("mesh watch thread ended with an error")

    def _load_from_disk(self, initial: bool = False) -> None:
        mtime = self.state.mtime(self.state.snapshot_path)
        if not mtime or mtime == self._seen_snapshot:
            return
        try:
            snap = self.state.read_snapshot()
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable snapshot file %s: %s", self.state.snapshot_path, exc)
            self._seen_snapshot = mtime
            return
        self._seen_snapshot = mtime
        if snap is None or snap.mesh != self.mesh.kind:
            return
        if initial:
            snap = snap.evolve(warm=True)
        tls = self.tls
        tls_version = (snap.tls or {}).get("version")
        stale = tls is None or tls.version != tls_version
        if tls_version and stale and not self._uses_tls_files():
            try:
                tls = self.state.read_tls() or tls
            except (OSError, ValueError, KeyError, TlsMaterialError) as exc:
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
                m.cert_file, m.key_file, m.ca_file, trust_domain=m.trust_domain
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
        try:
            result = self.client.discover(self.services)
        except GatewayError as exc:
            self.failed(exc.message)
            return
        except Exception as exc:
            log.exception("discovery raised")
            self.failed(f"{type(exc).__name__}: {exc}")
            return
        self.publish(result)

    def refresh_now(self) -> None:
        """Run a full discovery soon: here if leading, else by asking the leader."""
        if self.state.leading and self._scheduler is not None:
            job = self._scheduler.get_job("discover")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC) + timedelta(milliseconds=1))
                return
        self.state.trigger_refresh()

    def failed(self, reason: str) -> None:
        """Record a failed discovery: the last good snapshot stays (last known good)."""
        self.metrics.discovery.labels(self.mesh.kind, "error").inc()
        with self._publish_lock:
            snap = self.snapshot
            if self._failing_since is None:  # log changes of state, not every poll
                log.warning(
                    "mesh %s discovery failing, serving the last good snapshot: %s",
                    self.mesh.kind,
                    reason,
                )
                self._failing_since = reason
            self._set(
                snap.evolve(
                    last_error=reason,
                    consecutive_failures=snap.consecutive_failures + 1,
                    attempted_at=time.time(),
                ),
                self.tls,
                write=True,
            )

    def publish(self, result: Discovery) -> None:
        """Merge a discovery answer into the snapshot and share it (leader only).

        An answer that carries only errors is a failure: the snapshot keeps its services
        and its refresh time, and the failure is counted.
        """
        now = time.time()
        errors = dict(result.errors)
        if errors and not result.services and result.catalog is None:
            self.failed("; ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
            return
        self.metrics.discovery.labels(self.mesh.kind, "partial" if errors else "ok").inc()
        with self._publish_lock:
            snap = self.snapshot
            services: dict[str, ServiceEndpoints] = dict(snap.services)
            services.update(result.services)
            for name in result.absent:
                # Known to the mesh, now gone: no instances (and no fallback to static
                # targets, which serve only while the mesh never answered for a service).
                services[name] = ServiceEndpoints(name, (), source=self.mesh.kind)
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
            self._set(
                snap.with_services(
                    services,
                    catalog=result.catalog if result.catalog is not None else snap.catalog,
                    # Catalog-only news is not a refresh of the routed services.
                    refreshed_at=now if (result.services or result.absent) else snap.refreshed_at,
                    attempted_at=now,
                    last_error=reason if errors else None,
                    consecutive_failures=snap.consecutive_failures + 1 if errors else 0,
                    leader_pid=os.getpid(),
                    warm=False,
                ),
                self.tls,
                write=True,
            )

    def publish_tls(self, material: TlsMaterial) -> None:
        """New TLS material from the control plane (leader only): share it, then use it."""
        with self._publish_lock:
            if self.tls is not None and self.tls.version == material.version:
                return
            try:
                material.context()
            except TlsMaterialError as exc:
                log.warning("control plane sent unusable TLS material: %s", exc)
                self.tls_error = exc.message
                return
            self.state.write_tls(material)
            self.tls_error = None
            log.info(
                "TLS material rotated to version %s (%s)",
                material.version,
                material.facts.subject if material.facts else "?",
            )
            self._set(self.snapshot.evolve(tls=material.describe()), material, write=True)

    # -- applying ---------------------------------------------------------------------
    def _set(self, snap: Snapshot, tls: TlsMaterial | None, write: bool) -> None:
        if write:
            try:
                self.state.write_snapshot(snap)
                self._seen_snapshot = self.state.mtime(self.state.snapshot_path)
            except OSError as exc:
                log.warning("could not write the snapshot file: %s", exc)
        # Routing tables and TLS pools first: /ready (which reads self.tls) must not say
        # yes before requests can use what it reports.
        self.on_change(snap, tls)
        self.snapshot = snap
        self.tls = tls
        self._export(snap, tls)

    def _export(self, snap: Snapshot, tls: TlsMaterial | None) -> None:
        gauge = self.metrics.endpoints
        for name in self.services:
            svc = snap.services.get(name)
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
        }


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
