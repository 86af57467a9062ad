"""Forward one request to one of its route's endpoints and stream the answer back."""

from __future__ import annotations

import logging
import random
import socket
import ssl
import struct
import time
import weakref
from collections.abc import Iterator, Mapping
from functools import partial
from time import monotonic
from types import MappingProxyType

from flask import Response  # Flask's own class: anything else is converted per request
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from .. import decision_log
from ..errors import (
    NoHealthyTarget,
    ServiceOverloaded,
    UpstreamError,
    UpstreamIdentityError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamUnreachable,
)
from ..mesh.identity import PeerIdentityError
from ..mesh.snapshot import Endpoint
from ..route_policy import RoutePolicy, ServicePolicy
from ..routing import Route
from .exchange import Exchange
from .headers import response_headers
from .outbound import CHUNK, OutboundBuilder
from .retry import Failure, RetryPolicy
from .transport import (
    ConnectFailed,
    HeadTimeout,
    InvalidResponse,
    StaleConnection,
    TransportError,
    open_response,
    relay_headers,
    release,
)

log = logging.getLogger("odin_gw.proxy")

# Retries after these failures draw on the route's retry budget: the upstream saw the
# request. A connect failure sent nothing; a stale keep-alive is routine.
BUDGETED = frozenset({Failure.RESET, Failure.TRY_TIMEOUT, Failure.STATUS})
# Answers that count as the endpoint failing, for circuit breakers (and 5xx ejection):
# Envoy's gateway errors.
GATEWAY_FAILURES = frozenset({502, 503, 504})
# Seconds between two "panic mode" warnings of one route.
PANIC_LOG_EVERY = 10.0
# Upstream bodies up to this size are read whole before the answer starts.
SMALL_BODY = 64 * 1024
NO_BODY_STATUS = frozenset({204, 304})


class ProxyResponse(Response):
    """A response that adds nothing of its own: no default content type, length as sent.

    Its headers are the upstream's, already parsed and checked by the transport, so they
    are handed over as they are instead of being re-validated one by one, and sent as
    they are instead of being copied and "fixed" for the environ (werkzeug's
    ``get_wsgi_headers``).
    """

    default_mimetype = None
    automatically_set_content_length = False

    @classmethod
    def relay(cls, body, status: int, header_list: list[tuple[str, str]]) -> ProxyResponse:
        response = cls(body, status=status)
        relay_headers(response.headers, header_list)
        return response

    def get_wsgi_headers(self, environ):
        return self.headers


class UpstreamBody:
    """Streams an upstream body to the client; gives the connection back on ``close``.

    A body read to its end returns the connection to the pool; one abandoned halfway
    (the client went away, the upstream stalled) closes it, because unread bytes would
    poison the next request. ``finish`` (the balancer's accounting) runs exactly once.
    """

    __slots__ = ("_finish", "_resp", "exchange")

    def __init__(self, resp, exchange: Exchange, finish) -> None:
        self._resp = resp
        self._finish = finish
        self.exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        exchange = self.exchange
        resp = self._resp
        try:
            if resp.chunked:  # one piece per chunk, as each arrives
                for chunk in resp.stream(CHUNK, decode_content=False):
                    exchange.response_bytes += len(chunk)
                    yield chunk
                return
            # Whatever has arrived, up to CHUNK: read(CHUNK) would wait for a full 64 KiB,
            # holding back a body that trickles (server-sent events, progress output).
            read1 = resp.read1
            while True:
                chunk = read1(CHUNK, decode_content=False)
                if not chunk:
                    return
                exchange.response_bytes += len(chunk)
                yield chunk
        except (ReadTimeoutError, ProtocolError, SSLError, OSError) as exc:
            # Headers are gone already: all we can do is cut the body short.
            exchange.error_kind = "body_interrupted"
            log.warning(
                "upstream %s body interrupted: %s (request %s)",
                exchange.target,
                _reason(exc),
                exchange.request_id,
            )
            raise

    def close(self) -> None:
        release(self._resp)
        finish = self._finish
        if finish is not None:
            self._finish = None
            finish()


class Forwarder:
    """Sends requests upstream through the session's adapter pools.

    ``gateway.candidates(route)`` gives a route's current endpoints; the gateway's mesh
    header injectors (see :mod:`odin_gw.mesh.headers`) decide what is stripped and added;
    the route's :class:`~.retry.RetryPolicy` decides which failures are tried again.
    ``policies`` (route name -> :class:`~odin_gw.route_policy.ServicePolicy`, swapped
    whole by :meth:`use_policies` when the mesh's policy changes) adds the mesh's
    per-route timeout and answer retries.
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
        self.policies: Mapping[str, ServicePolicy] = MappingProxyType(
            dict(getattr(gateway, "policies", None) or {})
        )
        self._panic_logged: dict[str, float] = {}  # route -> when panic was last logged
        # logging.level: debug explains every pick (decided once: the level is set when
        # the worker starts).
        self.explain = decision_log.enabled()

    def use_policies(self, policies: Mapping[str, ServicePolicy]) -> None:
        """Apply new compiled policies (only routes that have one); requests in flight
        keep the policy they matched."""
        self.policies = MappingProxyType(dict(policies))

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

    def forward(self, environ: dict, route: Route, exchange: Exchange, rule=None) -> Response:
        """Forward the request in ``environ`` along ``route`` (see :meth:`_forward`), within
        the service's cap on concurrent requests (``circuitBreaker.maxConcurrent``, held
        until the answer's last byte is sent); raises ``GatewayError``."""
        cap = self.gateway.concurrency if route.max_concurrent else None
        if cap is None:
            return self._forward(environ, route, exchange, rule)
        service = route.service
        if not cap.try_acquire(service):
            self.gateway.metrics.circuit_rejected.labels(service, "max_concurrent").inc()
            exchange.error_kind = ServiceOverloaded.code
            raise ServiceOverloaded(
                f"{service}: {route.max_concurrent} requests in flight already "
                "(circuitBreaker.maxConcurrent)",
                service=service,
            )
        try:
            response = self._forward(environ, route, exchange, rule)
        except BaseException:
            cap.release(service)
            raise
        response.call_on_close(partial(cap.release, service))
        return response

    def _forward(self, environ: dict, route: Route, exchange: Exchange, rule=None) -> Response:
        """Forward the request in ``environ`` along ``route``; raises ``GatewayError``.

        The route's timeout is one deadline for the answer head, shared by every attempt
        (Envoy's route timeout covers its retries the same way). A mesh route policy
        matched on the method and the upstream path may shorten it (the shorter wins),
        bound each attempt (``try_timeout``) and retry answers whose status it names,
        while the request body is replayable, its limit and its retry budget allow and
        time is left; the last answer is relayed when no retry is allowed.

        ``rule``: the traffic rule that chose ``route`` (a backend group's), whose path
        rewrite and request header edits apply (:mod:`odin_gw.traffic.rules`).
        """
        client_sock = environ.get("gunicorn.socket")
        if client_sock is not None:
            self._bound_client_io(client_sock)
        exchange.route = route.name
        out = self.outbound.build(environ, route, exchange, rule)
        method, url, headers = out.method, out.url, out.headers
        body, chunked, replayable = out.body, out.chunked, out.replayable
        timeout = route.timeout.read_timeout
        now = monotonic()
        policy: RetryPolicy | None = route.retry
        mesh: RoutePolicy | None = None  # the route policy: the mesh's over the config's
        if self.policies:
            service_policy = self.policies.get(route.name)
            if service_policy is not None:
                mesh = service_policy.match(method, url.partition("?")[0])
            if mesh is not None:
                if mesh.timeout is not None and mesh.timeout < timeout:
                    timeout = mesh.timeout
                if mesh.retryable:
                    policy = policy.with_route(mesh)
                if mesh.budget is not None:
                    mesh.budget.deposit(now)  # every request earns retryRatio
        deadline = now + timeout
        exchange.timeout = timeout

        gateway = self.gateway
        candidates = gateway.candidates(route)
        everyone = gateway.every_endpoint(route)
        session = gateway.session
        balancer = route.balancer
        health = route.health
        breakers = route.breakers
        available = route.available
        threshold = route.panic_threshold
        tried: list[str] = []
        error: UpstreamError | None = None
        endpoint: Endpoint | None = None
        ticket = 0  # the circuit breaker's admission of the current attempt (0: none)
        panicked = False
        fresh = False  # after a stale keep-alive: a new connection, not another pooled one
        again = False  # an answer retry may go back to an endpoint tried already
        # The request's trace when its spans are recorded: each attempt's end is noted.
        recorded = exchange.trace
        if recorded is not None and recorded.attempts is None:
            recorded = None
        explain = self.explain
        while True:
            if endpoint is None:
                pick = balancer.select(candidates, everyone, tried, available, threshold)
                endpoint = pick.endpoint
                if endpoint is None and again:
                    # Every endpoint tried (one sidecar: the same one, whose proxy
                    # balances again): any of them, as Linkerd's retries do.
                    pick = balancer.select(candidates, everyone, (), available, threshold)
                    endpoint = pick.endpoint
                if explain:
                    decision_log.explain(
                        route,
                        exchange.request_id,
                        exchange.retries + 1,
                        pick,
                        candidates,
                        everyone,
                        tried,
                    )
                if pick.panic and not panicked:
                    panicked = True
                    gateway.metrics.panic.labels(route.service).inc()
                    self._log_panic(route, len(everyone), exchange.request_id)
                if endpoint is None:
                    break
                if endpoint.key not in tried:
                    tried.append(endpoint.key)
                ticket = breakers.allow(endpoint.key) if breakers is not None else 0
                if breakers is not None and not ticket and not pick.panic:
                    # Its half-open probes are all taken: another endpoint, if any.
                    gateway.metrics.circuit_rejected.labels(route.service, "circuit_open").inc()
                    endpoint = None
                    continue
            exchange.target = endpoint.key
            exchange.datacenter = endpoint.datacenter
            exchange.peer_identity = endpoint.identity
            if not route.preserve_host:
                headers["Host"] = endpoint.host_header
            for inj in gateway.injectors:
                inj.upstream(exchange, endpoint, headers)
            attempt_deadline = deadline
            if mesh is not None and mesh.try_timeout is not None and not policy.last_answer:
                attempt_deadline = min(deadline, monotonic() + mesh.try_timeout)
            balancer.started(endpoint)
            try:
                resp = open_response(
                    session,
                    endpoint,
                    method,
                    url,
                    body,
                    headers,
                    chunked,
                    attempt_deadline,
                    timeout,
                    route.timeout.connect_timeout,
                    route.idle_timeout,
                    fresh,
                )
            except TransportError as exc:
                balancer.finished(endpoint)
                failure = exc.failure
                if recorded is not None:
                    recorded.attempt_ended(0, failure.value)
                if ticket:
                    if failure is Failure.STALE:  # the endpoint never saw it
                        breakers.release(endpoint.key, ticket)
                    else:
                        breakers.record(endpoint.key, False, ticket)
                    ticket = 0
                if (
                    failure is Failure.TIMEOUT
                    and attempt_deadline < deadline
                    and monotonic() < deadline
                ):
                    failure = Failure.TRY_TIMEOUT  # the attempt's own bound, not the route's
                error = upstream_error(exc, endpoint, route, timeout, mesh, failure)
                if failure is Failure.CONNECT:
                    health.failed(endpoint.key)
                policy = policy.after(failure, method, replayable)
                if policy is not None and failure in BUDGETED and not _spend(mesh, monotonic()):
                    # The budget is asked last: a refusal spends nothing.
                    log.info(
                        "%s: retry budget exhausted, no retry after %s (request %s)",
                        route.name,
                        failure.value,
                        exchange.request_id,
                    )
                    policy = None
                    gateway.metrics.retry_budget_exhausted.labels(route.service).inc()
                if policy is None or failure is not Failure.STALE:
                    # A stale keep-alive retried is routine, not an upstream error.
                    exchange.error_kind = error.code
                log.warning(
                    "%s (request %s%s)",
                    error.message,
                    exchange.request_id,
                    "; retrying" if policy is not None else "",
                )
                if policy is None:
                    raise error from exc
                exchange.retries += 1
                gateway.metrics.retries.labels(route.service, failure.value).inc()
                fresh = policy.same_endpoint(failure)
                if not fresh:
                    endpoint = None
                if failure is Failure.TRY_TIMEOUT:
                    again = True
                if failure in BUDGETED:  # another endpoint after a refused connect: at once
                    _back_off(mesh, exchange.retries, deadline)
                continue
            except BaseException as exc:
                balancer.finished(endpoint)
                if ticket:
                    breakers.release(endpoint.key, ticket)
                exchange.error_kind = getattr(exc, "code", None) or "internal_error"
                raise
            status = resp.status
            if recorded is not None:
                recorded.attempt_ended(status)
            health.answered(endpoint.key, status)
            if ticket:
                breakers.record(endpoint.key, status not in GATEWAY_FAILURES, ticket)
                ticket = 0
            if policy.statuses and policy.retries_status(resp.status):
                retry = policy.after(Failure.STATUS, method, replayable)
                if retry is not None and monotonic() < deadline and _spend(mesh, monotonic()):
                    gateway.metrics.retries.labels(route.service, "status").inc()
                    log.info(
                        "%s: upstream %s answered %d; retrying (%s; request %s)",
                        route.name,
                        endpoint.key,
                        resp.status,
                        mesh.source if mesh is not None else "retry policy",
                        exchange.request_id,
                    )
                    _discard(resp, method)
                    balancer.finished(endpoint)
                    exchange.retries += 1
                    policy, endpoint, fresh, again = retry, None, False, True
                    _back_off(mesh, exchange.retries, deadline)
                    continue
            finish = _Finish(balancer, endpoint)
            try:
                return self._respond(resp, method, exchange, finish)
            except BaseException:
                release(resp)  # both idempotent: whatever _respond did already stands
                finish()
                raise
        if error is not None:
            raise error
        exchange.error_kind = NoHealthyTarget.code
        raise NoHealthyTarget(f"{route.name}: no healthy target", service=route.name)

    def _log_panic(self, route: Route, total: int, request_id: str) -> None:
        """One warning per route every PANIC_LOG_EVERY seconds while it is in panic mode
        (the metric counts every request): an outage must not flood the log."""
        now = monotonic()
        if now - self._panic_logged.get(route.name, -PANIC_LOG_EVERY) < PANIC_LOG_EVERY:
            return
        self._panic_logged[route.name] = now
        log.warning(
            "%s: panic mode, too few healthy endpoints; balancing over all %d (request %s)",
            route.name,
            total,
            request_id,
        )

    @staticmethod
    def _respond(resp, method: str, exchange: Exchange, finish) -> Response:
        status = resp.status
        exchange.status = status
        upstream = resp.headers
        if "X-Request-Id" in upstream:
            upstream.discard("X-Request-Id")  # the gateway's request id is the one relayed
        headers = response_headers(upstream.iteritems())
        headers.append(("X-Request-Id", exchange.request_id))
        if method == "HEAD" or status in NO_BODY_STATUS:
            try:
                resp.read(decode_content=False)  # no I/O: marks the answer complete
            finally:
                release(resp)
                finish()
            return ProxyResponse.relay((), status, headers)
        length = resp.length_remaining
        if length is not None and length <= SMALL_BODY:
            try:
                data = resp.read(decode_content=False)
            except (ReadTimeoutError, ProtocolError, SSLError, OSError) as exc:
                timed_out = isinstance(exc, ReadTimeoutError)
                exchange.error_kind = UpstreamTimeout.code if timed_out else "body_interrupted"
                target = exchange.target
                if timed_out:
                    error: UpstreamError = UpstreamTimeout(
                        f"upstream {target} went silent sending its body", target=target
                    )
                else:
                    error = UpstreamError(
                        f"upstream {target} body cut short: {_reason(exc)}", target=target
                    )
                log.warning("%s (request %s)", error.message, exchange.request_id)
                raise error from exc
            finally:
                release(resp)
                finish()
            exchange.response_bytes = len(data)
            return ProxyResponse.relay([data], status, headers)
        return ProxyResponse.relay(UpstreamBody(resp, exchange, finish), status, headers)


def _spend(mesh: RoutePolicy | None, now: float) -> bool:
    """Whether the route's retry budget allows one more retry (spending it if so)."""
    budget = mesh.budget if mesh is not None else None
    return budget is None or budget.withdraw(now)


def _back_off(mesh: RoutePolicy | None, retries: int, deadline: float) -> None:
    """Wait before an answer retry when the policy says so (Linkerd's annotation retries:
    exponential from 25 ms, capped at 250 ms, full jitter), never past the deadline."""
    if mesh is None or mesh.backoff is None:
        return
    first, cap = mesh.backoff
    base = min(cap, first * 2 ** min(retries - 1, 16))
    pause = min(cap, base + random.random() * base, deadline - monotonic())
    if pause > 0:
        time.sleep(pause)


def _discard(resp, method: str) -> None:
    """Drop an answer that is retried: a small body of known length is read, so its
    connection goes back to the pool; any other is left unread and ``release`` closes
    the connection (unread bytes would poison the next request)."""
    try:
        length = resp.length_remaining
        if (
            method == "HEAD"
            or resp.status in NO_BODY_STATUS
            or (length is not None and length <= SMALL_BODY)
        ):
            resp.read(decode_content=False)
    except (ReadTimeoutError, ProtocolError, SSLError, OSError):
        pass  # incomplete: release() closes the connection
    finally:
        release(resp)


class _Finish:
    """Ends one attempt's balancer accounting (``least-request`` in-flight counts) once,
    however many release paths call it."""

    __slots__ = ("balancer", "endpoint")

    def __init__(self, balancer, endpoint: Endpoint) -> None:
        self.balancer = balancer
        self.endpoint: Endpoint | None = endpoint

    def __call__(self) -> None:
        endpoint = self.endpoint
        if endpoint is not None:
            self.endpoint = None
            self.balancer.finished(endpoint)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # urllib3 prefixes "HTTPConnection(host=..., port=...): "; the caller names the target.
    if text.startswith(("HTTPConnection(", "HTTPSConnection(")) and "): " in text:
        text = text.split("): ", 1)[1]
    return text


def upstream_error(
    exc: TransportError,
    endpoint: Endpoint,
    route: Route,
    timeout: float | None = None,
    mesh: RoutePolicy | None = None,
    failure: Failure | None = None,
) -> UpstreamError:
    """The gateway error for a failed attempt (the one raised if it is not retried).

    ``timeout`` is the deadline the request had (the route's, or a shorter one from
    ``mesh``, the route policy, whose source a timeout message names)."""
    target = endpoint.key
    where = f"{route.name}: upstream {endpoint.address}:{endpoint.port}"
    cause = exc.__cause__ or exc
    if isinstance(exc, ConnectFailed):
        if isinstance(cause, PeerIdentityError):
            return UpstreamIdentityError(
                f"{where} refused: {cause}",
                target=target,
                expected=cause.expected,
                presented=list(cause.presented),
            )
        if isinstance(cause, SSLError | ssl.SSLError | ssl.CertificateError):
            return UpstreamTlsError(
                f"{where}: TLS handshake failed: {_reason(cause)}", target=target
            )
        if isinstance(cause, ConnectTimeoutError) and not isinstance(cause, NewConnectionError):
            return UpstreamTimeout(f"{where}: connect timed out", target=target)
        return UpstreamUnreachable(f"{where} unreachable: {_reason(cause)}", target=target)
    if isinstance(exc, HeadTimeout):
        if failure is Failure.TRY_TIMEOUT and mesh is not None and mesh.try_timeout:
            return UpstreamTimeout(
                f"{where} did not answer within the per-try timeout "
                f"{mesh.try_timeout:g}s ({mesh.source})",
                target=target,
            )
        limit = route.timeout.read_timeout if timeout is None else timeout
        why = ""
        if mesh is not None and mesh.timeout is not None and mesh.timeout <= limit:
            why = f" ({mesh.source})"
        return UpstreamTimeout(f"{where} did not answer within {limit:g}s{why}", target=target)
    if isinstance(exc, InvalidResponse):
        return UpstreamProtocolError(f"{where} sent an invalid answer: {exc}", target=target)
    if isinstance(exc, StaleConnection):
        return UpstreamError(f"{where} closed the connection before answering", target=target)
    return UpstreamError(f"{where} failed mid-request: {_reason(cause)}", target=target)
