"""Shared pieces for the Consul integration tests."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable

import requests

from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.support.upstream import Upstream, mtls_server_context


def consul_config(consul, services, **consul_opts) -> dict:
    opts = {"httpAddr": consul.url, "blockingWait": "5s", "minQueryInterval": "100ms"}
    opts.update(consul_opts)
    return {
        "services": services,
        "serviceMesh": {
            "enabled": True,
            "type": "consul",
            "refreshInterval": "2s",
            "readyGracePeriod": "2s",
            "consul": opts,
        },
        "monitoring": {"enabled": True},
    }


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (requests.RequestException, KeyError, ValueError, IndexError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


def servers(gw, path: str, n: int = 8) -> set[str]:
    out = set()
    for _ in range(n):
        r = requests.get(gw.url + path, timeout=10)
        if r.status_code == 200:
            out.add(r.json()["server"])
        else:
            out.add(f"http-{r.status_code}")
    return out


class Traffic:
    """Sends requests continuously from a thread and records every status code."""

    def __init__(self, url: str, pause: float = 0.01) -> None:
        self.url = url
        self.pause = pause
        self.codes: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + 120  # bounded whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = session.get(self.url, timeout=10)
                self.codes.append(r.status_code)
                if r.status_code != 200:
                    self.errors.append(r.text[:300])
            except requests.RequestException as exc:
                self.codes.append(0)
                self.errors.append(repr(exc))
            time.sleep(self.pause)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


class MeshBackend:
    """A backend reached over Connect mTLS: demands a client cert from the mesh CA and
    presents a leaf with the SPIFFE ID of ``service`` (or of ``identity_of``)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        name: str,
        service: str,
        identity_of: str | None = None,
        dc: str = "dc1",
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="odin-mesh-backend-")
        uri = consul_service_uri(ca.trust_domain, identity_of or service, dc=dc)
        leaf = ca.issue(uri=uri)
        cert, key = leaf.write(self.tmp.name)
        ca_path = os.path.join(self.tmp.name, "ca.pem")
        ca.write_ca(ca_path)
        self.uri = uri
        self.upstream = Upstream(name, tls=mtls_server_context(str(cert), str(key), ca_path))

    def __enter__(self) -> Upstream:
        return self.upstream.start()

    def __exit__(self, *exc) -> None:
        self.upstream.stop()
        self.tmp.cleanup()
