"""The admin API's bearer token: exact match, Bearer scheme only, over raw requests."""

from __future__ import annotations

import pytest

from tests.support.gateway import ADMIN_TOKEN
from tests.support.raw_client import exchange

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw():
    from tests.support.gateway import GatewayProcess
    from tests.support.upstream import Upstream

    up = Upstream("a").start()
    proc = GatewayProcess(
        {"services": [{"name": "web", "basePath": "/web", "targets": [up.url]}]}
    ).start()
    yield proc
    proc.cleanup()
    up.stop()


def _status(gw, authorization: str | None) -> int:
    line = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    raw = f"GET /admin/routes HTTP/1.1\r\nHost: x\r\n{line}Connection: close\r\n\r\n"
    return exchange(gw.port, raw.encode()).status


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer ",
        f"Bearer {ADMIN_TOKEN[:-1]}",  # a prefix of the token
        f"Bearer {ADMIN_TOKEN[:1]}",
        f"Bearer {ADMIN_TOKEN}x",  # the token with something after it
        f"Bearer {ADMIN_TOKEN} {ADMIN_TOKEN}",
        f"Basic {ADMIN_TOKEN}",  # right token, wrong scheme
        f"Token {ADMIN_TOKEN}",
        ADMIN_TOKEN,  # no scheme at all
        f"{ADMIN_TOKEN} Bearer",
    ],
)
def test_admin_refuses_anything_but_the_exact_bearer_token(gw, authorization):
    assert _status(gw, authorization) == 401


@pytest.mark.parametrize("authorization", [f"Bearer {ADMIN_TOKEN}", f"bearer {ADMIN_TOKEN}"])
def test_admin_accepts_the_exact_bearer_token(gw, authorization):
    # The auth scheme is case-insensitive (RFC 9110 section 11.1); the token is not.
    assert _status(gw, authorization) == 200
