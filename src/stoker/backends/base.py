"""The one interface every VMM backend implements.

A backend turns a frozen :class:`MachineSpec` into a running VMM process and hands
back a :class:`LaunchedVM`: a transport to the guest agent, the guest console, and
an idempotent, verified :meth:`LaunchedVM.kill`.  Everything above it (boot
supervision, exec, file transfer, teardown ordering) lives in :mod:`stoker.vm`
and is written once for all backends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
from abc import ABC, abstractmethod
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from stoker.errors import InfrastructureError
from stoker.protocol.transport import Transport
from stoker.protocol.wire import NET_PROXY_PORT

if TYPE_CHECKING:
    from stoker.isolation.vmmuser import RunAs

Accel = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class HostPlacement:
    """Where the VMM process goes on the host (not part of its command line)."""

    #: The VM's cgroup v2 directory, joined before the VMM executes.
    cgroup: Path | None = None
    #: The unprivileged user the VMM runs as (None: this process's user).
    run_as: RunAs | None = None


@dataclass(frozen=True)
class MachineSpec:
    """Everything needed to start one microVM; resolved paths only, no defaults to look up."""

    name: str
    kernel: Path
    initrd: Path
    rootfs: Path
    accel: Accel
    rootfs_type: str = "erofs"
    python: str = "/usr/bin/python3"
    cpus: int = 2
    memory_mb: int = 1024
    #: The writable layer: a throw-away ext4 disk of this size (host file, sparse).
    scratch: Path | None = None
    #: A tar file attached read-only as a disk (serial ``stoker-seed``): bulk data for
    #: the guest at boot, much faster than the serial channel under emulation.
    seed: Path | None = None
    #: Extra kernel command-line parameters (already validated).
    cmdline_extra: tuple[str, ...] = ()
    #: Boot only far enough to prove the accelerator works (see init.sh ``stoker.probe``).
    probe: bool = False
    #: The guest TSC frequency to assume instead of calibrating it.  Under TCG the
    #: guest TSC runs at the host's rate, and calibrating it against the emulated
    #: PIT fails on a loaded host, leaving the guest without a clocksource (it hangs).
    tsc_khz: int | None = None
    #: Guest RAM backed by this file (snapshots).  A template maps it shared, so
    #: its memory ends up in the file; clones map it private (copy-on-write), so
    #: they share the template's pages until they write to them.
    memory_file: Path | None = None
    memory_shared: bool = False
    #: Start paused, waiting for a saved state to be loaded (snapshot restore).
    incoming: bool = False
    #: Format of the scratch disk file: ``"raw"``, or ``"qcow2"`` for a clone's
    #: copy-on-write overlay on the template's disk.
    scratch_format: str = "raw"
    #: The VMM outlives the process that starts it (``stoker serve``), which a
    #: restarted service re-attaches to (:mod:`stoker.backends.detached`).
    detached: bool = False
    #: A network device with unfiltered outbound access (``nat`` mode; QEMU's
    #: user-mode networking).  Off for ``none`` and ``egress``: those guests
    #: have no network device at all.
    nic: bool = False
    #: The VMM's cgroup and user (see :mod:`stoker.isolation`); backends with
    #: :attr:`Backend.host_limits` honour it.
    host: HostPlacement = HostPlacement()
    #: A NixOS system's stage-2 init (``TOPLEVEL/init``): the image is then its
    #: store, mounted on ``/nix/store``, and the scratch disk the root (init.sh).
    init: str | None = None

    def kernel_cmdline(self) -> str:
        """The guest kernel command line (a pure function of the spec)."""
        params = [
            "console=ttyS0",
            # Reboot at once on panic; with -no-reboot the VMM then exits and we notice.
            "panic=-1",
            "oops=panic",
            # Restart by triple fault: microvm has no keyboard controller, and the
            # default ACPI/KBD retry loop can spin for minutes under TCG.
            "reboot=t",
            "quiet",
            "loglevel=4",
            # No keyboard controller on microvm: skip probing for it.
            "i8042.noaux",
            "i8042.nokbd",
            "i8042.nopnp",
            "no_timer_check",
            # Crypto self-tests cost ~0.25 s under TCG on every boot of a throw-away guest.
            "cryptomgr.notests",
            # The same for the SP800-108 KDF, whose init is only its self-test:
            # ~60 ms of an emulated cold boot (bench/levers.py).
            "initcall_blacklist=crypto_kdf108_init",
            "rdinit=/init",
            "stoker.root=/dev/vda",
            f"stoker.rootfstype={self.rootfs_type}",
            f"stoker.python={self.python}",
        ]
        if self.scratch is not None:
            params.append("stoker.scratch=/dev/vdb")
        if self.tsc_khz:
            params += [f"tsc_early_khz={self.tsc_khz}", "tsc=reliable"]
        if self.nic:
            params.append("stoker.nic=1")
        if self.probe:
            params.append("stoker.probe=1")
        if self.init is not None:
            params.append(f"stoker.init={self.init}")
        params.extend(self.cmdline_extra)
        return " ".join(params)


class ConsoleBuffer:
    """The last ``limit`` bytes of a guest console (the guest may print forever)."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self._chunks.append(data)
        self._size += len(data)
        while self._size > self._limit and len(self._chunks) > 1:
            self._size -= len(self._chunks.popleft())
        if self._size > self._limit:
            only = self._chunks.pop()[-self._limit :]
            self._chunks.append(only)
            self._size = len(only)

    def text(self) -> str:
        return b"".join(self._chunks).decode("utf-8", "replace")

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines, for error messages."""
        text = self.text().replace("\r\n", "\n").replace("\r", "\n")
        return "\n".join(text.rstrip("\n").split("\n")[-lines:])


@dataclass
class LaunchedVM(ABC):
    """A VMM process the backend started; owned by exactly one :class:`stoker.vm.VM`."""

    transport: Transport
    console: ConsoleBuffer = field(default_factory=ConsoleBuffer)
    #: Extra diagnostics (e.g. VMM stderr), bounded.
    vmm_log: ConsoleBuffer = field(default_factory=lambda: ConsoleBuffer(16 * 1024))

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The VMM's process id while it runs."""

    @abstractmethod
    async def wait(self) -> int:
        """Wait until the VMM process exits and return its exit status."""

    @property
    @abstractmethod
    def returncode(self) -> int | None:
        """The VMM's exit status once it exited, else None."""

    async def diagnostics(self) -> str:
        """A short description of the VM's state for error messages (best effort)."""
        return ""

    @abstractmethod
    async def kill(self) -> None:
        """Stop the VMM for good: graceful first, then SIGKILL; idempotent; verified."""

    @property
    def seed_device(self) -> str | None:
        """The seed disk's guest device path when the VMM cannot give it a serial."""
        return None

    async def save_state(self, directory: Path, timeout: float) -> None:
        """Pause the guest and write its device state into ``directory`` (snapshots).

        Guest memory is written by the backend's own means (for QEMU: the
        :attr:`MachineSpec.memory_file` the template was started with).  The
        VM stays paused; the caller destroys it.
        """
        raise InfrastructureError(f"the {type(self).__name__} backend cannot save snapshots")

    async def load_state(self, directory: Path, timeout: float) -> None:
        """Load what :meth:`save_state` wrote and resume the guest (snapshot restore)."""
        raise InfrastructureError(f"the {type(self).__name__} backend cannot restore snapshots")


class Backend(ABC):
    """A virtual machine monitor stoker can drive."""

    name: str

    @abstractmethod
    async def launch(self, spec: MachineSpec, workdir: Path, stack: AsyncExitStack) -> LaunchedVM:
        """Start the VMM for ``spec``.

        Resources created on the way (sockets, processes) are registered on
        ``stack`` so that they are released in reverse order even when launching
        fails half-way.
        """

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Version and capability facts for ``stoker doctor``."""

    def nat_support(self) -> tuple[bool, str]:
        """Whether this backend can give a guest an unfiltered network device
        without root (``nat`` mode), and how, or why not."""
        return False, f"{self.name} would need a tap device and host NAT rules (root)"

    def usable(self) -> tuple[bool, str]:
        """Whether this host can run this VMM at all, and why not (cheap, no VM)."""
        return True, ""

    #: Guest loopback port of the egress proxy (``http_proxy`` in the guest).  0
    #: lets the agent pick one: for stand-in backends whose "guest" is the host.
    guest_proxy_port: int = NET_PROXY_PORT

    #: Whether this backend starts its VMM in :attr:`MachineSpec.host` (its cgroup
    #: and user); others are not given one.
    host_limits: bool = False

    #: Whether VMs of this backend can be saved and restored through
    #: :meth:`LaunchedVM.save_state` / :meth:`LaunchedVM.load_state`.
    snapshots: bool = False


# --- helpers every backend uses for its VMM process ----------------------------------------------


class ProcessLike(Protocol):
    """What the helpers below need of a VMM process: ours, or one we adopted."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, signum: int) -> None: ...


async def wait_for(proc: ProcessLike, seconds: float) -> None:
    """Wait up to ``seconds`` for ``proc`` to exit (no error if it does not)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await proc.wait()


async def pump(reader: asyncio.StreamReader, sink: ConsoleBuffer) -> None:
    """Copy a VMM's output stream into a bounded buffer until EOF."""
    while data := await reader.read(65536):
        sink.feed(data)


async def terminate(proc: ProcessLike, *, what: str, grace: float) -> None:
    """SIGTERM, then SIGKILL, each given time to work; reaps.  Verified: raises
    :class:`InfrastructureError` if the process survives SIGKILL.

    Backends first try their graceful stop (QMP ``quit``, a shutdown request)
    and call this for whatever is left.
    """
    for sig, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        await wait_for(proc, seconds)
    if proc.returncode is None:
        raise InfrastructureError(f"{what} pid {proc.pid} survived SIGKILL")
