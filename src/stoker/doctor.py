"""``stoker doctor``: what this host offers, and what is missing for ``stoker run``."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stoker.backends.accel import cached_verdict
from stoker.backends.qemu import QEMU_BINARY, kvm_device_status, qemu_version
from stoker.errors import LaunchError
from stoker.kernel.vmlinux import default_vmlinux_path
from stoker.paths import Dirs
from stoker.procs import run_checked

if TYPE_CHECKING:
    from stoker.isolation import Isolation

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def _tool(name: str, binary: str, package: str, *, needed_for: str, required: bool = True) -> Check:
    path = shutil.which(binary)
    if path:
        return Check(name, "ok", path)
    return Check(
        name,
        "fail" if required else "warn",
        f"{binary} not found ({needed_for})",
        f"apt-get install {package}",
    )


def nix_check(path: str | None = None) -> Check:
    """Nix on ``path`` (default: ``$PATH``): only ``nix:`` and ``nixos:`` image bases need it."""
    nix = shutil.which("nix", path=path)
    if nix is None:
        return Check(
            "nix",
            "warn",
            'nix not found; images with base = "nix:..." or "nixos:..." need Nix on the host',
            "apt-get install nix-bin (Debian, Ubuntu; scripts/setup.sh does it) "
            "or see https://nixos.org/download",
        )
    try:
        version = run_checked([nix, "--version"], timeout=30).strip()
    except LaunchError as exc:
        first = str(exc).splitlines()[0]
        return Check("nix", "warn", f"{nix} is there but does not run: {first}")
    return Check("nix", "ok", f"{version} ({nix})" if version else nix)


def microvm_check(dirs: Dirs, *, accel: str) -> Check:
    """Whether the microVM kernel is built, and what it saves (or would) on this host."""
    from stoker.boottimes import microvm_advice
    from stoker.kernel.build import cached_microvm_kernel

    built = cached_microvm_kernel(dirs)
    advice = microvm_advice(dirs, built=built is not None, accel=accel)
    if built is None:
        return Check("microvm kernel", "warn", f"not built; {advice}")
    return Check("microvm kernel", "ok", f"{built.release} built ({built.root}); {advice}")


def run_checks(dirs: Dirs | None = None) -> Report:
    """Inspect the host; never raises for a missing piece, reports it instead."""
    from stoker.images import ImageStore
    from stoker.kernel import cached_kernel

    dirs = dirs or Dirs.from_env()
    report = Report()
    add = report.checks.append

    version = qemu_version(QEMU_BINARY)
    if version is None:
        add(Check("qemu", "fail", f"{QEMU_BINARY} not found", "apt-get install qemu-system-x86"))
    else:
        add(Check("qemu", "ok", f"{QEMU_BINARY} {version} (-M microvm)"))

    from stoker.backends import VMMS, get_backend

    for vmm in VMMS:
        if vmm == "qemu":
            continue  # reported above, with its version
        usable, why = get_backend(vmm).usable()
        # Optional: QEMU serves every host; these need their binary and KVM.
        add(Check(f"vmm {vmm}", "ok" if usable else "warn", why))

    report.checks.extend(network_checks())
    report.checks.extend(isolation_checks())

    kvm_ok, kvm_why = kvm_device_status()
    kernel = cached_kernel(dirs)
    verdict = None
    if kernel is not None:
        initrds = sorted(dirs.initramfs.glob("*.cpio.gz"))
        # The probe ran with whatever the first run booted: Debian's kernel (its
        # bzImage or its vmlinux) or the microVM kernel (kernel = "auto").
        from stoker.kernel.build import cached_microvm_kernel

        booted = [kernel.vmlinuz, default_vmlinux_path(kernel.vmlinuz)]
        microvm = cached_microvm_kernel(dirs)
        if microvm is not None:
            booted += [microvm.vmlinux, microvm.bzimage]
        for initrd in initrds:
            for boots in booted:
                verdict = cached_verdict(dirs, boots, initrd) or verdict
    if not kvm_ok:
        add(Check("kvm", "warn", f"not usable: {kvm_why}; VMs use TCG emulation (slower)"))
    elif verdict is None:
        add(
            Check(
                "kvm",
                "warn",
                f"{kvm_why}; not probed yet (the first `stoker run` boots a probe guest)",
            )
        )
    elif verdict.usable:
        add(Check("kvm", "ok", verdict.reason))
    else:
        add(Check("kvm", "warn", f"present but not usable: {verdict.reason}; VMs use TCG"))

    add(_tool("busybox-static", "busybox", "busybox-static", needed_for="the initramfs"))
    add(_tool("mkfs.ext4", "mkfs.ext4", "e2fsprogs", needed_for="the writable layer"))
    if kernel is not None:
        add(Check("kernel", "ok", f"{kernel.package} {kernel.version} cached at {kernel.root}"))
    else:
        apt = shutil.which("apt-get")
        add(
            Check(
                "kernel",
                "warn" if apt else "fail",
                "not cached yet"
                + ("; `stoker kernel fetch` downloads it with apt-get" if apt else ""),
                "" if apt else "stoker needs apt-get to fetch Debian's cloud kernel",
            )
        )

    add(microvm_check(dirs, accel="kvm" if verdict is not None and verdict.usable else "tcg"))

    images = ImageStore(dirs).list()
    if images:
        listing = ", ".join(
            f"{i.name}@{i.digest[:12]} ({i.rootfs.stat().st_size / 1e6:.0f} MB)" for i in images
        )
        add(Check("images", "ok", listing))
    else:
        builders = [shutil.which("mmdebstrap"), shutil.which("mkfs.erofs")]
        add(
            Check(
                "images",
                "warn" if all(builders) else "fail",
                "none built yet; `stoker image build` (or the first run) builds the default image",
                "" if all(builders) else "apt-get install mmdebstrap erofs-utils",
            )
        )

    add(
        _tool(
            "squashfs-tools",
            "mksquashfs",
            "squashfs-tools",
            needed_for='images with format = "squashfs"',
            required=False,
        )
    )
    add(
        _tool("useradd", "useradd", "passwd", needed_for="[[users]] in image specs", required=False)
    )
    add(nix_check())

    free = _free_bytes(dirs.cache)
    status: Status = "ok" if free > 4e9 else ("warn" if free > 1e9 else "fail")
    add(
        Check(
            "disk",
            status,
            f"{free / 1e9:.1f} GB free under {dirs.cache}",
            "" if status != "fail" else "free some disk space (images need ~1 GB)",
        )
    )
    return report


def network_checks() -> list[Check]:
    """Which network modes this host can give VMs, per VMM, and why not."""
    from stoker.backends import VMMS, get_backend

    checks = [
        Check("network none", "ok", "the default: no network device, no way out"),
        Check(
            "network egress",
            "ok",
            "allowlisted HTTP(S) through a host-side proxy per VM, over the agent channel "
            "(every VMM; no tap, no root); names are resolved by this host",
        ),
    ]
    for vmm in VMMS:
        backend = get_backend(vmm)
        if not backend.usable()[0]:
            continue
        offered, how = backend.nat_support()
        checks.append(
            Check(
                f"network nat ({vmm})",
                "ok" if offered else "warn",
                (how + "; unfiltered: unsafe for untrusted code") if offered else how,
            )
        )
    return checks


def isolation_checks(isolation: Isolation | None = None) -> list[Check]:
    """What isolation this host gives a VM's QEMU: cgroup v2 limits, seccomp, its user."""
    from stoker.isolation import Isolation, host_memory_mb
    from stoker.isolation.cgroups import probe
    from stoker.isolation.limits import describe, limits_for

    isolation = isolation or Isolation.from_env()
    checks = []
    support = probe(parent=isolation.parent)
    if support.mount is None:
        checks.append(Check("cgroup v2", "warn", support.reason, support.fix))
    else:
        checks.append(
            Check(
                "cgroup v2",
                "ok",
                f"mounted at {support.mount}; controllers delegable to VM cgroups: "
                + (", ".join(sorted(support.controllers)) or "none"),
            )
        )
    if isolation.cgroups == "off":
        checks.append(
            Check("host limits", "warn", "turned off (STOKER_CGROUPS=off)", "unset STOKER_CGROUPS")
        )
    elif not support.usable:
        checks.append(
            Check("host limits", "warn", f"VMs get no cgroup: {support.reason}", support.fix)
        )
    else:
        # What a VM of the default shape would get, as an example of the budget.
        example = limits_for(
            isolation.policy, cpus=2, memory_mb=1024, accel="tcg", host_memory_mb=host_memory_mb()
        )
        where = f"a cgroup each under {support.parent}"
        if support.move_self:
            where += " (stoker moves itself into a 'daemon' leaf first)"
        if support.missing:
            checks.append(
                Check(
                    "host limits",
                    "warn",
                    f"VMs get {where}, but no {'/'.join(support.missing)} limits: {support.reason}",
                    support.fix,
                )
            )
        else:
            checks.append(
                Check(
                    "host limits",
                    "ok",
                    f"VMs get {where}; a 2-vCPU 1 GiB VM under TCG: "
                    + describe(example, support.controllers),
                )
            )
    checks.append(seccomp_check())
    checks.append(vmm_user_check(isolation))
    return checks


def seccomp_check(binary: str = QEMU_BINARY) -> Check:
    """Whether QEMU can apply its seccomp filter (``-sandbox on``, which every VM uses)."""
    path = shutil.which(binary)
    if path is None:
        return Check("qemu sandbox", "warn", f"{binary} not found")
    try:
        libs = run_checked(["ldd", path], timeout=30)
    except LaunchError:
        return Check("qemu sandbox", "warn", f"cannot tell whether {path} links libseccomp")
    if "libseccomp" in libs:
        return Check(
            "qemu sandbox",
            "ok",
            "every VM's QEMU runs under its seccomp filter (-sandbox on: no spawning, "
            "no privilege changes, no obsolete system calls)",
        )
    return Check(
        "qemu sandbox",
        "fail",
        f"{path} was built without seccomp: VMs would not start (-sandbox on)",
        "install a QEMU built with libseccomp (Debian's qemu-system-x86 is)",
    )


def vmm_user_check(isolation: Isolation) -> Check:
    """Which user QEMU runs as, and whether that is root."""
    import pwd

    if isolation.run_as is not None:
        user = isolation.run_as
        kvm = "in the kvm group" if user.kvm else "not in the kvm group (TCG only)"
        return Check("qemu user", "ok", f"QEMU runs as {user.name} (uid {user.uid}), {kvm}")
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    if uid == 0:
        return Check(
            "qemu user",
            "warn",
            "QEMU runs as root (this process's user): a VMM escape would own the host",
            "run stoker as an unprivileged user, or the service with host.vmm_user "
            "(see deploy/stoker.service)",
        )
    return Check("qemu user", "ok", f"QEMU runs as {name} (uid {uid}), unprivileged")


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
