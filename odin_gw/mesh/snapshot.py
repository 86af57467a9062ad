"""Immutable views of what discovery found: ``Endpoint``, ``ServiceEndpoints``, ``Snapshot``.

A ``Snapshot`` is replaced as a whole, never changed in place, so request threads read it
without locks. It round-trips through JSON: the leader writes it to the state directory
and every worker (and the next start, as a warm cache) reads it back.

The JSON form is versioned (``format``) and stamped with what it was discovered for:
``origin`` (mesh type, control-plane address, datacenters, namespace and the options that
change answers) and ``fingerprint`` (``origin`` plus the service list); see
:func:`fingerprints`. ``from_json`` checks every type and raises ``ValueError`` for any
document that is not a snapshot of this format, so a wrong file is ignored, never fatal.

**Active health checks** (:mod:`odin_gw.mesh.health_checks`) are folded in by the leader:
an endpoint of a checked service carries its :class:`EndpointCheck` and ``healthy`` is
"the mesh says healthy and the check is not failing" (``mesh_healthy`` keeps the mesh's
own verdict), so workers route on ``healthy`` alone and need no other change.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

#: Version of the JSON form; a file of another format is ignored.
SNAPSHOT_FORMAT = 2


def fingerprints(config) -> tuple[str, str]:
    """``(origin, fingerprint)`` of a ``GatewayConfig``'s discovery.

    ``origin`` covers where answers come from and how they are judged; ``fingerprint``
    adds the list of discovered services. A snapshot with the same origin holds valid
    answers for the services both lists share.
    """
    mesh = config.service_mesh
    consul = mesh.consul
    origin: list[Any] = [mesh.kind, mesh.namespace]
    if mesh.kind == "consul":
        origin += [
            consul.http_addr.rstrip("/"),
            list(consul.all_datacenters),
            consul.namespace,
            consul.enable_connect,
            consul.service_name,
            consul.accept_warning,
            consul.connect_mode,
        ]
    if mesh.kind == "linkerd":
        origin += [mesh.kubeconfig, mesh.linkerd.profile_namespace]
    elif mesh.kind == "istio":
        origin += [mesh.istio.discovery, mesh.istio.pilot_addr, mesh.kubeconfig]
    # A service's namespace changes what is found for its name.
    services = sorted(
        {
            f"{s.namespace}/{s.mesh_service or s.name}" if s.namespace else s.mesh_service or s.name
            for s in config.discovered
        }
    )
    o = hashlib.sha256(json.dumps(origin).encode()).hexdigest()[:16]
    checked = _checks_fingerprint(config)
    # Only a config with health checks hashes them: other fingerprints stay as they were.
    facts: list[Any] = [o, services, checked] if checked else [o, services]
    f = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
    return o, f


def _checks_fingerprint(config) -> list[Any]:
    """What of the health-checked backends changes a snapshot: their names, static
    targets (published as ``source: static``) and check settings."""
    out = []
    for b in getattr(config, "backends", ()):
        hc = b.health_check
        if hc is None:
            continue
        out.append(
            [
                b.name,
                b.mesh_service or b.name,
                [t.url for t in b.targets],
                b.ca_file,
                hc.path,
                hc.interval,
                hc.timeout,
                hc.healthy_threshold,
                hc.unhealthy_threshold,
                sorted(hc.expected_status),
            ]
        )
    return out


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _opt_str(value: Any, what: str) -> Any:
    _check(value is None or isinstance(value, str), f"{what} must be a string")
    return value


#: Verdicts of an active health check (see :mod:`odin_gw.mesh.health_checks`).
CHECK_UNKNOWN, CHECK_PASSING, CHECK_FAILING = "unknown", "passing", "failing"
CHECK_STATUSES = (CHECK_UNKNOWN, CHECK_PASSING, CHECK_FAILING)


@dataclass(frozen=True, slots=True)
class EndpointCheck:
    """The active health check's verdict on one endpoint, as the leader last published it.

    ``status`` is ``unknown`` (not decided yet: routable), ``passing`` or ``failing``;
    ``since`` the Unix time of the verdict; ``reason`` what the probe that decided it
    saw (``None`` for a pass); ``last_status`` that probe's HTTP status (``None``: no
    answer). A verdict changes only at a threshold, so these change only with it.
    """

    status: str = CHECK_UNKNOWN
    since: float = 0.0
    reason: str | None = None
    last_status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "since": self.since,
            "reason": self.reason,
            "lastStatus": self.last_status,
        }

    @classmethod
    def from_dict(cls, data: Any) -> EndpointCheck:
        _check(isinstance(data, dict), "endpoint check must be an object")
        _check(data.get("status") in CHECK_STATUSES, "endpoint check status")
        since = data.get("since") or 0
        _check(isinstance(since, int | float), "endpoint check since must be a number")
        _opt_str(data.get("reason"), "endpoint check reason")
        last = data.get("lastStatus")
        _check(last is None or isinstance(last, int), "endpoint check lastStatus")
        return cls(str(data["status"]), float(since), data.get("reason"), last)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service that may receive requests.

    ``identity`` is the SPIFFE ID the instance must present when reached over mesh mTLS
    (``None``: plain HTTP, or TLS checked against the CA only); ``identities`` lists
    alternatives, any one of which will do (Istio: the SAN matchers of the cluster's
    transport socket, one per service account of the service). ``sni`` is the TLS server
    name to send (Istio: ``outbound_.<port>_._.<host>``), ``locality`` where the instance
    runs (``region/zone/subzone``). ``host_header`` is what the
    ``Host`` header should say when the route does not preserve the client's.

    ``static`` marks a target from the config (never from discovery): over ``https`` it
    is verified like any public server, against the system CAs or ``ca_file``, with its
    hostname checked, and never gets the mesh client certificate. Both are in the JSON
    form only for a static target (the leader publishes health-checked static targets).

    ``check`` is the active health check's verdict (``None``: the service is not
    checked). With one, ``healthy`` is the mesh's verdict (``mesh_healthy``) and "not
    failing", whatever was passed: the two can never disagree.
    ``pool_key`` says which connections may serve it (scheme, address, port, identity,
    and the CA of a static TLS target).
    """

    address: str
    port: int
    scheme: str = "http"
    healthy: bool = True
    weight: int = 1
    datacenter: str | None = None
    identity: str | None = None
    host_header: str = ""
    node: str | None = None
    service_id: str | None = None
    status: str = "passing"
    static: bool = False
    ca_file: str | None = None
    identities: tuple[str, ...] = ()
    sni: str | None = None
    locality: str | None = None
    check: EndpointCheck | None = None
    mesh_healthy: bool | None = None
    key: str = field(default="", compare=False)
    pool_key: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.check is not None:
            mesh = self.healthy if self.mesh_healthy is None else self.mesh_healthy
            object.__setattr__(self, "mesh_healthy", mesh)
            object.__setattr__(self, "healthy", mesh and self.check.status != CHECK_FAILING)
        elif self.mesh_healthy is not None:
            object.__setattr__(self, "healthy", self.mesh_healthy)
            object.__setattr__(self, "mesh_healthy", None)
        if not self.key:
            ident = f"#{self.identity}" if self.identity else ""
            if self.identities:
                ident += "#" + "|".join(self.identities)
            if self.sni:
                ident += f"@{self.sni}"
            object.__setattr__(self, "key", f"{self.scheme}://{self.address}:{self.port}{ident}")
        if not self.pool_key:
            pool_key = self.key
            if self.static and self.scheme == "https":
                pool_key = f"{pool_key}|static|{self.ca_file or ''}"
            object.__setattr__(self, "pool_key", pool_key)
        if not self.host_header:
            host = f"[{self.address}]" if ":" in self.address else self.address
            default = 443 if self.scheme == "https" else 80
            object.__setattr__(
                self, "host_header", host if self.port == default else f"{host}:{self.port}"
            )

    def with_check(self, check: EndpointCheck | None) -> Endpoint:
        """This endpoint with ``check`` folded in (``None``: none), itself if unchanged."""
        if check == self.check:
            return self
        mesh = self.healthy if self.mesh_healthy is None else self.mesh_healthy
        return replace(self, healthy=mesh, mesh_healthy=None, check=check)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (used by the state file and the admin API)."""
        return {
            "address": self.address,
            "port": self.port,
            "scheme": self.scheme,
            "healthy": self.healthy,
            "status": self.status,
            "weight": self.weight,
            "datacenter": self.datacenter,
            "identity": self.identity,
            "hostHeader": self.host_header,
            "node": self.node,
            "serviceId": self.service_id,
            **({"identities": list(self.identities)} if self.identities else {}),
            **({"sni": self.sni} if self.sni else {}),
            **({"locality": self.locality} if self.locality is not None else {}),
            **({"static": True, "caFile": self.ca_file} if self.static else {}),
            **(
                {"meshHealthy": self.mesh_healthy, "check": self.check.to_dict()}
                if self.check is not None
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Endpoint:
        _check(isinstance(data, dict), "an endpoint must be an object")
        _check(isinstance(data.get("address"), str), "endpoint address must be a string")
        port = data.get("port")
        _check(isinstance(port, int) and 0 < port < 65536, "endpoint port must be 1-65535")
        for key in (
            "datacenter",
            "identity",
            "node",
            "serviceId",
            "hostHeader",
            "sni",
            "locality",
            "caFile",
        ):
            _opt_str(data.get(key), f"endpoint {key}")
        mesh_healthy = data.get("meshHealthy")
        _check(mesh_healthy is None or isinstance(mesh_healthy, bool), "endpoint meshHealthy")
        check = data.get("check")
        identities = data.get("identities") or []
        _check(
            isinstance(identities, list) and all(isinstance(i, str) for i in identities),
            "endpoint identities must be a list of strings",
        )
        _check(data.get("scheme", "http") in ("http", "https"), "endpoint scheme")
        _check(isinstance(data.get("weight", 1), int), "endpoint weight must be a number")
        return cls(
            address=str(data["address"]),
            port=int(data["port"]),
            scheme=str(data.get("scheme", "http")),
            healthy=bool(data.get("healthy", True)),
            status=str(data.get("status", "passing")),
            weight=int(data.get("weight", 1)),
            datacenter=data.get("datacenter"),
            identity=data.get("identity"),
            host_header=str(data.get("hostHeader") or ""),
            node=data.get("node"),
            service_id=data.get("serviceId"),
            identities=tuple(identities),
            sni=data.get("sni"),
            locality=data.get("locality"),
            static=data.get("static") is True,
            ca_file=data.get("caFile"),
            check=EndpointCheck.from_dict(check) if check is not None else None,
            mesh_healthy=mesh_healthy,
        )


@dataclass(frozen=True, slots=True)
class ServiceEndpoints:
    """Every known instance of one service, and which datacenters to prefer in order.

    ``policy`` is the route policy the mesh publishes for the service, as canonical JSON
    text (``""``: none): Kubernetes discovery puts the service's Linkerd ServiceProfile
    and its ``timeout.linkerd.io``/``retry.linkerd.io`` annotations there (see
    :mod:`odin_gw.mesh.kubernetes`); workers compile it when the snapshot changes.
    """

    name: str
    endpoints: tuple[Endpoint, ...]
    source: str = "static"
    datacenters: tuple[str | None, ...] = ()
    policy: str = ""

    def active(self) -> tuple[tuple[Endpoint, ...], str | None]:
        """The healthy endpoints of the first datacenter that has any, and that datacenter.

        ``healthy``: the mesh says so and an active check, if any, is not failing
        (``unknown`` counts as healthy; see :class:`Endpoint`). Local first: a later
        datacenter serves only while every earlier one has no healthy instance (Consul's
        failover order).
        """
        order = self.datacenters or (None,)
        if order == (None,):
            healthy = tuple(e for e in self.endpoints if e.healthy)
            return healthy, (healthy[0].datacenter if healthy else None)
        for dc in order:
            healthy = tuple(e for e in self.endpoints if e.healthy and e.datacenter == dc)
            if healthy:
                return healthy, dc
        return (), None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "datacenters": list(self.datacenters),
            "endpoints": [e.to_dict() for e in self.endpoints],
            **({"policy": self.policy} if self.policy else {}),
        }

    def with_checks(self, checks: Any) -> ServiceEndpoints:
        """This service with each endpoint's check set to ``checks.get(endpoint.key)``
        (``None``: no check); itself when nothing changes, so identity still says
        "unchanged" to the journal and the route views."""
        endpoints = tuple(e.with_check(checks.get(e.key)) for e in self.endpoints)
        if all(a is b for a, b in zip(endpoints, self.endpoints, strict=True)):
            return self
        return replace(self, endpoints=endpoints)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceEndpoints:
        _check(isinstance(data, dict), "a service must be an object")
        _check(isinstance(data.get("name"), str), "service name must be a string")
        _check(isinstance(data.get("endpoints", []), list), "endpoints must be a list")
        dcs = data.get("datacenters") or []
        _check(isinstance(dcs, list), "datacenters must be a list")
        for dc in dcs:
            _opt_str(dc, "datacenter")
        return cls(
            name=str(data["name"]),
            source=str(data.get("source", "static")),
            datacenters=tuple(data.get("datacenters") or ()),
            endpoints=tuple(Endpoint.from_dict(e) for e in data.get("endpoints") or ()),
            policy=_opt_str(data.get("policy"), "service policy") or "",
        )


@dataclass(frozen=True)
class Snapshot:
    """What the mesh looked like at ``refreshed_at``, plus the health of discovery itself.

    ``services`` holds the services the control plane has answered for and, with active
    health checks, the checked static targets of services it has not (``source:
    static``, published by the leader with their verdicts); any other service falls back
    to its static targets. ``refreshed_at`` is the time
    of the last *successful* discovery (0: never).
    """

    mesh: str = "none"
    services: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    catalog: tuple[str, ...] = ()
    version: int = 0
    refreshed_at: float = 0.0
    attempted_at: float = 0.0
    last_error: str | None = None
    consecutive_failures: int = 0
    leader_pid: int | None = None
    tls: dict[str, Any] | None = None
    warm: bool = False
    origin: str = ""
    fingerprint: str = ""

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the last successful discovery, ``None`` if there was none."""
        if not self.refreshed_at:
            return None
        return max(0.0, (time.time() if now is None else now) - self.refreshed_at)

    def with_services(self, services: dict[str, ServiceEndpoints], **changes: Any) -> Snapshot:
        """A successor snapshot with ``services`` and a bumped version."""
        return replace(
            self,
            services=MappingProxyType(dict(services)),
            version=self.version + 1,
            **changes,
        )

    def evolve(self, **changes: Any) -> Snapshot:
        """A successor snapshot with ``changes`` and a bumped version."""
        return replace(self, version=self.version + 1, **changes)

    def to_json(self, **extra: Any) -> str:
        """The JSON form; ``extra`` keys are added (the state dir names its journal)."""
        return json.dumps({**self.to_doc(), **extra}, sort_keys=True)

    def to_doc(self, services: Any = None) -> dict[str, Any]:
        """The JSON document as a dict; ``services`` (names) restricts the services in it
        (a journal entry carries only the services that changed)."""
        chosen = self.services if services is None else {n: self.services[n] for n in services}
        return {
            "format": SNAPSHOT_FORMAT,
            "origin": self.origin,
            "fingerprint": self.fingerprint,
            "mesh": self.mesh,
            "version": self.version,
            "refreshedAt": self.refreshed_at,
            "attemptedAt": self.attempted_at,
            "lastError": self.last_error,
            "consecutiveFailures": self.consecutive_failures,
            "leaderPid": self.leader_pid,
            "catalog": list(self.catalog),
            "tls": self.tls,
            "services": {n: s.to_dict() for n, s in chosen.items()},
        }

    @classmethod
    def from_json(cls, text: str, extras: dict[str, Any] | None = None) -> Snapshot:
        """Parse a state file; raises ``ValueError`` if it is not a snapshot of this format.

        ``extras``: filled with the document's ``journal`` key (see ``state.py``)."""
        try:
            data = json.loads(text)
            if extras is not None and isinstance(data, dict):
                extras["journal"] = data.get("journal")
            return cls._from_doc(data)
        except ValueError:
            raise
        except (KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"not a snapshot document ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_doc(cls, data: Any) -> Snapshot:
        _check(isinstance(data, dict), "not a snapshot document")
        _check(
            data.get("format") == SNAPSHOT_FORMAT,
            f"snapshot format {data.get('format')!r}, expected {SNAPSHOT_FORMAT}",
        )
        services = data.get("services")
        _check(isinstance(services, dict), "services must be an object")
        for key in ("mesh", "origin", "fingerprint"):
            _check(isinstance(data.get(key), str), f"{key} must be a string")
        for key in ("refreshedAt", "attemptedAt"):
            value = data.get(key) or 0
            _check(isinstance(value, int | float), f"{key} must be a number")
        for key in ("version", "consecutiveFailures"):
            _check(isinstance(data.get(key) or 0, int), f"{key} must be a whole number")
        pid = data.get("leaderPid")
        _check(pid is None or isinstance(pid, int), "leaderPid must be a whole number")
        _opt_str(data.get("lastError"), "lastError")
        tls = data.get("tls")
        _check(tls is None or isinstance(tls, dict), "tls must be an object")
        catalog = data.get("catalog") or []
        _check(
            isinstance(catalog, list) and all(isinstance(c, str) for c in catalog),
            "catalog must be a list of names",
        )
        parsed = {}
        for name, svc in services.items():
            entry = ServiceEndpoints.from_dict(svc)
            _check(entry.name == name, f"service {name!r} holds {entry.name!r}")
            parsed[name] = entry
        return cls(
            mesh=data["mesh"],
            origin=data["origin"],
            fingerprint=data["fingerprint"],
            version=int(data.get("version") or 0),
            refreshed_at=float(data.get("refreshedAt") or 0.0),
            attempted_at=float(data.get("attemptedAt") or 0.0),
            last_error=data.get("lastError"),
            consecutive_failures=int(data.get("consecutiveFailures") or 0),
            leader_pid=pid,
            catalog=tuple(catalog),
            tls=tls,
            services=MappingProxyType(parsed),
        )

    def delta_json(self, changed, previous: Snapshot | None) -> str:
        """A journal entry: this snapshot's header and only the services named in
        ``changed`` (the catalog only when it differs from ``previous``'s). One line."""
        doc = self.to_doc(services=changed)
        if previous is not None and previous.catalog == self.catalog:
            del doc["catalog"]
        return json.dumps(doc, sort_keys=True)

    def followed_by(self, entry: str) -> Snapshot:
        """This snapshot with a journal entry (see ``delta_json``) applied: the entry's
        header replaces ours, its services replace ours by name. ``ValueError`` if the
        entry is not a snapshot document of this format."""
        try:
            data = json.loads(entry)
            if isinstance(data, dict) and "catalog" not in data:
                data["catalog"] = list(self.catalog)
            delta = self._from_doc(data)
        except ValueError:
            raise
        except (KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"not a journal entry ({type(exc).__name__}: {exc})") from exc
        services = dict(self.services)
        services.update(delta.services)
        return replace(delta, services=MappingProxyType(services))

    def only(self, names) -> Snapshot:
        """This snapshot restricted to ``names`` (services dropped from the config go)."""
        wanted = set(names)
        keep = {n: s for n, s in self.services.items() if n in wanted}
        if len(keep) == len(self.services):
            return self
        return replace(self, services=MappingProxyType(keep))
