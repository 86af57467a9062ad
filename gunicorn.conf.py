"""gunicorn settings for Odin: ``gunicorn -c gunicorn.conf.py wsgi:app`` from a checkout.

The settings live in the package (``odin_gw/gunicorn_settings.py``, also what
``odin-gw run`` uses); this file re-exports them. The config file (``ODIN_CONFIG``,
default ``config.yaml``) is validated there, in the master, so a bad file stops gunicorn
before any worker starts, with the same messages as ``odin-gw check-config``.
"""

import sys

# gunicorn executes this file again on SIGHUP: re-read the gateway config then too.
sys.modules.pop("odin_gw.gunicorn_settings", None)
from odin_gw.gunicorn_settings import *  # noqa: E402, F403
