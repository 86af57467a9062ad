"""gunicorn entry point inside the package: ``gunicorn ... odin_gw.wsgi_entry:app``.

What ``odin-gw run`` serves, so an installed package needs no checkout's ``wsgi.py``.
The config path comes from ``ODIN_CONFIG`` (default ``config.yaml``).
"""

from odin_gw import create_app

app = create_app()
