"""The scale benchmark's Kubernetes mode: ``python -m bench.scale --mesh linkerd``.

Like the Consul mode (see ``bench/scale.py``), all on 127.0.0.1 and each in its own
process:

* the kube-apiserver stand-in (``tests/doubles/kube_apiserver.py``, HTTPS) holding, in
  namespace ``shop``, ``--services`` Services (port 80 -> 8080) and one EndpointSlice
  each with ``--instances`` ready endpoints (``127.0.1.<j+1>``: loopback addresses the
  gateway shows and never dials), bulk-loaded through the stand-in's own ``upsert_*``.
  No speed-up is needed at 1,000 x 10: the stand-in keeps objects in a dict and scans
  them per list page (2,000 objects: a few ms), unlike the Consul stand-in's per-query
  scans of every instance;
* the tiny upstream on one port;
* the gateway (``--workers`` workers) with ``serviceMesh.type: linkerd`` (kubeconfig
  from the stand-in, ``KUBECONFIG=/nonexistent``, no ``KUBERNETES_SERVICE_HOST``), one
  service per Kubernetes service whose ``targets`` is the upstream: in Linkerd ingress
  mode the gateway sends requests to the targets (its own Linkerd proxy would pick the
  pod) and only shows the discovered endpoints, so requests still flow for the p99.

Figures, against the Consul mode's targets:

1. seconds until the shared snapshot (state dir ``snapshot.json`` + journal) holds every
   service with all its endpoints, the CPU-seconds of the gateway until then, and every
   service answering 200 through the gateway;
2. idle CPU over ``--window`` seconds;
3. CPU while one EndpointSlice flips an endpoint's ready condition 4 times a second;
4. request p99 under the paced load, quiet vs while the endpoint flips;
5. seconds until a slice change (an endpoint turns not ready) shows on
   ``/admin/services`` of both workers (one kept-alive connection per worker, polled
   until both show it; the figure is taken when the answer arrives, so it includes up
   to one poll: the poll's own duration is printed);
6. threads of the leader and of a follower.

A full discovery pass (every ``refreshInterval``) is measured alone, as in the Consul
mode, and spread over its interval in the CPU figures.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
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
    child_env,
    free_port,
    gunicorn_cmd,
)
from bench.scale import (
    ADMIN_TOKEN,
    FLAP_RATE,
    REFRESH_INTERVAL,
    STARTUP_LIMIT,
    Piped,
    _fmt,
    cpu_seconds,
    cpu_windows,
    final_report,
    gateway_pids,
    latency_under_churn,
    refresh,
    request,
    service_name,
)

NAMESPACE = "shop"
SERVICE_PORT = 80
SLICE_PORT = 8080
CHANGE_LIMIT = 10.0  # seconds figure 5 waits for both workers
POLL_GAP = 0.01


def endpoint_address(j: int) -> str:
    return f"127.0.1.{j + 1}"


def slice_name(i: int) -> str:
    return f"{service_name(i)}-slice"


# --------------------------------------------------------------------------
# child: the kube-apiserver stand-in, driven over stdin (one command a line)


def serve_kube(services: int, instances: int, kubeconfig: str) -> int:
    """The stand-in child: writes ``kubeconfig`` (a fresh token), prints its URL, then
    obeys ``ready <i> <j> <0|1>``, ``flap <i> <j> <rate> <seconds>`` and ``wait``
    (answering ``ok``) until stdin closes."""
    from tests.doubles.kube_apiserver import KubeApiServerDouble, SliceEndpoint

    token = secrets.token_urlsafe(16)
    double = KubeApiServerDouble(tokens={token: f"system:serviceaccount:{NAMESPACE}:odin"})
    ready = {i: [True] * instances for i in range(services)}
    lock = threading.Lock()

    def put_slice(i: int) -> None:
        with lock:
            flags = list(ready[i])
        double.upsert_endpoint_slice(
            NAMESPACE,
            slice_name(i),
            service_name(i),
            endpoints=[
                SliceEndpoint([endpoint_address(j)], ready=flags[j], zone=f"zone-{j % 3}")
                for j in range(instances)
            ],
            ports=[{"name": "http", "port": SLICE_PORT}],
        )

    def set_ready(i: int, j: int, on: bool) -> None:
        with lock:
            ready[i][j] = on
        put_slice(i)

    for i in range(services):
        double.upsert_service(
            NAMESPACE,
            service_name(i),
            ports=[{"name": "http", "port": SERVICE_PORT, "targetPort": SLICE_PORT}],
        )
        put_slice(i)
    double.start()
    double.write_kubeconfig(kubeconfig, token, namespace=NAMESPACE)
    print(double.url, flush=True)
    flapper: threading.Thread | None = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "ready":
            set_ready(int(words[1]), int(words[2]), words[3] == "1")
        elif words[0] == "flap":
            i, j, rate, seconds = int(words[1]), int(words[2]), float(words[3]), float(words[4])

            def flap(i=i, j=j, rate=rate, seconds=seconds) -> None:
                end = time.monotonic() + seconds
                n = 0
                while time.monotonic() < end and n < int(rate * seconds) + 1:
                    set_ready(i, j, n % 2 == 1)
                    n += 1
                    time.sleep(1.0 / rate)
                set_ready(i, j, True)

            if flapper is not None:
                flapper.join()
            flapper = threading.Thread(target=flap, daemon=True)
            flapper.start()
        elif words[0] == "wait" and flapper is not None:
            flapper.join()
        print("ok", flush=True)
    double.stop()
    return 0


# --------------------------------------------------------------------------
# the parent


def gateway_config(
    port: int, kubeconfig: Path, upstream: int, state_dir: Path, services: int
) -> dict:
    return {
        "server": {"host": HOST, "port": port},
        "logging": {"level": "warning"},
        "admin": {"token": ADMIN_TOKEN},
        "services": [
            {
                "name": service_name(i),
                "basePath": f"/{service_name(i)}",
                "port": SERVICE_PORT,
                "targets": [f"http://{HOST}:{upstream}"],
            }
            for i in range(services)
        ],
        "serviceMesh": {
            "enabled": True,
            "type": "linkerd",
            "namespace": NAMESPACE,
            "kubeconfig": str(kubeconfig),
            "refreshInterval": f"{REFRESH_INTERVAL:g}s",
            "stateDir": str(state_dir),
        },
    }


def start_gateway(
    tmp: Path, kubeconfig: Path, upstream: int, services: int, workers: int
) -> tuple[Child, int]:
    port = free_port()
    config = tmp / "scale.yaml"
    doc = gateway_config(port, kubeconfig, upstream, tmp / "state", services)
    config.write_text(json.dumps(doc))
    gw_tmp = tmp / "gw-tmp"
    gw_tmp.mkdir(exist_ok=True)
    env = child_env(
        ODIN_CONFIG=str(config),
        TMPDIR=str(gw_tmp),
        PROMETHEUS_MULTIPROC_DIR=str(gw_tmp / "metrics"),
        ODIN_WORKERS=str(workers),
        ODIN_THREADS="8",
        KUBECONFIG="/nonexistent",
    )
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.pop("KUBERNETES_SERVICE_PORT", None)
    cmd = [*gunicorn_cmd(), "-c", "gunicorn.conf.py", "wsgi:app"]
    return Child("gateway", cmd, tmp, cwd=REPO, env=env), port


def snapshot_full(reader, services: int, instances: int):
    """The snapshot when it holds every service with all its endpoints, else None."""
    try:
        snap = reader.read_snapshot()
    except (OSError, ValueError):
        return None
    if snap is None:
        return None
    full = sum(1 for s in snap.services.values() if len(s.endpoints) >= instances)
    return snap if full >= services else None


def snapshot_version(reader) -> int | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return reader.read_snapshot().version
    return None


def refreshed_at(reader) -> object:
    """When the snapshot's last full pass ended (None: unknown)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return reader.read_snapshot().refreshed_at
    return None


def worker_connections(gw: Child, port: int) -> dict[int, http.client.HTTPConnection]:
    """A kept-alive connection per worker: the other workers are stopped (SIGSTOP, a
    few ms) while each one connects, so only the chosen one can accept it."""
    pids = gw.worker_pids()
    conns: dict[int, http.client.HTTPConnection] = {}
    for pid in pids:
        others = [p for p in pids if p != pid]
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        answered = None
        stopped: list[int] = []
        try:
            for other in others:
                os.kill(other, signal.SIGSTOP)
                stopped.append(other)
            conn.request("GET", "/health")
            answered = json.loads(conn.getresponse().read()).get("pid")
        except (OSError, ValueError, http.client.HTTPException):
            answered = None
        finally:
            for other in stopped:
                with contextlib.suppress(OSError):
                    os.kill(other, signal.SIGCONT)
        if answered == pid:
            conns[pid] = conn
        else:
            conn.close()
    return conns


def shown_status(conn: http.client.HTTPConnection, service: str, address: str) -> str | None:
    """The status ``/admin/services`` shows for ``address`` of ``service``."""
    conn.request("GET", "/admin/services", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    doc = json.loads(conn.getresponse().read())
    for svc in doc.get("services", ()):
        if svc.get("name") == service:
            for target in svc.get("targets", ()):
                if target.get("address") == address:
                    return target.get("status")
    return None


def poll_until(
    conn: http.client.HTTPConnection,
    service: str,
    address: str,
    want: str,
    since: float,
    limit: float,
    took: list[float],
) -> float | None:
    """Seconds from ``since`` until an answer showing ``want`` arrived (None: not
    within ``limit``, or the connection broke); each poll's duration goes to ``took``."""
    for _ in range(int(limit / POLL_GAP) + 1):
        asked = time.monotonic()
        if asked - since > limit:
            return None
        try:
            status = shown_status(conn, service, address)
        except (OSError, ValueError, http.client.HTTPException):
            return None
        now = time.monotonic()
        took.append(now - asked)
        if status == want:
            return now - since
        time.sleep(POLL_GAP)
    return None


def change_shown(gw: Child, port: int, kube: Piped, services: int) -> tuple[float | None, list]:
    """Figure 5: endpoint 0 of the last service turns not ready; seconds until both
    workers' ``/admin/services`` show it (and the polls' durations)."""
    target, address = service_name(services - 1), endpoint_address(0)
    conns = worker_connections(gw, port)
    took: list[float] = []
    try:
        if len(conns) < 2:
            print(f"  (could not hold a connection to each worker: {sorted(conns)})")
            return None, took
        for conn in conns.values():  # both show it passing first
            if poll_until(conn, target, address, "passing", time.monotonic(), 10.0, []) is None:
                return None, took
        seen: dict[int, float | None] = {}
        t0 = time.monotonic()
        kube.command(f"ready {services - 1} 0 0")

        def one(pid: int, conn: http.client.HTTPConnection) -> None:
            seen[pid] = poll_until(conn, target, address, "critical", t0, CHANGE_LIMIT, took)

        threads = [threading.Thread(target=one, args=item) for item in conns.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CHANGE_LIMIT + 15)
        kube.command(f"ready {services - 1} 0 1")
        times = [seen.get(pid) for pid in conns]
        return (None if None in times else max(times)), took
    finally:
        for conn in conns.values():
            conn.close()


def run(args) -> int:
    """``--mesh linkerd``: start the children, measure, report (see the docstring)."""
    print(
        f"Odin scale bench (linkerd): {os.cpu_count()} CPU(s); {args.services} Services x "
        f"{args.instances} endpoints on the kube-apiserver stand-in; gateway with "
        f"{args.workers} workers"
    )
    tmp = Path(tempfile.mkdtemp(prefix="odin-scale-kube-"))
    os.chmod(tmp, 0o700)
    children: list = []
    try:
        upstream_port = free_port()
        upstream = Piped("upstream", ["--serve-upstream", "--ports", str(upstream_port)], tmp)
        children.append(upstream)
        upstream.line(20)
        kubeconfig = tmp / "kubeconfig"
        t = time.monotonic()
        kube = Piped(
            "kube",
            [
                "--serve-kube",
                "--services",
                str(args.services),
                "--instances",
                str(args.instances),
                "--kubeconfig",
                str(kubeconfig),
            ],
            tmp,
        )
        children.append(kube)
        url = kube.line(120)
        print(f"stand-in up in {time.monotonic() - t:.1f} s at {url}")
        return measure(args, tmp, children, kube, kubeconfig, upstream_port)
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


def measure(args, tmp: Path, children: list, kube: Piped, kubeconfig: Path, upstream: int) -> int:
    from odin_gw.mesh.state import StateDir

    n, k = args.services, args.instances
    gw, port = start_gateway(tmp, kubeconfig, upstream, n, args.workers)
    started = time.monotonic()
    children.append(gw)
    reader = StateDir(str(tmp / "state"))
    # 1. until every service is in the shared snapshot with all its endpoints
    complete_s = None
    deadline = started + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if not gw.alive():
            raise StartupError(f"gateway exited\n{gw.output_tail()}")
        if snapshot_full(reader, n, k) is not None:
            complete_s = time.monotonic() - started
            break
        time.sleep(0.05)
    time.sleep(0.5)  # one follower sync
    startup_cpu = cpu_seconds(gateway_pids(gw))
    if complete_s is None:
        print(f"the snapshot did not hold every service within {STARTUP_LIMIT:.0f} s")
        print(gw.output_tail(2000))
    holder: list = []
    ok = 0
    for i in range(n):
        with contextlib.suppress(OSError, http.client.HTTPException):
            ok += request(holder, port, f"/{service_name(i)}/x")[0] == 200
    print(f"every service asked once through the gateway: {ok}/{n} answered 200")
    time.sleep(1.0)

    pids = gateway_pids(gw)
    passed = refreshed_at(reader)
    before = cpu_seconds(pids)
    refresh(port)
    time.sleep(4.0)
    full_pass = cpu_seconds(pids) - before
    done = "" if refreshed_at(reader) != passed else " (NOT seen in the snapshot within 4 s)"
    print(
        f"one full pass over {n} services: {full_pass:.2f} CPU-s in the gateway "
        f"(every refreshInterval: {full_pass / REFRESH_INTERVAL:.3f} core at "
        f"{REFRESH_INTERVAL:g} s){done}"
    )

    # 2. and 3. idle, then one endpoint's ready condition flipping 4 times a second
    flapping = f"{n // 2} {min(3, k - 1)}"
    version_before = snapshot_version(reader)
    idle, churn, leader = cpu_windows(kube, pids, port, args.window, flapping)
    version_after = snapshot_version(reader)
    if version_before is not None and version_after is not None:
        print(
            f"snapshots published while flapping: {version_after - version_before} "
            f"(~{FLAP_RATE * args.window:.0f} changes made)"
        )

    # 4. p99 quiet, then while the endpoint flips
    quiet, churned = latency_under_churn(kube, port, n, flapping, args.load_seconds)

    # 5. a slice change shown by both workers
    change_s, took = change_shown(gw, port, kube, n)
    if took:
        print(
            f"/admin/services polls took {_fmt(sorted(x * 1000 for x in took), 50)} ms "
            f"(p50), {max(took) * 1000:.0f} ms (max): figure 5 includes up to one poll"
        )

    # 6. threads, then the table
    final_report(
        gw,
        leader,
        (quiet, churned),
        (idle, churn, full_pass),
        ("every service complete in the snapshot", complete_s, startup_cpu),
        ("a slice change on both workers after", change_s),
    )
    return 0
