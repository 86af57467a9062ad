"""The watch side of Kubernetes discovery: one asyncio task per feed, in one thread.

See :mod:`.kubernetes` for what is read and why; this module is the loop each feed runs
(list, watch from the list's version, list again on 410, back off on failures) and how
changes are published: only services whose entry changed, each answer stamped, the
failing feeds carried on every answer so ``lastError`` does not come and go.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .client import Discovery, Publish
from .cluster_names import ClusterService
from .kube_connect import KubeConnection, status_code
from .kube_feed import (
    MAX_BACKOFF,
    OPENING,
    SERVICE_NAME_LABEL,
    SLICES,
    WATCH_GRACE,
    Backoff,
    Feed,
    Feeds,
)

if TYPE_CHECKING:
    from .kubernetes import KubernetesDiscovery

log = logging.getLogger("odin_gw.mesh.kubernetes")

#: Seconds between looks at the ``stop`` event (one timer for every feed).
STOP_POLL = 0.25
_UNSENT = object()


class WatchRun:
    """One ``watch`` call: its feeds, what it published, which feeds fail now.

    Everything is touched from the event loop's thread only, except ``errors``: full
    passes read it from theirs, so it changes only under the discovery's lock
    (``_set_error``).
    """

    def __init__(
        self,
        owner: KubernetesDiscovery,
        api: KubeConnection,
        wanted: list[ClusterService],
        feeds: Feeds,
        publish: Publish,
    ) -> None:
        self.owner = owner
        self.api = api
        self.services = {cs.name: cs for cs in wanted}
        self.feeds = feeds
        self.publish = publish
        self.errors: dict[str, str] = {}
        self.sent: dict[str, Any] = {}  # service -> entry (or None: absent) last published

    async def run(self, stop: threading.Event) -> None:
        """Run every feed until ``stop`` is set; then cancel them and close the client."""
        client = self.api.client()
        opening = asyncio.Semaphore(OPENING)
        tasks = [asyncio.create_task(self._feed(client, f, opening)) for f in self.feeds.values()]
        try:
            while not stop.is_set() and not all(t.done() for t in tasks):
                await asyncio.sleep(STOP_POLL)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    async def _feed(self, client: Any, feed: Feed, opening: asyncio.Semaphore) -> None:
        """List, then watch, for ever: relist on 410, back off and relist on failures."""
        backoff = Backoff()
        while True:
            step = "list"
            try:
                async with opening:
                    changed = await self.owner._list(self.api, client, feed)
                self._recovered(feed, changed)
                backoff.reset()
                if feed.missing:  # no such kind on this server: look again later
                    await asyncio.sleep(MAX_BACKOFF)
                    continue
                step = "watch"
                await self._follow(client, feed)
                log.info("%s: resourceVersion %s expired (410): listing again", feed.what, feed.rv)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("%s failed", feed.what, exc_info=True)
                if status_code(exc) != 410:  # 410 here: a list page's continue token expired
                    self._failed(feed, self.api.explain(exc, step, feed.kind.rbac, feed.namespace))
                await asyncio.sleep(backoff.next())

    async def _follow(self, client: Any, feed: Feed) -> None:
        """Watch ``feed`` from its version, applying events; returns on 410 (relist).

        lightkube resumes a watch the server ended (``timeoutSeconds``) from the last
        version seen, with no read timeout: a stream silent for longer than the server's
        timeout plus a grace is taken for a dead connection and reopened from our version.
        """
        labels = {SERVICE_NAME_LABEL: None} if feed.kind is SLICES else None
        while True:
            events = client.watch(
                feed.kind.resource,
                namespace=feed.namespace,
                labels=labels,
                server_timeout=self.owner.watch_seconds,
                resource_version=feed.rv,
            ).__aiter__()
            try:
                while True:
                    try:
                        kind, obj = await asyncio.wait_for(
                            anext(events), self.owner.watch_seconds + WATCH_GRACE
                        )
                    except (TimeoutError, StopAsyncIteration):
                        break
                    except Exception as exc:
                        if status_code(exc) == 410:
                            return
                        raise
                    changed = feed.apply(kind, obj)
                    if changed:
                        self._send(changed)
            finally:
                await events.aclose()

    # -- publishing -----------------------------------------------------------------------
    def _send(self, names: Iterable[str], force: bool = False) -> bool:
        """Publish the entries of ``names`` that changed since last sent (all, ``force``);
        True if anything was published."""
        found: dict[str, Any] = {}
        absent = set()
        for name in names:
            cs = self.services.get(name)
            if cs is None:
                continue
            view = self.owner._view(cs, self.feeds)
            if view is False:
                continue  # a feed it needs was never listed
            if not force and self.sent.get(name, _UNSENT) == view:
                continue
            self.sent[name] = view
            if view is None:
                absent.add(name)
            else:
                found[name] = view
        if not found and not absent:
            return False
        stamp = self.owner._published([*found, *absent])
        self.publish(
            Discovery(
                services=found,
                absent=frozenset(absent),
                errors=dict(self.errors),
                stamps=dict.fromkeys([*found, *absent], stamp),
            )
        )
        return True

    def _recovered(self, feed: Feed, changed: set[str]) -> None:
        """A list succeeded: clear the feed's error and publish its services (all of
        them after a failure, so the manager hears the recovery)."""
        was_failing = feed.what in self.errors
        if was_failing:
            log.info("%s recovered", feed.what)
            self._set_error(feed.what, None)
        sent = self._send(changed, force=was_failing)
        if was_failing and not sent and not self.errors:
            self.publish(Discovery())  # nothing fails any more: clears lastError

    def _failed(self, feed: Feed, message: str) -> None:
        """Report a failing feed: an error-only answer keeps the last known good view."""
        if feed.what not in self.errors:  # logged when it starts failing, not on each retry
            log.warning("%s failing (retrying with back-off): %s", feed.what, message)
        self._set_error(feed.what, message)
        self.publish(Discovery(errors=dict(self.errors)))

    def _set_error(self, what: str, message: str | None) -> None:
        with self.owner._lock:
            if message is None:
                self.errors.pop(what, None)
            else:
                self.errors[what] = message
