"""The object store behind the kube-apiserver stand-in: etcd plus the watch cache.

One global revision counter (etcd's) stamps every write; each write is kept in a
history of events so watches can resume from a resourceVersion and lists can be served
at an exact one, until :meth:`KubeStore.compact` (or the ``history_limit`` window)
forgets it. A watch older than what is kept gets ``410 Expired`` "too old resource
version: <rv> (<oldest - 1>)", worded as the watch cache does
(``apiserver/pkg/storage/cacher/watch_cache.go``).

Locking: every field is guarded by ``cond`` (one Condition); it is notified on each
write so watch streams wake at once. Stored objects are never mutated after they are
stored (a write stores a new dict), so readers may serialise them outside the lock.
"""

from __future__ import annotations

import bisect
import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.doubles.kube_model import ResourceType, new_uid, now_rfc3339

__all__ = ["Event", "Expired", "KubeStore", "Watcher"]

#: How long a read waits for a future resourceVersion (the watch cache's blockTimeout).
FRESH_WAIT = 3.0

Key = tuple[str, str, str]  # (plural, namespace, name)
_CLIENT_SET = ("labels", "annotations", "ownerReferences")


class Expired(Exception):
    """The resourceVersion asked for is older than the history kept (HTTP 410)."""


@dataclass(frozen=True)
class Event:
    """One write. ``obj`` is the state after it (for DELETED, the last state stamped
    with the deletion's revision); ``prev`` the state before (None on create)."""

    rv: int
    type: str
    rt: ResourceType
    namespace: str
    name: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None


class Watcher:
    """One open watch: the store pushes matching writes into ``pending``.

    Selector transitions follow the cacher: an object that stops matching is sent as
    DELETED, one that starts matching as ADDED.
    """

    def __init__(
        self,
        rt: ResourceType,
        namespace: str | None,
        labels: Callable[[dict[str, str]], bool],
        fields: Callable[[dict[str, Any]], bool],
    ) -> None:
        self.rt = rt
        self.namespace = namespace
        self._labels = labels
        self._fields = fields
        self.pending: deque[tuple[str, dict[str, Any]]] = deque()

    def matches(self, obj: dict[str, Any]) -> bool:
        """Whether ``obj`` passes the watch's label and field selectors."""
        return self._labels(obj["metadata"].get("labels") or {}) and self._fields(obj)

    def view(self, event: Event) -> tuple[str, dict[str, Any]] | None:
        """What this watch sees of ``event`` (None: nothing)."""
        if event.rt is not self.rt or (self.namespace and event.namespace != self.namespace):
            return None
        now = event.type != "DELETED" and self.matches(event.obj)
        before = event.prev is not None and self.matches(event.prev)
        if now:
            return ("MODIFIED" if before else "ADDED"), event.obj
        return ("DELETED", event.obj) if before else None


class KubeStore:
    """Objects by (resource, namespace, name), a revision counter and the event history."""

    def __init__(self, *, start_rv: int = 1, history_limit: int | None = None) -> None:
        self.cond = threading.Condition()
        self.rv = start_rv
        #: A watch may resume from any RV >= floor; lists at an exact RV likewise.
        self.floor = 0
        self.history_limit = history_limit
        self.history: list[Event] = []
        self.objects: dict[Key, dict[str, Any]] = {}
        self.watchers: set[Watcher] = set()

    # -- writes -----------------------------------------------------------------------
    def put(self, rt: ResourceType, namespace: str, name: str, content: dict[str, Any]) -> dict:
        """Create or update an object from ``content`` (metadata labels/annotations and
        the body); the store sets uid, resourceVersion, generation, creationTimestamp.

        An update that changes nothing is a no-op (no new revision, no event), as a
        real update with identical content is. Returns a copy of the stored object.
        """
        with self.cond:
            key = (rt.plural, namespace, name)
            prev = self.objects.get(key)
            if prev is not None and _content(prev) == _content(content):
                return copy.deepcopy(prev)
            self.rv += 1
            meta_in = content.get("metadata") or {}
            meta: dict[str, Any] = {"name": name, "namespace": namespace}
            meta["uid"] = prev["metadata"]["uid"] if prev else new_uid()
            meta["resourceVersion"] = str(self.rv)
            if rt.generation:
                gen = prev["metadata"]["generation"] if prev else 0
                body_changed = prev is None or _body(prev) != _body(content)
                meta["generation"] = gen + 1 if body_changed else gen
            meta["creationTimestamp"] = (
                prev["metadata"]["creationTimestamp"] if prev else now_rfc3339()
            )
            for extra in _CLIENT_SET:
                if meta_in.get(extra):
                    meta[extra] = copy.deepcopy(meta_in[extra])
            obj = {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}
            obj.update(copy.deepcopy(_body(content)))
            self.objects[key] = obj
            self._record(
                Event(self.rv, "MODIFIED" if prev else "ADDED", rt, namespace, name, obj, prev)
            )
            return copy.deepcopy(obj)

    def delete(self, rt: ResourceType, namespace: str, name: str) -> bool:
        """Delete an object; False if there was none."""
        with self.cond:
            prev = self.objects.pop((rt.plural, namespace, name), None)
            if prev is None:
                return False
            self.rv += 1
            gone = dict(prev, metadata=dict(prev["metadata"], resourceVersion=str(self.rv)))
            self._record(Event(self.rv, "DELETED", rt, namespace, name, gone, prev))
            return True

    def _record(self, event: Event) -> None:
        self.history.append(event)
        if self.history_limit is not None and len(self.history) > self.history_limit:
            del self.history[: len(self.history) - self.history_limit]
            self.floor = max(self.floor, self.history[0].rv - 1)
        for watcher in self.watchers:
            seen = watcher.view(event)
            if seen is not None:
                watcher.pending.append(seen)
        self.cond.notify_all()

    def compact(self) -> int:
        """Forget the history (etcd compaction): older RVs get 410 from now on.

        Watches already open keep streaming, as the real watchers do. Returns the
        revision compacted to."""
        with self.cond:
            self.history.clear()
            self.floor = self.rv
            self.cond.notify_all()
            return self.rv

    # -- reads ------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            return self.objects.get((rt.plural, namespace, name))

    def snapshot(self, rt: ResourceType, namespace: str | None, rv: int | None = None) -> list:
        """Objects of ``rt`` (in ``namespace``, or all) at revision ``rv`` (None: now),
        in etcd key order. Raises :class:`Expired` when ``rv`` is no longer kept."""
        with self.cond:
            state = {k: v for k, v in self.objects.items() if k[0] == rt.plural}
            if rv is not None and rv < self.rv:
                if rv < self.floor:
                    raise Expired(rv)
                # Undo the writes made after rv, newest first.
                for event in reversed(self.history[self._after(rv) :]):
                    if event.rt is not rt:
                        continue
                    key = (rt.plural, event.namespace, event.name)
                    if event.prev is None:
                        state.pop(key, None)
                    else:
                        state[key] = event.prev
        return [state[k] for k in sorted(state) if namespace is None or k[1] == namespace]

    def wait_for_rv(self, rv: int) -> bool:
        """Wait up to ``FRESH_WAIT`` s for the revision to reach ``rv``; False if it
        did not (the caller answers 504 "Too large resource version")."""
        deadline = time.monotonic() + FRESH_WAIT
        with self.cond:
            while self.rv < rv:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
        return True

    def _after(self, rv: int) -> int:
        """Index of the first history event newer than ``rv``."""
        return bisect.bisect_right([e.rv for e in self.history], rv)

    # -- watches ----------------------------------------------------------------------
    def open_watch(self, watcher: Watcher, since: int | None) -> list[tuple[str, dict]]:
        """Register ``watcher`` and return its first events, atomically with respect to
        writes: ``since=None`` gives a synthetic ADDED per current matching object (the
        "Get State and Start at Most Recent" / "Start at Any" semantics), an RV gives
        the kept events after it. Raises :class:`Expired` for an RV older than kept.
        The caller must :meth:`close_watch` it."""
        with self.cond:
            if since is None:
                first = [
                    ("ADDED", obj)
                    for obj in self.snapshot(watcher.rt, watcher.namespace)
                    if watcher.matches(obj)
                ]
            else:
                if since < self.floor:
                    raise Expired(since)
                first = []
                for event in self.history[self._after(since) :]:
                    seen = watcher.view(event)
                    if seen is not None:
                        first.append(seen)
            self.watchers.add(watcher)
            return first

    def close_watch(self, watcher: Watcher) -> None:
        with self.cond:
            self.watchers.discard(watcher)


def _body(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion", "metadata")}


def _content(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a client controls of an object: labels, annotations, owners and the body."""
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in _CLIENT_SET if meta.get(k)}, _body(obj)
