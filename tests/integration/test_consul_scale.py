"""Discovery at scale against the Consul stand-in: few threads for many watches, and
changes shared with the workers as journal lines (and kept for the warm start)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from odin_gw.mesh.state import JOURNAL_FROM_BYTES
from tests.doubles.consul import ConsulDouble
from tests.integration.consul_helpers import consul_config, eventually, servers
from tests.integration.test_consul_client import Watching, make_client, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_many_watches_share_one_thread_and_publish_only_what_changed():
    names = [f"svc{i:02d}" for i in range(60)]
    with ConsulDouble() as consul:
        for i, name in enumerate(names):
            consul.register(name, id=f"{name}-a", port=2000 + i)
        before = threading.active_count()
        client = make_client(consul, min_query_interval=0.05)
        with Watching(client, names) as w:
            wait_until(lambda: all(w.latest(n) for n in names), 10, "every first answer")
            # the watch thread itself, the catalog watch, the stand-in's threads aside
            assert threading.active_count() - before <= 3 + 60  # stand-in: one per connection
            ours = [t for t in threading.enumerate() if t.name.startswith("odin-consul")]
            assert len(ours) <= 2, [t.name for t in ours]
            seen = len(w.seen)
            consul.set_status("svc07-a", "critical")
            wait_until(lambda: w.status_of("svc07", "svc07-a") == "critical", 5, "the change")
            time.sleep(0.3)
            news = [d for d in w.seen[seen:] if d.services]
            assert {n for d in news for n in d.services} == {"svc07"}
            # A full pass does not ask again what a watch answered after it began, and
            # agrees with the watches.
            result = client.discover(names)
            assert {e.status for e in result.services["svc07"].endpoints} == {"critical"}
            assert set(result.services) == set(names)


def test_workers_follow_changes_through_the_journal_and_restart_warm(
    tmp_path, gateway_factory, upstream, upstream_b
):
    names = [f"s{i:03d}" for i in range(160)]
    state = tmp_path / "state"
    with ConsulDouble() as consul:
        for name in names:
            consul.register(name, id=f"{name}-a", port=upstream.port, node="node-a")
            consul.register(name, id=f"{name}-b", port=upstream_b.port, node="node-b")
        cfg = consul_config(consul, [{"name": n, "basePath": f"/{n}"} for n in names])
        cfg["serviceMesh"]["stateDir"] = str(state)
        cfg["serviceMesh"]["refreshInterval"] = "60s"  # changes come from the watches
        cfg["serviceMesh"]["readyGracePeriod"] = "60s"
        gw = gateway_factory(cfg, workers=2)
        eventually(lambda: servers(gw, "/s159/x", 12) == {"a", "b"}, what="all discovered")
        assert os.path.getsize(state / "snapshot.json") > JOURNAL_FROM_BYTES
        base = os.stat(state / "snapshot.json")
        consul.set_status("s075-a", "critical")
        eventually(lambda: servers(gw, "/s075/x", 16) == {"b"}, what="a critical, every worker")
        assert servers(gw, "/s074/x", 12) == {"a", "b"}
        after = os.stat(state / "snapshot.json")
        assert after.st_ino == base.st_ino, "a change rewrote the whole snapshot"
        with open(state / "snapshot.journal") as fh:
            entries = [json.loads(line) for line in fh.read().splitlines()[1:]]
        assert entries and "s075" in entries[-1]["services"]
        assert all(len(e["services"]) <= 2 for e in entries[-1:])
        gw.stop()
        consul.go_down()
        again = gateway_factory(cfg, workers=2)  # warm: base plus journal
        assert again.admin("mesh").json()["readyReason"] in ("warm cache", "discovery answered")
        assert servers(again, "/s075/x", 12) == {"b"}
        assert servers(again, "/s010/x", 12) == {"a", "b"}
