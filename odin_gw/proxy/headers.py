"""Header rules for a reverse proxy, applied straight to the WSGI environ.

Reading ``HTTP_*`` keys from the environ (instead of building werkzeug ``Headers`` first)
is the cheapest correct way through; every rule here is a set lookup per header.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, ValuesView

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
        "HTTP_X_FORWARDED_FOR",
        "HTTP_X_FORWARDED_PROTO",
        "HTTP_X_FORWARDED_HOST",
        "HTTP_X_FORWARDED_PREFIX",
        "HTTP_X_REAL_IP",
        "HTTP_X_REQUEST_ID",
    }
)

# Forwarding facts only a trusted proxy may state (server.trustedProxies): from anyone
# else they are dropped, as Envoy does with XFCC ("sanitize") for untrusted peers.
UNTRUSTED_ONLY = frozenset(
    {
        "HTTP_FORWARDED",
        "HTTP_X_FORWARDED_CLIENT_CERT",
        "HTTP_X_FORWARDED_SSL",
        "HTTP_X_FORWARDED_PORT",
    }
)

_HOP_ENV = frozenset("HTTP_" + h.upper().replace("-", "_") for h in HOP_BY_HOP)

# env key -> (spelling sent upstream, its lower-case form)
_names: dict[str, tuple[str, str]] = {}


def header_name(env_key: str) -> str:
    """``HTTP_X_FORWARDED_FOR`` -> ``X-Forwarded-For`` (cached; names repeat)."""
    return _spelling(env_key)[0]


def _spelling(env_key: str) -> tuple[str, str]:
    names = _names.get(env_key)
    if names is None:
        name = env_key[5:].replace("_", "-").title()
        names = (name, name.lower())
        if len(_names) < 4096:
            _names[env_key] = names
    return names


def env_key(header: str) -> str:
    """``X-Consul-Token`` -> ``HTTP_X_CONSUL_TOKEN``."""
    return "HTTP_" + header.upper().replace("-", "_")


def connection_tokens(value: str | None) -> frozenset[str]:
    """Environ keys of the headers a ``Connection`` header names (they are hop-by-hop)."""
    if not value:
        return frozenset()
    return frozenset(env_key(t.strip()) for t in value.split(",") if t.strip())


class OutboundHeaders(MutableMapping):
    """The upstream request's headers: one entry per name whatever its case.

    Setting a name replaces any entry spelled in another case and keeps the new
    spelling, so a service's configured ``X-API-Key`` or a mesh header can never travel
    next to a client's ``X-Api-Key``. Entries are stored as ``lower -> (name, value)``:
    ``items()`` is then the dict's own values view (what urllib3 iterates to send them),
    at about 1 µs per request more than a plain dict; requests' ``CaseInsensitiveDict``
    costs about 6 µs.
    """

    __slots__ = ("_store",)

    def __init__(self, store: dict[str, tuple[str, str]] | None = None) -> None:
        self._store: dict[str, tuple[str, str]] = {} if store is None else store

    def __setitem__(self, name: str, value: str) -> None:
        self._store[name.lower()] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._store[name.lower()][1]

    def __delitem__(self, name: str) -> None:
        del self._store[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._store

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._store.values())

    def __len__(self) -> int:
        return len(self._store)

    def items(self) -> ValuesView[tuple[str, str]]:  # type: ignore[override]
        return self._store.values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OutboundHeaders):
            other_store = other._store
        elif isinstance(other, dict):
            other_store = {k.lower(): (k, v) for k, v in other.items()}
        else:
            return NotImplemented
        return {k: v for k, (_, v) in self._store.items()} == {
            k: v for k, (_, v) in other_store.items()
        }

    def __repr__(self) -> str:
        return f"OutboundHeaders({dict(self._store.values())!r})"


def upstream_headers(
    environ: dict,
    strip: frozenset[str],
    strip_prefixes: tuple[str, ...] = (),
) -> OutboundHeaders:
    """The client's end-to-end headers as an :class:`OutboundHeaders` for the upstream.

    Drops hop-by-hop headers (including those named in ``Connection``), the ones the
    gateway sets itself, every environ key in ``strip`` and every key starting with one of
    ``strip_prefixes`` (spoofable mesh headers such as ``X-Consul-Token``).
    """
    conn = environ.get("HTTP_CONNECTION")
    dropped = connection_tokens(conn) if conn else frozenset()
    store: dict[str, tuple[str, str]] = {}
    names = _names
    for key, value in environ.items():
        if key[:5] != "HTTP_" or key in _HOP_ENV or key in _OWNED or key in strip:
            continue
        if dropped and key in dropped:
            continue
        if strip_prefixes and key.startswith(strip_prefixes):
            continue
        # gunicorn has already joined repeats of a name in any case into one key.
        spelling = names.get(key) or _spelling(key)
        store[spelling[1]] = (spelling[0], value)
    ctype = environ.get("CONTENT_TYPE")
    if ctype:
        store["content-type"] = ("Content-Type", ctype)
    return OutboundHeaders(store)


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
