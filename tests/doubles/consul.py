"""A Consul HTTP API stand-in served over real HTTP on 127.0.0.1.

Usage::

    with ConsulDouble() as consul:
        consul.register("web", port=8080)
        requests.get(f"{consul.url}/v1/health/service/web?passing")

It serves the catalog, health, Connect CA (roots + leaf) and agent registration
endpoints with Consul's semantics -- blocking queries (``index``/``wait`` with jitter),
``X-Consul-Index`` per result, ACL tokens, TTL/HTTP/TCP/alias checks, leaf renewal
between 60% and 90% of the lifetime -- and adds failure switches for tests:
:meth:`go_down` / :meth:`come_up` (same port), :meth:`hang`, :meth:`garbage`,
:meth:`fail_with` (per path and datacenter), :meth:`lag`, :meth:`set_index_backwards`,
:meth:`report_index_zero`, :meth:`return_early`. Switches also reach blocking queries
already in flight.  See ``consul_api`` for endpoint
details and ``consul_state`` for the data model.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.doubles.consul_api import ConsulAPI, Reply, Request
from tests.doubles.consul_model import CRITICAL, PASSING, STATUSES, Check, Service
from tests.doubles.consul_state import ConsulState
from tests.doubles.pki import CertificateAuthority, IssuedCert

__all__ = ["ConsulDouble", "RequestRecord"]

#: Upper bound on how long a hung request is held before its connection is dropped.
HANG_LIMIT = 120.0
GARBAGE_BODY = b'[{"Node": {"ID": "7f3c\x00\x01 <html>502 Bad Gateway</html>'


@dataclass(frozen=True)
class RequestRecord:
    """One request as the double received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    time: float
    client_port: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # Consul (Go's net/http) listens with the kernel's somaxconn backlog; socketserver's
    # default of 5 drops SYNs when many watches connect at once, and each drop costs the
    # client a 1 s, then 2 s, 4 s... retransmission that real Consul would not cause.
    request_queue_size = 4096

    def __init__(self, address: tuple[str, int], double: ConsulDouble) -> None:
        self.double = double
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections we cut on purpose (go_down/stop) raise here; stay quiet about them.
        self.double._note_error(traceback.format_exc(), quiet_os_errors=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.double._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.double._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # Like Go's net/http: Date, but no "Server: BaseHTTP/..." header.
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        self.server.double._serve(self)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve


class ConsulDouble:
    """Consul's HTTP API on ``127.0.0.1:<port>`` backed by in-memory state.

    ``acl_tokens`` maps token -> "read" | "write" and turns ACLs on with default-deny
    (``None`` disables ACLs).  "read" grants service:read + node:read on everything,
    "write" grants service:write + node:write (needed for leaf certificates).
    """

    def __init__(
        self,
        datacenter: str = "dc1",
        datacenters: Iterable[str] = ("dc1",),
        acl_tokens: dict[str, str] | None = None,
        ca: CertificateAuthority | None = None,
        leaf_ttl: timedelta = timedelta(hours=72),
        *,
        node_name: str = "node-1",
        node_address: str = "127.0.0.1",
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        block_endpoints: Iterable[str] = (),
    ) -> None:
        """``tls``: serve HTTPS with this server context (Consul's ``https`` listener).

        ``block_endpoints``: path prefixes answered 403 "Endpoint is blocked by agent
        configuration", as Consul's ``http_config.block_endpoints`` does. A Consul server
        serves ``/v1/agent/...`` like any agent; ``ConsulDouble.server()`` is one that
        blocks them, answering only what discovery needs (catalog, health, status...).
        """
        if ca is None:
            ca = CertificateAuthority(trust_domain=f"{uuid.uuid4()}.consul")
        self.host = host
        self._port = port
        self._tls = tls
        self.state = ConsulState(
            datacenter=datacenter,
            datacenters=datacenters,
            node_name=node_name,
            node_address=node_address,
            ca=ca,
            leaf_ttl=leaf_ttl,
        )
        self.api = ConsulAPI(self.state, acl_tokens)
        self.api.block_endpoints = tuple(block_endpoints)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._gate = threading.Condition()
        self._log: list[RequestRecord] = []
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._life_gen = 0
        self._started = False
        self._stopped = False
        self._hanging = False
        self._garbage = False
        # (path prefix or None, datacenter or None, status, body); first match wins.
        self._failures: list[tuple[str | None, str | None, int, str]] = []
        self._lags: list[tuple[str, float, bool]] = []
        self._lagged = 0
        self._switch_gen = 0
        self._hk_stop = threading.Event()
        self._hk_thread: threading.Thread | None = None

    @classmethod
    def server(cls, **kwargs: Any) -> ConsulDouble:
        """A Consul server reached without a local client agent, its agent endpoints
        blocked (``http_config.block_endpoints = ["/v1/agent/"]``): catalog and health
        answer, the Connect leaf and agent roots get 403 "Endpoint is blocked by agent
        configuration". (Unblocked, a server serves the leaf like any agent.)"""
        kwargs.setdefault("block_endpoints", ("/v1/agent/",))
        return cls(**kwargs)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> ConsulDouble:
        """Bind (port 0 picks a free port), start serving and housekeeping; return self."""
        if self._started:
            return self
        self._started = True
        self._bind()
        self._hk_thread = threading.Thread(
            target=self._housekeeper, name="consul-double-hk", daemon=True
        )
        self._hk_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving for good; hung and blocking requests are dropped."""
        if self._stopped:
            return
        self._stopped = True
        self.go_down()
        self._hk_stop.set()
        if self._hk_thread is not None:
            self._hk_thread.join(timeout=5)

    def __enter__(self) -> ConsulDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (stable across go_down/come_up)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, e.g. for ``CONSUL_HTTP_ADDR``."""
        return f"{self.host}:{self._port}"

    @property
    def url(self) -> str:
        """``http://host:port`` (``https`` when serving TLS)."""
        return f"{'https' if self._tls else 'http'}://{self.address}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def _bind(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                server = _Server((self.host, self._port), self)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._port = server.server_address[1]
        if self._tls is not None:
            server.socket = self._tls.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="consul-double",
            daemon=True,
        )
        with self._lock:
            self._server, self._thread = server, thread
        thread.start()

    # -- failure switches -------------------------------------------------------------
    def go_down(self) -> None:
        """Close the listening socket (connections are refused) and cut open connections.

        In-flight blocking queries and hung requests are aborted without an answer.
        """
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            self._life_gen += 1
            conns = list(self._conns)
        with self.state.cond:
            self.state.abort_gen += 1
            self.state.cond.notify_all()
        with self._gate:
            self._gate.notify_all()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)

    def come_up(self) -> None:
        """Listen again on the same port (state is kept)."""
        if self._stopped:
            raise RuntimeError("the double was stopped")
        if self._server is None:
            self._bind()

    def hang(self, on: bool = True) -> None:
        """Accept and read requests but do not answer until ``hang(False)`` (or stop).

        A request is held at most ``HANG_LIMIT`` seconds, then its connection dropped.
        Blocking queries already in flight are held too (their answer is not sent).
        """
        with self._gate:
            self._hanging = on
            self._gate.notify_all()
        self._switched()

    def garbage(self, on: bool = True) -> None:
        """Answer every request 200 with a body that is not valid JSON (in-flight too)."""
        self._garbage = on
        self._switched()

    def fail_with(
        self,
        status: int | None,
        body: str = "",
        *,
        path: str | None = None,
        dc: str | None = None,
    ) -> None:
        """Answer requests with ``status``/``body`` (text/plain).

        ``path`` (a prefix) and ``dc`` (the request's ``?dc=``, or the agent's) narrow it
        to some requests; several such switches can be on at once. ``status=None`` clears
        the switches with the same ``path``/``dc`` (all of them when both are None).
        Blocking queries already in flight that a switch now matches answer with it at once.
        """
        if status is None:
            if path is None and dc is None:
                self._failures = []
            else:
                self._failures = [f for f in self._failures if (f[0], f[1]) != (path, dc)]
        else:
            kept = [f for f in self._failures if (f[0], f[1]) != (path, dc)]
            self._failures = [(path, dc, int(status), body), *kept]
        self._switched()

    def lag(self, path: str | None, seconds: float = 0.0, *, blocking: bool = False) -> None:
        """Compute answers to requests under ``path`` at once but send them ``seconds``
        later (a slow link): the answer shows the state of when it was computed.
        Only non-blocking requests unless ``blocking``. ``path=None`` clears every lag."""
        if path is None:
            self._lags = []
        else:
            self._lags = [*(x for x in self._lags if x[0] != path), (path, seconds, blocking)]

    @property
    def lagged(self) -> int:
        """How many answers have been computed and held back by :meth:`lag` so far."""
        with self._lock:
            return self._lagged

    def report_index_zero(self, on: bool = True) -> None:
        """Send ``X-Consul-Index: 0`` on blocking endpoints (Consul's docs say it can be)."""
        self.state.index_zero = on

    def return_early(self, probability: float = 1.0) -> None:
        """Make blocking queries return early with an unchanged index now and then, as
        real Consul does (hashicorp/consul#3890); 0 turns it off."""
        self.state.early_return = float(probability)
        with self.state.cond:
            self.state.cond.notify_all()

    def _switched(self) -> None:
        """A failure switch changed: in-flight requests re-evaluate what they answer."""
        with self._lock:
            self._switch_gen += 1
        with self.state.cond:
            self.state.cond.notify_all()

    def _failure_for(self, req: Request) -> tuple[int, str] | None:
        for path, dc, status, body in self._failures:
            if path is not None and not req.path.startswith(path):
                continue
            if dc is not None and (req.arg("dc") or self.state.datacenter) != dc:
                continue
            return status, body
        return None

    def _lag_for(self, req: Request) -> float:
        blocking = (req.arg("index") or "0") != "0"
        for path, seconds, on_blocking in self._lags:
            if req.path.startswith(path) and (on_blocking or not blocking):
                return seconds
        return 0.0

    # -- request log ------------------------------------------------------------------
    @property
    def requests_seen(self) -> list[RequestRecord]:
        """A snapshot (copy) of every request received so far."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def count(self, path_prefix: str = "/", method: str | None = None) -> int:
        """Number of logged requests whose path starts with ``path_prefix``."""
        return len(self.requests_matching(path_prefix, method))

    def requests_matching(
        self, path_prefix: str = "/", method: str | None = None
    ) -> list[RequestRecord]:
        return [
            r
            for r in self.requests_seen
            if r.path.startswith(path_prefix) and (method is None or r.method == method)
        ]

    def user_agents(self, path_prefix: str = "/") -> set[str]:
        """Distinct ``User-Agent`` values seen on requests under ``path_prefix``."""
        return {r.headers.get("user-agent", "") for r in self.requests_matching(path_prefix)}

    def wait_for_requests(
        self, path_prefix: str, n: int = 1, timeout: float = 10.0
    ) -> list[RequestRecord]:
        """Wait until at least ``n`` requests matched ``path_prefix``; raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.requests_matching(path_prefix)
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw {len(found)} requests to {path_prefix!r}, wanted {n}")
            time.sleep(0.02)

    # -- registry from Python ---------------------------------------------------------
    @property
    def datacenter(self) -> str:
        return self.state.datacenter

    @property
    def trust_domain(self) -> str:
        return self.state.trust_domain

    @property
    def ca(self) -> CertificateAuthority:
        """The active signing CA."""
        return self.state.active_ca

    @property
    def index(self) -> int:
        """The current raft-like index."""
        with self.state.cond:
            return self.state.index

    def register(
        self,
        service: str,
        *,
        port: int,
        id: str | None = None,
        address: str = "127.0.0.1",
        node: str = "node-1",
        node_address: str = "127.0.0.1",
        datacenter: str | None = None,
        tags: Iterable[str] = (),
        meta: dict[str, str] | None = None,
        weights: dict[str, int] | None = None,
        status: str | None = PASSING,
        connect_proxy_port: int | None = None,
        kind: str | None = None,
        proxy: dict[str, Any] | None = None,
        connect_native: bool = False,
    ) -> str:
        """Register an instance (as a node's agent would) and return its service ID.

        ``status`` creates the service check ``service:<id>`` in that state (None: no
        service check at all).  ``connect_proxy_port`` also registers the sidecar
        ``<service>-sidecar-proxy`` (Kind connect-proxy) whose alias check follows the
        service's health.  ``address=""`` leaves ``Service.Address`` empty so clients
        must fall back to ``Node.Address``.
        """
        dc = datacenter or self.state.datacenter
        if dc not in self.state.datacenters:
            raise ValueError(f"unknown datacenter {dc!r}")
        if status is not None and status not in STATUSES:
            raise ValueError(f"bad status {status!r}")
        sid = id or service
        tags = list(tags)
        with self.state.cond:
            self.state.ensure_node(dc, node, node_address, agent=True)
            svc = Service(
                dc,
                node,
                sid,
                service,
                port=port,
                address=address,
                tags=tags or None,
                meta=dict(meta) if meta else None,
                weights=dict(weights) if weights else {"Passing": 1, "Warning": 1},
                kind=kind or "",
                proxy=dict(proxy or {}),
                connect={"Native": True} if connect_native else {},
            )
            checks = []
            if status is not None:
                checks.append(
                    Check(dc, node, f"service:{sid}", f"Service '{service}' check", status=status)
                )
            self.state.put_service(svc, checks)
            if connect_proxy_port is not None:
                pid = f"{sid}-sidecar-proxy"
                sidecar = Service(
                    dc,
                    node,
                    pid,
                    f"{service}-sidecar-proxy",
                    port=connect_proxy_port,
                    address=address,
                    tags=tags or None,
                    meta=dict(meta) if meta else None,
                    kind="connect-proxy",
                    proxy={
                        "DestinationServiceName": service,
                        "DestinationServiceID": sid,
                        "LocalServiceAddress": "127.0.0.1",
                        "LocalServicePort": port,
                    },
                )
                alias = Check(
                    dc,
                    node,
                    f"service:{pid}",
                    f"Connect Sidecar Aliasing {sid}",
                    type="alias",
                    alias_service=sid,
                )
                self.state.put_service(sidecar, [alias])
        return sid

    def _find(self, service_id: str) -> list[Service]:
        found = self.state.find_services(service_id)
        if not found:
            raise KeyError(f"no service with ID {service_id!r}")
        return found

    def deregister(self, service_id: str) -> None:
        """Remove a service instance (and its Python-registered sidecar, if any)."""
        with self.state.cond:
            for svc in self._find(service_id):
                self.state.remove_service(svc.dc, svc.node, svc.id)
                sidecar = self.state.services.get((svc.dc, svc.node, f"{svc.id}-sidecar-proxy"))
                if sidecar is not None and sidecar.proxy.get("DestinationServiceID") == svc.id:
                    self.state.remove_service(svc.dc, svc.node, sidecar.id)

    def set_status(self, service_id: str, status: str, output: str | None = None) -> None:
        """Set every (non-alias) check of ``service_id`` to passing|warning|critical."""
        if status not in STATUSES:
            raise ValueError(f"bad status {status!r}")
        with self.state.cond:
            for svc in self._find(service_id):
                checks = [c for c in self.state.service_checks(svc) if not c.alias_service]
                if not checks:
                    chk = Check(
                        svc.dc,
                        svc.node,
                        f"service:{svc.id}",
                        f"Service '{svc.name}' check",
                        status=status,
                        output=output or "",
                    )
                    self.state.put_check(chk)
                for chk in checks:
                    self.state.update_check(chk, status, output)

    def set_node_status(self, node: str, status: str, datacenter: str | None = None) -> None:
        """Set a node's ``serfHealth`` (critical = the agent looks dead)."""
        if status not in STATUSES:
            raise ValueError(f"bad status {status!r}")
        dc = datacenter or self.state.datacenter
        with self.state.cond:
            chk = self.state.checks[(dc, node, "serfHealth")]
            output = (
                "Agent alive and reachable"
                if status == PASSING
                else "Agent not live or unreachable"
            )
            self.state.update_check(chk, status, output)

    def set_index_backwards(self, to: int = 1) -> int:
        """Simulate a snapshot restore: all indexes drop to at most ``to``; returns it.

        In-flight blocking queries return at once with the lower index; a client that
        keeps waiting on its old (higher) index gets answers only at wait expiry.
        """
        return self.state.set_index_backwards(to)

    def rotate_leaf(self) -> None:
        """Reissue every leaf issued so far (blocked leaf queries return)."""
        self.state.rotate_leaf()

    def rotate_ca(self, new_ca: CertificateAuthority) -> None:
        """Make ``new_ca`` the active root (old one stays, Active=false); reissue leaves."""
        self.state.rotate_ca(new_ca)

    def current_leaf(self, service: str) -> IssuedCert | None:
        """The leaf the double currently hands out for ``service`` (None if never asked)."""
        return self.state.current_leaf(service)

    def check_status(self, service_id: str) -> str:
        """Aggregate status of a service's checks as clients would see it."""
        with self.state.cond:
            svc = self._find(service_id)[0]
            entry = self.state.render_entry(svc)
            statuses = [c["Status"] for c in entry["Checks"]]
        return (
            CRITICAL if CRITICAL in statuses else ("warning" if "warning" in statuses else PASSING)
        )

    # -- plumbing ---------------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _note_error(self, text: str, *, quiet_os_errors: bool = False) -> None:
        if quiet_os_errors and any(
            name in text
            for name in (
                "ConnectionResetError",
                "BrokenPipeError",
                "ConnectionAbortedError",
                "OSError",
            )
        ):
            return
        with self._lock:
            self.errors.append(text)

    def _housekeeper(self) -> None:
        while not self._hk_stop.wait(0.05):
            try:
                for chk in self.state.housekeep():
                    threading.Thread(target=self._run_check, args=(chk,), daemon=True).start()
            except Exception:
                self._note_error(traceback.format_exc())

    def _run_check(self, chk: Check) -> None:
        try:
            self.state.run_check(chk)
        except Exception:
            self._note_error(traceback.format_exc())

    def _hold_if_hung(self, gen: int) -> bool:
        deadline = time.monotonic() + HANG_LIMIT
        with self._gate:
            while self._hanging:
                remaining = deadline - time.monotonic()
                if self._life_gen != gen or self._stopped or remaining <= 0:
                    return False
                self._gate.wait(min(remaining, 0.25))
        return self._life_gen == gen

    def _switched_reply(self, req: Request) -> Reply | None:
        failure = self._failure_for(req)
        if failure is not None:
            return Reply(
                failure[0], failure[1].encode(), {"Content-Type": "text/plain; charset=utf-8"}
            )
        if self._garbage:
            headers = {
                "Content-Type": "application/json",
                "X-Consul-Index": str(max(1, self.index)),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
            }
            return Reply(200, GARBAGE_BODY, headers)
        return None

    @staticmethod
    def _drop(handler: _Handler) -> None:
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)

    def _serve(self, handler: _Handler) -> None:
        gen = self._life_gen
        body = handler._read_body()
        parts = urlsplit(handler.path)
        req = Request(
            method=handler.command,
            path=unquote(parts.path),
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        record = RequestRecord(
            req.method,
            req.path,
            req.query,
            dict(req.headers),
            body,
            time.time(),
            handler.client_address[1],
        )
        with self._lock:
            self._log.append(record)
        reply: Reply | None = None
        for _ in range(50):  # each round: a switch changed while the request blocked
            switch_gen = self._switch_gen
            if not self._hold_if_hung(gen):
                self._drop(handler)
                return
            reply = self._switched_reply(req)
            if reply is not None:
                break

            def aborted(switch_gen: int = switch_gen) -> bool:
                if self._life_gen != gen or self._stopped:
                    return True
                if self._switch_gen == switch_gen:
                    return False
                return self._hanging or self._switched_reply(req) is not None

            try:
                reply = self.api.handle(req, aborted=aborted)
            except ConnectionAbortedError:
                if self._life_gen != gen or self._stopped:
                    self._drop(handler)
                    return
                continue  # a switch now applies to this in-flight query
            except Exception:
                self._note_error(traceback.format_exc())
                reply = Reply(
                    500, b"internal error in ConsulDouble", {"Content-Type": "text/plain"}
                )
            break
        if reply is None:
            self._drop(handler)
            return
        lag = self._lag_for(req)
        if lag > 0:
            with self._lock:
                self._lagged += 1
            until = time.monotonic() + min(lag, HANG_LIMIT)
            while time.monotonic() < until and self._life_gen == gen and not self._stopped:
                time.sleep(min(0.02, max(0.0, until - time.monotonic())))
        if self._life_gen != gen:
            self._drop(handler)
            return
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            handler.end_headers()
            if req.method != "HEAD":
                handler.wfile.write(reply.body)
            handler.wfile.flush()
        except OSError:
            handler.close_connection = True
