"""Compiled ``rules:`` (odin_gw/traffic/rules.py): matching semantics, lazy parsing,
path rewriting, header edits and direct answers."""

from __future__ import annotations

import pytest

from odin_gw.config import parse_config
from odin_gw.config.traffic import (
    DirectResponse,
    HeaderEdits,
    PathMatch,
    RateLimitConfig,
    RuleConfig,
    RuleMatch,
    ValueMatch,
)
from odin_gw.proxy.headers import OutboundHeaders
from odin_gw.traffic.rules import NO_RULES, RuleError, RuleSet, cookie_values, query_values


def environ(method="GET", query="", cookie=None, **headers):
    """A WSGI environ as gunicorn builds it: ``HTTP_*`` keys, repeats joined with ","."""
    env = {"REQUEST_METHOD": method, "PATH_INFO": "/", "QUERY_STRING": query}
    if cookie is not None:
        env["HTTP_COOKIE"] = cookie
    for name, value in headers.items():
        key = name.upper()
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        env[key] = ",".join(value) if isinstance(value, list) else value
    return env


class CountingEnviron(dict):
    """An environ that records every key read, to see what matching touches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def get(self, key, default=None):
        self.reads.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.reads.append(key)
        return super().__contains__(key)


def rule(index=0, methods=(), path=None, headers=(), query=(), cookies=(), **kw) -> RuleConfig:
    match = RuleMatch(
        methods=frozenset(methods),
        path=path,
        headers=tuple(headers),
        query=tuple(query),
        cookies=tuple(cookies),
    )
    kw.setdefault("group", f"g{index}")
    return RuleConfig(index=index, match=match, **kw)


def one(**kw):
    """A rule set of a single rule, and that rule."""
    rules = RuleSet.compile((rule(**kw),))
    return rules, rules.rules[0]


# -- the empty set and rule order ----------------------------------------------------------


def test_empty_rule_set_matches_nothing_and_reads_nothing():
    for rules in (NO_RULES, RuleSet.compile(())):
        env = CountingEnviron(environ(query="a=1", cookie="b=2", x_a="1"))
        assert not rules
        assert len(rules) == 0
        assert rules.match(env, "/anything") is None
        assert env.reads == []


def test_first_matching_rule_wins_in_order():
    rules = RuleSet.compile(
        (
            rule(0, path=PathMatch(prefix="/a/b")),
            rule(1, path=PathMatch(prefix="/a")),
            rule(2),  # no conditions: everything
        )
    )
    assert rules.match(environ(), "/a/b/c").index == 0
    assert rules.match(environ(), "/a/x").index == 1
    assert rules.match(environ(), "/zzz").group == "g2"


def test_no_rule_matches_gives_none():
    rules, _ = one(path=PathMatch(exact="/a"))
    assert rules.match(environ(), "/b") is None


def test_methods_are_exact_and_case_sensitive():
    rules, _ = one(methods={"GET", "POST"})
    assert rules.match(environ("GET"), "/") is not None
    assert rules.match(environ("POST"), "/") is not None
    assert rules.match(environ("HEAD"), "/") is None  # GET does not take HEAD
    assert rules.match(environ("get"), "/") is None


# -- path ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "hit"),
    [
        ("/beta", "/beta", True),
        ("/beta", "/beta/", True),
        ("/beta", "/beta/x/y", True),
        ("/beta", "/betax", False),
        ("/beta", "/bet", False),
        ("/beta", "/Beta/x", False),
        ("/beta/", "/beta", True),  # a trailing / in the prefix is ignored
        ("/beta/", "/beta/x", True),
        ("/beta/", "/betax", False),
        ("/a/b", "/a%2Fb/c", False),  # an encoded / is inside a segment
        ("/", "/", True),
        ("/", "/anything/at/all", True),
    ],
)
def test_path_prefix_matches_whole_segments(prefix, path, hit):
    rules, _ = one(path=PathMatch(prefix=prefix))
    assert (rules.match(environ(), path) is not None) is hit


@pytest.mark.parametrize(("path", "hit"), [("/a/b", True), ("/a/b/", False), ("/a", False)])
def test_path_exact(path, hit):
    rules, _ = one(path=PathMatch(exact="/a/b"))
    assert (rules.match(environ(), path) is not None) is hit


@pytest.mark.parametrize(
    ("path", "hit"),
    [("/users/42", True), ("/users/42/orders", False), ("/v1/users/42", False), ("/users/", False)],
)
def test_path_regex_is_a_full_match(path, hit):
    rules, _ = one(path=PathMatch(regex=r"/users/\d+"))
    assert (rules.match(environ(), path) is not None) is hit


@pytest.mark.parametrize("pattern", [r"(a)\1", r"/x(?=y)", r"(?<!a)b", "(unclosed"])
def test_regexes_are_re2_and_refused_with_the_rule_named(pattern):
    with pytest.raises(RuleError, match=r"rules\[3\].*RE2"):
        RuleSet.compile((rule(3, path=PathMatch(regex=pattern)),))
    with pytest.raises(RuleError, match=r"rules\[3\].*RE2"):
        RuleSet.compile((rule(3, headers=[ValueMatch("X-A", regex=pattern)]),))


# -- headers -------------------------------------------------------------------------------


def test_header_names_are_case_insensitive():
    rules, _ = one(headers=[ValueMatch("x-BETA", exact="1")])
    assert rules.match(environ(x_beta="1"), "/") is not None
    assert rules.match(environ(x_beta="2"), "/") is None
    assert rules.match(environ(), "/") is None


def test_content_type_and_length_are_found_where_wsgi_puts_them():
    rules, _ = one(
        headers=[
            ValueMatch("Content-Type", regex="application/json.*"),
            ValueMatch("Content-Length", present=True),
        ]
    )
    env = environ(CONTENT_TYPE="application/json; charset=utf-8", CONTENT_LENGTH="2")
    assert rules.match(env, "/") is not None
    assert rules.match(environ(CONTENT_TYPE="application/json"), "/") is None


def test_repeated_header_is_matched_as_the_joined_value():
    exact, _ = one(headers=[ValueMatch("X-A", exact="1")])
    regex, _ = one(headers=[ValueMatch("X-A", regex="1(,1)*")])
    twice = environ(x_a=["1", "1"])
    assert twice["HTTP_X_A"] == "1,1"
    assert exact.match(twice, "/") is None
    assert regex.match(twice, "/") is not None
    assert exact.match(environ(x_a="1"), "/") is not None


def test_header_present_and_absent():
    present, _ = one(headers=[ValueMatch("X-Trace", present=True)])
    absent, _ = one(headers=[ValueMatch("X-Block", present=False)])
    assert present.match(environ(x_trace=""), "/") is not None  # empty value is present
    assert present.match(environ(), "/") is None
    assert absent.match(environ(), "/") is not None
    assert absent.match(environ(x_block=""), "/") is None


def test_header_exact_is_case_sensitive_and_compares_utf8_bytes():
    rules, _ = one(headers=[ValueMatch("X-Who", exact="café")])
    sent = "café".encode().decode("latin-1")  # what gunicorn puts in the environ
    assert rules.match(environ(x_who=sent), "/") is not None
    assert rules.match(environ(x_who="CAFÉ".encode().decode("latin-1")), "/") is None
    assert rules.match(environ(x_who="café".encode("latin-1").decode("latin-1")), "/") is None


def test_header_regex_is_full_and_reads_utf8():
    rules, _ = one(headers=[ValueMatch("User-Agent", regex="curl/.*")])
    assert rules.match(environ(user_agent="curl/8.5.0"), "/") is not None
    assert rules.match(environ(user_agent="xcurl/8"), "/") is None
    accents, _ = one(headers=[ValueMatch("X-Who", regex="caf.")])
    assert accents.match(environ(x_who="café".encode().decode("latin-1")), "/") is not None
    assert accents.match(environ(x_who="caf\xff"), "/") is not None  # not UTF-8: U+FFFD


def test_header_names_with_underscore_are_refused():
    with pytest.raises(RuleError, match="gunicorn drops"):
        one(headers=[ValueMatch("X_Beta", present=True)])


def test_all_conditions_of_a_rule_must_hold():
    rules, _ = one(
        methods={"GET"},
        path=PathMatch(prefix="/beta"),
        headers=[ValueMatch("X-Beta", exact="1"), ValueMatch("X-Block", present=False)],
        query=[ValueMatch("debug", exact="1")],
        cookies=[ValueMatch("beta", present=True)],
    )
    full = dict(query="debug=1", cookie="beta=yes", x_beta="1")
    assert rules.match(environ(**full), "/beta/x") is not None
    assert rules.match(environ("POST", **full), "/beta/x") is None
    assert rules.match(environ(**full), "/other") is None
    assert rules.match(environ(**{**full, "x_beta": "0"}), "/beta/x") is None
    assert rules.match(environ(**full, x_block="1"), "/beta/x") is None
    assert rules.match(environ(**{**full, "query": "debug=2"}), "/beta/x") is None
    assert rules.match(environ(**{**full, "cookie": "other=1"}), "/beta/x") is None


# -- query ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "value"),
    [
        ("debug=1", "1"),
        ("debug", ""),
        ("debug=", ""),
        ("a=1&debug=2&debug=3", "2"),  # first occurrence wins
        ("debug=a%20b", "a b"),
        ("debug=a+b", "a b"),
        ("de%62ug=x", "x"),  # names are decoded too
        ("debug=1;x=2", "1;x=2"),  # only & separates
        ("debug=%E2%9C%93", "\u2713"),
        ("debug=" + "\u2713".encode().decode("latin-1"), "\u2713"),  # raw UTF-8 bytes
        ("debug=%ZZ", "%ZZ"),
        ("Debug=1", None),  # names are case-sensitive
        ("other=1", None),
        ("", None),
    ],
)
def test_query_values(query, value):
    assert query_values(query, frozenset({"debug"})).get("debug") == value


def test_query_conditions():
    present, _ = one(query=[ValueMatch("debug", present=True)])
    absent, _ = one(query=[ValueMatch("debug", present=False)])
    empty, _ = one(query=[ValueMatch("debug", exact="")])
    regex, _ = one(query=[ValueMatch("v", regex=r"\d+")])
    assert present.match(environ(query="debug"), "/") is not None
    assert present.match(environ(query="x=debug"), "/") is None
    assert absent.match(environ(query="x=1"), "/") is not None
    assert absent.match(environ(query="debug="), "/") is None
    assert empty.match(environ(query="debug"), "/") is not None
    assert empty.match(environ(query="debug=0"), "/") is None
    assert regex.match(environ(query="v=12"), "/") is not None
    assert regex.match(environ(query="v=12a"), "/") is None
    assert regex.match(environ(query="v=a&v=1"), "/") is None  # only the first counts


# -- cookies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("beta=1", "1"),
        ("a=x; beta=1; c=y", "1"),
        ("  beta =  1  ", "1"),
        ('beta="1"', "1"),
        ('beta="unterminated', '"unterminated'),
        ("beta=a=b", "a=b"),
        ("beta=", ""),
        ("beta=1; beta=2", "1"),  # first wins
        ("x;beta=1", "1"),
        ("beta", None),  # no "=": not a cookie pair
        ("=1; beta=2", "2"),
        (";;;", None),
        ("", None),
        ("\xff\xfe=\x00; beta=1", "1"),
        ("Beta=1", None),  # names are case-sensitive
        ("a=1,beta=2", None),  # two Cookie lines joined by gunicorn: only ; separates
        ("beta=caf" + "é".encode().decode("latin-1"), "café"),
    ],
)
def test_cookie_values_are_tolerant(header, value):
    assert cookie_values(header, frozenset({"beta"})).get("beta") == value


def test_cookie_conditions():
    present, _ = one(cookies=[ValueMatch("beta", present=True)])
    exact, _ = one(cookies=[ValueMatch("beta", exact="on")])
    regex, _ = one(cookies=[ValueMatch("beta", regex="o[nf]+")])
    assert present.match(environ(cookie="beta="), "/") is not None
    assert present.match(environ(), "/") is None
    assert exact.match(environ(cookie='x=1; beta="on"'), "/") is not None
    assert exact.match(environ(cookie="beta=off"), "/") is None
    assert regex.match(environ(cookie="beta=off"), "/") is not None
    assert regex.match(environ(cookie="beta=offx"), "/") is None


# -- lazy parsing --------------------------------------------------------------------------


def test_query_and_cookies_parsed_only_when_a_rule_gets_there_and_once():
    rules = RuleSet.compile(
        (
            rule(0, methods={"POST"}, query=[ValueMatch("a", exact="1")]),
            rule(1, query=[ValueMatch("a", exact="2")], cookies=[ValueMatch("c", exact="1")]),
            rule(2, query=[ValueMatch("b", present=True)], cookies=[ValueMatch("d", present=True)]),
            rule(3, query=[ValueMatch("a", present=True)], cookies=[ValueMatch("c", exact="9")]),
        )
    )
    # GET skips rule 0 on its method; rule 1 fails on the query; rule 2 needs both.
    env = CountingEnviron(environ(query="a=1&b", cookie="c=1; d=2"))
    assert rules.match(env, "/").index == 2
    assert env.reads.count("QUERY_STRING") == 1
    assert env.reads.count("HTTP_COOKIE") == 1
    # Rule 0 is the only one reached: the cookie header is never read.
    env = CountingEnviron(environ("POST", query="a=1", cookie="c=1"))
    assert rules.match(env, "/").index == 0
    assert env.reads.count("QUERY_STRING") == 1
    assert "HTTP_COOKIE" not in env.reads
    # A method failing everywhere reads neither.
    methods_only = RuleSet.compile(
        (rule(0, methods={"PUT"}, query=[ValueMatch("a", present=True)]),)
    )
    env = CountingEnviron(environ(query="a=1", cookie="c=1"))
    assert methods_only.match(env, "/") is None
    assert "QUERY_STRING" not in env.reads and "HTTP_COOKIE" not in env.reads


def test_rules_without_query_or_cookie_conditions_never_read_them():
    rules, _ = one(headers=[ValueMatch("X-A", present=False)])
    env = CountingEnviron(environ(query="a=1", cookie="c=1"))
    assert rules.match(env, "/") is not None
    assert "QUERY_STRING" not in env.reads and "HTTP_COOKIE" not in env.reads


# -- rewrite -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "raw", "out"),
    [
        # The Gateway API's ReplacePrefixMatch table.
        ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz", "/foo", "/xyz"),
        ("/foo", "/xyz", "/foo/", "/xyz/"),
        ("/foo", "/", "/foo/bar", "/bar"),
        ("/foo", "/", "/foo/", "/"),
        ("/foo", "/", "/foo", "/"),
        # The query is kept; encoded spellings of the prefix count.
        ("/api/users/beta", "/v2", "/api/users/beta/1?x=%20&y", "/v2/1?x=%20&y"),
        ("/api/users/beta", "/v2", "/api/users/beta?x=1", "/v2?x=1"),
        ("/api/users/beta", "/v2", "/api/%75sers/b%65ta/1", "/v2/1"),
        ("/", "/v2", "/a/b?q", "/v2/a/b?q"),
        ("/", "/", "/a", "/a"),
    ],
)
def test_rewrite_prefix(src, dst, raw, out):
    _, r = one(rewrite_prefix=(src, dst))
    assert r.rewrites
    assert r.try_rewrite(raw) == out
    assert r.rewrite(raw) == out


@pytest.mark.parametrize(
    "raw",
    [
        "/api/users/betax/1",  # whole segments only
        "/api/users/beta%2Fx",  # an encoded / does not end a segment
        "/api%2Fusers/beta",  # nor separate two
        "/api/users",
        "/api/Users/beta",
        "/other?/api/users/beta",
    ],
)
def test_rewrite_prefix_leaves_other_paths_unchanged(raw):
    _, r = one(rewrite_prefix=("/api/users/beta", "/v2"))
    assert r.try_rewrite(raw) is None
    assert r.rewrite(raw) == raw


def test_no_rewrite_prefix_leaves_the_path():
    _, r = one()
    assert not r.rewrites
    assert r.try_rewrite("/a?b") is None
    assert r.rewrite("/a?b") == "/a?b"


def test_rewrite_prefix_must_be_paths():
    with pytest.raises(RuleError, match=r"rules\[0\]\.rewritePrefix"):
        one(rewrite_prefix=("api", "/v2"))
    with pytest.raises(RuleError, match="no query"):
        one(rewrite_prefix=("/api", "/v2?x=1"))


# -- header edits --------------------------------------------------------------------------


def test_apply_request_removes_then_sets_whatever_the_case():
    _, r = one(
        request_headers=HeaderEdits(
            set=(("X-From", "odin"), ("X-Both", "set")),
            remove=("x-internal", "X-BOTH", "X-Absent"),
        )
    )
    headers = OutboundHeaders()
    headers["X-Internal"] = "secret"
    headers["x-from"] = "client"
    headers["X-Both"] = "client"
    headers["Accept"] = "*/*"
    r.apply_request(headers)
    assert headers == {"X-From": "odin", "X-Both": "set", "Accept": "*/*"}
    assert list(headers) == ["Accept", "X-From", "X-Both"]  # the rule's spelling is sent
    assert r.request_remove == ("x-internal", "x-both", "x-absent")
    assert r.request_remove_env == frozenset({"HTTP_X_INTERNAL", "HTTP_X_BOTH", "HTTP_X_ABSENT"})
    assert r.request_set == (("X-From", "odin"), ("X-Both", "set"))


def test_apply_response_drops_every_copy_then_appends_the_set():
    _, r = one(
        response_headers=HeaderEdits(
            set=(("X-Served-By", "v2"), ("Set-Cookie", "a=1")), remove=("server",)
        )
    )
    upstream = [
        ("Server", "nginx"),
        ("Set-Cookie", "x=1"),
        ("content-type", "text/html"),
        ("set-cookie", "y=2"),
        ("x-served-by", "v1"),
    ]
    assert r.apply_response(upstream) == [
        ("content-type", "text/html"),
        ("X-Served-By", "v2"),
        ("Set-Cookie", "a=1"),
    ]
    assert len(upstream) == 5  # the caller's list is left alone


def test_apply_response_without_edits_returns_the_same_list():
    _, r = one()
    upstream = [("A", "1")]
    assert r.apply_response(upstream) is upstream


@pytest.mark.parametrize(
    "name", ["Content-Length", "transfer-encoding", "Connection", "Keep-Alive", "Upgrade", "TE"]
)
def test_framing_and_hop_by_hop_headers_cannot_be_edited(name):
    for edits in (HeaderEdits(set=((name, "1"),)), HeaderEdits(remove=(name,))):
        with pytest.raises(RuleError, match=rf"rules\[0\]\.responseHeaders: {name}"):
            one(response_headers=edits)
        with pytest.raises(RuleError, match=rf"rules\[0\]\.requestHeaders: {name}"):
            one(request_headers=edits)


def test_host_is_not_a_rule_request_edit():
    with pytest.raises(RuleError, match="preserveHost"):
        one(request_headers=HeaderEdits(set=(("Host", "x"),)))


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\x00", "\u2713"])
def test_edit_values_must_be_sendable(value):
    with pytest.raises(RuleError, match="X-A contains"):
        one(request_headers=HeaderEdits(set=(("X-A", value),)))


# -- direct answers ------------------------------------------------------------------------


def test_direct_answer_is_ready_to_send():
    _, r = one(
        group=None,
        direct=DirectResponse(503, (("Retry-After", "120"),), "maintenance \u2713"),
        response_headers=HeaderEdits(set=(("X-Served-By", "odin"),)),
    )
    assert r.group is None
    assert r.direct.status == 503
    assert r.direct.body == "maintenance \u2713".encode()
    assert r.direct.headers == (
        ("Retry-After", "120"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("X-Served-By", "odin"),
    )


def test_direct_redirect_keeps_its_content_type_and_may_have_no_body():
    _, redirect = one(
        group=None, direct=DirectResponse(302, (("Location", "https://example.com/"),))
    )
    assert redirect.direct.headers == (("Location", "https://example.com/"),)
    assert redirect.direct.body == b""
    _, json_rule = one(
        group=None, direct=DirectResponse(200, (("content-type", "application/json"),), "{}")
    )
    assert json_rule.direct.headers == (("content-type", "application/json"),)


def test_direct_answers_that_cannot_be_sent_are_refused():
    with pytest.raises(RuleError, match="204 answer has no body"):
        one(group=None, direct=DirectResponse(204, (), "x"))
    with pytest.raises(RuleError, match=r"direct\.headers: Content-Length"):
        one(group=None, direct=DirectResponse(200, (("Content-Length", "3"),), "abc"))
    with pytest.raises(RuleError, match="sends nothing upstream"):
        one(group="v2", direct=DirectResponse(503))


# -- from the configuration ----------------------------------------------------------------

CONFIG = """
services:
  - name: users
    basePath: /api/users
    targets: [http://10.0.0.5:8080]
    groups:
      v2: {targets: [http://10.0.0.9:8080]}
    rules:
      - match: {path: {exact: /api/users/down}}
        direct: {status: 503, headers: {Retry-After: "120"}, body: maintenance}
      - match:
          methods: [GET, HEAD]
          path: {prefix: /api/users/beta}
          headers: [{name: X-Beta, exact: "1"}, {name: X-Trace, present: true},
                    {name: X-Block, absent: true}, {name: User-Agent, regex: "curl/.*"}]
          query: [{name: debug, exact: "1"}]
          cookies: [{name: beta, present: true}]
        group: v2
        rewritePrefix: {from: /api/users/beta, to: /v2}
        requestHeaders: {set: {X-Api-Key: s3cr3t-value}, remove: [X-Internal]}
        responseHeaders: {set: {X-Served-By: v2}, remove: [Server]}
        rateLimit: {requests: 10, per: second}
"""


def test_rules_from_the_configuration():
    rules = RuleSet.compile(parse_config(CONFIG).services[0].rules)
    assert [r.index for r in rules] == [0, 1]
    env = environ(query="debug=1", cookie="beta=1", x_beta="1", x_trace="t", user_agent="curl/8")
    hit = rules.match(env, "/api/users/beta/7")
    assert hit.index == 1 and hit.group == "v2"
    assert hit.rewrite("/api/users/beta/7?debug=1") == "/v2/7?debug=1"
    assert hit.rate_limit == RateLimitConfig(requests=10, period=1, per="second")
    assert rules.match(environ("HEAD"), "/api/users/down").direct.status == 503
    assert rules.match(env, "/api/users/other") is None


def test_admin_view_names_conditions_but_shows_no_values():
    rules = RuleSet.compile(parse_config(CONFIG).services[0].rules)
    view = rules.to_dict()
    assert view[1]["requestHeaders"] == {"set": ["X-Api-Key"], "remove": ["x-internal"]}
    assert view[1]["rewritePrefix"] == ["/api/users/beta", "/v2"]
    assert view[0]["direct"] == 503
    assert "s3cr3t" not in repr(view)
