import io
import ipaddress
import logging
import uuid
from types import SimpleNamespace

import pytest

from odin_gw.config.model import (
    ConsulConfig,
    GatewayConfig,
    IstioConfig,
    MeshConfig,
    ServiceConfig,
)
from odin_gw.config.schema import parse_target
from odin_gw.errors import UnsupportedTransferEncoding
from odin_gw.mesh.headers import ConsulHeaders, IstioHeaders, injectors_for
from odin_gw.mesh.snapshot import Endpoint
from odin_gw.proxy.blueprint import unsafe_path
from odin_gw.proxy.exchange import Exchange, inbound_request_id
from odin_gw.proxy.forwarder import Forwarder
from odin_gw.proxy.headers import (
    OutboundHeaders,
    header_name,
    response_headers,
    upstream_headers,
)
from odin_gw.proxy.outbound import OutboundBuilder, raw_path
from odin_gw.proxy.trust import ForwardingTrust
from odin_gw.routing import Route


def environ(**headers):
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": "10.0.0.1"}
    for k, v in headers.items():
        env["HTTP_" + k.upper()] = v
    return env


def test_hop_by_hop_and_connection_named_headers_dropped():
    env = environ(
        connection="keep-alive, X-Secret-Hop",
        x_secret_hop="1",
        keep_alive="5",
        te="trailers",
        upgrade="h2c",
        proxy_authorization="Basic x",
        x_app="ok",
    )
    out = upstream_headers(env, frozenset())
    assert out == {"X-App": "ok"}


def test_owned_headers_are_dropped_for_the_gateway_to_set():
    env = environ(
        host="h",
        x_forwarded_proto="https",
        x_forwarded_host="evil",
        x_forwarded_prefix="/x",
        x_request_id="abc",
    )
    assert upstream_headers(env, frozenset()) == {}


def test_strip_set_and_prefixes():
    env = environ(x_consul_token="t", l5d_dst_override="x", x_keep="1")
    out = upstream_headers(env, frozenset({"HTTP_X_CONSUL_TOKEN"}), ("HTTP_L5D_",))
    assert out == {"X-Keep": "1"}


def test_content_type_comes_from_environ():
    env = environ()
    env["CONTENT_TYPE"] = "application/json"
    assert upstream_headers(env, frozenset()) == {"Content-Type": "application/json"}


def test_header_name_titles():
    assert header_name("HTTP_X_FORWARDED_FOR") == "X-Forwarded-For"


def test_response_headers_keep_repeats_and_drop_hop_by_hop():
    items = [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Type", "text/plain"),
    ]
    assert response_headers(items) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Type", "text/plain"),
    ]


# -- the outbound header map and request builder -------------------------------------


def test_outbound_headers_are_case_insensitive_and_keep_last_spelling():
    h = OutboundHeaders()
    h["X-Api-Key"] = "attacker"
    h["X-API-Key"] = "secret"
    assert list(h.items()) == [("X-API-Key", "secret")]
    assert h["x-api-key"] == "secret" and "X-API-KEY" in h and len(h) == 1
    assert list(h) == ["X-API-Key"] and dict(h) == {"X-API-Key": "secret"}
    assert h == {"x-api-key": "secret"}
    del h["X-API-KEY"]
    assert not h and h.get("X-Api-Key") is None


def route(**extra) -> Route:
    svc = ServiceConfig(name="a", base_path="/a", targets=(parse_target("http://h:1"),), **extra)
    return Route.from_config(svc, GatewayConfig())


def request_env(raw: str = "/a/x", **headers) -> dict:
    env = environ(**headers)
    env.update(
        {
            "RAW_URI": raw,
            "PATH_INFO": raw.split("?")[0],
            "wsgi.input": io.BytesIO(b""),
            "wsgi.url_scheme": "http",
        }
    )
    return env


def build(env, r=None, mesh=(), trusted=()):
    exchange = Exchange(env)
    exchange.mesh_headers = list(mesh)
    forwarding = ForwardingTrust(ipaddress.ip_network(c) for c in trusted).decide(env)
    if forwarding is not None:
        exchange.forwarding = forwarding
        exchange.client_addr = forwarding.client_addr
    builder = OutboundBuilder(frozenset({"HTTP_X_CONSUL_TOKEN"}), ("HTTP_L5D_",))
    return builder.build(env, r or route(), exchange), exchange


def test_service_and_mesh_headers_replace_client_copies_in_any_case():
    env = request_env(x_api_key="attacker", x_b3_traceid="client")
    r = route(headers=(("X-API-Key", "secret"),))
    out, _ = build(env, r, mesh=[("X-B3-TraceId", "gateway")])
    items = [(k, v) for k, v in out.headers.items() if k.lower() in ("x-api-key", "x-b3-traceid")]
    assert sorted(items) == [("X-API-Key", "secret"), ("X-B3-TraceId", "gateway")]


def test_mesh_injector_replaces_client_copy_in_any_case():
    env = request_env(x_consul_datacenter="evil")
    out, exchange = build(env)
    env_only = OutboundHeaders()
    env_only["x-consul-datacenter"] = "evil"  # as if a client spelling had slipped in
    for headers in (out.headers, env_only):
        ConsulHeaders(ConsulConfig(datacenter="dc1")).upstream(
            exchange, Endpoint(address="h", port=1), headers
        )
        assert [v for k, v in headers.items() if k.lower() == "x-consul-datacenter"] == ["dc1"]


def test_untrusted_peer_forwarding_headers_replaced_or_dropped():
    env = request_env(
        x_forwarded_for="6.6.6.6",
        x_real_ip="6.6.6.6",
        forwarded="for=6.6.6.6",
        x_forwarded_client_cert="Hash=1",
        x_forwarded_ssl="on",
        x_forwarded_port="443",
        x_forwarded_proto="https",
        host="gw",
    )
    out, _ = build(env)
    h = dict(out.headers)
    assert h["X-Forwarded-For"] == "10.0.0.1" and h["X-Real-IP"] == "10.0.0.1"
    assert h["X-Forwarded-Proto"] == "http" and h["X-Forwarded-Host"] == "gw"
    for gone in ("Forwarded", "X-Forwarded-Client-Cert", "X-Forwarded-Ssl", "X-Forwarded-Port"):
        assert gone not in out.headers


def test_trusted_peer_forwarding_headers_believed_and_appended():
    env = request_env(
        x_forwarded_for="1.2.3.4",
        x_forwarded_proto="https",
        x_forwarded_host="public.example",
        x_forwarded_client_cert="Hash=1",
        host="gw",
    )
    out, exchange = build(env, trusted=["10.0.0.0/8"])
    h = dict(out.headers)
    assert exchange.client_addr == "1.2.3.4"
    assert h["X-Forwarded-For"] == "1.2.3.4, 10.0.0.1" and h["X-Real-IP"] == "1.2.3.4"
    assert h["X-Forwarded-Proto"] == "https" and h["X-Forwarded-Host"] == "public.example"
    assert h["X-Forwarded-Client-Cert"] == "Hash=1"


@pytest.mark.parametrize("coding", ["gzip, chunked", "identity,chunked", "chunked, chunked", ""])
def test_transfer_encoding_other_than_chunked_is_501(coding):
    env = request_env(transfer_encoding=coding)
    with pytest.raises(UnsupportedTransferEncoding) as info:
        build(env)
    assert info.value.status == 501


@pytest.mark.parametrize("coding", ["chunked", "Chunked", " CHUNKED "])
def test_chunked_alone_streams(coding):
    out, _ = build(request_env(transfer_encoding=coding))
    assert out.chunked and not out.replayable


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/a/x?q=1", "/a/x"),
        ("/a/%2e%2E/x", "/a/%2e%2E/x"),
        ("http://h.example/a/x?y", "/a/x"),
        ("http://h.example", "/"),
    ],
)
def test_raw_path_is_the_target_as_received(raw, path):
    assert raw_path({"RAW_URI": raw}) == path


@pytest.mark.parametrize(
    "path",
    [
        "/a/..",
        "/a/./b",
        "/a/..;/b",
        "/a/..;x=1/b",
        "/a/.;/b",
        "/a/..\\b",
        "/a/b\\..\\c",
        "/a/b\\.",
    ],
)
def test_unsafe_paths(path):
    assert unsafe_path(path)


@pytest.mark.parametrize(
    "path", ["/a/b", "/a/.well-known", "/a/...", "/a/b..", "/a/x;y", "/a/.x;..", "/"]
)
def test_safe_paths(path):
    assert not unsafe_path(path)


@pytest.mark.parametrize("path", ["/a/..;x;y/admin", "/a/.;x;y", "/a/..;;/b"])
def test_dot_segments_with_several_parameters_are_unsafe(path):
    assert unsafe_path(path)


def test_connection_tokens_without_spaces_are_dropped_both_ways():
    env = environ(connection="keep-alive,X-Hop-A,x-hop-b", x_hop_a="1", x_hop_b="2", x_end="3")
    assert dict(upstream_headers(env, frozenset())) == {"X-End": "3"}
    kept = response_headers([("Connection", "close,X-Hop"), ("X-Hop", "1"), ("X-End", "2")])
    assert kept == [("X-End", "2")]


def test_outbound_header_get_is_case_insensitive():
    h = OutboundHeaders()
    h["X-API-Key"] = "secret"
    assert h.get("x-api-key") == "secret" and h.get("X-Api-Key", "d") == "secret"
    assert h.get("X-Other") is None and h.get("X-Other", "d") == "d"
    assert h.pop("x-API-key") == "secret" and "X-API-Key" not in h and len(h) == 0
    h.update({"A": "1"}, b="2")
    h.setdefault("a", "ignored")
    assert dict(h) == {"A": "1", "b": "2"}


@pytest.mark.parametrize("size", [1, 65536, 65537, 300_000])
def test_request_body_reaches_the_upstream_whole(size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    env = request_env()
    env.update({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(size)})
    env["wsgi.input"] = io.BytesIO(data)
    out, _ = build(env)
    body = out.body if isinstance(out.body, bytes) else b"".join(out.body)
    assert body == data and out.headers["Content-Length"] == str(size)
    assert out.replayable is (size <= 65536) and not out.chunked


def test_request_body_cut_short_is_a_client_disconnect():
    from odin_gw.errors import ClientDisconnected

    for size in (100, 200_000):
        env = request_env()
        env.update({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(size)})
        env["wsgi.input"] = io.BytesIO(b"y" * (size // 2))
        with pytest.raises(ClientDisconnected, match=f"of {size}"):
            out, _ = build(env)
            b"".join(out.body)


# -- Istio headers ---------------------------------------------------------------------

B3_TRACE = "463ac35c9f6413ad48485a3953bb6124"
B3_SPAN = "a2fb4a1d1a96d312"


def istio_mesh(rate=1.0, custom=(), namespace="shop", sidecar=True):
    return MeshConfig(
        enabled=True,
        type="istio",
        namespace=namespace,
        istio=IstioConfig(sampling_rate=rate, custom_headers=tuple(custom), inject_sidecar=sidecar),
    )


def istio_build(env, injector=None, attempts=1):
    """The upstream headers of each attempt, built as the forwarder does."""
    injector = injector or IstioHeaders(istio_mesh())
    exchange = Exchange(env)
    injector.request(exchange, env)
    builder = OutboundBuilder(injector.strip, injector.strip_prefixes)
    out = builder.build(env, route(), exchange)
    sent = []
    for _ in range(attempts):
        injector.upstream(exchange, Endpoint(address="h", port=1), out.headers)
        sent.append(OutboundHeaders())
        sent[-1].update(out.headers)
    return sent


@pytest.mark.parametrize("sidecar", [True, False])
def test_injectors_for_istio_in_both_modes(sidecar):
    config = GatewayConfig(service_mesh=istio_mesh(sidecar=sidecar))
    (injector,) = injectors_for(config)
    assert isinstance(injector, IstioHeaders)


def test_forwarder_strips_what_the_istio_injector_names():
    gateway = SimpleNamespace(injectors=[IstioHeaders(istio_mesh())], config=GatewayConfig())
    outbound = Forwarder(gateway).outbound
    env = request_env(
        x_envoy_retry_on="5xx",
        x_envoy_upstream_rq_timeout_ms="1",
        x_b3_parentspanid="0000000000000001",
        traceparent="junk",
        b3="junk",
        x_keep="1",
    )
    out = outbound.build(env, route(), Exchange(env))
    left = {k.lower() for k in out.headers}
    assert "x-keep" in left
    assert not {n for n in left if n.startswith(("x-envoy-", "x-b3-", "b3", "traceparent"))}


def test_new_trace_headers_and_shapes():
    (h,) = istio_build(
        request_env(x_envoy_max_retries="9", x_envoy_namespace="evil", x_request_id="req-1")
    )
    trace, span = h["X-B3-TraceId"], h["X-B3-SpanId"]
    assert len(trace) == 32 and int(trace, 16) and trace == trace.lower()
    assert len(span) == 16 and int(span, 16) and span == span.lower()
    assert h["X-B3-Sampled"] == "1"
    assert h["traceparent"] == f"00-{trace}-{span}-01"
    assert h["X-Envoy-Namespace"] == "shop" and h["X-Request-Id"] == "req-1"
    for absent in ("X-B3-ParentSpanId", "X-B3-Flags", "tracestate", "X-Envoy-Max-Retries"):
        assert absent not in h


def test_incoming_b3_continues_with_a_new_span_per_attempt():
    env = request_env(
        x_b3_traceid=B3_TRACE.upper(), x_b3_spanid=B3_SPAN, x_b3_sampled="0", x_b3_flags="0"
    )
    first, second = istio_build(env, attempts=2)
    for h in (first, second):
        assert h["X-B3-TraceId"] == B3_TRACE and h["X-B3-ParentSpanId"] == B3_SPAN
        assert h["X-B3-Sampled"] == "0" and "X-B3-Flags" not in h
        assert h["traceparent"] == f"00-{B3_TRACE}-{h['X-B3-SpanId']}-00"
    assert first["X-B3-SpanId"] != second["X-B3-SpanId"]
    assert B3_SPAN not in (first["X-B3-SpanId"], second["X-B3-SpanId"])


def test_debug_flag_is_sampled_and_propagated():
    (h,) = istio_build(request_env(b3=f"{B3_TRACE}-{B3_SPAN}-d"), IstioHeaders(istio_mesh(0.0)))
    assert h["X-B3-Sampled"] == "1" and h["X-B3-Flags"] == "1"
    assert h["traceparent"].endswith("-01") and h["X-B3-ParentSpanId"] == B3_SPAN


def test_64_bit_trace_id_kept_and_padded_in_traceparent():
    (h,) = istio_build(request_env(x_b3_traceid=B3_SPAN, x_b3_spanid=B3_SPAN))
    assert h["X-B3-TraceId"] == B3_SPAN
    assert h["traceparent"] == f"00-{'0' * 16}{B3_SPAN}-{h['X-B3-SpanId']}-01"


def test_traceparent_alone_gives_trace_parent_and_state():
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    (h,) = istio_build(request_env(traceparent=tp, tracestate="rojo=00f067aa0ba902b7"))
    assert h["X-B3-TraceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert h["X-B3-ParentSpanId"] == "00f067aa0ba902b7" and h["X-B3-Sampled"] == "0"
    assert h["traceparent"] == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{h['X-B3-SpanId']}-00"
    assert h["tracestate"] == "rojo=00f067aa0ba902b7"


@pytest.mark.parametrize(
    "headers",
    [
        {"x_b3_traceid": "0" * 32, "x_b3_spanid": B3_SPAN},
        {"x_b3_traceid": B3_TRACE[:-2], "x_b3_spanid": B3_SPAN},
        {"x_b3_traceid": B3_TRACE, "x_b3_spanid": "not-hex-at-all!!"},
        {"b3": f"{B3_TRACE}-{B3_SPAN}-x"},
        {"traceparent": f"00-{B3_TRACE}-{'0' * 16}-01", "tracestate": "a=1"},
    ],
)
def test_invalid_incoming_ids_start_a_new_trace(headers):
    (h,) = istio_build(request_env(**headers))
    assert h["X-B3-TraceId"] != B3_TRACE and len(h["X-B3-TraceId"]) == 32
    assert "X-B3-ParentSpanId" not in h and "tracestate" not in h
    assert h["traceparent"] == f"00-{h['X-B3-TraceId']}-{h['X-B3-SpanId']}-01"


@pytest.mark.parametrize(("rate", "sampled"), [(1.0, "1"), (0.0, "0")])
def test_sampling_decided_by_rate_unless_the_caller_decided(rate, sampled):
    injector = IstioHeaders(istio_mesh(rate))
    (h,) = istio_build(request_env(), injector)
    assert h["X-B3-Sampled"] == sampled and h["traceparent"].endswith(f"-0{sampled}")
    kept = "0" if sampled == "1" else "1"
    (h,) = istio_build(request_env(x_b3_sampled=kept), injector)
    assert h["X-B3-Sampled"] == kept


def test_upstream_alone_still_sends_a_consistent_trace():
    headers = OutboundHeaders()
    IstioHeaders(istio_mesh(0.0)).upstream(None, Endpoint(address="h", port=1), headers)
    trace, span = headers["X-B3-TraceId"], headers["X-B3-SpanId"]
    assert headers["X-B3-Sampled"] == "0" and headers["traceparent"] == f"00-{trace}-{span}-00"


def test_custom_headers_copied_as_received_even_when_connection_names_them():
    injector = IstioHeaders(istio_mesh(custom=["X-Tenant", "x-tenant", "X-Flow"]))
    env = request_env(connection="X-Tenant", x_tenant="  t1  ", x_flow="f")
    (h,) = istio_build(env, injector)
    assert [(k, v) for k, v in h.items() if k.lower() == "x-tenant"] == [("X-Tenant", "  t1  ")]
    assert h["X-Flow"] == "f"
    (h,) = istio_build(request_env(), injector)  # absent: nothing invented
    assert "X-Tenant" not in h


def test_custom_headers_the_gateway_decides_are_refused_at_start(caplog):
    svc = ServiceConfig(name="a", base_path="/a", headers=(("X-Api-Key", "secret"),))
    names = [
        "X-Envoy-Retry-On",
        "X-Forwarded-For",
        "Host",
        "Forwarded",
        "Transfer-Encoding",
        "Content-Length",
        "X-API-KEY",
        "X-Request-ID",
        "X-B3-TraceId",
        "X-Tenant",
    ]
    with caplog.at_level(logging.INFO, logger="odin_gw.mesh"):
        injector = IstioHeaders(istio_mesh(custom=names), [svc])
    assert injector.custom == (("HTTP_X_TENANT", "X-Tenant"),)
    logged = {r.getMessage().split(":")[0].split()[-1]: r.levelno for r in caplog.records}
    assert logged == {n: logging.WARNING for n in names[:7]} | {
        "X-Request-ID": logging.INFO,
        "X-B3-TraceId": logging.INFO,
    }
    env = request_env(
        x_envoy_retry_on="5xx",
        x_forwarded_for="6.6.6.6",
        x_api_key="attacker",
        x_request_id="r-1",
        x_b3_traceid="0" * 32,
    )
    (h,) = istio_build(env, injector)
    assert "X-Envoy-Retry-On" not in h and h["X-Forwarded-For"] == "10.0.0.1"
    assert h["X-Request-Id"] == "r-1" and h["X-B3-TraceId"] != "0" * 32


@pytest.mark.parametrize(
    "given", ["abc", "7bbca6a9-b1bc-4b6a-903c-4a740b7c3113", "a.b:c+d/e=f_g", "x" * 200]
)
def test_sane_request_id_is_kept(given):
    assert inbound_request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "a b", "x" * 201, "id\u00e9", "a,b", "<script>"])
def test_other_request_ids_are_replaced_by_a_fresh_uuid4(given):
    ids = {inbound_request_id(given) for _ in range(50)}
    assert len(ids) == 50
    for value in ids:
        assert uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value
