"""Watch streams of the kube-apiserver stand-in.

As the apiserver's ``WatchServer.HandleHTTP``: a 200 answer with
``Transfer-Encoding: chunked`` and ``Content-Type: application/json``, one JSON event
``{"type": ..., "object": ...}`` per line, each flushed as it happens. An error found
once the request is authenticated and its resourceVersion parsed (a compacted RV: 410
``Expired``; a future RV still ahead after the 3 s the watch cache waits: 504
``Timeout``) is sent as a single ``ERROR`` event, then the stream ends (the cacher's
``newErrWatcher``). The stream ends with the closing chunk at ``timeoutSeconds``, so the
connection can carry the next request; :meth:`KubeApi.cut` drops it instead.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from tests.doubles.kube_model import bookmark, expired, too_large_rv
from tests.doubles.kube_store import Expired, Watcher

if TYPE_CHECKING:
    from tests.doubles.kube_http import KubeApi

__all__ = ["WatchOptions", "WatchStream", "send_head"]

#: How often an idle stream checks whether its client went away.
_PROBE = 0.5


def send_head(h: BaseHTTPRequestHandler, code: int, content_type: str) -> None:
    """Status line and the headers kube-apiserver puts on every answer."""
    h.send_response(code)
    h.send_header("Audit-Id", str(uuid.uuid4()))
    h.send_header("Cache-Control", "no-cache, private")
    h.send_header("Content-Type", content_type)


def _client_gone(sock: socket.socket) -> bool:
    """True when the peer closed a connection on which it should send nothing more."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        finally:
            sock.setblocking(True)
    except ssl.SSLWantReadError:
        return False
    except (OSError, ValueError):
        return True


@dataclass(frozen=True)
class WatchOptions:
    """The watch's query parameters, parsed."""

    since: int | None  # None: current state first (RV unset, "0", or sendInitialEvents)
    bookmarks: bool  # allowWatchBookmarks
    initial_events: bool  # sendInitialEvents=true
    timeout: float  # timeoutSeconds, or the server's default


class WatchStream:
    """One watch request, served in its connection's thread."""

    def __init__(
        self,
        api: KubeApi,
        h: BaseHTTPRequestHandler,
        gen: int,
        watcher: Watcher,
        options: WatchOptions,
    ) -> None:
        self.api = api
        self.store = api.store
        self.h = h
        self.gen = gen
        self.watcher = watcher
        self.options = options

    def serve(self) -> bool:
        """Stream until the timeout (True: connection reusable) or until a cut or a
        vanished client (False: drop the connection)."""
        first, opened = self._first_events()
        with self.store.cond:
            self.api.open_watches += 1
        try:
            send_head(self.h, 200, "application/json")
            self.h.send_header("Transfer-Encoding", "chunked")
            self.h.end_headers()
            for kind, obj in first:
                self._send(kind, obj)
            if opened and self.options.initial_events and self.options.bookmarks:
                rv = self.store.rv
                self._send("BOOKMARK", bookmark(self.watcher.rt, rv, initial_events_end=True))
            if opened and not self._follow():
                return False
            self.h.wfile.write(b"0\r\n\r\n")
            return True
        except OSError:
            return False
        finally:
            self.store.close_watch(self.watcher)
            with self.store.cond:
                self.api.open_watches -= 1
                self.store.cond.notify_all()

    def _first_events(self) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
        since = self.options.since
        if since is not None and not self.store.wait_for_rv(since):
            return [("ERROR", too_large_rv(since, self.store.rv))], False
        try:
            return self.store.open_watch(self.watcher, since), True
        except Expired:
            message = f"too old resource version: {since} ({self.store.floor})"
            return [("ERROR", expired(message))], False

    def _follow(self) -> bool:
        cond, api = self.store.cond, self.api
        now = time.monotonic()
        deadline = now + self.options.timeout
        interval = api.bookmark_interval if self.options.bookmarks else None
        next_bookmark = now + interval if interval else float("inf")
        next_probe = now + _PROBE
        bookmark_gen = api.bookmark_gen
        while True:
            with cond:
                while (
                    not self.watcher.pending
                    and api.cut_gen == self.gen
                    and api.bookmark_gen == bookmark_gen
                    and time.monotonic() < min(deadline, next_bookmark, next_probe)
                ):
                    cond.wait(max(0.0, min(deadline, next_bookmark, next_probe) - time.monotonic()))
                if api.cut_gen != self.gen:
                    return False
                events = list(self.watcher.pending)
                self.watcher.pending.clear()
                forced = api.bookmark_gen != bookmark_gen
                bookmark_gen = api.bookmark_gen
                rv_now = self.store.rv  # every matching event up to here is in `events`
            for kind, obj in events:
                self._send(kind, obj)
            now = time.monotonic()
            if self.options.bookmarks and (forced or now >= next_bookmark):
                self._send("BOOKMARK", bookmark(self.watcher.rt, rv_now))
                next_bookmark = now + interval if interval else float("inf")
            if now >= deadline:
                return True
            if now >= next_probe:
                if _client_gone(self.h.connection):
                    return False
                next_probe = now + _PROBE

    def _send(self, kind: str, obj: dict[str, Any]) -> None:
        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
