"""Admin JSON API under ``/admin/``, behind a bearer token compared in constant time."""

from __future__ import annotations

import hmac
import os

from flask import Blueprint, current_app, jsonify, request

from .admin_openapi import openapi_view
from .admin_stats import stats_view
from .dashboard import PUBLIC_ENDPOINTS, asset_view, dashboard_view
from .errors import GatewayError
from .mesh.snapshot import Endpoint
from .reload import reload_view
from .tap import tap_view

admin_bp = Blueprint("admin", __name__, url_prefix="/admin")
admin_bp.add_url_rule("/tap", "tap", tap_view, methods=["GET"])  # odin_gw/tap.py
admin_bp.add_url_rule("/reload", "reload", reload_view, methods=["GET", "POST"])
admin_bp.add_url_rule("/stats", "stats", stats_view, methods=["GET"])  # odin_gw/admin_stats.py
admin_bp.add_url_rule("/openapi.json", "openapi", openapi_view, methods=["GET"])
# The dashboard (odin_gw/dashboard.py): page and files need no token, they hold no data.
admin_bp.add_url_rule("/", "dashboard", dashboard_view, methods=["GET"])
admin_bp.add_url_rule("/ui/<path:name>", "dashboard_asset", asset_view, methods=["GET"])


class AdminDenied(GatewayError):
    """No admin token is configured: every admin request is refused."""

    status = 403
    code = "admin_disabled"


class AdminUnauthorized(GatewayError):
    """The request carries no valid admin bearer token."""

    status = 401
    code = "unauthorized"


@admin_bp.before_request
def _authorize() -> None:
    token = current_app.extensions["odin"].config.admin.token
    if not token:
        raise AdminDenied("admin API disabled: set admin.token to enable it")
    if request.endpoint in PUBLIC_ENDPOINTS:
        return  # the dashboard's page and files; the data it reads needs the token
    if not bearer_matches(request.headers.get("Authorization", ""), token):
        raise AdminUnauthorized("missing or wrong admin bearer token")


def bearer_matches(header: str, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` exactly (scheme in any case).

    The comparison takes the same time whatever prefix matches.
    """
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@admin_bp.after_request
def _no_store(response):
    response.headers["Cache-Control"] = "no-store"
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="odin-admin"'
    return response


@admin_bp.get("/routes")
def routes():
    """Every service's route: where requests go (rules, split, groups) and the policy
    each request gets, with where each value came from (config or the mesh)."""
    gateway = current_app.extensions["odin"]
    split_counts = gateway.metrics.totals("odin_split_requests")
    return jsonify(routes=[_route_doc(r, gateway, split_counts) for r in gateway.routes.entries])


def _route_doc(r, gateway, split_counts) -> dict:
    from .route_doc import describe_route

    return describe_route(r, gateway, split_counts)


@admin_bp.get("/services")
def services():
    gateway = current_app.extensions["odin"]
    snap = gateway.mesh.snapshot
    age = snap.age()
    out = []
    for route in gateway.routes:
        service, active, dc = gateway.view(route)
        active_keys = {e.key for e in active}
        doc = {
            "name": route.name,
            "basePath": route.base_path,
            "meshService": route.mesh_service,
            "source": service.source,
            "servingDatacenter": dc,
            "datacenters": [d for d in service.datacenters if d],
            "targets": [_endpoint(e, route, e.key in active_keys) for e in service.endpoints],
        }
        doc.update(_resilience(route, gateway, service, active))
        if route.proxy_balances:
            doc["sidecar"] = _linkerd_ingress(route, gateway)
        elif route.sidecar is not None:
            doc["sidecar"] = _sidecar(route, gateway.mesh.mesh.kind)
        out.append(doc)
    return jsonify(
        mesh=gateway.mesh.mesh.kind,
        snapshotAgeSeconds=None if age is None else round(age, 3),
        snapshotVersion=snap.version,
        services=out,
    )


class UnknownService(GatewayError):
    """The admin request names a service the configuration does not have."""

    status = 404
    code = "unknown_service"


@admin_bp.get("/services/<path:name>")
def service(name: str):
    """One service as ``/admin/services`` shows it, plus its mesh route policy: where it
    comes from, its routes (first match wins), the annotations, what was wrong."""
    gateway = current_app.extensions["odin"]
    route = next((r for r in gateway.routes if r.name == name), None)
    if route is None:
        raise UnknownService(f"no service {name!r}", service=name)
    listing = services().get_json()  # the very view /admin/services builds
    doc = next(s for s in listing["services"] if s["name"] == name)
    doc["policy"] = gateway.policy(route).describe()
    doc["snapshotVersion"] = listing["snapshotVersion"]
    return jsonify(doc)


def _sidecar(route, mesh: str) -> dict:
    """Where a sidecar-mode route's requests go (every one of them): Consul
    ``connectMode: sidecar`` or Istio ``injectSidecar: true``."""
    ep = route.sidecar
    if mesh == "istio":
        from .mesh.istio import SIDECAR_NOTE as NOTE

        mode = "istio-sidecar"
    else:
        from .mesh.consul_sidecar import NOTE

        mode = "transparent-proxy" if ".virtual." in ep.address else "explicit-upstream"
    return {
        "url": f"http://{ep.host_header}",
        "mode": mode,
        "mtls": "sidecar",
        "loadBalancing": "sidecar",
        "note": NOTE,
        "passive": route.health.status(ep.key),
    }


def _linkerd_ingress(route, gateway) -> dict:
    """Where a Linkerd ingress-mode route's requests go: its cluster name or targets,
    with the ``l5d-dst-override`` the gateway's Linkerd proxy routes by."""
    from .mesh.linkerd import INGRESS_NOTE, LinkerdHeaders

    sends = (route.sidecar,) if route.sidecar is not None else route.static.endpoints
    headers = next((i for i in gateway.injectors if isinstance(i, LinkerdHeaders)), None)
    authority, required, _ = (
        headers.per_route.get(route.name, (None, None, 0.0)) if headers else (None, None, 0.0)
    )
    return {
        "url": [f"{e.scheme}://{e.host_header}" for e in sends],
        "mode": "linkerd-ingress",
        "dstOverride": authority,
        "requireIdentity": required,
        "mtls": "linkerd-proxy",
        "loadBalancing": "linkerd-proxy",
        "note": INGRESS_NOTE,
        "passive": {e.key: route.health.status(e.key) for e in sends},
    }


def _endpoint(e: Endpoint, route, active: bool) -> dict:
    doc = e.to_dict()
    doc["url"] = f"{e.scheme}://{e.address}:{e.port}"
    doc["active"] = active
    doc["passive"] = route.health.status(e.key)
    if route.breakers is not None:
        doc["circuit"] = route.breakers.status(e.key)
    return doc


def _resilience(route, gateway, service, active) -> dict:
    """Service-level resilience state in this worker: panic mode, open circuits, the
    concurrency cap (host-wide), ejections."""
    from .balancer import choose_pool

    everyone = gateway.every_endpoint(route)
    _, panic = choose_pool(active, everyone, route.available, route.panic_threshold)
    doc: dict = {
        "panic": panic,
        "panicThreshold": route.panic_threshold,
        "ejected": route.health.ejected_keys(),
        "worker": os.getpid(),
    }
    if route.breakers is not None:
        doc["openCircuits"] = route.breakers.open_keys()
        doc["circuitRejections"] = route.breakers.rejected
    cap = gateway.concurrency
    if cap is not None and route.max_concurrent:
        doc["concurrency"] = {
            "max": route.max_concurrent,
            "inflight": cap.inflight(route.service),
            "rejected": cap.rejected(route.service),
            "shared": cap.shared,
        }
    return doc


@admin_bp.get("/config")
def config():
    gateway = current_app.extensions["odin"]
    return jsonify(gateway.config.redacted())


@admin_bp.get("/mesh")
def mesh():
    gateway = current_app.extensions["odin"]
    return jsonify(gateway.mesh.status())


@admin_bp.post("/mesh/refresh")
def refresh():
    gateway = current_app.extensions["odin"]
    gateway.mesh.refresh_now()
    response = jsonify(triggered=True, leaderPid=gateway.mesh.snapshot.leader_pid)
    response.status_code = 202
    return response


# GET /admin/ is the dashboard.
@admin_bp.route("/", defaults={"rest": ""}, methods=["POST", "PUT", "DELETE", "PATCH"])
@admin_bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def unknown(rest: str):
    from .errors import RouteNotFound

    raise RouteNotFound("no such admin endpoint", path=request.path)
