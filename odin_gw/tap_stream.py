"""The reading side of a tap: one ``/admin/tap`` stream (see :mod:`odin_gw.tap`).

Two threads per stream. The receiver drains the tap's datagram socket into a
:class:`TapBuffer` as fast as datagrams come (so senders rarely find the socket full);
the stream's own thread (gunicorn's, iterating :meth:`TapStream.lines`) writes what the
buffer holds to the client and blocks on a slow one, each send bounded by
``server.writeTimeout``. When the buffer is full the oldest event is dropped and counted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .tap import KEEPALIVE, TapFilter
from .tap_hub import addressable, write_filter

if TYPE_CHECKING:
    from .tap_hub import TapHub

#: Events a stream holds for a client that reads slower than traffic flows.
BUFFER_EVENTS = 1000
#: How often a waiting stream looks at its client, the worker and the hub (seconds).
WAKE = 0.5
#: Least time between two ``{"dropped": N}`` lines sent because N grew (seconds).
REPORT_EVERY = 1.0
RCVBUF = 1 << 20  # asked for; the kernel caps it at net.core.rmem_max
#: The client socket's send buffer: a slow reader's backlog waits in the counted buffer
#: above, not in megabytes of kernel memory (loopback autotunes to over 1 MiB).
CLIENT_SNDBUF = 32 * 1024
DATAGRAM_MAX = 65536  # an event is bounded by gunicorn's request line and header limits


class TapBuffer:
    """A bounded FIFO of event lines that drops the oldest when full, counting.

    One thread puts, one thread takes. ``dropped`` counts the events lost here plus those
    the senders reported lost before they reached the socket.
    """

    def __init__(self, capacity: int = BUFFER_EVENTS) -> None:
        self.capacity = capacity
        self._lines: deque[bytes] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.reader_dropped = 0
        self.sender_dropped = 0

    @property
    def dropped(self) -> int:
        """Events this tap lost so far, wherever they were lost."""
        return self.reader_dropped + self.sender_dropped

    def put(self, line: bytes, sender_dropped: int = 0) -> None:
        """Add one event line; ``sender_dropped`` events were lost before it."""
        with self._cond:
            self.sender_dropped += sender_dropped
            if len(self._lines) >= self.capacity:
                self._lines.popleft()
                self.reader_dropped += 1
            self._lines.append(line)
            if len(self._lines) == 1:
                self._cond.notify()

    def take(self, most: int, timeout: float) -> list[bytes]:
        """Up to ``most`` lines, oldest first; waits at most ``timeout`` for the first."""
        with self._cond:
            if not self._lines:
                self._cond.wait(timeout)
            lines = self._lines
            n = min(most, len(lines))
            return [lines.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._lines)


def serving_worker():
    """The gunicorn worker of this process, if any (its ``alive`` turns false on SIGTERM).

    gunicorn exposes no hook for "graceful stop began" to the app; its worker installs
    its bound ``handle_exit`` as the SIGTERM handler before it loads the app, so the
    handler's ``__self__`` is the worker. Pinned by an integration test.
    """
    handler = signal.getsignal(signal.SIGTERM)
    handler = getattr(handler, "__wrapped__", handler)  # reload's discovery hand-over
    worker = getattr(handler, "__self__", None)
    return worker if hasattr(worker, "alive") else None


def client_gone(sock) -> bool:
    """Whether the client closed its side of ``sock`` (peeked, nothing consumed)."""
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except ValueError:  # a TLS socket takes no flags: rely on the keepalive lines
        return False
    except OSError:  # reset by the client
        return True


class TapStream:
    """One open tap: its socket and filter file, receiver thread and buffer.

    Created by :meth:`TapHub.open` with ``taps/.lock`` held; :meth:`lines` is the
    response body; :meth:`close` (idempotent) removes the files and ends both threads.
    """

    def __init__(
        self,
        hub: TapHub,
        directory: str,
        name: str,
        tap_filter: TapFilter,
        limit: int | None,
        client_sock=None,
        worker=None,
        capacity: int = BUFFER_EVENTS,
    ) -> None:
        self.hub = hub
        self.name = name
        self.filter = tap_filter
        self.limit = limit
        self.sent = 0
        self.buffer = TapBuffer(capacity)
        self.client_sock = client_sock
        self.worker = worker
        self.sock_path = os.path.join(directory, name + ".sock")
        self.filter_path = os.path.join(directory, name + ".json")
        self._closed = False
        self._close_lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = sock
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.settimeout(WAKE)  # the receiver looks at _closed this often
            with addressable(directory, name + ".sock") as path:
                sock.bind(path)
            write_filter(directory, name, tap_filter)  # visible to senders from now on
        except BaseException:
            self._remove_files()
            sock.close()
            raise
        self._bound_writes(client_sock, hub.write_timeout)
        self._receiver = threading.Thread(target=self._receive, name=f"odin-{name}", daemon=True)
        self._receiver.start()

    @staticmethod
    def _bound_writes(sock, seconds: float) -> None:
        # Each send to the client gives up after server.writeTimeout (as relayed bodies).
        if not isinstance(sock, socket.socket):
            return
        whole = int(seconds)
        tv = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)

    # -- receiver thread ------------------------------------------------------------------
    def _receive(self) -> None:
        buf = bytearray(DATAGRAM_MAX)
        put = self.buffer.put
        while not self._closed:
            try:
                n = self.sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return  # closed under us
            if not n:  # close() wakes us with an empty datagram
                continue
            line, _, carried = bytes(buf[:n]).partition(b"\n")
            put(line, int(carried) if carried.isdigit() else 0)

    # -- the response body ----------------------------------------------------------------
    def lines(self) -> Iterator[bytes]:
        """The stream: event lines and ``{"dropped": N}`` lines, until it must end."""
        try:
            yield b""  # gunicorn sends the head with the first chunk: tell the client now
            last_write = last_report = time.monotonic()
            reported = 0
            while True:
                most = self.limit - self.sent if self.limit else BUFFER_EVENTS
                batch = self.buffer.take(most, WAKE)
                now = time.monotonic()
                chunk = b""
                if batch:
                    self.sent += len(batch)
                    chunk = b"\n".join(batch) + b"\n"
                dropped = self.buffer.dropped
                done = self.limit is not None and self.sent >= self.limit
                if (dropped != reported and (now - last_report >= REPORT_EVERY or done)) or (
                    not chunk and now - last_write >= KEEPALIVE
                ):
                    chunk += b'{"dropped":%d}\n' % dropped
                    reported, last_report = dropped, now
                if chunk:
                    yield chunk
                    last_write = now
                if done or self._must_end():
                    return
        finally:
            self.close()

    def _must_end(self) -> bool:
        worker = self.worker
        return (
            self._closed
            or self.hub.stopped
            or (worker is not None and not worker.alive)
            or client_gone(self.client_sock)
        )

    # -- the end --------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the files, stop the receiver, close the socket. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._wake_receiver()
        self._remove_files()
        self._receiver.join(WAKE * 2)
        self.sock.close()
        self.hub.closed(self)

    def _wake_receiver(self) -> None:
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker,
            addressable(os.path.dirname(self.sock_path), self.name + ".sock") as path,
        ):
            waker.sendto(b"", socket.MSG_DONTWAIT, path)

    def _remove_files(self) -> None:
        # The filter first: senders stop looking for the socket before it goes.
        for path in (self.filter_path, self.sock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
