"""Consul as a mesh: catalog and health discovery, blocking queries, Connect leaf and roots.

Built on py-consul (import ``consul``), the maintained successor of python-consul2 (see
the README for why). Every call goes through py-consul's low-level ``http.get`` with
``CB.json(index=True)``: it gives per-call timeouts that include a blocking query's wait,
and lets us pass ``index``/``wait``/``dc``/``ns`` uniformly, including for the Connect
leaf and roots endpoints its high-level API cannot block on. Nothing outside this module
sees py-consul or Consul's JSON.

The exception is the many: the per-service blocking queries (one per service and
datacenter) and the full pass's health queries run as asyncio tasks in one thread, over
an aiohttp session (the client py-consul's own ``consul.aio`` uses) whose keep-alive
connections they share. Their URLs, timeouts and answer handling are still py-consul's
(``http.uri``, ``http.timeout``, ``CB.json``), so index, error and timeout behaviour is
the same as ``_get``'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
import consul
import requests
import yarl
from consul import base as consul_base
from consul.callback import CB
from requests.adapters import HTTPAdapter

from .. import __version__
from ..config.model import ConsulConfig, MeshConfig
from ..errors import MeshError
from .client import Discovery, Publish, PublishTls
from .snapshot import Endpoint, ServiceEndpoints, Snapshot
from .tls import TlsPairing

log = logging.getLogger("odin_gw.mesh.consul")

MAX_BACKOFF = 30.0
#: requests' default pool size; grown to the number of concurrent calls (watches).
DEFAULT_POOL = 10
#: Connections opened (and first, immediate answers asked) at once by the service watches.
OPENING = 8


class ConsulClient:
    """Talks to one Consul agent for the gateway's services (see module docstring)."""

    name = "consul"

    def __init__(self, mesh: MeshConfig) -> None:
        self.mesh = mesh
        self.cfg: ConsulConfig = mesh.consul
        parts = urlsplit(self.cfg.http_addr)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        verify: bool | str = True
        if scheme == "https" and mesh.ca_file:
            verify = mesh.ca_file  # the mesh CA verifies the agent
        self._consul = consul.Consul(
            host=parts.hostname,
            port=port,
            scheme=scheme,
            token=self.cfg.token,
            verify=verify,
            connections_timeout=self.cfg.timeout,
        )
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None  # for the event-loop session (https)
        # py-consul lets CONSUL_HTTP_TOKEN beat its ``token`` argument; the config decides
        # here (``token: ${CONSUL_HTTP_TOKEN}`` uses the variable on purpose).
        self._consul.token = None
        env_token = os.environ.get("CONSUL_HTTP_TOKEN")
        if env_token and env_token != (self.cfg.token or ""):
            log.warning(
                "CONSUL_HTTP_TOKEN is set in the environment but not used: consul.token or "
                "consul.tokenFile decide (write token: ${CONSUL_HTTP_TOKEN} to use it)"
            )
        self._token_value: str | None = self.cfg.token
        self._token_stamp: tuple | None = None
        self._token_problem: str | None = None
        self._token_lock = threading.Lock()
        if self.cfg.token_file:
            self._token()
        session = self._consul.http.session
        session.trust_env = False  # never send the ACL token through an env proxy
        session.headers["User-Agent"] = f"odin-gw/{__version__} (pid {os.getpid()})"
        self._pool_size = DEFAULT_POOL
        self.datacenters = self.cfg.all_datacenters
        self._trust_domain: str | None = None
        self._trust_known = threading.Event()
        # (service, dc) -> endpoints from the last good answer, and the X-Consul-Index it
        # carried; merged across datacenters. An answer older than the stored one (a full
        # pass that started before a blocking query returned) never replaces it. ``_gen``
        # counts accepted changes: it stamps merged views so the manager can drop a view
        # merged before one it already applied.
        self._answers: dict[tuple[str, str | None], tuple[Endpoint, ...]] = {}
        self._indexes: dict[tuple[str, str | None], int] = {}
        self._gen = 0
        self._answers_lock = threading.Lock()
        # what -> error of every blocking-query loop failing now (carried on every answer,
        # so one failing datacenter does not make lastError come and go).
        self._watch_errors: dict[str, str] = {}
        # (service, dc) -> monotonic time of the last answer a blocking query got: a full
        # pass does not ask again what a watch answered after the pass started.
        self._answered_at: dict[tuple[str, str | None], float] = {}

    # -- one-shot calls ---------------------------------------------------------------
    @property
    def call_timeout(self) -> float:
        """Seconds one non-blocking call may take (``consul.timeout``); the manager allows
        a discovery pass a few of them before it counts a leader stuck."""
        return self.cfg.timeout

    def _get(
        self,
        path: str,
        *,
        dc: str | None = None,
        index: int = 0,
        wait: float | None = None,
        extra: Sequence[tuple[str, str]] = (),
        callback: Callable | None = None,
    ) -> tuple[int, object]:
        """GET ``path`` with the token, datacenter, namespace and blocking parameters;
        ``(X-Consul-Index, JSON body)``. ``callback`` replaces py-consul's JSON callback
        (it must end in one). Every failure is a ``MeshError`` saying what was asked."""
        params, where = self._query(path, dc, index, wait, extra)
        token = self._token()
        try:
            raw_index, data = self._consul.http.get(
                callback or CB.json(index=True),
                path,
                params=params,
                headers={"X-Consul-Token": token} if token else {},
            )
        except consul.ConsulException as exc:
            raise self._refused(where, exc) from None
        except requests.Timeout:
            raise MeshError(f"{where}: Consul did not answer in time") from None
        except requests.RequestException as exc:
            raise self._unreachable(where, exc) from None
        return _index(raw_index, where), data

    def _query(
        self,
        path: str,
        dc: str | None,
        index: int,
        wait: float | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> tuple[list[tuple[str, str]], str]:
        """(query parameters, "GET path (dc x)") of one call, threaded or asyncio."""
        params: list[tuple[str, str]] = list(extra)
        if dc:
            params.append(("dc", dc))
        if self.cfg.namespace:
            params.append(("ns", self.cfg.namespace))
        if index:
            params.append(("index", str(index)))
            params.append(("wait", go_duration(wait or self.cfg.blocking_wait)))
        return params, f"GET {path}" + (f" (dc {dc})" if dc else "")

    @staticmethod
    def _refused(where: str, exc: Exception) -> MeshError:
        """Consul answered with an error (py-consul's exceptions)."""
        if isinstance(exc, consul.ACLPermissionDenied):
            return MeshError(f"{where}: Consul refused the ACL token (403 {_short(exc)})")
        return MeshError(f"{where}: {_short(exc)}")

    def _unreachable(self, where: str, exc: Exception) -> MeshError:
        return MeshError(
            f"{where}: cannot reach Consul at {self.cfg.http_addr}: {_short(exc)}"
            + self._agentless_hint(exc)
        )

    def _agentless_hint(self, exc: Exception) -> str:
        """What to do when no agent listens on this host: agentless installs (Consul 1.14+
        on Kubernetes, consul-dataplane) run no local agent at 127.0.0.1:8500."""
        if not isinstance(exc, requests.ConnectionError | ConnectionRefusedError):
            return ""
        host = urlsplit(self.cfg.http_addr).hostname or ""
        if host != "localhost" and not host.startswith("127.") and host != "::1":
            return ""
        return (
            " (no local Consul agent: with consul-dataplane there is none; point"
            " serviceMesh.consul.httpAddr at the servers, and use connectMode: sidecar"
            " when the gateway runs with its own dataplane sidecar)"
        )

    def _token(self) -> str | None:
        """The ACL token: ``consul.token``, or ``consul.tokenFile`` re-read when it changes
        (a stat per call; a Kubernetes Secret update swaps the file). Never logged."""
        path = self.cfg.token_file
        if not path:
            return self.cfg.token
        try:
            st = os.stat(path)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._token_stamp:
                return self._token_value
            with self._token_lock:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read().strip()
                if self._token_stamp is not None and text != (self._token_value or ""):
                    log.info("consul.tokenFile %s changed: using the new ACL token", path)
                self._token_stamp, self._token_value = stamp, text or None
                if self._token_problem is not None:
                    log.info("consul.tokenFile %s readable again", path)
                    self._token_problem = None
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or 'unreadable'}"
            if problem != self._token_problem:
                log.warning(
                    "consul.tokenFile %s cannot be read (%s); keeping the last token read",
                    path,
                    problem,
                )
                self._token_problem = problem
        return self._token_value

    def _ensure_pool(self, calls: int) -> None:
        """Room for ``calls`` concurrent connections (each watch holds one while it blocks;
        requests' default of 10 would open and discard connections on every answer)."""
        if calls <= self._pool_size:
            return
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=calls)
        session = self._consul.http.session
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._pool_size = calls

    def catalog(self, dc: str | None, index: int = 0) -> tuple[int, dict[str, list]]:
        idx, data = self._get("/v1/catalog/services", dc=dc, index=index)
        if not isinstance(data, dict):
            raise MeshError(f"catalog/services (dc {dc}): expected an object, got {_kind(data)}")
        return idx, data

    def instances(
        self, service: str, dc: str | None, index: int = 0
    ) -> tuple[int, tuple[Endpoint, ...]]:
        """Every instance of ``service`` in ``dc`` with its health (not only passing ones,
        so the admin view can show unhealthy instances; health is judged here exactly as
        Consul's ``?passing`` does: every check, node checks included)."""
        kind = "connect" if self.cfg.enable_connect else "service"
        idx, data = self._get(f"/v1/health/{kind}/{service}", dc=dc, index=index)
        return idx, self._instances_from(service, dc, kind, data)

    def _instances_from(
        self, service: str, dc: str | None, kind: str, data: object
    ) -> tuple[Endpoint, ...]:
        if data is None:
            data = []
        if not isinstance(data, list):
            raise MeshError(f"health/{kind}/{service}: expected a list, got {_kind(data)}")
        try:
            endpoints = tuple(self._endpoint(service, entry, dc) for entry in data)
        except (KeyError, TypeError, ValueError) as exc:
            raise MeshError(f"health/{kind}/{service}: malformed entry ({exc!r})") from None
        return endpoints

    def _endpoint(self, service: str, entry: dict, dc: str | None) -> Endpoint:
        node = entry["Node"]
        svc = entry["Service"]
        checks = entry.get("Checks") or []
        address = svc.get("Address") or node["Address"]
        port = int(svc["Port"])
        if not address or not 0 < port < 65536:
            raise ValueError(f"no usable address/port for {svc.get('ID')}")
        statuses = {c["Status"] for c in checks}
        if "critical" in statuses or "maintenance" in statuses:
            status = "critical"
        elif "warning" in statuses:
            status = "warning"
        else:
            status = "passing"
        healthy = status == "passing" or (status == "warning" and self.cfg.accept_warning)
        weights = svc.get("Weights") or {}
        weight = int(weights.get("Warning" if status == "warning" else "Passing", 1) or 0)
        datacenter = node.get("Datacenter") or dc or self.cfg.datacenter
        identity = None
        scheme = "http"
        if self.cfg.enable_connect:
            scheme = "https"
            identity = self.identity(service, datacenter, svc.get("Namespace") or "default")
        elif self.mesh.mtls_enabled:
            scheme = "https"  # mTLS with the configured files; trustDomain checked if set
        return Endpoint(
            address=str(address),
            port=port,
            scheme=scheme,
            healthy=healthy,
            status=status,
            weight=max(weight, 1) if healthy else weight,
            datacenter=datacenter,
            identity=identity,
            node=node.get("Node"),
            service_id=svc.get("ID"),
        )

    def identity(self, service: str, dc: str | None, ns: str = "default") -> str:
        """The SPIFFE ID a Connect instance of ``service`` in ``dc`` must present."""
        td = self._trust_domain
        if td is None:
            raise MeshError("Connect trust domain unknown: CA roots not fetched yet")
        return f"spiffe://{td}/ns/{ns}/dc/{dc}/svc/{service}"

    def roots(self, index: int = 0) -> tuple[int, str, str]:
        """(index, trust domain, PEM bundle of every root and intermediate).

        From the agent's ``/v1/agent/connect/ca/roots``; where the agent has no such
        endpoint (see ``_agent_connect``), from the servers' ``/v1/connect/ca/roots`` (same
        body, blocking too, no ACL needed), remembered for the next calls.
        """
        if getattr(self, "_roots_path", AGENT_ROOTS) == AGENT_ROOTS:
            try:
                idx, data = self._agent_connect(AGENT_ROOTS, index)
            except AgentConnectMissing:
                if getattr(self, "_roots_path", AGENT_ROOTS) == AGENT_ROOTS:
                    log.info("the Consul agent has no %s: using %s", AGENT_ROOTS, SERVER_ROOTS)
                self._roots_path = SERVER_ROOTS
                idx, data = self._get(SERVER_ROOTS, index=0)
        else:
            idx, data = self._get(SERVER_ROOTS, index=index)
        try:
            trust_domain = data["TrustDomain"]
            pems = []
            for root in data["Roots"] or []:
                pems.append(root["RootCert"].strip() + "\n")
                pems.extend(p.strip() + "\n" for p in root.get("IntermediateCerts") or [])
        except (KeyError, TypeError, AttributeError) as exc:
            raise MeshError(f"agent/connect/ca/roots: malformed answer ({exc!r})") from None
        if not trust_domain or not pems:
            raise MeshError("agent/connect/ca/roots: no trust domain or no roots")
        self._trust_domain = trust_domain
        self._trust_known.set()
        return idx, trust_domain, "".join(pems)

    def leaf(self, index: int = 0) -> tuple[int, str, str]:
        """(index, certificate chain PEM, private key PEM) of the gateway's own leaf.

        Only an agent issues one: an agent without the endpoint gets ``MeshError`` saying
        to use ``connectMode: sidecar`` (see ``_agent_connect``).
        """
        if self.cfg.sidecar:
            raise MeshError("connectMode sidecar: the gateway's sidecar holds the leaf")
        path = f"{AGENT_LEAF}{self.cfg.service_name}"
        try:
            idx, data = self._agent_connect(path, index)
        except AgentConnectMissing as exc:
            raise MeshError(
                f"GET {path}: the Consul agent at {self.cfg.http_addr} has no leaf "
                f"certificate endpoint ({exc}). A Consul server with /v1/agent/ blocked, a "
                "proxy in front of the servers, or an agentless install (Consul 1.14+ with "
                "consul-dataplane) cannot issue the gateway's certificate: run the gateway "
                "with its own Consul sidecar and set serviceMesh.consul.connectMode: sidecar"
            ) from None
        try:
            return idx, data["CertPEM"], data["PrivateKeyPEM"]
        except (KeyError, TypeError) as exc:
            raise MeshError(f"agent/connect/ca/leaf: malformed answer ({exc!r})") from None

    def _agent_connect(self, path: str, index: int) -> tuple[int, object]:
        """GET an agent Connect endpoint (roots, leaf) like ``_get`` does, telling apart an
        agent that does not serve it: ``AgentConnectMissing`` for a 404 (Consul's "Invalid
        URL path: not a recognized HTTP API endpoint", or a proxy exposing only some paths)
        or a 403 "Endpoint is blocked by agent configuration" (``http_config.
        block_endpoints``). A Consul server is an agent and serves both endpoints unless
        blocked; a 403 about the token stays an ACL error."""
        as_json = CB.json(index=True)

        def answer(response):
            body = " ".join(str(response.body or "").split())[:160]
            if response.code == 404 or (response.code == 403 and BLOCKED in body):
                raise AgentConnectMissing(f"{response.code} {body or 'no body'}")
            return as_json(response)

        return self._get(path, index=index, callback=answer)

    # -- MeshClient -------------------------------------------------------------------
    def discover(self, services: Sequence[str]) -> Discovery:
        """A full pass over every datacenter: catalog, then each service's instances."""
        if self.cfg.enable_connect and self._trust_domain is None:
            self.roots()
        self._ensure_pool(self._concurrent_calls(services))
        listed: dict[str | None, tuple[int, set[str]]] = {}
        errors: dict[str, str] = {}
        for dc in self.datacenters:
            try:
                idx, names = self.catalog(dc)
                listed[dc] = (idx, set(names))
            except MeshError as exc:
                errors[f"catalog {dc or 'local'}"] = exc.message
        if not listed:
            raise MeshError("; ".join(errors.values()))
        found: dict[str, ServiceEndpoints] = {}
        stamps: dict[str, int] = {}
        absent = set()
        asks = [
            (name, dc) for name in services for dc, (_, names) in listed.items() if name in names
        ]
        failures = self._fetch_all(asks)
        for name in services:
            failed = False
            for dc, (cat_index, names) in listed.items():
                if name not in names:
                    # Raft indexes are comparable: an instance a blocking query saw
                    # registered after this listing is not erased by it.
                    self._store(name, dc, (), cat_index)
                elif (name, dc) in failures:
                    errors[name] = failures[(name, dc)]
                    failed = True
            if failed:
                continue
            if all(name not in names for _, names in listed.values()) and len(listed) == len(
                self.datacenters
            ):
                absent.add(name)
            found[name], stamps[name] = self._merged(name)
        catalog = tuple(sorted(set().union(*(names for _, names in listed.values()))))
        return Discovery(
            services=found,
            absent=frozenset(absent),
            errors={**self._current_errors(), **errors},
            catalog=catalog,
            stamps=stamps,
        )

    def _fetch_all(self, asks: Sequence[tuple[str, str | None]]) -> dict[tuple, str]:
        """Each (service, datacenter)'s instances, stored as they arrive (``_store``:
        never over a newer answer); ``OPENING`` at a time on an event loop of this thread
        (a connection each, closed after the pass). Returns the failures.

        A pair whose blocking query answered after the pass began is not asked again:
        that answer is at least as fresh as this pass's would be."""
        kind = "connect" if self.cfg.enable_connect else "service"
        failures: dict[tuple, str] = {}
        started = time.monotonic()
        todo = iter(asks)

        async def worker(session: aiohttp.ClientSession) -> None:
            for name, dc in todo:  # one loop, one thread: the iterator is shared safely
                if self._answered_at.get((name, dc), 0.0) >= started:
                    continue
                path = f"/v1/health/{kind}/{name}"
                try:
                    idx, data = await self._aget(session, path, dc=dc)
                    if idx == self._indexes.get((name, dc)) and (name, dc) in self._answers:
                        continue  # the index held: the answer held (what blocking relies on)
                    self._store(name, dc, self._instances_from(name, dc, kind, data), idx)
                except MeshError as exc:
                    failures[(name, dc)] = exc.message

        async def run() -> None:
            async with self._session() as session:
                workers = max(1, min(OPENING, len(asks)))
                await asyncio.gather(*(worker(session) for _ in range(workers)))

        asyncio.run(run())
        return failures

    def seed(self, snapshot: Snapshot) -> None:
        """Start from a snapshot (a new leader from the previous leader's file): each
        datacenter's part of a service stays until that datacenter answers, so the first
        answer of one datacenter does not wipe the others. Seeded parts carry index 0:
        any answer replaces them."""
        with self._answers_lock:
            for name, svc in snapshot.services.items():
                if svc.source != self.name:
                    continue
                for dc in self.datacenters:
                    key = (name, dc)
                    self._answers[key] = tuple(
                        e for e in svc.endpoints if dc is None or e.datacenter == dc
                    )
                    self._indexes[key] = 0
            self._gen += 1

    def _store(
        self,
        name: str,
        dc: str | None,
        endpoints: tuple[Endpoint, ...],
        index: int,
        reset: bool = False,
    ) -> bool:
        """Keep ``endpoints`` unless an answer with a higher index is stored already
        (``reset``: Consul's index went backwards, this answer wins). True if changed."""
        key = (name, dc)
        with self._answers_lock:
            if not reset and index < self._indexes.get(key, 0):
                return False
            self._indexes[key] = index
            if key in self._answers and self._answers[key] == endpoints:
                return False
            self._answers[key] = endpoints
            self._gen += 1
            return True

    def _merged(self, name: str) -> tuple[ServiceEndpoints, int]:
        """The service across datacenters, and the stamp of the answers it was made of."""
        with self._answers_lock:
            endpoints = tuple(
                e for dc in self.datacenters for e in self._answers.get((name, dc), ())
            )
            gen = self._gen
        svc = ServiceEndpoints(
            name=name, endpoints=endpoints, source="consul", datacenters=self.datacenters
        )
        return svc, gen

    def _concurrent_calls(self, services: Sequence[str]) -> int:
        """Calls through py-consul's session at once. The service watches and the full
        pass's health queries are not among them: they run on the event loop's aiohttp
        session (``_session``)."""
        watches = 1  # the catalog
        if self.cfg.enable_connect:
            watches += 2  # roots and leaf
        return watches + 2  # the full pass's catalog calls, and one to spare

    # -- failing watches --------------------------------------------------------------
    def _current_errors(self) -> dict[str, str]:
        with self._answers_lock:
            return dict(self._watch_errors)

    def _set_error(self, what: str, message: str | None) -> dict[str, str]:
        with self._answers_lock:
            if message is None:
                self._watch_errors.pop(what, None)
            else:
                self._watch_errors[what] = message
            return dict(self._watch_errors)

    def watch(
        self,
        services: Sequence[str],
        publish: Publish,
        publish_tls: PublishTls,
        stop: threading.Event,
    ) -> None:
        """Blocking queries: roots and leaf (Connect), the catalog, every service per dc."""
        self._ensure_pool(self._concurrent_calls(services))
        threads = []
        if self.cfg.enable_connect:
            threads.append(self._spawn("connect-tls", self._watch_tls, publish_tls, stop, publish))
        threads.append(self._spawn("catalog", self._watch_catalog, publish, stop))
        # Every (service, datacenter) blocking query runs in this one thread (asyncio, a
        # connection each): threads stay few whatever the number of services.
        try:
            asyncio.run(self._watch_services(services, publish, stop))
        except Exception:
            log.exception("consul service watches ended with an error")
        for t in threads:
            while t.is_alive() and not stop.is_set():
                t.join(1.0)

    def _spawn(self, label: str, target: Callable, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=f"odin-consul-{label}", daemon=True)
        t.start()
        return t

    async def _watch_services(
        self, services: Sequence[str], publish: Publish, stop: threading.Event
    ) -> None:
        """One blocking-query loop per (service, datacenter), as tasks of one event loop."""
        if self.cfg.enable_connect:
            while not self._trust_known.is_set():  # identities need the trust domain
                if stop.is_set():
                    return
                await asyncio.sleep(0.1)
        opening = asyncio.Semaphore(OPENING)
        async with self._session() as session:
            tasks = [
                asyncio.create_task(self._awatch_service(session, name, dc, publish, opening))
                for name in services
                for dc in self.datacenters
            ]
            try:
                while not stop.is_set() and not all(t.done() for t in tasks):
                    await asyncio.sleep(0.25)  # one timer for every watch, not one each
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _awatch_service(
        self,
        session: aiohttp.ClientSession,
        name: str,
        dc: str | None,
        publish: Publish,
        opening: asyncio.Semaphore,
    ) -> None:
        kind = "connect" if self.cfg.enable_connect else "service"
        path = f"/v1/health/{kind}/{name}"

        async def on_answer(index: int) -> int:
            if index <= 1:  # opening (or starting over): a new connection, an immediate answer
                async with opening:
                    idx, data = await self._aget(session, path, dc=dc, index=index)
            else:
                idx, data = await self._aget(session, path, dc=dc, index=index)
            endpoints = self._instances_from(name, dc, kind, data)
            self._answered_at[(name, dc)] = time.monotonic()
            # A lower index than we asked with: Consul's state was restored; start over.
            if self._store(name, dc, endpoints, idx, reset=idx < index):
                svc, stamp = self._merged(name)
                publish(
                    Discovery(
                        services={name: svc}, errors=self._current_errors(), stamps={name: stamp}
                    )
                )
            return idx

        await self._ablocking_loop(f"health {name} (dc {dc or 'local'})", on_answer, publish)

    def _session(self) -> aiohttp.ClientSession:
        """An aiohttp session for one event loop (the watches', or one full pass's).

        No limit on connections: every blocking query holds one for up to
        ``blockingWait``. Over https verified as py-consul's session is
        (``serviceMesh.caFile``, else the system CAs), one context for every connection.
        Timeouts are ``_aget``'s (py-consul's, wait included) plus ``consul.timeout`` to
        connect."""
        if self._ssl is None and urlsplit(self.cfg.http_addr).scheme == "https":
            cafile = self._verify if isinstance(self._verify, str) else None
            self._ssl = ssl.create_default_context(cafile=cafile)
        connector = aiohttp.TCPConnector(
            limit=0, ssl=self._ssl if self._ssl is not None else True, use_dns_cache=True
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.timeout),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            # Consul sets no cookies: skip the jar's work on every answer.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def _aget(
        self, session: aiohttp.ClientSession, path: str, *, dc: str | None = None, index: int = 0
    ) -> tuple[int, object]:
        """``_get`` for the event loop: the same parameters, timeout (py-consul's, wait
        included), answer handling (py-consul's ``CB.json``) and error messages."""
        params, where = self._query(path, dc, index)
        http = self._consul.http
        headers = {
            "User-Agent": str(http.session.headers.get("User-Agent", "odin-gw")),
            "Accept": "application/json",
        }
        token = self._token()
        if token:
            headers["X-Consul-Token"] = token

        async def call() -> consul_base.Response:
            # py-consul's URL is already percent-encoded: yarl need not parse it again.
            url = yarl.URL(http.uri(path, params), encoded=True)
            async with session.get(url, headers=headers) as answer:
                body = await answer.text(encoding="utf-8", errors="replace")
                return consul_base.Response(answer.status, answer.headers, body)

        try:
            response = await asyncio.wait_for(call(), http.timeout(params))
            raw_index, data = CB.json(index=True)(response)
        except consul.ConsulException as exc:
            raise self._refused(where, exc) from None
        except TimeoutError:
            raise MeshError(f"{where}: Consul did not answer in time") from None
        except (OSError, aiohttp.ClientError, ssl.SSLError, ValueError) as exc:
            raise self._unreachable(where, _cause(exc)) from None
        return _index(raw_index, where), data

    async def _ablocking_loop(
        self, what: str, ask: Callable[[int], Awaitable[int]], report: Publish
    ) -> None:
        """``_blocking_loop`` for the event loop; it ends when its task is cancelled."""
        watch = _IndexWatch(self, what, report)
        while True:
            started = time.monotonic()
            try:
                new_index = await ask(watch.index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await asyncio.sleep(watch.failed(exc))
                continue
            pause = watch.answered(new_index, started)
            if pause > 0:
                await asyncio.sleep(pause)

    def _watch_catalog(self, publish: Publish, stop: threading.Event) -> None:
        last: tuple[str, ...] | None = None

        def on_answer(index: int) -> int:
            nonlocal last
            idx, data = self.catalog(self.datacenters[0], index)
            names = tuple(sorted(data))
            if names != last:
                last = names
                # Failing watches ride along, or the manager would log them recovered.
                publish(Discovery(catalog=names, errors=self._current_errors()))
            return idx

        self._blocking_loop("catalog", on_answer, stop, publish)

    def _watch_tls(self, publish_tls: PublishTls, stop: threading.Event, report: Publish) -> None:
        if self.cfg.sidecar:
            return  # the gateway's own sidecar holds the leaf and does mTLS
        pair = TlsPairing(publish_tls, source="consul-connect")

        def on_roots(index: int) -> int:
            idx, td, bundle = self.roots(index)
            pair.roots(td, bundle)
            return idx

        def on_leaf(index: int) -> int:
            idx, cert, key = self.leaf(index)
            pair.leaf(cert, key)
            return idx

        t = self._spawn("roots", self._blocking_loop, "connect roots", on_roots, stop, report)
        self._blocking_loop("connect leaf", on_leaf, stop, report)
        t.join(5)

    def _blocking_loop(
        self, what: str, ask: Callable[[int], int], stop: threading.Event, report: Publish
    ) -> None:
        """Consul's blocking-query loop (see :class:`_IndexWatch`), in a thread."""
        watch = _IndexWatch(self, what, report)
        while not stop.is_set():
            started = time.monotonic()
            try:
                new_index = ask(watch.index)
            except Exception as exc:
                stop.wait(watch.failed(exc))
                continue
            pause = watch.answered(new_index, started)
            if pause > 0:
                stop.wait(pause)

    def close(self) -> None:
        self._consul.http.session.close()


AGENT_ROOTS = "/v1/agent/connect/ca/roots"
SERVER_ROOTS = "/v1/connect/ca/roots"
AGENT_LEAF = "/v1/agent/connect/ca/leaf/"
#: Consul's answer body for a path in ``http_config.block_endpoints`` (403).
BLOCKED = "Endpoint is blocked by agent configuration"


class AgentConnectMissing(Exception):
    """The agent does not serve an agent Connect endpoint (see ``_agent_connect``)."""


class _IndexWatch:
    """One blocking-query loop's rules, shared by the threaded and the asyncio loops
    (each only waits its own way): Consul's index handling, the rate limit, back-off on
    errors, and failures reported as an error-only ``Discovery`` (counted, shown on the
    admin API) while the snapshot keeps its last good data."""

    __slots__ = ("backoff", "client", "failing", "index", "report", "what")

    def __init__(self, client: ConsulClient, what: str, report: Publish) -> None:
        self.client = client
        self.what = what
        self.report = report
        self.index = 0
        self.backoff = 1.0
        self.failing = False

    def failed(self, exc: Exception) -> float:
        """Record a failed query; returns how long to wait before the next."""
        if isinstance(exc, MeshError):
            message = exc.message
        else:
            log.exception("consul watch %s raised", self.what)
            message = f"{type(exc).__name__}: {exc}"
        if not self.failing:  # logged on change of state, not on every retry
            log.warning("consul watch %s failing (retrying with back-off): %s", self.what, message)
            self.failing = True
        self.report(Discovery(errors=self.client._set_error(self.what, message)))
        delay = self.backoff * random.uniform(0.8, 1.2)
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return delay

    def answered(self, new_index: int, started: float) -> float:
        """Take an answer's index; returns how long to wait (the rate limit)."""
        if self.failing:
            log.info("consul watch %s recovered", self.what)
            self.failing = False
            if not self.client._set_error(self.what, None):
                self.report(Discovery())  # nothing fails any more: clears lastError
        self.backoff = 1.0
        # The index must grow; if it goes backwards (a snapshot restore), start over.
        # A return is no proof of change (hashicorp/consul#3890): an unchanged index is
        # simply asked again, after the rate limit.
        self.index = 0 if new_index < self.index else new_index
        if self.index <= 0:
            self.index = 1  # 0 would make the next query return at once: never use it
        return self.client.cfg.min_query_interval - (time.monotonic() - started)


def _index(raw: object, where: str) -> int:
    """The ``X-Consul-Index`` of an answer as a number, or a ``MeshError``."""
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MeshError(f"{where}: bad X-Consul-Index {raw!r}") from None


def go_duration(seconds: float) -> str:
    """A Go duration for ``wait=``: whole seconds as ``5s``, anything finer in ms
    (``int(0.5)`` would send ``0s``, which Consul reads as its 5 min default)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _cause(exc: Exception) -> Exception:
    """The OS error under an aiohttp connection error (``ConnectionRefusedError``...), so
    messages and the agentless hint read as they do for py-consul's threaded calls."""
    inner = getattr(exc, "os_error", None)
    return inner if isinstance(inner, OSError) else exc


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: object) -> str:
    return type(value).__name__
