"""A service's ``rules:`` compiled once: first match wins, before the split and the default.

``RuleSet.compile(config.rules)`` runs at load; ``RuleSet.match(environ, path)`` runs per
request and returns the :class:`CompiledRule` that applies, or ``None``. Everything a
request needs is prepared at compile time (regexes, environ keys, the direct answer's
bytes); an empty rule set answers ``None`` without touching the environ.

Matching, condition by condition (all conditions of a rule must hold):

- ``methods``: the request method, case-sensitive (RFC 9110); ``GET`` does not take ``HEAD``.
- ``path`` is the decoded path the gateway routed on (encoded ``/`` and ``\\`` stay
  encoded). ``exact``: the whole path. ``prefix``: whole path segments, as the gateway's
  own ``basePath`` routing and the Gateway API's ``PathPrefix`` do (Envoy's ``prefix`` is a
  raw string prefix; its ``path_separated_prefix`` is this): ``/beta`` takes ``/beta``,
  ``/beta/`` and ``/beta/x``, never ``/betax``; a trailing ``/`` in the prefix is ignored.
  ``regex``: RE2, a full match of the path, as Envoy's ``safe_regex`` route match.
- ``headers``: names case-insensitive. A header sent several times is matched as the one
  value the server joined (gunicorn joins with ``,``, Envoy matches on the ``,``-joined
  value too): ``exact: "1"`` does not match ``X-A: 1`` sent twice (``1,1``). ``exact`` is a
  case-sensitive comparison of the bytes sent (the config text as UTF-8); ``regex`` (RE2)
  must match the whole value, read as UTF-8; ``present`` holds for an empty value too.
- ``query``: names and values percent-decoded as ``urllib.parse.parse_qsl`` does
  (``+`` is a space, ``&`` separates), names case-sensitive; the first occurrence of a
  name is the one compared, as Envoy does and as ``request.args.get`` reads it. ``?debug``
  and ``?debug=`` are present with the value ``""``.
- ``cookies``: ``Cookie`` split on ``;``, each pair at its first ``=``, spaces trimmed and one
  pair of surrounding double quotes removed (Envoy's reading); names case-sensitive, the
  first pair of a name wins, pairs without ``=`` are ignored; never raises.

The query string and the cookies are parsed only when a rule reaching that condition
needs them, and at most once per request.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

import re2

from ..config.fields import bad_value_char, is_token
from ..config.traffic import HeaderEdits, PathMatch, RuleConfig, ValueMatch
from ..proxy.headers import HOP_BY_HOP, OutboundHeaders

# Framing and connection headers are the gateway's business, never a rule's.
_RESPONSE_FORBIDDEN = HOP_BY_HOP | {"content-length"}
# Envoy refuses rules editing Host as well (":-prefixed or host headers may not be
# modified"); the service's preserveHost decides it here.
_REQUEST_FORBIDDEN = _RESPONSE_FORBIDDEN | {"host"}
_NO_BODY_STATUSES = frozenset({204, 304})
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)

Check = Callable[[dict, "_Parsed | None"], bool]


class RuleError(ValueError):
    """A rule that cannot be compiled; the message names the rule and what is wrong."""


@dataclass(frozen=True, slots=True)
class DirectAnswer:
    """A rule's direct answer, ready to send: ``headers`` include ``Content-Type`` (as
    Envoy, ``text/plain`` when a body is given without one) and the rule's response
    header edits; ``Content-Length`` is left to the server."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class CompiledRule:
    """One rule, ready for requests. Attributes:

    ``index`` (position in ``rules:``), ``group`` (backend group name, ``None``: the split
    or default decides), ``direct`` (:class:`DirectAnswer` or ``None``), ``rate_limit``
    (``RateLimitConfig`` or ``None``), ``rewrites`` (has a ``rewritePrefix``),
    ``request_set`` ((name, value) pairs), ``request_remove`` (lower-case names),
    ``request_remove_env`` (the same as environ keys, for ``upstream_headers(strip=...)``),
    ``response_set``, ``response_remove``.
    """

    __slots__ = (
        "_checks",
        "_from",
        "_from_depth",
        "_methods",
        "_path",
        "_response_drop",
        "_to",
        "direct",
        "group",
        "index",
        "rate_limit",
        "request_remove",
        "request_remove_env",
        "request_set",
        "response_remove",
        "response_set",
        "rewrites",
    )

    def __init__(self, rule: RuleConfig) -> None:
        where = f"rules[{rule.index}]"
        match = rule.match
        self.index = rule.index
        self.group = rule.group
        self.rate_limit = rule.rate_limit
        self._methods = frozenset(m.upper() for m in match.methods)
        self._path = _path_check(match.path, where) if match.path is not None else None
        self._checks: tuple[Check, ...] = (
            *(_header_check(v, f"{where}.match.headers") for v in match.headers),
            *(_query_check(v, f"{where}.match.query") for v in match.query),
            *(_cookie_check(v, f"{where}.match.cookies") for v in match.cookies),
        )
        self.request_set, self.request_remove = _edits(
            rule.request_headers, _REQUEST_FORBIDDEN, f"{where}.requestHeaders"
        )
        self.request_remove_env = frozenset(_env_key(n) for n in self.request_remove)
        self.response_set, self.response_remove = _edits(
            rule.response_headers, _RESPONSE_FORBIDDEN, f"{where}.responseHeaders"
        )
        self._response_drop = frozenset(self.response_remove) | {
            n.lower() for n, _ in self.response_set
        }
        self.rewrites = rule.rewrite_prefix is not None
        self._from = self._to = ""
        self._from_depth = 0
        if rule.rewrite_prefix is not None:
            src, dst = rule.rewrite_prefix
            for text in (src, dst):
                if not text.startswith("/") or "?" in text or "#" in text:
                    raise RuleError(
                        f"{where}.rewritePrefix: {text!r} must be a path starting with / "
                        "(no query, no fragment)"
                    )
            self._from = src.rstrip("/")
            self._to = dst.rstrip("/")
            self._from_depth = self._from.count("/")
        self.direct = _direct(rule, self, where) if rule.direct is not None else None
        if self.direct is not None and (self.group or self.rewrites or self.request_set):
            raise RuleError(
                f"{where}: a rule that answers directly sends nothing upstream: drop group, "
                "rewritePrefix and requestHeaders"
            )

    def try_rewrite(self, raw_path: str) -> str | None:
        """``raw_path`` (percent-encoded, with or without ``?query``) with its leading
        ``from`` replaced by ``to``, the query kept; ``None`` when the rule has no
        ``rewritePrefix`` or the path does not start with ``from``.

        ``from`` is matched on whole segments, as the path prefix match (``/beta`` is not
        the start of ``/betax``), and an encoded spelling of it counts (``/b%65ta/x``); an
        encoded ``/`` does not separate segments. Trailing slashes of ``from`` and ``to``
        are ignored and what follows ``from`` is kept, as the Gateway API's
        ``ReplacePrefixMatch``: ``/beta/x`` from ``/beta`` to ``/v2`` is ``/v2/x``, ``/beta``
        to ``/`` is ``/``.
        """
        if not self.rewrites:
            return None
        path, mark, query = raw_path.partition("?")
        src = self._from
        if not src:  # from "/": every path
            rest = path
        elif path.startswith(src) and (len(path) == len(src) or path[len(src)] == "/"):
            rest = path[len(src) :]
        elif "%" in path:
            cut = 0
            for _ in range(self._from_depth):
                cut = path.find("/", cut + 1)
                if cut < 0:
                    cut = len(path)
                    break
            head = path[:cut]
            if "%" not in head or _decode_keeping_separators(head) != src:
                return None
            rest = path[cut:]
        else:
            return None
        return (self._to + rest or "/") + mark + query

    def rewrite(self, raw_path: str) -> str:
        """:meth:`try_rewrite`, or ``raw_path`` unchanged when it does not apply."""
        new = self.try_rewrite(raw_path)
        return raw_path if new is None else new

    def apply_request(self, headers: OutboundHeaders) -> None:
        """Apply ``requestHeaders`` to the upstream request's headers: removals first,
        then sets (a name in both ends up set), as Envoy orders them."""
        for name in self.request_remove:
            headers.pop(name, None)
        for name, value in self.request_set:
            headers[name] = value

    def apply_response(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The response headers with ``responseHeaders`` applied: every copy of a removed
        or set name dropped (any case), then one copy of each set name appended. Returns
        ``headers`` itself when the rule edits none."""
        drop = self._response_drop
        if not drop:
            return headers
        kept = [(n, v) for n, v in headers if n.lower() not in drop]
        kept.extend(self.response_set)
        return kept

    def to_dict(self) -> dict:
        """The admin view: conditions by name and kind; no header or match values (they
        may be credentials)."""
        return {
            "index": self.index,
            "group": self.group,
            "direct": self.direct.status if self.direct is not None else None,
            "rewritePrefix": [self._from or "/", self._to or "/"] if self.rewrites else None,
            "requestHeaders": {
                "set": [n for n, _ in self.request_set],
                "remove": list(self.request_remove),
            },
            "responseHeaders": {
                "set": [n for n, _ in self.response_set],
                "remove": list(self.response_remove),
            },
            "rateLimit": self.rate_limit is not None,
        }

    def __repr__(self) -> str:
        return f"<CompiledRule {self.index} group={self.group!r}>"


class RuleSet:
    """A service's compiled rules in order; ``match`` is the per-request call."""

    __slots__ = ("_cookie_names", "_lazy", "_query_names", "rules")

    def __init__(self, rules: tuple[CompiledRule, ...], query: frozenset, cookies: frozenset):
        self.rules = rules
        self._query_names = query
        self._cookie_names = cookies
        self._lazy = bool(query or cookies)

    @classmethod
    def compile(cls, rules: tuple[RuleConfig, ...]) -> RuleSet:
        """Compile ``ServiceConfig.rules``; raises :class:`RuleError` naming the rule."""
        compiled = tuple(CompiledRule(r) for r in rules)
        query = frozenset(v.name for r in rules for v in r.match.query)
        cookies = frozenset(v.name for r in rules for v in r.match.cookies)
        return cls(compiled, query, cookies)

    def match(self, environ: dict, path: str) -> CompiledRule | None:
        """The first rule whose conditions all hold for this request, or ``None``.

        ``environ`` is the WSGI environ; ``path`` the decoded path the gateway routed on.
        """
        rules = self.rules
        if not rules:
            return None
        method = environ.get("REQUEST_METHOD")
        parsed = _Parsed(environ, self._query_names, self._cookie_names) if self._lazy else None
        for rule in rules:
            methods = rule._methods
            if methods and method not in methods:
                continue
            if rule._path is not None and not rule._path(path):
                continue
            for check in rule._checks:
                if not check(environ, parsed):
                    break
            else:
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def to_dict(self) -> list[dict]:
        """The admin view of every rule (see :meth:`CompiledRule.to_dict`)."""
        return [r.to_dict() for r in self.rules]


#: The rule set of a service without ``rules:``.
NO_RULES = RuleSet((), frozenset(), frozenset())


class _Parsed:
    """The query parameters and cookies the rules name, parsed on first use."""

    __slots__ = ("_cookie_names", "_cookies", "_environ", "_query", "_query_names")

    def __init__(self, environ: dict, query_names: frozenset, cookie_names: frozenset):
        self._environ = environ
        self._query_names = query_names
        self._cookie_names = cookie_names
        self._query: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    def query(self) -> dict[str, str]:
        found = self._query
        if found is None:
            found = self._query = query_values(
                self._environ.get("QUERY_STRING") or "", self._query_names
            )
        return found

    def cookies(self) -> dict[str, str]:
        found = self._cookies
        if found is None:
            found = self._cookies = cookie_values(
                self._environ.get("HTTP_COOKIE") or "", self._cookie_names
            )
        return found


def query_values(query_string: str, names: frozenset[str]) -> dict[str, str]:
    """The first decoded value of each of ``names`` present in ``query_string`` (as the
    WSGI environ holds it: Latin-1 text of the bytes sent, read here as UTF-8)."""
    if not query_string:
        return {}
    out: dict[str, str] = {}
    for name, value in parse_qsl(_utf8(query_string), keep_blank_values=True):
        if name in names and name not in out:
            out[name] = value
    return out


def cookie_values(header: str, names: frozenset[str]) -> dict[str, str]:
    """The first value of each of ``names`` in a ``Cookie`` header; tolerant of anything
    (no ``=``, stray ``;``, unbalanced quotes, bytes that are not UTF-8)."""
    out: dict[str, str] = {}
    if not header:
        return out
    for pair in _utf8(header).split(";"):
        name, eq, value = pair.partition("=")
        if not eq:
            continue
        name = name.strip(" \t")
        if name in names and name not in out:
            value = value.strip(" \t")
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            out[name] = value
    return out


# -- compiling ----------------------------------------------------------------------------


def _path_check(match: PathMatch, where: str) -> Callable[[str], bool]:
    given = [k for k in ("prefix", "exact", "regex") if getattr(match, k) is not None]
    if len(given) != 1:
        raise RuleError(f"{where}.match.path: give exactly one of prefix, exact, regex")
    if match.regex is not None:
        full = _regex(match.regex, f"{where}.match.path.regex").fullmatch
        return lambda path: full(path) is not None
    text = match.prefix if match.prefix is not None else match.exact
    if not text.startswith("/"):
        raise RuleError(f"{where}.match.path: must start with /: {text!r}")
    if match.exact is not None:
        return text.__eq__
    prefix = text.rstrip("/")
    if not prefix:
        return lambda path: True
    below = prefix + "/"
    return lambda path: path == prefix or path.startswith(below)


def _kind(vm: ValueMatch, where: str) -> str:
    given = [k for k in ("exact", "regex", "present") if getattr(vm, k) is not None]
    if len(given) != 1:
        raise RuleError(f"{where}: {vm.name!r}: give exactly one of exact, regex, present/absent")
    return given[0]


def _header_check(vm: ValueMatch, where: str) -> Check:
    kind = _kind(vm, where)
    if not is_token(vm.name):
        raise RuleError(f"{where}: {vm.name!r} is not a valid header name")
    if "_" in vm.name:
        raise RuleError(
            f"{where}: {vm.name!r}: header names with '_' never reach the gateway "
            "(gunicorn drops them); use '-'"
        )
    key = _env_key(vm.name)
    if kind == "present":
        if vm.present:
            return lambda env, _: key in env
        return lambda env, _: key not in env
    if kind == "exact":
        # The environ holds the bytes sent as Latin-1 text: compare with the config text's
        # UTF-8 bytes spelled the same way, so no per-request decoding is needed.
        wire = vm.exact.encode("utf-8").decode("latin-1")

        def exact(env: dict, _) -> bool:
            return env.get(key) == wire

        return exact
    full = _regex(vm.regex, f"{where}: {vm.name}").fullmatch

    def regex(env: dict, _) -> bool:
        value = env.get(key)
        return value is not None and full(_utf8(value)) is not None

    return regex


def _parsed_check(vm: ValueMatch, where: str, source: str) -> Check:
    kind = _kind(vm, where)
    name = vm.name
    if not name:
        raise RuleError(f"{where}: a name is required")
    if kind == "present":
        want = bool(vm.present)
        if source == "query":
            return lambda _, parsed: (name in parsed.query()) is want
        return lambda _, parsed: (name in parsed.cookies()) is want
    if kind == "exact":
        text = vm.exact
        if source == "query":
            return lambda _, parsed: parsed.query().get(name) == text
        return lambda _, parsed: parsed.cookies().get(name) == text
    full = _regex(vm.regex, f"{where}: {name}").fullmatch

    def regex(_, parsed: _Parsed) -> bool:
        found = parsed.query() if source == "query" else parsed.cookies()
        value = found.get(name)
        return value is not None and full(value) is not None

    return regex


def _query_check(vm: ValueMatch, where: str) -> Check:
    return _parsed_check(vm, where, "query")


def _cookie_check(vm: ValueMatch, where: str) -> Check:
    return _parsed_check(vm, where, "cookie")


def _regex(pattern: str, where: str):
    try:
        return re2.compile(pattern)
    except Exception as exc:  # re2.error
        raise RuleError(f"{where}: not a valid RE2 regular expression {pattern!r}: {exc}") from exc


def _edits(
    edits: HeaderEdits, forbidden: frozenset[str], where: str
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(set pairs, lower-case names to remove); the last set of a name (any case) wins."""
    sets: dict[str, tuple[str, str]] = {}
    for name, value in edits.set:
        _check_edit_name(name, forbidden, where)
        _check_value(name, value, where)
        sets[name.lower()] = (name, value)
    removes: dict[str, None] = {}
    for name in edits.remove:
        _check_edit_name(name, forbidden, where)
        removes[name.lower()] = None
    return tuple(sets.values()), tuple(removes)


def _check_edit_name(name: str, forbidden: frozenset[str], where: str) -> None:
    if not is_token(name):
        raise RuleError(f"{where}: {name!r} is not a valid header name")
    lower = name.lower()
    if lower in forbidden:
        what = "Host follows preserveHost" if lower == "host" else "the gateway frames messages"
        raise RuleError(f"{where}: {name} cannot be set or removed by a rule ({what})")


def _check_value(name: str, value: str, where: str) -> None:
    if not isinstance(value, str):
        raise RuleError(f"{where}: value of {name} must be a string")
    bad = bad_value_char(value)
    if bad is not None:
        raise RuleError(f"{where}: value of {name} contains {bad!r}")


def _direct(rule: RuleConfig, compiled: CompiledRule, where: str) -> DirectAnswer:
    direct = rule.direct
    where = f"{where}.direct"
    if not 200 <= direct.status <= 599:
        raise RuleError(f"{where}: status {direct.status} is not between 200 and 599")
    body = direct.body.encode("utf-8")
    if body and direct.status in _NO_BODY_STATUSES:
        raise RuleError(f"{where}: a {direct.status} answer has no body")
    headers: list[tuple[str, str]] = []
    for name, value in direct.headers:
        _check_edit_name(name, _RESPONSE_FORBIDDEN, f"{where}.headers")
        _check_value(name, value, f"{where}.headers")
        headers.append((name, value))
    if body and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", "text/plain; charset=utf-8"))
    return DirectAnswer(direct.status, tuple(compiled.apply_response(headers)), body)


def _env_key(name: str) -> str:
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def _utf8(text: str) -> str:
    """WSGI text (the bytes sent, as Latin-1) read as UTF-8; invalid bytes become U+FFFD."""
    if text.isascii():
        return text
    return text.encode("latin-1", "replace").decode("utf-8", "replace")


def _decode_keeping_separators(raw: str) -> str:
    return unquote(_ENCODED_SEPARATOR.sub(lambda m: "%25" + m.group(1), raw))
