"""``labelSelector`` and ``fieldSelector`` as the API server parses and applies them.

Label grammar (``apimachinery/pkg/labels/selector.go``): requirements joined by commas
(AND); each is ``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``,
``key in (a,b)``, ``key notin (a,b)``, ``key>N`` or ``key<N``. ``!=`` and ``notin``
also match objects without the key, as in Kubernetes.

Field selectors (``apimachinery/pkg/fields``): terms ``field=value``, ``field==value``
or ``field!=value`` joined by commas; every resource here supports only
``metadata.name`` and ``metadata.namespace`` (the generic registry's defaults).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["SelectorError", "parse_field_selector", "parse_label_selector"]

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")
_REQ_RE = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[^\s!=<>(),]+)\s*"
    r"(?:(?P<op>==|=|!=|<|>)\s*(?P<value>[^\s,()]*)"
    r"|(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)"
    r")?\s*$"
)
FIELDS = ("metadata.name", "metadata.namespace")

Matcher = Callable[[dict[str, str]], bool]


class SelectorError(ValueError):
    """A selector the API server would refuse with 400 BadRequest."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``( )`` (set-based values)."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise SelectorError(f'unable to parse requirement: key: Invalid value: "{key}"')


def _check_value(key: str, value: str) -> None:
    if not _VALUE_RE.match(value):
        raise SelectorError(
            f'unable to parse requirement: values[0][{key}]: Invalid value: "{value}"'
        )


def _requirement(text: str) -> Matcher:
    match = _REQ_RE.match(text)
    if match is None:
        raise SelectorError(f"unable to parse requirement: found '{text.strip()}'")
    key, neg, op, setop = match["key"], match["neg"], match["op"], match["setop"]
    _check_key(key)
    if neg:
        if op or setop:
            raise SelectorError(f"unable to parse requirement: found '{text.strip()}'")
        return lambda labels: key not in labels
    if setop:
        values = {v.strip() for v in match["values"].split(",")}
        for value in values:
            _check_value(key, value)
        if setop == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if op is None:
        return lambda labels: key in labels
    value = match["value"]
    if op in ("<", ">"):
        try:
            bound = int(value)
        except ValueError:
            raise SelectorError(
                f"unable to parse requirement: for 'Gt', 'Lt' operators, the value "
                f"must be an integer: {value!r}"
            ) from None

        def compare(labels: dict[str, str]) -> bool:
            try:
                have = int(labels[key])
            except (KeyError, ValueError):
                return False
            return have > bound if op == ">" else have < bound

        return compare
    _check_value(key, value)
    if op == "!=":
        return lambda labels: labels.get(key) != value
    return lambda labels: labels.get(key) == value


def parse_label_selector(text: str | None) -> Matcher:
    """Compile a ``labelSelector``; the result takes an object's labels (a dict).

    Raises :class:`SelectorError` for what the API server rejects.
    """
    if text is None or not text.strip():
        return lambda labels: True
    matchers = [_requirement(part) for part in _split_top_level(text)]
    return lambda labels: all(m(labels) for m in matchers)


def parse_field_selector(text: str | None) -> Callable[[dict[str, Any]], bool]:
    """Compile a ``fieldSelector``; the result takes a whole object.

    Raises :class:`SelectorError` for a malformed term or an unsupported field.
    """
    if text is None or not text.strip():
        return lambda obj: True
    terms: list[tuple[str, bool, str]] = []
    for term in text.split(","):
        for op in ("!=", "==", "="):
            if op in term:
                field, value = term.split(op, 1)
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
        field = field.strip()
        if field not in FIELDS:
            raise SelectorError(f"field label not supported: {field}")
        terms.append((field.split(".", 1)[1], op == "!=", value.strip()))

    def matches(obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return all((meta.get(f) == v) != negate for f, negate, v in terms)

    return matches
