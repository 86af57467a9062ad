"""Logging set-up and the one-line-per-request access log."""

from __future__ import annotations

import json
import logging
import sys
import time

from .config.model import LoggingConfig
from .proxy.exchange import Exchange

access_log = logging.getLogger("odin_gw.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(cfg: LoggingConfig) -> None:
    """Send the ``odin_gw`` loggers to stderr at ``cfg.level`` (idempotent)."""
    root = logging.getLogger("odin_gw")
    root.setLevel(cfg.level.upper())
    root.propagate = False
    formatter: logging.Formatter
    if cfg.json:
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
        )
    for handler in list(root.handlers):
        if getattr(handler, "_odin", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._odin = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    root.addHandler(handler)


def log_access(exchange: Exchange, seconds: float) -> None:
    """Write the access line for a finished request."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields = {
        "requestId": exchange.request_id,
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "service": exchange.service,
        "target": exchange.target,
        "durationMs": round(seconds * 1000, 2),
        "bytes": exchange.response_bytes,
    }
    if exchange.error_kind:
        fields["error"] = exchange.error_kind
    access_log.info(
        "%s %s %s %s service=%s target=%s %.1fms %dB%s",
        exchange.request_id, exchange.method, exchange.path, exchange.status,
        exchange.service or "-", exchange.target or "-", seconds * 1000,
        exchange.response_bytes, f" error={exchange.error_kind}" if exchange.error_kind else "",
        extra={"fields": fields},
    )
