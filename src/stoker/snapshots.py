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
until they are evicted.  Publishing is atomic, like the image store: built in
``.tmp``, renamed into place, serialised by a lock per key, so a creation that
fails (a full disk, a crash) leaves nothing a later run could pick.

The store is bounded (:func:`gc`: least recently used first, beyond
``STOKER_SNAPSHOT_MAX_COUNT`` snapshots or ``STOKER_SNAPSHOT_MAX_BYTES`` on
disk) and checked: every file's size and a fingerprint (all of a small file,
sampled blocks of the big sparse ones) are recorded when it is published and
compared before each restore (:meth:`SnapshotStore.verify`), so a truncated or
damaged snapshot is refused and removed instead of half-restored.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stoker.errors import ProvisionError, UsageError
from stoker.images.base import canonical_digest
from stoker.paths import Dirs

#: Bump when the snapshot layout or what a template contains changes.
SNAPSHOT_FORMAT = 5
META_FILE = "snapshot.json"
MEMORY_FILE = "memory"
SCRATCH_FILE = "scratch.img"
#: Files up to this size are fingerprinted whole (the device state is a few MB).
WHOLE_HASH_LIMIT = 64 << 20
#: Blocks sampled from a bigger file's data (1 MiB read per file at restore).
SAMPLE_BLOCKS = 256
SAMPLE_SIZE = 4096
#: Store bounds unless the environment says otherwise.
DEFAULT_MAX_COUNT = 16
DEFAULT_MAX_BYTES = 20 << 30


class SnapshotDamaged(ProvisionError):
    """A snapshot's files are not what was published (truncated, changed, missing)."""


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
    #: Size of the template's seed disk, which clones fill with their project.
    seed_slot_bytes: int = 0

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
    def last_used(self) -> float:
        """When a VM was last restored from it (its creation, before that)."""
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def size_bytes(self) -> int:
        """Disk space actually used (the memory file and disk are sparse)."""
        total = 0
        for child in self.path.iterdir():
            with contextlib.suppress(OSError):
                total += child.stat().st_blocks * 512
        return total


def _lock_fd(path: Path, operation: int) -> int | None:
    """A descriptor of lock file ``path`` holding ``flock(operation)``; close it to release.

    None when ``operation`` has ``LOCK_NB`` and someone else holds the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


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
            # Not while it is being made; VMs running from it keep what they opened.
            fd = _lock_fd(self._lock(snap.path.name, "lock"), fcntl.LOCK_EX)
            assert fd is not None  # a blocking lock
            try:
                self._delete(snap)
            finally:
                os.close(fd)
            removed.append(snap.path)
        return removed

    def _lock(self, digest: str, kind: str) -> Path:
        """``lock``: making or removing ``digest``; ``use``: VMs running from it; ``maker``."""
        return self.root / ".locks" / f"{digest}.{kind}"

    def _delete(self, snap: Snapshot) -> bool:
        """Take ``snap`` out of the store (renamed aside first: never half visible)."""
        aside = self.root / ".tmp" / f"{snap.path.name}-removed-{secrets.token_hex(4)}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            snap.path.rename(aside)
        except FileNotFoundError:
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True

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
        # flock blocks: take it in a thread so the event loop keeps running.
        lock = await asyncio.to_thread(_lock_fd, self._lock(digest, "lock"), fcntl.LOCK_EX)
        assert lock is not None  # a blocking lock
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
                files = await asyncio.to_thread(fingerprint_dir, tmp)
                meta = {
                    "files": files,
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
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ProvisionError(
                        f"no space left in {self.root} for a snapshot; nothing was kept",
                        hint="free space, or lower STOKER_SNAPSHOT_MAX_BYTES and run "
                        "`stoker snapshot gc`",
                    ) from exc
                raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            os.close(lock)
        snap = self.get(key)
        if snap is None:
            raise ProvisionError(f"snapshot {digest[:12]} vanished right after it was made")
        return snap

    def verify(self, snapshot: Snapshot) -> None:
        """Raise :class:`SnapshotDamaged` unless its files are those it was published with."""
        recorded = snapshot.meta.get("files")
        if not isinstance(recorded, dict) or not recorded:
            raise SnapshotDamaged(f"snapshot {snapshot.path.name[:12]} records no file list")
        for name in (MEMORY_FILE, SCRATCH_FILE):
            if name not in recorded:
                raise SnapshotDamaged(f"snapshot {snapshot.path.name[:12]} has no {name}")
        for name, want in recorded.items():
            if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
                raise SnapshotDamaged(f"snapshot {snapshot.path.name[:12]}: bad file name")
            if not isinstance(want, dict):
                raise SnapshotDamaged(f"snapshot {snapshot.path.name[:12]}: bad record of {name}")
            offsets = want.get("offsets")
            if offsets is not None and not (
                isinstance(offsets, list)
                and len(offsets) <= SAMPLE_BLOCKS + 1
                and all(isinstance(o, int) and o >= 0 for o in offsets)
            ):
                raise SnapshotDamaged(f"snapshot {snapshot.path.name[:12]}: bad record of {name}")
            try:
                got = fingerprint(snapshot.path / name, offsets)
            except OSError as exc:
                raise SnapshotDamaged(
                    f"snapshot {snapshot.path.name[:12]}: {name} cannot be read ({exc})"
                ) from None
            if got != want:
                what = "truncated or grown" if got.get("size") != want.get("size") else "changed"
                raise SnapshotDamaged(f"snapshot {snapshot.path.name[:12]}: {name} is {what}")

    def mark_used(self, snapshot: Snapshot) -> None:
        """Record a restore (the least recently used snapshots are evicted first)."""
        with contextlib.suppress(OSError):
            os.utime(snapshot.path)

    def hold(self, snapshot: Snapshot) -> int | None:
        """Keep ``snapshot`` from eviction while a VM runs from it: close the result to let go.

        None when it is being evicted right now (then do without it).
        """
        return _lock_fd(self._lock(snapshot.path.name, "use"), fcntl.LOCK_SH | fcntl.LOCK_NB)

    def gc(
        self, *, max_count: int | None = None, max_bytes: int | None = None
    ) -> builtins.list[Snapshot]:
        """Evict least recently used snapshots beyond the bounds; returns those removed.

        A snapshot that VMs run from (see :meth:`hold`) is skipped.
        """
        count_limit = (
            max_count
            if max_count is not None
            else _env_int("STOKER_SNAPSHOT_MAX_COUNT", DEFAULT_MAX_COUNT)
        )
        bytes_limit = (
            max_bytes
            if max_bytes is not None
            else _env_int("STOKER_SNAPSHOT_MAX_BYTES", DEFAULT_MAX_BYTES)
        )
        snaps = sorted(self.list(), key=lambda s: s.last_used)
        sizes = {s.path: s.size_bytes for s in snaps}
        total = sum(sizes.values())
        removed: builtins.list[Snapshot] = []
        for snap in snaps:
            if len(snaps) - len(removed) <= count_limit and total <= bytes_limit:
                break
            idle = _lock_fd(self._lock(snap.path.name, "use"), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if idle is None:
                continue
            try:
                if self._delete(snap):
                    removed.append(snap)
                    total -= sizes[snap.path]
            finally:
                os.close(idle)
        return removed

    def discard(self, snapshot: Snapshot) -> None:
        """Remove a damaged snapshot (a VM found it so: nothing can run from it)."""
        self._delete(snapshot)

    def claim_maker(self, digest: str) -> int | None:
        """A lock making ``digest`` this process's job, or None (it exists or is being made)."""
        if self._load(self.root / digest) is not None:
            return None
        return _lock_fd(self._lock(digest, "maker"), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release_maker(self, claim: int | None) -> None:
        """Give back what :meth:`claim_maker` returned."""
        if claim is not None:
            os.close(claim)

    def _clean_tmp(self, digest: str) -> None:
        """Remove what a killed creation of ``digest`` left (we hold its lock)."""
        tmp_root = self.root / ".tmp"
        if tmp_root.is_dir():
            for entry in tmp_root.iterdir():
                if entry.name.startswith(f"{digest}-"):
                    shutil.rmtree(entry, ignore_errors=True)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise UsageError(f"{name} must not be negative, got {value}")
    return value


def fingerprint(path: Path, offsets: builtins.list[int] | None = None) -> dict[str, Any]:
    """Size and digest of one file: all of it when small, else sampled blocks.

    The blocks of a big file are picked at publication, spread over its data
    (its holes are left out: the memory file and the disk are sparse), and
    recorded, so a later check reads the very same offsets whatever the
    filesystem does with the file's extents.  ``offsets``: those recorded.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if offsets is None and size <= WHOLE_HASH_LIMIT:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            return {"size": size, "sha256": digest.hexdigest()}
        if offsets is None:
            offsets = _sample_offsets(f.fileno(), size)
        for offset in offsets:
            digest.update(os.pread(f.fileno(), SAMPLE_SIZE, offset))
        return {"size": size, "offsets": offsets, "sampled": digest.hexdigest()}


def _sample_offsets(fd: int, size: int) -> builtins.list[int]:
    extents = _data_extents(fd, size)
    data = sum(end - start for start, end in extents)
    offsets = []
    if data:
        for i in range(SAMPLE_BLOCKS):
            target = data * i // SAMPLE_BLOCKS
            for start, end in extents:
                if target < end - start:
                    offsets.append(start + target)
                    break
                target -= end - start
    offsets.append(max(size - SAMPLE_SIZE, 0))
    return offsets


def _data_extents(fd: int, size: int) -> builtins.list[tuple[int, int]]:
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole after offset
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        offset = end
    return extents


def fingerprint_dir(directory: Path) -> dict[str, dict[str, Any]]:
    """:func:`fingerprint` of every file of a snapshot being published."""
    return {
        child.name: fingerprint(child)
        for child in sorted(directory.iterdir())
        if child.is_file() and child.name != META_FILE
    }


def spawn_maker(image: str, key: SnapshotKey, dirs: Dirs, *, vmm: str = "qemu") -> int | None:
    """Start ``stoker snapshot create`` for ``key`` in the background, detached; its pid.

    What ``stoker run`` does after a run that booted because the snapshot was
    missing: the user's run is over and not slowed, and the next run restores.
    The maker lives in its own session (a Ctrl-C after the run does not reach
    it), writes to ``snapshots/maker.log``, and exits at once when the snapshot
    appeared meanwhile or another maker is at work on it.  None when it could
    not be started (the run is not failed for it).
    """
    log_dir = dirs.cache / "snapshots"
    argv = [
        sys.executable,
        "-m",
        "stoker.cli",
        "snapshot",
        "create",
        "--image",
        image,
        "--cpus",
        str(key.cpus),
        "--memory",
        f"{key.memory_mb}M",
        "--disk",
        f"{key.disk_mb}M",
        "--accel",
        key.accel,
        "--vmm",
        vmm,
        "--expect",
        key.digest(),
        "--quiet",
    ]
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_dir / "maker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            try:
                # posix_spawn, not Popen: nothing of ours waits for it, so no
                # Popen object may be left to warn about a child still running.
                return os.posix_spawn(
                    sys.executable,
                    argv,
                    dict(os.environ),
                    setsid=True,
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, devnull, 0),
                        (os.POSIX_SPAWN_DUP2, fd, 1),
                        (os.POSIX_SPAWN_DUP2, fd, 2),
                    ],
                )
            finally:
                os.close(devnull)
        finally:
            os.close(fd)
    except OSError:
        return None


def new_machine_id() -> str:
    """A random systemd-style machine id (32 hex digits)."""
    return secrets.token_hex(16)


def check_restorable(snapshot: Snapshot) -> None:
    """Refuse a snapshot whose files are not all there."""
    if not snapshot.memory.is_file() or not snapshot.scratch.is_file():
        raise ProvisionError(f"snapshot {snapshot.path} is incomplete; remove it and retry")
