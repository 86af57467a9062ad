"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from flask import Flask

from odin_gw.app import create_app
from odin_gw.config import build_config


@pytest.fixture
def state_dir(tmp_path):
    """A private (0700) state dir, as the gateway's shared counters require."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return str(path)


@contextmanager
def admin_app(token: str) -> Iterator[Flask]:
    """An app (no mesh threads) with admin token ``token`` and one static service
    ``web`` at ``/web`` whose target nobody listens on; its gateway stopped afterwards."""
    config = build_config(
        {
            "admin": {"token": token},
            "services": [{"name": "web", "basePath": "/web", "targets": ["http://127.0.0.1:9"]}],
        },
        env={},
    )
    app = create_app(config, start=False)
    try:
        yield app
    finally:
        app.extensions["odin"].stop()
