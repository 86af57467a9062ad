"""Marshmallow schemas, one per config section; each builds its frozen model on load."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from urllib.parse import urlsplit

from marshmallow import (
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from . import model
from .fields import Duration, Section, Size, header_problem, is_token
from .tracing import TracingConfig, TracingSchema
from .traffic import (
    CircuitBreakerSchema,
    GatewayRateLimitConfig,
    GatewayRateLimitSchema,
    GroupConfig,
    GroupSchema,
    HealthCheckSchema,
    PanicThreshold,
    RateLimitSchema,
    RetryPolicyConfig,
    RetryPolicySchema,
    RuleSchema,
    SplitSchema,
)

LOAD_BALANCING = ("round-robin", "random", "weighted", "least-request")
MESH_TYPES = ("istio", "linkerd", "consul", "none")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CONNECT_MODES = ("native", "sidecar")
PILOT_TLS = ("auto", "true", "false")
ISTIO_DISCOVERY = ("xds", "kubernetes")
# RFC 1123 label: what Kubernetes allows as a namespace name.
NAMESPACE = validate.Regexp(
    r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z",
    error="must be a Kubernetes namespace name (lower-case letters, digits, '-'; at most 63)",
)


class TargetField(fields.Field):
    """A target URL string, or ``{url: ..., weight: N}``."""

    def _deserialize(self, value, attr, data, **kwargs) -> model.Target:
        weight = 1
        if isinstance(value, dict):
            unknown = set(value) - {"url", "weight"}
            if unknown:
                raise ValidationError(f"unknown field(s) {', '.join(sorted(unknown))}")
            weight = value.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ValidationError("weight must be a whole number >= 1")
            value = value.get("url")
        if not isinstance(value, str):
            raise ValidationError("must be a URL such as http://10.0.0.5:8080")
        return parse_target(value, weight)


class Network(fields.Field):
    """A CIDR (``10.0.0.0/8``) or a single address, parsed to an ip_network."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("must be a CIDR such as 10.0.0.0/8 or an address")
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as exc:
            raise ValidationError(f"not a CIDR or address: {value!r}") from exc


class Upstream(fields.Field):
    """``services[].upstream``: ``host:port`` of an explicit upstream listener of the
    gateway's own Consul sidecar. Loopback only (``127.0.0.0/8``, ``[::1]``, ``localhost``
    meaning 127.0.0.1, Consul's default ``local_bind_address``): the gateway sends plain
    HTTP there, which must never leave the host."""

    def _deserialize(self, value, attr, data, **kwargs) -> tuple[str, int]:
        return parse_upstream(value)


def parse_upstream(value: object) -> tuple[str, int]:
    """``(address, port)`` of a loopback ``host:port``; ``ValidationError`` otherwise."""
    example = "such as 127.0.0.1:21000 (the sidecar's explicit upstream listener)"
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"must be host:port {example}")
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValidationError(f"{value!r} must be host:port with a port 1-65535, {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValidationError(f"{value!r}: write an IPv6 address in brackets, as [::1]:21000")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValidationError(
            f"{value!r}: the host must be a loopback IP address (127.0.0.1, [::1]) or "
            "localhost, not a name"
        ) from None
    if not address.is_loopback:
        raise ValidationError(
            f"{value!r} is not a loopback address: the gateway sends plain HTTP to its "
            "sidecar, which must not leave the host (explicit upstreams listen on 127.0.0.1)"
        )
    return str(address), int(port_text)


def parse_group_target(value: object, where: str) -> model.Target:
    """A group's target: a URL or ``{url, weight}``, as a service's."""
    try:
        return TargetField().deserialize(value)
    except ValidationError as exc:
        raise ValidationError(f"{where}.targets: {exc.messages[0]}") from None


def parse_target(url: str, weight: int = 1) -> model.Target:
    """Parse and check one target URL; raises ``ValidationError`` saying what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"invalid URL {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"invalid URL {url!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValidationError(f"invalid URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValidationError(f"invalid URL {url!r}: a target is scheme://host[:port] only")
    if parts.username or parts.password:
        raise ValidationError(f"invalid URL {url!r}: credentials do not belong in a target")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return model.Target(url=url, scheme=parts.scheme, host=parts.hostname, port=port, weight=weight)


class ServerSchema(Section):
    host = fields.String(load_default="0.0.0.0")
    port = fields.Integer(load_default=8080, validate=validate.Range(1, 65535))
    timeout = Duration(load_default=30.0)
    read_timeout = Duration(data_key="readTimeout", load_default=60.0)
    write_timeout = Duration(data_key="writeTimeout", load_default=60.0)
    connect_timeout = Duration(data_key="connectTimeout", load_default=5.0)
    workers = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(1, 256))
    threads = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(1, 1024))
    worker_class = fields.String(
        data_key="workerClass",
        load_default="edge",
        validate=validate.OneOf(("edge", "gthread", "sync")),
    )
    graceful_timeout = Duration(data_key="gracefulTimeout", load_default=30.0)
    keepalive = Duration(load_default=5.0)
    trusted_proxies = fields.List(Network(), data_key="trustedProxies", load_default=list)
    header_timeout = Duration(data_key="headerTimeout", load_default=10.0)
    buffer_body = Size(data_key="bufferBody", load_default=64 * 1024)
    min_body_rate = fields.Integer(
        data_key="minBodyRate", load_default=240, validate=validate.Range(0, 1 << 30)
    )
    min_body_rate_grace = Duration(data_key="minBodyRateGrace", load_default=5.0, positive=False)
    max_tunnels = fields.Integer(
        data_key="maxTunnels", load_default=16, validate=validate.Range(0, 10000)
    )

    @post_load
    def build(self, data, **kwargs):
        data["trusted_proxies"] = tuple(data["trusted_proxies"])
        return model.ServerConfig(**data)


class LoggingSchema(Section):
    level = fields.String(
        load_default="info",
        validate=validate.OneOf(LOG_LEVELS),
    )
    json = fields.Boolean(load_default=False)
    access_log = fields.Boolean(data_key="accessLog", load_default=True)

    @post_load
    def build(self, data, **kwargs):
        return model.LoggingConfig(**data)


class MonitoringSchema(Section):
    enabled = fields.Boolean(load_default=False)
    path = fields.String(load_default="/metrics", validate=validate.Regexp(r"/[A-Za-z0-9_./-]*\Z"))

    @post_load
    def build(self, data, **kwargs):
        return model.MonitoringConfig(**data)


class AdminSchema(Section):
    token = fields.String(load_default=None, allow_none=True)

    @post_load
    def build(self, data, **kwargs):
        return model.AdminConfig(token=data["token"] or None)


class PassiveHealthSchema(Section):
    consecutive_failures = fields.Integer(
        data_key="consecutiveFailures", load_default=2, validate=validate.Range(1, 1000)
    )
    eject_for = Duration(data_key="ejectFor", load_default=5.0)
    max_eject_for = Duration(data_key="maxEjectFor", load_default=60.0)
    consecutive_5xx = fields.Integer(
        data_key="consecutive5xx", load_default=0, validate=validate.Range(0, 1000)
    )
    max_ejection_percent = fields.Float(
        data_key="maxEjectionPercent", load_default=50.0, validate=validate.Range(0, 100)
    )

    @post_load
    def build(self, data, **kwargs):
        return model.PassiveHealthConfig(**data)


# "$" would also accept a trailing newline; \Z does not (Regexp uses re.match).
SERVICE_NAME = validate.Regexp(
    r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z",
    error="must start with a letter or digit and hold only letters, digits, '_', '.', '-'",
)


class ServiceSchema(Section):
    name = fields.String(required=True, validate=SERVICE_NAME)
    base_path = fields.String(data_key="basePath", required=True)
    targets = fields.List(TargetField(), load_default=list)
    strip_base_path = fields.Boolean(data_key="stripBasePath", load_default=False)
    timeout = Duration(load_default=None, allow_none=True)
    connect_timeout = Duration(data_key="connectTimeout", load_default=None, allow_none=True)
    load_balancing = fields.String(
        data_key="loadBalancing",
        load_default="round-robin",
        validate=validate.OneOf(LOAD_BALANCING),
    )
    headers = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    retries = fields.Integer(load_default=1, validate=validate.Range(0, 10))
    preserve_host = fields.Boolean(data_key="preserveHost", load_default=False)
    # Goes into control-plane URLs and DNS names: the same rule as ``name``.
    mesh_service = fields.String(
        data_key="meshService", load_default=None, allow_none=True, validate=SERVICE_NAME
    )
    idle_timeout = Duration(data_key="idleTimeout", load_default=None, allow_none=True)
    ca_file = fields.String(data_key="caFile", load_default=None, allow_none=True)
    passive_health = fields.Nested(
        PassiveHealthSchema, data_key="passiveHealth", load_default=model.PassiveHealthConfig
    )
    # consul.connectMode sidecar only (checked in GatewaySchema.check_services).
    upstream = Upstream(load_default=None, allow_none=True)
    port = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(1, 65535))
    # Istio direct mode: the service account of the service's instances; Linkerd: the
    # proxy identity to require (l5d-require-id), or a service account name.
    identity = fields.String(load_default=None, allow_none=True, validate=SERVICE_NAME)
    # Linkerd / Kubernetes discovery: the service's namespace.
    namespace = fields.String(load_default=None, allow_none=True, validate=NAMESPACE)
    # Traffic management (odin_gw/config/traffic.py).
    try_timeout = Duration(data_key="tryTimeout", load_default=None, allow_none=True)
    retry_policy = fields.Nested(RetryPolicySchema, data_key="retryPolicy", load_default=None)
    groups = fields.Dict(
        keys=fields.String(validate=SERVICE_NAME),
        values=fields.Nested(GroupSchema),
        load_default=dict,
    )
    rules = fields.List(fields.Nested(RuleSchema), load_default=list)
    split = fields.Nested(SplitSchema, load_default=None)
    circuit_breaker = fields.Nested(
        CircuitBreakerSchema, data_key="circuitBreaker", load_default=None
    )
    panic_threshold = PanicThreshold(data_key="panicThreshold", load_default=0.0)
    health_check = fields.Nested(HealthCheckSchema, data_key="healthCheck", load_default=None)
    rate_limit = fields.Nested(RateLimitSchema, data_key="rateLimit", load_default=None)
    upgrades = fields.List(fields.String(), load_default=list)
    tunnel_idle_timeout = Duration(data_key="tunnelIdleTimeout", load_default=300.0)

    @validates_schema
    def check_traffic(self, data, **kwargs):
        groups = data.get("groups") or {}
        if "default" in groups:
            raise ValidationError(
                "'default' is the service's own targets: pick another name", "groups"
            )
        known = {"default", *groups}
        for i, rule in enumerate(data.get("rules") or ()):
            if rule.group is not None and rule.group not in known:
                raise ValidationError(
                    f"rules[{i}].group {rule.group!r} is not a group of this service "
                    f"(known: {', '.join(sorted(known))})",
                    "rules",
                )
        split = data.get("split")
        if split is not None:
            for name, _ in split.weights:
                if name not in known:
                    raise ValidationError(
                        f"split group {name!r} is not a group of this service "
                        f"(known: {', '.join(sorted(known))})",
                        "split",
                    )
            for value, name in split.override_values:
                if name not in known:
                    raise ValidationError(
                        f"override value {value!r} names {name!r}, not a group of this service",
                        "split",
                    )
        rules = data.get("rules")
        if rules:
            from ..traffic.rules import RuleError, RuleSet

            try:  # what the worker compiles, checked here so a bad rule never boots
                RuleSet.compile(tuple(replace(r, index=i) for i, r in enumerate(rules)))
            except RuleError as exc:
                raise ValidationError(str(exc), "rules") from None
        if split is not None:
            from ..traffic.split import Split, SplitError

            try:
                Split.compile(split, data.get("name") or "service")
            except SplitError as exc:
                raise ValidationError(str(exc), "split") from None
        for token in data.get("upgrades") or ():
            if not is_token(token) or token.lower() == "h2c":
                raise ValidationError(
                    f"{token!r}: an Upgrade protocol token such as websocket (h2c is not "
                    "tunnelled)",
                    "upgrades",
                )
        policy = data.get("retry_policy")
        tt, total = data.get("try_timeout"), data.get("timeout")
        if tt is not None and total is not None and tt > total:
            raise ValidationError("tryTimeout must not be longer than timeout", "tryTimeout")
        del policy

    @validates_schema
    def check(self, data, **kwargs):
        base = data.get("base_path")
        if base is not None:
            problems = _base_path_problems(base)
            if problems:
                raise ValidationError(problems, "basePath")
        for name, value in (data.get("headers") or {}).items():
            problem = header_problem(name, value)
            if problem is not None:
                raise ValidationError(problem, "headers")

    @post_load
    def build(self, data, **kwargs):
        data["base_path"] = _normalize_base(data["base_path"])
        data["targets"] = tuple(data["targets"])
        data["headers"] = tuple(data["headers"].items())
        data["groups"] = tuple(
            GroupConfig(
                name=name,
                mesh_service=g.get("mesh_service"),
                targets=tuple(parse_group_target(t, f"groups.{name}") for t in g["targets"]),
                load_balancing=g.get("load_balancing"),
            )
            for name, g in data["groups"].items()
        )
        data["rules"] = tuple(replace(r, index=i) for i, r in enumerate(data["rules"]))
        if data["retry_policy"] is None:
            data["retry_policy"] = RetryPolicyConfig()
        data["upgrades"] = frozenset(u.lower() for u in data["upgrades"])
        return model.ServiceConfig(**data)


class IstioSchema(Section):
    pilot_addr = fields.String(data_key="pilotAddr", load_default=None, allow_none=True)
    mixer_addr = fields.String(data_key="mixerAddr", load_default=None, allow_none=True)
    enable_telemetry = fields.Boolean(data_key="enableTelemetry", load_default=True)
    enable_policy_check = fields.Boolean(data_key="enablePolicyCheck", load_default=False)
    custom_headers = fields.List(
        fields.String(validate=validate.Regexp(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")),
        data_key="customHeaders",
        load_default=list,
    )
    inject_sidecar = fields.Boolean(data_key="injectSidecar", load_default=True)
    pilot_tls = fields.String(
        data_key="pilotTls", load_default="auto", validate=validate.OneOf(PILOT_TLS)
    )
    token_file = fields.String(
        data_key="tokenFile", load_default="/var/run/secrets/tokens/istio-token"
    )
    sampling_rate = fields.Float(
        data_key="samplingRate", load_default=1.0, validate=validate.Range(0.0, 1.0)
    )
    authz_addr = fields.String(data_key="authzAddr", load_default=None, allow_none=True)
    authz_timeout = Duration(data_key="authzTimeout", load_default=1.0)
    authz_fail_open = fields.Boolean(data_key="authzFailOpen", load_default=False)
    discovery = fields.String(load_default="xds", validate=validate.OneOf(ISTIO_DISCOVERY))

    @validates_schema
    def check(self, data, **kwargs):
        addr = data.get("authz_addr")
        if addr is not None:
            parts = urlsplit(addr)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValidationError(
                    f"{addr!r} must be http://host:port[/prefix] or https://host:port[/prefix]",
                    "authzAddr",
                )
            if parts.query or parts.fragment:
                raise ValidationError(f"{addr!r} may not have a query or fragment", "authzAddr")
        if data.get("enable_policy_check") and not addr:
            raise ValidationError(
                "enablePolicyCheck needs authzAddr: the ext_authz HTTP authorizer that "
                "replaced Mixer's policy check (an AuthorizationPolicy CUSTOM provider)",
                "enablePolicyCheck",
            )
        pilot = data.get("pilot_addr")
        if pilot and not pilot.startswith("unix://"):
            host, sep, port = pilot.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValidationError(
                    f"{pilot!r} must be host:port (istiod 15012 TLS, 15010 plaintext) or "
                    "unix:///path (a local istio-agent)",
                    "pilotAddr",
                )

    @post_load
    def build(self, data, **kwargs):
        data["custom_headers"] = tuple(data["custom_headers"])
        return model.IstioConfig(**data)


class LinkerdSchema(Section):
    control_plane_addr = fields.String(
        data_key="controlPlaneAddr", load_default=None, allow_none=True
    )
    tap_addr = fields.String(data_key="tapAddr", load_default=None, allow_none=True)
    enable_tap = fields.Boolean(data_key="enableTap", load_default=False)
    profile_namespace = fields.String(
        data_key="profileNamespace", load_default=None, allow_none=True, validate=NAMESPACE
    )
    legacy_headers = fields.Boolean(data_key="legacyHeaders", load_default=True)
    max_taps = fields.Integer(data_key="maxTaps", load_default=4, validate=validate.Range(1, 64))

    @post_load
    def build(self, data, **kwargs):
        return model.LinkerdConfig(**data)


class ConsulSchema(Section):
    http_addr = fields.String(data_key="httpAddr", load_default="http://127.0.0.1:8500")
    datacenter = fields.String(load_default=None, allow_none=True)
    datacenters = fields.List(fields.String(validate=validate.Length(min=1)), load_default=list)
    token = fields.String(load_default=None, allow_none=True)
    token_file = fields.String(data_key="tokenFile", load_default=None, allow_none=True)
    namespace = fields.String(load_default=None, allow_none=True)
    enable_connect = fields.Boolean(data_key="enableConnect", load_default=False)
    service_name = fields.String(data_key="serviceName", load_default="odin-gateway")
    forward_token = fields.Boolean(data_key="forwardToken", load_default=False)
    accept_warning = fields.Boolean(data_key="acceptWarning", load_default=False)
    timeout = Duration(load_default=10.0)
    blocking_wait = Duration(data_key="blockingWait", load_default=300.0)
    min_query_interval = Duration(data_key="minQueryInterval", load_default=0.5, positive=False)
    connect_mode = fields.String(
        data_key="connectMode", load_default="native", validate=validate.OneOf(CONNECT_MODES)
    )

    @validates_schema
    def check(self, data, **kwargs):
        addr = data.get("http_addr")
        if addr is not None:
            parts = urlsplit(addr)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValidationError(
                    f"{addr!r} must be http://host:port or https://host:port", "httpAddr"
                )
        wait = data.get("blocking_wait")
        if wait is not None and wait > 600:
            raise ValidationError("Consul caps blocking waits at 10m", "blockingWait")
        token_file = data.get("token_file")
        if token_file:
            if data.get("token"):
                raise ValidationError("set consul.token or consul.tokenFile, not both", "tokenFile")
            if data.get("forward_token"):
                raise ValidationError(
                    "forwardToken sends consul.token; it is not available with tokenFile",
                    "forwardToken",
                )
            if not os.access(token_file, os.R_OK) or not os.path.isfile(token_file):
                raise ValidationError(f"cannot read {token_file!r}", "tokenFile")
        dcs = data.get("datacenters") or []
        if len(set(dcs)) != len(dcs):
            raise ValidationError("a datacenter is listed twice", "datacenters")
        if dcs and data.get("datacenter") and data["datacenter"] != dcs[0]:
            raise ValidationError(
                "datacenter must be the first entry of datacenters (the local one)",
                "datacenter",
            )

    @post_load
    def build(self, data, **kwargs):
        data["datacenters"] = tuple(data["datacenters"])
        data["token"] = data["token"] or None
        data["token_file"] = data["token_file"] or None
        if data["datacenters"] and not data["datacenter"]:
            data["datacenter"] = data["datacenters"][0]
        return model.ConsulConfig(**data)


class MeshSchema(Section):
    enabled = fields.Boolean(load_default=False)
    type = fields.String(load_default="none", validate=validate.OneOf(MESH_TYPES))
    namespace = fields.String(load_default="default")
    refresh_interval = Duration(data_key="refreshInterval", load_default=30.0)
    trust_domain = fields.String(data_key="trustDomain", load_default=None, allow_none=True)
    mtls_enabled = fields.Boolean(data_key="mtlsEnabled", load_default=False)
    cert_file = fields.String(data_key="certFile", load_default=None, allow_none=True)
    key_file = fields.String(data_key="keyFile", load_default=None, allow_none=True)
    ca_file = fields.String(data_key="caFile", load_default=None, allow_none=True)
    state_dir = fields.String(data_key="stateDir", load_default=None, allow_none=True)
    ready_grace_period = Duration(data_key="readyGracePeriod", load_default=10.0, positive=False)
    kubeconfig = fields.String(load_default=None, allow_none=True)
    istio = fields.Nested(IstioSchema, load_default=model.IstioConfig)
    linkerd = fields.Nested(LinkerdSchema, load_default=model.LinkerdConfig)
    consul = fields.Nested(ConsulSchema, load_default=model.ConsulConfig)

    @validates_schema
    def check(self, data, **kwargs):
        istio = data.get("istio", model.IstioConfig())
        if data.get("type") == "istio" and istio.inject_sidecar and istio.discovery != "xds":
            raise ValidationError(
                "istio.discovery applies to injectSidecar: false (direct mode); with a "
                "sidecar, the sidecar discovers",
                "istio",
            )
        if data.get("enabled") and data.get("type") == "istio" and not istio.inject_sidecar:
            missing = [k for k, a in _TLS_FILES.items() if not data.get(a)]
            if missing:
                raise ValidationError(
                    f"istio.injectSidecar: false needs {', '.join(missing)}: the workload "
                    "certificate files the istio-agent writes (cert-chain.pem, key.pem, "
                    "root-cert.pem); endpoints with a sidecar are reached over mTLS",
                    "istio",
                )
        if not data.get("enabled") or not data.get("mtls_enabled"):
            return
        consul = data.get("consul")
        if data.get("type") == "consul" and consul is not None and consul.enable_connect:
            return  # Connect supplies the certificates
        if data.get("type") == "consul" and consul is not None and consul.sidecar:
            return  # the gateway's own sidecar does mTLS
        if data.get("type") == "istio" and data.get("istio", model.IstioConfig()).inject_sidecar:
            return  # the sidecar does mTLS
        if data.get("type") == "linkerd":
            return  # ingress mode: the Linkerd proxy does mTLS (files, if given, unused)
        missing = [k for k, a in _TLS_FILES.items() if not data.get(a)]
        if missing:
            raise ValidationError(
                f"mtlsEnabled needs {', '.join(missing)} (or consul.enableConnect)", "mtlsEnabled"
            )

    @post_load
    def build(self, data, **kwargs):
        return model.MeshConfig(**data)


_TLS_FILES = {"certFile": "cert_file", "keyFile": "key_file", "caFile": "ca_file"}


def _mesh_said(mesh: model.MeshConfig) -> str:
    """What the mesh section says, for "only used with ..." errors."""
    if mesh.kind == "consul":
        return f"connectMode is {mesh.consul.connect_mode}"
    if mesh.kind == "istio":
        return "injectSidecar is true (the sidecar checks identities)"
    return f"serviceMesh is {mesh.kind}"


class GatewaySchema(Section):
    server = fields.Nested(ServerSchema, load_default=model.ServerConfig)
    logging = fields.Nested(LoggingSchema, load_default=model.LoggingConfig)
    monitoring = fields.Nested(MonitoringSchema, load_default=model.MonitoringConfig)
    admin = fields.Nested(AdminSchema, load_default=model.AdminConfig)
    services = fields.List(fields.Nested(ServiceSchema), load_default=list)
    service_mesh = fields.Nested(MeshSchema, data_key="serviceMesh", load_default=model.MeshConfig)
    rate_limit = fields.Nested(
        GatewayRateLimitSchema, data_key="rateLimit", load_default=GatewayRateLimitConfig
    )
    tracing = fields.Nested(TracingSchema, load_default=TracingConfig)

    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def check_services(self, data, original, **kwargs):
        # Works on the raw entries, so an entry with a bad field still gets its name and
        # base path checked: every problem is reported in one go.
        given = original.get("services") if isinstance(original, dict) else None
        if not isinstance(given, list):
            return
        monitoring = data.get("monitoring")
        if not isinstance(monitoring, model.MonitoringConfig):
            monitoring = model.MonitoringConfig()
        mesh = data.get("service_mesh")
        # A serviceMesh section that failed to load has its own errors: no guesses here.
        mesh_known = isinstance(mesh, model.MeshConfig) or "serviceMesh" not in original
        if not isinstance(mesh, model.MeshConfig):
            mesh = model.MeshConfig()
        reserved = model.GatewayConfig(monitoring=monitoring).reserved_paths()
        errors: dict[int, dict[str, list[str]]] = {}
        shadowed: list[str] = []

        def add(i: int, key: str, message: str) -> None:
            errors.setdefault(i, {}).setdefault(key, []).append(message)

        names: dict[str, int] = {}
        bases: dict[str, int] = {}
        upstreams: dict[tuple[str, int], tuple[int, object]] = {}
        namespaces: dict[str, tuple[int, str]] = {}
        sidecar = mesh.kind == "consul" and mesh.consul.sidecar
        for i, entry in enumerate(given):
            if not isinstance(entry, dict):
                continue
            istio = mesh.kind == "istio"
            istio_direct = istio and not mesh.istio.inject_sidecar
            linkerd = mesh.kind == "linkerd"
            for key, allowed, where in (
                (
                    "upstream",
                    sidecar,
                    "serviceMesh.consul.connectMode: sidecar (the gateway's own Consul sidecar)",
                ),
                (
                    "port",
                    sidecar or istio or linkerd,
                    "serviceMesh.consul.connectMode: sidecar or "
                    "serviceMesh.type: istio or linkerd (the port of the mesh service)",
                ),
                (
                    "identity",
                    istio_direct or linkerd,
                    "serviceMesh.type: istio with injectSidecar: false "
                    "(the service account its instances present) or linkerd "
                    "(the identity the proxy must require)",
                ),
                (
                    "namespace",
                    linkerd or istio,
                    "serviceMesh.type: linkerd or istio (the Kubernetes namespace of the service)",
                ),
            ):
                if entry.get(key) is not None and not allowed and mesh_known:
                    add(i, key, f"only used with {where}; here " + _mesh_said(mesh))
            if sidecar and entry.get("upstream") is not None:
                try:
                    listener = parse_upstream(entry["upstream"])
                except ValidationError:
                    listener = None  # reported by the field itself
                target = entry.get("meshService") or entry.get("name")
                if listener is not None:
                    j, other = upstreams.setdefault(listener, (i, target))
                    if other != target:
                        add(
                            i,
                            "upstream",
                            f"the same listener as services[{j}].upstream, which leads to "
                            f"{other}: one explicit upstream leads to one Consul service",
                        )
            name = entry.get("name")
            if isinstance(name, str):
                if name in names:
                    add(i, "name", f"duplicate of services[{names[name]}]")
                names.setdefault(name, i)
            base = entry.get("basePath")
            if isinstance(base, str) and base.startswith("/"):
                base = _normalize_base(base)
                if base in bases:
                    add(i, "basePath", f"duplicate of services[{bases[base]}]")
                bases.setdefault(base, i)
                for path in reserved:
                    if base == path or base.startswith(path.rstrip("/") + "/"):
                        add(i, "basePath", f"{base} is under the reserved path {path}")
                metrics = monitoring.path
                if monitoring.enabled and (
                    base == "/" or metrics == base or metrics.startswith(base + "/")
                ):
                    # The gateway answers the metrics path itself: the service would
                    # silently lose it (Flask's rule wins over the catch-all).
                    shadowed.append(
                        f"{metrics} is under services[{i}].basePath {base}; move one of them"
                    )
            if mesh.kind in ("linkerd", "istio"):
                # Snapshots key services by mesh service name: one namespace per name.
                key = entry.get("meshService") or entry.get("name")
                ns = entry.get("namespace") or mesh.namespace
                if isinstance(key, str) and isinstance(ns, str):
                    j, other_ns = namespaces.setdefault(key, (i, ns))
                    if other_ns != ns:
                        add(
                            i,
                            "namespace",
                            f"services[{j}] names the mesh service {key} in namespace "
                            f"{other_ns}; one mesh service name can live in one namespace "
                            "here (give one of them another meshService)",
                        )
            if mesh.kind == "none" and not entry.get("targets"):
                add(i, "targets", "at least one target is needed when serviceMesh is off")
        problems: dict[str, object] = {}
        if errors:
            problems["services"] = errors
        if shadowed:
            problems["monitoring"] = {"path": shadowed}
        if problems:
            raise ValidationError(problems)


# RFC 9110 section 5.6.2 tchar; str.isalnum() would also accept non-ASCII letters.
def _base_path_problems(base: str) -> list[str]:
    if not base.startswith("/"):
        return ["must start with /"]
    segments = [s for s in base.split("/") if s]
    if any(s in (".", "..") for s in segments):
        return ["must not contain . or .. segments"]
    if "%2f" in base.lower():
        # Routing decodes the request path, so a %2F here could never match as written,
        # and backends disagree on whether an encoded slash separates segments.
        return ["must not contain %2F (an encoded slash): write the segments with /"]
    if any(c in base for c in "?#%* \t"):
        return ["must be a plain path (no ?, #, %, * or spaces)"]
    if "//" in base:
        return ["must not contain empty segments (//)"]
    return []


def _normalize_base(base: str) -> str:
    stripped = base.rstrip("/")
    return stripped or "/"
