"""The ``MeshClient`` protocol: one implementation per ``serviceMesh.type``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .snapshot import ServiceEndpoints
from .tls import TlsMaterial


@dataclass(frozen=True)
class Discovery:
    """What one answer from a control plane said.

    ``services`` holds the services it answered for; ``absent`` those a *successful*
    answer said do not exist (only these may be removed from a snapshot); ``errors``
    the services it could not ask about, with why. ``catalog`` is every service name the
    registry listed, when the answer included a listing (``None``: it did not).
    ``stamps`` orders answers per service: a service whose stamp is lower than one
    already applied was merged before it and is dropped (never replace newer with older).
    """

    services: dict[str, ServiceEndpoints] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()
    errors: dict[str, str] = field(default_factory=dict)
    catalog: tuple[str, ...] | None = None
    stamps: dict[str, int] = field(default_factory=dict)


Publish = Callable[[Discovery], None]
PublishTls = Callable[[TlsMaterial], None]


class MeshClient(Protocol):
    """A control-plane client. Only the leader process calls it.

    ``discover`` is a full pass (the periodic job); it raises ``MeshError`` when the
    control plane could not be asked at all. ``watch`` runs in its own thread until
    ``stop`` is set, publishing changes as they arrive (blocking queries, xDS or
    Kubernetes watches); a client without a push channel returns at once.
    """

    name: str

    def discover(self, services: Sequence[str]) -> Discovery: ...

    def watch(
        self,
        services: Sequence[str],
        publish: Publish,
        publish_tls: PublishTls,
        stop: threading.Event,
    ) -> None: ...

    def close(self) -> None: ...


class StaticClient:
    """``serviceMesh.type: none``: no control plane; routes use their static targets."""

    name = "none"

    def discover(self, services: Sequence[str]) -> Discovery:
        return Discovery()

    def watch(self, services, publish, publish_tls, stop) -> None:
        return None

    def close(self) -> None:
        return None
