"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify

ops_bp = Blueprint("ops", __name__)


@ops_bp.get("/health")
def health():
    """The process is alive and answering."""
    return jsonify(status="ok", pid=os.getpid())


@ops_bp.get("/live")
def live():
    return jsonify(status="ok")


@ops_bp.get("/ready")
def ready():
    """Ready when the config is loaded, routes are built and the mesh view is usable."""
    gateway = current_app.extensions["odin"]
    ok, why = gateway.mesh.ready()
    body = {
        "status": "ready" if ok else "not ready",
        "reason": why,
        "routes": len(gateway.routes),
        "pid": os.getpid(),
    }
    response = jsonify(body)
    response.status_code = 200 if ok else 503
    return response


def metrics_view():
    gateway = current_app.extensions["odin"]
    payload, content_type = gateway.metrics.render()
    return Response(payload, content_type=content_type)
