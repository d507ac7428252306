"""A detached VM outlives the process that started it, and another process takes it over.

A child process boots a detached VM, turns on the agent's journal, starts a
command that prints numbered lines, and "stores" the output it receives
together with the journal offset it came at (atomically, in a state file: what
``stoker serve`` does with its log rows).  The test kills that process with
SIGKILL mid-command.  The VM keeps running; this process adopts it
(:func:`stoker.vmadopt.adopt_vm`), follows the command to its end, and must
have exactly the whole output: the stored part plus the rest, nothing lost,
nothing twice.  Then it destroys the VM: no QEMU and no work directory left.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.backends.detached import VmmRecord
from stoker.backends.qemu import QemuBackend
from stoker.paths import Dirs
from stoker.vmadopt import Adoptable, adopt_vm

pytestmark = [pytest.mark.vm]

COUNT = 400
COMMAND = f'i=0; while [ $i -lt {COUNT} ]; do echo "line $i"; i=$((i+1)); sleep 0.01; done; exit 3'
EXPECTED = "".join(f"line {i}\n" for i in range(COUNT)).encode()

#: The process that starts the VM and is killed: stores output and offset together.
CHILD = """
import asyncio, base64, json, os, sys
from stoker.vm import VM

state_file = sys.argv[1]
command = sys.argv[2]

async def main():
    vm = VM(cpus=1, memory=512, disk=1024, snapshot="never", accel="tcg", detached=True,
            orphan_timeout=120)
    await vm.start()
    stored = bytearray()
    seen = {"offset": 0, "channel": None}

    def save():
        tmp = state_file + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({
                "name": vm.name, "workdir": str(vm.workdir), "image": vm.image,
                "cpus": vm.cpus, "memory_mb": vm.memory_mb, "disk_mb": vm.disk_mb,
                "channel": seen["channel"], "offset": seen["offset"],
                "stored": base64.b64encode(bytes(stored)).decode(),
            }, fh)
        os.rename(tmp, state_file)

    def on_started(channel):
        seen["channel"] = channel
        save()

    def on_frame(start, end):
        seen["offset"] = end

    async def sink(data):
        stored.extend(data)
        save()

    await vm.exec(["sh", "-c", command], stdout=sink, on_started=on_started, on_frame=on_frame,
                  journal=True)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_killed_owner_s_vm_is_adopted_and_its_command_finishes(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    log = (tmp_path / "child.log").open("wb")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_file), COMMAND],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    vm = None
    workdir: Path | None = None
    qemu_pid: int | None = None
    try:
        deadline = time.monotonic() + 180
        while True:
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the child never got 50 lines"
            if state_file.exists():
                state = json.loads(state_file.read_text())
                if base64.b64decode(state["stored"]).count(b"\n") >= 50:
                    break
            await asyncio.sleep(0.1)
        workdir = Path(state["workdir"])
        qemu_pid = VmmRecord.read(workdir).pid
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        state = json.loads(state_file.read_text())
        stored = base64.b64decode(state["stored"])
        # The VM survived its owner: QEMU runs on, in its own session.
        assert _alive(qemu_pid)
        assert os.getsid(qemu_pid) == qemu_pid

        vm = await adopt_vm(
            Adoptable(
                name=state["name"],
                workdir=workdir,
                cpus=state["cpus"],
                memory_mb=state["memory_mb"],
                disk_mb=state["disk_mb"],
                image=state["image"],
                offset=state["offset"],
                channels=(state["channel"],),
            ),
            backend=QemuBackend(),
            dirs=Dirs.from_env(),
        )
        rest = bytearray()

        async def sink(data: bytes) -> None:
            rest.extend(data)

        result = await vm.follow(state["channel"], stdout=sink, timeout=300)
        assert result.exit_code == 3
        assert stored + bytes(rest) == EXPECTED
        # The adopted VM is a VM like any other: it runs new commands.
        again = await vm.exec(["echo", "adopted"])
        assert again.stdout == b"adopted\n"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
        if vm is not None:
            await vm.destroy()
        elif qemu_pid is not None and _alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
    assert qemu_pid is not None and not _alive(qemu_pid)
    assert workdir is not None and not workdir.exists()


async def test_adopting_a_vm_whose_vmm_is_gone_fails_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "stoker-gone"
    workdir.mkdir()
    VmmRecord(pid=os.getpid(), start=1).write(workdir)  # not this process's start time
    from stoker.errors import InfrastructureError

    with pytest.raises(InfrastructureError, match="is gone"):
        await adopt_vm(
            Adoptable("stoker-gone", workdir, 1, 256, 1024, "default", offset=0, channels=(1,)),
            backend=QemuBackend(),
            dirs=Dirs.from_env(),
        )
    assert not workdir.exists()  # removed, as a VM's own work directory is
