"""Kubernetes objects to snapshot entries: EndpointSlices to endpoints, policy to text.

Pure functions over lightkube's models (``EndpointSlice``, ``Service``) and the generic
ServiceProfile (a dict): no network, so the unit tests feed them objects built from dicts.

Endpoints (``discovery.k8s.io/v1``): one per address of every endpoint of every slice,
on the port that carries the configured Service port (:func:`slice_port`). Conditions as
the API documents them: ``ready`` unset counts as ready, ``serving`` unset defers to
``ready``, ``terminating`` unset counts as not terminating. An address listed by two
slices (allowed while the controller moves endpoints) appears once, in its most
serviceable state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .cluster_names import ClusterService
from .snapshot import Endpoint, ServiceEndpoints

#: Service annotations of Linkerd 2.16+ policy copied into the policy text.
POLICY_ANNOTATIONS = ("timeout.linkerd.io/", "retry.linkerd.io/")
#: Order of preference when one address appears in two slices.
_RANK = {"passing": 0, "draining": 1, "critical": 2}


@dataclass(frozen=True)
class SliceEndpoint:
    """What an EndpointSlice says of one address of one endpoint.

    ``ready``/``serving``/``terminating`` are the conditions with the API's defaults
    applied; ``pod`` is the ``targetRef`` name, ``hostname`` the endpoint's hostname.
    """

    address: str
    port: int
    port_name: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone: str | None = None
    node: str | None = None
    pod: str | None = None
    hostname: str | None = None

    @property
    def status(self) -> str:
        """``passing`` (ready), ``draining`` (terminating but still serving: shown, not
        sent new requests) or ``critical`` (not ready, not serving)."""
        if self.ready:
            return "passing"
        if self.serving and self.terminating:
            return "draining"
        return "critical"

    def endpoint(self, **changes: Any) -> Endpoint:
        """A plain-HTTP ``Endpoint`` for this address; ``changes`` override any field
        (an mTLS factory passes ``scheme``, ``identity``, ``sni``...). Always build a new
        ``Endpoint`` this way rather than ``dataclasses.replace`` one: its ``key`` and
        ``host_header`` are derived when it is created."""
        fields: dict[str, Any] = {
            "address": self.address,
            "port": self.port,
            "scheme": "http",
            "healthy": self.ready,
            "status": self.status,
            "node": self.node,
            "service_id": self.pod,
            "locality": self.zone,
        }
        fields.update(changes)
        return Endpoint(**fields)


#: Turns a slice's address into the snapshot's ``Endpoint`` (Istio direct mode makes
#: mTLS endpoints with identity and SNI); the default is :func:`plain_endpoint`.
EndpointFactory = Callable[[ClusterService, SliceEndpoint], Endpoint]


def plain_endpoint(service: ClusterService, seen: SliceEndpoint) -> Endpoint:
    """The default ``EndpointFactory``: plain HTTP to the pod address."""
    return seen.endpoint()


def service_port_name(service: ClusterService, svc: Any | None) -> str | None:
    """The name of the Service port that is the configured port (``""`` when unnamed,
    ``None`` when the Service is unknown or has no such port)."""
    spec = getattr(svc, "spec", None) if svc is not None else None
    for p in getattr(spec, "ports", None) or ():
        if p.port == service.port:
            return p.name or ""
    return None


def slice_port(ports: list | None, port_name: str | None, fallback: int) -> tuple[int, str] | None:
    """``(port, name)`` of a slice that carries the Service port named ``port_name``.

    A slice's ports carry the Service port's *name* and the *target* port number. TCP
    ports only. One port: that one; else the one named ``port_name``; else the first. A
    slice with no ports at all (allowed for custom slices) uses ``fallback`` (the
    configured port); ``None`` when it has ports but none usable.
    """
    if not ports:
        return fallback, ""
    usable = [p for p in ports if (p.protocol or "TCP") == "TCP" and p.port]
    if not usable:
        return None
    if len(usable) > 1 and port_name is not None:
        for p in usable:
            if (p.name or "") == port_name:
                return int(p.port), p.name or ""
    return int(usable[0].port), usable[0].name or ""


def slice_endpoints(
    service: ClusterService, slices: Iterable[Any], svc: Any | None = None
) -> list[SliceEndpoint]:
    """Every address of ``slices`` (the service's EndpointSlices) once, sorted by
    address and port; ``svc`` (the Service object) names the port to use."""
    wanted = service_port_name(service, svc)
    best: dict[tuple[str, int], SliceEndpoint] = {}
    for sl in slices:
        chosen = slice_port(sl.ports, wanted, service.port)
        if chosen is None:
            continue
        port, name = chosen
        for ep in sl.endpoints or ():
            cond = ep.conditions
            ready = True if cond is None or cond.ready is None else bool(cond.ready)
            serving = ready if cond is None or cond.serving is None else bool(cond.serving)
            terminating = bool(cond.terminating) if cond is not None else False
            ref = ep.targetRef
            for address in ep.addresses or ():
                seen = SliceEndpoint(
                    address=address,
                    port=port,
                    port_name=name,
                    ready=ready,
                    serving=serving,
                    terminating=terminating,
                    zone=ep.zone,
                    node=ep.nodeName,
                    pod=ref.name if ref is not None else None,
                    hostname=ep.hostname,
                )
                key = (address, port)
                held = best.get(key)
                if held is None or _RANK[seen.status] < _RANK[held.status]:
                    best[key] = seen
    return [best[k] for k in sorted(best)]


def profile_entry(profile: Mapping[str, Any]) -> dict[str, Any]:
    """A ServiceProfile as the policy text carries it: name, namespace and the spec as
    stored (not checked here: workers compile it and report what does not parse), or
    ``spec: null`` with an ``error`` when it is not even an object with a ``spec`` object."""
    meta = profile.get("metadata") if isinstance(profile, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    entry: dict[str, Any] = {"name": meta.get("name"), "namespace": meta.get("namespace")}
    spec = profile.get("spec") if isinstance(profile, Mapping) else None
    if isinstance(spec, Mapping):
        entry["spec"] = spec
    else:
        entry["spec"] = None
        entry["error"] = (
            f"ServiceProfile {entry['namespace']}/{entry['name']} has no spec object "
            f"(spec is {type(spec).__name__ if spec is not None else 'missing'})"
        )
    return entry


def policy_annotations(svc: Any | None) -> dict[str, str]:
    """The Service's ``timeout.linkerd.io/*`` and ``retry.linkerd.io/*`` annotations."""
    meta = getattr(svc, "metadata", None) if svc is not None else None
    annotations = getattr(meta, "annotations", None) or {}
    return {k: str(v) for k, v in annotations.items() if k.startswith(POLICY_ANNOTATIONS)}


def policy_text(profile: Mapping[str, Any] | None, svc: Any | None) -> str:
    """The service's route policy as canonical JSON text (``""``: none):
    ``{"annotations": {...}, "profile": {"name", "namespace", "spec"} | null}``."""
    annotations = policy_annotations(svc)
    if profile is None and not annotations:
        return ""
    doc = {
        "profile": profile_entry(profile) if profile is not None else None,
        "annotations": annotations,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def service_view(
    service: ClusterService,
    name: str,
    slices: Iterable[Any],
    svc: Any | None,
    profile: Mapping[str, Any] | None,
    *,
    source: str,
    factory: EndpointFactory = plain_endpoint,
    with_policy: bool = True,
) -> ServiceEndpoints:
    """The snapshot entry of one service from its slices, Service and ServiceProfile."""
    endpoints = tuple(factory(service, seen) for seen in slice_endpoints(service, slices, svc))
    policy = policy_text(profile, svc) if with_policy else ""
    return ServiceEndpoints(name=name, endpoints=endpoints, source=source, policy=policy)
