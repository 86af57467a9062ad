"""The ``edge`` gunicorn worker: gthread, but a request takes a thread only once it has arrived.

``server.workerClass: edge`` (the default) runs :class:`EdgeWorker`. It is gunicorn's
gthread worker (event loop, thread pool, keep-alive) with one change of duty, the one
nginx makes: the event loop reads, without blocking, a request's head and, when its
``Content-Length`` is at most ``server.bufferBody``, its whole body; only then does the
request go to a thread, whose gunicorn parser reads those bytes from memory (the parser's
unreader is primed with them, so gunicorn's validation and limits apply unchanged). A
slow or stalled client costs a socket, not a thread.

Limits (``odin_gw.edge_limits``; thread-side reads in ``odin_gw.edge_reader``):

* the head must be complete ``server.headerTimeout`` after the connection was accepted
  (or after the first byte of a later request on a kept-alive connection), else ``408``
  and close; a connection that never sent a byte is closed without an answer;
* a body must average ``server.minBodyRate`` bytes/s once ``server.minBodyRateGrace``
  has passed (Kestrel's rule), else ``408`` and close. Bodies larger than the buffer and
  chunked ones are streamed by the thread as under gthread; there the rule counts only
  the time spent waiting for the client, and a body too slow makes the read raise
  :class:`~odin_gw.edge_limits.BodyTooSlow`: the forwarder aborts the upstream request.

Closing connections linger in the event loop (write side shut, reads drained for at
most 2 s) instead of blocking it as gthread's ``close_graceful`` does.

TLS (gunicorn ``certfile``), HTTP/2 cleartext with prior knowledge and the uwsgi protocol
are not handled by the event loop: with any of them set the worker logs a warning at
start and serves every connection exactly as gthread does (TLS handshake and head read
in a thread), without the slow-client limits. Terminate TLS in front of the gateway to
keep them. A connection upgraded to HTTP/2 (``Upgrade: h2c``) is served as under gthread.

A request may take its connection over (``environ["odin.handover"]``, a
:class:`~odin_gw.edge_reader.ConnectionHandover`): an ``Upgrade`` tunnel writes its own
``101`` and relays in its thread; gunicorn writes nothing more and the connection is
closed (lingering, as any other) when the request ends.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import selectors
import socket
import sys
import threading
import time
from functools import partial

from gunicorn.workers import gthread

from .edge_limits import (
    HAND_OVER,
    ClientTooSlow,
    EdgeLimits,
    SlowClientLog,
    bytes_needed,
    timeout_detail,
    timeout_response,
)
from .edge_reader import (
    ConnectionHandover,
    CurrentRequest,
    EdgeParser,
    EdgeUnreader,
    TimeoutAnswer,
)

#: First read of a request in the event loop; most heads and small bodies fit.
RECV_SIZE = 64 * 1024
#: How long, and how much, a closing connection is drained (gunicorn's close_graceful).
LINGER_TIME = 2.0
LINGER_BYTES = 64 * 1024


class EdgeConn(gthread.TConn):
    """A client connection and, while the event loop reads for it, what it sent so far."""

    def __init__(self, cfg, sock, client, server, worker: EdgeWorker) -> None:
        super().__init__(cfg, sock, client, server)
        self.worker = worker
        self.watching: str | None = None  # "keepalive" (gthread's), "request", "linger"
        self.deadline = math.inf  # when the current wait in the loop ends
        self.whole = False  # the request handed over last was complete (head and body)
        self.reset(math.inf)

    def reset(self, head_deadline: float) -> None:
        """Start waiting for a request whose head is due by ``head_deadline``."""
        self.buf: bytes | bytearray = b""
        self.scanned = 0  # bytes of buf searched for the end of the head
        self.need: int | None = None  # from bytes_needed() once the head is complete
        self.head_deadline = head_deadline
        self.body_since = 0.0  # when the head was complete
        self.body_from = 0  # len(buf) then

    def take(self, data: bytes) -> None:
        if not self.buf:
            self.buf = data
        else:
            if isinstance(self.buf, bytes):
                self.buf = bytearray(self.buf)
            self.buf += data

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.linger(self)  # in the event loop, not blocking it
        else:
            super().close()


class EdgeWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker with nginx-style buffering of heads and small bodies."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.edge = True
        self.limits = EdgeLimits()
        self.slow_log = SlowClientLog()
        self.answers: dict[str, bytes] = {}
        self._current = CurrentRequest()
        self._timers: list[tuple[float, int, EdgeConn]] = []  # heap; stale entries skipped
        self._seq = itertools.count()
        self._waiting: set[EdgeConn] = set()
        self._stopping = False

    # -- set-up ---------------------------------------------------------------------

    def init_process(self) -> None:
        unsupported = [
            name
            for name, on in (
                ("TLS (certfile)", self.cfg.is_ssl),
                ("HTTP/2 prior knowledge", self.cfg.http2_cleartext in ("prior-knowledge", "both")),
                ("the uwsgi protocol", self.cfg.protocol != "http"),
            )
            if on
        ]
        if unsupported:
            self.edge = False
            self.log.warning(
                "edge worker: %s on; connections are served as by gthread, without the "
                "slow-client limits (terminate TLS in front of the gateway to keep them)",
                " and ".join(unsupported),
            )
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.limits = EdgeLimits.build(self._server_config(), self.cfg)
        self.answers = {
            phase: timeout_response(timeout_detail(phase, self.limits))
            for phase in ("head", "body")
        }
        handover = ConnectionHandover(self._current, lambda: self.alive)
        self.wsgi = TimeoutAnswer(self.wsgi, self._current, handover)

    def _server_config(self):
        """``server.*`` of the config the app loaded, else of ``ODIN_CONFIG`` (once)."""
        gateway = (getattr(self.wsgi, "extensions", None) or {}).get("odin")
        if gateway is not None:
            return gateway.config.server
        from .config import ServerConfig, load_config

        path = os.environ.get("ODIN_CONFIG", "config.yaml")
        try:
            return load_config(path).server
        except Exception as exc:
            self.log.warning("edge worker: %s unreadable (%s); default limits", path, exc)
            return ServerConfig()

    # -- the event loop: reading requests -------------------------------------------

    def accept(self, listener) -> None:
        if not self.edge:
            return super().accept(listener)
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return None
        self.nr_conns += 1
        conn = EdgeConn(self.cfg, sock, client, listener.getsockname(), self)
        conn.reset(time.monotonic() + self.limits.header_timeout)
        self.receive(conn)
        return None

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection sends its next request: read it here, not in a thread."""
        if not isinstance(conn, EdgeConn):
            return super().on_client_socket_readable(conn, client)
        self.keepalived_conns.remove(conn)
        conn.watching = "keepalive"  # registered by gthread's finish_request
        conn.reset(time.monotonic() + self.limits.header_timeout)
        self.receive(conn)
        return None

    def finish_request(self, conn, fs) -> None:
        # A request pipelined behind the last one is read on in the loop, like any other.
        if isinstance(conn, EdgeConn) and conn.parser.unreader.buf.getvalue() and _kept_alive(fs):
            pending = conn.parser.unreader.take_buffered()
            conn.sock.setblocking(False)
            conn.reset(time.monotonic() + self.limits.header_timeout)
            conn.take(pending)
            self._advance(conn)
            return
        super().finish_request(conn, fs)

    def receive(self, conn: EdgeConn) -> None:
        """Read what the client sent (one non-blocking recv), then hand over or wait."""
        want = RECV_SIZE if conn.need is None else max(RECV_SIZE, conn.need - len(conn.buf))
        try:
            data = conn.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":  # closed or reset by the client: nobody to answer
            self._forget(conn)
            self.nr_conns -= 1
            conn.sock.close()
            return
        if data:
            conn.take(data)
        self._advance(conn)

    def _on_readable(self, conn: EdgeConn, _sock) -> None:
        self.receive(conn)

    def _advance(self, conn: EdgeConn) -> None:
        if conn.need is None:
            need = bytes_needed(conn.buf, self.limits, conn.scanned)
            if need is None:
                conn.scanned = len(conn.buf)
                self._wait(conn, conn.head_deadline)
                return
            conn.need = need
            conn.body_since = time.monotonic()
            conn.body_from = len(conn.buf)
        if conn.need == HAND_OVER or len(conn.buf) >= conn.need:
            self._hand_over(conn)
            return
        received = len(conn.buf) - conn.body_from
        self._wait(conn, conn.body_since + self.limits.min_rate.allowed(received))

    def _hand_over(self, conn: EdgeConn) -> None:
        self._forget(conn)
        if conn.parser is None:
            unreader = EdgeUnreader(conn.sock, self.limits, self._reporter(conn.client))
            conn.parser = EdgeParser(self.cfg, conn.sock, conn.client, unreader)
        conn.whole = conn.need is not None and conn.need >= 0
        conn.parser.unreader.prime(bytes(conn.buf), conn.head_deadline)
        conn.reset(math.inf)
        conn.data_ready = True  # gthread's handle() must not wait for data
        self.enqueue_req(conn)

    def _reporter(self, client):
        return lambda phase, detail: self.slow_log.closed(phase, client, detail)

    # -- the event loop: waits, deadlines, closing ------------------------------------

    def _wait(self, conn: EdgeConn, deadline: float) -> None:
        self._watch(conn, "request")
        self._waiting.add(conn)
        if self._stopping and not conn.buf:
            deadline = min(deadline, self._stop_cap)
        self._set_deadline(conn, deadline)

    def _watch(self, conn: EdgeConn, mode: str) -> None:
        if conn.watching == mode:
            return
        callback = partial(self._on_readable if mode == "request" else self._drain, conn)
        if conn.watching is None:
            self.poller.register(conn.sock, selectors.EVENT_READ, callback)
        else:
            self.poller.modify(conn.sock, selectors.EVENT_READ, callback)
        conn.watching = mode

    def _forget(self, conn: EdgeConn) -> None:
        """Stop watching ``conn`` in the loop (it goes to a thread, or away)."""
        if conn.watching is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
            conn.watching = None
        self._waiting.discard(conn)
        conn.deadline = math.inf

    def _set_deadline(self, conn: EdgeConn, deadline: float) -> None:
        if deadline != conn.deadline:
            conn.deadline = deadline
            if deadline < math.inf:
                heapq.heappush(self._timers, (deadline, next(self._seq), conn))

    def wait_for_and_dispatch_events(self, timeout) -> None:
        if not self.edge:
            return super().wait_for_and_dispatch_events(timeout)
        if not self.alive and not self._stopping:
            self._begin_stop()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        if self._timers:
            self._expire(time.monotonic())
        self.slow_log.flush()
        return None

    def run(self) -> None:
        super().run()
        if self.nr_conns > 0:  # the drain ended on server.gracefulTimeout
            self._cut_at_exit()

    def _cut_at_exit(self) -> None:
        """Let the process end once gunicorn's own exit steps are done, cutting what runs.

        Past ``graceful_timeout`` gthread stops waiting, but Python still joins the
        request threads at exit, for as long as their upstreams take: a reload's old
        worker would outlive the graceful timeout (on shutdown the master's SIGKILL ends
        it). A threading exit hook, which Python runs before it joins the threads (after
        gunicorn's "Worker exiting" line and ``worker_exit`` hook), flushes the logs and
        ends the process; the clients still connected see their connections closed.
        """
        self.log.warning(
            "graceful timeout (%ss) over: closing %d connection(s) still open",
            self.cfg.graceful_timeout,
            self.nr_conns,
        )
        # concurrent.futures joins its threads through the same private hook; hooks run
        # last registered first, so this one runs before that join.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:  # without it, the master's worker timeout ends the worker
            register(_exit_now)

    def murder_keepalived(self, force: bool = False) -> None:
        """Close the kept-alive connections due; while stopping, without resetting any.

        gthread closes them outright: a request that reached one between the poll and
        the close is then answered by a reset (the client could not have known). While
        the worker stops, a connection whose next request (or close) already arrived is
        read like any other (answered with ``Connection: close``), and the others are
        closed write side first (a FIN) and drained, never reset. ``force`` (the end of
        the graceful timeout) closes them all, as gthread does.
        """
        if self.alive or force or not self.edge:
            return super().murder_keepalived(force)
        now = time.monotonic()
        while self.keepalived_conns and self.keepalived_conns[0].timeout <= now:
            conn = self.keepalived_conns[0]
            if _has_bytes(conn.sock):
                self.on_client_socket_readable(conn, conn.sock)  # takes it off the deque
                continue
            self.keepalived_conns.popleft()
            self.nr_conns -= 1
            conn.watching = "keepalive"  # registered by gthread's finish_request
            self.linger(conn)
        return None

    def _begin_stop(self) -> None:
        # Connections that have not sent a byte yet get what kept-alive ones get.
        self._stopping = True
        self._stop_cap = time.monotonic() + gthread.STOP_KEEPALIVE_LINGER
        for conn in list(self._waiting):
            if not conn.buf:
                self._set_deadline(conn, min(conn.deadline, self._stop_cap))

    def _expire(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if conn.deadline != deadline:
                continue  # superseded by a later deadline, or no longer waiting
            if conn.watching == "linger":
                self._forget(conn)
                conn.sock.close()
            else:
                self._time_out(conn)

    def _time_out(self, conn: EdgeConn) -> None:
        if self._stopping and not conn.buf and _has_bytes(conn.sock):
            self.receive(conn)  # its first bytes came as the stop cap ran out: read them
            return
        self._forget(conn)
        self.nr_conns -= 1
        if not conn.buf:  # never sent a byte: an idle (pre-)connection, closed quietly
            conn.sock.close()
            return
        phase = "head" if conn.need is None else "body"
        self.slow_log.closed(phase, conn.client, timeout_detail(phase, self.limits))
        with contextlib.suppress(OSError):
            conn.sock.send(self.answers[phase])
        self.linger(conn)

    def linger(self, conn: EdgeConn) -> None:
        """Close ``conn`` as RFC 9112 9.6 asks, without blocking the loop.

        The write side is shut now (the client sees the end of the answer); what the
        client still sends is read and dropped for up to 2 s or 64 KiB, so closing
        does not reset the connection under an answer it has not read yet.
        """
        self._forget(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            conn.sock.close()
            return
        conn.lingered = 0
        self._watch(conn, "linger")
        self._set_deadline(conn, time.monotonic() + LINGER_TIME)

    def _drain(self, conn: EdgeConn, _sock=None) -> None:
        try:
            data = conn.sock.recv(LINGER_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered >= LINGER_BYTES:
            self._forget(conn)
            conn.sock.close()

    # -- request threads --------------------------------------------------------------

    def handle_request(self, req, conn):
        current = self._current
        current.conn = conn  # what a ConnectionHandover hands over (an Upgrade tunnel)
        unreader = getattr(conn.parser, "unreader", None)
        try:
            if isinstance(unreader, EdgeUnreader):
                unreader.begin_body(req)
                current.unreader = None if conn.whole else unreader
            return super().handle_request(req, conn)
        finally:
            current.unreader = None
            current.conn = None
            current.start_response = None

    def handle_error(self, req, client, addr, exc) -> None:
        if isinstance(exc, ClientTooSlow):  # already counted by the unreader
            with contextlib.suppress(OSError):
                client.sendall(timeout_response(exc.message))
            return
        super().handle_error(req, client, addr, exc)


def _has_bytes(sock: socket.socket) -> bool:
    """Whether a non-blocking socket has bytes (or its end, or an error) to read."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # receive() sees the error and closes
    return True


def _exit_now() -> None:
    with contextlib.suppress(Exception):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


def _kept_alive(fs) -> bool:
    return not fs.cancelled() and fs.exception() is None and fs.result() is True
