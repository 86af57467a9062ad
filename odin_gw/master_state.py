"""What the gunicorn master keeps across re-reads of its settings file.

gunicorn executes the settings file again on ``SIGHUP`` (``gunicorn.conf.py`` even drops
the cached ``odin_gw.gunicorn_settings`` first), so the last configuration that loaded
well lives here, in a module nobody drops: a reload with a bad file keeps it.
"""

from __future__ import annotations

from typing import Any

#: ``{"path": ..., "text": ..., "config": GatewayConfig}`` of the last good load.
LAST_GOOD: dict[str, Any] = {}
