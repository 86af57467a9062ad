"""Forwarding trust: whose ``X-Forwarded-*``/``Forwarded`` headers the gateway believes.

``server.trustedProxies`` lists the networks of the proxies in front of the gateway (a
load balancer, an ingress). Only when the peer of the connection (``REMOTE_ADDR``) is in
one of them are its forwarding headers believed; from anyone else they are replaced or
dropped (see :mod:`odin_gw.proxy.headers`). The rule for the client address is nginx's
``real_ip_recursive on``: walk ``X-Forwarded-For`` from the right, skipping trusted
addresses; the first untrusted one is the client. A malformed entry stops the walk at the
last good address, and if every address is trusted the left-most one is the client
(``ngx_http_get_forwarded_addr_internal`` does both).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SCHEMES = frozenset({"http", "https"})


class Forwarding:
    """What a trusted proxy told us about the original request."""

    __slots__ = ("client_addr", "host", "proto", "x_forwarded_for")

    def __init__(
        self, client_addr: str, x_forwarded_for: str, proto: str | None, host: str | None
    ) -> None:
        self.client_addr = client_addr
        # The X-Forwarded-For to send upstream: what the proxy sent plus the proxy itself.
        self.x_forwarded_for = x_forwarded_for
        self.proto = proto
        self.host = host

    def __repr__(self) -> str:
        return (
            f"Forwarding(client_addr={self.client_addr!r}, "
            f"x_forwarded_for={self.x_forwarded_for!r}, proto={self.proto!r}, "
            f"host={self.host!r})"
        )


class ForwardingTrust:
    """Built once from ``server.trustedProxies``; ``decide`` runs once per request.

    With no trusted networks (the default) ``decide`` is one attribute test: no address
    is parsed and no header read.
    """

    __slots__ = ("_cache", "networks")

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        self.networks = tuple(networks)
        # Peers repeat (a handful of load balancers): remember their verdict.
        self._cache: dict[str, bool] = {}

    def decide(self, environ: dict) -> Forwarding | None:
        """A :class:`Forwarding` when the peer is a trusted proxy, else ``None`` (the
        connection's own facts stand: peer address, scheme, Host)."""
        if not self.networks:
            return None
        peer = environ.get("REMOTE_ADDR") or ""
        if not self._peer_trusted(peer):
            return None
        prior = environ.get("HTTP_X_FORWARDED_FOR")
        forwarded = environ.get("HTTP_FORWARDED")
        if prior:
            # Empty entries are skipped, as nginx skips runs of separators.
            chain = [a for a in (e.strip() for e in prior.split(",")) if a]
            xff = f"{prior}, {peer}"
        elif forwarded:
            chain = forwarded_for(forwarded)
            xff = ", ".join([*chain, peer])
        else:
            chain = []
            xff = peer
        client = self.client_address(chain, peer)
        proto = _last(environ.get("HTTP_X_FORWARDED_PROTO"))
        host = _last(environ.get("HTTP_X_FORWARDED_HOST"))
        if (proto is None or host is None) and forwarded and not prior:
            params = forwarded_last(forwarded)
            proto = proto or params.get("proto")
            host = host or params.get("host")
        if proto is not None:
            proto = proto.lower()
            if proto not in _SCHEMES:
                proto = None
        return Forwarding(client, xff, proto, host)

    def client_address(self, chain: list[str], peer: str) -> str:
        """The client per nginx's ``real_ip_recursive on`` (peer already trusted)."""
        client = peer
        for entry in reversed(chain):
            addr = parse_address(entry)
            if addr is None:
                return client  # garbage: believe nothing left of it
            client = str(addr)
            if not self._trusted(addr):
                return client
        return client

    def _peer_trusted(self, peer: str) -> bool:
        verdict = self._cache.get(peer)
        if verdict is None:
            addr = parse_address(peer)
            verdict = addr is not None and self._trusted(addr)
            if len(self._cache) < 1024:
                self._cache[peer] = verdict
        return verdict

    def _trusted(self, addr: _IPAddress) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers this way
        return any(addr in net for net in self.networks)


def parse_address(text: str) -> _IPAddress | None:
    """An address from an X-Forwarded-For or Forwarded entry: ``1.2.3.4``, ``::1``,
    ``1.2.3.4:80``, ``[::1]:80``, ``"[::1]"``; ``None`` for anything else."""
    text = text.strip().strip('"')
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.startswith("["):
        end = text.find("]")
        candidate = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        candidate = text.split(":", 1)[0]
    else:
        return None
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


def forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of a ``Forwarded`` header (RFC 7239), in order."""
    out = []
    for element in _split_quoted(value, ","):
        for pair in _split_quoted(element, ";"):
            name, _, param = pair.partition("=")
            if name.strip().lower() == "for":
                out.append(param.strip().strip('"'))
    return out


def forwarded_last(value: str) -> dict[str, str]:
    """The parameters of the last (right-most) element of a ``Forwarded`` header."""
    elements = _split_quoted(value, ",")
    params: dict[str, str] = {}
    if elements:
        for pair in _split_quoted(elements[-1], ";"):
            name, sep, param = pair.partition("=")
            if sep:
                params[name.strip().lower()] = param.strip().strip('"')
    return params


def _split_quoted(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _last(value: str | None) -> str | None:
    """The right-most entry of a list-valued header (the nearest proxy's word)."""
    if not value:
        return None
    last = value.rsplit(",", 1)[-1].strip()
    return last or None
