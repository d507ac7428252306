"""Golden tests of the QEMU command line (command lines are data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stoker.backends.base import MachineSpec
from stoker.backends.qemu import QemuFds, qemu_argv

GOLDEN = Path(__file__).parent / "golden"


def _spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        name="stoker-test",
        kernel=Path("/cache/vmlinuz"),
        initrd=Path("/cache/initrd.cpio.gz"),
        rootfs=Path("/cache/images/abc/rootfs.erofs"),
        accel="tcg",
        cpus=2,
        memory_mb=1024,
        scratch=Path("/run/stoker/vm/scratch.img"),
    )
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


CASES = {
    "tcg-2cpu": _spec(),
    "kvm-1cpu-noscratch": _spec(accel="kvm", cpus=1, scratch=None),
    "probe": _spec(accel="kvm", cpus=1, memory_mb=256, probe=True, scratch=None),
    "seed": _spec(seed=Path("/run/stoker/vm/seed.tar"), tsc_khz=2596132),
    "snapshot-template": _spec(
        memory_file=Path("/cache/snapshots/.tmp/k/memory"),
        memory_shared=True,
        scratch=Path("/cache/snapshots/.tmp/k/scratch.img"),
    ),
    "snapshot-clone": _spec(
        memory_file=Path("/cache/snapshots/k/memory"),
        memory_shared=False,
        incoming=True,
        scratch=Path("/run/stoker/vm/scratch.qcow2"),
        scratch_format="qcow2",
    ),
    "nat": _spec(nic=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_argv(case: str) -> None:
    argv = qemu_argv(CASES[case], QemuFds(agent=3, qmp=4, console=5))
    path = GOLDEN / f"qemu-{case}.json"
    if os.environ.get("STOKER_UPDATE_GOLDEN"):
        path.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(path.read_text()), (
        f"regenerate with STOKER_UPDATE_GOLDEN=1 if intended ({path})"
    )


def test_commas_in_paths_are_escaped() -> None:
    argv = qemu_argv(_spec(rootfs=Path("/a,b/root.erofs")), QemuFds(3, 4, 5))
    assert any("file=/a,,b/root.erofs," in a for a in argv)


def test_kernel_cmdline_is_pure_and_complete() -> None:
    spec = _spec()
    line = spec.kernel_cmdline()
    assert line == spec.kernel_cmdline()
    for param in (
        "console=ttyS0",
        "panic=-1",
        "stoker.root=/dev/vda",
        "stoker.scratch=/dev/vdb",
        "stoker.rootfstype=erofs",
        "stoker.python=/usr/bin/python3",
    ):
        assert param in line.split()
    assert "stoker.probe=1" in _spec(probe=True).kernel_cmdline().split()


def test_no_network_device() -> None:
    argv = qemu_argv(_spec(), QemuFds(3, 4, 5))
    assert argv[argv.index("-nic") + 1] == "none"
    assert not any("virtio-net" in a for a in argv)


def test_nat_mode_has_user_networking_and_loads_the_driver() -> None:
    spec = _spec(nic=True)
    argv = qemu_argv(spec, QemuFds(3, 4, 5))
    assert "-nic" not in argv
    assert argv[argv.index("-netdev") + 1] == "user,id=net0,ipv6=off"
    assert "virtio-net-device,netdev=net0" in argv
    assert "stoker.nic=1" in spec.kernel_cmdline().split()
    assert "stoker.nic=1" not in _spec().kernel_cmdline().split()


def test_tsc_rate_from_cpuinfo() -> None:
    from stoker.backends.qemu import FALLBACK_TSC_KHZ, host_tsc_khz

    assert host_tsc_khz("processor : 0\ncpu MHz\t\t: 2596.132\nflags : fpu tsc\n") == 2596132
    assert host_tsc_khz("processor : 0\n") == FALLBACK_TSC_KHZ
    line = _spec(tsc_khz=2596132).kernel_cmdline().split()
    assert "tsc_early_khz=2596132" in line and "tsc=reliable" in line


def test_template_and_clone_have_the_same_devices() -> None:
    """A restore needs the template's device layout: only backing files may differ."""

    def devices(argv: list[str]) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]

    template = qemu_argv(CASES["snapshot-template"], QemuFds(3, 4, 5))
    clone = qemu_argv(CASES["snapshot-clone"], QemuFds(3, 4, 5))
    assert devices(template) == devices(clone)
    assert template[template.index("-M") + 1] == clone[clone.index("-M") + 1]
    assert "share=on" in template[template.index("-object") + 1]
    assert "share=off" in clone[clone.index("-object") + 1]
    assert clone[-2:] == ["-incoming", "defer"] and "-incoming" not in template
