"""QEMU as an unprivileged user of its own (the service's ``host.vmm_user``).

The daemon (root, or a user allowed to switch) starts each VMM as this user:
the child process joins the VM's cgroup first (that needs the daemon's
rights), then drops to the user's groups, group and uid, then executes QEMU
(see :func:`stoker.procs.child_hook`).  What QEMU then opens by path is
arranged here, and no more:

* the VM's work directory: owned by the daemon, group the VMM's, mode 0710
  (QEMU may reach the files named to it, not list or create any);
* the writable disk: owned by the VMM user, mode 0600;
* the seed disk: group the VMM's, mode 0640 (read-only);
* kernel, initrd and root image (in the cache): must already be readable by
  the user; :func:`unreadable` finds the first that is not, so the error can
  say which file and how to fix it;
* ``/dev/kvm``: through the ``kvm`` group, when the user is in it.

Sockets are socketpairs passed as descriptors: nothing on disk to arrange.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stoker.errors import UsageError

if TYPE_CHECKING:
    from stoker.backends.base import MachineSpec

#: Suggested name of the VMM user in the docs and the systemd unit.
SUGGESTED_USER = "stoker-vmm"


@dataclass(frozen=True)
class RunAs:
    """A resolved user to run the VMM as."""

    name: str
    uid: int
    gid: int
    #: Supplementary groups (``kvm`` among them when the user is in it).
    groups: tuple[int, ...]

    @property
    def kvm(self) -> bool:
        try:
            return grp.getgrnam("kvm").gr_gid in (self.gid, *self.groups)
        except KeyError:
            return False


def resolve_user(name: str, group: str | None = None) -> RunAs:
    """Look ``name`` (and ``group``, default: the user's) up; refuse unusable ones.

    Raises :class:`UsageError` naming the problem and the fix.
    """
    create = (
        f"create it: useradd --system --no-create-home --shell /usr/sbin/nologin "
        f"--groups kvm {name}"
    )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"vmm_user {name!r} does not exist on this host", hint=create) from None
    if entry.pw_uid == 0:
        raise UsageError(
            f"vmm_user {name!r} is root: QEMU would run with every privilege",
            hint=f"name an unprivileged user ({create})",
        )
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(
                f"vmm_group {group!r} does not exist on this host",
                hint=f"groupadd --system {group}",
            ) from None
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != gid)
    euid = os.geteuid()
    if euid not in (0, entry.pw_uid):
        raise UsageError(
            f"this process (uid {euid}) cannot start QEMU as {name!r}: switching users needs root",
            hint="run the daemon as root, or leave vmm_user unset (QEMU then runs as the "
            "daemon's own user, e.g. User=stoker in the systemd unit)",
        )
    return RunAs(name=name, uid=entry.pw_uid, gid=gid, groups=groups)


def grant_workdir(
    workdir: Path, user: RunAs, *, writable: list[Path], readable: list[Path]
) -> None:
    """Let ``user`` reach the named files of ``workdir`` (and nothing else in it)."""
    for directory in (workdir.parent, workdir):
        # The runtime directory too: QEMU has to pass through it (search only,
        # for the VMM's group only: it cannot list or create anything).
        if directory.stat().st_uid == os.geteuid():
            os.chown(directory, -1, user.gid)
            directory.chmod(0o710)
    for path in writable:
        os.chown(path, user.uid, user.gid)
        path.chmod(0o600)
    for path in readable:
        os.chown(path, -1, user.gid)
        path.chmod(0o640)


def _allows(st: os.stat_result, user: RunAs, bits: int) -> bool:
    """Whether mode bits ``bits`` (of r=4, w=2, x=1) are granted to ``user`` by ``st``."""
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid in (user.gid, *user.groups):
        shift = 3
    else:
        shift = 0
    return (stat.S_IMODE(st.st_mode) >> shift) & bits == bits


def unreadable(user: RunAs, paths: list[Path], *, write: bool = False) -> str | None:
    """Why ``user`` could not open one of ``paths`` (read, or read-write), or None.

    Checked by mode bits along every directory of the path, as the kernel would
    (ACLs are not considered: a host that uses them gets a conservative answer).
    """
    for path in paths:
        resolved = path.resolve()
        for directory in reversed(resolved.parents):
            try:
                st = directory.stat()
            except OSError as exc:
                return f"{directory}: {exc.strerror}"
            if not _allows(st, user, 1):
                return f"{user.name} cannot enter {directory} (mode {stat.filemode(st.st_mode)})"
        try:
            st = resolved.stat()
        except OSError as exc:
            return f"{resolved}: {exc.strerror}"
        bits = 6 if write else 4
        if not _allows(st, user, bits):
            how = "read and write" if write else "read"
            return f"{user.name} cannot {how} {resolved} (mode {stat.filemode(st.st_mode)})"
    return None


def prepare_files(spec: MachineSpec, workdir: Path, user: RunAs) -> None:
    """Arrange what QEMU opens by path for ``user``; refuse what cannot be arranged safely.

    Raises :class:`UsageError` naming the file and the fix.
    """
    if spec.memory_file is not None:
        # QEMU 7.2 opens a memory-backend-file read-write even for a private
        # (copy-on-write) map, and readonly=on would make the guest's RAM
        # read-only: a VMM user that may write the snapshot's memory file could
        # alter every later clone.
        raise UsageError(
            f"snapshots cannot be used with vmm_user {user.name!r}: QEMU would need write "
            "access to the shared snapshot memory, and one VM could then alter every clone",
            hint='set snapshot = "never" for pools when vmm_user is set',
        )
    why = unreadable(user, [p for p in (spec.kernel, spec.initrd, spec.rootfs) if p is not None])
    if why is not None:
        raise UsageError(
            f"QEMU runs as {user.name!r} but {why}",
            hint=f"make the cache readable to the group: chgrp -R {user.gid} DIR && "
            "chmod -R g+rX DIR (DIR: the cache directory, e.g. /var/cache/stoker)",
        )
    owned = [p for p in (spec.scratch, spec.seed) if p is not None and p.parent == workdir]
    grant_workdir(
        workdir,
        user,
        writable=[p for p in owned if p == spec.scratch],
        readable=[p for p in owned if p != spec.scratch],
    )
