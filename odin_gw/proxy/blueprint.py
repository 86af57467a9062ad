"""The catch-all blueprint: every path the gateway does not answer itself is proxied."""

from __future__ import annotations

from flask import Blueprint, request

from ..errors import BadRequest, RouteNotFound

proxy_bp = Blueprint("proxy", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


@proxy_bp.route("/", defaults={"path": ""}, methods=METHODS, provide_automatic_options=False)
@proxy_bp.route("/<path:path>", methods=METHODS, provide_automatic_options=False)
def forward(path: str):
    environ = request.environ
    gateway = environ["odin.gateway"]
    exchange = environ["odin.exchange"]
    path_info = environ.get("PATH_INFO") or "/"
    if "/." in path_info and _has_dot_segment(path_info):
        raise BadRequest("path contains . or .. segments", path=path_info)
    route = gateway.routes.match(path_info)
    if route is None:
        raise RouteNotFound("no route for path", path=path_info)
    exchange.service = route.name
    return gateway.forwarder.forward(environ, route, exchange)


def _has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/"))
