"""gunicorn settings for Odin, read from the gateway's own config file.

``odin-gw run`` hands this file to gunicorn (``-c <path of this module>``), so an installed
package needs no checkout; the checkout's ``gunicorn.conf.py`` re-exports it for
``gunicorn -c gunicorn.conf.py wsgi:app``. gunicorn executes a config file again on
``SIGHUP``, so a reload re-reads the gateway config.

The config file (``ODIN_CONFIG``, default ``config.yaml``) is validated here, in the
master, so a bad file stops gunicorn before any worker starts, with the same messages as
``odin-gw check-config``.
"""

import os
import shutil
import sys
import tempfile

from odin_gw.config import ConfigError, load_config

__all__ = [
    "accesslog",
    "bind",
    "child_exit",
    "control_socket_disable",
    "errorlog",
    "forwarded_allow_ips",
    "forwarder_headers",
    "graceful_timeout",
    "keepalive",
    "limit_request_field_size",
    "limit_request_fields",
    "limit_request_line",
    "loglevel",
    "on_starting",
    "proc_name",
    "secure_scheme_headers",
    "threads",
    "timeout",
    "worker_class",
    "worker_exit",
    "workers",
]

#: ``server.workerClass`` -> gunicorn worker class.
WORKER_CLASSES = {
    "edge": "odin_gw.edge_worker.EdgeWorker",
    "gthread": "gthread",
    "sync": "sync",
}

_path = os.environ.get("ODIN_CONFIG", "config.yaml")
try:
    _cfg = load_config(_path)
except ConfigError as _exc:
    sys.stderr.write(f"odin-gw: {_exc}\n")
    sys.exit(2)

_server = _cfg.server

bind = [f"{_server.host}:{_server.port}"]  # gunicorn's own -b on the command line wins
# "edge" (default): gthread that gives a request a thread only once it has arrived.
worker_class = WORKER_CLASSES[_server.worker_class]
workers = int(os.environ.get("ODIN_WORKERS") or _server.workers or (os.cpu_count() or 2))
threads = int(os.environ.get("ODIN_THREADS") or _server.threads or 64)
os.environ["ODIN_THREADS"] = str(threads)  # the app sizes its upstream pools from it
# A gthread worker notifies the arbiter from its main loop, so this only catches a worker
# that is truly stuck; slow upstreams are bounded by the per-route timeouts.
timeout = max(30, int(_server.timeout * 2))
graceful_timeout = int(_server.graceful_timeout)
keepalive = int(_server.keepalive)
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = None  # the app writes its own access line (with request id and target)
errorlog = "-"
loglevel = _cfg.logging.level
proc_name = "odin-gw"
# gunicorn would believe SCRIPT_NAME/PATH_INFO/X-Forwarded-Proto headers from loopback
# peers by default, moving a request to another route than the target it forwards. The
# gateway decides forwarding trust itself (server.trustedProxies), so gunicorn trusts no one.
forwarded_allow_ips = ""
forwarder_headers = ""
secure_scheme_headers = {}

# prometheus-client multi-process mode: must be set before any worker imports it.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
    tempfile.gettempdir(), f"odin-gw-{_server.port}-metrics"
)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def on_starting(server):
    # Samples of a previous run would be added to this one's: start empty.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
    for notice in _cfg.notices:
        server.log.warning("config: %s", notice)
    os.environ["ODIN_NOTICES_LOGGED"] = "1"  # workers need not repeat them


def child_exit(server, worker):
    from odin_gw.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    app = getattr(app, "__wrapped__", app)  # the edge worker wraps the app
    gateway = getattr(app, "extensions", {}).get("odin") if app is not None else None
    if gateway is not None:
        gateway.stop()


# gunicorn's control socket is an unauthenticated admin interface at a path shared by
# every gunicorn of the user; the gateway has its own admin API.
control_socket_disable = True
