"""Consul HTTP API endpoints for the double: routing, ACLs, blocking, JSON bodies.

Behaviour follows Consul's ``agent/http.go`` and the endpoint docs: 404 with
"Invalid URL path: ..." for unknown paths, 405 + ``Allow`` for a wrong method,
``Request decode failed: ...`` (400) for a bad JSON body, 403 "ACL not found" for an
unknown token, silent ACL filtering of list results for the anonymous token, 500
"No path to datacenter" for an unknown ``?dc=``.

``block_endpoints`` mirrors the agent option ``http_config.block_endpoints``: a request
whose path starts with a listed prefix gets 403 "Endpoint is blocked by agent
configuration" (``agent/http.go``: checked in the handler wrapper, so only registered
paths; an unknown path stays a 404). Note that a Consul *server* is an agent too and
serves every ``/v1/agent/...`` endpoint (``agent/http_register.go`` registers them on
every agent), including the Connect leaf; a server "without agent endpoints" is one
hardened with ``block_endpoints = ["/v1/agent/"]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tests.doubles.consul_filter import FilterError, FilterUnsupported, compile_filter
from tests.doubles.consul_http import LEADER, HTTPError, Reply, Request
from tests.doubles.consul_model import DEFAULT_WAIT, MAX_WAIT, PASSING, parse_go_duration
from tests.doubles.consul_writes import WriteEndpoints

__all__ = ["ConsulAPI", "HTTPError", "Reply", "Request"]


class ConsulAPI(WriteEndpoints):
    """Dispatches :class:`Request` objects against a :class:`ConsulState`."""

    GET_ROUTES: dict[str, str] = {
        "/v1/catalog/services": "catalog_services",
        "/v1/catalog/datacenters": "catalog_datacenters",
        "/v1/agent/connect/ca/roots": "ca_roots",
        "/v1/connect/ca/roots": "ca_roots",
        "/v1/status/leader": "status_leader",
        "/v1/status/peers": "status_peers",
    }
    #: Path prefixes refused with 403 (``http_config.block_endpoints``).
    block_endpoints: tuple[str, ...] = ()
    PUT_ROUTES: dict[str, str] = {
        "/v1/agent/service/register": "agent_service_register",
        "/v1/catalog/register": "catalog_register",
        "/v1/catalog/deregister": "catalog_deregister",
    }
    PREFIX_ROUTES: list[tuple[str, str, str]] = [
        ("/v1/health/service/", "GET", "health_service"),
        ("/v1/health/connect/", "GET", "health_connect"),
        ("/v1/catalog/service/", "GET", "catalog_service"),
        ("/v1/agent/connect/ca/leaf/", "GET", "ca_leaf"),
        ("/v1/agent/service/deregister/", "PUT", "agent_service_deregister"),
        ("/v1/agent/check/pass/", "PUT", "agent_check_pass"),
        ("/v1/agent/check/warn/", "PUT", "agent_check_warn"),
        ("/v1/agent/check/fail/", "PUT", "agent_check_fail"),
        ("/v1/agent/check/update/", "PUT", "agent_check_update"),
    ]

    # -- dispatch ---------------------------------------------------------------------
    def route(self, path: str) -> tuple[str, str, str] | None:
        """(method, handler name, path remainder) for ``path``, or None (404)."""
        if path in self.GET_ROUTES:
            return "GET", self.GET_ROUTES[path], ""
        if path in self.PUT_ROUTES:
            return "PUT", self.PUT_ROUTES[path], ""
        for prefix, method, name in self.PREFIX_ROUTES:
            if path.startswith(prefix):
                return method, name, path[len(prefix) :]
        return None

    def handle(self, req: Request, aborted: Callable[[], bool]) -> Reply:
        found = self.route(req.path)
        if found is None:
            if "/v1/" in req.path:
                text = "Invalid URL path: not a recognized HTTP API endpoint\n"
            else:
                text = (
                    "Invalid URL path: if attempting to use the HTTP API, "
                    "ensure the path starts with '/v1/'\n"
                )
            return Reply(404, text.encode(), {"Content-Type": "text/plain; charset=utf-8"})
        if any(req.path.startswith(prefix) for prefix in self.block_endpoints):
            return Reply(
                403,
                b"Endpoint is blocked by agent configuration",
                {"Content-Type": "text/plain; charset=utf-8"},
            )
        method, name, rest = found
        common = {"Vary": "Accept-Encoding"}
        common["X-Consul-Default-Acl-Policy"] = "deny" if self.acl_tokens is not None else "allow"
        try:
            if req.method == "OPTIONS":
                return Reply(200, b"", {**common, "Allow": f"OPTIONS,{method}"})
            if req.method != method:
                raise HTTPError(
                    405, f"method {req.method} not allowed", {"Allow": f"OPTIONS,{method}"}
                )
            try:
                reply: Reply = getattr(self, name)(req, rest, aborted)
            except (ValueError, TypeError, AttributeError) as exc:
                if req.method != "PUT":
                    raise
                # A body of the wrong shape (e.g. "Port": "abc"): Go fails while decoding.
                raise HTTPError(400, f"Request decode failed: {exc}") from None
        except HTTPError as exc:
            headers = {**common, "Content-Type": "text/plain; charset=utf-8", **exc.headers}
            return Reply(exc.status, exc.text.encode(), headers)
        reply.headers = {**common, **reply.headers}
        return reply

    # -- request helpers --------------------------------------------------------------
    @staticmethod
    def blocking_params(req: Request) -> tuple[int, float, str]:
        if "stale" in req.query and "consistent" in req.query:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        wait = DEFAULT_WAIT
        if req.arg("wait"):
            try:
                wait = parse_go_duration(req.arg("wait") or "")
            except ValueError:
                raise HTTPError(400, "Invalid wait time") from None
        index = 0
        if req.arg("index"):
            try:
                index = int(req.arg("index") or "")
                if index < 0:
                    raise ValueError
            except ValueError:
                raise HTTPError(400, "Invalid index") from None
        if wait <= 0:
            wait = DEFAULT_WAIT
        wait = min(wait, MAX_WAIT)
        wait += random.uniform(0, wait / 16)
        consistency = "stale" if "stale" in req.query else "leader"
        if "consistent" in req.query:
            consistency = "consistent"
        return index, wait, consistency

    def blocking(
        self,
        req: Request,
        compute: Callable[[], tuple[int, Any]],
        aborted: Callable[[], bool],
    ) -> tuple[int, Any, dict[str, str]]:
        index, wait, consistency = self.blocking_params(req)
        got_index, payload = self.state.block(compute, index, wait, aborted=aborted)
        headers = {
            # Consul's docs allow 0 here; clients must never block on it (they reset to 1).
            "X-Consul-Index": "0" if self.state.index_zero else str(max(1, got_index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": consistency,
        }
        return got_index, payload, headers

    # -- catalog / health reads -------------------------------------------------------
    def catalog_services(self, req: Request, _rest: str, aborted: Callable[[], bool]) -> Reply:
        dc = self.dc(req)
        self.check_ns(req)
        authz = self.authz(req)
        for unsupported in ("filter", "node-meta"):
            if req.arg(unsupported):
                raise HTTPError(
                    400, f"ConsulDouble: ?{unsupported} is not supported on /v1/catalog/services"
                )

        def compute() -> tuple[int, Any]:
            index, listing = self.state.catalog_services(dc)
            if authz.allowed("read"):
                return index, (listing, False)
            return index, ({}, bool(listing))

        _, (listing, filtered), headers = self.blocking(req, compute, aborted)
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return Reply.json(listing, headers)

    def catalog_datacenters(self, req: Request, _rest: str, _aborted: Callable[[], bool]) -> Reply:
        return Reply.json(list(self.state.datacenters))

    def health_service(self, req: Request, rest: str, aborted: Callable[[], bool]) -> Reply:
        return self._health(req, rest, aborted, connect=False)

    def health_connect(self, req: Request, rest: str, aborted: Callable[[], bool]) -> Reply:
        return self._health(req, rest, aborted, connect=True)

    def _health(
        self, req: Request, name: str, aborted: Callable[[], bool], *, connect: bool
    ) -> Reply:
        if not name:
            raise HTTPError(400, "Missing service name")
        dc = self.dc(req)
        self.check_ns(req)
        passing = self.bool_param(req, "passing")
        tags = [t.lower() for t in req.query.get("tag", [])]
        node_meta = [m.partition(":")[::2] for m in req.query.get("node-meta", [])]
        predicate = None
        if req.arg("filter"):
            try:
                predicate = compile_filter(req.arg("filter") or "")
            except FilterUnsupported as exc:
                raise HTTPError(400, f"ConsulDouble: {exc}") from None
            except FilterError as exc:
                raise HTTPError(
                    500, f"Failed to create boolean expression evaluator: {exc}"
                ) from None
        authz = self.authz(req)

        def compute() -> tuple[int, Any]:
            index, entries = self.state.health(dc, name, connect=connect)
            if connect and not authz.allowed("read"):
                # Consul needs service:read on the destination first and answers an
                # empty list with the real index but without the "filtered" header.
                return index, ([], False)
            before = len(entries)
            if not authz.allowed("read"):
                entries = []
            filtered = len(entries) != before
            if tags:
                entries = [
                    e
                    for e in entries
                    if set(tags) <= {t.lower() for t in (e["Service"]["Tags"] or [])}
                ]
            for key, value in node_meta:
                entries = [e for e in entries if (e["Node"]["Meta"] or {}).get(key) == value]
            if predicate is not None:
                entries = [e for e in entries if predicate(e)]
            return index, (entries, filtered)

        _, (entries, filtered), headers = self.blocking(req, compute, aborted)
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return Reply.json(entries, headers)

    def catalog_service(self, req: Request, name: str, aborted: Callable[[], bool]) -> Reply:
        if not name:
            raise HTTPError(400, "Missing service name")
        if req.arg("filter"):
            raise HTTPError(400, "ConsulDouble: ?filter is not supported on /v1/catalog/service")
        dc = self.dc(req)
        self.check_ns(req)
        tags = [t.lower() for t in req.query.get("tag", [])]
        authz = self.authz(req)

        def compute() -> tuple[int, Any]:
            index, entries = self.state.health(dc, name, connect=False)
            filtered = bool(entries) and not authz.allowed("read")
            if filtered:
                entries = []
            out = []
            for e in entries:
                node, svc = e["Node"], e["Service"]
                if tags and not set(tags) <= {t.lower() for t in (svc["Tags"] or [])}:
                    continue
                out.append(
                    {
                        "ID": node["ID"],
                        "Node": node["Node"],
                        "Address": node["Address"],
                        "Datacenter": node["Datacenter"],
                        "TaggedAddresses": node["TaggedAddresses"],
                        "NodeMeta": node["Meta"],
                        "ServiceKind": svc.get("Kind", ""),
                        "ServiceID": svc["ID"],
                        "ServiceName": svc["Service"],
                        "ServiceTags": svc["Tags"],
                        "ServiceAddress": svc["Address"],
                        "ServiceWeights": svc["Weights"],
                        "ServiceMeta": svc["Meta"],
                        "ServicePort": svc["Port"],
                        "ServiceEnableTagOverride": svc["EnableTagOverride"],
                        "ServiceProxy": svc["Proxy"],
                        "ServiceConnect": svc["Connect"],
                        "CreateIndex": svc["CreateIndex"],
                        "ModifyIndex": svc["ModifyIndex"],
                    }
                )
            return index, (out, filtered)

        _, (entries, filtered), headers = self.blocking(req, compute, aborted)
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return Reply.json(entries, headers)

    # -- Connect CA -------------------------------------------------------------------
    def ca_roots(self, req: Request, _rest: str, aborted: Callable[[], bool]) -> Reply:
        self.dc(req)
        _, payload, headers = self.blocking(req, self.state.roots_payload, aborted)
        return Reply.json(payload, headers)

    def ca_leaf(self, req: Request, service: str, aborted: Callable[[], bool]) -> Reply:
        if not service:
            raise HTTPError(400, "Missing service name")
        self.dc(req)
        self.check_ns(req)
        self.authz(req).require("service", "write", service)
        _, payload, headers = self.blocking(req, lambda: self.state.leaf(service), aborted)
        return Reply.json(payload, headers)

    # -- status -----------------------------------------------------------------------
    def status_leader(self, req: Request, _rest: str, _aborted: Callable[[], bool]) -> Reply:
        self.dc(req)
        return Reply.json(LEADER)

    def status_peers(self, req: Request, _rest: str, _aborted: Callable[[], bool]) -> Reply:
        self.dc(req)
        return Reply.json([LEADER])
