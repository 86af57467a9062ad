"""Write endpoints of the Consul double: agent service/check and catalog registration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.doubles.consul_http import (
    Authz,
    EndpointBase,
    HTTPError,
    Reply,
    Request,
    canonical_proxy,
    field_of,
    no_dc_path,
)
from tests.doubles.consul_model import (
    CRITICAL,
    PASSING,
    STATUSES,
    WARNING,
    Check,
    Service,
    duration_field,
)


class WriteEndpoints(EndpointBase):
    """``PUT`` endpoints: /v1/agent/service/*, /v1/agent/check/*, /v1/catalog/*register."""

    # -- agent writes -----------------------------------------------------------------
    def parse_check(
        self, raw: Any, default_id: str, default_name: str, dc: str, node: str
    ) -> Check:
        if not isinstance(raw, dict):
            raise HTTPError(400, "Request decode failed: check definition must be an object")
        try:
            ttl = duration_field(field_of(raw, "TTL"))
            interval = duration_field(field_of(raw, "Interval"))
            timeout = duration_field(field_of(raw, "Timeout"))
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
        http, tcp = field_of(raw, "HTTP") or "", field_of(raw, "TCP") or ""
        alias = field_of(raw, "AliasService") or ""
        script = field_of(raw, "Args") or field_of(raw, "ScriptArgs")
        grpc = field_of(raw, "GRPC") or ""
        interval_check = bool(http or tcp or script or grpc or field_of(raw, "H2PING"))
        if interval and ttl:
            raise HTTPError(400, "Invalid check: Interval and TTL cannot both be specified")
        if interval_check and interval <= 0:
            raise HTTPError(
                400,
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks",
            )
        if not interval_check and not alias and ttl <= 0:
            raise HTTPError(400, "Invalid check: TTL must be > 0 for TTL checks")
        status = field_of(raw, "Status") or CRITICAL
        if status not in STATUSES:
            raise HTTPError(400, f"Invalid check: Status {status!r} is not valid")
        kind = "ttl" if ttl else "http" if http else "tcp" if tcp else "grpc" if grpc else ""
        kind = kind or ("alias" if alias else "script")
        header = field_of(raw, "Header") or {}
        return Check(
            dc,
            node,
            field_of(raw, "CheckID") or field_of(raw, "ID") or default_id,
            field_of(raw, "Name") or default_name,
            status=status,
            notes=field_of(raw, "Notes") or "",
            type=kind,
            interval=interval,
            timeout=timeout,
            ttl=ttl,
            alias_service=alias,
            http=http,
            tcp=tcp,
            method=field_of(raw, "Method") or "GET",
            header={k: list(v) if isinstance(v, list) else [str(v)] for k, v in header.items()},
            tls_skip_verify=bool(field_of(raw, "TLSSkipVerify")),
        )

    def _service_checks(
        self, body: dict[str, Any], sid: str, name: str, dc: str, node: str
    ) -> list[Check]:
        raw = []
        if field_of(body, "Check"):
            raw.append(field_of(body, "Check"))
        raw.extend(field_of(body, "Checks") or [])
        checks = []
        for i, item in enumerate(raw, start=1):
            default_id = f"service:{sid}" + (f":{i}" if len(raw) > 1 else "")
            checks.append(self.parse_check(item, default_id, f"Service '{name}' check", dc, node))
        return checks

    def agent_service_register(
        self, req: Request, _rest: str, _aborted: Callable[[], bool]
    ) -> Reply:
        self.check_ns(req)
        body = self.body_json(req)
        if not isinstance(body, dict):
            raise HTTPError(400, "Request decode failed: expected a JSON object")
        name = field_of(body, "Name") or ""
        if not name:
            raise HTTPError(400, "Missing service name")
        address = field_of(body, "Address") or ""
        if address in ("0.0.0.0", "::", "[::]"):
            raise HTTPError(400, "Invalid service address")
        authz = self.authz(req)
        authz.require("service", "write", name)
        state, dc, node = self.state, self.state.datacenter, self.state.node_name
        sid = field_of(body, "ID") or name
        kind = field_of(body, "Kind") or ""
        port = int(field_of(body, "Port") or 0)
        proxy = canonical_proxy(field_of(body, "Proxy"))
        if kind == "connect-proxy":
            if not proxy.get("DestinationServiceName"):
                raise HTTPError(400, "Invalid Service: Proxy.DestinationServiceName must be set")
            if not port:
                raise HTTPError(400, "Invalid Service: Port must be set for a Connect proxy")
        connect = dict(field_of(body, "Connect") or {})
        sidecar = field_of(connect, "SidecarService")
        connect = {"Native": True} if field_of(connect, "Native") else {}
        tags = field_of(body, "Tags")
        meta = field_of(body, "Meta")
        weights = field_of(body, "Weights")
        svc = Service(
            dc,
            node,
            sid,
            name,
            port=port,
            address=address,
            tags=list(tags) if tags else None,
            meta=dict(meta) if meta else None,
            weights=_weights(weights),
            tagged_addresses=self._tagged(field_of(body, "TaggedAddresses"), address, port),
            enable_tag_override=bool(field_of(body, "EnableTagOverride")),
            kind=kind,
            proxy=proxy,
            connect=connect,
        )
        checks = self._service_checks(body, sid, name, dc, node)
        replace = self.bool_param(req, "replace-existing-checks")
        with state.cond:
            # Like Consul's check-state snapshot: re-registering keeps a check's status.
            for chk in checks:
                prev = state.checks.get((dc, node, chk.id))
                if prev is not None and prev.service_id == sid:
                    chk.status, chk.output = prev.status, prev.output
            state.put_service(svc, checks, keep_other_checks=not replace)
            sidecar_id = f"{sid}-sidecar-proxy"
            if isinstance(sidecar, dict):
                self._register_sidecar(svc, sidecar, authz)
            elif state.services.get((dc, node, sidecar_id)):
                state.remove_service(dc, node, sidecar_id)
        return Reply(200)

    @staticmethod
    def _tagged(raw: Any, address: str, port: int) -> dict[str, Any] | None:
        out = dict(raw) if isinstance(raw, dict) else {}
        if address and ":" not in address and address.replace(".", "").isdigit():
            out.setdefault("lan_ipv4", {"Address": address, "Port": port})
            out.setdefault("wan_ipv4", {"Address": address, "Port": port})
        return out or None

    def _register_sidecar(self, parent: Service, raw: dict[str, Any], authz: Authz) -> None:
        state = self.state
        sid = field_of(raw, "ID") or f"{parent.id}-sidecar-proxy"
        name = field_of(raw, "Name") or f"{parent.name}-sidecar-proxy"
        authz.require("service", "write", name)
        port = int(field_of(raw, "Port") or 0)
        if not port:
            used = {
                s.port
                for s in state.services.values()
                if (s.dc, s.node) == (parent.dc, parent.node)
            }
            port = next(p for p in range(21000, 21256) if p not in used)
        address = field_of(raw, "Address") or parent.address
        proxy = canonical_proxy(field_of(raw, "Proxy"))
        proxy.update(
            {
                "DestinationServiceName": parent.name,
                "DestinationServiceID": parent.id,
                "LocalServiceAddress": proxy.get("LocalServiceAddress") or "127.0.0.1",
                "LocalServicePort": proxy.get("LocalServicePort") or parent.port,
            }
        )
        tags, meta = field_of(raw, "Tags"), field_of(raw, "Meta")
        proxy_svc = Service(
            parent.dc,
            parent.node,
            sid,
            name,
            port=port,
            address=address,
            tags=list(tags) if tags else parent.tags,
            meta=dict(meta) if meta else parent.meta,
            kind="connect-proxy",
            proxy=proxy,
            tagged_addresses=self._tagged(None, address, port),
        )
        checks = self._service_checks(raw, sid, name, parent.dc, parent.node)
        if not checks:
            target = f"{address or '127.0.0.1'}:{port}"
            checks = [
                Check(
                    parent.dc,
                    parent.node,
                    f"service:{sid}:1",
                    "Connect Sidecar Listening",
                    type="tcp",
                    tcp=target,
                    interval=10.0,
                ),
                Check(
                    parent.dc,
                    parent.node,
                    f"service:{sid}:2",
                    f"Connect Sidecar Aliasing {parent.id}",
                    type="alias",
                    alias_service=parent.id,
                ),
            ]
        state.put_service(proxy_svc, checks)

    def agent_service_deregister(
        self, req: Request, sid: str, _aborted: Callable[[], bool]
    ) -> Reply:
        state, dc, node = self.state, self.state.datacenter, self.state.node_name
        authz = self.authz(req)
        with state.cond:
            svc = state.services.get((dc, node, sid))
            if svc is None:
                raise HTTPError(
                    404,
                    f'Unknown service ID "{sid}". '
                    "Ensure that the service ID is passed, not the service name.",
                )
            authz.require("service", "write", svc.name)
            state.remove_service(dc, node, sid)
            sidecar = state.services.get((dc, node, f"{sid}-sidecar-proxy"))
            if sidecar is not None and sidecar.proxy.get("DestinationServiceID") == sid:
                state.remove_service(dc, node, sidecar.id)
        return Reply(200)

    def _agent_check(self, req: Request, check_id: str) -> Check:
        state, dc, node = self.state, self.state.datacenter, self.state.node_name
        authz = self.authz(req)
        chk = state.checks.get((dc, node, check_id))
        if chk is None:
            raise HTTPError(
                404,
                f'Unknown check ID "{check_id}". '
                "Ensure that the check ID is passed, not the check name.",
            )
        if chk.service_id:
            authz.require("service", "write", chk.service_name)
        else:
            authz.require("node", "write", node)
        if not chk.ttl:
            raise HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
        return chk

    def _ttl_update(self, req: Request, check_id: str, status: str, output: str | None) -> Reply:
        with self.state.cond:
            chk = self._agent_check(req, check_id)
            self.state.update_check(chk, status, output or "")
        return Reply(200)

    def agent_check_pass(self, req: Request, cid: str, _aborted: Callable[[], bool]) -> Reply:
        return self._ttl_update(req, cid, PASSING, req.arg("note"))

    def agent_check_warn(self, req: Request, cid: str, _aborted: Callable[[], bool]) -> Reply:
        return self._ttl_update(req, cid, WARNING, req.arg("note"))

    def agent_check_fail(self, req: Request, cid: str, _aborted: Callable[[], bool]) -> Reply:
        return self._ttl_update(req, cid, CRITICAL, req.arg("note"))

    def agent_check_update(self, req: Request, cid: str, _aborted: Callable[[], bool]) -> Reply:
        body = self.body_json(req)
        status = field_of(body, "Status") or ""
        if status not in STATUSES:
            raise HTTPError(400, f"Invalid check status: '{status}'")
        return self._ttl_update(req, cid, status, field_of(body, "Output") or "")

    # -- catalog writes ---------------------------------------------------------------
    def _catalog_request(self, req: Request) -> tuple[dict, str, str]:
        """The body, datacenter and node of a catalog write, checked as Consul does."""
        body = self.body_json(req)
        if not isinstance(body, dict):
            raise HTTPError(400, "Request decode failed: expected a JSON object")
        dc = field_of(body, "Datacenter") or req.arg("dc") or self.state.datacenter
        if dc not in self.state.datacenters:
            raise no_dc_path()
        node = field_of(body, "Node") or ""
        if not node:
            raise HTTPError(500, "Must provide node")
        return body, dc, node

    def catalog_register(self, req: Request, _rest: str, _aborted: Callable[[], bool]) -> Reply:
        body, dc, node = self._catalog_request(req)
        address = field_of(body, "Address") or ""
        skip_node = bool(field_of(body, "SkipNodeUpdate"))
        if not address and not skip_node:
            raise HTTPError(500, "Must provide address if SkipNodeUpdate is not set")
        authz = self.authz(req)
        raw_svc = field_of(body, "Service")
        svc = None
        if isinstance(raw_svc, dict):
            name = field_of(raw_svc, "Service") or ""
            sid = field_of(raw_svc, "ID") or name
            if sid and not name:
                raise HTTPError(500, "Must provide service name with ID")
            authz.require("service", "write", name)
            tags, meta = field_of(raw_svc, "Tags"), field_of(raw_svc, "Meta")
            weights = field_of(raw_svc, "Weights")
            svc = Service(
                dc,
                node,
                sid,
                name,
                port=int(field_of(raw_svc, "Port") or 0),
                address=field_of(raw_svc, "Address") or "",
                tags=list(tags) if tags else None,
                meta=dict(meta) if meta else None,
                weights=_weights(weights),
                tagged_addresses=field_of(raw_svc, "TaggedAddresses") or None,
                enable_tag_override=bool(field_of(raw_svc, "EnableTagOverride")),
                kind=field_of(raw_svc, "Kind") or "",
                proxy=canonical_proxy(field_of(raw_svc, "Proxy")),
                connect={"Native": True}
                if field_of(field_of(raw_svc, "Connect"), "Native")
                else {},
            )
        authz.require("node", "write", node)
        raw_checks = [field_of(body, "Check")] if field_of(body, "Check") else []
        raw_checks += field_of(body, "Checks") or []
        state = self.state
        with state.cond:
            if (dc, node) not in state.nodes and skip_node:
                raise HTTPError(500, "Must provide address if SkipNodeUpdate is not set")
            if not skip_node:
                node_id = field_of(body, "ID") or None
                state.ensure_node(
                    dc,
                    node,
                    address,
                    agent=False,
                    node_id=node_id,
                    tagged_addresses=field_of(body, "TaggedAddresses"),
                    meta=field_of(body, "NodeMeta"),
                )
            if svc is not None:
                state.put_service(svc, [], keep_other_checks=True)
            for raw in raw_checks:
                if not isinstance(raw, dict):
                    raise HTTPError(400, "Request decode failed: check must be an object")
                cid = field_of(raw, "CheckID") or field_of(raw, "Name") or ""
                if not cid:
                    raise HTTPError(500, "Missing check ID")
                status = field_of(raw, "Status") or CRITICAL
                if status not in STATUSES:
                    raise HTTPError(500, f"Check status {status!r} is not valid")
                service_id = field_of(raw, "ServiceID") or ""
                chk = Check(
                    dc,
                    field_of(raw, "Node") or node,
                    cid,
                    field_of(raw, "Name") or cid,
                    status=status,
                    notes=field_of(raw, "Notes") or "",
                    output=field_of(raw, "Output") or "",
                    service_id=service_id,
                )
                try:
                    state.put_check(chk)
                except KeyError:
                    raise HTTPError(
                        500, f'Unknown service ID "{service_id}" for check "{cid}"'
                    ) from None
        return Reply.json(True)

    def catalog_deregister(self, req: Request, _rest: str, _aborted: Callable[[], bool]) -> Reply:
        body, dc, node = self._catalog_request(req)
        authz = self.authz(req)
        state = self.state
        service_id = field_of(body, "ServiceID") or ""
        check_id = field_of(body, "CheckID") or ""
        with state.cond:
            if service_id:
                svc = state.services.get((dc, node, service_id))
                authz.require("service", "write", svc.name if svc else service_id)
                state.remove_service(dc, node, service_id)
            elif check_id:
                authz.require("node", "write", node)
                state.remove_check(dc, node, check_id)
            else:
                authz.require("node", "write", node)
                state.remove_node(dc, node)
        return Reply.json(True)


def _weights(weights: object) -> dict[str, int]:
    """A registration's ``Weights`` as Consul stores them (absent: 1 and 1)."""
    if not weights:
        return {"Passing": 1, "Warning": 1}
    return {
        "Passing": int(field_of(weights, "Passing", 0)),
        "Warning": int(field_of(weights, "Warning", 0)),
    }
