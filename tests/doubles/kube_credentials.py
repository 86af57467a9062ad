"""Client credentials for the kube-apiserver stand-in, as a cluster hands them out.

Outside a cluster a client reads a kubeconfig (``KUBECONFIG``); inside a pod it reads
the service-account files the kubelet mounts at
``/var/run/secrets/kubernetes.io/serviceaccount`` plus ``KUBERNETES_SERVICE_HOST`` /
``KUBERNETES_SERVICE_PORT``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

__all__ = ["write_kubeconfig", "write_service_account_dir"]


def write_kubeconfig(
    path: str | Path,
    server: str,
    ca_pem: str,
    token: str,
    namespace: str | None = None,
    *,
    context: str = "odin-test",
) -> Path:
    """Write a kubeconfig: one cluster (``server``, ``certificate-authority-data``), one
    user with a bearer ``token``, one context (with ``namespace`` if given) made the
    ``current-context``. The file is private (0600), as kubectl writes it."""
    ctx: dict[str, Any] = {"cluster": context, "user": context}
    if namespace is not None:
        ctx["namespace"] = namespace
    ca_data = base64.b64encode(ca_pem.encode()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": context, "cluster": {"server": server, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": context, "user": {"token": token}}],
        "contexts": [{"name": context, "context": ctx}],
        "current-context": context,
        "preferences": {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def write_service_account_dir(
    directory: str | Path, ca_pem: str, token: str, namespace: str
) -> Path:
    """Write ``token``, ``ca.crt`` and ``namespace`` into ``directory`` as the kubelet
    mounts them. Each file is written to a temp name and renamed (the kubelet's atomic
    writer swaps files the same way), so calling it again to rotate the token never
    shows a reader a half-written token."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("ca.crt", ca_pem), ("namespace", namespace), ("token", token)):
        temp = directory / f".{name}.tmp"
        temp.write_text(text)
        temp.replace(directory / name)
    return directory
