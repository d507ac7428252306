"""VMMs that outlive the process that started them (``stoker serve``), and adopting them.

A service VM's QEMU runs in its own session with no parent-death signal, so a
restarted ``stoker serve`` (planned, or after ``kill -9``) finds it still
running.  Its monitor, console and agent channel are listening Unix sockets in
the VM's work directory (the service binds them and hands QEMU the listening
descriptors), so a new process connects to them again.  :class:`AdoptedProcess`
watches such a VMM, which is not our child, through a pidfd; the record in
``vmm.json`` (pid and the kernel's start time of that pid) makes sure a reused
pid is never taken for the VMM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import InfrastructureError

#: The VMM's record in its VM's work directory.
RECORD_FILE = "vmm.json"
#: The sockets a detached VMM listens on, in the work directory.
SOCKETS = ("agent", "qmp", "console")
#: What :attr:`AdoptedProcess.returncode` says once it exited: not our child, so
#: its real exit status went to whoever reaped it.
UNKNOWN_STATUS = 255


def socket_path(workdir: Path, name: str) -> Path:
    return workdir / f"{name}.sock"


@contextlib.contextmanager
def short_paths(workdir: Path) -> Iterator[Path]:
    """``workdir`` as a path short enough for a Unix socket address (108 bytes).

    Work directories can be long (a configured runtime directory, a test's
    temporary directory); ``/proc/self/fd/N`` of a descriptor open on the
    directory names the same directory in a few bytes, for bind() and connect().
    """
    fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks after boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass(frozen=True)
class VmmRecord:
    """Which process is a detached VM's VMM."""

    pid: int
    start: int
    #: The work directory it was read from: the VMM's own working directory.
    workdir: Path | None = None

    def write(self, workdir: Path) -> None:
        tmp = workdir / f".{RECORD_FILE}.tmp"
        tmp.write_text(json.dumps({"pid": self.pid, "start": self.start}))
        tmp.rename(workdir / RECORD_FILE)

    @classmethod
    def read(cls, workdir: Path) -> VmmRecord:
        try:
            raw = json.loads((workdir / RECORD_FILE).read_text())
            pid, start = raw["pid"], raw["start"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InfrastructureError(f"no usable VMM record in {workdir}: {exc}") from None
        if not isinstance(pid, int) or not isinstance(start, int) or pid <= 1:
            raise InfrastructureError(f"the VMM record in {workdir} is malformed")
        return cls(pid, start, workdir)

    def alive(self) -> bool:
        """Whether the recorded process still runs, is the same process, and works in
        the VM's directory: the record alone never makes us signal a stranger."""
        if start_time(self.pid) != self.start:
            return False
        if self.workdir is None:
            return True
        try:
            return Path(f"/proc/{self.pid}/cwd").resolve() == self.workdir.resolve()
        except OSError:
            return False


class AdoptedProcess:
    """A running process we did not start, watched through a pidfd.

    Quacks like :class:`asyncio.subprocess.Process` where the backends use it
    (``pid``, ``returncode``, ``wait()``, ``send_signal()``).
    """

    def __init__(self, record: VmmRecord) -> None:
        self.pid = record.pid
        try:
            self._fd: int | None = os.pidfd_open(record.pid)
        except ProcessLookupError:
            raise InfrastructureError(f"VMM pid {record.pid} is gone") from None
        if not record.alive():  # the pid was reused between the check and the open
            os.close(self._fd)
            raise InfrastructureError(f"VMM pid {record.pid} is gone")
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        self.returncode = UNKNOWN_STATUS
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self._fd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, signum)

    def close(self) -> None:
        """Stop watching (the process is left alone)."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
