"""Linkerd ingress mode: routing to cluster names, the l5d-* headers, identities."""

from __future__ import annotations

import base64
import time

import pytest

from odin_gw.config import parse_config
from odin_gw.mesh.headers import injectors_for
from odin_gw.mesh.linkerd import (
    LinkerdHeaders,
    ctx_deadline,
    ctx_trace,
    describe,
    linkerd_identity,
)
from odin_gw.mesh.snapshot import Endpoint
from odin_gw.proxy.exchange import Exchange
from odin_gw.proxy.headers import OutboundHeaders
from odin_gw.routing import RouteTable

CONFIG = """
server: {timeout: 4s}
services:
  - {name: orders, basePath: /orders, port: 8080}
  - {name: pay, basePath: /pay, meshService: payments, namespace: billing,
     identity: payments-sa, timeout: 1500ms}
  - {name: web, basePath: /web, targets: ["http://10.0.0.9:9000"],
     identity: web.shop.serviceaccount.identity.linkerd.example.org}
serviceMesh:
  enabled: true
  type: linkerd
  namespace: shop
  linkerd: {legacyHeaders: %s}
"""


def cfg(legacy: bool = True):
    return parse_config(CONFIG % ("true" if legacy else "false"))


def send(injector: LinkerdHeaders, service: str, environ: dict | None = None):
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "HTTP_X_REQUEST_ID": "req-1"}
    env.update(environ or {})
    exchange = Exchange(env)
    injector.request(exchange, env)
    exchange.service = service
    headers = OutboundHeaders()
    for name, value in exchange.mesh_headers:
        headers[name] = value
    injector.upstream(exchange, Endpoint(address="h", port=1), headers)
    return {k.lower(): v for k, v in headers.items()}, exchange


def test_each_service_gets_its_cluster_authority_as_dst_override():
    inj = LinkerdHeaders(cfg())
    assert send(inj, "orders")[0]["l5d-dst-override"] == "orders.shop.svc.cluster.local:8080"
    pay, exchange = send(inj, "pay")
    assert pay["l5d-dst-override"] == "payments.billing.svc.cluster.local:80"
    assert pay["l5d-require-id"] == (
        "payments-sa.billing.serviceaccount.identity.linkerd.cluster.local"
    )
    assert exchange.peer_identity == pay["l5d-require-id"]
    web = send(inj, "web")[0]
    assert web["l5d-dst-override"] == "web.shop.svc.cluster.local:9000"  # the target's port
    assert web["l5d-require-id"] == "web.shop.serviceaccount.identity.linkerd.example.org"
    assert "l5d-require-id" not in send(inj, "orders")[0]


def test_identity_expansion_uses_the_trust_domain():
    assert (
        linkerd_identity("sa", "ns", None) == "sa.ns.serviceaccount.identity.linkerd.cluster.local"
    )
    assert (
        linkerd_identity("sa", "ns", "corp.io") == "sa.ns.serviceaccount.identity.linkerd.corp.io"
    )
    assert linkerd_identity("a.b.c", "ns", "corp.io") == "a.b.c"


def test_every_client_l5d_header_is_stripped():
    inj = LinkerdHeaders(cfg())
    assert "HTTP_L5D_" in inj.strip_prefixes
    for name in (
        "HTTP_L5D_DST_OVERRIDE",
        "HTTP_L5D_REQUIRE_ID",
        "HTTP_L5D_CTX_TRACE",
        "HTTP_L5D_X",
    ):
        assert name.startswith(inj.strip_prefixes)
    assert "HTTP_X_B3_TRACEID" in {p + "TRACEID" for p in inj.strip_prefixes}


def test_legacy_headers_carry_the_request_id_the_deadline_and_the_trace():
    inj = LinkerdHeaders(cfg())
    before = time.time_ns()
    sent, _ = send(
        inj,
        "pay",
        {
            "HTTP_X_B3_TRACEID": "463ac35c9f6413ad48485a3953bb6124",
            "HTTP_X_B3_SPANID": "a2fb4a1d1a96d312",
            "HTTP_X_B3_SAMPLED": "1",
        },
    )
    assert sent["l5d-reqid"] == "req-1"
    start, deadline = (int(v) for v in sent["l5d-ctx-deadline"].split(" "))
    assert before - 2_000_000_000 <= start <= time.time_ns()
    assert deadline - start == 1_500_000_000  # the route's timeout
    raw = base64.b64decode(sent["l5d-ctx-trace"])
    assert len(raw) == 40
    assert raw[0:8].hex() == sent["x-b3-spanid"]
    assert raw[8:16].hex() == "a2fb4a1d1a96d312"  # the caller's span is the parent
    assert raw[16:24].hex() == "48485a3953bb6124"  # low half of the trace id
    assert int.from_bytes(raw[24:32], "big") == 6  # sampling known + sampled
    assert raw[32:40].hex() == "463ac35c9f6413ad"  # high half
    assert sent["x-b3-traceid"] == "463ac35c9f6413ad48485a3953bb6124"


def test_a_root_span_is_its_own_parent_and_an_unsampled_trace_says_so():
    raw = base64.b64decode(ctx_trace("48485a3953bb6124", "a2fb4a1d1a96d312", None, "0", False))
    assert len(raw) == 32
    assert raw[0:8] == raw[8:16]
    assert int.from_bytes(raw[24:32], "big") == 2
    debug = base64.b64decode(ctx_trace("48485a3953bb6124", "a2fb4a1d1a96d312", None, "1", True))
    assert int.from_bytes(debug[24:32], "big") == 7


def test_ctx_deadline_is_nanoseconds_since_the_epoch():
    assert ctx_deadline(1.5, 0.25) == "1500000000 1750000000"


def test_legacy_headers_off():
    sent, _ = send(LinkerdHeaders(cfg(legacy=False)), "orders")
    assert not {"l5d-reqid", "l5d-ctx-deadline", "l5d-ctx-trace"} & set(sent)
    assert sent["l5d-dst-override"] == "orders.shop.svc.cluster.local:8080"
    assert len(sent["x-b3-traceid"]) == 32 and "traceparent" in sent


def test_each_attempt_is_a_new_span_in_both_encodings():
    inj = LinkerdHeaders(cfg())
    a, _ = send(inj, "orders")
    b, _ = send(inj, "orders")
    assert a["x-b3-spanid"] != b["x-b3-spanid"]
    for sent in (a, b):
        raw = base64.b64decode(sent["l5d-ctx-trace"])
        assert raw[0:8].hex() == sent["x-b3-spanid"]
        assert sent["traceparent"].split("-")[2] == sent["x-b3-spanid"]


def test_routes_go_to_the_cluster_name_or_the_targets_never_to_discovered_pods():
    table = RouteTable.from_config(cfg())
    by_name = {r.name: r for r in table}
    assert all(r.proxy_balances for r in table)
    orders = by_name["orders"].sidecar
    assert (orders.address, orders.port) == ("orders.shop.svc.cluster.local", 8080)
    assert by_name["pay"].sidecar.address == "payments.billing.svc.cluster.local"
    assert by_name["web"].sidecar is None  # its targets, as written


def test_the_pipeline_is_the_linkerd_injector():
    (inj,) = injectors_for(cfg())
    assert isinstance(inj, LinkerdHeaders)


def test_start_up_lines_say_what_linkerd_2_ignores():
    lines = " ".join(describe(cfg()))
    assert "Linkerd 2 ignores" in lines and "legacyHeaders: false" in lines
    assert "Linkerd 2 ignores" not in " ".join(describe(cfg(legacy=False)))


@pytest.mark.parametrize(
    "services, problem",
    [
        ("[{name: a, basePath: /a, namespace: Bad_NS}]", "namespace"),
        (
            "[{name: a, basePath: /a, meshService: x}, {name: b, basePath: /b, meshService: x,"
            " namespace: other}]",
            "one mesh service name can live in one namespace",
        ),
    ],
)
def test_bad_service_namespaces_are_named(services, problem):
    from odin_gw.config.loader import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(f"services: {services}\nserviceMesh: {{enabled: true, type: linkerd}}\n")
    assert problem in str(err.value)


def test_namespace_is_refused_without_a_kubernetes_mesh():
    from odin_gw.config.loader import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config("services: [{name: a, basePath: /a, targets: ['http://h:1'], namespace: x}]\n")
    assert "only used with serviceMesh.type: linkerd or istio" in str(err.value)


def test_the_deadline_follows_the_forwarders_timeout_when_a_profile_shortened_it():
    inj = LinkerdHeaders(cfg())
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}
    exchange = Exchange(env)
    inj.request(exchange, env)
    exchange.service = "pay"
    exchange.timeout = 0.3  # a ServiceProfile route's timeout, shorter than the service's
    headers = OutboundHeaders()
    inj.upstream(exchange, Endpoint(address="h", port=1), headers)
    start, deadline = (int(v) for v in headers["l5d-ctx-deadline"].split(" "))
    assert deadline - start == 300_000_000


def test_a_debug_trace_is_debug_in_the_linkerd_1_encoding_too():
    sent, _ = send(
        LinkerdHeaders(cfg()),
        "orders",
        {
            "HTTP_X_B3_TRACEID": "48485a3953bb6124",
            "HTTP_X_B3_SPANID": "a2fb4a1d1a96d312",
            "HTTP_X_B3_FLAGS": "1",
        },
    )
    raw = base64.b64decode(sent["l5d-ctx-trace"])
    assert int.from_bytes(raw[24:32], "big") == 7  # debug, sampling known, sampled


GROUPS = """
services:
  - name: shop
    basePath: /shop
    port: 8080
    groups:
      canary: {meshService: shop-canary}
      pinned: {targets: ["http://10.0.0.7:9090"]}
serviceMesh: {enabled: true, type: linkerd, namespace: shop}
"""


def test_a_backend_group_is_sent_to_its_own_service():
    inj = LinkerdHeaders(parse_config(GROUPS))
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}
    for route, authority in (
        (None, "shop.shop.svc.cluster.local:8080"),
        ("shop/canary", "shop-canary.shop.svc.cluster.local:8080"),
        # Given as targets: the service's own Service, on the targets' port.
        ("shop/pinned", "shop.shop.svc.cluster.local:9090"),
    ):
        exchange = Exchange(env)
        inj.request(exchange, env)
        exchange.service, exchange.route = "shop", route
        headers = OutboundHeaders()
        inj.upstream(exchange, Endpoint(address="h", port=1), headers)
        assert headers["l5d-dst-override"] == authority, route
