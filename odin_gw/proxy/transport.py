"""Upstream connections: pools, one exchange on a pooled connection, the answer's framing.

This is the one module that touches private parts of urllib3 (``_get_conn``,
``_put_conn``), http.client (``_read_status``, ``_check_close``, ``_MAXLINE``,
``_MAXHEADERS``), the email package (``Message._headers``: the answer's header block
is parsed here, not by the email feed parser), the socket module
(``SocketIO._sock``, ``socket._io_refs``) and werkzeug (``Headers._list``);
``tests/unit/test_transport.py`` pins each behaviour relied on, so an upgrade that
changes one fails there and nowhere else.

Pools belong to a ``requests`` adapter mounted on the worker's ``requests.Session``:
the session is the mount table (``session.get_adapter``), and a TLS material change
mounts a new adapter whose pools start afresh while requests in flight finish on the
old ones. The forwarder calls the pools directly instead of ``Session.request``, whose
per-call merging costs more than the rest of the hot path together.
"""

from __future__ import annotations

import http.client
import io
import re
import socket
import ssl
import threading
import time
from collections.abc import MutableMapping

import requests
from requests.adapters import BaseAdapter
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection, _ResponseOptions
from urllib3.exceptions import ClosedPoolError, HTTPError, InvalidHeader
from urllib3.util import SKIP_HEADER, create_urllib3_context
from werkzeug.datastructures import Headers

from ..mesh.identity import IdentityCheckingHTTPSConnection
from ..mesh.snapshot import Endpoint
from ..mesh.tls import TlsMaterial
from .retry import Failure

monotonic = time.monotonic

# -- transport failures, classified for the retry policy ---------------------------------


class TransportError(Exception):
    """An attempt failed; ``failure`` says how, for :class:`~.retry.RetryPolicy`."""

    failure = Failure.RESET


class ConnectFailed(TransportError):
    """No connection (or TLS session) could be made: nothing was sent upstream."""

    failure = Failure.CONNECT


class StaleConnection(TransportError):
    """A reused keep-alive connection was closed before any byte of an answer came."""

    failure = Failure.STALE


class ResetAfterSend(TransportError):
    """The connection broke after the request (or part of it) was sent."""

    failure = Failure.RESET


class HeadTimeout(TransportError):
    """No complete answer head within the deadline (or the upstream stopped reading)."""

    failure = Failure.TIMEOUT


class InvalidResponse(TransportError):
    """The upstream's answer head breaks HTTP/1.1 framing or header rules."""

    failure = Failure.PROTOCOL


class _BadHead(http.client.HTTPException):
    """Raised inside http.client's parse; becomes :class:`InvalidResponse`."""


# -- reading the answer head under a deadline ---------------------------------------------

# Every interim answer is skipped; more than this many is a broken peer.
MAX_INTERIM = 32

# The end of the header block, searched right after the status line.
_HEAD_END = re.compile(rb"\n\r?\n")
# Control characters other than HTAB, CR and LF; a CR not ending a line and obs-fold (a
# line starting with SP/HTAB) are checked with bytes counts beside it: RFC 9110 5.5 /
# RFC 9112 2.2, 5.2. nginx ("upstream sent invalid header") and Envoy both answer 502.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A header name as the email parser http.client uses accepts it: printable ASCII but ":".
_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# Framing headers that need a closer look than http.client gives them: any
# Transfer-Encoding, or a second Content-Length line. Spelled out per letter instead of
# IGNORECASE, and searched in a block that starts with "\n": a tenth of the cost.
_ODD_FRAMING = re.compile(
    rb"\n(?:[Tt][Rr][Aa][Nn][Ss][Ff][Ee][Rr]-[Ee][Nn][Cc][Oo][Dd][Ii][Nn][Gg][ \t]*:"
    rb"|[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh][ \t]*:[^\n]*"
    rb"(?:\n[^\n]*)*?\n[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh][ \t]*:)"
)
_DIGITS = frozenset("0123456789")


class _TimedReader(socket.SocketIO):
    """The raw reader under an answer: a deadline for the head, an idle bound after it.

    http.client reads the head through a buffered file on this. While ``deadline`` is
    set, each receive gets the time left as its socket timeout (the first one uses the
    timeout urllib3 has just set to that value), so a backend dripping a byte a second
    cannot stretch the head past the deadline. After the head, the first receive of the
    body sets the idle timeout once: no extra syscall when the body came with the head.
    """

    def __init__(self, sock, deadline: float) -> None:
        super().__init__(sock, "rb")
        sock._io_refs += 1  # as socket.makefile(): the fd outlives conn.close() until we close
        self.deadline: float | None = deadline
        self.idle: float | None = None
        self.started = False
        self.answered = False  # any byte of an answer arrived

    def makefile(self, mode: str) -> io.BufferedReader:
        # http.client.HTTPResponse asks its "socket" for a file: this reader, buffered.
        return io.BufferedReader(self)

    def readinto(self, b) -> int | None:
        deadline = self.deadline
        if deadline is None:
            idle = self.idle
            if idle is not None:
                self._sock.settimeout(idle)
                self.idle = None
            return super().readinto(b)
        if self.started:
            left = deadline - monotonic()
            if left <= 0:
                raise TimeoutError("no complete answer head before the deadline")
            self._sock.settimeout(left)
        self.started = True
        n = super().readinto(b)
        if n:
            self.answered = True
        return n

    def body_mode(self, idle: float) -> None:
        """The head is in: from now on each silence is bounded by ``idle``.

        The socket still has the head's timeout, the time that was left: when that is
        within 2% under ``idle`` (the default, ``idleTimeout`` = ``timeout``, and a quick
        head), it stays, sparing a syscall per answer.
        """
        self.deadline = None
        current = self._sock.gettimeout()
        if current is None or not idle * 0.98 <= current <= idle:
            self.idle = idle


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, reading past interim answers and refusing bad heads.

    http.client skips ``100 Continue`` only: a ``103 Early Hints`` would be taken for the
    answer and the real one left unread on the connection. Here every 1xx but 101 is
    read and dropped (RFC 9110 15.2: a proxy may drop interim answers it does not relay);
    a 101 is refused since the gateway never forwards ``Upgrade``. The raw head is
    checked once, in C: the header block is usually in the read buffer after the status
    line, so one regex over it costs next to nothing; only a head split across reads is
    re-read line by line.
    """

    reusable = True
    _wire = None  # the wire's file while the head is parsed from memory
    _odd = False  # framing headers need a closer look
    _block = b""  # the header lines (each ending in "\n"), as _check_head found them
    _take = 0  # bytes of the reader those lines and the blank line after them take

    def _read_status(self):
        for _ in range(MAX_INTERIM + 1):
            version, status, reason = super()._read_status()
            if status >= 200 or status < 100:
                self._check_head()
                return version, status, reason
            if status == 101:
                raise _BadHead("101 Switching Protocols, but no upgrade was asked for")
            http.client.parse_headers(self.fp)  # an interim answer's headers: dropped
        raise _BadHead(f"more than {MAX_INTERIM} interim (1xx) answers")

    def _check_head(self) -> None:
        fp = self.fp
        buffered = fp.peek()
        if buffered[:2] == b"\r\n" or buffered[:1] == b"\n":  # no header fields at all
            self._block = b""
            self._take = 2 if buffered[:1] == b"\r" else 1
            return
        found = _HEAD_END.search(buffered)
        if found is not None:
            end = found.start() + 1
            block = buffered
            self._take = found.end()
        else:  # the head did not come in one read: take its lines, parse them from memory
            lines = []
            while True:
                line = fp.readline(http.client._MAXLINE + 1)
                if len(line) > http.client._MAXLINE:
                    raise http.client.LineTooLong("header line")
                lines.append(line)
                if len(lines) > http.client._MAXHEADERS:
                    raise http.client.HTTPException("too many header lines")
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise _BadHead("connection closed in the middle of the answer head")
            block = b"".join(lines)
            end = len(block) - len(lines[-1])
            self._take = len(block)
            self._wire = fp
            self.fp = io.BytesIO(block)
        # The header lines, each after a "\n" (the status line's is already consumed).
        lines_ = b"\n" + block[:end]
        if (
            _CONTROL.search(lines_) is not None
            or lines_.count(b"\r") != lines_.count(b"\r\n")
            or b"\n " in lines_
            or b"\n\t" in lines_
        ):
            raise _BadHead("invalid character or folded line in the answer's header block")
        if _ODD_FRAMING.search(lines_) is not None:
            self._odd = True
        self._block = block[:end]

    def _parse_headers(self) -> http.client.HTTPMessage:
        """The header block ``_check_head`` checked, as http.client's ``HTTPMessage``,
        parsed directly and consumed from the reader.

        http.client hands the block to the email package's feed parser, a quarter of the
        gateway's own CPU per request. The block is already known to be free of control
        characters, bare CRs and folded lines, so each line is ``name: value``, or the
        answer is refused, where the email parser would have turned the line and the
        rest of the block into a "body" and flagged a defect. Values are kept as compat32
        keeps them: leading SP/HTAB dropped, the rest as sent, Latin-1.
        """
        block = self._block
        if len(block) > http.client._MAXLINE * http.client._MAXHEADERS:
            raise http.client.HTTPException("answer head too large")
        self.fp.read(self._take)
        msg = http.client.HTTPMessage()
        if not block:
            return msg
        lines = block.split(b"\n")
        lines.pop()  # after the last line's "\n"
        if len(lines) > http.client._MAXHEADERS:
            raise http.client.HTTPException(f"got more than {http.client._MAXHEADERS} headers")
        store = msg._headers  # compat32: header_source_parse stores (name, value) as is
        for line in lines:
            if len(line) > http.client._MAXLINE:
                raise http.client.LineTooLong("header line")
            name, colon, value = line.partition(b":")
            if not colon or not name or _NAME.fullmatch(name) is None:
                raise _BadHead(f"malformed header line {line[:80]!r} in the answer")
            store.append(
                (name.decode("latin-1"), value.rstrip(b"\r").lstrip(b" \t").decode("latin-1"))
            )
        return msg

    def begin(self) -> None:
        # http.client's begin, with the header block parsed by _parse_headers.
        if self.headers is not None:
            return
        try:
            version, status, reason = self._read_status()
            self.code = self.status = status
            self.reason = reason.strip()
            if version in ("HTTP/1.0", "HTTP/0.9"):
                self.version = 10
            elif version.startswith("HTTP/1."):
                self.version = 11
            else:
                raise http.client.UnknownProtocol(version)
            self.headers = self.msg = self._parse_headers()
        finally:
            if self._wire is not None:
                self.fp, self._wire = self._wire, None
        tr_enc = self.headers.get("transfer-encoding")
        if tr_enc and tr_enc.lower() == "chunked":
            self.chunked = True
            self.chunk_left = None
        else:
            self.chunked = False
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True
        if self.length == 0 and self.chunked:
            self.chunked = False  # HEAD, 204, 304: no body whatever the framing headers say
        if self._odd or (self.length is None and not self.chunked):
            self._check_framing()

    def _check_framing(self) -> None:
        msg = self.msg
        te = msg.get_all("transfer-encoding")
        lengths = msg.get_all("content-length")
        if te:
            if len(te) > 1 or te[0].strip().lower() != "chunked":
                # nginx: "upstream sent unknown Transfer-Encoding" -> 502.
                raise _BadHead(f"unsupported Transfer-Encoding {', '.join(te)!r}")
            if lengths:
                # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and an
                # intermediary that forwards such a message removes the length first
                # (Envoy's allow_chunked_length does the same); the framing is suspect,
                # so the connection is not reused.
                del msg["content-length"]
                self.reusable = False
            return
        if not lengths:
            return  # delimited by close: http.client reads to the end
        values = {v.strip() for line in lengths for v in line.split(",")}
        if len(values) != 1:
            raise _BadHead(f"different Content-Length values {', '.join(lengths)!r}")
        value = values.pop()
        if not value or not _DIGITS.issuperset(value):
            raise _BadHead(f"invalid Content-Length {value!r}")
        if len(lengths) > 1 or "," in lengths[0]:
            # Identical repeats may be folded into one (RFC 9112 6.3).
            del msg["content-length"]
            msg["Content-Length"] = value
        if self.length is None:
            self.length = 0 if self._method == "HEAD" or self.status in (204, 304) else int(value)
            self.will_close = self._check_close()


class _Framed:
    """Connection mix-in: answers are read by :class:`_FinalResponse` under a deadline."""

    head_deadline = 0.0
    reader: _TimedReader | None = None
    answer: _FinalResponse | None = None
    keep_alive = True
    home: HTTPConnectionPool | None = None  # the pool to give the connection back to

    def response_class(self, sock, debuglevel=0, method=None, url=None) -> _FinalResponse:
        # http.client calls self.response_class(self.sock, method=...): a method here.
        reader = _TimedReader(sock, self.head_deadline)
        self.reader = reader
        answer = _FinalResponse(reader, method=method)
        self.answer = answer
        return answer


class UpstreamHTTPConnection(_Framed, HTTPConnection):
    """Plain HTTP to an upstream."""


class UpstreamHTTPSConnection(_Framed, HTTPSConnection):
    """TLS to a static target: chain and hostname checked, no client certificate."""


class MeshHTTPSConnection(_Framed, IdentityCheckingHTTPSConnection):
    """Mesh mTLS: the mesh CA, our workload certificate, the peer's SPIFFE ID checked."""


# -- one exchange --------------------------------------------------------------------------

_SEND_FAILED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def acquire(session: UpstreamSession, endpoint: Endpoint):
    """(pool, connection) for ``endpoint`` from the session's current adapter.

    A pool closed under us (the endpoint left the snapshot, or TLS rotation replaced the
    adapter, between picking the endpoint and taking a connection) is looked up again
    on the current adapter: such a race never fails the request.
    """
    for _ in range(3):
        try:
            pool = session.adapter.pool_for(endpoint)
        except ssl.SSLError as exc:  # e.g. an unreadable caFile: nothing can be sent
            raise ConnectFailed(str(exc)) from exc
        try:
            return pool, pool._get_conn()
        except ClosedPoolError:
            continue
    raise ConnectFailed("connection pool kept closing")


def open_response(
    session: UpstreamSession,
    endpoint: Endpoint,
    method: str,
    target: str,
    body,
    headers: MutableMapping[str, str],
    chunked: bool,
    deadline: float,
    timeout: float,
    connect_timeout: float,
    idle_timeout: float,
    fresh: bool = False,
) -> BaseHTTPResponse:
    """Send one request on a pooled connection; return the answer with its body unread.

    ``deadline`` (monotonic) bounds the wait for the answer head, whatever the pace of
    its bytes; with a streamed body (neither ``bytes`` nor ``None``) it is restarted as
    ``timeout`` from the moment the body is sent (Envoy starts its route timeout when the
    downstream request is complete). ``idle_timeout`` bounds each send of the body and
    each silence while the answer's body is read. The target is sent byte for byte.

    Raises a :class:`TransportError` (ConnectFailed, StaleConnection, ResetAfterSend,
    HeadTimeout, InvalidResponse); the client's own failures (``ClientDisconnected``)
    pass through. Give the answer back with :func:`release`. ``fresh``: never reuse a
    pooled connection (the retry after a stale one).
    """
    pool, conn = acquire(session, endpoint)
    if fresh and conn.sock is not None:
        conn.close()
    fresh = conn.sock is None
    try:
        if fresh:
            left = deadline - monotonic()
            if left <= 0:
                raise HeadTimeout("the deadline passed before connecting")
            conn.timeout = min(connect_timeout, left)
            conn.keep_alive = True
            try:
                conn.connect()
            except (OSError, HTTPError, ssl.SSLError, ssl.CertificateError) as exc:
                raise ConnectFailed(str(exc)) from exc
        conn.timeout = idle_timeout  # each send of the request
        conn.reader = None
        sent_error = None
        try:
            if not chunked and (body is None or isinstance(body, bytes)):
                send_head(conn, method, target, headers, body)
            else:
                # A streamed body: urllib3 sends it; the head's cost is small beside it.
                # A proxy adds no User-Agent or Accept-Encoding of its own (neither nginx
                # nor Envoy does); urllib3 and http.client would, unless told to skip them.
                if "user-agent" not in headers:
                    headers["User-Agent"] = SKIP_HEADER
                if "accept-encoding" not in headers:
                    headers["Accept-Encoding"] = SKIP_HEADER
                conn.request(
                    method,
                    target,
                    body=body,
                    headers=headers,
                    chunked=chunked,
                    preload_content=False,
                    decode_content=False,
                )
        except ssl.SSLError as exc:
            if fresh:
                # TLS 1.3 ends the handshake on our side before the peer checks our
                # certificate: a refusal (an alert, or the session cut) meets the first
                # write. Nothing of the request reached the application.
                raise ConnectFailed(f"the peer ended the TLS session: {exc}") from exc
            sent_error = exc
            conn.keep_alive = False
        except _SEND_FAILED as exc:
            # The upstream may have answered and closed before reading all of the body
            # (a 401 or 413 to an upload): read that answer, as nginx does.
            sent_error = exc
            conn.keep_alive = False
        except TimeoutError as exc:
            raise HeadTimeout(f"upstream stopped reading the request body: {exc}") from exc
        if body is not None and not isinstance(body, bytes):
            deadline = monotonic() + timeout
        left = deadline - monotonic()
        if left <= 0:
            raise HeadTimeout("no answer head before the deadline")
        conn.timeout = left
        conn.head_deadline = deadline
        try:
            response = conn.getresponse()
        except TimeoutError as exc:
            raise HeadTimeout(str(exc) or "no answer head before the deadline") from exc
        except (_BadHead, InvalidHeader) as exc:
            raise InvalidResponse(str(exc)) from exc
        except (OSError, http.client.HTTPException) as exc:
            reader = conn.reader
            nothing = isinstance(exc, http.client.RemoteDisconnected) or (
                reader is None or not reader.answered
            )
            if fresh and nothing and is_tls_alert(exc):
                # The peer's verdict on our certificate (TLS 1.3 sends it after our side
                # of the handshake is done): it refused the session before any request.
                raise ConnectFailed(f"the peer refused the TLS session: {exc}") from exc
            if nothing and not fresh:
                raise StaleConnection(str(exc)) from (sent_error or exc)
            if isinstance(exc, http.client.HTTPException) and not isinstance(
                exc, http.client.RemoteDisconnected | http.client.IncompleteRead
            ):
                raise InvalidResponse(str(exc) or type(exc).__name__) from exc
            raise ResetAfterSend(str(sent_error or exc)) from (sent_error or exc)
        conn.reader.body_mode(idle_timeout)
        if not conn.answer.reusable:
            conn.keep_alive = False
    except BaseException:
        conn.close()
        pool._put_conn(conn)
        raise
    # The answer knows its connection but not its pool: urllib3 would put the connection
    # back by itself once the body is read (not knowing about keep_alive); release() does.
    conn.home = pool
    response._connection = conn
    return response


def is_tls_alert(exc: BaseException) -> bool:
    """An alert from the peer's TLS stack (``SSLV3_ALERT_...``/``TLSV13_ALERT_...``): sent
    only by TLS, never after a request was taken (a server that took it answers in HTTP)."""
    return isinstance(exc, ssl.SSLError) and "_ALERT_" in str(getattr(exc, "reason", "") or "")


# urllib3 sends a zero length for other methods without a body; so does the fast path.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "TRACE", "OPTIONS", "CONNECT"})


def send_head(conn, method: str, target: str, headers, body: bytes | None) -> None:
    """Send a request whose body is ``None`` or ``bytes``: what ``conn.request`` does,
    at a fifth of its cost.

    urllib3's ``request`` runs two Python-level checks and a generator per header (about
    22 µs for a dozen headers); here the header block is formatted in one pass and
    checked once, in C, for the same things http.client refuses: CR or LF inside a name
    or value (a header injected upstream) and other control characters but HTAB. The
    request line goes through ``putrequest``, which validates method and target and
    moves http.client's state machine, and ``endheaders`` sends the head in one write;
    ``getresponse`` then works as after ``request`` (``_response_options`` is what
    urllib3's ``request`` would have set: pinned in tests/unit/test_transport.py). No
    User-Agent or Accept-Encoding is added.
    """
    lines = [f"{name}: {value}" for name, value in headers.items()]
    if "content-length" not in headers:
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif method not in _NO_BODY_METHODS:
            lines.append("Content-Length: 0")
    block = "\r\n".join(lines).encode("latin-1")
    breaks = len(lines) - 1
    if (
        block.count(b"\r") != breaks
        or block.count(b"\n") != breaks
        or block.count(b"\r\n") != breaks
        or _CONTROL.search(block) is not None
    ):
        raise ValueError("a request header contains CR, LF or another control character")
    conn._response_options = _ResponseOptions(
        request_method=method,
        request_url=target,
        preload_content=False,
        decode_content=False,
        enforce_content_length=True,
    )
    conn.sock.settimeout(conn.timeout)
    conn.putrequest(method, target, skip_host="host" in headers, skip_accept_encoding=True)
    if lines:
        conn._buffer.append(block)
    conn.endheaders()
    if body:
        conn.send(body)


def release(response: BaseHTTPResponse) -> None:
    """Give the answer's connection back; safe to call more than once.

    Pooled only when the answer was read to its end and nothing about it forbids reuse;
    otherwise closed, because unread bytes would become the next request's answer.
    """
    conn = response.connection
    if conn is None:
        return
    response._connection = None
    if not response.isclosed() or not conn.keep_alive:
        conn.close()
    conn.home._put_conn(conn)


def relay_headers(headers: Headers, items: list[tuple[str, str]]) -> None:
    """Make ``headers`` hold exactly ``items`` (as parsed and checked upstream).

    werkzeug's ``Headers`` is a thin wrapper around such a list; handing the list over
    skips re-validating every header the upstream's parse has already checked.
    """
    headers._list = items


def new_connection(session, endpoint: Endpoint):
    """A new, never pooled, connection to ``endpoint`` (an Upgrade tunnel's), made by its
    pool: the same class, TLS context, SNI, hostname or SPIFFE identity expectations as
    the forwarder's."""
    for _ in range(3):
        try:
            pool = session.adapter.pool_for(endpoint)
        except ssl.SSLError as exc:  # e.g. an unreadable caFile: nothing can be sent
            raise ConnectFailed(str(exc)) from exc
        except ClosedPoolError:  # TLS material replaced under us: the new adapter's
            continue
        return pool._new_conn()
    raise ConnectFailed("connection pool kept closing")


# -- pools and TLS -------------------------------------------------------------------------


class MeshAdapter(BaseAdapter):
    """The pools for one version of the mesh TLS material, mounted on the session.

    Pools are keyed by ``Endpoint.pool_key``: scheme, address, port, expected identity
    and, for static targets, the CA that verifies them. Mesh TLS (our workload
    certificate, the mesh CA, SPIFFE identity) is for mesh endpoints only; a static
    ``https`` target from the config is verified against the system CAs, or its
    service's ``caFile``, with the hostname checked, and never sees our certificate.
    """

    def __init__(self, material: TlsMaterial | None, pool_size: int) -> None:
        super().__init__()
        self.material = material
        self.pool_size = pool_size
        self.closed = False
        self._pools: dict[str, tuple[str, HTTPConnectionPool]] = {}
        self._contexts: dict[str | None, ssl.SSLContext] = {}
        self._lock = threading.Lock()  # guards pool creation only; never held across I/O

    def send(self, request, **kwargs):
        raise NotImplementedError(
            "the gateway sends through pool_for(); Session.request is too slow per request"
        )

    def pool_for(self, endpoint: Endpoint) -> HTTPConnectionPool:
        """The pool for ``endpoint``; created on first use. ``ClosedPoolError`` once closed."""
        entry = self._pools.get(endpoint.pool_key)
        if entry is not None:
            return entry[1]
        with self._lock:
            if self.closed:
                raise ClosedPoolError(None, "adapter closed (TLS material replaced)")
            entry = self._pools.get(endpoint.pool_key)
            if entry is None:
                entry = (endpoint.key, self._new_pool(endpoint))
                self._pools[endpoint.pool_key] = entry
        return entry[1]

    def _new_pool(self, endpoint: Endpoint) -> HTTPConnectionPool:
        common = {"maxsize": self.pool_size, "block": False, "retries": False}
        if endpoint.scheme != "https":
            pool = HTTPConnectionPool(endpoint.address, endpoint.port, **common)
            pool.ConnectionCls = UpstreamHTTPConnection
            return pool
        material = self.material
        if material is not None and not endpoint.static:
            if endpoint.identity or endpoint.identities or material.trust_domain:
                # Mesh peer: chain checked against the mesh CA, identity by SPIFFE ID. SNI
                # only where the mesh names one (Istio's sidecars route inbound by it).
                pool = HTTPSConnectionPool(
                    endpoint.address,
                    endpoint.port,
                    ssl_context=material.context(),
                    assert_hostname=False,
                    server_hostname=endpoint.sni,
                    cert_reqs="CERT_REQUIRED",
                    expected_identity=endpoint.identity,
                    expected_identities=endpoint.identities,
                    trust_domain=material.trust_domain,
                    **common,
                )
                pool.ConnectionCls = MeshHTTPSConnection
                return pool
            # A mesh endpoint named by DNS: our certificate, the mesh CA, hostname checked.
            host = endpoint.host_header.rsplit(":", 1)[0]
            pool = HTTPSConnectionPool(
                endpoint.address,
                endpoint.port,
                ssl_context=material.context(),
                assert_hostname=host,
                server_hostname=host,
                cert_reqs="CERT_REQUIRED",
                **common,
            )
            pool.ConnectionCls = UpstreamHTTPSConnection
            return pool
        pool = HTTPSConnectionPool(
            endpoint.address,
            endpoint.port,
            ssl_context=self._public_context(endpoint.ca_file),
            cert_reqs="CERT_REQUIRED",
            **common,
        )
        pool.ConnectionCls = UpstreamHTTPSConnection
        return pool

    def _public_context(self, ca_file: str | None) -> ssl.SSLContext:
        # Called under self._lock. No client certificate is ever loaded here.
        ctx = self._contexts.get(ca_file)
        if ctx is None:
            ctx = create_urllib3_context()
            if ca_file:
                try:
                    ctx.load_verify_locations(cafile=ca_file)
                except OSError as exc:  # ssl.SSLError included
                    raise ssl.SSLError(f"caFile {ca_file}: {exc}") from exc
            else:
                ctx.load_default_certs()
            self._contexts[ca_file] = ctx
        return ctx

    def retain(self, keys: set[str]) -> None:
        """Close and forget pools of endpoints (by ``Endpoint.key``) no longer known."""
        with self._lock:
            gone = [k for k, (key, _) in self._pools.items() if key not in keys]
            pools = [self._pools.pop(k)[1] for k in gone]
        for pool in pools:
            pool.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            pools = [pool for _, pool in self._pools.values()]
            self._pools.clear()
        for pool in pools:
            pool.close()  # idle connections close now; busy ones when they come back


class UpstreamSession(requests.Session):
    """The worker's session: the mount table of the current :class:`MeshAdapter`.

    The mesh material lives in the adapter's ``SSLContext``, built from PEM in memory
    (a Consul leaf's key never touches disk), so ``Session.cert``/``verify``, which take
    file paths and only apply to ``Session.request``, stay unused; redirects are never
    followed and environment proxies ignored should anything call it.
    """

    def __init__(self, pool_size: int, material: TlsMaterial | None = None) -> None:
        super().__init__()
        self.trust_env = False
        self.max_redirects = 0
        self.pool_size = pool_size
        self._mount(MeshAdapter(material, pool_size))

    @property
    def adapter(self) -> MeshAdapter:
        """The mounted adapter (one per TLS material version)."""
        return self.adapters["https://"]

    def _mount(self, adapter: MeshAdapter) -> None:
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def use_material(self, material: TlsMaterial | None) -> None:
        """Switch to new TLS material: new adapter and pools; the old ones drain."""
        old = self.adapter
        if old.material is material or (
            old.material is not None
            and material is not None
            and old.material.version == material.version
        ):
            return
        if material is not None:
            material.context()  # fail here, before swapping, if the material is unusable
        self._mount(MeshAdapter(material, self.pool_size))
        old.close()
