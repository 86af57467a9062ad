"""Access log lines: one per request, whatever the client put in its path."""

import json

import pytest

from odin_gw.accesslog import AccessLog, escape
from odin_gw.proxy.exchange import Exchange


def exchange(path: str, method: str = "GET", client: str = "192.0.2.7") -> Exchange:
    ex = Exchange({"PATH_INFO": path, "REQUEST_METHOD": method, "REMOTE_ADDR": client})
    ex.status = 200
    ex.service = "web"
    ex.response_bytes = 12
    return ex


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/plain/path-1.json", "/plain/path-1.json"),
        ("/a\nb", "/a\\x0Ab"),
        ("/a\r\nINFO forged", "/a\\x0D\\x0AINFO\\x20forged"),
        ('/q"\\', "/q\\x22\\x5C"),
        ("/\x00\x1b\x7f", "/\\x00\\x1B\\x7F"),
        ("/caf\xc3\xa9", "/caf\\xC3\\xA9"),  # PATH_INFO holds bytes as Latin-1
        ("/\u2028", "/\\xE2\\x80\\xA8"),
        ("/\xff\u0100", "/\\xFF\\xC4\\x80"),  # the last Latin-1 byte, the first beyond
        ("/\ud800", "/\\xED\\xA0\\x80"),  # a lone surrogate still becomes bytes
    ],
)
def test_escape_like_nginx(text, expected):
    assert escape(text) == expected


def test_text_line_is_one_line_with_client():
    log = AccessLog(json_lines=False)
    line = log._format(0.0, exchange("/a\n2026-01-01 forged"), 0.001)
    assert line.count("\n") == 1 and line.endswith("\n")
    assert " GET /a\\x0A2026-01-01\\x20forged 200 service=web " in line
    assert " client=192.0.2.7 " in line and line.rstrip().endswith("12B")


def test_text_line_without_client():
    line = AccessLog(json_lines=False)._format(0.0, exchange("/", client=""), 0.001)
    assert " client=- " in line


def test_json_line_is_one_line_and_round_trips():
    log = AccessLog(json_lines=True)
    path = '/a\n{"level":"forged"}\u2028\x00'
    line = log._format(0.0, exchange(path), 0.001)
    assert line.count("\n") == 1
    doc = json.loads(line)
    assert doc["path"] == path and doc["client"] == "192.0.2.7" and doc["bytes"] == 12
