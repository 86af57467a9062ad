"""gunicorn entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The config path comes from ``ODIN_CONFIG`` (default ``config.yaml``).
"""

from odin_gw import create_app

app = create_app()
