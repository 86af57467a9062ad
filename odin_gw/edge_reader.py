"""Reading the rest of a request in a thread, with every wait on the client bounded.

The edge worker (:mod:`odin_gw.edge_worker`) hands a request to a thread with what its
event loop read. :class:`EdgeUnreader` gives gunicorn's parser those bytes first, then
reads the socket: without waiting when data is there, else no longer than the head
deadline or the minimum body rate allow. :class:`TimeoutAnswer` turns the app's answer
to a body that was too slow into the ``408`` the client is owed, and offers the app the
:class:`ConnectionHandover` of the request (``environ["odin.handover"]``).
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import threading
import time

from gunicorn.http.body import LengthReader
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import SocketUnreader
from gunicorn.http.wsgi import Response as GunicornResponse

from .edge_limits import (
    BodyTooSlow,
    ClientTooSlow,
    EdgeLimits,
    HeadTimeout,
    timeout_answer,
    timeout_detail,
)


class EdgeUnreader(SocketUnreader):
    """gunicorn's socket unreader, primed by the event loop; every wait on the client is bounded.

    A read takes what the socket holds without waiting; only when it holds nothing does
    it wait: for a head (the loop hands over an unfinished one only when it breaks a
    limit) until the head deadline, for a body as long as the minimum-rate rule allows,
    counting only the time spent waiting for the client.
    """

    def __init__(self, sock, limits: EdgeLimits, report) -> None:
        super().__init__(sock)
        self.limits = limits
        self.report = report  # report(phase, detail): the worker's SlowClientLog
        self.head_deadline = math.inf
        self.req = None
        self.received = 0
        self.waited = 0.0
        self.too_slow = False
        self.detail = ""
        self._poll: select.poll | None = None

    def prime(self, data: bytes, head_deadline: float) -> None:
        """A new request: ``data`` is what the event loop read for it."""
        self.unread(data)
        self.head_deadline = head_deadline
        self.req = None
        self.too_slow = False

    def begin_body(self, req) -> None:
        """The head of ``req`` is parsed; from now on reads are body reads."""
        self.req = req
        self.buf.seek(0, os.SEEK_END)
        self.received = self.buf.tell()
        self.waited = 0.0

    def chunk(self, size_hint=None):
        size = self.mxchunk  # as SocketUnreader.chunk
        if size_hint and size_hint > size:
            size = min(size_hint, self.max_body_chunk)
        try:  # data waiting (the usual case): no poll
            data = self.sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._wait()
            data = self.sock.recv(size)
        self.received += len(data)
        return data

    def _wait(self) -> None:
        """Wait until the client sends more, or raise when it is too slow."""
        if self.req is None:
            remaining = self.head_deadline - time.monotonic()
            if remaining <= 0 or not self._readable(remaining):
                self._trip(HeadTimeout(timeout_detail("head", self.limits)))
            return
        # Two bounds, whichever ends first: the minimum rate, and the kernel receive
        # timeout the forwarder sets on the socket (server.readTimeout, nginx's
        # client_body_timeout) that a poll would otherwise outlast.
        allowed = self.limits.min_rate.allowed(self.received) - self.waited
        idle = _receive_timeout(self.sock)
        wait = min(allowed, idle)
        if wait == math.inf:
            return  # no limit: a blocking read, as under gthread
        if wait > 0:
            start = time.monotonic()
            ready = self._readable(wait)
            self.waited += time.monotonic() - start
            if ready:
                return
        if idle < allowed:
            detail = f"no request body received for {idle:g}s"
        else:
            detail = timeout_detail("body", self.limits)
        self._trip(BodyTooSlow(detail))

    def _readable(self, timeout: float) -> bool:
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock.fileno(), select.POLLIN)
        return bool(self._poll.poll(math.ceil(timeout * 1000)))

    def _trip(self, exc: ClientTooSlow) -> None:
        self.too_slow = True
        self.detail = exc.message
        if self.req is not None:
            self.req.force_close()
        self.report(exc.phase, exc.message)
        raise exc


class EdgeParser(RequestParser):
    """gunicorn's request parser reading through an :class:`EdgeUnreader`."""

    def __init__(self, cfg, source, source_addr, unreader: EdgeUnreader) -> None:
        super().__init__(cfg, source, source_addr)
        self.unreader = unreader

    def finish_body(self, deadline=None, max_bytes=None) -> bool:
        """gunicorn drains the previous body before each request and again before keeping
        the connection; each drain sets and restores the socket timeout (two ``fcntl``
        calls). A length-framed body read to its end (every GET) has nothing to drain."""
        body = getattr(self.mesg, "body", None)
        reader = getattr(body, "reader", None)
        if (
            type(reader) is LengthReader
            and reader.length == 0
            and not body.failed
            and not body.buf.getbuffer().nbytes
        ):
            return True
        return super().finish_body(deadline=deadline, max_bytes=max_bytes)


def _receive_timeout(sock) -> float:
    """The socket's ``SO_RCVTIMEO`` in seconds (``inf`` when not set)."""
    try:
        sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    except (OSError, AttributeError, struct.error):
        return math.inf
    return sec + usec / 1e6 or math.inf


#: The environ key of the request's :class:`ConnectionHandover`.
HANDOVER = "odin.handover"


class CurrentRequest(threading.local):
    """Per request thread: what the worker knows of the request being served.

    ``unreader``: the unreader of a request whose body is still streaming. ``conn``: the
    gthread connection of an HTTP/1.x request (``None`` while an HTTP/2 stream is
    served). ``start_response``: gunicorn's, as it was handed to the app.
    """

    unreader: EdgeUnreader | None = None
    conn = None
    start_response = None


class ConnectionHandover:
    """Lets the app take the client connection of the HTTP/1.1 request it serves.

    An app that switches protocols (an ``Upgrade`` tunnel, see
    :mod:`odin_gw.proxy.tunnel`) calls :meth:`take` when it is about to write its own
    answer head: from then on gunicorn writes nothing on the connection (its response
    counts as sent) and closes it once the app's answer is done; the app gets the
    socket and the bytes the client sent past the request head, which the worker had
    already read. One object per worker; what it hands over is the calling thread's.
    """

    def __init__(self, current: CurrentRequest, alive) -> None:
        self._current = current
        self._alive = alive  # the worker's liveness: False once it is stopping

    def available(self) -> bool:
        """Whether this thread serves an HTTP/1.x request whose connection can be taken."""
        current = self._current
        return current.conn is not None and _gunicorn_response(current) is not None

    def take(self):
        """``(socket, bytes already read past the request head)``; gunicorn writes
        nothing more on the connection and closes it after the answer."""
        current = self._current
        resp = _gunicorn_response(current)
        if current.conn is None or resp is None:
            raise RuntimeError("no HTTP/1.x connection to hand over in this thread")
        if resp.headers_sent:
            raise RuntimeError("the answer head was sent already")
        resp.headers_sent = True  # the app writes its own head
        resp.force_close()
        conn = current.conn
        return conn.sock, conn.parser.unreader.take_buffered()

    def close_after(self) -> None:
        """gunicorn closes the connection after this answer (``Connection: close``)."""
        resp = _gunicorn_response(self._current)
        if resp is not None:
            resp.force_close()

    def stopping(self) -> bool:
        """Whether the worker is shutting down (long-lived answers should end)."""
        return not self._alive()


def _gunicorn_response(current: CurrentRequest):
    # gthread calls the app with its Response's bound start_response (an HTTP/2 stream's
    # is another class): the answer whose writes and keep-alive a handover governs.
    owner = getattr(current.start_response, "__self__", None)
    return owner if type(owner) is GunicornResponse else None


class TimeoutAnswer:
    """The WSGI app, answering ``408`` for a request whose streamed body was too slow.

    The forwarder turns the failed body read into its own ``400 client_disconnected``;
    the client is told what happened instead, with ``Connection: close``. The app is
    ``__wrapped__``. With a ``handover``, each request's environ offers it as
    ``environ["odin.handover"]``.
    """

    def __init__(
        self, app, current: CurrentRequest, handover: ConnectionHandover | None = None
    ) -> None:
        self.__wrapped__ = app
        self._current = current
        self._handover = handover

    def __call__(self, environ, start_response):
        current = self._current
        current.start_response = start_response
        if self._handover is not None:
            environ[HANDOVER] = self._handover
        unreader = current.unreader
        if unreader is None:  # the whole request was buffered: nothing left to time out
            return self.__wrapped__(environ, start_response)
        replaced: list[bool] = []

        def start(status, headers, exc_info=None):
            replaced.append(unreader.too_slow)
            if unreader.too_slow:
                status, headers, _ = timeout_answer(unreader.detail)
            return start_response(status, headers, exc_info)

        try:
            result = self.__wrapped__(environ, start)
        except ClientTooSlow:
            result = ()
        if not unreader.too_slow or replaced[-1:] == [False]:
            return result  # not too slow, or the app answered before the body failed
        close = getattr(result, "close", None)
        if close is not None:
            close()
        status, headers, body = timeout_answer(unreader.detail)
        if not replaced:
            start_response(status, headers)
        return [body]
