"""``consul.connectMode: sidecar``: the gateway runs with its own Consul sidecar.

Since Consul 1.14 (consul-k8s 1.0) Kubernetes installs have no client agents: each pod
gets a consul-dataplane (Envoy) sidecar, and the agent's Connect endpoints that issue a
leaf certificate are deprecated. In this mode the gateway is meshed like any workload:

* requests go in plain HTTP to the sidecar, never to an instance: to the service's
  explicit upstream listener (``services[].upstream: 127.0.0.1:<port>``) or, with
  transparent proxy, to ``<meshService>.virtual.consul`` (see ``routing.sidecar_endpoint``);
  the sidecar picks the instance, originates mTLS with its own leaf and checks the peer;
* no leaf or CA roots are fetched and no TLS material is needed;
* discovery (catalog + health, which Consul servers answer too) still runs, so
  ``/admin/services`` shows the instances and their health, for information.

Discovery lists the services' own instances (``/v1/health/service/<svc>``), not their
sidecar proxies, and marks them plain HTTP without a SPIFFE identity: identities are
the sidecar's business, and knowing them would need the CA roots.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..config.model import GatewayConfig, MeshConfig

log = logging.getLogger("odin_gw.mesh.consul")

NOTE = (
    "the gateway's own Consul sidecar does mTLS and load balancing; instances are shown "
    "for information"
)


def discovery_view(mesh: MeshConfig) -> MeshConfig:
    """The mesh settings discovery runs with in sidecar mode: no Connect TLS of its own
    (no leaf, no roots, no identities, plain-HTTP instances)."""
    consul = replace(mesh.consul, enable_connect=False)
    return replace(mesh, consul=consul, mtls_enabled=False)


def describe(config: GatewayConfig) -> str:
    """One line for the start-up log: where each route's requests go."""
    from ..routing import sidecar_endpoint

    parts = []
    for svc in config.backends:
        ep = sidecar_endpoint(svc, config)
        if ep is not None:
            parts.append(f"{svc.name} -> http://{ep.host_header}")
    return ", ".join(parts) or "no services"
