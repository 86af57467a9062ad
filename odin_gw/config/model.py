"""The loaded configuration as frozen values: built once at start-up, read on every request."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tracing import TracingConfig
from .traffic import (
    CircuitBreakerConfig,
    GatewayRateLimitConfig,
    GroupConfig,
    HealthCheckConfig,
    RateLimitConfig,
    RetryPolicyConfig,
    RuleConfig,
    SplitConfig,
)

SECRET_KEYS = frozenset({"token", "password", "secret", "authorization"})


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    timeout: float = 30.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    connect_timeout: float = 5.0
    workers: int | None = None
    threads: int | None = None
    worker_class: str = "edge"
    graceful_timeout: float = 30.0
    keepalive: float = 5.0
    # Peers whose X-Forwarded-*/Forwarded headers are believed (parsed networks).
    trusted_proxies: tuple = ()
    # Slow-client limits, enforced by the edge worker before a request gets a thread.
    header_timeout: float = 10.0
    buffer_body: int = 64 * 1024
    min_body_rate: int = 240
    min_body_rate_grace: float = 5.0
    #: Upgraded connections (WebSocket tunnels) open at once in one worker.
    max_tunnels: int = 16


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    json: bool = False
    access_log: bool = True


@dataclass(frozen=True)
class MonitoringConfig:
    enabled: bool = False
    path: str = "/metrics"


@dataclass(frozen=True)
class AdminConfig:
    token: str | None = None


@dataclass(frozen=True)
class Target:
    """A static target: an absolute ``http``/``https`` URL with an optional weight."""

    url: str
    scheme: str
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class PassiveHealthConfig:
    consecutive_failures: int = 2
    eject_for: float = 5.0
    max_eject_for: float = 60.0
    #: 502/503/504 answers in a row that eject an endpoint (0: answers never eject).
    consecutive_5xx: int = 0
    #: Never more than this share of a service's endpoints ejected at once (one always may).
    max_ejection_percent: float = 50.0


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    base_path: str
    targets: tuple[Target, ...] = ()
    strip_base_path: bool = False
    timeout: float | None = None
    connect_timeout: float | None = None
    load_balancing: str = "round-robin"
    headers: tuple[tuple[str, str], ...] = ()
    retries: int = 1
    preserve_host: bool = False
    mesh_service: str | None = None
    idle_timeout: float | None = None
    ca_file: str | None = None
    passive_health: PassiveHealthConfig = field(default_factory=PassiveHealthConfig)
    #: Istio direct mode: the service account its instances must present
    #: (``spiffe://<trustDomain>/ns/<ns>/sa/<identity>``) when EDS does not say.
    identity: str | None = None
    # consul.connectMode sidecar: the explicit upstream listener of the gateway's own
    # sidecar ("127.0.0.1", port), or None for transparent proxy to
    # <meshService>.virtual.consul:<port> (``port``: None means the first target's, or 80).
    upstream: tuple[str, int] | None = None
    port: int | None = None
    #: Linkerd / Kubernetes discovery: the service's namespace (default
    #: ``serviceMesh.namespace``).
    namespace: str | None = None
    # -- traffic management (odin_gw/config/traffic.py) --
    #: Bound on each attempt (the route's ``timeout`` bounds them all).
    try_timeout: float | None = None
    retry_policy: RetryPolicyConfig = field(default_factory=RetryPolicyConfig)
    groups: tuple[GroupConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    split: SplitConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    #: Percent of healthy endpoints below which all are used (0: only when none is
    #: healthy; ``None``: never).
    panic_threshold: float | None = 0.0
    health_check: HealthCheckConfig | None = None
    rate_limit: RateLimitConfig | None = None
    #: ``Upgrade`` tokens (lower case) proxied as tunnels, e.g. ``websocket``.
    upgrades: frozenset[str] = frozenset()
    tunnel_idle_timeout: float = 300.0
    #: For a backend group's derived service: ``(service, group)``; else ``None``.
    group_of: tuple[str, str] | None = None


@dataclass(frozen=True)
class IstioConfig:
    pilot_addr: str | None = None
    mixer_addr: str | None = None
    enable_telemetry: bool = True
    enable_policy_check: bool = False
    custom_headers: tuple[str, ...] = ()
    inject_sidecar: bool = True
    #: ``auto``: TLS to istiod unless port 15010 or a unix socket; ``true``/``false`` force it.
    pilot_tls: str = "auto"
    #: The projected service-account token (audience istio-ca) sent to istiod on 15012.
    token_file: str = "/var/run/secrets/tokens/istio-token"
    #: Share of new traces marked ``x-b3-sampled: 1`` when the client decided nothing.
    sampling_rate: float = 1.0
    #: ext_authz HTTP authorizer (enablePolicyCheck): ``http(s)://host:port[/prefix]``.
    authz_addr: str | None = None
    authz_timeout: float = 1.0
    authz_fail_open: bool = False
    #: Direct mode: endpoints from istiod over ADS (``xds``) or from Kubernetes
    #: EndpointSlices (``kubernetes``).
    discovery: str = "xds"


@dataclass(frozen=True)
class LinkerdConfig:
    control_plane_addr: str | None = None
    tap_addr: str | None = None
    enable_tap: bool = False
    #: Where ServiceProfiles live (``None``: the service's own namespace, as Linkerd).
    profile_namespace: str | None = None
    #: Send the Linkerd 1 context headers (l5d-reqid, l5d-ctx-deadline, l5d-ctx-trace).
    legacy_headers: bool = True
    #: Live taps (``/admin/tap`` streams) open at once, over all workers.
    max_taps: int = 4


@dataclass(frozen=True)
class ConsulConfig:
    http_addr: str = "http://127.0.0.1:8500"
    datacenter: str | None = None
    datacenters: tuple[str, ...] = ()
    token: str | None = None
    token_file: str | None = None
    namespace: str | None = None
    enable_connect: bool = False
    service_name: str = "odin-gateway"
    forward_token: bool = False
    accept_warning: bool = False
    timeout: float = 10.0
    blocking_wait: float = 300.0
    min_query_interval: float = 0.5
    #: ``native``: the gateway does Connect mTLS itself (leaf + roots from the agent);
    #: ``sidecar``: its own Consul dataplane/Envoy sidecar does (plain HTTP to it).
    connect_mode: str = "native"

    @property
    def sidecar(self) -> bool:
        """Whether the gateway's own sidecar does mTLS and balancing (connectMode sidecar)."""
        return self.connect_mode == "sidecar"

    @property
    def all_datacenters(self) -> tuple[str | None, ...]:
        """The datacenters to ask, local first (``None`` = the agent's own)."""
        if self.datacenters:
            return self.datacenters
        return (self.datacenter,)


@dataclass(frozen=True)
class MeshConfig:
    enabled: bool = False
    type: str = "none"
    namespace: str = "default"
    refresh_interval: float = 30.0
    trust_domain: str | None = None
    mtls_enabled: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    state_dir: str | None = None
    ready_grace_period: float = 10.0
    #: A kubeconfig file for the Kubernetes API outside a cluster (else ``KUBECONFIG``).
    kubeconfig: str | None = None
    istio: IstioConfig = field(default_factory=IstioConfig)
    linkerd: LinkerdConfig = field(default_factory=LinkerdConfig)
    consul: ConsulConfig = field(default_factory=ConsulConfig)

    @property
    def kind(self) -> str:
        """The mesh in effect: ``none`` unless enabled with a type."""
        return self.type if self.enabled else "none"

    @property
    def istio_direct(self) -> bool:
        """Istio with ``injectSidecar: false``: the gateway itself is the mesh client."""
        return self.kind == "istio" and not self.istio.inject_sidecar

    @property
    def uses_kubernetes(self) -> bool:
        """Whether discovery reads the Kubernetes API (Linkerd; Istio with
        ``istio.discovery: kubernetes`` in direct mode)."""
        if self.kind == "linkerd":
            return True
        return self.istio_direct and self.istio.discovery == "kubernetes"

    @property
    def uses_cert_files(self) -> bool:
        """Whether the workload certificate files are loaded: with ``mtlsEnabled``, and in
        Istio direct mode always (automatic mTLS needs them for endpoints with sidecars)."""
        files = bool(self.cert_file and self.key_file and self.ca_file)
        return (
            files
            and self.enabled
            and (self.mtls_enabled or self.istio_direct)
            and not (self.sidecar_does_mtls)
        )

    @property
    def sidecar_does_mtls(self) -> bool:
        """Whether the gateway's own sidecar originates mTLS (Istio ``injectSidecar``,
        Consul ``connectMode: sidecar``): certificate files, if given, are not used."""
        if self.kind == "istio":
            return self.istio.inject_sidecar
        if self.kind == "linkerd":
            return True  # ingress mode: the Linkerd proxy originates mTLS
        return self.kind == "consul" and self.consul.sidecar


@dataclass(frozen=True)
class GatewayConfig:
    """The whole configuration. ``raw`` is the expanded YAML tree (secrets included)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    services: tuple[ServiceConfig, ...] = ()
    service_mesh: MeshConfig = field(default_factory=MeshConfig)
    rate_limit: GatewayRateLimitConfig = field(default_factory=GatewayRateLimitConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    #: Every service traffic can reach: ``services`` then each backend group as a
    #: derived service named ``<service>/<group>`` (discovered and balanced like one).
    backends: tuple[ServiceConfig, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    notices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.backends:
            object.__setattr__(self, "backends", self.services + group_services(self.services))

    @property
    def discovered(self) -> tuple[ServiceConfig, ...]:
        """The services whose instances the mesh is asked for: every backend but the
        backend groups given as static targets."""
        return tuple(b for b in self.backends if b.group_of is None or not b.targets)

    def reserved_paths(self) -> tuple[str, ...]:
        """Paths the gateway answers itself; no service may live under them."""
        paths = ["/admin", "/health", "/ready", "/live"]
        paths.append(self.monitoring.path)
        return tuple(dict.fromkeys(paths))

    def redacted(self) -> dict:
        """The raw tree with every secret value replaced by ``"<redacted>"`` (every
        ``tracing.headers`` value too: collector credentials go by many names)."""
        tree = _redact(self.raw)
        tracing = tree.get("tracing") if isinstance(tree, dict) else None
        if isinstance(tracing, dict) and isinstance(tracing.get("headers"), dict):
            tracing["headers"] = {name: "<redacted>" for name in tracing["headers"]}
        return tree


def group_services(services: tuple[ServiceConfig, ...]) -> tuple[ServiceConfig, ...]:
    """A derived service per backend group: the parent's settings with the group's
    targets or mesh service (and its load balancing when it gives one)."""
    from dataclasses import replace

    out = []
    for svc in services:
        for group in svc.groups:
            out.append(
                replace(
                    svc,
                    name=f"{svc.name}/{group.name}",
                    targets=group.targets,
                    # A static group is never looked up in the mesh.
                    mesh_service=group.mesh_service or f"{svc.name}/{group.name}",
                    load_balancing=group.load_balancing or svc.load_balancing,
                    # Targets say their own port; a mesh group keeps the service's.
                    port=None if group.targets else svc.port,
                    groups=(),
                    rules=(),
                    split=None,
                    rate_limit=None,
                    health_check=svc.health_check,
                    group_of=(svc.name, group.name),
                )
            )
    return tuple(out)


def redact_url(url: str) -> str:
    """``url`` with its user-info (``redis://:password@host``) replaced by ``<redacted>``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    return f"{scheme}://<redacted>@{rest.split('@', 1)[1]}"


def _redact(tree: object) -> object:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            if str(key).lower() in SECRET_KEYS and value not in (None, ""):
                out[key] = "<redacted>"
            elif str(key) == "storage" and isinstance(value, str) and "@" in value:
                out[key] = redact_url(value)
            elif str(key) == "headers" and isinstance(value, dict):
                out[key] = {
                    h: ("<redacted>" if h.lower() in SECRET_KEYS else v) for h, v in value.items()
                }
            else:
                out[key] = _redact(value)
        return out
    if isinstance(tree, list):
        return [_redact(v) for v in tree]
    return tree
