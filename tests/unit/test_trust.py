"""The forwarding-trust rule (server.trustedProxies), nginx's real_ip_recursive."""

import ipaddress

import pytest

from odin_gw.proxy.trust import (
    ForwardingTrust,
    forwarded_for,
    forwarded_last,
    parse_address,
)


def trust(*cidrs: str) -> ForwardingTrust:
    return ForwardingTrust(ipaddress.ip_network(c) for c in cidrs)


def env(peer: str = "10.0.0.2", **headers: str) -> dict:
    out = {"REMOTE_ADDR": peer, "wsgi.url_scheme": "http"}
    for name, value in headers.items():
        out["HTTP_" + name.upper()] = value
    return out


def test_nothing_trusted_reads_nothing():
    # Not even REMOTE_ADDR: an environ without it must not matter.
    assert trust().decide({"HTTP_X_FORWARDED_FOR": "1.2.3.4"}) is None


def test_untrusted_peer_is_not_believed():
    assert trust("10.0.0.0/8").decide(env("192.0.2.1", x_forwarded_for="1.2.3.4")) is None


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4, 5.6.7.8", "5.6.7.8"),  # right-most untrusted, not the left-most
        ("1.2.3.4, 10.9.9.9", "1.2.3.4"),  # trusted hops skipped
        ("1.2.3.4,10.9.9.9 ,, 10.8.8.8", "1.2.3.4"),  # empty entries skipped
        ("10.1.1.1, 10.9.9.9", "10.1.1.1"),  # all trusted: the left-most
        ("1.2.3.4, junk, 10.9.9.9", "10.9.9.9"),  # stop at garbage
        ("junk", "10.0.0.2"),  # garbage right away: the peer
        ("1.2.3.4:5678", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_is_right_most_untrusted(xff, client):
    decided = trust("10.0.0.0/8").decide(env(x_forwarded_for=xff))
    assert decided is not None
    assert decided.client_addr == client
    assert decided.x_forwarded_for == f"{xff}, 10.0.0.2"


def test_trusted_peer_without_headers_is_the_client():
    decided = trust("10.0.0.0/8").decide(env())
    assert decided.client_addr == "10.0.0.2" and decided.x_forwarded_for == "10.0.0.2"
    assert decided.proto is None and decided.host is None


def test_proto_and_host_from_the_nearest_proxy():
    decided = trust("10.0.0.0/8").decide(
        env(x_forwarded_proto="http, HTTPS", x_forwarded_host="evil, public.example")
    )
    assert decided.proto == "https" and decided.host == "public.example"
    odd = trust("10.0.0.0/8").decide(env(x_forwarded_proto="gopher"))
    assert odd.proto is None  # the connection's scheme stands


def test_forwarded_header_when_no_x_forwarded_for():
    decided = trust("10.0.0.0/8").decide(
        env(forwarded='for=1.2.3.4;proto=http, for="[2001:db8::7]:80";proto=https;host=a.example')
    )
    assert decided.client_addr == "2001:db8::7"
    assert decided.proto == "https" and decided.host == "a.example"
    assert decided.x_forwarded_for == "1.2.3.4, [2001:db8::7]:80, 10.0.0.2"


def test_x_forwarded_for_wins_over_forwarded():
    decided = trust("10.0.0.0/8").decide(env(x_forwarded_for="1.2.3.4", forwarded="for=5.6.7.8"))
    assert decided.client_addr == "1.2.3.4"


def test_ipv4_mapped_peer_matches_ipv4_network():
    assert trust("127.0.0.0/8").decide(env("::ffff:127.0.0.1", x_forwarded_for="1.2.3.4"))


def test_ipv6_networks():
    t = trust("fd00::/8")
    assert t.decide(env("fd00::1", x_forwarded_for="2001:db8::1, fd00::2")).client_addr == (
        "2001:db8::1"
    )
    assert t.decide(env("2001:db8::9", x_forwarded_for="1.2.3.4")) is None


def test_peer_verdicts_are_cached_and_bounded():
    t = trust("10.0.0.0/8")
    for i in range(1500):
        t.decide(env(f"192.0.{i // 256}.{i % 256}"))
    assert len(t._cache) == 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ('"[::1]:80"', "::1"),
        ("[::1]", "::1"),
        ("unknown", None),
        ("_hidden", None),
        ("1.2.3.4:80:90", None),
        ("", None),
    ],
)
def test_parse_address(text, expected):
    addr = parse_address(text)
    assert (str(addr) if addr else None) == expected


def test_forwarded_parsing_respects_quotes():
    value = 'for="a,b;c";by=x, For=1.2.3.4;host="h;1"'
    assert forwarded_for(value) == ["a,b;c", "1.2.3.4"]
    assert forwarded_last(value) == {"for": "1.2.3.4", "host": "h;1"}


def test_only_the_nearest_proxys_word_counts_in_list_headers():
    decided = trust("10.0.0.0/8").decide(
        env(x_forwarded_proto="https, http, https", x_forwarded_host="a, b, c.example")
    )
    assert decided.proto == "https" and decided.host == "c.example"


def test_forwarded_supplies_what_x_forwarded_headers_leave_out():
    both = "for=1.1.1.1;proto=http;host=first, for=2.2.2.2;proto=https;host=second.example"
    # Proto from X-Forwarded-Proto, host from Forwarded's nearest element.
    decided = trust("10.0.0.0/8").decide(env(forwarded=both, x_forwarded_proto="http"))
    assert decided.proto == "http" and decided.host == "second.example"
    decided = trust("10.0.0.0/8").decide(env(forwarded=both, x_forwarded_host="h.example"))
    assert decided.proto == "https" and decided.host == "h.example"
    three = f"{both}, for=3.3.3.3;proto=http;host=third"
    assert forwarded_last(three) == {"for": "3.3.3.3", "proto": "http", "host": "third"}


def test_missing_peer_address_is_never_trusted():
    assert trust("0.0.0.0/0").decide({"HTTP_X_FORWARDED_FOR": "1.2.3.4"}) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:8080", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1", None),
        ("[]", None),
        ('"1.2.3.4"', "1.2.3.4"),
    ],
)
def test_parse_address_with_ports_and_brackets(text, expected):
    addr = parse_address(text)
    assert (str(addr) if addr else None) == expected


def test_forwarded_for_values_keep_what_follows_the_first_equals():
    assert forwarded_for('for="_a=b", for=1.2.3.4') == ["_a=b", "1.2.3.4"]
    assert forwarded_last("for=1.2.3.4;host=a=b") == {"for": "1.2.3.4", "host": "a=b"}
