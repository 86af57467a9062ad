"""``GET /admin/stats`` (odin_gw/admin_stats.py): per-service request and error counts
from the gateway's own ``odin_requests`` counter, in-process through Flask's test client.

The requests are answered by rules' ``direct`` answers: each one goes through the whole
request path (routing, metrics hooks) without any upstream socket."""

from __future__ import annotations

import pytest

from odin_gw.admin_stats import request_stats
from odin_gw.app import create_app
from odin_gw.config import build_config

TOKEN = "stats-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def direct(prefix: str, status: int) -> dict:
    return {"match": {"path": {"prefix": prefix}}, "direct": {"status": status}}


@pytest.fixture
def app():
    config = build_config(
        {
            "admin": {"token": TOKEN},
            "services": [
                {
                    "name": "shop",
                    "basePath": "/shop",
                    "targets": ["http://127.0.0.1:9"],
                    "rules": [
                        direct("/shop/ok", 200),
                        direct("/shop/moved", 301),
                        direct("/shop/gone", 404),
                        direct("/shop/down", 503),
                    ],
                },
                {
                    "name": "quiet",
                    "basePath": "/quiet",
                    "targets": ["http://127.0.0.1:9"],
                },
            ],
        },
        env={},
    )
    application = create_app(config, start=False)
    yield application
    application.extensions["odin"].stop()


def send(client, path: str, n: int = 1, **kwargs) -> int:
    status = 0
    for _ in range(n):
        response = client.get(path, **kwargs)
        status = response.status_code
        response.close()  # the request is counted when its answer is closed
    return status


def stats(client) -> dict:
    response = client.get("/admin/stats", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Cache-Control"] == "no-store"
    doc = response.json
    response.close()
    return doc


def test_counts_by_service_and_status_class(app):
    client = app.test_client()
    assert send(client, "/shop/ok", 5) == 200
    assert send(client, "/shop/moved", 2) == 301
    assert send(client, "/shop/gone", 3) == 404
    assert send(client, "/shop/down", 4) == 503
    doc = stats(client)
    assert doc["services"]["shop"] == {
        "requests": 14,
        "errors": 4,
        "byStatusClass": {"2xx": 5, "3xx": 2, "4xx": 3, "5xx": 4},
    }
    assert doc["services"]["quiet"] == {
        "requests": 0,
        "errors": 0,
        "byStatusClass": {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0},
    }
    assert doc["total"] == {"requests": 14, "errors": 4}


def test_counts_grow_between_two_answers(app):
    client = app.test_client()
    send(client, "/shop/ok", 2)
    before = stats(client)
    send(client, "/shop/ok", 3)
    send(client, "/shop/down")
    after = stats(client)
    assert after["services"]["shop"]["requests"] - before["services"]["shop"]["requests"] == 4
    assert after["services"]["shop"]["errors"] - before["services"]["shop"]["errors"] == 1
    assert after["total"]["requests"] - before["total"]["requests"] == 4


def test_unrouted_and_admin_requests_are_left_out(app):
    client = app.test_client()
    assert send(client, "/nowhere", 3) == 404
    assert send(client, "/admin/routes", 2, headers=AUTH) == 200
    assert send(client, "/shop/ok") == 200
    doc = stats(client)
    assert set(doc["services"]) == {"shop", "quiet"}
    assert doc["total"] == {"requests": 1, "errors": 0}
    # The metric itself did count them, under service "-".
    unrouted = {
        dict(k)["status_class"]: v
        for k, v in app.extensions["odin"].metrics.totals("odin_requests").items()
        if dict(k)["service"] == "-"
    }
    assert unrouted["4xx"] == 3 and unrouted["2xx"] >= 2


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}],
)
def test_token_required(app, headers):
    client = app.test_client()
    send(client, "/shop/ok")
    response = client.get("/admin/stats", headers=headers)
    assert response.status_code == 401
    assert response.json["code"] == "unauthorized"
    assert "services" not in response.json


def test_every_label_combination_is_folded():
    totals = {
        (("method", "GET"), ("service", "a"), ("status_class", "2xx")): 7.0,
        (("method", "POST"), ("service", "a"), ("status_class", "2xx")): 3.0,
        (("method", "GET"), ("service", "a"), ("status_class", "5xx")): 2.0,
        (("method", "POST"), ("service", "a"), ("status_class", "5xx")): 1.0,
        (("method", "GET"), ("service", "a"), ("status_class", "1xx")): 1.0,
        (("method", "GET"), ("service", "b"), ("status_class", "other")): 1.0,
        (("method", "GET"), ("service", "-"), ("status_class", "5xx")): 50.0,
    }
    doc = request_stats(totals, ["a", "c"])
    assert doc["services"]["a"] == {
        "requests": 14,
        "errors": 3,  # 5xx of every method added up
        "byStatusClass": {"1xx": 1, "2xx": 10, "3xx": 0, "4xx": 0, "5xx": 3},
    }
    assert doc["services"]["b"]["requests"] == 1 and doc["services"]["b"]["errors"] == 0
    assert doc["services"]["b"]["byStatusClass"]["other"] == 1
    assert doc["services"]["c"]["requests"] == 0
    assert "-" not in doc["services"]
    assert doc["total"] == {"requests": 15, "errors": 3}


def test_samples_without_labels_count_as_unrouted_or_other():
    doc = request_stats({(("service", "a"),): 2.0, (("status_class", "5xx"),): 9.0})
    assert doc["services"] == {
        "a": {
            "requests": 2,
            "errors": 0,
            "byStatusClass": {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "other": 2},
        }
    }
