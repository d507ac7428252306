"""Running helper programs (apt-get, mmdebstrap, mkfs.*) with typed failures.

Command lines are lists, never shell strings.  A failure raises
:class:`~stoker.errors.LaunchError` carrying the command and its output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stoker.errors import LaunchError

if TYPE_CHECKING:
    from stoker.isolation.vmmuser import RunAs


def _pdeathsig_hook() -> Callable[[], None]:
    """A preexec function that makes the child die with its parent (Linux prctl)."""
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return hook


#: ``preexec_fn`` for helpers that must not outlive stoker, even after ``kill -9``:
#: the kernel sends them SIGKILL when the thread that started them dies.  It only
#: calls a pre-resolved ``prctl()``, which is safe between fork and exec.
DIE_WITH_PARENT = _pdeathsig_hook()


def child_hook(
    *, cgroup: Path | None = None, user: RunAs | None = None, die_with_parent: bool = True
) -> Callable[[], None] | None:
    """A ``preexec_fn`` that places a VMM before it executes (None: nothing to do).

    In the child, in this order: join ``cgroup`` (writing ``0`` to its
    ``cgroup.procs`` moves the writer), so that everything the VMM allocates
    from its first instruction is charged to its VM (Python's subprocess has no
    ``CLONE_INTO_CGROUP``); then drop to ``user``'s groups, group and uid (the
    move needs the parent's rights, so it comes first); then, unless
    ``die_with_parent`` is off (a detached VMM outlives us), the parent-death
    signal (a uid change clears it).  Only system calls, no locks: safe
    between fork and exec.
    """
    if cgroup is None and user is None:
        return DIE_WITH_PARENT if die_with_parent else None
    procs = None if cgroup is None else os.fsencode(cgroup / "cgroup.procs")

    def hook() -> None:
        if procs is not None:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if user is not None:
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
        if die_with_parent:
            DIE_WITH_PARENT()

    return hook


def run_checked(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    log: Path | None = None,
    hint: str | None = None,
    inherit_env: bool = True,
) -> str:
    """Run ``argv`` to completion and return its combined output.

    Output goes to ``log`` as well when given (appended), so long builds leave a
    full log behind.  ``env`` is added to this process's environment, or with
    ``inherit_env=False`` is the whole environment.  Raises :class:`LaunchError`
    when the program is missing, exits non-zero or exceeds ``timeout``.
    """
    full_env: dict[str, str] | None = dict(env or {})
    if inherit_env:
        full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            preexec_fn=DIE_WITH_PARENT,
        )
    except FileNotFoundError as exc:
        raise LaunchError(f"{argv[0]} is not installed", argv=argv, hint=hint) from exc
    except subprocess.TimeoutExpired as exc:
        out = (exc.output or b"").decode(errors="replace")
        raise LaunchError(f"{argv[0]} timed out after {timeout}s", argv=argv, output=out) from exc
    output = proc.stdout.decode(errors="replace")
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(argv)}\n{output}\n")
    if proc.returncode != 0:
        raise LaunchError(
            f"{Path(argv[0]).name} failed",
            argv=argv,
            returncode=proc.returncode,
            output=output,
            hint=hint if log is None else f"{hint + '; ' if hint else ''}full log: {log}",
        )
    return output
