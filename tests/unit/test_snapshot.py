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
