"""Mesh header injectors, each a small class named for the events it handles.

``request`` runs in a Flask ``before_request`` hook (once per request), ``upstream`` once
per attempt after an endpoint is chosen. ``strip`` names the environ keys of headers
that must never pass through from a client (a spoofed mesh header is a security hole).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping

from ..config.model import ConsulConfig
from ..proxy.exchange import Exchange
from .snapshot import Endpoint

log = logging.getLogger("odin_gw.mesh")


class MeshHeaders:
    """Base injector: adds nothing, strips nothing."""

    strip: frozenset[str] = frozenset()
    strip_prefixes: tuple[str, ...] = ()

    def request(self, exchange: Exchange, environ: dict) -> None:
        """Called once per request in a ``before_request`` hook; may append to
        ``exchange.mesh_headers`` (trace ids, for instance)."""

    def upstream(
        self, exchange: Exchange, endpoint: Endpoint, headers: MutableMapping[str, str]
    ) -> None:
        """Called for each attempt with the chosen endpoint and the outgoing headers
        (case-insensitive: ``headers[name] = value`` replaces a client's copy in any case)."""


class ConsulHeaders(MeshHeaders):
    """The spec's "Consul Headers", minus the ACL token unless the operator opts in.

    ``X-Consul-Datacenter`` names the datacenter of the instance that serves the request.
    ``X-Consul-Token`` from a client is always stripped; the gateway's own token is only
    sent with ``consul.forwardToken: true`` (it would hand the ACL token to every backend).
    """

    strip = frozenset({"HTTP_X_CONSUL_TOKEN", "HTTP_X_CONSUL_DATACENTER"})

    def __init__(self, consul: ConsulConfig) -> None:
        self.local_dc = consul.datacenter
        self.token = consul.token if consul.forward_token else None

    def upstream(
        self, exchange: Exchange, endpoint: Endpoint, headers: MutableMapping[str, str]
    ) -> None:
        dc = endpoint.datacenter or self.local_dc
        if dc:
            headers["X-Consul-Datacenter"] = dc
        if self.token:
            headers["X-Consul-Token"] = self.token


def injectors_for(config) -> list[MeshHeaders]:
    """The injector pipeline for the configured mesh (order = call order)."""
    mesh = config.service_mesh
    if mesh.kind == "consul":
        if mesh.consul.forward_token and mesh.consul.token:
            log.warning(
                "consul.forwardToken is on: the gateway's Consul ACL token is sent to every "
                "backend as X-Consul-Token; any backend can then act on Consul with it"
            )
        return [ConsulHeaders(mesh.consul)]
    return []
