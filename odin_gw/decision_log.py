"""``logging.level: debug``: one line per upstream pick, saying which endpoint and why,
and which endpoints were passed over and why (the spec's troubleshooting step).

Written by the ``odin_gw.mesh.decision`` logger, so ``grep -i mesh`` finds them::

    mesh decision web: request 7f3c... attempt 1 -> http://10.0.0.7:8080 (round-robin
    over 2 of 3 endpoints); skipped http://10.0.0.9:8080: circuit open

The forwarder asks only when the logger is enabled for debug (decided once, when the
worker starts), so the request path pays nothing otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .balancer import Pick
from .mesh.snapshot import Endpoint

log = logging.getLogger("odin_gw.mesh.decision")


def enabled() -> bool:
    """Whether decision lines are written (the logger's level allows debug)."""
    return log.isEnabledFor(logging.DEBUG)


def why_not(
    endpoint: Endpoint, healthy: Sequence[Endpoint], route, tried: Sequence[str]
) -> str | None:
    """Why ``endpoint`` was not a candidate for this pick (``None``: it was one)."""
    if endpoint.key in tried:
        return "already tried by this request"
    if endpoint not in healthy:
        check = endpoint.check
        if check is not None and check.status == "failing":
            seen = f": {check.reason}" if check.reason else ""
            return f"active health check failing{seen}"
        return f"mesh health {endpoint.status}"
    if not route.health.available(endpoint.key):
        return "ejected by passive health"
    if route.breakers is not None and not route.breakers.available(endpoint.key):
        return "circuit open"
    return None


def explain(
    route,
    request_id: str,
    attempt: int,
    pick: Pick,
    healthy: Sequence[Endpoint],
    everyone: Sequence[Endpoint],
    tried: Sequence[str],
) -> None:
    """Log one pick of ``route`` (see the module docstring)."""
    chosen = pick.endpoint
    passed = []
    for e in everyone:
        if chosen is None or e.key != chosen.key:
            why = why_not(e, healthy, route, tried)
            if why is not None and not pick.panic:
                passed.append(f"{e.key}: {why}")
    # The pool this pick was made from: routable and not tried yet by this request.
    fit = sum(1 for e in healthy if e.key not in tried and route.available(e.key))
    if chosen is None:
        head = f"no endpoint left ({fit} of {len(everyone)} routable)"
    elif pick.panic:
        head = (
            f"-> {chosen.key} (panic mode: {fit} of {len(everyone)} healthy, below "
            f"panicThreshold; {route.balancer.name} over all)"
        )
    else:
        head = f"-> {chosen.key} ({route.balancer.name} over {fit} of {len(everyone)} endpoints)"
    skipped = f"; skipped {', '.join(passed)}" if passed else ""
    log.debug(
        "mesh decision %s: request %s attempt %d %s%s",
        route.name,
        request_id,
        attempt,
        head,
        skipped,
    )
