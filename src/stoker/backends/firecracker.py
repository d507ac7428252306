"""Firecracker backend: a microVM configured through Firecracker's REST API.

Plan, prepare, launch:

* :func:`plan_launch` is a pure function of a frozen
  :class:`~stoker.backends.base.MachineSpec` and a :class:`FirecrackerConfig`.
  It returns the command line (``firecracker``, or ``jailer ... -- ...``), the
  files the VMM must see, and the API calls in order (``PUT /machine-config``,
  ``/boot-source``, ``/drives/{id}``, ``/vsock``, ``/entropy``, ``/actions``) or,
  equivalently, the ``--config-file`` document.  ``tests/test_firecracker.py``
  golden-tests all of it and validates every body against Firecracker's own
  OpenAPI document.
* :class:`FirecrackerBackend` lays the files out, starts the process
  (``PR_SET_PDEATHSIG``; its own stdio: the serial console is its stdout, its log
  a FIFO we read), waits for the API socket and sends the calls with
  :class:`FirecrackerClient`, a small HTTP/1.1 client over a Unix socket.
* The guest agent is reached over Firecracker's hybrid vsock: connect to the
  VMM's Unix socket and send ``CONNECT <port>``
  (:class:`~stoker.protocol.transport.HybridVsockTransport`).

**Paths.**  The VMM never sees a host path.  Unjailed, it runs in the VM's work
directory and every file is a bare name there (symlinks to the cache); jailed
(:class:`JailerConfig`), files are hard-linked into the chroot and named
``/name``.  So the request bodies do not depend on the host, and a snapshot
(which records drive and socket paths) restores in any other directory.

**Guest kernel.**  On x86_64 Firecracker boots an uncompressed ELF ``vmlinux``
(:func:`extract_vmlinux` makes one from a bzImage).  Since 1.8 it describes its
virtio-mmio devices in ACPI tables, which stock distribution kernels understand;
they usually lack ``VIRTIO_MMIO_CMDLINE_DEVICES``, the legacy
``virtio_mmio.device=`` parameters Firecracker also appends (see Firecracker's
``docs/kernel-policy.md``).  Hence :data:`MIN_VERSION`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from stoker.backends.base import (
    Backend,
    LaunchedVM,
    MachineSpec,
    pump,
    terminate,
)
from stoker.backends.qemu import kvm_device_status
from stoker.errors import (
    AccelError,
    InfrastructureError,
    LaunchError,
    UsageError,
)
from stoker.kernel.vmlinux import extract_vmlinux
from stoker.procs import DIE_WITH_PARENT
from stoker.protocol.transport import HybridVsockTransport
from stoker.protocol.wire import VSOCK_PORT

log = logging.getLogger(__name__)

FIRECRACKER_BINARY = "firecracker"
JAILER_BINARY = "jailer"
#: ACPI device discovery (see the module docstring); ``/entropy`` needs >= 1.4.
MIN_VERSION = (1, 8)
INSTALL_HINT = (
    "install Firecracker >= 1.8 (firecracker and jailer) from "
    "https://github.com/firecracker-microvm/firecracker/releases"
)
#: The guest's vsock context id (0-2 are reserved for the hypervisor and host).
GUEST_CID = 3
#: Firecracker's limit (``MachineConfiguration.vcpu_count``).
MAX_VCPUS = 32
#: How long SIGTERM may take before SIGKILL.
TERM_GRACE = 2.0
#: Bound on each API request, and on the wait for the API socket to appear.
API_TIMEOUT = 10.0
SOCKET_TIMEOUT = 10.0
#: ``sun_path`` is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

# Names of the files in the directory the VMM sees (its work directory or its chroot).
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd"
ROOTFS_FILE = "rootfs"
SCRATCH_FILE = "scratch.img"
SEED_FILE = "seed.tar"
API_SOCKET = "api.sock"
VSOCK_SOCKET = "vsock.sock"
LOG_FIFO = "firecracker.log"
CONFIG_FILE = "vm-config.json"
SNAPSHOT_STATE = "snapshot.vmstate"
SNAPSHOT_MEMORY = "snapshot.mem"
SNAPSHOT_MANIFEST = "snapshot.json"
# A restored VM's links to the snapshot it was loaded from.  Distinct from the
# names above: snapshotting that VM again must not write through the links.
LOADED_STATE = "loaded.vmstate"
LOADED_MEMORY = "loaded.mem"

#: Parameters appended to :meth:`MachineSpec.kernel_cmdline` (a later parameter
#: overrides an earlier one of the same name).
FIRECRACKER_CMDLINE: tuple[str, ...] = (
    # Firecracker's documented way out: the guest resets through the i8042
    # controller and Firecracker exits (the spec's reboot=t is for QEMU microvm).
    "reboot=k",
    # We do not pass --enable-pci: there is no PCI bus to probe.
    "pci=off",
    # The agent listens on AF_VSOCK port wire.VSOCK_PORT instead of virtio-serial.
    "stoker.transport=vsock",
)

Body = dict[str, Any]
Method = Literal["GET", "PUT", "PATCH"]


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class JailerConfig:
    """Run Firecracker under its jailer: chroot, dropped uid/gid, cgroup limits.

    The jailer must run as root; it copies the Firecracker binary into
    ``<chroot_base>/<binary name>/<id>/root``, enters it, and execs Firecracker as
    ``uid``/``gid``.
    """

    uid: int
    gid: int
    binary: str = JAILER_BINARY
    chroot_base: Path = Path("/srv/jailer")
    cgroup_version: Literal[1, 2] = 2
    #: Parent of the VM's cgroup (the jailer's default is the binary's name).
    parent_cgroup: str | None = None
    #: Cap CPU time at ``spec.cpus`` CPUs' worth.
    limit_cpu: bool = True
    #: Cap memory at the guest's memory plus this much for the VMM and page cache.
    memory_overhead_mb: int | None = 256
    #: Extra ``--cgroup FILE=VALUE`` settings, e.g. ``cpuset.cpus=0-3``.
    extra_cgroups: tuple[str, ...] = ()
    #: ``--resource-limit RESOURCE=VALUE`` settings, e.g. ``no-file=1024``.
    resource_limits: tuple[str, ...] = ()


@dataclass(frozen=True)
class TapInterface:
    """An optional network interface backed by a host tap device (stoker VMs have none)."""

    host_dev_name: str
    iface_id: str = "eth0"
    guest_mac: str | None = None


@dataclass(frozen=True)
class FirecrackerConfig:
    """Firecracker-specific settings; everything about the guest is in the MachineSpec."""

    binary: str = FIRECRACKER_BINARY
    jailer: JailerConfig | None = None
    #: Configure with ``--config-file`` (one process start) instead of API calls.
    use_config_file: bool = False
    #: Firecracker's log level (``Error``, ``Warning``, ``Info``, ``Debug``, ``Trace``).
    log_level: str = "Info"
    network: TapInterface | None = None
    #: An uncompressed kernel to boot; by default extracted once from ``spec.kernel``.
    vmlinux: Path | None = None
    api_timeout: float = API_TIMEOUT
    socket_timeout: float = SOCKET_TIMEOUT


@dataclass(frozen=True)
class VmmLayout:
    """Where the VMM's files are on the host (``root``), and what the VMM calls them."""

    root: Path
    jailed: bool = False

    def vmm_path(self, name: str) -> str:
        """The path the VMM uses: relative to its working directory, or to its chroot."""
        return f"/{name}" if self.jailed else name

    def host_path(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class Placement:
    """A host file the VMM needs, under ``name`` in its directory."""

    name: str
    source: Path
    #: The VMM writes it: jailed, it is handed to the jail's uid/gid.
    writable: bool = False
    #: Give the VMM its own (sparse) copy rather than a link: a restored VM's disk.
    copy: bool = False
    #: The file belongs to this VM and goes with its work directory (scratch, seed):
    #: a snapshot keeps a copy, where shared inputs from the cache are referenced.
    owned: bool = False


@dataclass(frozen=True)
class ApiCall:
    """One request to Firecracker's API."""

    method: Method
    path: str
    body: Body | None = None

    def as_json(self) -> list[Any]:
        return [self.method, self.path, self.body]


@dataclass(frozen=True)
class FirecrackerPlan:
    """Everything needed to start one Firecracker VM, computed without I/O."""

    vm_id: str
    layout: VmmLayout
    #: The guest's size (recorded in snapshots: a restore is sized like its origin).
    cpus: int
    memory_mb: int
    argv: tuple[str, ...]
    files: tuple[Placement, ...]
    #: Sent in order once the API socket answers (empty with ``--config-file``).
    calls: tuple[ApiCall, ...]
    #: The ``--config-file`` document, written to :data:`CONFIG_FILE` when used.
    config: Body | None = None
    #: The VM's cgroup v2 directory when jailed (killed and removed at teardown).
    cgroup: Path | None = None

    def as_json(self) -> dict[str, Any]:
        """The plan as JSON data (for golden tests and ``--show-command``-style output)."""
        return {
            "vm_id": self.vm_id,
            "root": str(self.layout.root),
            "jailed": self.layout.jailed,
            "cgroup": None if self.cgroup is None else str(self.cgroup),
            "size": {"cpus": self.cpus, "memory_mb": self.memory_mb},
            "argv": list(self.argv),
            "files": [
                {
                    "name": p.name,
                    "source": str(p.source),
                    "writable": p.writable,
                    "copy": p.copy,
                    "owned": p.owned,
                }
                for p in self.files
            ],
            "calls": [c.as_json() for c in self.calls],
            "config": self.config,
        }


# ---------------------------------------------------------------------------- request bodies


def boot_args(spec: MachineSpec) -> str:
    """The guest kernel command line under Firecracker."""
    return " ".join([spec.kernel_cmdline(), *FIRECRACKER_CMDLINE])


def boot_source(spec: MachineSpec, layout: VmmLayout) -> Body:
    """``PUT /boot-source``: the vmlinux, our initramfs and the command line."""
    return {
        "kernel_image_path": layout.vmm_path(KERNEL_FILE),
        "initrd_path": layout.vmm_path(INITRD_FILE),
        "boot_args": boot_args(spec),
    }


def _drive(drive_id: str, name: str, layout: VmmLayout, *, read_only: bool) -> Body:
    return {
        "drive_id": drive_id,
        "path_on_host": layout.vmm_path(name),
        # Our initramfs mounts the root itself (stoker.root=), so no root= from Firecracker.
        "is_root_device": False,
        "is_read_only": read_only,
    }


def drives(spec: MachineSpec, layout: VmmLayout) -> list[Body]:
    """``PUT /drives/{drive_id}`` bodies, in guest device order (vda, vdb, vdc)."""
    if spec.probe:
        return []
    out = [_drive("rootfs", ROOTFS_FILE, layout, read_only=True)]
    if spec.scratch is not None:
        out.append(_drive("scratch", SCRATCH_FILE, layout, read_only=False))
    if spec.seed is not None:
        out.append(_drive("seed", SEED_FILE, layout, read_only=True))
    return out


def guest_block_devices(spec: MachineSpec) -> dict[str, str]:
    """Drive id -> guest device node.

    Firecracker cannot give a disk a virtio serial (the guest sees an id derived
    from the host file's inode), so the guest finds the seed disk by position.
    """
    disks = drives(spec, VmmLayout(Path("/")))
    return {d["drive_id"]: f"/dev/vd{chr(ord('a') + i)}" for i, d in enumerate(disks)}


def machine_config(spec: MachineSpec) -> Body:
    """``PUT /machine-config``."""
    if not 1 <= spec.cpus <= MAX_VCPUS:
        raise UsageError(f"Firecracker supports 1 to {MAX_VCPUS} vCPUs, not {spec.cpus}")
    return {"vcpu_count": spec.cpus, "mem_size_mib": spec.memory_mb, "smt": False}


def vsock(layout: VmmLayout) -> Body:
    """``PUT /vsock``: Firecracker listens on ``uds_path`` for host-initiated connections."""
    return {"guest_cid": GUEST_CID, "uds_path": layout.vmm_path(VSOCK_SOCKET)}


def entropy() -> Body:
    """``PUT /entropy``: virtio-rng, as the QEMU backend gives the guest."""
    return {}


def network_interface(tap: TapInterface) -> Body:
    """``PUT /network-interfaces/{iface_id}``."""
    body: Body = {"iface_id": tap.iface_id, "host_dev_name": tap.host_dev_name}
    if tap.guest_mac is not None:
        body["guest_mac"] = tap.guest_mac
    return body


def instance_start() -> Body:
    """``PUT /actions``: boot the configured VM."""
    return {"action_type": "InstanceStart"}


def vm_state(state: Literal["Paused", "Resumed"]) -> Body:
    """``PATCH /vm``: pause or resume the vCPUs."""
    return {"state": state}


def snapshot_create_body(snapshot_path: str, mem_path: str) -> Body:
    """``PUT /snapshot/create`` (the VM must be paused): a full snapshot."""
    return {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_path}


def snapshot_load_body(
    snapshot_path: str, mem_path: str, *, resume: bool = True, vsock_uds: str | None = None
) -> Body:
    """``PUT /snapshot/load`` on a fresh Firecracker: guest memory from a file.

    ``vsock_uds`` overrides the vsock socket recorded in the snapshot; our layout
    keeps it at the same relative name, so it is rarely needed (and only
    Firecracker >= 1.14 knows the field).
    """
    body: Body = {
        "snapshot_path": snapshot_path,
        "mem_backend": {"backend_type": "File", "backend_path": mem_path},
        "resume_vm": resume,
    }
    if vsock_uds is not None:
        body["vsock_override"] = {"uds_path": vsock_uds}
    return body


def _device_bodies(
    spec: MachineSpec, layout: VmmLayout, network: TapInterface | None
) -> tuple[list[Body], Body | None, list[Body]]:
    disks = drives(spec, layout)
    sock = None if spec.probe else vsock(layout)
    nets = [network_interface(network)] if network is not None else []
    return disks, sock, nets


def api_calls(
    spec: MachineSpec, layout: VmmLayout, *, network: TapInterface | None = None
) -> list[ApiCall]:
    """The API calls that configure and boot ``spec``, in order."""
    disks, sock, nets = _device_bodies(spec, layout, network)
    calls = [
        ApiCall("PUT", "/machine-config", machine_config(spec)),
        ApiCall("PUT", "/boot-source", boot_source(spec, layout)),
    ]
    calls += [ApiCall("PUT", f"/drives/{d['drive_id']}", d) for d in disks]
    if sock is not None:
        calls.append(ApiCall("PUT", "/vsock", sock))
    calls.append(ApiCall("PUT", "/entropy", entropy()))
    calls += [ApiCall("PUT", f"/network-interfaces/{n['iface_id']}", n) for n in nets]
    calls.append(ApiCall("PUT", "/actions", instance_start()))
    return calls


def config_file(
    spec: MachineSpec, layout: VmmLayout, *, network: TapInterface | None = None
) -> Body:
    """The ``--config-file`` document: the same content as :func:`api_calls`."""
    disks, sock, nets = _device_bodies(spec, layout, network)
    doc: Body = {
        "machine-config": machine_config(spec),
        "boot-source": boot_source(spec, layout),
        "drives": disks,
        "entropy": entropy(),
        "network-interfaces": nets,
    }
    if sock is not None:
        doc["vsock"] = sock
    return doc


# ---------------------------------------------------------------------------- command lines


def instance_id(name: str) -> str:
    """A Firecracker/jailer ``--id``: letters, digits and hyphens, at most 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9-]", "-", name)[:64].strip("-")
    return cleaned or "stoker"


def firecracker_args(layout: VmmLayout, *, log_level: str, use_config_file: bool) -> list[str]:
    """Firecracker's own options (after the jailer's ``--`` when jailed)."""
    # fmt: off
    args = [
        "--api-sock", layout.vmm_path(API_SOCKET),
        # A FIFO we read: keeps VMM messages out of the serial console on stdout.
        "--log-path", layout.vmm_path(LOG_FIFO),
        "--level", log_level,
    ]
    # fmt: on
    if use_config_file:
        args += ["--config-file", layout.vmm_path(CONFIG_FILE)]
    return args


def firecracker_argv(
    binary: str, vm_id: str, layout: VmmLayout, *, log_level: str, use_config_file: bool
) -> list[str]:
    """The command line of an unjailed Firecracker."""
    args = firecracker_args(layout, log_level=log_level, use_config_file=use_config_file)
    return [binary, "--id", vm_id, *args]


CPU_PERIOD_US = 100_000


def cgroup_limits(jailer: JailerConfig, *, cpus: int, memory_mb: int) -> list[str]:
    """``--cgroup FILE=VALUE`` settings for a guest of this size."""
    limits = []
    v2 = jailer.cgroup_version == 2
    if jailer.limit_cpu:
        quota = cpus * CPU_PERIOD_US
        if v2:
            limits.append(f"cpu.max={quota} {CPU_PERIOD_US}")
        else:
            limits += [f"cpu.cfs_period_us={CPU_PERIOD_US}", f"cpu.cfs_quota_us={quota}"]
    if jailer.memory_overhead_mb is not None:
        limit = (memory_mb + jailer.memory_overhead_mb) << 20
        limits.append(f"memory.max={limit}" if v2 else f"memory.limit_in_bytes={limit}")
    return [*limits, *jailer.extra_cgroups]


def jailer_argv(
    jailer: JailerConfig,
    vm_id: str,
    exec_file: str,
    fc_args: Sequence[str],
    *,
    cpus: int,
    memory_mb: int,
) -> list[str]:
    """The jailer's command line; ``exec_file`` is the absolute path of Firecracker."""
    # fmt: off
    argv = [
        jailer.binary,
        "--id", vm_id,
        "--exec-file", exec_file,
        "--uid", str(jailer.uid),
        "--gid", str(jailer.gid),
        "--chroot-base-dir", str(jailer.chroot_base),
        "--cgroup-version", str(jailer.cgroup_version),
    ]
    # fmt: on
    if jailer.parent_cgroup is not None:
        argv += ["--parent-cgroup", jailer.parent_cgroup]
    for setting in cgroup_limits(jailer, cpus=cpus, memory_mb=memory_mb):
        argv += ["--cgroup", setting]
    for limit in jailer.resource_limits:
        argv += ["--resource-limit", limit]
    # The jailer passes --id to Firecracker itself.
    return [*argv, "--", *fc_args]


def jail_dir(jailer: JailerConfig, exec_file: str, vm_id: str) -> Path:
    """``<chroot_base>/<exec file name>/<id>``; the chroot is its ``root`` subdirectory."""
    return jailer.chroot_base / Path(exec_file).name / vm_id


def jail_cgroup(jailer: JailerConfig, exec_file: str, vm_id: str) -> Path | None:
    """The VM's cgroup v2 directory (``None`` under cgroup v1: one per controller)."""
    if jailer.cgroup_version != 2:
        return None
    parent = jailer.parent_cgroup or Path(exec_file).name
    return Path("/sys/fs/cgroup") / parent / vm_id


def _layout(config: FirecrackerConfig, workdir: Path, exec_file: str, vm_id: str) -> VmmLayout:
    if config.jailer is None:
        return VmmLayout(workdir)
    return VmmLayout(jail_dir(config.jailer, exec_file, vm_id) / "root", jailed=True)


def _argv(
    config: FirecrackerConfig,
    layout: VmmLayout,
    exec_file: str,
    vm_id: str,
    *,
    cpus: int,
    memory_mb: int,
    use_config_file: bool,
) -> list[str]:
    if config.jailer is None:
        return firecracker_argv(
            exec_file, vm_id, layout, log_level=config.log_level, use_config_file=use_config_file
        )
    fc_args = firecracker_args(layout, log_level=config.log_level, use_config_file=use_config_file)
    return jailer_argv(config.jailer, vm_id, exec_file, fc_args, cpus=cpus, memory_mb=memory_mb)


def vmm_inputs(spec: MachineSpec, vmlinux: Path) -> list[Placement]:
    """The host files ``spec`` boots from, under the names the bodies use."""
    files = [Placement(KERNEL_FILE, vmlinux), Placement(INITRD_FILE, spec.initrd)]
    if not spec.probe:
        files.append(Placement(ROOTFS_FILE, spec.rootfs))
        if spec.scratch is not None:
            files.append(Placement(SCRATCH_FILE, spec.scratch, writable=True, owned=True))
        if spec.seed is not None:
            files.append(Placement(SEED_FILE, spec.seed, owned=True))
    return files


def plan_launch(
    spec: MachineSpec,
    config: FirecrackerConfig,
    *,
    workdir: Path,
    vmlinux: Path,
    exec_file: str,
) -> FirecrackerPlan:
    """Plan booting ``spec`` (pure: no I/O).  ``exec_file`` is the resolved Firecracker."""
    vm_id = instance_id(spec.name)
    layout = _layout(config, workdir, exec_file, vm_id)
    use_file = config.use_config_file
    cpus, memory_mb = spec.cpus, spec.memory_mb
    argv = _argv(
        config, layout, exec_file, vm_id, cpus=cpus, memory_mb=memory_mb, use_config_file=use_file
    )
    return FirecrackerPlan(
        vm_id=vm_id,
        layout=layout,
        cpus=cpus,
        memory_mb=memory_mb,
        argv=tuple(argv),
        files=tuple(vmm_inputs(spec, vmlinux)),
        calls=() if use_file else tuple(api_calls(spec, layout, network=config.network)),
        config=config_file(spec, layout, network=config.network) if use_file else None,
        cgroup=jail_cgroup(config.jailer, exec_file, vm_id) if config.jailer else None,
    )


# ---------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class FirecrackerSnapshot:
    """A guest saved by :meth:`FirecrackerVM.snapshot`: state, memory, and its disks.

    The VM's own disks (scratch, seed) were copied into ``directory`` while the
    guest was paused (their contents must match the memory image); shared inputs
    from the cache (the root image) are referenced where they are.  Each restore
    gets its own copy of the writable disks.
    """

    directory: Path
    files: tuple[Placement, ...]
    cpus: int
    memory_mb: int

    @property
    def state(self) -> Path:
        return self.directory / SNAPSHOT_STATE

    @property
    def memory(self) -> Path:
        return self.directory / SNAPSHOT_MEMORY

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "files": [
                {"name": p.name, "source": str(p.source), "writable": p.writable}
                for p in self.files
            ],
        }

    @classmethod
    def load(cls, directory: Path) -> FirecrackerSnapshot:
        """Read a snapshot written by :meth:`FirecrackerVM.snapshot`."""
        try:
            doc = json.loads((directory / SNAPSHOT_MANIFEST).read_text())
            files = tuple(
                Placement(str(f["name"]), Path(f["source"]), writable=bool(f["writable"]))
                for f in doc["files"]
            )
            cpus, memory_mb = int(doc["cpus"]), int(doc["memory_mb"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{directory} is not a stoker Firecracker snapshot: {exc}") from exc
        return cls(directory, files, cpus, memory_mb)


def plan_restore(
    snapshot: FirecrackerSnapshot,
    config: FirecrackerConfig,
    *,
    workdir: Path,
    exec_file: str,
    name: str,
) -> FirecrackerPlan:
    """Plan restoring ``snapshot`` into a fresh Firecracker (pure)."""
    vm_id = instance_id(name)
    layout = _layout(config, workdir, exec_file, vm_id)
    # Writable disks are copied per restore, the rest linked.  Files kept in the
    # snapshot directory count as the VM's own: a snapshot of this VM copies them.
    files = [
        replace(p, copy=p.writable, owned=p.source.is_relative_to(snapshot.directory))
        for p in snapshot.files
    ]
    files += [
        Placement(LOADED_STATE, snapshot.state),
        Placement(LOADED_MEMORY, snapshot.memory),
    ]
    load = snapshot_load_body(layout.vmm_path(LOADED_STATE), layout.vmm_path(LOADED_MEMORY))
    cpus, memory_mb = snapshot.cpus, snapshot.memory_mb
    argv = _argv(
        config, layout, exec_file, vm_id, cpus=cpus, memory_mb=memory_mb, use_config_file=False
    )
    return FirecrackerPlan(
        vm_id=vm_id,
        layout=layout,
        cpus=cpus,
        memory_mb=memory_mb,
        argv=tuple(argv),
        files=tuple(files),
        calls=(ApiCall("PUT", "/snapshot/load", load),),
        cgroup=jail_cgroup(config.jailer, exec_file, vm_id) if config.jailer else None,
    )


# ---------------------------------------------------------------------------- API client

#: Bounds on what we accept from the API socket (the VMM is trusted more than the
#: guest, but a confused peer must not make us buffer without limit).
MAX_RESPONSE_HEAD = 16 * 1024
MAX_RESPONSE_BODY = 1 << 20
_STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


class FirecrackerAPIError(LaunchError):
    """Firecracker refused an API request, or did not answer it.

    ``status`` is the HTTP status (``None`` when there was no valid answer);
    ``fault`` is Firecracker's ``fault_message``.
    """

    def __init__(
        self,
        method: str,
        path: str,
        status: int | None,
        fault: str,
        *,
        argv: Sequence[str] = (),
        output: str = "",
    ) -> None:
        what = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(
            f"Firecracker API {method} {path} failed ({what}): {fault}", argv=argv, output=output
        )
        self.method = method
        self.path = path
        self.status = status
        self.fault = fault


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    #: The parsed JSON body, or ``None`` when there was none.
    body: Any


class FirecrackerClient:
    """JSON over HTTP/1.1 on Firecracker's API socket (stdlib only).

    One connection per request: requests are rare (configuration, snapshots) and
    a fresh connection never inherits a half-read response.
    """

    def __init__(self, socket_path: Path, *, timeout: float = API_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def request(self, method: str, path: str, body: object = None) -> ApiResponse:
        """Send one request and return the response, whatever its status."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(method, path, body)
        except TimeoutError:
            raise FirecrackerAPIError(
                method, path, None, f"no response within {self.timeout:g}s"
            ) from None

    async def call(self, method: str, path: str, body: object = None) -> Any:
        """Send one request; return the JSON body of a 2xx answer, else raise."""
        response = await self.request(method, path, body)
        if 200 <= response.status < 300:
            return response.body
        fault = response.body
        if isinstance(fault, dict) and isinstance(fault.get("fault_message"), str):
            fault = fault["fault_message"]
        raise FirecrackerAPIError(method, path, response.status, str(fault or "(no message)"))

    async def put(self, path: str, body: object) -> Any:
        return await self.call("PUT", path, body)

    async def patch(self, path: str, body: object) -> Any:
        return await self.call("PATCH", path, body)

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def _exchange(self, method: str, path: str, body: object) -> ApiResponse:
        writer = None
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self.socket_path), limit=MAX_RESPONSE_HEAD
            )
            writer.write(_encode_request(method, path, body))
            await writer.drain()
            return await _read_response(reader, method, path)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise FirecrackerAPIError(method, path, None, f"connection failed: {exc}") from exc
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


def _encode_request(method: str, path: str, body: object) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Accept: application/json"]
    payload = b""
    if body is not None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    elif method in ("PUT", "PATCH"):
        head.append("Content-Length: 0")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload


async def _read_response(reader: asyncio.StreamReader, method: str, path: str) -> ApiResponse:
    def bad(why: str) -> FirecrackerAPIError:
        return FirecrackerAPIError(method, path, None, f"malformed response: {why}")

    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise bad(f"headers longer than {MAX_RESPONSE_HEAD} bytes") from None
    lines = head[:-4].split(b"\r\n")
    match = _STATUS_RE.fullmatch(lines[0])
    if match is None:
        raise bad(f"status line {lines[0][:80]!r}")
    status = int(match.group(1))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise bad(f"header line {line[:80]!r}")
        headers[name.strip().decode("ascii", "replace").lower()] = value.strip().decode("latin-1")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise bad("chunked transfer encoding")
    raw = b""
    if status >= 200 and status not in (204, 304):
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_RESPONSE_BODY:
                raise bad(f"Content-Length {length[:20]!r}")
            raw = await reader.readexactly(int(length))
        else:
            raw = await reader.read(MAX_RESPONSE_BODY + 1)
            if len(raw) > MAX_RESPONSE_BODY:
                raise bad(f"body longer than {MAX_RESPONSE_BODY} bytes")
    parsed: Any = None
    if raw.strip():
        try:
            parsed = json.loads(raw)
        except ValueError:
            # Error bodies should be JSON; keep the text so the fault is still shown.
            parsed = raw.decode("utf-8", "replace")
    return ApiResponse(status, headers, parsed)


# ---------------------------------------------------------------------------- transport


# ---------------------------------------------------------------------------- the VM


@dataclass
class FirecrackerVM(LaunchedVM):
    """A running Firecracker process (possibly jailed)."""

    proc: asyncio.subprocess.Process | None = None
    api: FirecrackerClient | None = None
    plan: FirecrackerPlan | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Pipes that must stay open while the VM runs (stdin, the log FIFO).
    keep: list[asyncio.BaseTransport] = field(default_factory=list)
    _killed: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.returncode is not None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def argv(self) -> list[str]:
        return list(self.plan.argv) if self.plan else []

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    #: The seed disk's guest device (Firecracker drives have no serial).
    seed_disk: str | None = None

    @property
    def seed_device(self) -> str | None:
        return self.seed_disk

    async def diagnostics(self) -> str:
        """The instance state from ``GET /`` (bounded, best effort)."""
        if self.api is None or self.returncode is not None:
            return ""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                info = await self.api.get("/")
                if isinstance(info, dict):
                    return f"Firecracker {info.get('vmm_version')}: {info.get('state')}"
        return ""

    def _api(self) -> FirecrackerClient:
        if self.api is None or self.returncode is not None or self._killed:
            raise InfrastructureError("the Firecracker VM is not running")
        return self.api

    async def pause(self) -> None:
        await self._api().patch("/vm", vm_state("Paused"))

    async def resume(self) -> None:
        await self._api().patch("/vm", vm_state("Resumed"))

    async def snapshot(self, directory: Path, *, resume: bool = True) -> FirecrackerSnapshot:
        """Pause the guest and save it to ``directory`` (created); resume it afterwards.

        Firecracker writes the state and memory files into its own directory (all
        it can see when jailed); they are then moved to ``directory`` together with
        copies of the writable disks.
        """
        assert self.plan is not None
        api, layout = self._api(), self.plan.layout
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=False)
        await api.patch("/vm", vm_state("Paused"))
        try:
            body = snapshot_create_body(
                layout.vmm_path(SNAPSHOT_STATE), layout.vmm_path(SNAPSHOT_MEMORY)
            )
            await api.put("/snapshot/create", body)
            snapshot = await asyncio.to_thread(_collect_snapshot, self.plan, directory)
        finally:
            if resume and self.returncode is None:
                await api.patch("/vm", vm_state("Resumed"))
        return snapshot

    async def kill(self) -> None:
        """SIGTERM, then SIGKILL; always reaps; verifies the process is gone.

        (``SendCtrlAltDel`` would need the guest's keyboard driver, which our
        kernel command line disables.)
        """
        if self._killed:
            return
        self._killed = True
        proc = self.proc
        try:
            if proc is not None and proc.returncode is None:
                await terminate(proc, what="Firecracker", grace=TERM_GRACE)
        finally:
            for pipe in self.keep:
                pipe.close()
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _collect_snapshot(plan: FirecrackerPlan, directory: Path) -> FirecrackerSnapshot:
    """Move the state and memory Firecracker wrote to ``directory``; copy the VM's disks."""
    layout = plan.layout
    for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
        shutil.move(layout.host_path(name), directory / name)
    files = []
    for p in plan.files:
        if p.name in (KERNEL_FILE, INITRD_FILE, LOADED_STATE, LOADED_MEMORY):
            continue  # the kernel is in the memory image; state and memory are new
        if p.owned:
            sparse_copy(layout.host_path(p.name), directory / p.name)
            files.append(Placement(p.name, directory / p.name, writable=p.writable))
        else:
            files.append(Placement(p.name, p.source, writable=p.writable))
    snapshot = FirecrackerSnapshot(directory, tuple(files), plan.cpus, plan.memory_mb)
    (directory / SNAPSHOT_MANIFEST).write_text(json.dumps(snapshot.to_json(), indent=1) + "\n")
    return snapshot


# ---------------------------------------------------------------------------- files


def sparse_copy(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` keeping holes (a mostly empty scratch disk stays small).

    ``copy_file_range`` also shares extents where the file system can (btrfs, xfs).
    """
    with source.open("rb") as src, dest.open("xb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            pos = start
            while pos < end:
                done = os.copy_file_range(
                    src.fileno(), dst.fileno(), min(end - pos, 1 << 30), pos, pos
                )
                if done == 0:
                    break
                pos += done
            offset = end
        os.ftruncate(dst.fileno(), size)


def place_files(
    layout: VmmLayout, files: Sequence[Placement], owner: tuple[int, int] | None = None
) -> None:
    """Make ``files`` visible to the VMM under their names in ``layout.root``.

    Unjailed: symlinks (the VMM can follow them).  Jailed: hard links, or copies
    across file systems, since nothing outside the chroot is reachable.  Writable
    files are handed to ``owner`` (the jail's uid/gid).
    """
    for p in files:
        dest = layout.host_path(p.name)
        if p.copy:
            sparse_copy(p.source, dest)
        elif dest.exists() and dest.samefile(p.source):
            pass  # already there (the scratch disk vm.py makes in the work directory)
        elif not layout.jailed:
            dest.symlink_to(p.source.resolve())
        else:
            try:
                os.link(p.source, dest)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                sparse_copy(p.source, dest)
        if owner is not None and p.writable:
            os.chown(dest, *owner)


def _remove_jail(directory: Path, cgroup: Path | None) -> None:
    """Remove a jail (chroot) and the VM's cgroup; the VMM is already dead."""
    if cgroup is not None and cgroup.is_dir():
        # Anything left in the cgroup (nothing, normally) goes first (Linux >= 5.14).
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.kill").write_text("1")
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # the kernel frees a cgroup shortly after its last task
        else:
            log.warning("could not remove cgroup %s", cgroup)
    # Not ignore_errors: a jail left behind is a leak to report.
    if directory.exists():
        shutil.rmtree(directory)


# ---------------------------------------------------------------------------- the backend


class FirecrackerBackend(Backend):
    """Firecracker microVMs (KVM only), optionally jailed."""

    name = "firecracker"

    def __init__(self, config: FirecrackerConfig | None = None) -> None:
        self.config = config or FirecrackerConfig()

    def usable(self) -> tuple[bool, str]:
        return firecracker_status(self.config.binary)

    def describe(self) -> dict[str, str]:
        usable, why = firecracker_status(self.config.binary)
        facts = {
            "binary": shutil.which(self.config.binary) or self.config.binary,
            "version": firecracker_version(self.config.binary) or "not installed",
            "usable": "yes" if usable else "no",
            "why": why,
        }
        if self.config.jailer is not None:
            facts["jailer"] = shutil.which(self.config.jailer.binary) or "not installed"
        return facts

    def _exec_file(self) -> str:
        found = shutil.which(self.config.binary)
        if found is None:
            raise LaunchError(f"{self.config.binary} is not installed", hint=INSTALL_HINT)
        return str(Path(found).resolve())

    async def launch(self, spec: MachineSpec, workdir: Path, stack: AsyncExitStack) -> LaunchedVM:
        if spec.accel != "kvm":
            raise AccelError(
                "Firecracker needs KVM; this VM would run under TCG emulation",
                hint="use the qemu backend on hosts without usable KVM",
            )
        exec_file = self._exec_file()
        vmlinux = self.config.vmlinux
        if vmlinux is None:
            vmlinux = await asyncio.to_thread(extract_vmlinux, spec.kernel)
        plan = plan_launch(spec, self.config, workdir=workdir, vmlinux=vmlinux, exec_file=exec_file)
        vm = await self._start(plan, workdir, stack)
        if spec.seed is not None:
            vm.seed_disk = guest_block_devices(spec).get("seed")
        return vm

    async def restore(
        self,
        snapshot: FirecrackerSnapshot,
        workdir: Path,
        stack: AsyncExitStack,
        *,
        name: str | None = None,
    ) -> FirecrackerVM:
        """Start a fresh Firecracker from ``snapshot`` (resumed; same guest, new VMM).

        Existing vsock connections do not survive a snapshot: the guest sees a
        transport reset and the host connects anew through :attr:`transport`.
        """
        plan = plan_restore(
            snapshot,
            self.config,
            workdir=workdir,
            exec_file=self._exec_file(),
            name=name or f"stoker-restore-{secrets.token_hex(4)}",
        )
        return await self._start(plan, workdir, stack)

    async def _start(
        self, plan: FirecrackerPlan, workdir: Path, stack: AsyncExitStack
    ) -> FirecrackerVM:
        layout = plan.layout
        for name in (API_SOCKET, VSOCK_SOCKET):
            _check_socket_path(layout.host_path(name))
        await self._prepare(plan, stack)
        api = FirecrackerClient(layout.host_path(API_SOCKET), timeout=self.config.api_timeout)
        vm = FirecrackerVM(
            transport=HybridVsockTransport(layout.host_path(VSOCK_SOCKET), VSOCK_PORT),
            plan=plan,
            api=api,
        )
        # From here on every pipe, task and process hangs off the VM; kill() releases them.
        stack.push_async_callback(vm.kill)
        loop = asyncio.get_running_loop()
        # Our end of the log FIFO is opened read-write, so it never reports EOF
        # before Firecracker opens it (and never blocks anyone).
        fifo = os.open(layout.host_path(LOG_FIFO), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        # Wraps the open descriptor (no blocking I/O); the pipe transport owns it.
        fifo_file = open(fifo, "rb", buffering=0)  # noqa: ASYNC230, SIM115
        log_reader = asyncio.StreamReader()
        try:
            log_pipe, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(log_reader), fifo_file
            )
        except BaseException:
            fifo_file.close()
            raise
        vm.keep.append(log_pipe)
        vm.tasks.append(loop.create_task(pump(log_reader, vm.vmm_log)))
        argv = list(plan.argv)
        log.debug("launching (cwd %s): %s", layout.root, " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                # A pipe we never write: the serial console's input, never our stdin.
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Only calls a pre-resolved prctl(): safe between fork and exec.  The
                # jailer's switch to another uid clears it; a jailed VM's cgroup is
                # killed at teardown instead.
                preexec_fn=DIE_WITH_PARENT,
                cwd=workdir if layout.jailed else layout.root,
            )
        except FileNotFoundError as exc:
            raise LaunchError(f"{argv[0]} is not installed", argv=argv, hint=INSTALL_HINT) from exc
        vm.proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        vm.keep.append(proc.stdin.transport)
        vm.tasks.append(loop.create_task(pump(proc.stdout, vm.console)))
        vm.tasks.append(loop.create_task(pump(proc.stderr, vm.vmm_log)))
        try:
            await self._wait_for_api(vm)
            for call in plan.calls:
                await api.call(call.method, call.path, call.body)
        except FirecrackerAPIError as exc:
            await _settle(proc)
            raise FirecrackerAPIError(
                exc.method,
                exc.path,
                exc.status,
                exc.fault,
                argv=argv,
                output=vm.vmm_log.text(),
            ) from exc
        return vm

    async def _prepare(self, plan: FirecrackerPlan, stack: AsyncExitStack) -> None:
        """Lay out the VMM's directory: inputs, log FIFO, config file; jail cleanup."""
        layout, jailer = plan.layout, self.config.jailer
        owner = (jailer.uid, jailer.gid) if jailer is not None else None
        if layout.jailed:
            directory = layout.root.parent
            # exist_ok=False: a jail we did not create is never reused or removed.
            await asyncio.to_thread(layout.root.mkdir, parents=True, exist_ok=False)
            stack.push_async_callback(asyncio.to_thread, _remove_jail, directory, plan.cgroup)

        def prepare() -> None:
            place_files(layout, plan.files, owner)
            fifo = layout.host_path(LOG_FIFO)
            os.mkfifo(fifo, 0o600)
            if owner is not None:
                os.chown(fifo, *owner)
            if plan.config is not None:
                layout.host_path(CONFIG_FILE).write_text(json.dumps(plan.config, indent=1))

        await asyncio.to_thread(prepare)

    async def _wait_for_api(self, vm: FirecrackerVM) -> None:
        """Wait (bounded) until the API socket answers ``GET /``, or the process exits.

        Firecracker creates the socket itself, after start-up; there is nothing
        to be notified by, so this polls with a short back-off.
        """
        assert vm.proc is not None and vm.api is not None
        timeout = self.config.socket_timeout
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if vm.proc.returncode is not None:
                await _settle(vm.proc)
                raise LaunchError(
                    "Firecracker exited during start-up",
                    argv=vm.argv,
                    returncode=vm.proc.returncode,
                    output=vm.vmm_log.text(),
                )
            with contextlib.suppress(FirecrackerAPIError):
                info = await vm.api.get("/")
                log.debug("Firecracker is up: %s", info)
                return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"Firecracker's API socket did not answer within {timeout:g}s",
                    argv=vm.argv,
                    output=vm.vmm_log.text(),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


async def _settle(proc: asyncio.subprocess.Process) -> None:
    """Give an exiting VMM a moment, so its last words reach the log."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.5):
            await proc.wait()
    await asyncio.sleep(0.05)


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LaunchError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes",
            hint="use a shorter STOKER_RUNTIME_DIR (or jail chroot base)",
        )


# ---------------------------------------------------------------------------- doctor

_VERSION_RE = re.compile(r"Firecracker v(\d+)\.(\d+)\.(\d+)")


def firecracker_version(binary: str = FIRECRACKER_BINARY) -> str | None:
    """``1.16.1`` for an installed Firecracker, else None."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out)
    return ".".join(match.groups()) if match else None


def firecracker_status(binary: str = FIRECRACKER_BINARY, kvm: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether this host can run Firecracker VMs, and why (for ``stoker doctor``)."""
    path = shutil.which(binary)
    if path is None:
        return False, f"{binary} not found on PATH ({INSTALL_HINT})"
    version = firecracker_version(path)
    if version is None:
        return False, f"{path} did not report a version (`{binary} --version`)"
    major, minor, _ = (int(part) for part in version.split("."))
    if (major, minor) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return False, (
            f"Firecracker {version} at {path} is too old: >= {need} describes devices in "
            "ACPI, which stock guest kernels need"
        )
    kvm_ok, kvm_why = kvm_device_status(kvm)
    if not kvm_ok:
        return False, f"Firecracker {version} at {path}, but it needs KVM: {kvm_why}"
    return True, f"Firecracker {version} at {path}; {kvm_why}"
