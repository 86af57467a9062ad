"""``GET /admin/stats``: request and error counts per service, over every worker.

Read from the gateway's own Prometheus counter ``odin_requests`` (labels ``service``,
``method``, ``status_class``), cumulative since the gateway started::

    {"services": {"orders": {"requests": 12, "errors": 1,
                             "byStatusClass": {"2xx": 11, "3xx": 0, "4xx": 0, "5xx": 1}}},
     "total": {"requests": 12, "errors": 1}}

``errors`` are 5xx answers. Requests no service took (the gateway's own admin and ops
answers, paths no route matches: service ``-``) are left out of ``services`` and of
``total`` too, so ``total`` is the sum of ``services`` and a dashboard polling this
endpoint does not count itself. Every configured service is listed, with zeros when it
has had no request; a service dropped by a reload keeps its counts until restart.
A client gets rates from the difference of two answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flask import current_app, jsonify

#: The ``service`` label of requests no route took.
UNROUTED = "-"
#: Status classes every service lists, zeros included (``1xx``/``other`` when seen).
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
ERROR_CLASS = "5xx"


def request_stats(
    totals: Mapping[tuple[tuple[str, str], ...], float], services: Iterable[str] = ()
) -> dict:
    """The ``/admin/stats`` document from ``GatewayMetrics.totals("odin_requests")``
    (label pairs -> count); ``services`` are listed even without requests."""
    per: dict[str, dict] = {name: _empty() for name in services}
    for labels, value in totals.items():
        label = dict(labels)
        service = label.get("service", UNROUTED)
        if service == UNROUTED:
            continue
        doc = per.setdefault(service, _empty())
        count = int(value)
        status_class = label.get("status_class", "other")
        doc["requests"] += count
        doc["byStatusClass"][status_class] = doc["byStatusClass"].get(status_class, 0) + count
        if status_class == ERROR_CLASS:
            doc["errors"] += count
    return {
        "services": per,
        "total": {
            "requests": sum(d["requests"] for d in per.values()),
            "errors": sum(d["errors"] for d in per.values()),
        },
    }


def _empty() -> dict:
    return {"requests": 0, "errors": 0, "byStatusClass": dict.fromkeys(STATUS_CLASSES, 0)}


def stats_view():
    """``GET /admin/stats`` (admin bearer token): :func:`request_stats` of this gateway."""
    gateway = current_app.extensions["odin"]
    names = [route.name for route in gateway.routes.entries]
    return jsonify(request_stats(gateway.metrics.totals("odin_requests"), names))
