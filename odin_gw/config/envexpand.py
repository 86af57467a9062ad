"""``${VAR}`` and ``${VAR:-default}`` expansion of configuration values."""

from __future__ import annotations

import re
from collections.abc import Mapping

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(tree: object, env: Mapping[str, str], problems: list[str], path: str = "") -> object:
    """Return ``tree`` with every string's ``${...}`` references replaced from ``env``.

    Expansion happens on parsed values, never on YAML text, so a variable's value can not
    inject YAML structure. A reference to an unset variable without a default appends
    ``"<path>: environment variable VAR is not set"`` to ``problems``.
    """
    if isinstance(tree, dict):
        return {k: expand(v, env, problems, _join(path, str(k))) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expand(v, env, problems, f"{path}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, str) and "${" in tree:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _REF.sub(substitute, tree)
    return tree


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
