"""Trace ids: the CSPRNG pool, generation, and reading B3 / W3C context as Envoy does."""

from __future__ import annotations

import os
import threading
import uuid
import warnings

import pytest

from odin_gw.mesh import tracing
from odin_gw.mesh.tracing import (
    NO_CONTEXT,
    Inbound,
    RandomPool,
    extract,
    new_request_id,
    new_span_id,
    new_trace_id,
    parse_b3_single,
    parse_traceparent,
    sampler,
    span_id,
    trace_id,
    traceparent,
)

TRACE = "463ac35c9f6413ad48485a3953bb6124"
SPAN = "a2fb4a1d1a96d312"
PARENT = "0020000000000001"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
W3C_PARENT = "00f067aa0ba902b7"
HEX = set("0123456789abcdef")


def env(**headers: str) -> dict[str, str]:
    return {"HTTP_" + k.upper(): v for k, v in headers.items()}


# -- the pool ----------------------------------------------------------------------------


def test_pool_hands_out_each_byte_once_and_refills():
    pool = RandomPool(size=16)
    chunks = [pool.take(8) for _ in range(6)]  # three blocks of 16 bytes
    assert all(len(c) == 8 for c in chunks)
    assert len(set(chunks)) == 6
    assert len(pool.take(40)) == 40  # more than a block at once


def test_pool_bytes_come_from_os_urandom(monkeypatch):
    fetched: list[int] = []

    def urandom(n: int) -> bytes:
        fetched.append(n)
        return bytes(range(1, n + 1))

    monkeypatch.setattr(tracing.os, "urandom", urandom)
    pool = RandomPool(size=32)
    assert pool.take(8) == bytes(range(1, 9)) and pool.take(8) == bytes(range(9, 17))
    assert fetched == [32]  # one read for the block, none per id


def test_pool_is_thread_safe_across_refills():
    pool = RandomPool(size=64)  # a refill every 8 takes: races on the swap are likely
    results: list[list[bytes]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def work(out: list[bytes]) -> None:
        start.wait(timeout=10)
        for _ in range(2000):
            out.append(pool.take(8))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    taken = [b for out in results for b in out]
    assert len(taken) == 16000 and len(set(taken)) == 16000


def test_pool_is_reset_in_a_forked_child():
    tracing.POOL.take(1)  # the parent holds a block the child must not reuse
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, tracing.POOL.take(16))
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 16 and child != tracing.POOL.take(16)


# -- generated ids ---------------------------------------------------------------------


def test_new_ids_have_their_shapes_and_differ():
    spans = {new_span_id() for _ in range(1000)}
    traces = {new_trace_id() for _ in range(1000)}
    assert len(spans) == 1000 and len(traces) == 1000
    assert all(len(s) == 16 and set(s) <= HEX for s in spans)
    assert all(len(t) == 32 and set(t) <= HEX for t in traces)


def test_new_ids_are_never_all_zero(monkeypatch):
    blocks = iter([bytes(16), bytes(range(1, 17))])
    pool = RandomPool(size=16)
    monkeypatch.setattr(tracing, "POOL", pool)
    monkeypatch.setattr(tracing.os, "urandom", lambda n: next(blocks))
    assert new_span_id() == "0102030405060708"  # the all-zero draw was skipped


def test_request_ids_are_version_4_uuids():
    ids = [new_request_id() for _ in range(500)]
    assert len(set(ids)) == 500
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_sampler_rates():
    assert {sampler(1.0)() for _ in range(100)} == {"1"}
    assert {sampler(0.0)() for _ in range(100)} == {"0"}
    for rate in (0.25, 0.5):
        decide = sampler(rate)
        hits = sum(decide() == "1" for _ in range(4000))
        # 4000 draws: the standard deviation is at most ~32; 8 of them is never hit by luck.
        assert abs(hits - 4000 * rate) < 250


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACE, TRACE),
        (TRACE.upper(), TRACE),  # B3 hex is read in any case, sent lower-case
        (SPAN, SPAN),  # 64-bit trace ids are allowed by B3
        (None, None),
        ("", None),
        (TRACE[:-1], None),
        (TRACE + "0", None),
        ("0" * 32, None),
        ("0" * 16, None),
        ("g" + TRACE[1:], None),
        ("-" + TRACE[1:], None),
        (" " + TRACE[1:], None),
        ("0x" + TRACE[2:], None),
    ],
)
def test_trace_id(value, expected):
    assert trace_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SPAN, SPAN),
        (SPAN.upper(), SPAN),
        (None, None),
        (TRACE, None),
        ("0" * 16, None),
        (SPAN[:-1] + "z", None),
        ("1_2fb4a1d1a96d31", None),
    ],
)
def test_span_id(value, expected):
    assert span_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{TRACE}-{SPAN}", Inbound(TRACE, SPAN, single=True)),
        (f"{TRACE}-{SPAN}-1", Inbound(TRACE, SPAN, "1", single=True)),
        (f"{TRACE}-{SPAN}-0-{PARENT}", Inbound(TRACE, SPAN, "0", single=True)),
        (f"{TRACE}-{SPAN}-d", Inbound(TRACE, SPAN, "1", True, single=True)),
        (f"{SPAN}-{SPAN}-1", Inbound(SPAN, SPAN, "1", single=True)),
        ("0", Inbound(None, None, "0", single=True)),
        ("1", Inbound(None, None, "1", single=True)),
        ("d", Inbound(None, None, "1", True, single=True)),
        ("x", NO_CONTEXT),
        (f"{TRACE}-{SPAN}-2", NO_CONTEXT),
        (f"{TRACE}-{SPAN}-1-{PARENT}-x", NO_CONTEXT),
        (f"{TRACE}-{SPAN}-1-zz", NO_CONTEXT),
        (f"{TRACE}-{'0' * 16}-1", NO_CONTEXT),
        (f"{'0' * 32}-{SPAN}", NO_CONTEXT),
        (f"{TRACE}", NO_CONTEXT),
        ("", NO_CONTEXT),
    ],
)
def test_parse_b3_single(value, expected):
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{W3C_TRACE}-{W3C_PARENT}-01", (W3C_TRACE, W3C_PARENT, "1")),
        (f"00-{W3C_TRACE}-{W3C_PARENT}-00", (W3C_TRACE, W3C_PARENT, "0")),
        (f"00-{W3C_TRACE}-{W3C_PARENT}-03", (W3C_TRACE, W3C_PARENT, "1")),
        (f"00-{W3C_TRACE}-{W3C_PARENT}-02", (W3C_TRACE, W3C_PARENT, "0")),
        # A later version: its first four fields are read, extra fields allowed.
        (f"01-{W3C_TRACE}-{W3C_PARENT}-01-what-ever", (W3C_TRACE, W3C_PARENT, "1")),
        (f"00-{W3C_TRACE}-{W3C_PARENT}-01-extra", None),  # version 00 has four fields
        (f"ff-{W3C_TRACE}-{W3C_PARENT}-01", None),
        (f"00-{W3C_TRACE.upper()}-{W3C_PARENT}-01", None),  # W3C: lower-case only
        (f"00-{'0' * 32}-{W3C_PARENT}-01", None),
        (f"00-{W3C_TRACE}-{'0' * 16}-01", None),
        (f"00-{W3C_TRACE[:-1]}-{W3C_PARENT}-01", None),
        (f"00-{W3C_TRACE}-{W3C_PARENT}-1", None),
        (f"00-{W3C_TRACE}-{W3C_PARENT}-0x", None),
        (f"00_{W3C_TRACE}-{W3C_PARENT}-01", None),
        ("", None),
    ],
)
def test_parse_traceparent(value, expected):
    assert parse_traceparent(value) == expected


def test_traceparent_pads_a_64_bit_trace_id():
    assert traceparent(TRACE, SPAN, "1") == f"00-{TRACE}-{SPAN}-01"
    assert traceparent(SPAN, SPAN, "0") == f"00-{'0' * 16}{SPAN}-{SPAN}-00"


# -- what a request came with ------------------------------------------------------------

TP = f"00-{W3C_TRACE}-{W3C_PARENT}-01"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, NO_CONTEXT),
        (
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_sampled": "1"},
            Inbound(TRACE, SPAN, "1"),
        ),
        (
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_parentspanid": PARENT},
            Inbound(TRACE, SPAN),  # no decision came: the gateway decides
        ),
        ({"x_b3_traceid": SPAN, "x_b3_spanid": SPAN}, Inbound(SPAN, SPAN)),
        (
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_sampled": "true"},
            Inbound(TRACE, SPAN, "1"),
        ),
        (
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_sampled": "0"},
            Inbound(TRACE, SPAN, "0"),
        ),
        (
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_flags": "1"},
            Inbound(TRACE, SPAN, "1", True),
        ),
        (
            # Debug wins over a "not sampled" that came with it.
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "x_b3_sampled": "0", "x_b3_flags": "1"},
            Inbound(TRACE, SPAN, "1", True),
        ),
        ({"x_b3_sampled": "0"}, Inbound(None, None, "0")),  # a decision without ids
        ({"x_b3_sampled": "maybe"}, NO_CONTEXT),
        # Invalid ids: a new trace, the decision that came with them kept.
        ({"x_b3_traceid": TRACE, "x_b3_sampled": "1"}, Inbound(None, None, "1")),
        ({"x_b3_traceid": "0" * 32, "x_b3_spanid": SPAN}, NO_CONTEXT),
        ({"x_b3_traceid": TRACE, "x_b3_spanid": "xyz"}, NO_CONTEXT),
        # The single header is read first, as Envoy does; invalid, it starts a new trace.
        (
            {"b3": f"{TRACE}-{SPAN}-0", "x_b3_traceid": PARENT * 2, "x_b3_spanid": PARENT},
            Inbound(TRACE, SPAN, "0", single=True),
        ),
        ({"b3": "bogus", "x_b3_traceid": TRACE, "x_b3_spanid": SPAN}, NO_CONTEXT),
        # traceparent when no B3 came; its tracestate with it.
        ({"traceparent": TP}, Inbound(W3C_TRACE, W3C_PARENT, "1")),
        (
            {"traceparent": TP, "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"},
            Inbound(W3C_TRACE, W3C_PARENT, "1", False, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ),
        ({"traceparent": TP, "x_b3_sampled": "0"}, Inbound(W3C_TRACE, W3C_PARENT, "0")),
        ({"traceparent": TP[:-1], "tracestate": "a=1"}, NO_CONTEXT),
        # B3 wins over traceparent; tracestate only when traceparent names the same trace.
        (
            {"x_b3_traceid": TRACE, "x_b3_spanid": SPAN, "traceparent": TP, "tracestate": "a=1"},
            Inbound(TRACE, SPAN),
        ),
        (
            {
                "x_b3_traceid": W3C_TRACE,
                "x_b3_spanid": SPAN,
                "traceparent": TP,
                "tracestate": "a=1",
            },
            Inbound(W3C_TRACE, SPAN, None, False, "a=1"),
        ),
        (
            {
                "b3": f"{W3C_TRACE[16:]}-{SPAN}",  # 64-bit: same trace as the padded W3C id
                "traceparent": f"00-{'0' * 16}{W3C_TRACE[16:]}-{W3C_PARENT}-01",
                "tracestate": "a=1",
            },
            Inbound(W3C_TRACE[16:], SPAN, None, False, "a=1", single=True),
        ),
        ({"tracestate": "a=1"}, NO_CONTEXT),
    ],
)
def test_extract(headers, expected):
    assert extract(env(**headers)) == expected
