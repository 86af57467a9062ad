"""Prometheus metrics that add up across gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``gunicorn.conf.py`` sets it before any worker
imports prometheus_client) every worker writes its samples to files there and a scrape
merges them; without it (tests, ``flask run``) a private registry per app is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_mp
from prometheus_client.mmap_dict import MmapedDict

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    """Every metric the gateway exports, created once per app."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multi-process mode samples go to files, never to a registry.
        reg = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        self._registry = reg
        kw = {"registry": reg}
        self.requests = Counter(
            "odin_requests",
            "Requests handled, by service, method and status class",
            ["service", "method", "status_class"],
            **kw,
        )
        self.latency = Histogram(
            "odin_request_duration_seconds",
            "Time from request start to the last byte sent",
            ["service"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.upstream_errors = Counter(
            "odin_upstream_errors",
            "Upstream failures by service and kind",
            ["service", "kind"],
            **kw,
        )
        self.discovery = Counter(
            "odin_mesh_discovery_attempts",
            "Control-plane discovery attempts by result",
            ["mesh", "result"],
            **kw,
        )
        gauge_mode = {"multiprocess_mode": "livemax"} if self.multiprocess else {}
        self.endpoints = Gauge(
            "odin_mesh_endpoints",
            "Endpoints known per service, by health",
            ["service", "health"],
            **kw,
            **gauge_mode,
        )
        self.snapshot_age = Gauge(
            "odin_mesh_snapshot_age_seconds",
            "Seconds since the last successful discovery (-1: never)",
            **kw,
            **({"multiprocess_mode": "livemin"} if self.multiprocess else {}),
        )
        self.leader_stale = Gauge(
            "odin_mesh_leader_stale",
            "1 while a worker sees the discovery leader's heartbeat older than the limit",
            **kw,
            **gauge_mode,
        )
        self.cert_expiry = Gauge(
            "odin_mesh_certificate_expiry_timestamp_seconds",
            "notAfter of the gateway's mesh client certificate (Unix time)",
            **kw,
            **gauge_mode,
        )
        self._label_cache: dict[tuple, tuple] = {}

    @property
    def registry(self) -> CollectorRegistry | None:
        """Where more metrics of this app register (``None``: multi-process mode, where
        samples go to files and :meth:`render` reads every metric from them)."""
        return self._registry

    def observe(
        self, service: str | None, method: str, status: int, seconds: float, error_kind: str | None
    ) -> None:
        """Record one finished request (called when its response is closed)."""
        svc = service or "-"
        key = (svc, method, status // 100)
        children = self._label_cache.get(key)
        if children is None:
            m = method if method in METHODS else "OTHER"
            children = (
                self.requests.labels(svc, m, STATUS_CLASS.get(status // 100, "other")),
                self.latency.labels(svc),
            )
            if len(self._label_cache) < 10000:
                self._label_cache[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if error_kind:
            self.upstream_errors.labels(svc, error_kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_mp.MultiProcessCollector(registry)
        else:
            registry = self._registry
        return generate_latest(registry), CONTENT_TYPE_LATEST


#: Sample files whose values add up across processes (prometheus-client's naming).
ADDITIVE_TYPES = ("counter", "histogram", "summary")


def mark_process_dead(pid: int) -> None:
    """gunicorn ``child_exit`` hook: remove a dead worker's sample files.

    prometheus-client's ``mark_process_dead`` only removes live gauges; counters and
    histograms of dead workers would pile up (one file each, forever, with worker
    recycling). Their values are added into ``<type>_archive.db`` (the collector reads
    any ``<type>_*.db``), so totals never go backwards, and the worker's file goes.
    Runs in the master only, one worker at a time.
    """
    path = multiprocess_dir()
    if not path:
        return
    prom_mp.mark_process_dead(pid, path)
    for typ in ADDITIVE_TYPES:
        dead = os.path.join(path, f"{typ}_{pid}.db")
        if not os.path.exists(dead):
            continue
        archive = MmapedDict(os.path.join(path, f"{typ}_archive.db"))
        try:
            for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(dead):
                old, _ = archive.read_value(key)
                archive.write_value(key, old + value, timestamp)
        finally:
            archive.close()
        os.unlink(dead)
