"""The "floor": the cheapest honest reverse proxy, as a raw WSGI app.

No framework, no routing, no config: every request is forwarded as is
(method, raw path + query, end-to-end request headers, body) to
``FLOOR_UPSTREAM`` through one module-level pooled urllib3 connection pool,
and the upstream status, end-to-end headers and body are returned.

Run by bench/run.py as::

    FLOOR_UPSTREAM=http://127.0.0.1:PORT PYTHONPATH=<repo> \
        gunicorn -k gthread -w 1 --threads 8 -b 127.0.0.1:PORT bench.floor_app:app
"""

from __future__ import annotations

import os
from urllib.parse import quote

import urllib3

_UPSTREAM = urllib3.util.parse_url(os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8080"))
# One pooled connection per gunicorn thread.
_POOL_SIZE = int(os.environ.get("FLOOR_POOL_MAXSIZE", "8"))

_pool = urllib3.HTTPConnectionPool(
    _UPSTREAM.host,
    _UPSTREAM.port or 80,
    maxsize=_POOL_SIZE,
    retries=False,
    timeout=urllib3.Timeout(connect=5.0, read=30.0),
)

# RFC 9110 section 7.6.1 hop-by-hop headers (plus Host, which urllib3 sets
# to the upstream authority, as a proxy to another origin does).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def _request_headers(environ: dict) -> dict[str, str]:
    drop = set(_HOP_BY_HOP)
    drop.add("host")
    connection = environ.get("HTTP_CONNECTION")
    if connection:
        drop.update(t.strip().lower() for t in connection.split(","))
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if not value:
                continue
            name = key.replace("_", "-").lower()
        else:
            continue
        if name not in drop:
            headers[name] = value
    return headers


def _request_target(environ: dict) -> str:
    raw = environ.get("RAW_URI")  # gunicorn: the request target as received
    if raw:
        return raw
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    path = quote(path.encode("latin-1"), safe="/;=,:@!$&'()*+~") or "/"
    query = environ.get("QUERY_STRING")
    return f"{path}?{query}" if query else path


def _request_body(environ: dict) -> bytes | None:
    length = environ.get("CONTENT_LENGTH")
    if length:
        return environ["wsgi.input"].read(int(length))
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        return environ["wsgi.input"].read()  # gunicorn de-chunks wsgi.input
    return None


def app(environ, start_response):
    try:
        resp = _pool.urlopen(
            environ["REQUEST_METHOD"],
            _request_target(environ),
            body=_request_body(environ),
            headers=_request_headers(environ),
            redirect=False,
            preload_content=True,
            decode_content=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        body = b'{"error":"bad gateway","detail":"%s"}' % type(exc).__name__.encode()
        start_response(
            "502 Bad Gateway",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
    headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP]
    start_response(f"{resp.status} {resp.reason or ''}".rstrip(), headers)
    return [resp.data]
