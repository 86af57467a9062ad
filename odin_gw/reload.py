"""Reloading the configuration: ``POST``/``GET /admin/reload`` and the reload story.

A reload is gunicorn's ``SIGHUP``: the master reads its settings file again, which reads
and validates the gateway config (:mod:`odin_gw.gunicorn_settings`); a good file becomes
the next generation of :mod:`odin_gw.master_state`, gunicorn forks new workers with it and
stops the old ones gracefully (they finish their requests, at most
``server.gracefulTimeout``); a bad file is logged and refused, and the new workers get
the previous configuration again.

``POST /admin/reload`` validates the file the master would read (same parser and
messages as ``odin-gw check-config``, secret values redacted) before it signals the
master: an invalid file is answered ``422`` with every problem and logged, and nothing
is signalled; a valid one sends ``SIGHUP`` to the master and is answered ``202``, or
``409`` when this process is not a worker of the gateway's gunicorn master (its parent,
which exported its pid when it read the settings file). The outcome is
``GET /admin/reload``: the generation served, its digest and load time, and the
master's last read. ``422``, not ``400``: the request is well formed; what cannot be
processed is the file it names.

Discovery hand-over: the leader of the old configuration stops following the mesh when
gunicorn's ``SIGTERM`` arrives (:func:`hand_over_discovery_on_exit`), not when it has
drained, so a worker of the new configuration takes the lead within a sync interval
(it adopts the old snapshot for the services both configs share, discovers the new ones,
and drops the removed ones) while the old worker finishes its requests with the routes
it has.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from flask import current_app, jsonify, request

from . import master_state
from .config import ConfigError
from .errors import GatewayError
from .mesh.manager import SYNC_INTERVAL

log = logging.getLogger("odin_gw")


class InvalidConfig(GatewayError):
    """The config file a reload would read is invalid; nothing was signalled."""

    status = 422
    code = "invalid_config"


class NoMaster(GatewayError):
    """This process is not a worker of the gunicorn master of this gateway."""

    status = 409
    code = "no_master"


def gunicorn_master() -> int | None:
    """The pid of this worker's gunicorn master, ``None`` outside one.

    The master exports its pid (``ODIN_GUNICORN_MASTER_PID``) when it reads the settings
    file, and a worker inherits it; it counts only while it is still this process's
    parent (an orphaned worker, or a process a worker started, has another parent).
    """
    recorded = os.environ.get("ODIN_GUNICORN_MASTER_PID", "")
    if not (recorded.isascii() and recorded.isdigit()):  # str.isdigit: "²" too, and more
        return None
    pid = int(recorded)
    # pid 0 or 1 is never a gunicorn master of ours: kill(0) would signal the whole
    # process group, and an orphan's parent is init.
    if pid <= 1 or pid == os.getpid() or pid != os.getppid():
        return None
    return pid


def config_path() -> str:
    """The file the master reads on a reload (its environment is the worker's)."""
    return os.environ.get("ODIN_CONFIG", "config.yaml")


def reload_view():
    """``GET``: what is served and how the last reload went. ``POST``: reload."""
    if request.method == "POST":
        return request_reload()
    return jsonify(reload_status())


def reload_status() -> dict:
    """The ``GET /admin/reload`` document (no secrets, no config text).

    ``served`` is the generation this worker runs; ``None`` when it runs a configuration
    the master did not validate (outside gunicorn, or a preloaded app not rebuilt).
    """
    doc = master_state.describe()
    gateway = current_app.extensions["odin"]
    if gateway.config is not master_state.LAST_GOOD.get("config"):
        doc["served"] = None
    return {"pid": os.getpid(), "masterPid": gunicorn_master(), **doc}


def request_reload():
    """Validate the config file, then signal the master (``202``); see the module doc."""
    path = config_path()
    try:
        config, text = master_state.read_config(path)
    except ConfigError as exc:
        log.warning(
            "reload refused (POST /admin/reload), the running configuration stays: "
            "%s: invalid configuration\n  %s",
            path,
            "\n  ".join(exc.problems),
        )
        raise InvalidConfig(
            f"{path}: invalid configuration; nothing reloaded, the running configuration stays",
            path=path,
            problems=exc.problems,
        ) from None
    master = gunicorn_master()
    if master is None:
        raise NoMaster(
            "no gunicorn master to reload: this process is not a worker of the gateway's "
            "gunicorn (start it with odin-gw run, or gunicorn -c gunicorn.conf.py)",
            path=path,
        )
    served = master_state.LAST_GOOD
    generation = served.get("generation")
    os.kill(master, signal.SIGHUP)
    log.info(
        "reload requested (POST /admin/reload): SIGHUP sent to the gunicorn master (pid %d)",
        master,
    )
    graceful = current_app.extensions["odin"].config.server.graceful_timeout
    response = jsonify(
        status="reloading",
        masterPid=master,
        path=path,
        digest=master_state.digest(text),
        changed=text != served.get("text"),
        services=len(config.services),
        servedGeneration=generation,
        message=(
            "the master reads the file again, starts new workers with it and stops the "
            f"current ones once their requests are done (at most {graceful:g}s); "
            f"GET /admin/reload shows a generation above {generation} when the new "
            "configuration serves"
        ),
    )
    response.status_code = 202
    return response


def hand_over_discovery_on_exit(gateway) -> None:
    """Make ``SIGTERM`` stop this worker's mesh discovery at once (call in the worker).

    gunicorn's ``SIGTERM`` starts a worker's graceful exit (a reload replacing it, a
    shutdown, fewer workers): its requests may run for up to ``server.gracefulTimeout``,
    and the ``worker_exit`` hook, which stops discovery, runs only after them. A leader
    would keep the lead that long, and the new workers, whose configuration has another
    fingerprint, ignore its snapshots: new services would wait. So the handler gunicorn
    installed runs first, then a thread stops the mesh manager (the lock is freed, a
    worker still running takes it within a sync interval); this worker answers what is
    left with the snapshot it has.
    """
    mesh = gateway.mesh
    previous = signal.getsignal(signal.SIGTERM)
    if not (mesh.active or mesh.leads) or not callable(previous):
        return
    stopping = threading.Event()

    def on_term(signum, frame) -> None:
        previous(signum, frame)
        if not stopping.is_set():
            stopping.set()
            # Not in the handler: stopping takes locks the interrupted code may hold.
            threading.Thread(
                target=_stop_following, args=(mesh,), name="odin-mesh-handover", daemon=True
            ).start()

    on_term.__wrapped__ = previous  # who asks "which worker is this" still finds it
    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: requests go on


def _stop_following(mesh) -> None:
    leading = mesh.leading
    try:
        mesh.stop()
        if leading:
            log.info("pid %d hands discovery over: graceful exit", os.getpid())
        # A sync job already running when stop() came may still take the lock: free it
        # again once that job is over (resigning is idempotent).
        time.sleep(2 * SYNC_INTERVAL)
        mesh.state.resign()
    except Exception:  # the exit goes on whatever happens here
        log.exception("stopping mesh discovery for the graceful exit failed")


def rebuild_preloaded_app(server) -> None:
    """Build the ``--preload`` app again from the configuration just loaded (in the
    master, from gunicorn's ``on_reload``), so the new workers run it: gunicorn itself
    keeps the app it preloaded. On failure the previous app stays, and says so."""
    app = server.app
    old = getattr(app, "callable", None)
    gateway = getattr(old, "extensions", {}).get("odin") if old is not None else None
    if gateway is None or gateway.config is master_state.LAST_GOOD.get("config"):
        return  # not the gateway's app, or already built from this configuration
    module = (getattr(app, "app_uri", None) or "").split(":", 1)[0]
    saved = sys.modules.pop(module, None) if module else None
    app.callable = None
    try:
        app.wsgi()
    except Exception as exc:
        app.callable = old
        if saved is not None:
            sys.modules[module] = saved
        server.log.error(
            "reload: the preloaded app could not be built again, new workers run the "
            "previous configuration: %s",
            exc,
        )
        return
    server.log.info("reload: preloaded app built again from the new configuration")
