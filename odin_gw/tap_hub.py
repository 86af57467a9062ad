"""The sending side of the tap in every worker, and the opening of streams (see
:mod:`odin_gw.tap` for the design).

:class:`TapHub` lists ``taps/`` in the state dir every :data:`SCAN_INTERVAL` seconds in
its own thread and keeps one connected datagram socket per open tap; the request path
reads ``TapHub.active`` and, only when it is true, calls :meth:`TapHub.publish`.
Locking: ``taps/.lock`` (an ``flock``) is held while taps are counted, stale ones removed
and a new one created; ``_scan_lock`` while the subscriber list is rebuilt (never taken
by :meth:`~TapHub.publish`, which reads the tuple it replaces); each subscriber's lock
guards its drop counter only, never a send.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from .mesh.state import StateDirError, check_private_dir, write_atomic
from .tap import MAX_FILTER, TapFilter, TapLimitReached, TapUnavailable, tap_event

if TYPE_CHECKING:
    from .config.model import GatewayConfig
    from .proxy.exchange import Exchange
    from .tap_stream import TapStream

log = logging.getLogger("odin_gw.tap")

#: Seconds between two listings of ``taps/`` by each worker (a new tap sees every
#: worker's traffic within this time; the worker serving it at once).
SCAN_INTERVAL = 0.5
LOCK_WAIT = 2.0  # seconds to wait for ``taps/.lock`` before answering 503
# sun_path is 108 bytes with its NUL; a longer path is reached through /proc/self/fd.
_SUN_PATH_MAX = 107
_SEQ = itertools.count(1)  # per process: tap names are unique while their worker lives
_GONE = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET})


class _Subscriber:
    """One open tap as a sender sees it: its filter, a socket connected to it, and the
    events dropped since the last one that got through."""

    __slots__ = ("dead", "dropped", "filter", "lock", "name", "retired", "sock")

    def __init__(self, name: str, tap_filter: TapFilter, sock: socket.socket) -> None:
        self.name = name
        self.filter = tap_filter
        self.sock = sock
        self.dropped = 0
        self.lock = threading.Lock()  # for the counter only: never held across I/O
        self.dead = False
        self.retired = 0.0

    def send(self, payload: bytes) -> None:
        """Send one event without blocking; a full or failed send is counted or ends us."""
        carried = 0
        if self.dropped:
            with self.lock:
                carried, self.dropped = self.dropped, 0
            payload += b"\n%d" % carried  # JSON never holds a raw newline: a safe separator
        try:
            self.sock.send(payload, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):  # the reader's queue is full
            self._lost(carried + 1)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self._lost(carried + 1)
            else:  # the tap went away (or its socket was retired under us)
                self.dead = True

    def _lost(self, n: int) -> None:
        with self.lock:
            self.dropped += n


class TapHub:
    """The tap of one worker process: finds open taps, sends them events, opens streams.

    ``active`` is the one attribute the request path reads when no tap is open.
    """

    def __init__(
        self,
        state_path: Callable[[], str],
        max_taps: int,
        state_error: Callable[[], str | None] = lambda: None,
        write_timeout: float = 60.0,
    ) -> None:
        self._state_path = state_path
        self._state_error = state_error
        self.max_taps = max_taps
        self.write_timeout = write_timeout
        self.active = False
        self.stopped = False
        self._subs: tuple[_Subscriber, ...] = ()
        self._known: dict[str, _Subscriber] = {}
        self._retired: list[_Subscriber] = []
        self._scan_lock = threading.Lock()  # scans come from the thread and from streams
        self._streams: set[TapStream] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors_logged = 0

    @classmethod
    def for_gateway(cls, config: GatewayConfig, manager) -> TapHub | None:
        """A hub for ``config`` when it is Linkerd with ``enableTap``, else ``None``."""
        mesh = config.service_mesh
        if mesh.kind != "linkerd" or not mesh.linkerd.enable_tap:
            return None
        return cls(
            lambda: manager.state.path,
            mesh.linkerd.max_taps,
            state_error=lambda: manager.state_error,
            write_timeout=config.server.write_timeout,
        )

    @property
    def directory(self) -> str:
        """``<state dir>/taps`` (the state dir is known only once the mesh started)."""
        return os.path.join(self._state_path(), "taps")

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the background listing of ``taps/`` (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="odin-tap-scan", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End every stream of this worker (files removed) and stop sending."""
        self.stopped = True
        self.active = False
        self._wake.set()
        for stream in list(self._streams):
            stream.close()
        with self._scan_lock:
            for sub in (*self._known.values(), *self._retired):
                sub.sock.close()
            self._known, self._retired, self._subs = {}, [], ()

    def _run(self) -> None:
        while not self.stopped:
            try:
                self.scan()
            except Exception:  # the thread must survive anything; say what happened
                log.exception("tap scan failed")
            self._wake.wait(SCAN_INTERVAL)

    # -- the hot path ---------------------------------------------------------------------
    def publish(self, exchange: Exchange, seconds: float, environ: Mapping) -> None:
        """Send the event of a completed request to every open tap that wants it.

        Never blocks and never raises: a tap that cannot take it loses it (counted).
        """
        try:
            payload = None
            method = exchange.method.upper()
            for sub in self._subs:
                if sub.dead or not sub.filter.matches(exchange.service, method, exchange.path):
                    continue
                if payload is None:
                    event = tap_event(exchange, seconds, environ, time.time())
                    payload = json.dumps(event, separators=(",", ":")).encode()
                sub.send(payload)
        except Exception:  # a tap must never break the request's other bookkeeping
            if self._errors_logged < 5:
                self._errors_logged += 1
                log.exception("tap event not sent")

    # -- finding taps ---------------------------------------------------------------------
    def scan(self) -> None:
        """List ``taps/``: connect to new taps, forget gone ones, clean stale files."""
        with self._scan_lock:
            if self.stopped:
                return
            directory = self.directory
            try:
                names = sorted(
                    e.name[:-5]
                    for e in os.scandir(directory)
                    if e.name.startswith("tap-") and e.name.endswith(".json")
                )
            except OSError:  # no tap was ever opened (or the state dir is gone)
                names = []
            now = time.monotonic()
            known, current, stale = self._known, {}, []
            for name in names:
                sub = known.get(name)
                if sub is None or sub.dead:
                    sub = _connect(directory, name)
                if sub is None:
                    stale.append(name)
                else:
                    current[name] = sub
            for name, sub in known.items():
                if current.get(name) is not sub:
                    sub.retired = now
                    self._retired.append(sub)
            self._known = current
            self._subs = tuple(current.values())
            self.active = bool(current)
            # A request thread may be sending on a retired socket right now: close it only
            # once any such send is long over (a closed fd number can be reused at once).
            keep = []
            for sub in self._retired:
                if now - sub.retired > 1.0:
                    sub.sock.close()
                else:
                    keep.append(sub)
            self._retired = keep
        if stale:
            with contextlib.suppress(OSError), _flock(directory, wait=0) as held:
                if held:
                    _count_live(directory)  # removes the files of taps whose owner is gone

    # -- opening a stream -----------------------------------------------------------------
    def open(self, tap_filter: TapFilter, limit: int | None, client_sock=None) -> TapStream:
        """Open a tap stream in this worker; raises :class:`TapLimitReached` when
        ``max_taps`` are open on the host, :class:`TapUnavailable` when it cannot be set up.
        """
        from .tap_stream import TapStream, serving_worker

        problem = self._state_error()
        if problem:
            raise TapUnavailable(f"tap unavailable: {problem}")
        directory = self.directory
        try:
            check_private_dir(os.path.dirname(directory))
            check_private_dir(directory)
        except StateDirError as exc:
            raise TapUnavailable(f"tap unavailable: {exc}") from None
        name = f"tap-{os.getpid()}-{next(_SEQ)}"
        try:
            with _flock(directory, wait=LOCK_WAIT) as held:
                if not held:
                    raise TapUnavailable("tap unavailable: taps/.lock is held; retry")
                live = _count_live(directory)
                if live >= self.max_taps:
                    raise TapLimitReached(
                        f"{live} taps are open and linkerd.maxTaps is {self.max_taps}: "
                        "close one and retry",
                        maxTaps=self.max_taps,
                    )
                stream = TapStream(
                    self, directory, name, tap_filter, limit, client_sock, serving_worker()
                )
        except OSError as exc:
            raise TapUnavailable(f"tap unavailable: {exc}") from None
        self._streams.add(stream)
        self.scan()  # this worker's own requests reach it at once
        return stream

    def closed(self, stream: TapStream) -> None:
        """Called by a stream once its files are gone."""
        self._streams.discard(stream)
        if not self.stopped:
            self.scan()


def _connect(directory: str, name: str) -> _Subscriber | None:
    """A subscriber for the tap ``name``; ``None`` when its files are unusable or its
    socket refuses (its owner is gone)."""
    try:
        fd = os.open(os.path.join(directory, name + ".json"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            tap_filter = TapFilter.from_json(json.loads(fh.read(4 * MAX_FILTER + 256)))
    except (OSError, ValueError, AttributeError):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with addressable(directory, name + ".sock") as path:
            sock.connect(path)
    except OSError:
        sock.close()
        return None
    return _Subscriber(name, tap_filter, sock)


def _count_live(directory: str) -> int:
    """How many taps are open; removes the files of those whose socket refuses.

    Call with ``taps/.lock`` held, so that no tap is created meanwhile.
    """
    live = 0
    names = set()
    for entry in os.scandir(directory):
        stem, dot, ext = entry.name.rpartition(".")
        if entry.name.startswith("tap-") and dot and ext in ("json", "sock"):
            names.add(stem)
    for name in sorted(names):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with addressable(directory, name + ".sock") as path:
                probe.connect(path)
            alive = os.path.exists(os.path.join(directory, name + ".json"))
            live += alive
            continue  # a socket without its filter file yet: being created or closed
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
        finally:
            probe.close()
        for ext in ("json", "sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, f"{name}.{ext}"))
    return live


@contextlib.contextmanager
def _flock(directory: str, wait: float) -> Iterator[bool]:
    """Hold ``taps/.lock``; yields ``False`` when it stayed busy for ``wait`` seconds."""
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.01)
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def addressable(directory: str, name: str) -> Iterator[str]:
    """A path to ``directory/name`` short enough for a unix socket address.

    A long state dir is reached through ``/proc/self/fd/<dir fd>/<name>``.
    """
    path = os.path.join(directory, name)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def write_filter(directory: str, name: str, tap_filter: TapFilter) -> None:
    """Publish the filter of tap ``name`` (after its socket is bound)."""
    doc = json.dumps(tap_filter.to_json())
    write_atomic(os.path.join(directory, name + ".json"), doc, tmp_dir=directory)
