"""One job run by this host: its state while it runs, how an attempt ended, and why.

Failures of the user's command or input end the job (``failed``,
``timed_out``); failures of the infrastructure (an :class:`Outcome` without a
``state``) send it back to the queue until the retry limit, then ``errored``.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from stoker.errors import BootError, GuestPanic, GuestProtocolError, VMMCrashed
from stoker.outcomes import Cause, describe, exec_cause, timeout_message
from stoker.protocol.common import ExecResult
from stoker.service.files import ArtifactFile
from stoker.service.jobs import JobState, redact, retry_limit_of, secret_values
from stoker.service.models import Job
from stoker.service.network import JobConnections
from stoker.vm import VM

StopReason = Literal["cancel", "shutdown", "lease_lost", "hand_over"]
FailureKind = Literal[
    "boot", "vmm_crash", "guest_panic", "guest", "infrastructure", "internal", "host_lost"
]


class LeaseLost(Exception):
    """This host no longer holds the job (another host recovered it); stop, write nothing."""


class CancelRequested(Exception):
    """The job was cancelled (seen in the database, possibly from another host)."""


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended.  ``state`` None: infrastructure failure (retry or errored)."""

    state: JobState | None
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    #: How the command ended (None: it did not run, or this says nothing about it).
    cause: Cause | None = None
    failure: FailureKind | None = None
    #: False: an infrastructure failure that another attempt would not fix.
    retry: bool = True
    #: Another host recovered the job: write nothing.
    lost: bool = False
    artifacts: tuple[ArtifactFile, ...] = ()

    @property
    def recorded_cause(self) -> Cause | None:
        """The cause recorded on the job: the command's, or the VMM's crash while it ran."""
        if self.cause is not None:
            return self.cause
        return "vmm_crash" if self.failure == "vmm_crash" else None

    def target(self, job: Job, retry_limit: int) -> tuple[JobState, str]:
        """The state ``job`` goes to after this attempt, and why."""
        target, reason = self.state, self.reason
        if target is None:
            if job.cancel_requested:
                return JobState.CANCELLED, f"cancelled ({reason})"
            if self.retry and job.attempt < retry_limit_of(job, retry_limit):
                return JobState.QUEUED, reason
            if self.retry:
                reason = f"{reason}; gave up after {job.attempt + 1} attempts"
            return JobState.ERRORED, reason
        if job.cancel_requested and target is not JobState.CANCELLED:
            # Cancelled while it was finishing: the cancel wins, the result is kept.
            return JobState.CANCELLED, f"cancelled on request (it had {target}: {reason})"
        return target, reason


@dataclass(eq=False)
class JobRun:
    """A job this host is running."""

    job: Job
    pool: str
    vm: VM | None = None
    evicted: list[VM] = field(default_factory=list)
    #: vCPUs and MiB the evicted VMs hold in the ledger until they are destroyed.
    evicted_capacity: tuple[float, float] = (0.0, 0.0)
    task: asyncio.Task[None] | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: StopReason | None = None
    #: Where the connection records of the job's VM go (set once its log exists).
    connections: JobConnections | None = None
    #: Taken over from an earlier process: where its command's stored output ends.
    resume: dict[str, Any] | None = None

    def resume_ready(self) -> bool:
        """Whether another process could take this run over (its command runs journaled)."""
        vm = self.vm
        return (
            vm is not None
            and vm.detached
            and self.job.session_idle_s is None
            and (self.resume is not None or self.job.state == JobState.RUNNING.value)
        )

    def stop(self, reason: StopReason) -> None:
        """Ask the run to stop (the first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_event.set()


class VMKind(enum.Enum):
    """Where a job's VM came from: a warm pool, or booted for the job."""

    WARM = "warm"
    COLD = "cold"


def classify(exc: BaseException) -> FailureKind:
    """The metric label of an infrastructure failure."""
    if isinstance(exc, BootError):
        return "boot"
    if isinstance(exc, VMMCrashed):
        return "vmm_crash"
    if isinstance(exc, GuestPanic):
        return "guest_panic"
    if isinstance(exc, GuestProtocolError):
        return "guest"
    return "infrastructure"


def headline(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def judge(job: Job, result: ExecResult | None, artifacts: list[ArtifactFile]) -> Outcome:
    """The outcome of a command that ran (``result`` None: it timed out).

    The reason is :func:`stoker.outcomes.describe`'s line (an OOM kill, a fork
    bomb, a full disk, or the plain exit status), so the job's ``reason``,
    ``stoker run`` and the metrics' ``cause`` agree.
    """
    kept = tuple(artifacts)
    if result is None:
        reason = timeout_message(job.timeout_s)
        return Outcome(JobState.TIMED_OUT, reason, cause="timeout", artifacts=kept)
    cause = exec_cause(result)
    reason = redact(describe(cause, result), secret_values(job))
    if cause == "spawn_error":
        return Outcome(JobState.FAILED, reason, exit_code=127, cause=cause, artifacts=kept)
    state = JobState.SUCCEEDED if result.ok and cause == "exit" else JobState.FAILED
    return Outcome(
        state,
        reason,
        exit_code=result.exit_code,
        signal=result.signal,
        cause=cause,
        artifacts=kept,
    )


def panic_outcome(message: str) -> Outcome:
    """The outcome of a command during which the guest kernel panicked (its own doing)."""
    return Outcome(JobState.FAILED, message, cause="kernel_panic")


def stop_outcome(reason: StopReason, host: str) -> Outcome:
    """The outcome of a run stopped from outside (cancel, lease lost, shutdown)."""
    if reason == "cancel":
        return Outcome(JobState.CANCELLED, "cancelled on request")
    if reason == "lease_lost":
        return Outcome(None, "this host lost the job's lease", lost=True)
    return Outcome(
        JobState.ERRORED,
        f"stoker serve on {host} shut down before the job finished",
        failure="infrastructure",
    )
