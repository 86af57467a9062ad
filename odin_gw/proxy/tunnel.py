"""HTTP/1.1 ``Upgrade`` tunnels: WebSocket and the other protocols a service allows.

A request with ``Connection: upgrade`` whose ``Upgrade`` names only protocols listed in
its service's ``upgrades`` is not sent through the connection pools. The gateway opens a
connection of its own to an endpoint, made by the endpoint's pool (so mesh mTLS, the
SPIFFE identity check and the CA of a static ``https`` target are exactly the
forwarder's), sends the handshake with ``Connection: Upgrade``, ``Upgrade`` and the
``Sec-WebSocket-*`` headers, and reads the answer head (at most 64 KiB, within the
route's ``timeout``; interim answers other than 101 are dropped).

* ``101`` naming a protocol the client offered: the head goes to the client and the
  request's thread relays bytes both ways (:class:`Relay`) until both sides have closed,
  one resets, nothing moved for ``tunnelIdleTimeout`` or the worker stops. A side's end
  of stream is passed on as ``shutdown(SHUT_WR)`` (half-close). The worker then closes
  the client connection: gunicorn writes nothing of its own on it (see
  :class:`~odin_gw.edge_reader.ConnectionHandover`).
* ``101`` without ``Upgrade``, or switching to a protocol nobody asked for: ``502``, as
  Envoy answers a broken upgrade.
* Any other answer (the backend refused, or ignored the upgrade): relayed as an ordinary
  response; the client connection is closed after it (bytes the client may have sent
  behind its handshake must never be read as a next request).

Each open tunnel holds one worker thread. ``server.maxTunnels`` caps them per worker so
ordinary requests keep threads: an upgrade beyond it is answered ``503 tunnel_limit`` at
once. ``Upgrade: h2c`` is never tunnelled; an upgrade request with a body is refused
(``400``); a request whose service does not list the protocol is forwarded as any
other, ``Upgrade`` stripped.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import re
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import monotonic

from flask import Response
from urllib3.exceptions import HTTPError

from ..edge_reader import HANDOVER
from ..errors import BadRequest, GatewayError, NoHealthyTarget, UpstreamError
from ..errors import UpstreamProtocolError as _ProtocolError
from ..mesh.snapshot import Endpoint
from .exchange import Exchange
from .forwarder import ProxyResponse, upstream_error
from .headers import response_headers
from .retry import Failure
from .transport import (
    ConnectFailed,
    HeadTimeout,
    InvalidResponse,
    ResetAfterSend,
    StaleConnection,
    TransportError,
    is_tls_alert,
    new_connection,
    send_head,
)

log = logging.getLogger("odin_gw.proxy")

#: Largest answer head read from a backend (each interim answer's too).
MAX_HEAD = 64 * 1024
#: Interim (1xx) answers skipped before the real one; more is a broken peer.
MAX_INTERIM = 32
#: Most bytes held per direction: nothing more is read from a side until they are sent.
CHUNK = 64 * 1024
#: How often a silent tunnel looks at whether its worker is stopping.
STOP_POLL = 1.0
#: Threads a worker runs when neither ``ODIN_THREADS`` nor ``server.threads`` says.
DEFAULT_THREADS = 64

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?\n")
_HEAD_END = re.compile(rb"\n\r?\n")
# Controls other than HTAB in a header line (CR and LF are split off first).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class TunnelLimit(GatewayError):
    """``server.maxTunnels`` tunnels are open in this worker already."""

    status = 503
    code = "tunnel_limit"


class BadAnswer(ValueError):
    """A backend's answer head that cannot be relayed (becomes ``502``)."""


# -- what the client asks for ------------------------------------------------------------


def protocol_names(value: str) -> tuple[str, ...]:
    """The protocol names (lower case, versions dropped) of an ``Upgrade`` value, in order;
    ``()`` when any entry is not ``token[/token]``."""
    names = []
    for item in value.split(","):
        item = item.strip(" \t")
        if not item:
            continue
        name, slash, version = item.partition("/")
        if not _TOKEN.fullmatch(name) or (slash and not _TOKEN.fullmatch(version)):
            return ()
        names.append(name.lower())
    return tuple(names)


def upgrade_request(environ: dict) -> tuple[str, ...]:
    """The protocols an HTTP/1.1 request asks to switch to, or ``()`` for none.

    An upgrade needs both ``Upgrade`` and an ``upgrade`` option in ``Connection``
    (RFC 9110 7.8, and Envoy's test); HTTP/1.0 and HTTP/2 requests never upgrade.
    """
    value = environ.get("HTTP_UPGRADE")
    if not value or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return ()
    connection = environ.get("HTTP_CONNECTION") or ""
    if "upgrade" not in (t.strip(" \t").lower() for t in connection.split(",")):
        return ()
    return protocol_names(value)


def has_body(environ: dict) -> bool:
    """Whether the request says it carries a body."""
    length = environ.get("CONTENT_LENGTH")
    return bool(length and length.strip() != "0") or "HTTP_TRANSFER_ENCODING" in environ


# -- the backend's answer ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnswerHead:
    """A parsed and checked answer head (status line and header fields)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def all(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


def parse_head(head: bytes) -> AnswerHead:
    """Parse an answer head (status line to the empty line); :class:`BadAnswer` when it
    breaks RFC 9112's rules (nginx and Envoy answer ``502`` to such a head)."""
    status_line = _STATUS_LINE.match(head)
    if status_line is None:
        first = head.split(b"\n", 1)[0][:80]
        raise BadAnswer(f"invalid status line {first!r}")
    headers = []
    for raw in head[status_line.end() :].split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            break
        if _CONTROL.search(line) is not None or b"\r" in line:
            raise BadAnswer("control character in the answer's header block")
        if line[:1] in (b" ", b"\t"):
            raise BadAnswer("folded header line (obs-fold) in the answer")
        name, colon, value = line.partition(b":")
        if not colon or _NAME.fullmatch(name) is None:
            raise BadAnswer(f"invalid header line {line[:80]!r}")
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    reason = (status_line.group(2) or b"").decode("latin-1")
    return AnswerHead(int(status_line.group(1)), reason, tuple(headers))


def switch_head(answer: AnswerHead, offered: tuple[str, ...], request_id: str) -> bytes:
    """The ``101`` head for the client: the backend's end-to-end headers, its
    ``Upgrade``, ``Connection: Upgrade`` and the gateway's request id.

    :class:`BadAnswer` when the backend's ``101`` has no ``Upgrade`` or switches to a
    protocol the client did not offer.
    """
    values = answer.all("upgrade")
    if not values:
        raise BadAnswer("101 Switching Protocols without an Upgrade header")
    upgrade = ", ".join(values)
    chosen = protocol_names(upgrade)
    if not chosen or not set(chosen) <= set(offered):
        raise BadAnswer(f"101 switches to {upgrade!r}, which the client did not offer")
    lines = ["HTTP/1.1 101 Switching Protocols"]
    for name, value in response_headers(answer.headers):
        if name.lower() not in ("content-length", "x-request-id"):
            lines.append(f"{name}: {value}")
    lines += [f"Upgrade: {upgrade}", "Connection: Upgrade", f"X-Request-Id: {request_id}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_answer(sock, deadline: float) -> tuple[bytes, bytes]:
    """(head, bytes after it) of the first answer that is not an interim one, or a 101.

    Reads at most :data:`MAX_HEAD` per head, all of them before ``deadline``. Raises
    :class:`~.transport.HeadTimeout`, :class:`~.transport.ConnectFailed` (the peer's TLS
    stack refused us before answering), :class:`~.transport.StaleConnection` (closed
    without a byte), :class:`~.transport.ResetAfterSend` or
    :class:`~.transport.InvalidResponse`.
    """
    buf = b""
    scanned = 0
    answered = False
    interim = 0
    while True:
        end = _HEAD_END.search(buf, max(0, scanned - 2))
        if end is not None:
            if end.end() > MAX_HEAD:  # however the bytes arrived
                raise InvalidResponse(f"answer head larger than {MAX_HEAD // 1024} KiB")
            head, buf = buf[: end.end()], buf[end.end() :]
            status = _STATUS_LINE.match(head)
            code = int(status.group(1)) if status is not None else 0
            if code < 100 or code >= 200 or code == 101:
                return head, buf
            interim += 1
            if interim > MAX_INTERIM:
                raise InvalidResponse(f"more than {MAX_INTERIM} interim (1xx) answers")
            scanned = 0
            continue
        scanned = len(buf)
        if len(buf) >= MAX_HEAD:  # no end yet: it cannot come within MAX_HEAD any more
            raise InvalidResponse(f"answer head larger than {MAX_HEAD // 1024} KiB")
        left = deadline - monotonic()
        if left <= 0:
            raise HeadTimeout("no complete answer head before the deadline")
        try:
            sock.settimeout(left)
            data = sock.recv(CHUNK)
        except TimeoutError as exc:
            raise HeadTimeout("no complete answer head before the deadline") from exc
        except OSError as exc:  # ssl.SSLError included
            if not answered and is_tls_alert(exc):
                raise ConnectFailed(f"the peer refused the TLS session: {exc}") from exc
            raise ResetAfterSend(str(exc)) from exc
        if not data:
            if not answered:
                raise StaleConnection("closed without answering")
            raise InvalidResponse("connection closed in the middle of the answer head")
        answered = True
        buf += data


# -- relaying ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What a relay moved, and why it ended."""

    to_upstream: int
    to_client: int
    reason: str


class _Ended(Exception):
    """A side reset or went away: the relay ends with this reason."""


class _Flow:
    """One direction of a relay: at most one chunk read from ``src`` and not yet sent."""

    __slots__ = ("buf", "dst", "dst_name", "eof", "moved", "shut", "src", "src_name")

    def __init__(self, src, dst, src_name: str, dst_name: str, first: bytes) -> None:
        self.src = src
        self.dst = dst
        self.src_name = src_name
        self.dst_name = dst_name
        self.buf = memoryview(first)
        self.eof = False
        self.shut = False
        self.moved = 0

    @property
    def wants_read(self) -> bool:
        return not self.eof and not self.buf

    def tls_pending(self) -> bool:
        # TLS records already decrypted sit in the SSL object, not the socket: select()
        # would not report them.
        return isinstance(self.src, ssl.SSLSocket) and self.src.pending() > 0

    def read(self, size: int) -> bool:
        try:
            data = self.src.recv(size)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            raise _Ended(f"{self.src_name} reset ({exc.strerror or exc})") from exc
        if data:
            self.buf = memoryview(data)
        else:
            self.eof = True
        return True

    def write(self) -> bool:
        try:
            sent = self.dst.send(self.buf)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            raise _Ended(f"{self.dst_name} went away ({exc.strerror or exc})") from exc
        self.moved += sent
        self.buf = self.buf[sent:]
        return sent > 0

    def half_close(self) -> None:
        """Pass the end of ``src``'s stream on: no more bytes will reach ``dst``.

        ``socket.shutdown`` of the base class even on TLS: ``SSLSocket.shutdown`` drops
        the TLS state (the other direction could not be read any more), and ``unwrap``
        may discard records already received. The peer sees the end of the TCP stream.
        """
        self.shut = True
        with contextlib.suppress(OSError):  # already gone: the other direction will tell
            socket.socket.shutdown(self.dst, socket.SHUT_WR)


def _never() -> bool:
    return False


class Relay:
    """Moves bytes both ways between a client and an upstream socket, in one thread.

    Backpressure: a direction holds at most one chunk; its source is not read again
    until the chunk is sent, so a slow reader slows its writer down instead of filling
    the gateway's memory. The relay ends when both directions have ended (each side's
    end of stream passed on to the other as a half-close), when a side resets or goes
    away, when nothing moved for ``idle_timeout`` seconds, or when ``stopping()`` says
    so (looked at every :data:`STOP_POLL` seconds). The sockets are left open.
    """

    def __init__(
        self,
        client,
        upstream,
        idle_timeout: float,
        stopping: Callable[[], bool] = _never,
        chunk: int = CHUNK,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.stopping = stopping
        self.chunk = chunk

    def run(self, to_client: bytes = b"", to_upstream: bytes = b"") -> RelayResult:
        """Relay until the end; ``to_client``/``to_upstream`` go first in each direction."""
        up = _Flow(self.client, self.upstream, "client", "upstream", to_upstream)
        down = _Flow(self.upstream, self.client, "upstream", "client", to_client)
        flows = (up, down)
        self.client.setblocking(False)
        self.upstream.setblocking(False)
        selector = selectors.DefaultSelector()
        masks = {self.client: 0, self.upstream: 0}
        first_end: str | None = None
        last = monotonic()
        next_check = last + STOP_POLL
        try:
            while True:
                moved = False
                for flow in flows:
                    if flow.buf:
                        moved |= flow.write()
                    if flow.eof and not flow.buf and not flow.shut:
                        flow.half_close()
                        first_end = first_end or f"{flow.src_name} closed"
                if up.shut and down.shut:
                    reason = first_end or "closed"
                    break
                now = monotonic()
                if moved:
                    last = now
                want = {self.client: 0, self.upstream: 0}
                pending = False
                for flow in flows:
                    if flow.wants_read:
                        want[flow.src] |= selectors.EVENT_READ
                        pending = pending or flow.tls_pending()
                    elif flow.buf:
                        want[flow.dst] |= selectors.EVENT_WRITE
                for sock, mask in want.items():
                    _watch(selector, sock, masks[sock], mask)
                    masks[sock] = mask
                if pending:
                    timeout = 0.0
                else:
                    idle_left = last + self.idle_timeout - now
                    if idle_left <= 0:
                        reason = "idle timeout"
                        break
                    timeout = min(idle_left, STOP_POLL)
                ready = {key.fileobj for key, _ in selector.select(timeout)}
                if monotonic() >= next_check:
                    if self.stopping():
                        reason = "worker stopping"
                        break
                    next_check = monotonic() + STOP_POLL
                for flow in flows:
                    readable = flow.src in ready or flow.tls_pending()
                    if flow.wants_read and readable and flow.read(self.chunk):
                        last = monotonic()
        except _Ended as exc:
            reason = str(exc)
        finally:
            selector.close()
        return RelayResult(up.moved, down.moved, reason)


def _watch(selector: selectors.BaseSelector, sock, old: int, new: int) -> None:
    if old == new:
        return
    if not old:
        selector.register(sock, new)
    elif not new:
        selector.unregister(sock)
    else:
        selector.modify(sock, new)


# -- per worker ----------------------------------------------------------------------------


class TunnelSlots:
    """The tunnels open in this worker, against ``server.maxTunnels``.

    The lock guards two integers and is never held across I/O.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Take a slot; ``False`` when all are taken."""
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1


class Tunnels:
    """The upgrade tunnels of one worker: which requests become one, and opening them.

    ``accepts`` is asked only for requests that carry ``Upgrade``; ``open`` answers them.
    """

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        server = gateway.config.server
        self.slots = TunnelSlots(server.max_tunnels)
        self._configs: tuple[object, dict] = (None, {})
        self._warned = False
        if any(s.upgrades for s in gateway.config.backends):
            threads = int(os.environ.get("ODIN_THREADS") or server.threads or DEFAULT_THREADS)
            if server.max_tunnels >= threads:
                log.warning(
                    "server.maxTunnels (%d) is not below the worker's %d threads: open "
                    "tunnels can take every thread and stall ordinary requests",
                    server.max_tunnels,
                    threads,
                )

    def _service(self, route):
        config = getattr(route, "config", None)
        if config is not None:
            return config
        # A route built without its ServiceConfig: look it up by name (per config).
        current = self.gateway.config
        seen, by_name = self._configs
        if seen is not current:
            by_name = {s.name: s for s in current.backends}
            self._configs = (current, by_name)
        return by_name.get(route.name)

    def accepts(self, environ: dict, route) -> bool:
        """Whether the request is an upgrade ``route`` tunnels (and this worker can)."""
        service = self._service(route)
        if service is None or not service.upgrades:
            return False
        names = upgrade_request(environ)
        if not names or "h2c" in names or not service.upgrades.issuperset(names):
            return False
        handover = environ.get(HANDOVER)
        if handover is None or not handover.available():
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: Upgrade requests are forwarded without upgrading: tunnels need "
                    "the edge worker (server.workerClass: edge) and HTTP/1.1",
                    route.name,
                )
            return False
        return True

    def open(self, environ: dict, route, exchange: Exchange) -> Response:
        """Answer an upgrade request that :meth:`accepts`: a tunnel, or the backend's
        refusal, or a gateway error (raised)."""
        if has_body(environ):
            raise BadRequest("an Upgrade request must not carry a body")
        metrics = self.gateway.metrics
        if not self.slots.acquire():
            exchange.error_kind = TunnelLimit.code
            metrics.tunnels.labels(route.service or route.name, "limit").inc()
            raise TunnelLimit(
                f"{self.slots.limit} tunnels are open in this worker (server.maxTunnels)",
                limit=self.slots.limit,
            )
        try:
            response = self._open(environ, route, exchange)
        except BaseException:
            self.slots.release()
            raise
        if not isinstance(response, TunnelResponse):
            self.slots.release()  # refused: no tunnel, the slot is free while it streams
            metrics.tunnels.labels(route.service or route.name, "refused").inc()
        else:
            metrics.tunnels.labels(route.service or route.name, "opened").inc()
        return response

    def _open(self, environ: dict, route, exchange: Exchange) -> Response:
        handover = environ[HANDOVER]
        offered = upgrade_request(environ)
        out = self.gateway.forwarder.outbound.build(environ, route, exchange)
        headers = out.headers
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = environ["HTTP_UPGRADE"]
        endpoint, conn, head, early = self._handshake(route, exchange, out.method, out.url, headers)
        balancer = route.balancer
        try:
            answer = parse_head(head)
            if answer.status == 101:
                to_client = switch_head(answer, offered, exchange.request_id)
        except BadAnswer as exc:
            conn.close()
            balancer.finished(endpoint)
            error = _ProtocolError(
                f"{route.name}: upstream {endpoint.address}:{endpoint.port} sent an invalid "
                f"answer to an upgrade: {exc}",
                target=endpoint.key,
            )
            exchange.error_kind = error.code
            log.warning("%s (request %s)", error.message, exchange.request_id)
            raise error from exc
        service = self._service(route)
        if answer.status != 101:
            handover.close_after()
            return _refusal(conn, head + early, out.method, exchange, route, endpoint)
        exchange.status = 101
        log.info(
            "%s: tunnel open to %s, %s (request %s)",
            route.name,
            endpoint.key,
            ", ".join(offered),
            exchange.request_id,
        )
        tunnel = _Tunnel(
            self,
            handover,
            conn,
            endpoint,
            route,
            exchange,
            to_client,
            early,
            service.tunnel_idle_timeout if service is not None else 300.0,
        )
        return TunnelResponse(tunnel, status=101)

    def _handshake(self, route, exchange: Exchange, method: str, url: str, headers):
        """(endpoint, connection, answer head, bytes after it) from the first endpoint that
        answers; connect failures move on to another as the route's retry policy allows."""
        gateway = self.gateway
        timeout = route.timeout.read_timeout
        deadline = monotonic() + timeout
        exchange.timeout = timeout
        exchange.route = route.name
        candidates = gateway.candidates(route)
        everyone = gateway.every_endpoint(route)
        balancer, health = route.balancer, route.health
        policy = route.retry
        tried: list[str] = []
        error: UpstreamError | None = None
        while True:
            # As the forwarder picks: passive health and open circuits skipped, panic
            # mode when too few endpoints are healthy.
            endpoint = balancer.select(
                candidates, everyone, tried, route.available, route.panic_threshold
            ).endpoint
            if endpoint is None:
                if error is not None:
                    raise error
                exchange.error_kind = NoHealthyTarget.code
                raise NoHealthyTarget(f"{route.name}: no healthy target", service=route.name)
            tried.append(endpoint.key)
            exchange.target = endpoint.key
            exchange.datacenter = endpoint.datacenter
            exchange.peer_identity = endpoint.identity
            if not route.preserve_host:
                headers["Host"] = endpoint.host_header
            for inj in gateway.injectors:
                inj.upstream(exchange, endpoint, headers)
            balancer.started(endpoint)
            try:
                conn, head, early = self._attempt(endpoint, route, method, url, headers, deadline)
            except TransportError as exc:
                balancer.finished(endpoint)
                error = upstream_error(exc, endpoint, route, timeout)
                exchange.error_kind = error.code
                if exc.failure is Failure.CONNECT:
                    health.failed(endpoint.key)
                    policy = policy.after(Failure.CONNECT, method, True) if policy else None
                else:
                    policy = None  # the handshake was sent: never again
                log.warning(
                    "%s (request %s%s)",
                    error.message,
                    exchange.request_id,
                    "; trying another endpoint" if policy is not None else "",
                )
                if policy is None:
                    raise error from exc
                exchange.retries += 1
                continue
            except BaseException:
                balancer.finished(endpoint)
                raise
            health.answered(endpoint.key, 101)  # the connection and a head came back
            return endpoint, conn, head, early

    def _attempt(self, endpoint: Endpoint, route, method, url, headers, deadline: float):
        conn = new_connection(self.gateway.session, endpoint)
        left = deadline - monotonic()
        if left <= 0:
            raise HeadTimeout("the deadline passed before connecting")
        conn.timeout = min(route.timeout.connect_timeout, left)
        try:
            try:
                conn.connect()  # the pool's class: TLS and the identity check as pooled
            except (OSError, HTTPError, ssl.SSLError, ssl.CertificateError) as exc:
                raise ConnectFailed(str(exc)) from exc
            conn.timeout = route.idle_timeout  # the send of the handshake
            try:
                send_head(conn, method, url, headers, None)
            except ssl.SSLError as exc:
                # TLS 1.3: the peer's verdict on our certificate meets the first write.
                raise ConnectFailed(f"the peer ended the TLS session: {exc}") from exc
            except OSError as exc:
                raise ResetAfterSend(str(exc)) from exc
            head, early = read_answer(conn.sock, deadline)
        except BaseException:
            conn.close()
            raise
        return conn, head, early


class TunnelResponse(ProxyResponse):
    """The ``101`` answer: its body is the tunnel, run when gunicorn asks for it.

    werkzeug sends no body with a 1xx status; this response hands gunicorn the tunnel
    anyway, which writes the head itself (gunicorn writes nothing) and relays.
    """

    def get_app_iter(self, environ):
        from werkzeug.wsgi import ClosingIterator

        return ClosingIterator(self.response, self.close)


class _Tunnel:
    """The body of a tunnel's answer: take the client connection, write the 101, relay.

    ``close`` (once, whatever happened) closes the upstream connection, ends the
    balancer's accounting and frees the worker's tunnel slot.
    """

    def __init__(
        self,
        tunnels: Tunnels,
        handover,
        conn,
        endpoint: Endpoint,
        route,
        exchange: Exchange,
        head: bytes,
        early: bytes,
        idle_timeout: float,
    ) -> None:
        self.tunnels = tunnels
        self.handover = handover
        self.conn = conn
        self.endpoint = endpoint
        self.route = route
        self.exchange = exchange
        self.head = head
        self.early = early
        self.idle_timeout = idle_timeout
        self.taken = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self._run()
        yield from ()

    def _run(self) -> None:
        exchange = self.exchange
        client, pending = self.handover.take()
        self.taken = True
        started = monotonic()
        relay = Relay(client, self.conn.sock, self.idle_timeout, self.handover.stopping)
        gauge = self.tunnels.gateway.metrics.tunnels_open
        gauge.inc()
        try:
            result = relay.run(to_client=self.head + self.early, to_upstream=pending)
        finally:
            gauge.dec()
        exchange.response_bytes = max(0, result.to_client - len(self.head))
        log.info(
            "%s: tunnel to %s closed: %s; %d bytes to upstream, %d to client, %.1fs (request %s)",
            self.route.name,
            self.endpoint.key,
            result.reason,
            result.to_upstream,
            exchange.response_bytes,
            monotonic() - started,
            exchange.request_id,
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.conn.close()
        finally:
            self.route.balancer.finished(self.endpoint)
            self.tunnels.slots.release()
            if not self.taken:  # never relayed: gunicorn must not keep the connection
                self.handover.close_after()


# -- an answer that is not a 101 -----------------------------------------------------------


class _Replay(io.RawIOBase):
    """The bytes already read from the backend, then the socket."""

    def __init__(self, first: bytes, sock) -> None:
        super().__init__()
        self._first = memoryview(first)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._first:
            n = min(len(b), len(self._first))
            b[:n] = self._first[:n]
            self._first = self._first[n:]
            return n
        return self._sock.recv_into(b)


class _Wire:
    """What http.client takes for a socket: it only asks for a file."""

    def __init__(self, reader: io.BufferedReader) -> None:
        self._reader = reader

    def makefile(self, mode: str) -> io.BufferedReader:
        return self._reader


class _RefusalBody:
    """Streams the body of a refused upgrade's answer; closes the connection after."""

    def __init__(self, resp: http.client.HTTPResponse, conn, exchange: Exchange, finish) -> None:
        self._resp = resp
        self._conn = conn
        self._finish = finish
        self.exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        exchange = self.exchange
        try:
            while True:
                chunk = self._resp.read1(CHUNK)
                if not chunk:
                    return
                exchange.response_bytes += len(chunk)
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            exchange.error_kind = "body_interrupted"
            log.warning(
                "upstream %s body interrupted: %s (request %s)",
                exchange.target,
                exc,
                exchange.request_id,
            )
            raise

    def close(self) -> None:
        finish, self._finish = self._finish, None
        if finish is not None:
            self._resp.close()
            self._conn.close()
            finish()


def _refusal(conn, raw: bytes, method: str, exchange: Exchange, route, endpoint) -> Response:
    """The backend's answer other than 101, relayed as the forwarder relays any."""

    def finish() -> None:
        route.balancer.finished(endpoint)

    sock = conn.sock
    resp = http.client.HTTPResponse(_Wire(io.BufferedReader(_Replay(raw, sock))), method=method)
    try:
        sock.settimeout(route.idle_timeout)  # each silence while the body streams
        resp.begin()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        finish()
        error = upstream_error(InvalidResponse(str(exc)), endpoint, route)
        exchange.error_kind = error.code
        raise error from exc
    exchange.status = resp.status
    headers = [(k, v) for k, v in response_headers(resp.msg.items()) if k.lower() != "x-request-id"]
    if resp.chunked:
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    headers.append(("X-Request-Id", exchange.request_id))
    log.info(
        "%s: upstream %s refused the upgrade with %d (request %s)",
        route.name,
        endpoint.key,
        resp.status,
        exchange.request_id,
    )
    if method == "HEAD" or resp.status in (204, 304) or resp.length == 0:
        resp.close()
        conn.close()
        finish()
        return ProxyResponse.relay((), resp.status, headers)
    return ProxyResponse.relay(_RefusalBody(resp, conn, exchange, finish), resp.status, headers)
