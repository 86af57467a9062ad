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
        # -- traffic management (issue 10) --
        sum_mode = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.retries = Counter(
            "odin_retries",
            "Upstream attempts after the first, by service and what failed",
            ["service", "reason"],
            **kw,
        )
        self.retry_budget_exhausted = Counter(
            "odin_retry_budget_exhausted",
            "Retries not made because the route's retry budget was spent",
            ["service"],
            **kw,
        )
        self.split_requests = Counter(
            "odin_split_requests",
            "Requests by backend group chosen (rule, split weight, stickiness or override)",
            ["service", "group", "reason"],
            **kw,
        )
        self.circuit_opened = Counter(
            "odin_circuit_opened",
            "Times an endpoint's circuit breaker opened",
            ["service"],
            **kw,
        )
        self.circuit_open = Gauge(
            "odin_circuit_open",
            "Endpoint circuits open now (summed over workers)",
            ["service"],
            **kw,
            **sum_mode,
        )
        self.circuit_rejected = Counter(
            "odin_circuit_rejections",
            "Requests refused at once: every endpoint's circuit open, or the service's "
            "concurrency cap reached",
            ["service", "reason"],
            **kw,
        )
        self.ejections = Counter(
            "odin_outlier_ejections",
            "Endpoints ejected by passive health (outlier detection)",
            ["service", "reason"],
            **kw,
        )
        self.panic = Counter(
            "odin_panic_requests",
            "Requests balanced over every endpoint because too few were healthy",
            ["service"],
            **kw,
        )
        self.rate_limited = Counter(
            "odin_rate_limited",
            "Requests refused with 429 by a rate limit",
            ["service", "scope"],
            **kw,
        )
        self.rate_limit_errors = Counter(
            "odin_rate_limit_storage_errors",
            "Rate-limit checks the storage could not answer (failOpen decides)",
            **kw,
        )
        self.health_checks = Counter(
            "odin_health_checks",
            "Active health-check probes by service and result",
            ["service", "result"],
            **kw,
        )
        self.tunnels_open = Gauge(
            "odin_tunnels_open",
            "Upgraded connections (WebSocket tunnels) open now",
            **kw,
            **sum_mode,
        )
        self.tunnels = Counter(
            "odin_tunnels",
            "Upgrade requests by outcome",
            ["service", "result"],
            **kw,
        )
        # -- tracing (issue 11) --
        self.spans_exported = Counter(
            "odin_tracing_spans_exported",
            "Spans the OTLP exporter delivered to the collector",
            **kw,
        )
        self.spans_dropped = Counter(
            "odin_tracing_spans_dropped",
            "Spans lost: the export queue was full, or the collector refused or was unreachable",
            ["reason"],
            **kw,
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
        if status != 101:  # a tunnel's lifetime is not a request's latency
            children[1].observe(seconds)
        if error_kind:
            self.upstream_errors.labels(svc, error_kind).inc()

    def totals(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """A metric's current values over every worker, by sorted label pairs (for admin
        answers such as the split's per-group counts; reads the sample files, so never
        on the request path)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_mp.MultiProcessCollector(registry)
        else:
            registry = self._registry
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for family in registry.collect():
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = tuple(sorted(sample.labels.items()))
                out[key] = out.get(key, 0.0) + sample.value
        return out

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
