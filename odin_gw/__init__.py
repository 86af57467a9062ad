"""Odin: a WSGI API gateway integrated with Consul Connect, Istio and Linkerd."""

__all__ = ["create_app"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: gunicorn.conf.py imports odin_gw.config in the master, which must not import
    # prometheus_client before PROMETHEUS_MULTIPROC_DIR is set.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
