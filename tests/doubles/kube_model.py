"""Objects of the kube-apiserver stand-in, in the JSON shapes a real API server sends.

Resource types served (``RESOURCES``): ``discovery.k8s.io/v1`` EndpointSlices, core
``v1`` Services and Linkerd's ``linkerd.io/v1alpha2`` ServiceProfiles (a CRD). Shapes
follow the Go types (``k8s.io/api/discovery/v1/types.go``, ``core/v1/types.go``) as
``encoding/json`` writes them: pointer fields with ``omitempty`` are left out when
unset, slices without it (``endpoints``, ``ports``) stay as ``null``.

``Status`` bodies follow ``metav1.Status`` as ``apimachinery/pkg/api/errors`` builds
them (``NewNotFound``, ``NewForbidden``, ``NewResourceExpired``, ``NewTimeoutError``...).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ENDPOINT_SLICES",
    "INITIAL_EVENTS_END",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "RESOURCES",
    "SERVICES",
    "SERVICE_NAME_LABEL",
    "SERVICE_PROFILES",
    "ResourceType",
    "SliceEndpoint",
    "bookmark",
    "cluster_ip",
    "endpoint_slice_body",
    "expired",
    "forbidden",
    "not_found",
    "service_body",
    "status",
    "too_large_rv",
]

#: Label the EndpointSlice controller puts on every slice it manages.
MANAGED_BY = "endpointslice-controller.k8s.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
#: Annotation on the BOOKMARK that ends the initial events of a ``sendInitialEvents`` watch.
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


@dataclass(frozen=True)
class ResourceType:
    """One API resource: where it is served and how its objects look."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    #: A CustomResourceDefinition: served as unstructured JSON, so list items keep
    #: kind/apiVersion and a bookmark carries nothing but metadata.resourceVersion.
    custom: bool = False
    #: Go zero values a typed bookmark object carries besides TypeMeta and metadata.
    zero: dict[str, Any] = field(default_factory=dict)
    #: Whether the registry strategy keeps ``metadata.generation`` (Services don't).
    generation: bool = True

    @property
    def api_version(self) -> str:
        """``group/version``, or just ``v1`` for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        """URL prefix of the group version: ``/api/v1`` or ``/apis/<group>/<version>``."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def list_kind(self) -> str:
        """Kind of a list answer: ``EndpointSliceList``."""
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        """``<plural>.<group>`` as error messages name a resource (``services`` for core)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


ENDPOINT_SLICES = ResourceType(
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    "EndpointSlice",
    zero={"addressType": "", "endpoints": None, "ports": None},
)
SERVICES = ResourceType(
    "",
    "v1",
    "services",
    "Service",
    zero={"spec": {}, "status": {"loadBalancer": {}}},
    generation=False,
)
SERVICE_PROFILES = ResourceType(
    "linkerd.io", "v1alpha2", "serviceprofiles", "ServiceProfile", custom=True
)

#: Every resource served, by (URL prefix, plural).
RESOURCES: dict[tuple[str, str], ResourceType] = {
    (r.prefix, r.plural): r for r in (ENDPOINT_SLICES, SERVICES, SERVICE_PROFILES)
}


def now_rfc3339() -> str:
    """A ``metav1.Time`` as JSON: RFC 3339 in UTC, whole seconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_uid() -> str:
    return str(uuid.uuid4())


# -- Status ---------------------------------------------------------------------------
def status(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``metav1.Status`` failure as the API server writes it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _details(rt: ResourceType, name: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name:
        out["name"] = name
    if rt.group:
        out["group"] = rt.group
    out["kind"] = rt.plural
    return out


def not_found(rt: ResourceType, name: str) -> dict[str, Any]:
    """``errors.NewNotFound``: ``services "x" not found``."""
    return status(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def forbidden(rt: ResourceType, user: str, verb: str, namespace: str, name: str = "") -> dict:
    """``errors.NewForbidden`` with the RBAC authorizer's reason, as kubectl shows it."""
    what = f'{rt.qualified} "{name}"' if name else rt.qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    message = (
        f'{what} is forbidden: User "{user}" cannot {verb} resource "{rt.plural}" '
        f'in API group "{rt.group}" {scope}'
    )
    return status(403, "Forbidden", message, _details(rt, name))


def expired(message: str) -> dict[str, Any]:
    """``errors.NewResourceExpired``: 410 with reason ``Expired``."""
    return status(410, "Expired", message)


def too_large_rv(wanted: int, current: int) -> dict[str, Any]:
    """``storage.NewTooLargeResourceVersionError``: a 504 Timeout, retry after 1 s."""
    details = {
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    }
    message = f"Too large resource version: {wanted}, current: {current}"
    return status(504, "Timeout", message, details)


def bookmark(rt: ResourceType, rv: int, *, initial_events_end: bool = False) -> dict[str, Any]:
    """The object of a BOOKMARK event: an empty object of the type at ``rv``.

    The cacher makes it with the type's ``newFunc`` and sets only the resourceVersion,
    so typed objects carry their Go zero values (``creationTimestamp: null`` is how a
    zero ``metav1.Time`` encodes); a CRD's unstructured object has just the metadata.
    """
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    if not rt.custom:
        meta["creationTimestamp"] = None
    if initial_events_end:
        meta["annotations"] = {INITIAL_EVENTS_END: "true"}
    return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta, **rt.zero}


# -- EndpointSlices -------------------------------------------------------------------
@dataclass
class SliceEndpoint:
    """One ``endpoints[]`` entry of an EndpointSlice, in test-friendly form.

    ``serving`` defaults to ``ready`` as the EndpointSlice controller sets it (a pod
    that is ready but terminating is ``ready: false, serving: true, terminating:
    true``). ``target_ref`` is a pod name (rendered as a Pod reference in the slice's
    namespace) or a ready ``ObjectReference`` dict.
    """

    addresses: list[str] | str
    ready: bool = True
    serving: bool | None = None
    terminating: bool = False
    zone: str | None = None
    node_name: str | None = None
    target_ref: str | dict[str, Any] | None = None
    hostname: str | None = None

    @classmethod
    def coerce(cls, value: SliceEndpoint | dict[str, Any] | str) -> SliceEndpoint:
        """Accept a SliceEndpoint, an address string, or a dict using either the
        Python names or the API's (``address``/``addresses``, ``nodeName``,
        ``targetRef``)."""
        if isinstance(value, SliceEndpoint):
            return value
        if isinstance(value, str):
            return cls(addresses=value)
        data = dict(value)
        aliases = {"address": "addresses", "nodeName": "node_name", "targetRef": "target_ref"}
        for api_name, py_name in aliases.items():
            if api_name in data:
                data[py_name] = data.pop(api_name)
        conditions = data.pop("conditions", None) or {}
        for key in ("ready", "serving", "terminating"):
            if key in conditions:
                data[key] = conditions[key]
        return cls(**data)

    def render(self, namespace: str) -> dict[str, Any]:
        addresses = [self.addresses] if isinstance(self.addresses, str) else list(self.addresses)
        serving = self.ready if self.serving is None else self.serving
        out: dict[str, Any] = {
            "addresses": addresses,
            "conditions": {
                "ready": self.ready,
                "serving": serving,
                "terminating": self.terminating,
            },
        }
        if self.hostname is not None:
            out["hostname"] = self.hostname
        if isinstance(self.target_ref, str):
            out["targetRef"] = {
                "kind": "Pod",
                "namespace": namespace,
                "name": self.target_ref,
                "uid": _stable_uid(namespace, self.target_ref),
            }
        elif self.target_ref is not None:
            out["targetRef"] = dict(self.target_ref)
        if self.node_name is not None:
            out["nodeName"] = self.node_name
        if self.zone is not None:
            out["zone"] = self.zone
        return out


def _stable_uid(*parts: str) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256("/".join(parts).encode()).digest()[:16], version=4))


def _slice_port(port: int | dict[str, Any]) -> dict[str, Any]:
    if isinstance(port, int):
        port = {"port": port}
    out: dict[str, Any] = {}
    # Go's field order: name, protocol, port, appProtocol (omitempty pointers).
    if port.get("name") is not None:
        out["name"] = port["name"]
    out["protocol"] = port.get("protocol", "TCP")
    if port.get("port") is not None:
        out["port"] = int(port["port"])
    app_protocol = port.get("appProtocol", port.get("app_protocol"))
    if app_protocol is not None:
        out["appProtocol"] = app_protocol
    return out


def endpoint_slice_body(
    namespace: str,
    endpoints: list[Any],
    ports: list[Any],
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """The non-metadata part of an EndpointSlice (``addressType``, ``endpoints``, ``ports``)."""
    return {
        "addressType": address_type,
        "endpoints": [SliceEndpoint.coerce(e).render(namespace) for e in endpoints],
        "ports": [_slice_port(p) for p in ports],
    }


# -- Services -------------------------------------------------------------------------
def cluster_ip(namespace: str, name: str) -> str:
    """A stable ClusterIP in 10.96.0.0/12 (kubeadm's default service range)."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return f"10.{96 + digest[0] % 16}.{digest[1]}.{digest[2] % 254 + 1}"


def _service_port(port: int | dict[str, Any]) -> dict[str, Any]:
    if isinstance(port, int):
        port = {"port": port}
    out: dict[str, Any] = {}
    if port.get("name"):
        out["name"] = port["name"]
    out["protocol"] = port.get("protocol", "TCP")
    app_protocol = port.get("appProtocol", port.get("app_protocol"))
    if app_protocol is not None:
        out["appProtocol"] = app_protocol
    out["port"] = int(port["port"])
    # targetPort is an IntOrString defaulted to the port by the API server.
    target = port.get("targetPort", port.get("target_port", port["port"]))
    out["targetPort"] = target if isinstance(target, str) else int(target)
    return out


def service_body(
    namespace: str, name: str, ports: list[Any], selector: dict[str, str] | None
) -> dict[str, Any]:
    """``spec`` and ``status`` of a ClusterIP Service with the API server's defaults."""
    ip = cluster_ip(namespace, name)
    spec: dict[str, Any] = {"ports": [_service_port(p) for p in ports]}
    if selector:
        spec["selector"] = dict(selector)
    spec.update(
        {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        }
    )
    return {"spec": spec, "status": {"loadBalancer": {}}}
