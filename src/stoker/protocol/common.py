"""What the agent client's users need without the client itself.

Its limits, results and errors, in a module that loads nothing else (the client
loads the message schemas and more): ``stoker run`` asks for its VM before the
client is imported, which then overlaps with the VM's start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stoker.errors import InfrastructureError
from stoker.protocol import wire

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
