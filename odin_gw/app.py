"""The app factory: ``create_app()`` builds a Flask app around one ``Gateway``."""

from __future__ import annotations

import logging
import os

from flask import Flask, g, jsonify, request

from .accesslog import configure_logging
from .config import GatewayConfig, load_config
from .errors import GatewayError
from .gateway import Gateway
from .proxy.exchange import Exchange

log = logging.getLogger("odin_gw")


def create_app(config: GatewayConfig | str | None = None, *, start: bool = True) -> Flask:
    """Build the gateway app.

    ``config`` is a loaded :class:`GatewayConfig`, a path, or ``None`` for the path in
    ``ODIN_CONFIG`` (default ``config.yaml``). Raises :class:`ConfigError` on a bad file.
    ``start`` starts mesh discovery threads (tests of pure routing pass ``False``).
    """
    if not isinstance(config, GatewayConfig):
        config = load_config(config or os.environ.get("ODIN_CONFIG", "config.yaml"))
    configure_logging(config.logging)
    if not os.environ.get("ODIN_NOTICES_LOGGED"):
        for notice in config.notices:
            log.warning("%s", notice)

    app = Flask("odin_gw")
    app.config["MAX_CONTENT_LENGTH"] = None
    gateway = Gateway(config)
    app.extensions["odin"] = gateway

    from .admin import admin_bp
    from .ops import ops_bp
    from .proxy.blueprint import proxy_bp

    app.before_request(_start_exchange)
    if gateway.injectors:
        app.before_request(_mesh_headers)
    app.after_request(_finish_exchange)
    app.register_blueprint(ops_bp)
    app.register_blueprint(admin_bp)
    if config.monitoring.enabled:
        from .ops import metrics_view

        app.add_url_rule(config.monitoring.path, "metrics", metrics_view, methods=["GET"])
    app.register_blueprint(proxy_bp)
    app.register_error_handler(GatewayError, _gateway_error)
    app.register_error_handler(404, _not_found)
    app.register_error_handler(405, _method_not_allowed)
    app.register_error_handler(Exception, _unexpected)
    if start:
        gateway.start()
    return app


def _start_exchange() -> None:
    g.exchange = Exchange(request.environ)


def _mesh_headers() -> None:
    """Let each mesh header injector add what it knows before routing."""
    environ = request.environ
    exchange = g.exchange
    for injector in _gateway().injectors:
        injector.request(exchange, environ)


def _finish_exchange(response):
    exchange: Exchange | None = g.get("exchange")
    if exchange is None:
        return response
    if not exchange.status:
        exchange.status = response.status_code
    if "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = exchange.request_id
    gateway = _gateway()
    metrics = gateway.metrics
    access_log = gateway.access_log

    def done() -> None:
        seconds = exchange.elapsed()
        metrics.observe(
            exchange.service, exchange.method, exchange.status, seconds, exchange.error_kind
        )
        if access_log is not None:
            access_log.record(exchange, seconds)

    response.call_on_close(done)
    return response


def _gateway() -> Gateway:
    from flask import current_app

    return current_app.extensions["odin"]


def error_response(status: int, code: str, message: str, **extra):
    """The one JSON error shape: ``{"error", "code", "requestId", ...}``."""
    exchange = g.get("exchange")
    body = {"error": message, "code": code}
    if exchange is not None:
        body["requestId"] = exchange.request_id
        exchange.status = status
    body.update({k: v for k, v in extra.items() if v is not None})
    response = jsonify(body)
    response.status_code = status
    return response


def _gateway_error(exc: GatewayError):
    return error_response(exc.status, exc.code, exc.message, **exc.details)


def _not_found(exc):
    return error_response(404, "not_found", "not found", path=request.path)


def _method_not_allowed(exc):
    return error_response(405, "method_not_allowed", f"{request.method} not allowed here")


def _unexpected(exc: Exception):
    from werkzeug.exceptions import HTTPException

    if isinstance(exc, HTTPException):
        return error_response(exc.code or 500, "http_error", exc.description or exc.name)
    log.exception("unexpected error handling %s %s", request.method, request.path)
    return error_response(500, "internal_error", "internal gateway error")
