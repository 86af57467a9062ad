"""Gateway configuration: YAML in, frozen values out."""

from ..errors import ConfigError
from .durations import format_duration, parse_duration
from .loader import build_config, load_config, parse_config
from .model import (
    AdminConfig,
    ConsulConfig,
    GatewayConfig,
    IstioConfig,
    LinkerdConfig,
    LoggingConfig,
    MeshConfig,
    MonitoringConfig,
    ServerConfig,
    ServiceConfig,
    Target,
)

__all__ = [
    "AdminConfig",
    "ConfigError",
    "ConsulConfig",
    "GatewayConfig",
    "IstioConfig",
    "LinkerdConfig",
    "LoggingConfig",
    "MeshConfig",
    "MonitoringConfig",
    "ServerConfig",
    "ServiceConfig",
    "Target",
    "build_config",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
]
