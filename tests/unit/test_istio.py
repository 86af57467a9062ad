"""IstioClient's mapping of istiod's clusters and endpoints onto the snapshot, without
sockets: which endpoints get mTLS, which identities they must present, health, SNI."""

from __future__ import annotations

import pytest

from odin_gw.config import parse_config
from odin_gw.mesh.istio import IstioClient, mesh_services
from odin_gw.mesh.xds_decode import XdsCluster, XdsEndpoint, XdsState

HOST = "web.shop.svc.cluster.local"
CLUSTER = f"outbound|8080||{HOST}"
SANS = ("spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/web-v2")


def client(mtls: bool = True, services: str = "{name: web, basePath: /web, port: 8080}"):
    cfg = parse_config(
        "serviceMesh: {enabled: true, type: istio, namespace: shop, trustDomain: cluster.local,\n"
        f"  mtlsEnabled: {str(mtls).lower()}, certFile: c, keyFile: k, caFile: r,\n"
        "  istio: {injectSidecar: false, pilotAddr: '127.0.0.1:15010'}}\n"
        f"services:\n - {services}\n",
        env={},
    )
    return IstioClient(cfg, environ={"POD_NAME": "gw-1", "INSTANCE_IP": "10.0.0.9"})


def ep(port=9080, health="HEALTHY", tls_mode="istio", weight=1, account=None):
    return XdsEndpoint("10.1.0.1", port, health, weight, ("eu", "eu-1a", ""), tls_mode, account)


def state(*endpoints, sni="outbound_.8080_._.web.shop.svc.cluster.local", sans=SANS):
    cluster = XdsCluster(CLUSTER, sni, sans, ("istio-peer-exchange", "istio"))
    return XdsState({CLUSTER: cluster}, {CLUSTER: tuple(endpoints)}, {})


def test_cluster_names_follow_istiod():
    svcs = mesh_services(_cfg())
    assert set(svcs) == {"web", "catalog"}  # by mesh service name
    assert svcs["web"].cluster == CLUSTER and svcs["web"].host == HOST
    # The first service naming a mesh service decides its port and account.
    assert svcs["catalog"].cluster == "outbound|80||catalog.shop.svc.cluster.local"
    assert svcs["catalog"].account == "catalog-sa"


def _cfg():
    return parse_config(
        "serviceMesh: {enabled: true, type: istio, namespace: shop,\n"
        "  certFile: c, keyFile: k, caFile: r, istio: {injectSidecar: false}}\n"
        "services:\n - {name: web, basePath: /web, port: 8080}\n"
        " - {name: api, basePath: /api, meshService: catalog, identity: catalog-sa}\n"
        " - {name: api2, basePath: /api2, meshService: catalog, port: 9999}\n",
        env={},
    )


def test_mtls_endpoint_must_present_one_of_the_clusters_sans():
    found = client()._discovery(["web"], state(ep()), stamp=7)
    (e,) = found.services["web"].endpoints
    assert (e.scheme, e.identity, e.identities) == ("https", None, SANS)
    assert e.sni == "outbound_.8080_._.web.shop.svc.cluster.local"
    assert e.host_header == "web.shop.svc.cluster.local:8080"
    assert e.locality == "eu/eu-1a" and e.healthy and e.status == "healthy"
    assert found.stamps == {"web": 7} and found.absent == frozenset()
    assert found.catalog == (HOST,)


def test_a_configured_service_account_names_the_one_identity():
    c = client(services="{name: web, basePath: /web, port: 8080, identity: web-v2}")
    (e,) = c._discovery(["web"], state(ep()), stamp=1).services["web"].endpoints
    assert e.identity == "spiffe://cluster.local/ns/shop/sa/web-v2" and e.identities == ()


def test_without_sans_any_identity_of_the_trust_domain_does():
    (e,) = client()._discovery(["web"], state(ep(), sans=()), 1).services["web"].endpoints
    assert e.scheme == "https" and e.identity is None and e.identities == ()


def test_automatic_mtls_follows_tls_mode():
    found = client(mtls=False)._discovery(
        ["web"], state(ep(9080, tls_mode="istio"), ep(9081, tls_mode=None)), 1
    )
    meshed, plain = found.services["web"].endpoints
    assert (meshed.scheme, meshed.identities) == ("https", SANS)
    assert (plain.scheme, plain.identities, plain.sni) == ("http", (), None)
    # mtlsEnabled: every endpoint, sidecar or not.
    both = client(mtls=True)._discovery(["web"], state(ep(9080), ep(9081, tls_mode=None)), 1)
    assert {e.scheme for e in both.services["web"].endpoints} == {"https"}


@pytest.mark.parametrize(
    ("health", "serves"),
    [
        ("HEALTHY", True),
        ("UNKNOWN", True),
        ("UNHEALTHY", False),
        ("DRAINING", False),
        ("TIMEOUT", False),
        ("DEGRADED", False),
    ],
)
def test_health_as_envoy_reads_it(health, serves):
    (e,) = client()._discovery(["web"], state(ep(health=health)), 1).services["web"].endpoints
    assert e.healthy is serves and e.status == health.lower()


def test_weight_and_a_missing_sni_default():
    (e,) = client()._discovery(["web"], state(ep(weight=5), sni=None), 1).services["web"].endpoints
    assert e.weight == 5 and e.sni == f"outbound_.8080_._.{HOST}"


def test_a_service_istiod_does_not_know_is_absent_not_an_error():
    empty = XdsState({}, {}, {})
    found = client()._discovery(["web", "unknown"], empty, 3)
    assert found.services == {} and found.absent == frozenset({"web"})
    assert found.stamps == {"web": 3} and not found.errors


def test_stamps_only_grow():
    c = client()
    stamps = [c._stamp() for _ in range(5)]
    assert stamps == sorted(set(stamps))


def test_every_asked_service_is_mapped_whatever_comes_first():
    c = client(
        mtls=False,
        services="{name: web, basePath: /web, port: 8080}\n - {name: api, basePath: /api}",
    )
    api = "outbound|80||api.shop.svc.cluster.local"
    cluster = XdsCluster(api, None, (), ())
    only_api = XdsState({api: cluster}, {api: (ep(81, tls_mode=None),)}, {})
    # Unknown names, absent services and known ones in any order: each is decided.
    found = c._discovery(["nope", "web", "api"], only_api, 5)
    assert found.absent == frozenset({"web"})
    (e,) = found.services["api"].endpoints
    assert (e.address, e.port, e.scheme, e.weight) == ("10.1.0.1", 81, "http", 1)
    assert e.host_header == "api.shop.svc.cluster.local"  # port 80: no port in Host
    assert found.services["api"].source == "istio" and found.services["api"].name == "api"
    assert found.catalog == ("api.shop.svc.cluster.local",)


def test_the_trust_domain_defaults_to_cluster_local():
    cfg = parse_config(
        "serviceMesh: {enabled: true, type: istio, namespace: shop, certFile: c, keyFile: k,\n"
        "  caFile: r, istio: {injectSidecar: false}}\n"
        "services:\n - {name: web, basePath: /web, port: 8080, identity: web}\n",
        env={},
    )
    c = IstioClient(cfg, environ={"POD_NAME": "gw-1", "INSTANCE_IP": "10.0.0.9"})
    assert c.pilot_addr == "istiod.istio-system.svc:15012"
    (e,) = c._discovery(["web"], state(ep()), 1).services["web"].endpoints
    assert e.identity == "spiffe://cluster.local/ns/shop/sa/web"
    assert c.describe()["node"]["id"].startswith("router~10.0.0.9~gw-1.shop~")
