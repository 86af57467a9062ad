"""A service's ``split:``: weighted backend groups, stickiness and a forcing header.

``Split.compile(config.split, service, path=base_path)`` runs at load;
``Split.choose(environ)`` runs per request for requests no rule sent elsewhere and
returns a :class:`Choice`. Order of decision:

1. **Override** (``override.header``): its value, trimmed and in any case, mapped through
   ``override.values``, else a value naming one of the split's groups, forces that group
   (weight 0 or not). Anything else is ignored. No cookie is set: an override is per
   request.
2. **Sticky header** (``sticky.header``): a keyed BLAKE2b hash of the value (salted per
   service, so one user's sides are independent across services) is placed on the
   cumulative weight ranges: the same value lands on the same group in every worker and
   after restarts, and moving weight between two groups only moves the clients in the
   range that changed hands. A missing or empty header falls to the weighted draw.
3. **Sticky cookie** (``sticky.cookie``): a cookie naming a group of weight > 0 keeps it;
   otherwise (no cookie, unknown group, weight now 0) the weighted draw decides and the
   choice carries a ``Set-Cookie`` pinning it (``Path``, ``Max-Age``, ``HttpOnly``,
   ``SameSite=Lax``; ``Secure`` when asked).
4. **Weighted draw**: uniform over the weights; a group of weight 0 is never drawn.

The random source is injectable; the default is the ``random`` module's, which CPython
reseeds in each forked worker (a private ``Random`` made before the fork would draw the
same sequence in every worker).
"""

from __future__ import annotations

import hashlib
import random as _random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from ..config.fields import is_token
from ..config.traffic import SplitConfig
from .rules import cookie_values

DEFAULT_COOKIE_MAX_AGE = 86400  # one day


class SplitError(ValueError):
    """A split that cannot be compiled; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The group for one request, why (``override``, ``sticky`` or ``weight``), and the
    ``Set-Cookie`` value to add to the answer (``None``: none)."""

    group: str
    set_cookie: str | None
    reason: str


class Split:
    """A compiled split; build with :meth:`compile`. ``groups`` and ``weights`` are in
    config order."""

    __slots__ = (
        "_bounds",
        "_by_cookie",
        "_cookie_names",
        "_cookie_picks",
        "_forced",
        "_override_key",
        "_overrides",
        "_random",
        "_salt",
        "_sticky_key",
        "_sticky_picks",
        "_total",
        "_weight_picks",
        "cookie_path",
        "groups",
        "override_header",
        "service",
        "sticky_cookie",
        "sticky_header",
        "weights",
    )

    @classmethod
    def compile(
        cls,
        split: SplitConfig,
        service: str,
        *,
        path: str = "/",
        max_age: int = DEFAULT_COOKIE_MAX_AGE,
        secure: bool = False,
        random: Callable[[], float] | None = None,
    ) -> Split:
        """Compile ``ServiceConfig.split`` of ``service``.

        ``path``: the sticky cookie's ``Path`` (the service's base path, or ``/``).
        ``random``: a source of floats in [0, 1) (``random.Random(seed).random`` in tests).
        Raises :class:`SplitError`.
        """
        self = cls.__new__(cls)
        self.service = service
        names = tuple(g for g, _ in split.weights)
        weights = tuple(w for _, w in split.weights)
        where = f"service {service!r}: split"
        if not names:
            raise SplitError(f"{where}: name at least one group")
        if len(set(names)) != len(names):
            raise SplitError(f"{where}: a group appears twice")
        for name, weight in split.weights:
            if not name or not is_token(name) or "=" in name:
                raise SplitError(f"{where}: {name!r} is not a usable group name")
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                raise SplitError(f"{where}: weight of {name!r} must be a whole number >= 0")
        total = sum(weights)
        if total <= 0:
            raise SplitError(f"{where}: the weights add up to 0")
        if split.sticky_cookie and split.sticky_header:
            raise SplitError(f"{where}: sticky takes one of cookie, header")
        for header in (split.sticky_header, split.override_header):
            if header is not None and (not is_token(header) or "_" in header):
                raise SplitError(
                    f"{where}: {header!r} is not a usable header name (RFC 9110 token; "
                    "no '_': gunicorn drops such headers)"
                )
        cookie = split.sticky_cookie
        if cookie is not None and (not is_token(cookie) or "=" in cookie):
            raise SplitError(f"{where}: {cookie!r} is not a valid cookie name")
        if not path.startswith("/") or any(c in path for c in ";,\r\n\0 "):
            raise SplitError(f"{where}: cookie path {path!r} must be a path without ; or spaces")
        if not isinstance(max_age, int) or max_age <= 0:
            raise SplitError(f"{where}: cookie max age must be a positive number of seconds")

        self.groups = names
        self.weights = weights
        self.sticky_cookie = cookie
        self.sticky_header = split.sticky_header
        self.override_header = split.override_header
        self.cookie_path = path
        self._total = total
        bounds, running = [], 0
        for weight in weights:
            running += weight
            bounds.append(running)
        self._bounds = tuple(bounds)
        self._random = random or _random.random
        self._salt = hashlib.blake2b(service.encode("utf-8"), digest_size=16).digest()
        self._weight_picks = tuple(Choice(g, None, "weight") for g in names)
        self._sticky_picks = tuple(Choice(g, None, "sticky") for g in names)
        self._sticky_key = _env_key(split.sticky_header) if split.sticky_header else None
        attrs = f"; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax"
        if secure:
            attrs += "; Secure"
        self._cookie_picks = tuple(Choice(g, f"{cookie}={g}{attrs}", "weight") for g in names)
        self._by_cookie = {g: Choice(g, None, "sticky") for g, w in split.weights if w > 0}
        self._cookie_names = frozenset({cookie}) if cookie else frozenset()

        # Override: configured values first, then group names, all case-insensitive.
        self._override_key = _env_key(split.override_header) if split.override_header else None
        overrides: dict[str, str] = {g.lower(): g for g in names}
        for value, group in split.override_values:
            if not group:
                raise SplitError(f"{where}: override value {value!r} names no group")
            overrides[value.strip().lower()] = group
        self._overrides = overrides
        self._forced = {g: Choice(g, None, "override") for g in set(overrides.values())}
        return self

    def choose(self, environ: dict) -> Choice:
        """The group for this request (see the module docstring for the order)."""
        if self._override_key is not None:
            value = environ.get(self._override_key)
            if value:
                group = self._overrides.get(value.strip().lower())
                if group is not None:
                    return self._forced[group]
        if self._sticky_key is not None:
            value = environ.get(self._sticky_key)
            if value:
                digest = hashlib.blake2b(
                    value.encode("utf-8", "surrogatepass"), digest_size=8, salt=self._salt
                ).digest()
                return self._sticky_picks[self._slot(int.from_bytes(digest, "big"), 64)]
        elif self._cookie_names:
            header = environ.get("HTTP_COOKIE")
            if header:
                value = cookie_values(header, self._cookie_names).get(self.sticky_cookie)
                if value is not None:
                    kept = self._by_cookie.get(value)
                    if kept is not None:
                        return kept
            return self._cookie_picks[self._draw()]
        return self._weight_picks[self._draw()]

    def shares(self) -> dict[str, float]:
        """Each group's configured share of the traffic, in percent."""
        return {g: 100.0 * w / self._total for g, w in zip(self.groups, self.weights, strict=True)}

    def to_dict(self) -> dict:
        """The admin view (``/admin/routes``). Override values are not shown: a secret
        value may be what lets someone force a side."""
        shares = self.shares()
        doc: dict = {
            "groups": [
                {"group": g, "weight": w, "percent": round(shares[g], 2)}
                for g, w in zip(self.groups, self.weights, strict=True)
            ],
            "sticky": (
                {"cookie": self.sticky_cookie}
                if self.sticky_cookie
                else {"header": self.sticky_header}
                if self.sticky_header
                else None
            ),
            "override": None,
        }
        if self.override_header:
            doc["override"] = {
                "header": self.override_header,
                "groups": sorted(set(self._overrides.values())),
            }
        return doc

    def _draw(self) -> int:
        # 53 bits of the float: ranges as fine as any weight the config allows (<= 10000).
        return self._slot(int(self._random() * (1 << 53)), 53)

    def _slot(self, point: int, bits: int) -> int:
        """Index of the group whose cumulative range holds ``point`` scaled from
        ``[0, 2**bits)`` onto ``[0, total)`` (exact integers: no rounding at the edges)."""
        return bisect_right(self._bounds, (point * self._total) >> bits)

    def __repr__(self) -> str:
        parts = ", ".join(f"{g}={w}" for g, w in zip(self.groups, self.weights, strict=True))
        return f"<Split {self.service}: {parts}>"


def _env_key(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")
