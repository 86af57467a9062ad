"""Admin API authorization and answers, in-process through Flask's test client."""

from __future__ import annotations

import pytest

from odin_gw.admin import bearer_matches
from odin_gw.app import create_app
from odin_gw.config import build_config
from tests.unit.conftest import admin_app

TOKEN = "s3cret-admin-token-42"


@pytest.fixture(scope="module")
def client():
    with admin_app(TOKEN) as app:
        yield app.test_client()


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN[:1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        f" {TOKEN}",
    ],
)
def test_refused_without_the_exact_bearer_token(client, authorization):
    r = client.get("/admin/routes", headers={"Authorization": authorization})
    assert r.status_code == 401
    assert r.json["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="odin-admin"'
    assert r.headers["Cache-Control"] == "no-store"
    assert TOKEN not in r.get_data(as_text=True)


def test_exact_bearer_token_is_let_in(client):
    r = client.get("/admin/routes", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    assert "WWW-Authenticate" not in r.headers
    assert [route["service"] for route in r.json["routes"]] == ["web"]


def test_admin_disabled_without_a_token():
    app = create_app(
        build_config(
            {"services": [{"name": "w", "basePath": "/w", "targets": ["http://127.0.0.1:9"]}]},
            env={},
        ),
        start=False,
    )
    try:
        r = app.test_client().get("/admin/routes", headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json["code"] == "admin_disabled"
    finally:
        app.extensions["odin"].stop()


def test_config_answer_redacts_the_token(client):
    r = client.get("/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert TOKEN not in r.get_data(as_text=True)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {TOKEN}", True),
        (f"BEARER {TOKEN}", True),
        (f"Bearer {TOKEN} ", True),
        (f"Bearer {TOKEN[:-1]}", False),
        (f"Bearer {TOKEN}0", False),
        ("Bearer ", False),
        (f"Basic {TOKEN}", False),
        (f"Bearerx {TOKEN}", False),
        (TOKEN, False),
    ],
)
def test_bearer_matches(header, ok):
    assert bearer_matches(header, TOKEN) is ok
