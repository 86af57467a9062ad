"""Field types and helpers shared by the config schemas (durations, sizes, header names)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, ValidationError, fields

from .durations import parse_duration


class Duration(fields.Field):
    """A duration in seconds; see :func:`parse_duration` for the accepted forms."""

    def __init__(self, *, positive: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.positive = positive

    def _deserialize(self, value, attr, data, **kwargs) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        if self.positive and seconds <= 0:
            raise ValidationError("must be greater than zero")
        return seconds


class Size(fields.Field):
    """A size in bytes: a whole number, or ``64KiB``, ``1MiB``, ``512k``, ``2m``."""

    _UNITS = {
        "": 1,
        "b": 1,
        "k": 1024,
        "kb": 1024,
        "kib": 1024,
        "m": 1 << 20,
        "mb": 1 << 20,
        "mib": 1 << 20,
    }

    def _deserialize(self, value, attr, data, **kwargs) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str):
            text = value.strip().lower()
            num = text.rstrip("kmibB")
            unit = text[len(num) :].strip()
            if num.strip().isdigit() and unit in self._UNITS:
                return int(num) * self._UNITS[unit]
        raise ValidationError(f"not a size: {value!r} (use bytes, or e.g. 64KiB, 1MiB)")


class Section(Schema):
    class Meta:
        unknown = RAISE


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_token(name: str) -> bool:
    return bool(name) and all(c in _TCHAR for c in name)


def bad_value_char(value: str) -> str | None:
    """The first character http.client could not send (not Latin-1) or that RFC 9110
    forbids in a field value (controls other than tab, DEL)."""
    for c in value:
        code = ord(c)
        if code > 0xFF or code == 0x7F or (code < 0x20 and c != "\t"):
            return c
    return None


def header_problem(name: str, value: str) -> str | None:
    """What is wrong with a configured header ``name: value``, or ``None``."""
    if not is_token(name):
        return (
            f"{name!r} is not a valid header name (RFC 9110 token: ASCII letters, "
            "digits and !#$%&'*+-.^_`|~)"
        )
    if any(c in value for c in "\r\n\0"):
        return f"value of {name} contains CR, LF or NUL"
    bad = bad_value_char(value)
    if bad is not None:
        return (
            f"value of {name} contains {bad!r}: header values are sent as Latin-1 "
            "and must be visible characters, spaces or tabs"
        )
    return None
