"""Host-side isolation on this host's real cgroup v2 (skipped, with the reason, where absent).

Every test makes its own parent cgroup (``stoker-test-<random>``) and removes
it, with whatever a failure left in it, at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from stoker.errors import HostLimitExceeded, InfrastructureError, UsageError
from stoker.isolation import CgroupMode, Isolation, LimitPolicy, enter_cgroup
from stoker.isolation.cgroups import OWNER_XATTR, STALE_AFTER, VMCgroup, probe, sweep_stale
from stoker.isolation.limits import limit_files, limits_for
from stoker.isolation.vmmuser import resolve_user, unreadable
from stoker.paths import Dirs
from stoker.procs import child_hook
from stoker.vm import VM
from stoker.vmfiles import process_identity

HOST = probe()


def _skip_reason() -> str | None:
    if HOST.mount is None:
        return f"no cgroup v2 on this host: {HOST.reason}"
    if not HOST.usable:
        return f"cgroup v2 is not usable by this process: {HOST.reason}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture
def parent() -> Iterator[Path]:
    """A private parent cgroup under the mount, removed (and emptied) at the end."""
    assert HOST.mount is not None
    path = HOST.mount / f"stoker-test-{secrets.token_hex(4)}"
    yield path
    if path.exists():
        for child in [c for c in path.iterdir() if c.is_dir()]:
            if (child / "cgroup.kill").exists():
                (child / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 10
            while child.exists():
                try:
                    child.rmdir()
                except OSError:  # busy until the killed processes are gone
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        path.rmdir()


def _procs_cgroup(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def test_process_joins_its_cgroup_before_exec_and_teardown_kills_it(parent: Path) -> None:
    support = probe(parent=parent)
    limits = limits_for(LimitPolicy(), cpus=1, memory_mb=256, accel="tcg", host_memory_mb=4096)

    async def scenario() -> None:
        from stoker.isolation.cgroups import prepare_parent

        cgroup = VMCgroup(prepare_parent(support), "vm-a", limits, support.controllers)
        async with cgroup:
            for name, value in cgroup.files().items():
                assert (cgroup.path / name).read_text().split() == value.split()
            proc = subprocess.Popen(["sleep", "60"], preexec_fn=child_hook(cgroup=cgroup.path))
            try:
                assert _procs_cgroup(proc.pid) == f"/{cgroup.path.relative_to(HOST.mount or '/')}"
                assert cgroup.pids() == [proc.pid]
            finally:
                # Left running on purpose: teardown must kill it (cgroup.kill).
                pass
        assert not cgroup.path.exists()
        assert proc.wait(timeout=10) == -9
        await cgroup.aclose()  # idempotent

    asyncio.run(scenario())


def test_required_refuses_what_this_host_lacks(
    parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = probe(parent=parent)
    if not support.missing:
        pytest.skip("this host delegates memory, pids and cpu: nothing to refuse")
    # The note is made once per process: forget what earlier tests were told.
    monkeypatch.setattr("stoker.isolation._noted", set())

    notes: list[str] = []

    async def enter(stack: AsyncExitStack, mode: CgroupMode) -> VMCgroup | None:
        isolation = Isolation(cgroups=mode, parent=parent)
        return await enter_cgroup(
            isolation, stack, name=f"vm-{mode}", cpus=1, memory_mb=256, accel="tcg",
            on_warning=notes.append,
        )  # fmt: skip

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            refused = r"host limits are required \(cgroups = required\), but this host gives"
            with pytest.raises(InfrastructureError, match=refused):
                await enter(stack, "required")
        async with AsyncExitStack() as stack:
            got = await enter(stack, "auto")
            assert got is not None and got.path.exists()
        assert not got.path.exists()
        assert len(notes) == 1 and "/".join(support.missing) in notes[0]

    asyncio.run(scenario())


@pytest.mark.vm
def test_real_vm_qemu_lands_in_its_cgroup(parent: Path, dirs: object) -> None:
    support = probe(parent=parent)

    async def scenario() -> None:
        vm = VM(
            memory="256M",
            cpus=1,
            snapshot="never",
            dirs=dirs,  # type: ignore[arg-type]
            isolation=Isolation(parent=parent),
        )
        async with vm:
            assert vm.cgroup is not None and vm.vmm_pid is not None
            path = vm.cgroup.path
            assert path.parent == parent
            assert _procs_cgroup(vm.vmm_pid) == f"/{path.relative_to(HOST.mount or '/')}"
            assert vm.cgroup.pids() == [vm.vmm_pid]
            expected = limit_files(
                limits_for(
                    LimitPolicy(),
                    cpus=1,
                    memory_mb=256,
                    accel=vm.accel or "tcg",
                    host_memory_mb=_host_mb(),
                ),
                support.controllers,
            )
            for name, value in expected.items():
                assert (path / name).read_text().split() == value.split(), name
            result = await vm.exec(["true"])
            assert result.ok
        assert not path.exists()

    asyncio.run(scenario())


def _host_mb() -> int:
    from stoker.isolation import host_memory_mb

    return host_memory_mb()


@pytest.mark.vm
def test_real_vm_over_its_memory_limit_is_an_infrastructure_failure(
    parent: Path, dirs: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = probe(parent=parent)
    if "memory" not in support.controllers:
        pytest.skip(f"the memory controller is not delegable here: {support.reason}")
    # A small host's TCG cache budget (an eighth of 256 MiB) and the least allowance:
    # a guest that fills its RAM takes QEMU over memory.max.
    monkeypatch.setattr("stoker.isolation.host_memory_mb", lambda: 256)

    async def scenario() -> None:
        vm = VM(
            memory="512M",
            cpus=1,
            snapshot="never",
            dirs=dirs,  # type: ignore[arg-type]
            isolation=Isolation(parent=parent, policy=LimitPolicy(overhead_mb=32)),
        )
        async with vm:
            with pytest.raises(HostLimitExceeded, match=r"memory.max = 576 MiB"):
                await vm.exec(
                    ["python3", "-c", "b = b'x' * (450 << 20); import time; time.sleep(60)"],
                    timeout=120,
                )

    asyncio.run(scenario())


@pytest.fixture
def open_dirs(dirs: Dirs) -> Iterator[Dirs]:
    """A cache and runtime directory another user may reach (the shared cache is under
    /root, mode 0700): the default image, kernels and initramfs hard-linked (never
    written: stoker replaces files by renaming), small files copied with the cache's
    path in them (kernel records) changed to the copy's."""
    root = Path(tempfile.mkdtemp(prefix="stoker-vmmuser-"))
    try:
        root.chmod(0o755)
        cache = root / "cache"
        (cache / "images" / "names").mkdir(parents=True)
        (cache / "kernels").mkdir()
        names = dirs.cache / "images" / "names" / "default.json"
        digest = json.loads(names.read_text())["digest"]
        shutil.copy(names, cache / "images" / "names")
        links = [dirs.cache / "images" / digest, dirs.cache / "initramfs"]
        links += [k for k in (dirs.cache / "kernels").iterdir() if k.name != "src"]
        for source in links:
            target = cache / source.relative_to(dirs.cache)
            subprocess.run(["cp", "-al", str(source), str(target)], check=True)
        for path in cache.rglob("*"):
            if not path.is_file():
                continue
            private = not path.stat().st_mode & 0o004
            if path.stat().st_size < 1 << 20 or private:
                data = path.read_bytes()
                path.unlink()
                if path.suffix == ".json":
                    data = data.replace(str(dirs.cache).encode(), str(cache).encode())
                path.write_bytes(data)
                # What the operator does for a VMM user (the extracted vmlinux is 0600).
                path.chmod(0o644)
        runtime = root / "run"
        yield Dirs(cache=cache, runtime=runtime)
        assert not runtime.exists() or not list(runtime.iterdir()), "VM work directory left"
    finally:
        shutil.rmtree(root)


@pytest.mark.vm
def test_real_vm_qemu_runs_as_the_vmm_user(parent: Path, open_dirs: Dirs) -> None:
    user = resolve_user("nobody")

    async def scenario() -> None:
        vm = VM(
            memory="256M",
            cpus=1,
            snapshot="never",
            accel="tcg",
            dirs=open_dirs,
            seed=(Path(__file__).parent / "data", "/work"),
            isolation=Isolation(parent=parent, run_as=user),
        )
        async with vm:
            assert vm.vmm_pid is not None and vm.workdir is not None and vm.cgroup is not None
            status = Path(f"/proc/{vm.vmm_pid}/status").read_text()
            uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
            assert uids == [str(user.uid)] * 4
            assert vm.cgroup.pids() == [vm.vmm_pid]
            # The work directory: reachable by the VMM's group, not listable; its
            # writable disk is the user's, the seed read-only to it.
            st = vm.workdir.stat()
            assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, user.gid, "0o710")
            scratch = vm.workdir / "scratch.img"
            assert (scratch.stat().st_uid, oct(scratch.stat().st_mode & 0o777)) == (
                user.uid,
                "0o600",
            )
            seed = (vm.workdir / "seed.tar").stat()
            assert (seed.st_uid, seed.st_gid, oct(seed.st_mode & 0o777)) == (0, user.gid, "0o640")
            result = await vm.exec(["sh", "-c", "ls /work | head -1 && touch /tmp/x"])
            assert result.ok, result.stderr

    asyncio.run(scenario())


@pytest.mark.vm
def test_vmm_user_that_cannot_read_the_cache_is_refused(parent: Path, dirs: Dirs) -> None:
    """The shared cache is under /root (0700): the error names what the user cannot reach."""
    nobody = resolve_user("nobody")
    why = unreadable(nobody, [dirs.cache])
    if why is None:
        pytest.skip(f"{dirs.cache} is reachable by every user here")
    vm = VM(
        memory="256M",
        snapshot="never",
        accel="tcg",
        dirs=dirs,
        isolation=Isolation(parent=parent, run_as=resolve_user("nobody")),
    )
    with pytest.raises(
        UsageError, match=r"QEMU runs as 'nobody' but nobody cannot enter /"
    ) as info:
        asyncio.run(vm.start())
    assert info.value.hint is not None and "chmod -R g+rX" in info.value.hint
    assert vm.state.name == "DEAD"


def test_sweep_removes_only_empty_vm_cgroups_of_dead_stokers(parent: Path) -> None:
    parent.mkdir()
    for name in ("stoker-old", "stoker-dead", "stoker-alive", "stoker-busy", "not-ours"):
        (parent / name).mkdir()
    os.setxattr(parent / "stoker-dead", OWNER_XATTR, b"999999999:1")
    os.setxattr(parent / "stoker-alive", OWNER_XATTR, str(process_identity(os.getpid())).encode())
    proc = subprocess.Popen(["sleep", "60"], preexec_fn=child_hook(cgroup=parent / "stoker-busy"))
    try:
        assert sweep_stale(parent) == [parent / "stoker-dead"]
        # Without an owner attribute: only once it is old.
        later = time.time() + STALE_AFTER + 1
        assert sweep_stale(parent, now=later) == [parent / "stoker-old"]
        left = sorted(p.name for p in parent.iterdir() if p.is_dir())
        assert left == ["not-ours", "stoker-alive", "stoker-busy"]
    finally:
        proc.kill()
        proc.wait()


def test_service_with_required_limits_refuses_to_start(tmp_path: Path, parent: Path) -> None:
    """Before the database or any VM: the operator asked for limits this host cannot give."""
    from stoker.service.config import ServiceConfig
    from stoker.service.service import Service

    if not probe(parent=parent).missing:
        pytest.skip("this host delegates memory, pids and cpu: nothing to refuse")
    config = ServiceConfig.model_validate(
        {
            "state_dir": str(tmp_path / "state"),
            "host": {"cgroups": "required", "cgroup_parent": str(parent)},
            "pools": {"p": {"cpus": 1, "memory": 256, "snapshot": "never"}},
        }
    )
    service = Service(config)
    with pytest.raises(InfrastructureError, match="host limits are required"):
        asyncio.run(service.start())
    assert service.status == "stopped"
    assert not (tmp_path / "state" / "stoker.db").exists()
