"""Odin benchmark: gateway vs. the cheapest honest proxy ("floor").

Run from the repo root::

    .venv/bin/python -m bench.run [--targets nginx,floor,gateway]
                                  [--duration 5] [--warmup 1] [--rounds 3]
                                  [--python-loadgen]
                                  [--concurrency-check | --skip-concurrency-check]

Throughput/latency scenario, one target after another (never concurrently):

* ``nginx``   - the upstream itself (Debian nginx, fixed small JSON body);
* ``floor``   - bench/floor_app.py (raw WSGI + pooled urllib3) in front of it;
* ``gateway`` - Odin (``gunicorn -c gunicorn.conf.py wsgi:app``) in front of it;
* ``traffic`` - the same gateway with traffic management on the measured route: a 90/10
  split between two backend groups (both nginx), a header rule, a circuit breaker with a
  concurrency cap, and a rate limit set high enough never to refuse (every request
  still pays for the check);
* ``tracing`` - the same gateway exporting a span pair for every sampled request
  (``--trace-sample-rate``, default 1.0: the worst case) over OTLP/HTTP to a sink in
  this process that answers 200;

both Python targets with ``gthread``, 1 worker, 8 threads; each measured with
8 connections and with 1 connection (wrk if installed, else a Python load
generator).  Then the concurrency check: 64 simultaneous clients through the
gateway (default worker settings) to a 200 ms upstream.

It only prints a report.  Exit status: 0 once the runs completed, whatever the
figures; 1 if something failed to start; 2 if nginx is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.slow_upstream import PROBE_MARKER, SlowUpstream

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PATH = "/bench/hello"
WORKERS = 1
THREADS = 8
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
ALL_TARGETS = ("nginx", "floor", "gateway", "traffic", "tracing")
CONN_RUNS = ((8, 2), (1, 1))  # (connections, wrk threads)
CONCURRENCY_CLIENTS = 64
SLOW_DELAY = 0.2
GOAL_THROUGHPUT = 0.80
GOAL_P50 = 1.50
GOAL_P99 = 1.50

CONFIG_TEMPLATE = """\
server:
  host: {host}
  port: {port}
logging:
  level: info
monitoring:
  enabled: true
services:
  - name: {name}
    basePath: {base_path}
    targets:
      - {target}
{mesh}"""

#: ``--mesh istio``: the spec's Istio sidecar mode with every per-request Istio feature
#: that needs no control plane: trace headers (B3, traceparent, x-envoy-namespace, a
#: customHeader), x-envoy-* stripping and the istio_* standard metrics. The service keeps
#: its static target (the sidecar would intercept it).
ISTIO_MESH = """serviceMesh:
  enabled: true
  type: istio
  namespace: bench
  readyGracePeriod: 0s
  istio:
    injectSidecar: true
    enableTelemetry: true
    samplingRate: 1.0
    customHeaders: [x-tenant]
"""


#: ``traffic``: what issue 10 adds to a request's path, all on the measured route.
TRAFFIC_SERVICE = """    groups:
      canary:
        targets: [{target}]
    rules:
      - match: {{headers: [{{name: X-Debug-Route, present: true}}]}}
        group: canary
    split:
      groups: [{{group: default, weight: 90}}, {{group: canary, weight: 10}}]
    circuitBreaker:
      consecutiveFailures: 5
      maxConcurrent: 1000
    rateLimit: {{requests: 100000000, per: second, key: ip}}
"""


#: ``tracing``: every request sampled and exported (the worst case of issue 11's spans).
TRACING = """tracing:
  enabled: true
  endpoint: {endpoint}
  insecure: true
  sampleRate: {rate}
"""


class OtlpSink:
    """Accepts OTLP/HTTP exports on loopback and answers 200 (the gateway's exporter
    cost is measured, not a collector's)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://{HOST}:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StartupError(Exception):
    """A component could not be started (exit status 1)."""


# --------------------------------------------------------------------------
# child processes


class Child:
    """A child process in its own process group, output captured to files."""

    def __init__(self, name: str, cmd: list[str], tmp: Path, *, cwd: Path, env: dict) -> None:
        self.name = name
        self.cmd = cmd
        self.out_path = tmp / f"{name}.stdout.log"
        self.err_path = tmp / f"{name}.stderr.log"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            try:
                self.proc = subprocess.Popen(
                    cmd,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # own process group: killpg() gets workers too
                )
            except OSError as exc:
                raise StartupError(f"{name}: cannot execute {cmd[0]}: {exc}") from exc
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, limit: int = 4000) -> str:
        parts = []
        for label, path in (("stderr", self.err_path), ("stdout", self.out_path)):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                if len(text) > limit:
                    text = "...\n" + text[-limit:]
                parts.append(f"--- {self.name} {label} ---\n{text.rstrip()}")
        return "\n".join(parts) or f"--- {self.name}: no output ---"

    def worker_pids(self) -> list[int]:
        """Direct children of the process (gunicorn workers), via /proc."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            _killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT)
        # Whatever is left in the group (workers of a dead master) goes too.
        _killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(child: Child, port: int, path: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll GET path until 200; bounded in time.  StartupError otherwise."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupError(
                f"{child.name} exited with status {child.proc.returncode} before it was ready\n"
                f"command: {' '.join(child.cmd)}\n{child.output_tail()}"
            )
        try:
            status, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise StartupError(
        f"{child.name} not ready after {timeout:.0f} s (GET http://{HOST}:{port}{path}: {last})\n"
        f"command: {' '.join(child.cmd)}\n{child.output_tail()}"
    )


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    for key in (
        "ODIN_CONFIG",
        "ODIN_WORKERS",
        "ODIN_THREADS",
        "WEB_CONCURRENCY",
        "GUNICORN_CMD_ARGS",
    ):
        env.pop(key, None)  # only what each target is given explicitly
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def gunicorn_cmd() -> list[str]:
    script = Path(sys.executable).parent / "gunicorn"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gunicorn"]


def start_nginx(nginx: str, tmp: Path) -> tuple[Child, int]:
    prefix = tmp / "nginx"
    prefix.mkdir()
    port = free_port()
    template = (BENCH_DIR / "nginx.conf.template").read_text()
    conf = prefix / "nginx.conf"
    conf.write_text(template.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port)))
    cmd = [
        nginx,
        "-p", str(prefix),
        "-c", str(conf),
        "-e", str(prefix / "error.log"),  # startup log too, never /var/log/nginx
        "-g", "daemon off;",
    ]  # fmt: skip
    child = Child("nginx", cmd, tmp, cwd=prefix, env=child_env())
    try:
        wait_ready(child, port, PATH)
    except StartupError as exc:
        log = prefix / "error.log"
        extra = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise StartupError(f"{exc}\n--- nginx error.log ---\n{extra}") from None
    return child, port


def start_floor(tmp: Path, upstream_port: int) -> tuple[Child, int]:
    port = free_port()
    cmd = [
        *gunicorn_cmd(),
        "-k", "gthread", "-w", str(WORKERS), "--threads", str(THREADS),
        "-b", f"{HOST}:{port}",
        "bench.floor_app:app",
    ]  # fmt: skip
    env = child_env(
        FLOOR_UPSTREAM=f"http://{HOST}:{upstream_port}",
        FLOOR_POOL_MAXSIZE=str(THREADS),
    )
    # cwd is the temp dir, not the repo: gunicorn would otherwise pick up the
    # gateway's ./gunicorn.conf.py by default.  PYTHONPATH finds bench.floor_app.
    child = Child("floor", cmd, tmp, cwd=tmp, env=env)
    wait_ready(child, port, PATH)
    return child, port


def start_gateway(
    tmp: Path,
    label: str,
    service: str,
    base_path: str,
    upstream_port: int,
    *,
    sized: bool,
    mesh: str = "none",
    traffic: bool = False,
    tracing: str | None = None,
    trace_rate: float = 1.0,
) -> tuple[Child, int]:
    port = free_port()
    config = tmp / f"{label}.yaml"
    config.write_text(
        CONFIG_TEMPLATE.format(
            host=HOST,
            port=port,
            name=service,
            base_path=base_path,
            target=f"http://{HOST}:{upstream_port}",
            mesh=(
                TRAFFIC_SERVICE.format(target=f"http://{HOST}:{upstream_port}") if traffic else ""
            )
            + (ISTIO_MESH if mesh == "istio" else "")
            + (TRACING.format(endpoint=tracing, rate=trace_rate) if tracing else ""),
        )
    )
    # TMPDIR: whatever the gateway keeps in the temp dir (its per-port state dir,
    # prometheus multi-process files) goes into ours and is removed with it.
    gw_tmp = tmp / f"{label}-tmp"
    gw_tmp.mkdir(exist_ok=True)
    extra = {
        "ODIN_CONFIG": str(config),
        "TMPDIR": str(gw_tmp),
        "PROMETHEUS_MULTIPROC_DIR": str(gw_tmp / "metrics"),
    }
    if sized:
        extra.update(ODIN_WORKERS=str(WORKERS), ODIN_THREADS=str(THREADS))
    cmd = [*gunicorn_cmd(), "-c", "gunicorn.conf.py", "wsgi:app"]
    child = Child(label, cmd, tmp, cwd=REPO, env=child_env(**extra))
    wait_ready(child, port, "/ready")
    return child, port


# --------------------------------------------------------------------------
# load generation


@dataclass
class Result:
    target: str
    conns: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(output: str) -> tuple[int, int, float, float, float]:
    """(requests, errors, rps, p50_ms, p99_ms) from `wrk --latency` output."""

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
        if not m:
            raise ValueError(f"no {pct}% latency line")
        return _to_ms(m.group(1), m.group(2))

    m = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not m:
        raise ValueError("no Requests/sec line")
    rps = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in", output, re.M)
    requests = int(m.group(1)) if m else 0
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        errors += sum(int(g) for g in m.groups())
    return requests, errors, rps, latency("50"), latency("99")


def _seconds_arg(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def run_wrk(wrk: str, port: int, conns: int, threads: int, seconds: float) -> tuple:
    cmd = [
        wrk, f"-t{threads}", f"-c{conns}", f"-d{_seconds_arg(seconds)}",
        "--timeout", "5s", "--latency", f"http://{HOST}:{port}{PATH}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 30, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    try:
        return parse_wrk(proc.stdout)
    except ValueError as exc:
        raise RuntimeError(f"cannot parse wrk output ({exc}):\n{proc.stdout}") from exc


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def run_python_loadgen(port: int, conns: int, seconds: float) -> tuple:
    """Closed-loop load: `conns` threads, one keep-alive connection each."""
    latencies: list[list[float]] = [[] for _ in range(conns)]
    errors = [0] * conns
    start_barrier = threading.Barrier(conns + 1, timeout=10)
    deadline_box: list[float] = []

    def worker(i: int) -> None:
        lat = latencies[i]
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        clock = time.perf_counter
        try:
            start_barrier.wait()
            deadline = deadline_box[0]
            while True:
                t0 = clock()
                if t0 >= deadline:
                    break
                try:
                    conn.request("GET", PATH)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.will_close:
                        conn.close()
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn.close()
                    time.sleep(0.001)  # no hot spin against a dead target
                    continue
                t1 = clock()
                if resp.status == 200:
                    lat.append(t1 - t0)
                else:
                    errors[i] += 1
        except threading.BrokenBarrierError:
            errors[i] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    deadline_box.append(started + seconds)
    start_barrier.wait()
    for t in threads:
        t.join(timeout=seconds + 15)
    elapsed = time.perf_counter() - started
    merged = sorted(x for lat in latencies for x in lat)
    ok = len(merged)
    return (
        ok + sum(errors),
        sum(errors),
        ok / elapsed if elapsed > 0 else 0.0,
        _percentile(merged, 50) * 1000.0,
        _percentile(merged, 99) * 1000.0,
    )


def measure(target: str, port: int, args: argparse.Namespace) -> list[Result]:
    results = []
    for conns, wrk_threads in CONN_RUNS:
        for phase, seconds in (("warm-up", args.warmup), ("run", args.duration)):
            if seconds <= 0:
                continue
            print(f"  {target}: {conns} conn(s) {phase} {seconds:g} s ...", flush=True)
            if args.wrk:
                figures = run_wrk(args.wrk, port, conns, wrk_threads, seconds)
            else:
                figures = run_python_loadgen(port, conns, seconds)
        results.append(Result(target, conns, *figures))
    return results


# --------------------------------------------------------------------------
# scenarios


def describe_workers(child: Child) -> str:
    pids = child.worker_pids()
    return f"{len(pids)} worker process(es)" if pids else "worker count unknown"


def throughput_scenario(args: argparse.Namespace, tmp: Path, cleanup: list[Child]) -> list[Result]:
    results: list[Result] = []
    nginx, nginx_port = start_nginx(args.nginx, tmp)
    cleanup.append(nginx)
    print(f"nginx upstream on {HOST}:{nginx_port}", flush=True)

    if "nginx" in args.targets:
        results += measure("nginx", nginx_port, args)

    starters = {
        "floor": lambda: start_floor(tmp, nginx_port),
        "gateway": lambda: start_gateway(tmp, "gateway", "bench", "/bench", nginx_port, sized=True),
        "istio": lambda: start_gateway(
            tmp, "istio", "bench", "/bench", nginx_port, sized=True, mesh="istio"
        ),
        "traffic": lambda: start_gateway(
            tmp, "traffic", "bench", "/bench", nginx_port, sized=True, traffic=True
        ),
        "tracing": lambda: start_gateway(
            tmp,
            "tracing",
            "bench",
            "/bench",
            nginx_port,
            sized=True,
            tracing=sink().endpoint,
            trace_rate=args.trace_sample_rate,
        ),
    }
    sinks: list[OtlpSink] = []

    def sink() -> OtlpSink:
        sinks.append(OtlpSink())
        return sinks[-1]

    # Both proxies stay up (idle between turns) and are measured in alternating rounds;
    # the median of the rounds is reported. A shared 2-core VM drifts over a minute, and
    # back-to-back blocks would charge that drift to whichever target ran second.
    running: dict[str, int] = {}
    for target in ("floor", "gateway", "traffic", "tracing", "istio"):
        if target not in args.targets and not (target == "istio" and args.mesh == "istio"):
            continue
        child, port = starters[target]()
        cleanup.append(child)
        running[target] = port
        print(f"{target} on {HOST}:{port} ({describe_workers(child)})", flush=True)
        if len(child.worker_pids()) not in (0, WORKERS):
            print(f"  WARNING: {target} runs {describe_workers(child)}, expected {WORKERS}")
    rounds: dict[tuple[str, int], list[Result]] = {}
    for n in range(args.rounds):
        print(f"round {n + 1} of {args.rounds}", flush=True)
        for target, port in running.items():
            for r in measure(target, port, args):
                rounds.setdefault((target, r.conns), []).append(r)
    for runs in rounds.values():
        results.append(median_result(runs))
    for s in sinks:
        s.close()
    return results


def median_result(runs: list[Result]) -> Result:
    """The run with the median throughput (its latency figures come with it)."""
    ordered = sorted(runs, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def concurrency_scenario(tmp: Path, cleanup: list[Child]) -> None:
    upstream = SlowUpstream(HOST, 0, SLOW_DELAY).start()
    try:
        gateway, port = start_gateway(
            tmp, "gateway-defaults", "slow", "/slow", upstream.port, sized=False
        )
        cleanup.append(gateway)
        print(
            f"gateway (default worker settings, {describe_workers(gateway)}) on {HOST}:{port}; "
            f"upstream sleeps {SLOW_DELAY * 1000:.0f} ms on {HOST}:{upstream.port}",
            flush=True,
        )
        upstream.reset()
        n = CONCURRENCY_CLIENTS
        statuses: list[object] = [None] * n
        ends = [0.0] * n
        barrier = threading.Barrier(n + 1, timeout=10)
        path = f"/slow/{PROBE_MARKER}"

        def client(i: int) -> None:
            try:
                barrier.wait()
                statuses[i], _ = http_get(port, path, timeout=30.0)
            except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as exc:
                statuses[i] = type(exc).__name__
            ends[i] = time.perf_counter()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(timeout=40)
        elapsed = max(ends) - t0 if all(ends) else time.perf_counter() - t0
        ok = sum(1 for s in statuses if s == 200)
        failures: dict[str, int] = {}
        for s in statuses:
            if s != 200:
                failures[str(s)] = failures.get(str(s), 0) + 1

        print()
        print(f"Concurrency check: {n} simultaneous clients, 1 request each, via the gateway")
        other = f"  (other: {failures})" if failures else ""
        print(f"  served OK:                 {ok}/{n}{other}")
        print(
            f"  elapsed wall time:         {elapsed:.3f} s  (all parallel ~ {SLOW_DELAY:.1f} s; "
            f"fully serial = {n * SLOW_DELAY:.1f} s)"
        )
        print(f"  upstream peak in-flight:   {upstream.peak}  (goal: {n})")
        print(f"  upstream probes received:  {upstream.served}")
        gateway.stop()
        if not gateway.alive():
            cleanup.remove(gateway)
    finally:
        upstream.stop()


# --------------------------------------------------------------------------
# report


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x != x else format(x, spec)  # NaN-safe


def print_report(results: list[Result]) -> None:
    print()
    cols = (f"{'target':<9}", f"{'conns':>5}", f"{'requests/s':>11}")
    header = " ".join((*cols, f"{'p50 ms':>8}", f"{'p99 ms':>8}", f"{'errors':>7}"))
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.target:<9} {r.conns:>5} {_fmt(r.rps, '11.1f')} {_fmt(r.p50_ms, '8.3f')} "
            f"{_fmt(r.p99_ms, '8.3f')} {r.errors:>7}"
        )
    print()
    by = {(r.target, r.conns): r for r in results}

    def ratio(a: str, b: str, conns: int, attr: str) -> float | None:
        ra, rb = by.get((a, conns)), by.get((b, conns))
        if not ra or not rb:
            return None
        den = getattr(rb, attr)
        return getattr(ra, attr) / den if den else None

    tp = ratio("gateway", "floor", 8, "rps")
    p50 = ratio("gateway", "floor", 1, "p50_ms")
    if tp is not None:
        verdict = "ok" if tp >= GOAL_THROUGHPUT else "BELOW GOAL"
        goal = f"(goal >= {GOAL_THROUGHPUT:.2f})"
        print(f"gateway/floor throughput @8 conns = {tp:.2f} {goal} {verdict}")
    if p50 is not None:
        verdict = "ok" if p50 <= GOAL_P50 else "ABOVE GOAL"
        print(f"gateway/floor p50 @1 conn = {p50:.2f} (goal <= {GOAL_P50:.2f}) {verdict}")
    p99 = ratio("gateway", "floor", 8, "p99_ms")
    if p99 is not None:
        verdict = "ok" if p99 <= GOAL_P99 else "ABOVE GOAL"
        print(f"gateway/floor p99 @8 conns = {p99:.2f} (goal <= {GOAL_P99:.2f}) {verdict}")
    # traffic management on, and --mesh istio: measured in the same rounds.
    for target, attr, conns, goal, better in (
        (t, attr, conns, goal, better)
        for t in ("traffic", "tracing", "istio")
        for attr, conns, goal, better in (
            ("rps", 8, GOAL_THROUGHPUT, "ge"),
            ("p50_ms", 1, GOAL_P50, "le"),
            ("p99_ms", 8, GOAL_P99, "le"),
        )
    ):
        value = ratio(target, "floor", conns, attr)
        if value is None:
            continue
        good = value >= goal if better == "ge" else value <= goal
        name = {"rps": "throughput", "p50_ms": "p50", "p99_ms": "p99"}[attr]
        sign = ">=" if better == "ge" else "<="
        print(
            f"{target}/floor {name} @{conns} conn{'s' if conns > 1 else ''} = {value:.2f} "
            f"(goal {sign} {goal:.2f}) {'ok' if good else 'MISSED'}"
        )
    if ("nginx", 8) in by:
        for conns in (8, 1):
            r = by.get(("nginx", conns))
            if r:
                print(
                    f"upstream direct (nginx) @{conns} conn{'s' if conns > 1 else ''}: "
                    f"{r.rps:.0f} req/s, p50 {_fmt(r.p50_ms, '.3f')} ms, "
                    f"p99 {_fmt(r.p99_ms, '.3f')} ms"
                )
        for target in ("floor", "gateway"):
            share = ratio(target, "nginx", 8, "rps")
            if share is not None:
                print(f"{target}/nginx-direct throughput @8 conns = {share:.2f}")
    if any(r.errors for r in results):
        print(
            "NOTE: some requests failed (see 'errors' column); figures include only successes"
            " for the Python load generator, all responses for wrk."
        )


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of nginx,floor,gateway,traffic (default: all)",
    )
    p.add_argument(
        "--mesh",
        choices=("none", "istio"),
        default="none",
        help="istio: also measure a gateway in Istio sidecar mode (trace headers and istio_*"
        " metrics on) in the same rounds, against the same floor",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (5)")
    p.add_argument(
        "--trace-sample-rate",
        type=float,
        default=1.0,
        help="tracing.sampleRate of the 'tracing' target (1.0)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each run (1)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds of floor and gateway; the median round is reported (3)",
    )
    p.add_argument(
        "--python-loadgen",
        action="store_true",
        help="use the built-in Python load generator even if wrk is installed",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--concurrency-check",
        action="store_true",
        help="run only the 64-client concurrency check against the gateway",
    )
    group.add_argument(
        "--skip-concurrency-check",
        action="store_true",
        help="skip the concurrency check (it runs by default when the gateway"
        " is among the targets)",
    )
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.targets = targets
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be > 0 and --warmup >= 0")
    if args.concurrency_check:
        args.run_throughput, args.run_concurrency = False, True
    else:
        args.run_throughput = True
        args.run_concurrency = "gateway" in targets and not args.skip_concurrency_check
    return args


def _raise_exit(signum, frame):  # SIGTERM -> normal unwinding, so `finally` cleans up
    print(f"\nbench: got signal {signum}, stopping child processes", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    args.nginx = find_nginx()
    if args.run_throughput and not args.nginx:
        print(
            "nginx not found (looked on PATH and /usr/sbin/nginx).\n"
            "Install the benchmark tools first:  apt-get install -y nginx wrk",
            file=sys.stderr,
        )
        return 2
    args.wrk = None if args.python_loadgen else shutil.which("wrk")
    needs_gateway = args.run_concurrency or (args.run_throughput and "gateway" in args.targets)
    if needs_gateway:
        missing = [f for f in ("wsgi.py", "gunicorn.conf.py") if not (REPO / f).exists()]
        if missing:
            print(
                f"gateway not runnable: missing {', '.join(missing)} in {REPO} "
                f"(use --targets nginx,floor)",
                file=sys.stderr,
            )
            return 1

    signal.signal(signal.SIGTERM, _raise_exit)
    loadgen = f"wrk ({args.wrk})" if args.wrk else "python loadgen (in-process threads)"
    print(
        f"Odin bench: {os.cpu_count()} CPU(s); gunicorn gthread -w {WORKERS} --threads {THREADS}; "
        f"load generator: {loadgen}; {args.warmup:g} s warm-up + {args.duration:g} s per run"
    )
    if args.run_throughput:
        extra = " + istio (sidecar mode)" if args.mesh == "istio" else ""
        print(f"targets: {', '.join(args.targets)}{extra}  (path {PATH})")

    cleanup: list[Child] = []
    tmp = Path(tempfile.mkdtemp(prefix="odin-bench-"))
    try:
        results: list[Result] = []
        if args.run_throughput:
            results = throughput_scenario(args, tmp, cleanup)
            for child in reversed(cleanup):
                child.stop()
            cleanup.clear()
            print_report(results)
        if args.run_concurrency:
            print()
            concurrency_scenario(tmp, cleanup)
        return 0
    except StartupError as exc:
        print(f"\nFAILED TO START: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # load generator failure
        print(f"\nBENCH FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted, stopping child processes", file=sys.stderr, flush=True)
        return 130
    finally:
        for child in reversed(cleanup):
            child.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
