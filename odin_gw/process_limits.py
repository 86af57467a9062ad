"""Process limits the gateway needs at scale: open files.

Each Consul blocking query holds a connection for up to ``blockingWait``, so the leader
needs one descriptor per watched (service, datacenter) besides its client and upstream
sockets: about 1,000 per datacenter for 1,000 services, where the usual soft limit is
1,024. Like Go's runtime (since 1.19), the master raises its soft ``RLIMIT_NOFILE`` to
the hard limit before forking workers (children inherit it); the hard limit is the
operator's (systemd ``LimitNOFILE=``, Kubernetes' container runtime) and is only
reported, never raised.
"""

from __future__ import annotations

import resource

#: Descriptors kept for everything but the watches: listeners, upstream pools, files.
BASE_NEED = 1024


def open_files_needed(watches: int) -> int:
    """Descriptors a process with ``watches`` long-lived control-plane queries may use."""
    return BASE_NEED + watches


def raise_open_files_limit(watches: int) -> str | None:
    """Raise the soft open-files limit to the hard one; say what happened, if anything.

    Returns a warning when even the hard limit is below what ``watches`` need, an info
    line when the soft limit moved, ``None`` when nothing changed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_files_needed(watches)
    if hard != resource.RLIM_INFINITY and hard < need:
        target = hard
    else:
        # An unlimited hard limit still needs a number: enough, with room to spare.
        target = hard if hard != resource.RLIM_INFINITY else max(need * 2, 65536)
    message = None
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            message = f"open files limit raised from {soft} to {target} (hard limit {hard})"
            soft = target
        except (ValueError, OSError) as exc:
            message = f"cannot raise the open files limit from {soft}: {exc}"
    if soft != resource.RLIM_INFINITY and soft < need:
        return (
            f"WARNING: open files limit {soft} is below the {need} that {watches} mesh "
            "watches may need: raise the hard limit (systemd LimitNOFILE=, ulimit -Hn)"
        )
    return message
