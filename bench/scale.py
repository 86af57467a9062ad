"""Odin scale benchmark: Consul (or Kubernetes) discovery with many services.

Run from the repo root::

    .venv/bin/python -m bench.scale [--mesh consul|linkerd] [--services 1000]
                                    [--instances 10] [--workers 2]
                                    [--window 10] [--load-seconds 12]

``--mesh linkerd`` runs the same figures against the kube-apiserver stand-in with
Linkerd ingress mode (``bench/scale_kube.py`` says how). What follows is the default,
``--mesh consul``.

Starts, all on 127.0.0.1 and each in its own process:

* the Consul stand-in (tests/doubles) with ``--services`` x ``--instances`` registered
  (bulk-loaded; lookups indexed for the benchmark only, see ``_speed_up``: the stand-in
  is written for fidelity and scans every service on each query, which at 10,000
  instances would measure the stand-in, not the gateway);
* a tiny upstream listening on one port per instance (the body names the port);
* the gateway (``gunicorn -c gunicorn.conf.py wsgi:app``, ``--workers`` workers), one
  route per service, discovering them all from the stand-in.

Then it measures, one after another:

1. seconds from the gateway's start until the shared snapshot holds every service with
   a healthy instance (every worker routes from it within one sync, 0.5 s), the
   CPU-seconds all gateway processes used until then (``/proc``), and a check that every
   service answers 200 through the gateway;
2. idle CPU (nothing changes) over ``--window`` seconds;
3. CPU with one instance flapping 4 times a second over ``--window`` seconds;
4. request p99 under a small paced load (4 clients, 25 req/s each, random services):
   quiet, then while the instance flaps;
5. seconds until a change is routable: the only healthy instance of a service goes
   critical while another comes back; time until 5 answers in a row come from the new
   one (both workers see it);
6. threads of the leader and of a follower (``/proc/<pid>/status``): the difference is
   what discovery costs in threads.

It prints each figure beside its target and exits 0 once the runs completed, whatever
the figures (1 if something failed to start). Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.run import (
    HOST,
    REPO,
    Child,
    StartupError,
    _percentile,
    _raise_exit,
    child_env,
    free_port,
    gunicorn_cmd,
)

ADMIN_TOKEN = "bench-scale-admin"
FLAP_RATE = 4.0  # changes per second
LOAD_CLIENTS = 4
LOAD_RATE = 25.0  # requests per second per client
STARTUP_LIMIT = 60.0
REFRESH_INTERVAL = 30.0  # serviceMesh.refreshInterval default (kept by the bench config)

TARGET_ROUTABLE_S = 5.0
TARGET_STARTUP_CPU = 5.0
TARGET_IDLE_CORE = 0.03
TARGET_CHURN_CORE = 0.05
TARGET_P99_RATIO = 1.3
TARGET_CHANGE_S = 1.0
TARGET_THREADS = 16


# --------------------------------------------------------------------------
# child: the Consul stand-in, driven over stdin (one command a line)


def _speed_up(double) -> None:
    """Index the stand-in's lookups (benchmark only; the HTTP answers stay the same).

    The stand-in finds a service's instances, their checks and a node's checks by
    scanning everything, and recomputes every blocked query four times a second: fine
    for tests, quadratic at 10,000 instances. Here a mutation counter (bumped by the
    stand-in's own ``_mark``, which every change calls) invalidates indexes and cached
    answers, and a blocked health or catalog query waits on a condition of its own index
    key, woken only when that key is marked (not all 1,000 on every change).
    """
    state = double.state
    state.housekeep = lambda: []  # no TTL/HTTP checks or leaves in this benchmark
    mark = state._mark
    mut = {"n": 0}
    asked = threading.local()  # the index key the last query of this thread computed
    keyed: dict = {}  # index key -> Condition on the state's lock

    def counting_mark(idx, keys):
        mut["n"] += 1
        mark(idx, keys)  # wakes the waiters without a key of their own
        for key in keys:
            cond = keyed.get(key)
            if cond is not None:
                cond.notify_all()

    def condition_for(key):
        if key is None:
            return state.cond
        cond = keyed.get(key)
        if cond is None:
            cond = keyed[key] = threading.Condition(state.cond._lock)
        return cond

    state._mark = counting_mark
    ix: dict = {"at": -1}

    def indexes() -> dict:
        if ix["at"] != mut["n"]:
            by_name: dict = {}
            by_svc: dict = {}
            by_node: dict = {}
            for s in state.services.values():
                by_name.setdefault((s.dc, s.name), []).append(s)
            for c in state.checks.values():
                if c.service_id:
                    by_svc.setdefault((c.dc, c.node, c.service_id), []).append(c)
                else:
                    by_node.setdefault((c.dc, c.node), []).append(c)
            ix.update(at=mut["n"], by_name=by_name, by_svc=by_svc, by_node=by_node)
        return ix

    def service_checks(svc):
        with state.cond:
            return list(indexes()["by_svc"].get((svc.dc, svc.node, svc.id), ()))

    def render_entry(svc):
        node = state.nodes[(svc.dc, svc.node)]
        found = indexes()
        node_checks = sorted(
            found["by_node"].get((svc.dc, svc.node), ()),
            key=lambda c: (c.id != "serfHealth", c.id),
        )
        svc_checks = sorted(found["by_svc"].get((svc.dc, svc.node, svc.id), ()), key=lambda c: c.id)
        return {
            "Node": node.render(),
            "Service": svc.render(),
            "Checks": [state.render_check(c, None) for c in node_checks]
            + [state.render_check(c, svc) for c in svc_checks],
        }

    health = state.health
    answers: dict = {}

    def fast_health(dc, name, *, connect):
        asked.key = None
        if connect:
            return health(dc, name, connect=connect)
        with state.cond:
            key = ("svc", dc, name)
            stamp = (state._idx.get(key), state.restore_gen)
            hit = answers.get((dc, name))
            if hit is not None and hit[0] == stamp:
                asked.key = key
                return hit[1], list(hit[2])
            found = sorted(indexes()["by_name"].get((dc, name), ()), key=lambda s: (s.node, s.id))
            if not found:
                return health(dc, name, connect=False)
            asked.key = key
            index = state.key_index(key)
            entries = [render_entry(s) for s in found]
            answers[(dc, name)] = (stamp, index, entries)
            return index, list(entries)

    catalog = state.catalog_services
    listings: dict = {}

    def fast_catalog(dc):
        asked.key = ("catalog", dc)
        with state.cond:
            hit = listings.get(dc)
            if hit is None or hit[0] != mut["n"]:
                hit = listings[dc] = (mut["n"], catalog(dc))
            return hit[1]

    def block(compute, min_index, wait, *, aborted):
        deadline = time.monotonic() + wait
        seen = None
        with state.cond:
            restore_gen = state.restore_gen
            while True:
                if seen != mut["n"]:
                    seen = mut["n"]
                    asked.key = None
                    index, payload = compute()
                    cond = condition_for(getattr(asked, "key", None))
                    index = max(index, 1)
                    if min_index <= 0 or index > min_index or state.restore_gen != restore_gen:
                        return index, payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return index, payload
                if aborted():
                    raise ConnectionAbortedError("consul double went away")
                cond.wait(min(remaining, 5.0))  # a change of its key notifies anyway

    state.service_checks = service_checks
    state.render_entry = render_entry
    state.health = fast_health
    state.catalog_services = fast_catalog
    state.block = block


def _bulk_load(double, services: int, ports: list[int]) -> None:
    from tests.doubles.consul_model import PASSING, Check, Service

    state = double.state
    dc = state.datacenter
    names = [service_name(i) for i in range(services)]
    with state.cond:
        for j in range(len(ports)):
            state.ensure_node(dc, f"node-{j}", HOST, agent=True)
        idx = state._bump()
        for name in names:
            for j, port in enumerate(ports):
                node, sid = f"node-{j}", f"{name}-{j}"
                svc = Service(dc, node, sid, name, port=port, address=HOST)
                svc.weights = {"Passing": 1, "Warning": 1}
                svc.create_index = svc.modify_index = idx
                state.services[(dc, node, sid)] = svc
                chk = Check(dc, node, f"service:{sid}", f"Service '{name}' check", status=PASSING)
                chk.service_id, chk.service_name = sid, name
                chk.create_index = chk.modify_index = idx
                state.checks[(dc, node, chk.id)] = chk
        state._mark(idx, {("svc", dc, n) for n in names} | {("catalog", dc)})


def serve_consul(services: int, ports: list[int]) -> int:
    """The stand-in child: prints its URL, then obeys ``set <id> <status>`` and
    ``flap <id> <rate> <seconds>`` (answering ``ok``) until stdin closes."""
    from tests.doubles import consul as consul_double

    consul_double._Server.request_queue_size = 512  # many watches connect at once
    double = consul_double.ConsulDouble()
    _speed_up(double)
    _bulk_load(double, services, ports)
    double.start()
    print(double.url, flush=True)
    flapper: threading.Thread | None = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "set":
            double.set_status(words[1], words[2])
        elif words[0] == "flap":
            sid, rate, seconds = words[1], float(words[2]), float(words[3])

            def flap(sid=sid, rate=rate, seconds=seconds) -> None:
                end = time.monotonic() + seconds
                n = 0
                while time.monotonic() < end and n < int(rate * seconds) + 1:
                    double.set_status(sid, "critical" if n % 2 == 0 else "passing")
                    n += 1
                    time.sleep(1.0 / rate)
                double.set_status(sid, "passing")

            if flapper is not None:
                flapper.join()
            flapper = threading.Thread(target=flap, daemon=True)
            flapper.start()
        elif words[0] == "wait" and flapper is not None:
            flapper.join()
        print("ok", flush=True)
    double.stop()
    return 0


def serve_upstream(ports: list[int]) -> int:
    """The upstream child: one listener per port; the body names the port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body leave at once (no 40 ms ACK wait)

        def do_GET(self) -> None:
            body = str(self.server.server_address[1]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:
            return

    servers = []
    for port in ports:
        server = ThreadingHTTPServer((HOST, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    return 0


# --------------------------------------------------------------------------
# the parent: processes, /proc, load


def service_name(i: int) -> str:
    return f"svc{i:04d}"


class Piped:
    """A child speaking over stdin/stdout (the stand-in, the upstream)."""

    def __init__(self, name: str, args: list[str], tmp: Path) -> None:
        self.name = name
        self.err_path = tmp / f"{name}.stderr.log"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scale", *args],
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def line(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not out or not out[0]:
            tail = self.err_path.read_text(errors="replace")[-2000:]
            raise StartupError(f"{self.name} did not answer within {timeout:.0f} s\n{tail}")
        return out[0].strip()

    def command(self, text: str, timeout: float = 30.0) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        self.line(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (and their reaped children) from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def per_process(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in pids}


def window_split(before: dict, after: dict, seconds: float) -> dict[int, float]:
    return {pid: (after.get(pid, 0.0) - cpu) / seconds for pid, cpu in before.items()}


def refresh(port: int) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(
            "POST", "/admin/mesh/refresh", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def gateway_pids(gw: Child) -> list[int]:
    return [gw.pid, *gw.worker_pids()]


def request(conn_holder: list, port: int, path: str) -> tuple[int, bytes]:
    for attempt in (0, 1):
        if not conn_holder:
            conn_holder.append(http.client.HTTPConnection(HOST, port, timeout=5))
        conn = conn_holder[0]
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn_holder.clear()
            if attempt:
                raise
    raise AssertionError("unreachable")


def paced_load(port: int, services: int, seconds: float) -> list[float]:
    """``LOAD_CLIENTS`` keep-alive clients, each ``LOAD_RATE`` req/s: latencies (ms)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        holder: list = []
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end and n < int(LOAD_RATE * seconds) + 1:
            due = time.monotonic() + 1.0 / LOAD_RATE
            path = f"/{service_name(rng.randrange(services))}/x"
            start = time.perf_counter()
            try:
                status, _ = request(holder, port, path)
            except (OSError, http.client.HTTPException):
                status = 0
            took = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(took)
                if status != 200:
                    errors[0] += 1
            n += 1
            time.sleep(max(0.0, due - time.monotonic()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    if errors[0]:
        print(f"  ({errors[0]} of {len(latencies)} requests did not answer 200)")
    return sorted(latencies)


def snapshot_complete(state_dir: str, services: int, reader) -> bool:
    try:
        snap = reader.read_snapshot()
    except (OSError, ValueError):
        return False
    if snap is None:
        return False
    ready = sum(1 for s in snap.services.values() if any(e.healthy for e in s.endpoints))
    return ready >= services


def gateway_config(port: int, consul_url: str, state_dir: Path, services: int) -> dict:
    return {
        "server": {"host": HOST, "port": port},
        "logging": {"level": "warning"},
        "admin": {"token": ADMIN_TOKEN},
        "services": [
            {"name": service_name(i), "basePath": f"/{service_name(i)}"} for i in range(services)
        ],
        "serviceMesh": {
            "enabled": True,
            "type": "consul",
            "stateDir": str(state_dir),
            "consul": {"httpAddr": consul_url},
        },
    }


def start_gateway(tmp: Path, consul_url: str, services: int, workers: int) -> tuple[Child, int]:
    port = free_port()
    state_dir = tmp / "state"
    config = tmp / "scale.yaml"
    config.write_text(json.dumps(gateway_config(port, consul_url, state_dir, services)))
    gw_tmp = tmp / "gw-tmp"
    gw_tmp.mkdir(exist_ok=True)
    env = child_env(
        ODIN_CONFIG=str(config),
        TMPDIR=str(gw_tmp),
        PROMETHEUS_MULTIPROC_DIR=str(gw_tmp / "metrics"),
        ODIN_WORKERS=str(workers),
        ODIN_THREADS="8",
    )
    cmd = [*gunicorn_cmd(), "-c", "gunicorn.conf.py", "wsgi:app"]
    return Child("gateway", cmd, tmp, cwd=REPO, env=env), port


def leader_pid(port: int) -> int | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/admin/mesh", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        doc = json.loads(conn.getresponse().read())
        return doc.get("leaderPid")
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return "ok" if value <= target else "MISSED"


def report(rows: list[tuple[str, float | None, str, float, str]]) -> None:
    print()
    print(f"{'figure':<44} {'measured':>12}   {'target':>10}   verdict")
    for label, value, fmt, target, unit in rows:
        shown = "n/a" if value is None else f"{value:{fmt}}{unit}"
        print(f"{label:<44} {shown:>12}   <= {target:g}{unit:<5}  {verdict(value, target)}")


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--mesh", choices=("consul", "linkerd"), default="consul")
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--window", type=float, default=10.0, help="seconds per CPU window")
    p.add_argument("--load-seconds", type=float, default=12.0, help="seconds per p99 run")
    p.add_argument("--serve-consul", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-kube", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kubeconfig", default="", help=argparse.SUPPRESS)
    p.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (1 <= args.services <= 5000 and 2 <= args.instances <= 20 and 1 <= args.workers <= 8):
        p.error("--services 1..5000, --instances 2..20, --workers 1..8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ports = [int(p) for p in args.ports.split(",") if p]
    if args.serve_consul:
        return serve_consul(args.services, ports)
    if args.serve_upstream:
        return serve_upstream(ports)
    if args.serve_kube:
        from bench.scale_kube import serve_kube

        return serve_kube(args.services, args.instances, args.kubeconfig)

    signal.signal(signal.SIGTERM, _raise_exit)
    if args.mesh == "linkerd":
        from bench.scale_kube import run

        return run(args)
    print(
        f"Odin scale bench: {os.cpu_count()} CPU(s); {args.services} services x "
        f"{args.instances} instances on the Consul stand-in; gateway with {args.workers} "
        f"workers"
    )
    tmp = Path(tempfile.mkdtemp(prefix="odin-scale-"))
    os.chmod(tmp, 0o700)
    children: list = []
    try:
        ports = [free_port() for _ in range(args.instances)]
        port_arg = ",".join(map(str, ports))
        upstream = Piped("upstream", ["--serve-upstream", "--ports", port_arg], tmp)
        children.append(upstream)
        upstream.line(20)
        t = time.monotonic()
        consul = Piped(
            "consul", ["--serve-consul", "--services", str(args.services), "--ports", port_arg], tmp
        )
        children.append(consul)
        consul_url = consul.line(120)
        print(f"stand-in up in {time.monotonic() - t:.1f} s at {consul_url}")
        return measure(args, tmp, children, consul, consul_url, ports)
    except StartupError as exc:
        print(f"\nFAILED TO START: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted, stopping child processes", file=sys.stderr, flush=True)
        return 130
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp: Path, children: list, consul: Piped, consul_url: str, ports) -> int:
    from odin_gw.mesh.state import StateDir

    n = args.services
    gw, port = start_gateway(tmp, consul_url, n, args.workers)
    started = time.monotonic()
    children.append(gw)
    reader = StateDir(str(tmp / "state"))
    # 1. until every service is in the shared snapshot with a healthy instance
    routable_s = None
    deadline = started + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if not gw.alive():
            raise StartupError(f"gateway exited\n{gw.output_tail()}")
        if snapshot_complete(str(tmp / "state"), n, reader):
            routable_s = time.monotonic() - started
            break
        time.sleep(0.05)
    time.sleep(0.5)  # one follower sync
    startup_cpu = cpu_seconds(gateway_pids(gw))
    if routable_s is None:
        print(f"not every service routable within {STARTUP_LIMIT:.0f} s")
    holder: list = []
    ok = 0
    for i in range(n):
        with contextlib.suppress(OSError, http.client.HTTPException):
            ok += request(holder, port, f"/{service_name(i)}/x")[0] == 200
    print(f"every service asked once through the gateway: {ok}/{n} answered 200")
    time.sleep(1.0)

    pids = gateway_pids(gw)
    # A full pass (every refreshInterval, 30 s by default), asked for now through the
    # admin API: its cost is measured alone, and the next one falls after the windows.
    before = cpu_seconds(pids)
    refresh(port)
    time.sleep(4.0)
    full_pass = cpu_seconds(pids) - before
    print(
        f"one full pass over {n} services: {full_pass:.2f} CPU-s in the gateway "
        f"(every refreshInterval: {full_pass / REFRESH_INTERVAL:.3f} core at the default "
        f"{REFRESH_INTERVAL:g} s)"
    )

    # 2. and 3. idle, then one instance flapping 4 times a second
    idle, churn, leader = cpu_windows(consul, pids, port, args.window, f"{service_name(n // 2)}-3")
    # 4. p99 quiet, then during churn
    quiet, churned = latency_under_churn(
        consul, port, n, f"{service_name(n // 2)}-3", args.load_seconds
    )

    # 5. a change routable: the one healthy instance goes, another comes back
    target = service_name(n - 1)
    for j in range(1, args.instances):
        consul.command(f"set {target}-{j} critical")
    holder = []
    change_s = None
    if wait_for_port(holder, port, f"/{target}/x", ports[0], time.monotonic(), 10.0):
        t0 = time.monotonic()
        consul.command(f"set {target}-1 passing")
        consul.command(f"set {target}-0 critical")
        change_s = wait_for_port(holder, port, f"/{target}/x", ports[1], t0, 10.0)

    # 6. threads, then the table
    final_report(
        gw,
        leader,
        (quiet, churned),
        (idle, churn, full_pass),
        ("every service routable after start", routable_s, startup_cpu),
        ("a change routable after", change_s),
    )
    return 0


def cpu_windows(
    stand_in: Piped, pids: list[int], port: int, window: float, flapping: str
) -> tuple[float, float, int | None]:
    """Figures 2 and 3: the gateway's CPU (cores) over ``window`` seconds idle, then
    while the stand-in flaps ``flapping`` 4 times a second; prints each process's share.
    Returns (idle, churn, the leader's pid)."""
    watched = [*pids, stand_in.pid]
    before = per_process(watched)
    time.sleep(window)
    idle_split = window_split(before, per_process(watched), window)
    before = per_process(watched)
    stand_in.command(f"flap {flapping} {FLAP_RATE} {window}")
    time.sleep(window)
    churn_split = window_split(before, per_process(watched), window)
    stand_in.command("wait", timeout=window + 10)
    leader = leader_pid(port)
    for label, split in (("idle", idle_split), ("4 changes/s", churn_split)):
        parts = ", ".join(
            f"{'stand-in' if pid == stand_in.pid else 'leader' if pid == leader else pid} "
            f"{core:.3f}"
            for pid, core in split.items()
        )
        print(f"CPU cores {label}: {parts}")
    idle = sum(v for pid, v in idle_split.items() if pid != stand_in.pid)
    churn = sum(v for pid, v in churn_split.items() if pid != stand_in.pid)
    return idle, churn, leader


def latency_under_churn(
    stand_in: Piped, port: int, services: int, flapping: str, seconds: float
) -> tuple[list[float], list[float]]:
    """Figure 4: request latencies (ms) under a paced load, quiet and then while
    ``flapping`` flaps; after a full pass, so that none falls inside."""
    refresh(port)
    time.sleep(4.0)
    quiet = paced_load(port, services, seconds)
    stand_in.command(f"flap {flapping} {FLAP_RATE} {seconds + 1}")
    churned = paced_load(port, services, seconds)
    stand_in.command("wait", timeout=seconds + 10)
    return quiet, churned


def final_report(
    gw: Child,
    leader: int | None,
    latencies: tuple[list[float], list[float]],
    cpu: tuple[float, float, float],
    startup: tuple[str, float | None, float],
    change: tuple[str, float | None],
) -> None:
    """Figure 6 (threads of the leader and a follower), the details, and the table.

    ``cpu`` is (idle, churn, one full pass's CPU-s): the table spreads the full pass over
    its interval. ``startup`` is (label, seconds, CPU-s); ``change`` (label, seconds)."""
    quiet, churned = latencies
    idle, churn, full_pass = cpu
    workers = gw.worker_pids()
    lead_threads = threads_of(leader) if leader in workers else None
    followers = [threads_of(p) for p in workers if p != leader]
    follow_threads = min(followers) if followers else None
    print(
        f"leader pid {leader}: {lead_threads} threads; a follower: {follow_threads} threads "
        f"(both serve requests with 8 gthread threads)"
    )
    print(
        f"request latency ms: quiet p50 {_fmt(quiet, 50)} p99 {_fmt(quiet, 99)}; "
        f"during churn p50 {_fmt(churned, 50)} p99 {_fmt(churned, 99)} "
        f"({len(quiet)} and {len(churned)} requests)"
    )
    amortized = full_pass / REFRESH_INTERVAL
    print(
        f"CPU between full passes: idle {idle:.3f} core, 4 changes/s {churn:.3f} core; "
        f"the table adds the full pass spread over its {REFRESH_INTERVAL:g} s interval"
    )
    p99_quiet = _percentile(quiet, 99) if quiet else None
    p99_churn = _percentile(churned, 99) if churned else None
    ratio = p99_churn / p99_quiet if p99_quiet and p99_churn else None
    extra = None
    if lead_threads is not None and follow_threads is not None:
        extra = float(lead_threads - follow_threads)
    report(
        [
            (startup[0], startup[1], ".2f", TARGET_ROUTABLE_S, " s"),
            ("CPU until then, all gateway processes", startup[2], ".2f", TARGET_STARTUP_CPU, " s"),
            ("idle CPU (nothing changing)", idle + amortized, ".3f", TARGET_IDLE_CORE, " core"),
            ("CPU with 4 changes/s", churn + amortized, ".3f", TARGET_CHURN_CORE, " core"),
            ("request p99 during churn / quiet", ratio, ".2f", TARGET_P99_RATIO, "x"),
            (change[0], change[1], ".2f", TARGET_CHANGE_S, " s"),
            ("discovery threads (leader - follower)", extra, ".0f", TARGET_THREADS, ""),
        ]
    )


def wait_for_port(
    holder: list, port: int, path: str, upstream: int, since: float, limit: float
) -> float | None:
    """Seconds from ``since`` until the first of 5 answers in a row that all come from
    ``upstream`` (None: not within ``limit``)."""
    streak_from = None
    streak = 0
    want = str(upstream).encode()
    for _ in range(int(limit / 0.01) + 1):
        if time.monotonic() - since > limit:
            return None
        asked = time.monotonic()
        try:
            status, body = request(holder, port, path)
        except (OSError, http.client.HTTPException):
            status, body = 0, b""
        if status == 200 and body == want:
            streak += 1
            streak_from = asked if streak == 1 else streak_from
            if streak >= 5:
                return max(0.0, streak_from - since)
        else:
            streak = 0
        time.sleep(0.01)
    return None


def _fmt(values: list[float], pct: float) -> str:
    return f"{_percentile(values, pct):.1f}" if values else "n/a"


if __name__ == "__main__":
    sys.exit(main())
