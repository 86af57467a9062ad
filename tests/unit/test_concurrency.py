"""Per-service concurrency caps: counting in one worker, shared by slot views of one
file, dead workers' counts dropped, and real processes racing for the last units."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import stat
import struct
import threading
import warnings

import pytest

from odin_gw.shared_slots import HEADER_BYTES, LOCK_BASE, SLOT_HEADER_BYTES, key_hash
from odin_gw.traffic.concurrency import LIVENESS_EVERY, ConcurrencyCap


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def take_all(cap, service, limit=1000):
    taken = 0
    while taken < limit and cap.try_acquire(service):
        taken += 1
    return taken


# -- one worker ----------------------------------------------------------------------------


def test_the_cap_refuses_the_request_over_it_and_a_release_makes_room():
    cap = ConcurrencyCap(None, {"users": 3}, clock=Clock())
    assert take_all(cap, "users") == 3
    assert cap.inflight("users") == 3 and cap.rejected("users") == 1
    assert not cap.try_acquire("users")
    assert cap.rejected("users") == 2
    cap.release("users")
    assert cap.try_acquire("users")
    assert not cap.try_acquire("users")
    assert cap.inflight("users") == 3


def test_services_without_a_cap_are_never_refused_or_counted():
    cap = ConcurrencyCap(None, {"users": 1}, clock=Clock())
    assert all(cap.try_acquire("books") for _ in range(100))
    cap.release("books")
    assert cap.limit("books") is None and cap.inflight("books") == 0
    assert cap.try_acquire("users") and not cap.try_acquire("users")


def test_caps_of_services_are_counted_apart():
    cap = ConcurrencyCap(None, {"users": 2, "books": 1}, clock=Clock())
    assert take_all(cap, "users") == 2
    assert take_all(cap, "books") == 1
    assert (cap.inflight("users"), cap.inflight("books")) == (2, 1)


def test_a_release_without_an_acquire_never_goes_below_zero():
    cap = ConcurrencyCap(None, {"users": 2}, clock=Clock())
    cap.release("users")
    cap.release("users")
    assert cap.inflight("users") == 0
    assert take_all(cap, "users") == 2


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, None])
def test_a_bad_limit_is_refused_naming_the_service(limit):
    with pytest.raises(ValueError, match="maxConcurrent of 'users'"):
        ConcurrencyCap(None, {"users": limit})


def test_threads_of_one_worker_never_exceed_the_cap():
    cap = ConcurrencyCap(None, {"users": 5})
    seen: list[int] = []
    outcomes = {"taken": 0, "refused": 0}
    guard = threading.Lock()
    start = threading.Barrier(8)

    def work():
        start.wait(timeout=10)
        for _ in range(300):
            if cap.try_acquire("users"):
                level = cap.inflight("users")
                with guard:
                    outcomes["taken"] += 1
                    seen.append(level)
                cap.release("users")
            else:
                with guard:
                    outcomes["refused"] += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes["taken"] + outcomes["refused"] == 8 * 300
    assert outcomes["refused"] == cap.rejected("users")
    assert max(seen) <= 5
    assert cap.inflight("users") == 0


def test_status_shows_limit_counts_and_refusals():
    cap = ConcurrencyCap(None, {"users": 1}, clock=Clock())
    cap.try_acquire("users")
    cap.try_acquire("users")
    assert cap.status() == {
        "users": {"limit": 1, "inflight": 1, "inflightHere": 1, "rejected": 1, "shared": False}
    }


# -- sharing through the file ----------------------------------------------------------------


def test_two_views_of_one_file_share_one_cap(state_dir):
    clock = Clock()
    a = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=clock)
    b = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=clock)
    assert take_all(a, "users", limit=2) == 2
    assert take_all(b, "users") == 1
    assert a.shared and b.shared
    assert a.inflight("users") == b.inflight("users") == 3
    assert not a.try_acquire("users")
    b.release("users")
    assert a.try_acquire("users")
    assert not b.try_acquire("users")
    a.close()
    b.close()


def test_views_with_other_services_agree_on_the_shared_ones(state_dir):
    # During a reload, workers of the old and the new config share the file.
    old = ConcurrencyCap(state_dir, {"users": 4}, slots=4, clock=Clock())
    new = ConcurrencyCap(state_dir, {"books": 9, "users": 4}, slots=4, clock=Clock())
    assert take_all(old, "users", limit=3) == 3
    assert take_all(new, "users") == 1
    assert take_all(new, "books") == 9
    assert old.inflight("users") == 4 and old.inflight("books") == 0
    old.close()
    new.close()


def test_a_dead_workers_requests_stop_counting_at_the_next_liveness_check(state_dir):
    clock = Clock()
    a = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=clock)
    b = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=clock)
    assert take_all(a, "users", limit=2) == 2
    assert take_all(b, "users") == 1  # the refusal checked liveness: a is alive
    a.close()  # as if the worker died with two requests in flight
    assert not b.try_acquire("users")  # checked less than LIVENESS_EVERY ago
    clock.now += LIVENESS_EVERY
    assert take_all(b, "users") == 2
    assert b.inflight("users") == 3
    b.close()


def test_a_dead_workers_slot_is_claimed_again_and_cleared(state_dir):
    clock = Clock()
    a = ConcurrencyCap(state_dir, {"users": 5}, slots=4, clock=clock)
    b = ConcurrencyCap(state_dir, {"users": 5}, slots=4, clock=clock)
    assert take_all(a, "users", limit=3) == 3
    assert take_all(b, "users", limit=1) == 1
    slot_a = a.slot
    a.close()
    c = ConcurrencyCap(state_dir, {"users": 5}, slots=4, clock=clock)
    assert c.try_acquire("users")
    assert c.slot == slot_a  # reused before any never-used slot
    assert c.inflight("users") == b.inflight("users") == 2
    b.close()
    c.close()


def test_the_file_is_private(state_dir):
    cap = ConcurrencyCap(state_dir, {"users": 1}, slots=2, clock=Clock())
    cap.try_acquire("users")
    assert stat.S_IMODE(os.stat(cap.file).st_mode) == 0o600
    cap.close()


def test_a_symlink_in_place_of_the_file_is_not_followed(state_dir, tmp_path, caplog):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, os.path.join(state_dir, "concurrency-2x256.bin"))
    cap = ConcurrencyCap(state_dir, {"users": 1}, slots=2, clock=Clock())
    with caplog.at_level(logging.WARNING, "odin_gw.traffic.concurrency"):
        assert cap.try_acquire("users")
        assert not cap.try_acquire("users")
    assert not cap.shared
    assert target.read_bytes() == b""
    assert caplog.text.count("count per worker, not per host") == 1


def test_a_worker_that_fell_back_rejoins_the_file_with_its_counts(tmp_path):
    clock = Clock()
    path = tmp_path / "late"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)  # open to others: refused
    lone = ConcurrencyCap(str(path), {"users": 3}, slots=4, clock=clock)
    assert take_all(lone, "users", limit=2) == 2
    assert not lone.shared and os.listdir(path) == []
    os.chmod(path, 0o700)
    clock.now += 5.0
    assert lone.try_acquire("users")  # rejoined: 3 in flight, written to the file
    assert lone.shared
    other = ConcurrencyCap(str(path), {"users": 3}, slots=4, clock=clock)
    assert other.inflight("users") == 3
    assert not other.try_acquire("users")
    lone.close()
    other.close()


def test_no_free_slot_falls_back_to_this_worker(state_dir):
    first = ConcurrencyCap(state_dir, {"users": 2}, slots=1, clock=Clock())
    second = ConcurrencyCap(state_dir, {"users": 2}, slots=1, clock=Clock())
    assert take_all(first, "users") == 2
    assert take_all(second, "users") == 2  # counts alone
    assert first.shared and not second.shared
    first.close()


def test_a_forked_worker_claims_its_own_slot_and_starts_at_zero(state_dir):
    cap = ConcurrencyCap(state_dir, {"users": 4}, slots=4, clock=Clock())
    assert take_all(cap, "users", limit=1) == 1
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads around
        pid = os.fork()
    if pid == 0:  # the child: the parent's request is not its own to release
        code = 1
        try:
            cap.release("users")
            ok = cap.try_acquire("users") and cap.try_acquire("users")
            report = bytes([cap.slot, cap.inflight("users"), ok])
            os.write(write, report)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child_slot, child_sees, child_ok = os.read(read, 3)
    os.close(read)
    os.waitpid(pid, 0)
    assert child_slot != cap.slot
    assert (child_sees, child_ok) == (3, 1)  # the parent's one and its own two
    cap.close()


# -- real processes -----------------------------------------------------------------------------


def _hold_in_child(state_dir, start, done, results):
    cap = ConcurrencyCap(state_dir, {"users": 10}, slots=8)
    cap.inflight("users")  # claim the slot before the race starts
    start.wait(timeout=30)
    results.put((os.getpid(), cap.slot, take_all(cap, "users", limit=50)))
    done.wait(timeout=30)  # hold the requests until the parent has looked


def test_three_processes_share_one_cap_with_at_most_one_over_per_other_worker(state_dir):
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(3), ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_hold_in_child, args=(state_dir, start, done, results)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=60) for _ in procs]
        clock = Clock()
        view = ConcurrencyCap(state_dir, {"users": 10}, slots=8, clock=clock)
        total = sum(taken for _, _, taken in got)
        assert len({slot for _, slot, _ in got}) == 3  # one slot each
        # cap 10; a read-then-write race lets each other worker take one more at most
        assert 10 <= total <= 12, got
        assert view.inflight("users") == total
        assert not view.try_acquire("users")
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
    # The workers died holding their requests: the next check frees their counts.
    clock.now += LIVENESS_EVERY
    assert take_all(view, "users") == 10
    view.close()


# -- threads of one worker, switched mid-decision ---------------------------------------------


def _in_threads(count, work):
    """Run ``work(i)`` in ``count`` threads released together; wait for all of them."""
    start = threading.Barrier(count)

    def run(i):
        start.wait(timeout=30)
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


def _race_for_the_cap(cap, attempts):
    admitted = [0] * 8

    def attempt(i):
        admitted[i] = sum(cap.try_acquire("users") for _ in range(attempts))

    def release(i):
        for _ in range(admitted[i]):
            cap.release("users")

    _in_threads(8, attempt)
    held = cap.inflight("users")
    _in_threads(8, release)
    return sum(admitted), held, cap.inflight("users")


def test_eight_threads_get_exact_counts_of_admissions_refusals_and_releases(state_dir):
    # A decision is never raced inside a worker, however often threads are switched
    # (every microsecond here): in each round 8 x 500 attempts on a cap of 1000 admit
    # exactly 1000, and releasing them from 8 threads leaves none in flight.
    import sys

    cap = ConcurrencyCap(state_dir, {"users": 1000}, slots=4)
    cap.inflight("users")  # claim the slot before the race starts
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        rounds = [_race_for_the_cap(cap, 500) for _ in range(10)]
    finally:
        sys.setswitchinterval(interval)
    assert cap.shared
    assert rounds == [(1000, 1000, 0)] * 10
    assert cap.rejected("users") == 10 * (8 * 500 - 1000)
    cap.close()


# -- views, geometry, and counts that must survive re-binding -----------------------------------


def test_views_of_a_capped_and_an_uncapped_service():
    cap = ConcurrencyCap(None, {"users": 1}, clock=Clock())
    assert cap.limit("users") == 1
    assert cap.try_acquire("users") and not cap.try_acquire("users")
    assert cap.rejected("users") == 1
    assert (cap.limit("books"), cap.inflight("books"), cap.rejected("books")) == (None, 0, 0)


def test_keys_must_hold_every_service_and_name_the_file(state_dir):
    with pytest.raises(ValueError, match="keys: 1 entries cannot hold 2 services"):
        ConcurrencyCap(None, {"users": 1, "books": 1}, keys=1)
    two = ConcurrencyCap(state_dir, {"users": 1, "books": 1}, slots=4, keys=2, clock=Clock())
    one = ConcurrencyCap(state_dir, {"users": 1}, slots=4, keys=1, clock=Clock())
    assert (two.keys, one.keys) == (2, 1)
    assert two.try_acquire("books") and one.try_acquire("users")
    assert os.path.basename(two.file) == "concurrency-4x2.bin"
    assert os.path.basename(one.file) == "concurrency-4x1.bin"
    two.close()
    one.close()


def test_the_file_holds_a_header_page_then_one_slot_of_hash_and_count_cells_per_worker(state_dir):
    cap = ConcurrencyCap(state_dir, {"users": 1}, slots=4, keys=8, clock=Clock())
    cap.try_acquire("users")
    # per slot: its header cells, then [hash, in flight] int64 cells per key
    assert os.path.getsize(cap.file) == HEADER_BYTES + 4 * (SLOT_HEADER_BYTES + 8 * 2 * 8)
    cap.close()


def _colliding_names(keys: int) -> tuple[str, str]:
    """Two service names whose entries start at the same index of a ``keys`` table."""
    seen: dict[int, str] = {}
    for i in range(1000):
        name = f"svc-{i}"
        start = key_hash(name) % keys
        if start in seen:
            return seen[start], name
        seen[start] = name
    raise AssertionError("no collision in 1000 names")


def test_services_whose_entries_collide_are_counted_apart(state_dir):
    first, second = _colliding_names(4)
    limits = {first: 2, second: 2}
    a = ConcurrencyCap(state_dir, limits, slots=4, keys=4, clock=Clock())
    b = ConcurrencyCap(state_dir, limits, slots=4, keys=4, clock=Clock())
    assert take_all(a, second) == 2
    assert take_all(a, first, limit=1) == 1
    assert b.inflight(first) == 1 and b.inflight(second) == 2
    assert not b.try_acquire(second)
    assert take_all(b, first) == 1
    assert a.inflight(first) == 2 and a.inflight(second) == 2
    a.close()
    b.close()


def test_a_slot_locked_but_never_claimed_does_not_hide_the_slots_after_it(state_dir):
    # An opener holding slot 0's lock byte without writing its claim: the workers take
    # slots 1 and 2, and the sum must still read past the never-claimed slot 0.
    fd = os.open(os.path.join(state_dir, "concurrency-4x256.bin"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        lock = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, LOCK_BASE, 1, 0)
        fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37), lock)
        a = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=Clock())
        b = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=Clock())
        assert take_all(a, "users", limit=2) == 2
        assert (a.slot, b.inflight("users"), b.slot) == (1, 2, 2)
        assert take_all(b, "users") == 1
        assert a.inflight("users") == 3
        a.close()
        b.close()
    finally:
        os.close(fd)


def test_a_newly_found_dead_worker_admits_only_if_the_live_ones_leave_room(state_dir):
    clock = Clock()
    dying = ConcurrencyCap(state_dir, {"users": 2}, slots=4, clock=clock)
    late = ConcurrencyCap(state_dir, {"users": 2}, slots=4, clock=clock)
    busy = ConcurrencyCap(state_dir, {"users": 2}, slots=4, clock=clock)
    for cap in (dying, late, busy):
        cap.inflight("users")  # each claims its slot now
    assert dying.try_acquire("users")
    dying.close()  # died with one request in flight
    assert take_all(busy, "users") == 2  # its refusal found the dead worker: room for 2
    # late has not looked yet: the dead worker's request hides, then is found dead, but
    # the live ones alone are at the cap.
    assert not late.try_acquire("users")
    assert late.inflight("users") == 2 and late.rejected("users") == 1
    late.close()
    busy.close()


def test_the_worker_in_the_first_slot_also_finds_dead_workers_after_it(state_dir):
    clock = Clock()
    first = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=clock)
    second = ConcurrencyCap(state_dir, {"users": 3}, slots=4, clock=clock)
    first.inflight("users")
    assert take_all(second, "users", limit=2) == 2
    assert (first.slot, second.slot) == (0, 1)
    second.close()  # died with two requests in flight
    assert take_all(first, "users") == 3
    first.close()


def test_a_worker_rejoining_the_file_brings_its_counts_before_deciding(tmp_path):
    clock = Clock()
    path = tmp_path / "late"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)  # open to others: refused
    lone = ConcurrencyCap(str(path), {"users": 3}, slots=4, clock=clock)
    assert take_all(lone, "users", limit=2) == 2 and not lone.shared
    os.chmod(path, 0o700)
    other = ConcurrencyCap(str(path), {"users": 3}, slots=4, clock=clock)
    assert take_all(other, "users", limit=2) == 2
    clock.now += 5.0
    assert not lone.try_acquire("users")  # rejoined with its 2: the host has 4
    assert lone.shared and other.inflight("users") == 4
    lone.close()
    other.close()


def _in_a_forked_child(child) -> bytes:
    """Run ``child()`` (returning up to 16 bytes) in a forked process; its answer."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads around
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write, child())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        answer = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return answer


def test_a_forked_worker_starts_at_zero_and_checks_liveness_when_refused(state_dir):
    cap = ConcurrencyCap(state_dir, {"users": 4}, slots=4, clock=Clock())
    assert take_all(cap, "users", limit=1) == 1

    def child():
        before = cap.inflight("users")
        taken = take_all(cap, "users")  # the last attempt is refused: a liveness check
        return bytes([before, taken, cap.inflight("users"), cap.rejected("users")])

    assert tuple(_in_a_forked_child(child)) == (1, 3, 4, 1)
    cap.close()


def test_a_forked_worker_that_fell_back_rejoins_with_its_own_counts(tmp_path):
    clock = Clock()
    path = tmp_path / "late"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)  # open to others: refused
    cap = ConcurrencyCap(str(path), {"users": 5}, slots=4, clock=clock)
    assert take_all(cap, "users", limit=1) == 1 and not cap.shared

    def child():
        taken = take_all(cap, "users", limit=2)
        os.chmod(path, 0o700)
        clock.now += 5.0
        rejoined = cap.try_acquire("users")  # the file: its 2 carried over, one more
        return bytes([taken, rejoined, cap.shared, cap.inflight("users")])

    assert tuple(_in_a_forked_child(child)) == (2, 1, 1, 3)
    cap.close()
