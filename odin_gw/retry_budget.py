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
(``F_OFD_SETLK``), so the slot of a worker that dies frees itself (the file and its
slots are a :class:`~odin_gw.shared_slots.SlotFile`, shared with the concurrency caps
of :mod:`odin_gw.traffic.concurrency`). A slot holds one
entry per budget key (open addressing by the key's hash), and an entry holds ``WINDOWS``
buckets of ``ttl / WINDOWS`` each (one second for Linkerd's default ``ttl`` of 10s):
``(window stamp, requests, retries)`` as int64 cells.

**Costs.** A deposit is one add to the caller's own bucket in shared memory: no lock,
no syscall (the clock is vDSO). A retry decision sums every slot's buckets of the key
(slots x ``WINDOWS`` cells, read with one ``unpack_from`` per slot) and adds one to its
own bucket under a per-process lock (held for the arithmetic only, taken without a
convoy: see :func:`~odin_gw.shared_slots.acquire_without_convoy`).

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

import logging
import struct
import threading
import time
from collections.abc import Callable

from .shared_slots import (
    SLOT_HEADER_BYTES,
    SLOT_HEADER_CELLS,
    OnSlots,
    SlotFile,
    acquire_without_convoy,
    key_hash,
)

log = logging.getLogger("odin_gw.retry_budget")

#: Buckets per ttl (tower's TpsBudget uses ten windows too).
WINDOWS = 10
MAGIC = 0x3130425245494F44  # "ODIERB01" little-endian: a file of this layout
ENTRY_CELLS = 2 + 3 * WINDOWS  # [key hash (0: empty), window ns, (stamp, requests, retries)*]
ENTRY_BYTES = ENTRY_CELLS * 8
DEFAULT_SLOTS = 64
DEFAULT_KEYS = 64
_ENTRY = struct.Struct(f"<{ENTRY_CELLS}q")
_HEADER = struct.Struct("<4q")
_EPSILON = 1e-9  # 0.1 * 30 is 3.0000000000000004: never let float noise decide

__all__ = ["DEFAULT_KEYS", "DEFAULT_SLOTS", "WINDOWS", "BudgetStore", "RetryBudget", "key_hash"]


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
        lock = store.lock
        acquire_without_convoy(lock)
        try:
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
        finally:
            lock.release()

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
        lock = store.lock
        acquire_without_convoy(lock)
        try:
            gen = store.gen
            cells = store.entry(self._hash, self._width_ns)
            self._cells, self._gen = cells, gen
            return cells
        finally:
            lock.release()

    def _roll(self, cells: memoryview, base: int, stamp: int) -> None:
        # A new window for this bucket: counts to zero first, then the stamp, so a reader
        # that sees the new stamp never adds the old window's counts. Under the lock: a
        # retry counted by another thread must not be zeroed by a late roll.
        lock = self._store.lock
        acquire_without_convoy(lock)
        try:
            if cells[base] != stamp:
                cells[base + 1] = 0
                cells[base + 2] = 0
                cells[base] = stamp
        finally:
            lock.release()


class BudgetStore(OnSlots):
    """Where budgets count: a shared file in the state dir, or this process's memory.

    ``path``: the state dir, or a callable giving it (read when the first budget is
    used, in the worker: the default dir is known only after fork), or ``None`` for
    process-local counting. ``slots`` bounds the workers that share; ``keys`` the
    budgets per worker. ``clock`` is the host's monotonic clock (injectable in tests).
    The file, its slots and the fallback are a :class:`~odin_gw.shared_slots.SlotFile`.
    """

    def __init__(
        self,
        path: str | Callable[[], str | None] | None,
        slots: int = DEFAULT_SLOTS,
        keys: int = DEFAULT_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = max(1, int(slots))
        self.keys = max(1, int(keys))
        self.clock = clock
        self._slots = SlotFile(
            path,
            f"retry-budget-{self.slots}x{self.keys}.bin",
            self.slots,
            SLOT_HEADER_BYTES + self.keys * ENTRY_BYTES,
            _HEADER.pack(MAGIC, self.slots, self.keys, WINDOWS),
            log=log,
            fallback="retry budgets count per worker, not per host",
            clock=clock,
        )

    def budget(
        self, key: str, retry_ratio: float, min_retries_per_second: int, ttl: float
    ) -> RetryBudget:
        """A :class:`RetryBudget` counted under ``key`` (same key: same counts)."""
        return RetryBudget(self, key, retry_ratio, min_retries_per_second, ttl)

    # This process's threads take ``lock`` for binding, window rolls and withdrawals
    # (never deposits). Re-entrant: a withdrawal may bind or roll. Never held across I/O.
    @property
    def lock(self) -> threading.RLock:
        return self._slots.lock

    @property
    def gen(self) -> int:
        """Bumped when the mapping changes: budgets re-bind their entry."""
        return self._slots.gen

    def entry(self, khash: int, width_ns: int) -> memoryview:
        """This worker's entry for a key (found or inserted), as int64 cells. Caller
        holds ``lock``."""
        slots = self._slots
        if not slots.attached:
            slots.attach()
        view = slots.view
        assert view is not None and slots.slot is not None
        base = slots.slot_offset(slots.slot) // 8 + SLOT_HEADER_CELLS
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
        slots = self._slots
        if not slots.attached:
            slots.attach()
        mm = slots.mm
        assert mm is not None
        requests = retries = 0
        oldest = stamp - WINDOWS
        keys = self.keys
        start = khash % keys
        unpack = _ENTRY.unpack_from
        for slot in range(slots.readable()):
            offset = slots.slot_offset(slot)
            if struct.unpack_from("<q", mm, offset)[0] == 0:
                continue  # never claimed
            base = offset + SLOT_HEADER_BYTES
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
        self._slots.reattach_if_due(now)

    def close(self) -> None:
        """Give the slot back (the kernel does it anyway when the process ends)."""
        self._slots.close()
