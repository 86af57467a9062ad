"""What the gunicorn master keeps across re-reads of its settings file, and how it reads one.

gunicorn executes the settings file again on ``SIGHUP`` (``gunicorn.conf.py`` even drops
the cached ``odin_gw.gunicorn_settings`` first), so the last configuration that loaded
well lives here, in a module nobody drops: a reload with a bad file keeps it. Workers
inherit this module through fork: :data:`LAST_GOOD` is what they run (the master's
validated copy) and :data:`LAST_ATTEMPT` how the master's last read went, which
``GET /admin/reload`` shows.

:func:`read_config` is the one way the master and ``POST /admin/reload`` read the file:
the parser and messages of ``odin-gw check-config``, except that secret values (tokens,
passwords, credentials in URLs) are replaced by ``<redacted>`` in them, since these
messages go to logs and admin answers.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import yaml

from .config import ConfigError, GatewayConfig, parse_config
from .config.envexpand import expand
from .config.model import SECRET_KEYS

#: ``{"path", "text", "config": GatewayConfig, "generation", "loaded_at", "digest"}`` of
#: the last good load; ``generation`` counts the good loads of this master (1: start-up).
LAST_GOOD: dict[str, Any] = {}
#: ``{"at", "outcome": "applied" | "refused", "path", "generation", "problems"}`` of the
#: master's last read of the file.
LAST_ATTEMPT: dict[str, Any] = {}

# Digests are keyed with a secret of this master (inherited by its workers): a digest
# tells two texts apart without being a way to test guesses of a secret in the file.
_DIGEST_KEY = secrets.token_bytes(32)
#: Secret values shorter than this are not searched for in messages (they would mangle
#: them, and hide nothing worth hiding).
MIN_SECRET_LENGTH = 4
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
REDACTED = "<redacted>"


def read_config(path: str) -> tuple[GatewayConfig, str]:
    """``(config, text)`` of the file at ``path``, validated as ``check-config`` does.

    Raises :class:`ConfigError` listing every problem (secret values redacted).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:  # the loader's own wording
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"], source=path) from None
    try:
        return parse_config(text, source=path), text
    except ConfigError as exc:
        # from None: the original (with its unredacted problems) must not reach a traceback.
        raise ConfigError(redact_problems(exc.problems, text), source=path) from None


def redact_problems(problems: list[str], text: str) -> list[str]:
    """``problems`` with the secret values of the config ``text`` and any URL
    credentials (``scheme://user:password@``) replaced by ``<redacted>``."""
    found = sorted(_secret_values(text), key=len, reverse=True)
    out = []
    for problem in problems:
        for value in found:
            problem = problem.replace(value, REDACTED)
        out.append(_USERINFO.sub(rf"\g<scheme>{REDACTED}@", problem))
    return out


def _secret_values(text: str) -> set[str]:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return set()  # the YAML error messages quote no values
    if not isinstance(tree, dict | list):
        return set()
    found: set[str] = set()
    _collect(tree, found)
    _collect(expand(tree, os.environ, []), found)  # ${VAR} values are what messages quote
    return {v for v in found if len(v) >= MIN_SECRET_LENGTH}


def _collect(tree: object, found: set[str]) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = str(key).lower()
            if name in SECRET_KEYS and isinstance(value, str | int | float):
                if not isinstance(value, bool):
                    found.add(str(value))
            elif name == "headers" and isinstance(value, dict):
                found.update(
                    str(v) for h, v in value.items() if str(h).lower() in SECRET_KEYS and v
                )
            else:
                _collect(value, found)
    elif isinstance(tree, list):
        for item in tree:
            _collect(item, found)


def digest(text: str) -> str:
    """A short digest of a config file's text: the same text gives the same digest for
    the life of this master (keyed; it reveals nothing of the text)."""
    return hmac.new(_DIGEST_KEY, text.encode(), "sha256").hexdigest()[:16]


def record_applied(path: str, text: str, config: GatewayConfig) -> int:
    """Remember a good load as the configuration served; returns its generation."""
    now = time.time()
    generation = int(LAST_GOOD.get("generation", 0)) + 1
    LAST_GOOD.update(
        path=path,
        text=text,
        config=config,
        generation=generation,
        loaded_at=now,
        digest=digest(text),
    )
    LAST_ATTEMPT.clear()
    LAST_ATTEMPT.update(at=now, outcome="applied", path=path, generation=generation, problems=[])
    return generation


def record_refused(path: str, problems: list[str]) -> None:
    """Remember a refused read (``problems`` already redacted); what is served stays."""
    LAST_ATTEMPT.clear()
    LAST_ATTEMPT.update(
        at=time.time(),
        outcome="refused",
        path=path,
        generation=LAST_GOOD.get("generation"),
        problems=list(problems),
    )


def describe() -> dict[str, Any]:
    """``{"served": ..., "lastAttempt": ...}`` as the admin API shows them (no text, no
    secrets); ``None`` for what this process never had (not under gunicorn)."""
    served = None
    if LAST_GOOD:
        served = {
            "generation": LAST_GOOD["generation"],
            "digest": LAST_GOOD["digest"],
            "loadedAt": iso(LAST_GOOD["loaded_at"]),
            "path": LAST_GOOD["path"],
        }
    attempt = None
    if LAST_ATTEMPT:
        attempt = {
            "at": iso(LAST_ATTEMPT["at"]),
            "outcome": LAST_ATTEMPT["outcome"],
            "path": LAST_ATTEMPT["path"],
            "generation": LAST_ATTEMPT["generation"],
            "problems": list(LAST_ATTEMPT["problems"]),
        }
    return {"served": served, "lastAttempt": attempt}


def iso(ts: float) -> str:
    """``ts`` (seconds since the epoch) as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
