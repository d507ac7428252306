"""The image model shared by every builder and the store.

An *image* is a read-only root filesystem (an erofs file) plus a manifest that
describes it.  A *builder* turns a declarative spec into such a file; the store
(:mod:`stoker.images.store`) decides when to build, where to put the result and
how to publish it atomically.  Builders never touch the store's layout: they get
a scratch directory, an output path and a log file, and return manifest extras.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from stoker.errors import LaunchError, ProvisionError
from stoker.procs import run_checked


@dataclass(frozen=True)
class Image:
    """A published image: an erofs root filesystem shared read-only by many VMs."""

    #: The name it was asked for under, e.g. ``"default"``.
    name: str
    #: Hex sha256 identifying the content (normalised spec + builder version).
    digest: str
    #: The erofs file.  Never modified after publishing; open it read-only.
    rootfs: Path
    #: Filesystem type of :attr:`rootfs` (``"erofs"``).
    fstype: str
    #: Absolute path of ``python3`` inside the image, e.g. ``"/usr/bin/python3"``.
    python: str
    #: The parsed ``manifest.json``.
    manifest: dict[str, object]


class ImageBuilder(Protocol):
    """Turns a spec into an erofs root filesystem.

    ``build`` must write the finished filesystem to ``rootfs_out`` and return
    manifest extras.  It must return at least ``"python"`` (absolute path of
    python3 inside the image) and should return ``"builder"``,
    ``"builder_version"``, ``"spec"``, ``"fstype"``, ``"packages"``,
    ``"uncompressed_size"`` and ``"source_date_epoch"``.  The store adds
    ``name``, ``digest``, ``rootfs_size``, ``built_at`` and ``build_seconds``.
    ``workdir`` is an empty scratch directory the store removes afterwards.
    """

    #: The image name, e.g. ``"default"``.
    name: str

    def spec_digest(self) -> str:
        """Hex sha256 of the normalised spec and builder version; cheap, no I/O."""
        ...

    def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
        """Build the image into ``rootfs_out``; helper output goes to ``log``."""
        ...


def canonical_digest(document: Mapping[str, object]) -> str:
    """Hex sha256 of ``document`` serialised as canonical JSON."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def log_line(log: Path, message: str) -> None:
    """Append one timestamped line to a build log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with log.open("a") as fh:
        fh.write(f"[{stamp}] {message}\n")


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path, mountinfo: str | None = None) -> list[Path]:
    """Mount points at or below ``path``, deepest first.

    ``mountinfo`` is the text of ``/proc/self/mountinfo`` (read when omitted).
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    root = os.path.realpath(path)
    found: list[Path] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape_mountinfo(fields[4])
        if point == root or point.startswith(root.rstrip("/") + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path, *, log: Path | None = None) -> None:
    """Delete ``path`` recursively without ever crossing into a mount.

    A killed ``mmdebstrap`` leaves ``/proc``, ``/sys`` and bind-mounted device
    nodes inside its target; a plain ``rmtree`` would then delete files of the
    host.  Anything mounted below ``path`` is lazily unmounted first, and if that
    fails the tree is left alone and :class:`ProvisionError` is raised.
    """
    if not path.exists() and not path.is_symlink():
        return
    for point in mounts_under(path):
        try:
            run_checked(["umount", "--lazy", str(point)], log=log)
        except LaunchError as exc:
            raise ProvisionError(
                f"cannot remove {path}: {point} is still mounted and umount failed",
                hint=f"unmount it by hand (umount -l {point}) and retry",
            ) from exc
    remaining = mounts_under(path)
    if remaining:
        raise ProvisionError(
            f"refusing to remove {path}: {remaining[0]} is still mounted",
            hint=f"unmount it by hand (umount -l {remaining[0]}) and retry",
        )
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    for attempt in range(3):
        try:
            shutil.rmtree(path)
            return
        except OSError:
            # A just-killed writer may still be finishing a syscall in there.
            if attempt == 2:
                raise
            time.sleep(0.5)
