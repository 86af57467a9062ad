"""Live tap of the traffic through the gateway (``linkerd.enableTap``), like ``linkerd viz tap``.

``GET /admin/tap?service=&method=&path=&limit=`` (admin bearer token) streams one JSON
object per request that completed through the gateway, as newline-delimited JSON
(``application/x-ndjson``, unbuffered)::

    {"requestId": "...", "time": "2025-01-31T12:00:00.123Z", "method": "GET",
     "authority": "shop.example", "path": "/orders/7", "service": "orders",
     "endpoint": "http://10.0.0.7:8080", "status": 200, "durationMs": 3.412, "bytes": 512,
     "peerIdentity": null}

``time`` is when the request started (UTC), ``path`` is without the query string (it
may carry secrets), ``endpoint`` the target it went to, ``peerIdentity`` the identity
the upstream was held to (``null`` when none). Filters: ``service`` exact, ``method``
exact (any case), ``path`` a prefix; ``limit`` ends the stream after that many events
(1..100000; default unbounded). ``{"dropped": N}`` lines say how many events this tap
lost so far (N is a running total): within a second after it grows, and every
:data:`KEEPALIVE` seconds regardless, which also makes a tap with no traffic notice its
client leaving. Off (404) unless ``serviceMesh.type: linkerd`` with
``linkerd.enableTap: true``; at most ``linkerd.maxTaps`` streams at once over all
workers (429 beyond).

Every request the gateway answers appears, its own admin ones included (``service`` is
``null`` for those): filter with ``service=`` to see proxied traffic only. A stream holds
one worker thread while it is open (under ``server.workerClass: sync``, the whole worker).

**How events cross workers** (:mod:`odin_gw.tap_hub`). A tap is a unix datagram socket
``taps/tap-<pid>-<n>.sock`` in the gateway's private state dir, bound by the worker
serving the stream, plus ``tap-<pid>-<n>.json`` (its filter) renamed into place once the
socket is bound. Every worker lists ``taps/`` every 0.5 s in a background thread, never
per request; a request that completes, when some tap is open and its filter matches, is
serialized once and sent with ``MSG_DONTWAIT`` on one connected socket per tap. A full
receiver (``EAGAIN``, ``ENOBUFS``) drops the event and counts it; the next datagram that
gets through carries the count. A refused socket (its worker died) is forgotten, and its
files are removed under the lock. ``maxTaps`` is counted, and a tap created, under an
``flock`` on ``taps/.lock``.

**Reader side** (:mod:`odin_gw.tap_stream`): a receiver thread drains the socket into a
bounded buffer (1,000 events, oldest dropped and counted); the stream's thread writes to
the client, each send bounded by ``server.writeTimeout``, through a send buffer capped
at 32 KiB so that a slow reader's backlog waits (and is counted) in that buffer rather
than in kernel memory. A slow reader, or one that never reads, costs traffic nothing but
a failed non-blocking send. The stream ends when the client leaves (noticed within
0.5 s when it closes, or by a failed write), at ``limit``, or when the worker begins a
graceful stop; its socket and filter file are removed on every path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Response, current_app, request

from .errors import BadRequest, GatewayError

if TYPE_CHECKING:
    from .proxy.exchange import Exchange
    from .tap_hub import TapHub


#: Seconds without a line after which a stream writes ``{"dropped": N}``.
KEEPALIVE = 2.0
MAX_LIMIT = 100_000
#: Longest value accepted for a filter parameter.
MAX_FILTER = 1024


class TapDisabled(GatewayError):
    """The tap is off: not Linkerd, or ``linkerd.enableTap`` is false."""

    status = 404
    code = "tap_disabled"


class TapLimitReached(GatewayError):
    """``linkerd.maxTaps`` streams are open already (over all workers)."""

    status = 429
    code = "too_many_taps"


class TapUnavailable(GatewayError):
    """The tap cannot be set up (state dir unusable, lock held too long)."""

    status = 503
    code = "tap_unavailable"


# -- what a tap asks for ------------------------------------------------------------------
@dataclass(frozen=True)
class TapFilter:
    """Which requests a tap wants: ``service`` exact, ``method`` exact (upper case),
    ``path`` a prefix; ``None`` matches everything."""

    service: str | None = None
    method: str | None = None
    path: str | None = None

    def matches(self, service: str | None, method: str, path: str) -> bool:
        """Whether a request with these facts (``method`` in upper case) is wanted."""
        return (
            (self.service is None or self.service == service)
            and (self.method is None or self.method == method)
            and (self.path is None or path.startswith(self.path))
        )

    def to_json(self) -> dict:
        """The filter as the tap's ``.json`` file holds it."""
        return {"service": self.service, "method": self.method, "path": self.path}

    @classmethod
    def from_json(cls, doc: Mapping) -> TapFilter:
        """The filter a tap's ``.json`` file holds."""
        return cls(doc.get("service"), doc.get("method"), doc.get("path"))


def parse_query(args: Mapping[str, str]) -> tuple[TapFilter, int | None]:
    """``(filter, limit)`` from the query; raises :class:`BadRequest` naming the parameter.

    Empty parameters count as absent. ``limit`` must be a whole number 1..100000.
    """
    values = {}
    for name in ("service", "method", "path", "limit"):
        value = args.get(name) or None
        if value is not None and len(value) > MAX_FILTER:
            raise BadRequest(f"{name}: at most {MAX_FILTER} characters", parameter=name)
        values[name] = value
    path = values["path"]
    if path is not None and not path.startswith("/"):
        raise BadRequest("path: a path prefix must start with /", parameter="path")
    method = values["method"]
    return TapFilter(values["service"], method.upper() if method else None, path), parse_limit(
        values["limit"]
    )


def parse_limit(value: str | None) -> int | None:
    """``limit`` as an int, ``None`` when absent; raises :class:`BadRequest` otherwise
    unless it is a whole number from 1 to :data:`MAX_LIMIT`."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= MAX_LIMIT:
        raise BadRequest(f"limit: must be a whole number from 1 to {MAX_LIMIT}", parameter="limit")
    return int(value)


def tap_event(exchange: Exchange, seconds: float, environ: Mapping, now: float) -> dict:
    """The event for one completed request (see the module docstring for the fields).

    ``now`` is the wall time it completed; ``seconds`` how long it took.
    """
    return {
        "requestId": exchange.request_id,
        "time": iso_utc(now - seconds),
        "method": exchange.method,
        "authority": environ.get("HTTP_HOST"),
        "path": exchange.path,
        "service": exchange.service,
        "endpoint": exchange.target,
        "status": exchange.status,
        "durationMs": round(seconds * 1000, 3),
        "bytes": exchange.response_bytes,
        "peerIdentity": exchange.peer_identity,
    }


def iso_utc(ts: float) -> str:
    """``2025-01-31T12:00:00.123Z`` for the epoch time ``ts``."""
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{millis:03d}Z"


# -- the view -------------------------------------------------------------------------------
def tap_view():
    """``GET /admin/tap``: see the module docstring."""
    gateway = current_app.extensions["odin"]
    hub: TapHub | None = getattr(gateway, "tap", None)
    if hub is None:
        raise TapDisabled(
            "tap is off: linkerd.enableTap is off (set serviceMesh.type: linkerd and "
            "serviceMesh.linkerd.enableTap: true)"
        )
    tap_filter, limit = parse_query(request.args)
    headers = {"X-Accel-Buffering": "no"}  # a buffering proxy in front must pass lines on
    if request.method == "HEAD":
        return Response(mimetype="application/x-ndjson", headers=headers)
    stream = hub.open(tap_filter, limit, request.environ.get("gunicorn.socket"))
    response = Response(stream.lines(), mimetype="application/x-ndjson", headers=headers)
    response.call_on_close(stream.close)  # also when the body is never iterated
    return response
