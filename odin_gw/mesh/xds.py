"""istiod over xDS: an ADS client that follows the gateway's clusters (CDS + EDS).

Three layers, each usable on its own:

* decoding (:mod:`.xds_decode`: ``decode_clusters``, ``decode_endpoints``): protobuf
  resources from ``xds-protos`` into frozen dataclasses, or ``Rejected`` with the reason
  the update is unusable.
* :mod:`.xds_protocol` (``AdsProtocol``): the conversation of one stream, without I/O:
  which requests to send, ACK or NACK of each response, and when the state is complete.
* this module, :class:`AdsClient`: the gRPC stream to istiod (TLS + token on 15012,
  plaintext on 15010, or a local istio-agent's unix socket), ``fetch`` and ``watch``,
  with jittered back-off between reconnects.

The facts from istio's source each layer relies on are in the docstrings of
:mod:`.xds_decode` and :mod:`.xds_protocol`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from .. import __version__
from ..errors import MeshError
from .xds_decode import SHORT_TYPES, XdsState
from .xds_node import NodeIdentity, PilotTarget, read_ca, read_token
from .xds_protocol import AdsProtocol

log = logging.getLogger("odin_gw.mesh.xds")

#: How often a stream's guard looks at the stop event, close() and the deadline.
POLL = 0.1
#: How long ``fetch`` waits for its last ACK to leave and istiod to close the stream.
FLUSH_WAIT = 1.0
#: Keepalive as pilot-agent's dial options (istio ``pkg/keepalive`` defaults).
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class StreamLost(MeshError):
    """istiod ended a stream that had answered (restart, GOAWAY, connection age)."""


# -- back-off and the stream -----------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential back-off between reconnects: ``initial * factor**failures``,
    capped at ``cap``, spread by +-``jitter`` (a share) and never above ``cap``."""

    initial: float = 1.0
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``failures`` failures in a row (0 = the first)."""
        base = min(self.cap, self.initial * self.factor ** min(max(failures, 0), 64))
        spread = base * self.jitter
        return max(0.0, min(self.cap, base - spread + 2 * spread * rand()))


def _scrub(text: str, secret: str | None, limit: int = 400) -> str:
    """``text`` without the token (or anything shaped like a JWT), on one line, capped."""
    if secret:
        text = text.replace(secret, "<redacted>")
    text = " ".join(_JWT.sub("<redacted>", text).split())
    return text if len(text) <= limit else text[:limit] + "..."


_FINISH = object()  # send the queued requests, then half-close
_CLOSE = object()  # end the iterator now


class _Outbox:
    """The request iterator of one stream, which grpc consumes in a thread of its own.

    ``put`` queues a request; ``_FINISH`` half-closes the stream once the requests
    before it are written (``flushed`` is then set); ``_CLOSE`` ends it at once. The
    stream always puts ``_CLOSE`` when it ends, so the blocking ``get`` returns.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.flushed = threading.Event()

    def put(self, item) -> None:
        self._queue.put(item)

    def __iter__(self) -> _Outbox:
        return self

    def __next__(self) -> discovery_pb2.DiscoveryRequest:
        item = self._queue.get()
        if item is _FINISH:
            # grpc asks for the next request only once the previous one is written.
            self.flushed.set()
            raise StopIteration
        if item is _CLOSE:
            raise StopIteration
        return item


class _Guard:
    """Ends a stream from outside: the thread reading responses is blocked in grpc, and
    grpc's request thread may be too (a send waits while the channel connects), so a
    small thread of its own cancels the call when ``stop`` is set, the client is closed
    or ``deadline`` (``time.monotonic()``; cleared once a state is delivered) passes."""

    def __init__(
        self,
        call: grpc.Call,
        stop: threading.Event | None,
        closed: threading.Event,
        deadline: float | None,
    ) -> None:
        self._call = call
        self._stop = stop
        self._closed = closed
        self.deadline = deadline
        self.expired = False
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xds-stream-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._ended.wait(POLL):
            if self._closed.is_set() or (self._stop is not None and self._stop.is_set()):
                break
            deadline = self.deadline
            if deadline is not None and time.monotonic() >= deadline:
                self.expired = True
                break
        else:
            return
        self._call.cancel()

    def end(self) -> None:
        self._ended.set()
        self._thread.join(2 * POLL)


class AdsClient:
    """An ADS client of istiod for the gateway's clusters (see the module docstring).

    ``fetch`` is one stream that returns the first complete state; ``watch`` keeps a
    stream, reconnecting with :class:`Backoff`. Each connect re-reads the CA file and the
    token (both rotate) and opens a new channel. The token goes only over TLS, as
    ``authorization: Bearer``; it is never logged nor put in an error message.
    """

    def __init__(
        self,
        *,
        pilot_addr: str,
        pilot_tls: str,
        ca_file: str | None,
        token_file: str | None,
        node: NodeIdentity,
        timeout: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        """``timeout`` bounds how long a new ``watch`` stream may wait for istiod's first
        response before it counts as failed (after that, gRPC keepalive pings notice a
        dead connection). Raises ``MeshError`` when ``pilot_addr``/``pilot_tls`` are
        unusable."""
        self.target = PilotTarget.parse(pilot_addr, pilot_tls)
        self.ca_file = ca_file
        self.token_file = token_file
        self.node = node
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self._versions: dict[str, str] = {}
        self._closed = threading.Event()
        self._calls: set = set()
        self._lock = threading.Lock()  # guards _calls (close() runs in another thread)
        self._token: str | None = None  # the last token read, only to scrub messages
        if self.target.tls and not ca_file:
            log.info("istiod at %s: no serviceMesh.caFile, using the system roots", pilot_addr)

    # -- public API -----------------------------------------------------------------------
    def fetch(self, clusters: Sequence[str], timeout: float) -> XdsState:
        """One stream: CDS, then EDS for the asked ``clusters`` (names from
        :func:`.xds_decode.cluster_name`), each ACKed; returns the first complete state and closes
        the stream. Raises ``MeshError`` on refusal, failure or after ``timeout`` s."""
        protocol = AdsProtocol(self.node, clusters, self._versions)
        got: list[XdsState] = []

        def deliver(state: XdsState) -> bool:
            got.append(state)
            return True

        try:
            self._stream(protocol, deliver, lambda error: None, None, timeout, whole=True)
        finally:
            self._versions.update(protocol.versions)
        if not got:
            raise MeshError("the istiod client was closed")
        return got[0]

    def watch(
        self,
        clusters: Sequence[str],
        on_state: Callable[[XdsState], None],
        on_error: Callable[[MeshError], None],
        stop: threading.Event,
    ) -> None:
        """Follow ``clusters`` until ``stop`` is set (or ``close()``); blocks, so run it
        in a thread of its own, which calls both callbacks. ``on_state`` gets the full
        state after each accepted change (the first complete state of every stream
        always); ``on_error`` each failure, refusal or NACK. A stream that had answered
        and then ends (istiod restarting, connection age) is reopened after the first
        back-off step, and only reported if reopening fails. Returns within about
        ``POLL`` of ``stop``."""

        def deliver(state: XdsState) -> bool:
            _call(on_state, state)
            return False  # keep the stream

        def report(error: MeshError) -> None:
            _call(on_error, error)

        failures = 0
        failing = False
        while not self._stopping(stop):
            protocol = AdsProtocol(self.node, clusters, self._versions)
            error: MeshError | None = None
            try:
                self._stream(protocol, deliver, report, stop, self.timeout, whole=False)
            except MeshError as exc:
                error = exc
            self._versions.update(protocol.versions)
            if self._stopping(stop):
                break
            if protocol.delivered:
                failures = 0
                if failing:
                    log.info("istiod at %s: stream working again", self.target.address)
                    failing = False
            if error is not None and not isinstance(error, StreamLost):
                if not failing:
                    log.warning("%s (retrying with back-off)", error.message)
                    failing = True
                _call(on_error, error)
            elif error is not None:
                log.info("%s: reconnecting", error.message)
            self._sleep(stop, self.backoff.delay(failures))
            failures += 1

    def describe(self) -> dict[str, object]:
        """A JSON-ready view for the admin endpoint: where istiod is, how it is reached
        (file paths, never the token), the node and the versions last accepted."""
        return {
            "pilotAddr": self.target.address,
            "tls": self.target.tls,
            "serverName": self.target.server_name,
            "caFile": self.ca_file if self.target.tls else None,
            "tokenFile": self.token_file if self.target.tls else None,
            "node": self.node.describe(),
            "versions": {SHORT_TYPES.get(t, t): v for t, v in self._versions.items()},
        }

    def close(self) -> None:
        """Cancel every open stream; ``watch`` returns and ``fetch`` raises."""
        self._closed.set()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    # -- internals ------------------------------------------------------------------------
    def _stopping(self, stop: threading.Event | None) -> bool:
        return self._closed.is_set() or (stop is not None and stop.is_set())

    def _sleep(self, stop: threading.Event, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping(stop):
            left = end - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, POLL))

    def _channel(self) -> tuple[grpc.Channel, list[tuple[str, str]]]:
        """A new channel and the call metadata, reading the CA and token files now."""
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", -1),  # CDS of a big mesh; istio: MaxInt32
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.use_local_subchannel_pool", 1),  # a new connection for a new channel
            ("grpc.primary_user_agent", f"odin-gw/{__version__}"),
        ]
        metadata = [("clusterid", self.node.cluster_id)]
        if not self.target.tls:
            return grpc.insecure_channel(self.target.address, options=options), metadata
        roots = read_ca(self.ca_file) if self.ca_file else None
        if self.token_file:
            self._token = read_token(self.token_file)
            metadata.append(("authorization", f"Bearer {self._token}"))
        if self.target.server_name:
            options.append(("grpc.ssl_target_name_override", self.target.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.secure_channel(self.target.address, credentials, options=options), metadata

    def _stream(
        self,
        protocol: AdsProtocol,
        deliver: Callable[[XdsState], bool],
        report: Callable[[MeshError], None],
        stop: threading.Event | None,
        timeout: float,
        *,
        whole: bool,
    ) -> None:
        """Run one stream until ``deliver`` returns True (then ACKs are flushed and the
        stream closed), ``stop``/``close()``, or a failure (``MeshError``; a stream
        that had answered and ended is ``StreamLost``). ``timeout`` bounds the wait for
        the first complete state (``whole``) or for the first response."""
        if self._stopping(stop):
            return
        channel, metadata = self._channel()
        deadline = time.monotonic() + timeout
        outbox = _Outbox()
        call = guard = None
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(outbox, metadata=metadata)
            guard = _Guard(call, stop, self._closed, deadline)
            with self._lock:
                self._calls.add(call)
            for request in protocol.start():
                outbox.put(request)
            for response in call:
                step = protocol.on_response(response)
                if not whole:
                    guard.deadline = None
                for request in step.requests:
                    outbox.put(request)
                if step.rejected:
                    log.warning("istiod at %s: %s", self.target.address, step.rejected)
                    report(MeshError(step.rejected))
                if step.state is None:
                    continue
                guard.deadline = None
                if deliver(step.state):
                    outbox.put(_FINISH)
                    # Let the ACKs go out and istiod end the stream; then cancel anyway.
                    if outbox.flushed.wait(FLUSH_WAIT):
                        with contextlib.suppress(grpc.FutureTimeoutError):
                            call.exception(timeout=FLUSH_WAIT)
                    return
            raise self._ended(protocol, None, None)
        except grpc.RpcError as exc:
            if self._stopping(stop):
                return
            if guard is not None and guard.expired and not protocol.delivered:
                raise self._timed_out(protocol, timeout) from None
            raise self._ended(protocol, exc.code(), exc.details()) from None
        finally:
            outbox.put(_CLOSE)
            if guard is not None:
                guard.end()
            if call is not None:
                call.cancel()
                with self._lock:
                    self._calls.discard(call)
            channel.close()

    def _timed_out(self, protocol: AdsProtocol, timeout: float) -> MeshError:
        where = self.target.address
        if not protocol.responses:
            return MeshError(f"istiod at {where} answered nothing within {timeout:g}s")
        return MeshError(
            f"istiod at {where} sent no complete state within {timeout:g}s "
            f"({protocol.progress()})"
            + (f"; last update {protocol.rejected}" if protocol.rejected else "")
        )

    def _ended(
        self, protocol: AdsProtocol, code: grpc.StatusCode | None, details: str | None
    ) -> MeshError:
        """The error for a stream istiod (or the connection) ended."""
        where = self.target.address
        name = code.name if code is not None else "OK"
        text = _scrub(details or "", self._token) or "no details"
        if code is None or code == grpc.StatusCode.OK:
            if protocol.responses:
                return StreamLost(f"istiod at {where} closed the stream")
            return MeshError(f"istiod at {where} closed the stream without answering")
        if protocol.responses and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            # What pilot-agent counts as an expected end (a restart, GOAWAY, a closed
            # transport): routine once istiod has answered.
            return StreamLost(f"istiod at {where} ended the stream: {name}: {text}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return MeshError(f"cannot reach istiod at {where}: {name}: {text}")
        if protocol.responses:
            return MeshError(f"istiod at {where} ended the stream: {name}: {text}")
        return MeshError(f"istiod refused the stream: {name}: {text} (pilotAddr {where})")


def _call(callback: Callable, value: object) -> object:
    """Run a caller's callback; its exception is logged, never ends the stream."""
    try:
        return callback(value)
    except Exception:
        log.exception("xds callback %r raised", callback)
        return None
