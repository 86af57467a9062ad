"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def state_dir(tmp_path):
    """A private (0700) state dir, as the gateway's shared counters require."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return str(path)
