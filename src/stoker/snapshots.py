"""Start VMs from memory instead of booting: templates and their clones.

A *template* is a VM booted from an image to agent-ready and then saved: its
RAM (a file the VMM ran the guest in), its device state and its writable disk.
A *clone* starts from that state with copy-on-write everywhere: the RAM file is
mapped private (clones share the template's pages until they write), the disk
is a qcow2 overlay on the template's.  Right after restore the host re-sends
``init`` with a fresh hostname, machine id, RNG seed and the current time, so
no two clones share an identity or a random stream.

Snapshots live in ``<cache>/snapshots/<key>/`` and are keyed by everything that
must match for a restore to be valid (:class:`SnapshotKey`): the image digest,
the VM shape, the kernel and initramfs, the backend and its version, the
accelerator.  Change any of them and a new snapshot is made; old ones stay
until ``stoker snapshot rm``.  Publishing is atomic, like the image store:
built in ``.tmp``, renamed into place, serialised by a lock per key.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stoker.errors import ProvisionError, UsageError
from stoker.images.base import canonical_digest
from stoker.paths import Dirs

#: Bump when the snapshot layout or what a template contains changes.
SNAPSHOT_FORMAT = 1
META_FILE = "snapshot.json"
MEMORY_FILE = "memory"
SCRATCH_FILE = "scratch.img"


@dataclass(frozen=True)
class SnapshotKey:
    """What a snapshot is valid for; any difference needs a new snapshot."""

    image_digest: str
    cpus: int
    memory_mb: int
    disk_mb: int
    backend: str
    backend_version: str
    kernel: str
    initrd: str
    accel: str

    def digest(self) -> str:
        return canonical_digest({"format": SNAPSHOT_FORMAT, **asdict(self)})


@dataclass(frozen=True)
class Snapshot:
    """A published template: restore clones from :attr:`path`."""

    key: SnapshotKey
    path: Path
    meta: dict[str, Any]

    @property
    def memory(self) -> Path:
        return self.path / MEMORY_FILE

    @property
    def scratch(self) -> Path:
        return self.path / SCRATCH_FILE

    @property
    def size_bytes(self) -> int:
        """Disk space actually used (the memory file and disk are sparse)."""
        total = 0
        for child in self.path.iterdir():
            with contextlib.suppress(OSError):
                total += child.stat().st_blocks * 512
        return total


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SnapshotStore:
    """Published snapshots under ``dirs.cache / "snapshots"``."""

    def __init__(self, dirs: Dirs) -> None:
        self.dirs = dirs
        self.root = dirs.cache / "snapshots"

    def get(self, key: SnapshotKey) -> Snapshot | None:
        """The snapshot for ``key``, or None (absent, or not completely written)."""
        return self._load(self.root / key.digest())

    def _load(self, path: Path) -> Snapshot | None:
        try:
            meta = json.loads((path / META_FILE).read_text())
            key = SnapshotKey(**meta["key"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if key.digest() != path.name:
            return None
        return Snapshot(key=key, path=path, meta=meta)

    def list(self) -> list[Snapshot]:
        """Every complete snapshot, oldest first."""
        if not self.root.is_dir():
            return []
        found = [s for p in sorted(self.root.iterdir()) if (s := self._load(p)) is not None]
        return sorted(found, key=lambda s: str(s.meta.get("created_at", "")))

    def remove(self, digest_prefix: str) -> builtins.list[Path]:
        """Delete the snapshots whose key digest starts with ``digest_prefix`` ("" = all)."""
        matches = [s for s in self.list() if s.path.name.startswith(digest_prefix)]
        if digest_prefix and not matches:
            raise UsageError(f"no snapshot {digest_prefix!r}", hint="see `stoker snapshot ls`")
        removed = []
        for snap in matches:
            with _locked(self.root / ".locks" / f"{snap.path.name}.lock"):
                aside = self.root / ".tmp" / f"{snap.path.name}-removed-{secrets.token_hex(4)}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                snap.path.rename(aside)
                shutil.rmtree(aside)
            removed.append(snap.path)
        return removed

    async def ensure(
        self,
        key: SnapshotKey,
        create: Callable[[Path], Any],
        *,
        progress: Callable[[str], None] | None = None,
    ) -> Snapshot:
        """The snapshot for ``key``, calling ``await create(tmpdir)`` to make it if needed.

        ``create`` must leave the memory file, the disk and the backend's state
        in the directory it is given.  Concurrent callers (threads or
        processes) make it once; a failed or interrupted creation leaves
        nothing visible.
        """
        found = self.get(key)
        if found is not None:
            return found
        digest = key.digest()
        lock = self.root / ".locks" / f"{digest}.lock"
        # flock blocks: take it in a thread so the event loop keeps running.
        holder = _LockHolder(lock)
        await asyncio.to_thread(holder.acquire)
        try:
            found = self.get(key)
            if found is not None:
                return found
            self._clean_tmp(digest)
            tmp = self.root / ".tmp" / f"{digest}-{secrets.token_hex(4)}"
            tmp.mkdir(parents=True)
            started = time.monotonic()
            try:
                if progress:
                    progress(f"creating a snapshot of image {key.image_digest[:12]} (once)")
                extra = await create(tmp)
                meta = {
                    "key": asdict(key),
                    "format": SNAPSHOT_FORMAT,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "create_seconds": round(time.monotonic() - started, 3),
                    **(extra or {}),
                }
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                for child in tmp.iterdir():
                    child.chmod(0o444)
                tmp.rename(self.root / digest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            holder.release()
        snap = self.get(key)
        if snap is None:
            raise ProvisionError(f"snapshot {digest[:12]} vanished right after it was made")
        return snap

    def _clean_tmp(self, digest: str) -> None:
        """Remove what a killed creation of ``digest`` left (we hold its lock)."""
        tmp_root = self.root / ".tmp"
        if tmp_root.is_dir():
            for entry in tmp_root.iterdir():
                if entry.name.startswith(f"{digest}-"):
                    shutil.rmtree(entry, ignore_errors=True)


class _LockHolder:
    """An exclusive flock taken in one thread and released from another."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def new_machine_id() -> str:
    """A random systemd-style machine id (32 hex digits)."""
    return secrets.token_hex(16)


def check_restorable(snapshot: Snapshot) -> None:
    """Refuse a snapshot whose files are not all there."""
    if not snapshot.memory.is_file() or not snapshot.scratch.is_file():
        raise ProvisionError(f"snapshot {snapshot.path} is incomplete; remove it and retry")
