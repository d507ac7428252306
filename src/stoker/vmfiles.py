"""The files a VM runs on, made on the host.

Its work directory's owner record (and the sweep of directories whose owner
died), the scratch disk, a clone's qcow2 overlay on its template's disk, the
project packed as a tar the guest reads as a disk, and a template's seed slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from stoker.archive import PackReport, pack_tree
from stoker.errors import LaunchError

log = logging.getLogger("stoker.vm")

OWNER_FILE = "owner"


def process_identity(pid: int) -> str | None:
    """``pid:starttime``: survives pid reuse, unlike a bare pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def make_workdir(runtime: Path, name: str) -> Path:
    """A new work directory for VM ``name`` under ``runtime``, owned by this process.

    Stale ones (their owner died) are swept first.
    """
    sweep_stale_workdirs(runtime)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=runtime))
    claim_workdir(workdir)
    return workdir


def claim_workdir(workdir: Path) -> None:
    """Record this process as the owner of ``workdir`` (a new VM's, or an adopted one's)."""
    # Written whole and renamed into place: a concurrent sweep must never
    # read a half-written (empty) owner file and take the directory for dead.
    tmp = workdir / f".{OWNER_FILE}.tmp"
    tmp.write_text(process_identity(os.getpid()) or "")
    tmp.rename(workdir / OWNER_FILE)


def sweep_stale_workdirs(runtime: Path) -> list[Path]:
    """Remove VM work directories whose owning stoker process is gone.

    Teardown normally removes them; this catches a stoker that was killed with
    SIGKILL (its QEMU died with it through the parent-death signal).
    """
    removed = []
    for entry in runtime.glob("stoker-*"):
        owner = entry / OWNER_FILE
        try:
            recorded = owner.read_text().strip()
        except OSError:
            continue  # not ours, or still being created
        if not recorded:
            continue  # identity unknown: never guess a live VM dead
        pid = recorded.split(":", 1)[0]
        if pid.isdigit() and process_identity(int(pid)) == recorded:
            continue
        for _ in range(10):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
                break
            # The dead run's VMM may still be exiting (it got SIGKILL with its parent).
            time.sleep(0.1)
        else:
            log.warning("could not remove the stale VM work directory %s", entry)
    return removed


#: Size of the seed disk of a template, which its clones fill with their project.
SEED_SLOT_BYTES = 4 << 30


def seed_slot(path: Path, tar: Path | None) -> Path:
    """The clone's seed disk: ``tar`` padded to the slot's size, else an empty slot at ``path``.

    Sparse either way.  A tar bigger than the slot cannot go there: the slot is
    left empty and the caller copies the project over the agent channel.
    """
    if tar is not None and tar.stat().st_size <= SEED_SLOT_BYTES:
        os.truncate(tar, SEED_SLOT_BYTES)  # tar stops at its end marker; the rest reads as zeros
        return tar
    with path.open("wb") as f:
        f.truncate(SEED_SLOT_BYTES)
    return path


def pack_to_file(src: Path, out: Path) -> PackReport:
    """Pack ``src`` into a tar file usable as a disk (size a multiple of 512 bytes)."""
    with out.open("wb") as fh:
        report = pack_tree(src, fh)
        size = fh.tell()
        if size % 512:
            fh.write(b"\0" * (512 - size % 512))
    return report


async def make_overlay(path: Path, backing: Path) -> None:
    """A qcow2 file recording a clone's writes on top of the template's disk."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(path)]
    await _run_tool(argv, "qemu-utils")


async def make_scratch_disk(path: Path, size_mb: int) -> None:
    """A sparse, freshly formatted ext4 file for the overlay's writable layer."""
    with path.open("wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        # A throw-away disk: no journal, no reserved blocks, lazy init (sparse stays sparse).
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,nodiscard",
        str(path),
    ]
    await _run_tool(argv, "e2fsprogs")


async def _run_tool(argv: list[str], package: str) -> None:
    """Run a host tool to completion; :class:`LaunchError` with its output if it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except FileNotFoundError as exc:
        raise LaunchError(
            f"{argv[0]} is not installed", argv=argv, hint=f"apt-get install {package}"
        ) from exc
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise LaunchError(
            f"{argv[0]} failed",
            argv=argv,
            returncode=proc.returncode,
            output=out.decode(errors="replace"),
        )
