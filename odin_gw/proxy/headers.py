"""Header rules for a reverse proxy, applied straight to the WSGI environ.

Reading ``HTTP_*`` keys from the environ (instead of building werkzeug ``Headers`` first)
is the cheapest correct way through; every rule here is a set lookup per header.
"""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 section 7.6.1 plus the de-facto ones; headers named in Connection are added
# per message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Set by the gateway itself, so a client's copy is dropped.
_OWNED = frozenset(
    {
        "HTTP_HOST",
        "HTTP_X_FORWARDED_PROTO",
        "HTTP_X_FORWARDED_HOST",
        "HTTP_X_FORWARDED_PREFIX",
        "HTTP_X_REQUEST_ID",
    }
)

_HOP_ENV = frozenset("HTTP_" + h.upper().replace("-", "_") for h in HOP_BY_HOP)

_names: dict[str, str] = {}


def header_name(env_key: str) -> str:
    """``HTTP_X_FORWARDED_FOR`` -> ``X-Forwarded-For`` (cached; names repeat)."""
    name = _names.get(env_key)
    if name is None:
        name = env_key[5:].replace("_", "-").title()
        if len(_names) < 4096:
            _names[env_key] = name
    return name


def env_key(header: str) -> str:
    """``X-Consul-Token`` -> ``HTTP_X_CONSUL_TOKEN``."""
    return "HTTP_" + header.upper().replace("-", "_")


def connection_tokens(value: str | None) -> frozenset[str]:
    """Environ keys of the headers a ``Connection`` header names (they are hop-by-hop)."""
    if not value:
        return frozenset()
    return frozenset(env_key(t.strip()) for t in value.split(",") if t.strip())


def upstream_headers(
    environ: dict,
    strip: frozenset[str],
    strip_prefixes: tuple[str, ...] = (),
) -> dict[str, str]:
    """The client's end-to-end headers as a dict for the upstream request.

    Drops hop-by-hop headers (including those named in ``Connection``), the ones the
    gateway sets itself, every environ key in ``strip`` and every key starting with one of
    ``strip_prefixes`` (spoofable mesh headers such as ``X-Consul-Token``).
    """
    conn = environ.get("HTTP_CONNECTION")
    dropped = connection_tokens(conn) if conn else frozenset()
    out: dict[str, str] = {}
    for key, value in environ.items():
        if key[:5] != "HTTP_" or key in _HOP_ENV or key in _OWNED or key in strip:
            continue
        if dropped and key in dropped:
            continue
        if strip_prefixes and key.startswith(strip_prefixes):
            continue
        out[header_name(key)] = value
    ctype = environ.get("CONTENT_TYPE")
    if ctype:
        out["Content-Type"] = ctype
    return out


def response_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream response's end-to-end headers, repeated ones (Set-Cookie) kept apart."""
    kept = []
    named: set[str] = set()
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                named.update(t.strip().lower() for t in value.split(","))
            continue
        kept.append((name, value))
    if named:
        kept = [(n, v) for n, v in kept if n.lower() not in named]
    return kept
