"""Sharing what changed: the snapshot journal, coalesced publishes, unchanged objects.

A leader's ``StateDir`` appends one line per published snapshot (its header and the
services that changed) to ``snapshot.journal``; a follower's ``StateDir`` keeps the base
it parsed and reads only the new lines. Watch answers are coalesced into one publish.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from odin_gw.mesh.client import Discovery
from odin_gw.mesh.manager import _Batcher
from odin_gw.mesh.snapshot import Endpoint, ServiceEndpoints, Snapshot
from odin_gw.mesh.state import StateDir
from tests.unit.test_manager import manager


def svc(name: str, *ports: int, healthy: bool = True) -> ServiceEndpoints:
    eps = tuple(Endpoint("10.0.0.1", p, healthy=healthy, datacenter="dc1") for p in ports)
    return ServiceEndpoints(name, eps, source="consul", datacenters=("dc1",))


def big(n: int = 50) -> Snapshot:
    services = {f"s{i:03d}": svc(f"s{i:03d}", 80, 81) for i in range(n)}
    return Snapshot(
        mesh="consul", catalog=tuple(sorted(services)), origin="o", fingerprint="f"
    ).with_services(services)


def changed(snap: Snapshot, name: str, *ports: int, **kw) -> Snapshot:
    services = dict(snap.services)
    services[name] = svc(name, *ports, **kw)
    return snap.with_services(services)


def dirs(tmp_path) -> tuple[StateDir, StateDir]:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    writer = StateDir(str(path))
    writer.journal_from_bytes = 0  # journal even for a small document
    return writer, StateDir(str(path))


def test_changes_travel_as_journal_lines_and_followers_read_only_those(tmp_path):
    writer, reader = dirs(tmp_path)
    snap = big()
    writer.save_snapshot(snap)
    assert reader.read_snapshot() == snap
    base = os.stat(writer.snapshot_path)
    for i in range(5):
        snap = changed(snap, "s007", 80, 90 + i)
        writer.save_snapshot(snap)
        got = reader.read_snapshot()
        assert got == snap
        assert got.services["s008"] is reader.read_snapshot().services["s008"]
    assert (writer.full_writes, writer.journal_writes) == (1, 5)
    after = os.stat(writer.snapshot_path)
    assert (after.st_ino, after.st_mtime_ns) == (base.st_ino, base.st_mtime_ns)  # not rewritten
    with open(writer.journal_path) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 6  # the header naming the base, then one line per change
    entry = json.loads(lines[-1])
    assert list(entry["services"]) == ["s007"]  # only what changed travels
    assert "catalog" not in entry  # unchanged: not repeated


def test_a_fresh_reader_warm_starts_from_base_plus_journal(tmp_path):
    writer, _ = dirs(tmp_path)
    snap = big()
    writer.save_snapshot(snap)
    snap = changed(snap, "s001", 99)
    writer.save_snapshot(snap.evolve(last_error="x", catalog=("s001",)))
    later = StateDir(writer.path).read_snapshot()  # a restart: nothing cached
    assert later.services["s001"] == svc("s001", 99)
    assert later.last_error == "x" and later.catalog == ("s001",)
    assert later.version == snap.version + 1


def test_the_journal_is_compacted_into_a_new_base(tmp_path, monkeypatch):
    monkeypatch.setattr("odin_gw.mesh.state.JOURNAL_COMPACT_BYTES", 2000)
    writer, reader = dirs(tmp_path)
    snap = big(5)
    writer.save_snapshot(snap)
    for i in range(40):
        snap = changed(snap, f"s00{i % 5}", 80 + i)
        writer.save_snapshot(snap)
        assert reader.read_snapshot() == snap
    assert writer.full_writes > 1 and writer.journal_writes > 1
    assert os.path.getsize(writer.journal_path) < 4000


def test_an_incomplete_line_waits_and_a_foreign_journal_is_ignored(tmp_path):
    writer, reader = dirs(tmp_path)
    snap = big(3)
    writer.save_snapshot(snap)
    nxt = changed(snap, "s001", 7)
    line = nxt.delta_json(["s001"], snap) + "\n"
    with open(writer.journal_path, "a") as fh:
        fh.write(line[:20])  # a writer caught mid-line
    assert reader.read_snapshot() == snap
    with open(writer.journal_path, "a") as fh:
        fh.write(line[20:])
    assert reader.read_snapshot().services["s001"] == svc("s001", 7)
    # A journal that names another base (a crash between base and journal): not applied.
    writer.write_atomic(writer.journal_path, json.dumps({"journal": "other"}) + "\n" + line)
    assert StateDir(writer.path).read_snapshot() == snap


def test_a_bad_journal_line_is_an_error_and_keeps_what_was_read(tmp_path):
    writer, reader = dirs(tmp_path)
    snap = big(3)
    writer.save_snapshot(snap)
    assert reader.read_snapshot() == snap
    with open(writer.journal_path, "a") as fh:
        fh.write('{"format": 99}\n')
    with pytest.raises(ValueError):
        reader.read_snapshot()


def test_small_documents_and_new_terms_are_written_whole(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    writer = StateDir(str(path))  # default threshold: a small document is rewritten
    snap = big(3)
    writer.save_snapshot(snap)
    writer.save_snapshot(changed(snap, "s001", 1))
    assert (writer.full_writes, writer.journal_writes) == (2, 0)
    with open(writer.snapshot_path) as fh:
        doc = json.loads(fh.read())
    assert doc["services"]["s001"]["endpoints"][0]["port"] == 1
    writer.journal_from_bytes = 0
    writer.save_snapshot(changed(snap, "s001", 2))
    assert writer.journal_writes == 1
    writer.resign()  # a later term starts with a whole snapshot
    writer.save_snapshot(changed(snap, "s001", 3))
    assert writer.full_writes == 3


def test_publish_many_merges_in_order_and_writes_once(tmp_path):
    mgr, seen = manager(tmp_path)
    mgr.state.journal_from_bytes = 0
    mgr.publish(Discovery(services={"web": svc("web", 80)}, stamps={"web": 1}))
    writes = mgr.state.full_writes + mgr.state.journal_writes
    calls = len(seen)
    mgr.publish_many(
        [
            Discovery(services={"web": svc("web", 81)}, stamps={"web": 3}),
            Discovery(services={"web": svc("web", 82)}, stamps={"web": 2}),  # older: dropped
            Discovery(services={"api": svc("api", 90)}, stamps={"api": 1}),
            Discovery(errors={"health api": "500"}),
            Discovery(services={"api": svc("api", 91)}, stamps={"api": 2}),
        ]
    )
    assert mgr.state.full_writes + mgr.state.journal_writes == writes + 1
    assert len(seen) == calls + 1
    snap = mgr.snapshot
    assert snap.services["web"] == svc("web", 81) and snap.services["api"] == svc("api", 91)
    assert snap.last_error is None and snap.consecutive_failures == 0
    assert StateDir(mgr.state.path).read_snapshot() == snap
    mgr.stop()


def test_an_unchanged_answer_keeps_the_service_object(tmp_path):
    mgr, _ = manager(tmp_path)
    mgr.publish(Discovery(services={"web": svc("web", 80), "api": svc("api", 81)}))
    web = mgr.snapshot.services["web"]
    mgr.publish(Discovery(services={"web": svc("web", 80), "api": svc("api", 82)}))
    assert mgr.snapshot.services["web"] is web  # equal: the same object, nothing to rebuild
    assert mgr.snapshot.services["api"] == svc("api", 82)
    mgr.stop()


def test_batcher_coalesces_answers_of_one_window():
    batches: list[list] = []
    stop = threading.Event()
    batcher = _Batcher(0.1, batches.append, stop)
    batcher.start()
    try:
        for i in range(50):
            batcher.put(Discovery(stamps={"x": i}))
        deadline = time.monotonic() + 5
        while sum(len(b) for b in batches) < 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [d.stamps["x"] for b in batches for d in b] == list(range(50))  # in order
        assert len(batches) <= 2
        batcher.put(Discovery(stamps={"x": 50}))
        deadline = time.monotonic() + 5
        while len(batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batches[-1][-1].stamps["x"] == 50  # a lone answer waits one window, no more
    finally:
        stop.set()
