"""Istio with ``injectSidecar: true``: plain HTTP to each service's Kubernetes name (the
gateway's own sidecar intercepts it), no xDS connection, ``/admin/services`` says so.

No Kubernetes DNS or iptables interception exists here, so the test shows what the
gateway asks for (the name it connects to, in the error it gets) and that a service with
``targets`` is sent to them as written."""

from __future__ import annotations

import pytest
import requests

from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration


def istio_sidecar_config(services: list[dict]) -> dict:
    return {
        "services": services,
        "serviceMesh": {
            "enabled": True,
            "type": "istio",
            "namespace": "shop",
            "readyGracePeriod": "0s",
            "istio": {"pilotAddr": "127.0.0.1:9", "injectSidecar": True},
        },
    }


def test_sidecar_mode_sends_to_the_kubernetes_name_and_says_the_sidecar_balances(
    gateway_factory,
):
    with Upstream("a") as app:
        gw = gateway_factory(
            istio_sidecar_config(
                [
                    {"name": "web", "basePath": "/web", "port": 8080, "retries": 0},
                    {"name": "app", "basePath": "/app", "targets": [app.url]},
                ]
            )
        )
        r = requests.get(gw.url + "/web/x", timeout=30)
        # No cluster DNS here: the name the sidecar would intercept does not resolve.
        assert r.status_code == 502, r.text
        assert "web.shop.svc.cluster.local" in r.text and "8080" in r.text
        r = requests.get(gw.url + "/app/x", timeout=10)
        assert r.status_code == 200 and r.json()["server"] == "a"
        services = {s["name"]: s for s in gw.admin("services").json()["services"]}
        sidecar = services["web"]["sidecar"]
        assert sidecar["url"] == "http://web.shop.svc.cluster.local:8080"
        assert sidecar["mode"] == "istio-sidecar"
        assert sidecar["mtls"] == "sidecar" and sidecar["loadBalancing"] == "sidecar"
        assert "sidecar" not in services["app"]
        mesh = gw.admin("mesh").json()
        assert mesh["type"] == "istio" and "client" not in mesh  # no xDS client
        assert "no xDS connection is made" in gw.log()
