"""The admin API's own description: ``GET /admin/openapi.json`` (OpenAPI 3.1).

The document is hand-written JSON next to this module (``admin_openapi.json``), read and
checked once at import; the view answers the same bytes every time. A test calls every
admin operation against real gateways and validates each answer against it, so a change
to an admin answer that the document does not follow fails there.
"""

from __future__ import annotations

import json
from importlib import resources
from types import MappingProxyType

from flask import Response

#: The package resource that holds the document.
RESOURCE = "admin_openapi.json"


def load_document() -> tuple[bytes, MappingProxyType]:
    """``(body, document)``: the file's bytes, re-serialized compactly, and the parsed
    document (read-only at the top). Raises ``ValueError`` naming the file when it is
    not a JSON object with ``openapi``, ``paths`` and ``components``."""
    text = resources.files(__package__).joinpath(RESOURCE).read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{RESOURCE}: not JSON: {exc}") from None
    missing = [
        k for k in ("openapi", "paths", "components") if not isinstance(doc, dict) or k not in doc
    ]
    if missing:
        raise ValueError(f"{RESOURCE}: not an OpenAPI document (no {', '.join(missing)})")
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return body, MappingProxyType(doc)


BODY, DOCUMENT = load_document()


def openapi_view() -> Response:
    """``GET /admin/openapi.json``: the document, as loaded at import."""
    return Response(BODY, mimetype="application/json")
