"""Rate limits through real gunicorn workers: exact boundaries shared by two workers (host
table) and by two gateways (a real redis-server), keys, and Redis outages."""

from __future__ import annotations

import re
import time

import pytest
import requests

from tests.support.gateway import one_session_per_worker
from tests.support.redis_server import RedisServer, redis_available

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "rl-test-secret-7f3a"


@pytest.fixture
def redis_server():
    assert redis_available(), "redis-server is needed (make test installs Debian's package)"
    with RedisServer(password=REDIS_PASSWORD) as server:
        yield server


def gateway_config(upstream, rate_limit: dict, state_dir, **top) -> dict:
    config = {
        "serviceMesh": {"stateDir": str(state_dir)},
        "services": [
            {
                "name": "api",
                "basePath": "/api",
                "targets": [upstream.url],
                "rateLimit": rate_limit,
            },
            {"name": "free", "basePath": "/free", "targets": [upstream.url]},
        ],
    }
    config.update(top)
    return config


def remaining(response) -> int:
    match = re.fullmatch(r'"api";r=(\d+);t=(\d+)', response.headers["RateLimit"])
    assert match, response.headers["RateLimit"]
    return int(match.group(1))


@pytest.mark.parametrize("preload", [False, True], ids=["app-per-worker", "preload"])
def test_the_limit_is_exact_across_two_workers(gateway_factory, upstream, tmp_path, preload):
    gw = gateway_factory(
        gateway_config(upstream, {"requests": 6, "per": "hour"}, tmp_path / "state"),
        workers=2,
        args=["--preload"] if preload else [],
    )
    sessions = list(one_session_per_worker(gw).values())
    left = []
    for i in range(6):  # alternating workers: each sees the other's requests counted
        r = sessions[i % 2].get(gw.url + "/api/x", timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["RateLimit-Policy"] == '"api";q=6;w=3600'
        left.append(remaining(r))
    assert left == [5, 4, 3, 2, 1, 0]
    for session in sessions:  # request 7 is refused by whichever worker takes it
        r = session.get(gw.url + "/api/x", timeout=10)
        assert r.status_code == 429
        body = r.json()
        assert body["code"] == "rate_limited" and body["policy"] == "api"
        assert body["requestId"] == r.headers["X-Request-Id"]
        wait = r.headers["Retry-After"]
        assert wait.isdigit() and 1 <= int(wait) <= 3601 and body["retryAfter"] == int(wait)
        assert r.headers["RateLimit"] == f'"api";r=0;t={wait}'
        assert r.headers["RateLimit-Policy"] == '"api";q=6;w=3600'
        assert r.headers["Content-Type"] == "application/json"
    assert upstream.requests == 6  # refused requests never reach the service
    free = sessions[0].get(gw.url + "/free/x", timeout=10)
    assert free.status_code == 200 and "RateLimit" not in free.headers


def test_a_rule_limit_applies_on_top_of_the_service_limit(gateway_factory, upstream, tmp_path):
    config = gateway_config(upstream, {"requests": 5, "per": "hour"}, tmp_path / "state")
    config["services"][0]["rules"] = [
        {"match": {"path": {"prefix": "/api/search"}}, "rateLimit": {"requests": 2, "per": "hour"}}
    ]
    gw = gateway_factory(config)
    search = [requests.get(gw.url + "/api/search", timeout=10) for _ in range(3)]
    assert [r.status_code for r in search] == [200, 200, 429]
    assert search[0].headers["RateLimit-Policy"] == '"api";q=5;w=3600, "api/rule-0";q=2;w=3600'
    assert search[2].json()["policy"] == "api/rule-0"
    # The service's own limit counted every request its limit allowed, the refused one too.
    assert [requests.get(gw.url + "/api/x", timeout=10).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]


def test_header_key_counts_per_api_key_and_falls_back_to_the_address(
    gateway_factory, upstream, tmp_path
):
    gw = gateway_factory(
        gateway_config(
            upstream, {"requests": 2, "per": "hour", "key": "header:X-Api-Key"}, tmp_path / "s"
        )
    )

    def statuses(headers: dict, n: int = 3) -> list[int]:
        return [
            requests.get(gw.url + "/api/x", headers=headers, timeout=10).status_code
            for _ in range(n)
        ]

    assert statuses({"X-Api-Key": "alice"}) == [200, 200, 429]
    assert statuses({"X-Api-Key": "bob"}) == [200, 200, 429]
    assert statuses({}) == [200, 200, 429]  # no key: counted by client address
    assert statuses({"X-Api-Key": "carol"}, 1) == [200]


@pytest.mark.parametrize(
    "trusted, separate",
    [(["127.0.0.1/32"], True), (["10.0.0.0/8"], False)],
    ids=["trusted-proxy", "untrusted-peer"],
)
def test_x_forwarded_for_counts_only_from_trusted_proxies(
    gateway_factory, upstream, tmp_path, trusted, separate
):
    gw = gateway_factory(
        gateway_config(
            upstream,
            {"requests": 2, "per": "hour"},
            tmp_path / "state",
            server={"trustedProxies": trusted},
        )
    )

    def get(client: str) -> int:
        headers = {"X-Forwarded-For": client}
        return requests.get(gw.url + "/api/x", headers=headers, timeout=10).status_code

    assert [get("203.0.113.7"), get("203.0.113.7"), get("203.0.113.7")] == [200, 200, 429]
    # Through a trusted proxy the next client has its own bucket; from an untrusted peer
    # the header is ignored and the peer's (127.0.0.1) bucket is already spent.
    assert get("203.0.113.8") == (200 if separate else 429)


def test_two_gateways_sharing_redis_hit_exactly_the_shared_limit(
    gateway_factory, upstream, redis_server, tmp_path
):
    config = gateway_config(
        upstream,
        {"requests": 5, "per": "hour", "key": "global"},
        tmp_path / "state",
        rateLimit={"storage": redis_server.url},
    )
    gateways = [gateway_factory(config), gateway_factory(config)]
    assert gateways[0].url != gateways[1].url
    got = []
    for i in range(8):  # alternating gateways
        gw = gateways[i % 2]
        r = requests.get(gw.url + "/api/x", timeout=10)
        got.append((r.status_code, remaining(r) if r.status_code == 200 else None))
    assert got == [(200, 4), (200, 3), (200, 2), (200, 1), (200, 0)] + [(429, None)] * 3
    assert upstream.requests == 5
    assert b"odin-rl:" in redis_server.command("KEYS", "*")


def wait_for(predicate, timeout: float = 15.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s")


def test_redis_outage_fails_open_then_limits_apply_again(
    gateway_factory, upstream, redis_server, tmp_path
):
    gw = gateway_factory(
        gateway_config(
            upstream,
            {"requests": 2, "per": "hour"},
            tmp_path / "state",
            rateLimit={"storage": redis_server.url, "failOpen": True},
        )
    )
    url = gw.url + "/api/x"
    assert [requests.get(url, timeout=10).status_code for _ in range(3)] == [200, 200, 429]
    redis_server.kill()
    started = time.monotonic()
    for _ in range(20):  # unchecked, and never stalled by the dead storage
        r = requests.get(url, timeout=10)
        assert r.status_code == 200 and "RateLimit" not in r.headers
    assert time.monotonic() - started < 10
    log = gw.log()
    assert log.count("rate-limit storage") == 1 and "pass unchecked" in log
    assert "<redacted>" in log and REDIS_PASSWORD not in log

    redis_server.start()  # empty, on the same port

    def answered():
        r = requests.get(url, timeout=10)
        return r if "RateLimit" in r.headers else None

    first = wait_for(answered)  # the first request the storage counted again
    assert first.status_code == 200 and remaining(first) == 1
    assert [requests.get(url, timeout=10).status_code for _ in range(2)] == [200, 429]
    assert "answers again" in gw.log()


def test_redis_outage_fails_closed_with_503_until_it_is_back(
    gateway_factory, upstream, redis_server, tmp_path
):
    gw = gateway_factory(
        gateway_config(
            upstream,
            {"requests": 100, "per": "hour"},
            tmp_path / "state",
            rateLimit={"storage": redis_server.url, "failOpen": False},
        )
    )
    url = gw.url + "/api/x"
    assert requests.get(url, timeout=10).status_code == 200
    redis_server.kill()
    before = upstream.requests
    for _ in range(5):
        r = requests.get(url, timeout=10)
        assert r.status_code == 503
        assert r.json()["code"] == "rate_limit_unavailable"
        assert r.headers["Retry-After"] == "1"
    assert upstream.requests == before
    assert "refused with 503" in gw.log() and REDIS_PASSWORD not in gw.log()
    redis_server.start()
    back = wait_for(lambda: (r := requests.get(url, timeout=10)).status_code == 200 and r)
    assert remaining(back) == 99  # the new, empty Redis counts from zero
