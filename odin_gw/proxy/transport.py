"""Upstream connections: one ``requests.Session`` per worker, its adapter owning the pools.

The forwarder asks the session's adapter for the urllib3 pool of an endpoint and calls it
directly: that keeps the Session's TLS material (client certificate, CA bundle) while
skipping ``Session.request``'s per-call merging, which costs more than the rest of the
hot path together. Pools are keyed by what makes a connection different: scheme, address,
port and expected identity; a TLS material change mounts a new adapter, so the key space
starts afresh and requests in flight finish on the old pools.
"""

from __future__ import annotations

import http.client
import ssl
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError
from urllib3.util import Timeout, create_urllib3_context

from ..mesh.identity import IdentityCheckingHTTPSConnection
from ..mesh.snapshot import Endpoint
from ..mesh.tls import TlsMaterial


class MeshAdapter(HTTPAdapter):
    """A requests adapter whose pools carry one version of the mesh TLS material."""

    def __init__(self, material: TlsMaterial | None, pool_size: int) -> None:
        self.material = material
        self.pool_size = pool_size
        self._pools: dict[str, HTTPConnectionPool] = {}
        self._lock = threading.Lock()  # guards pool creation only; never held across I/O
        self._public_context = create_urllib3_context()
        self._public_context.load_default_certs()
        super().__init__(pool_connections=8, pool_maxsize=pool_size, max_retries=0)

    def pool_for(self, endpoint: Endpoint) -> HTTPConnectionPool:
        """The pool for ``endpoint``; created on first use."""
        pool = self._pools.get(endpoint.key)
        if pool is not None:
            return pool
        with self._lock:
            pool = self._pools.get(endpoint.key)
            if pool is None:
                pool = self._new_pool(endpoint)
                self._pools[endpoint.key] = pool
        return pool

    def _new_pool(self, endpoint: Endpoint) -> HTTPConnectionPool:
        common = {
            "maxsize": self.pool_size,
            "block": False,
            "retries": False,
        }
        if endpoint.scheme != "https":
            return HTTPConnectionPool(endpoint.address, endpoint.port, **common)
        material = self.material
        if material is not None and (endpoint.identity or material.trust_domain):
            # Mesh peer: chain checked against the mesh CA, identity by SPIFFE ID.
            pool = HTTPSConnectionPool(
                endpoint.address,
                endpoint.port,
                ssl_context=material.context(),
                assert_hostname=False,
                cert_reqs="CERT_REQUIRED",
                expected_identity=endpoint.identity,
                trust_domain=material.trust_domain,
                **common,
            )
            pool.ConnectionCls = IdentityCheckingHTTPSConnection
            return pool
        if material is not None:
            # A TLS target named by DNS: our certificate, the mesh CA, hostname checked.
            return HTTPSConnectionPool(
                endpoint.address,
                endpoint.port,
                ssl_context=material.context(),
                assert_hostname=endpoint.host_header.rsplit(":", 1)[0],
                server_hostname=endpoint.host_header.rsplit(":", 1)[0],
                cert_reqs="CERT_REQUIRED",
                **common,
            )
        return HTTPSConnectionPool(
            endpoint.address,
            endpoint.port,
            ssl_context=self._public_context,
            cert_reqs="CERT_REQUIRED",
            **common,
        )

    def retain(self, keys: set[str]) -> None:
        """Close and forget pools of endpoints no longer known."""
        with self._lock:
            gone = [k for k in self._pools if k not in keys]
            pools = [self._pools.pop(k) for k in gone]
        for pool in pools:
            pool.close()

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()  # idle connections close now; busy ones when they come back
        super().close()


class ConnectFailed(Exception):
    """No connection (or TLS session) could be made: nothing was sent upstream."""


class StaleConnection(Exception):
    """A reused keep-alive connection turned out closed before any answer came."""


def open_response(
    pool: HTTPConnectionPool,
    method: str,
    target: str,
    body,
    headers: dict[str, str],
    chunked: bool,
    timeout: Timeout,
) -> BaseHTTPResponse:
    """Send one request on a pooled connection and return the unread response.

    The request target is sent exactly as given (``urlopen`` would re-encode it, and a
    proxy must pass paths and queries byte for byte). Failures are classified for the
    retry logic: :class:`ConnectFailed` (cause chained) and :class:`StaleConnection`;
    anything else means the request may have reached the upstream.
    """
    conn = pool._get_conn()
    fresh = conn.sock is None
    try:
        if fresh:
            conn.timeout = timeout.connect_timeout
            try:
                conn.connect()
            except (OSError, HTTPError, ssl.SSLError, ssl.CertificateError) as exc:
                raise ConnectFailed(str(exc)) from exc
        conn.timeout = timeout.read_timeout
        try:
            conn.request(
                method,
                target,
                body=body,
                headers=headers,
                chunked=chunked,
                preload_content=False,
                decode_content=False,
            )
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            if fresh:
                raise
            raise StaleConnection(str(exc)) from exc
    except BaseException:
        conn.close()
        pool._put_conn(conn)
        raise
    response._connection = conn
    response._pool = pool
    return response


class UpstreamSession(requests.Session):
    """The worker's session: redirects never followed, environment proxies ignored."""

    def __init__(self, pool_size: int, material: TlsMaterial | None = None) -> None:
        super().__init__()
        self.trust_env = False
        self.max_redirects = 0
        self.pool_size = pool_size
        self.adapter = MeshAdapter(material, pool_size)
        self._mount(self.adapter)

    def _mount(self, adapter: MeshAdapter) -> None:
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def use_material(self, material: TlsMaterial | None) -> None:
        """Switch to new TLS material: new adapter and pools; the old ones drain."""
        old = self.adapter
        if old.material is material or (
            old.material is not None
            and material is not None
            and old.material.version == material.version
        ):
            return
        if material is not None:
            material.context()  # fail here, before swapping, if the material is unusable
        self.adapter = MeshAdapter(material, self.pool_size)
        self._mount(self.adapter)
        old.close()
