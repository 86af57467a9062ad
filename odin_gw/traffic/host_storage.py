"""A ``limits`` storage shared by every worker of one host: ``odin-host://<state dir>``.

:class:`HostStorage` keeps rate-limit counters in one file of the gateway's private
state dir (``rate-limits-<slots>x<entries>x<ways>.bin``), a
:class:`~odin_gw.shared_slots.SlotFile` (0600, opened ``O_NOFOLLOW``, refused when it is
not a regular file owned by the gateway's user or is open to others) mapped by every
worker. It implements the library's :class:`~limits.storage.Storage` (fixed windows) and
:class:`~limits.storage.SlidingWindowCounterSupport` (the sliding window counter the
gateway uses), so :mod:`limits`'s strategies run over it unchanged;
:meth:`HostStorage.acquire_sliding_window` is the strategy's acquisition and the window
read that follows it, in one pass.

**Layout.** One *slot* per worker process (claimed with an open-file-description lock,
so the slot of a worker that dies frees itself). After the slot file's own cells, a slot
holds ``until`` (ms: when the last of its counts stops weighing) and a table of
``entries`` entries of six int64 cells ``[key hash (0: empty), window length ms, window
a, count a, window b, count b]``: window ``w`` is counted in pair ``w % 2``, so the
current window and the one before are both there. A key's entry lives in one *bucket*
of ``ways`` consecutive entries chosen by its hash (a set-associative table), the same
bucket in every slot. Windows are aligned on the host's monotonic clock (shared by every
process), as the library's memory storage aligns them on the wall clock: the window of
``now`` is ``now // length``.

**Costs.** A worker writes only its own slot. A decision takes a lock of the process
(its threads only), held for arithmetic: no syscall, no file lock, nothing that releases
the GIL (the clock is vDSO). It reads the key's bucket in every slot whose ``until`` has
not passed (one ``unpack_from`` of the bucket's hashes, one of the matching entry), adds
this worker's counts, and writes this worker's entry: about 2 us, plus 0.3 us per other
worker with live counts; the same per decision with 8 threads. A thread finding the lock
taken (its holder was switched out mid-decision, at most once per switch interval)
yields the GIL until it is free rather than block on it, so the lock never goes to a
thread that must still wait for the GIL (a convoy: a context switch per request).

**Margins.** Nothing written is lost between workers, but a decision is read-then-write:
workers deciding at the same instant may each take the last unit, so the host admits at
most one request per other worker deciding at that instant over the limit. Sequential
requests (each decided after the one before was counted), whichever workers take them,
are counted exactly. The slot of a worker that died stays readable, so its counts weigh
until their windows pass; it is reused (and then cleared) only once every never-used
slot is taken, which forgets what it still counted.

**Bounded memory.** A slot's table never grows: the file is ``slots`` x ``entries`` x 48
bytes (64 x 16384 x 48: 48 MiB by default, sparse; a worker touches the pages of the
buckets its keys fall in). An entry whose windows have both passed is free for reuse.
When a new key finds its bucket in this worker's slot full of live entries, the entry
counted least recently is reused: that key loses this worker's counts (the other
workers' stay), so a full table can make a limit more lenient for the evicted key only,
never stricter for anyone; evictions are counted and logged (at most once a minute per
worker).

**Administration.** :meth:`~HostStorage.clear` and :meth:`~HostStorage.reset` (never on
the request path) also zero what other workers counted: the only writes into a slot not
one's own, best effort against a worker counting the same key at that very instant.

**Fallback.** When the state dir cannot be used, or every slot is taken, the table is
one slot in this process's memory: limits then count per worker, and the log says so
once. When the file was the problem it is tried again every 5 s (this worker's counts
start afresh there)."""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

from limits.errors import StorageError
from limits.storage import SlidingWindowCounterSupport, Storage

from ..mesh.state import StateDirError, check_private_dir
from ..shared_slots import (
    SLOT_HEADER_BYTES,
    OnSlots,
    SlotFile,
    acquire_without_convoy,
    key_hash,
)

log = logging.getLogger("odin_gw.traffic.host_storage")

SCHEME = "odin-host"
MAGIC = 0x32304C5452494F44  # "ODIRTL02" little-endian: a file of this layout
DEFAULT_SLOTS = 64
DEFAULT_ENTRIES = 1 << 14  # per slot: 768 KiB each (mapped; pages touched as keys arrive)
DEFAULT_WAYS = 8
ENTRY_CELLS = 6
ENTRY_BYTES = ENTRY_CELLS * 8
TABLE_HEADER_CELLS = 8  # [until ms, unused...], after the slot file's cells
TABLE_OFFSET = SLOT_HEADER_BYTES + TABLE_HEADER_CELLS * 8  # of the table in a slot
EVICTION_LOG_EVERY = 60.0
#: Keys whose hash a storage remembers (then it forgets them all and starts again).
HASH_CACHE = 1 << 16
_HEADER = struct.Struct("<5q")  # magic, slots, entries, ways, entry cells
_ENTRY = struct.Struct(f"<{ENTRY_CELLS}q")

SlidingWindow = tuple[int, float, int, float]


def host_storage_uri(state_dir: str) -> str:
    """The ``odin-host://`` URI of a state dir (what ``storage_from_string`` takes)."""
    return f"{SCHEME}://{quote(os.path.abspath(state_dir))}"


class HostStorage(OnSlots, Storage, SlidingWindowCounterSupport):
    """Counters in per-worker slots of a file in the state dir (see the module docstring).

    ``uri``: ``odin-host:///path/of/the/state/dir`` (the directory is created 0700 when
    absent); ``odin-host://`` alone counts in this process only. ``entries`` (a multiple
    of ``ways``) bounds the keys one worker holds at once; ``slots`` bounds the workers
    that share; ``clock`` is the host's monotonic clock (injectable in tests). Nothing is
    opened until the first operation, so a storage built before ``fork`` (gunicorn's
    ``--preload``) claims a slot in each worker. Safe to share between threads.
    """

    STORAGE_SCHEME = [SCHEME]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        entries: int = DEFAULT_ENTRIES,
        ways: int = DEFAULT_WAYS,
        slots: int = DEFAULT_SLOTS,
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
        self.evictions = 0
        self._slot_bytes = TABLE_OFFSET + entries * ENTRY_BYTES
        self._bucket_bytes = ways * ENTRY_BYTES
        self._slots = SlotFile(
            self._state_dir if self.directory else None,
            f"rate-limits-{slots}x{entries}x{ways}.bin",
            slots,
            self._slot_bytes,
            _HEADER.pack(MAGIC, slots, entries, ways, ENTRY_CELLS),
            log=log,
            fallback="rate limits count per worker, not per host",
            clock=clock,
        )
        # The key hashes of a bucket, entry by entry (the rest of each entry skipped).
        self._hashes = struct.Struct("<" + f"q{ENTRY_BYTES - 8}x" * ways)
        self._khashes: dict[str, int] = {}
        self._gen = -1  # the slot file's mapping this storage is bound to
        self._first = 0  # byte offset of slot 0
        self._own = 0  # byte offset of this worker's table
        self._until = 0  # cell of this worker's ``until``
        self._evict_logged = -EVICTION_LOG_EVERY
        self._warned: str | None = None

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return OSError

    # -- limits' SlidingWindowCounterSupport ---------------------------------------------
    def acquire_sliding_window(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> tuple[bool, SlidingWindow]:
        """:meth:`acquire_sliding_window_entry` and :meth:`get_sliding_window` in one
        pass: whether ``amount`` was counted, and the window as it is after that."""
        try:
            return self._sliding(key, limit, expiry, amount, True)
        except OSError as exc:
            if self.wrap_exceptions:
                raise StorageError(exc) from exc
            raise

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Count ``amount`` if the weighted count of this window and the one before
        stays within ``limit``: ``floor(previous * (time left in this window / length))
        + current + amount <= limit`` (the library's rule), counted by every worker."""
        return self._sliding(key, limit, expiry, amount, True)[0]

    def get_sliding_window(self, key: str, expiry: int) -> SlidingWindow:
        """``(previous count, seconds the previous window still weighs, current count,
        seconds until the current count stops counting)``, as the library's storages
        answer it (the previous window weighs ``seconds / length``)."""
        return self._sliding(key, 0, expiry, 0, False)[1]

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.clear(key)

    # -- limits' Storage: fixed windows ------------------------------------------------
    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to the key's count in the current window of ``expiry`` seconds;
        the new count (every worker's)."""
        length = _length_ms(expiry)
        khash = self._khashes.get(key) or self._hash(key)
        now_ms = self._now_ms()
        window = now_ms // length
        slots = self._slots
        with slots.lock:
            if self._gen != slots.gen:
                self._bind()
            offset = (khash % self.buckets) * self._bucket_bytes
            view = slots.view
            cell = self._own_cell(offset, khash)
            if cell is None or view[cell + 1] != length:
                cell = self._claim(offset, cell, khash, length, now_ms)
            self._count(view, cell, window, amount, length)
            return self._read(offset, khash, length, window, now_ms)[1]

    def get(self, key: str) -> int:
        """The key's count in its current window (0 when absent or passed)."""
        khash = self._khashes.get(key) or self._hash(key)
        now_ms = self._now_ms()
        slots = self._slots
        with slots.lock:
            if self._gen != slots.gen:
                self._bind()
            offset = (khash % self.buckets) * self._bucket_bytes
            length = self._length_of(offset, khash)
            if length is None:
                return 0
            return self._read(offset, khash, length, now_ms // length, now_ms)[1]

    def get_expiry(self, key: str) -> float:
        """When (``time.time()`` seconds) the key's current window ends."""
        khash = self._khashes.get(key) or self._hash(key)
        now_ms = self._now_ms()
        slots = self._slots
        with slots.lock:
            if self._gen != slots.gen:
                self._bind()
            length = self._length_of((khash % self.buckets) * self._bucket_bytes, khash)
        if length is None:
            return time.time()
        end = (now_ms // length + 1) * length
        return time.time() + (end - now_ms) / 1000

    def check(self) -> bool:
        """Whether the table can be used (mapped, shared or this process's)."""
        try:
            with self._slots.lock:
                if self._gen != self._slots.gen:
                    self._bind()
            return True
        except Exception:  # the health check answers, never raises
            return False

    def reset(self) -> int | None:
        """Forget every key (every worker's counts); the number of entries that were in
        use."""
        slots = self._slots
        with slots.lock:
            if self._gen != slots.gen:
                self._bind()
            view, mm = slots.view, slots.mm
            size = self.entries * ENTRY_BYTES
            used = 0
            for slot in range(slots.readable()):
                start = self._first + slot * self._slot_bytes + TABLE_OFFSET
                cells = view[start // 8 : (start + size) // 8 : ENTRY_CELLS]
                used += len(cells) - cells.tolist().count(0)
                mm[start : start + size] = bytes(size)
            return used

    def clear(self, key: str) -> None:
        """Forget one key (every worker's counts of it)."""
        khash = self._khashes.get(key) or self._hash(key)
        slots = self._slots
        with slots.lock:
            if self._gen != slots.gen:
                self._bind()
            view, mm = slots.view, slots.mm
            offset = (khash % self.buckets) * self._bucket_bytes
            for slot in range(slots.readable()):
                at = self._first + slot * self._slot_bytes + TABLE_OFFSET + offset
                hashes = self._hashes.unpack_from(mm, at)
                if khash not in hashes:
                    continue
                cell = at // 8 + hashes.index(khash) * ENTRY_CELLS
                if slot == slots.slot:
                    view[cell] = 0  # readers stop matching it first
                    for i in range(1, ENTRY_CELLS):
                        view[cell + i] = 0
                else:  # another worker's entry: only its counts (the owner keeps using it)
                    view[cell + 3] = 0
                    view[cell + 5] = 0

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Give the slot back (the next operation claims one again)."""
        self._slots.close()

    # -- internals ------------------------------------------------------------------------
    def _sliding(
        self, key: str, limit: int, expiry: int, amount: int, acquire: bool
    ) -> tuple[bool, SlidingWindow]:
        length = _length_ms(expiry)
        khash = self._khashes.get(key) or self._hash(key)
        now_ms = self._now_ms()
        window = now_ms // length
        left = (window + 1) * length - now_ms  # of the current window
        allowed = False
        slots = self._slots
        lock = slots.lock
        acquire_without_convoy(lock)
        try:
            if self._gen != slots.gen:
                self._bind()
            view = slots.view
            offset = (khash % self.buckets) * self._bucket_bytes
            previous, current = self._totals(offset, khash, length, window, now_ms)
            cell = self._own_cell(offset, khash)
            if cell is not None and view[cell + 1] == length:
                own_previous, own_current = _own(view, cell, window)
                previous += own_previous
                current += own_current
            if (
                acquire
                and amount <= limit
                and previous * left // length + current + amount <= limit
            ):
                if cell is None or view[cell + 1] != length:
                    cell = self._claim(offset, cell, khash, length, now_ms)
                self._count(view, cell, window, amount, length)
                current += amount
                allowed = True
        finally:
            lock.release()
        return allowed, (
            previous,
            left / 1000 if previous else 0.0,
            current,
            (left + length) / 1000,
        )

    def _now_ms(self) -> int:
        now = self.clock()
        slots = self._slots
        if not slots.shared:
            slots.reattach_if_due(now)  # after a fallback: the shared file again, when due
        return int(now * 1000)

    def _hash(self, key: str) -> int:
        khashes = self._khashes
        if len(khashes) >= HASH_CACHE:
            khashes.clear()
        khash = khashes[key] = key_hash(key)
        return khash

    def _state_dir(self) -> str | None:
        """The state dir, once made sure it is private (``None``: count in this process)."""
        try:
            check_private_dir(self.directory)
        except StateDirError as exc:
            problem = str(exc)
            if problem != self._warned:
                self._warned = problem
                log.warning("rate limits count per worker, not per host: %s", problem)
            return None
        return self.directory

    def _bind(self) -> None:
        """Map the file and claim a slot if needed; where this worker's cells are.
        Caller holds the lock."""
        slots = self._slots
        if not slots.attached:
            slots.attach()
        assert slots.slot is not None
        self._first = slots.slot_offset(0)
        own = slots.slot_offset(slots.slot)
        self._own = own + TABLE_OFFSET
        self._until = (own + SLOT_HEADER_BYTES) // 8
        self._gen = slots.gen

    def _totals(
        self, offset: int, khash: int, length: int, window: int, now_ms: int
    ) -> tuple[int, int]:
        """(previous, current) counts of the key in every slot but this worker's."""
        slots = self._slots
        mm, view, own = slots.mm, slots.view, slots.slot
        previous = current = 0
        before = window - 1
        unpack_hashes = self._hashes.unpack_from
        base = self._first
        step = self._slot_bytes
        for slot in range(slots.readable()):
            start = base + slot * step
            # Never claimed, cleared, or nothing there weighs any more.
            if slot == own or view[(start + SLOT_HEADER_BYTES) >> 3] <= now_ms:
                continue
            at = start + TABLE_OFFSET + offset
            hashes = unpack_hashes(mm, at)
            if khash not in hashes:
                continue
            found, found_length, window_a, count_a, window_b, count_b = _ENTRY.unpack_from(
                mm, at + hashes.index(khash) * ENTRY_BYTES
            )
            if found != khash or found_length != length:
                continue
            if window_a == window:
                current += count_a
            elif window_a == before:
                previous += count_a
            if window_b == window:
                current += count_b
            elif window_b == before:
                previous += count_b
        return previous, current

    def _read(
        self, offset: int, khash: int, length: int, window: int, now_ms: int
    ) -> tuple[int, int]:
        """(previous, current) counts of the key in every slot. Caller holds the lock."""
        previous, current = self._totals(offset, khash, length, window, now_ms)
        cell = self._own_cell(offset, khash)
        view = self._slots.view
        if cell is not None and view[cell + 1] == length:
            own_previous, own_current = _own(view, cell, window)
            previous += own_previous
            current += own_current
        return previous, current

    def _own_cell(self, offset: int, khash: int) -> int | None:
        """The cell of the key's entry in this worker's slot, if any."""
        at = self._own + offset
        hashes = self._hashes.unpack_from(self._slots.mm, at)
        if khash in hashes:
            return at // 8 + hashes.index(khash) * ENTRY_CELLS
        return None

    def _length_of(self, offset: int, khash: int) -> int | None:
        """The window length some worker counts the key in (this worker's first)."""
        slots = self._slots
        cell = self._own_cell(offset, khash)
        if cell is not None:
            return slots.view[cell + 1]
        for slot in range(slots.readable()):
            at = self._first + slot * self._slot_bytes + TABLE_OFFSET + offset
            hashes = self._hashes.unpack_from(slots.mm, at)
            if khash in hashes:
                return slots.view[at // 8 + hashes.index(khash) * ENTRY_CELLS + 1]
        return None

    def _claim(self, offset: int, cell: int | None, khash: int, length: int, now_ms: int) -> int:
        """An entry of this worker's slot for the key (``cell``: its entry, counting
        another window length): empty, or both windows passed; else the entry counted
        least recently is evicted."""
        view = self._slots.view
        if cell is None:
            first = (self._own + offset) // 8
            stalest, stalest_end = first, None
            for way in range(self.ways):
                at = first + way * ENTRY_CELLS
                if view[at] == 0:
                    cell = at
                    break
                at_length = view[at + 1] or 1
                end = (max(view[at + 2], view[at + 4]) + 1) * at_length  # of its last window
                if now_ms >= end + at_length:
                    cell = at  # its weight as the previous window is gone too
                    break
                if stalest_end is None or end < stalest_end:
                    stalest, stalest_end = at, end
            else:
                cell = stalest
                self._evicted(now_ms)
        view[cell] = 0  # readers stop matching the old entry before it changes
        for i in range(1, ENTRY_CELLS):
            view[cell + i] = 0
        view[cell + 1] = length
        view[cell] = khash
        return cell

    def _count(self, view, cell: int, window: int, amount: int, length: int) -> None:
        """Add ``amount`` to this worker's count of ``window`` (the entry's pair of the
        window's parity, restarted when it held an older window)."""
        stamp = cell + 2 + 2 * (window & 1)
        if view[stamp] == window:
            view[stamp + 1] += amount
        else:
            # The count first: a reader matches counts by their window.
            view[stamp + 1] = amount
            view[stamp] = window
        until = (window + 2) * length
        if view[self._until] < until:
            view[self._until] = until

    def _evicted(self, now_ms: int) -> None:
        self.evictions += 1
        if now_ms / 1000 - self._evict_logged >= EVICTION_LOG_EVERY:
            self._evict_logged = now_ms / 1000
            log.warning(
                "rate-limit table full (%d entries per worker, bucket of %d): reusing the "
                "least recently counted key's entry (%d evictions so far in this worker)",
                self.entries,
                self.ways,
                self.evictions,
            )


def _length_ms(expiry: float) -> int:
    length = round(float(expiry) * 1000)
    if length <= 0:
        raise ValueError(f"window length must be positive, not {expiry!r}")
    return length


def _own(view, cell: int, window: int) -> tuple[int, int]:
    """(previous, current) counts of an entry of this worker's slot."""
    previous = current = 0
    for stamp in (cell + 2, cell + 4):
        counted = view[stamp]
        if counted == window:
            current += view[stamp + 1]
        elif counted == window - 1:
            previous += view[stamp + 1]
    return previous, current
