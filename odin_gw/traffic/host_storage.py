"""A ``limits`` storage shared by every worker of one host: ``odin-host://<state dir>``.

:class:`HostStorage` keeps rate-limit counters in one file of the gateway's private state
dir (``rate-limits-<entries>x<ways>.bin``: 0600, opened ``O_NOFOLLOW``, refused when it
is not a regular file owned by the gateway's user or is open to others), mapped by every
worker. It implements the library's :class:`~limits.storage.Storage` (fixed windows) and
:class:`~limits.storage.SlidingWindowCounterSupport` (the sliding window counter the
gateway uses), so :mod:`limits`'s strategies run over it unchanged.

**Layout.** A header page (magic and geometry), then a table of ``entries`` entries of
eight int64 cells: ``[key hash (0: empty), window length ms, window index, count in
that window, count in the window before, unused...]``. A key's entry lives in one
*bucket* of ``ways`` consecutive entries chosen by its hash (a set-associative table),
so a lookup reads at most ``ways`` entries and nothing else. Windows are aligned on the
host's monotonic clock (shared by every process), as the library's memory storage aligns
them on the wall clock: the window of ``now`` is ``now // length``.

**Atomicity.** Every operation on a key runs under an open-file-description lock on
its bucket's byte (``F_OFD_SETLK``: per open file, so the kernel drops it when a worker
dies) plus a per-process lock for the threads of the worker, held for the arithmetic
only: a check and its increment are one step for the whole host, so counts are exact.
A lock held by another process is waited for in short sleeps, at most
``LOCK_WAIT`` seconds (only a process stopped mid-operation holds it that long); then
the operation fails with :class:`HostStorageError` (``failOpen`` decides).

**Bounded memory.** The table never grows. An entry whose windows have both passed is
free for reuse. When a new key finds its bucket full of live entries, the entry whose
current window ended first (the least recently counted) is evicted: that key starts
from zero when it comes back, so a full table can make a limit more lenient for the
evicted key, never stricter for anyone; evictions are counted and logged (at most once
a minute per worker).

**Fallback.** When the state dir cannot be used, the table is an anonymous mapping of
this process: limits then count per worker, and the log says so once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

from limits.storage import SlidingWindowCounterSupport, Storage

from ..mesh.state import StateDirError, check_private_dir
from ..shared_slots import key_hash

log = logging.getLogger("odin_gw.traffic.host_storage")

SCHEME = "odin-host"
MAGIC = 0x31304C5452494F44  # "ODIRTL01" little-endian: a file of this layout
HEADER_BYTES = 4096
ENTRY_CELLS = 8
ENTRY_BYTES = ENTRY_CELLS * 8
DEFAULT_ENTRIES = 1 << 17  # 8 MiB of table (mapped; pages touched as keys arrive)
DEFAULT_WAYS = 16
#: Longest wait (seconds) for a bucket lock another process holds.
LOCK_WAIT = 0.1
EVICTION_LOG_EVERY = 60.0
_HEADER = struct.Struct("<4q")  # magic, entries, ways, entry cells
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on 64-bit Linux
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_BUSY = (errno.EAGAIN, errno.EACCES)

_storages: weakref.WeakSet[HostStorage] = weakref.WeakSet()


class HostStorageError(Exception):
    """The shared table could not be used for this operation."""


def host_storage_uri(state_dir: str) -> str:
    """The ``odin-host://`` URI of a state dir (what ``storage_from_string`` takes)."""
    return f"{SCHEME}://{quote(os.path.abspath(state_dir))}"


class HostStorage(Storage, SlidingWindowCounterSupport):
    """Counters in a table shared through the state dir (see the module docstring).

    ``uri``: ``odin-host:///path/of/the/state/dir`` (the directory is created 0700 when
    absent); ``odin-host://`` alone counts in this process only. ``entries`` (a multiple
    of ``ways``) bounds the keys held at once; ``clock`` is the host's monotonic clock
    (injectable in tests). Nothing is opened until the first operation, so a storage
    built before ``fork`` (gunicorn's ``--preload``) maps the file in each worker.
    """

    STORAGE_SCHEME = [SCHEME]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        entries: int = DEFAULT_ENTRIES,
        ways: int = DEFAULT_WAYS,
        clock: Callable[[], float] = time.monotonic,
        **options,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        if ways < 1 or entries < ways or entries % ways:
            raise ValueError(f"entries ({entries}) must be a positive multiple of ways ({ways})")
        parts = urlsplit(uri or f"{SCHEME}://")
        if parts.scheme != SCHEME:
            raise ValueError(f"not an {SCHEME}:// URI: {uri!r}")
        self.directory = unquote(parts.netloc + parts.path) or None
        self.entries = entries
        self.ways = ways
        self.buckets = entries // ways
        self.clock = clock
        self.shared = False
        self.file: str | None = None
        self.evictions = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._bucket_hashes = struct.Struct("<" + "q56x" * ways)
        self._evict_logged = -EVICTION_LOG_EVERY
        self._warned: str | None = None
        _storages.add(self)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (HostStorageError, OSError)

    # -- limits' Storage: fixed windows ------------------------------------------------
    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to the key's count in the current window of ``expiry`` seconds;
        the new count."""
        length = _length_ms(expiry)
        view, cell, now_ms, bucket = self._enter(key, length, create=True)
        try:
            _roll(view, cell, now_ms // length)
            view[cell + 3] += amount
            return view[cell + 3]
        finally:
            self._exit(bucket)

    def get(self, key: str) -> int:
        """The key's count in its current window (0 when absent or passed)."""
        view, cell, now_ms, bucket = self._enter(key, None, create=False)
        try:
            if cell is None:
                return 0
            return view[cell + 3] if now_ms // view[cell + 1] == view[cell + 2] else 0
        finally:
            self._exit(bucket)

    def get_expiry(self, key: str) -> float:
        """When (``time.time()`` seconds) the key's current window ends."""
        view, cell, now_ms, bucket = self._enter(key, None, create=False)
        try:
            if cell is None:
                return time.time()
            length = view[cell + 1]
            end = (now_ms // length + 1) * length
            return time.time() + (end - now_ms) / 1000
        finally:
            self._exit(bucket)

    def check(self) -> bool:
        """Whether the table can be used (mapped, shared or this process's)."""
        try:
            with self._lock:
                self._attach_if_needed()
            return True
        except Exception:  # the health check answers, never raises
            return False

    def reset(self) -> int | None:
        """Forget every key; the number of entries that were in use."""
        with self._lock:
            self._attach_if_needed()
            view = self._view
            assert view is not None
            used = 0
            for bucket in range(self.buckets):
                self._acquire(bucket)
                try:
                    base = HEADER_BYTES // 8 + bucket * self.ways * ENTRY_CELLS
                    for way in range(self.ways):
                        cell = base + way * ENTRY_CELLS
                        if view[cell]:
                            used += 1
                            for i in range(ENTRY_CELLS):
                                view[cell + i] = 0
                finally:
                    self._release_lock(bucket)
            return used

    def clear(self, key: str) -> None:
        """Forget one key."""
        view, cell, _now, bucket = self._enter(key, None, create=False)
        try:
            if cell is not None:
                for i in range(ENTRY_CELLS):
                    view[cell + i] = 0
        finally:
            self._exit(bucket)

    # -- limits' SlidingWindowCounterSupport ---------------------------------------------
    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Count ``amount`` if the weighted count of this window and the one before
        stays within ``limit``: ``floor(previous * (time left in this window / length))
        + current + amount <= limit`` (the library's rule). One atomic step."""
        if amount > limit:
            return False
        length = _length_ms(expiry)
        view, cell, now_ms, bucket = self._enter(key, length, create=True)
        try:
            window = now_ms // length
            previous, current = _counts(view, cell, window)
            left = length - (now_ms - window * length)
            if previous * left // length + current + amount > limit:
                return False
            _roll(view, cell, window)
            view[cell + 3] += amount
            return True
        finally:
            self._exit(bucket)

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """``(previous count, seconds the previous window still weighs, current count,
        seconds until the current count stops counting)``, as the library's storages
        answer it (the previous window weighs ``seconds / length``)."""
        length = _length_ms(expiry)
        view, cell, now_ms, bucket = self._enter(key, length, create=False)
        try:
            window = now_ms // length
            left = length - (now_ms - window * length)
            if cell is None or view[cell + 1] != length:
                return 0, 0.0, 0, (left + length) / 1000
            previous, current = _counts(view, cell, window)
            return previous, (left / 1000 if previous else 0.0), current, (left + length) / 1000
        finally:
            self._exit(bucket)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.clear(key)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the table (the next operation maps it again)."""
        with self._lock:
            self._release()

    # -- internals ------------------------------------------------------------------------
    def _enter(self, key: str, length: int | None, create: bool):
        """Lock the key's bucket for the whole host (and this process's threads) and
        find its entry: ``(view, cell or None, now in ms, bucket)``. ``create``: claim an
        entry when absent. The caller must call :meth:`_exit` with the bucket."""
        khash = key_hash(key)
        bucket = khash % self.buckets
        self._lock.acquire()
        try:
            if self._view is None:
                self._attach_if_needed()
            view, mm = self._view, self._mm
            self._acquire(bucket)
        except BaseException:
            self._lock.release()
            raise
        try:
            now_ms = int(self.clock() * 1000)
            first = HEADER_BYTES + bucket * self.ways * ENTRY_BYTES
            hashes = self._bucket_hashes.unpack_from(mm, first)
            base = first // 8
            cell = None
            if khash in hashes:
                cell = base + hashes.index(khash) * ENTRY_CELLS
                if create and length is not None and view[cell + 1] != length:
                    _zero(view, cell, khash, length)  # the same key, another window length
            elif create:
                cell = self._claim(view, base, hashes, now_ms)
                _zero(view, cell, khash, length)
            return view, cell, now_ms, bucket
        except BaseException:
            self._exit(bucket)
            raise

    def _exit(self, bucket: int) -> None:
        try:
            self._release_lock(bucket)
        finally:
            self._lock.release()

    def _claim(self, view: memoryview, base: int, hashes: tuple, now_ms: int) -> int:
        """A free entry of the bucket: empty, or both windows passed; else evict the
        entry whose current window ended first."""
        stalest, stalest_end = 0, None
        for way, h in enumerate(hashes):
            cell = base + way * ENTRY_CELLS
            if h == 0:
                return cell
            length = view[cell + 1] or 1
            end = (view[cell + 2] + 1) * length  # end of the entry's last counted window
            if now_ms >= end + length:
                return cell  # its previous-window weight is gone too
            if stalest_end is None or end < stalest_end:
                stalest, stalest_end = cell, end
        self.evictions += 1
        if now_ms / 1000 - self._evict_logged >= EVICTION_LOG_EVERY:
            self._evict_logged = now_ms / 1000
            log.warning(
                "rate-limit table full (%d entries, bucket of %d): evicting the least "
                "recently counted key (%d evictions so far in this worker)",
                self.entries,
                self.ways,
                self.evictions,
            )
        return stalest

    def _acquire(self, bucket: int) -> None:
        fd = self._fd
        if fd is None:
            return
        arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, bucket, 1, 0)
        deadline = None
        pause = 0.00005
        while True:
            try:
                fcntl.fcntl(fd, _OFD_SETLK, arg)
                return
            except OSError as exc:
                if exc.errno not in _BUSY:
                    raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + LOCK_WAIT
            elif now >= deadline:
                raise HostStorageError(
                    f"{self.file}: bucket {bucket} locked by another process for over {LOCK_WAIT}s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _release_lock(self, bucket: int) -> None:
        fd = self._fd
        if fd is not None:
            fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, bucket, 1, 0))

    def _attach_if_needed(self) -> None:
        if self._view is not None:
            return
        problem = None
        if self.directory:
            try:
                self._map_file(self.directory)
                return
            except StateDirError as exc:
                problem = str(exc)
            except OSError as exc:
                file = os.path.join(self.directory, self._file_name())
                problem = f"{file}: {exc.strerror or exc}"
            except ValueError as exc:
                problem = str(exc)
        self._install(mmap.mmap(-1, self._size()), None)
        self.file = None
        if problem and problem != self._warned:
            self._warned = problem
            log.warning("rate limits count per worker, not per host: %s", problem)

    def _file_name(self) -> str:
        return f"rate-limits-{self.entries}x{self.ways}.bin"

    def _size(self) -> int:
        return HEADER_BYTES + self.entries * ENTRY_BYTES

    def _map_file(self, directory: str) -> None:
        check_private_dir(directory)
        file = os.path.join(directory, self._file_name())
        size = self._size()
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ValueError(f"{file}: not a private file of this user; not used")
            if st.st_size < size:
                os.ftruncate(fd, size)  # sparse; every worker sizes it the same
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            header = (MAGIC, self.entries, self.ways, ENTRY_CELLS)
            found = _HEADER.unpack_from(mm, 0)
            if found[0] == 0:
                _HEADER.pack_into(mm, 0, *header)  # racing initialisers write the same
            elif found != header:
                mm.close()
                raise ValueError(f"{file}: not a rate-limit table of this layout; not used")
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._install(mm, fd)
        self.file = file

    def _install(self, mm: mmap.mmap, fd: int | None) -> None:
        self._mm, self._fd = mm, fd
        self._view = memoryview(mm).cast("q")
        self.shared = fd is not None

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
        self._view = None
        if self._mm is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._mm.close()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._mm = self._fd = None
        self.shared = False

    def _after_fork(self) -> None:
        # The child shares the parent's open file description, and so its locks: it
        # must open the file itself. Closing the inherited descriptor keeps the
        # parent's (its own descriptor still refers to the description).
        self._lock = threading.Lock()
        self._release()


def _length_ms(expiry: float) -> int:
    length = round(float(expiry) * 1000)
    if length <= 0:
        raise ValueError(f"window length must be positive, not {expiry!r}")
    return length


def _counts(view: memoryview, cell: int, window: int) -> tuple[int, int]:
    """(previous, current) counts of an entry as seen from ``window``."""
    stored = view[cell + 2]
    if stored == window:
        return view[cell + 4], view[cell + 3]
    if stored == window - 1:
        return view[cell + 3], 0
    return 0, 0


def _roll(view: memoryview, cell: int, window: int) -> None:
    """Move an entry to ``window``: its current count becomes the previous one (or both
    go when a whole window passed)."""
    stored = view[cell + 2]
    if stored == window:
        return
    view[cell + 4] = view[cell + 3] if stored == window - 1 else 0
    view[cell + 3] = 0
    view[cell + 2] = window


def _zero(view: memoryview, cell: int, khash: int, length: int | None) -> None:
    for i in range(1, ENTRY_CELLS):
        view[cell + i] = 0
    view[cell + 1] = length or 1000
    view[cell] = khash


def _reset_after_fork() -> None:
    for storage in list(_storages):
        storage._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
