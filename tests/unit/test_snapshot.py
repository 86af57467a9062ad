from odin_gw.mesh.snapshot import Endpoint, ServiceEndpoints, Snapshot


def test_json_round_trip():
    svc = ServiceEndpoints(
        "web",
        (
            Endpoint(
                "10.0.0.1",
                8080,
                datacenter="dc1",
                identity="spiffe://td/ns/default/dc/dc1/svc/web",
                scheme="https",
                weight=3,
            ),
            Endpoint("10.0.0.2", 8080, healthy=False, status="critical", datacenter="dc2"),
        ),
        source="consul",
        datacenters=("dc1", "dc2"),
    )
    snap = Snapshot(mesh="consul").with_services(
        {"web": svc}, refreshed_at=123.0, catalog=("web", "db")
    )
    back = Snapshot.from_json(snap.to_json())
    assert back.services["web"] == svc
    assert back.version == 1 and back.catalog == ("web", "db") and back.refreshed_at == 123.0


def test_active_prefers_local_datacenter_then_fails_over():
    a = Endpoint("10.0.0.1", 80, datacenter="dc1", healthy=False)
    b = Endpoint("10.0.0.2", 80, datacenter="dc2")
    c = Endpoint("10.0.0.3", 80, datacenter="dc1")
    svc = ServiceEndpoints("s", (a, b, c), datacenters=("dc1", "dc2"))
    assert svc.active() == ((c,), "dc1")
    svc = ServiceEndpoints("s", (a, b), datacenters=("dc1", "dc2"))
    assert svc.active() == ((b,), "dc2")
    assert ServiceEndpoints("s", (a,), datacenters=("dc1",)).active() == ((), None)


def test_endpoint_host_header():
    assert Endpoint("10.0.0.1", 80).host_header == "10.0.0.1"
    assert Endpoint("10.0.0.1", 8080).host_header == "10.0.0.1:8080"
    assert Endpoint("::1", 443, scheme="https").host_header == "[::1]"


def test_istio_endpoint_fields_round_trip_and_key_the_pool():
    sans = ("spiffe://cluster.local/ns/shop/sa/a", "spiffe://cluster.local/ns/shop/sa/b")
    sni = "outbound_.9080_._.reviews.shop.svc.cluster.local"
    ep = Endpoint(
        "10.0.0.9",
        9080,
        scheme="https",
        identities=sans,
        sni=sni,
        locality="eu/eu-1a/rack3",
        status="draining",
        healthy=False,
        weight=5,
    )
    svc = ServiceEndpoints("reviews", (ep,), source="istio")
    back = Snapshot.from_json(Snapshot(mesh="istio").with_services({"reviews": svc}).to_json())
    again = back.services["reviews"].endpoints[0]
    assert again == ep and again.pool_key == ep.pool_key
    assert again.to_dict()["identities"] == list(sans) and again.to_dict()["sni"] == sni
    # Connections for other accepted identities or another SNI are other connections.
    assert Endpoint("10.0.0.9", 9080, scheme="https", identities=sans[:1], sni=sni).pool_key != (
        ep.pool_key
    )
    assert Endpoint("10.0.0.9", 9080, scheme="https", identities=sans).pool_key != ep.pool_key
    # Consul endpoints keep their JSON shape (no new keys).
    assert set(Endpoint("10.0.0.1", 80).to_dict()) == {
        "address",
        "port",
        "scheme",
        "healthy",
        "status",
        "weight",
        "datacenter",
        "identity",
        "hostHeader",
        "node",
        "serviceId",
    }


def test_bad_identities_are_refused():
    import pytest

    doc = Endpoint("10.0.0.1", 80).to_dict() | {"identities": "spiffe://x"}
    with pytest.raises(ValueError, match="identities must be a list of strings"):
        Endpoint.from_dict(doc)
