"""The mesh dashboard under ``/admin/``: one HTML page and its script and style sheet.

The files (``static/dashboard/``) are read once, when this module is imported, and
served from memory. They hold no data and need no token: the page asks the operator for
the admin token and sends it as a bearer token on its own ``fetch`` calls to the admin
JSON API, which alone is protected (see :func:`odin_gw.admin._authorize`).

Only the three names in :data:`ASSETS` are served; any other ``/admin/ui/...`` path,
``..`` included, is a 404 (nothing here maps a URL onto the file system).
"""

from __future__ import annotations

from pathlib import Path

from flask import Response, request

from .errors import RouteNotFound

STATIC_DIR = Path(__file__).with_name("static") / "dashboard"

#: The page's Content-Security-Policy: its own script and style only, no inline code,
#: ``fetch`` to its own origin only, never framed, no forms submitted anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Headers of every dashboard answer (the admin blueprint adds ``Cache-Control``).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _load(name: str, content_type: str) -> tuple[bytes, str]:
    return (STATIC_DIR / name).read_bytes(), content_type


#: ``/admin/ui/<name>`` -> (body, content type), read at import.
ASSETS: dict[str, tuple[bytes, str]] = {
    "app.js": _load("app.js", "text/javascript; charset=utf-8"),
    "app.css": _load("app.css", "text/css; charset=utf-8"),
}
PAGE: tuple[bytes, str] = _load("index.html", "text/html; charset=utf-8")

#: Endpoints (``admin.<name>``) the admin token check lets through: they carry no data.
PUBLIC_ENDPOINTS = frozenset({"admin.dashboard", "admin.dashboard_asset"})


def _answer(body: bytes, content_type: str, **extra: str) -> Response:
    response = Response(body, content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    response.headers.update(extra)
    return response


def dashboard_view() -> Response:
    """``GET /admin/``: the dashboard page, under a strict Content-Security-Policy."""
    body, content_type = PAGE
    return _answer(body, content_type, **{"Content-Security-Policy": CONTENT_SECURITY_POLICY})


def asset_view(name: str) -> Response:
    """``GET /admin/ui/<name>``: the page's script or style sheet; 404 for anything else."""
    asset = ASSETS.get(name)
    if asset is None:
        raise RouteNotFound("no such dashboard file", path=request.path)
    return _answer(*asset)
