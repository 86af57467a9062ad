"""``odin-gw``: command-line tools around the gateway.

``odin-gw check-config PATH`` prints every problem of a config file and exits 2 (0 when
the file is valid). ``odin-gw run`` starts gunicorn with the bundled settings.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def check_config(path: str) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{path}: ok ({len(cfg.services)} services, mesh {cfg.service_mesh.kind})")
    for notice in cfg.notices:
        print(f"  note: {notice}")
    return 0


def run(config: str, extra: list[str]) -> int:
    """Replace this process with gunicorn serving the installed package (no checkout).

    The settings are ``odin_gw/gunicorn_settings.py``, given as a file so that gunicorn
    reads it again on ``SIGHUP``; the app is ``odin_gw.wsgi_entry:app``. ``extra`` goes
    to gunicorn as it is (``-b``, ``--workers``...).
    """
    os.environ["ODIN_CONFIG"] = config
    settings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gunicorn_settings.py")
    args = [sys.executable, "-m", "gunicorn", "-c", settings, "odin_gw.wsgi_entry:app", *extra]
    os.execv(args[0], args)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odin-gw", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    start = sub.add_parser("run", help="start the gateway under gunicorn")
    start.add_argument("--config", default=os.environ.get("ODIN_CONFIG", "config.yaml"))
    start.add_argument("gunicorn_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
    return run(os.path.abspath(args.config), args.gunicorn_args)


if __name__ == "__main__":
    sys.exit(main())
