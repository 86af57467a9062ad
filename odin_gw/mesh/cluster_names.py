"""Configured services as a Kubernetes cluster names them.

Linkerd's ingress mode (``l5d-dst-override``), Istio's sidecar mode and the Kubernetes
discovery all address a service as ``<name>.<namespace>.svc.cluster.local:<port>``: the
mesh service name (``meshService``, else ``name``), the service's ``namespace`` (else
``serviceMesh.namespace``) and its ``port`` (else the first target's, else 80).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import GatewayConfig, ServiceConfig

CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class ClusterService:
    """One configured service's Kubernetes Service: ``name`` in ``namespace`` on ``port``.

    ``identity`` is the service's ``identity`` key as written (a service account name or
    a full mesh identity; each mesh expands it its own way).
    """

    name: str
    namespace: str
    port: int
    identity: str | None = None

    @property
    def host(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def authority(self) -> str:
        """``host:port``, the port always written (``l5d-dst-override`` wants it)."""
        return f"{self.host}:{self.port}"


def cluster_service(svc: ServiceConfig, config: GatewayConfig) -> ClusterService:
    """The Kubernetes Service behind ``svc``."""
    port = svc.port or (svc.targets[0].port if svc.targets else 80)
    name = svc.mesh_service or svc.name
    if svc.group_of is not None and svc.targets:
        # A backend group given as targets is its service's Kubernetes Service (its
        # derived name is no DNS name): the targets' port says which one answers.
        parent = next((s for s in config.services if s.name == svc.group_of[0]), None)
        if parent is not None:
            name = parent.mesh_service or parent.name
    return ClusterService(
        name=name,
        namespace=svc.namespace or config.service_mesh.namespace,
        port=port,
        identity=svc.identity,
    )


def cluster_services(config: GatewayConfig) -> dict[str, ClusterService]:
    """Every configured service's Kubernetes Service, by mesh service name (the key
    snapshots use); the first service naming a mesh service decides its port."""
    out: dict[str, ClusterService] = {}
    for svc in config.discovered:
        out.setdefault(svc.mesh_service or svc.name, cluster_service(svc, config))
    return out
