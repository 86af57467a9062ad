"""Read, expand and validate ``config.yaml``; every problem is reported at once."""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml
from marshmallow import ValidationError

from ..errors import ConfigError
from .envexpand import expand
from .model import GatewayConfig
from .schema import GatewaySchema

_MESSAGES = {
    "Unknown field.": "unknown field",
    "Missing data for required field.": "required",
    "Not a valid string.": "must be a string",
    "Not a valid integer.": "must be a whole number",
    "Not a valid boolean.": "must be true or false",
    "Not a valid list.": "must be a list",
    "Not a valid mapping type.": "must be a mapping",
    "Invalid input type.": "must be a mapping",
    "Field may not be null.": "must not be empty",
}

# Keys the spec documents for mesh APIs that have since been removed. They load, and the
# gateway says once what replaced them (ARCHITECTURE.md, "Obsolete keys").
_OBSOLETE = {
    ("istio", "mixerAddr"): (
        "Mixer was removed in Istio 1.8: telemetry now comes from the proxies and the "
        "Telemetry API, so this address is not used"
    ),
    ("istio", "enablePolicyCheck"): (
        "Mixer policy checks were removed in Istio 1.8: policy is AuthorizationPolicy, whose "
        "CUSTOM action calls an ext_authz authorizer; the gateway asks the one at "
        "istio.authzAddr before forwarding (Envoy's ext_authz HTTP protocol)"
    ),
    ("linkerd", "controlPlaneAddr"): (
        "Linkerd's public controller API was removed before 2.11: endpoints come from "
        "Kubernetes EndpointSlices, so this address is not used"
    ),
    ("linkerd", "tapAddr"): (
        "Linkerd tap moved to the viz extension behind the Kubernetes API; this address is not "
        "used: the gateway's own live tap is GET /admin/tap (with linkerd.enableTap: true)"
    ),
}


def load_config(path: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load the YAML file at ``path``.

    Raises :class:`ConfigError` listing every problem as ``dotted.path: reason``.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"], source=path) from exc
    return parse_config(text, env, source=path)


def parse_config(
    text: str, env: Mapping[str, str] | None = None, source: str | None = None
) -> GatewayConfig:
    """Parse configuration from YAML text; see :func:`load_config`."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"<yaml>: {where}{problem}"], source=source) from exc
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(["<root>: must be a mapping of sections"], source=source)
    return build_config(tree, env, source=source)


def build_config(
    tree: dict, env: Mapping[str, str] | None = None, source: str | None = None
) -> GatewayConfig:
    """Validate an already parsed tree; see :func:`load_config`."""
    problems: list[str] = []
    expanded = expand(tree, os.environ if env is None else env, problems)
    assert isinstance(expanded, dict)
    try:
        loaded = GatewaySchema().load(expanded)
    except ValidationError as exc:
        problems.extend(_flatten(exc.messages))
        loaded = None
    if problems or loaded is None:
        raise ConfigError(problems, source=source)
    notices = tuple(_notices(expanded))
    return GatewayConfig(
        server=loaded["server"],
        logging=loaded["logging"],
        monitoring=loaded["monitoring"],
        admin=loaded["admin"],
        services=tuple(loaded["services"]),
        service_mesh=loaded["service_mesh"],
        rate_limit=loaded["rate_limit"],
        tracing=loaded["tracing"],
        raw=expanded,
        notices=notices,
    )


def _flatten(messages: object, path: str = "") -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            if isinstance(key, int):
                sub = f"{path}[{key}]"
            elif key == "_schema":
                sub = path
            else:
                sub = f"{path}.{key}" if path else str(key)
            out.extend(_flatten(value, sub))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{path or '<root>'}: {_MESSAGES.get(m, m)}" for m in messages]
    if isinstance(messages, list):
        out = []
        for item in messages:
            out.extend(_flatten(item, path))
        return out
    return [f"{path or '<root>'}: {messages}"]


def _notices(tree: dict) -> list[str]:
    mesh = tree.get("serviceMesh") or {}
    out = []
    for (section, key), text in _OBSOLETE.items():
        value = (mesh.get(section) or {}).get(key)
        if value not in (None, False, ""):
            out.append(f"serviceMesh.{section}.{key}: {text}")
    return out
