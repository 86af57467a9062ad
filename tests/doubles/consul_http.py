"""Request/response plumbing shared by the Consul double's endpoints.

``Request``/``Reply``/``HTTPError`` model one exchange; ``Authz`` is a resolved ACL
token with Consul's denial wording; ``EndpointBase`` holds the parameter parsing every
endpoint shares (token, ``?dc=``, ``?ns=``, booleans, JSON bodies).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.doubles.consul_state import ConsulState

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
LEADER = "127.0.0.1:8300"
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass
class Request:
    """One parsed HTTP request (path already percent-decoded)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, headers: dict[str, str] | None = None) -> Reply:
        out = {"Content-Type": "application/json", **(headers or {})}
        return cls(200, json.dumps(obj).encode(), out)


class HTTPError(Exception):
    """An error answer: plain-text body, like Consul's ``fmt.Fprint(resp, err)``."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


def no_dc_path() -> HTTPError:
    return HTTPError(500, "No path to datacenter")


@dataclass(frozen=True)
class Authz:
    """A resolved token: ``level`` is "read", "write" or None (anonymous, no policy)."""

    enabled: bool
    accessor: str = ANONYMOUS_ACCESSOR
    level: str | None = None

    def allowed(self, access: str) -> bool:
        if not self.enabled or self.level == "write":
            return True
        return self.level == "read" and access == "read"

    def require(self, resource: str, access: str, name: str) -> None:
        if self.allowed(access):
            return
        if self.accessor == ANONYMOUS_ACCESSOR:
            who = "anonymous token"
            tail = (
                ". The anonymous token is used implicitly when a request does not specify a token."
            )
        else:
            who, tail = f"token with AccessorID '{self.accessor}'", ""
        raise HTTPError(
            403,
            f"Permission denied: {who} lacks permission '{resource}:{access}' on \"{name}\"{tail}",
        )


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """Case-insensitive, snake_case tolerant field lookup (Go's JSON decoding is lenient)."""
    if not isinstance(obj, dict):
        return default
    want = _norm(name)
    for key, value in obj.items():
        if _norm(key) == want:
            return value
    return default


_PROXY_KEYS = [
    "DestinationServiceName",
    "DestinationServiceID",
    "LocalServiceAddress",
    "LocalServicePort",
    "LocalServiceSocketPath",
    "Mode",
    "Upstreams",
    "Config",
    "MeshGateway",
    "Expose",
    "TransparentProxy",
]


def canonical_proxy(proxy: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(proxy, dict):
        return out
    canon = {_norm(k): k for k in _PROXY_KEYS}
    for key, value in proxy.items():
        out[canon.get(_norm(key), key)] = value
    return out


class EndpointBase:
    """State, ACL configuration and the request parsing shared by all endpoints."""

    def __init__(self, state: ConsulState, acl_tokens: dict[str, str] | None) -> None:
        self.state = state
        self.acl_tokens = dict(acl_tokens) if acl_tokens is not None else None
        for token, level in (self.acl_tokens or {}).items():
            if level not in ("read", "write"):
                raise ValueError(f"ACL level for {token!r} must be 'read' or 'write'")

    def authz(self, req: Request) -> Authz:
        if self.acl_tokens is None:
            return Authz(enabled=False)
        token = req.arg("token") or req.headers.get("x-consul-token") or ""
        if not token:
            scheme, _, value = req.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip().split(" ")[0]
        if not token or token == "anonymous":
            return Authz(enabled=True)
        level = self.acl_tokens.get(token)
        if level is None:
            raise HTTPError(403, "ACL not found")
        accessor = str(uuid.uuid5(uuid.NAMESPACE_URL, f"consul-double-token:{token}"))
        return Authz(enabled=True, accessor=accessor, level=level)

    def dc(self, req: Request) -> str:
        dc = req.arg("dc") or self.state.datacenter
        if dc not in self.state.datacenters:
            raise no_dc_path()
        return dc

    @staticmethod
    def check_ns(req: Request) -> None:
        # Consul CE (agent/http_ce.go parseEntMeta): any non-empty namespace, even
        # "default", is refused; the header is checked first.
        if req.headers.get("x-consul-namespace"):
            raise HTTPError(
                400,
                'Invalid header: "X-Consul-Namespace" - Namespaces are a Consul Enterprise feature',
            )
        if req.arg("ns"):
            raise HTTPError(
                400, 'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature'
            )

    @staticmethod
    def bool_param(req: Request, name: str) -> bool:
        if name not in req.query:
            return False
        value = req.arg(name) or ""
        if value == "" or value in _GO_TRUE:
            return True
        if value in _GO_FALSE:
            return False
        raise HTTPError(400, f"Invalid value for ?{name}")

    @staticmethod
    def body_json(req: Request) -> Any:
        try:
            return json.loads(req.body.decode("utf-8") or "null") if req.body.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
