"""The per-request record: what came in, where it went, how it ended."""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ..mesh.tracing import new_request_id

if TYPE_CHECKING:
    from ..mesh.tracing import Trace
    from .trust import Forwarding

#: The exchange the current request thread serves (set by the first before_request
#: hook): JSON log lines written while it runs carry its request and trace ids.
CURRENT: ContextVar[Exchange | None] = ContextVar("odin_exchange", default=None)

_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/="


class Exchange:
    """Created by the first ``before_request`` hook; read by the access log and metrics."""

    __slots__ = (
        "client_addr",
        "datacenter",
        "error_kind",
        "forwarding",
        "mesh_headers",
        "method",
        "path",
        "peer_identity",
        "request_id",
        "response_bytes",
        "retries",
        "route",
        "service",
        "started",
        "status",
        "target",
        "timeout",
        "trace",
    )

    def __init__(self, environ: dict) -> None:
        self.started = time.perf_counter()
        self.request_id = inbound_request_id(environ.get("HTTP_X_REQUEST_ID"))
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.path = environ.get("PATH_INFO", "/")
        # The client as decided by server.trustedProxies (see proxy/trust.py): the peer
        # unless a trusted proxy named another. Rate limits and the access log use it.
        self.client_addr: str = environ.get("REMOTE_ADDR") or ""
        # What a trusted proxy said about the request (None: the peer is not trusted).
        self.forwarding: Forwarding | None = None
        self.service: str | None = None
        # The route the request was sent along: the service's own, or one of its backend
        # groups (``<service>/<group>``); set by the forwarder. Metrics and logs keep
        # ``service``; what depends on the destination (mesh headers) reads this.
        self.route: str | None = None
        self.target: str | None = None
        self.datacenter: str | None = None
        # The identity the upstream was held to (verified by the gateway's own mTLS, or
        # required of the mesh proxy with l5d-require-id); None when nothing was.
        self.peer_identity: str | None = None
        # The deadline's length for the upstream answer (the route's, or a shorter one
        # from the mesh's route policy), set by the forwarder; None before forwarding.
        self.timeout: float | None = None
        self.status = 0
        self.response_bytes = 0
        # Attempts after the first (transport failures and retried answers alike).
        self.retries = 0
        self.error_kind: str | None = None
        # Filled by the mesh header injectors' before_request hook; sent upstream.
        self.mesh_headers: list[tuple[str, str]] = []
        # The request's trace (odin_gw.mesh.tracing.Trace), set by the trace injector.
        self.trace: Trace | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def inbound_request_id(value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token (at most 200 characters of
    letters, digits and ``-_.:+/=``), else a fresh version-4 UUID.

    Generated ids come from the same CSPRNG pool as trace ids (one ``getrandom()`` per
    4 KiB, not per request): an id a client can predict lets it collide with another
    request's logs and traces.
    """
    # str.strip removes a set of characters from both ends: only a sane id leaves "".
    if value and len(value) <= 200 and not value.strip(_ID_CHARS):
        return value
    return new_request_id()
