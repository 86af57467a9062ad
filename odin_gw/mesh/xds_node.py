"""Who the gateway is to istiod, where istiod is, and how the gateway proves itself.

:class:`NodeIdentity` (the xDS node id and metadata), :class:`PilotTarget`
(``istio.pilotAddr`` + ``istio.pilotTls``), :func:`read_token` and :func:`read_ca` (the
projected token and istiod's root, re-read on every connect).

istiod parses the node of the first ``DiscoveryRequest`` of a stream
(``pilot/pkg/model/context.go`` ``ParseServiceNodeWithMetadata``): the id must have exactly
four ``~`` parts, ``<type>~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``, with a type istiod
knows (``router`` for a gateway, as Istio's own ingress gateway). The metadata is decoded
as JSON into ``NodeMetadata`` (``pkg/model/proxy.go``), so every key below must have the
JSON type of its Go field: strings everywhere, ``LABELS`` an object of strings and
``INSTANCE_IPS`` one comma-separated string (``StringList``). A value of the wrong type
makes istiod refuse the whole stream with INVALID_ARGUMENT.

Values come from the pod's environment as Istio's injection template sets it for
istio-proxy (``POD_NAME``, ``POD_NAMESPACE``, ``INSTANCE_IP``, ``SERVICE_ACCOUNT`` from the
downward API; ``ISTIO_META_CLUSTER_ID``, ``ISTIO_META_MESH_ID``, ``ISTIO_META_NETWORK``,
``ISTIO_META_WORKLOAD_NAME``), and like pilot-agent (``pkg/bootstrap/config.go``) every
other ``ISTIO_META_<KEY>`` passes through as ``<KEY>`` and ``ISTIO_METAJSON_LABELS`` gives
``LABELS``. istiod checks ``NAMESPACE`` and ``SERVICE_ACCOUNT`` against the identity of
the token on 15012 ("authorization failed" when they differ).

pilot-agent reaches istiod with the token as ``authorization: Bearer`` (``caclient``
``DefaultTokenProvider``), a ``ClusterID`` header, and TLS verified against the mesh root
with the host of the address as server name, ``istiod.istio-system.svc`` when that host
is localhost (``pilot/pkg/grpc/tls.go``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..config.model import MeshConfig
from ..errors import MeshError

log = logging.getLogger("odin_gw.mesh.xds")

#: The node type of a standalone proxy (Istio's ingress/egress gateways use it too).
NODE_TYPE = "router"
#: pilot-agent's default DNS domain suffix after the namespace (``--domain``).
CLUSTER_DOMAIN = "svc.cluster.local"
#: What the injection template sets ISTIO_META_CLUSTER_ID to without multiCluster.
DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_SERVICE_ACCOUNT = "default"
#: Sent as ISTIO_VERSION unless ISTIO_META_ISTIO_VERSION says otherwise. istiod gates a few
#: generated features on it, and warns (assuming "the newest") when it is missing.
DEFAULT_ISTIO_VERSION = "1.30.0"
#: The name pilot-agent puts in the TLS check when the address says localhost (a
#: port-forward): istiod's certificate names its service, not localhost.
ISTIOD_SERVICE_NAME = "istiod.istio-system.svc"
#: A Deployment's pod: ``<deployment>-<replicaset hash>-<5 characters>``.
_DEPLOYMENT_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{5,10}-[a-z0-9]{5}$")
#: Keys this module owns: an ISTIO_META_ variable with the same key does not replace them
#: (their own variables, POD_NAMESPACE and so on, are the way to set them).
_OWN_KEYS = ("NAMESPACE", "SERVICE_ACCOUNT", "INSTANCE_IPS", "NAME", "LABELS")


@dataclass(frozen=True)
class NodeIdentity:
    """The xDS node the gateway presents to istiod.

    ``node_id`` is the four-part id; ``metadata`` the JSON-typed node metadata (str values,
    ``LABELS`` a mapping of str). ``cluster_id`` is also sent as the ``clusterid`` gRPC
    header, which istiod's token authenticator reads to pick the cluster (as pilot-agent's
    XDS proxy does).
    """

    pod_name: str
    namespace: str
    pod_ip: str
    service_account: str
    cluster_id: str
    metadata: Mapping[str, object] = field(repr=False)

    @property
    def node_id(self) -> str:
        """``router~<podIP>~<podName>.<ns>~<ns>.svc.cluster.local``."""
        return "~".join(
            (
                NODE_TYPE,
                self.pod_ip,
                f"{self.pod_name}.{self.namespace}",
                f"{self.namespace}.{CLUSTER_DOMAIN}",
            )
        )

    @property
    def service_cluster(self) -> str:
        """Envoy's ``node.cluster`` as pilot-agent derives it: ``<app or workload>.<ns>``."""
        labels = self.metadata.get("LABELS")
        app = labels.get("app") if isinstance(labels, Mapping) else None
        name = app or self.metadata.get("WORKLOAD_NAME") or "istio-proxy"
        return f"{name}.{self.namespace}"

    @classmethod
    def from_env(cls, mesh: MeshConfig, environ: Mapping[str, str]) -> NodeIdentity:
        """Build the identity from a pod's environment (the downward API and Istio's
        variables, see the module docstring), with these defaults when a variable is unset
        or empty: namespace ``serviceMesh.namespace``; pod name the host name (a pod's
        host name is its name); pod IP the host name's address; service account
        ``default``; cluster id ``Kubernetes``; mesh id ``TRUST_DOMAIN``, else
        ``serviceMesh.trustDomain``, else ``cluster.local`` (as the injector does);
        workload name the pod name without a Deployment's two hash suffixes;
        ISTIO_VERSION :data:`DEFAULT_ISTIO_VERSION`. ``NETWORK`` is sent only when set."""

        def env(name: str) -> str:
            return (environ.get(name) or "").strip()

        namespace = env("POD_NAMESPACE") or mesh.namespace or "default"
        pod_name = env("POD_NAME") or socket.gethostname().split(".")[0]
        pod_ip = _pod_ip(env("INSTANCE_IP"))
        service_account = env("SERVICE_ACCOUNT") or DEFAULT_SERVICE_ACCOUNT

        meta: dict[str, object] = {}
        for key, value in sorted(environ.items()):
            if key.startswith("ISTIO_META_") and len(key) > len("ISTIO_META_"):
                name = key[len("ISTIO_META_") :]
                if name not in _OWN_KEYS and value != "":
                    meta[name] = value
        meta["CLUSTER_ID"] = env("ISTIO_META_CLUSTER_ID") or DEFAULT_CLUSTER_ID
        meta["MESH_ID"] = (
            env("ISTIO_META_MESH_ID") or env("TRUST_DOMAIN") or mesh.trust_domain or "cluster.local"
        )
        meta["ISTIO_VERSION"] = env("ISTIO_META_ISTIO_VERSION") or DEFAULT_ISTIO_VERSION
        meta["WORKLOAD_NAME"] = env("ISTIO_META_WORKLOAD_NAME") or _workload_name(pod_name)
        if env("ISTIO_META_NETWORK"):
            meta["NETWORK"] = env("ISTIO_META_NETWORK")
        meta["NAMESPACE"] = namespace
        meta["SERVICE_ACCOUNT"] = service_account
        meta["INSTANCE_IPS"] = pod_ip  # StringList: one comma-separated string
        meta["NAME"] = pod_name
        labels = _labels(environ.get("ISTIO_METAJSON_LABELS"))
        if labels:
            meta["LABELS"] = MappingProxyType(labels)
        return cls(
            pod_name=pod_name,
            namespace=namespace,
            pod_ip=pod_ip,
            service_account=service_account,
            cluster_id=str(meta["CLUSTER_ID"]),
            metadata=MappingProxyType(meta),
        )

    def describe(self) -> dict[str, object]:
        """A JSON-ready view for the admin endpoint (node metadata holds no secrets)."""
        meta = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.metadata.items()}
        return {"id": self.node_id, "cluster": self.service_cluster, "metadata": meta}


def _pod_ip(value: str) -> str:
    """``INSTANCE_IP`` when it is an IP address (pilot-agent ignores anything else), or
    the first non-loopback address the host name resolves to, or 127.0.0.1 (pilot-agent's
    last resort too)."""
    if value:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            log.warning("INSTANCE_IP %r is not an IP address: using the host's address", value)
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_loopback and not address.is_link_local:
            return str(address)
    return "127.0.0.1"


def _workload_name(pod_name: str) -> str:
    match = _DEPLOYMENT_POD.match(pod_name)
    return match.group("name") if match else pod_name


def _labels(raw: str | None) -> dict[str, str]:
    """``ISTIO_METAJSON_LABELS`` (a JSON object of strings); anything else is ignored with
    a warning, as pilot-agent does."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        log.warning("ISTIO_METAJSON_LABELS is not a JSON object of strings: ignored")
        return {}
    return value


@dataclass(frozen=True)
class PilotTarget:
    """``istio.pilotAddr`` and ``istio.pilotTls`` resolved: the address (also the gRPC
    target: gRPC reads ``host:port``, ``[v6]:port`` and ``unix:///path``), whether TLS is
    used and the name to check istiod's certificate against (``None``: the host)."""

    address: str
    tls: bool
    server_name: str | None = None

    @classmethod
    def parse(cls, pilot_addr: str | None, pilot_tls: str = "auto") -> PilotTarget:
        """``host:port`` or ``unix:///path``. ``pilot_tls`` ``auto`` means TLS unless the
        port is 15010 (istiod's plaintext port) or the address is a unix socket (a local
        istio-agent); ``true``/``false`` force it. Raises ``MeshError``."""
        if not pilot_addr:
            raise MeshError("istio.pilotAddr is not set: istiod's host:15012 or unix:///path")
        if pilot_tls not in ("auto", "true", "false"):
            raise MeshError(f"istio.pilotTls {pilot_tls!r}: must be auto, true or false")
        if pilot_addr.startswith("unix:"):
            tls = pilot_tls == "true"
            return cls(pilot_addr, tls, ISTIOD_SERVICE_NAME if tls else None)
        host, _, port_text = pilot_addr.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise MeshError(f"istio.pilotAddr {pilot_addr!r}: must be host:port or unix:///path")
        tls = pilot_tls == "true" or (pilot_tls == "auto" and int(port_text) != 15010)
        server_name = ISTIOD_SERVICE_NAME if tls and "localhost" in host else None
        return cls(pilot_addr, tls, server_name)


def read_token(path: str) -> str:
    """The projected service-account token in ``path`` (read anew on every connect: the
    kubelet rotates it). Raises ``MeshError`` naming the file, never the token."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise MeshError(
            f"istio.tokenFile {path}: cannot read the token for istiod ({why})"
        ) from None
    if not token:
        raise MeshError(f"istio.tokenFile {path}: the file is empty")
    return token


def read_ca(path: str) -> bytes:
    """The PEM roots istiod's certificate is checked against (``serviceMesh.caFile``, the
    ``root-cert.pem`` of the ``istio-ca-root-cert`` ConfigMap). Raises ``MeshError``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise MeshError(
            f"serviceMesh.caFile {path}: cannot read istiod's root certificate ({exc.strerror})"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise MeshError(f"serviceMesh.caFile {path}: no PEM certificate in it")
    return data
