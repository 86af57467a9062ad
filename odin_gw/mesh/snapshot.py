"""Immutable views of what discovery found: ``Endpoint``, ``ServiceEndpoints``, ``Snapshot``.

A ``Snapshot`` is replaced as a whole, never changed in place, so request threads read it
without locks. It round-trips through JSON: the leader writes it to the state directory
and every worker (and the next start, as a warm cache) reads it back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service that may receive requests.

    ``identity`` is the SPIFFE ID the instance must present when reached over mesh mTLS
    (``None``: plain HTTP, or TLS checked against the CA only). ``host_header`` is what the
    ``Host`` header should say when the route does not preserve the client's.

    ``static`` marks a target from the config (never from discovery): over ``https`` it
    is verified like any public server, against the system CAs or ``ca_file``, with its
    hostname checked, and never gets the mesh client certificate. Neither field is part
    of the JSON form: snapshots only ever hold discovered (mesh) endpoints.
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
    key: str = field(default="", compare=False)
    pool_key: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.key:
            ident = f"#{self.identity}" if self.identity else ""
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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Endpoint:
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
        )


@dataclass(frozen=True, slots=True)
class ServiceEndpoints:
    """Every known instance of one service, and which datacenters to prefer in order."""

    name: str
    endpoints: tuple[Endpoint, ...]
    source: str = "static"
    datacenters: tuple[str | None, ...] = ()

    def active(self) -> tuple[tuple[Endpoint, ...], str | None]:
        """The healthy endpoints of the first datacenter that has any, and that datacenter.

        Local first: a later datacenter serves only while every earlier one has no healthy
        instance (Consul's failover order).
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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceEndpoints:
        return cls(
            name=str(data["name"]),
            source=str(data.get("source", "static")),
            datacenters=tuple(data.get("datacenters") or ()),
            endpoints=tuple(Endpoint.from_dict(e) for e in data.get("endpoints") or ()),
        )


@dataclass(frozen=True)
class Snapshot:
    """What the mesh looked like at ``refreshed_at``, plus the health of discovery itself.

    ``services`` only holds services the control plane has answered for; a service that
    was never answered for falls back to its static targets. ``refreshed_at`` is the time
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

    def to_json(self) -> str:
        return json.dumps(
            {
                "mesh": self.mesh,
                "version": self.version,
                "refreshedAt": self.refreshed_at,
                "attemptedAt": self.attempted_at,
                "lastError": self.last_error,
                "consecutiveFailures": self.consecutive_failures,
                "leaderPid": self.leader_pid,
                "catalog": list(self.catalog),
                "tls": self.tls,
                "services": {n: s.to_dict() for n, s in self.services.items()},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Parse a state file; raises ``ValueError`` (or ``KeyError``) if it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
            raise ValueError("not a snapshot document")
        return cls(
            mesh=str(data.get("mesh", "none")),
            version=int(data.get("version", 0)),
            refreshed_at=float(data.get("refreshedAt") or 0.0),
            attempted_at=float(data.get("attemptedAt") or 0.0),
            last_error=data.get("lastError"),
            consecutive_failures=int(data.get("consecutiveFailures") or 0),
            leader_pid=data.get("leaderPid"),
            catalog=tuple(data.get("catalog") or ()),
            tls=data.get("tls"),
            services=MappingProxyType(
                {n: ServiceEndpoints.from_dict(s) for n, s in data["services"].items()}
            ),
        )
