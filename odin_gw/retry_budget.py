"""Retry budgets counted across every worker of the host (Finagle's / Linkerd's budget).

A :class:`RetryBudget` allows retries in proportion to traffic: each request deposits
``retry_ratio`` of a retry, each retry withdraws one, deposits and withdrawals expire
after ``ttl``, and ``min_retries_per_second * ttl`` retries are always allowed on top
(the reserve of tower's ``TpsBudget``, which Linkerd's proxy uses). So within any
``ttl``, retries <= ``min_retries_per_second * ttl + retry_ratio * requests``.

**Where the counts live.** A :class:`BudgetStore` maps one file in the gateway's
private state dir (``retry-budget-<slots>x<keys>.bin``, 0600, opened ``O_NOFOLLOW``,
refused when not owned by the gateway's user or open to others). The file holds one
*slot* per worker process, claimed with an open-file-description byte-range lock
(``F_OFD_SETLK``), so the slot of a worker that dies frees itself. A slot holds one
entry per budget key (open addressing by the key's hash), and an entry holds ``WINDOWS``
buckets of ``ttl / WINDOWS`` each (one second for Linkerd's default ``ttl`` of 10s):
``(window stamp, requests, retries)`` as int64 cells.

**Costs.** A deposit is one add to the caller's own bucket in shared memory: no lock,
no syscall (the clock is vDSO). A retry decision sums every slot's buckets of the key
(slots x ``WINDOWS`` cells, read with one ``unpack_from`` per slot) and adds one to its
own bucket under a per-process lock (held for the arithmetic only).

**Margins.** Each worker writes only its own slot, so nothing is lost between workers,
but a decision is read-then-write: workers deciding in the same instant may each spend
the last unit, over-spending by at most one retry per other worker deciding at that
instant. Inside a worker, deposits are lock-free: two threads adding at once can lose
a deposit (fewer retries, never more). A claimed slot left by a dead worker is kept
readable (its history still counts) until every never-used slot is taken; reusing it
clears it, forgetting at most one ``ttl`` of that dead worker's history. When no state
dir is usable (no mesh, or it cannot be opened) or every slot is taken, the store
falls back to this process's memory and counts per worker, and says so once in the log.
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

log = logging.getLogger("odin_gw.retry_budget")

#: Buckets per ttl (tower's TpsBudget uses ten windows too).
WINDOWS = 10
MAGIC = 0x3130425245494F44  # "ODIERB01" little-endian: a file of this layout
HEADER_BYTES = 4096  # magic, geometry, then one lock byte per slot from LOCK_BASE
LOCK_BASE = 1024
SLOT_HEADER_CELLS = 8  # [pid that claimed it (0: never), claim time ns, unused...]
ENTRY_CELLS = 2 + 3 * WINDOWS  # [key hash (0: empty), window ns, (stamp, requests, retries)*]
ENTRY_BYTES = ENTRY_CELLS * 8
DEFAULT_SLOTS = 64
DEFAULT_KEYS = 64
_ENTRY = struct.Struct(f"<{ENTRY_CELLS}q")
_HEADER = struct.Struct("<4q")
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on 64-bit Linux
# Open-file-description locks: per open file, not per process (two views in one process
# exclude each other, and closing another descriptor of the file does not drop them).
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_EPSILON = 1e-9  # 0.1 * 30 is 3.0000000000000004: never let float noise decide

_stores: weakref.WeakSet[BudgetStore] = weakref.WeakSet()


def key_hash(key: str) -> int:
    """A positive 63-bit hash of ``key`` (0 marks an empty entry)."""
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return (value >> 1) or 1


class RetryBudget:
    """One budget: ``retry_ratio`` retries per request, ``min_retries_per_second`` always,
    counted over ``ttl`` seconds by every worker sharing ``store``.

    Made by :meth:`BudgetStore.budget`; safe to share between threads. ``deposit`` once
    per request of a route the budget covers, ``withdraw`` before each retry.
    """

    __slots__ = (
        "_cells",
        "_gen",
        "_hash",
        "_store",
        "_width",
        "_width_ns",
        "key",
        "min_retries_per_second",
        "retry_ratio",
        "ttl",
    )

    def __init__(
        self,
        store: BudgetStore,
        key: str,
        retry_ratio: float,
        min_retries_per_second: int,
        ttl: float,
    ) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        self.key = key
        self.retry_ratio = float(retry_ratio)
        self.min_retries_per_second = int(min_retries_per_second)
        self.ttl = float(ttl)
        self._store = store
        self._hash = key_hash(key)
        self._width_ns = max(1, round(self.ttl * 1e9) // WINDOWS)
        self._width = self._width_ns / 1e9
        self._cells: memoryview | None = None
        self._gen = -1

    @property
    def reserve(self) -> float:
        """Retries always allowed per ttl: ``min_retries_per_second * ttl``."""
        return self.min_retries_per_second * self.ttl

    def deposit(self, now: float | None = None) -> None:
        """Count one request (``now``: the store's clock, read by the caller already)."""
        cells = self._cells
        if self._gen != self._store.gen:
            cells = self._bind()
        stamp = int((self._store.clock() if now is None else now) / self._width) + 1
        base = 2 + 3 * (stamp % WINDOWS)
        if cells[base] != stamp:
            self._roll(cells, base, stamp)
        cells[base + 1] += 1

    def withdraw(self, now: float | None = None) -> bool:
        """Spend one retry if the balance allows it; ``False`` (nothing spent) otherwise."""
        store = self._store
        now = store.clock() if now is None else now
        store.reattach_if_due(now)
        with store.lock:
            cells = self._cells if self._gen == store.gen else self._bind()
            stamp = int(now / self._width) + 1
            requests, retries = store.totals(self._hash, self._width_ns, stamp)
            if self.reserve + self.retry_ratio * requests - retries + _EPSILON < 1:
                return False
            base = 2 + 3 * (stamp % WINDOWS)
            if cells[base] != stamp:
                self._roll(cells, base, stamp)
            cells[base + 2] += 1
            return True

    def balance(self, now: float | None = None) -> float:
        """Retries the budget would allow now (may be fractional)."""
        store = self._store
        now = store.clock() if now is None else now
        stamp = int(now / self._width) + 1
        requests, retries = store.totals(self._hash, self._width_ns, stamp)
        return self.reserve + self.retry_ratio * requests - retries

    def counts(self, now: float | None = None) -> tuple[int, int]:
        """(requests, retries) counted by every worker within the last ttl."""
        store = self._store
        now = store.clock() if now is None else now
        return store.totals(self._hash, self._width_ns, int(now / self._width) + 1)

    def to_dict(self) -> dict:
        """The budget's parameters, as a ServiceProfile writes them, and its balance."""
        return {
            "key": self.key,
            "retryRatio": self.retry_ratio,
            "minRetriesPerSecond": self.min_retries_per_second,
            "ttl": self.ttl,
            "balance": round(self.balance(), 3),
            "shared": self._store.shared,
        }

    # -- internals --------------------------------------------------------------------
    def _bind(self) -> memoryview:
        store = self._store
        with store.lock:
            gen = store.gen
            cells = store.entry(self._hash, self._width_ns)
            self._cells, self._gen = cells, gen
            return cells

    def _roll(self, cells: memoryview, base: int, stamp: int) -> None:
        # A new window for this bucket: counts to zero first, then the stamp, so a reader
        # that sees the new stamp never adds the old window's counts. Under the lock: a
        # retry counted by another thread must not be zeroed by a late roll.
        with self._store.lock:
            if cells[base] != stamp:
                cells[base + 1] = 0
                cells[base + 2] = 0
                cells[base] = stamp


class BudgetStore:
    """Where budgets count: a shared file in the state dir, or this process's memory.

    ``path``: the state dir, or a callable giving it (read when the first budget is
    used, in the worker: the default dir is known only after fork), or ``None`` for
    process-local counting. ``slots`` bounds the workers that share; ``keys`` the
    budgets per worker. ``clock`` is the host's monotonic clock (injectable in tests).
    """

    def __init__(
        self,
        path: str | Callable[[], str | None] | None,
        slots: int = DEFAULT_SLOTS,
        keys: int = DEFAULT_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self.slots = max(1, int(slots))
        self.keys = max(1, int(keys))
        self.clock = clock
        # This process's threads: binding, window rolls and withdrawals (never deposits).
        # Re-entrant: a withdrawal may bind or roll. Never held across network I/O.
        self.lock = threading.RLock()
        self.gen = 0  # bumped when the mapping changes: budgets re-bind their entry
        self.shared = False
        self.file: str | None = None
        self.slot: int | None = None
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._slot_size = SLOT_HEADER_CELLS * 8 + self.keys * ENTRY_BYTES
        self._view: memoryview | None = None  # whole mapping as int64 cells
        self._attached = False
        self._retry_at: float | None = None
        self._warned: str | None = None
        _stores.add(self)

    def budget(
        self, key: str, retry_ratio: float, min_retries_per_second: int, ttl: float
    ) -> RetryBudget:
        """A :class:`RetryBudget` counted under ``key`` (same key: same counts)."""
        return RetryBudget(self, key, retry_ratio, min_retries_per_second, ttl)

    # -- mapping ----------------------------------------------------------------------
    def _attach(self) -> None:
        """Map the shared file and claim a slot, else fall back to local memory."""
        self._attached = True
        path = self._path() if callable(self._path) else self._path
        problem = None
        if path:
            try:
                if self._map_file(path):
                    return
                problem = f"all {self.slots} slots of {self.file} are taken"
            except OSError as exc:
                problem = f"{os.path.join(path, self._file_name())}: {exc.strerror or exc}"
            except ValueError as exc:
                problem = str(exc)
            self._retry_at = self.clock() + 5.0
        self._map_local()
        if problem and problem != self._warned:
            self._warned = problem
            log.warning("retry budgets count per worker, not per host: %s", problem)

    def _file_name(self) -> str:
        return f"retry-budget-{self.slots}x{self.keys}.bin"

    def _map_file(self, directory: str) -> bool:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ValueError(f"state dir {directory}: not a private directory of this user")
        file = os.path.join(directory, self._file_name())
        size = HEADER_BYTES + self.slots * self._slot_size
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ValueError(f"{file}: not a private file of this user; not used")
            if st.st_size < size:
                os.ftruncate(fd, size)  # sparse; every worker sizes it the same
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Every opener writes the same header: racing initialisers agree.
            _HEADER.pack_into(mm, 0, MAGIC, self.slots, self.keys, WINDOWS)
            slot = self._claim(fd, mm)
            if slot is None:
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
        # Never-used slots first: a dead worker's slot keeps its history readable.
        fresh, dead = [], []
        for i in range(self.slots):
            owner = struct.unpack_from("<q", mm, self._slot_offset(i))[0]
            (fresh if owner == 0 else dead).append(i)
        for i in fresh + dead:
            try:
                fcntl.fcntl(
                    fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LOCK_BASE + i, 1, 0)
                )
            except OSError:
                continue
            offset = self._slot_offset(i)
            if i in dead:  # another worker's leftovers: start clean
                mm[offset : offset + self._slot_size] = bytes(self._slot_size)
            struct.pack_into("<qq", mm, offset, os.getpid(), time.monotonic_ns())
            return i
        return None

    def _map_local(self) -> None:
        mm = mmap.mmap(-1, HEADER_BYTES + self._slot_size)
        struct.pack_into("<qq", mm, HEADER_BYTES, os.getpid(), time.monotonic_ns())
        self._install(mm, None, 0, shared=False)
        self.file = None

    def _install(self, mm: mmap.mmap, fd: int | None, slot: int, shared: bool) -> None:
        self._mm, self._fd, self.slot, self.shared = mm, fd, slot, shared
        self._view = memoryview(mm).cast("q")
        self._nslots = self.slots if shared else 1
        self.gen += 1

    def _slot_offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self._slot_size

    def entry(self, khash: int, width_ns: int) -> memoryview:
        """This worker's entry for a key (found or inserted), as int64 cells. Caller
        holds ``lock``."""
        if not self._attached:
            self._attach()
        view = self._view
        assert view is not None and self.slot is not None
        base = self._slot_offset(self.slot) // 8 + SLOT_HEADER_CELLS
        start = khash % self.keys
        for probe in range(self.keys):
            cell = base + ((start + probe) % self.keys) * ENTRY_CELLS
            current = view[cell]
            if current == khash or current == 0:
                entry = view[cell : cell + ENTRY_CELLS]
                if current == 0 or entry[1] != width_ns:
                    # New key, or its ttl changed: its old windows mean something else.
                    for i in range(2, ENTRY_CELLS):
                        entry[i] = 0
                    entry[1] = width_ns
                    entry[0] = khash
                return entry
        # Table full: count this key in a private entry (this worker only).
        log.warning("retry budget table full (%d keys): a budget counts per worker", self.keys)
        private = memoryview(bytearray(ENTRY_BYTES)).cast("q")
        private[0], private[1] = khash, width_ns
        return private

    def totals(self, khash: int, width_ns: int, stamp: int) -> tuple[int, int]:
        """(requests, retries) of every slot's windows within the ttl ending at ``stamp``."""
        if not self._attached:
            with self.lock:
                if not self._attached:
                    self._attach()
        mm = self._mm
        assert mm is not None
        requests = retries = 0
        oldest = stamp - WINDOWS
        keys = self.keys
        start = khash % keys
        unpack = _ENTRY.unpack_from
        for slot in range(self._nslots):
            offset = self._slot_offset(slot)
            if struct.unpack_from("<q", mm, offset)[0] == 0:
                continue  # never claimed
            base = offset + SLOT_HEADER_CELLS * 8
            for probe in range(keys):
                cells = unpack(mm, base + ((start + probe) % keys) * ENTRY_BYTES)
                if cells[0] == khash:
                    if cells[1] == width_ns:
                        for b in range(2, ENTRY_CELLS, 3):
                            if oldest < cells[b] <= stamp:
                                requests += cells[b + 1]
                                retries += cells[b + 2]
                    break
                if cells[0] == 0:
                    break
        return requests, retries

    def reattach_if_due(self, now: float) -> None:
        """After a fallback to local memory, try the shared file again (every 5 s)."""
        due = self._retry_at
        if due is None or now < due:
            return
        with self.lock:
            if self._retry_at is None or now < self._retry_at:
                return
            self._retry_at = None
            self._release()
            self._attach()

    def _release(self) -> None:
        self._view = None
        if self._mm is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._mm.close()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # drops the slot's lock (the last reference to it)
        self._mm = self._fd = self.slot = None
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


def _reset_after_fork() -> None:
    for store in list(_stores):
        store._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
