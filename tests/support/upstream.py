"""A real HTTP/1.1 upstream on loopback for integration tests (plain or mutual TLS).

It echoes what it received as JSON, and has paths for the cases a proxy must get right:
slow answers, large streamed bodies, gzip, repeated headers, uploads it hashes as they
stream in. It counts requests and the peak number in flight.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body_chunks(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed mid-chunk")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 65536))
                    if not data:
                        raise ConnectionError("client closed mid-chunk")
                    left -= len(data)
                    yield data
                self.rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    raise ConnectionError(f"client closed with {left} bytes unsent")
                left -= len(data)
                yield data

    def _handle(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.inflight += 1
            srv.peak = max(srv.peak, srv.inflight)
        try:
            self._serve()
        finally:
            with srv.lock:
                srv.inflight -= 1

    def _serve(self) -> None:
        srv = self.server
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        digest = hashlib.sha256()
        size = 0
        try:
            for chunk in self._body_chunks():
                digest.update(chunk)
                size += len(chunk)
        except (ConnectionError, OSError, ValueError) as exc:
            with srv.lock:
                srv.incomplete_uploads.append(f"{exc} after {size} bytes")
            self.close_connection = True
            return
        record = {
            "server": srv.name,
            "method": self.command,
            "path": parts.path,
            "rawPath": self.path,
            "query": parts.query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "bodyBytes": size,
            "bodySha256": digest.hexdigest(),
            "peer": self._peer_identity(),
        }
        with srv.lock:
            srv.seen.append(record)
        # Behaviour is chosen by a path segment anywhere, so prefixes need no stripping.
        segments = parts.path.split("/")
        if "slow" in segments:
            time.sleep(float(query.get("ms", ["200"])[0]) / 1000)
        if "status" in segments:
            code = int(segments[segments.index("status") + 1])
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "big" in segments:
            self._big(int(query.get("bytes", ["1048576"])[0]), "chunked" in query)
            return
        if "gzip" in segments:
            payload = gzip.compress(b"hello gzip world " * 100, mtime=0)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if "cookies" in segments:
            payload = b"cookies"
            self.send_response(200)
            self.send_header("Set-Cookie", "a=1; Path=/")
            self.send_header("Set-Cookie", "b=2; Path=/")
            self.send_header("Connection", "X-Hop")
            self.send_header("X-Hop", "must-not-pass")
            self.send_header("Keep-Alive", "timeout=5")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if "nolength" in segments:
            # No Content-Length, no chunking: the body ends when the connection closes.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until close")
            self.close_connection = True
            return
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _big(self, total: int, chunked: bool) -> None:
        block = b"x" * 65536
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(total))
        self.end_headers()
        left = total
        while left:
            n = min(left, len(block))
            if chunked:
                self.wfile.write(f"{n:x}\r\n".encode() + block[:n] + b"\r\n")
            else:
                self.wfile.write(block[:n])
            left -= n
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _peer_identity(self) -> list[str]:
        sock = self.connection
        if isinstance(sock, ssl.SSLSocket):
            cert = sock.getpeercert() or {}
            return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        return []

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: socketserver's default of 5 drops SYNs
    allow_reuse_address = True

    def __init__(self, name: str, tls: ssl.SSLContext | None, port: int = 0) -> None:
        self.name = name
        self.tls = tls
        self.lock = threading.Lock()
        self.requests = 0
        self.inflight = 0
        self.peak = 0
        self.seen: list[dict] = []
        self.incomplete_uploads: list[str] = []
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            sock.settimeout(10)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request, client_address):
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                with self.lock:
                    self.handshake_failures.append(str(exc))
                return
            request.settimeout(None)
        super().finish_request(request, client_address)

    handshake_failures: list[str]


class Upstream:
    """``with Upstream("a") as up: up.url`` — a threaded upstream on 127.0.0.1."""

    def __init__(
        self, name: str = "upstream", tls: ssl.SSLContext | None = None, port: int = 0
    ) -> None:
        self._server = _Server(name, tls, port)
        self._server.handshake_failures = []
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.name = name
        self.port = self._server.server_address[1]
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def requests(self) -> int:
        return self._server.requests

    @property
    def peak(self) -> int:
        return self._server.peak

    @property
    def seen(self) -> list[dict]:
        with self._server.lock:
            return list(self._server.seen)

    @property
    def incomplete_uploads(self) -> list[str]:
        with self._server.lock:
            return list(self._server.incomplete_uploads)

    @property
    def handshake_failures(self) -> list[str]:
        with self._server.lock:
            return list(self._server.handshake_failures)


def mtls_server_context(cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    """A server context that demands a client certificate from ``ca_path``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
