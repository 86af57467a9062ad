"""The gateway's per-process state: routes, mesh view, upstream session, metrics."""

from __future__ import annotations

import logging
import os
from types import MappingProxyType

from .accesslog import AccessLog
from .config.model import GatewayConfig
from .ext_authz import ExtAuthz
from .mesh.cluster_names import cluster_services
from .mesh.headers import injectors_for
from .mesh.manager import MeshManager
from .mesh.snapshot import Endpoint, ServiceEndpoints, Snapshot
from .mesh.state import StateDirError, check_private_dir
from .mesh.tls import TlsMaterial
from .metrics import GatewayMetrics
from .proxy.forwarder import Forwarder
from .proxy.transport import UpstreamSession
from .retry_budget import DEFAULT_KEYS, BudgetStore
from .route_policy import ServicePolicy, config_policy
from .routing import Route, RouteTable
from .tap_hub import TapHub
from .tracer import Tracer
from .traffic.concurrency import ConcurrencyCap
from .traffic.events import TrafficEvents
from .traffic.rate_limit import RateLimits

log = logging.getLogger("odin_gw")

DEFAULT_THREADS = 64


class Gateway:
    """Everything a request needs, built once per process by the app factory.

    ``candidates(route)`` is the hot-path read: a dict lookup in a table swapped whole
    whenever the mesh snapshot changes; only the views of routes whose service changed
    (another ``ServiceEndpoints`` object) are rebuilt, so one instance flapping among
    1,000 services costs one route's work, not 1,000.
    """

    def __init__(self, config: GatewayConfig, manager: MeshManager | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.routes = RouteTable.from_config(config, TrafficEvents(self.metrics))
        self.injectors = injectors_for(config)
        # gunicorn.conf.py exports the thread count it chose (ODIN_THREADS beats config).
        threads = int(os.environ.get("ODIN_THREADS") or config.server.threads or DEFAULT_THREADS)
        self.session = UpstreamSession(pool_size=threads)
        self._views: MappingProxyType = MappingProxyType({})
        self._built_from: dict[str, ServiceEndpoints] = {}  # route -> service of its view
        self._route_keys: dict[str, set[str]] = {}  # route -> endpoint keys it may use
        self._retained_for: object = None  # the adapter the keys were last retained on
        # Mesh route policies (ServiceProfiles, Linkerd annotations), compiled when a
        # service's policy text changes; retry budgets count in the state dir, shared by
        # every worker (the dir is known only in the worker: read when first used).
        self.budgets = BudgetStore(
            self.shared_dir,
            keys=max(DEFAULT_KEYS, 1 << (2 * len(self.routes)).bit_length()),
        )
        # circuitBreaker.maxConcurrent, counted over the host's workers.
        caps = {r.name: r.max_concurrent for r in self.routes.entries if r.max_concurrent}
        self.concurrency = ConcurrencyCap(self.shared_dir, caps) if caps else None
        self._shared_dir_error: str | None = None
        self.policies: MappingProxyType = MappingProxyType({})  # route -> ServicePolicy
        # The gateway's own per-route policy (tryTimeout, retryPolicy), under the mesh's.
        self.config_policies = {
            r.name: config_policy(r.config, self.budgets) for r in self.routes if r.config
        }
        self.mesh = manager or MeshManager(config, self.metrics, self._on_snapshot)
        self._on_snapshot(self.mesh.snapshot, self.mesh.tls)
        self.forwarder = Forwarder(self)
        self.tap = TapHub.for_gateway(config, self.mesh)  # None unless linkerd.enableTap
        self.rate_limits = RateLimits.for_gateway(self)  # None unless a rateLimit is set
        # istio.enablePolicyCheck: the ext_authz check before each proxied request.
        self.ext_authz = ExtAuthz.from_config(config, self.forwarder.outbound, pool_size=threads)
        # tracing.enabled: the spans of sampled requests, exported over OTLP/HTTP.
        self.tracer = (
            Tracer(config.tracing, self.metrics, config.service_mesh.kind)
            if config.tracing.enabled
            else None
        )
        logs = config.logging
        self.access_log = (
            AccessLog(json_lines=logs.json)
            if logs.access_log and logs.level in ("debug", "info")
            else None
        )

    def shared_dir(self) -> str | None:
        """The gateway's private state dir, for counts every worker of the host shares
        (retry budgets, concurrency caps): created on first use, with or without a mesh;
        ``None`` (counts stay per worker) when it cannot be used, logged once."""
        path = self.config.service_mesh.state_dir or self.mesh.state.path
        try:
            check_private_dir(path)
        except StateDirError as exc:
            if self._shared_dir_error is None:
                self._shared_dir_error = str(exc)
                log.warning("shared counts stay per worker: %s", exc)
            return None
        return path

    def start(self) -> None:
        self.mesh.start()
        if self.tap is not None:
            self.tap.start()

    def stop(self) -> None:
        if self.tap is not None:
            self.tap.stop()
        self.mesh.stop()
        self.session.close()
        self.budgets.close()
        if self.concurrency is not None:
            self.concurrency.close()
        if self.rate_limits is not None:
            self.rate_limits.close()
        if self.ext_authz is not None:
            self.ext_authz.close()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracer is not None:
            self.tracer.close()

    # -- hot path ---------------------------------------------------------------------
    def candidates(self, route: Route) -> tuple[Endpoint, ...]:
        view = self._views.get(route.name)
        return view[1] if view is not None else ()

    def every_endpoint(self, route: Route) -> tuple[Endpoint, ...]:
        """All of a route's endpoints, healthy or not: the pool of panic mode."""
        view = self._views.get(route.name)
        return view[3] if view is not None else ()

    # -- snapshot changes -------------------------------------------------------------
    def _on_snapshot(self, snapshot: Snapshot, tls: TlsMaterial | None) -> None:
        if tls is not self.session.adapter.material:
            try:
                self.session.use_material(tls)
            except Exception as exc:  # keep the old adapter: never fail requests for this
                log.warning("new TLS material not used: %s", exc)
        views = dict(self._views)
        built = self._built_from
        keys_changed = False
        for route in self.routes:
            service = snapshot.services.get(route.mesh_service)
            if service is None:
                service = route.static
            if route.name in views and built.get(route.name) is service:
                continue  # the very object its view was built from: nothing to redo
            active, dc = service.active()
            every = service.endpoints
            route_keys = {e.key for e in service.endpoints}
            if route.sidecar is not None:  # consul connectMode sidecar: it picks and does mTLS
                active, dc = (route.sidecar,), None
                every = active
                route_keys.add(route.sidecar.key)
            elif route.proxy_balances:  # Linkerd ingress: discovered pods are only shown
                active, dc = route.static.active()
                every = active
                route_keys |= {e.key for e in active}
            views[route.name] = (service, active, dc, every)
            built[route.name] = service
            route.health.prune(route_keys)  # targets that left: forget their failures
            if route.breakers is not None:
                route.breakers.prune(route_keys)
            if route_keys != self._route_keys.get(route.name):
                self._route_keys[route.name] = route_keys
                keys_changed = True
        self._views = MappingProxyType(views)
        self._compile_policies(snapshot)
        adapter = self.session.adapter
        if keys_changed or adapter is not self._retained_for:
            adapter.retain(set().union(*self._route_keys.values()))
            self._retained_for = adapter

    def _compile_policies(self, snapshot: Snapshot) -> None:
        """Compile each route's mesh policy whose text changed (the same text is never
        compiled twice), lay it over the route's own config policy, and hand the set to
        the forwarder. Runs off the hot path."""
        old = {(name, p.text): p for name, p in self.policies.items()}
        compiled: dict[str, ServicePolicy] = {}
        refs = None
        bases = self.__dict__.get("config_policies") or {}
        for route in self.routes:
            service = snapshot.services.get(route.mesh_service)
            text = service.policy if service is not None else ""
            base = bases.get(route.name)
            if not text and base is None:
                continue
            policy = old.get((route.name, text))
            if policy is None:
                if not text:
                    policy = ServicePolicy(route.mesh_service, source="config", default=base)
                else:
                    if refs is None:
                        refs = cluster_services(self.config)
                    cs = refs.get(route.mesh_service)
                    ref = f"{cs.namespace}/{cs.name}" if cs is not None else None
                    mesh = ServicePolicy.compile(text, route.mesh_service, self.budgets, ref)
                    for problem in mesh.errors:
                        log.warning("service %s: mesh policy: %s", route.name, problem)
                    policy = mesh.with_base(base)
                old[(route.name, text)] = policy
            compiled[route.name] = policy
        if compiled.keys() == self.policies.keys() and all(
            compiled[n] is self.policies[n] for n in compiled
        ):
            return
        self.policies = MappingProxyType(compiled)
        forwarder = self.__dict__.get("forwarder")  # None while __init__ builds it
        if forwarder is not None:
            forwarder.use_policies(compiled)

    def policy(self, route: Route) -> ServicePolicy:
        """The route's compiled mesh policy (an empty one when its service has none)."""
        return self.policies.get(route.name) or ServicePolicy(route.mesh_service)

    def view(self, route: Route) -> tuple[ServiceEndpoints, tuple[Endpoint, ...], str | None]:
        """(all endpoints, the active ones, the datacenter serving) for admin answers."""
        view = self._views.get(route.name)
        return view[:3] if view is not None else (route.static, (), None)
