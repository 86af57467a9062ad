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


class OutboundHeaders(dict):
    """The upstream request's headers: one entry per name whatever its case.

    Setting a name replaces any entry spelled in another case and keeps the new
    spelling, so a service's configured ``X-API-Key`` or a mesh header can never travel
    next to a client's ``X-Api-Key``. A ``dict`` of name -> value as sent, beside an index
    of lower-case name -> name: what urllib3 does with it (iterate, ``items()``) runs at
    C speed; only lookups by name go through the index.
    """

    __slots__ = ("_names",)

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[str, str] = {}

    def __setitem__(self, name: str, value: str) -> None:
        lower = name.lower()
        names = self._names
        old = names.get(lower)
        if old is not None and old != name:
            dict.__delitem__(self, old)
        names[lower] = name
        dict.__setitem__(self, name, value)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, self._names[name.lower()])

    def __delitem__(self, name: str) -> None:
        dict.__delitem__(self, self._names.pop(name.lower()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._names

    def get(self, name: str, default=None):
        key = self._names.get(name.lower())
        return default if key is None else dict.__getitem__(self, key)

    def pop(self, name: str, *default):
        key = self._names.pop(name.lower(), None)
        if key is None:
            if default:
                return default[0]
            raise KeyError(name)
        return dict.pop(self, key)

    def setdefault(self, name: str, value: str) -> str:
        if name not in self:
            self[name] = value
        return self[name]

    def update(self, *args, **kwargs) -> None:
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            return NotImplemented
        return {k.lower(): v for k, v in self.items()} == {k.lower(): v for k, v in other.items()}

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OutboundHeaders({dict.__repr__(self)})"


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
    out = OutboundHeaders()
    index = out._names
    names = _names
    for key, value in environ.items():
        if key[:5] != "HTTP_" or key in _HOP_ENV or key in _OWNED or key in strip:
            continue
        if dropped and key in dropped:
            continue
        if strip_prefixes and key.startswith(strip_prefixes):
            continue
        # gunicorn has already joined repeats of a name in any case into one key, so
        # each name arrives once: no replacement to check.
        spelling = names.get(key) or _spelling(key)
        index[spelling[1]] = spelling[0]
        dict.__setitem__(out, spelling[0], value)
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
