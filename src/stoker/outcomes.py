"""Why a command ended: a typed cause, decided from evidence, and its one-line wording.

The agent measures (:class:`~stoker.protocol.messages.Evidence`: OOM kills in
the command's cgroup, hits of its process limit, the least free disk space);
the host knows the rest (its own timeout, a VMM that died, a panic on the
console).  :func:`exec_cause` and :func:`describe` turn that into one
:data:`Cause` and one sentence, used alike by ``stoker run`` (its message and
``--json``), the service (the job's ``reason`` and ``cause``) and the metrics.

A cause is never guessed: a command that failed without evidence of anything
else ended by its own ``exit`` status or a ``signal``.

=============== ========================================================= =========
cause           meaning                                                   whose
=============== ========================================================= =========
exit            the command exited (0 or not) for reasons of its own      the job
signal          a signal killed it, not one of the causes below           the job
spawn_error     it could not be started (no such program, ...)            the job
oom             the guest's OOM killer killed it (its memory limit)       the job
pids_limit      it kept hitting its process limit (a fork bomb): killed   the job
disk_full       it failed while the guest's writable disk was full        the job
output_limit    it wrote more output than the caller captures             the job
timeout         it ran longer than its timeout: killed                    the job
kernel_panic    the guest kernel panicked while it ran                    the job
vmm_crash       the VMM died while it ran (killed, crashed): not the job  infra
=============== ========================================================= =========
"""

from __future__ import annotations

import signal as signal_mod
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from stoker.protocol.common import ExecResult
    from stoker.protocol.messages import Evidence

Cause = Literal[
    "exit",
    "signal",
    "spawn_error",
    "oom",
    "pids_limit",
    "disk_full",
    "output_limit",
    "timeout",
    "kernel_panic",
    "vmm_crash",
]
CAUSES: tuple[Cause, ...] = get_args(Cause)
#: Causes that are a failure of the infrastructure, not of the user's command.
INFRA_CAUSES: frozenset[Cause] = frozenset({"vmm_crash"})

#: A writable file system with less free space than this is full: what ext4
#: and tmpfs leave when an allocation fails is well below it.
DISK_FULL_MARGIN = 1 << 20

MiB = 1 << 20


def signal_name(signum: int) -> str:
    """``9 (SIGKILL)``; just the number for signals Python does not name."""
    try:
        return f"{signum} ({signal_mod.Signals(signum).name})"
    except ValueError:
        return str(signum)


def disk_was_full(evidence: Evidence) -> bool:
    """Whether a writable file system of the guest ran full while the command ran."""
    return evidence.disk_free is not None and evidence.disk_free < DISK_FULL_MARGIN


def exec_cause(result: ExecResult) -> Cause:
    """The cause of a command that ended with ``result`` (it ran to its end or was killed).

    The agent killing the command for its process limit decides it whatever the
    exit status; otherwise evidence only explains a failure: a command that
    succeeded while its disk was full ended by its ``exit``.
    """
    if result.spawn_error:
        return "spawn_error"
    ev = result.evidence
    if ev is not None and ev.killed_for == "pids_limit":
        return "pids_limit"
    if result.ok or ev is None:
        return "exit" if result.signal is None else "signal"
    if ev.oom_kills > 0:
        return "oom"
    if ev.pids_max_hits > 0:
        return "pids_limit"
    if disk_was_full(ev):
        return "disk_full"
    return "exit" if result.signal is None else "signal"


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n < 10 * 1024 * MiB else f"{n / (1024 * MiB):.1f} GiB"


def _how(result: ExecResult) -> str:
    if result.exit_code is not None:
        return f"exit status {result.exit_code}"
    return f"killed by signal {signal_name(result.signal or 0)}"


def describe(cause: Cause, result: ExecResult) -> str:
    """One line saying how the command of ``result`` ended because of ``cause``."""
    ev = result.evidence
    if cause == "spawn_error":
        return f"cannot start the command: {result.spawn_error}"
    if cause == "oom":
        if ev is not None and ev.memory_max is not None:
            limit = f"memory limit {_mib(ev.memory_max)}"
        else:
            limit = "no memory limit" + (f": {ev.note}" if ev is not None and ev.note else "")
        return f"the command was killed by the guest's out-of-memory killer ({limit})"
    if cause == "pids_limit":
        limit = f"{ev.pids_max} processes" if ev is not None and ev.pids_max else "its limit"
        if ev is not None and ev.killed_for == "pids_limit":
            return (
                f"the command kept hitting the guest's process limit ({limit}; "
                "a fork bomb?) and was killed"
            )
        return f"the command failed with {_how(result)} after hitting its process limit ({limit})"
    if cause == "disk_full" and ev is not None:
        size = f" of {_mib(ev.disk_size)}" if ev.disk_size else ""
        return (
            f"the command failed with {_how(result)} while the guest's disk was full "
            f"({ev.disk_path or 'a writable file system'}: {_mib(ev.disk_free or 0)} "
            f"free{size})"
        )
    return _how(result)


def timeout_message(timeout: float) -> str:
    """The line for a command killed at its timeout."""
    return f"the command timed out after {timeout:g}s and was killed"


def panic_message(reason: str) -> str:
    """The line for a guest kernel panic while the command ran (``reason``: the panic's)."""
    return f"the guest kernel panicked while the command ran: {reason}"


def vmm_crash_message(detail: str) -> str:
    """The line for a VMM that died while the command ran."""
    return f"the VMM died while the command ran ({detail}); not the command's fault"


__all__ = [
    "CAUSES",
    "INFRA_CAUSES",
    "Cause",
    "describe",
    "disk_was_full",
    "exec_cause",
    "panic_message",
    "signal_name",
    "timeout_message",
    "vmm_crash_message",
]
