"""Packing a finished root tree into a read-only filesystem image.

Every builder ends here: whatever produced the tree (mmdebstrap, OCI layers),
the same functions turn it into the file a VM boots from.  Three formats:

``erofs`` (default)
    Compressed (lz4hc), random-access, the fastest to mount and read under
    emulation.  Linux >= 5.4; tail packing needs >= 5.17.
``squashfs``
    Compressed (zstd by default); older and more widely supported.
``ext4``
    Uncompressed, without a journal; for tools that want to loop-mount or
    modify the image.

All three are reproducible: fixed timestamps (``source_date_epoch``), a
filesystem UUID derived from the image digest, sorted input, no host-specific
metadata.  The command lines are pure functions of a frozen :class:`PackOptions`.
"""

from __future__ import annotations

import math
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from stoker.errors import ProvisionError, UsageError
from stoker.images.base import log_line
from stoker.procs import run_checked

Format = Literal["erofs", "squashfs", "ext4"]
FORMATS: tuple[Format, ...] = ("erofs", "squashfs", "ext4")

#: The compressors each format accepts ("none" means uncompressed).
COMPRESSORS: dict[Format, tuple[str, ...]] = {
    "erofs": ("lz4hc", "lz4", "lzma", "none"),
    "squashfs": ("zstd", "lz4", "xz", "gzip", "lzo"),
    "ext4": ("none",),
}
DEFAULT_COMPRESSION: dict[Format, str] = {"erofs": "lz4hc", "squashfs": "zstd", "ext4": "none"}

#: Packing tools and the Debian packages that ship them.
TOOLS: dict[Format, tuple[str, str]] = {
    "erofs": ("mkfs.erofs", "erofs-utils"),
    "squashfs": ("mksquashfs", "squashfs-tools"),
    "ext4": ("mkfs.ext4", "e2fsprogs"),
}


@dataclass(frozen=True)
class PackOptions:
    """How a tree is packed.  Validated on creation (raises :class:`UsageError`)."""

    format: Format = "erofs"
    #: A name from :data:`COMPRESSORS`, optionally ``,LEVEL`` for erofs lz4hc/lzma.
    compression: str = "lz4hc"
    #: erofs physical cluster size; bigger compresses better.
    pcluster_size: int = 65536
    #: Timestamp of every file, and of the filesystem itself.
    source_date_epoch: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(
                f"unknown root filesystem format {self.format!r}",
                hint=f"use one of {', '.join(FORMATS)}",
            )
        algo, _, level = self.compression.partition(",")
        if algo not in COMPRESSORS[self.format]:
            raise UsageError(
                f"{self.format} cannot use compression {self.compression!r}",
                hint=f"use one of {', '.join(COMPRESSORS[self.format])}",
            )
        if level and (self.format != "erofs" or algo == "none" or not level.isdigit()):
            raise UsageError(f"invalid compression level in {self.compression!r}")
        if self.pcluster_size < 4096 or self.pcluster_size % 4096:
            raise UsageError(f"pcluster_size must be a multiple of 4096, not {self.pcluster_size}")
        if self.source_date_epoch < 0:
            raise UsageError("source_date_epoch must not be negative")

    def to_json(self) -> dict[str, object]:
        return {
            "format": self.format,
            "compression": self.compression,
            "pcluster_size": self.pcluster_size,
            "source_date_epoch": self.source_date_epoch,
        }


def filesystem_uuid(digest: str) -> str:
    """A fixed filesystem UUID derived from the image digest (for reproducibility)."""
    return str(uuid.UUID(bytes=bytes.fromhex(digest)[:16], version=4))


def rootfs_filename(fmt: Format) -> str:
    """The name of the image file in a store entry, e.g. ``rootfs.erofs``."""
    return f"rootfs.{fmt}"


def mkfs_erofs_argv(opts: PackOptions, output: Path, tree: Path, *, fs_uuid: str) -> list[str]:
    """The mkfs.erofs command packing ``tree`` into ``output`` reproducibly."""
    argv = ["mkfs.erofs", "--quiet"]
    if opts.compression != "none":
        argv += [
            f"-z{opts.compression}",
            f"-C{opts.pcluster_size}",
            # pack file tails into the inode's metadata block (Linux >= 5.17)
            "-Eztailpacking",
        ]
    argv += [f"-T{opts.source_date_epoch}", f"-U{fs_uuid}", str(output), str(tree)]
    return argv


def mksquashfs_argv(opts: PackOptions, output: Path, tree: Path) -> list[str]:
    """The mksquashfs command packing ``tree`` into ``output`` reproducibly.

    squashfs has no UUID; ``-mkfs-time``/``-all-time`` fix every timestamp and
    ``-processors 1`` fixes the block order.
    """
    # fmt: off
    return [
        "mksquashfs", str(tree), str(output),
        "-noappend", "-no-progress", "-quiet",
        "-comp", opts.compression,
        "-b", "131072",
        "-mkfs-time", str(opts.source_date_epoch),
        "-all-time", str(opts.source_date_epoch),
        "-processors", "1",
        "-no-exports",
    ]
    # fmt: on


def ext4_size_bytes(tree_bytes: int, entries: int) -> int:
    """A size for an ext4 image holding ``tree_bytes`` in ``entries`` inodes.

    Metadata, one block of slack per entry and 20 % headroom, rounded up to
    a MiB; at least 64 MiB so tiny trees still get a usable filesystem.
    """
    needed = tree_bytes + entries * 4096 + (entries * 256)
    size = max(64 << 20, math.ceil(needed * 1.2))
    return (size + (1 << 20) - 1) // (1 << 20) << 20


def mkfs_ext4_argv(
    opts: PackOptions, output: Path, tree: Path, *, fs_uuid: str, size_bytes: int, inodes: int
) -> list[str]:
    """The mkfs.ext4 command writing ``tree`` into a new ``output`` of ``size_bytes``.

    No journal (the image is mounted read-only), a fixed UUID and directory
    hash seed, root-owned, no reserved blocks.  ``E2FSPROGS_FAKE_TIME`` (set by
    :func:`pack_tree`) fixes the superblock times.
    """
    # fmt: off
    return [
        "mkfs.ext4", "-q", "-F",
        "-O", "^has_journal",
        "-m", "0",
        "-N", str(inodes),
        "-U", fs_uuid,
        "-E", f"hash_seed={fs_uuid},root_owner=0:0,lazy_itable_init=0",
        "-d", str(tree),
        str(output), f"{size_bytes // 1024}k",
    ]
    # fmt: on


#: First inode mkfs.ext4 -d gives to files (1-10 are reserved, 11 is lost+found).
EXT4_FIRST_INODE = 12


def ext4_ctime_script(entries: int, epoch: int) -> str:
    """debugfs commands setting the ctime and atime of every inode ``mkfs.ext4 -d`` filled.

    mke2fs 1.47.0 copies each file's ctime from the tree, and a ctime cannot be
    set from user space, so it is rewritten afterwards (1.47.1 would honour
    SOURCE_DATE_EPOCH).  The atime too: mke2fs reading the normalised tree
    updates its directories' atimes to the wall clock, so two builds a second
    apart differed.  ``-d`` allocates inodes in order from
    :data:`EXT4_FIRST_INODE`; root is 2 and lost+found 11.
    """
    inodes = [2, 11, *range(EXT4_FIRST_INODE, EXT4_FIRST_INODE + entries)]
    return "".join(f"sif <{i}> ctime @{epoch}\nsif <{i}> atime @{epoch}\n" for i in inodes)


def pack_argv(
    opts: PackOptions, output: Path, tree: Path, *, fs_uuid: str, tree_bytes: int, entries: int
) -> list[str]:
    """The command packing ``tree`` into ``output`` in ``opts.format``."""
    if opts.format == "erofs":
        return mkfs_erofs_argv(opts, output, tree, fs_uuid=fs_uuid)
    if opts.format == "squashfs":
        return mksquashfs_argv(opts, output, tree)
    return mkfs_ext4_argv(
        opts,
        output,
        tree,
        fs_uuid=fs_uuid,
        size_bytes=ext4_size_bytes(tree_bytes, entries),
        inodes=entries + 1024,
    )


@dataclass(frozen=True)
class TreeStats:
    """Size of a tree: regular-file bytes (hard links once) and entries."""

    bytes: int
    entries: int


def tree_stats(tree: Path) -> TreeStats:
    """Walk ``tree`` without following symlinks."""
    seen: set[tuple[int, int]] = set()
    total = 0
    entries = 0
    for root, dirs, files in os.walk(tree):
        entries += len(dirs)
        for name in files:
            entries += 1
            st = (Path(root) / name).lstat()
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return TreeStats(bytes=total, entries=entries)


def normalise_mtimes(tree: Path, epoch: int) -> None:
    """Set every mtime/atime in ``tree`` (symlinks too) to ``epoch``.

    mkfs.erofs and mksquashfs override timestamps themselves; mkfs.ext4 copies
    them, so for ext4 the tree is normalised first.
    """
    for root, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            os.utime(Path(root) / name, (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch), follow_symlinks=False)


def check_tools(fmt: Format) -> None:
    """Raise :class:`ProvisionError` with the package to install if the packer is missing."""
    import shutil

    tool, package = TOOLS[fmt]
    if shutil.which(tool) is None:
        raise ProvisionError(f"{tool} is not installed", hint=f"apt-get install {package}")


def pack_tree(opts: PackOptions, tree: Path, output: Path, *, digest: str, log: Path) -> TreeStats:
    """Pack ``tree`` into ``output`` (which must not exist); returns the tree's size."""
    check_tools(opts.format)
    stats = tree_stats(tree)
    env: dict[str, str] = {}
    if opts.format == "ext4":
        normalise_mtimes(tree, opts.source_date_epoch)
        env["E2FSPROGS_FAKE_TIME"] = str(opts.source_date_epoch)
    fs_uuid = filesystem_uuid(digest)
    argv = pack_argv(
        opts, output, tree, fs_uuid=fs_uuid, tree_bytes=stats.bytes, entries=stats.entries
    )
    log_line(log, f"packing {stats.entries} entries, {stats.bytes} bytes, as {opts.format}")
    run_checked(
        argv,
        env=env or None,
        log=log,
        timeout=3600,
        hint=f"apt-get install {TOOLS[opts.format][1]}",
    )
    if opts.format == "ext4":
        script = output.with_name(output.name + ".debugfs")
        script.write_text(ext4_ctime_script(stats.entries, opts.source_date_epoch))
        try:
            # Not logged line by line: one command per inode.
            # The fake time keeps debugfs from stamping the superblock's write time.
            run_checked(["debugfs", "-w", "-f", str(script), str(output)], env=env, timeout=3600)
        finally:
            script.unlink()
    return stats


def guest_path_parts(path: str) -> tuple[str, ...]:
    """The components of an absolute guest path (validated by the spec already)."""
    parts = PurePosixPath(path).parts
    if not parts or parts[0] != "/" or ".." in parts:
        raise ValueError(f"not an absolute guest path: {path!r}")
    return parts[1:]
