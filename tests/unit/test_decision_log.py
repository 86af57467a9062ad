"""The debug lines that explain each pick (``odin_gw.decision_log``)."""

from __future__ import annotations

import logging

import pytest

from odin_gw import decision_log
from odin_gw.balancer import Pick
from odin_gw.config import parse_config
from odin_gw.mesh.snapshot import Endpoint, EndpointCheck
from odin_gw.routing import RouteTable

A = Endpoint("10.0.0.1", 80)
B = Endpoint("10.0.0.2", 80)
C = Endpoint("10.0.0.3", 80, healthy=False, status="critical")
D = Endpoint("10.0.0.4", 80, check=EndpointCheck("failing", 1.0, "HTTP 503"))


@pytest.fixture
def route():
    (r,) = RouteTable.from_config(
        parse_config(
            """
services:
  - name: web
    basePath: /web
    targets: [http://10.0.0.1]
    loadBalancing: round-robin
    passiveHealth: {consecutiveFailures: 1}
    circuitBreaker: {consecutiveFailures: 1}
"""
        )
    )
    return r


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lines():
    # A handler on the logger itself: the gateway's logging set-up (other tests) stops
    # propagation at "odin_gw", where caplog would never see these records.
    logger = logging.getLogger("odin_gw.mesh.decision")
    keep, old = Keep(), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    yield lambda: [r.getMessage() for r in keep.records]
    logger.removeHandler(keep)
    logger.setLevel(old)


def test_enabled_follows_the_logger_level():
    logger = logging.getLogger("odin_gw.mesh.decision")
    old = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert not decision_log.enabled()
        logger.setLevel(logging.DEBUG)
        assert decision_log.enabled()
    finally:
        logger.setLevel(old)


def test_a_pick_and_each_skip_with_its_reason(route, lines):
    route.health.failed(B.key)  # consecutiveFailures 1: ejected at once
    everyone = (A, B, C, D)
    healthy = (A, B)  # C is critical in the mesh, D failing its check
    decision_log.explain(route, "rid-1", 1, Pick(A, False), healthy, everyone, [])
    (line,) = lines()
    assert line == (
        f"mesh decision web: request rid-1 attempt 1 -> {A.key} (round-robin over 1 of 4 "
        f"endpoints); skipped {B.key}: ejected by passive health, {C.key}: mesh health "
        f"critical, {D.key}: active health check failing: HTTP 503"
    )


def test_tried_and_circuit_open(route, lines):
    ticket = route.breakers.allow(B.key)
    route.breakers.record(B.key, False, ticket)  # one failure opens it
    decision_log.explain(route, "rid-2", 2, Pick(A, False), (A, B, C), (A, B, C), [C.key])
    (line,) = lines()
    assert f"attempt 2 -> {A.key} (round-robin over 1 of 3 endpoints)" in line
    assert f"{B.key}: circuit open" in line
    assert f"{C.key}: already tried by this request" in line


def test_a_candidate_not_chosen_is_not_listed(route, lines):
    decision_log.explain(route, "rid-3", 1, Pick(A, False), (A, B), (A, B), [])
    (line,) = lines()
    assert line.endswith(f"-> {A.key} (round-robin over 2 of 2 endpoints)")


def test_nothing_left_and_panic(route, lines):
    decision_log.explain(route, "rid-4", 3, Pick(None, False), (A,), (A, C), [A.key])
    decision_log.explain(route, "rid-5", 1, Pick(C, True), (), (A, C), [])
    nothing, panic = lines()
    assert "attempt 3 no endpoint left (0 of 2 routable)" in nothing
    assert f"{A.key}: already tried by this request" in nothing
    assert panic.endswith(
        f"-> {C.key} (panic mode: 0 of 2 healthy, below panicThreshold; round-robin over all)"
    )


def test_a_failing_check_without_a_reason(route, lines):
    silent = Endpoint("10.0.0.5", 80, check=EndpointCheck("failing", 1.0, None))
    decision_log.explain(route, "rid-6", 1, Pick(A, False), (A,), (A, silent), [])
    (line,) = lines()
    assert line.endswith(f"skipped {silent.key}: active health check failing")
