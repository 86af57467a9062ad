"""Run the real gateway: ``gunicorn -c gunicorn.conf.py wsgi:app`` on a loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from .upstream import free_port

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
ADMIN_TOKEN = "test-admin-token-0123456789"


class GatewayProcess:
    """A gunicorn master and its workers, started from a config dict.

    ``server.host``/``port`` and ``admin.token`` are filled in unless given. Output goes
    to a log file whose text is available as ``.log()`` (shown when start-up fails).
    ``serviceMesh.stateDir`` defaults to a private dir of this gateway; give it as
    ``None`` to use the instance default. ``bind`` adds gunicorn's ``-b`` (which wins over
    ``server.port``; ``.url`` follows it) and ``args`` more gunicorn arguments.
    """

    def __init__(
        self,
        config: dict,
        workers: int = 1,
        threads: int = 8,
        env: dict[str, str] | None = None,
        state_dir: str | None = None,
        bind: str | None = None,
        args: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="odin-gw-test-")
        config = dict(config)
        server = dict(config.get("server") or {})
        server.setdefault("host", "127.0.0.1")
        server.setdefault("port", free_port())
        config["server"] = server
        config.setdefault("admin", {"token": ADMIN_TOKEN})
        mesh = config.get("serviceMesh")
        if isinstance(mesh, dict) and mesh.get("enabled"):
            mesh = dict(mesh)
            mesh.setdefault("stateDir", state_dir or os.path.join(self.tmp.name, "state"))
            config["serviceMesh"] = mesh
        self.config = config
        self.port = server["port"]
        self.args = list(args)
        if bind is not None:
            self.args[:0] = ["-b", bind]
            self.port = int(bind.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(self.tmp.name, "config.yaml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(config, fh)
        self.log_path = os.path.join(self.tmp.name, "gateway.log")
        self.env = dict(os.environ)
        for name in ("ODIN_WORKERS", "ODIN_THREADS", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS"):
            self.env.pop(name, None)
        if workers is not None:
            self.env["ODIN_WORKERS"] = str(workers)
        if threads is not None:
            self.env["ODIN_THREADS"] = str(threads)
        self.env.update(
            {
                "ODIN_CONFIG": self.config_path,
                "PROMETHEUS_MULTIPROC_DIR": os.path.join(self.tmp.name, "metrics"),
                "PYTHONPATH": str(ROOT),
            }
        )
        self.env.update(env or {})
        self.workers = workers or 1
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> GatewayProcess:
        self._logfile = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "wsgi:app", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        path = "/ready" if wait_ready else "/health"
        answered: set[int] = set()  # every worker must have said so, not just one
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = requests.get(self.url + path, timeout=1, headers={"Connection": "close"})
                if r.status_code == 200:
                    answered.add(r.json()["pid"])
                workers = set(self.worker_pids())
                if len(workers) >= self.workers and workers <= answered:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"gateway not {path[1:]} within {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def write_config(self, config: dict | str) -> None:
        """Replace the config file (a dict is dumped as YAML, a str written as it is)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        with open(self.config_path, "w") as fh:
            fh.write(text)

    def reload(self) -> None:
        """``kill -HUP`` the master: gunicorn re-reads its settings and replaces workers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if getattr(self, "_logfile", None):
            self._logfile.close()

    def cleanup(self) -> None:
        self.stop()
        self.tmp.cleanup()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def admin(self, path: str, method: str = "GET") -> requests.Response:
        return requests.request(
            method,
            f"{self.url}/admin/{path}",
            timeout=10,
            headers={"Authorization": f"Bearer {self.config['admin']['token']}"},
        )

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def started(config: dict, **kwargs) -> GatewayProcess:
    """A started :class:`GatewayProcess` for a module-scoped fixture (which gets no
    ``gateway_factory``); cleaned up at once if it fails to start."""
    gw = GatewayProcess(config, **kwargs)
    try:
        return gw.start()
    except BaseException:
        gw.cleanup()
        raise


def one_session_per_worker(gw: GatewayProcess, workers: int = 2) -> dict[int, requests.Session]:
    """A kept-alive session per worker pid: a connection stays with the worker that
    accepted it.

    The kernel does not spread connections over the workers that share a listening
    socket in any promised way (under load one worker can take them all), so the other
    workers are stopped (SIGSTOP) while each session connects: only the chosen one can
    accept. They are continued at once, well inside gunicorn's worker timeout.
    """
    pids = gw.worker_pids()
    assert len(pids) == workers, f"expected {workers} workers, found {pids}"
    sessions: dict[int, requests.Session] = {}
    for pid in pids:
        others = [p for p in pids if p != pid]
        session = requests.Session()
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            answered = session.get(gw.url + "/health", timeout=10).json()["pid"]
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
        assert answered == pid, f"worker {pid} was the only one accepting, {answered} answered"
        sessions[pid] = session
    return sessions
