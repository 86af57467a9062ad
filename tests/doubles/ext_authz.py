"""An ext_authz HTTP authorizer stand-in: what an Istio CUSTOM provider points at.

A real HTTP/1.1 server on 127.0.0.1 that answers checks the way Envoy's HTTP ext_authz
contract reads them (``ext_authz.proto``, ``ext_authz_http_impl.cc``): 200 allows and its
headers are candidates for the upstream request; any other status denies with that
status, body and headers; 5xx and silence are errors. It records every check request
(method, target, headers, body) and counts TCP connections, so tests can see what the
gateway sent and whether it kept its connection alive.

Answers are scripted: ``authorizer.answer`` is the default (an answer, or a function of
the :class:`Check` returning one), ``authorizer.script(a, b, ...)`` queues answers used
first, one per check. ``closed_port()`` gives an address where no authorizer listens.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.upstream import free_port


@dataclass(frozen=True)
class Allow:
    """``200``: allowed; ``headers`` are offered for the upstream request."""

    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Deny:
    """A denial: the client is to get this status, body and these headers."""

    status: int = 403
    body: bytes = b"denied by policy"
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)


@dataclass(frozen=True)
class Fail:
    """The authorizer itself fails (a 5xx): an error, not a decision."""

    status: int = 500
    body: bytes = b"authorizer broke"


@dataclass(frozen=True)
class Hang:
    """Answer ``then`` only after ``seconds`` (released early when the server stops)."""

    seconds: float
    then: Allow | Deny | Fail = field(default_factory=Allow)


@dataclass(frozen=True)
class Drop:
    """Close the connection without answering (a keep-alive the authorizer closed)."""


@dataclass(frozen=True)
class Raw:
    """Write these bytes as the answer, then close (framing and status edge cases)."""

    data: bytes


Answer = Allow | Deny | Fail | Hang | Drop | Raw


@dataclass(frozen=True)
class Check:
    """One check request as the authorizer received it."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    connection: int  # which TCP connection (1, 2, ...) carried it

    def header(self, name: str) -> str | None:
        """The value of ``name`` (any case), ``None`` when absent; repeats joined."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    @property
    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.connection_no = self.server.connections

    def __getattr__(self, name: str):
        # Any method the gateway forwards (PROPFIND, PURGE, ...) is checked with that
        # method: every do_<METHOD> is the same handler.
        if name.startswith("do_"):
            return self._check
        raise AttributeError(name)

    def _check(self) -> None:
        srv = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        check = Check(
            self.command,
            self.path,
            tuple(self.headers.items()),
            body,
            self.connection_no,
        )
        with srv.lock:
            srv.seen.append(check)
            answer = srv.queued.popleft() if srv.queued else srv.answer
        if callable(answer):
            answer = answer(check)
        self._reply(answer)

    def _reply(self, answer: Answer) -> None:
        if isinstance(answer, Hang):
            self.server.stopping.wait(answer.seconds)
            answer = answer.then
        if isinstance(answer, Drop):
            self.close_connection = True
            return
        if isinstance(answer, Raw):
            self.wfile.write(answer.data)
            self.close_connection = True
            return
        if isinstance(answer, Allow):
            status, body, headers = 200, answer.body, answer.headers
        elif isinstance(answer, Deny):
            status, body, headers = answer.status, answer.body, answer.headers
        else:
            status, body, headers = answer.status, answer.body, ()
        self.send_response(status)  # adds Server and Date, as any HTTP framework does
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.seen: list[Check] = []
        self.queued: collections.deque[Answer] = collections.deque()
        self.answer: Answer | Callable[[Check], Answer] = Allow()
        self.connections = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:
        # A gateway that gave up on a hanging check has closed its end: expected.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Authorizer:
    """``with Authorizer() as authz: authz.url`` — a scripted ext_authz HTTP authorizer."""

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def answer(self) -> Answer | Callable[[Check], Answer]:
        return self._server.answer

    @answer.setter
    def answer(self, answer: Answer | Callable[[Check], Answer]) -> None:
        with self._server.lock:
            self._server.answer = answer

    def script(self, *answers: Answer) -> None:
        """Answer the next checks with ``answers`` in order, then with ``answer``."""
        with self._server.lock:
            self._server.queued.extend(answers)

    @property
    def seen(self) -> list[Check]:
        with self._server.lock:
            return list(self._server.seen)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._server.lock:
            return self._server.connections

    def reset(self) -> None:
        """Forget what was seen and scripted; answer ``Allow()`` again."""
        with self._server.lock:
            self._server.seen.clear()
            self._server.queued.clear()
            self._server.answer = Allow()

    def start(self) -> Authorizer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()  # hanging answers return at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Authorizer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def closed_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago): connection refused."""
    return free_port()
