"""gunicorn settings for Odin, read from the gateway's own config file.

``odin-gw run`` hands this file to gunicorn (``-c <path of this module>``), so an installed
package needs no checkout; the checkout's ``gunicorn.conf.py`` re-exports it for
``gunicorn -c gunicorn.conf.py wsgi:app``. gunicorn executes a config file again on
``SIGHUP``, so a reload re-reads the gateway config.

The config file (``ODIN_CONFIG``, default ``config.yaml``) is validated here, in the
master, so a bad file stops gunicorn before any worker starts, with the same messages as
``odin-gw check-config`` (secret values redacted). On a reload (``SIGHUP``, or
``POST /admin/reload``, which validates first and then signals the master) a bad file is
logged with those messages and the running configuration stays: the previous settings
are kept, and the workers gunicorn starts for the reload get the previous configuration
(workers use the master's validated copy, inherited through fork in
:mod:`odin_gw.master_state`, so what runs is what the master validated; no secret travels
in the environment). A good file becomes the next generation of
:mod:`odin_gw.master_state`; gunicorn starts new workers with it and stops the old ones
gracefully (``server.gracefulTimeout``). See :mod:`odin_gw.reload` for the hand-over of
discovery and for the admin endpoint.

Hooks: ``when_ready``/``pre_fork`` export the addresses gunicorn really bound as
``ODIN_BIND`` (the state dir is keyed on them: ``-b`` wins over ``server.port``) and
``when_ready`` checks the state dir once, in the master, refusing to start with one clear
message when it is unsafe. With ``--preload`` the app is built in the master but its mesh
threads start in each worker (``post_worker_init``), never in the master; ``on_reload``
builds it again from a new configuration. ``post_worker_init`` also makes ``SIGTERM``
hand discovery over at once (:func:`odin_gw.reload.hand_over_discovery_on_exit`).
"""

import glob
import os
import shutil
import sys
import tempfile

from odin_gw import master_state
from odin_gw.config import ConfigError
from odin_gw.process_limits import raise_open_files_limit

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
    "on_reload",
    "on_starting",
    "post_worker_init",
    "pre_fork",
    "proc_name",
    "secure_scheme_headers",
    "threads",
    "timeout",
    "when_ready",
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
# A later read of this file in a process that already loaded a configuration is a reload
# (the module state survives gunicorn's re-reads, and --daemon's fork after the first).
_reload = bool(master_state.LAST_GOOD)
# Also an app built in this process is a preloaded one (its threads start after fork);
# on_starting says it again after --daemon's fork changed the pid.
os.environ["ODIN_GUNICORN_MASTER_PID"] = str(os.getpid())

try:
    _cfg, _text = master_state.read_config(_path)
except ConfigError as _exc:
    master_state.record_refused(_path, _exc.problems)
    _problems = "\n".join(f"  {p}" for p in _exc.problems)
    if not _reload:
        sys.stderr.write(f"odin-gw: {_exc}\n")
        sys.exit(2)
    sys.stderr.write(
        f"odin-gw: reload refused, the running configuration stays (generation "
        f"{master_state.LAST_GOOD['generation']}): {_path}: invalid configuration\n"
        f"{_problems}\n"
    )
    sys.stderr.flush()
    _cfg, _text = master_state.LAST_GOOD["config"], master_state.LAST_GOOD["text"]
else:
    _generation = master_state.record_applied(_path, _text, _cfg)
    if _reload:
        sys.stderr.write(f"odin-gw: configuration {_path} reloaded (generation {_generation})\n")
        sys.stderr.flush()

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
    tempfile.gettempdir(), f"odin-gw-{_server.port}-{os.geteuid()}-metrics"
)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
#: In a metrics dir the gateway created itself; only such a dir is ever emptied whole.
METRICS_MARKER = ".odin-gw-metrics"


def _prepare_metrics_dir():
    """Start with no samples of a previous run, never deleting a directory not ours.

    Runs at the master's first read of this file: before ``--preload`` builds the app.
    """
    marker = os.path.join(_metrics_dir, METRICS_MARKER)
    if os.path.isfile(marker) and not os.path.islink(_metrics_dir):
        shutil.rmtree(_metrics_dir, ignore_errors=True)
    elif os.path.lexists(_metrics_dir):
        # Someone else's directory: remove only prometheus-client's sample files.
        stale = glob.glob(os.path.join(_metrics_dir, "*_*.db"))
        for path in stale:
            try:
                os.unlink(path)
            except OSError as exc:
                sys.stderr.write(f"odin-gw: metrics: cannot remove old samples {path}: {exc}\n")
        return
    os.makedirs(_metrics_dir, mode=0o700, exist_ok=True)
    with open(marker, "w") as fh:
        fh.write("created by odin-gw; emptied at each start\n")


if not _reload:
    _prepare_metrics_dir()


def on_starting(server):
    os.environ["ODIN_GUNICORN_MASTER_PID"] = str(os.getpid())  # the arbiter's, for workers
    _announce(server)
    os.environ["ODIN_NOTICES_LOGGED"] = "1"  # workers need not repeat them


def _announce(server):
    """Log the config's notices and size the open-files limit for its mesh watches."""
    for notice in _cfg.notices:
        server.log.warning("config: %s", notice)
    said = raise_open_files_limit(_mesh_watches(_cfg))
    if said:
        (server.log.warning if said.startswith("WARNING") else server.log.info)("%s", said)


def _mesh_watches(cfg):
    """Long-lived control-plane queries the leader holds (Consul: one per service and
    datacenter); each is an open connection."""
    mesh = cfg.service_mesh
    if mesh.kind != "consul":
        return 0
    return len(cfg.services) * len(mesh.consul.all_datacenters)


def _export_binds(server):
    os.environ["ODIN_BIND"] = ",".join(sorted(str(lnr) for lnr in server.LISTENERS))


def when_ready(server):
    _export_binds(server)
    from odin_gw.mesh.manager import state_dir_for
    from odin_gw.mesh.state import StateDirError, check_private_dir

    path = state_dir_for(_cfg, _path)
    if path is None:
        return
    try:
        check_private_dir(path)
    except StateDirError as exc:
        # gunicorn prints a RuntimeError as one "Error: ..." line and exits 1.
        raise RuntimeError(f"odin-gw: {exc}") from None
    server.log.info("mesh state dir %s", path)


def pre_fork(server, worker):
    _export_binds(server)  # a reload may have changed the listeners


def post_worker_init(worker):
    # With --preload the app was built in the master without starting its mesh threads
    # (threads do not survive fork): start them here, in the worker. Otherwise a no-op.
    gateway = _gateway_of(worker)
    if gateway is not None:
        gateway.start()
        from odin_gw.reload import hand_over_discovery_on_exit

        hand_over_discovery_on_exit(gateway)


def on_reload(server):
    # In the master, after this file was read again, before the new workers are forked.
    if master_state.LAST_ATTEMPT.get("outcome") != "applied":
        return  # refused: the workers get the configuration they had
    _announce(server)
    if server.cfg.preload_app:
        from odin_gw.reload import rebuild_preloaded_app

        rebuild_preloaded_app(server)


def _gateway_of(worker):
    app = getattr(worker, "wsgi", None)
    app = getattr(app, "__wrapped__", app)  # the edge worker wraps the app
    return getattr(app, "extensions", {}).get("odin") if app is not None else None


def child_exit(server, worker):
    from odin_gw.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def worker_exit(server, worker):
    gateway = _gateway_of(worker)
    if gateway is not None:
        gateway.stop()


# gunicorn's control socket is an unauthenticated admin interface at a path shared by
# every gunicorn of the user; the gateway has its own admin API.
control_socket_disable = True
