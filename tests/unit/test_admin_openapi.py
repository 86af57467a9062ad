"""The admin API document (``GET /admin/openapi.json``): a valid OpenAPI 3.1 document
that names every admin rule of the app and nothing else, served as loaded, and the
answers the test client can provoke (409, 422, 404, 401, 403) match it.

``AnswerChecker`` is shared with ``tests/integration/test_admin_openapi.py``, which
validates the answers of real gateways."""

from __future__ import annotations

import copy
import json
import re

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from odin_gw.admin_openapi import BODY, DOCUMENT, load_document
from odin_gw.app import create_app
from odin_gw.config import build_config
from tests.unit.conftest import admin_app

TOKEN = "unit-admin-token-3f9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Methods Flask adds to every rule by itself; not admin operations of their own.
IMPLICIT = {"HEAD", "OPTIONS"}
#: The catch-all that answers 404 ``no_route`` for any other admin path: not an operation.
CATCH_ALL = "admin.unknown"
#: Operations documented ahead of the code that serves them, allowed to be missing from
#: the url_map while another change lands (the stats counters, the dashboard). Remove an
#: entry once its rule exists: the test then holds it like any other.
PENDING = {("/admin/stats", "get"), ("/admin/", "get"), ("/admin/ui/{}", "get")}


class AnswerChecker:
    """Validates admin answers against the document: ``check(path, method, status,
    body, media)`` raises ``AssertionError`` listing every violation. ``$ref``s resolve
    into the document's ``components`` (Draft 2020-12, ``referencing``)."""

    def __init__(self, document) -> None:
        self.document = json.loads(json.dumps(dict(document)))
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource("urn:odin-admin", resource)
        self.covered: set[tuple[str, str, str]] = set()

    def schema(self, path: str, method: str, status: int, media: str) -> dict:
        """A ``$ref`` to the response schema of ``method path`` for ``status``/``media``."""
        operation = self.document["paths"][path][method.lower()]
        response = operation["responses"].get(str(status))
        assert response is not None, f"{method.upper()} {path}: status {status} is not documented"
        pointer = f"/paths/{_escape(path)}/{method.lower()}/responses/{status}"
        if "$ref" in response:
            pointer = response["$ref"].removeprefix("#")
            response = self.document["components"]["responses"][pointer.rsplit("/", 1)[1]]
        assert media in response["content"], f"{method.upper()} {path} {status}: no {media}"
        return {"$ref": f"urn:odin-admin#{pointer}/content/{_escape(media)}/schema"}

    def check(self, path: str, method: str, status: int, body, media: str = "application/json"):
        """Validate ``body`` (parsed JSON) as the answer ``status`` to ``method path``."""
        validator = Draft202012Validator(
            self.schema(path, method, status, media), registry=self.registry
        )
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        assert not errors, f"{method.upper()} {path} {status} breaks the document:\n" + "\n".join(
            f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors
        )
        self.covered.add((path, method.lower(), str(status)))

    def check_response(self, path: str, method: str, response) -> None:
        """Validate a ``requests``/Flask response: status, media type, body, and the
        headers the document requires (``WWW-Authenticate`` on a 401)."""
        media = response.headers.get("Content-Type", "").split(";")[0].strip()
        status = response.status_code
        if media == "application/json":
            body = response.json() if callable(response.json) else response.json
        else:
            body = response.text if hasattr(response, "text") else response.get_data(True)
        self.check(path, method, status, body, media)
        operation = self.document["paths"][path][method.lower()]["responses"][str(status)]
        if "$ref" in operation:
            operation = self.document["components"]["responses"][operation["$ref"].split("/")[-1]]
        for name, header in operation.get("headers", {}).items():
            if header.get("required"):
                assert name in response.headers, f"{method} {path} {status}: no {name} header"
                Draft202012Validator(header["schema"]).validate(response.headers[name])


def _escape(part: str) -> str:
    """``part`` as one JSON-pointer token inside a URI fragment."""
    return part.replace("~", "~0").replace("/", "~1").replace("{", "%7B").replace("}", "%7D")


@pytest.fixture(scope="module")
def checker() -> AnswerChecker:
    return AnswerChecker(DOCUMENT)


@pytest.fixture(scope="module")
def app():
    with admin_app(TOKEN) as app:
        yield app


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def test_the_document_is_valid_openapi_3_1():
    validate_openapi(copy.deepcopy(json.loads(BODY)))
    assert DOCUMENT["openapi"].startswith("3.1.")


def test_every_admin_rule_is_documented_and_every_documented_operation_exists(app):
    served = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/admin") or rule.endpoint == CATCH_ALL:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?[^<>]+>", "{}", rule.rule)
        served |= {(path, m.lower()) for m in rule.methods - IMPLICIT}
    documented = {
        (re.sub(r"\{[^}]+\}", "{}", path), method)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace")
    }
    assert served - documented == set(), "admin rules the document does not describe"
    assert documented - served <= PENDING, "documented operations no rule serves"


def test_the_document_names_only_admin_paths_and_every_operation_answers_401_and_403():
    for path, item in DOCUMENT["paths"].items():
        assert path.startswith("/admin/"), path
        for method, operation in item.items():
            responses = operation["responses"]
            assert "403" in responses, f"{method} {path}: admin disabled is a 403"
            if operation.get("security") == []:
                assert "401" not in responses, f"{method} {path} needs no token"
            else:
                assert "401" in responses, f"{method} {path} takes the token"
    assert DOCUMENT["security"] == [{"adminToken": []}]
    scheme = DOCUMENT["components"]["securitySchemes"]["adminToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_openapi_json_answers_the_document_loaded_at_import(client, checker):
    r = client.get("/admin/openapi.json", headers=AUTH)
    assert r.status_code == 200
    assert r.mimetype == "application/json"
    assert r.get_data() == BODY
    assert r.json == json.loads(json.dumps(dict(DOCUMENT)))
    assert r.headers["Cache-Control"] == "no-store"
    checker.check_response("/admin/openapi.json", "get", r)
    assert load_document()[0] == BODY  # the file on disk is what is served


def test_openapi_json_takes_the_token_like_every_admin_endpoint(client, checker):
    r = client.get("/admin/openapi.json")
    assert r.status_code == 401
    checker.check_response("/admin/openapi.json", "get", r)


def test_answers_the_test_client_can_provoke_match_the_document(
    client, checker, tmp_path, monkeypatch
):
    monkeypatch.setenv("ODIN_CONFIG", str(tmp_path / "missing.yaml"))
    r = client.post("/admin/reload", headers=AUTH)  # no such config file: 422
    assert r.status_code == 422
    checker.check_response("/admin/reload", "post", r)
    good = tmp_path / "config.yaml"
    good.write_text(f"admin: {{token: {TOKEN}}}\n")
    monkeypatch.setenv("ODIN_CONFIG", str(good))
    r = client.post("/admin/reload", headers=AUTH)  # valid, but no gunicorn master
    assert r.status_code == 409
    checker.check_response("/admin/reload", "post", r)
    r = client.get("/admin/services/nope", headers=AUTH)
    assert r.status_code == 404
    checker.check_response("/admin/services/{name}", "get", r)
    r = client.get("/admin/tap", headers=AUTH)
    assert r.status_code == 404
    checker.check_response("/admin/tap", "get", r)
    for path in ("/admin/services", "/admin/mesh", "/admin/routes", "/admin/config"):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 200
        checker.check_response(path, "get", r)


def test_admin_disabled_answers_match_the_document(checker):
    app = create_app(
        build_config(
            {"services": [{"name": "web", "basePath": "/web", "targets": ["http://127.0.0.1:9"]}]},
            env={},
        ),
        start=False,
    )
    client = app.test_client()
    try:
        for path in ("/admin/openapi.json", "/admin/mesh"):
            r = client.get(path, headers=AUTH)
            assert r.status_code == 403
            checker.check_response(path, "get", r)
    finally:
        app.extensions["odin"].stop()


def test_the_checker_bites_on_an_unknown_field_a_missing_one_and_a_leaked_secret(checker):
    answer = {"triggered": True, "leaderPid": None}
    checker.check("/admin/mesh/refresh", "post", 202, answer)
    with pytest.raises(AssertionError, match="Additional properties"):
        checker.check("/admin/mesh/refresh", "post", 202, {**answer, "extra": 1})
    with pytest.raises(AssertionError, match="'leaderPid' is a required property"):
        checker.check("/admin/mesh/refresh", "post", 202, {"triggered": True})
    config = {"admin": {"token": "<redacted>"}, "serviceMesh": {"consul": {"token": "acl"}}}
    with pytest.raises(AssertionError, match="consul/token"):
        checker.check("/admin/config", "get", 200, config)
    with pytest.raises(AssertionError, match="admin/token"):
        checker.check("/admin/config", "get", 200, {"admin": {"token": TOKEN}})
    with pytest.raises(AssertionError, match="status 418 is not documented"):
        checker.check("/admin/mesh", "get", 418, {})
