"""Snapshots: a template booted once, clones restored from it (real VMs under TCG).

These use a VM shape nobody else uses (768M) so the other tests, which run
with ``snapshot="auto"``, keep booting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.errors import ProvisionError, UsageError
from stoker.paths import Dirs
from stoker.run import RunRequest, run_job
from stoker.snapshots import SnapshotKey, SnapshotStore
from stoker.vm import VM

SHAPE = {"memory": "768M", "disk": "2G"}
STOKER = [sys.executable, "-m", "stoker.cli"]

KEY = SnapshotKey(
    image_digest="d" * 64,
    cpus=2,
    memory_mb=768,
    disk_mb=2048,
    backend="qemu",
    backend_version="7.2.22",
    kernel="linux-image-6.1.0-56-cloud-amd64=6.1.192-2",
    initrd="abc.cpio.gz",
    accel="tcg",
)


@pytest.mark.parametrize(
    "change",
    [
        {"image_digest": "e" * 64},
        {"cpus": 1},
        {"memory_mb": 1024},
        {"disk_mb": 4096},
        {"backend_version": "8.0.0"},
        {"kernel": "linux-image-6.1.0-57-cloud-amd64=6.1.200-1"},
        {"initrd": "def.cpio.gz"},
        {"accel": "kvm"},
    ],
)
def test_key_covers_everything_a_restore_depends_on(change: dict[str, object]) -> None:
    other = SnapshotKey(**{**KEY.__dict__, **change})  # type: ignore[arg-type]
    assert other.digest() != KEY.digest()
    assert SnapshotKey(**KEY.__dict__).digest() == KEY.digest()


async def test_failed_creation_publishes_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(Dirs(cache=tmp_path, runtime=tmp_path / "run"))

    async def broken(directory: Path) -> dict[str, object]:
        (directory / "memory").write_bytes(b"half")
        raise RuntimeError("template boot failed")

    with pytest.raises(RuntimeError, match="template boot failed"):
        await store.ensure(KEY, broken)
    assert store.get(KEY) is None
    assert list((store.root / ".tmp").iterdir()) == []


async def test_concurrent_creation_makes_one_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(Dirs(cache=tmp_path, runtime=tmp_path / "run"))
    calls: list[Path] = []

    async def create(directory: Path) -> dict[str, object]:
        calls.append(directory)
        await asyncio.sleep(0.2)
        for name in ("memory", "scratch.img", "state"):
            (directory / name).write_bytes(b"x")
        return {"note": "made"}

    first, second = await asyncio.gather(store.ensure(KEY, create), store.ensure(KEY, create))
    assert len(calls) == 1
    assert first.path == second.path == store.root / KEY.digest()
    assert first.meta["note"] == "made" and first.key == KEY
    assert store.list() == [first]
    assert store.remove(KEY.digest()[:8]) == [first.path]
    assert store.get(KEY) is None
    with pytest.raises(UsageError, match="no snapshot"):
        store.remove("0123abcd")


def _read_identity() -> list[str]:
    return [
        "sh",
        "-c",
        "hostname; cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
        "echo; date +%s",
    ]


@pytest.mark.vm
async def test_clones_restore_fast_and_do_not_share_identity(dirs: Dirs) -> None:
    async with VM(dirs=dirs, snapshot="create", **SHAPE) as first:  # type: ignore[arg-type]
        snap = first.restored_from
        assert snap is not None
        template_disk = hashlib.sha256(snap.scratch.read_bytes()).hexdigest()
        await first.exec(["sh", "-c", "echo from-first > /root/mark"], check=True)

    outputs = []
    for _ in range(2):
        async with VM(dirs=dirs, snapshot="auto", **SHAPE) as clone:  # type: ignore[arg-type]
            assert clone.restored_from is not None
            assert clone.restored_from.path == snap.path
            # A restore is a fraction of a boot: no kernel, no init, no CPython start-up.
            assert clone.timings.agent_ready < 30
            result = await clone.exec(_read_identity(), check=True)
            outputs.append((result.stdout.decode().split("\n"), time.time()))
            seen = await clone.exec(["cat", "/root/mark"])
            assert seen.exit_code != 0  # the first clone's write stayed in its own overlay
    (a, a_time), (b, b_time) = outputs
    hostname, machine_id, random, clock = range(4)
    assert a[hostname] != b[hostname]
    assert a[machine_id] != b[machine_id] and len(a[machine_id]) == 32
    assert a[random] != b[random] and len(a[random]) == 64
    # The clock was stepped to the host's time, not left at the template's.
    assert abs(int(a[clock]) - a_time) < 5 and abs(int(b[clock]) - b_time) < 5
    # Clones never write to the template.
    assert hashlib.sha256(snap.scratch.read_bytes()).hexdigest() == template_disk


@pytest.mark.vm
async def test_run_job_from_a_snapshot_copies_the_project_in(dirs: Dirs, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "hello.txt").write_text("hi from the host\n")
    out: list[bytes] = []
    req = RunRequest(
        src=project,
        argv=("sh", "-c", "cat hello.txt; pwd"),
        memory=SHAPE["memory"],
        disk=SHAPE["disk"],
        snapshot="create",
    )
    summary = await run_job(req, stdout=out.append, stderr=out.append, dirs=dirs)
    assert summary.returncode == 0
    assert summary.snapshot is not None
    assert b"".join(out).decode() == "hi from the host\n/work/proj\n"
    assert summary.copied_in["files"] == 1


@pytest.mark.vm
def test_snapshot_cli(dirs: Dirs) -> None:
    env = {
        **os.environ,
        "STOKER_CACHE_DIR": str(dirs.cache),
        "STOKER_RUNTIME_DIR": str(dirs.runtime),
    }
    proc = subprocess.run(
        [*STOKER, "snapshot", "create", "--memory", "768M", "--disk", "2G"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "768M 2048M tcg" in proc.stdout or "768M 2048M kvm" in proc.stdout
    listing = subprocess.run(
        [*STOKER, "snapshot", "ls", "--json"], capture_output=True, text=True, env=env, check=True
    )
    rows = json.loads(listing.stdout)
    assert any(r["key"]["memory_mb"] == 768 for r in rows)
    bad = subprocess.run(
        [*STOKER, "snapshot", "rm"], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 2 and "give a snapshot id or --all" in bad.stderr


def test_incomplete_snapshot_is_refused(tmp_path: Path) -> None:
    from stoker.snapshots import Snapshot, check_restorable

    with pytest.raises(ProvisionError, match="incomplete"):
        check_restorable(Snapshot(key=KEY, path=tmp_path, meta={}))
