"""Stop signals that arrive while a daemon is still starting.

asyncio's handlers exist only once the event loop runs, a second or more
after the process started (imports, configuration, migrations).  Until then
SIGTERM's default action kills the process on the spot: a ``systemctl stop``
or an impatient supervisor right after a start would end the daemon without
its shutdown.  :func:`catch` records such signals instead (it imports nothing
heavy, so it can run first); the daemon asks :func:`received` once its own
handlers are in place and stops at once if a signal came early.
"""

from __future__ import annotations

import signal
from types import FrameType

_received: list[int] = []

#: The signals a daemon stops on.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def catch() -> None:
    """Record SIGTERM and SIGINT from now until asyncio's handlers replace this."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)


def received() -> list[int]:
    """The stop signals recorded by :func:`catch`, oldest first."""
    return list(_received)
