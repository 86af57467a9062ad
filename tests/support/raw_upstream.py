"""A scripted raw-socket upstream on loopback: it answers with exactly the bytes a test gives.

Each accepted connection plays one script: a list of :class:`Reply` steps, one per
request. A step reads the request head (and, unless told not to, its body as framed by
Content-Length or chunked), then writes its bytes as given: at once, after a delay, or a
few bytes at a time (drip); then keeps the connection, closes it, closes it while
unread body bytes are pending (the kernel sends a reset), or stalls. Every connection
records what it received. Everything is bounded: socket timeouts on every read and
write, and a join with a timeout on stop.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

IO_TIMEOUT = 10.0


@dataclass
class Reply:
    """One step of a connection's script.

    ``data``: bytes written after the request is read. ``read_body``: read the body
    before answering (False: answer right after the head, as a server refusing an upload
    does). ``delay``: seconds to wait before writing. ``drip``: write ``drip_size`` bytes
    every ``drip`` seconds. ``then``: ``"keep"`` (next step on this connection),
    ``"close"`` (orderly close), ``"linger"`` (shut down writing, drain what the peer
    still sends, then close: the nginx way), ``"stall"`` (keep the connection open and
    silent for ``stall`` seconds, then close).
    """

    data: bytes = b""
    read_body: bool = True
    delay: float = 0.0
    drip: float | None = None
    drip_size: int = 1
    then: str = "keep"
    stall: float = 0.0


@dataclass
class Received:
    """One request as the upstream saw it."""

    head: bytes
    body: bytes = b""

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def header(self, name: str) -> str | None:
        values = self.headers(name)
        return values[0] if values else None

    def headers(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == name.lower():
                out.append(value.strip())
        return out


@dataclass
class Connection:
    """What one connection received, request by request."""

    requests: list[Received] = field(default_factory=list)
    peer_cert: dict | None = None
    alpn: str | None = None  # the protocol ALPN settled on (TLS only)
    closed: threading.Event = field(default_factory=threading.Event)


class RawUpstream:
    """``RawUpstream(script_1, script_2, ..., default=...)``: connection *i* plays
    ``script_i`` (a list of :class:`Reply`), later connections ``default`` (if given,
    else the last script). Use as a context manager; ``port``, ``url``, ``connections``.
    ``tls``: a server ``SSLContext`` to wrap accepted sockets with.
    """

    def __init__(
        self,
        *scripts: list[Reply],
        default: list[Reply] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.scripts = list(scripts)
        self.default = default if default is not None else (self.scripts[-1] if scripts else [])
        self.tls = tls
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> RawUpstream:
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    @property
    def requests(self) -> list[Received]:
        """Every request received, in connection order."""
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    def wait_closed(self, index: int, timeout: float = 5.0) -> bool:
        """True once connection ``index`` is closed (by either side)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if index < len(self.connections):
                    conn = self.connections[index]
                    break
            time.sleep(0.01)
        else:
            return False
        return conn.closed.wait(max(0.0, deadline - time.monotonic()))

    # -- serving -----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        deadline = time.monotonic() + 600  # bounded whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                index = len(self.connections)
                record = Connection()
                self.connections.append(record)
            script = self.scripts[index] if index < len(self.scripts) else self.default
            thread = threading.Thread(target=self._serve, args=(sock, script, record), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket, script: list[Reply], record: Connection) -> None:
        sock.settimeout(IO_TIMEOUT)
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
                record.peer_cert = sock.getpeercert()
                record.alpn = sock.selected_alpn_protocol()
            reader = _Reader(sock)
            for step in script:
                head = reader.head()
                if head is None:
                    return
                received = Received(head)
                with self._lock:
                    record.requests.append(received)
                if step.read_body:
                    received.body = reader.body(head)
                if step.delay:
                    self._stop.wait(step.delay)
                self._write(sock, step)
                if step.then == "close":
                    return
                if step.then == "linger":
                    _linger(sock)
                    return
                if step.then == "stall":
                    self._stop.wait(step.stall)
                    return
            # Script done: wait for the peer to close; a request beyond the script closes
            # the connection unanswered (a keep-alive the server has dropped).
            reader.wait_eof(self._stop)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            try:
                sock.close()
            finally:
                record.closed.set()

    def _write(self, sock: socket.socket, step: Reply) -> None:
        if not step.drip:
            if step.data:
                sock.sendall(step.data)
            return
        data = step.data
        for i in range(0, len(data), step.drip_size):
            if self._stop.is_set():
                return
            sock.sendall(data[i : i + step.drip_size])
            self._stop.wait(step.drip)


def _linger(sock: socket.socket) -> None:
    """Shut down writing, read (and drop) what the peer still sends, then close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    except OSError:
        pass


class _Reader:
    """Reads request heads and bodies from one socket, keeping what was read past them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def body(self, head: bytes) -> bytes:
        received = Received(head)
        if "chunked" in (received.header("Transfer-Encoding") or "").lower():
            return self._chunked()
        length = int(received.header("Content-Length") or 0)
        while len(self.buf) < length:
            if not self._fill():
                raise ValueError("peer closed mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ValueError("peer closed mid-chunk")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():
                    pass
                return out
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise ValueError("peer closed mid-chunk")
            out += self.buf[:size]
            self.buf = self.buf[size + 2 :]

    def wait_eof(self, stop: threading.Event) -> None:
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + IO_TIMEOUT
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                self.sock.recv(65536)
                return  # end of file, or a request beyond the script: close
            except TimeoutError:
                continue
