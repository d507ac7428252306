"""QEMU backend: ``qemu-system-x86_64 -M microvm`` with direct kernel boot.

The command line is data: :func:`qemu_argv` is a pure function of a
:class:`~stoker.backends.base.MachineSpec` and the file descriptors the parent
created, golden-tested in ``tests/test_qemu_argv.py``.

Sockets are created by the parent and passed as descriptors (never paths in a
shared directory, so there is no start-up race and nothing to clean up on disk):

* the agent's virtio-serial port, the QMP monitor and the serial console are each
  one end of a ``socketpair``;
* QEMU never shares our stdio (it would set O_NONBLOCK on it).

The VMM gets ``PR_SET_PDEATHSIG=SIGKILL`` so that even a ``kill -9`` of stoker
cannot leave a VM running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import subprocess
from contextlib import AsyncExitStack
from dataclasses import astuple, dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient

from stoker.backends.base import (
    Backend,
    LaunchedVM,
    MachineSpec,
    ProcessLike,
    pump,
    terminate,
    wait_for,
)
from stoker.backends.detached import (
    SOCKETS,
    AdoptedProcess,
    VmmRecord,
    short_paths,
    socket_path,
    start_time,
)
from stoker.errors import InfrastructureError, LaunchError, VMError
from stoker.procs import child_hook
from stoker.protocol import wire
from stoker.protocol.transport import SocketTransport

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
#: virtio-blk serial of the seed disk; the agent finds the device by it.
SEED_SERIAL = "stoker-seed"
#: How long a QMP ``quit`` may take before we escalate to signals.
QUIT_GRACE = 2.0
#: The device-state file of a QEMU snapshot (RAM is the separate memory file).
STATE_FILE = "state"
_MIGRATION_FD = "stoker-migration"
# Leave shared-file RAM out of the migration stream: the memory file is the RAM.
_MIGRATION_CAPS = [{"capability": "x-ignore-shared", "state": True}]


#: The guest CPU under TCG: x86-64-v2 (what Debian and most wheels need, with SSE4.2
#: and POPCNT), not ``max``.  Measured on a 2-core host: agent ready 2.62 s against
#: 3.11 s with ``max`` (medians of 3), whose extra features (AVX, AVX-512, ...) the
#: guest kernel sets up and TCG emulates slowly.  Under KVM the guest gets the host's.
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"


def _escape(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def _network(spec: MachineSpec) -> list[str]:
    if not spec.nic:
        return ["-nic", "none"]
    # nat mode: user-mode networking (slirp) inside QEMU's own process, IPv4
    # only; unfiltered, which is why it is an explicit opt-in.
    return [
        "-netdev", "user,id=net0,ipv6=off",
        "-device", "virtio-net-device,netdev=net0",
    ]  # fmt: skip


@dataclass(frozen=True)
class QemuFds:
    """Descriptor numbers (identical in parent and child) of the pre-connected sockets.

    For a detached VM (:attr:`MachineSpec.detached`) they are listening sockets
    instead, which a restarted service connects to again.
    """

    agent: int
    qmp: int
    console: int


def qemu_argv(spec: MachineSpec, fds: QemuFds, *, binary: str = QEMU_BINARY) -> list[str]:
    """Return the QEMU command line for ``spec`` (pure: no I/O, no globals)."""
    if spec.accel == "kvm":
        accel, cpu = "kvm", "host"
    else:
        accel, cpu = ("tcg,thread=multi" if spec.cpus > 1 else "tcg"), TCG_CPU
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on"
    memory = ["-m", f"{spec.memory_mb}M"]
    # A detached VMM listens for its controller, which may connect again after a restart.
    server = ",server=on,wait=off" if spec.detached else ""
    if spec.memory_file is not None:
        machine += ",memory-backend=mem"
        share = "on" if spec.memory_shared else "off"
        memory += [
            "-object",
            f"memory-backend-file,id=mem,size={spec.memory_mb}M,"
            f"mem-path={_escape(str(spec.memory_file))},share={share}",
        ]
    # One option and its value per line:
    # fmt: off
    argv = [
        binary,
        "-name", f"{_escape(spec.name)},debug-threads=on",
        # microvm: no PCI, no option ROMs (QEMU docs/system/i386/microvm.rst).
        "-M", machine,
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(spec.cpus),
        *memory,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        *_network(spec),
        # Defence in depth: QEMU's seccomp filter (no spawning, no privilege changes).
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", _escape(str(spec.kernel)),
        "-initrd", _escape(str(spec.initrd)),
        "-append", spec.kernel_cmdline(),
        "-chardev", f"socket,id=console,fd={fds.console}{server}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,fd={fds.qmp}{server}",
        "-mon", "chardev=qmp,mode=control",
    ]
    if spec.probe:
        return argv
    # Disk order matters: the guest sees root as /dev/vda and scratch as /dev/vdb.
    argv += [
        "-chardev", f"socket,id=agent,fd={fds.agent}{server}",
        "-device", "virtio-serial-device,max_ports=2",
        "-device", f"virtserialport,chardev=agent,name={wire.PORT_NAME}",
        "-drive", f"id=root,file={_escape(str(spec.rootfs))},format=raw,if=none,read-only=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
    ]
    if spec.scratch is not None:
        argv += [
            "-drive", f"id=scratch,file={_escape(str(spec.scratch))},"
                      f"format={spec.scratch_format},if=none,discard=unmap,detect-zeroes=unmap",
            "-device", "virtio-blk-device,drive=scratch",
        ]
    if spec.seed is not None:
        argv += [
            "-drive", f"id=seed,file={_escape(str(spec.seed))},format=raw,if=none,read-only=on",
            "-device", f"virtio-blk-device,drive=seed,serial={SEED_SERIAL}",
        ]
    if spec.incoming:
        # Paused until load_state() feeds it a saved state over QMP.
        argv += ["-incoming", "defer"]
    # fmt: on
    return argv


@dataclass
class QemuVM(LaunchedVM):
    """A running QEMU process."""

    proc: ProcessLike | None = None
    qmp: QMPClient | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    #: Stream objects that must stay referenced while the VM runs.
    keep: list[object] = field(default_factory=list)
    _killed: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.returncode is not None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def diagnostics(self) -> str:
        """Run state and the boot CPU's instruction pointer, via QMP (bounded, best effort)."""
        if self.qmp is None or self.returncode is not None:
            return ""
        facts = []
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                status = await self.qmp.execute("query-status")
                if isinstance(status, dict):
                    facts.append(f"VM status: {status.get('status')}")
                regs = await self.qmp.execute(
                    "human-monitor-command", {"command-line": "info registers"}
                )
                rip = next((w for w in str(regs).split() if w.startswith("RIP=")), None)
                if rip:
                    facts.append(f"CPU 0 {rip}")
        return ", ".join(facts)

    async def save_state(self, directory: Path, timeout: float) -> None:
        """Stop the guest and migrate its device state to ``directory/STATE_FILE``.

        RAM is not in the stream: the template runs with a shared memory file
        and ``x-ignore-shared`` leaves such RAM out (the file *is* the RAM).
        """
        qmp = self._require_qmp()
        await qmp.execute("stop")
        await qmp.execute("migrate-set-capabilities", {"capabilities": _MIGRATION_CAPS})
        fd = os.open(directory / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        try:
            # The sandbox forbids QEMU from opening files: hand it the descriptor.
            qmp.send_fd_scm(fd)
        finally:
            os.close(fd)
        await qmp.execute("getfd", {"fdname": _MIGRATION_FD})
        await qmp.execute("migrate", {"uri": f"fd:{_MIGRATION_FD}"})
        await self._migration_done(timeout, "saving the VM state")

    async def load_state(self, directory: Path, timeout: float) -> None:
        """Feed ``directory/STATE_FILE`` to a VMM started with ``incoming``, then resume."""
        qmp = self._require_qmp()
        await qmp.execute("migrate-set-capabilities", {"capabilities": _MIGRATION_CAPS})
        fd = os.open(directory / STATE_FILE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qmp.send_fd_scm(fd)
        finally:
            os.close(fd)
        await qmp.execute("getfd", {"fdname": _MIGRATION_FD})
        await qmp.execute("migrate-incoming", {"uri": f"fd:{_MIGRATION_FD}"})
        await self._migration_done(timeout, "loading the VM state")
        await qmp.execute("cont")

    def _require_qmp(self) -> QMPClient:
        if self.qmp is None:
            raise InfrastructureError("QEMU's monitor is not connected")
        return self.qmp

    async def _migration_done(self, timeout: float, what: str) -> None:
        qmp = self._require_qmp()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    status = await qmp.execute("query-migrate")
                    state = status.get("status") if isinstance(status, dict) else None
                    if state == "completed":
                        return
                    if state in ("failed", "cancelled"):
                        why = status.get("error-desc", state) if isinstance(status, dict) else state
                        raise VMError(f"{what} failed: {why}", console=self.console.tail())
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise VMError(f"{what} took longer than {timeout:.0f}s") from None

    async def kill(self) -> None:
        """QMP ``quit``, then SIGTERM, then SIGKILL; always reaps; verifies the pid is gone."""
        if self._killed:
            return
        self._killed = True
        proc = self.proc
        try:
            if proc is not None and proc.returncode is None:
                if self.qmp is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(QUIT_GRACE):
                            await self.qmp.execute("quit")
                await wait_for(proc, QUIT_GRACE)
                await terminate(proc, what="QEMU", grace=QUIT_GRACE)
        finally:
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    await self.qmp.disconnect()
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class QemuBackend(Backend):
    """QEMU's ``microvm`` machine."""

    name = "qemu"

    def __init__(self, binary: str = QEMU_BINARY) -> None:
        self.binary = binary

    #: Templates run in a shared memory file; clones restore with ``x-ignore-shared``.
    snapshots = True
    #: QEMU joins its VM's cgroup (and drops to the VMM user) before it executes.
    host_limits = True

    def describe(self) -> dict[str, str]:
        return {"binary": self.binary, "version": qemu_version(self.binary) or "not installed"}

    def usable(self) -> tuple[bool, str]:
        version = qemu_version(self.binary)
        if version is None:
            return False, f"{self.binary} not found (apt-get install qemu-system-x86)"
        return True, f"{self.binary} {version} (-M microvm; KVM when usable, else TCG)"

    def nat_support(self) -> tuple[bool, str]:
        # User-mode networking runs inside QEMU's own process: no tap, no root.
        if has_user_networking(self.binary):
            return True, "QEMU user-mode networking (no tap, no root)"
        return False, f"{self.binary} was built without user-mode networking (libslirp)"

    async def launch(self, spec: MachineSpec, workdir: Path, stack: AsyncExitStack) -> LaunchedVM:
        # QEMU's ends, and ours: socketpairs, or for a detached VMM listening
        # sockets in the work directory and our connections to them (queued in
        # the backlog until QEMU accepts, so nothing it says is missed).
        theirs: dict[str, socket.socket] = {}
        ours: dict[str, socket.socket] = {}
        with short_paths(workdir) as short:
            for name in SOCKETS:
                if spec.detached:
                    theirs[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    stack.callback(theirs[name].close)
                    theirs[name].bind(str(socket_path(short, name)))
                    theirs[name].listen(4)
                    ours[name] = _connected(socket_path(short, name), stack)
                else:
                    ours[name], theirs[name] = socket.socketpair()
                    stack.callback(ours[name].close)
                    stack.callback(theirs[name].close)
        fds = QemuFds(*(theirs[n].fileno() for n in SOCKETS))
        argv = qemu_argv(spec, fds, binary=self.binary)
        log.debug("launching: %s", " ".join(argv))
        vm = QemuVM(transport=SocketTransport(ours["agent"].dup()), argv=argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=list(astuple(fds)),
                # System calls only (cgroup, user, parent-death signal): safe before exec.
                # A detached VMM is on its own: it must survive us (QEMU ignores
                # SIGPIPE, so its stderr pipe closing with us does not end it).
                preexec_fn=child_hook(
                    cgroup=spec.host.cgroup,
                    user=spec.host.run_as,
                    die_with_parent=not spec.detached,
                ),
                start_new_session=spec.detached,
                cwd=workdir,
            )
        except FileNotFoundError as exc:
            raise LaunchError(
                f"{self.binary} is not installed", argv=argv, hint="apt-get install qemu-system-x86"
            ) from exc
        except subprocess.SubprocessError as exc:
            # The child could not join its cgroup or switch users (checked before, so rare).
            raise LaunchError(
                f"QEMU could not be placed in {spec.host.cgroup or 'its cgroup'}"
                + (f" as user {spec.host.run_as.name}" if spec.host.run_as else ""),
                argv=argv,
                hint="stoker doctor shows what isolation this host gives",
            ) from exc
        vm.proc = proc
        stack.push_async_callback(vm.kill)
        if spec.detached:
            started = start_time(proc.pid)
            if started is not None:
                VmmRecord(proc.pid, started).write(workdir)
        # The child holds its own copies now; close ours so EOF propagates when it exits.
        for sock in theirs.values():
            sock.close()
        assert proc.stderr is not None
        vm.tasks.append(asyncio.get_running_loop().create_task(pump(proc.stderr, vm.vmm_log)))
        try:
            await self._attach(vm, ours, spec.name)
        except Exception as exc:
            # QEMU refused the command line: its stderr says why.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()
            raise LaunchError(
                "QEMU failed to start",
                argv=argv,
                returncode=proc.returncode,
                output=vm.vmm_log.text(),
            ) from exc
        return vm

    async def _attach(self, vm: QemuVM, ours: dict[str, socket.socket], name: str) -> None:
        """Follow the console and connect the monitor (within 30 s)."""
        con_reader, con_writer = await asyncio.open_connection(sock=ours["console"].dup())
        vm.keep.append(con_writer)
        vm.tasks.append(asyncio.get_running_loop().create_task(pump(con_reader, vm.console)))
        qmp = QMPClient(name)
        vm.qmp = qmp
        async with asyncio.timeout(30):
            await qmp.connect(ours["qmp"].dup())

    async def adopt(self, name: str, workdir: Path, stack: AsyncExitStack) -> LaunchedVM:
        """Take over the detached VMM of ``workdir``, which an earlier process started.

        Raises :class:`InfrastructureError` if it is not running any more.
        """
        record = VmmRecord.read(workdir)
        if not record.alive():
            raise InfrastructureError(f"the VMM of {workdir.name} (pid {record.pid}) is gone")
        proc = AdoptedProcess(record)
        stack.callback(proc.close)
        try:
            with short_paths(workdir) as short:
                ours = {n: _connected(socket_path(short, n), stack) for n in SOCKETS}
        except OSError as exc:
            raise InfrastructureError(f"cannot reach the VMM of {workdir.name}: {exc}") from None
        vm = QemuVM(transport=SocketTransport(ours["agent"].dup()), argv=[])
        vm.proc = proc
        stack.push_async_callback(vm.kill)
        try:
            await self._attach(vm, ours, name)
        except Exception as exc:
            raise InfrastructureError(f"cannot take over the VMM of {workdir.name}: {exc}") from exc
        return vm


def _connected(path: Path, stack: AsyncExitStack) -> socket.socket:
    """A Unix socket connected to ``path``, closed with ``stack``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stack.callback(sock.close)
    sock.connect(str(path))
    return sock


_VERSION_RE = re.compile(r"version (\d+\.\d+(?:\.\d+)?)")


def qemu_version(binary: str = QEMU_BINARY) -> str | None:
    """``7.2.22`` for an installed QEMU, else None.

    Asked on every VM start (usability, snapshot keys): the answer is cached
    per binary file, and a changed file (an upgrade) is asked again.
    """
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return _version_of(path, st.st_mtime_ns, st.st_size)


def has_user_networking(binary: str = QEMU_BINARY) -> bool:
    """Whether this QEMU was built with user-mode networking (libslirp)."""
    path = shutil.which(binary)
    if path is None:
        return False
    try:
        out = subprocess.run(
            [path, "-netdev", "help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "user" in out.split()


@functools.lru_cache(maxsize=8)
def _version_of(path: str, _mtime_ns: int, _size: int) -> str | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out)
    return match.group(1) if match else None


#: Used when the host does not say its clock rate; booting only needs *a* value.
FALLBACK_TSC_KHZ = 2_000_000


def host_tsc_khz(cpuinfo: str | None = None) -> int:
    """The host's TSC rate in kHz (what a TCG guest's TSC runs at), best effort.

    Without ``constant_tsc`` the figure is only approximate; a wrong value makes
    the guest clock run fast or slow, but the guest still boots (and the host
    sets its wall clock at start).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return FALLBACK_TSC_KHZ
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            with contextlib.suppress(ValueError):
                return round(float(value) * 1000)
    return FALLBACK_TSC_KHZ


def kvm_device_status(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Cheap check whether ``/dev/kvm`` is present and answers KVM_GET_API_VERSION."""
    import fcntl

    if not Path(path).exists():
        return False, f"{path} does not exist (no hardware virtualisation exposed to this host)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"cannot open {path}: {exc.strerror}"
    try:
        kvm_get_api_version = 0xAE00
        version = fcntl.ioctl(fd, kvm_get_api_version)
    except OSError as exc:
        return False, f"{path} does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"{path} reports KVM API version {version}, expected 12"
    return True, f"{path} is present (KVM API 12)"
