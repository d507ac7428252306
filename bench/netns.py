"""Run a benchmark inside a fresh network namespace that has only loopback.

The GitLab and GitHub benchmarks give real VMs an egress allowlist towards a
fake on 127.0.0.2.  As in the tests, they run under ``unshare --net`` so that
even a broken filter cannot send a packet off the machine: the script builds
what needs the host's network first, then runs itself again inside the
namespace.  Needs root (namespaces) and ``ip`` (iproute2).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

FLAG = "--in-namespace"


def enter(prepare: Callable[[], None]) -> None:
    """Return inside a loopback-only namespace; outside one, ``prepare()`` then re-run there.

    Outside, this never returns: it exits with the inner run's status.
    """
    if FLAG in sys.argv:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        links = sorted(name for _, name in socket.if_nameindex())
        if links != ["lo"]:
            raise SystemExit(f"refusing to run: the namespace has interfaces {links}")
        return
    prepare()
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, sys.argv[0], *sys.argv[1:], FLAG], check=False
    )
    raise SystemExit(proc.returncode)
