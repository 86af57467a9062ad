"""Every Istio example of the spec loads and runs, with stand-ins in place of the
cluster: the ext_authz authorizer for ``enablePolicyCheck`` (the key the examples cannot
name is added), local upstreams for the ``*.svc.cluster.local`` targets. All of them are
sidecar mode (``injectSidecar`` defaults to true): their certificate files belong to the
sidecar and are neither read nor required by the gateway."""

from __future__ import annotations

import glob
import os

import pytest
import requests
import yaml

from tests.doubles.ext_authz import Authorizer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "spec")


def _mesh_type(path: str) -> str | None:
    with open(path) as fh:
        return (yaml.safe_load(fh).get("serviceMesh") or {}).get("type")


ISTIO_EXAMPLES = sorted(
    p for p in glob.glob(os.path.join(SPEC, "*.yaml")) if _mesh_type(p) == "istio"
)


def test_the_spec_has_four_istio_examples():
    assert [os.path.basename(p) for p in ISTIO_EXAMPLES] == [
        "basic.yaml",
        "example1-istio-mtls.yaml",
        "istio.yaml",
        "kubernetes-istio-configmap.yaml",
    ]


@pytest.mark.parametrize("path", ISTIO_EXAMPLES, ids=os.path.basename)
def test_istio_example_runs(path, gateway_factory):
    with open(path) as fh:
        config = yaml.safe_load(fh)
    mesh = config["serviceMesh"]
    with Authorizer() as authz, Upstream("cluster") as app:
        mesh["readyGracePeriod"] = "0s"
        if mesh.get("istio", {}).get("enablePolicyCheck"):
            mesh["istio"]["authzAddr"] = authz.url
        services = config.get("services") or [{"name": "web", "basePath": "/web"}]
        for svc in services:
            svc["targets"] = [app.url]  # the cluster's Service, played by a local upstream
        config["services"] = services
        gw = gateway_factory(config)
        assert requests.get(gw.url + "/ready", timeout=10).status_code == 200
        for svc in services:
            r = requests.get(gw.url + svc["basePath"].rstrip("/") + "/x", timeout=10)
            assert r.status_code == 200, r.text
            seen = {k.lower(): v for k, v in r.json()["headers"]}
            assert len(seen["x-b3-traceid"]) == 32 and len(seen["x-b3-spanid"]) == 16
            assert seen["x-envoy-namespace"] == mesh.get("namespace", "default")
        checked = len(authz.seen)
        assert checked == (len(services) if mesh.get("istio", {}).get("enablePolicyCheck") else 0)
        mesh_state = gw.admin("mesh").json()
        assert mesh_state["certificateError"] is None and mesh_state["certificate"] is None
        if mesh.get("istio", {}).get("mixerAddr"):
            assert "Mixer was removed in Istio 1.8" in gw.log()
