"""The per-request record: what came in, where it went, how it ended."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trust import Forwarding

# Request ids need uniqueness, not secrecy: a PRNG avoids a getrandom() syscall (and a
# GIL hand-off) per request that uuid.uuid4() would make.
_random = random.Random()
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_V4 = (0x4000 << 64) | (0x8000 << 48)

_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=")


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
        "request_id",
        "response_bytes",
        "service",
        "started",
        "status",
        "target",
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
        self.target: str | None = None
        self.datacenter: str | None = None
        self.status = 0
        self.response_bytes = 0
        self.error_kind: str | None = None
        # Filled by the mesh header injectors' before_request hook; sent upstream.
        self.mesh_headers: list[tuple[str, str]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def inbound_request_id(value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh uuid4."""
    if value and len(value) <= 200 and all(c in _ID_OK for c in value):
        return value
    # A version-4 UUID, formatted by hand (uuid.UUID() validates at length).
    h = "%032x" % ((_random.getrandbits(128) & _CLEAR) | _V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
