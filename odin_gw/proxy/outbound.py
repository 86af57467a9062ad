"""The upstream request built from the client's: target, headers and body.

Everything the client controls is judged here, before any endpoint is chosen: which
headers travel, which the gateway owns, how the body is framed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from ..errors import BadRequest, ClientDisconnected
from ..routing import Route
from .exchange import Exchange
from .headers import upstream_headers

CHUNK = 64 * 1024
# Bodies up to this size are read whole: cheaper than streaming, and replayable on retry.
SMALL_BODY = 64 * 1024


@dataclass(slots=True)
class Outbound:
    """One request as it will be sent upstream (``Host`` is set per endpoint)."""

    method: str
    url: str
    headers: dict[str, str]
    body: object
    chunked: bool
    replayable: bool


class OutboundBuilder:
    """Builds :class:`Outbound` requests; ``strip``/``strip_prefixes`` are environ keys
    of client headers that must never reach a backend (the mesh injectors name them)."""

    def __init__(self, strip: frozenset[str], strip_prefixes: tuple[str, ...]) -> None:
        self.strip = strip
        self.strip_prefixes = strip_prefixes

    def build(self, environ: dict, route: Route, exchange: Exchange) -> Outbound:
        headers = upstream_headers(environ, self.strip, self.strip_prefixes)
        body, chunked, replayable = _body(environ, headers)
        _forwarded(environ, route, headers)
        for name, value in route.headers:
            headers[name] = value
        for name, value in exchange.mesh_headers:
            headers[name] = value
        headers["X-Request-Id"] = exchange.request_id
        url = route.upstream_path(_raw_path(environ))
        query = environ.get("QUERY_STRING")
        if query:
            url = f"{url}?{query}"
        return Outbound(environ["REQUEST_METHOD"], url, headers, body, chunked, replayable)


def _body(environ: dict, headers: dict[str, str]):
    """(body, chunked, replayable) for the upstream request."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {length!r}") from None
        if size < 0:
            raise BadRequest(f"invalid Content-Length {length!r}")
        headers["Content-Length"] = length
        if size <= SMALL_BODY:
            data = _read(stream, size)
            if len(data) != size:
                raise ClientDisconnected(
                    f"client sent {len(data)} of {size} body bytes and went away"
                )
            return data, False, True
        return _fixed_length(stream, size), False, False
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _until_eof(stream), True, False
    return None, False, True


def _forwarded(environ: dict, route: Route, headers: dict[str, str]) -> None:
    remote = environ.get("REMOTE_ADDR", "")
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST")
    if host:
        headers["X-Forwarded-Host"] = host
        if route.preserve_host:
            headers["Host"] = host
    if route.strip_base_path and route.base_path != "/":
        headers["X-Forwarded-Prefix"] = route.base_path


def _raw_path(environ: dict) -> str:
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
