"""Hostile jobs: how long each takes to end, with which cause, and what the host saw.

Prints a markdown table (the README's reliability table): a memory hog, a fork
bomb, a disk fill, a CPU spin and an output flood in one VM of the default shape
(2 vCPUs, 1 GiB, 4 GiB writable layer; each is confined to its command's cgroup
or killed at its timeout, so the VM serves the next one), then a kernel panic and
a VMM crash (SIGKILL to QEMU) in a VM each.  ``time to end`` is from the
command's start to its result; the ``ratio`` column divides it by the timeout
the command ran with (``--timeout``): without the limits a fork bomb or a full
disk ran until then.  QEMU's peak RSS is read from /proc after the shared VM's
jobs.

Usage: ``python bench/hostile.py [--timeout SECONDS] [--accel tcg|auto]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.errors import CommandTimeout, JobKernelPanic, VMMCrashed
from stoker.outcomes import describe, exec_cause, timeout_message
from stoker.protocol.common import ExecResult
from stoker.vm import VM

HOG = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
BOMB = "bomb() { bomb | bomb & }; bomb; sleep 600"
SPIN_TIMEOUT = 5.0


@dataclass
class Row:
    job: str
    command: str
    cause: str
    seconds: float
    message: str


@dataclass
class Command:
    run: Callable[[], Awaitable[ExecResult]]
    timeout: float


def shell(vm: VM, script: str, timeout: float, **kw: Any) -> Command:
    return Command(lambda: vm.exec(["sh", "-c", script], timeout=timeout, **kw), timeout)


async def timed(job: str, command: str, cmd: Command) -> Row:
    t0 = time.monotonic()
    try:
        res = await cmd.run()
    except CommandTimeout:
        message = timeout_message(cmd.timeout)
        return Row(job, command, "timeout", time.monotonic() - t0, message)
    except (JobKernelPanic, VMMCrashed) as exc:
        cause = "kernel_panic" if isinstance(exc, JobKernelPanic) else "vmm_crash"
        return Row(job, command, cause, time.monotonic() - t0, str(exc).splitlines()[0])
    cause = exec_cause(res)
    return Row(job, command, cause, time.monotonic() - t0, describe(cause, res))


def peak_rss_mib(pid: int | None) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--accel", default="tcg")
    args = parser.parse_args()
    accel, timeout = args.accel, args.timeout
    rows: list[Row] = []
    flooded = 0

    def count(chunk: bytes) -> None:
        nonlocal flooded
        flooded += len(chunk)

    async with VM(accel=accel, cpus=2, memory="1G", disk="4G") as vm:
        hog = f"python3 -c '{HOG}'"
        fill = "dd if=/dev/zero of=/fill bs=1M"
        spin = "while :; do :; done"
        scenarios: list[tuple[str, str, str, float, dict[str, Any]]] = [
            ("baseline", "true", "true", timeout, {}),
            ("memory hog", "python3: 16 MiB chunks forever", hog, timeout, {}),
            ("fork bomb", BOMB, BOMB, timeout, {}),
            ("disk fill", fill, fill, timeout, {}),
            ("CPU spin", spin, spin, SPIN_TIMEOUT, {}),
            ("output flood", "yes", "yes", SPIN_TIMEOUT, {"stdout": count, "capture": False}),
        ]
        for job, shown, script, limit, kw in scenarios:
            rows.append(await timed(job, shown, shell(vm, script, limit, **kw)))
            await vm.exec(["rm", "-f", "/fill"])
        qemu_peak = peak_rss_mib(vm.vmm_pid)
    async with VM(accel=accel, cpus=1, memory="512M") as vm:
        panic = "echo c > /proc/sysrq-trigger"
        rows.append(await timed("kernel panic", panic, shell(vm, panic, timeout)))
    async with VM(accel=accel, cpus=1, memory="512M") as vm:
        pid = vm.vmm_pid
        assert pid is not None
        asyncio.get_running_loop().call_later(1.0, os.kill, pid, signal.SIGKILL)
        crash = "sleep 600; QEMU gets SIGKILL after 1 s"
        rows.append(await timed("VMM crash", crash, shell(vm, "sleep 600", timeout)))

    print(
        f"accel {accel}, timeout {timeout:g} s (CPU spin, output flood: {SPIN_TIMEOUT:g} s); "
        f"QEMU peak RSS after the shared VM's jobs: {qemu_peak:.0f} MiB (guest memory "
        f"1024 MiB); the output flood streamed {flooded / (1 << 20):.0f} MiB\n"
    )
    print(
        "| hostile job | command | reported cause | time to end | ratio to the timeout | message |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        limit = SPIN_TIMEOUT if row.job in ("CPU spin", "output flood") else timeout
        ratio = row.seconds / limit
        command = row.command.replace("|", "\\|")  # a table cell
        print(
            f"| {row.job} | `{command}` | `{row.cause}` | {row.seconds:.1f} s | "
            f"{ratio:.3f} | {row.message} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
