import pytest

from odin_gw.config import parse_config
from odin_gw.routing import RouteTable


@pytest.fixture
def table():
    cfg = parse_config(
        "services:\n"
        " - {name: users, basePath: /api/users, targets: ['http://h:1'], stripBasePath: true}\n"
        " - {name: api, basePath: /api, targets: ['http://h:1']}\n"
        " - {name: deep, basePath: /a/b/c/d, targets: ['http://h:1']}\n"
    )
    return RouteTable.from_config(cfg)


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/api/users", "users"),
        ("/api/users/", "users"),
        ("/api/users/42", "users"),
        ("/api/users/42/orders/7", "users"),
        ("/api/usersX", "api"),
        ("/api", "api"),
        ("/api/", "api"),
        ("/apix", None),
        ("/", None),
        ("/a/b/c/d", "deep"),
        ("/a/b/c/d/e/f/g", "deep"),
        ("/a/b/c", None),
        ("/a/b/c/dd", None),
        ("/x/y/z/w/v/u/t", None),
    ],
)
def test_longest_prefix_on_whole_segments(table, path, service):
    route = table.match(path)
    assert (route.name if route else None) == service


def test_root_route_catches_the_rest():
    cfg = parse_config(
        "services:\n - {name: root, basePath: /, targets: ['http://h']}\n"
        " - {name: a, basePath: /a, targets: ['http://h']}\n"
    )
    table = RouteTable.from_config(cfg)
    assert table.match("/anything/else").name == "root"
    assert table.match("/a/b").name == "a"


@pytest.mark.parametrize(
    ("raw", "upstream"),
    [
        ("/api/users", "/"),
        ("/api/users/", "/"),
        ("/api/users/42", "/42"),
        ("/api/%75sers/42", "/42"),
        ("/api/users/a%2Fb", "/a%2Fb"),
    ],
)
def test_strip_base_path_by_segments(table, raw, upstream):
    assert table.match("/api/users").upstream_path(raw) == upstream


def test_no_strip_keeps_path(table):
    assert table.match("/api/x").upstream_path("/api/x") == "/api/x"


def test_flask_answers_no_path_of_its_own_beyond_the_gateways():
    from odin_gw import create_app

    cfg = parse_config("services:\n - {name: s, basePath: /static, targets: ['http://h']}\n")
    app = create_app(cfg, start=False)
    rules = {r.rule for r in app.url_map.iter_rules()}
    assert not any(r.startswith("/static") for r in rules)
    assert {"/<path:path>", "/health", "/ready", "/live"} <= rules


def test_istio_sidecar_mode_sends_to_the_kubernetes_name():
    from odin_gw.config import parse_config
    from odin_gw.routing import Route

    cfg = parse_config(
        "serviceMesh: {enabled: true, type: istio, namespace: shop}\n"
        "services:\n"
        " - {name: web, basePath: /web}\n"
        " - {name: api, basePath: /api, meshService: catalog, port: 8080}\n"
        " - {name: old, basePath: /old, targets: ['http://old.shop.svc.cluster.local:81']}\n",
        env={},
    )
    web, api, old = (Route.from_config(s, cfg) for s in cfg.services)
    assert web.sidecar.key == "http://web.shop.svc.cluster.local:80"
    assert web.sidecar.host_header == "web.shop.svc.cluster.local"
    assert api.sidecar.host_header == "catalog.shop.svc.cluster.local:8080"
    assert old.sidecar is None and old.static.endpoints[0].port == 81  # targets as written
    direct = parse_config(
        "serviceMesh: {enabled: true, type: istio, istio: {injectSidecar: false},\n"
        "  certFile: c, keyFile: k, caFile: r}\nservices:\n - {name: web, basePath: /web}\n",
        env={},
    )
    assert Route.from_config(direct.services[0], direct).sidecar is None
