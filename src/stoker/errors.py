"""Typed errors for stoker.

The hierarchy separates *the user's command failed* from *the infrastructure
failed*, so callers (and the CLI's exit status) never confuse the two::

    StokerError
    ├── UsageError                 bad input from the user: a clear message, nothing lost
    ├── JobFailed                  the user's command ran and failed (exit status or signal)
    │   ├── CommandTimeout         the user's command exceeded its time limit
    │   └── JobKernelPanic         the guest kernel panicked while the user's command ran
    └── InfrastructureError        stoker, the host or the VM broke (CLI exit status 125)
        ├── LaunchError            a helper program failed to start or exited non-zero
        ├── ProvisionError         fetching a kernel or building an image failed
        ├── AccelError             a requested accelerator cannot be used
        ├── VMError                a running VM broke
        │   ├── BootError          the guest never reached its agent
        │   ├── GuestPanic         the guest kernel panicked
        │   └── VMMCrashed         the VMM process died unexpectedly
        │       └── HostLimitExceeded  ... killed by its host-side limit (cgroup memory.max)
        └── GuestProtocolError     the guest sent something invalid (it is hostile)
            ├── FrameError         framing violated (oversized, truncated, garbage)
            ├── UnsafeArchive      a tar from the guest tried to escape its destination
            └── OutputLimitExceeded  the guest produced more than a configured cap

Library code raises these; only :mod:`stoker.cli` turns them into exit statuses.
Cancellation (``asyncio.CancelledError``) is never wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence


class StokerError(Exception):
    """Base class of every error stoker raises on purpose."""

    #: A one-line suggestion for the user, printed under the error by the CLI.
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(StokerError):
    """The user's input (arguments, paths, options) is wrong."""


class JobFailed(StokerError):
    """The user's command ran in the VM and did not succeed."""

    def __init__(self, message: str, *, exit_code: int | None, signal: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal


class CommandTimeout(JobFailed):
    """The user's command did not finish within its time limit and was killed."""

    def __init__(self, message: str, *, timeout: float) -> None:
        super().__init__(message, exit_code=None, signal=None)
        self.timeout = timeout


class JobKernelPanic(JobFailed):
    """The guest kernel panicked while the user's command ran (as root it can make it).

    Not an infrastructure failure: the same command would panic the next VM too
    (a panic during boot is a :class:`GuestPanic`).  ``console`` holds the panic
    and its trace.
    """

    def __init__(self, message: str, *, console: str = "") -> None:
        super().__init__(message, exit_code=None, signal=None)
        self.console = console


class InfrastructureError(StokerError):
    """Something other than the user's command failed."""


class LaunchError(InfrastructureError):
    """A helper program could not be started or exited with an error.

    Carries the command line and the tail of its output so the failure can be
    diagnosed without re-running anything.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        output: str = "",
        hint: str | None = None,
    ) -> None:
        details = message
        if argv:
            details += f"\n  command: {' '.join(argv)}"
        if returncode is not None:
            details += f"\n  exit status: {returncode}"
        if output.strip():
            tail = "\n".join(output.strip().splitlines()[-20:])
            details += "\n  output (last lines):\n    " + tail.replace("\n", "\n    ")
        super().__init__(details, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


class ProvisionError(InfrastructureError):
    """Fetching a kernel, building an initramfs or building an image failed."""


class AccelError(InfrastructureError):
    """A requested accelerator (e.g. KVM) is not usable on this host."""


class VMError(InfrastructureError):
    """A VM broke. ``console`` holds the last lines of its serial console."""

    def __init__(self, message: str, *, console: str = "", hint: str | None = None) -> None:
        text = message
        if console.strip():
            text += "\n  guest console (last lines):\n    " + console.strip().replace(
                "\n", "\n    "
            )
        super().__init__(text, hint=hint)
        self.console = console


class BootError(VMError):
    """The guest did not reach its agent (timeout, init failure, bad image)."""


class GuestPanic(VMError):
    """The guest kernel panicked (``reason``: the panic's first line)."""

    def __init__(
        self, message: str, *, console: str = "", reason: str = "", hint: str | None = None
    ) -> None:
        super().__init__(message, console=console, hint=hint)
        self.reason = reason or message


class VMMCrashed(VMError):
    """The VMM process exited while the VM was supposed to be running."""


class HostLimitExceeded(VMMCrashed):
    """The kernel stopped the VMM at a host-side limit of its VM's cgroup (memory.max, pids.max)."""


class GuestProtocolError(InfrastructureError):
    """The guest agent sent something the host refuses to accept."""


class FrameError(GuestProtocolError):
    """A frame on the agent channel was malformed, truncated or oversized."""


class UnsafeArchive(GuestProtocolError):
    """A tar stream tried to write outside its destination or contained forbidden entries."""


class OutputLimitExceeded(GuestProtocolError):
    """The guest produced more data than the configured cap."""
