"""Weighted splits (odin_gw/traffic/split.py): the draw, sticky header and cookie, the
override header, and the admin view."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from odin_gw.config import parse_config
from odin_gw.config.traffic import SplitConfig
from odin_gw.traffic.split import Choice, Split, SplitError

ROOT = Path(__file__).resolve().parents[2]
CANARY = SplitConfig(weights=(("default", 90), ("canary", 10)))


def seeded(seed=7):
    return random.Random(seed).random


def never():
    raise AssertionError("no random draw expected")


def draws(split: Split, n: int, environ=None) -> Counter:
    return Counter(split.choose(dict(environ or {})).group for _ in range(n))


# -- the weighted draw ---------------------------------------------------------------------


def test_ninety_ten_holds_over_twenty_thousand_draws():
    split = Split.compile(CANARY, "users", random=seeded())
    counts = draws(split, 20_000)
    # sd of the canary count is sqrt(20000 * 0.09) ~ 42: +-250 is ~6 sd.
    assert 1750 <= counts["canary"] <= 2250
    assert counts["default"] + counts["canary"] == 20_000


def test_three_groups_share_by_weight():
    config = SplitConfig(weights=(("a", 5), ("b", 3), ("c", 2)))
    counts = draws(Split.compile(config, "s", random=seeded(3)), 20_000)
    for group, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[group] / 20_000 - share) < 0.015


@pytest.mark.parametrize(
    "weights", [(("off", 0), ("on", 1)), (("on", 1), ("off", 0)), (("a", 1), ("off", 0), ("b", 1))]
)
def test_weight_zero_is_never_drawn(weights):
    counts = draws(Split.compile(SplitConfig(weights=weights), "s", random=seeded()), 5000)
    assert counts["off"] == 0
    assert sum(counts.values()) == 5000


@pytest.mark.parametrize(
    ("u", "group"),
    [
        (0.0, "default"),
        (0.8999999, "default"),
        (0.9, "canary"),
        (1 - 2**-53, "canary"),  # the largest float random() gives
    ],
)
def test_draw_boundaries_are_exact(u, group):
    choice = Split.compile(CANARY, "s", random=lambda: u).choose({})
    assert choice == Choice(group, None, "weight")


# -- sticky header -------------------------------------------------------------------------


def sticky_header(weights=(("default", 90), ("canary", 10)), service="users", rnd=never):
    config = SplitConfig(weights=weights, sticky_header="X-User-Id")
    return Split.compile(config, service, random=rnd)


def test_sticky_header_keeps_a_client_on_one_side_without_drawing():
    split = sticky_header()
    for user in ("alice", "bob", "42", "x" * 300):
        first = split.choose({"HTTP_X_USER_ID": user})
        assert first.reason == "sticky" and first.set_cookie is None
        assert all(split.choose({"HTTP_X_USER_ID": user}) == first for _ in range(20))


def test_sticky_header_spreads_clients_by_weight():
    split = sticky_header()
    counts = Counter(split.choose({"HTTP_X_USER_ID": f"user-{i}"}).group for i in range(20_000))
    assert abs(counts["canary"] / 20_000 - 0.10) < 0.015


def test_missing_or_empty_sticky_header_falls_to_the_draw():
    split = sticky_header(rnd=lambda: 0.95)
    assert split.choose({}) == Choice("canary", None, "weight")
    assert split.choose({"HTTP_X_USER_ID": ""}) == Choice("canary", None, "weight")


def test_moving_weight_moves_only_the_clients_in_between():
    before = sticky_header((("default", 90), ("canary", 10)))
    after = sticky_header((("default", 80), ("canary", 20)))
    users = [f"u{i}" for i in range(5000)]
    was = {u: before.choose({"HTTP_X_USER_ID": u}).group for u in users}
    now = {u: after.choose({"HTTP_X_USER_ID": u}).group for u in users}
    assert all(now[u] == "canary" for u in users if was[u] == "canary")
    moved = sum(1 for u in users if was[u] != now[u])
    assert 0.07 < moved / len(users) < 0.13


def test_sticky_header_sides_differ_between_services():
    users = [f"u{i}" for i in range(1000)]
    weights = (("a", 1), ("b", 1))
    one = sticky_header(weights, "users")
    two = sticky_header(weights, "orders")
    differ = sum(
        one.choose({"HTTP_X_USER_ID": u}) != two.choose({"HTTP_X_USER_ID": u}) for u in users
    )
    assert 350 < differ < 650  # independent halves: about 500


def test_sticky_header_is_the_same_in_another_process():
    users = [f"user-{i}" for i in range(300)] + ["caf\xe9", "\u2713"]
    here = [sticky_header().choose({"HTTP_X_USER_ID": u}).group for u in users]
    script = (
        "import json, sys\n"
        "from odin_gw.config.traffic import SplitConfig\n"
        "from odin_gw.traffic.split import Split\n"
        "c = SplitConfig(weights=(('default', 90), ('canary', 10)), sticky_header='X-User-Id')\n"
        "s = Split.compile(c, 'users')\n"
        "users = json.load(sys.stdin)\n"
        "print(json.dumps([s.choose({'HTTP_X_USER_ID': u}).group for u in users]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(users),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == here
    assert "canary" in here and "default" in here


# -- sticky cookie -------------------------------------------------------------------------


def sticky_cookie(weights=(("default", 90), ("canary", 10)), rnd=None, **kw):
    config = SplitConfig(weights=weights, sticky_cookie="odin-canary")
    return Split.compile(config, "users", random=rnd or seeded(), **kw)


def test_first_request_gets_a_cookie_pinning_its_side():
    split = sticky_cookie(rnd=lambda: 0.95, path="/api/users")
    assert split.choose({}) == Choice(
        "canary",
        "odin-canary=canary; Path=/api/users; Max-Age=86400; HttpOnly; SameSite=Lax",
        "weight",
    )
    secure = sticky_cookie(rnd=lambda: 0.1, max_age=3600, secure=True)
    assert secure.choose({}).set_cookie == (
        "odin-canary=default; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Secure"
    )


def test_clients_returning_the_cookie_stay_on_their_side():
    split = sticky_cookie(rnd=seeded(11))
    sides = Counter()
    for _ in range(500):
        first = split.choose({})
        cookie = first.set_cookie.split(";", 1)[0]
        sides[first.group] += 1
        for _ in range(10):
            again = split.choose({"HTTP_COOKIE": f"session=abc; {cookie}"})
            assert again == Choice(first.group, None, "sticky")
    assert sides["canary"] > 0 and sides["default"] > 0


def test_cookie_naming_no_current_group_is_chosen_again():
    split = sticky_cookie((("default", 100), ("canary", 0)), rnd=lambda: 0.5)
    for cookie in ("odin-canary=canary", "odin-canary=gone", "odin-canary=", "odin-canary=Default"):
        choice = split.choose({"HTTP_COOKIE": cookie})
        assert choice.group == "default" and choice.reason == "weight"
        assert choice.set_cookie.startswith("odin-canary=default;")


@pytest.mark.parametrize(
    "header", ["odin-canary", ";;", '"odin-canary=canary', "\xff\xfe", "odin-canary=canary,x=1"]
)
def test_malformed_cookie_headers_are_a_first_visit(header):
    choice = sticky_cookie(rnd=lambda: 0.1).choose({"HTTP_COOKIE": header})
    assert choice.reason == "weight" and choice.set_cookie is not None


def test_quoted_cookie_value_is_read():
    split = sticky_cookie(rnd=never)
    assert split.choose({"HTTP_COOKIE": 'odin-canary="canary"'}).group == "canary"


# -- override ------------------------------------------------------------------------------


def overridden(rnd=never, **kw):
    config = SplitConfig(
        weights=(("default", 100), ("canary", 0)),
        override_header="X-Canary",
        override_values=(("always", "canary"), ("never", "default"), ("v2", "mirror")),
        **kw,
    )
    return Split.compile(config, "users", random=rnd)


@pytest.mark.parametrize(
    ("value", "group"),
    [
        ("always", "canary"),  # weight 0 yet forced
        ("  ALWAYS ", "canary"),
        ("Never", "default"),
        ("canary", "canary"),  # a group's own name
        ("CANARY", "canary"),
        ("v2", "mirror"),  # a group outside the weights, named by a value
    ],
)
def test_override_forces_a_side(value, group):
    assert overridden().choose({"HTTP_X_CANARY": value}) == Choice(group, None, "override")


@pytest.mark.parametrize("value", ["", "sometimes", "mirror"])
def test_unknown_override_values_are_ignored(value):
    split = overridden(rnd=lambda: 0.5)
    assert split.choose({"HTTP_X_CANARY": value}) == Choice("default", None, "weight")


def test_override_wins_over_stickiness_and_sets_no_cookie():
    split = overridden(sticky_cookie="odin-canary")
    choice = split.choose({"HTTP_X_CANARY": "always", "HTTP_COOKIE": "odin-canary=default"})
    assert choice == Choice("canary", None, "override")


# -- compiling and the admin view ----------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kw", "message"),
    [
        (SplitConfig(weights=()), {}, "at least one group"),
        (SplitConfig(weights=(("a", 1), ("a", 2))), {}, "appears twice"),
        (SplitConfig(weights=(("a", 0), ("b", 0))), {}, "add up to 0"),
        (SplitConfig(weights=(("a", -1), ("b", 2))), {}, "whole number"),
        (SplitConfig(weights=(("a;b", 1),)), {}, "usable group name"),
        (
            SplitConfig(weights=(("a", 1),), sticky_cookie="c", sticky_header="X-U"),
            {},
            "one of cookie, header",
        ),
        (SplitConfig(weights=(("a", 1),), sticky_header="X_User"), {}, "gunicorn drops"),
        (SplitConfig(weights=(("a", 1),), override_header="X Canary"), {}, "header name"),
        (SplitConfig(weights=(("a", 1),), sticky_cookie="a=b"), {}, "cookie name"),
        (SplitConfig(weights=(("a", 1),), sticky_cookie="c"), {"path": "x"}, "cookie path"),
        (SplitConfig(weights=(("a", 1),), sticky_cookie="c"), {"path": "/a;b"}, "cookie path"),
        (SplitConfig(weights=(("a", 1),)), {"max_age": 0}, "max age"),
    ],
)
def test_bad_splits_are_refused_with_the_service_named(config, kw, message):
    with pytest.raises(SplitError, match=f"service 'users': split: .*{message}"):
        Split.compile(config, "users", **kw)


CONFIG = """
services:
  - name: users
    basePath: /api/users
    targets: [http://10.0.0.5:8080]
    groups:
      canary: {meshService: users-canary}
    split:
      groups: [{group: default, weight: 90}, {group: canary, weight: 10}]
      sticky: {cookie: odin-canary}
      override: {header: X-Canary, values: {s3cr3t-pass: canary, never: default}}
"""


def test_split_from_the_configuration_and_its_admin_view():
    svc = parse_config(CONFIG).services[0]
    split = Split.compile(svc.split, svc.name, path=svc.base_path, random=lambda: 0.95)
    assert split.groups == ("default", "canary") and split.weights == (90, 10)
    assert split.choose({"HTTP_X_CANARY": "S3CR3T-PASS"}).reason == "override"
    assert split.choose({}).set_cookie.startswith("odin-canary=canary; Path=/api/users;")
    view = split.to_dict()
    assert view["groups"] == [
        {"group": "default", "weight": 90, "percent": 90.0},
        {"group": "canary", "weight": 10, "percent": 10.0},
    ]
    assert view["sticky"] == {"cookie": "odin-canary"}
    assert view["override"] == {"header": "X-Canary", "groups": ["canary", "default"]}
    assert "s3cr3t" not in json.dumps(view)


# -- edges of compiling, stickiness and the admin view -------------------------------------------


@pytest.mark.parametrize("weight", [True, 2.5, "3"])
def test_a_weight_that_is_not_a_whole_number_is_refused(weight):
    config = SplitConfig(weights=(("a", 1), ("b", weight)))
    with pytest.raises(SplitError, match="weight of 'b' must be a whole number"):
        Split.compile(config, "users")


@pytest.mark.parametrize("cookie", ["odin canary", "odin;canary", "odin\tcanary"])
def test_a_cookie_name_that_is_not_a_token_is_refused(cookie):
    config = SplitConfig(weights=(("a", 1),), sticky_cookie=cookie)
    with pytest.raises(SplitError, match="not a valid cookie name"):
        Split.compile(config, "users")


def test_an_override_value_naming_no_group_is_refused_by_value():
    config = SplitConfig(
        weights=(("a", 1),), override_header="X-Canary", override_values=(("always", ""),)
    )
    with pytest.raises(SplitError, match="override value 'always' names no group"):
        Split.compile(config, "users")


def test_any_path_and_a_max_age_of_one_second_make_a_cookie():
    split = sticky_cookie(rnd=lambda: 0.95, path="/api/X-Users", max_age=1)
    assert split.cookie_path == "/api/X-Users"
    assert split.choose({}).set_cookie == (
        "odin-canary=canary; Path=/api/X-Users; Max-Age=1; HttpOnly; SameSite=Lax"
    )


def test_a_cookie_naming_a_group_of_weight_one_keeps_it():
    split = sticky_cookie((("a", 1), ("b", 1)), rnd=never)
    assert split.choose({"HTTP_COOKIE": "odin-canary=b"}) == Choice("b", None, "sticky")
    assert split.choose({"HTTP_COOKIE": "odin-canary=a"}) == Choice("a", None, "sticky")


def test_a_sticky_header_value_that_is_not_valid_unicode_still_sticks():
    split = sticky_header()
    first = split.choose({"HTTP_X_USER_ID": "user-\udcff"})
    assert first.reason == "sticky"
    assert split.choose({"HTTP_X_USER_ID": "user-\udcff"}) == first


def test_admin_view_of_a_header_split_without_override():
    split = sticky_header((("a", 1), ("b", 2)))
    assert split.to_dict() == {
        "groups": [
            {"group": "a", "weight": 1, "percent": 33.33},
            {"group": "b", "weight": 2, "percent": 66.67},
        ],
        "sticky": {"header": "X-User-Id"},
        "override": None,
    }


def test_admin_view_of_a_split_without_stickiness():
    view = Split.compile(CANARY, "users").to_dict()
    assert view["sticky"] is None and view["override"] is None


def test_repr_names_the_service_and_weights():
    assert repr(Split.compile(CANARY, "users")) == "<Split users: default=90, canary=10>"
