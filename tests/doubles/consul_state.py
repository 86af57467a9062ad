"""Catalog, health, Connect CA and blocking-query state behind :class:`ConsulDouble`.

One raft-like index counter is bumped on every change.  Each result keeps the index of
the last change that touched it (per service name, per Connect destination, the
services table, the CA roots, each leaf), which is what Consul reports in
``X-Consul-Index``.  Every reader and writer holds ``cond`` (a Condition over an RLock);
writers ``notify_all`` so blocking queries re-evaluate.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.doubles.consul_model import (
    CRITICAL,
    GO_ZERO_TIME,
    PASSING,
    Check,
    Leaf,
    Node,
    RootEntry,
    Service,
    go_duration,
    probe,
    rfc3339,
    worst,
)
from tests.doubles.pki import CertificateAuthority, IssuedCert, consul_service_uri


class ConsulState:
    """Everything the double knows; see the module docstring for the locking model."""

    def __init__(
        self,
        *,
        datacenter: str,
        datacenters: Iterable[str],
        node_name: str,
        node_address: str,
        ca: CertificateAuthority,
        leaf_ttl: timedelta,
    ) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.datacenter = datacenter
        self.datacenters = list(dict.fromkeys([datacenter, *datacenters]))
        self.node_name = node_name
        self.trust_domain = ca.trust_domain
        self.leaf_ttl = leaf_ttl
        self.restore_gen = 0
        self.abort_gen = 0
        #: Answer ``X-Consul-Index: 0`` on blocking endpoints (the docs say it can happen).
        self.index_zero = False
        #: Probability that a blocking query returns early (within 0.1 s) with its index
        #: unchanged, as real Consul does (hashicorp/consul#3890: a return is no proof of
        #: change -- timeouts, idempotent writes, internal wake-ups).
        self.early_return = 0.0
        self._index = 10
        self._idx: dict[tuple[str, ...], int] = {}
        self.nodes: dict[tuple[str, str], Node] = {}
        self.services: dict[tuple[str, str, str], Service] = {}
        self.checks: dict[tuple[str, str, str], Check] = {}
        self.leaves: dict[str, Leaf] = {}
        self.roots: list[RootEntry] = []
        self._rng = random.Random()
        with self.cond:
            idx = self._bump()
            self.roots.append(RootEntry(ca, True, idx, idx))
            self._mark(idx, {("roots",)})
            for dc in self.datacenters:
                server = node_name if dc == datacenter else f"{dc}-server-1"
                self.ensure_node(dc, server, node_address, agent=True)
                self.put_service(
                    Service(dc, server, "consul", "consul", port=8300, meta={"raft_version": "3"}),
                    [],
                )

    # -- index bookkeeping ------------------------------------------------------------
    @property
    def index(self) -> int:
        return self._index

    def _bump(self) -> int:
        self._index += 1
        return self._index

    def _mark(self, idx: int, keys: Iterable[tuple[str, ...]]) -> None:
        for key in keys:
            self._idx[key] = idx
        self.cond.notify_all()

    def key_index(self, *keys: tuple[str, ...]) -> int:
        return max([self._idx.get(k, 0) for k in keys] + [1])

    def _related(self, dc: str, names: Iterable[str]) -> set[tuple[str, ...]]:
        """Index keys whose results change when instances of ``names`` change."""
        keys: set[tuple[str, ...]] = set()
        for name in set(names):
            keys.add(("svc", dc, name))
            for svc in self.services.values():
                if svc.dc != dc:
                    continue
                if svc.name == name:
                    if svc.destination:
                        keys.add(("connect", dc, svc.destination))
                    if svc.native:
                        keys.add(("connect", dc, name))
                elif svc.destination == name:  # a proxy whose alias health follows `name`
                    keys.add(("svc", dc, svc.name))
                    keys.add(("connect", dc, name))
        return keys

    def set_index_backwards(self, to: int = 1) -> int:
        """Simulate a snapshot restore: every index drops to at most ``to``."""
        with self.cond:
            to = max(1, int(to))
            self._index = min(self._index, to)
            for key in self._idx:
                self._idx[key] = min(self._idx[key], to)
            objects: list[Any] = [*self.nodes.values(), *self.services.values()]
            objects += [*self.checks.values(), *self.roots]
            for obj in objects:
                obj.create_index = min(obj.create_index, to)
                obj.modify_index = min(obj.modify_index, to)
            for leaf in self.leaves.values():
                leaf.index = min(leaf.index, to)
            self.restore_gen += 1
            self.cond.notify_all()
            return self._index

    # -- catalog mutation -------------------------------------------------------------
    def ensure_node(
        self,
        dc: str,
        name: str,
        address: str,
        *,
        agent: bool = True,
        node_id: str | None = None,
        tagged_addresses: dict[str, str] | None = None,
        meta: dict[str, str] | None = None,
    ) -> Node:
        """Create or update a node (with its ``serfHealth`` check)."""
        with self.cond:
            node = self.nodes.get((dc, name))
            if agent and tagged_addresses is None:
                tagged_addresses = {
                    "lan": address,
                    "lan_ipv4": address,
                    "wan": address,
                    "wan_ipv4": address,
                }
            if agent and meta is None:
                meta = {"consul-network-segment": ""}
            if (
                node is not None
                and node.address == address
                and (tagged_addresses is None or node.tagged_addresses == tagged_addresses)
                and (meta is None or node.meta == meta)
            ):
                return node
            idx = self._bump()
            if node is None:
                node = Node(dc, name, address, create_index=idx)
                if node_id:
                    node.id = node_id
                self.nodes[(dc, name)] = node
                self.checks[(dc, name, "serfHealth")] = Check(
                    dc,
                    name,
                    "serfHealth",
                    "Serf Health Status",
                    status=PASSING,
                    output="Agent alive and reachable",
                    create_index=idx,
                    modify_index=idx,
                )
            node.address = address
            if tagged_addresses is not None:
                node.tagged_addresses = tagged_addresses
            if meta is not None:
                node.meta = meta
            node.modify_index = idx
            names = [s.name for s in self.services.values() if (s.dc, s.node) == (dc, name)]
            self._mark(idx, self._related(dc, names) | {("nodes", dc)})
            return node

    def put_service(
        self, svc: Service, checks: list[Check], *, keep_other_checks: bool = False
    ) -> Service:
        """Register or replace a service instance and its service-level checks."""
        with self.cond:
            key = (svc.dc, svc.node, svc.id)
            old = self.services.get(key)
            names = {svc.name} | ({old.name} if old else set())
            keys = self._related(svc.dc, names)
            idx = self._bump()
            svc.create_index = old.create_index if old else idx
            svc.modify_index = idx
            self.services[key] = svc
            new_ids = {c.id for c in checks}
            for ckey, chk in list(self.checks.items()):
                if (chk.dc, chk.node, chk.service_id) == key and (
                    not keep_other_checks or chk.id in new_ids
                ):
                    del self.checks[ckey]
            for chk in checks:
                chk.service_id, chk.service_name = svc.id, svc.name
                chk.create_index = chk.modify_index = idx
                if chk.ttl:
                    chk.ttl_deadline = time.monotonic() + chk.ttl
                if chk.http or chk.tcp:
                    chk.next_run = time.monotonic() + self._rng.uniform(0, chk.interval)
                self.checks[(svc.dc, svc.node, chk.id)] = chk
            keys |= self._related(svc.dc, names) | {("catalog", svc.dc)}
            self._mark(idx, keys)
            return svc

    def remove_service(self, dc: str, node: str, service_id: str) -> Service | None:
        with self.cond:
            svc = self.services.get((dc, node, service_id))
            if svc is None:
                return None
            keys = self._related(dc, [svc.name])
            idx = self._bump()
            del self.services[(dc, node, service_id)]
            for ckey, chk in list(self.checks.items()):
                if (chk.dc, chk.node, chk.service_id) == (dc, node, service_id):
                    del self.checks[ckey]
            keys |= self._related(dc, [svc.name]) | {("catalog", dc)}
            if not any(s.dc == dc and s.name == svc.name for s in self.services.values()):
                keys.add(("extinct", dc))
            self._mark(idx, keys)
            return svc

    def remove_node(self, dc: str, name: str) -> bool:
        with self.cond:
            if (dc, name) not in self.nodes:
                return False
            for svc in [s for s in self.services.values() if (s.dc, s.node) == (dc, name)]:
                self.remove_service(dc, name, svc.id)
            idx = self._bump()
            del self.nodes[(dc, name)]
            for ckey in [k for k in self.checks if k[:2] == (dc, name)]:
                del self.checks[ckey]
            self._mark(idx, {("nodes", dc)})
            return True

    def put_check(self, chk: Check) -> None:
        """Add or replace a single check (node-level or attached to a service)."""
        with self.cond:
            names = []
            if chk.service_id:
                svc = self.services.get((chk.dc, chk.node, chk.service_id))
                if svc is None:
                    raise KeyError(chk.service_id)
                chk.service_name = svc.name
                names.append(svc.name)
            else:
                names = [
                    s.name for s in self.services.values() if (s.dc, s.node) == (chk.dc, chk.node)
                ]
            idx = self._bump()
            old = self.checks.get((chk.dc, chk.node, chk.id))
            chk.create_index = old.create_index if old else idx
            chk.modify_index = idx
            if chk.ttl:
                chk.ttl_deadline = time.monotonic() + chk.ttl
            self.checks[(chk.dc, chk.node, chk.id)] = chk
            self._mark(idx, self._related(chk.dc, names))

    def remove_check(self, dc: str, node: str, check_id: str) -> bool:
        with self.cond:
            chk = self.checks.pop((dc, node, check_id), None)
            if chk is None:
                return False
            self._touch_check(chk)
            return True

    def update_check(self, chk: Check, status: str, output: str | None = None) -> None:
        """Set a check's status (and output); bumps the index only if something changed."""
        with self.cond:
            if chk.ttl:
                chk.ttl_deadline = time.monotonic() + chk.ttl
            changed = chk.status != status or (output is not None and chk.output != output)
            chk.status = status
            if output is not None:
                chk.output = output
            if changed:
                self._touch_check(chk)

    def _touch_check(self, chk: Check) -> None:
        idx = self._bump()
        chk.modify_index = idx
        if chk.service_id:
            svc = self.services.get((chk.dc, chk.node, chk.service_id))
            names = [svc.name] if svc else []
        else:
            names = [s.name for s in self.services.values() if (s.dc, s.node) == (chk.dc, chk.node)]
        self._mark(idx, self._related(chk.dc, names))

    def find_services(self, service_id: str) -> list[Service]:
        with self.cond:
            return [s for s in self.services.values() if s.id == service_id]

    def service_checks(self, svc: Service) -> list[Check]:
        with self.cond:
            return [
                c
                for c in self.checks.values()
                if (c.dc, c.node, c.service_id) == (svc.dc, svc.node, svc.id)
            ]

    # -- reads ------------------------------------------------------------------------
    def _alias(self, chk: Check) -> tuple[str, str, int]:
        target = self.services.get((chk.dc, chk.node, chk.alias_service))
        if target is None:
            msg = f"Service {chk.alias_service} could not be found on node {chk.node}"
            return CRITICAL, msg, chk.modify_index
        related = [
            c
            for c in self.checks.values()
            if (c.dc, c.node) == (chk.dc, chk.node)
            and c.service_id in ("", target.id)
            and not c.alias_service
        ]
        status = worst(c.status for c in related)
        failing = [c for c in related if c.status == status and status != PASSING]
        if failing:
            output = f'Aliased check "{failing[0].name}" failing: {failing[0].output}'
        else:
            output = "All checks passing." if related else "No checks found."
        index = max([chk.modify_index, *(c.modify_index for c in related)])
        return status, output, index

    def render_check(self, chk: Check, svc: Service | None) -> dict[str, Any]:
        status, output, modify = chk.status, chk.output, chk.modify_index
        if chk.alias_service:
            status, output, modify = self._alias(chk)
        tags: list[str] | None = []
        if svc is not None:
            tags = list(svc.tags) if svc.tags is not None else None
        return {
            "Node": chk.node,
            "CheckID": chk.id,
            "Name": chk.name,
            "Status": status,
            "Notes": chk.notes,
            "Output": output,
            "ServiceID": chk.service_id,
            "ServiceName": chk.service_name,
            "ServiceTags": tags,
            "Type": chk.type,
            "Interval": go_duration(chk.interval),
            "Timeout": go_duration(chk.timeout),
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": chk.create_index,
            "ModifyIndex": modify,
        }

    def render_entry(self, svc: Service) -> dict[str, Any]:
        node = self.nodes[(svc.dc, svc.node)]
        node_checks = sorted(
            (
                c
                for c in self.checks.values()
                if (c.dc, c.node) == (svc.dc, svc.node) and not c.service_id
            ),
            key=lambda c: (c.id != "serfHealth", c.id),
        )
        svc_checks = sorted(
            (
                c
                for c in self.checks.values()
                if (c.dc, c.node, c.service_id) == (svc.dc, svc.node, svc.id)
            ),
            key=lambda c: c.id,
        )
        return {
            "Node": node.render(),
            "Service": svc.render(),
            "Checks": [self.render_check(c, None) for c in node_checks]
            + [self.render_check(c, svc) for c in svc_checks],
        }

    def health(self, dc: str, name: str, *, connect: bool) -> tuple[int, list[dict[str, Any]]]:
        """Index and rendered entries for ``/v1/health/service`` or ``/v1/health/connect``."""
        with self.cond:
            if connect:
                found = [
                    s
                    for s in self.services.values()
                    if s.dc == dc and (s.destination == name or (s.name == name and s.native))
                ]
                key = ("connect", dc, name)
            else:
                found = [s for s in self.services.values() if s.dc == dc and s.name == name]
                key = ("svc", dc, name)
            if found:
                index = self.key_index(key)
            elif ("extinct", dc) in self._idx:
                index = self.key_index(("extinct", dc))
            else:
                index = self.key_index(("catalog", dc), ("nodes", dc))
            found.sort(key=lambda s: (s.node, s.id))
            return index, [self.render_entry(s) for s in found]

    def catalog_services(self, dc: str) -> tuple[int, dict[str, list[str]]]:
        with self.cond:
            out: dict[str, set[str]] = {}
            for svc in self.services.values():
                if svc.dc == dc:
                    out.setdefault(svc.name, set()).update(svc.tags or ())
            listing = {name: sorted(tags) for name, tags in sorted(out.items())}
            return self.key_index(("catalog", dc)), listing

    # -- Connect CA -------------------------------------------------------------------
    @property
    def active_ca(self) -> CertificateAuthority:
        with self.cond:
            return next(r.ca for r in self.roots if r.active)

    def roots_payload(self) -> tuple[int, dict[str, Any]]:
        with self.cond:
            roots = []
            active_id = ""
            for entry in self.roots:
                ca = entry.ca
                if entry.active:
                    active_id = ca.root.id
                roots.append(
                    {
                        "ID": ca.root.id,
                        "Name": "Consul CA Primary Cert",
                        "SerialNumber": ca.root.serial,
                        "SigningKeyID": ca.signing_key_id,
                        "ExternalTrustDomain": self.trust_domain.split(".")[0],
                        "NotBefore": rfc3339(ca.root.not_before),
                        "NotAfter": rfc3339(ca.root.not_after),
                        "RootCert": ca.root_pem,
                        "IntermediateCerts": ca.intermediate_pems or None,
                        "Active": entry.active,
                        "RotatedOutAt": rfc3339(entry.rotated_out_at)
                        if entry.rotated_out_at
                        else GO_ZERO_TIME,
                        "PrivateKeyType": "ec",
                        "PrivateKeyBits": 256,
                        "CreateIndex": entry.create_index,
                        "ModifyIndex": entry.modify_index,
                    }
                )
            payload = {"ActiveRootID": active_id, "TrustDomain": self.trust_domain, "Roots": roots}
            return self.key_index(("roots",)), payload

    def _issue_leaf(self, service: str) -> Leaf:
        uri = consul_service_uri(self.trust_domain, service, self.datacenter)
        cert = self.active_ca.issue(uri=uri, ips=(), ttl=self.leaf_ttl, common_name=service)
        lifetime = self.leaf_ttl.total_seconds()
        renew_at = time.time() + lifetime * self._rng.uniform(0.6, 0.9)
        idx = self._bump()
        leaf = Leaf(service, cert, renew_at, idx)
        self.leaves[service] = leaf
        self._mark(idx, {("leaf", service)})
        return leaf

    def leaf(self, service: str) -> tuple[int, dict[str, Any]]:
        """Current leaf for ``service``, issuing or renewing it when due."""
        with self.cond:
            leaf = self.leaves.get(service)
            if leaf is None or time.time() >= leaf.renew_at:
                leaf = self._issue_leaf(service)
            cert = leaf.cert
            return max(leaf.index, 1), {
                "SerialNumber": cert.serial_hex,
                "CertPEM": cert.chain_pem,
                "PrivateKeyPEM": cert.ec_key_pem,
                "Service": service,
                "ServiceURI": cert.uri,
                "ValidAfter": rfc3339(cert.not_before),
                "ValidBefore": rfc3339(cert.not_after),
                "CreateIndex": leaf.index,
                "ModifyIndex": leaf.index,
            }

    def current_leaf(self, service: str) -> IssuedCert | None:
        with self.cond:
            leaf = self.leaves.get(service)
            return leaf.cert if leaf else None

    def rotate_leaf(self) -> None:
        with self.cond:
            for service in list(self.leaves):
                self._issue_leaf(service)

    def rotate_ca(self, new_ca: CertificateAuthority) -> None:
        with self.cond:
            idx = self._bump()
            for entry in self.roots:
                if entry.active:
                    entry.active = False
                    entry.rotated_out_at = datetime.now(UTC)
                    entry.modify_index = idx
            self.roots.append(RootEntry(new_ca, True, idx, idx))
            self._mark(idx, {("roots",)})
            self.rotate_leaf()

    # -- blocking ---------------------------------------------------------------------
    def block(
        self,
        compute: Callable[[], tuple[int, Any]],
        min_index: int,
        wait: float,
        *,
        aborted: Callable[[], bool],
    ) -> tuple[int, Any]:
        """Run ``compute`` until its index exceeds ``min_index`` or ``wait`` elapses.

        Returns early (with whatever the index now is) after a snapshot restore, like
        Consul does when its state store is abandoned.  Raises ``ConnectionAbortedError``
        when ``aborted()`` turns true (the double went down or stopped).
        """
        deadline = time.monotonic() + wait
        early_decided = False
        with self.cond:
            restore_gen = self.restore_gen
            while True:
                if not early_decided and min_index > 0 and self.early_return > 0:
                    early_decided = True  # once per query, also for queries in flight
                    if self._rng.random() < self.early_return:
                        deadline = min(deadline, time.monotonic() + self._rng.uniform(0, 0.1))
                index, payload = compute()
                index = max(index, 1)
                if min_index <= 0 or index > min_index or self.restore_gen != restore_gen:
                    return index, payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return index, payload
                if aborted():
                    raise ConnectionAbortedError("consul double went away")
                self.cond.wait(min(remaining, 0.25))

    # -- background work: TTL expiry, leaf renewal, HTTP/TCP checks --------------------
    def housekeep(self) -> list[Check]:
        """One housekeeping pass; returns the checks that are due to run now."""
        due: list[Check] = []
        mono, wall = time.monotonic(), time.time()
        with self.cond:
            for chk in list(self.checks.values()):
                if chk.ttl and chk.ttl_deadline is not None and mono > chk.ttl_deadline:
                    chk.ttl_deadline = None
                    self.update_check(chk, CRITICAL, "TTL expired")
                runnable = (chk.http or chk.tcp) and not chk.running
                if runnable and chk.next_run is not None and mono >= chk.next_run:
                    chk.running = True
                    due.append(chk)
            for service, leaf in list(self.leaves.items()):
                if wall >= leaf.renew_at:
                    self._issue_leaf(service)
        return due

    def run_check(self, chk: Check) -> None:
        """Execute one HTTP or TCP check (outside the lock) and record the result."""
        status, output = probe(chk)
        with self.cond:
            chk.running = False
            chk.next_run = time.monotonic() + chk.interval
            if self.checks.get((chk.dc, chk.node, chk.id)) is chk:
                self.update_check(chk, status, output)
