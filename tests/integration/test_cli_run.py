"""``odin-gw run`` serves from the installed package: no checkout files, any working directory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.upstream import free_port

pytestmark = pytest.mark.integration

ODIN_GW = str(Path(sys.executable).with_name("odin-gw"))


def test_odin_gw_run_outside_the_checkout(tmp_path, upstream):
    port = free_port()
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "services": [{"name": "s", "basePath": "/s", "targets": [upstream.url]}],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ODIN_", "GUNICORN"))}
    env.pop("PYTHONPATH", None)  # the installed (editable) package, not the checkout on a path
    env.update(
        ODIN_WORKERS="1", ODIN_THREADS="4", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics")
    )
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [ODIN_GW, "run", "--config", "config.yaml"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        ready = False
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(requests.RequestException):
                ready = requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
            time.sleep(0.05)
        assert ready, log_path.read_text()
        r = requests.get(f"http://127.0.0.1:{port}/s/hello", timeout=5)
        assert r.status_code == 200 and r.json()["path"] == "/s/hello"
        text = log_path.read_text()
        assert "Using worker: odin_gw.edge_worker.EdgeWorker" in text
        assert not list(tmp_path.glob("*.py"))  # nothing of the checkout was needed here
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
