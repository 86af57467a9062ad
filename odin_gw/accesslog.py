"""Logging set-up and the one-line-per-request access log."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time

from .config.model import LoggingConfig
from .proxy.exchange import CURRENT, Exchange


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` is merged in. A line
    written while a request runs on the thread carries its ``requestId`` and, when
    traced, ``traceId``."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        exchange = CURRENT.get()
        if exchange is not None:
            doc["requestId"] = exchange.request_id
            if exchange.trace is not None:
                doc["traceId"] = exchange.trace.trace_id
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
    # The OpenTelemetry exporter's own warnings (a collector refusing spans) in the
    # gateway's format, at warning level whatever logging.level says.
    otel = logging.getLogger("opentelemetry")
    otel.setLevel(logging.WARNING)
    otel.propagate = False
    for old in list(otel.handlers):
        if getattr(old, "_odin", False):
            otel.removeHandler(old)
    otel.addHandler(handler)


BATCH_DELAY = 0.05


class AccessLog:
    """The one-line-per-request log, written off the request path in batches.

    ``record`` only appends a tuple to a lock-free queue; a writer thread formats what
    has piled up and writes it with one ``write`` call. A request thread therefore never
    waits on the stderr lock or a syscall for its log line. If the writer falls behind by
    more than ``max_pending`` lines, further lines are dropped and counted (never an
    unbounded queue).
    """

    def __init__(self, json_lines: bool, stream=None, max_pending: int = 50_000) -> None:
        self.json_lines = json_lines
        self.stream = stream
        self.max_pending = max_pending
        self.dropped = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(self, exchange: Exchange, seconds: float) -> None:
        if self._thread is None:
            self._start()
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            return
        self._queue.put((time.time(), exchange, seconds))

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="odin-access-log", daemon=True
                )
                self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued and stop the writer."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            # Let lines pile up briefly: one wake-up (and one GIL hand-off) per batch
            # instead of one per request.
            if item is not None:
                time.sleep(BATCH_DELAY)
            batch = [item]
            while item is not None and len(batch) < 5000:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            lines = [self._format(*entry) for entry in batch if entry is not None]
            if lines:
                stream = self.stream or sys.stderr
                try:
                    stream.write("".join(lines))
                    stream.flush()
                except (OSError, ValueError):
                    pass  # stderr gone (shutdown): nothing sensible left to do
            if batch[-1] is None:
                return

    def _format(self, when: float, exchange: Exchange, seconds: float) -> str:
        if self.json_lines:
            doc = {
                "time": _utc(when),
                "level": "info",
                "logger": "odin_gw.access",
                "message": "request",
                "requestId": exchange.request_id,
                "client": exchange.client_addr or None,
                "method": exchange.method,
                "path": exchange.path,
                "status": exchange.status,
                "service": exchange.service,
                "target": exchange.target,
                "datacenter": exchange.datacenter,
                "durationMs": round(seconds * 1000, 2),
                "bytes": exchange.response_bytes,
            }
            if exchange.error_kind:
                doc["error"] = exchange.error_kind
            trace = exchange.trace
            if trace is not None:
                doc["traceId"] = trace.trace_id
                if trace.span_id is not None:
                    doc["spanId"] = trace.span_id
            # json.dumps escapes control characters (and, ASCII-only, everything else
            # unusual): a decoded %0A stays inside its string.
            return json.dumps(doc) + "\n"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        error = f" error={exchange.error_kind}" if exchange.error_kind else ""
        return (
            f"{stamp},{int(when * 1000) % 1000:03d} INFO [{self._pid}] odin_gw.access: "
            f"{exchange.request_id} {escape(exchange.method)} {escape(exchange.path)} "
            f"{exchange.status} service={exchange.service or '-'} "
            f"target={exchange.target or '-'} client={escape(exchange.client_addr) or '-'} "
            f"{seconds * 1000:.1f}ms {exchange.response_bytes}B{error}\n"
        )


# nginx's access log escaping (ngx_http_log_escape): control characters, '"', '\\', DEL
# and every byte above 0x7E become \xHH. A space is escaped too, because the fields of
# the text line are separated by spaces and not quoted.
_UNSAFE = re.compile(r'[\x00-\x20"\\\x7f-\U0010ffff]')


def _hex(match: re.Match) -> str:
    code = ord(match.group())
    if code <= 0xFF:
        return f"\\x{code:02X}"
    # Only possible outside PATH_INFO (which holds bytes as Latin-1): the UTF-8 bytes.
    return "".join(f"\\x{b:02X}" for b in match.group().encode("utf-8", "surrogatepass"))


def escape(text: str) -> str:
    """``text`` safe for one field of a text log line (see ``_UNSAFE``)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_hex, text)


def _utc(when: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z"
    )
