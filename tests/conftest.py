"""Shared fixtures: real upstreams and real gateway processes on loopback."""

from __future__ import annotations

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.upstream import Upstream


@pytest.fixture
def upstream():
    with Upstream("a") as up:
        yield up


@pytest.fixture
def upstream_b():
    with Upstream("b") as up:
        yield up


@pytest.fixture
def gateway_factory():
    """``gateway_factory(config, workers=1, threads=8)`` -> a started GatewayProcess."""
    started: list[GatewayProcess] = []

    def make(config: dict, **kwargs) -> GatewayProcess:
        wait_ready = kwargs.pop("wait_ready", True)
        gw = GatewayProcess(config, **kwargs)
        started.append(gw)
        return gw.start(wait_ready=wait_ready)

    yield make
    for gw in started:
        gw.cleanup()
