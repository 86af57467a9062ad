"""Slow-client limits of the edge worker, as plain values and rules (no sockets here).

The edge worker (:mod:`odin_gw.edge_worker`) reads a request's head, and a small body,
in its event loop before the request takes a thread. This module holds what it decides
with: how many bytes a request needs before it can be handed over (:func:`bytes_needed`),
the minimum body rate (:class:`MinRate`), the ``408`` answer, and the rate-limited log
line for clients that were too slow (:class:`SlowClientLog`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

#: :func:`bytes_needed`: hand the request to a thread now; gunicorn's parser decides.
HAND_OVER = -1

#: gunicorn's own clamps for its header limits (``gunicorn.http.message``).
_MAX_FIELDS = 32768
_DEFAULT_FIELD_SIZE = 8190
_DEFAULT_LINE = 8190
_UNLIMITED_LINE = 1024 * 1024


class ClientTooSlow(Exception):
    """The client did not send its request head in time, or its body too slowly."""

    phase = "head"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HeadTimeout(ClientTooSlow):
    """The request head was not complete within ``server.headerTimeout``.

    Not an ``OSError``: gthread's request loop logs those with a traceback.
    """

    phase = "head"


class BodyTooSlow(ClientTooSlow, TimeoutError):
    """The request body fell below ``server.minBodyRate`` after the grace period.

    A ``TimeoutError``: gunicorn's body drain and the forwarder's body reader treat it
    as an interrupted read (the connection closes, the upstream request is aborted).
    """

    phase = "body"


@dataclass(frozen=True)
class MinRate:
    """Kestrel's minimum data rate: after ``grace`` seconds a body must average ``rate`` B/s.

    Time is whatever clock the caller measures the body with: wall time from the end of
    the head while the event loop buffers a small body, time spent waiting for the
    client while a thread streams a large one (time the application spends not reading
    is not the client's fault). ``rate`` 0 turns the rule off.
    """

    rate: float
    grace: float

    def allowed(self, received: int) -> float:
        """How long a body that has delivered ``received`` bytes may have taken so far."""
        if self.rate <= 0:
            return math.inf
        return max(self.grace, received / self.rate)


@dataclass(frozen=True)
class EdgeLimits:
    """What the edge worker enforces, from ``server.*`` and gunicorn's header limits."""

    header_timeout: float = 10.0
    buffer_body: int = 64 * 1024
    min_rate: MinRate = MinRate(240, 5.0)
    max_line: int = _DEFAULT_LINE + 2
    max_head: int = _DEFAULT_LINE + 2 + 100 * (_DEFAULT_FIELD_SIZE + 2) + 4

    @classmethod
    def build(cls, server, gunicorn_cfg=None) -> EdgeLimits:
        """From a :class:`~odin_gw.config.ServerConfig` and gunicorn's ``cfg`` (limits)."""
        line = getattr(gunicorn_cfg, "limit_request_line", _DEFAULT_LINE)
        # gunicorn: 0 is unlimited, below 0 or above the maximum is the maximum.
        if line == 0:
            line = _UNLIMITED_LINE
        elif not 0 < line < _DEFAULT_LINE:
            line = _DEFAULT_LINE
        fields = getattr(gunicorn_cfg, "limit_request_fields", 100)
        fields = fields if 0 < fields <= _MAX_FIELDS else _MAX_FIELDS
        size = getattr(gunicorn_cfg, "limit_request_field_size", _DEFAULT_FIELD_SIZE)
        size = size if size > 0 else _DEFAULT_FIELD_SIZE
        return cls(
            header_timeout=float(server.header_timeout),
            buffer_body=int(server.buffer_body),
            min_rate=MinRate(float(server.min_body_rate), float(server.min_body_rate_grace)),
            max_line=line + 2,
            # The longest head gunicorn accepts: beyond it, its parser answers 4xx.
            max_head=line + 2 + fields * (size + 2) + 4,
        )


def bytes_needed(buf: bytes | bytearray, limits: EdgeLimits, scanned: int = 0) -> int | None:
    """How many bytes of ``buf`` the request needs before a thread may take it.

    ``None``: the head is not complete yet, keep reading. ``n >= 0``: the head and a body
    of at most ``limits.buffer_body`` bytes end at ``n``. :data:`HAND_OVER`: hand it over
    now, because the body is streamed (too large, chunked, ``Expect: 100-continue``) or
    the head breaks a limit or the framing is odd — gunicorn's parser then answers or
    rejects it exactly as it does under gthread. This is no HTTP parser: it only finds
    where to stop waiting. ``scanned`` is how much of ``buf`` an earlier call already
    searched without finding the end of the head.
    """
    end = buf.find(b"\r\n\r\n", max(0, scanned - 3))
    if end < 0:
        size = len(buf)
        if size > limits.max_head:
            return HAND_OVER
        if size > limits.max_line and buf.find(b"\r\n", 0, limits.max_line + 2) < 0:
            return HAND_OVER  # request line too long: gunicorn's 414
        start = scanned - 1 if scanned and buf[scanned - 1] == 13 else scanned  # a CR
        tail = buf[start:]
        if tail.count(b"\n") != tail.count(b"\r\n"):
            return HAND_OVER  # a bare LF: gunicorn rejects it rather than wait for more
        return None
    head = bytes(buf[:end]).lower()
    if b"\r\ntransfer-encoding:" in head or b"\r\nexpect:" in head:
        return HAND_OVER
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return end + 4
    at += 17
    stop = head.find(b"\r\n", at)
    value = head[at : stop if stop >= 0 else len(head)].strip(b" \t")
    if not value.isdigit() or (stop >= 0 and b"\r\ncontent-length:" in head[stop:]):
        return HAND_OVER
    length = int(value)
    if length > limits.buffer_body:
        return HAND_OVER
    return end + 4 + length


def timeout_detail(phase: str, limits: EdgeLimits) -> str:
    """What was too slow, for the ``408`` body and the log line."""
    if phase == "head":
        return f"request head not complete within {limits.header_timeout:g}s"
    rate = limits.min_rate
    return f"request body slower than {rate.rate:g} bytes/s after {rate.grace:g}s"


def timeout_answer(detail: str) -> tuple[str, list[tuple[str, str]], bytes]:
    """The ``408`` as (status, headers, body): the gateway's JSON error shape."""
    body = json.dumps({"error": detail, "code": "request_timeout"}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return "408 Request Timeout", headers, body


def timeout_response(detail: str) -> bytes:
    """The whole ``408`` response as bytes, with ``Connection: close``."""
    status, headers, body = timeout_answer(detail)
    lines = [f"HTTP/1.1 {status}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class SlowClientLog:
    """At most one log line per ``interval`` about clients closed for being too slow.

    The first slow client of a quiet period is logged at once; the ones after it are
    counted and summed up in the next line (at the next one, or at :meth:`flush` once
    the interval has passed). Thread-safe: the event loop and request threads report.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        interval: float = 10.0,
        clock=time.monotonic,
    ) -> None:
        self.logger = logger or logging.getLogger("odin_gw.edge")
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held: Counter[str] = Counter()
        self.total: Counter[str] = Counter()

    def closed(self, phase: str, peer, detail: str) -> None:
        """Count (and maybe log) one client closed in ``phase`` (``head``/``body``)."""
        with self._lock:
            self.total[phase] += 1
            now = self.clock()
            if self._last is not None and now - self._last < self.interval:
                self._held[phase] += 1
                return
            held, self._held = self._held, Counter()
            self._last = now
        host = peer[0] if isinstance(peer, tuple) and peer else peer
        self.logger.info("slow client %s closed: %s%s", host, detail, _more(held))

    def flush(self) -> None:
        """Log the clients counted since the last line, once the interval has passed."""
        if not self._held:
            return
        with self._lock:
            now = self.clock()
            if not self._held or (self._last is not None and now - self._last < self.interval):
                return
            held, self._held = self._held, Counter()
            self._last = now
        parts = ", ".join(f"{n} in the {phase}" for phase, n in sorted(held.items()))
        self.logger.info("slow clients closed since the last line: %s", parts)


def _more(held: Counter[str]) -> str:
    if not held:
        return ""
    parts = ", ".join(f"{n} in the {phase}" for phase, n in sorted(held.items()))
    return f" (and {sum(held.values())} more since the last line: {parts})"
