"""Forward one request to one of its route's endpoints and stream the answer back."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import struct
import weakref
from collections.abc import Iterator

from flask import Response  # Flask's own class: anything else is converted per request
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from ..errors import (
    ClientDisconnected,
    NoHealthyTarget,
    UpstreamError,
    UpstreamIdentityError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamUnreachable,
)
from ..mesh.identity import PeerIdentityError
from ..mesh.snapshot import Endpoint
from ..routing import Route
from .exchange import Exchange
from .headers import response_headers
from .outbound import CHUNK, OutboundBuilder
from .transport import ConnectFailed, StaleConnection, open_response

log = logging.getLogger("odin_gw.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Upstream bodies up to this size are read whole before the answer starts.
SMALL_BODY = 64 * 1024
NO_BODY_STATUS = frozenset({204, 304})


class ProxyResponse(Response):
    """A response that adds nothing of its own: no default content type, length as sent.

    Its headers are the upstream's, already parsed and checked by http.client, so they
    are handed over as they are instead of being re-validated one by one, and sent as
    they are instead of being copied and "fixed" for the environ (werkzeug's
    ``get_wsgi_headers``).
    """

    default_mimetype = None
    automatically_set_content_length = False

    @classmethod
    def relay(cls, body, status: int, header_list: list[tuple[str, str]]) -> ProxyResponse:
        response = cls(body, status=status)
        # werkzeug's Headers is a thin wrapper around exactly such a list.
        response.headers._list = header_list
        return response

    def get_wsgi_headers(self, environ):
        return self.headers


class UpstreamBody:
    """Streams an upstream body to the client; returns the connection on ``close``.

    A body read to its end puts the connection back in the pool; one abandoned halfway
    (the client went away) closes it, because unread bytes would poison the next request.
    """

    __slots__ = ("_done", "_finish", "_resp", "exchange")

    def __init__(self, resp, exchange: Exchange, finish) -> None:
        self._resp = resp
        self._finish = finish
        self._done = False
        self.exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        exchange = self.exchange
        try:
            for chunk in self._resp.stream(CHUNK, decode_content=False):
                exchange.response_bytes += len(chunk)
                yield chunk
        except (ReadTimeoutError, ProtocolError, OSError) as exc:
            # Headers are gone already: all we can do is cut the body short.
            exchange.error_kind = "body_interrupted"
            log.warning("upstream body interrupted: %s", exc)
            raise
        self._done = True

    def close(self) -> None:
        resp = self._resp
        if not self._done:
            resp.close()
        resp.release_conn()
        self._finish()


class Forwarder:
    """Sends requests upstream through the session's adapter pools.

    ``gateway.candidates(route)`` gives a route's current endpoints; the gateway's mesh
    header injectors (see :mod:`odin_gw.mesh.headers`) decide what is stripped and added.
    """

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        strip: set[str] = set()
        prefixes: list[str] = []
        for inj in gateway.injectors:
            strip |= inj.strip
            prefixes.extend(inj.strip_prefixes)
        self.outbound = OutboundBuilder(frozenset(strip), tuple(prefixes))
        server = gateway.config.server
        self._rcvtimeo = _timeval(server.read_timeout)
        self._sndtimeo = _timeval(server.write_timeout)
        self._bounded: weakref.WeakSet = weakref.WeakSet()

    def _bound_client_io(self, sock) -> None:
        # Kernel timeouts on the client socket: readTimeout bounds each receive of the
        # request body, writeTimeout each send of the answer. Set once per connection
        # (keep-alive requests reuse the socket object); settimeout() instead would make
        # every recv/send poll first.
        if sock in self._bounded:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._rcvtimeo)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._sndtimeo)
            self._bounded.add(sock)
        except (OSError, AttributeError, TypeError):
            pass  # not a kernel socket (e.g. a TLS wrapper in a test server)

    def forward(self, environ: dict, route: Route, exchange: Exchange) -> Response:
        """Forward the request in ``environ`` along ``route``; raises ``GatewayError``."""
        client_sock = environ.get("gunicorn.socket")
        if client_sock is not None:
            self._bound_client_io(client_sock)
        out = self.outbound.build(environ, route, exchange)
        method, url, headers = out.method, out.url, out.headers
        body, chunked, replayable = out.body, out.chunked, out.replayable

        candidates = self.gateway.candidates(route)
        retry_ok = replayable and method in IDEMPOTENT
        attempts = 1 + route.retries if retry_ok else 1
        tried: list[str] = []
        last_error: UpstreamError | None = None
        balancer = route.balancer
        health = route.health
        adapter = self.gateway.session.adapter
        stale_retry = retry_ok
        endpoint: Endpoint | None = None
        while True:
            if endpoint is None:  # else: a stale keep-alive connection, same endpoint again
                if attempts == 0:
                    break
                endpoint = balancer.pick(candidates, tried, health.available)
                if endpoint is None:
                    break
                tried.append(endpoint.key)
                attempts -= 1
            exchange.target = endpoint.key
            exchange.datacenter = endpoint.datacenter
            if not route.preserve_host:
                headers["Host"] = endpoint.host_header
            for inj in self.gateway.injectors:
                inj.upstream(exchange, endpoint, headers)
            balancer.started(endpoint)
            try:
                resp = open_response(
                    adapter.pool_for(endpoint), method, url, body, headers, chunked, route.timeout
                )
            except ConnectFailed as exc:
                balancer.finished(endpoint)
                health.failed(endpoint.key)
                last_error = _connect_error(exc.__cause__ or exc, endpoint, route.name)
                exchange.error_kind = last_error.code
                log.warning("%s (request %s)", last_error.message, exchange.request_id)
                endpoint = None
                continue
            except StaleConnection:
                balancer.finished(endpoint)
                if stale_retry:  # same endpoint, fresh connection; once per request
                    stale_retry = False
                    continue
                last_error = UpstreamError(
                    f"{route.name}: upstream {endpoint.key} closed the connection",
                    target=endpoint.key,
                )
                break
            except ClientDisconnected:
                balancer.finished(endpoint)
                exchange.error_kind = ClientDisconnected.code
                raise
            except TimeoutError as exc:
                balancer.finished(endpoint)
                exchange.error_kind = UpstreamTimeout.code
                raise UpstreamTimeout(
                    f"{route.name}: upstream {endpoint.key} did not answer within "
                    f"{route.timeout.read_timeout:g}s",
                    target=endpoint.key,
                ) from exc
            except (OSError, http.client.HTTPException, ProtocolError) as exc:
                balancer.finished(endpoint)
                last_error = UpstreamError(
                    f"{route.name}: upstream {endpoint.key} failed mid-request: {_reason(exc)}",
                    target=endpoint.key,
                )
                exchange.error_kind = "upstream_reset"
                log.warning("%s (request %s)", last_error.message, exchange.request_id)
                endpoint = None
                continue
            health.succeeded(endpoint.key)
            return self._respond(resp, method, exchange, lambda e=endpoint: balancer.finished(e))
        if last_error is not None:
            raise last_error
        raise NoHealthyTarget(f"{route.name}: no healthy target", service=route.name)

    @staticmethod
    def _respond(resp, method: str, exchange: Exchange, finish) -> Response:
        status = resp.status
        exchange.status = status
        headers = response_headers(resp.headers.iteritems())
        headers.append(("X-Request-Id", exchange.request_id))
        if method == "HEAD" or status in NO_BODY_STATUS or status < 200:
            resp.release_conn()
            finish()
            return ProxyResponse.relay((), status, headers)
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= SMALL_BODY:
            try:
                data = resp.read(decode_content=False)
            except (ReadTimeoutError, ProtocolError) as exc:
                resp.close()
                resp.release_conn()
                finish()
                if isinstance(exc, ReadTimeoutError):
                    raise UpstreamTimeout("upstream did not send its body in time") from exc
                raise UpstreamError(f"upstream body cut short: {_reason(exc)}") from exc
            resp.release_conn()
            finish()
            exchange.response_bytes = len(data)
            return ProxyResponse.relay([data], status, headers)
        return ProxyResponse.relay(UpstreamBody(resp, exchange, finish), status, headers)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # urllib3 prefixes "HTTPConnection(host=..., port=...): "; the caller names the target.
    if text.startswith(("HTTPConnection(", "HTTPSConnection(")) and "): " in text:
        text = text.split("): ", 1)[1]
    return text


def _connect_error(cause: BaseException, endpoint: Endpoint, service: str) -> UpstreamError:
    where = f"{service}: upstream {endpoint.address}:{endpoint.port}"
    target = endpoint.key
    if isinstance(cause, PeerIdentityError):
        return UpstreamIdentityError(
            f"{where} refused: {cause}",
            target=target,
            expected=cause.expected,
            presented=list(cause.presented),
        )
    if isinstance(cause, SSLError | ssl.SSLError | ssl.CertificateError):
        return UpstreamTlsError(f"{where}: TLS handshake failed: {_reason(cause)}", target=target)
    if isinstance(cause, ConnectTimeoutError) and not isinstance(cause, NewConnectionError):
        return UpstreamTimeout(f"{where}: connect timed out", target=target)
    return UpstreamUnreachable(f"{where} unreachable: {_reason(cause)}", target=target)
