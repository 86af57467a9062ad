"""What Kubernetes discovery reads, as *feeds*: one (kind, namespace) list+watch each.

A feed holds the objects of the configured services only (dropped on arrival
otherwise), by owner: the service a slice is labelled with, a Service's name, a
ServiceProfile's name (``<svc>.<ns>.svc.cluster.local``). See :mod:`.kubernetes`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Service
from lightkube.resources.discovery_v1 import EndpointSlice

#: Linkerd's ServiceProfile CRD, as a lightkube generic (dict) resource.
ServiceProfile = create_namespaced_resource(
    "linkerd.io", "v1alpha2", "ServiceProfile", "serviceprofiles"
)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: The server ends each watch request after this long (``timeoutSeconds``).
WATCH_SECONDS = 60
#: A watch stream silent for WATCH_SECONDS plus this is taken for dead and reopened.
WATCH_GRACE = 15.0
MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.5
#: Lists asked at once (start-up with many namespaces), and objects per list page.
OPENING = 8
LIST_CHUNK = 500


class Kind:
    """One resource kind discovery reads: its lightkube class, its RBAC name, and the
    owner of an object (the service a slice belongs to, a Service's or profile's name)."""

    def __init__(self, label: str, rbac: str, resource: Any, by_label: bool = False) -> None:
        self.label = label
        self.rbac = rbac
        self.resource = resource
        self.by_label = by_label

    def owner(self, obj: Any) -> str | None:
        meta = obj.metadata
        if meta is None:
            return None
        if self.by_label:
            return (meta.labels or {}).get(SERVICE_NAME_LABEL)
        return meta.name


SLICES = Kind("endpointslices", "endpointslices.discovery.k8s.io", EndpointSlice, True)
SERVICES = Kind("services", "services", Service)
PROFILES = Kind("serviceprofiles", "serviceprofiles.linkerd.io", ServiceProfile)


class Feed:
    """One (kind, namespace) list+watch and the objects it holds, by owner. Only owners
    of configured services are kept. Used from one event loop at a time."""

    def __init__(self, kind: Kind, namespace: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.owners: dict[str, list[str]] = {}  # owner -> mesh service names
        self.by_owner: dict[str, dict[str, Any]] = {}
        self.owner_of: dict[str, str] = {}  # object name -> owner
        self.rv: str | None = None
        self.synced = False
        self.missing = False  # the API server does not serve the kind (no CRD)
        self.names: frozenset[str] = frozenset()  # every object name listed

    @property
    def what(self) -> str:
        return f"kubernetes {self.kind.label} {self.namespace}"

    def objects(self, owner: str) -> list[Any]:
        held = self.by_owner.get(owner) or {}
        return [held[n] for n in sorted(held)]

    def replace(self, items: Iterable[Any], rv: str | None) -> set[str]:
        """Take a list's answer; returns every service this feed serves."""
        self.by_owner, self.owner_of = {}, {}
        listed = set()
        for obj in items:
            if obj.metadata is not None and obj.metadata.name:
                listed.add(obj.metadata.name)
                self._put(obj)
        self.names = frozenset(listed)
        self.rv, self.synced = rv, True
        return {n for served in self.owners.values() for n in served}

    def apply(self, event: str, obj: Any) -> set[str]:
        """Take one watch event; returns the services it changed."""
        meta = obj.metadata
        if meta is not None and meta.resourceVersion:
            self.rv = meta.resourceVersion
        name = meta.name if meta is not None else None
        if name is None:
            return set()
        changed = set()
        old = self.owner_of.pop(name, None)
        if old is not None:
            self.by_owner.get(old, {}).pop(name, None)
            changed.update(self.owners.get(old, ()))
        if event != "DELETED":
            owner = self._put(obj)
            if owner is not None:
                changed.update(self.owners[owner])
        return changed

    def _put(self, obj: Any) -> str | None:
        owner = self.kind.owner(obj)
        if owner not in self.owners:
            return None
        self.by_owner.setdefault(owner, {})[obj.metadata.name] = obj
        self.owner_of[obj.metadata.name] = owner
        return owner


Feeds = dict[tuple[str, str], "Feed"]


class Backoff:
    """Jittered exponential back-off: FIRST_BACKOFF doubling up to MAX_BACKOFF."""

    def __init__(self) -> None:
        self.delay = FIRST_BACKOFF

    def next(self) -> float:
        delay = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.delay * 2, MAX_BACKOFF)
        return delay

    def reset(self) -> None:
        self.delay = FIRST_BACKOFF
