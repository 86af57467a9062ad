"""Raw-socket HTTP/1.1 for edge tests: send exact bytes, read exactly what comes back.

A proxy's edge behaviour (framing, malformed heads, slow senders) cannot be tested with a
client library that fixes messages up; these helpers put bytes on a loopback socket and
parse answers by hand, with a deadline on every read.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


def connect(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class RawReader:
    """Reads responses from one socket; keeps bytes read past a response for the next."""

    def __init__(self, sock: socket.socket, deadline: float = 10.0) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = deadline

    def _fill(self, until: float) -> bool:
        self.sock.settimeout(max(0.01, until - time.monotonic()))
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> RawResponse:
        until = time.monotonic() + self.deadline
        while b"\r\n\r\n" not in self.buf:
            if time.monotonic() > until or not self._fill(until):
                raise ConnectionError(f"no complete response head; got {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        _version, status, *reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return RawResponse(int(status), reason[0] if reason else "", headers)

    def read_response(self, head_only: bool = False) -> RawResponse:
        """One whole response; ``head_only`` for answers to HEAD."""
        resp = self.read_head()
        if head_only or resp.status in (204, 304) or resp.status < 200:
            return resp
        until = time.monotonic() + self.deadline
        te = (resp.header("Transfer-Encoding") or "").lower()
        length = resp.header("Content-Length")
        if "chunked" in te:
            resp.body = self._chunked(until)
        elif length is not None:
            n = int(length)
            while len(self.buf) < n:
                if time.monotonic() > until or not self._fill(until):
                    raise ConnectionError(f"body cut at {len(self.buf)} of {n}")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:  # read to close
            while time.monotonic() < until and self._fill(until):
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def _chunked(self, until: float) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                if time.monotonic() > until or not self._fill(until):
                    raise ConnectionError("chunk size line cut")
            line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n" not in self.buf:
                    if not self._fill(until):
                        raise ConnectionError("trailer cut")
                while not self.buf.startswith(b"\r\n"):
                    _, self.buf = self.buf.split(b"\r\n", 1)
                    while b"\r\n" not in self.buf:
                        if not self._fill(until):
                            raise ConnectionError("trailer cut")
                self.buf = self.buf[2:]
                return out
            while len(self.buf) < size + 2:
                if time.monotonic() > until or not self._fill(until):
                    raise ConnectionError("chunk cut")
            out += self.buf[:size]
            self.buf = self.buf[size + 2 :]

    def closed(self, wait: float = 2.0) -> bool:
        """True when the peer closes the connection within ``wait`` seconds."""
        until = time.monotonic() + wait
        try:
            while time.monotonic() < until:
                if not self._fill(until):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True
        return False


def exchange(port: int, raw: bytes, head_only: bool = False, timeout: float = 10.0) -> RawResponse:
    """Send ``raw`` on a new connection and read one response."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(raw)
        return RawReader(sock, timeout).read_response(head_only)


def echoed_get(
    port: int, *headers: str, path: str, host: str = "gw"
) -> tuple[RawResponse, dict[str, str]]:
    """``GET path`` with ``headers`` (raw lines) through the gateway to the echoing test
    upstream (``tests.support.upstream``): the answer (which must be 200) and the headers
    the upstream received, by lower-case name; each must have arrived once."""
    import json

    head = "".join(f"{h}\r\n" for h in headers)
    raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{head}Connection: close\r\n\r\n"
    resp = exchange(port, raw.encode("latin-1"))
    assert resp.status == 200, resp.body
    seen: dict[str, str] = {}
    for name, value in json.loads(resp.body)["headers"]:
        assert name.lower() not in seen, f"{name} sent twice"
        seen[name.lower()] = value
    return resp, seen
