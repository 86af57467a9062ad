"""Consul as a mesh: catalog and health discovery, blocking queries, Connect leaf and roots.

Built on py-consul (import ``consul``), the maintained successor of python-consul2 (see
the README for why). Every call goes through py-consul's low-level ``http.get`` with
``CB.json(index=True)``: it gives per-call timeouts that include a blocking query's wait,
and lets us pass ``index``/``wait``/``dc``/``ns`` uniformly, including for the Connect
leaf and roots endpoints its high-level API cannot block on. Nothing outside this module
sees py-consul or Consul's JSON.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import consul
import requests
from consul.callback import CB
from requests.adapters import HTTPAdapter

from .. import __version__
from ..config.model import ConsulConfig, MeshConfig
from ..errors import MeshError
from .client import Discovery, Publish, PublishTls
from .snapshot import Endpoint, ServiceEndpoints, Snapshot
from .tls import TlsMaterial

log = logging.getLogger("odin_gw.mesh.consul")

MAX_BACKOFF = 30.0
#: requests' default pool size; grown to the number of concurrent calls (watches).
DEFAULT_POOL = 10


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

    # -- one-shot calls ---------------------------------------------------------------
    def _get(
        self,
        path: str,
        *,
        dc: str | None = None,
        index: int = 0,
        wait: float | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, object]:
        params: list[tuple[str, str]] = list(extra)
        if dc:
            params.append(("dc", dc))
        if self.cfg.namespace:
            params.append(("ns", self.cfg.namespace))
        if index:
            params.append(("index", str(index)))
            params.append(("wait", go_duration(wait or self.cfg.blocking_wait)))
        where = f"GET {path}" + (f" (dc {dc})" if dc else "")
        token = self._token()
        try:
            raw_index, data = self._consul.http.get(
                CB.json(index=True),
                path,
                params=params,
                headers={"X-Consul-Token": token} if token else {},
            )
        except consul.ACLPermissionDenied as exc:
            raise MeshError(f"{where}: Consul refused the ACL token (403 {_short(exc)})") from None
        except consul.ConsulException as exc:
            raise MeshError(f"{where}: {_short(exc)}") from None
        except requests.Timeout:
            raise MeshError(f"{where}: Consul did not answer in time") from None
        except requests.RequestException as exc:
            raise MeshError(
                f"{where}: cannot reach Consul at {self.cfg.http_addr}: {_short(exc)}"
            ) from None
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            raise MeshError(f"{where}: bad X-Consul-Index {raw_index!r}") from None
        return new_index, data

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
        if data is None:
            data = []
        if not isinstance(data, list):
            raise MeshError(f"health/{kind}/{service}: expected a list, got {_kind(data)}")
        try:
            endpoints = tuple(self._endpoint(service, entry, dc) for entry in data)
        except (KeyError, TypeError, ValueError) as exc:
            raise MeshError(f"health/{kind}/{service}: malformed entry ({exc!r})") from None
        return idx, endpoints

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
        """(index, trust domain, PEM bundle of every root and intermediate)."""
        idx, data = self._get("/v1/agent/connect/ca/roots", index=index)
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
        """(index, certificate chain PEM, private key PEM) of the gateway's own leaf."""
        idx, data = self._get(f"/v1/agent/connect/ca/leaf/{self.cfg.service_name}", index=index)
        try:
            return idx, data["CertPEM"], data["PrivateKeyPEM"]
        except (KeyError, TypeError) as exc:
            raise MeshError(f"agent/connect/ca/leaf: malformed answer ({exc!r})") from None

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
        for name in services:
            failed = False
            for dc, (cat_index, names) in listed.items():
                if name not in names:
                    # Raft indexes are comparable: an instance a blocking query saw
                    # registered after this listing is not erased by it.
                    self._store(name, dc, (), cat_index)
                    continue
                try:
                    idx, endpoints = self.instances(name, dc)
                except MeshError as exc:
                    errors[name] = exc.message
                    failed = True
                    continue
                self._store(name, dc, endpoints, idx)
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
        watches = 1 + len(services) * len(self.datacenters)  # catalog + each service per dc
        if self.cfg.enable_connect:
            watches += 2  # roots and leaf
        return watches + 2  # the full pass, and one to spare

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
        for name in services:
            for dc in self.datacenters:
                threads.append(
                    self._spawn(
                        f"{name}@{dc or 'local'}", self._watch_service, name, dc, publish, stop
                    )
                )
        for t in threads:
            while t.is_alive() and not stop.is_set():
                t.join(1.0)

    def _spawn(self, label: str, target: Callable, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=f"odin-consul-{label}", daemon=True)
        t.start()
        return t

    def _watch_service(
        self, name: str, dc: str | None, publish: Publish, stop: threading.Event
    ) -> None:
        if self.cfg.enable_connect:
            while not self._trust_known.wait(1.0):  # identities need the trust domain
                if stop.is_set():
                    return

        def on_answer(index: int) -> int:
            idx, endpoints = self.instances(name, dc, index)
            # A lower index than we asked with: Consul's state was restored; start over.
            if self._store(name, dc, endpoints, idx, reset=idx < index):
                svc, stamp = self._merged(name)
                publish(
                    Discovery(
                        services={name: svc}, errors=self._current_errors(), stamps={name: stamp}
                    )
                )
            return idx

        self._blocking_loop(f"health {name} (dc {dc or 'local'})", on_answer, stop, publish)

    def _watch_catalog(self, publish: Publish, stop: threading.Event) -> None:
        last: tuple[str, ...] | None = None

        def on_answer(index: int) -> int:
            nonlocal last
            idx, data = self.catalog(self.datacenters[0], index)
            names = tuple(sorted(data))
            if names != last:
                last = names
                publish(Discovery(catalog=names))
            return idx

        self._blocking_loop("catalog", on_answer, stop, publish)

    def _watch_tls(self, publish_tls: PublishTls, stop: threading.Event, report: Publish) -> None:
        state = {"roots": None, "leaf": None}

        def publish() -> None:
            if state["roots"] and state["leaf"]:
                trust_domain, bundle = state["roots"]
                cert, key = state["leaf"]
                publish_tls(
                    TlsMaterial(
                        cert, key, bundle, source="consul-connect", trust_domain=trust_domain
                    )
                )

        def on_roots(index: int) -> int:
            idx, td, bundle = self.roots(index)
            if state["roots"] != (td, bundle):
                state["roots"] = (td, bundle)
                publish()
            return idx

        def on_leaf(index: int) -> int:
            idx, cert, key = self.leaf(index)
            if state["leaf"] != (cert, key):
                state["leaf"] = (cert, key)
                publish()
            return idx

        t = self._spawn("roots", self._blocking_loop, "connect roots", on_roots, stop, report)
        self._blocking_loop("connect leaf", on_leaf, stop, report)
        t.join(5)

    def _blocking_loop(
        self, what: str, ask: Callable[[int], int], stop: threading.Event, report: Publish
    ) -> None:
        """Consul's blocking-query loop: index handling, rate limit, back-off on errors.

        Failures go to ``report`` as an error-only ``Discovery`` (counted, shown on the
        admin API); the snapshot keeps its last good data.
        """
        index = 0
        backoff = 1.0
        failing = False
        while not stop.is_set():
            started = time.monotonic()
            try:
                new_index = ask(index)
            except Exception as exc:
                if isinstance(exc, MeshError):
                    message = exc.message
                else:
                    log.exception("consul watch %s raised", what)
                    message = f"{type(exc).__name__}: {exc}"
                if not failing:  # logged on change of state, not on every retry
                    log.warning(
                        "consul watch %s failing (retrying with back-off): %s", what, message
                    )
                    failing = True
                report(Discovery(errors=self._set_error(what, message)))
                stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if failing:
                log.info("consul watch %s recovered", what)
                failing = False
                if not self._set_error(what, None):
                    report(Discovery())  # nothing fails any more: clears lastError
            backoff = 1.0
            # The index must grow; if it goes backwards (a snapshot restore), start over.
            # A return is no proof of change (hashicorp/consul#3890): an unchanged index is
            # simply asked again, after the rate limit below.
            index = 0 if new_index < index else new_index
            if index <= 0:
                index = 1  # 0 would make the next query return at once: never use it
            elapsed = time.monotonic() - started
            if elapsed < self.cfg.min_query_interval:
                stop.wait(self.cfg.min_query_interval - elapsed)

    def close(self) -> None:
        self._consul.http.session.close()


def go_duration(seconds: float) -> str:
    """A Go duration for ``wait=``: whole seconds as ``5s``, anything finer in ms
    (``int(0.5)`` would send ``0s``, which Consul reads as its 5 min default)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: object) -> str:
    return type(value).__name__
