"""What the agent client's users need without the client itself.

Its limits, results and errors, in a module that loads nothing else (the client
loads the message schemas and more): ``stoker run`` asks for its VM before the
client is imported, which then overlaps with the VM's start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from stoker.errors import InfrastructureError
from stoker.protocol import wire

if TYPE_CHECKING:
    from stoker.protocol.messages import Evidence

#: Where a command's output goes: a callable taking each chunk (maybe async).
OutputSink = Callable[[bytes], Awaitable[None] | None]


class ChannelClosed(InfrastructureError):
    """The agent channel ended (the VM stopped or the agent died)."""


@dataclass(frozen=True)
class ChannelLimits:
    """Bounds on what the host accepts from a guest."""

    #: Largest frame payload accepted.
    max_frame: int = wire.MAX_PAYLOAD
    #: Default cap on output captured in memory by :meth:`AgentClient.exec`.
    max_capture: int = 64 << 20
    #: Longest the host waits for a reply to a control request.
    request_timeout: float = 30.0
    #: Longest a file transfer may stall without progress.
    transfer_idle_timeout: float = 60.0
    #: Longest the host waits for a killed command to report its exit.
    kill_grace: float = 10.0


@dataclass(frozen=True)
class ExecResult:
    """How a command in the guest ended."""

    exit_code: int | None
    signal: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    duration: float = 0.0
    #: Set when the command could not be started at all (exit_code is 127).
    spawn_error: str | None = None
    #: What the agent measured (limits, OOM kills, disk space); None from an old agent.
    evidence: Evidence | None = None

    @property
    def returncode(self) -> int:
        """Shell convention: the exit code, or 128 + the signal number."""
        if self.exit_code is not None:
            return self.exit_code
        assert self.signal is not None
        return 128 + self.signal

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


#: Memory the agent and the guest kernel keep when a command's memory is limited
#: to the guest's own (no explicit limit): a command that exhausts its memory
#: is killed by the guest's OOM killer while the agent keeps serving.
DEFAULT_MEMORY_RESERVE_MB = 128
#: Processes per MiB of guest memory a command may have by default (a 1 GiB
#: guest: 1024); never fewer than :data:`MIN_DEFAULT_PIDS`.
DEFAULT_PIDS_PER_MB = 1
MIN_DEFAULT_PIDS = 512
MAX_PIDS = 1 << 22


def default_pids_limit(guest_memory_mb: int) -> int:
    """The default process limit of a command in a guest with ``guest_memory_mb``.

    High enough for ``make -j`` and test runners with many workers, low enough
    that a fork bomb hits it within seconds, long before the guest's memory or
    the kernel's own limit would stop it.
    """
    return min(MAX_PIDS, max(MIN_DEFAULT_PIDS, guest_memory_mb * DEFAULT_PIDS_PER_MB))


@dataclass(frozen=True)
class JobLimits:
    """Limits on every command's processes inside the guest (a cgroup v2 per command).

    ``None`` picks the default: memory, the guest's own minus
    ``memory_reserve_mb``; processes, :func:`default_pids_limit`.  An explicit
    memory limit is still capped at the guest's memory minus the reserve.
    """

    memory_mb: int | None = None
    pids: int | None = None
    memory_reserve_mb: int = DEFAULT_MEMORY_RESERVE_MB

    def request(self, guest_memory_mb: int) -> dict[str, int | None]:
        """The ``limits`` of an ``exec`` request to the agent."""
        return {
            "memory_mb": self.memory_mb,
            "memory_reserve_mb": self.memory_reserve_mb,
            "pids": self.pids if self.pids is not None else default_pids_limit(guest_memory_mb),
        }

    def or_image_defaults(self, defaults: Mapping[str, object]) -> JobLimits:
        """These limits, with what they leave None taken from an image's ``[defaults]``."""

        def pick(mine: int | None, key: str) -> int | None:
            theirs = defaults.get(key)
            if mine is not None or isinstance(theirs, bool) or not isinstance(theirs, int):
                return mine
            return theirs if theirs > 0 else None  # a hand-edited manifest must not crash

        return replace(
            self,
            memory_mb=pick(self.memory_mb, "job_memory_limit"),
            pids=pick(self.pids, "job_pids_limit"),
        )
