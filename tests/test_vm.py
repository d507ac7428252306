"""Real microVMs under TCG: the runtime's behaviour end to end."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from stoker.errors import CommandTimeout, JobFailed
from stoker.paths import Dirs
from stoker.vm import VM, VMState

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(dirs: Dirs) -> AsyncIterator[VM]:
    async with VM(accel="tcg", dirs=dirs, cpus=2, memory="1G") as machine:
        yield machine
    assert machine.state is VMState.DEAD


async def test_exec_roundtrip(vm: VM) -> None:
    res = await vm.exec(["sh", "-c", "echo hello; echo oops >&2"])
    assert res.ok and res.stdout == b"hello\n" and res.stderr == b"oops\n"
    assert vm.timings.agent_ready > 0


@pytest.mark.parametrize("code", [0, 1, 2, 42, 255])
async def test_exit_codes(vm: VM, code: int) -> None:
    res = await vm.exec(["sh", "-c", f"exit {code}"])
    assert res.exit_code == code and res.signal is None


async def test_termination_by_signal(vm: VM) -> None:
    res = await vm.exec(["sh", "-c", "kill -KILL $$"])
    assert res.exit_code is None and res.signal == signal.SIGKILL and res.returncode == 137


async def test_check_raises_job_failed(vm: VM) -> None:
    with pytest.raises(JobFailed) as info:
        await vm.exec(["false"], check=True)
    assert info.value.exit_code == 1


async def test_env_and_cwd(vm: VM) -> None:
    res = await vm.exec(
        ["sh", "-c", 'pwd; echo "$GREETING"; echo "$PATH"'],
        env={"GREETING": "hi there"},
        cwd="/tmp",
    )
    lines = res.stdout.decode().splitlines()
    assert lines[0] == "/tmp" and lines[1] == "hi there" and "/usr/bin" in lines[2]


async def test_uid_gid(vm: VM) -> None:
    res = await vm.exec(["id", "-u"], uid=65534, gid=65534)
    assert res.stdout.strip() == b"65534"


async def test_stdin(vm: VM) -> None:
    data = os.urandom(3 << 20)
    res = await vm.exec(["sha256sum"], stdin=data)
    assert res.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_guest_identity_and_clock(vm: VM) -> None:
    import time

    res = await vm.exec(
        ["python3", "-c", "import socket,time; print(socket.gethostname()); print(time.time())"]
    )
    host, now = res.stdout.decode().split()
    assert host == vm.hostname
    assert abs(float(now) - time.time()) < 30


async def test_no_network_but_loopback(vm: VM) -> None:
    res = await vm.exec(["sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/operstate"])
    assert res.stdout.decode().split()[0] == "lo" and len(res.stdout.decode().split()) == 2


async def test_root_is_read_only_overlay(vm: VM) -> None:
    res = await vm.exec(["sh", "-c", "touch /usr/new-file && grep ' / ' /proc/mounts"])
    assert res.ok and b"overlay" in res.stdout


async def test_50mb_of_output(vm: VM) -> None:
    digest = hashlib.sha256()
    total = 0

    def sink(data: bytes) -> None:
        nonlocal total
        total += len(data)
        digest.update(data)

    res = await vm.exec(["sh", "-c", "head -c 52428800 /dev/zero"], stdout=sink, capture=False)
    assert res.ok and total == 50 << 20
    assert digest.hexdigest() == hashlib.sha256(b"\0" * (50 << 20)).hexdigest()


async def test_copy_binary_files_in_and_out(vm: VM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(5 << 20)
    (src / "blob.bin").write_bytes(blob)
    (src / "script.sh").write_text("#!/bin/sh\necho run\n")
    (src / "script.sh").chmod(0o751)
    (src / "link").symlink_to("blob.bin")
    os.utime(src / "blob.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    await vm.put(src, "/work/bin")
    res = await vm.exec(
        [
            "sh",
            "-c",
            "sha256sum blob.bin; stat -c '%a %Y' script.sh blob.bin; readlink link; ./script.sh",
        ],
        cwd="/work/bin",
    )
    lines = res.stdout.decode().splitlines()
    assert lines[0].split()[0] == hashlib.sha256(blob).hexdigest()
    assert lines[1].startswith("751 ")
    assert lines[2] == "644 1600000000"
    assert lines[3:] == ["blob.bin", "run"]
    out = tmp_path / "out"
    report, missing = await vm.get(["blob.bin", "link", "nothing-*"], out, cwd="/work/bin")
    assert (out / "blob.bin").read_bytes() == blob
    assert os.readlink(out / "link") == "blob.bin"
    assert missing == ["nothing-*"]


async def test_tree_of_10000_small_files(vm: VM, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    for d in range(100):
        sub = src / f"d{d:03}"
        sub.mkdir(parents=True)
        for f in range(100):
            (sub / f"f{f:03}.txt").write_text(f"{d}-{f}\n")
    await vm.put(src, "/work/tree")
    res = await vm.exec(["sh", "-c", "find . -type f | wc -l; cat d042/f017.txt"], cwd="/work/tree")
    assert res.stdout.decode().split() == ["10000", "42-17"]
    out = tmp_path / "back"
    report, _ = await vm.get(["d0*"], out, cwd="/work/tree")
    assert sum(1 for _ in out.rglob("*.txt")) == 10000
    assert (out / "d099/f099.txt").read_text() == "99-99\n"


async def test_timeout_kills_the_command(vm: VM) -> None:
    with pytest.raises(CommandTimeout):
        await vm.exec(["sh", "-c", "sleep 300 & sleep 300"], timeout=1)
    res = await vm.exec(["sh", "-c", "pgrep -c sleep || true"])
    assert res.stdout.strip() == b"0"


async def test_two_vms_at_once(dirs: Dirs) -> None:
    async def one(tag: str) -> bytes:
        async with VM(accel="tcg", dirs=dirs, cpus=1, memory="512M") as machine:
            res = await machine.exec(["sh", "-c", f"echo {tag} $(hostname)"])
            return res.stdout

    a, b = await asyncio.gather(one("a"), one("b"))
    assert a.startswith(b"a stoker-") and b.startswith(b"b stoker-") and a[2:] != b[2:]


async def test_destroy_is_idempotent_and_leaves_nothing(dirs: Dirs) -> None:
    machine = VM(accel="tcg", dirs=dirs, cpus=1, memory="512M")
    await machine.start()
    pid = machine.vmm_pid
    workdir = machine.workdir
    assert pid is not None and workdir is not None and workdir.exists()
    await machine.destroy()
    await machine.destroy()
    assert not Path(f"/proc/{pid}").exists()
    assert not workdir.exists()


async def test_seed_disk_keeps_modes_links_and_mtimes(dirs: Dirs, tmp_path: Path) -> None:
    src = tmp_path / "project"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho seeded\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "data.bin").write_bytes(os.urandom(100_000))
    (src / "link").symlink_to("sub/data.bin")
    os.link(src / "run.sh", src / "hard.sh")
    os.utime(src / "sub" / "data.bin", ns=(1_500_000_000_250_000_000, 1_500_000_000_250_000_000))
    async with VM(
        accel="tcg", dirs=dirs, cpus=1, memory="512M", seed=(src, "/work/project")
    ) as machine:
        assert machine.seed_report is not None and machine.seed_report.bytes > 100_000
        res = await machine.exec(
            [
                "sh",
                "-c",
                "./run.sh; stat -c '%a %h' run.sh; stat -c '%.9Y' sub/data.bin;"
                " readlink link; sha256sum sub/data.bin",
            ],
            cwd="/work/project",
        )
    lines = res.stdout.decode().splitlines()
    assert lines[0] == "seeded"
    assert lines[1] == "750 2"
    assert lines[2] == "1500000000.250000000"
    assert lines[3] == "sub/data.bin"
    assert (
        lines[4].split()[0] == hashlib.sha256((src / "sub" / "data.bin").read_bytes()).hexdigest()
    )
