"""The upstream request built from the client's: target, headers and body.

Everything the client controls is judged here, before any endpoint is chosen: which
headers travel, which the gateway owns, how the body is framed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from ..errors import BadRequest, ClientDisconnected, UnsupportedTransferEncoding
from ..routing import Route
from .exchange import Exchange
from .headers import UNTRUSTED_ONLY, OutboundHeaders, upstream_headers

CHUNK = 64 * 1024
# Bodies up to this size are read whole: cheaper than streaming, and replayable on retry.
SMALL_BODY = 64 * 1024


@dataclass(slots=True)
class Outbound:
    """One request as it will be sent upstream (``Host`` is set per endpoint).

    ``headers`` is case-insensitive: whoever sets a name later (service headers, mesh
    injectors, ``Host``) replaces the client's copy whatever its spelling.
    """

    method: str
    url: str
    headers: OutboundHeaders
    body: object
    chunked: bool
    replayable: bool


class OutboundBuilder:
    """Builds :class:`Outbound` requests; ``strip``/``strip_prefixes`` are environ keys
    of client headers that must never reach a backend (the mesh injectors name them)."""

    def __init__(self, strip: frozenset[str], strip_prefixes: tuple[str, ...]) -> None:
        self.strip = strip
        # Forwarding headers only a trusted proxy may send are dropped from anyone else.
        self.strip_untrusted = strip | UNTRUSTED_ONLY
        self.strip_prefixes = strip_prefixes

    def build(self, environ: dict, route: Route, exchange: Exchange, rule=None) -> Outbound:
        """The upstream request for ``environ`` on ``route``; ``rule`` (a matched traffic
        rule, or ``None``) rewrites the path prefix (instead of ``stripBasePath``) and
        edits headers after the service's own ``headers`` and before the mesh's and the
        request id, so a rule can never overwrite those."""
        forwarding = exchange.forwarding
        strip = self.strip if forwarding is not None else self.strip_untrusted
        headers = upstream_headers(environ, strip, self.strip_prefixes)
        body, chunked, replayable = _body(environ, headers, route.buffer_body)
        _forwarded(environ, route, headers, exchange)
        for name, value in route.headers:
            headers[name] = value
        if rule is not None:
            rule.apply_request(headers)
        for name, value in exchange.mesh_headers:
            headers[name] = value
        headers["X-Request-Id"] = exchange.request_id
        raw = environ.get("odin.raw_path") or raw_path(environ)  # the blueprint's, if any
        url = (rule.try_rewrite(raw) if rule is not None else None) or route.upstream_path(raw)
        query = environ.get("QUERY_STRING")
        if query:
            url = f"{url}?{query}"
        return Outbound(environ["REQUEST_METHOD"], url, headers, body, chunked, replayable)


def _body(environ: dict, headers: OutboundHeaders, buffer_limit: int = SMALL_BODY):
    """(body, chunked, replayable) for the upstream request.

    A body with a ``Content-Length`` of at most ``buffer_limit`` (the service's
    ``retryPolicy.bufferBody``, 64 KiB by default) is read whole: a retry can send it
    again. Larger ones and chunked ones stream through and are never replayed (a chunked
    body's end is unknown until it arrives; holding it back would stall a stream)."""
    stream = environ["wsgi.input"]
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    if coding is not None:
        # nginx answers 501 to any Transfer-Encoding but exactly "chunked" (any case):
        # a stacked coding ("gzip, chunked") would reach the backend decoded by one layer
        # and labelled by none. gunicorn itself refuses "identity" alone and a repeated
        # "chunked" (400) and unknown codings (501) before the app runs.
        if coding.strip().lower() != "chunked":
            raise UnsupportedTransferEncoding(
                f"Transfer-Encoding {coding!r} is not supported; only chunked is"
            )
        return _until_eof(stream), True, False
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {length!r}") from None
        if size < 0:
            raise BadRequest(f"invalid Content-Length {length!r}")
        headers["Content-Length"] = length
        if size <= buffer_limit:
            data = _read(stream, size)
            if len(data) != size:
                raise ClientDisconnected(
                    f"client sent {len(data)} of {size} body bytes and went away"
                )
            return data, False, True
        return _fixed_length(stream, size), False, False
    return None, False, True


def _forwarded(environ: dict, route: Route, headers: OutboundHeaders, exchange: Exchange) -> None:
    """The gateway's own forwarding headers (the client's copies were dropped).

    From an untrusted peer: ``X-Forwarded-For`` is the peer alone, scheme and host are the
    connection's. From a trusted proxy (``exchange.forwarding``): the peer is appended to
    its ``X-Forwarded-For`` and its scheme and host are believed.
    """
    host = environ.get("HTTP_HOST")
    forwarding = exchange.forwarding
    if forwarding is None:
        headers["X-Forwarded-For"] = exchange.client_addr
        headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
        forwarded_host = host
    else:
        headers["X-Forwarded-For"] = forwarding.x_forwarded_for
        headers["X-Forwarded-Proto"] = forwarding.proto or environ.get("wsgi.url_scheme", "http")
        forwarded_host = forwarding.host or host
    headers["X-Real-IP"] = exchange.client_addr
    if forwarded_host:
        headers["X-Forwarded-Host"] = forwarded_host
    if host and route.preserve_host:
        headers["Host"] = host
    if route.strip_base_path and route.base_path != "/":
        headers["X-Forwarded-Prefix"] = route.base_path


def raw_path(environ: dict) -> str:
    """The request target's path exactly as received (percent-encoding kept, no query).

    The blueprint routes on this path (decoded) and the upstream request carries it, so
    routing and forwarding can never disagree about which path was asked for.
    """
    raw = environ.get("RAW_URI")
    if raw:
        if raw[0] != "/":  # absolute-form request target: keep the path only
            rest = raw.split("://", 1)[-1]
            slash = rest.find("/")
            raw = rest[slash:] if slash >= 0 else "/"
        query = raw.find("?")
        return raw if query < 0 else raw[:query]
    return quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/"))


def _read(stream, size: int) -> bytes:
    try:
        return stream.read(size)
    except (OSError, ValueError) as exc:
        raise ClientDisconnected(f"reading the request body failed: {exc}") from exc
    except Exception as exc:  # gunicorn's NoMoreData / ChunkMissingTerminator etc.
        raise ClientDisconnected(f"reading the request body failed: {exc!r}") from exc


def _fixed_length(stream, size: int) -> Iterator[bytes]:
    left = size
    while left:
        chunk = _read(stream, min(CHUNK, left))
        if not chunk:
            raise ClientDisconnected(f"client went away with {left} of {size} body bytes unsent")
        left -= len(chunk)
        yield chunk


def _until_eof(stream) -> Iterator[bytes]:
    while True:
        chunk = _read(stream, CHUNK)
        if not chunk:
            return
        yield chunk
