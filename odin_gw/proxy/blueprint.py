"""The catch-all blueprint: every path the gateway does not answer itself is proxied.

The catch-all rules carry no method list (werkzeug then matches any method), so every
RFC 9110 token method gunicorn accepts — WebDAV's ``PROPFIND``/``MKCOL``, ``PURGE``,
custom ones — is forwarded; the few refused ones are checked here, before routing. The
route is chosen on the request target exactly as received (``RAW_URI``), decoded: the
same path :func:`~odin_gw.proxy.outbound.raw_path` gives the upstream request.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from flask import Blueprint, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter, RequestRedirect, Rule

from ..errors import BadRequest, MethodRefused, RouteNotFound
from ..traffic.plan import TrafficPlan
from .outbound import raw_path
from .tunnel import Tunnels

ENDPOINT = "proxy.forward"

# nginx answers 405 to CONNECT (unless it is configured as a tunnel, which a gateway is
# not) and to TRACE: a TRACE echoed by a backend would hand the client the headers the
# gateway added (a service's configured API key, the Consul token with forwardToken).
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

proxy_bp = Blueprint("proxy", __name__)


class ProxyView:
    """The view behind the catch-all rules, bound to one gateway."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        monitoring = gateway.config.monitoring
        # Paths the gateway answers itself: a method they do not take must not fall
        # through to a service at "/" (Flask sends it here, the catch-all takes any method).
        own = [
            p for p in gateway.config.reserved_paths() if p != monitoring.path or monitoring.enabled
        ]
        self.own_paths = frozenset(own)
        self.own_dirs = tuple(p.rstrip("/") + "/" for p in own)
        self.ext_authz = gateway.ext_authz  # None unless istio.enablePolicyCheck
        self.tunnels = Tunnels(gateway)  # Upgrade tunnels of this worker
        # Services with rate limits, rules or a split; the others are forwarded directly.
        self.plans: dict[str, TrafficPlan] = {}
        for route in gateway.routes.entries:
            plan = TrafficPlan.for_route(route, gateway.rate_limits, gateway.metrics)
            if plan is not None:
                self.plans[route.name] = plan

    def __call__(self, path: str = ""):
        environ = request.environ
        exchange = environ["odin.exchange"]
        method = environ["REQUEST_METHOD"]
        if method in REFUSED_METHODS:
            raise MethodRefused(f"{method} is not allowed")
        target = environ.get("RAW_URI")
        if target and "#" in target:
            # A fragment never belongs in a request target; Envoy refuses it since 1.16.5
            # (CVE-2021-32779): "/api/a/x#/../../admin" would reach a backend that may
            # resolve the dot segments after the "#".
            raise BadRequest("request target contains #")
        raw = environ["odin.raw_path"] = raw_path(environ)  # the outbound side reuses it
        decoded = unquote(raw)
        path_info = environ.get("PATH_INFO") or "/"
        # Dot segments are judged on the fully decoded path: a backend that decodes %2F
        # reads "..%2F.." as two segments.
        if unsafe_path(decoded) or (path_info != decoded and unsafe_path(path_info)):
            raise BadRequest("path contains . or .. segments", path=path_info)
        # An encoded slash stays inside its segment for routing, as Envoy's default
        # (path_with_escaped_slashes_action: KEEP_UNCHANGED): "/api%2Fusers/1" is not under
        # "/api/users", and stripBasePath, which cuts raw segments, agrees with the match.
        routed = decoded if "%2" not in raw and "%5" not in raw else _route_path(raw)
        if routed in self.own_paths or routed.startswith(self.own_dirs):
            self._refuse_own(routed, method)
        route = self.gateway.routes.match(routed)
        if route is None:
            raise RouteNotFound("no route for path", path=path_info)
        exchange.service = route.name
        if self.ext_authz is not None:  # Envoy's ext_authz: only requests with a route
            denied = self.ext_authz.check(environ, route, exchange)
            if denied is not None:
                return denied
        plan = self.plans.get(route.name) if self.plans else None
        if "HTTP_UPGRADE" in environ and self.tunnels.accepts(environ, route):
            if plan is not None:
                plan.check_service_limit(environ, exchange)
            return self.tunnels.open(environ, route, exchange)  # WebSocket & co.
        if plan is not None:  # rate limits, rules, split (odin_gw/traffic/plan.py)
            return plan.handle(environ, exchange, routed, self.gateway.forwarder)
        return self.gateway.forwarder.forward(environ, route, exchange)

    @staticmethod
    def _refuse_own(path: str, method: str) -> None:
        # Rare: ask Flask whether the path exists for GET to tell 405 from 404.
        try:
            endpoint, _ = current_app.url_map.bind("gateway").match(path, method="GET")
        except RequestRedirect:  # "/admin" -> "/admin/": the gateway's own path
            endpoint = None
        except HTTPException:
            endpoint = ENDPOINT
        if endpoint != ENDPOINT:
            raise MethodRefused(f"{method} not allowed here")
        raise RouteNotFound("no route for path", path=path)


_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def _route_path(raw: str) -> str:
    """``raw`` decoded except for encoded ``/`` and ``\\``, which stay as they were sent."""
    return unquote(_ENCODED_SEPARATOR.sub(lambda m: "%25" + m.group(1), raw))


def unsafe_path(path: str) -> bool:
    """True when a (decoded) path has a segment a backend may resolve as . or ..

    Beyond ``.``/``..``: ``..;x`` and ``.;`` (Tomcat/Spring drop ``;`` path parameters,
    the classic ``/..;/`` bypass) and ``..\\`` (backends on Windows, or that normalise
    backslashes, read it as a separator). Percent-encoded forms (``%2e``, ``%5c``, ``%3b``
    in any case) are covered because the path is decoded first.
    """
    if "/." not in path and "\\." not in path:
        return False
    if "\\" in path:
        path = path.replace("\\", "/")
    for segment in path.split("/"):
        if segment[:1] == "." and segment.split(";", 1)[0] in (".", ".."):
            return True
    return False


class AnyPath(PathConverter):
    """werkzeug's ``path`` without its blind spot: ``.`` there stops at a newline, so a
    target with ``%0A`` got Flask's 404 before the route table was asked."""

    regex = "[^/](?s:.*?)"


class CatchAllRule(Rule):
    """A rule whose ``<path:...>`` is :class:`AnyPath` (the map's other rules keep theirs)."""

    def get_converter(self, variable_name, converter_name, args, kwargs):
        if converter_name == "path":
            return AnyPath(self.map, *args, **kwargs)
        return super().get_converter(variable_name, converter_name, args, kwargs)


def _register(state) -> None:
    # Rules without a method list: added to werkzeug's map directly, since Flask's
    # add_url_rule always supplies one (GET by default).
    app = state.app
    # The bound method, not the instance: Flask asks inspect whether each view is a
    # coroutine function on every request, which is cheap for a method and costly for
    # a callable object.
    app.view_functions[ENDPOINT] = ProxyView(app.extensions["odin"]).__call__
    # werkzeug matches a request with "Upgrade: websocket" only to websocket rules (else
    # WebsocketMismatch, 400): the same catch-all for those, whatever the route allows.
    for websocket in (False, True):
        app.url_map.add(
            CatchAllRule("/", defaults={"path": ""}, endpoint=ENDPOINT, websocket=websocket)
        )
        app.url_map.add(CatchAllRule("/<path:path>", endpoint=ENDPOINT, websocket=websocket))


proxy_bp.record_once(_register)
