"""Per-worker slots in one file of the gateway's private state dir, mapped by every worker.

Counts that must hold for the whole host (retry budgets, concurrency caps) live in a
:class:`SlotFile`: one file in the state dir (0600, opened ``O_NOFOLLOW``, refused when
it is not a regular file owned by the gateway's user or is open to others) holding a
header page and then one *slot* per worker process. Each worker writes only its own
slot and reads everyone's, so nothing written is ever lost between workers.

**Claiming.** A worker claims a slot with an open-file-description byte-range lock
(``F_OFD_SETLK``) on one header byte per slot, so the slot of a worker that dies frees
itself, and writes its pid and claim time in the slot's first cells (pid 0: never
claimed). Claims are serialised by a lock on another header byte, under which the
*high water* (slots ever claimed) is raised: readers scan only that many slots. A slot
left by a dead worker stays readable until it is claimed again; the new owner clears
it. Whether never-used slots or dead workers' slots are taken first is the owner's
choice (history that expires wants fresh first; counts that never expire want reuse).

**Fallback.** When no state dir is usable (none given, not private, cannot be opened)
or every slot is taken, the file is replaced by an anonymous mapping of one slot: the
counts are this worker's only, the log says so once, and the shared file is tried again
after ``retry_every`` seconds (:meth:`SlotFile.reattach_if_due`).

**Fork.** A child inherits its parent's mapping and lock; after ``fork`` every
:class:`SlotFile` drops them (the parent keeps its slot) and the child claims its own
slot when next used. Owners notice through :attr:`SlotFile.gen`, bumped on every
change of mapping.

**Locking.** Inside a worker, owners serialise their threads with :attr:`SlotFile.lock`,
held for arithmetic only; on the request path they take it with
:func:`acquire_without_convoy`, which never lets a lock wait turn into a context switch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable

HEADER_BYTES = 4096  # owner's header, high water, then one lock byte per slot
OWNER_HEADER_BYTES = 512  # the owner's magic and geometry, written by every opener
HIGH_WATER_OFFSET = 512  # int64: slots ever claimed (readers scan that many)
CLAIM_LOCK_BYTE = 1023  # serialises claims (and so the high water)
LOCK_BASE = 1024  # lock byte of slot i: LOCK_BASE + i
MAX_SLOTS = HEADER_BYTES - LOCK_BASE
#: Times :func:`acquire_without_convoy` yields for a taken lock before it blocks on it.
LOCK_YIELDS = 1000
SLOT_HEADER_CELLS = 8  # [pid that claimed it (0: never), claim time ns, unused...]
SLOT_HEADER_BYTES = SLOT_HEADER_CELLS * 8
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on 64-bit Linux
# Open-file-description locks: per open file, not per process (two views in one process
# exclude each other, and closing another descriptor of the file does not drop them).
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)

_files: weakref.WeakSet[SlotFile] = weakref.WeakSet()


def key_hash(key: str) -> int:
    """A positive 63-bit hash of ``key``, the same in every process (0 marks an empty
    entry of an open-addressing table)."""
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return (value >> 1) or 1


def acquire_without_convoy(lock: threading.Lock | threading.RLock) -> None:
    """Take ``lock``, a lock of this process's threads held for arithmetic only, without
    ever blocking on it while its holder could finish.

    Such a lock is found taken only when the interpreter switched its holder out
    mid-arithmetic (at most once per switch interval); the holder needs nothing but the
    GIL to finish. A thread that *blocked* on the lock would be woken holding it yet
    still waiting for the GIL, and the thread that has the GIL would then find the lock
    taken and block in turn: a convoy, where an acquisition costs a context switch
    (measured with 8 threads, the other core busy: a concurrency cap's acquire and
    release 12 us instead of 1.8 alone, a retry budget's withdrawal 5.8 instead of 2.4).
    So a thread that finds the lock taken yields the GIL (``time.sleep(0)``) and tries
    again; it blocks only after ``LOCK_YIELDS`` tries (a holder waiting on something
    else, e.g. :meth:`SlotFile.attach` opening the file). Release as usual with
    ``lock.release()``, in a ``finally``; a re-entrant lock's holder takes it at once.
    """
    if lock.acquire(False):
        return
    for _ in range(LOCK_YIELDS):
        time.sleep(0)  # lets the holder run (it needs only the GIL to finish)
        if lock.acquire(False):
            return
    lock.acquire()


class SlotFile:
    """A file of ``slots`` slots of ``slot_bytes`` each in the state dir, or this
    process's memory.

    ``path``: the state dir, or a callable giving it (read at the first :meth:`attach`,
    in the worker: the default dir is known only after fork), or ``None`` for
    process-local counting. ``header``: the owner's magic and geometry (at most
    ``OWNER_HEADER_BYTES``), written at offset 0 by every opener (racing openers
    agree); put the geometry in ``file_name`` too, so differently shaped owners never
    share a file. ``fallback``: the log line's opening when counting falls back to this
    process, e.g. ``"retry budgets count per worker, not per host"``. ``reuse_first``:
    claim dead workers' slots before never-used ones.

    Attributes owners read: ``lock`` (re-entrant, this process's threads; held for
    arithmetic only, never across I/O; taken with :func:`acquire_without_convoy` on the
    request path), ``gen``, ``shared``, ``file``, ``slot``,
    ``mm`` (the mapping) and ``view`` (the mapping as int64 cells), valid while ``gen``
    is unchanged.
    """

    def __init__(
        self,
        path: str | Callable[[], str | None] | None,
        file_name: str,
        slots: int,
        slot_bytes: int,
        header: bytes,
        *,
        log: logging.Logger,
        fallback: str,
        reuse_first: bool = False,
        clock: Callable[[], float] = time.monotonic,
        retry_every: float = 5.0,
    ) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots: {slots} is not between 1 and {MAX_SLOTS}")
        if slot_bytes < SLOT_HEADER_BYTES or slot_bytes % 8:
            raise ValueError(f"slot_bytes: {slot_bytes} is not a multiple of 8 >= 64")
        if len(header) > OWNER_HEADER_BYTES:
            raise ValueError(f"header: {len(header)} bytes, at most {OWNER_HEADER_BYTES}")
        self._path = path
        self.file_name = file_name
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._header = header
        self._log = log
        self._fallback = fallback
        self._reuse_first = reuse_first
        self.clock = clock
        self._retry_every = retry_every
        self.lock = threading.RLock()
        self.gen = 0  # bumped when the mapping changes: owners re-bind their cells
        self.shared = False
        self.file: str | None = None
        self.slot: int | None = None
        self.mm: mmap.mmap | None = None
        self.view: memoryview | None = None
        self._fd: int | None = None
        self._attached = False
        self._retry_at: float | None = None
        self._warned: str | None = None
        _files.add(self)

    # -- mapping ----------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> None:
        """Map the shared file and claim a slot, else fall back to local memory (a no-op
        when attached already). Takes ``lock``."""
        with self.lock:
            if self._attached:
                return
            self._attached = True
            path = self._path() if callable(self._path) else self._path
            problem = None
            if path:
                try:
                    if self._map_file(path):
                        return
                    problem = f"all {self.slots} slots of {self.file} are taken"
                except OSError as exc:
                    problem = f"{os.path.join(path, self.file_name)}: {exc.strerror or exc}"
                except ValueError as exc:
                    problem = str(exc)
                self._retry_at = self.clock() + self._retry_every
            self._map_local()
            if problem and problem != self._warned:
                self._warned = problem
                self._log.warning("%s: %s", self._fallback, problem)

    def _map_file(self, directory: str) -> bool:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ValueError(f"state dir {directory}: not a private directory of this user")
        file = os.path.join(directory, self.file_name)
        size = HEADER_BYTES + self.slots * self.slot_bytes
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ValueError(f"{file}: not a private file of this user; not used")
            if st.st_size < size:
                os.ftruncate(fd, size)  # sparse; every worker sizes it the same
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mm[: len(self._header)] = self._header
            slot = self._claim(fd, mm)
            if slot is None:
                self.file = file
                mm.close()
                os.close(fd)
                return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._install(mm, fd, slot, shared=True)
        self.file = file
        return True

    def _claim(self, fd: int, mm: mmap.mmap) -> int | None:
        _lock_byte(fd, _OFD_SETLKW, fcntl.F_WRLCK, CLAIM_LOCK_BYTE)
        try:
            fresh, dead = [], []
            for i in range(self.slots):
                owner = struct.unpack_from("<q", mm, self.slot_offset(i))[0]
                (fresh if owner == 0 else dead).append(i)
            for i in dead + fresh if self._reuse_first else fresh + dead:
                try:
                    _lock_byte(fd, _OFD_SETLK, fcntl.F_WRLCK, LOCK_BASE + i)
                except OSError:
                    continue  # a live worker's
                offset = self.slot_offset(i)
                if i in dead:  # another worker's leftovers: start clean
                    mm[offset : offset + self.slot_bytes] = bytes(self.slot_bytes)
                struct.pack_into("<qq", mm, offset, os.getpid(), time.monotonic_ns())
                if struct.unpack_from("<q", mm, HIGH_WATER_OFFSET)[0] < i + 1:
                    struct.pack_into("<q", mm, HIGH_WATER_OFFSET, i + 1)
                return i
            return None
        finally:
            with contextlib.suppress(OSError):
                _lock_byte(fd, _OFD_SETLK, fcntl.F_UNLCK, CLAIM_LOCK_BYTE)

    def _map_local(self) -> None:
        mm = mmap.mmap(-1, HEADER_BYTES + self.slot_bytes)
        mm[: len(self._header)] = self._header
        struct.pack_into("<qq", mm, HEADER_BYTES, os.getpid(), time.monotonic_ns())
        struct.pack_into("<q", mm, HIGH_WATER_OFFSET, 1)
        self._install(mm, None, 0, shared=False)
        self.file = None

    def _install(self, mm: mmap.mmap, fd: int | None, slot: int, shared: bool) -> None:
        self.mm, self._fd, self.slot, self.shared = mm, fd, slot, shared
        self.view = memoryview(mm).cast("q")
        self.gen += 1

    # -- reading ----------------------------------------------------------------------
    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` in the mapping (its header cells first)."""
        return HEADER_BYTES + slot * self.slot_bytes

    def readable(self) -> int:
        """How many slots readers scan: every slot ever claimed (1 when local)."""
        mm = self.mm
        if mm is None:
            return 0
        return min(struct.unpack_from("<q", mm, HIGH_WATER_OFFSET)[0], self.slots)

    def claim_stamp(self, slot: int) -> tuple[int, int]:
        """(pid, claim time ns) of ``slot``'s current owner; (0, 0) if never claimed."""
        assert self.mm is not None
        pid, stamp = struct.unpack_from("<qq", self.mm, self.slot_offset(slot))
        return pid, stamp

    def alive(self, slot: int) -> bool:
        """Whether a worker holds ``slot`` now (one ``fcntl`` call; own slot: True)."""
        if slot == self.slot or not self.shared:
            return slot == self.slot
        fd = self._fd
        if fd is None:
            return False
        try:
            got = fcntl.fcntl(
                fd, _OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LOCK_BASE + slot, 1, 0)
            )
        except OSError:
            return True  # cannot tell: keep counting it (errs toward refusing)
        return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK

    # -- lifecycle --------------------------------------------------------------------
    def reattach_if_due(self, now: float) -> bool:
        """After a fallback to local memory, try the shared file again (every
        ``retry_every`` seconds). True when the mapping changed."""
        due = self._retry_at
        if due is None or now < due:
            return False
        with self.lock:
            if self._retry_at is None or now < self._retry_at:
                return False
            self._retry_at = None
            self._release()
            self.attach()
            return True

    def _release(self) -> None:
        self.view = None
        if self.mm is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.mm.close()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # drops the slot's lock (the last reference to it)
        self.mm = self._fd = self.slot = None
        self.shared = False
        self._attached = False
        self.gen += 1

    def close(self) -> None:
        """Give the slot back (the kernel does it anyway when the process ends)."""
        with self.lock:
            self._release()

    def _after_fork(self) -> None:
        # The child inherited the parent's mapping and lock; it must claim its own slot.
        # Dropping the inherited descriptor keeps the parent's lock (shared with it).
        self.lock = threading.RLock()
        self._retry_at = None
        self._release()


class OnSlots:
    """For a class whose counts live in ``self._slots`` (a :class:`SlotFile`): where
    they are, for admin answers and tests."""

    _slots: SlotFile

    @property
    def shared(self) -> bool:
        """Whether the counts hold for the host (else for this worker only)."""
        return self._slots.shared

    @property
    def file(self) -> str | None:
        """The shared file, or ``None`` when counting in this process."""
        return self._slots.file

    @property
    def slot(self) -> int | None:
        """This worker's slot in the file (``None`` before first use)."""
        return self._slots.slot


def _lock_byte(fd: int, cmd: int, kind: int, byte: int) -> None:
    fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


def _reset_after_fork() -> None:
    for slot_file in list(_files):
        slot_file._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
