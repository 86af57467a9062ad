"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.support.fault_backend import FaultBackend
from tests.support.upstream import free_port


@pytest.fixture
def backends():
    """Three backend processes, ``a``, ``b`` and ``c``, for fault injection."""
    started = [FaultBackend(n, free_port()).start() for n in ("a", "b", "c")]
    yield started
    for b in started:
        b.stop()
