"""Mesh route policies: compiling ServiceProfiles and Linkerd annotations, matching
requests, RE2 and Go syntax, and the forwarder applying them (raw-socket upstreams)."""

from __future__ import annotations

import json
import re

import pytest
from werkzeug.test import EnvironBuilder

from odin_gw.config.loader import build_config
from odin_gw.errors import GatewayError, UpstreamTimeout
from odin_gw.proxy.exchange import Exchange
from odin_gw.proxy.forwarder import Forwarder
from odin_gw.retry_budget import BudgetStore
from odin_gw.route_policy import (
    PolicyError,
    ServicePolicy,
    annotation_duration,
    compile_path_regex,
    go_duration,
    retry_conditions,
)
from tests.support.raw_upstream import RawUpstream, Reply
from tests.unit.test_forwarder import StubGateway

PROFILE = "books.shop.svc.cluster.local"


def text(spec=None, annotations=None, name=PROFILE) -> str:
    """A service's policy text as Kubernetes discovery writes it."""
    profile = {"name": name, "namespace": "shop", "spec": spec} if spec is not None else None
    doc = {"profile": profile, "annotations": annotations or {}}
    return json.dumps(doc, sort_keys=True)


def compiled(spec=None, annotations=None, **kw) -> ServicePolicy:
    return ServicePolicy.compile(text(spec, annotations), "books", BudgetStore(None), **kw)


ROUTES = [
    {"name": "GET /books/{id}", "condition": {"method": "GET", "pathRegex": r"/books/\d+"}},
    {"name": "any /books/...", "condition": {"pathRegex": "/books/.*"}, "timeout": "300ms"},
    {
        "name": "POST or PUT",
        "condition": {"any": [{"method": "post"}, {"method": "PUT"}]},
        "isRetryable": True,
    },
]


# -- matching --------------------------------------------------------------------------------


def test_first_matching_route_wins_in_profile_order():
    policy = compiled({"routes": ROUTES})
    assert policy.match("GET", "/books/42").name == "GET /books/{id}"
    assert policy.match("DELETE", "/books/42").name == "any /books/..."
    assert policy.match("POST", "/books/42").name == "any /books/..."
    assert policy.match("POST", "/authors").name == "POST or PUT"  # method upper-cased
    assert policy.match("GET", "/authors") is None  # no route: no policy at all


def test_path_regex_is_anchored_like_the_proxy_does_it():
    policy = compiled({"routes": [{"name": "r", "condition": {"pathRegex": r"/books/\d+"}}]})
    assert policy.match("GET", "/books/42") is not None
    assert policy.match("GET", "/books/42/reviews") is None
    assert policy.match("GET", "/v1/books/42") is None
    # "^" and "$" are added as text: an alternation binds them to its ends (as in Linkerd)
    regex = compile_path_regex("/a|/b")
    assert regex.search("/a-and-more") and regex.search("more/b") and not regex.search("/c")


def test_path_is_matched_as_sent_still_percent_encoded():
    policy = compiled({"routes": [{"name": "r", "condition": {"pathRegex": "/a b"}}]})
    assert policy.match("GET", "/a%20b") is None
    assert policy.match("GET", "/a b") is not None


def test_all_any_not_nest_and_several_fields_must_all_match():
    cond = {
        "all": [
            {"not": {"method": "DELETE"}},
            {"any": [{"pathRegex": "/a/.*"}, {"pathRegex": "/b/.*"}]},
        ],
        "method": "GET",  # and this too
    }
    policy = compiled({"routes": [{"name": "r", "condition": cond}]})
    assert policy.match("GET", "/a/1") is not None
    assert policy.match("GET", "/b/1") is not None
    assert policy.match("GET", "/c/1") is None
    assert policy.match("POST", "/a/1") is None
    assert compiled({"routes": [{"name": "r", "condition": {"any": []}}]}).match("GET", "/") is None
    assert compiled({"routes": [{"name": "r", "condition": {"all": []}}]}).match("GET", "/")


def test_not_excludes_by_method_and_by_path():
    by_method = compiled({"routes": [{"name": "r", "condition": {"not": {"method": "DELETE"}}}]})
    assert by_method.match("GET", "/x") is not None and by_method.match("DELETE", "/x") is None
    by_path = compiled({"routes": [{"name": "r", "condition": {"not": {"pathRegex": "/adm/.*"}}}]})
    assert by_path.match("GET", "/x") is not None and by_path.match("GET", "/adm/1") is None


@pytest.mark.parametrize(
    ("budget", "ok"),
    [
        ({"retryRatio": 1000, "minRetriesPerSecond": 0, "ttl": "1s"}, True),
        ({"retryRatio": 0.2, "minRetriesPerSecond": 2**31 - 1, "ttl": "60s"}, True),
        ({"retryRatio": 1000.5, "ttl": "10s"}, False),
        ({"retryRatio": -0.1, "ttl": "10s"}, False),
        ({"retryRatio": True, "ttl": "10s"}, False),
        ({"minRetriesPerSecond": 2**31, "ttl": "10s"}, False),
        ({"minRetriesPerSecond": 1.5, "ttl": "10s"}, False),
        ({"ttl": "999ms"}, False),
        ({"ttl": "61s"}, False),
        ({"retryRatio": 0.2}, False),
    ],
)
def test_retry_budget_bounds_as_the_proxy_takes_them(budget, ok):
    route = {"name": "a", "condition": {"method": "GET"}, "isRetryable": True}
    policy = compiled({"routes": [route], "retryBudget": budget})
    assert (policy.errors == []) is ok, policy.errors
    if not ok:
        assert "retryBudget" in policy.errors[0]


# -- what a route carries --------------------------------------------------------------------


def test_route_timeout_and_source():
    policy = compiled({"routes": ROUTES})
    route = policy.match("DELETE", "/books/1")
    assert route.timeout == 0.3
    assert route.source == f"serviceprofile shop/{PROFILE} route any /books/..."
    assert not route.retryable and route.budget is None
    assert policy.match("GET", "/books/1").timeout is None  # none given: none applied


def test_retryable_routes_retry_5xx_on_one_default_budget_per_profile():
    routes = [
        {"name": "a", "condition": {"method": "GET"}, "isRetryable": True},
        {"name": "b", "condition": {"method": "HEAD"}, "isRetryable": True},
    ]
    policy = compiled({"routes": routes})
    a, b = policy.match("GET", "/"), policy.match("HEAD", "/")
    assert a.retry_statuses == frozenset(range(500, 600))
    assert a.limit is None  # a ServiceProfile has no per-request limit: budget only
    assert a.budget is b.budget  # the proxy shares one budget among a profile's routes
    assert (a.budget.retry_ratio, a.budget.min_retries_per_second, a.budget.ttl) == (0.2, 10, 10)
    assert a.budget.key == f"serviceprofile:shop/{PROFILE}"


def test_retry_budget_from_the_profile():
    budget = {"retryRatio": 0.5, "minRetriesPerSecond": 2, "ttl": "30s"}
    route = {"name": "a", "condition": {"method": "GET"}, "isRetryable": True}
    got = compiled({"routes": [route], "retryBudget": budget}).match("GET", "/").budget
    assert (got.retry_ratio, got.min_retries_per_second, got.ttl) == (0.5, 2, 30)


def test_response_classes_decide_failures_first_match_wins_5xx_otherwise():
    classes = [
        {"condition": {"status": {"min": 503, "max": 503}}, "isFailure": False},
        {"condition": {"status": {"min": 500, "max": 504}}, "isFailure": True},
        {"condition": {"status": {"min": 429, "max": 429}}, "isFailure": True},
        {"condition": {"status": {"min": 550}}, "isFailure": False},  # 0 max: dropped
    ]
    route = {"name": "a", "condition": {"method": "GET"}, "isRetryable": True}
    route["responseClasses"] = classes
    statuses = compiled({"routes": [route]}).match("GET", "/").retry_statuses
    assert 503 not in statuses
    assert {500, 502, 504, 429, 550, 599} <= statuses
    assert 404 not in statuses


def test_response_classes_nest_default_to_not_failure_and_leave_5xx_failing():
    classes = [
        {"condition": {"status": {"min": 429, "max": 429}}, "isFailure": True},
        # all: 500..509 and not 501 -> not failures (isFailure absent: false)
        {
            "condition": {
                "all": [
                    {"status": {"min": 500, "max": 509}},
                    {"not": {"status": {"min": 501, "max": 501}}},
                ]
            }
        },
        {
            "condition": {
                "any": [{"status": {"min": 100, "max": 100}}, {"status": {"min": 418, "max": 418}}]
            },
            "isFailure": True,
        },
    ]
    route = {"name": "a", "condition": {"method": "GET"}, "isRetryable": True}
    route["responseClasses"] = classes
    statuses = compiled({"routes": [route]}).match("GET", "/").retry_statuses
    assert {429, 100, 418, 501, 510, 599} <= statuses  # 501 and 510+ fall to the 5xx rule
    assert not {500, 505, 509, 499, 404, 200} & statuses
    assert min(statuses) == 100 and max(statuses) == 599


@pytest.mark.parametrize(
    ("classes", "problem"),
    [
        ({"condition": {}}, "responseClasses: must be a list"),
        (["x"], "responseClasses[0]: must be an object"),
        ([{"isFailure": True}], "responseClasses[0].condition: a response class needs"),
        (
            [{"condition": {"status": {"min": 500}}, "isFailure": "yes"}],
            "responseClasses[0].isFailure: must be true or false",
        ),
        ([{"condition": {"status": 500}}], "responseClasses[0].condition.status: must be an"),
    ],
)
def test_bad_response_classes_are_named(classes, problem):
    route = {"name": "a", "condition": {"method": "GET"}, "responseClasses": classes}
    policy = compiled({"routes": [route]})
    assert len(policy.errors) == 1 and problem in policy.errors[0], policy.errors


def test_profile_wins_over_annotations_and_says_so():
    annotations = {"timeout.linkerd.io/request": "2s", "retry.linkerd.io/http": "5xx"}
    policy = compiled({"routes": ROUTES}, annotations)
    assert policy.source == f"serviceprofile shop/{PROFILE}"
    assert policy.match("GET", "/authors") is None
    assert any("annotations ignored" in n for n in policy.notes)


def test_profile_without_routes_leaves_the_annotations_in_force():
    policy = compiled({"retryBudget": DEFAULT_BUDGET}, {"timeout.linkerd.io/request": "2s"})
    assert policy.match("GET", "/x").timeout == 2.0
    assert policy.source == "annotations on Service books"


DEFAULT_BUDGET = {"retryRatio": 0.2, "minRetriesPerSecond": 10, "ttl": "10s"}


# -- annotations --------------------------------------------------------------------------


def test_annotations_apply_to_every_request_of_the_service():
    policy = compiled(
        None,
        {
            "timeout.linkerd.io/request": "2s",
            "retry.linkerd.io/http": "gateway-error,429,500-501",
            "retry.linkerd.io/limit": "3",
            "retry.linkerd.io/timeout": "300ms",
            "retry.linkerd.io/grpc": "unavailable",
        },
    )
    route = policy.match("POST", "/anything")
    assert route.timeout == 2.0 and route.limit == 3 and route.try_timeout == 0.3
    assert route.retry_statuses == {429, 500, 501, 502, 503, 504}
    assert route.budget is None and route.backoff == (0.025, 0.25)
    assert route.source == "annotations on Service books"
    assert any("retry.linkerd.io/grpc" in n for n in policy.notes)


def test_annotation_defaults_and_bad_values():
    only_http = compiled(None, {"retry.linkerd.io/http": "5xx"}).match("GET", "/")
    assert only_http.limit == 1 and only_http.timeout is None
    zero = compiled(None, {"retry.linkerd.io/http": "5xx", "retry.linkerd.io/limit": "0"})
    assert zero.match("GET", "/").limit == 1  # 0 reads as unset, as in the controller
    bad = compiled(None, {"timeout.linkerd.io/request": "1.5s", "retry.linkerd.io/http": "5xx"})
    assert bad.match("GET", "/").timeout is None
    assert bad.errors == [
        "annotation timeout.linkerd.io/request: '1.5s': fractional values are not supported; "
        "ignored"
    ]
    assert compiled(None, {"something/else": "x"}).match("GET", "/") is None


def test_namespace_of_the_service_is_named_when_discovery_gives_it():
    doc = {"profile": None, "annotations": {"timeout.linkerd.io/request": "1s"}}
    doc["service"] = {"namespace": "shop", "name": "books"}
    policy = ServicePolicy.compile(json.dumps(doc), "books")
    assert policy.source == "annotations on Service shop/books"


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("2s", 2), ("500ms", 0.5), ("1m", 60), ("2h", 7200), ("1d", 86400), ("0", 0), (" 3s ", 3)],
)
def test_annotation_durations(raw, seconds):
    assert annotation_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["1.5s", "5", "-1s", "1x", "", "1m30s"])
def test_annotation_durations_refused(raw):
    with pytest.raises(PolicyError):
        annotation_duration(raw)


def test_retry_conditions():
    assert retry_conditions("5xx") == frozenset(range(500, 600))
    assert retry_conditions("gateway-error, 429") == {502, 503, 504, 429}
    for bad in ("4xx", "600", "504-500", "abc", ""):
        with pytest.raises(PolicyError):
            retry_conditions(bad)


# -- Go and RE2 syntax ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("300ms", 0.3), ("1.5s", 1.5), ("1m30s", 90), ("1h", 3600), (".5s", 0.5), ("0", 0)],
)
def test_go_durations(raw, seconds):
    assert go_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["10", "1x", "", "s", "1h-5m", 5])
def test_go_durations_refused(raw):
    with pytest.raises(PolicyError):
        go_duration(raw)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        (r"/x\z", "/x", "/x/"),
        ("/[[:digit:]]+", "/42", "/4a"),
        (r"\Q/a.b\E/c", "/a.b/c", "/axb/c"),
        (r"/(?P<id>\d+)", "/7", "/x"),
        ("/a(?i)b|/c", "/aB", "/Ab"),
        (r"/\x{41}", "/A", "/a"),
        (r"/\pL+", "/\u00e9t\u00e9", "/1"),
    ],
)
def test_re2_syntax_as_the_proxy_reads_it(pattern, matches, misses):
    regex = compile_path_regex(pattern)
    assert regex.search(matches) and not regex.search(misses)


def test_flags_set_mid_group_last_to_its_end_across_alternatives():
    regex = compile_path_regex("(/a(?i)b|/c)/d")
    assert regex.search("/aB/d") and regex.search("/c/d")
    assert not regex.search("/Ab/d") and not regex.search("/c/D")


def test_matching_time_is_linear_where_a_backtracking_engine_explodes():
    # (a+)+$ against "aaa...!" takes exponential time in Python's re; RE2 is linear.
    regex = compile_path_regex("/(a+)+")
    assert regex.search("/" + "a" * 100_000 + "!") is None


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "invalid escape sequence"),
        ("(?=a)", "invalid perl operator"),
        ("(?<!a)b", "invalid perl operator"),
        ("a**", "bad repetition operator"),
        ("a{1001}", "invalid repetition size"),
        ("[[:^alphax:]]", "invalid character class range"),
        ("(a", "missing )"),
        ("[a", "missing ]"),
    ],
)
def test_what_re2_does_not_take_is_refused_with_its_reason(pattern, why):
    with pytest.raises(PolicyError, match=re.escape(why)):
        compile_path_regex(pattern)


# -- profiles that do not parse ----------------------------------------------------------------


def test_a_profile_that_does_not_parse_is_ignored_and_says_where():
    routes = [*ROUTES[:2], {"name": "bad", "condition": {"pathRegex": "/x/(?=y)"}}]
    policy = compiled({"routes": routes}, {"timeout.linkerd.io/request": "5s"})
    assert policy.errors == [
        f"ServiceProfile shop/{PROFILE}: routes[2].condition.pathRegex: invalid regex "
        "'/x/(?=y)': invalid perl operator: (?=; the profile is ignored"
    ]
    # as with no profile: the annotations apply, no route of the profile does
    assert policy.match("GET", "/books/1").timeout == 5.0
    assert policy.describe()["errors"] == policy.errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"routes": [{"condition": {"method": "GET"}}]}, "routes[0].name: a route needs a name"),
        ({"routes": [{"name": "r"}]}, "routes[0].condition: a route needs a condition"),
        ({"routes": [{"name": "r", "condition": {}}]}, "a request match must have a field set"),
        ({"routes": [{"name": "r", "condition": {"path": "/"}}]}, "unknown field 'path'"),
        (
            {"routes": [{"name": "r", "condition": {"method": "GET"}, "timeout": "1x"}]},
            "routes[0].timeout: unknown unit",
        ),
        ({"retryBudget": {"retryRatio": 0.2, "minRetriesPerSecond": 1}}, "retryBudget.ttl"),
        ({"retryBudget": {**DEFAULT_BUDGET, "ttl": "2m"}}, "from 1s to 60s"),
        ({"routes": "x"}, "routes: must be a list"),
        ({"routes": [{"name": "r", "condition": {"all": [None]}}]}, 'null condition "all"'),
    ],
)
def test_profile_errors_name_the_field(spec, message):
    policy = compiled(spec)
    assert len(policy.errors) == 1 and message in policy.errors[0], policy.errors
    assert policy.routes == () and policy.match("GET", "/") is None


def test_text_that_is_not_json_is_reported():
    policy = ServicePolicy.compile("{not json", "books")
    assert policy.errors and policy.match("GET", "/") is None


def test_describe_lists_routes_with_condition_as_given():
    policy = compiled({"routes": ROUTES})
    doc = policy.describe()
    assert doc["source"] == f"serviceprofile shop/{PROFILE}"
    assert [r["name"] for r in doc["routes"]] == [r["name"] for r in ROUTES]
    first, _, third = doc["routes"]
    assert first["condition"] == ROUTES[0]["condition"] and first["retryable"] is False
    assert third["retryable"] is True and third["retryOn"] == ["500-599"]
    assert third["budget"]["retryRatio"] == 0.2 and third["budget"]["balance"] == 100
    assert doc["errors"] == [] and doc["annotations"] == {}


# -- the forwarder applying a policy ------------------------------------------------------------


def answer(status: int, body: bytes = b"", extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 500: b"Internal Server Error", 503: b"Unavailable"}.get(status, b"X")
    head = b"HTTP/1.1 %d %b\r\nContent-Length: %d\r\n%b\r\n" % (status, reason, len(body), extra)
    return head + body


class Harness:
    def __init__(self, url: str, policy_text: str, store: BudgetStore, **service) -> None:
        svc = {"name": "books", "basePath": "/", "targets": [url], "retries": 0, **service}
        self.gateway = StubGateway(build_config({"services": [svc]}))
        self.route = self.gateway.routes.routes[0]
        self.forwarder = Forwarder(self.gateway)
        self.policy = ServicePolicy.compile(policy_text, "books", store)
        self.forwarder.use_policies({"books": self.policy})

    def send(self, method="GET", path="/books/1", data=None):
        env = EnvironBuilder(path=path, method=method, data=data).get_environ()
        env["RAW_URI"] = path
        exchange = Exchange(env)
        response = self.forwarder.forward(env, self.route, exchange)
        try:
            body = b"".join(response.response)
        finally:
            response.close()
        return response.status_code, body, exchange

    def fail(self, method="GET", path="/books/1"):
        env = EnvironBuilder(path=path, method=method).get_environ()
        env["RAW_URI"] = path
        exchange = Exchange(env)
        with pytest.raises(GatewayError) as info:
            self.forwarder.forward(env, self.route, exchange)
        return info.value, exchange


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(url, policy_text, store=None, **service) -> Harness:
        h = Harness(url, policy_text, store or BudgetStore(None), **service)
        made.append(h)
        return h

    yield make
    for h in made:
        h.gateway.session.close()


RETRYABLE = {"routes": [{"name": "all", "condition": {"pathRegex": "/.*"}, "isRetryable": True}]}


def test_failed_answer_is_retried_and_its_connection_reused(harness):
    script = [Reply(answer(500, b"boom")), Reply(answer(200, b"fine"))]
    with RawUpstream(script) as up:
        h = harness(up.url, text(RETRYABLE))
        status, body, exchange = h.send()
        assert (status, body, exchange.retries) == (200, b"fine", 1)
        assert len(up.connections) == 1 and len(up.requests) == 2  # the body was drained


def test_a_small_post_body_is_replayed(harness):
    script = [Reply(answer(503)), Reply(answer(200))]
    with RawUpstream(script) as up:
        h = harness(up.url, text(RETRYABLE))
        status, _, _ = h.send("POST", data=b"x" * 1000)
        assert status == 200
        assert [r.body for r in up.requests] == [b"x" * 1000] * 2


def test_a_body_over_64_kib_is_never_retried(harness):
    with RawUpstream([Reply(answer(500))], default=[Reply(answer(200))]) as up:
        h = harness(up.url, text(RETRYABLE))
        status, _, exchange = h.send("POST", data=b"x" * (64 * 1024 + 1))
        assert (status, exchange.retries, len(up.requests)) == (500, 0, 1)


def test_budget_spent_relays_the_last_failed_answer(harness):
    budget = {"retryRatio": 0.0, "minRetriesPerSecond": 1, "ttl": "2s"}  # 2 retries in all
    spec = {**RETRYABLE, "retryBudget": budget}
    with RawUpstream([Reply(answer(500, b"no"))] * 4) as up:
        h = harness(up.url, text(spec))
        status, body, exchange = h.send()
        assert (status, body, exchange.retries) == (500, b"no", 2)
        status, _, exchange = h.send()
        assert (status, exchange.retries) == (500, 0)
        assert len(up.requests) == 4


def test_annotation_limit_caps_retries_per_request(harness):
    annotations = {"retry.linkerd.io/http": "500", "retry.linkerd.io/limit": "2"}
    with RawUpstream([Reply(answer(500))] * 3) as up:
        h = harness(up.url, text(None, annotations))
        status, _, exchange = h.send()
        assert (status, exchange.retries, len(up.requests)) == (500, 2, 3)


def test_statuses_not_named_are_not_retried(harness):
    annotations = {"retry.linkerd.io/http": "gateway-error"}
    with RawUpstream([Reply(answer(500))]) as up:
        h = harness(up.url, text(None, annotations))
        assert h.send()[0] == 500 and len(up.requests) == 1


def test_a_chunked_failed_answer_is_not_read_its_connection_is_closed(harness):
    chunked = b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    with RawUpstream([Reply(chunked)], [Reply(answer(200))]) as up:
        h = harness(up.url, text(RETRYABLE))
        assert h.send()[0] == 200
        assert len(up.connections) == 2


def test_profile_timeout_is_the_deadline_and_named_in_the_error(harness):
    spec = {"routes": [{"name": "slow", "condition": {"method": "GET"}, "timeout": "200ms"}]}
    with RawUpstream([Reply(answer(200), delay=2.0)]) as up:
        h = harness(up.url, text(spec), timeout="10s")
        error, _ = h.fail()
        assert isinstance(error, UpstreamTimeout) and error.status == 504
        assert "within 0.2s (serviceprofile shop/" in error.message
        assert "route slow" in error.message


def test_the_services_own_shorter_timeout_still_wins(harness):
    spec = {"routes": [{"name": "slow", "condition": {"method": "GET"}, "timeout": "10s"}]}
    with RawUpstream([Reply(answer(200), delay=2.0)]) as up:
        error, _ = harness(up.url, text(spec), timeout="200ms").fail()
        assert "within 0.2s" in error.message and "serviceprofile" not in error.message


def test_per_try_timeout_abandons_the_attempt_and_retries(harness):
    annotations = {"retry.linkerd.io/timeout": "200ms", "retry.linkerd.io/limit": "1"}
    script = [Reply(answer(200, b"late"), delay=2.0)]
    with RawUpstream(script, [Reply(answer(200, b"quick"))]) as up:
        h = harness(up.url, text(None, annotations), timeout="10s")
        status, body, exchange = h.send()
        assert (status, body, exchange.retries) == (200, b"quick", 1)


def test_the_last_attempt_has_no_per_try_timeout(harness):
    annotations = {"retry.linkerd.io/timeout": "100ms", "retry.linkerd.io/limit": "1"}
    slow = [Reply(answer(200, b"slow but whole"), delay=0.4)]
    with RawUpstream(slow) as up:
        h = harness(up.url, text(None, annotations), timeout="10s")
        status, body, exchange = h.send()
        assert (status, body, exchange.retries) == (200, b"slow but whole", 1)


def test_every_request_of_a_retryable_route_deposits(harness):
    spec = {**RETRYABLE, "retryBudget": {"retryRatio": 0.5, "minRetriesPerSecond": 0, "ttl": "10s"}}
    with RawUpstream([Reply(answer(200))] * 4) as up:
        h = harness(up.url, text(spec))
        for _ in range(4):
            assert h.send()[0] == 200
        budget = h.policy.match("GET", "/").budget
        assert budget.counts() == (4, 0) and budget.balance() == 2


def test_routes_without_a_policy_are_untouched(harness):
    spec = {"routes": [{"name": "only posts", "condition": {"method": "POST"}, "timeout": "1ms"}]}
    with RawUpstream([Reply(answer(500))]) as up:
        status, _, exchange = harness(up.url, text(spec)).send("GET")
        assert (status, exchange.retries) == (500, 0)


def test_a_profile_discovery_could_not_read_carries_its_error():
    entry = {"name": PROFILE, "namespace": "shop", "spec": None}
    entry["error"] = f"ServiceProfile shop/{PROFILE} has no spec object (spec is list)"
    doc = {"profile": entry, "annotations": {"timeout.linkerd.io/request": "1s"}}
    policy = ServicePolicy.compile(json.dumps(doc), "books", service_ref="shop/books")
    assert policy.errors == [f"{entry['error']}; the profile is ignored"]
    assert policy.match("GET", "/").source == "annotations on Service shop/books"


# -- the gateway's own policy under the mesh's ----------------------------------------------


def own_policy(**service):
    from odin_gw.config import parse_config
    from odin_gw.route_policy import config_policy

    svc = {"name": "books", "basePath": "/books", "targets": ["http://127.0.0.1:9"]}
    svc.update(service)
    import yaml

    config = parse_config(yaml.safe_dump({"services": [svc]}))
    return config_policy(config.services[0], BudgetStore(None))


def test_config_policy_is_none_when_nothing_would_use_it():
    assert own_policy(retries=0) is None
    assert own_policy(retries=2, retryPolicy={"budget": False}) is None
    base = own_policy(retries=2)  # resets are retried: the default budget bounds them
    assert base.source == "config" and base.budget is not None and not base.retryable
    assert base.budget.to_dict()["key"] == "config:books"


def test_config_policy_carries_retry_on_try_timeout_backoff_and_limit():
    base = own_policy(
        retries=3,
        tryTimeout="250ms",
        retryPolicy={"retryOn": [503], "backoff": {"base": "10ms", "max": "40ms"}},
    )
    assert base.retry_statuses == frozenset({503}) and base.limit == 3 and base.shared_limit
    assert (base.try_timeout, base.backoff) == (0.25, (0.01, 0.04))
    doc = base.to_dict()
    assert doc["origins"] == {
        "tryTimeout": "config",
        "budget": "config",
        "retryOn": "config",
        "limit": "config",
        "backoff": "config",
    }


def test_a_mesh_route_over_the_config_keeps_its_values_and_names_their_origin():
    base = own_policy(retries=2, tryTimeout="1s", retryPolicy={"retryOn": [503]})
    policy = compiled({"routes": ROUTES}).with_base(base)
    # The profile's timeout route (not retryable): its timeout, the config's retries.
    timed = policy.match("GET", "/books/x")
    assert timed.timeout == 0.3 and timed.retry_statuses == frozenset({503})
    assert timed.try_timeout == 1.0 and timed.shared_limit
    origins = dict(timed.origins)
    assert origins["timeout"].startswith("serviceprofile shop/") and origins["retryOn"] == "config"
    assert origins["tryTimeout"] == "config"
    # A retryable profile route keeps its own retry values and budget, as a unit.
    retry = policy.match("POST", "/orders")
    assert retry.retry_statuses == frozenset(range(500, 600)) and retry.limit is None
    assert not retry.shared_limit and retry.budget is not base.budget
    assert dict(retry.origins)["retryOn"].startswith("serviceprofile")
    # Nothing of the profile matches: the config's own policy.
    assert policy.match("DELETE", "/elsewhere") is base
    assert policy.describe()["source"].startswith("serviceprofile")
