"""Longest-prefix routing on whole path segments, outside Flask's URL map.

A ``RouteTable`` is immutable: a config change builds a new one and the gateway swaps the
reference, so requests never see a half-built table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from urllib3.util import Timeout

from .balancer import Balancer, make_balancer
from .config.model import GatewayConfig, ServiceConfig
from .mesh.snapshot import Endpoint, ServiceEndpoints
from .passive_health import PassiveHealth
from .proxy.retry import RetryPolicy
from .traffic.breaker import CircuitBreakers
from .traffic.events import TrafficEvents


@dataclass(frozen=True, eq=False)
class Route:
    """A service reachable under ``base_path``, with its forwarding policy.

    ``timeout.read_timeout`` (the service's ``timeout``) is a deadline for the upstream's
    answer head, shared by every attempt of a request; ``idle_timeout`` (``idleTimeout``,
    default: the same) bounds each silence while a body streams either way.

    ``sidecar`` (``consul.connectMode: sidecar``) is where every request of the route
    goes, in plain HTTP: an explicit upstream listener of the gateway's own Consul
    sidecar, or ``<meshService>.virtual.consul`` through its transparent proxy. The sidecar
    does mTLS and load balancing; discovered instances are only shown.

    ``proxy_balances`` (Linkerd ingress mode): the gateway's own Linkerd proxy picks the
    pod (by ``l5d-dst-override``) and does mTLS. Requests go to ``sidecar`` (the
    service's cluster name) or, when the service gives ``targets``, to those; discovered
    instances are only shown, never picked (the proxy's per-route features need it to
    choose).
    """

    name: str
    base_path: str
    strip_base_path: bool
    timeout: Timeout
    retries: int
    preserve_host: bool
    headers: tuple[tuple[str, str], ...]
    mesh_service: str
    static: ServiceEndpoints
    balancer: Balancer
    health: PassiveHealth
    base_depth: int = field(default=0)
    idle_timeout: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sidecar: Endpoint | None = None
    proxy_balances: bool = False
    #: The service's configuration, as loaded (traffic-management settings live there).
    config: ServiceConfig | None = field(default=None, repr=False)
    #: Backend groups by name (``groups:``), each a route of its own; "default" is this.
    groups: dict[str, Route] = field(default_factory=dict, repr=False)
    #: For a backend group's route: its group name ("default" for a service's own).
    group: str = "default"
    #: The service a group's route belongs to (its own name for a service's route).
    service: str = ""
    #: Request bodies up to this size are buffered, so that a retry can send them again.
    buffer_body: int = 64 * 1024
    #: Per-endpoint circuit breakers (``circuitBreaker``), ``None`` when not configured.
    breakers: CircuitBreakers | None = field(default=None, repr=False)
    #: ``panicThreshold`` percent (0: only when none is healthy; ``None``: never).
    panic_threshold: float | None = 0.0
    #: ``circuitBreaker.maxConcurrent`` of the service (all its groups together).
    max_concurrent: int | None = None

    def available(self, key: str) -> bool:
        """This worker's verdict on an endpoint: not ejected, circuit not open."""
        return self.health.available(key) and (
            self.breakers is None or self.breakers.available(key)
        )

    def backend(self, group: str | None) -> Route:
        """The route of backend ``group`` (``None`` or ``"default"``: this one)."""
        if group is None or group == "default":
            return self
        return self.groups[group]

    @classmethod
    def from_config(
        cls,
        svc: ServiceConfig,
        gateway: GatewayConfig,
        groups: dict[str, Route] | None = None,
        events: TrafficEvents | None = None,
    ) -> Route:
        read = svc.timeout or gateway.server.timeout
        connect = min(svc.connect_timeout or gateway.server.connect_timeout, read)
        static = ServiceEndpoints(
            name=svc.name,
            source="static",
            endpoints=tuple(
                Endpoint(
                    address=t.host,
                    port=t.port,
                    scheme=t.scheme,
                    weight=t.weight,
                    host_header=_authority(t.url),
                    static=True,
                    ca_file=svc.ca_file,
                )
                for t in svc.targets
            ),
        )
        return cls(
            name=svc.name,
            base_path=svc.base_path,
            strip_base_path=svc.strip_base_path,
            timeout=Timeout(connect=connect, read=read),
            retries=svc.retries,
            preserve_host=svc.preserve_host,
            headers=svc.headers,
            mesh_service=svc.mesh_service or svc.name,
            static=static,
            balancer=make_balancer(svc.load_balancing),
            health=PassiveHealth(
                svc.passive_health, on_eject=events.ejected(svc.name) if events else None
            ),
            base_depth=0 if svc.base_path == "/" else svc.base_path.count("/"),
            idle_timeout=svc.idle_timeout or read,
            retry=RetryPolicy.from_config(svc),
            sidecar=sidecar_endpoint(svc, gateway),
            proxy_balances=gateway.service_mesh.kind == "linkerd",
            config=svc,
            groups=groups or {},
            group=svc.group_of[1] if svc.group_of else "default",
            service=svc.group_of[0] if svc.group_of else svc.name,
            buffer_body=max(svc.retry_policy.buffer_body, 0),
            breakers=_breakers(svc, events),
            panic_threshold=svc.panic_threshold,
            max_concurrent=cb.max_concurrent if (cb := svc.circuit_breaker) else None,
        )

    def upstream_path(self, raw_path: str) -> str:
        """The path to send upstream for the client's raw (still percent-encoded) path.

        With ``stripBasePath`` the base path's segments are removed by count, so an encoded
        spelling of the prefix is stripped as well as the plain one.
        """
        if not self.strip_base_path or self.base_depth == 0:
            return raw_path
        cut = 0
        for _ in range(self.base_depth):
            cut = raw_path.find("/", cut + 1)
            if cut < 0:
                return "/"
        return raw_path[cut:]


def _breakers(svc: ServiceConfig, events: TrafficEvents | None) -> CircuitBreakers | None:
    cb = svc.circuit_breaker
    if cb is None or (cb.consecutive_failures <= 0 and cb.failure_rate is None):
        return None  # no trigger configured (maxConcurrent alone): nothing to track
    on_change = events.circuit(svc.name) if events else None
    return CircuitBreakers(cb, on_change=on_change, service=svc.name)


def sidecar_endpoint(svc: ServiceConfig, gateway: GatewayConfig) -> Endpoint | None:
    """The gateway's own sidecar as the one endpoint of ``svc`` (``connectMode: sidecar``),
    else ``None``.

    With ``upstream`` it is that explicit upstream listener (``127.0.0.1:<port>``).
    Without, the transparent proxy's virtual name of the Consul service,
    ``<meshService>.virtual[.<namespace>.ns].consul`` (Consul DNS), on ``port``, else the
    port of the first static target, else 80. Plain HTTP either way: the sidecar
    originates the mTLS.
    """
    mesh = gateway.service_mesh
    if (mesh.kind == "istio" and mesh.istio.inject_sidecar) or mesh.kind == "linkerd":
        return cluster_name_endpoint(svc, gateway)
    if mesh.kind != "consul" or not mesh.consul.sidecar:
        return None
    if svc.upstream is not None:
        address, port = svc.upstream
        return Endpoint(address=address, port=port, scheme="http")
    service = svc.mesh_service or svc.name
    ns = mesh.consul.namespace
    name = f"{service}.virtual.{ns}.ns.consul" if ns else f"{service}.virtual.consul"
    port = svc.port or (svc.targets[0].port if svc.targets else 80)
    return Endpoint(address=name, port=port, scheme="http")


def cluster_name_endpoint(svc: ServiceConfig, gateway: GatewayConfig) -> Endpoint | None:
    """``istio.injectSidecar: true`` or Linkerd ingress mode: the service's Kubernetes
    name, which the gateway's own Istio sidecar or Linkerd proxy intercepts, balances and
    secures (``None`` when the service gives ``targets``: they are used as written, and
    the proxy intercepts those as well).

    ``<meshService>.<namespace>.svc.cluster.local:<port>`` (namespace
    ``services[].namespace`` else ``serviceMesh.namespace``, port ``services[].port``
    else 80), plain HTTP, with that
    authority as ``Host``: the sidecar picks the route by it.
    """
    if svc.targets:
        return None
    from .mesh.cluster_names import cluster_service

    cs = cluster_service(svc, gateway)
    return Endpoint(address=cs.host, port=cs.port, scheme="http")


def _authority(url: str) -> str:
    rest = url.split("://", 1)[1]
    return rest.split("/", 1)[0]


class RouteTable:
    """Maps request paths to routes by the longest matching base path.

    ``entries`` are the services' routes (what paths match); iterating the table gives
    every route traffic can take, backend groups included (``<service>/<group>``).
    """

    def __init__(self, routes: list[Route]) -> None:
        self.entries: tuple[Route, ...] = tuple(routes)
        every: list[Route] = []
        for r in routes:
            every.append(r)
            every.extend(r.groups.values())
        self.routes: tuple[Route, ...] = tuple(every)
        self._by_base = {r.base_path: r for r in routes}
        self._root = self._by_base.get("/")
        self._max_depth = max((r.base_depth for r in routes), default=0)

    @classmethod
    def from_config(cls, config: GatewayConfig, events: TrafficEvents | None = None) -> RouteTable:
        """The table of ``config``; ``events`` (the gateway's metrics listeners) is told
        of circuit and ejection changes."""
        groups: dict[str, dict[str, Route]] = {}
        for backend in config.backends:
            if backend.group_of is not None:
                service, group = backend.group_of
                groups.setdefault(service, {})[group] = Route.from_config(
                    backend, config, events=events
                )
        return cls(
            [Route.from_config(s, config, groups.get(s.name), events) for s in config.services]
        )

    def match(self, path: str) -> Route | None:
        """The route for ``path`` (decoded, starting with ``/``), or ``None``.

        ``/api/users`` matches ``/api/users`` and ``/api/users/42``, never ``/api/usersX``.
        """
        by_base = self._by_base
        candidate = path
        # Only prefixes as deep as the deepest base path can match: cut there first.
        if candidate.count("/") > self._max_depth:
            cut = 0
            for _ in range(self._max_depth):
                cut = candidate.find("/", cut + 1) if cut >= 0 else -1
            if cut > 0:
                candidate = candidate[:cut]
        while candidate:
            route = by_base.get(candidate)
            if route is not None:
                return route
            if candidate.endswith("/"):
                candidate = candidate[:-1]
                continue
            candidate = candidate[: candidate.rfind("/")]
        return self._root

    def __iter__(self):
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)
