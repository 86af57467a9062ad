"""A subset of Consul's ``?filter=`` expression language (go-bexpr) for the double.

Supported, with bexpr's semantics: ``==``, ``!=``, ``is empty``, ``is not empty``,
``contains`` / ``not contains``, ``in`` / ``not in``, ``matches`` / ``not matches``,
``and``, ``or``, ``not`` and parentheses; selectors such as ``Service.Tags``,
``Service.Meta.version``, ``Service.Meta["a-b"]``, ``Node.Meta.zone``, ``Service.Port``.

Errors are reported like Consul: a malformed expression or an unknown selector raises
:class:`FilterError` (Consul answers 500 "Failed to create boolean expression
evaluator: ..."); a valid expression using something this double does not implement
(selecting inside ``Checks``, for instance) raises :class:`FilterUnsupported`, which
the double answers with 400 so it is never silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["HEALTH_SCHEMA", "FilterError", "FilterUnsupported", "compile_filter"]


class FilterError(ValueError):
    """The expression is invalid (Consul: HTTP 500, evaluator creation failed)."""


class FilterUnsupported(ValueError):
    """Valid bexpr, but beyond what the double implements (answered with HTTP 400)."""


STR, INT, BOOL, LIST, MAP = "str", "int", "bool", "list", "map"
UNSUPPORTED = "unsupported"

#: Shape of one ``/v1/health/service`` entry, as far as selectors go.
HEALTH_SCHEMA: dict[str, Any] = {
    "Node": {
        "ID": STR,
        "Node": STR,
        "Address": STR,
        "Datacenter": STR,
        "TaggedAddresses": MAP,
        "Meta": MAP,
    },
    "Service": {
        "Kind": STR,
        "ID": STR,
        "Service": STR,
        "Tags": LIST,
        "Address": STR,
        "Meta": MAP,
        "Port": INT,
        "TaggedAddresses": UNSUPPORTED,
        "Weights": {"Passing": INT, "Warning": INT},
        "EnableTagOverride": BOOL,
        "Proxy": {
            "DestinationServiceName": STR,
            "DestinationServiceID": STR,
            "LocalServiceAddress": STR,
            "LocalServicePort": INT,
            "Mode": STR,
            "Upstreams": UNSUPPORTED,
            "MeshGateway": UNSUPPORTED,
            "Expose": UNSUPPORTED,
        },
        "Connect": {"Native": BOOL},
    },
    "Checks": UNSUPPORTED,
}

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>==|!=|\(|\)|\[|\]|\.)
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | `(?P<bq>[^`]*)`
      | (?P<word>[A-Za-z0-9_\-:/+@]+)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "contains", "is", "empty", "matches"}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"1:{pos + 1}: no match found near {text[pos : pos + 10]!r}")
        pos = m.end()
        if m.group("op") is not None:
            tokens.append(("op", m.group("op")))
        elif m.group("dq") is not None:
            tokens.append(("str", bytes(m.group("dq"), "utf-8").decode("unicode_escape")))
        elif m.group("bq") is not None:
            tokens.append(("str", m.group("bq")))
        else:
            word = m.group("word")
            tokens.append(("kw" if word in _KEYWORDS else "word", word))
    return tokens


Predicate = Callable[[dict[str, Any]], bool]


class _Parser:
    def __init__(self, text: str, schema: dict[str, Any]) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.schema = schema

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise FilterError("unexpected end of expression")
        self.pos += 1
        return tok

    def accept(self, kind: str, value: str) -> bool:
        if self.peek() == (kind, value):
            self.pos += 1
            return True
        return False

    def expect(self, kind: str, value: str) -> None:
        if not self.accept(kind, value):
            raise FilterError(f"expected {value!r} at token {self.pos + 1}")

    # expr := and ("or" and)*
    def parse(self) -> Predicate:
        pred = self.parse_or()
        if self.peek() is not None:
            raise FilterError(f"unexpected {self.peek()[1]!r} at token {self.pos + 1}")
        return pred

    def parse_or(self) -> Predicate:
        parts = [self.parse_and()]
        while self.accept("kw", "or"):
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else (lambda e, p=parts: any(f(e) for f in p))

    def parse_and(self) -> Predicate:
        parts = [self.parse_unary()]
        while self.accept("kw", "and"):
            parts.append(self.parse_unary())
        return parts[0] if len(parts) == 1 else (lambda e, p=parts: all(f(e) for f in p))

    def parse_unary(self) -> Predicate:
        if self.accept("kw", "not"):
            inner = self.parse_unary()
            return lambda e: not inner(e)
        if self.accept("op", "("):
            inner = self.parse_or()
            self.expect("op", ")")
            return inner
        return self.parse_match()

    def parse_value(self) -> str:
        kind, value = self.take()
        if kind not in ("str", "word"):
            raise FilterError(f"expected a value, got {value!r}")
        return value

    def parse_selector(self) -> tuple[list[str], str]:
        kind, first = self.take()
        if kind != "word":
            raise FilterError(f"expected a selector, got {first!r}")
        path = [first]
        while True:
            if self.accept("op", "."):
                kind, part = self.take()
                if kind not in ("word", "kw"):
                    raise FilterError(f"bad selector after {'.'.join(path)!r}")
                path.append(part)
            elif self.accept("op", "["):
                path.append(self.parse_value())
                self.expect("op", "]")
            else:
                break
        return path, self.resolve_type(path)

    def resolve_type(self, path: list[str]) -> str:
        node: Any = self.schema
        for i, part in enumerate(path):
            if node == MAP and i == len(path) - 1:
                return STR
            if node == UNSUPPORTED:
                raise FilterUnsupported(
                    f"selector {'.'.join(path)!r} is not supported by the double"
                )
            if not isinstance(node, dict) or part not in node:
                raise FilterError(f'Selector "{".".join(path)}" is not valid')
            node = node[part]
        if node == UNSUPPORTED:
            raise FilterUnsupported(f"selector {'.'.join(path)!r} is not supported by the double")
        if isinstance(node, dict):
            raise FilterError(f'Selector "{".".join(path)}" is not valid for this operation')
        return node

    def parse_match(self) -> Predicate:
        # value [not] in selector
        tok, nxt = self.peek(), self.peek(1)
        value_first = tok is not None and (
            tok[0] == "str"
            or (nxt == ("kw", "in"))
            or (nxt == ("kw", "not") and self.peek(2) == ("kw", "in"))
        )
        if value_first:
            value = self.parse_value()
            negate = self.accept("kw", "not")
            self.expect("kw", "in")
            path, typ = self.parse_selector()
            return _negate(_contains(path, typ, value), negate)
        path, typ = self.parse_selector()
        if self.accept("op", "=="):
            return _equals(path, typ, self.parse_value())
        if self.accept("op", "!="):
            return _negate(_equals(path, typ, self.parse_value()), True)
        if self.accept("kw", "is"):
            negate = self.accept("kw", "not")
            self.expect("kw", "empty")
            return _negate(lambda e: _is_empty(_lookup(e, path)), negate)
        negate = self.accept("kw", "not")
        if self.accept("kw", "contains"):
            return _negate(_contains(path, typ, self.parse_value()), negate)
        if self.accept("kw", "matches"):
            pattern = self.parse_value()
            if typ != STR:
                raise FilterError(f"matches is only valid on strings: {'.'.join(path)}")
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise FilterError(f"invalid regular expression {pattern!r}: {exc}") from exc
            return _negate(lambda e: bool(regex.search(str(_lookup(e, path)))), negate)
        raise FilterError(f"expected an operator after selector {'.'.join(path)!r}")


def _negate(pred: Predicate, negate: bool) -> Predicate:
    return (lambda e: not pred(e)) if negate else pred


def _lookup(entry: dict[str, Any], path: list[str]) -> Any:
    node: Any = entry
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _coerce(typ: str, value: str) -> Any:
    if typ == INT:
        try:
            return int(value)
        except ValueError:
            raise FilterError(f'Failed to coerce value "{value}" to type int') from None
    if typ == BOOL:
        lowered = value.lower()
        if lowered in ("true", "t", "1"):
            return True
        if lowered in ("false", "f", "0"):
            return False
        raise FilterError(f'Failed to coerce value "{value}" to type bool')
    return value


def _equals(path: list[str], typ: str, raw: str) -> Predicate:
    if typ in (LIST, MAP):
        raise FilterError(f"== is not valid on {'.'.join(path)} (a collection)")
    want = _coerce(typ, raw)

    def pred(entry: dict[str, Any]) -> bool:
        got = _lookup(entry, path)
        if got is None:
            got = {STR: "", INT: 0, BOOL: False}[typ]
        return got == want

    return pred


def _contains(path: list[str], typ: str, raw: str) -> Predicate:
    if typ in (INT, BOOL):
        raise FilterError(f"contains/in is not valid on {'.'.join(path)}")

    def pred(entry: dict[str, Any]) -> bool:
        got = _lookup(entry, path)  # substring, list membership or map key
        return got is not None and raw in got

    return pred


def _is_empty(value: Any) -> bool:
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def compile_filter(text: str, schema: dict[str, Any] = HEALTH_SCHEMA) -> Predicate:
    """Compile ``text`` into a predicate over one result entry (a JSON-like dict)."""
    return _Parser(text, schema).parse()
