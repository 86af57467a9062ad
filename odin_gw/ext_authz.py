"""Istio's ``enablePolicyCheck`` as it is done today: Envoy's ext_authz check over HTTP.

Mixer's policy check was removed in Istio 1.8. Its successor is an AuthorizationPolicy
with ``action: CUSTOM`` whose extension provider (``envoyExtAuthzHttp``) makes the proxy
ask an external authorizer before each request. :class:`ExtAuthz` is that check, done the
way Envoy's ext_authz HTTP filter does it (``ext_authz_http_impl.cc`` and
``ext_authz.proto``; the differences are marked "Envoy:" below):

* The check request carries the client's **method** and **path** (the authorizer
  address's path prefix + the request target as received, query included), its
  **Host**, ``Content-Length: 0`` and no body. Envoy: only Host, Method, Path,
  Content-Length and Authorization unless ``allowed_headers`` (Istio
  ``includeRequestHeadersInCheck``) lists more. Our config has no such list, so every
  end-to-end client header goes (Cookie included: oauth2-proxy style authorizers need
  it), minus the hop-by-hop ones and the mesh headers a client may not set; the
  gateway's own ``X-Forwarded-For``/``-Proto``, ``X-Real-IP`` and ``X-Request-Id`` replace
  the client's, as Envoy's connection manager has set them before any filter runs, and
  ``X-Envoy-Expected-Rq-Timeout-Ms`` gives the authorizer its budget, as Envoy's router
  does. The request is built from the client's environ alone, so nothing the gateway
  adds for the upstream (a service's configured API key, the Consul ACL token) can
  reach the authorizer; the client's own ``Authorization`` does (that is the point).
* **200** allows. The authorizer's response headers are set on the upstream request,
  replacing the client's copies (Envoy: none unless ``allowed_upstream_headers``, Istio
  ``headersToUpstreamOnAllow``); left out are hop-by-hop headers, ones that describe the
  authorizer's own answer (``Content-*``, Date, Server, caching and cookie headers) and
  the ones the gateway owns (Host, forwarding headers, request id, mesh headers). A
  service's configured ``headers`` win over the authorizer's, as Envoy's route
  ``request_headers_to_add`` runs after ext_authz. ``x-envoy-auth-headers-to-remove``
  names client headers to drop from the upstream request (never Host nor hop-by-hop).
* **Any other status from 201 to 499** denies (a 201 or 302 too, as in Envoy): the
  client gets the authorizer's status, body (up to 64 KiB) and headers (Envoy's
  default: all but Host; we also drop hop-by-hop headers and Content-Length, Date,
  Server and X-Request-Id, which the gateway sets itself).
* **5xx, a 1xx as final status, no answer, or slower than** ``authzTimeout`` is an
  error: ``403`` with the gateway's JSON error (Envoy: ``status_on_error``, empty body),
  unless ``authzFailOpen`` (Envoy ``failure_mode_allow``), when the request goes on
  unchecked. A state change (failing / answering again) is logged once; each error is
  counted. A denial is never turned into an allow, even when its body cannot be read.
  No retries (Envoy makes none), except once for a connection that closed before any
  answer: the authorizer closing an idle keep-alive connection as we reused it.

Counters use Envoy's stat names (``ok``, ``denied``, ``error``,
``failure_mode_allowed``); see :meth:`ExtAuthz.counters`. Only proxied requests with a
route are checked (Envoy skips ext_authz when no route matched); ``/health``, ``/ready``,
the metrics path and ``/admin`` are the gateway's own views and never come here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from time import monotonic
from urllib.parse import urlsplit

from flask import Response
from urllib3 import HTTPResponse, Timeout
from urllib3.connectionpool import HTTPConnectionPool, connection_from_url
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import SKIP_HEADER

from .accesslog import escape
from .errors import GatewayError
from .proxy.exchange import Exchange
from .proxy.headers import (
    HOP_BY_HOP,
    UNTRUSTED_ONLY,
    OutboundHeaders,
    env_key,
    header_name,
    upstream_headers,
)
from .proxy.outbound import OutboundBuilder, raw_path
from .routing import Route

log = logging.getLogger("odin_gw.ext_authz")

#: An authorizer body larger than this is not relayed (Envoy buffers it whole too).
MAX_BODY = 64 * 1024
_CHUNK = 16 * 1024

#: Envoy's answer header naming client headers to drop from the upstream request.
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"

# Set by the gateway on the upstream request (proxy/outbound.py), so never by the
# authorizer: forwarding facts, the request id, the routing host.
_GATEWAY_OWNED = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-request-id",
    }
) | frozenset(header_name(k).lower() for k in UNTRUSTED_ONLY)

# Headers about the authorizer's own answer: meaningless on the upstream request.
_ANSWER_ONLY = frozenset(
    {
        "date",
        "server",
        "set-cookie",
        "etag",
        "last-modified",
        "expires",
        "age",
        "vary",
        "cache-control",
        "accept-ranges",
        "location",
        "retry-after",
        "www-authenticate",
        "allow",
    }
)

NOT_UPSTREAM = HOP_BY_HOP | _GATEWAY_OWNED | _ANSWER_ONLY | {HEADERS_TO_REMOVE}
NOT_TO_CLIENT = HOP_BY_HOP | {
    "host",
    "content-length",
    "date",
    "server",
    "x-request-id",
    HEADERS_TO_REMOVE,
}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class PolicyCheckFailed(GatewayError):
    """The authorizer could not be asked, failed (5xx) or did not answer in time."""

    status = 403
    code = "policy_check_failed"


class _NoAnswer(Exception):
    """No usable answer from the authorizer; ``reason`` is safe to log (no URL, no secret)."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry  # the connection closed before any answer: worth one more try


class DeniedResponse(Response):
    """The authorizer's denial as the client gets it: no content type of our own."""

    default_mimetype = None


class ExtAuthz:
    """The ext_authz HTTP check for one gateway process; built once by the gateway.

    ``check`` runs on the hot path: one keep-alive connection per worker thread from a
    bounded urllib3 pool, every rule precomputed here. Thread-safe.
    """

    def __init__(
        self,
        addr: str,
        timeout: float,
        fail_open: bool,
        outbound: OutboundBuilder,
        pool_size: int,
    ) -> None:
        parts = urlsplit(addr)
        # Envoy concatenates path_prefix and the client's path; a trailing "/" would double.
        self.path_prefix = parts.path.rstrip("/")
        # Logged instead of ``addr``: user info in the URL must never reach a log line.
        self.where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self.timeout = timeout
        self.fail_open = fail_open
        self._strip = outbound.strip
        self._strip_untrusted = outbound.strip_untrusted
        self._strip_prefixes = outbound.strip_prefixes
        # Mesh headers a client may not send may not come from the authorizer either.
        self._mesh_owned = frozenset(header_name(k).lower() for k in outbound.strip)
        self._mesh_prefixes = tuple(header_name(p).lower() for p in outbound.strip_prefixes)
        self._timeout_ms = str(max(1, round(timeout * 1000)))
        # One connection per worker thread, kept alive; never blocks (block=False: a
        # thread finding none idle opens one, and at most pool_size are kept). No retries
        # or redirects by urllib3: a check is asked once (see _ask for the one exception).
        self.pool: HTTPConnectionPool = connection_from_url(
            self.where,
            maxsize=pool_size,
            block=False,
            retries=False,
            timeout=Timeout(total=timeout),
        )
        self._lock = threading.Lock()  # guards _stats and _failing
        self._stats = {"ok": 0, "denied": 0, "error": 0, "failure_mode_allowed": 0}
        self._failing = False

    @classmethod
    def from_config(cls, config, outbound: OutboundBuilder, pool_size: int) -> ExtAuthz | None:
        """The check for ``config``, or ``None`` unless the mesh is Istio with
        ``enablePolicyCheck`` (the schema has already required ``authzAddr`` then)."""
        mesh = config.service_mesh
        istio = mesh.istio
        if mesh.kind != "istio" or not istio.enable_policy_check or not istio.authz_addr:
            return None
        check = cls(
            istio.authz_addr, istio.authz_timeout, istio.authz_fail_open, outbound, pool_size
        )
        log.info(
            "ext_authz: every proxied request is checked with %s (timeout %.3gs, fail %s)",
            check.where,
            check.timeout,
            "open" if check.fail_open else "closed",
        )
        return check

    def close(self) -> None:
        self.pool.close()

    # -- the check -----------------------------------------------------------------------
    def check(self, environ: dict, route: Route, exchange: Exchange) -> Response | None:
        """Ask the authorizer about the request in ``environ``.

        Returns ``None`` when it may go upstream (its additions are then in
        ``exchange.mesh_headers`` and removals applied to ``environ``), or the denial to
        send the client. Raises :class:`PolicyCheckFailed` when the authorizer cannot
        decide and ``authzFailOpen`` is off.
        """
        deadline = monotonic() + self.timeout
        method = environ["REQUEST_METHOD"]
        headers = self.check_headers(environ, exchange)
        target = check_target(self.path_prefix, environ)
        try:
            resp = self._ask(method, target, headers, deadline)
        except _NoAnswer as exc:
            return self._failed(exc.reason, exchange)
        status = resp.status
        items = list(resp.headers.items())
        if status == 200:
            _drain(resp, deadline)  # the decision stands whatever its body does
            self._answered("ok")
            self.allow(items, route, environ, exchange)
            return None
        if status < 200:
            # A final answer must be 2xx-5xx; what follows an interim one is unread,
            # so this connection can never be reused.
            _discard(resp)
            return self._failed(f"answered {status} as its final status", exchange)
        if status >= 500:  # Envoy: a 5xx is an error, not a denial
            _drain(resp, deadline)
            return self._failed(f"answered {status}", exchange)
        self._answered("denied")
        try:
            body = _read_body(resp, deadline)
        except _NoAnswer as exc:
            # The authorizer said no: never forwarded, even with authzFailOpen.
            log.warning(
                "ext_authz: denial %d from %s not relayed: %s (request %s)",
                status,
                self.where,
                exc.reason,
                exchange.request_id,
            )
            raise PolicyCheckFailed("request denied by policy") from None
        log.info(
            "ext_authz: %s %s denied with %d (request %s)",
            escape(method),
            escape(exchange.path),
            status,
            exchange.request_id,
        )
        return denied_response(status, items, body)

    def check_headers(self, environ: dict, exchange: Exchange) -> OutboundHeaders:
        """The check request's headers (see the module docstring for what and why)."""
        trusted = exchange.forwarding
        strip = self._strip if trusted is not None else self._strip_untrusted
        headers = upstream_headers(environ, strip, self._strip_prefixes)
        headers.pop("Expect", None)  # the check has no body to wait for
        headers["Host"] = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
        scheme = environ.get("wsgi.url_scheme", "http")
        if trusted is None:
            headers["X-Forwarded-For"] = exchange.client_addr
            headers["X-Forwarded-Proto"] = scheme
        else:
            headers["X-Forwarded-For"] = trusted.x_forwarded_for
            headers["X-Forwarded-Proto"] = trusted.proto or scheme
        headers["X-Real-IP"] = exchange.client_addr
        headers["X-Request-Id"] = exchange.request_id
        headers["X-Envoy-Expected-Rq-Timeout-Ms"] = self._timeout_ms
        headers["Content-Length"] = "0"
        # urllib3 adds its own User-Agent and Accept-Encoding when a request has none:
        # the authorizer sees the client's headers only.
        if "User-Agent" not in headers:
            headers["User-Agent"] = SKIP_HEADER
        if "Accept-Encoding" not in headers:
            headers["Accept-Encoding"] = SKIP_HEADER
        return headers

    def allow(self, items, route: Route, environ: dict, exchange: Exchange) -> None:
        """Apply an allowing answer's headers to the upstream request."""
        removed = headers_to_remove(items)
        for name in removed:
            environ.pop(env_key(name), None)
        additions = upstream_additions(items, self._mesh_owned, self._mesh_prefixes)
        if not additions:
            return
        configured = {name.lower() for name, _ in route.headers}
        exchange.mesh_headers.extend(
            (name, value)
            for name, value in additions
            if name.lower() not in configured and name.lower() not in removed
        )

    # -- asking --------------------------------------------------------------------------
    def _ask(self, method: str, target: str, headers, deadline: float) -> HTTPResponse:
        """The authorizer's answer head (body unread), or :class:`_NoAnswer`.

        One retry, only when a connection closed before any byte of an answer and time
        is left: that is a keep-alive connection the authorizer closed as we reused it,
        not a decision. A check has no body and no side effect, so asking again is safe.
        """
        for attempt in (1, 2):
            left = deadline - monotonic()
            if left <= 0:
                raise _NoAnswer(f"no answer within {self.timeout:g}s")
            try:
                return self.pool.urlopen(
                    method,
                    target,
                    headers=headers,
                    body=None,
                    retries=False,
                    redirect=False,
                    assert_same_host=False,
                    timeout=Timeout(total=left),
                    preload_content=False,
                    decode_content=False,
                )
            except (HTTPError, OSError) as exc:
                failure = _reason(exc, self.timeout)
                if not failure.retry or attempt == 2:
                    raise failure from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- outcomes ------------------------------------------------------------------------
    def _answered(self, stat: str) -> None:
        with self._lock:
            self._stats[stat] += 1
            recovered = self._failing
            self._failing = False
        if recovered:
            log.warning("ext_authz: %s answers again; requests are checked", self.where)

    def _failed(self, reason: str, exchange: Exchange) -> None:
        with self._lock:
            self._stats["error"] += 1
            if self.fail_open:
                self._stats["failure_mode_allowed"] += 1
            started = not self._failing
            self._failing = True
        if started:
            log.warning(
                "ext_authz: %s %s; %s until it answers again",
                self.where,
                reason,
                "requests go upstream unchecked (authzFailOpen)"
                if self.fail_open
                else "requests are refused with 403",
            )
        else:
            log.debug("ext_authz: %s %s (request %s)", self.where, reason, exchange.request_id)
        if self.fail_open:
            return None
        raise PolicyCheckFailed("policy check failed: the authorizer gave no decision")

    @property
    def failing(self) -> bool:
        """Whether the last check found the authorizer unable to decide."""
        return self._failing

    def counters(self) -> dict[str, int]:
        """Checks by outcome since start, with Envoy's ext_authz stat names."""
        with self._lock:
            return dict(self._stats)


# -- pure rules (unit-tested on their own) ---------------------------------------------------


def check_target(prefix: str, environ: dict) -> str:
    """``prefix`` + the request target as received (query included), made safe for
    urllib3.

    urllib3 re-encodes a target, and when any ``%`` in it is not a valid escape it
    escapes *every* ``%`` (``/%61dmin%zz`` becomes ``/%2561dmin%25zz``): the authorizer
    would judge another path than the upstream gets. Escaping the stray ``%`` (and any
    non-ASCII byte) first leaves urllib3 nothing to change but the case of hex digits,
    so the target decodes to the same path the gateway routes on.
    """
    raw = environ.get("odin.raw_path") or raw_path(environ)
    query = environ.get("QUERY_STRING")
    target = prefix + raw + ("?" + query if query else "")
    if "%" in target:
        target = _STRAY_PERCENT.sub("%25", target)
    if not target.isascii():
        # WSGI strings carry bytes as latin-1: escape each byte as it was sent.
        try:
            sent = target.encode("latin-1")
        except UnicodeEncodeError:  # not from a WSGI server; UTF-8 is the URI default
            sent = target.encode("utf-8", "surrogateescape")
        target = "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in sent)
    return target


def headers_to_remove(items) -> frozenset[str]:
    """Lower-case names in ``x-envoy-auth-headers-to-remove``, never Host nor hop-by-hop
    (Envoy refuses pseudo-headers and Host the same way)."""
    names: set[str] = set()
    for name, value in items:
        if name.lower() == HEADERS_TO_REMOVE:
            names.update(n.strip().lower() for n in value.split(","))
    names -= HOP_BY_HOP | {"host", ""}
    return frozenset(n for n in names if _TOKEN.match(n))


def upstream_additions(
    items, mesh_owned: frozenset[str] = frozenset(), mesh_prefixes: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """The allowing answer's headers to set upstream, repeats joined with ``", "``."""
    named = _connection_named(items)
    kept: dict[str, tuple[str, str]] = {}
    for name, value in items:
        lower = name.lower()
        if (
            lower in NOT_UPSTREAM
            or lower in named
            or lower.startswith("content-")
            or lower in mesh_owned
            or (mesh_prefixes and lower.startswith(mesh_prefixes))
            or not _valid(name, value)
        ):
            continue
        seen = kept.get(lower)
        kept[lower] = (name, value) if seen is None else (seen[0], f"{seen[1]}, {value}")
    return list(kept.values())


def client_headers(items) -> list[tuple[str, str]]:
    """The denying answer's headers the client gets (repeats such as Set-Cookie kept)."""
    named = _connection_named(items)
    return [
        (name, value)
        for name, value in items
        if name.lower() not in NOT_TO_CLIENT and name.lower() not in named and _valid(name, value)
    ]


def denied_response(status: int, items, body: bytes) -> DeniedResponse:
    """The client's answer to a denied request: the authorizer's status, headers, body."""
    if status in (204, 304):
        body = b""
    response = DeniedResponse(body, status=status)
    for name, value in client_headers(items):
        response.headers.add(name, value)
    return response


def _connection_named(items) -> frozenset[str]:
    return frozenset(
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    )


def _valid(name: str, value: str) -> bool:
    # What gunicorn and http.client would refuse later, when it is too late to skip it.
    return _TOKEN.match(name) is not None and _CONTROL.search(value) is None


def _read_body(resp: HTTPResponse, deadline: float) -> bytes:
    """The answer body, read under the deadline and :data:`MAX_BODY`, or :class:`_NoAnswer`.

    The connection goes back to the pool only when the body was read to its end: unread
    bytes would be taken for the next check's answer.
    """
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            if monotonic() > deadline:
                raise _NoAnswer("answer body not complete in time")
            try:
                chunk = resp.read1(_CHUNK, decode_content=False)
            except (HTTPError, OSError):
                raise _NoAnswer("answer body cut short") from None
            if not chunk:
                resp.release_conn()
                return b"".join(parts)
            size += len(chunk)
            if size > MAX_BODY:
                raise _NoAnswer(f"answer body over {MAX_BODY} bytes")
            parts.append(chunk)
    except _NoAnswer:
        _discard(resp)
        raise


def _drain(resp: HTTPResponse, deadline: float) -> None:
    """Read and drop an answer's body so its connection can serve the next check."""
    with contextlib.suppress(_NoAnswer):
        _read_body(resp, deadline)


def _discard(resp: HTTPResponse) -> None:
    """Close the answer's connection (the pool opens a new one when next needed)."""
    resp.close()
    resp.release_conn()


def _reason(exc: BaseException, timeout: float) -> _NoAnswer:
    """What went wrong, in words safe to log: urllib3's messages name the URL."""
    if isinstance(exc, NewConnectionError):
        return _NoAnswer("is unreachable (connection refused or no route)")
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
        return _NoAnswer(f"gave no answer within {timeout:g}s")
    if isinstance(exc, SSLError):
        return _NoAnswer("failed the TLS handshake")
    if isinstance(exc, ProtocolError):
        # ("Connection aborted.", cause): closed or reset before an answer head arrived
        # (RemoteDisconnected is a ConnectionError), or a head that is not HTTP.
        cause = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(cause, ConnectionError):
            return _NoAnswer("closed the connection without an answer", retry=True)
        return _NoAnswer("sent an answer that is not HTTP")
    return _NoAnswer(f"could not be asked ({type(exc).__name__})")
