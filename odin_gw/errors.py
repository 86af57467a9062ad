"""One exception root for the gateway, mapped to HTTP answers in one place (``app.py``)."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    status = 500
    code = "gateway_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` lists every ``path: reason``."""

    code = "config_error"

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = sorted(set(problems))
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid configuration:\n  " + "\n  ".join(self.problems))


class BadRequest(GatewayError):
    """The client's request cannot be forwarded as it is."""

    status = 400
    code = "bad_request"


class ClientDisconnected(BadRequest):
    """The client went away before its request body was complete."""

    code = "client_disconnected"


class MethodRefused(GatewayError):
    """A method the gateway never forwards, or one a gateway path does not take."""

    status = 405
    code = "method_not_allowed"


class UnsupportedTransferEncoding(GatewayError):
    """The request body uses a transfer coding other than ``chunked`` alone (nginx: 501)."""

    status = 501
    code = "unsupported_transfer_encoding"


class RouteNotFound(GatewayError):
    """No route's base path matches the request path."""

    status = 404
    code = "no_route"


class NoHealthyTarget(GatewayError):
    """The route's service has no instance that may receive traffic."""

    status = 503
    code = "no_healthy_target"


class ServiceOverloaded(GatewayError):
    """The service's ``circuitBreaker.maxConcurrent`` requests are in flight already: the
    request is refused at once (Envoy's overflow), nothing is sent upstream."""

    status = 503
    code = "service_overloaded"
    headers = (("Retry-After", "1"),)


class UpstreamError(GatewayError):
    """The chosen target failed; the request may or may not have reached it."""

    status = 502
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """The target refused the connection or could not be reached; nothing was sent."""

    code = "upstream_unreachable"


class UpstreamTlsError(UpstreamUnreachable):
    """The TLS handshake with the target failed; nothing was sent."""

    code = "upstream_tls_error"


class UpstreamIdentityError(UpstreamTlsError):
    """The target's certificate is valid but names another workload identity."""

    code = "upstream_identity_mismatch"


class UpstreamProtocolError(UpstreamError):
    """The target's answer head breaks HTTP framing or header rules; nothing is relayed."""

    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    """The target did not connect or send its answer head within the route's timeout."""

    status = 504
    code = "upstream_timeout"


class MeshError(GatewayError):
    """A control plane could not be asked, or answered something unusable."""

    code = "mesh_error"
