"""The ADS conversation of one stream, without I/O (:class:`AdsProtocol`): which
requests to send, ACK or NACK of each response (with version and nonce), and when the
state is complete. Resources are decoded by :mod:`.xds_decode`; the stream that carries
the conversation is :class:`.xds.AdsClient`.

Facts from istio's source this relies on: a ``router`` node gets every cluster of the
mesh from CDS (wildcard, state of the world: a cluster missing from a CDS update is gone);
EDS pushes may carry only the clusters that changed (``pilot/pkg/xds/eds.go``), so EDS
updates are merged; every requested EDS name gets an assignment, empty when the service
has no endpoints; istiod ignores a request with a stale nonce and does not answer a NACK
(``pkg/xds/server.go`` ``ShouldRespond``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from .. import __version__
from .xds_decode import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    SHORT_TYPES,
    Rejected,
    XdsCluster,
    XdsEndpoint,
    XdsState,
    decode_clusters,
    decode_endpoints,
)
from .xds_node import NodeIdentity

#: The status code Envoy puts in a NACK's ``error_detail``.
NACK_CODE = grpc.StatusCode.INTERNAL.value[0]


def node_message(node: NodeIdentity) -> base_pb2.Node:
    """The ``core.v3.Node`` sent on a stream's first request."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in node.metadata.items()}
    )
    return base_pb2.Node(
        id=node.node_id,
        cluster=node.service_cluster,
        metadata=metadata,
        user_agent_name="odin-gw",
        user_agent_version=__version__,
    )


# -- the conversation of one stream -----------------------------------------------------


@dataclass
class Step:
    """What to do after a response: send ``requests`` (ACK/NACK, subscription), report
    ``rejected`` (the NACK's message), deliver ``state`` (a new complete state)."""

    requests: list[discovery_pb2.DiscoveryRequest] = field(default_factory=list)
    rejected: str | None = None
    state: XdsState | None = None


class AdsProtocol:
    """The ADS conversation of one stream, without I/O.

    ``start()`` gives the first request (CDS, wildcard, with the node); ``on_response``
    decodes a response and says what to send and deliver. A CDS update replaces the
    clusters and (re)subscribes EDS to the asked clusters that are EDS clusters; an EDS
    update is merged. A state is delivered once complete (CDS accepted and an assignment
    for every subscribed cluster), then after every accepted change of clusters or
    endpoints. ``versions`` (type_url -> accepted version) may come from an earlier
    stream: a NACK names the last accepted version, as Envoy does.
    """

    def __init__(
        self,
        node: NodeIdentity,
        clusters: Sequence[str],
        versions: Mapping[str, str] | None = None,
    ) -> None:
        self.node = node
        self.wanted = frozenset(clusters)
        self.versions: dict[str, str] = dict(versions or {})
        self.nonces: dict[str, str] = {}
        self.clusters: dict[str, XdsCluster] | None = None  # None: no CDS accepted yet
        self.eds: dict[str, str] = {}  # cluster -> EDS name, as subscribed
        self.endpoints: dict[str, tuple[XdsEndpoint, ...]] = {}
        self.responses = 0
        self.delivered = 0
        self.rejected: str | None = None
        self._node_sent = False
        self._last: tuple | None = None

    def start(self) -> list[discovery_pb2.DiscoveryRequest]:
        """The first request of the stream: CDS, wildcard (no names), as Envoy asks."""
        return [self._request(CLUSTER_TYPE, (), nonce="")]

    def on_response(self, response: discovery_pb2.DiscoveryResponse) -> Step:
        """ACK or NACK ``response``; see the class docstring."""
        self.responses += 1
        type_url = response.type_url
        if type_url in SHORT_TYPES:
            # The latest nonce, ACKed or not: istiod ignores a request with an older one.
            self.nonces[type_url] = response.nonce
        try:
            if type_url == CLUSTER_TYPE:
                step = self._on_clusters(response)
            elif type_url == ENDPOINT_TYPE:
                step = self._on_endpoints(response)
            else:
                raise Rejected(f"unexpected type_url {type_url!r}: only CDS and EDS were asked")
        except Rejected as exc:
            return self._nack(response, str(exc))
        step.state = self._state_if_changed()
        return step

    def progress(self) -> str:
        """What has arrived so far, for a timeout message."""
        if self.clusters is None:
            return "no CDS update accepted"
        have = sum(1 for c in self.eds if c in self.endpoints)
        return f"CDS accepted, EDS {have}/{len(self.eds)} clusters"

    def _on_clusters(self, response) -> Step:
        clusters, eds = decode_clusters(response, self.wanted)
        self._accept(response)
        self.clusters = clusters
        step = Step(requests=[self._ack(response)])
        if eds != self.eds:
            previous = set(self.eds.values())
            self.eds = eds
            self.endpoints = {c: e for c, e in self.endpoints.items() if c in eds}
            if eds or previous:
                # An empty EDS request unsubscribes (istiod drops the watch).
                step.requests.append(self._eds_request())
        return step

    def _on_endpoints(self, response) -> Step:
        decoded = decode_endpoints(response, set(self.eds.values()))
        self._accept(response)
        for cluster, eds_name in self.eds.items():
            if eds_name in decoded:
                self.endpoints[cluster] = decoded[eds_name]
        return Step(requests=[self._ack(response)])

    def _accept(self, response) -> None:
        self.versions[response.type_url] = response.version_info
        self.rejected = None

    def _state_if_changed(self) -> XdsState | None:
        if self.clusters is None or any(c not in self.endpoints for c in self.eds):
            return None
        content = (self.clusters, self.endpoints)
        if content == self._last:
            return None
        self._last = (dict(self.clusters), dict(self.endpoints))
        self.delivered += 1
        return XdsState(
            clusters=MappingProxyType(dict(self.clusters)),
            endpoints=MappingProxyType(dict(self.endpoints)),
            versions=MappingProxyType(dict(self.versions)),
        )

    def _names(self, type_url: str) -> Sequence[str]:
        return sorted(set(self.eds.values())) if type_url == ENDPOINT_TYPE else ()

    def _request(
        self, type_url: str, names: Sequence[str], *, nonce: str
    ) -> discovery_pb2.DiscoveryRequest:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=self.versions.get(type_url, ""),
            resource_names=list(names),
            response_nonce=nonce,
        )
        if not self._node_sent:  # istiod reads the node of the first request only
            request.node.CopyFrom(node_message(self.node))
            self._node_sent = True
        return request

    def _ack(self, response) -> discovery_pb2.DiscoveryRequest:
        return self._request(
            response.type_url, self._names(response.type_url), nonce=response.nonce
        )

    def _eds_request(self) -> discovery_pb2.DiscoveryRequest:
        return self._request(
            ENDPOINT_TYPE, self._names(ENDPOINT_TYPE), nonce=self.nonces.get(ENDPOINT_TYPE, "")
        )

    def _nack(self, response, reason: str) -> Step:
        type_url = response.type_url
        request = self._request(type_url, self._names(type_url), nonce=response.nonce)
        request.error_detail.CopyFrom(status_pb2.Status(code=NACK_CODE, message=reason))
        kept = self.versions.get(type_url) or "none"
        what = SHORT_TYPES.get(type_url, type_url)
        self.rejected = (
            f"rejected istiod's {what} update (version {response.version_info!r}, nonce "
            f"{response.nonce!r}): {reason}; keeping version {kept!r}"
        )
        return Step(requests=[request], rejected=self.rejected)
