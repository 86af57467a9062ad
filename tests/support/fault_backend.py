"""A backend in its own process, for fault injection: killed with SIGKILL (its
connections die with it, as a crashed server's do), restarted on the same port, and
switched between behaviours over HTTP while it runs.

Run as ``python -m tests.support.fault_backend --port P --name N``. Control paths (never
counted): ``POST /__mode?status=503&delay_ms=0&reset=POST`` sets how every other request
is answered (``reset``: methods whose requests are read, then the connection is reset
without an answer); ``GET /__stats`` gives ``{"requests": n, "methods": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

ROOT = Path(__file__).resolve().parents[2]


class _State:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.status = 200
        self.delay = 0.0
        self.reset: frozenset[str] = frozenset()
        self.requests = 0
        self.methods: dict[str, int] = {}
        self.paths: dict[str, int] = {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, doc: dict) -> None:
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _handle(self) -> None:
        st = self.state
        parts = urlsplit(self.path)
        self._body()
        if parts.path == "/__mode":
            q = parse_qs(parts.query)
            with st.lock:
                st.status = int(q.get("status", ["200"])[0])
                st.delay = float(q.get("delay_ms", ["0"])[0]) / 1000
                st.reset = frozenset(m for m in q.get("reset", [""])[0].split(",") if m)
            self._reply(200, {"ok": True})
            return
        if parts.path == "/__stats":
            with st.lock:
                doc = {"requests": st.requests, "methods": st.methods, "paths": st.paths}
            self._reply(200, doc)
            return
        with st.lock:
            st.requests += 1
            st.methods[self.command] = st.methods.get(self.command, 0) + 1
            st.paths[parts.path] = st.paths.get(parts.path, 0) + 1
            status, delay, reset = st.status, st.delay, st.reset
        if self.command in reset:
            # SO_LINGER 0: close() sends RST, the answer never comes.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if delay:
            time.sleep(delay)
        self._reply(status, {"server": st.name, "method": self.command, "path": parts.path})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def serve(port: int, name: str) -> None:
    handler = type("Handler", (_Handler,), {"state": _State(name)})
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.serve_forever(poll_interval=0.05)


class FaultBackend:
    """The backend process, seen from a test."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    def start(self, timeout: float = 10.0) -> FaultBackend:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fault_backend",
                "--port",
                str(self.port),
                "--name",
                self.name,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"backend {self.name} exited at start") from None
                time.sleep(0.02)
        raise RuntimeError(f"backend {self.name} did not listen within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the process and every connection it held are gone at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def mode(self, status: int = 200, delay_ms: int = 0, reset: str = "") -> None:
        r = self.session.post(
            f"{self.url}/__mode",
            params={"status": status, "delay_ms": delay_ms, "reset": reset},
            timeout=5,
        )
        r.raise_for_status()

    def stats(self) -> dict:
        r = self.session.get(f"{self.url}/__stats", timeout=5)
        r.raise_for_status()
        return r.json()

    def requests(self) -> int:
        return self.stats()["requests"]

    def stop(self) -> None:
        self.session.close()
        self.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    serve(args.port, args.name)


if __name__ == "__main__":
    main()
