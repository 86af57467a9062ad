"""HTTP side of the kube-apiserver stand-in: routing, authentication, list/get/watch.

:class:`KubeApi` answers one request the way kube-apiserver does for GET on a
namespaced resource:

* Authentication first: ``Authorization: Bearer <token>`` must name a known token,
  else 401 with an ``Unauthorized`` Status (``/healthz``, ``/livez``, ``/readyz``,
  ``/version`` are open without credentials, as ``system:public-info-viewer`` allows).
  Then the RBAC switch (403 ``Forbidden`` Status worded as the RBAC authorizer's).
* list: ``labelSelector``, ``fieldSelector``, ``limit``/``continue``, and
  ``resourceVersion`` with ``resourceVersionMatch`` (unset: most recent; ``0`` or
  ``NotOlderThan``: not older than it, a future RV waits up to 3 s then 504
  "Too large resource version"; ``Exact``: the state at that RV, 410 once compacted).
* watch (``watch=true``/``1``, or the deprecated ``/watch/`` path): ``resourceVersion``
  unset or ``0`` sends the current state as ADDED first, an RV only what came after
  it; ``allowWatchBookmarks``, ``timeoutSeconds``, ``sendInitialEvents``. The stream
  itself: see ``kube_watch``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.doubles.kube_model import (
    RESOURCES,
    ResourceType,
    expired,
    forbidden,
    not_found,
    status,
    too_large_rv,
)
from tests.doubles.kube_selectors import SelectorError, parse_field_selector, parse_label_selector
from tests.doubles.kube_store import Expired, KubeStore, Watcher
from tests.doubles.kube_watch import WatchOptions, WatchStream, send_head

__all__ = ["HANG_LIMIT", "KubeApi", "KubeRequest"]

#: Upper bound on how long a hung request is held before its connection is dropped.
HANG_LIMIT = 120.0
_PUBLIC = {"/healthz", "/livez", "/readyz", "/version"}
_VERSION = {"major": "1", "minor": "34", "gitVersion": "v1.34.0", "platform": "linux/amd64"}
_CONTINUE_TOO_OLD = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token "
    "in this response to retrieve the remainder of the results. Continuing with the "
    "provided token results in an inconsistent list - objects that were created, modified, "
    "or deleted between the time the first chunk was returned and now may show up in the list."
)


@dataclass
class KubeRequest:
    """One request as the stand-in received it (``token`` is kept out of repr)."""

    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None = field(repr=False)
    user: str | None
    verb: str | None = None
    status: int | None = None
    time: float = field(default_factory=time.time)

    @property
    def watch(self) -> bool:
        return self.verb == "watch"


class BadRequest(Exception):
    """A parameter the API server refuses with 400."""


@dataclass(frozen=True)
class _Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    watch_path: bool


def _route(path: str) -> _Route | None:
    segs = [s for s in path.split("/") if s]
    if segs[:2] == ["api", "v1"]:
        prefix, rest = "/api/v1", segs[2:]
    elif len(segs) >= 3 and segs[0] == "apis":
        prefix, rest = f"/apis/{segs[1]}/{segs[2]}", segs[3:]
    else:
        return None
    watch_path = rest[:1] == ["watch"]
    rest = rest[1:] if watch_path else rest
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if len(rest) not in (1, 2) or (len(rest) == 2 and namespace is None):
        return None
    rt = RESOURCES.get((prefix, rest[0]))
    if rt is None:
        return None
    return _Route(rt, namespace, rest[1] if len(rest) == 2 else None, watch_path)


def _parse_bool(value: str | None) -> bool:
    # Go's strconv.ParseBool, which the query-parameter decoder uses.
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _parse_rv(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        rv = int(value)
        if rv < 0:
            raise ValueError
    except ValueError:
        raise BadRequest(f'invalid resource version: "{value}"') from None
    return rv


def _parse_int(name: str, value: str | None) -> int:
    try:
        number = int(value or 0)
        if number < 0:
            raise ValueError
    except ValueError:
        raise BadRequest(
            f"{name}: Invalid value: {value!r}: must be a non-negative integer"
        ) from None
    return number


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError):
        raise BadRequest(
            "continue key is not valid: incorrect encoded start resourceVersion"
        ) from None


class KubeApi:
    """Request semantics plus the switches that change them (tokens, RBAC, hang, cuts).

    Everything mutable is guarded by ``store.cond``, which also wakes watch streams.
    """

    def __init__(
        self,
        store: KubeStore,
        tokens: dict[str, str],
        *,
        watch_timeout: float,
        bookmark_interval: float | None,
    ) -> None:
        self.store = store
        self.tokens = dict(tokens)
        self.watch_timeout = watch_timeout
        self.bookmark_interval = bookmark_interval
        self.forbidden: set[tuple[str, str]] = set()  # (plural, verb)
        self.uninstalled: set[str] = set()  # plurals whose CRD is not installed
        self.hanging = False
        self.cut_gen = 0  # bumped by go_down/stop: open requests drop their connection
        self.bookmark_gen = 0  # bumped by send_bookmarks
        self.open_watches = 0
        self.log: list[KubeRequest] = []
        self.errors: list[str] = []

    # -- switches ---------------------------------------------------------------------
    def cut(self) -> None:
        """Abort every request in flight (their connections are dropped)."""
        with self.store.cond:
            self.cut_gen += 1
            self.store.cond.notify_all()

    # -- one request ------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler) -> None:
        """Answer the request ``h`` has read (called from its connection thread)."""
        gen = self.cut_gen
        length = int(h.headers.get("Content-Length") or 0)
        if length > 0:
            h.rfile.read(length)
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        auth = h.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        with self.store.cond:
            user = self.tokens.get(token) if token else None
            rec = KubeRequest(h.command, path, query, token, user)
            self.log.append(rec)
        if not self._hold_if_hung(gen):
            return _drop(h)
        try:
            self._dispatch(h, rec, gen)
        except BadRequest as exc:
            self._reply(h, rec, status(400, "BadRequest", str(exc)))
        except SelectorError as exc:
            self._reply(h, rec, status(400, "BadRequest", str(exc)))
        except Exception:  # a bug in the stand-in: say so, and keep it for the test
            self.errors.append(traceback.format_exc())
            self._reply(h, rec, status(500, "InternalError", "internal error in the stand-in"))

    def _dispatch(self, h: BaseHTTPRequestHandler, rec: KubeRequest, gen: int) -> None:
        def arg(name: str) -> str | None:
            values = rec.query.get(name)
            return values[-1] if values else None

        if rec.path in _PUBLIC and rec.token is None:
            if rec.path == "/version":
                return self._reply(h, rec, _VERSION, 200)
            return self._reply(h, rec, b"ok", 200)
        if rec.user is None:
            return self._reply(h, rec, status(401, "Unauthorized", "Unauthorized"))
        if rec.path == "/version":
            return self._reply(h, rec, _VERSION, 200)
        route = _route(rec.path)
        if route is not None and route.rt.plural in self.uninstalled:
            route = None  # a CRD that is not installed: the server serves no such resource
        if route is None:
            message = "the server could not find the requested resource"
            return self._reply(h, rec, status(404, "NotFound", message, {}))
        if rec.method != "GET":
            message = "the server does not allow this method on the requested resource"
            return self._reply(h, rec, status(405, "MethodNotAllowed", message, {}))
        watch = route.watch_path or _parse_bool(arg("watch"))
        rec.verb = "watch" if watch else ("get" if route.name else "list")
        rt, ns = route.rt, route.namespace or ""
        if (rt.plural, rec.verb) in self.forbidden:
            name = route.name if rec.verb == "get" else ""
            return self._reply(h, rec, forbidden(rt, rec.user, rec.verb, ns, name))
        if rec.verb == "get":
            obj = self.store.get(rt, ns, route.name or "")
            body = obj if obj is not None else not_found(rt, route.name or "")
            return self._reply(h, rec, body, 200 if obj is not None else None)
        labels = parse_label_selector(arg("labelSelector"))
        fields = parse_field_selector(arg("fieldSelector"))
        if route.name:  # /watch/namespaces/ns/kind/name: that one object
            by_name = fields
            fields = lambda obj: obj["metadata"]["name"] == route.name and by_name(obj)  # noqa: E731
        watcher = Watcher(rt, route.namespace, labels, fields)
        if watch:
            return self._watch(h, rec, gen, watcher, arg)
        return self._list(h, rec, watcher, arg)

    # -- list -------------------------------------------------------------------------
    def _list(
        self, h: BaseHTTPRequestHandler, rec: KubeRequest, watcher: Watcher, arg: Any
    ) -> None:
        rt = watcher.rt
        rv = _parse_rv(arg("resourceVersion"))
        limit = _parse_int("limit", arg("limit"))
        start = ""
        if arg("continue"):
            at, start = _decode_continue(arg("continue"))
        elif arg("resourceVersionMatch") == "Exact":
            if not rv:
                raise BadRequest(
                    'resourceVersionMatch "Exact" is forbidden for resourceVersion "0"'
                )
            at = rv
        else:
            at = None
        wanted = at if at is not None else rv
        if wanted and not self.store.wait_for_rv(wanted):
            return self._reply(h, rec, too_large_rv(wanted, self.store.rv))
        try:
            with self.store.cond:
                current = self.store.rv
                objs = self.store.snapshot(rt, watcher.namespace, at)
        except Expired:
            message = (
                _CONTINUE_TOO_OLD
                if start
                else "The resourceVersion for the provided list is too old."
            )
            return self._reply(h, rec, expired(message))
        list_rv = at if at is not None else current
        items = [o for o in objs if watcher.matches(o) and _key(o) > start]
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if limit and len(items) > limit:
            meta["continue"] = _encode_continue(list_rv, _key(items[limit - 1]))
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        if not rt.custom:  # typed lists leave TypeMeta off their items; unstructured keep it
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        body = {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": items,
        }
        self._reply(h, rec, body, 200)

    # -- watch ------------------------------------------------------------------------
    def _watch(
        self, h: BaseHTTPRequestHandler, rec: KubeRequest, gen: int, watcher: Watcher, arg: Any
    ) -> None:
        initial_events = _parse_bool(arg("sendInitialEvents"))
        timeout = _parse_int("timeoutSeconds", arg("timeoutSeconds"))
        options = WatchOptions(
            since=None if initial_events else _parse_rv(arg("resourceVersion")) or None,
            bookmarks=_parse_bool(arg("allowWatchBookmarks")),
            initial_events=initial_events,
            timeout=float(timeout or self.watch_timeout),
        )
        rec.status = 200
        if not WatchStream(self, h, gen, watcher, options).serve():
            _drop(h)

    # -- plumbing ---------------------------------------------------------------------
    def _hold_if_hung(self, gen: int) -> bool:
        deadline = time.monotonic() + HANG_LIMIT
        with self.store.cond:
            while self.hanging:
                remaining = deadline - time.monotonic()
                if self.cut_gen != gen or remaining <= 0:
                    return False
                self.store.cond.wait(min(remaining, 0.5))
            return self.cut_gen == gen

    def _reply(
        self, h: BaseHTTPRequestHandler, rec: KubeRequest, body: Any, code: int | None = None
    ) -> None:
        if isinstance(body, bytes):
            data, content_type = body, "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(body).encode(), "application/json"
        rec.status = code if code is not None else body["code"]
        try:
            send_head(h, rec.status, content_type)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except OSError:
            h.close_connection = True


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


def _drop(h: BaseHTTPRequestHandler) -> None:
    h.close_connection = True
    with contextlib.suppress(OSError):
        h.connection.shutdown(socket.SHUT_RDWR)
