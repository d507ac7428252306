"""Real VMs whose agent is hostile: the host must end each job with a clear error,
stay healthy, write nothing outside the output folder, and leave no VM behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.agent.bundle import agent_files
from stoker.errors import (
    BootError,
    FrameError,
    GuestProtocolError,
    OutputLimitExceeded,
    UnsafeArchive,
)
from stoker.paths import Dirs
from stoker.protocol.common import ChannelLimits
from stoker.vm import VM, VMState

pytestmark = pytest.mark.vm

HOSTILE = (Path(__file__).parent / "hostile" / "agent_main.py").read_bytes()


def hostile_agent(mode: str) -> dict[str, bytes]:
    files = agent_files()
    files["stoker/agent/__main__.py"] = HOSTILE
    files["stoker/agent/mode"] = mode.encode()
    return files


def make_vm(dirs: Dirs, mode: str, **kw: object) -> VM:
    return VM(accel="tcg", dirs=dirs, cpus=1, memory="512M", agent_files=hostile_agent(mode), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("garbage", FrameError, "malformed frame"),
        ("huge-frame", FrameError, "exceeds the limit"),
    ],
)
async def test_garbage_during_boot(
    dirs: Dirs, mode: str, error: type[Exception], match: str
) -> None:
    vm = make_vm(dirs, mode)
    with pytest.raises(error, match=match):
        await vm.start()
    assert vm.state is VMState.DEAD and vm.vmm_pid is None


async def test_agent_never_answers(dirs: Dirs) -> None:
    vm = make_vm(dirs, "silent", boot_timeout=15)
    with pytest.raises(BootError, match="did not come up"):
        await vm.start()
    assert vm.state is VMState.DEAD


async def test_evil_tar_refused_nothing_escapes(dirs: Dirs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with make_vm(dirs, "evil-tar") as vm:
        with pytest.raises(UnsafeArchive, match="escape"):
            await vm.get(["*"], out)
    assert not Path("/etc/stoker-pwned").exists()
    # Only the harmless member before the attack was written, and only inside out/.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "out",
        "out/harmless.txt",
    ]


async def test_endless_output_capped_and_killed(dirs: Dirs) -> None:
    async with make_vm(dirs, "flood", limits=ChannelLimits(kill_grace=1)) as vm:
        with pytest.raises(OutputLimitExceeded):
            await vm.exec(["yes"], capture=True, max_capture=8 << 20)


async def test_invalid_exit_report(dirs: Dirs) -> None:
    async with make_vm(dirs, "bad-exit") as vm:
        with pytest.raises(GuestProtocolError, match="invalid message"):
            await vm.exec(["true"])
