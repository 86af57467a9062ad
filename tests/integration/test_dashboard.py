"""The mesh dashboard (``GET /admin/``, odin_gw/dashboard.py and static/dashboard/) in
Debian's headless Chromium, driven by Playwright, against a real gunicorn gateway (two
workers) discovering through the Consul stand-in with Connect mTLS to real backends;
and its headers and files checked raw, without a browser.

The browser is the system's ``chromium`` (no ``playwright install``): a machine without
it fails these tests; ``make test`` installs it."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from odin_gw.dashboard import CONTENT_SECURITY_POLICY
from tests.doubles.consul import ConsulDouble
from tests.doubles.pki import CertificateAuthority, consul_service_uri
from tests.integration.consul_helpers import MeshBackend, Traffic, consul_config
from tests.integration.test_tap import tap_config
from tests.support.gateway import ADMIN_TOKEN, one_session_per_worker
from tests.support.raw_client import exchange
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "odin_gw" / "static" / "dashboard"
WAIT_MS = 20_000  # every bounded wait on the page (discovery + one 2 s poll fit easily)


@pytest.fixture(scope="module")
def browser():
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed (apt-get install chromium): the dashboard "
            "tests need it; `make test` installs it"
        )
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.seen_requests = []  # (url, headers) of every request the page made
    tab.problems = []  # console errors (CSP violations among them) and page errors
    tab.on("request", lambda r: tab.seen_requests.append((r.url, r.headers)))
    tab.on("console", lambda m: m.type == "error" and tab.problems.append((m.text, m.location)))
    tab.on("pageerror", lambda e: tab.problems.append((str(e), {"url": "pageerror"})))
    yield tab
    context.close()


def sign_in(page, gw, token: str = ADMIN_TOKEN) -> None:
    page.goto(gw.url + "/admin/")
    page.locator("#token").fill(token)
    page.locator("#sign-in-button").click()


def save_screenshot(page, tmp_path, name: str) -> Path:
    """Under ``tmp_path``, or in ``$ODIN_ARTIFACTS`` when that names a directory."""
    artifacts = os.environ.get("ODIN_ARTIFACTS")
    folder = Path(artifacts) if artifacts else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    print(f"dashboard screenshot: {path}")
    return path


# -- a Consul Connect gateway ------------------------------------------------------------
@pytest.fixture
def ca():
    return CertificateAuthority()


@pytest.fixture
def connect_gateway(ca, gateway_factory):
    """``(gw, consul)``: ``web`` has two Connect instances, ``web-a`` and ``web-b``."""
    with (
        ConsulDouble(ca=ca) as consul,
        MeshBackend(ca, "a", "web") as a,
        MeshBackend(ca, "b", "web") as b,
    ):
        consul.register("web", id="web-a", port=9, connect_proxy_port=a.port)
        consul.register("web", id="web-b", port=9, connect_proxy_port=b.port)
        config = consul_config(consul, [{"name": "web", "basePath": "/web"}], enableConnect=True)
        config["serviceMesh"]["mtlsEnabled"] = True
        gw = gateway_factory(config, workers=2)
        gw.backends = {"web-a": a, "web-b": b}
        yield gw, consul


def endpoint_cell(page, gw, instance: str, column: str):
    url = f"https://127.0.0.1:{gw.backends[instance].port}"
    return page.locator(f'article[data-service="web"] tr[data-url="{url}"] td.{column}')


def test_dashboard_shows_endpoints_follows_health_and_keeps_the_token_private(
    connect_gateway, page, tmp_path, ca
):
    from playwright.sync_api import expect

    gw, consul = connect_gateway
    page.goto(gw.url + "/admin/")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#overview")).to_be_hidden()

    sign_in(page, gw)
    expect(page.locator("#overview")).to_be_visible()
    for instance in ("web-a", "web-b"):
        expect(endpoint_cell(page, gw, instance, "health")).to_have_text("healthy")
        expect(endpoint_cell(page, gw, instance, "mesh-status")).to_have_text("passing")
        expect(endpoint_cell(page, gw, instance, "where")).to_have_text("dc1")
        expect(endpoint_cell(page, gw, instance, "identity")).to_have_text(
            consul_service_uri(ca.trust_domain, "web")
        )
    card = page.locator('article[data-service="web"]')
    expect(card.locator("h3 .count")).to_have_text("2/2 healthy")
    expect(page.locator('dd[data-fact="Type"]')).to_have_text("consul")
    expect(page.locator('dd[data-fact="Ready"]')).to_have_text("ready")
    gateway_id = consul_service_uri(ca.trust_domain, "odin-gateway")
    expect(page.locator('dd[data-fact="Certificate"]')).to_contain_text(gateway_id)
    expect(page.locator('dd[data-fact="Certificate"]')).to_contain_text(" expires ")
    expect(page.locator('dd[data-fact="Snapshot age"]')).to_have_text(re.compile(r"^\d+\.\d s$"))
    expect(page.locator("#tap-tab")).to_be_hidden()  # no tap under Consul: 404

    consul.set_status("web-a", "critical")
    expect(endpoint_cell(page, gw, "web-a", "health")).to_have_text("unhealthy")
    expect(endpoint_cell(page, gw, "web-a", "mesh-status")).to_have_text("critical")
    expect(endpoint_cell(page, gw, "web-b", "health")).to_have_text("healthy")
    expect(card.locator("h3 .count")).to_have_text("1/2 healthy")

    traffic_row = page.locator('#traffic tr[data-service="web"]')
    with Traffic(gw.url + "/web/x", pause=0.02) as traffic:
        expect(traffic_row.locator(".rate")).to_have_text(re.compile(r"^(?!0\.00$)\d+\.\d\d$"))
        expect(traffic_row.locator(".requests")).not_to_have_text("0")
    assert traffic.codes and set(traffic.codes) == {200}, traffic.errors[:3]
    expect(traffic_row.locator(".errors")).to_have_text("0")

    shot = save_screenshot(page, tmp_path, "dashboard.png")
    assert shot.stat().st_size > 10_000

    # The token: in no URL, in no storage that outlives the tab, only in a header.
    assert ADMIN_TOKEN not in page.url
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    assert all(ADMIN_TOKEN not in url for url, _ in page.seen_requests)
    admin_calls = [
        (url, headers)
        for url, headers in page.seen_requests
        if re.search(r"/admin/(services|mesh|stats)$", url)
    ]
    assert len(admin_calls) >= 6
    assert {h.get("authorization") for _, h in admin_calls} == {f"Bearer {ADMIN_TOKEN}"}
    assert not [
        url for url, h in page.seen_requests if "authorization" in h and "/admin/" not in url
    ]

    page.locator("#sign-out").click()
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#services article")).to_have_count(0)
    assert page.evaluate("sessionStorage.length") == 0
    # The one error the console may show: the tap probe's 404 (the tap is off here).
    assert [p for p in page.problems if not p[1]["url"].endswith("/admin/tap")] == []


def test_wrong_token_shows_an_error_not_the_data(connect_gateway, page):
    from playwright.sync_api import expect

    gw, _ = connect_gateway
    sign_in(page, gw, "not-the-token")
    expect(page.locator("#sign-in-error")).to_be_visible()
    expect(page.locator("#sign-in-error")).to_contain_text("401")
    expect(page.locator("#overview")).to_be_hidden()
    expect(page.locator("#services article")).to_have_count(0)
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0
    # The right token after a wrong one gets in.
    page.locator("#token").fill(ADMIN_TOKEN)
    page.locator("#sign-in-button").click()
    expect(page.locator('article[data-service="web"] h3 .count')).to_have_text("2/2 healthy")
    expect(page.locator("#sign-in-error")).to_be_hidden()


def test_a_token_revoked_by_the_gateway_brings_back_the_sign_in(connect_gateway, page):
    from playwright.sync_api import expect

    gw, _ = connect_gateway
    sign_in(page, gw)
    expect(page.locator('article[data-service="web"]')).to_be_visible()
    # The tab's stored token goes wrong, as after a token rotation and a reload.
    page.evaluate("sessionStorage.setItem('odin-admin-token', 'rotated-away')")
    page.reload()
    expect(page.locator("#sign-in-error")).to_contain_text("401")
    expect(page.locator("#overview")).to_be_hidden()


# -- the live tap under Linkerd --------------------------------------------------------------
def test_live_tap_streams_events_and_stops(gateway_factory, page, tmp_path):
    from playwright.sync_api import expect

    with Upstream("echo") as echo:
        gw = gateway_factory(
            tap_config(echo), workers=2, env={"KUBECONFIG": "/nonexistent/kubeconfig"}
        )
        sign_in(page, gw)
        expect(page.locator("#tap-tab")).to_be_visible()
        page.locator("#tap-tab").click()
        expect(page.locator("#tap-service option")).to_have_count(3)
        page.locator("#tap-service").select_option("orders")
        page.locator("#tap-start").click()
        expect(page.locator("#tap-status")).to_contain_text("streaming")
        rows = page.locator("#tap-events tbody tr")
        sessions = one_session_per_worker(gw)
        _settle(page, gw, sessions)
        for i in range(5):
            session = sessions[list(sessions)[i % 2]]
            assert session.get(f"{gw.url}/orders/item-{i}", timeout=10).status_code == 200
            assert session.get(f"{gw.url}/pay/p-{i}", timeout=10).status_code == 200
        items = page.locator("#tap-events tbody tr", has_text="/orders/item-")
        expect(items).to_have_count(5)
        cells = items.filter(has_text="/orders/item-4").locator("td")
        expect(cells.nth(1)).to_have_text("orders")
        expect(cells.nth(2)).to_have_text("GET")
        expect(cells.nth(4)).to_have_text(echo.url)
        expect(cells.nth(5)).to_have_text("200")
        expect(page.locator("#tap-events tbody tr", has_text="/pay/")).to_have_count(0)
        save_screenshot(page, tmp_path, "dashboard-tap.png")
        page.locator("#tap-stop").click()
        expect(page.locator("#tap-status")).to_have_text("stopped")
        expect(page.locator("#tap-start")).to_be_enabled()
        shown = rows.count()
        for i in range(3):
            assert requests.get(f"{gw.url}/orders/after-{i}", timeout=10).status_code == 200
        # The stream is closed: its socket and filter files go, and no more rows come.
        taps = Path(gw.config["serviceMesh"]["stateDir"]) / "taps"
        _wait_no_tap_files(taps)
        assert rows.count() == shown
        assert page.problems == []


def _settle(page, gw, sessions, timeout: float = 15.0) -> None:
    """Probe through every worker until the page shows a probe of each (a worker finds
    a new tap at its next listing of the taps dir, within 0.5 s)."""
    deadline = time.monotonic() + timeout
    missing = set(sessions)
    while missing and time.monotonic() < deadline:
        for pid in missing:
            assert sessions[pid].get(f"{gw.url}/orders/probe-{pid}", timeout=5).ok
        page.wait_for_timeout(300)
        rows = page.locator("#tap-events tbody tr")
        missing = {pid for pid in missing if rows.filter(has_text=f"/probe-{pid}").count() == 0}
    assert not missing, f"probes through workers {missing} never reached the tap view"


def _wait_no_tap_files(taps: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [n for n in os.listdir(taps) if n.startswith("tap-")]:
            return
        time.sleep(0.1)
    raise AssertionError(f"tap files left after Stop: {os.listdir(taps)}")


# -- raw: headers, files, refusals -------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_gateway():
    from tests.support.gateway import GatewayProcess

    with Upstream("a") as up:
        gw = GatewayProcess(
            {"services": [{"name": "web", "basePath": "/web", "targets": [up.url]}]}
        )
        try:
            yield gw.start()
        finally:
            gw.cleanup()


def test_page_and_files_headers(plain_gateway):
    gw = plain_gateway
    page = requests.get(gw.url + "/admin/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"
    assert page.content == (STATIC / "index.html").read_bytes()
    html = page.text
    # The CSP forbids inline code: every script has a src, no <style>, no style="".
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="ui/app.js" defer>']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE)  # no inline handlers
    assert not re.search(r"https?://", html)  # no CDN, no external fonts
    for name, content_type in (
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
    ):
        r = requests.get(f"{gw.url}/admin/ui/{name}", timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == content_type
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.content == (STATIC / name).read_bytes()
        assert not re.search(r"https?://", r.text)
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink


@pytest.mark.parametrize(
    "path",
    [
        "/admin/ui/../admin.py",
        "/admin/ui/%2e%2e/admin.py",
        "/admin/ui/..%2fadmin.py",
        "/admin/ui/../../odin_gw/admin.py",
        "/admin/ui/index.html",
        "/admin/ui/static/dashboard/app.js",
        "/admin/ui/APP.JS",
        "/admin/ui/app.js/",
    ],
)
def test_other_paths_under_ui_are_refused(plain_gateway, path):
    raw = f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()
    r = exchange(plain_gateway.port, raw)
    assert r.status == 404, (path, r.status, r.body[:200])
    assert r.header("Content-Type") == "application/json"
    assert b"def " not in r.body and b"<html" not in r.body


def test_admin_data_still_needs_the_token(plain_gateway):
    gw = plain_gateway
    for path in ("stats", "services", "mesh", "routes", "config", "ui/../stats"):
        raw = f"GET /admin/{path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        r = exchange(gw.port, raw.encode())
        assert r.status == (404 if path.startswith("ui/") else 401), (path, r.status)
        assert b'"services"' not in r.body and b'"total"' not in r.body
    assert requests.post(gw.url + "/admin/", timeout=10).status_code == 401
    assert gw.admin("stats").status_code == 200
