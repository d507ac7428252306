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
        {"seed_slot_bytes": 1 << 20},
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


def _fake_template(size: int = 80 << 20) -> object:
    """A ``create`` leaving a sparse memory file bigger than the whole-hash limit."""

    async def create(directory: Path) -> dict[str, object]:
        with (directory / "memory").open("wb") as f:
            f.truncate(size)
            for offset in (0, 5 << 20, 40 << 20):
                f.seek(offset)
                f.write(os.urandom(64 << 10))
        (directory / "scratch.img").write_bytes(os.urandom(8192))
        (directory / "state").write_bytes(os.urandom(4096))
        return {}

    return create


async def test_damaged_snapshots_are_refused_before_restore(tmp_path: Path) -> None:
    from stoker.snapshots import SnapshotDamaged

    store = SnapshotStore(Dirs(cache=tmp_path, runtime=tmp_path / "run"))
    snap = await store.ensure(KEY, _fake_template())  # type: ignore[arg-type]
    assert set(snap.meta["files"]) == {"memory", "scratch.img", "state"}
    assert "sampled" in snap.meta["files"]["memory"]  # big and sparse: sampled blocks
    assert "sha256" in snap.meta["files"]["state"]  # small: all of it
    store.verify(snap)
    memory, state = snap.path / "memory", snap.path / "state"
    os.truncate(memory, memory.stat().st_size - 4096)
    with pytest.raises(SnapshotDamaged, match="memory is truncated"):
        store.verify(snap)
    os.truncate(memory, memory.stat().st_size + 4096)  # the size is back: fine again
    store.verify(snap)
    fd = os.open(memory, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 8, 0)  # one block of guest memory changed
    finally:
        os.close(fd)
    with pytest.raises(SnapshotDamaged, match="memory is changed"):
        store.verify(snap)
    store.discard(snap)
    assert store.get(KEY) is None

    snap = await store.ensure(KEY, _fake_template())  # type: ignore[arg-type]
    data = bytearray(state.read_bytes())
    data[100] ^= 0xFF
    state.chmod(0o644)
    state.write_bytes(bytes(data))
    with pytest.raises(SnapshotDamaged, match="state is changed"):
        store.verify(snap)
    state.unlink()
    with pytest.raises(SnapshotDamaged, match="state cannot be read"):
        store.verify(snap)


async def test_a_full_disk_while_writing_leaves_no_snapshot(tmp_path: Path) -> None:
    import errno

    store = SnapshotStore(Dirs(cache=tmp_path, runtime=tmp_path / "run"))

    async def full(directory: Path) -> dict[str, object]:
        (directory / "memory").write_bytes(b"part of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ProvisionError, match="no space left") as info:
        await store.ensure(KEY, full)
    assert "STOKER_SNAPSHOT_MAX_BYTES" in (info.value.hint or "")
    assert store.get(KEY) is None and store.list() == []
    assert list((store.root / ".tmp").iterdir()) == []


async def test_gc_evicts_least_recently_used_and_spares_those_in_use(tmp_path: Path) -> None:
    store = SnapshotStore(Dirs(cache=tmp_path, runtime=tmp_path / "run"))
    keys = [SnapshotKey(**{**KEY.__dict__, "cpus": n}) for n in (1, 2, 3)]  # type: ignore[arg-type]
    snaps = [await store.ensure(k, _fake_template(1 << 20)) for k in keys]  # type: ignore[arg-type]
    for age, snap in zip((300, 200, 100), snaps, strict=True):
        os.utime(snap.path, (time.time() - age, time.time() - age))
    store.mark_used(snaps[0])  # the oldest is now the most recently used
    assert store.gc(max_count=3, max_bytes=1 << 40) == []
    held = store.hold(snaps[1])  # as a VM running from it does
    assert held is not None
    try:
        evicted = store.gc(max_count=2, max_bytes=1 << 40)
    finally:
        os.close(held)
    # snaps[1] was least recently used but busy: the next one went instead
    assert [s.path for s in evicted] == [snaps[2].path]
    assert {s.path for s in store.list()} == {snaps[0].path, snaps[1].path}
    assert [s.path for s in store.gc(max_count=10, max_bytes=0)] == [
        snaps[1].path,
        snaps[0].path,
    ]
    os.environ["STOKER_SNAPSHOT_MAX_COUNT"] = "many"
    try:
        with pytest.raises(UsageError, match="STOKER_SNAPSHOT_MAX_COUNT must be a whole number"):
            store.gc()
    finally:
        del os.environ["STOKER_SNAPSHOT_MAX_COUNT"]


async def test_one_background_maker_per_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(Dirs(cache=tmp_path, runtime=tmp_path / "run"))
    claim = store.claim_maker(KEY.digest())
    assert claim is not None
    assert store.claim_maker(KEY.digest()) is None  # another maker is at work
    store.release_maker(claim)
    await store.ensure(KEY, _fake_template(1 << 20))  # type: ignore[arg-type]
    assert store.claim_maker(KEY.digest()) is None  # made already


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    raise AssertionError(f"the snapshot maker {pid} did not finish in {timeout:.0f}s")


@pytest.mark.vm
def test_a_run_makes_the_snapshot_the_next_run_restores(dirs: Dirs, tmp_path: Path) -> None:
    # The default (auto) path: a shape no other test uses, removed at the end.
    project = tmp_path / "proj"
    project.mkdir()
    (project / "f").write_text("hi\n")
    env = {
        **os.environ,
        "STOKER_CACHE_DIR": str(dirs.cache),
        "STOKER_RUNTIME_DIR": str(dirs.runtime),
    }
    env.pop("STOKER_SNAPSHOT", None)  # the suite's "reuse": here the default is under test
    shape = ["--memory", "640M", "--disk", "1536M"]

    def run() -> tuple[dict[str, object], str]:
        proc = subprocess.run(
            [*STOKER, "run", *shape, "--json", str(project), "--", "cat", "f"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout), proc.stderr

    store = SnapshotStore(dirs)
    makers: list[int] = []
    try:
        first, err = run()
        assert first["started"] == "booted" and first["snapshot"] is None
        # The suite pins kernel = "auto" to Debian's (conftest): --json names it.
        assert str(first["kernel"]).startswith("linux-image-"), first
        pid = first["snapshot_maker_pid"]
        assert isinstance(pid, int), err
        makers.append(pid)
        assert "making a snapshot in the background" in err
        _wait_gone(pid, 600)
        made = [s for s in store.list() if s.key.memory_mb == 640 and s.key.disk_mb == 1536]
        assert len(made) == 1, (dirs.cache / "snapshots" / "maker.log").read_text()
        second, err = run()
        assert second["started"] == "restored" and second["snapshot"] == made[0].path.name
        assert second["snapshot_maker_pid"] is None
        assert "hi" in err  # --json: the command's output goes to stderr

        # A damaged snapshot: one warning, a cold boot, and it is gone.
        memory = made[0].path / "memory"
        os.truncate(memory, memory.stat().st_size - 4096)
        third, err = run()
        assert third["started"] == "booted"
        warnings = [line for line in err.splitlines() if "snapshot" in line and "warning:" in line]
        assert len(warnings) == 1 and "memory is truncated" in warnings[0], err
        assert store.get(made[0].key) is None
        pid = third["snapshot_maker_pid"]
        assert isinstance(pid, int)
        makers.append(pid)
    finally:
        for pid in makers:  # no maker outlives the test, even a failed one
            _wait_gone(pid, 600)
        for snap in store.list():
            if snap.key.memory_mb == 640 and snap.key.disk_mb == 1536:
                store.remove(snap.path.name)


@pytest.mark.vm
async def test_clones_get_their_project_on_the_seed_slot_or_over_the_channel(
    dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stoker.vmfiles

    # A small slot (and so a snapshot of its own): one project fits, one does not.
    monkeypatch.setattr(stoker.vmfiles, "SEED_SLOT_BYTES", 1 << 20)
    small, big = tmp_path / "small", tmp_path / "big"
    for project, size in ((small, 1000), (big, 3 << 20)):
        project.mkdir()
        (project / "data").write_bytes(os.urandom(size))
    shape = {"memory": "704M", "disk": "1G"}
    try:
        for project, by_channel in ((small, False), (big, True)):
            vm = VM(dirs=dirs, snapshot="create", seed=(project, "/work/p"), **shape)  # type: ignore[arg-type]
            async with vm:
                assert vm.restored_from is not None
                assert vm.restored_from.key.seed_slot_bytes == 1 << 20
                assert vm._seed_by_channel is by_channel
                result = await vm.exec(["sha256sum", "/work/p/data"], check=True)
            want = hashlib.sha256((project / "data").read_bytes()).hexdigest()
            assert result.stdout.decode().split()[0] == want
    finally:
        store = SnapshotStore(dirs)
        for snap in store.list():
            if snap.key.memory_mb == 704:
                store.remove(snap.path.name)
