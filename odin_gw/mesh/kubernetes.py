"""Kubernetes discovery as a ``MeshClient``: EndpointSlices, Services, ServiceProfiles.

Linkerd uses it (``serviceMesh.type: linkerd``), and Istio in direct mode with
``istio.discovery: kubernetes`` (passing its own ``source`` and ``endpoint_factory``).
lightkube makes the calls (connection, token and errors: :mod:`.kube_connect`); the
objects become snapshot entries in :mod:`.kube_mapping`.

For each configured service (``cluster_services``: name, namespace, port) it reads

* the EndpointSlices labelled ``kubernetes.io/service-name=<name>`` in its namespace,
* the Service ``<name>`` (its ports map the configured port to the slices' port; with
  Linkerd, its ``timeout.linkerd.io``/``retry.linkerd.io`` annotations), and
* with Linkerd, the ServiceProfile ``<name>.<namespace>.svc.cluster.local`` in
  ``linkerd.profileNamespace``, else in the service's namespace.

Cost: one list and one watch per *feed*, a (kind, namespace) pair, whatever the number
of services there; objects of other services are dropped on arrival. 1,000 services in
one namespace are 3 watches. Threads: none of its own. ``watch`` runs one asyncio event
loop in the manager's watch thread, a task per feed sharing one lightkube client;
``discover`` (the periodic full pass) runs a short event loop in its caller's thread.

Each feed lists, then watches from the list's ``resourceVersion``; a 410 (an ERROR
event or an HTTP answer: the version was compacted) makes it list again; any other
failure is reported and retried with jittered exponential back-off (up to 30 s), listing
again. Watches ask the server to end them after ``WATCH_SECONDS`` (lightkube then resumes
from the last version seen) and a stream silent for longer is reopened, so no read blocks
for ever; ``stop`` cancels every task at once.

While a feed fails, only an error-only ``Discovery`` (``errors={"kubernetes <kind>
<namespace>": why}``) is published: the manager keeps the last known good snapshot.
Answers carry ``stamps`` from one increasing clock; a full pass takes its stamp before
it asks, so it never replaces what a watch published since. A service whose Service
and slices do not exist after a successful list is ``absent``; one whose feeds failed is
in ``errors`` only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..config.model import GatewayConfig
from ..errors import MeshError
from .client import Discovery, Publish, PublishTls
from .cluster_names import ClusterService, cluster_services
from .kube_connect import CALL_TIMEOUT, KubeConnection, connect, status_code
from .kube_feed import (
    LIST_CHUNK,
    OPENING,
    PROFILES,
    SERVICE_NAME_LABEL,
    SERVICES,
    SLICES,
    WATCH_SECONDS,
    Backoff,
    Feed,
    Feeds,
    Kind,
)
from .kube_mapping import EndpointFactory, plain_endpoint, service_view
from .kube_watch import WatchRun
from .snapshot import ServiceEndpoints

log = logging.getLogger("odin_gw.mesh.kubernetes")


class KubernetesDiscovery:
    """Discovery from the Kubernetes API (see the module docstring).

    ``source`` names the mesh in each ``ServiceEndpoints`` (``kubernetes`` unless the
    mesh passes its own). ``endpoint_factory(cluster_service, slice_endpoint) ->
    Endpoint`` builds each endpoint (default: plain HTTP to the pod; Istio direct mode
    passes one that adds mTLS identity and SNI): see ``kube_mapping.SliceEndpoint``.
    """

    name = "kubernetes"
    call_timeout = CALL_TIMEOUT

    def __init__(
        self,
        config: GatewayConfig,
        *,
        source: str = "kubernetes",
        endpoint_factory: EndpointFactory | None = None,
    ) -> None:
        self.config = config
        self.mesh = config.service_mesh
        self.source = source
        self.factory = endpoint_factory or plain_endpoint
        self.cluster = cluster_services(config)
        self.linkerd = self.mesh.kind == "linkerd"
        #: ``timeoutSeconds`` of each watch request (tests shorten it).
        self.watch_seconds = WATCH_SECONDS
        self._api: KubeConnection | None = None
        self._lock = threading.Lock()
        self._last_stamp = 0
        self._watch_stamps: dict[str, int] = {}  # service -> stamp of its last watch answer
        self._errors: dict[str, str] = {}  # the running watch's failing feeds
        self._feeds: Feeds = {}  # the running watch's feeds (``describe``)
        self._missing: set[str] = set()  # feeds of a kind the server lacks (logged once)

    # -- shared ---------------------------------------------------------------------------
    def connection(self) -> KubeConnection:
        """The API connection (loaded once); ``MeshError`` when there is none."""
        if self._api is None:
            self._api = connect(self.mesh)
        return self._api

    def _stamp(self) -> int:
        """Strictly increasing: orders full passes against watch answers."""
        with self._lock:
            self._last_stamp = max(self._last_stamp + 1, time.monotonic_ns())
            return self._last_stamp

    def _needs(self, cs: ClusterService) -> list[tuple[Kind, str, str]]:
        """(kind, namespace, owner) of every object a service's view is made of."""
        needs = [(SLICES, cs.namespace, cs.name), (SERVICES, cs.namespace, cs.name)]
        if self.linkerd:
            needs.append((PROFILES, self.mesh.linkerd.profile_namespace or cs.namespace, cs.host))
        return needs

    def _plan(self, services: Sequence[str]) -> tuple[list[ClusterService], Feeds]:
        """The configured services among ``services`` and the feeds they need."""
        wanted = [self.cluster[n] for n in dict.fromkeys(services) if n in self.cluster]
        feeds: Feeds = {}
        for cs in wanted:
            for kind, ns, owner in self._needs(cs):
                feed = feeds.setdefault((kind.label, ns), Feed(kind, ns))
                feed.owners.setdefault(owner, []).append(cs.name)
        return wanted, feeds

    def _view(self, cs: ClusterService, feeds: Feeds) -> ServiceEndpoints | bool | None:
        """The service's entry; ``None`` when absent; ``False`` while a feed it needs
        was never listed."""
        parts = []
        for kind, ns, owner in self._needs(cs):
            feed = feeds[(kind.label, ns)]
            if not feed.synced:
                return False
            parts.append(feed.objects(owner))
        slices, services = parts[0], parts[1]
        svc = services[0] if services else None
        profile = parts[2][0] if self.linkerd and parts[2] else None
        if svc is None and not slices:
            return None
        return service_view(
            cs,
            cs.name,
            slices,
            svc,
            profile,
            source=self.source,
            factory=self.factory,
            with_policy=self.linkerd,
        )

    async def _list(self, api: KubeConnection, client: Any, feed: Feed) -> set[str]:
        """List a feed's objects into it; returns the services it serves. A kind the
        server does not serve (no ServiceProfile CRD: 404) lists as empty."""
        labels = {SERVICE_NAME_LABEL: None} if feed.kind.by_label else None
        found = client.list(
            feed.kind.resource, namespace=feed.namespace, chunk_size=LIST_CHUNK, labels=labels
        )
        try:
            items = [obj async for obj in found]
        except Exception as exc:
            if status_code(exc) == 404 and feed.kind is PROFILES:
                if feed.what not in self._missing:  # once per process, not per pass
                    self._missing.add(feed.what)
                    log.warning(
                        "%s (no ServiceProfiles used)",
                        api.explain(exc, "list", feed.kind.rbac, feed.namespace),
                    )
                feed.missing = True
                return feed.replace((), None)
            raise
        feed.missing = False
        self._missing.discard(feed.what)
        return feed.replace(items, found.resourceVersion)

    # -- full pass ------------------------------------------------------------------------
    def discover(self, services: Sequence[str]) -> Discovery:
        """List every feed once and answer for every service. ``MeshError`` when no
        configuration exists or every list failed."""
        stamp = self._stamp()  # taken before asking: a watch answer meanwhile wins
        api = self.connection()
        wanted, feeds = self._plan(services)
        if not feeds:
            return Discovery()
        failures = asyncio.run(self._list_all(api, list(feeds.values())))
        if len(failures) == len(feeds):
            raise MeshError(_joined(failures))
        found: dict[str, ServiceEndpoints] = {}
        absent = set()
        with self._lock:
            newer = {n for n, s in self._watch_stamps.items() if s > stamp}
            # The watch's failing feeds ride along, unless this pass just listed them.
            listed = {f.what for f in feeds.values() if f.what not in failures}
            errors = {k: v for k, v in self._errors.items() if k not in listed}
        errors.update(failures)
        for cs in wanted:
            if cs.name in newer:
                continue  # a watch answered after this pass began: that answer stands
            view = self._view(cs, feeds)
            if view is None:
                absent.add(cs.name)
            elif view is not False:
                found[cs.name] = view
        catalog = None
        service_feeds = [f for f in feeds.values() if f.kind is SERVICES]
        if all(f.synced for f in service_feeds):
            catalog = tuple(
                sorted(
                    f"{n}.{f.namespace}.svc.cluster.local" for f in service_feeds for n in f.names
                )
            )
        return Discovery(
            services=found,
            absent=frozenset(absent),
            errors=errors,
            catalog=catalog,
            stamps=dict.fromkeys([*found, *absent], stamp),
        )

    async def _list_all(self, api: KubeConnection, feeds: list[Feed]) -> dict[str, str]:
        """List every feed, ``OPENING`` at a time; returns the failures by feed."""
        failures: dict[str, str] = {}
        client = api.client()
        opening = asyncio.Semaphore(OPENING)

        async def one(feed: Feed) -> None:
            async with opening:
                try:
                    await self._list(api, client, feed)
                except Exception as exc:
                    failures[feed.what] = api.explain(exc, "list", feed.kind.rbac, feed.namespace)

        try:
            await asyncio.gather(*(one(f) for f in feeds))
        finally:
            await client.close()
        return failures

    # -- watch ----------------------------------------------------------------------------
    def watch(
        self,
        services: Sequence[str],
        publish: Publish,
        publish_tls: PublishTls,
        stop: threading.Event,
    ) -> None:
        """List and watch every feed until ``stop`` is set, publishing each change. No TLS
        material comes from Kubernetes (``publish_tls`` is not called)."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                api = self.connection()
                api.check()
                break
            except MeshError as exc:
                publish(Discovery(errors={"kubernetes": exc.message}))
                stop.wait(backoff.next())
        else:
            return
        wanted, feeds = self._plan(services)
        if not feeds:
            return
        run = WatchRun(self, api, wanted, feeds, publish)
        with self._lock:
            self._feeds, self._errors = feeds, run.errors
        try:
            asyncio.run(run.run(stop))
        finally:
            with self._lock:
                if self._errors is run.errors:
                    self._feeds, self._errors = {}, {}

    def _published(self, names: Iterable[str]) -> int:
        """A stamp for a watch answer about ``names``, remembered for full passes."""
        stamp = self._stamp()
        with self._lock:
            for n in names:
                self._watch_stamps[n] = stamp
        return stamp

    def describe(self) -> dict:
        """For ``/admin/mesh``: the API server, the feeds watched and failing (no token)."""
        out: dict[str, Any] = {}
        try:
            out.update(self.connection().describe())
        except MeshError as exc:
            out["error"] = exc.message
        with self._lock:
            out["watches"] = sorted(f.what for f in self._feeds.values())
            out["failing"] = dict(self._errors)
        return out

    def close(self) -> None:
        """Nothing held between calls: each pass and each watch closes its own client."""
        return None


def _joined(failures: dict[str, str]) -> str:
    """One line for failed lists, each distinct reason once with the feeds it hit (a
    refused token or an unreachable server fails every feed alike)."""
    by_reason: dict[str, list[str]] = {}
    for what, reason in sorted(failures.items()):
        by_reason.setdefault(reason, []).append(what)
    return "; ".join(f"{reason} ({', '.join(whats)})" for reason, whats in by_reason.items())
