from odin_gw.proxy.headers import header_name, response_headers, upstream_headers


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
