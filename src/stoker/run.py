"""``stoker run``: one project, one command, one fresh microVM.

Copy the project in, run the command with its output streamed live, copy the
requested artifacts out (also when the command failed: test reports matter most
then), destroy the VM.  :func:`run_job` is the library function; the CLI is a
thin layer over it.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.archive import ExtractLimits
from stoker.backends import VMMS, get_backend
from stoker.backends.accel import AccelRequest
from stoker.errors import CommandTimeout, JobKernelPanic, UsageError, VMMCrashed
from stoker.isolation import Isolation
from stoker.outcomes import Cause, describe, exec_cause, timeout_message, vmm_crash_message
from stoker.paths import Dirs
from stoker.protocol.common import MAX_PIDS, ExecResult, JobLimits, OutputSink
from stoker.snapshots import SnapshotKey
from stoker.units import parse_size_mb
from stoker.vm import VM, SnapshotMode

if TYPE_CHECKING:
    from stoker.net.policy import NetworkPolicy

GUEST_WORK_ROOT = "/work"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class RunRequest:
    """What ``stoker run`` was asked to do (validated by :meth:`validate`)."""

    src: Path
    argv: tuple[str, ...]
    image: str = "default"
    #: None: the image's defaults (its spec's ``[defaults]``), else 2 / 1G / 4G.
    cpus: int | None = None
    memory: str | None = None
    disk: str | None = None
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    artifacts: tuple[str, ...] = ()
    out: Path = Path("stoker-out")
    accel: AccelRequest = "auto"
    max_artifact_bytes: int = 1 << 30
    #: ``auto``: restore from a matching snapshot if one exists, else boot (and
    #: the summary names the missing snapshot for a maker); ``reuse``: the same,
    #: never made; ``create``: make the snapshot first if needed; ``never``: boot.
    snapshot: SnapshotMode = "auto"
    #: The VMM: ``qemu``, ``firecracker`` or ``cloud-hypervisor``.
    vmm: str = "qemu"
    #: The network policy; None: the image's (its spec's ``[network]``, else none).
    network: NetworkPolicy | None = None
    #: Limits of the command's processes inside the guest; None: the image's
    #: (``job_pids_limit``, ``job_memory_limit``), else stoker's defaults.
    pids_limit: int | None = None
    memory_limit: str | None = None
    #: Host-side limits (a cgroup per VM): ``auto``, ``required`` or ``off``.
    cgroups: str = "auto"

    def validate(self) -> None:
        if not self.argv:
            raise UsageError("no command given", hint="usage: stoker run SRC -- CMD [ARGS...]")
        if not self.src.exists():
            raise UsageError(f"source directory {self.src} does not exist")
        if not self.src.is_dir():
            raise UsageError(f"source {self.src} is not a directory")
        for key in self.env:
            if not _ENV_NAME.match(key):
                raise UsageError(f"invalid environment variable name {key!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"timeout must be positive, got {self.timeout}")
        for pattern in self.artifacts:
            if pattern.startswith("/") or ".." in Path(pattern).parts:
                raise UsageError(
                    f"artifact pattern {pattern!r} must be relative to the project "
                    "and stay inside it"
                )
        if self.vmm not in VMMS:
            raise UsageError(f"unknown VMM {self.vmm!r}", hint=f"use one of {', '.join(VMMS)}")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a directory")
        self.job_limits()

    def job_limits(self) -> JobLimits:
        """The limits asked for (raises :class:`UsageError` for bad values)."""
        if self.pids_limit is not None and not 1 <= self.pids_limit <= MAX_PIDS:
            raise UsageError(
                f"--pids-limit must be between 1 and {MAX_PIDS}, got {self.pids_limit}"
            )
        memory = None
        if self.memory_limit is not None:
            memory = parse_size_mb(self.memory_limit, what="--memory-limit", minimum=16)
        return JobLimits(memory_mb=memory, pids=self.pids_limit)

    @property
    def guest_dir(self) -> str:
        name = self.src.resolve().name or "project"
        return f"{GUEST_WORK_ROOT}/{name}"


@dataclass
class RunSummary:
    """The machine-readable outcome of a run (``--json``)."""

    exit_code: int | None = None
    signal: int | None = None
    returncode: int | None = None
    timed_out: bool = False
    spawn_error: str | None = None
    #: How the command ended (:mod:`stoker.outcomes`): ``exit``, ``signal``,
    #: ``spawn_error``, ``oom``, ``pids_limit``, ``disk_full``, ``timeout``,
    #: ``kernel_panic`` or ``vmm_crash`` (None: it never ran).
    cause: Cause | None = None
    #: One line saying why, for every cause but a plain ``exit``.
    message: str | None = None
    #: The limits the command ran with (``memory_mb``, ``pids``; None: unlimited).
    limits: dict[str, int | None] = field(default_factory=dict)
    accel: str | None = None
    #: The guest kernel (``stoker-microvm 6.1.192``, ``linux-image-...-cloud-amd64``).
    kernel: str | None = None
    vm: str | None = None
    #: Key digest of the snapshot the VM was restored from (None: it booted).
    snapshot: str | None = None
    #: ``restored`` (from a snapshot) or ``booted``.
    started: str | None = None
    #: Pid of the background maker ``stoker run`` started for the next run's snapshot.
    snapshot_maker_pid: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    copied_in: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    artifact_dir: str | None = None
    #: The network policy in force and what the guest's connections came to.
    network: dict[str, Any] = field(default_factory=dict)

    #: The snapshot this run could have restored from and did not find (auto mode).
    missing_snapshot: SnapshotKey | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "missing_snapshot"}

    def denied_connections(self) -> list[str]:
        """One line per denied destination (grouped), for the end of ``stoker run``."""
        denied = self.network.get("denied", [])
        return [str(line) for line in denied] if isinstance(denied, list) else []


async def run_job(
    req: RunRequest,
    *,
    stdout: OutputSink,
    stderr: OutputSink,
    stdin: AsyncIterator[bytes] | None = None,
    dirs: Dirs | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run ``req`` in a fresh VM; raises only for infrastructure and usage errors.

    A command that fails or times out is reported in the summary (``timed_out``
    is set and ``returncode`` is 124 for a timeout, like ``timeout(1)``), with
    its ``cause`` and a ``message``; so is a guest kernel panic or a VMM that
    died while the command ran (``returncode`` None: there is no exit status).
    """
    req.validate()
    summary = RunSummary()
    t0 = time.monotonic()
    vm = VM(
        req.image,
        cpus=req.cpus,
        memory=req.memory,
        disk=req.disk,
        accel=req.accel,
        dirs=dirs,
        on_progress=on_progress,
        on_warning=on_warning,
        # The project travels on a read-only seed disk: several times faster than
        # streaming it over the agent channel under emulation.
        seed=(req.src, req.guest_dir),
        snapshot=req.snapshot,
        backend=get_backend(req.vmm),
        network=req.network,
        job_limits=req.job_limits(),
        isolation=Isolation.from_env(cgroups=req.cgroups),
    )
    summary.vm = vm.name
    try:
        async with vm:
            summary.accel = vm.accel
            summary.kernel = vm.kernel
            summary.started = "booted" if vm.restored_from is None else "restored"
            summary.missing_snapshot = vm.snapshot_missing
            if vm.restored_from is not None:
                summary.snapshot = vm.restored_from.path.name
            report = vm.seed_report
            assert report is not None
            summary.copied_in = {
                "files": report.files,
                "bytes": report.bytes,
                "skipped": report.skipped,
            }
            t = time.monotonic()
            try:
                result = await vm.exec(
                    list(req.argv),
                    env=dict(req.env),
                    cwd=req.guest_dir,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    capture=False,
                    timeout=req.timeout,
                )
                summary.exit_code = result.exit_code
                summary.signal = result.signal
                summary.returncode = result.returncode
                summary.spawn_error = result.spawn_error
                _explain(summary, result, on_warning)
                if result.spawn_error:
                    await _maybe_await(stderr(f"stoker: {result.spawn_error}\n".encode()))
            except CommandTimeout as exc:
                summary.timed_out = True
                summary.returncode = 124
                summary.cause, summary.message = "timeout", timeout_message(exc.timeout)
            except (JobKernelPanic, VMMCrashed) as exc:
                # The VM is gone (no artifacts to copy); the summary says why.
                panic = isinstance(exc, JobKernelPanic)
                summary.cause = "kernel_panic" if panic else "vmm_crash"
                first = str(exc).splitlines()[0]
                summary.message = first if panic else vmm_crash_message(first)
                summary.timings["command"] = time.monotonic() - t
                return summary
            summary.timings["command"] = time.monotonic() - t
            if req.artifacts:
                t = time.monotonic()
                req.out.mkdir(parents=True, exist_ok=True)
                extracted, missing = await vm.get(
                    req.artifacts,
                    req.out,
                    cwd=req.guest_dir,
                    limits=ExtractLimits(max_bytes=req.max_artifact_bytes),
                )
                summary.artifacts = extracted.files
                summary.missing_artifacts = missing
                summary.artifact_dir = str(req.out.resolve())
                summary.timings["copy_out"] = time.monotonic() - t
    finally:
        summary.network = network_summary(vm)
        summary.timings.update(vm.timings.as_dict())
        summary.timings["total"] = time.monotonic() - t0
        summary.timings = {k: round(v, 4) for k, v in summary.timings.items()}
    return summary


def _explain(
    summary: RunSummary, result: ExecResult, on_warning: Callable[[str], None] | None
) -> None:
    """Record the cause of ``result``, its message and the limits it ran with."""
    summary.cause = exec_cause(result)
    if summary.cause != "exit":
        summary.message = describe(summary.cause, result)
    ev = result.evidence
    if ev is not None:
        summary.limits = {
            "memory_mb": ev.memory_max // (1 << 20) if ev.memory_max is not None else None,
            "pids": ev.pids_max,
        }
        if ev.note and on_warning is not None:
            on_warning(f"the command ran without limits: {ev.note}")


def network_summary(vm: VM) -> dict[str, Any]:
    """The policy in force and the guest's connections, for ``--json`` and the CLI."""
    out: dict[str, Any] = dict(vm.network.summary())
    proxy = vm.proxy
    if proxy is not None:
        stats = proxy.stats
        out["connections"] = {
            "allowed": stats.allowed,
            "denied": stats.denied,
            "errors": stats.errors,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
        }
        out["denied"] = proxy.denied_summary()
    return out


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value
