"""Durations as operators write them: ``500ms``, ``30s``, ``1m30s``, ``2h`` or plain seconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")


def parse_duration(value: object) -> float:
    """Return ``value`` in seconds.

    Accepts a non-negative number (seconds) or a string of number+unit parts
    (``ms``, ``s``, ``m``, ``h``), e.g. ``"1m30s"``. Raises ``ValueError`` naming the
    accepted forms otherwise.
    """
    if isinstance(value, bool):
        raise ValueError("not a duration: expected e.g. 500ms, 30s, 1m30s, 2h or seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            return float(text)
        if _WHOLE.fullmatch(text):
            return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
    raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 1m30s, 2h or seconds)")


def format_duration(seconds: float) -> str:
    """Render seconds back in the shortest config form (``90.0`` -> ``"1m30s"``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out = []
    rest = seconds
    for unit, size in (("h", 3600), ("m", 60)):
        whole = int(rest // size)
        if whole:
            out.append(f"{whole}{unit}")
            rest -= whole * size
    if rest or not out:
        out.append(f"{rest:g}s")
    return "".join(out)
