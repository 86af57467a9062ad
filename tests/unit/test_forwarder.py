"""The forwarder against scripted raw-socket upstreams: framing, time limits, retries.

Each test drives ``Forwarder.forward`` with a WSGI environ and a route built from config,
against a :class:`RawUpstream` on loopback that writes exactly the bytes given.
"""

from __future__ import annotations

import contextlib
import io
import time

import pytest
from werkzeug.test import EnvironBuilder

from odin_gw.config.loader import build_config
from odin_gw.errors import (
    GatewayError,
    NoHealthyTarget,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from odin_gw.metrics import GatewayMetrics
from odin_gw.proxy.exchange import Exchange
from odin_gw.proxy.forwarder import Forwarder
from odin_gw.proxy.transport import UpstreamSession
from odin_gw.routing import RouteTable
from tests.support.raw_upstream import RawUpstream, Reply
from tests.support.upstream import free_port


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


class StubGateway:
    """What the forwarder reads from a gateway: config, injectors, session, candidates,
    metrics."""

    def __init__(self, config) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.injectors: list = []
        self.session = UpstreamSession(pool_size=4)
        self.routes = RouteTable.from_config(config)

        self.concurrency = None

    def candidates(self, route):
        return route.static.endpoints

    def every_endpoint(self, route):
        return route.static.endpoints


class Harness:
    def __init__(self, targets: list[str], **service) -> None:
        svc = {"name": "svc", "basePath": "/svc", "targets": targets}
        svc.update(service)
        self.gateway = StubGateway(build_config({"services": [svc]}))
        self.route = self.gateway.routes.routes[0]
        self.forwarder = Forwarder(self.gateway)

    def environ(self, method="GET", path="/svc/x", data=None, headers=None, stream=None):
        env = EnvironBuilder(path=path, method=method, data=data, headers=headers).get_environ()
        env["RAW_URI"] = path
        if stream is not None:  # a large body read from the client as it comes
            env["wsgi.input"] = stream
            env["CONTENT_LENGTH"] = str(len(stream.getvalue()))
        return env

    def send(self, method="GET", **kwargs):
        """(status, headers, body, exchange) of one forwarded request."""
        env = self.environ(method, **kwargs)
        exchange = Exchange(env)
        response = self.forwarder.forward(env, self.route, exchange)
        try:
            body = b"".join(response.response)
        finally:
            response.close()
        return response.status_code, list(response.headers.items()), body, exchange

    def fail(self, method="GET", **kwargs) -> tuple[GatewayError, Exchange]:
        env = self.environ(method, **kwargs)
        exchange = Exchange(env)
        with pytest.raises(GatewayError) as info:
            self.forwarder.forward(env, self.route, exchange)
        return info.value, exchange

    def close(self) -> None:
        self.gateway.session.close()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(targets, **service) -> Harness:
        h = Harness(targets, **service)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


# -- interim answers ----------------------------------------------------------------------


def test_interim_answers_are_dropped_and_the_pooled_connection_stays_in_step(harness):
    first = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + ok(b"first", b"X-Seq: 1\r\n")
    )
    with RawUpstream([Reply(first), Reply(ok(b"second"))]) as up:
        h = harness([up.url])
        status, headers, body, _ = h.send()
        assert (status, body) == (200, b"first")
        assert ("X-Seq", "1") in headers and not any(k == "Link" for k, _ in headers)
        status, _, body, _ = h.send()
        assert (status, body) == (200, b"second")
        assert len(up.connections) == 1  # the same pooled connection, in step


def test_interim_answer_arriving_before_the_final_one_is_skipped(harness):
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    reply = Reply(interim + ok(b"late"), drip=0.1, drip_size=len(interim))
    with RawUpstream([reply, Reply(ok(b"next"))]) as up:
        h = harness([up.url])
        assert h.send()[2] == b"late"
        assert h.send()[2] == b"next"
        assert len(up.connections) == 1


def test_unsolicited_101_is_a_protocol_error(harness):
    with RawUpstream([Reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")]) as up:
        error, exchange = harness([up.url]).fail()
        assert isinstance(error, UpstreamProtocolError) and error.status == 502
        assert exchange.error_kind == "upstream_protocol_error"


# -- header integrity ---------------------------------------------------------------------

BAD_HEADS = {
    "bare CR": b"Set-Cookie: a=1\rInjected: x\r\n",
    "NUL": b"X-A: a\x00b\r\n",
    "control char": b"X-A: a\x01b\r\n",
    "DEL": b"X-A: a\x7fb\r\n",
    "vertical tab": b"X-A: a\x0bb\r\n",
    "obs-fold": b"X-A: a\r\n folded\r\n",
    "leading whitespace": b" X-A: a\r\n",
    "space in name": b"X A: a\r\n",
    "non-token name": b"X\x85A: a\r\n",
    "two lengths": b"Content-Length: 2\r\n",
    "bad length": b"X-B: 1\r\n",
    "unknown transfer-encoding": b"Transfer-Encoding: gzip\r\n",
    "no colon": b"X-A a\r\n",
    "space before colon": b"X-A : a\r\n",
    "empty name": b": a\r\n",
    "mbox From line": b"From x@y Mon Jan 1\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_HEADS))
def test_invalid_answer_head_is_502_and_the_connection_is_closed(harness, name):
    head = b"HTTP/1.1 200 OK\r\n" + BAD_HEADS[name]
    if name == "bad length":
        head += b"Content-Length: 2x\r\n"
    else:
        head += b"Content-Length: 2\r\n" if name != "two lengths" else b"Content-Length: 3\r\n"
    with RawUpstream([Reply(head + b"\r\nok", then="keep")], default=[Reply(ok())]) as up:
        h = harness([up.url])
        error, exchange = h.fail()
        assert isinstance(error, UpstreamProtocolError), error
        assert error.status == 502
        assert exchange.error_kind == "upstream_protocol_error"
        assert up.wait_closed(0), "the connection with the bad answer was pooled"
        assert h.send()[2] == b"ok"  # a fresh connection next time
        assert len(up.connections) == 2


def test_header_values_are_kept_as_sent_but_for_leading_blanks(harness):
    head = (
        b"HTTP/1.1 200 OK\r\nX-Pad:  \t padded  \r\nX-Empty:\r\nX-Colon: a:b: c\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Latin: caf\xe9\nContent-Length: 2\r\n\r\nok"
    )
    with RawUpstream([Reply(head)]) as up:
        status, headers, body, _ = harness([up.url]).send()
    assert (status, body) == (200, b"ok")
    got = [(k, v) for k, v in headers if k.startswith(("X-", "Set-Cookie")) and k != "X-Request-Id"]
    assert got == [
        ("X-Pad", "padded  "),
        ("X-Empty", ""),
        ("X-Colon", "a:b: c"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Latin", "caf\xe9"),
    ]


def test_more_header_lines_than_http_client_allows_is_502(harness):
    import http.client

    many = b"".join(b"X-%d: v\r\n" % i for i in range(http.client._MAXHEADERS + 1))
    head = b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 0\r\n\r\n"
    with RawUpstream([Reply(head)]) as up:
        error, _ = harness([up.url]).fail()
    assert error.status == 502


@pytest.mark.parametrize(
    "last",
    [
        b"X-A: a\x01b\r\n\r\n",
        b"Set-Cookie: a=1\rInjected: x\r\n\r\n",
        b"X-A: a\x00\r\n\r\n",
        b"X-A: a\x01\n\n",  # bare LF line ends: the bad byte is right before the end
    ],
    ids=["control char", "bare CR", "NUL", "LF endings"],
)
def test_bad_byte_in_the_last_header_line_is_caught_too(harness, last):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + last + b"ok"
    with RawUpstream([Reply(head)]) as up:
        error, _ = harness([up.url]).fail()
        assert isinstance(error, UpstreamProtocolError), error


def test_transfer_encoding_given_twice_is_refused(harness):
    # Two Transfer-Encoding lines, even both "chunked", are a list of codings (RFC 9112
    # 6.1): "chunked, chunked" is not a framing a proxy may guess at.
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
    with RawUpstream([Reply(head + b"\r\n2\r\nok\r\n0\r\n\r\n")]) as up:
        error, _ = harness([up.url]).fail()
        assert isinstance(error, UpstreamProtocolError), error


def test_head_split_across_reads_is_checked_too(harness):
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 20000 + b"\r\nSet-Cookie: a=1\rX: y\r\n"
    with RawUpstream([Reply(head + b"Content-Length: 0\r\n\r\n", drip=0.01, drip_size=4096)]) as up:
        error, _ = harness([up.url]).fail()
        assert isinstance(error, UpstreamProtocolError)


def test_large_valid_head_split_across_reads_passes(harness):
    pad = b"p" * 20000
    reply = Reply(ok(b"fine", b"X-Pad: " + pad + b"\r\n"), drip=0.01, drip_size=4096)
    with RawUpstream([reply, Reply(ok(b"again"))]) as up:
        h = harness([up.url])
        status, headers, body, _ = h.send()
        assert (status, body) == (200, b"fine")
        assert dict(headers)["X-Pad"] == pad.decode()
        assert h.send()[2] == b"again"
        assert len(up.connections) == 1


def test_identical_content_lengths_are_folded_into_one(harness):
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nfirst",
        b"HTTP/1.1 200 OK\r\nContent-Length: 6, 6\r\n\r\nsecond",
    ]
    with RawUpstream([Reply(answers[0]), Reply(answers[1]), Reply(ok(b"third"))]) as up:
        h = harness([up.url])
        for expected in (b"first", b"second"):
            status, headers, body, _ = h.send()
            assert (status, body) == (200, expected)
            lengths = [v for k, v in headers if k.lower() == "content-length"]
            assert lengths == [str(len(expected))]
        assert h.send()[2] == b"third"
        assert len(up.connections) == 1


def test_length_with_chunked_is_dropped_and_the_connection_not_reused(harness):
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    with RawUpstream([Reply(answer)], default=[Reply(ok(b"fresh"))]) as up:
        h = harness([up.url])
        status, headers, body, _ = h.send()
        assert (status, body) == (200, b"hello world")
        assert not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers)
        assert up.wait_closed(0)
        assert h.send()[2] == b"fresh"
        assert len(up.connections) == 2


def test_upstream_request_id_is_replaced_by_the_gateways(harness):
    with RawUpstream([Reply(ok(b"x", b"X-Request-Id: upstream-id\r\n"))]) as up:
        _, headers, _, exchange = harness([up.url]).send()
        ids = [v for k, v in headers if k.lower() == "x-request-id"]
        assert ids == [exchange.request_id]


# -- early answers to uploads ---------------------------------------------------------------

REFUSED = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!"
)


@pytest.mark.parametrize("then", ["linger", "close"])
def test_early_answer_during_a_streamed_upload_reaches_the_client(harness, then):
    upload = io.BytesIO(b"u" * (10 * 1024 * 1024))
    with RawUpstream([Reply(REFUSED, read_body=False, then=then)]) as up:
        h = harness([up.url])
        status, _, body, exchange = h.send("POST", stream=upload)
        assert (status, body) == (413, b"too big!")
        assert exchange.error_kind is None


def test_early_401_before_an_upload_with_keep_alive_is_not_pooled(harness):
    upload = io.BytesIO(b"u" * (4 * 1024 * 1024))
    denied = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno"
    with RawUpstream([Reply(denied, read_body=False, then="close")], default=[Reply(ok())]) as up:
        h = harness([up.url])
        assert h.send("PUT", stream=upload)[:1] == (401,)
        assert h.send()[2] == b"ok"
        assert len(up.connections) == 2


# -- time limits ----------------------------------------------------------------------------


def test_timeout_is_a_deadline_for_the_head_whatever_the_pace(harness):
    dripped = Reply(ok(b"x" * 10, b"X-Slow: " + b"s" * 40 + b"\r\n"), drip=0.1)
    with RawUpstream([dripped]) as up:
        h = harness([up.url], timeout="600ms")
        started = time.monotonic()
        error, exchange = h.fail()
        took = time.monotonic() - started
        assert isinstance(error, UpstreamTimeout) and error.status == 504
        assert exchange.error_kind == "upstream_timeout"
        assert 0.5 < took < 1.5


def test_idle_timeout_bounds_silence_in_the_body(harness):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"a" * 1000
    with RawUpstream([Reply(head, then="stall", stall=5)]) as up:
        h = harness([up.url], timeout="5s", idleTimeout="300ms")
        env = h.environ()
        exchange = Exchange(env)
        response = h.forwarder.forward(env, h.route, exchange)
        started = time.monotonic()
        got = b""
        with pytest.raises(Exception):  # noqa: B017 - urllib3's ReadTimeoutError
            for chunk in response.response:
                got += chunk
        response.close()
        assert got in (b"", b"a" * 1000)  # cut short either way
        assert time.monotonic() - started < 2
        assert exchange.error_kind == "body_interrupted"


def test_slow_body_within_the_idle_timeout_is_fine_beyond_the_head_deadline(harness):
    answer = ok(b"b" * 20)
    head_len = answer.index(b"\r\n\r\n") + 4
    reply = Reply(answer, drip=0.06, drip_size=head_len)  # head at once, then the body later
    with RawUpstream([reply]) as up:
        h = harness([up.url], timeout="50ms", idleTimeout="1s")
        assert h.send()[2] == b"b" * 20


# -- retries --------------------------------------------------------------------------------


def test_connect_failure_is_retried_for_any_method(harness):
    dead = f"http://127.0.0.1:{free_port()}"
    with RawUpstream([Reply(ok(b"posted"))]) as up:
        h = harness([dead, up.url], loadBalancing="round-robin")
        for _ in range(2):  # whichever comes first
            status, _, body, _ = h.send("POST", data=b"payload")
            assert (status, body) == (200, b"posted")
        assert [r.body for r in up.requests] == [b"payload", b"payload"]


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(harness):
    # The first connection answers once, then closes when the next request arrives.
    with RawUpstream([Reply(ok(b"one"))], default=[Reply(ok(b"two"))]) as up:
        h = harness([up.url], retries=0)
        assert h.send()[2] == b"one"
        status, _, body, exchange = h.send("POST", data=b"again")
        assert (status, body) == (200, b"two")
        assert exchange.error_kind is None
        assert len(up.connections) == 2


def test_reset_after_send_retries_idempotent_methods_only(harness):
    hangup = [Reply(b"", then="close")]
    with RawUpstream(hangup) as bad, RawUpstream([Reply(ok(b"b"))]) as good:
        h = harness([bad.url, good.url], loadBalancing="round-robin")
        codes = []
        for _ in range(4):
            try:
                codes.append(h.send("POST", data=b"x")[0])
            except UpstreamError as exc:
                assert exc.code == "upstream_error"
                codes.append(exc.status)
        assert sorted(codes) == [200, 200, 502, 502]
        for _ in range(4):
            assert h.send("PUT", data=b"x")[0] == 200


def test_timeout_is_not_retried(harness):
    with (
        RawUpstream([Reply(b"", then="stall", stall=3)]) as slow,
        RawUpstream([Reply(ok())]) as fine,
    ):
        h = harness([slow.url, fine.url], timeout="300ms", loadBalancing="round-robin")
        results = []
        for _ in range(2):
            try:
                results.append(h.send()[0])
            except UpstreamTimeout:
                results.append(504)
        assert sorted(results) == [200, 504]
        assert len(fine.requests) == 1


def test_retries_share_one_deadline(harness):
    stalls = [Reply(b"", then="stall", stall=3)]
    with RawUpstream(stalls) as a, RawUpstream([Reply(b"", then="close")]) as b:
        # b resets (retried for GET), a stalls: together they must not exceed the timeout.
        h = harness([b.url, a.url], timeout="500ms", retries=3, loadBalancing="round-robin")
        started = time.monotonic()
        for _ in range(2):
            with contextlib.suppress(UpstreamTimeout, UpstreamError):
                h.send()
        assert time.monotonic() - started < 2.5


# -- accounting -----------------------------------------------------------------------------

FAILURES = {
    "refused": None,
    "reset": [Reply(b"", then="close")],
    "timeout": [Reply(b"", then="stall", stall=2)],
    "invalid": [Reply(b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n")],
    "body cut": [Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", then="close")],
    "big body cut": [Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\nabc", then="close")],
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_least_request_in_flight_returns_to_zero_after_each_failure(harness, kind):
    script = FAILURES[kind]
    with RawUpstream(script or [Reply(ok())]) as up:
        url = f"http://127.0.0.1:{free_port()}" if script is None else up.url
        h = harness([url], timeout="300ms", loadBalancing="least-request", retries=0)
        balancer = h.route.balancer
        key = h.route.static.endpoints[0].key
        env = h.environ()
        exchange = Exchange(env)
        try:
            response = h.forwarder.forward(env, h.route, exchange)
        except GatewayError:
            pass
        else:
            assert balancer.inflight(key) == 1
            with contextlib.suppress(Exception):
                b"".join(response.response)
            response.close()
            response.close()
        assert balancer.inflight(key) == 0
        assert exchange.error_kind


def test_no_candidates_is_503(harness):
    h = harness(["http://127.0.0.1:9"], panicThreshold="off")
    h.gateway.candidates = lambda route: ()
    error, exchange = h.fail()
    assert isinstance(error, NoHealthyTarget) and exchange.error_kind == "no_healthy_target"


def test_no_healthy_candidate_is_panic_mode_over_every_endpoint(harness):
    with RawUpstream([Reply(ok(b"still here"))]) as up:
        h = harness([up.url])  # panicThreshold 0: panic when none is healthy
        h.gateway.candidates = lambda route: ()
        status, _, body, exchange = h.send()
        assert (status, body) == (200, b"still here")
        assert exchange.target.endswith(f":{up.port}")
        assert h.gateway.metrics.totals("odin_panic_requests") == {(("service", "svc"),): 1.0}


def test_pool_closed_between_pick_and_get_is_retried_on_the_current_pool(harness):
    with RawUpstream([Reply(ok(b"fine"))]) as up:
        h = harness([up.url])
        adapter = h.gateway.session.adapter
        real = adapter.pool_for
        closed = []

        def racing(endpoint):
            pool = real(endpoint)
            if not closed:  # the endpoint is dropped just as the request picks it
                adapter.retain(set())
                closed.append(pool)
            return pool

        adapter.pool_for = racing
        assert h.send()[:3:2] == (200, b"fine")
        assert closed and closed[0].pool is None


def test_tls_rotation_closing_the_adapter_mid_pick_is_not_an_error(harness):
    with RawUpstream([Reply(ok(b"fine"))]) as up:
        h = harness([up.url])
        session = h.gateway.session
        old = session.adapter
        real = old.pool_for

        def racing(endpoint):
            pool = real(endpoint)
            from odin_gw.proxy.transport import MeshAdapter

            session._mount(MeshAdapter(None, 4))  # what use_material does
            old.close()
            return pool

        old.pool_for = racing
        assert h.send()[2] == b"fine"
        assert session.adapter is not old


def test_unreachable_gives_up_after_the_retries(harness):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    error, exchange = harness(dead, retries=1).fail("POST", data=b"x")
    assert isinstance(error, UpstreamUnreachable)
    assert exchange.error_kind == "upstream_unreachable"


def test_static_targets_are_marked_static_with_their_services_ca_file(harness):
    h = harness(["https://127.0.0.1:8443", "http://127.0.0.1:8080"], caFile="/etc/ca.pem")
    tls, plain = h.route.static.endpoints
    assert tls.static and tls.ca_file == "/etc/ca.pem" and tls.key == "https://127.0.0.1:8443"
    assert plain.static and plain.pool_key == plain.key
    assert h.route.idle_timeout == h.route.timeout.read_timeout  # idleTimeout defaults to it


def test_stale_retry_takes_a_new_connection_not_another_pooled_one(harness):
    # Two pooled connections, both dropped by the upstream while idle.
    scripts = [[Reply(ok(b"a"))], [Reply(ok(b"b"))]]
    with RawUpstream(*scripts, default=[Reply(ok(b"new"))]) as up:
        h = harness([up.url], retries=0)
        env1, env2 = h.environ(), h.environ()
        r1 = h.forwarder.forward(env1, h.route, Exchange(env1))
        r2 = h.forwarder.forward(env2, h.route, Exchange(env2))  # a second connection
        for r in (r1, r2):
            b"".join(r.response)
            r.close()
        assert len(up.connections) == 2
        status, _, body, _ = h.send("POST", data=b"x")
        assert (status, body) == (200, b"new")
        assert len(up.connections) == 3


def test_unreadable_ca_file_is_a_tls_error_not_a_500(harness, tmp_path):
    h = harness(["https://127.0.0.1:9"], caFile=str(tmp_path / "missing.pem"))
    error, exchange = h.fail()
    assert error.status == 502 and error.code == "upstream_tls_error"
    assert "missing.pem" in error.message and exchange.error_kind == "upstream_tls_error"


# -- small bodies, HEAD and no-body answers ------------------------------------------------


def test_small_gzip_body_is_relayed_byte_for_byte(harness):
    import gzip

    packed = gzip.compress(b"hello " * 50)
    answer = ok(packed, b"Content-Encoding: gzip\r\n")
    with RawUpstream([Reply(answer), Reply(ok(b"next"))]) as up:
        h = harness([up.url])
        status, _headers, body, exchange = h.send()
        assert (status, body) == (200, packed)  # never decoded
        assert exchange.status == 200 and exchange.response_bytes == len(packed)
        assert h.send()[2] == b"next" and len(up.connections) == 1  # pooled after


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    ],
)
def test_answers_without_a_body_keep_the_connection_in_step(harness, method, answer):
    with RawUpstream([Reply(answer), Reply(ok(b"second"))]) as up:
        h = harness([up.url])
        status, headers, body, exchange = h.send(method)
        assert body == b"" and status == exchange.status == int(answer[9:12])
        if method == "HEAD":
            assert dict(headers)["Content-Length"] == "1234"  # the length is kept
        assert h.send()[2] == b"second"
        assert len(up.connections) == 1  # the connection went back to the pool


def test_small_body_that_stalls_is_a_504_and_one_cut_short_a_502(harness):
    stalled = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcde"
    with RawUpstream([Reply(stalled, then="stall", stall=3)]) as up:
        error, exchange = harness([up.url], idleTimeout="300ms").fail()
        assert isinstance(error, UpstreamTimeout) and error.status == 504
        assert exchange.error_kind == "upstream_timeout" and exchange.status == 200
    with RawUpstream([Reply(stalled, then="close")]) as up:
        error, exchange = harness([up.url]).fail()
        assert type(error) is UpstreamError and error.status == 502
        assert exchange.error_kind == "body_interrupted"
        assert error.details["target"] == exchange.target


def test_body_of_exactly_the_small_size_is_read_whole(harness):
    from odin_gw.proxy.forwarder import SMALL_BODY

    body = b"s" * SMALL_BODY
    with RawUpstream([Reply(ok(body))]) as up:
        env = harness([up.url])
        e = env.environ()
        response = env.forwarder.forward(e, env.route, Exchange(e))
        try:
            assert isinstance(response.response, list)  # buffered, not streamed
            assert b"".join(response.response) == body
        finally:
            response.close()
