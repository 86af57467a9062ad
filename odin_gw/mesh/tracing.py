"""Trace context for the upstream hop: B3 and W3C ids read, checked and generated.

What comes in, in order of precedence (the first one present is the one read, as
Envoy's Zipkin tracer does; later ones are ignored):

1. ``b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`` or a bare ``b3: 0|1|d``;
2. ``x-b3-traceid`` with ``x-b3-spanid`` (``x-b3-sampled``/``x-b3-flags`` are read
   whenever present: B3 allows a sampling decision without ids);
3. W3C ``traceparent: 00-{traceid}-{parentid}-{flags}``.

Trace ids are 128-bit (32 hex) or, as B3 allows, 64-bit (16 hex); span ids 64-bit. An
id of the wrong length, with a non-hex character or all zero makes the whole context
invalid and a new trace starts, as in Envoy; a sampling decision sent in its own
header (``x-b3-sampled``, ``x-b3-flags``) is still kept. B3 hex is read in any case
and sent lower-case; ``traceparent`` must be lower-case (W3C). ``tracestate`` goes on
unchanged only with the trace it belongs to: a valid ``traceparent`` carrying the trace
id that is continued.

Ids come from the kernel's CSPRNG (:class:`RandomPool`), never from the clock: a trace
or request id that can be guessed lets a client join or collide with another's trace.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from time import time_ns
from typing import NamedTuple

_HEX = "0123456789abcdef"
_ZERO16 = "0" * 16
_ZERO32 = "0" * 32

# x-b3-sampled: "1"/"0", and the "true"/"false" of older Zipkin clients (Envoy takes both).
_B3_SAMPLED = {"1": "1", "0": "0", "true": "1", "false": "0"}
# The sampling state of the single b3 header: "d" is debug, which implies sampled.
_B3_SINGLE_STATE = {"1": ("1", False), "0": ("0", False), "d": ("1", True)}


class RandomPool:
    """Bytes from ``os.urandom`` fetched ``size`` at a time and handed out once each.

    One ``getrandom()`` per ``size`` bytes instead of one per id. Thread-safe: the lock
    guards only the read position; a refill is fetched outside it (``os.urandom``
    releases the GIL and may wait), then swapped in. Two threads refilling at once each
    install their own block and the bytes left in the first are dropped: no byte is ever
    handed out twice. Reset in a forked child, or the workers of one gunicorn master
    would hand out the same ids.
    """

    __slots__ = ("_buf", "_lock", "_pos", "size")

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        """Forget the current block (and any lock a forking thread held)."""
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        """``n`` bytes never handed out before."""
        with self._lock:
            pos = self._pos
            end = pos + n
            if end <= len(self._buf):
                self._pos = end
                return self._buf[pos:end]
        fresh = os.urandom(max(self.size, n))
        with self._lock:
            self._buf = fresh
            self._pos = n
        return fresh[:n]


POOL = RandomPool()
os.register_at_fork(after_in_child=POOL.reset)


def new_span_id() -> str:
    """A random 64-bit span id: 16 lower-case hex digits, never all zero."""
    span = POOL.take(8).hex()
    while span == _ZERO16:  # invalid in B3 and W3C; 1 in 2**64
        span = POOL.take(8).hex()
    return span


def new_trace_id() -> str:
    """A random 128-bit trace id: 32 lower-case hex digits, never all zero."""
    trace = POOL.take(16).hex()
    while trace == _ZERO32:
        trace = POOL.take(16).hex()
    return trace


# The variant nibble of a version-4 UUID is 10xx: 8, 9, a or b.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in _HEX}


def new_request_id() -> str:
    """A random version-4 UUID, the form Envoy gives a missing ``x-request-id``."""
    h = POOL.take(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def sampler(rate: float) -> Callable[[], str]:
    """A function deciding ``"1"`` (sampled) with probability ``rate`` (0..1), else ``"0"``.

    Rates 1 and 0 never draw a random number.
    """
    if rate >= 1.0:
        return _always
    if rate <= 0.0:
        return _never
    # Compare 64 random bits with rate * 2**64: exact enough and no float per request.
    threshold = int(rate * 2.0**64)
    take = POOL.take
    from_bytes = int.from_bytes

    def decide() -> str:
        return "1" if from_bytes(take(8)) < threshold else "0"

    return decide


def _always() -> str:
    return "1"


def _never() -> str:
    return "0"


def trace_id(value: str | None) -> str | None:
    """A B3 trace id (16 or 32 hex digits, any case, not all zero) in lower case, or
    ``None`` when ``value`` is not one."""
    if value is None or (len(value) != 32 and len(value) != 16):
        return None
    value = value.lower()
    # str.strip removes a set of characters from both ends: only all-hex leaves nothing.
    if value.strip(_HEX) or not value.strip("0"):
        return None
    return value


def span_id(value: str | None) -> str | None:
    """A B3 span id (16 hex digits, any case, not all zero) in lower case, or ``None``."""
    if value is None or len(value) != 16:
        return None
    value = value.lower()
    if value.strip(_HEX) or value == _ZERO16:
        return None
    return value


class Inbound(NamedTuple):
    """The trace context a request came with.

    ``trace_id`` (lower-case, 16 or 32 hex) and ``span_id`` (the caller's span, which
    becomes the parent of the upstream hop) are both set or both ``None`` (no valid
    context: start a new trace). ``sampled`` is ``"1"``, ``"0"`` or ``None`` (not
    decided: the gateway decides); ``debug`` implies ``sampled == "1"``. ``tracestate``
    is the W3C vendor state to pass on, or ``None``.
    """

    trace_id: str | None = None
    span_id: str | None = None
    sampled: str | None = None
    debug: bool = False
    tracestate: str | None = None
    #: The context came in the single ``b3`` header: it is sent on in that form too.
    single: bool = False


NO_CONTEXT = Inbound()


def parse_b3_single(value: str) -> Inbound:
    """The single ``b3`` header; a malformed one gives :data:`NO_CONTEXT`."""
    parts = value.split("-")
    if len(parts) == 1:  # a sampling decision alone: b3: 0 | 1 | d
        state = _B3_SINGLE_STATE.get(parts[0])
        return NO_CONTEXT if state is None else Inbound(None, None, state[0], state[1], None, True)
    if len(parts) > 4:
        return NO_CONTEXT
    trace, span = trace_id(parts[0]), span_id(parts[1])
    if trace is None or span is None:
        return NO_CONTEXT
    sampled, debug = None, False
    if len(parts) >= 3:
        state = _B3_SINGLE_STATE.get(parts[2])
        if state is None:
            return NO_CONTEXT
        sampled, debug = state
    if len(parts) == 4 and span_id(parts[3]) is None:
        return NO_CONTEXT
    return Inbound(trace, span, sampled, debug, None, True)


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, sampled)`` of a valid W3C ``traceparent``, else ``None``.

    Version ``00`` has exactly four fields; a later version may add fields (its first
    four are read as 00's, as the W3C spec asks); ``ff`` is invalid.
    """
    fields = value.split("-")
    if len(fields) < 4:
        return None
    version, trace, parent, flags = fields[0], fields[1], fields[2], fields[3]
    if len(version) != 2 or len(trace) != 32 or len(parent) != 16 or len(flags) != 2:
        return None
    if (len(fields) > 4 and version == "00") or version == "ff":
        return None
    # Lower-case hex only (W3C), and neither id all zero.
    if (version + trace + parent + flags).strip(_HEX) or trace == _ZERO32 or parent == _ZERO16:
        return None
    return trace, parent, "1" if flags[1] in "13579bdf" else "0"


def extract(environ: Mapping[str, str]) -> Inbound:
    """The :class:`Inbound` trace context of a WSGI request (see the module docstring)."""
    get = environ.get
    single = get("HTTP_B3")
    if single is not None:
        inbound = parse_b3_single(single)
    else:
        flags = get("HTTP_X_B3_FLAGS")
        debug = flags == "1"
        sampled = "1" if debug else _B3_SAMPLED.get(get("HTTP_X_B3_SAMPLED") or "")
        trace = get("HTTP_X_B3_TRACEID")
        if trace is None:
            return _from_traceparent(get, sampled, debug)
        tid, sid = trace_id(trace), span_id(get("HTTP_X_B3_SPANID"))
        if tid is None or sid is None:
            return Inbound(None, None, sampled, debug)
        inbound = Inbound(tid, sid, sampled, debug)
    # A B3 context: tracestate belongs to it only if a valid traceparent says the same trace.
    state = get("HTTP_TRACESTATE")
    if state is not None and inbound.trace_id is not None:
        parent = get("HTTP_TRACEPARENT")
        w3c = parse_traceparent(parent) if parent is not None else None
        if w3c is not None and w3c[0] == f"{inbound.trace_id:0>32}":
            return inbound._replace(tracestate=state)
    return inbound


def _from_traceparent(get, sampled: str | None, debug: bool) -> Inbound:
    """The context of ``traceparent`` (no B3 ids came); a B3 sampling header that came
    alone still decides, else the W3C sampled flag."""
    value = get("HTTP_TRACEPARENT")
    w3c = parse_traceparent(value) if value is not None else None
    if w3c is None:
        return NO_CONTEXT if sampled is None else Inbound(None, None, sampled, debug)
    return Inbound(w3c[0], w3c[1], sampled or w3c[2], debug, get("HTTP_TRACESTATE"))


def traceparent(trace: str, span: str, sampled: str) -> str:
    """The W3C ``traceparent`` of a hop (a 64-bit B3 trace id is zero-padded to 128)."""
    return f"00-{trace:0>32}-{span}-{'01' if sampled == '1' else '00'}"


def b3_single(trace: str, span: str, sampled: str, debug: bool, parent: str | None) -> str:
    """The single ``b3`` header of a hop: ``{trace}-{span}-{1|0|d}[-{parent}]``."""
    state = "d" if debug else sampled
    return f"{trace}-{span}-{state}-{parent}" if parent else f"{trace}-{span}-{state}"


class Attempt:
    """One upstream attempt of a recorded trace: its span id (the one sent upstream),
    the endpoint, when it started and ended (Unix ns), and how it ended (``status``, or
    ``failure``: what went wrong before an answer)."""

    __slots__ = ("end_ns", "endpoint", "failure", "span_id", "start_ns", "status")

    def __init__(self, span: str, endpoint, start_ns: int) -> None:
        self.span_id = span
        self.endpoint = endpoint
        self.start_ns = start_ns
        self.end_ns = 0
        self.status = 0
        self.failure: str | None = None


class Trace:
    """One request's trace, kept on its exchange.

    ``trace_id`` is what goes upstream (the caller's, or a new one), ``caller_span`` the
    caller's span (``None``: the trace starts here), ``sampled`` ``"1"`` or ``"0"``.
    When the request's spans are recorded (tracing enabled and sampled), ``span_id`` is
    the gateway's own span, a child of the caller's and the parent of every attempt,
    ``start_ns`` when it began and ``attempts`` one :class:`Attempt` per try; otherwise
    ``span_id`` is ``None`` and ``attempts`` is ``None``, and each hop's parent is the
    caller's span, as when the gateway is not there.
    """

    __slots__ = (
        "attempts",
        "caller_span",
        "debug",
        "sampled",
        "single",
        "span_id",
        "start_ns",
        "trace_id",
        "tracestate",
    )

    def __init__(self, inbound: Inbound, trace: str, sampled: str, record: bool) -> None:
        self.trace_id = trace
        self.caller_span = inbound.span_id
        self.sampled = sampled
        self.debug = inbound.debug
        self.tracestate = inbound.tracestate
        self.single = inbound.single
        if record:
            self.span_id: str | None = new_span_id()
            self.start_ns = time_ns()
            self.attempts: list[Attempt] | None = []
        else:
            self.span_id = None
            self.start_ns = 0
            self.attempts = None

    @property
    def hop_parent(self) -> str | None:
        """The parent of an upstream hop's span: the gateway's span when recorded, else
        the caller's (``None``: none)."""
        return self.span_id or self.caller_span

    def attempt_ended(self, status: int, failure: str | None = None) -> None:
        """Close the current attempt (a recorded trace only)."""
        attempts = self.attempts
        if attempts:
            last = attempts[-1]
            if not last.end_ns:
                last.end_ns = time_ns()
                last.status = status
                last.failure = failure
