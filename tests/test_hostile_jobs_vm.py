"""Hostile jobs in real microVMs: each ends with its cause named, the host unaffected.

One VM takes the jobs that leave it usable (a memory hog, a fork bomb, a disk
fill, a CPU spin, an output flood: each is confined to its own cgroup or killed
at its timeout, and the next command runs as if nothing happened).  A kernel
panic and a VMM crash end their VM, so each gets one of its own.  ``stoker run
--json`` is checked once, end to end.  Every VM is checked gone afterwards (the
conftest fails the run on a QEMU or a work directory left behind).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from stoker.errors import CommandTimeout, JobKernelPanic, VMMCrashed
from stoker.outcomes import describe, exec_cause
from stoker.paths import Dirs
from stoker.protocol.common import ExecResult
from stoker.vm import VM, VMState

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

MiB = 1 << 20
#: A command that allocates until something stops it.
MEMORY_HOG = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(dirs: Dirs) -> AsyncIterator[VM]:
    # A small writable layer, so that filling it takes a moment.
    async with VM(accel="tcg", dirs=dirs, cpus=2, memory="1G", disk="256M") as machine:
        yield machine
    assert machine.state is VMState.DEAD and machine.workdir is not None
    assert not machine.workdir.exists()


async def sh(vm: VM, script: str, **kw: object) -> ExecResult:
    return await vm.exec(["sh", "-c", script], **kw)  # type: ignore[arg-type]


async def assert_guest_is_clean(vm: VM) -> None:
    """The agent still serves, and nothing of the last command is left running."""
    for _ in range(20):  # a killed cgroup empties as the agent reaps its processes
        # every process but the agent (PID 1, python3 too)
        res = await sh(
            vm, "ls /sys/fs/cgroup | grep -c stoker-exec-; ps -e -o pid=,comm= | awk '$1 != 1'"
        )
        assert res.ok, res
        count, *names = res.stdout.decode().split()
        if count == "1":  # only this command's own cgroup
            break
        await asyncio.sleep(0.5)
    assert count == "1", res.stdout
    assert not set(names) & {"python3", "dd", "yes", "bomb"}, names


async def test_memory_hog_is_killed_by_the_oom_killer_and_the_agent_survives(vm: VM) -> None:
    res = await vm.exec(["python3", "-c", MEMORY_HOG], timeout=300)
    assert res.signal == signal.SIGKILL
    assert exec_cause(res) == "oom"
    ev = res.evidence
    assert ev is not None and ev.cgroup and ev.oom_kills >= 1
    # The default: the guest's memory minus 128 MiB for the agent and the kernel.
    assert ev.memory_max is not None and 700 * MiB < ev.memory_max < 900 * MiB
    assert describe("oom", res) == (
        "the command was killed by the guest's out-of-memory killer "
        f"(memory limit {ev.memory_max // MiB} MiB)"
    )
    await assert_guest_is_clean(vm)


def host_processes() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


async def test_fork_bomb_ends_at_the_process_limit_not_the_timeout(vm: VM) -> None:
    before = host_processes()
    # The shell's own fork bomb; the first shell waits, as a build script would.
    res = await sh(vm, "bomb() { bomb | bomb & }; bomb; sleep 600", timeout=600)
    assert abs(host_processes() - before) < 20  # the host never saw it
    assert exec_cause(res) == "pids_limit", res
    ev = res.evidence
    assert ev is not None and ev.killed_for == "pids_limit" and ev.pids_max == 1024
    assert ev.pids_max_hits > 0
    assert "process limit (1024 processes; a fork bomb?)" in describe("pids_limit", res)
    await assert_guest_is_clean(vm)
    # A bomb whose first shell exits at once (0) is not left raging in the guest either.
    res = await sh(vm, "f() { f | f & }; f", timeout=600)
    assert res.exit_code == 0 and exec_cause(res) == "pids_limit", res
    await assert_guest_is_clean(vm)


async def test_a_full_disk_is_named(vm: VM) -> None:
    res = await sh(vm, "dd if=/dev/zero of=/fill bs=1M", timeout=300)
    try:
        assert res.exit_code == 1 and b"No space left on device" in res.stderr
        assert exec_cause(res) == "disk_full"
        ev = res.evidence
        assert ev is not None and ev.disk_path == "/" and ev.disk_free is not None
        assert describe("disk_full", res).startswith(
            "the command failed with exit status 1 while the guest's disk was full (/: 0 MiB free"
        )
    finally:
        await sh(vm, "rm -f /fill")
    # With the space back, a failure is the command's own again.
    res = await sh(vm, "exit 3")
    assert exec_cause(res) == "exit"


async def test_a_cpu_spin_ends_at_its_timeout(vm: VM) -> None:
    with pytest.raises(CommandTimeout):
        await sh(vm, "while :; do :; done", timeout=2)
    # (the pattern does not match this command's own command line)
    res = await sh(vm, "pgrep -f 'while [:]' || echo none")
    assert res.stdout == b"none\n", res.stdout
    await assert_guest_is_clean(vm)


async def test_an_output_flood_is_streamed_in_bounded_memory(vm: VM) -> None:
    received = 0

    def sink(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(CommandTimeout):
        await vm.exec(["yes", "flood"], stdout=sink, capture=False, timeout=4)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert received > 4 * MiB  # it did flood...
    assert grew * 1024 < 64 * MiB, f"the host's peak memory grew by {grew} KiB"  # ...bounded
    await assert_guest_is_clean(vm)


async def test_limits_from_the_caller(dirs: Dirs) -> None:
    from stoker.protocol.common import JobLimits

    limits = JobLimits(memory_mb=96, pids=32)
    async with VM(accel="tcg", dirs=dirs, cpus=1, memory="512M", job_limits=limits) as machine:
        hog = await machine.exec(["python3", "-c", MEMORY_HOG], timeout=300)
        bomb = await machine.exec(
            ["sh", "-c", "for i in $(seq 64); do sleep 30 & done; wait"], timeout=300
        )
        spare = await machine.exec(["sh", "-c", "cat /proc/self/cgroup"])
    assert exec_cause(hog) == "oom" and hog.evidence is not None
    assert hog.evidence.memory_max == 96 * MiB
    # 64 sleeps do not fit in 32 processes; the shell keeps trying, then it is killed.
    assert exec_cause(bomb) == "pids_limit" and bomb.evidence is not None
    assert bomb.evidence.pids_max == 32
    assert spare.stdout.decode().startswith("0::/stoker-exec-")


async def test_a_kernel_panic_is_the_jobs_failure(dirs: Dirs) -> None:
    machine = VM(accel="tcg", dirs=dirs, cpus=1, memory="512M")
    async with machine:
        pid = machine.vmm_pid
        with pytest.raises(JobKernelPanic) as info:
            await machine.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    assert str(info.value).startswith(
        "the guest kernel panicked while the command ran: Kernel panic - not syncing: "
        "sysrq triggered crash"
    )
    assert "Call Trace" in info.value.console
    assert machine.state is VMState.DEAD and machine.vmm_pid is None
    assert pid is not None and not Path(f"/proc/{pid}").exists()


async def test_a_vmm_crash_is_the_infrastructures_failure(dirs: Dirs) -> None:
    machine = VM(accel="tcg", dirs=dirs, cpus=1, memory="512M")
    async with machine:
        pid = machine.vmm_pid
        assert pid is not None
        command = asyncio.ensure_future(machine.exec(["sleep", "600"]))
        await asyncio.sleep(1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(VMMCrashed) as info:
            await command
    assert str(info.value).startswith("the VMM exited unexpectedly (killed by signal 9 (SIGKILL))")
    assert machine.state is VMState.DEAD and not Path(f"/proc/{pid}").exists()


PANIC_LINE = (
    "the guest kernel panicked while the command ran: "
    "Kernel panic - not syncing: sysrq triggered crash"
)


@pytest.mark.parametrize(
    ("command", "status", "cause", "message"),
    [
        (
            ["python3", "hog.py"],
            137,
            "oom",
            "the command was killed by the guest's out-of-memory killer (memory limit 160 MiB)",
        ),
        (["sh", "-c", "echo c > /proc/sysrq-trigger"], 125, "kernel_panic", PANIC_LINE),
    ],
    ids=["oom", "panic"],
)
async def test_stoker_run_json_names_the_cause(
    tmp_path: Path, command: list[str], status: int, cause: str, message: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "hog.py").write_text(MEMORY_HOG)
    limits = ["--memory-limit", "160M", "--pids-limit", "200"]
    argv = [sys.executable, "-m", "stoker.cli", "run", "--json", *limits, str(project), "--"]
    proc = await asyncio.to_thread(
        subprocess.run, [*argv, *command], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == status, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["cause"] == cause and summary["message"] == message
    assert f"stoker: {message}" in proc.stderr
    if cause == "oom":
        assert summary["signal"] == 9 and summary["limits"] == {"memory_mb": 160, "pids": 200}
