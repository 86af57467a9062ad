"""Data model of the Consul double: nodes, services, checks, CA roots and leaves.

Plus the small Go-compatibility helpers (durations, RFC 3339 times) and the probes that
execute HTTP and TCP checks the way a Consul agent does.
"""

from __future__ import annotations

import re
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.doubles.pki import CertificateAuthority, IssuedCert

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.Duration`` string ("10s", "1m30s", "100ms") into seconds."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


def duration_field(value: Any) -> float:
    """A duration from a JSON body: Go string form or integer nanoseconds."""
    if value in (None, ""):
        return 0.0
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    return parse_go_duration(str(value))


def go_duration(seconds: float) -> str:
    """Render seconds the way Go prints a Duration (good enough for check intervals)."""
    if seconds <= 0:
        return ""
    if seconds == int(seconds):
        whole = int(seconds)
        hours, rest = divmod(whole, 3600)
        minutes, secs = divmod(rest, 60)
        out = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
        return out + f"{secs}s"
    return f"{seconds * 1000:g}ms"


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix, as Go marshals ``time.Time``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def worst(statuses: Iterable[str]) -> str:
    """Aggregate check statuses: critical beats warning beats passing."""
    result = PASSING
    for status in statuses:
        if status == CRITICAL:
            return CRITICAL
        if status == WARNING:
            result = WARNING
    return result


@dataclass
class Node:
    dc: str
    name: str
    address: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    tagged_addresses: dict[str, str] | None = None
    meta: dict[str, str] | None = None
    create_index: int = 0
    modify_index: int = 0

    def render(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": self.dc,
            "TaggedAddresses": self.tagged_addresses,
            "Meta": self.meta,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Service:
    dc: str
    node: str
    id: str
    name: str
    port: int = 0
    address: str = ""
    tags: list[str] | None = None
    meta: dict[str, str] | None = None
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    tagged_addresses: dict[str, Any] | None = None
    enable_tag_override: bool = False
    kind: str = ""
    proxy: dict[str, Any] = field(default_factory=dict)
    connect: dict[str, Any] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0

    @property
    def destination(self) -> str:
        """Name of the service this proxy fronts ("" if not a connect proxy)."""
        if self.kind != "connect-proxy":
            return ""
        return str(self.proxy.get("DestinationServiceName") or "")

    @property
    def native(self) -> bool:
        return bool(self.connect.get("Native"))

    def render(self) -> dict[str, Any]:
        proxy = {"Mode": "", "MeshGateway": {}, "Expose": {}}
        proxy.update(self.proxy)
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out.update(
            {
                "ID": self.id,
                "Service": self.name,
                "Tags": list(self.tags) if self.tags is not None else None,
                "Address": self.address,
                "Meta": dict(self.meta) if self.meta is not None else None,
                "Port": self.port,
                "Weights": dict(self.weights),
                "EnableTagOverride": self.enable_tag_override,
                "Proxy": proxy,
                "Connect": dict(self.connect),
                "CreateIndex": self.create_index,
                "ModifyIndex": self.modify_index,
            }
        )
        if self.tagged_addresses:
            out["TaggedAddresses"] = self.tagged_addresses
        return out


@dataclass
class Check:
    dc: str
    node: str
    id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    type: str = ""
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    ttl_deadline: float | None = None
    alias_service: str = ""
    http: str = ""
    tcp: str = ""
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    tls_skip_verify: bool = False
    next_run: float | None = None
    running: bool = False
    create_index: int = 0
    modify_index: int = 0


@dataclass
class Leaf:
    service: str
    cert: IssuedCert
    renew_at: float
    index: int


@dataclass
class RootEntry:
    ca: CertificateAuthority
    active: bool
    create_index: int
    modify_index: int
    rotated_out_at: datetime | None = None


def probe(chk: Check) -> tuple[str, str]:
    """Run an HTTP or TCP check once: (status, output) like Consul's check runners."""
    timeout = chk.timeout or 10.0
    if chk.tcp:
        host, _, port = chk.tcp.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError as exc:
            return CRITICAL, f"dial tcp {chk.tcp}: {exc}"
        return PASSING, f"TCP connect {chk.tcp}: Success"
    return _http_probe(chk, timeout)


def _http_probe(chk: Check, timeout: float) -> tuple[str, str]:
    request = urllib.request.Request(chk.http, method=chk.method or "GET")
    for name, values in chk.header.items():
        for value in values:
            request.add_header(name, value)
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if chk.tls_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as resp:
            code, reason, body = resp.status, resp.reason, resp.read(4096)
    except urllib.error.HTTPError as exc:
        with exc:
            code, reason, body = exc.code, exc.reason, exc.read(4096)
    except (OSError, ValueError) as exc:
        return CRITICAL, f"Get {chk.http!r}: {exc}"
    text = body.decode("utf-8", "replace")
    output = f"HTTP {chk.method or 'GET'} {chk.http}: {code} {reason} Output: {text}"
    if 200 <= code < 300:
        return PASSING, output
    if code == 429:
        return WARNING, output
    return CRITICAL, output
