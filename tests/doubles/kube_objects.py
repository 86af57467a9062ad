"""The contents of the stand-in cluster, written the way Kubernetes' controllers write them.

:class:`KubeObjects` is the test-side API for objects (``upsert_*`` / ``delete_*``,
:meth:`~KubeObjects.compact`); :class:`~tests.doubles.kube_apiserver.KubeApiServerDouble`
serves the same objects over HTTPS. Every write goes through the store, so it bumps
the one global resourceVersion and reaches open watches at once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from tests.doubles.kube_model import (
    ENDPOINT_SLICES,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    RESOURCES,
    SERVICE_NAME_LABEL,
    SERVICE_PROFILES,
    SERVICES,
    ResourceType,
    SliceEndpoint,
    endpoint_slice_body,
    service_body,
)
from tests.doubles.kube_store import KubeStore

__all__ = ["KubeObjects", "resource_type"]


def resource_type(name: str | ResourceType) -> ResourceType:
    """The served resource named by plural (``endpointslices``) or kind (``EndpointSlice``)."""
    if isinstance(name, ResourceType):
        return name
    for rt in RESOURCES.values():
        if name.lower() in (rt.plural, rt.kind.lower()):
            return rt
    raise ValueError(
        f"unknown resource {name!r}; known: {sorted(r.plural for r in RESOURCES.values())}"
    )


class KubeObjects:
    """EndpointSlices, Services and ServiceProfiles in a :class:`KubeStore`."""

    def __init__(self, store: KubeStore) -> None:
        self.store = store

    def compact(self) -> int:
        """Forget the event history: a watch or exact list from an older RV gets 410."""
        return self.store.compact()

    @property
    def resource_version(self) -> int:
        """The current global revision."""
        with self.store.cond:
            return self.store.rv

    def get(self, resource: str | ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored object, or None."""
        obj = self.store.get(resource_type(resource), namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def upsert_endpoint_slice(
        self,
        namespace: str,
        name: str,
        service: str,
        endpoints: Iterable[SliceEndpoint | dict[str, Any] | str] = (),
        ports: Iterable[int | dict[str, Any]] = (),
        *,
        address_type: str = "IPv4",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or replace an EndpointSlice of ``service`` as the EndpointSlice
        controller writes it (labels ``kubernetes.io/service-name`` and
        ``endpointslice.kubernetes.io/managed-by``, owned by the Service if it exists).
        ``endpoints``: :class:`SliceEndpoint`, dicts with the same keys (or the API's
        names) or bare addresses; ``ports``: dicts ``{name, port, protocol,
        appProtocol}`` or port numbers. Returns the stored object."""
        meta: dict[str, Any] = {
            "labels": {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY, **(labels or {})},
            "annotations": dict(annotations or {}),
        }
        owner = self.store.get(SERVICES, namespace, service)
        if owner is not None:
            meta["ownerReferences"] = [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        body = endpoint_slice_body(namespace, list(endpoints), list(ports), address_type)
        return self.store.put(ENDPOINT_SLICES, namespace, name, {"metadata": meta, **body})

    def delete_endpoint_slice(self, namespace: str, name: str) -> bool:
        """Delete an EndpointSlice; False if there was none."""
        return self.store.delete(ENDPOINT_SLICES, namespace, name)

    def upsert_service(
        self,
        namespace: str,
        name: str,
        ports: Iterable[int | dict[str, Any]] = (),
        annotations: Mapping[str, str] | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        selector: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or replace a ClusterIP Service; ``ports``: ``{name, port, targetPort,
        protocol, appProtocol}`` dicts or numbers (targetPort defaults to port)."""
        meta = {"labels": dict(labels or {}), "annotations": dict(annotations or {})}
        body = service_body(namespace, name, list(ports), dict(selector or {"app": name}))
        return self.store.put(SERVICES, namespace, name, {"metadata": meta, **body})

    def delete_service(self, namespace: str, name: str) -> bool:
        """Delete a Service; False if there was none."""
        return self.store.delete(SERVICES, namespace, name)

    def upsert_service_profile(
        self,
        namespace: str,
        name: str,
        spec: Any,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or replace a ServiceProfile (named ``<svc>.<ns>.svc.cluster.local`` by
        Linkerd's convention). ``spec`` is stored as given, valid or not."""
        meta = {"labels": dict(labels or {}), "annotations": dict(annotations or {})}
        return self.store.put(
            SERVICE_PROFILES, namespace, name, {"metadata": meta, "spec": copy.deepcopy(spec)}
        )

    def delete_service_profile(self, namespace: str, name: str) -> bool:
        """Delete a ServiceProfile; False if there was none."""
        return self.store.delete(SERVICE_PROFILES, namespace, name)
