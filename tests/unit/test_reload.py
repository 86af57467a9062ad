"""Reading a config for a reload (messages, redaction, digests, generations) and
``/admin/reload`` outside gunicorn, through Flask's test client."""

from __future__ import annotations

import os

import pytest

from odin_gw import master_state
from odin_gw.app import create_app
from odin_gw.config import ConfigError, build_config, load_config
from odin_gw.reload import gunicorn_master

TOKEN = "s3cret-admin-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = "services:\n  - {name: web, basePath: /web, targets: ['http://127.0.0.1:9']}\n"
# Four problems, one of them quoting a target URL with credentials in it.
BAD = (
    "admin: {token: hunter2-admin-token}\n"
    "services:\n"
    "  - {name: web, basePath: /web, targetz: ['http://127.0.0.1:9']}\n"
    "  - {name: api, basePath: /api, timeout: soon,\n"
    "     targets: ['http://alice:pa55w0rd-xyz@127.0.0.1:9']}\n"
)


@pytest.fixture(scope="module")
def client():
    config = build_config(
        {
            "admin": {"token": TOKEN},
            "services": [{"name": "web", "basePath": "/web", "targets": ["http://127.0.0.1:9"]}],
        },
        env={},
    )
    app = create_app(config, start=False)
    yield app.test_client()
    app.extensions["odin"].stop()


def problems_of(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return info.value.problems


def test_read_config_returns_the_config_and_its_text(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    config, text = master_state.read_config(str(path))
    assert text == GOOD
    assert [s.name for s in config.services] == ["web"]


def test_read_config_has_check_configs_messages(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("targets", "targetz") + "server: {gracefulTimeout: soon}\n")
    with pytest.raises(ConfigError) as info:
        master_state.read_config(str(path))
    assert info.value.problems == problems_of(path)
    assert len(info.value.problems) == 3
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        master_state.read_config(str(missing))
    assert info.value.problems == problems_of(missing)
    assert str(missing) in info.value.problems[0]


def test_secret_values_never_reach_the_messages(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BAD)
    plain = problems_of(path)
    assert any("pa55w0rd-xyz" in p for p in plain), plain  # what check-config prints
    with pytest.raises(ConfigError) as info:
        master_state.read_config(str(path))
    problems = info.value.problems
    assert len(problems) == len(plain) == 4
    assert not any("pa55w0rd" in p or "alice" in p for p in problems), problems
    assert "pa55w0rd" not in str(info.value) and info.value.__cause__ is None
    assert [p.replace("<redacted>@", "alice:pa55w0rd-xyz@") for p in problems] == plain


def test_redaction_covers_secret_keys_headers_and_environment(monkeypatch):
    text = (
        "serviceMesh: {consul: {token: '${CONSUL_TOKEN}'}}\n"
        "admin: {token: short-but-real}\n"
        "services:\n"
        "  - name: web\n"
        "    requestHeaders: {Authorization: Bearer-abcdef}\n"
        "    password: 12345\n"
        "    secret: true\n"
    )
    monkeypatch.setenv("CONSUL_TOKEN", "from-the-env-0001")
    problems = [
        "a: from-the-env-0001 is wrong",
        "b: short-but-real, Bearer-abcdef and 12345",
        "c: https://bob:pw@host:1/x and ftp://x@y",
        "d: True stays, and so does abc",
    ]
    assert master_state.redact_problems(problems, text) == [
        "a: <redacted> is wrong",
        "b: <redacted>, <redacted> and <redacted>",
        "c: https://<redacted>@host:1/x and ftp://<redacted>@y",
        "d: True stays, and so does abc",
    ]
    assert master_state.redact_problems(["x: ok"], "{not: [yaml") == ["x: ok"]


def test_digest_tells_texts_apart_and_is_not_a_plain_hash():
    import hashlib

    assert master_state.digest(GOOD) == master_state.digest(GOOD)
    assert master_state.digest(GOOD) != master_state.digest(GOOD + "\n")
    assert len(master_state.digest(GOOD)) == 16
    assert master_state.digest(GOOD) not in hashlib.sha256(GOOD.encode()).hexdigest()


def test_generations_count_good_loads_and_refusals_keep_them():
    saved = (dict(master_state.LAST_GOOD), dict(master_state.LAST_ATTEMPT))
    try:
        master_state.LAST_GOOD.clear()
        master_state.LAST_ATTEMPT.clear()
        config = build_config({}, env={})
        assert master_state.record_applied("/etc/odin.yaml", "a: 1\n", config) == 1
        assert master_state.record_applied("/etc/odin.yaml", "a: 2\n", config) == 2
        master_state.record_refused("/etc/odin.yaml", ["x: unknown field"])
        doc = master_state.describe()
        assert doc["served"]["generation"] == 2
        assert doc["served"]["digest"] == master_state.digest("a: 2\n")
        assert doc["served"]["loadedAt"].endswith("Z")
        assert doc["lastAttempt"]["outcome"] == "refused"
        assert doc["lastAttempt"]["generation"] == 2
        assert doc["lastAttempt"]["problems"] == ["x: unknown field"]
        assert "text" not in doc["served"] and "config" not in doc["served"]
    finally:
        master_state.LAST_GOOD.clear()
        master_state.LAST_GOOD.update(saved[0])
        master_state.LAST_ATTEMPT.clear()
        master_state.LAST_ATTEMPT.update(saved[1])


def test_no_master_outside_gunicorn():
    # pytest is nobody's gunicorn worker: neither its own pid nor its parent's count
    # unless recorded by the parent, and then only while it is the parent.
    assert gunicorn_master() is None


def test_the_master_is_the_recorded_pid_only_while_it_is_the_parent(monkeypatch):
    # Only the environment is set (as the master exports it); the code runs as it is.
    parent = os.getppid()
    monkeypatch.setenv("ODIN_GUNICORN_MASTER_PID", str(parent))
    assert gunicorn_master() == parent
    monkeypatch.delenv("ODIN_GUNICORN_MASTER_PID")
    assert gunicorn_master() is None
    monkeypatch.setenv("odin_gunicorn_master_pid", str(parent))  # names are exact
    assert gunicorn_master() is None


@pytest.mark.parametrize(
    "recorded",
    [
        "self",  # this process: a worker never signals itself
        "other",  # a pid that is not the parent: orphaned, or started by a worker
        "",
        "-1",
        " 12",
        "12a",
        "\u00b2",  # a digit to str.isdigit, not to int()
        "parent in other digits",  # int() reads Arabic-Indic digits; the master's are ASCII
    ],
)
def test_no_master_unless_the_recorded_pid_is_the_parent(monkeypatch, recorded):
    parent = os.getppid()
    value = {
        "self": str(os.getpid()),
        "other": str(1 if parent != 1 else os.getpid() + 1),
        "parent in other digits": "".join(chr(0x660 + int(d)) for d in str(parent)),
    }.get(recorded, recorded)
    monkeypatch.setenv("ODIN_GUNICORN_MASTER_PID", value)
    assert gunicorn_master() is None


def test_reload_needs_the_admin_token(client):
    assert client.post("/admin/reload").status_code == 401
    assert client.get("/admin/reload").status_code == 401


def test_reload_outside_gunicorn_is_409(client, tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    monkeypatch.setenv("ODIN_CONFIG", str(path))
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409
    body = r.get_json()
    assert body["code"] == "no_master" and "gunicorn" in body["error"]
    assert body["path"] == str(path) and body["requestId"]


def test_invalid_file_is_422_with_every_problem_and_no_secret(client, tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(BAD)
    monkeypatch.setenv("ODIN_CONFIG", str(path))
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 422
    body = r.get_json()
    assert body["code"] == "invalid_config"
    assert body["path"] == str(path)
    assert "invalid configuration" in body["error"]
    plain = problems_of(path)
    assert body["problems"] == [p.replace("alice:pa55w0rd-xyz@", "<redacted>@") for p in plain]
    assert "pa55w0rd" not in r.get_data(as_text=True)
    assert "hunter2" not in r.get_data(as_text=True)


def test_status_outside_gunicorn_serves_no_generation(client):
    r = client.get("/admin/reload", headers=AUTH)
    assert r.status_code == 200
    body = r.get_json()
    assert body["pid"] == os.getpid()
    assert body["masterPid"] is None
    assert body["served"] is None  # this app was not built from the master's copy
