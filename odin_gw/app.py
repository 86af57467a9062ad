"""The app factory: ``create_app()`` builds a Flask app around one ``Gateway``."""

from __future__ import annotations

import logging
import os
from time import time_ns

from flask import Flask, jsonify, request
from flask.sessions import NullSession, SessionInterface

from . import master_state
from .accesslog import configure_logging, escape
from .config import GatewayConfig, load_config
from .errors import GatewayError
from .gateway import Gateway
from .istio_telemetry import istio_telemetry
from .proxy.exchange import CURRENT, Exchange
from .proxy.forwarder import ProxyResponse
from .proxy.trust import ForwardingTrust

log = logging.getLogger("odin_gw")


def create_app(config: GatewayConfig | str | None = None, *, start: bool = True) -> Flask:
    """Build the gateway app.

    ``config`` is a loaded :class:`GatewayConfig`, a path, or ``None`` for the path in
    ``ODIN_CONFIG`` (default ``config.yaml``); under gunicorn ``None`` means the
    configuration the master validated (:mod:`odin_gw.master_state`, inherited through
    fork), so a file edited but not yet reloaded (or refused on reload) is not what a new
    worker runs. Raises :class:`ConfigError` on a
    bad file. ``start`` starts mesh discovery threads (tests of pure routing pass
    ``False``); an app preloaded in the gunicorn master never starts them there (the
    ``post_worker_init`` hook does, in each worker).
    """
    if config is None:
        # Under gunicorn: the configuration the master validated, inherited through fork.
        config = master_state.LAST_GOOD.get("config")
    if not isinstance(config, GatewayConfig):
        config = load_config(config or os.environ.get("ODIN_CONFIG", "config.yaml"))
    configure_logging(config.logging)
    if not os.environ.get("ODIN_NOTICES_LOGGED"):
        for notice in config.notices:
            log.warning("%s", notice)

    # No static folder: Flask would otherwise answer /static/... itself instead of proxying.
    app = Flask("odin_gw", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = None
    app.session_interface = NoSessions()
    gateway = Gateway(config)
    app.extensions["odin"] = gateway

    from .admin import admin_bp
    from .ops import ops_bp
    from .proxy.blueprint import proxy_bp

    hooks = RequestHooks(gateway)
    app.before_request(hooks.start)
    app.after_request(hooks.finish)
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
    if start and os.environ.get("ODIN_GUNICORN_MASTER_PID") != str(os.getpid()):
        gateway.start()
    return app


class NoSessions(SessionInterface):
    """The gateway keeps no cookie sessions: skip Flask's per-request session work."""

    null_session_class = NullSession

    def open_session(self, app, request):
        return _NULL_SESSION

    def is_null_session(self, obj) -> bool:
        return True

    def save_session(self, app, session, response) -> None:
        return None


_NULL_SESSION = NullSession()

EXCHANGE = "odin.exchange"
GATEWAY = "odin.gateway"


class RequestHooks:
    """The ``before_request``/``after_request`` hooks, bound to one gateway.

    The exchange and the gateway travel in the WSGI environ: one context-local lookup
    (``request.environ``) per hook instead of several through ``g`` and ``current_app``.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metrics = gateway.metrics
        self.access_log = gateway.access_log
        self.injectors = tuple(gateway.injectors)
        self.trust = ForwardingTrust(gateway.config.server.trusted_proxies)
        self.istio = istio_telemetry(gateway)  # None unless Istio with enableTelemetry
        self.tap = gateway.tap  # None unless Linkerd with enableTap
        self.tracer = gateway.tracer  # None unless tracing.enabled

    def start(self) -> None:
        environ = request.environ
        exchange = Exchange(environ)
        CURRENT.set(exchange)
        environ[EXCHANGE] = exchange
        environ[GATEWAY] = self.gateway
        forwarding = self.trust.decide(environ)  # None at once when nothing is trusted
        if forwarding is not None:
            exchange.forwarding = forwarding
            exchange.client_addr = forwarding.client_addr
        for injector in self.injectors:  # mesh headers: trace ids and the like
            injector.request(exchange, environ)

    def finish(self, response):
        environ = request.environ
        exchange: Exchange | None = environ.get(EXCHANGE)
        if exchange is None:
            return response
        if not exchange.status:
            exchange.status = response.status_code
        if type(response) is not ProxyResponse:
            if "X-Request-Id" not in response.headers:
                response.headers["X-Request-Id"] = exchange.request_id  # relayed ones have it
            # The gateway's own answers are whole: their length is what is sent. A relayed
            # body is counted by the forwarder as it goes out (a streamed one chunk by
            # chunk), so its Content-Length must not be added here as well.
            if exchange.method != "HEAD":
                exchange.response_bytes = response.content_length or 0
        metrics = self.metrics
        access_log = self.access_log
        istio = self.istio
        tap = self.tap
        tracer = self.tracer

        def done() -> None:
            seconds = exchange.elapsed()
            if tracer is not None:
                tracer.record(exchange, time_ns())
            metrics.observe(
                exchange.service, exchange.method, exchange.status, seconds, exchange.error_kind
            )
            if access_log is not None:
                access_log.record(exchange, seconds)
            if istio is not None:
                istio.observe(exchange, seconds, environ)
            if tap is not None and tap.active:  # active: some tap is open on the host
                tap.publish(exchange, seconds, environ)

        response.call_on_close(done)
        return response


def error_response(status: int, code: str, message: str, **extra):
    """The one JSON error shape: ``{"error", "code", "requestId", ...}``."""
    exchange = request.environ.get(EXCHANGE)
    body = {"error": message, "code": code}
    if exchange is not None:
        body["requestId"] = exchange.request_id
        exchange.status = status
    body.update({k: v for k, v in extra.items() if v is not None})
    response = jsonify(body)
    response.status_code = status
    return response


def _gateway_error(exc: GatewayError):
    response = error_response(exc.status, exc.code, exc.message, **exc.details)
    for name, value in getattr(exc, "headers", ()):  # e.g. a 429's Retry-After
        response.headers.add(name, value)
    return response


def _not_found(exc):
    return error_response(404, "not_found", "not found", path=request.path)


def _method_not_allowed(exc):
    return error_response(405, "method_not_allowed", f"{request.method} not allowed here")


def _unexpected(exc: Exception):
    from werkzeug.exceptions import HTTPException

    if isinstance(exc, HTTPException):
        return error_response(exc.code or 500, "http_error", exc.description or exc.name)
    log.exception("unexpected error handling %s %s", escape(request.method), escape(request.path))
    return error_response(500, "internal_error", "internal gateway error")
