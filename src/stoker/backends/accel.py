"""Choosing the accelerator: KVM where it really works, TCG otherwise.

``/dev/kvm`` existing is not enough: on nested or paravirtual hosts a guest can
hang at boot under KVM.  So ``auto`` boots the real guest kernel and initramfs
once under KVM in *probe* mode (init prints ``STOKER-PROBE-OK`` and powers off)
with a bounded timeout, and caches the verdict keyed by everything that could
change it (host boot, host kernel, QEMU version, guest kernel).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from stoker.backends.base import Accel, Backend, MachineSpec
from stoker.backends.qemu import kvm_device_status, qemu_version
from stoker.errors import AccelError, LaunchError, StokerError
from stoker.paths import Dirs

log = logging.getLogger(__name__)

AccelRequest = Literal["auto", "kvm", "tcg"]
PROBE_TIMEOUT = 15.0
PROBE_MARKER = "STOKER-PROBE-OK"


@dataclass(frozen=True)
class ProbeVerdict:
    """Whether KVM booted a guest on this host, and why not if it did not."""

    usable: bool
    reason: str
    seconds: float
    key: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_key(kernel: Path, initrd: Path) -> str:
    """Everything that can change the verdict, hashed."""
    facts = [
        _boot_id(),
        platform.release(),
        qemu_version() or "",
        str(kernel),
        str(kernel.stat().st_size) if kernel.exists() else "",
        str(initrd),
    ]
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()[:32]


async def probe_kvm(
    backend: Backend, kernel: Path, initrd: Path, workdir: Path, timeout: float = PROBE_TIMEOUT
) -> ProbeVerdict:
    """Boot the guest kernel under KVM in probe mode and report whether it got through."""
    key = probe_key(kernel, initrd)
    ok, why = kvm_device_status()
    if not ok:
        return ProbeVerdict(False, why, 0.0, key)
    spec = MachineSpec(
        name="stoker-kvm-probe",
        kernel=kernel,
        initrd=initrd,
        rootfs=Path("/dev/null"),
        accel="kvm",
        cpus=1,
        memory_mb=256,
        probe=True,
    )
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        try:
            vm = await backend.launch(spec, workdir, stack)
        except LaunchError as exc:
            why = _last_line(exc.output) or f"exit status {exc.returncode}"
            return ProbeVerdict(False, f"QEMU failed under KVM: {why}", 0.0, key)
        except StokerError as exc:
            return ProbeVerdict(False, f"QEMU failed under KVM: {_last_line(str(exc))}", 0.0, key)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await vm.wait()
        elapsed = time.monotonic() - started
        # Give the console pump a moment to deliver the last bytes.
        await asyncio.sleep(0.05)
        if PROBE_MARKER in vm.console.text():
            return ProbeVerdict(True, f"a guest booted under KVM in {elapsed:.2f}s", elapsed, key)
        if vm.returncode is None:
            return ProbeVerdict(
                False,
                f"a guest did not finish booting under KVM within {timeout:.0f}s",
                elapsed,
                key,
            )
        return ProbeVerdict(
            False,
            f"QEMU exited with status {vm.returncode} before the guest booted under KVM: "
            + _last_line(vm.vmm_log.text() or vm.console.text()),
            elapsed,
            key,
        )


def _last_line(text: str) -> str:
    """The most telling line of a failure: QEMU's ``error:`` line if any, else the last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[0 if errors else -1][:200]


def _cache_file(dirs: Dirs) -> Path:
    return dirs.cache / "kvm-probe.json"


def cached_verdict(dirs: Dirs, kernel: Path, initrd: Path) -> ProbeVerdict | None:
    """The stored verdict if it still applies to this host."""
    try:
        data = json.loads(_cache_file(dirs).read_text())
        verdict = ProbeVerdict(**data)
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.key == probe_key(kernel, initrd) else None


def store_verdict(dirs: Dirs, verdict: ProbeVerdict) -> None:
    path = _cache_file(dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(verdict)))
    tmp.replace(path)


async def resolve_accel(
    requested: AccelRequest,
    *,
    dirs: Dirs,
    backend: Backend,
    kernel: Path,
    initrd: Path,
    workdir: Path,
) -> tuple[Accel, str | None]:
    """Return the accelerator to use and, when falling back, a one-line warning."""
    if requested == "tcg":
        return "tcg", None
    verdict = cached_verdict(dirs, kernel, initrd)
    if verdict is None:
        verdict = await probe_kvm(backend, kernel, initrd, workdir)
        store_verdict(dirs, verdict)
        log.info("KVM probe: %s", verdict.reason)
    if verdict.usable:
        return "kvm", None
    if requested == "kvm":
        raise AccelError(
            f"KVM was requested but is not usable: {verdict.reason}",
            hint="use --accel tcg (software emulation) or --accel auto",
        )
    return "tcg", f"KVM not usable ({verdict.reason}); using TCG software emulation (slower)"
