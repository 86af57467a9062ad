"""A slow loopback upstream that records peak concurrent in-flight requests.

Requests whose path contains ``PROBE_MARKER`` sleep ``delay`` seconds and
are counted; anything else (e.g. gateway health checks) is answered at once
and not counted.  Used in-process by bench/run.py for the concurrency check.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROBE_MARKER = "concurrency-probe"
_BODY = b'{"ok":true,"service":"slow"}'


class SlowUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.2) -> None:
        self.delay = delay
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.served = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so a pooling client can reuse
            timeout = 15  # idle keep-alive connections end in bounded time

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if PROBE_MARKER in self.path:
                    upstream._enter()
                    try:
                        time.sleep(upstream.delay)
                    finally:
                        upstream._leave()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(_BODY)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(_BODY)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

            def log_message(self, format, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # 64 simultaneous connects must not hit the backlog

        self._server = Server((host, port), Handler)
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.served += 1
            self.peak = max(self.peak, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def reset(self) -> None:
        with self._lock:
            self.peak = self.in_flight
            self.served = 0

    def start(self) -> SlowUpstream:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
