"""Large bodies stream both ways with flat worker memory; many slow requests run at once."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

GB = 1024**3
LIMIT = 64 * 1024**2


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing")


class Body:
    """A 1 GB body with a known length, generated as it is sent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.digest = hashlib.sha256()

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        block = bytes(range(256)) * 256  # 64 KiB
        left = self.size
        while left:
            chunk = block[: min(left, len(block))]
            self.digest.update(chunk)
            left -= len(chunk)
            yield chunk


@pytest.fixture
def gw(gateway_factory, upstream):
    return gateway_factory(
        {
            "services": [
                {"name": "s", "basePath": "/s", "targets": [upstream.url], "timeout": "120s"}
            ]
        }
    )


@pytest.mark.timeout(240)
def test_one_gigabyte_download_with_flat_memory(gw):
    worker = gw.worker_pids()[0]
    assert len(requests.get(gw.url + "/s/big?bytes=1048576").content) == 1048576  # warm up
    before = rss_kib(worker, "VmRSS")
    received = 0
    with requests.get(gw.url + f"/s/big?bytes={GB}", stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["Content-Length"] == str(GB)
        for chunk in r.iter_content(1024 * 1024):
            received += len(chunk)
    assert received == GB
    growth = (rss_kib(worker, "VmHWM") - before) * 1024
    assert growth < LIMIT, f"worker peak memory grew by {growth / 2**20:.1f} MiB"


@pytest.mark.timeout(240)
def test_one_gigabyte_upload_with_flat_memory(gw, upstream):
    worker = gw.worker_pids()[0]
    requests.post(gw.url + "/s/warm", data=b"x" * 1000)
    before = rss_kib(worker, "VmRSS")
    body = Body(GB)
    r = requests.post(gw.url + "/s/upload", data=body, timeout=180)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["bodyBytes"] == GB
    assert seen["bodySha256"] == body.digest.hexdigest()
    growth = (rss_kib(worker, "VmHWM") - before) * 1024
    assert growth < LIMIT, f"worker peak memory grew by {growth / 2**20:.1f} MiB"


def test_chunked_download_streams(gw):
    with requests.get(gw.url + "/s/big?bytes=5000000&chunked=1", stream=True) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert sum(len(c) for c in r.iter_content(65536)) == 5_000_000


def test_sixty_four_slow_requests_served_in_parallel_by_default_settings(gateway_factory):
    from tests.support.upstream import Upstream

    with Upstream("slow") as slow:
        # Default worker and thread counts: no ODIN_WORKERS / ODIN_THREADS override.
        gw = gateway_factory(
            {"services": [{"name": "slow", "basePath": "/slow", "targets": [slow.url]}]},
            workers=None,
            threads=None,
        )
        barrier = threading.Barrier(64, timeout=30)
        codes: list[int] = []

        def client() -> None:
            barrier.wait()
            codes.append(requests.get(gw.url + "/slow/slow?ms=1000", timeout=30).status_code)

        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [200] * 64
        # Each upstream call takes 1 s; all 64 must have been in flight at once.
        assert slow.peak == 64, f"only {slow.peak} requests were in flight at once"
