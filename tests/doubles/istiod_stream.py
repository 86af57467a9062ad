"""One state-of-the-world xDS stream of the istiod double, with istiod's ACK/NACK rules.

The rules are those of ``ShouldRespond`` in istio's ``pkg/xds/server.go``, per type URL:

1. ``error_detail`` set: a NACK. Recorded, never answered (the same config would only
   be rejected again); the watch keeps its nonce and names.
2. No names on a type that is not wildcard (EDS, SDS, RDS): unsubscribe, no answer.
3. Empty ``response_nonce``, or no watch yet for the type: a new subscription, answered
   in full.
4. ``response_nonce`` other than the last one sent: stale, ignored.
5. Otherwise an ACK of that nonce. The names become the new subscription: unchanged ->
   no answer; for a wildcard type (CDS, LDS) any change -> a full answer; for another
   type only newly added names are answered (removals need no answer).

Each connection owns a queue of events (requests from its reader thread, pushes from
the double, close); the serving thread drains it, so requests and pushes are handled
one at a time in order, like istiod's per-connection loop.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from tests.doubles.istiod_model import ProxyNode
from tests.doubles.istiod_resources import EDS, SDS

__all__ = ["Push", "Recorder", "XdsConnection", "is_wildcard"]

_NOT_WILDCARD = frozenset(
    {EDS, SDS, "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"}
)

#: Events on a connection's queue: ("request", DiscoveryRequest), ("push", Push),
#: ("eof", None) when the client half-closed or the call died, ("close", None).
Event = tuple[str, object]


def is_wildcard(type_url: str) -> bool:
    """``IsWildcardTypeURL``: CDS, LDS and istiod's own types; not EDS/RDS/SDS."""
    return type_url not in _NOT_WILDCARD


@dataclass(frozen=True)
class Push:
    """A push of ``type_url``: ``full`` (every resource of a wildcard type, CDS) or the
    resources in ``names``, sent to a stream only for the names it watches.

    The content is built from the double's state when the stream sends it, so a push
    queued before a newer change never sends older content. ``fixed`` = (version,
    name -> resource) is sent as it is instead (``push_invalid``).
    """

    type_url: str
    names: frozenset[str] = frozenset()
    full: bool = False
    fixed: tuple[str, dict[str, any_pb2.Any]] | None = None


#: ``record(kind, entry)`` with kind "ack" (type_url, version_info, nonce), "nack"
#: (type_url, version_info, nonce, error message) or "stale" (type_url, nonce).
Recorder = Callable[[str, tuple[str, ...]], None]


@dataclass
class _Watch:
    names: set[str] = field(default_factory=set)
    nonce_sent: str = ""


class XdsConnection:
    """The state of one ADS or SDS stream: its node, watches and event queue."""

    def __init__(self, kind: str, peer: str, record: Recorder) -> None:
        self.kind = kind
        self.peer = peer
        self.node: ProxyNode | None = None
        self.registered = False
        self._record = record
        self._events: queue.Queue[Event] = queue.Queue()
        # Guards _watches: read by subscribed() from test threads.
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}

    # -- events -----------------------------------------------------------------------
    def start_reader(self, requests: Iterator[discovery_pb2.DiscoveryRequest]) -> None:
        """Read ``requests`` on a daemon thread into the event queue."""

        def read() -> None:
            try:
                for request in requests:
                    self._events.put(("request", request))
            except Exception:  # the call was cancelled or the transport died
                pass
            self._events.put(("eof", None))

        threading.Thread(target=read, name=f"xds-{self.kind}-reader", daemon=True).start()

    def post(self, kind: str, payload: object = None) -> None:
        """Queue an event for the serving thread ("push" or "close")."""
        self._events.put((kind, payload))

    def next_event(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- subscriptions ----------------------------------------------------------------
    def watched(self, type_url: str) -> set[str] | None:
        """Names watched for ``type_url`` (None: not subscribed to that type)."""
        with self._lock:
            watch = self._watches.get(type_url)
            return None if watch is None else set(watch.names)

    def should_respond(
        self, request: discovery_pb2.DiscoveryRequest
    ) -> tuple[bool, set[str] | None]:
        """Apply the rules of the module docstring.

        Returns (answer?, names to answer: None for everything the stream watches).
        """
        type_url, nonce = request.type_url, request.response_nonce
        names = set(request.resource_names)
        if request.HasField("error_detail"):
            self._record(
                "nack", (type_url, request.version_info, nonce, request.error_detail.message)
            )
            return False, None
        with self._lock:
            if not names and not is_wildcard(type_url):
                self._watches.pop(type_url, None)
                return False, None
            watch = self._watches.get(type_url)
            if not nonce or watch is None:
                self._watches[type_url] = _Watch(names=names)
                return True, None
            stale = nonce != watch.nonce_sent
            if not stale:
                previous, watch.names = watch.names, names
        if stale:
            self._record("stale", (type_url, nonce))
            return False, None
        self._record("ack", (type_url, request.version_info, nonce))
        added = names - previous
        if names == previous:
            return False, None
        if is_wildcard(type_url):
            return True, None
        return (True, added) if added else (False, None)

    def respond(
        self, type_url: str, version: str, resources: list[any_pb2.Any]
    ) -> discovery_pb2.DiscoveryResponse:
        """A response with a fresh nonce (istiod: version + UUID); remembers the nonce."""
        nonce = version + str(uuid.uuid4())
        with self._lock:
            watch = self._watches.setdefault(type_url, _Watch())
            watch.nonce_sent = nonce
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=type_url, nonce=nonce
        )

    def push_targets(self, push: Push) -> set[str] | None:
        """Names of ``push`` this stream should get now; None: it gets nothing."""
        names = self.watched(push.type_url)
        if names is None or push.full:
            return names
        return (names & push.names) or None
