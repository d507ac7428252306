"""A FAKE backend: "VMs" that are the real guest agent in a thread of this process.

For the scheduler's scale tests and benchmarks only (thousands of jobs in
seconds): it implements :class:`stoker.backends.base.Backend`, and
:meth:`FakeBackend.launch` serves the real :class:`stoker.agent.main.Agent`
on one end of a socketpair, so :class:`stoker.vm.VM`'s ``exec``, ``put`` and
``get`` run unchanged over the real protocol.  But commands run **on this
host, as this user**, with guest paths mapped below the VM's work directory:
there is no isolation at all.  That is why ``backend = "fake"`` in a service
configuration is refused unless ``STOKER_ALLOW_FAKE_BACKEND=1``.

:class:`FakeVM` differs from :class:`~stoker.vm.VM` only in ``start()``: it
skips what a fake does not use (kernel, image, accelerator probe, scratch
disk) and copies a seed tree over the channel instead of a seed disk.  Its
network policy is the one given (there is no image manifest): ``egress`` works
as in a VM, through the agent's loopback listener and the host's proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.agent.channel import Channel, spawn_thread
from stoker.agent.main import Agent
from stoker.backends.base import Backend, LaunchedVM, MachineSpec
from stoker.errors import UsageError
from stoker.lifecycle import VMState, require
from stoker.protocol import wire
from stoker.protocol.client import AgentClient
from stoker.protocol.transport import SocketTransport
from stoker.vm import VM
from stoker.vmfiles import OWNER_FILE

#: Exit status a fake VMM reports when :meth:`FakeLaunchedVM.crash` simulates a crash.
CRASH_STATUS = 134


class _FakeChannel(Channel):
    """The agent's channel, except that the host hanging up ends the agent.

    (A real guest waits for the host to come back; a thread must end.)  Once
    closed it writes nothing: threads of a killed command may still report,
    and their descriptor number may already belong to another fake VM.
    """

    closed = False

    def _write(self, frame: bytes) -> None:
        view = memoryview(frame)  # the lock is held (Channel.send)
        while view and not self.closed:
            try:
                n = os.write(self.fd, view)
            except OSError:
                return  # the host is gone
            view = view[n:]

    def close(self) -> None:
        """Write nothing more (call after shutting the socket down: a write may block)."""
        with self.lock:
            self.closed = True

    def read_frames(self) -> list[wire.Frame]:
        while True:
            try:
                data = os.read(self.fd, 256 * 1024)
            except OSError:
                data = b""
            if not data:
                raise EOFError("the host closed the channel")
            frames = self.decoder.feed(data)
            if frames:
                return frames


class FakeAgent(Agent):
    """The real agent with guest paths mapped below ``root`` and per-child reaping.

    The real agent is PID 1 and reaps with ``waitpid(-1)``; in a test process
    that would steal other children (QEMU, git), so each child is waited for
    by its own thread.
    """

    def __init__(self, chan: Channel, root: Path) -> None:
        super().__init__(chan, pid1=False)
        self.root = root

    def host_path(self, guest: str) -> str:
        """Where guest path ``guest`` lives on the host (never outside ``root``)."""
        normal = posixpath.normpath("/" + guest).lstrip("/")
        return str(self.root / normal) if normal else str(self.root)

    def on_exec(self, channel: int, msg: dict[str, Any]) -> None:
        argv = msg.get("argv")
        if isinstance(argv, list) and argv and isinstance(argv[0], str) and argv[0][:1] == "/":
            # A program named by its guest path (a runner's run.sh): the image's file, if any.
            mapped = self.host_path(argv[0])
            if Path(mapped).exists():
                msg = {**msg, "argv": [mapped, *argv[1:]]}
        super().on_exec(channel, {**msg, "cwd": self.host_path(msg.get("cwd") or "/")})

    def on_put(self, channel: int, msg: dict[str, Any]) -> None:
        super().on_put(channel, {**msg, "dest": self.host_path(str(msg["dest"]))})

    def on_get(self, channel: int, msg: dict[str, Any]) -> None:
        super().on_get(channel, {**msg, "cwd": self.host_path(str(msg.get("cwd") or "/"))})

    def reaper(self) -> None:
        watched: set[int] = set()
        with self.children_lock:
            while not self.stopping:
                for pid in list(self.children):
                    if pid not in watched:
                        watched.add(pid)
                        spawn_thread(self._wait_child, pid)
                self.have_children.wait(0.5)

    def _wait_child(self, pid: int) -> None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        with self.children_lock:
            entry = self.children.pop(pid, None)
        if entry is not None:
            entry[1] = status
            entry[0].set()

    def kill_children(self) -> None:
        """SIGKILL every command still running (their process groups)."""
        for pid in list(self.procs.values()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@dataclass
class FakeLaunchedVM(LaunchedVM):
    """A "VMM" that is an agent thread; killing it closes the channel and its commands."""

    agent: FakeAgent | None = None
    agent_sock: socket.socket | None = None
    thread: threading.Thread | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    status: int | None = None
    on_exit: Callable[[FakeLaunchedVM], None] | None = None
    spec: MachineSpec | None = None

    @property
    def pid(self) -> int | None:
        # The "VMM" runs inside this process.
        return os.getpid() if self.status is None else None

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.status is not None
        return self.status

    @property
    def returncode(self) -> int | None:
        return self.status

    async def kill(self) -> None:
        await self._stop(0)

    async def crash(self) -> None:
        """Simulate the VMM dying under the guest (for retry tests)."""
        await self._stop(CRASH_STATUS)

    async def _stop(self, status: int) -> None:
        if self.status is not None:
            return
        self.status = status
        if self.agent is not None:
            self.agent.stopping = True
            self.agent.kill_children()
        if self.agent_sock is not None:
            # shutdown(), not close(): the agent thread still reads from this descriptor.
            with contextlib.suppress(OSError):
                self.agent_sock.shutdown(socket.SHUT_RDWR)
        if self.agent is not None and isinstance(self.agent.chan, _FakeChannel):
            self.agent.chan.close()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 10)
            if self.thread.is_alive():
                raise RuntimeError(f"fake VM {self.spec.name if self.spec else '?'} did not stop")
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit(self)


LaunchHook = Callable[[MachineSpec], Awaitable[None] | None]
#: JSON object of guest path -> host path: the fake image's files (see ``image_files``).
IMAGE_FILES_ENV = "STOKER_FAKE_IMAGE_FILES"


class FakeBackend(Backend):
    """In-process fake VMs (see the module docstring); counts what runs at once.

    ``boot_seconds`` delays every launch (a stand-in for a boot), ``on_launch``
    runs first and may raise (say :class:`~stoker.errors.BootError`) to
    simulate an infrastructure failure.
    """

    name = "fake"
    #: The "guest" is this host: its proxy listener takes any free loopback port.
    guest_proxy_port = 0

    def __init__(
        self,
        *,
        boot_seconds: float = 0.0,
        on_launch: LaunchHook | None = None,
        image_files: Mapping[str, Path] | None = None,
    ) -> None:
        self.boot_seconds = boot_seconds
        self.on_launch = on_launch
        #: The fake "image": guest path -> host file or directory, linked into every VM's root
        #: (``stoker serve`` processes in tests get it from $STOKER_FAKE_IMAGE_FILES, JSON).
        if image_files is None:
            image_files = {
                k: Path(v) for k, v in json.loads(os.environ.get(IMAGE_FILES_ENV, "{}")).items()
            }
        self.image_files = dict(image_files)
        self.live: dict[str, FakeLaunchedVM] = {}
        self.launched = 0
        self.peak_cpus = 0
        self.peak_memory_mb = 0
        self.peak_vms = 0

    def describe(self) -> dict[str, str]:
        return {"binary": "none (in-process fake)", "version": "fake"}

    def _exited(self, vm: FakeLaunchedVM) -> None:
        if vm.spec is not None:
            self.live.pop(vm.spec.name, None)

    @property
    def used_cpus(self) -> int:
        return sum(v.spec.cpus for v in self.live.values() if v.spec is not None)

    @property
    def used_memory_mb(self) -> int:
        return sum(v.spec.memory_mb for v in self.live.values() if v.spec is not None)

    async def launch(self, spec: MachineSpec, workdir: Path, stack: AsyncExitStack) -> LaunchedVM:
        if self.on_launch is not None:
            result = self.on_launch(spec)
            if result is not None:
                await result
        if self.boot_seconds:
            await asyncio.sleep(self.boot_seconds)
        root = workdir / "root"
        root.mkdir()
        for guest, host in self.image_files.items():
            link = root / posixpath.normpath("/" + guest).lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(host)
        host_end, agent_end = socket.socketpair()
        stack.callback(agent_end.close)
        agent = FakeAgent(_FakeChannel(agent_end.fileno()), root)
        vm = FakeLaunchedVM(
            transport=SocketTransport(host_end),
            agent=agent,
            agent_sock=agent_end,
            spec=spec,
            on_exit=self._exited,
        )
        vm.thread = threading.Thread(
            target=_serve, args=(agent,), name=f"fake-{spec.name}", daemon=True
        )
        self.live[spec.name] = vm
        self.launched += 1
        self.peak_cpus = max(self.peak_cpus, self.used_cpus)
        self.peak_memory_mb = max(self.peak_memory_mb, self.used_memory_mb)
        self.peak_vms = max(self.peak_vms, len(self.live))
        vm.thread.start()
        stack.push_async_callback(vm.kill)
        return vm


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (what makes ``pid:start`` unique)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]


def _serve(agent: FakeAgent) -> None:
    try:
        agent.serve()
    except (EOFError, OSError):
        pass  # the host hung up: the "VM" is off
    finally:
        agent.stopping = True
        agent.kill_children()
        with agent.children_lock:
            agent.have_children.notify_all()


class FakeVM(VM):
    """A :class:`~stoker.vm.VM` on a :class:`FakeBackend` (only ``start()`` differs)."""

    def _make_workdir(self) -> Path:
        # Unlike VM's, this does not sweep the runtime directory: with hundreds of
        # fakes starting at once a sweep could catch another's owner file half-written.
        runtime = self.dirs.ensure_runtime()
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=runtime))
        owner = workdir / f"{OWNER_FILE}.tmp"
        owner.write_text(f"{os.getpid()}:{_start_time(os.getpid())}")
        owner.rename(workdir / OWNER_FILE)
        return workdir

    @require(VMState.CREATED)
    async def start(self) -> None:
        """Launch the fake and wait for its agent; the seed tree is copied over the channel."""
        self.state = VMState.BOOTING
        t0 = time.monotonic()
        try:
            self.accel = "fake"
            # In the loop, not a thread: a cancelled start must not leak it (see VM.start).
            self.workdir = self._make_workdir()
            self._stack.callback(shutil.rmtree, self.workdir)
            spec = MachineSpec(
                name=self.name,
                kernel=Path("/dev/null"),
                initrd=Path("/dev/null"),
                rootfs=Path("/dev/null"),
                accel="tcg",
                cpus=self.cpus,
                memory_mb=self.memory_mb,
            )
            self.timings.prepare = time.monotonic() - t0
            t1 = time.monotonic()
            await self._launch(spec)
            self.timings.launch = time.monotonic() - t1
            assert self._vmm is not None
            reader, writer = await self._guarded(self._vmm.transport.connect(self.boot_timeout))
            self._client = AgentClient(reader, writer, limits=self.limits, name=self.name)
            self._stack.push_async_callback(self._client.aclose)
            async with asyncio.timeout(self.boot_timeout):
                await self._guarded(self._client.wait_ready(self.boot_timeout))
            await self._guarded(self._client.init(hostname=self.hostname))
            self.timings.agent_ready = time.monotonic() - t1
            # egress works as in a VM (the agent's listener is on this host's loopback);
            # nat would need a network device the fake does not have.
            if self.network.mode == "nat":
                _, why = self.backend.nat_support()
                raise UsageError(f"network mode 'nat' is not available: {why}")
            await self._start_network()
            self.state = VMState.READY
            if self._seed is not None:
                t2 = time.monotonic()
                self.seed_report = await self.put(self._seed[0], self._seed[1])
                self.timings.seed = time.monotonic() - t2
        except BaseException:
            await self.destroy()
            raise

    @property
    def fake(self) -> FakeLaunchedVM | None:
        """The fake VMM (tests crash it with :meth:`FakeLaunchedVM.crash`)."""
        return self._vmm if isinstance(self._vmm, FakeLaunchedVM) else None
