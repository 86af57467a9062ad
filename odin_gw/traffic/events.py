"""Where the per-worker resilience state reports its changes: metrics and logs.

Breakers and passive health are built with the routes (:mod:`odin_gw.routing`); the
listeners they call come from here, bound to the gateway's metrics, so neither module
knows about Prometheus.
"""

from __future__ import annotations


class TrafficEvents:
    """Listener factories for one gateway's :class:`~odin_gw.metrics.GatewayMetrics`."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    def circuit(self, service: str):
        """``on_change(key, old, new)`` for a service's circuit breakers: counts openings
        and keeps the open-circuit gauge (this worker's share of the sum)."""
        opened = self.metrics.circuit_opened.labels(service)
        gauge = self.metrics.circuit_open.labels(service)

        def on_change(key: str, old: str, new: str) -> None:
            if new == "open" and old != "open":
                opened.inc()
                if old == "closed":
                    gauge.inc()
            elif new == "closed" and old != "closed":
                gauge.dec()

        return on_change

    def ejected(self, service: str):
        """``on_eject(key, reason, seconds)`` for a service's passive health."""
        counter = self.metrics.ejections

        def on_eject(key: str, reason: str, seconds: float) -> None:
            counter.labels(service, reason).inc()

        return on_eject
