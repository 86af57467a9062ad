"""Istio as a mesh, in its two modes (``serviceMesh.istio.injectSidecar``).

**Sidecar** (``true``, the default): the gateway runs with an Istio sidecar, which
discovers, balances and originates mTLS. Each route sends plain HTTP to
``<meshService>.<namespace>.svc.cluster.local:<port>`` (``routing.cluster_name_endpoint``)
unless the service lists ``targets``; no xDS connection is made.

**Direct** (``false``): the gateway is the mesh client itself. :class:`IstioClient` keeps
one ADS stream to istiod (``xds.AdsClient``) for the CDS and EDS of
``outbound|<port>||<meshService>.<namespace>.svc.cluster.local`` of every service, and
turns them into the snapshot's endpoints:

* health from EDS (``HEALTHY``/``UNKNOWN`` serve, as in Envoy; ``UNHEALTHY``, ``DRAINING``,
  ``TIMEOUT`` do not), load-balancing weight and locality;
* mTLS to every endpoint with ``mtlsEnabled: true`` (the spec's Example 1); otherwise
  automatic mTLS as Istio's own gateways do it: an endpoint whose EDS metadata says
  ``tlsMode: istio`` (it has a sidecar) gets mTLS, one without gets plain HTTP;
* over mTLS: the workload certificate files (``certFile``/``keyFile``/``caFile``, as the
  istio-agent writes them) with ALPN ``istio-http/1.1`` (the manager loads them), SNI
  ``outbound_.<port>_._.<host>`` as Envoy sends it, and the peer's SPIFFE ID checked: the
  service account from ``services[].identity`` (or EDS, when it names one) gives
  ``spiffe://<trustDomain>/ns/<namespace>/sa/<account>``; else any of the SANs the
  cluster's CDS transport socket accepts; else any identity in the trust domain.

A service istiod has no cluster for, in an answer that is otherwise complete, is absent:
it has no instances (503), as with Consul. istiod unreachable or refusing: the last
known good snapshot stays, and the error shows on ``/admin/mesh``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config.model import GatewayConfig
from ..errors import MeshError
from .client import Discovery, Publish, PublishTls
from .snapshot import Endpoint, ServiceEndpoints

log = logging.getLogger("odin_gw.mesh.istio")

#: ALPN a client must offer for a sidecar's inbound mTLS filter chain (HTTP/1.1).
ISTIO_ALPN = ("istio-http/1.1",)
#: EDS health states Envoy sends traffic to.
SERVING = frozenset({"HEALTHY", "UNKNOWN"})
SIDECAR_NOTE = (
    "the gateway's own Istio sidecar discovers, balances and does mTLS; requests go to "
    "the service's Kubernetes name in plain HTTP"
)


@dataclass(frozen=True)
class MeshService:
    """One configured service as istiod names it."""

    name: str  # the mesh service name (``meshService`` or ``name``)
    host: str  # <name>.<namespace>.svc.cluster.local
    port: int
    cluster: str  # outbound|<port>||<host>
    account: str | None  # services[].identity
    namespace: str = "default"


def mesh_services(config: GatewayConfig) -> dict[str, MeshService]:
    """The Istio clusters of the configured services, by mesh service name (the first
    service naming a mesh service decides its port and account)."""
    from .cluster_names import cluster_services
    from .xds_decode import cluster_name

    out: dict[str, MeshService] = {}
    for name, cs in cluster_services(config).items():
        out[name] = MeshService(
            name, cs.host, cs.port, cluster_name(cs.host, cs.port), cs.identity, cs.namespace
        )
    return out


class IstioClient:
    """Direct mode: discovery from istiod over ADS (see the module docstring)."""

    name = "istio"

    def __init__(self, config: GatewayConfig, environ: Mapping[str, str] | None = None) -> None:
        from .xds import AdsClient
        from .xds_node import NodeIdentity

        mesh = config.service_mesh
        self.mesh = mesh
        self.pilot_addr = mesh.istio.pilot_addr or DEFAULT_PILOT
        self.trust_domain = mesh.trust_domain or "cluster.local"
        self.namespace = mesh.namespace
        self.services = mesh_services(config)
        self.node = NodeIdentity.from_env(mesh, os.environ if environ is None else environ)
        self.call_timeout = 10.0
        self.ads = AdsClient(
            pilot_addr=self.pilot_addr,
            pilot_tls=mesh.istio.pilot_tls,
            ca_file=mesh.ca_file,
            token_file=mesh.istio.token_file,
            node=self.node,
            timeout=self.call_timeout,
        )
        self._stamp_lock = threading.Lock()
        self._last_stamp = 0

    # -- MeshClient ---------------------------------------------------------------------
    def discover(self, services: Sequence[str]) -> Discovery:
        """One ADS exchange (CDS, then EDS of our clusters), as a full pass."""
        stamp = self._stamp()  # taken before asking: a push that lands meanwhile wins
        state = self.ads.fetch(self._clusters(services), timeout=self.call_timeout)
        return self._discovery(services, state, stamp)

    def watch(
        self,
        services: Sequence[str],
        publish: Publish,
        publish_tls: PublishTls,
        stop: threading.Event,
    ) -> None:
        """One ADS stream for every service; each accepted push is published whole.
        TLS material comes from the certificate files (the manager follows them)."""
        wanted = list(services)

        def on_state(state) -> None:
            publish(self._discovery(wanted, state, self._stamp()))

        def on_error(exc: MeshError) -> None:
            publish(Discovery(errors={"istiod": exc.message}))

        self.ads.watch(self._clusters(wanted), on_state, on_error, stop)

    def close(self) -> None:
        self.ads.close()

    def describe(self) -> dict:
        """Node identity and the clusters asked for (``/admin/mesh``)."""
        return {
            "node": self.node.describe(),
            "pilotAddr": self.pilot_addr,
            "clusters": sorted(s.cluster for s in self.services.values()),
        }

    # -- answers ------------------------------------------------------------------------
    def _stamp(self) -> int:
        """Strictly increasing: orders the full pass's answers against the stream's."""
        with self._stamp_lock:
            self._last_stamp = max(self._last_stamp + 1, time.monotonic_ns())
            return self._last_stamp

    def _clusters(self, services: Sequence[str]) -> list[str]:
        return [self.services[n].cluster for n in services if n in self.services]

    def _discovery(self, services: Sequence[str], state, stamp: int) -> Discovery:
        found: dict[str, ServiceEndpoints] = {}
        absent = set()
        for name in services:
            svc = self.services.get(name)
            if svc is None:
                continue
            cluster = state.clusters.get(svc.cluster)
            if cluster is None:
                absent.add(name)  # istiod knows no such service (or port)
                continue
            endpoints = state.endpoints.get(svc.cluster, ())
            found[name] = ServiceEndpoints(
                name,
                tuple(self._endpoint(svc, cluster, ep) for ep in endpoints),
                source="istio",
            )
        catalog = sorted({_host_of(c) for c in state.clusters})
        return Discovery(
            services=found,
            absent=frozenset(absent),
            catalog=tuple(catalog),
            stamps=dict.fromkeys(list(found) + list(absent), stamp),
        )

    def _endpoint(self, svc: MeshService, cluster, ep) -> Endpoint:
        authority = svc.host if svc.port == 80 else f"{svc.host}:{svc.port}"
        mtls = self.mesh.mtls_enabled or ep.tls_mode == "istio"
        identity = None
        identities: tuple[str, ...] = ()
        sni = None
        if mtls:
            account = svc.account or ep.service_account
            if account:
                identity = f"spiffe://{self.trust_domain}/ns/{svc.namespace}/sa/{account}"
            else:
                identities = tuple(cluster.sans)
            sni = cluster.sni or f"outbound_.{svc.port}_._.{svc.host}"
        locality = "/".join(ep.locality).strip("/") or None
        return Endpoint(
            address=ep.address,
            port=ep.port,
            scheme="https" if mtls else "http",
            healthy=ep.health in SERVING,
            status=ep.health.lower(),
            weight=max(1, int(ep.weight or 1)),
            identity=identity,
            identities=identities,
            sni=sni,
            locality=locality,
            host_header=authority,
        )


def kubernetes_endpoints(config: GatewayConfig):
    """``istio.discovery: kubernetes``: an ``endpoint_factory`` for
    :class:`~odin_gw.mesh.kubernetes.KubernetesDiscovery` that makes each EndpointSlice
    address an Istio workload endpoint.

    EndpointSlices say nothing of sidecars or service accounts, so: with
    ``mtlsEnabled`` every endpoint gets mTLS (SNI ``outbound_.<port>_._.<host>``, the
    peer held to ``spiffe://<trustDomain>/ns/<ns>/sa/<identity>`` when the service names
    its ``identity``, else to the trust domain's CA); without it, plain HTTP (automatic
    mTLS needs the ``tlsMode`` istiod puts in EDS: use ``discovery: xds`` for it).
    """
    mesh = config.service_mesh
    trust_domain = mesh.trust_domain or "cluster.local"
    mtls = mesh.mtls_enabled

    def make(cs, seen) -> Endpoint:
        authority = cs.host if cs.port == 80 else f"{cs.host}:{cs.port}"
        if not mtls:
            return seen.endpoint(host_header=authority)
        identity = (
            f"spiffe://{trust_domain}/ns/{cs.namespace}/sa/{cs.identity}" if cs.identity else None
        )
        return seen.endpoint(
            scheme="https",
            identity=identity,
            sni=f"outbound_.{cs.port}_._.{cs.host}",
            host_header=authority,
        )

    return make


#: istiod's TLS xDS port in its usual Service (``pilotAddr`` unset).
DEFAULT_PILOT = "istiod.istio-system.svc:15012"


def _host_of(cluster: str) -> str:
    """``outbound|80||web.shop.svc.cluster.local`` -> ``web.shop.svc.cluster.local``."""
    parts = cluster.split("|")
    return parts[3] if len(parts) == 4 else cluster
