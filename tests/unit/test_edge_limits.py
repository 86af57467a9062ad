"""The edge worker's rules: when a request may take a thread, the minimum body rate, the
408 answer, the rate-limited log line, and the settings gunicorn gets."""

from __future__ import annotations

import json
import logging
import math
import runpy
from pathlib import Path

import pytest

from odin_gw.config.model import ServerConfig
from odin_gw.edge_limits import (
    HAND_OVER,
    BodyTooSlow,
    EdgeLimits,
    HeadTimeout,
    MinRate,
    SlowClientLog,
    bytes_needed,
    timeout_detail,
    timeout_response,
)

ROOT = Path(__file__).resolve().parents[2]
LIMITS = EdgeLimits()
HEAD = b"POST /a HTTP/1.1\r\nHost: x\r\n"


# -- MinRate: Kestrel's rule ---------------------------------------------------------


def test_min_rate_allows_the_grace_period_then_the_average():
    rule = MinRate(rate=240, grace=5.0)
    assert rule.allowed(0) == 5.0
    assert rule.allowed(240 * 5) == 5.0
    assert rule.allowed(240 * 20) == 20.0  # 4800 bytes may take 20 s


def test_min_rate_zero_turns_the_rule_off():
    assert MinRate(rate=0, grace=5.0).allowed(0) == math.inf
    assert MinRate(rate=1, grace=5.0).allowed(100) == 100.0  # 1 B/s is a rate, not "off"


def test_trickling_body_fails_the_rule_after_the_grace():
    rule = MinRate(rate=240, grace=1.0)
    received, elapsed = 0, 0.0
    while elapsed < 10 and elapsed <= rule.allowed(received):
        elapsed += 0.5  # one byte every half second
        received += 1
    assert 1.0 < elapsed <= 1.5


# -- bytes_needed: when the event loop hands a request over ------------------------------


def test_incomplete_head_waits():
    assert bytes_needed(b"GET / HTTP/1.1\r\nHost: x\r\n", LIMITS) is None
    assert bytes_needed(b"GET / HT", LIMITS) is None


def test_head_without_body_needs_just_the_head():
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert bytes_needed(raw, LIMITS) == len(raw)
    assert bytes_needed(raw + b"GET /next", LIMITS) == len(raw)  # pipelined: first only


def test_small_body_is_buffered():
    raw = HEAD + b"Content-Length: 10\r\n\r\n"
    assert bytes_needed(raw + b"abc", LIMITS) == len(raw) + 10
    assert bytes_needed(raw.replace(b"Content-Length", b"content-LENGTH"), LIMITS) == len(raw) + 10


@pytest.mark.parametrize(
    "line", [b"Content-Length:7", b"Content-Length: 7", b"Content-Length:\t 7 \t"]
)
def test_length_is_read_exactly_whatever_the_spacing(line):
    # Too large a count would leave a complete request waiting for bytes that never come.
    raw = HEAD + line + b"\r\nX-After: 1\r\n\r\n"
    assert bytes_needed(raw, LIMITS) == len(raw) + 7
    last = HEAD + line + b"\r\n\r\n"  # the length is the last header line
    assert bytes_needed(last, LIMITS) == len(last) + 7


def test_a_second_length_after_other_headers_goes_to_gunicorns_parser():
    raw = HEAD + b"Content-Length: 5\r\nX: y\r\ncontent-length: 6\r\n\r\n"
    assert bytes_needed(raw, LIMITS) == HAND_OVER


def test_head_limits_are_gunicorns_own_boundaries():
    limits = EdgeLimits(max_line=20, max_head=60)
    line = b"GET /" + b"a" * 15  # exactly max_line bytes, no CRLF yet: keep reading
    assert len(line) == 20 and bytes_needed(line, limits) is None
    assert bytes_needed(line + b"a", limits) == HAND_OVER
    line_ok = b"GET /" + b"a" * 14 + b"\r\n"  # a line of max_line bytes plus its CRLF
    assert bytes_needed(line_ok + b"H: v", limits) is None
    head = b"GET / HTTP/1.1\r\n" + b"X: 123456\r\n" * 4  # 60 bytes, not complete
    assert len(head) == 60 and bytes_needed(head, limits) is None
    assert bytes_needed(head + b"X", limits) == HAND_OVER


def test_scanning_resumes_where_it_stopped_without_missing_a_split_end():
    first = b"GET / HTTP/1.1\r\nHost: x\r\n"
    assert bytes_needed(first, LIMITS) is None
    whole = first + b"\r\n"
    assert bytes_needed(whole, LIMITS, scanned=len(first)) == len(whole)
    three = b"GET / HTTP/1.1\r\nHost: x\r\n\r"  # the end split after its first CR
    assert bytes_needed(three + b"\n", LIMITS, scanned=len(three)) == len(three) + 1


def test_body_over_the_buffer_is_streamed():
    limits = EdgeLimits(buffer_body=100)
    assert bytes_needed(HEAD + b"Content-Length: 100\r\n\r\n", limits) > 0
    assert bytes_needed(HEAD + b"Content-Length: 101\r\n\r\n", limits) == HAND_OVER


@pytest.mark.parametrize(
    "headers",
    [
        b"Transfer-Encoding: chunked\r\n",
        b"Expect: 100-continue\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 1e3\r\n",
    ],
)
def test_streamed_or_odd_framing_goes_to_gunicorns_parser(headers):
    assert bytes_needed(HEAD + headers + b"\r\n", LIMITS) == HAND_OVER


def test_heads_over_gunicorns_limits_go_to_its_parser():
    limits = EdgeLimits(max_line=100, max_head=1000)
    assert bytes_needed(b"GET /" + b"a" * 200, limits) == HAND_OVER  # no CRLF: 414
    assert bytes_needed(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200, limits) == HAND_OVER
    assert bytes_needed(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 10, limits) is None


def test_bare_lf_goes_to_gunicorns_parser():
    assert bytes_needed(b"GET / HTTP/1.1\nHost: x\n", LIMITS) == HAND_OVER
    buf = b"GET / HTTP/1.1\r"
    assert bytes_needed(buf, LIMITS) is None
    assert bytes_needed(buf + b"\nHost: x\r\n", LIMITS, scanned=len(buf)) is None


def test_end_of_head_split_across_reads_is_found():
    first = b"GET / HTTP/1.1\r\nHost: x\r\n\r"
    assert bytes_needed(first, LIMITS) is None
    assert bytes_needed(first + b"\n", LIMITS, scanned=len(first)) == len(first) + 1


def test_limits_follow_config_and_gunicorn_settings():
    class Cfg:
        limit_request_line = 4094
        limit_request_fields = 10
        limit_request_field_size = 1000

    server = ServerConfig(header_timeout=3, buffer_body=1024, min_body_rate=100)
    limits = EdgeLimits.build(server, Cfg())
    assert limits.header_timeout == 3 and limits.buffer_body == 1024
    assert limits.min_rate == MinRate(100, 5.0)
    assert limits.max_line == 4096
    assert limits.max_head == 4096 + 10 * 1002 + 4
    Cfg.limit_request_line = 0  # gunicorn: unlimited
    assert EdgeLimits.build(server, Cfg()).max_line > 1024 * 1024


# -- the answer and the log -------------------------------------------------------------


def test_timeout_response_is_the_gateway_error_shape():
    raw = timeout_response(timeout_detail("head", EdgeLimits(header_timeout=2)))
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    doc = json.loads(body)
    assert doc["code"] == "request_timeout" and "2s" in doc["error"]
    assert "bytes/s" in timeout_detail("body", LIMITS)


def test_exception_facets():
    assert isinstance(BodyTooSlow("x"), TimeoutError)  # gunicorn's body drain stops on it
    assert not isinstance(HeadTimeout("x"), OSError)  # gthread logs OSErrors with a traceback


def test_slow_client_log_is_one_line_per_interval(caplog):
    now = [100.0]
    log = SlowClientLog(logging.getLogger("test.edge"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.edge"):
        for i in range(50):
            log.closed("head" if i % 2 else "body", ("10.0.0.1", 1234), "too slow")
            log.flush()
        now[0] += 9
        log.flush()
        assert len(caplog.records) == 1
        now[0] += 2
        log.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "10.0.0.1" in lines[0] and "too slow" in lines[0]
    assert "25 in the head" in lines[1] and "24 in the body" in lines[1]
    assert log.total == {"head": 25, "body": 25}


# -- gunicorn settings ------------------------------------------------------------------


@pytest.fixture
def settings_env(tmp_path, monkeypatch):
    def load(server: dict) -> dict:
        import yaml

        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"server": server}))
        monkeypatch.setenv("ODIN_CONFIG", str(path))
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
        monkeypatch.setenv("ODIN_THREADS", "4")
        monkeypatch.delenv("ODIN_WORKERS", raising=False)
        return runpy.run_path(str(ROOT / "odin_gw" / "gunicorn_settings.py"))

    return load


def test_worker_class_names(settings_env):
    assert settings_env({})["worker_class"] == "odin_gw.edge_worker.EdgeWorker"
    assert settings_env({"workerClass": "gthread"})["worker_class"] == "gthread"
    assert settings_env({"workerClass": "sync"})["worker_class"] == "sync"


def test_checkout_conf_and_package_settings_agree(settings_env, monkeypatch):
    package = settings_env({})
    checkout = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    for name in package["__all__"]:
        assert name in checkout, name
        if not callable(package[name]):
            assert checkout[name] == package[name], name
    for name in ("forwarded_allow_ips", "forwarder_headers", "secure_scheme_headers"):
        assert not package[name] and not checkout[name]
