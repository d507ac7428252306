"""One throw-away microVM, as an object with explicit states.

::

    CREATED --start()--> BOOTING --agent ready--> READY --destroy()--> STOPPING --> DEAD
                              \\__________ any failure ___________________/

``exec``, ``put`` and ``get`` are written once here on top of the backend
interface and the agent protocol.  Every one of them is raced against the VMM
process: if QEMU dies or the guest kernel panics mid-operation, the caller gets a
:class:`~stoker.errors.VMError` carrying the console tail, never a hang.

Typical use::

    async with stoker.VM(image="default", cpus=2, memory="1G") as vm:
        await vm.put("./project", "/work")
        result = await vm.exec(["make", "test"], cwd="/work")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from stoker import vmfiles, vmsnap
from stoker._lazy import preload
from stoker.archive import ExtractLimits, ExtractReport, PackReport, pack_tree, safe_extract
from stoker.artifacts import DEFAULT_IMAGE, BootArtifacts, nixos_boot, resolve_artifacts
from stoker.backends.accel import AccelRequest, resolve_accel
from stoker.backends.base import Backend, LaunchedVM, MachineSpec
from stoker.backends.qemu import SEED_SERIAL, QemuBackend, host_tsc_khz
from stoker.boottimes import record_cold_boot
from stoker.errors import (
    BootError,
    GuestPanic,
    GuestProtocolError,
    JobFailed,
    JobKernelPanic,
    LaunchError,
    StokerError,
    UsageError,
    VMError,
    VMMCrashed,
)
from stoker.isolation import Isolation, VMCgroup, place_vmm
from stoker.lifecycle import Timings, VMState, require
from stoker.outcomes import panic_message, signal_name
from stoker.paths import GUEST_PATH, Dirs
from stoker.protocol.common import ChannelClosed, ChannelLimits, ExecResult, JobLimits, OutputSink
from stoker.snapshots import (
    MEMORY_FILE,
    SCRATCH_FILE,
    Snapshot,
    SnapshotKey,
    SnapshotStore,
    check_restorable,
    new_machine_id,
)
from stoker.units import parse_size_mb

if TYPE_CHECKING:
    # Loaded when used: the network modules import pydantic (about 60 ms), which a
    # VM without a network never needs; the agent client loads while the VMM starts.
    from stoker.net.policy import NetworkPolicy
    from stoker.net.proxy import ConnectionRecord, EgressProxy, Resolver
    from stoker.protocol.client import AgentClient

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_BOOT_TIMEOUT = 120.0
#: ``never``: boot; ``reuse``: restore a matching snapshot if one exists, else boot;
#: ``auto``: as reuse, and a VM that booted says which snapshot is missing
#: (:attr:`VM.snapshot_missing`) so its owner can have it made after the run;
#: ``create``: make the snapshot first when there is none, then restore.
SnapshotMode = Literal["never", "reuse", "auto", "create"]
#: VM shape when neither the caller nor the image says otherwise.
DEFAULT_CPUS = 2
DEFAULT_MEMORY_MB = 1024
DEFAULT_DISK_MB = 4096
MAX_CPUS = 64


class VM:
    """A throw-away microVM.  Use as ``async with VM(...) as vm``."""

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        *,
        cpus: int | None = None,
        memory: str | int | None = None,
        disk: str | int | None = None,
        accel: AccelRequest = "auto",
        backend: Backend | None = None,
        dirs: Dirs | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        limits: ChannelLimits | None = None,
        hostname: str | None = None,
        on_progress: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        agent_files: Mapping[str, bytes] | None = None,
        seed: tuple[str | os.PathLike[str], str] | None = None,
        seed_timeout: float = 900.0,
        snapshot: SnapshotMode = "never",
        template_dir: Path | None = None,
        network: NetworkPolicy | None = None,
        job: str | None = None,
        on_connection: Callable[[ConnectionRecord], None] | None = None,
        resolver: Resolver | None = None,
        detached: bool = False,
        orphan_timeout: float | None = None,
        job_limits: JobLimits | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        # None: the image's [defaults] decide (see _apply_image_defaults).
        if cpus is not None and not 1 <= cpus <= MAX_CPUS:
            raise UsageError(f"cpus must be between 1 and {MAX_CPUS}, not {cpus}")
        self._requested = (
            cpus,
            None if memory is None else parse_size_mb(memory, what="memory", minimum=128),
            None if disk is None else parse_size_mb(disk, what="disk", minimum=64),
        )
        self.cpus, self.memory_mb, self.disk_mb = (
            cpus or DEFAULT_CPUS,
            self._requested[1] or DEFAULT_MEMORY_MB,
            self._requested[2] or DEFAULT_DISK_MB,
        )
        #: Environment of every command, from the image (``env`` of its spec).
        self.image_env: dict[str, str] = {}
        #: Limits of every command's processes in the guest; what the caller leaves
        #: None the image's [defaults] decide, then stoker's defaults.
        self.job_limits = job_limits or JobLimits()
        #: The network policy asked for; None: the image's (its spec's ``[network]``).
        self._network_request = network
        # The policy in force once the VM started (None: none, made when asked for).
        self._network: NetworkPolicy | None = network
        #: The job this VM serves (for connection records), if any.
        self.job = job
        self._on_connection = on_connection
        #: How the proxy resolves names (None: the host's resolver).
        self._resolver = resolver
        #: The egress proxy (``egress`` mode), whose records and counters say
        #: what the guest connected to and what was denied.
        self.proxy: EgressProxy | None = None
        #: Environment pointing the guest's tools at its proxy (``egress`` mode).
        self.network_env: dict[str, str] = {}
        if accel not in ("auto", "kvm", "tcg"):
            raise UsageError(f"accel must be auto, kvm or tcg, not {accel!r}")
        self.image = image
        self.accel_request: AccelRequest = accel
        self.backend = backend or QemuBackend()
        self.dirs = dirs or Dirs.from_env()
        self.boot_timeout = boot_timeout
        self.limits = limits or ChannelLimits()
        self.id = secrets.token_hex(4)
        self.name = f"stoker-{self.id}"
        self.hostname = hostname or self.name
        self.state = VMState.CREATED
        self.timings = Timings()
        self.accel: str | None = None
        #: The kernel booted (package, and release where the package does not name it).
        self.kernel: str | None = None
        self.workdir: Path | None = None
        self._on_progress = on_progress
        self._on_warning = on_warning
        self._agent_files = agent_files
        if seed is not None and not Path(seed[0]).exists():
            raise UsageError(f"{seed[0]} does not exist")
        self._seed = (Path(seed[0]), seed[1]) if seed is not None else None
        # A clone whose project does not fit the template's seed slot gets it over the channel.
        self._seed_by_channel = False
        self._seed_timeout = seed_timeout
        if snapshot not in ("never", "reuse", "auto", "create"):
            raise UsageError(f"snapshot must be never, reuse, auto or create, not {snapshot!r}")
        #: ``never``: always boot; ``auto``: restore when a matching snapshot
        #: exists; ``create``: make the snapshot first if there is none.
        self.snapshot_mode: SnapshotMode = snapshot
        # Set only on the template VM a snapshot is made from (see vmsnap._make_template).
        self._template_dir = template_dir
        #: The snapshot this VM was restored from (None: it booted).
        self.restored_from: Snapshot | None = None
        #: In ``auto`` mode, the snapshot this VM could have started from but that
        #: does not exist yet (None: restored, or snapshots do not apply).
        self.snapshot_missing: SnapshotKey | None = None
        #: What was copied in through the seed disk (set once the VM is ready).
        self.seed_report: PackReport | None = None
        #: The VMM outlives this process (``stoker serve``: see :mod:`stoker.vmadopt`);
        #: with no host for ``orphan_timeout`` seconds the guest ends itself.
        self.detached, self.orphan_timeout = detached, orphan_timeout
        #: Host-side limits and VMM user (default: ``STOKER_CGROUPS``, ``auto``).
        self.isolation = isolation or Isolation.from_env()
        #: The VM's cgroup while it runs (None: none on this host, or turned off).
        self.cgroup: VMCgroup | None = None
        self._stack = AsyncExitStack()
        self._vmm: LaunchedVM | None = None
        self._client: AgentClient | None = None
        self._vmm_exit: asyncio.Task[int] | None = None
        self._log = log.getChild(self.name)

    @property
    def network(self) -> NetworkPolicy:
        """The network policy in force (the image's, once the VM started)."""
        if self._network is None:
            from stoker.net.policy import NetworkPolicy

            self._network = NetworkPolicy()
        return self._network

    @property
    def network_mode(self) -> str:
        """``none``, ``egress`` or ``nat``: :attr:`network`'s mode, without loading it."""
        return "none" if self._network is None else self._network.mode

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> VM:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    @property
    def console_tail(self) -> str:
        """The last lines the guest printed on its serial console."""
        return self._vmm.console.tail() if self._vmm is not None else ""

    @property
    def vmm_pid(self) -> int | None:
        return self._vmm.pid if self._vmm is not None else None

    @require(VMState.CREATED)
    async def start(self) -> None:
        """Boot (or restore) the VM and wait for its agent; on failure everything is torn down."""
        self.state = VMState.BOOTING
        t0 = time.monotonic()
        try:
            usable, why = self.backend.usable()
            if not usable:
                raise LaunchError(f"the {self.backend.name} backend cannot run here: {why}")
            artifacts = await asyncio.to_thread(
                resolve_artifacts,
                self.dirs,
                self.image,
                progress=self._on_progress,
                agent=self._agent_files,
            )
            self._apply_image_defaults(artifacts)
            kernel = artifacts.kernel
            self.kernel = (
                kernel.package
                if kernel.release in kernel.package
                else f"{kernel.package} {kernel.release}"
            )
            # Not in a thread: a cancellation while the thread ran would leave a
            # directory nobody registered for removal (the service cancels
            # starting VMs on shutdown).  It is a mkdtemp and a tiny file.
            self.workdir = self._make_workdir()
            # Not ignore_errors: a work directory we cannot remove is a leak to report.
            self._stack.callback(shutil.rmtree, self.workdir)
            accel, warning = await resolve_accel(
                self.accel_request,
                dirs=self.dirs,
                backend=self.backend,
                kernel=artifacts.kernel.vmlinuz,
                initrd=artifacts.initrd,
                workdir=self.workdir,
            )
            if warning and self._on_warning:
                self._on_warning(warning)
            self.accel = accel
            snapshot = await vmsnap.find_snapshot(self, artifacts, accel)
            if snapshot is not None:
                await self._restore(artifacts, accel, snapshot, t0)
            else:
                await self._boot(artifacts, accel, t0)
            await self._start_network()
            if self.detached:  # journaled commands, and the orphan timer
                await self._guarded(self._agent().enable_journal(self.orphan_timeout))
            self.state = VMState.READY
            self._log.debug("ready in %.2fs (accel=%s)", self.timings.agent_ready, accel)
            if snapshot is not None and self._seed is not None and self._seed_by_channel:
                # Too big for the template's seed slot: copy over the agent channel.
                t2 = time.monotonic()
                self.seed_report = await self.put(self._seed[0], self._seed[1])
                self.timings.seed = time.monotonic() - t2
        except BaseException:
            await self.destroy()
            raise

    async def _boot(self, artifacts: BootArtifacts, accel: str, t0: float) -> None:
        assert self.workdir is not None
        template = self._template_dir
        scratch = (template / SCRATCH_FILE) if template else self.workdir / "scratch.img"
        await vmfiles.make_scratch_disk(scratch, self.disk_mb)
        seed_tar = None
        if self._seed is not None:
            seed_tar = self.workdir / "seed.tar"
            self.seed_report = await asyncio.to_thread(
                vmfiles.pack_to_file, self._seed[0], seed_tar
            )
        elif template is not None:
            # An empty seed slot: each clone puts its own project there (see _restore).
            seed_tar = await asyncio.to_thread(vmfiles.seed_slot, self.workdir / "seed-slot", None)
        spec = self._machine_spec(artifacts, accel, scratch, seed_tar)
        if template is not None:
            # A template runs its guest in a shared file: that file becomes the snapshot's RAM.
            spec = replace(spec, memory_file=template / MEMORY_FILE, memory_shared=True)
        self.timings.prepare = time.monotonic() - t0
        t1 = time.monotonic()
        await self._launch(spec)
        self.timings.launch = time.monotonic() - t1
        assert self._vmm is not None
        self._client = await self._connect_agent()
        try:
            await self._guarded(self._client.wait_ready(self.boot_timeout))
        except TimeoutError:
            state = await self._vmm.diagnostics()
            raise BootError(
                f"the guest agent did not come up within {self.boot_timeout:.0f}s"
                + (f" ({state})" if state else ""),
                console=self.console_tail,
            ) from None
        await self._guarded(self._client.init(hostname=self.hostname))
        self.timings.agent_ready = time.monotonic() - t1
        await asyncio.to_thread(
            record_cold_boot,
            self.dirs,
            backend=self.backend.name,
            package=artifacts.kernel.package,
            accel=accel,
            seconds=self.timings.agent_ready,
        )
        if self._seed is not None:
            await self._unpack_seed()

    async def _restore(
        self, artifacts: BootArtifacts, accel: str, snapshot: Snapshot, t0: float
    ) -> None:
        assert self.workdir is not None
        check_restorable(snapshot)
        store = SnapshotStore(self.dirs)
        store.mark_used(snapshot)
        overlay = self.workdir / "scratch.qcow2"
        await vmfiles.make_overlay(overlay, snapshot.scratch)
        # The template has a seed disk of SEED_SLOT_BYTES; this clone's project goes in
        # it, padded to the slot's size, and is read by the guest as after a boot.
        seed = None
        if self._seed is not None:
            seed = self.workdir / "seed.tar"
            self.seed_report = await asyncio.to_thread(vmfiles.pack_to_file, self._seed[0], seed)
        slot = await asyncio.to_thread(vmfiles.seed_slot, self.workdir / "seed-slot", seed)
        self._seed_by_channel = seed is not None and slot != seed
        spec = replace(
            self._machine_spec(artifacts, accel, overlay, slot),
            scratch_format="qcow2",
            memory_file=snapshot.memory,
            memory_shared=False,
            incoming=True,
        )
        self.timings.prepare = time.monotonic() - t0
        t1 = time.monotonic()
        await self._launch(spec)
        self.timings.launch = time.monotonic() - t1
        assert self._vmm is not None
        await self._guarded(self._vmm.load_state(snapshot.path, self.boot_timeout))
        self._client = await self._connect_agent()
        # The guest announced itself to the template long ago; what makes this
        # clone itself is a new identity, a reseeded RNG and the current time.
        try:
            async with asyncio.timeout(self.boot_timeout):
                await self._guarded(
                    self._client.init(
                        hostname=self.hostname,
                        entropy=os.urandom(64),
                        machine_id=new_machine_id(),
                    )
                )
        except TimeoutError:
            raise BootError(
                f"the restored guest did not answer within {self.boot_timeout:.0f}s",
                console=self.console_tail,
            ) from None
        self.timings.agent_ready = time.monotonic() - t1
        self.restored_from = snapshot
        if self._seed is not None and not self._seed_by_channel:
            await self._unpack_seed()

    async def _unpack_seed(self) -> None:
        """Have the guest unpack the project from its seed disk into place."""
        assert self._seed is not None and self._client is not None and self._vmm is not None
        t = time.monotonic()
        await self._guarded(
            self._client.unpack(
                SEED_SERIAL,
                self._seed[1],
                self._seed_timeout,
                device=self._vmm.seed_device,
            )
        )
        self.timings.seed = time.monotonic() - t

    async def _start_network(self) -> None:
        """Give the guest the network its policy allows (after boot or restore)."""
        if self.network_mode == "none":
            return
        from stoker.net.wiring import start_network

        assert self._client is not None
        started = await start_network(
            self.network,
            self._client,
            stack=self._stack,
            guarded=self._guarded,
            proxy_port=self.backend.guest_proxy_port,
            vm=self.name,
            job=self.job,
            resolver=self._resolver,
            on_record=self._connection_ended,
        )
        self.proxy, self.network_env = started.proxy, started.env

    def _connection_ended(self, record: ConnectionRecord) -> None:
        if self._on_connection is not None:
            self._on_connection(record)

    async def _launch(self, spec: MachineSpec) -> None:
        assert self.workdir is not None
        # Needed once the VMM runs; loaded while it starts (~15 ms with msgspec).
        preload("stoker.protocol.client")
        if self.backend.host_limits:  # its cgroup and user (stoker.isolation)
            self.cgroup, spec = await place_vmm(
                self.isolation, self._stack, spec, self.workdir, on_warning=self._on_warning
            )
        self._vmm = await self.backend.launch(spec, self.workdir, self._stack)
        self._vmm_exit = asyncio.get_running_loop().create_task(self._vmm.wait())
        self._stack.push_async_callback(self._cancel_exit_watch)

    async def _connect_agent(self) -> AgentClient:
        from stoker.protocol.client import AgentClient  # preloaded by _launch

        assert self._vmm is not None
        reader, writer = await self._guarded(self._vmm.transport.connect(self.boot_timeout))
        client = AgentClient(reader, writer, limits=self.limits, name=self.name)
        self._stack.push_async_callback(client.aclose)
        return client

    def _apply_image_defaults(self, artifacts: BootArtifacts) -> None:
        """Fill in what the caller left unset from the image's defaults and env."""
        manifest = artifacts.image.manifest
        defaults = manifest.get("defaults")
        defaults = defaults if isinstance(defaults, dict) else {}

        def pick(requested: int | None, key: str, fallback: int, low: int, high: int) -> int:
            if requested is not None:
                return requested
            value = defaults.get(key)
            # The manifest is ours, but a hand-edited one must not crash the VM.
            if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
                return value
            return fallback

        cpus, memory, disk = self._requested
        self.cpus = pick(cpus, "cpus", DEFAULT_CPUS, 1, MAX_CPUS)
        self.memory_mb = pick(memory, "memory", DEFAULT_MEMORY_MB, 128, 1 << 24)
        self.disk_mb = pick(disk, "disk", DEFAULT_DISK_MB, 64, 1 << 24)
        self.job_limits = self.job_limits.or_image_defaults(defaults)
        if self._network_request is None and manifest.get("network") is not None:
            from stoker.net.policy import image_network_policy

            self._network = image_network_policy(manifest)
        env = manifest.get("env")
        if isinstance(env, dict):
            self.image_env = {
                k: v for k, v in env.items() if isinstance(k, str) and isinstance(v, str)
            }

    def _make_workdir(self) -> Path:
        return vmfiles.make_workdir(self.dirs.ensure_runtime(), self.name)

    def _machine_spec(
        self, artifacts: BootArtifacts, accel: str, scratch: Path, seed: Path | None
    ) -> MachineSpec:
        init, params = nixos_boot(artifacts.image)
        nat = self.network_mode == "nat"
        if nat:
            offered, why = self.backend.nat_support()
            if not offered:
                raise UsageError(
                    f"network mode 'nat' is not available: {why}",
                    hint="use --vmm qemu, or --network egress with --allow entries",
                )
        return MachineSpec(
            nic=nat,
            name=self.name,
            kernel=artifacts.kernel.vmlinuz,
            initrd=artifacts.initrd,
            rootfs=artifacts.image.rootfs,
            rootfs_type=artifacts.image.fstype,
            python=artifacts.image.python,
            accel="kvm" if accel == "kvm" else "tcg",
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            scratch=scratch,
            seed=seed,
            tsc_khz=host_tsc_khz() if accel == "tcg" else None,
            detached=self.detached,
            init=init,
            cmdline_extra=params,
        )

    async def destroy(self) -> None:
        """Kill the VMM and release every resource (idempotent; safe in any state)."""
        if self.state in (VMState.STOPPING, VMState.DEAD):
            return
        self.state = VMState.STOPPING
        t0 = time.monotonic()
        try:
            # Teardown must finish even if our caller is being cancelled (Ctrl-C).
            await asyncio.shield(self._stack.aclose())
        finally:
            self.timings.teardown = time.monotonic() - t0
            self.state = VMState.DEAD

    async def _cancel_exit_watch(self) -> None:
        if self._vmm_exit is not None and not self._vmm_exit.done():
            self._vmm_exit.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._vmm_exit

    # ------------------------------------------------------------------ VMM supervision

    async def _guarded(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless the VMM dies first; then raise a classified VMError."""
        assert self._vmm_exit is not None
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait(
                {task, self._vmm_exit}, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        if task in done:
            try:
                return task.result()
            except (ChannelClosed, GuestProtocolError) as exc:
                # The channel broke: if the VMM is going down, report that instead.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await asyncio.shield(self._vmm_exit)
                if self._vmm_exit.done():
                    raise self._vmm_died() from exc
                raise
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise self._vmm_died()

    def _vmm_died(self) -> VMError:
        assert self._vmm is not None
        status = self._vmm.returncode
        console = self.console_tail
        full = self._vmm.console.text()
        if self.cgroup is not None and (stopped := self.cgroup.limit_error(console)):
            return stopped
        if "Kernel panic" in full:
            # Lead with the panic reason; the tail is mostly a stack trace.
            panic = full[full.rindex("Kernel panic") :]
            reason = panic.split("\n", 1)[0].strip()
            # Show the panic and its trace rather than whatever scrolled last.
            trace = "\n".join(panic.replace("\r", "").split("\n")[:40])
            return GuestPanic(f"the guest kernel panicked: {reason}", console=trace, reason=reason)
        if self._vmm.vmm_log.total:
            console += "\n" + self._vmm.vmm_log.tail(5)
        if self.state is VMState.BOOTING:
            return BootError(
                f"the VM stopped during boot (VMM exit status {status})", console=console
            )
        how = (
            f"killed by signal {signal_name(-status)}"
            if status is not None and status < 0
            else f"status {status}"
        )
        return VMMCrashed(f"the VMM exited unexpectedly ({how})", console=console)

    def _agent(self) -> AgentClient:
        assert self._client is not None
        return self._client

    def abandon(self) -> None:
        """Let go of a detached VM without stopping it: the next process adopts it."""
        if self._client is not None:
            self._client.abort()
        self._stack.pop_all()  # neither the VMM nor its work directory goes
        if self._vmm_exit is not None:
            self._vmm_exit.cancel()
        self.state = VMState.DEAD

    @property
    def agent(self) -> AgentClient:
        """The agent channel, for what :meth:`exec` does not cover (the journal, acks)."""
        return self._agent()

    # ------------------------------------------------------------------ operations

    @require(VMState.READY)
    async def exec(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        uid: int | None = None,
        gid: int | None = None,
        stdin: bytes | AsyncIterator[bytes] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        capture: bool = True,
        max_capture: int | None = None,
        timeout: float | None = None,
        check: bool = False,
        on_started: Callable[[int], None] | None = None,
        on_frame: Callable[[int, int], None] | None = None,
        journal: bool = False,
    ) -> ExecResult:
        """Run a command in the guest.

        ``env`` is the complete environment (a sensible ``PATH``, ``HOME`` and
        ``LANG`` are added where missing).  With ``check=True`` a command that
        does not exit 0 raises :class:`~stoker.errors.JobFailed`.  The command
        runs within :attr:`job_limits`; the result's ``evidence`` says what it
        met (:func:`stoker.outcomes.exec_cause` names the cause).  A guest
        kernel panic while it runs raises :class:`~stoker.errors.JobKernelPanic`
        (the command's doing); a VMM that dies, :class:`~stoker.errors.VMMCrashed`.
        ``journal``, ``on_started``, ``on_frame``: see :meth:`AgentClient.exec`.
        """
        full_env = {**default_guest_env(), **self.image_env, **self.network_env, **(env or {})}
        result = await self._command(
            self._agent().exec(
                argv,
                env=full_env,
                cwd=cwd,
                uid=uid,
                gid=gid,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                capture=capture,
                max_capture=max_capture,
                timeout=timeout,
                limits=self.job_limits.request(self.memory_mb),
                on_started=on_started,
                on_frame=on_frame,
                journal=journal,
            )
        )
        if check and not result.ok:
            how = (
                f"exit status {result.exit_code}"
                if result.exit_code is not None
                else f"signal {result.signal}"
            )
            raise JobFailed(
                f"{argv[0]} failed with {how}", exit_code=result.exit_code, signal=result.signal
            )
        return result

    @require(VMState.READY)
    async def follow(
        self,
        channel: int,
        *,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        timeout: float | None = None,
        on_frame: Callable[[int, int], None] | None = None,
    ) -> ExecResult:
        """Follow to its end a command an earlier process started on ``channel`` of an
        adopted VM (:mod:`stoker.vmadopt`); as :meth:`exec` otherwise."""
        return await self._command(
            self._agent().attach_exec(
                channel, stdout=stdout, stderr=stderr, timeout=timeout, on_frame=on_frame
            )
        )

    async def _command(self, running: Awaitable[ExecResult]) -> ExecResult:
        """A command's result; a guest kernel panic meanwhile is the command's doing."""
        try:
            return await self._guarded(running)
        except GuestPanic as exc:
            raise JobKernelPanic(panic_message(exc.reason), console=exc.console) from exc

    @require(VMState.READY)
    async def put(self, src: str | os.PathLike[str], dest: str) -> PackReport:
        """Copy a host file or tree to ``dest`` in the guest (modes, links, mtimes kept)."""
        source = Path(src)
        if not source.exists():
            raise UsageError(f"{source} does not exist")
        reports: list[PackReport] = []

        def produce(out: Any) -> None:
            reports.append(pack_tree(source, out))

        await self._guarded(self._agent().put(dest, produce))
        return reports[0]

    @require(VMState.READY)
    async def get(
        self,
        paths: str | Iterable[str],
        dest: str | os.PathLike[str],
        *,
        cwd: str = "/",
        limits: ExtractLimits | None = None,
    ) -> tuple[ExtractReport, list[str]]:
        """Copy guest files matching ``paths`` (globs relative to ``cwd``) into ``dest``.

        The guest is untrusted: the tar stream it sends is extracted with
        :func:`stoker.archive.safe_extract`, which refuses anything that would
        land outside ``dest``.  Returns the report and the patterns that matched nothing.
        """
        target = Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        patterns = [paths] if isinstance(paths, str) else list(paths)
        bounds = limits or ExtractLimits()
        return await self._guarded(
            self._agent().get(patterns, cwd, lambda stream: safe_extract(stream, target, bounds))
        )


def default_guest_env() -> dict[str, str]:
    """The environment every command starts from."""
    return {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


__all__ = ["VM", "ExecResult", "StokerError", "Timings", "VMState"]
