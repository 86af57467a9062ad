"""The state directory of one gateway instance: leader lock, snapshot, TLS material.

Only the leader writes; every worker reads. Writes go to a temporary name in the same
directory and are renamed into place, so a reader sees the old file or the new one,
never half of either.

**Ownership.** The directory is the instance's private state: created 0700 and refused
(:class:`StateDirError`, naming the path and what is wrong) when it is not a real
directory, not owned by the gateway's user, or open to group/other. Files are opened
with ``O_NOFOLLOW``; key material is written 0600. Nothing is created before
:meth:`StateDir.ensure` runs, so a gateway without a mesh leaves no directory behind.

**Default place.** :func:`default_state_dir` keys the directory on what identifies the
instance (the addresses gunicorn really binds, exported as ``ODIN_BIND`` by the master,
and the config file's path) under ``$RUNTIME_DIRECTORY`` (systemd), else ``/run`` when
writable, else the temp dir.

**Leadership generations.** The leader holds an ``flock`` on ``leader-<G>.lock`` where
``G`` is the number in ``generation`` (0 when the file is absent). The lock file is also
the leader's heartbeat: every sync rewrites it in place with the leader's pid and the
host's ``CLOCK_MONOTONIC`` time (shared by all processes, immune to wall-clock steps).
A hung leader (SIGSTOP, stuck I/O) keeps its flock, so a follower that sees the heartbeat
older than the staleness limit bumps the generation (under ``generation.lock``, only if
it is still ``G``) and takes the lock of ``G+1``. A leader checks on every sync that the
generation is still its own and that the path of its lock is still the file it holds
(a tmp cleaner may delete either); otherwise it steps down, and leadership is taken again
through the ordinary lock.

**Sharing what changed.** ``snapshot.json`` is a base document that names its journal;
``snapshot.journal`` starts with a line naming the same journal id, and the leader
appends one line per published snapshot carrying its header and only the services that
changed (:meth:`Snapshot.delta_json`). A reader keeps the base it parsed and its offset
in the journal, so a change costs every worker one small read, not the whole document.
The leader rewrites the base (and starts a new journal) when the journal has grown to
half the base, when the base is small (below ``journal_from_bytes`` a whole rewrite is as
cheap), and on its first write of a term. The base is renamed into place before its
journal: a reader sees a base with no matching journal yet (the base alone is complete),
never a journal applied to the wrong base. A journal line is used only once complete
(ends with a newline); a line that does not parse is an error (the file is ignored, and
the worker keeps what it has).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time

from .snapshot import Snapshot
from .tls import TlsMaterial

HEARTBEAT_SIZE = 512  # the lock file is rewritten in place, padded to this size
#: Below this size the snapshot is rewritten whole on every change (no journal).
JOURNAL_FROM_BYTES = 64 * 1024
#: The journal is compacted into a new base once it is bigger than this and half the base.
JOURNAL_COMPACT_BYTES = 256 * 1024


class StateDirError(Exception):
    """The state directory cannot be used safely; ``str()`` names the path and why."""


def runtime_base() -> str:
    """Where default state dirs go: ``$RUNTIME_DIRECTORY``, ``/run`` if writable, tmp."""
    runtime = (os.environ.get("RUNTIME_DIRECTORY") or "").split(":")[0]
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return runtime
    if os.path.isdir("/run") and os.access("/run", os.W_OK | os.X_OK):
        return "/run"
    return tempfile.gettempdir()


def instance_key(port: int, config_path: str | None = None, binds: str | None = None) -> str:
    """``<port>-<hash>``: the first bound port and a hash of binds + config path.

    ``binds`` defaults to ``ODIN_BIND`` (set by the gunicorn master from its listeners;
    gunicorn's ``-b`` wins over ``server.port``), ``config_path`` to ``ODIN_CONFIG``.
    """
    binds = binds if binds is not None else os.environ.get("ODIN_BIND", "")
    config_path = config_path or os.environ.get("ODIN_CONFIG") or "config.yaml"
    addrs = sorted(b for b in binds.split(",") if b)
    first = str(port)
    if addrs:
        tail = addrs[0].rsplit(":", 1)[-1]
        first = tail if tail.isdigit() else "unix"
    digest = hashlib.sha256(
        json.dumps([addrs or [str(port)], os.path.abspath(config_path)]).encode()
    ).hexdigest()[:12]
    return f"{first}-{digest}"


def default_state_dir(port: int, config_path: str | None = None, binds: str | None = None) -> str:
    """``<base>/odin-gw-<port>-<hash>``; see :func:`instance_key` and :func:`runtime_base`."""
    return os.path.join(runtime_base(), f"odin-gw-{instance_key(port, config_path, binds)}")


def check_private_dir(path: str, create: bool = True) -> None:
    """Make sure ``path`` is a directory only this user can use; create it 0700 if absent.

    Raises :class:`StateDirError` naming the path and the problem otherwise.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            try:
                os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StateDirError(f"state dir {path}: cannot create it: {exc}") from exc
        except OSError as exc:
            raise StateDirError(f"state dir {path}: cannot create it: {exc}") from exc
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise StateDirError(f"state dir {path}: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"state dir {path}: is a symbolic link; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {path}: is not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirError(
            f"state dir {path}: owned by uid {st.st_uid}, not by the gateway's user "
            f"(uid {os.geteuid()}); refusing to use it"
        )
    if st.st_mode & 0o077:
        raise StateDirError(
            f"state dir {path}: mode {stat.S_IMODE(st.st_mode):04o} gives group/other access; "
            "it must be 0700 (remove it or chmod 700 it)"
        )


def write_atomic(
    path: str | os.PathLike, text: str, *, tmp_dir: str | os.PathLike, mode: int = 0o600
) -> None:
    """Replace ``path`` with ``text`` via a temporary file in ``tmp_dir`` and a rename.

    ``tmp_dir`` must be on the same filesystem as ``path``; a reader sees the old file or
    the new one, never half of either. The temporary file is created 0600 (``mkstemp``)
    and only then widened to ``mode``; the rename replaces a symlink, never follows it.
    """
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Follow:
    """A reader's position: the base it parsed, its journal, how far it has read."""

    __slots__ = ("inode", "journal", "key", "offset", "snapshot")

    def __init__(self, key: tuple, journal: str | None, snapshot: Snapshot) -> None:
        self.key = key
        self.journal = journal
        self.snapshot = snapshot
        self.offset = 0
        self.inode: int | None = None


def _read_nofollow(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, encoding="utf-8") as fh:
        return fh.read()


def monotonic() -> float:
    """The host's ``CLOCK_MONOTONIC`` (the same for every process of the host)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class StateDir:
    """Files shared by the processes of one gateway instance (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.snapshot_path = os.path.join(path, "snapshot.json")
        self.journal_path = os.path.join(path, "snapshot.journal")
        self.journal_from_bytes = JOURNAL_FROM_BYTES
        # writer: the last snapshot this process shared, its journal and their sizes
        self._written: Snapshot | None = None
        self._written_ids: tuple[int, int] | None = None  # (base inode, journal inode)
        self._base_bytes = 0
        self._journal_bytes = 0
        self.full_writes = 0
        self.journal_writes = 0
        # reader: the base parsed, the journal followed and the snapshot they make
        self._follow: _Follow | None = None
        self.tls_path = os.path.join(path, "tls-material.json")
        self.trigger_path = os.path.join(path, "refresh.trigger")
        self.generation_path = os.path.join(path, "generation")
        self._lock_fd: int | None = None
        self._lock_id: tuple[int, int] | None = None
        self.term: int | None = None  # the generation this process leads

    def ensure(self) -> None:
        """Create the directory (0700) if needed and check it; raises StateDirError."""
        check_private_dir(self.path)

    def lock_path_for(self, generation: int) -> str:
        return os.path.join(self.path, f"leader-{generation}.lock")

    @property
    def lock_path(self) -> str:
        return self.lock_path_for(self.generation())

    # -- leadership -------------------------------------------------------------------
    def generation(self) -> int:
        """The current leadership generation (0 when the file is absent or unreadable)."""
        try:
            return int(_read_nofollow(self.generation_path).strip() or 0)
        except (OSError, ValueError):
            return 0

    def try_lead(self) -> bool:
        """Take the current generation's lock without waiting; True if this process holds it.

        The kernel frees an ``flock`` when its holder dies, so a killed leader's lock
        passes to the next worker that asks. Re-creates the directory when it is gone;
        raises :class:`StateDirError` when it is not safe to use.
        """
        if self._lock_fd is not None:
            return True
        self.ensure()
        generation = self.generation()
        path = self.lock_path_for(generation)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        st = os.fstat(fd)
        self._lock_fd = fd
        self._lock_id = (st.st_dev, st.st_ino)
        self.term = generation
        self._written = None  # a new term starts with a whole snapshot
        self.beat()
        return True

    def check_lock(self) -> str | None:
        """For the leader: ``None`` while its lock is still the leader lock, else why not."""
        if self._lock_fd is None:
            return "not leading"
        current = self.generation()
        if current != self.term:
            return f"leadership generation moved from {self.term} to {current}"
        try:
            st = os.stat(self.lock_path_for(current), follow_symlinks=False)
        except OSError:
            return "the leader lock file was removed"
        if (st.st_dev, st.st_ino) != self._lock_id:
            return "the leader lock file was replaced"
        return None

    def deposed(self) -> bool:
        """True unless this process leads the current generation (cheap: one small read)."""
        return self._lock_fd is None or self.generation() != self.term

    def beat(self, **facts) -> None:
        """Rewrite the heartbeat (the lock file, in place): pid, monotonic and wall time."""
        if self._lock_fd is None:
            return
        doc = {
            "pid": os.getpid(),
            "generation": self.term,
            "mono": monotonic(),
            "wall": time.time(),
            **facts,
        }
        data = json.dumps(doc).encode()[: HEARTBEAT_SIZE - 1].ljust(HEARTBEAT_SIZE)
        os.pwrite(self._lock_fd, data, 0)

    def heartbeat(self, generation: int | None = None) -> dict | None:
        """The heartbeat of ``generation`` (default: the current one), ``None`` if none."""
        gen = self.generation() if generation is None else generation
        try:
            doc = json.loads(_read_nofollow(self.lock_path_for(gen)).strip() or "null")
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("mono"), int | float):
            return None
        return doc

    def take_over(self, generation: int) -> bool:
        """Start generation ``generation + 1`` if ``generation`` is still current.

        Used when the leader of ``generation`` holds its lock but is not alive. Serialised
        by ``generation.lock`` (taken without waiting: a hung holder must not hang us).
        Older lock files are removed: the hung process keeps its inode and, when it runs
        again, sees the new generation and steps down.
        """
        self.ensure()
        guard = os.open(
            os.path.join(self.path, "generation.lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            if self.generation() != generation:
                return False
            write_atomic(self.generation_path, f"{generation + 1}\n", tmp_dir=self.path)
            for old in range(max(0, generation - 8), generation + 1):
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path_for(old))
            return True
        finally:
            os.close(guard)

    def resign(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
            self._lock_id = None
            self.term = None
        self._written = None

    @property
    def leading(self) -> bool:
        return self._lock_fd is not None

    def leader_pid(self) -> int | None:
        doc = self.heartbeat()
        pid = doc.get("pid") if doc else None
        return pid if isinstance(pid, int) else None

    # -- files ------------------------------------------------------------------------
    def write_atomic(self, path: str, text: str, mode: int = 0o600) -> None:
        write_atomic(path, text, tmp_dir=self.path, mode=mode)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` whole as a new base, then start its (empty) journal."""
        self._written = None
        journal = f"{os.getpid()}-{snapshot.version}-{os.urandom(6).hex()}"
        text = snapshot.to_json(journal=journal)
        self.write_atomic(self.snapshot_path, text)
        header = json.dumps({"journal": journal, "base": snapshot.version}) + "\n"
        self.write_atomic(self.journal_path, header)
        base = os.stat(self.snapshot_path, follow_symlinks=False)
        jour = os.stat(self.journal_path, follow_symlinks=False)
        self._written_ids = (base.st_ino, jour.st_ino)
        self._base_bytes, self._journal_bytes = len(text), len(header)
        self._written = snapshot
        self.full_writes += 1

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Share ``snapshot``: one journal line with what changed since the snapshot this
        process last wrote, or a whole new base (see the module docstring for when)."""
        prev = self._written
        if (
            prev is None
            or self._base_bytes < self.journal_from_bytes
            or self._journal_bytes > max(self._base_bytes // 2, JOURNAL_COMPACT_BYTES)
            or prev.fingerprint != snapshot.fingerprint
            or any(name not in snapshot.services for name in prev.services)
        ):
            self.write_snapshot(snapshot)
            return
        old = prev.services
        changed = [
            n for n, s in snapshot.services.items() if old.get(n) is not s and old.get(n) != s
        ]
        line = (snapshot.delta_json(changed, prev) + "\n").encode()
        try:
            self._append(line)
        except OSError:
            self.write_snapshot(snapshot)  # journal gone or replaced: start over whole
            return
        self._journal_bytes += len(line)
        self._written = snapshot
        self.journal_writes += 1

    def _append(self, line: bytes) -> None:
        base = os.stat(self.snapshot_path, follow_symlinks=False)
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if (base.st_ino, os.fstat(fd).st_ino) != self._written_ids:
                raise FileNotFoundError("the snapshot or its journal was replaced")
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def disk_stamp(self) -> tuple | None:
        """What identifies the shared snapshot's current content (``None``: no file):
        the base file's identity and the journal's length. Two stats."""
        try:
            base = os.stat(self.snapshot_path, follow_symlinks=False)
        except OSError:
            return None
        try:
            jour = os.stat(self.journal_path, follow_symlinks=False)
            journal = (jour.st_ino, jour.st_size)
        except OSError:
            journal = None
        return (base.st_ino, base.st_mtime_ns, base.st_size, journal)

    def read_snapshot(self) -> Snapshot | None:
        """The snapshot on disk (base plus its journal), or ``None`` when there is none;
        raises on a bad file. Incremental: an unchanged base is not parsed again and only
        the journal lines not read yet are applied."""
        try:
            fd = os.open(self.snapshot_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._follow = None
            return None
        with os.fdopen(fd, encoding="utf-8") as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            follow = self._follow
            if follow is None or follow.key != key:
                extras: dict = {}
                snap = Snapshot.from_json(fh.read(), extras)
                journal = extras.get("journal")
                follow = _Follow(key, journal if isinstance(journal, str) else None, snap)
                self._follow = follow
        return self._read_journal(follow)

    def _read_journal(self, follow: _Follow) -> Snapshot:
        if not follow.journal:
            return follow.snapshot
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return follow.snapshot
        try:
            st = os.fstat(fd)
            offset, ino = follow.offset, follow.inode
            if st.st_ino != ino:  # a journal not read yet: it must belong to our base
                head = os.pread(fd, 4096, 0)
                end = head.find(b"\n")
                if end < 0:
                    return follow.snapshot
                try:
                    header = json.loads(head[:end])
                except ValueError:
                    return follow.snapshot
                if not isinstance(header, dict) or header.get("journal") != follow.journal:
                    return follow.snapshot  # a newer base is on its way
                offset, ino = end + 1, st.st_ino
            data = os.pread(fd, max(0, st.st_size - offset), offset) if st.st_size > offset else b""
        finally:
            os.close(fd)
        end = data.rfind(b"\n")  # only complete lines
        snap = follow.snapshot
        if end >= 0:
            for line in data[:end].split(b"\n"):
                if line.strip():
                    snap = snap.followed_by(line.decode("utf-8"))
            offset += end + 1
        follow.snapshot, follow.offset, follow.inode = snap, offset, ino
        return snap

    def mtime(self, path: str) -> float:
        try:
            return os.stat(path, follow_symlinks=False).st_mtime_ns
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
            doc = json.loads(_read_nofollow(self.tls_path))
        except FileNotFoundError:
            return None
        if not isinstance(doc, dict):
            raise ValueError("not a TLS material document")
        return TlsMaterial(
            doc["cert"],
            doc["key"],
            doc["ca"],
            source=doc["source"],
            trust_domain=doc.get("trustDomain"),
            alpn=tuple(doc.get("alpn") or ()),
        )

    def trigger_refresh(self) -> None:
        self.ensure()
        fd = os.open(
            self.trigger_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.utime(fd)
        finally:
            os.close(fd)
