"""Per-service caps on concurrent requests, counted across every worker of the host.

``circuitBreaker.maxConcurrent`` bounds the requests a service has in flight from this
host: :meth:`ConcurrencyCap.try_acquire` before forwarding (``False``: answer 503 at
once, nothing to release), :meth:`ConcurrencyCap.release` exactly once when the request
ends, whatever its outcome (after the answer's body has been relayed or abandoned).

**Where the counts live.** One :class:`~odin_gw.shared_slots.SlotFile` in the state dir
(``concurrency-<slots>x<keys>.bin``): one slot per worker, and in a slot one entry
``(service hash, in flight)`` per capped service (open addressing by the name's hash,
so workers of two config generations during a reload agree on the entries). A worker
writes only its own entry; a decision sums the entries of every slot ever claimed.

**Costs.** No syscall per request: an acquire or release takes a per-process lock (held
for the arithmetic only, taken without a convoy: see
:func:`~odin_gw.shared_slots.acquire_without_convoy`), sums one int64 cell per worker
and writes one. Only when a decision would refuse, and at most once a second, does the
worker ask the kernel which slots are still held (one ``fcntl`` per slot), so a worker
that died with requests in flight stops counting against the cap.

**Margins.** A decision is read-then-write: workers deciding in the same instant may
each take the last unit, so the host may overshoot the cap by at most one request per
other worker deciding at that instant; inside a worker, decisions are serialised. When
no state dir is usable (no mesh, or it cannot be opened) or every slot is taken, each
worker counts alone (the cap holds per worker) and says so once in the log; the shared
file is tried again every 5 s, carrying the worker's in-flight counts over.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Mapping

from ..shared_slots import (
    SLOT_HEADER_BYTES,
    SLOT_HEADER_CELLS,
    OnSlots,
    SlotFile,
    acquire_without_convoy,
    key_hash,
)

log = logging.getLogger("odin_gw.traffic.concurrency")

MAGIC = 0x31304E4F43494F44  # "ODICON01" little-endian: a file of this layout
DEFAULT_SLOTS = 64
DEFAULT_KEYS = 256  # fixed, so a reload that adds a service keeps the same file
ENTRY_CELLS = 2  # [service hash (0: empty), requests in flight]
#: At most this often (seconds) a refusal asks which workers are still alive.
LIVENESS_EVERY = 1.0
_HEADER = struct.Struct("<4q")


class _Service:
    __slots__ = ("cell", "hash", "here", "limit", "name", "rejected")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.hash = key_hash(name)
        self.here = 0  # this worker's requests in flight (authoritative; mirrored)
        self.rejected = 0  # refusals by this worker
        self.cell: int | None = None  # index of this worker's count in the view


class ConcurrencyCap(OnSlots):
    """The ``maxConcurrent`` caps of a gateway's services, shared by the host's workers.

    ``path``: the state dir, a callable giving it (read at first use, in the worker),
    or ``None`` for per-worker counting. ``limits``: service name -> cap (services not
    named are not capped: acquiring them costs one dict lookup). ``slots`` bounds the
    workers that share; ``clock`` is the host's monotonic clock (injectable in tests).
    Safe to share between threads.
    """

    def __init__(
        self,
        path: str | Callable[[], str | None] | None,
        limits: Mapping[str, int],
        slots: int = DEFAULT_SLOTS,
        keys: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, limit in limits.items():
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ValueError(f"maxConcurrent of {name!r}: {limit!r} is not a count >= 1")
        wanted = max(DEFAULT_KEYS if keys is None else keys, 1)
        if wanted < len(limits):
            raise ValueError(f"keys: {wanted} entries cannot hold {len(limits)} services")
        self.keys = wanted
        self.clock = clock
        self._services = {name: _Service(name, limit) for name, limit in limits.items()}
        self._slots = SlotFile(
            path,
            f"concurrency-{slots}x{self.keys}.bin",
            slots,
            SLOT_HEADER_BYTES + self.keys * ENTRY_CELLS * 8,
            _HEADER.pack(MAGIC, slots, self.keys, ENTRY_CELLS),
            log=log,
            fallback="concurrency caps count per worker, not per host",
            reuse_first=True,  # in-flight counts never expire: clear dead slots early
            clock=clock,
        )
        self._gen = -1
        self._pid = os.getpid()
        self._dead: dict[int, int] = {}  # slot -> claim stamp of the dead owner
        self._dead_checked = float("-inf")

    # -- hot path ---------------------------------------------------------------------
    def try_acquire(self, service: str) -> bool:
        """Count one request of ``service`` in flight if the host is below its cap;
        ``False`` (nothing counted, nothing to release) when it is at the cap."""
        svc = self._services.get(service)
        if svc is None:
            return True
        slots = self._slots
        if not slots.shared and slots.attached:
            slots.reattach_if_due(self.clock())
        lock = slots.lock
        acquire_without_convoy(lock)
        try:
            if self._gen != slots.gen or not slots.attached:
                self._bind()
            if self._total(svc) >= svc.limit and (
                not self._forget_dead() or self._total(svc) >= svc.limit
            ):
                svc.rejected += 1
                return False
            svc.here += 1
            self._write(svc)
            return True
        finally:
            lock.release()

    def release(self, service: str) -> None:
        """One request of ``service`` admitted by :meth:`try_acquire` ended."""
        svc = self._services.get(service)
        if svc is None:
            return
        slots = self._slots
        lock = slots.lock
        acquire_without_convoy(lock)
        try:
            if self._gen != slots.gen or not slots.attached:
                self._bind()
            if svc.here > 0:
                svc.here -= 1
                self._write(svc)
        finally:
            lock.release()

    # -- views ------------------------------------------------------------------------
    def limit(self, service: str) -> int | None:
        """The cap of ``service``, or ``None`` when it has none."""
        svc = self._services.get(service)
        return svc.limit if svc is not None else None

    def inflight(self, service: str) -> int:
        """Requests of ``service`` in flight on the whole host (every live worker)."""
        svc = self._services.get(service)
        if svc is None:
            return 0
        slots = self._slots
        lock = slots.lock
        acquire_without_convoy(lock)
        try:
            if self._gen != slots.gen or not slots.attached:
                self._bind()
            return self._total(svc)
        finally:
            lock.release()

    def rejected(self, service: str) -> int:
        """Requests of ``service`` this worker refused (a counter for metrics)."""
        svc = self._services.get(service)
        return svc.rejected if svc is not None else 0

    def status(self) -> dict[str, dict[str, object]]:
        """Admin view: per capped service ``limit``, ``inflight`` (host),
        ``inflightHere`` (this worker), ``rejected`` (this worker) and ``shared``."""
        return {
            name: {
                "limit": svc.limit,
                "inflight": self.inflight(name),
                "inflightHere": svc.here,
                "rejected": svc.rejected,
                "shared": self._slots.shared,
            }
            for name, svc in self._services.items()
        }

    def close(self) -> None:
        """Give the slot back (the kernel does it anyway when the process ends)."""
        self._slots.close()

    # -- internals (caller holds the slot file's lock) --------------------------------
    def _bind(self) -> None:
        slots = self._slots
        if os.getpid() != self._pid:  # a forked child: the parent's requests are not ours
            self._pid = os.getpid()
            self._dead.clear()
            self._dead_checked = float("-inf")
            for svc in self._services.values():
                svc.here = 0
                svc.cell = None
        if not slots.attached:
            slots.attach()
        view = slots.view
        assert view is not None and slots.slot is not None
        entries = slots.slot_offset(slots.slot) // 8 + SLOT_HEADER_CELLS
        for svc in self._services.values():
            # keys >= services: every service finds its entry or an empty one.
            start = svc.hash % self.keys
            for probe in range(self.keys):
                cell = entries + ((start + probe) % self.keys) * ENTRY_CELLS
                current = view[cell]
                if current == svc.hash or current == 0:
                    view[cell + 1] = svc.here  # the count first: readers match the hash
                    view[cell] = svc.hash
                    svc.cell = cell + 1
                    break
        self._gen = slots.gen

    def _write(self, svc: _Service) -> None:
        view = self._slots.view
        if svc.cell is not None and view is not None:
            view[svc.cell] = svc.here

    def _total(self, svc: _Service) -> int:
        slots = self._slots
        view = slots.view
        assert view is not None
        keys, khash, dead = self.keys, svc.hash, self._dead
        start = khash % keys
        total = 0
        for slot in range(slots.readable()):
            base = slots.slot_offset(slot) // 8
            if view[base] == 0:
                continue  # never claimed
            if dead and dead.get(slot) == view[base + 1]:
                continue  # its owner died; nobody claimed it since
            entries = base + SLOT_HEADER_CELLS
            for probe in range(keys):
                cell = entries + ((start + probe) % keys) * ENTRY_CELLS
                current = view[cell]
                if current == khash:
                    total += view[cell + 1]
                    break
                if current == 0:
                    break
        return total

    def _forget_dead(self) -> bool:
        """Look (at most once per ``LIVENESS_EVERY``) for slots whose worker died;
        True when one was newly found, so a refusal is worth summing again."""
        slots = self._slots
        now = self.clock()
        if not slots.shared or now - self._dead_checked < LIVENESS_EVERY:
            return False
        self._dead_checked = now
        found = False
        for slot in range(slots.readable()):
            pid, stamp = slots.claim_stamp(slot)
            if pid == 0 or slot == slots.slot or self._dead.get(slot) == stamp:
                continue
            if not slots.alive(slot):
                self._dead[slot] = stamp
                found = True
        return found
