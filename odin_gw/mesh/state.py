"""The per-host state directory: leader lock, snapshot file, TLS material, refresh trigger.

Only the leader writes; every worker reads. Writes go to a temporary name in the same
directory and are renamed into place, so a reader sees the old file or the new one,
never half of either.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile

from .snapshot import Snapshot
from .tls import TlsMaterial


def default_state_dir(port: int) -> str:
    """``<tmp>/odin-gw-<port>``: one gateway per port per host."""
    return os.path.join(tempfile.gettempdir(), f"odin-gw-{port}")


def write_atomic(
    path: str | os.PathLike, text: str, *, tmp_dir: str | os.PathLike, mode: int = 0o600
) -> None:
    """Replace ``path`` with ``text`` via a temporary file in ``tmp_dir`` and a rename.

    ``tmp_dir`` must be on the same filesystem as ``path``; a reader sees the old file or
    the new one, never half of either.
    """
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateDir:
    """Files shared by the gateway processes of one host."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.snapshot_path = os.path.join(path, "snapshot.json")
        self.tls_path = os.path.join(path, "tls-material.json")
        self.trigger_path = os.path.join(path, "refresh.trigger")
        self.lock_path = os.path.join(path, "leader.lock")
        self._lock_fd: int | None = None

    # -- leadership -------------------------------------------------------------------
    def try_lead(self) -> bool:
        """Take the leader lock without waiting; True if this process holds it.

        The kernel frees an ``flock`` when its holder dies, so a killed leader's lock
        passes to the next worker that asks.
        """
        if self._lock_fd is not None:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return True

    def resign(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def leading(self) -> bool:
        return self._lock_fd is not None

    def leader_pid(self) -> int | None:
        try:
            with open(self.lock_path) as fh:
                text = fh.read().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    # -- files ------------------------------------------------------------------------
    def write_atomic(self, path: str, text: str, mode: int = 0o600) -> None:
        write_atomic(path, text, tmp_dir=self.path, mode=mode)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self.write_atomic(self.snapshot_path, snapshot.to_json())

    def read_snapshot(self) -> Snapshot | None:
        """The snapshot on disk, or ``None`` when there is none; raises on a corrupt file."""
        try:
            with open(self.snapshot_path) as fh:
                text = fh.read()
        except FileNotFoundError:
            return None
        return Snapshot.from_json(text)

    def mtime(self, path: str) -> float:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return 0

    def write_tls(self, material: TlsMaterial) -> None:
        doc = {
            "cert": material.cert_pem,
            "key": material.key_pem,
            "ca": material.ca_pem,
            "source": material.source,
            "trustDomain": material.trust_domain,
            "alpn": list(material.alpn),
        }
        self.write_atomic(self.tls_path, json.dumps(doc), mode=0o600)

    def read_tls(self) -> TlsMaterial | None:
        try:
            with open(self.tls_path) as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            return None
        return TlsMaterial(
            doc["cert"],
            doc["key"],
            doc["ca"],
            source=doc["source"],
            trust_domain=doc.get("trustDomain"),
            alpn=tuple(doc.get("alpn") or ()),
        )

    def trigger_refresh(self) -> None:
        with open(self.trigger_path, "a"):
            os.utime(self.trigger_path)
