"""An istiod stand-in: its xDS (ADS) server on loopback, over real gRPC.

Usage::

    with IstiodDouble() as istiod:
        istiod.set_service("web.default.svc.cluster.local", 80, [EdsEndpoint("10.0.0.5", 8080)])
        channel = grpc.insecure_channel(istiod.address)   # ADS as on istiod's :15010

It follows istiod (istio/istio ``pilot/pkg/xds``) where a gateway meets it:

* Transport: plaintext like port 15010 (or the istio-agent's ``unix:///etc/istio/proxy/
  XDS`` with ``unix_path``), or TLS like 15012 when ``ca`` is given (server certificate
  from ``ca`` for DNS ``istiod.istio-system.svc`` and IP 127.0.0.1; clients verify
  with ``ca.root_pem``, what the ``istio-ca-root-cert`` ConfigMap holds).
* Authentication (``tokens``): the ``authorization: Bearer <token>`` metadata is checked
  before any request is read, as istiod does for TLS clients (here on any transport,
  like ``XDS_AUTH_PLAINTEXT=true``): unknown -> ``UNAUTHENTICATED`` "authentication
  failure"; a token for another namespace/service account than the node's ->
  ``PERMISSION_DENIED`` "authorization failed: no identities ([spiffe://...]) matched
  <ns>/<sa>". Node checks and their messages: see ``istiod_model``.
* Resources: CDS is wildcard (every outbound cluster plus ``BlackHoleCluster``,
  whatever names are asked); EDS answers the names subscribed (an unknown name gets an
  empty assignment); LDS answers an empty list (a gateway with no Gateway resources
  has no listeners). Shapes: see ``istiod_resources``. ACK/NACK/stale rules: see
  ``istiod_stream``. Versions are ``<RFC 3339 time>/<push counter>``, nonces the
  version followed by a UUID, as istiod's.
* Pushes: a changed cluster pushes CDS (full) then the changed assignment; an endpoint
  only change pushes just that assignment (istiod's incremental EDS push); each push
  goes only to streams subscribed to it. ``DeltaAggregatedResources`` is not served
  (UNIMPLEMENTED).
* SDS: Envoy's ``tlsMode-istio`` transport socket takes its certificate (``default``)
  and roots (``ROOTCA``) from SDS over the ``sds-grpc`` cluster. In a pod that server
  is the istio-agent (``security/pkg/nodeagent/sds``), not istiod; the double serves
  the same ``SecretDiscoveryService`` on its own listener so one address does for both
  (no authentication, as on the agent's socket): ``default`` is a 24 h certificate for
  ``spiffe://<td>/ns/<NAMESPACE>/sa/<SERVICE_ACCOUNT>`` of the requesting node, signed
  by ``ca`` (istiod is the mesh CA) or by a CA of its own.

``stop()`` cancels every stream (clients see UNAVAILABLE) and frees the port;
``start()`` listens on the same address again: istiod went away and came back.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2, json_format

from tests.doubles.istiod_model import (
    EdsEndpoint,
    ProxyNode,
    Refused,
    authorize,
    parse_node,
    spiffe_id,
)
from tests.doubles.istiod_resources import (
    CDS,
    EDS,
    LDS,
    blackhole_cluster,
    cluster_name,
    invalid_load_assignment,
    load_assignment,
    outbound_cluster,
    pack,
    root_secret,
    workload_secret,
)
from tests.doubles.istiod_stream import Push, XdsConnection
from tests.doubles.pki import CertificateAuthority, IssuedCert

__all__ = ["EdsEndpoint", "IstiodDouble"]

#: DNS SAN of istiod's serving certificate (its Service in istio-system).
ISTIOD_DNS_NAME = "istiod.istio-system.svc"
#: How often a serving thread wakes to see whether its call is still alive.
_POLL = 0.5
_GRPC_OPTIONS = [("grpc.so_reuseport", 0)]


def _rfc3339_now() -> str:
    # Go's time.Now().Format(time.RFC3339): local time, "Z" when UTC.
    now = datetime.now().astimezone().replace(microsecond=0)
    text = now.isoformat()
    return text[:-6] + "Z" if now.utcoffset() == timedelta(0) else text


@dataclass
class _Service:
    host: str
    port: int
    endpoints: list[EdsEndpoint]
    cluster: Any  # envoy.config.cluster.v3.Cluster
    assignment: Any  # envoy.config.endpoint.v3.ClusterLoadAssignment


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, double: IstiodDouble) -> None:
        self._double = double

    def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        return self._double._serve(request_iterator, context, ads=True)


class _Sds(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, double: IstiodDouble) -> None:
        self._double = double

    def StreamSecrets(self, request_iterator: Any, context: Any) -> Any:
        return self._double._serve(request_iterator, context, ads=False)


class IstiodDouble:
    """istiod's xDS server for a gateway, on ``127.0.0.1:<port>`` or a unix socket.

    ``ca``: serve TLS (port 15012) with a certificate from it; None: plaintext (15010).
    ``trust_domain``: of the SPIFFE IDs (SANs, token identities, SDS certificates).
    ``tokens``: accepted bearer tokens -> (namespace, service account) they stand for;
    None: no authentication. ``unix_path``: listen there instead of TCP (``port`` stays
    0). Each open stream holds one of 64 server threads.

    Observations (``acks``, ``nacks``, ``nodes``, ``refusals``, ``stale_nonces``) are
    copies taken under a lock, safe to read from any thread.
    """

    def __init__(
        self,
        *,
        ca: CertificateAuthority | None = None,
        trust_domain: str = "cluster.local",
        tokens: dict[str, tuple[str, str]] | None = None,
        unix_path: str | None = None,
    ) -> None:
        self.ca = ca
        self.trust_domain = trust_domain
        self.tokens = dict(tokens) if tokens is not None else None
        self.unix_path = os.path.abspath(unix_path) if unix_path else None
        #: Signs SDS workload certificates: ``ca``, else a CA of the double's own.
        self.mesh_ca = ca or CertificateAuthority(trust_domain, common_name="istiod-double-ca")
        self.port = 0
        self._server_cert: IssuedCert | None = None
        # One lock for state, connections and observations; never held while sending.
        self._lock = threading.RLock()
        self._services: dict[str, _Service] = {}
        self._pushes = 0
        self._version = self._next_version()
        self._conns: set[XdsConnection] = set()
        self._workload_certs: dict[str, IssuedCert] = {}
        self._secret_versions = 0
        # "ack", "nack", "stale" -> entries (see the properties of the same names).
        self._seen: dict[str, list[Any]] = {"ack": [], "nack": [], "stale": []}
        self._nodes: list[tuple[str, dict]] = []
        self._refusals: list[str] = []
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None

    # -- lifecycle --------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` or ``unix://<path>``; stable across stop()/start()."""
        if self.unix_path:
            return "unix://" + self.unix_path
        if not self.port:
            raise RuntimeError("IstiodDouble not started")
        return f"127.0.0.1:{self.port}"

    @property
    def root_cert_pem(self) -> str | None:
        """The trust anchor a client verifies the server with (None when plaintext)."""
        return self.ca.root_pem if self.ca else None

    def start(self) -> IstiodDouble:
        """Listen (a free port the first time, the same address after) and serve."""
        if self._server is not None:
            return self
        self._executor = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="istiod")
        server = grpc.server(self._executor, options=_GRPC_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), server)
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Sds(self), server)
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(self.unix_path).st_mode):
                    os.unlink(self.unix_path)
            target = "unix:" + self.unix_path
        else:
            target = f"127.0.0.1:{self.port}"
        if self.ca is not None:
            if self._server_cert is None:
                self._server_cert = self.ca.issue(dns_names=[ISTIOD_DNS_NAME], ips=["127.0.0.1"])
            creds = grpc.ssl_server_credentials(
                [(self._server_cert.key_pem.encode(), self._server_cert.chain_pem.encode())]
            )
            bound = server.add_secure_port(target, creds)
        else:
            bound = server.add_insecure_port(target)
        if not bound:
            raise RuntimeError(f"istiod double could not listen on {target}")
        if not self.unix_path:
            self.port = bound
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        """Cancel every stream (clients see UNAVAILABLE) and stop listening."""
        server, self._server = self._server, None
        if server is None:
            return
        # Cancel first: a serving thread that returned on its own would end its call OK.
        server.stop(grace).wait(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.post("close")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    def __enter__(self) -> IstiodDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration ----------------------------------------------------------------
    def set_service(
        self,
        host: str,
        port: int,
        endpoints: list[EdsEndpoint],
        *,
        sans: list[str] | None = None,
        protocol: str = "http",
        persistent_session: bool = False,
    ) -> None:
        """Define or update ``outbound|<port>||<host>`` and its endpoints; push it.

        ``sans``: the SPIFFE IDs the mTLS socket accepts; default: those of the
        endpoints' service accounts, as istiod derives them. ``protocol``: the port's
        protocol ("http2"/"grpc" give HTTP/2 options and ALPN). ``persistent_session``:
        the service carries ``istio.io/persistent-session``; only then does istiod
        send DRAINING endpoints (others are left out of EDS).
        """
        endpoints = list(endpoints)
        if sans is None:
            sans = sorted(
                {
                    spiffe_id(self.trust_domain, ep.namespace, ep.service_account)
                    for ep in endpoints
                    if ep.service_account
                }
            )
        name = cluster_name(host, port)
        cluster = outbound_cluster(
            host, port, list(sans), protocol=protocol, persistent_session=persistent_session
        )
        assignment = load_assignment(name, endpoints, persistent_session=persistent_session)
        with self._lock:
            previous = self._services.get(name)
            self._services[name] = _Service(host, port, endpoints, cluster, assignment)
            self._version = self._next_version()
            pushes = [Push(EDS, frozenset([name]))]
            if previous is None or previous.cluster != cluster:
                pushes.insert(0, Push(CDS, full=True))
            self._broadcast(pushes)

    def remove_service(self, host: str, port: int) -> None:
        """Drop the cluster from CDS; streams still watching it get an empty assignment."""
        name = cluster_name(host, port)
        with self._lock:
            if self._services.pop(name, None) is None:
                return
            self._version = self._next_version()
            # Streams still watching it get an empty assignment (the service is unknown).
            self._broadcast([Push(CDS, full=True), Push(EDS, frozenset([name]))])

    def push_invalid(self, host: str, port: int) -> None:
        """Push an EDS update for the service that a correct client must NACK.

        The assignment holds the current endpoints plus one whose address is a host
        name (``not-an-ip.invalid``): Envoy parses EDS addresses as IP literals and
        rejects the update with "malformed IP address", keeping its previous endpoints.
        The double's state does not change: later requests get the last good state.
        Raises KeyError for a service that was never set.
        """
        name = cluster_name(host, port)
        with self._lock:
            service = self._services[name]
            bad = invalid_load_assignment(name, service.endpoints)
            fixed = (self._next_version(), {name: pack(bad)})
            self._broadcast([Push(EDS, frozenset([name]), fixed=fixed)])

    # -- observations -----------------------------------------------------------------
    @property
    def acks(self) -> list[tuple[str, str, str]]:
        """(type_url, version_info, response_nonce) of each ACK received."""
        with self._lock:
            return list(self._seen["ack"])

    @property
    def nacks(self) -> list[tuple[str, str, str, str]]:
        """(type_url, version_info, response_nonce, error_detail.message) of each NACK."""
        with self._lock:
            return list(self._seen["nack"])

    @property
    def nodes(self) -> list[tuple[str, dict]]:
        """(node id, metadata as a dict) of each stream's first request, refused or not."""
        with self._lock:
            return list(self._nodes)

    @property
    def refusals(self) -> list[str]:
        """``"<GRPC CODE>: <message>"`` for each refused stream."""
        with self._lock:
            return list(self._refusals)

    @property
    def stale_nonces(self) -> list[tuple[str, str]]:
        """(type_url, response_nonce) of requests ignored for a stale nonce."""
        with self._lock:
            return list(self._seen["stale"])

    def streams(self) -> int:
        """ADS streams open now (accepted ones: node valid and authorized)."""
        with self._lock:
            return sum(1 for c in self._conns if c.kind == "ads" and c.registered)

    def subscribed(self, type_url: str) -> set[str]:
        """Names of ``type_url`` subscribed now over any stream (ADS or SDS)."""
        with self._lock:
            conns = list(self._conns)
        names: set[str] = set()
        for conn in conns:
            names |= conn.watched(type_url) or set()
        return names

    # -- internals: state -------------------------------------------------------------
    def _next_version(self) -> str:
        self._pushes += 1
        return f"{_rfc3339_now()}/{self._pushes}"

    def _clusters(self) -> dict[str, any_pb2.Any]:
        ordered = sorted(self._services.values(), key=lambda s: (s.host, s.port))
        clusters = {s.cluster.name: pack(s.cluster) for s in ordered}
        clusters["BlackHoleCluster"] = pack(blackhole_cluster())
        return clusters

    def _broadcast(self, pushes: list[Push]) -> None:
        for conn in self._conns:
            if conn.kind == "ads" and conn.registered:
                for push in pushes:
                    conn.post("push", push)

    def _generate(
        self, conn: XdsConnection, type_url: str, names: set[str]
    ) -> tuple[str, list[any_pb2.Any]] | None:
        """(version, resources) answering ``names`` of ``type_url``; None: not served."""
        if conn.kind != "ads":
            return self._generate_secrets(conn, names)
        with self._lock:
            if type_url == CDS:
                return self._version, list(self._clusters().values())
            if type_url == EDS:
                found = []
                for name in sorted(names):
                    service = self._services.get(name)
                    cla = service.assignment if service else load_assignment(name, [])
                    found.append(pack(cla))
                return self._version, found
            if type_url == LDS:
                return self._version, []
        return None

    def _generate_secrets(self, conn: XdsConnection, names: set[str]) -> tuple[str, list]:
        node = conn.node
        namespace = (node.config_namespace if node else "") or "default"
        account = (node.service_account if node else "") or "default"
        identity = spiffe_id(self.trust_domain, namespace, account)
        resources = []
        with self._lock:
            for name in sorted(names):
                if name == "ROOTCA":
                    resources.append(pack(root_secret(self.mesh_ca.root_pem)))
                elif name == "default":
                    cert = self._workload_certs.get(identity)
                    if cert is None:
                        cert = self.mesh_ca.issue(uri=identity, ips=(), ttl=timedelta(hours=24))
                        self._workload_certs[identity] = cert
                    resources.append(pack(workload_secret(cert.chain_pem, cert.key_pem)))
                else:
                    raise Refused(
                        grpc.StatusCode.UNKNOWN,
                        f"failed to generate secret for {name}: unknown resource name",
                    )
            self._secret_versions += 1
            return f"{_rfc3339_now()}/{self._secret_versions}", resources

    # -- internals: recording ---------------------------------------------------------
    def _record(self, kind: str, entry: tuple[str, ...]) -> None:
        with self._lock:
            self._seen[kind].append(entry)

    def _refuse(self, context: Any, refusal: Refused) -> None:
        with self._lock:
            self._refusals.append(f"{refusal.code.name}: {refusal.message}")
        context.abort(refusal.code, refusal.message)

    def _authenticate(self, context: Any) -> list[str] | None:
        """SPIFFE identities of the caller's token; None when authentication is off."""
        if self.tokens is None:
            return None
        for key, value in context.invocation_metadata():
            if key == "authorization" and value.startswith("Bearer "):
                found = self.tokens.get(value[len("Bearer ") :])
                if found is not None:
                    return [spiffe_id(self.trust_domain, *found)]
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "authentication failure")

    def _initialize(
        self, conn: XdsConnection, request: discovery_pb2.DiscoveryRequest, ids: list[str] | None
    ) -> None:
        node_id = request.node.id if request.HasField("node") else ""
        metadata = json_format.MessageToDict(request.node.metadata) if node_id else {}
        with self._lock:
            self._nodes.append((node_id, metadata))
        proxy: ProxyNode = parse_node(node_id, metadata)
        if ids is not None:
            authorize(proxy, ids)
        conn.node = proxy

    # -- internals: serving -----------------------------------------------------------
    def _serve(
        self, requests: Any, context: Any, *, ads: bool
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        conn = XdsConnection("ads" if ads else "sds", context.peer(), self._record)
        try:
            ids = self._authenticate(context) if ads else None
        except Refused as refusal:
            self._refuse(context, refusal)
            return
        context.add_callback(lambda: conn.post("eof"))
        conn.start_reader(requests)
        with self._lock:
            self._conns.add(conn)
        try:
            while context.is_active():
                event = conn.next_event(_POLL)
                if event is None:
                    continue
                kind, payload = event
                if kind in ("eof", "close"):
                    return
                if kind == "push":
                    response = self._push(conn, payload)  # type: ignore[arg-type]
                    if response is not None:
                        yield response
                    continue
                request: discovery_pb2.DiscoveryRequest = payload  # type: ignore[assignment]
                try:
                    if not conn.registered:
                        if ads:
                            self._initialize(conn, request, ids)
                        else:
                            conn.node = _sds_node(request)
                        with self._lock:
                            conn.registered = True
                    response = self._answer(conn, request)
                except Refused as refusal:
                    self._refuse(context, refusal)
                    return
                if response is not None:
                    yield response
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _push(self, conn: XdsConnection, push: Push) -> discovery_pb2.DiscoveryResponse | None:
        names = conn.push_targets(push)
        if names is None:
            return None
        if push.fixed is not None:
            version, fixed = push.fixed
            return conn.respond(push.type_url, version, [fixed[n] for n in sorted(names)])
        generated = self._generate(conn, push.type_url, names)
        return None if generated is None else conn.respond(push.type_url, *generated)

    def _answer(
        self, conn: XdsConnection, request: discovery_pb2.DiscoveryRequest
    ) -> discovery_pb2.DiscoveryResponse | None:
        respond, names = conn.should_respond(request)
        if not respond:
            return None
        if names is None:
            names = conn.watched(request.type_url) or set()
        generated = self._generate(conn, request.type_url, names)
        if generated is None:
            return None
        version, resources = generated
        return conn.respond(request.type_url, version, resources)


def _sds_node(request: discovery_pb2.DiscoveryRequest) -> ProxyNode | None:
    """The node of an SDS stream, when it parses (the agent does not check it)."""
    metadata = json_format.MessageToDict(request.node.metadata)
    try:
        return parse_node(request.node.id, metadata)
    except Refused:
        return None
