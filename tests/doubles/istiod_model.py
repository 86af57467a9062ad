"""Data model of the istiod double: endpoints, proxy nodes, identities, refusals.

What istiod checks on a new xDS stream, read from istio/istio:

* ``pilot/pkg/xds/ads.go`` ``Stream``: authentication first, before any request is read;
  a failure is ``UNAUTHENTICATED`` "authentication failure" (``pkg/security``
  ``Authenticate``; the per-authenticator reasons are only logged).
* ``pkg/xds/server.go`` ``Receive``: the first request must carry a node with an id, else
  ``INVALID_ARGUMENT`` "missing node information".
* ``pilot/pkg/model/context.go`` ``ParseServiceNodeWithMetadata``: the id is
  ``<type>~<ip>~<pod>.<ns>~<ns>.svc.<domain>``, exactly four ``~`` parts, a known type,
  and an IP in ``INSTANCE_IPS`` or the id; failures are ``INVALID_ARGUMENT``.
* ``pilot/pkg/xds/auth.go`` ``authorize``: one of the caller's SPIFFE identities must have
  the proxy's config namespace (``NAMESPACE`` metadata, else the first label of the DNS
  domain) and, when ``SERVICE_ACCOUNT`` is set, that service account; otherwise
  ``PERMISSION_DENIED`` "authorization failed: no identities ([...]) matched ns/sa".
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = [
    "HEALTH_STATUSES",
    "NODE_TYPES",
    "EdsEndpoint",
    "ProxyNode",
    "Refused",
    "authorize",
    "parse_node",
    "spiffe_id",
]

#: ``envoy.config.core.v3.HealthStatus`` names an endpoint may carry here.
HEALTH_STATUSES = ("HEALTHY", "UNHEALTHY", "DRAINING")

#: The types istiod lists in its error message (``model.NodeTypes``).
NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel")
#: ``IsApplicationNodeType`` also accepts ``agentgateway`` (not listed in the message).
_ACCEPTED_NODE_TYPES = (*NODE_TYPES, "agentgateway")


@dataclass
class EdsEndpoint:
    """One workload endpoint of a service, as istiod's endpoint index holds it.

    ``health`` becomes ``LbEndpoint.health_status`` (istiod sends UNHEALTHY endpoints by
    default, DRAINING ones only for persistent-session services); ``weight`` its
    ``load_balancing_weight`` (istiod sends 1 for 0); ``locality`` (region, zone,
    subzone) groups endpoints into ``LocalityLbEndpoints``. ``tls_mode="istio"`` (the
    pod has a sidecar) adds the EDS metadata ``envoy.transport_socket_match:
    {tlsMode: istio}`` that selects the cluster's mTLS transport socket; ``None`` means
    plain text.

    ``service_account``: istiod does *not* put it in EDS. The endpoint's identity only
    reaches the client through CDS: the SAN matchers of the cluster's mTLS transport
    socket are ``spiffe://<td>/ns/<namespace>/sa/<service_account>`` of the service's
    workloads (used here when ``set_service`` gets no explicit ``sans``). EDS metadata
    holds ``istio: {workload: "<workload>;<namespace>;<canonical name>;<revision>;
    <cluster id>"}`` for telemetry.
    """

    address: str
    port: int
    health: str = "HEALTHY"
    weight: int = 1
    locality: tuple[str, str, str] = ("", "", "")
    tls_mode: str | None = "istio"
    service_account: str | None = None
    namespace: str = "default"
    workload: str = ""

    def __post_init__(self) -> None:
        if self.health not in HEALTH_STATUSES:
            raise ValueError(f"health must be one of {HEALTH_STATUSES}, not {self.health!r}")

    @property
    def locality_label(self) -> str:
        """istiod's ``Locality.Label``: ``region/zone/subzone`` (sort key of groups)."""
        region, zone, subzone = self.locality
        if not zone:
            return region
        return f"{region}/{zone}/{subzone}" if subzone else f"{region}/{zone}"


class Refused(Exception):
    """A stream istiod would end with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ProxyNode:
    """What istiod derives from ``DiscoveryRequest.node`` (``model.Proxy``)."""

    id: str
    type: str
    ip_addresses: list[str]
    pod: str
    dns_domain: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config_namespace(self) -> str:
        """``GetProxyConfigNamespace``: ``NAMESPACE`` metadata, else ``<ns>`` of the domain."""
        namespace = self.metadata.get("NAMESPACE")
        if isinstance(namespace, str) and namespace:
            return namespace
        parts = self.dns_domain.split(".")
        return parts[0] if len(parts) > 1 else ""

    @property
    def service_account(self) -> str:
        value = self.metadata.get("SERVICE_ACCOUNT")
        return value if isinstance(value, str) else ""


def _go_quote(text: str) -> str:
    # Go's %q for the printable ASCII we meet here; json escapes the same characters.
    return json.dumps(text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_node(node_id: str, metadata: dict[str, Any]) -> ProxyNode:
    """Validate a node like ``ParseServiceNodeWithMetadata``; raise :class:`Refused`."""
    if not node_id:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "missing node information")
    parts = node_id.split("~")
    if len(parts) != 4:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"missing parts in the service node {_go_quote(node_id)}",
        )
    node_type, ip, pod, domain = parts
    if node_type not in _ACCEPTED_NODE_TYPES:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid node type (valid types: [{' '.join(NODE_TYPES)}]) "
            f"in the service node {_go_quote(node_id)}",
        )
    # INSTANCE_IPS is a comma separated string (model.StringList); all must be IPs.
    raw_ips = metadata.get("INSTANCE_IPS")
    instance_ips = [p for p in raw_ips.split(",") if p] if isinstance(raw_ips, str) else []
    if instance_ips and all(_is_ip(p) for p in instance_ips):
        ips = instance_ips
    elif _is_ip(ip):
        ips = [ip]
    else:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            "no valid IP address in the service node id or metadata",
        )
    return ProxyNode(node_id, node_type, ips, pod, domain, dict(metadata))


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://<td>/ns/<ns>/sa/<sa>``: the identity Istio issues to a workload."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def authorize(node: ProxyNode, identities: list[str]) -> str:
    """Return the identity that may act for ``node`` (``checkConnectionIdentity``).

    Raises :class:`Refused` (``PERMISSION_DENIED``) when none matches.
    """
    namespace, service_account = node.config_namespace, node.service_account
    for identity in identities:
        # spiffe://<td>/ns/<ns>/sa/<sa>
        segments = identity.removeprefix("spiffe://").split("/")
        if len(segments) != 5 or segments[1] != "ns" or segments[3] != "sa":
            continue
        if namespace and segments[2] != namespace:
            continue
        if service_account and segments[4] != service_account:
            continue
        return identity
    raise Refused(
        grpc.StatusCode.PERMISSION_DENIED,
        f"authorization failed: no identities ([{' '.join(identities)}]) "
        f"matched {namespace}/{service_account}",
    )
