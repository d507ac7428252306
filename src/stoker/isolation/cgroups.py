"""cgroup v2: where this process may put its VMs, and one cgroup per VM.

Three steps, each on its own:

1. :func:`probe` looks, and changes nothing (``stoker doctor`` calls it): is a
   cgroup2 file system mounted, which cgroup is this process in, where would VM
   cgroups go, which of memory/pids/cpu could they get, may we write there.
2. :func:`prepare_parent` makes the parent ready, once per process.  cgroup v2
   allows no processes in a cgroup whose controllers are handed down to children
   (the "no internal processes" rule), so when VM cgroups go under this
   process's own cgroup, this process first moves into a leaf ``<own>/daemon``
   and the VMs go under ``<own>/stoker``: what systemd's ``Delegate=yes``
   expects of a service that manages its own subtree (systemd.resource-control(5)).
   That is only done when this process is alone in its cgroup (a delegated
   unit or ``systemd-run --scope -p Delegate=yes``); a login shell's scope is
   never rearranged.  At the root of a cgroup namespace there is no such rule.
3. :class:`VMCgroup` is one VM's cgroup: created with its limit files written,
   joined by the VMM before it executes (see :func:`stoker.procs.child_hook`),
   and on teardown emptied (``cgroup.kill``) and removed, verified.

Every path is relative to the cgroup2 mount, so tests run the same code on a
stand-in tree in a temporary directory (``tests/test_isolation.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stoker.errors import HostLimitExceeded, InfrastructureError
from stoker.isolation.limits import CONTROLLERS, CgroupLimits, limit_files
from stoker.vmfiles import process_identity

log = logging.getLogger(__name__)

#: The leaf this process moves into when its VMs go under its own cgroup.
DAEMON_LEAF = "daemon"
#: The parent of the VM cgroups under this process's own cgroup.
VMS_CHILD = "stoker"
#: How long teardown waits for a killed cgroup to empty.
EMPTY_TIMEOUT = 10.0


def cgroup2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup2 file system in a ``/proc/self/mountinfo`` text (pure).

    Hybrid hosts mount it at ``/sys/fs/cgroup/unified`` next to v1 hierarchies.
    """
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        if sep and rest.split(" ", 1)[0] == "cgroup2":
            parts = fields.split()
            if len(parts) >= 5:
                return Path(parts[4].replace("\\040", " "))
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """This process's cgroup v2 path (``/a/b``) in a ``/proc/self/cgroup`` text (pure)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _words(path: Path) -> frozenset[str]:
    return frozenset(_read(path).split())


@dataclass(frozen=True)
class CgroupSupport:
    """What :func:`probe` found: where VM cgroups would go and what they would get."""

    #: The cgroup2 mount (None: no cgroup v2 here).
    mount: Path | None = None
    #: This process's cgroup directory.
    own: Path | None = None
    #: Where VM cgroups go (None: nowhere usable; :attr:`reason` says why).
    parent: Path | None = None
    #: Whether this process must first move into ``<own>/daemon`` (see the module doc).
    move_self: bool = False
    #: The controllers (of memory, pids, cpu) VM cgroups would get.
    controllers: frozenset[str] = frozenset()
    #: Why there is no parent, or why controllers are missing (empty: all is well).
    reason: str = ""
    #: How to fix it.
    fix: str = ""

    @property
    def usable(self) -> bool:
        """Whether VMs get a cgroup each (maybe without every controller)."""
        return self.parent is not None

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(c for c in CONTROLLERS if c not in self.controllers)


_DELEGATE_FIX = (
    "run stoker in a cgroup of its own with delegation: as a systemd service with "
    "Delegate=yes (see deploy/stoker.service), or `systemd-run --scope -p Delegate=yes "
    "stoker ...`; or set STOKER_CGROUP_PARENT (host.cgroup_parent) to a delegated cgroup"
)


def probe(
    *,
    parent: Path | None = None,
    mount: Path | None = None,
    own: str | None = None,
    pid: int | None = None,
) -> CgroupSupport:
    """Look at this host's cgroup v2 (changes nothing).

    ``parent``: a configured parent (absolute, or relative to the mount);
    default: under this process's own cgroup.  ``mount``, ``own`` and ``pid``
    default to this process's view and exist for tests on a stand-in tree.
    """
    if mount is None:
        mount = cgroup2_mount(_read(Path("/proc/self/mountinfo")))
    if mount is None or not (mount / "cgroup.procs").exists():
        return CgroupSupport(
            reason="no cgroup v2 file system is mounted",
            fix="boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2 only)",
        )
    if own is None:
        own = own_cgroup(_read(Path("/proc/self/cgroup")))
    if own is None:
        return CgroupSupport(mount=mount, reason="this process is in no cgroup v2 cgroup")
    own_dir = mount / own.lstrip("/")
    pid = os.getpid() if pid is None else pid
    move_self = False
    if parent is not None:
        chosen = parent if parent.is_absolute() and parent.is_relative_to(mount) else None
        if chosen is None and not parent.is_absolute():
            chosen = mount / parent
        if chosen is None:
            return CgroupSupport(
                mount=mount,
                own=own_dir,
                reason=f"the configured cgroup parent {parent} is not under {mount}",
                fix=f"name a cgroup under {mount} (or relative to it)",
            )
    else:
        found = _under_own(mount, own_dir, pid)
        if isinstance(found, CgroupSupport):
            return found
        chosen, move_self = found
    # What the chosen parent can get: what its own parent has (and enables for it).
    above = chosen if chosen == mount else chosen.parent
    offered = _words(above / "cgroup.controllers")
    wanted = frozenset(CONTROLLERS) & offered
    # VM cgroups are made in the parent (or the parent itself in the one above).
    needs = [chosen if chosen.exists() else above, above / "cgroup.subtree_control"]
    unwritable = [p for p in needs if not os.access(p, os.W_OK)]
    if unwritable:
        return CgroupSupport(
            mount=mount,
            own=own_dir,
            reason=f"{unwritable[0]} is not writable by this user",
            fix=_DELEGATE_FIX,
        )
    source = above
    missing = [c for c in CONTROLLERS if c not in wanted]
    reason = fix = ""
    if missing:
        bound_v1 = _bound_to_v1(missing)
        reason = f"{', '.join(missing)} not offered to {source}" + (
            f" ({', '.join(bound_v1)} mounted as cgroup v1: a hybrid host)" if bound_v1 else ""
        )
        fix = (
            "boot with systemd.unified_cgroup_hierarchy=1 so every controller is on cgroup v2"
            if bound_v1
            else "enable them in the ancestors' cgroup.subtree_control (systemd: Delegate=yes)"
        )
    return CgroupSupport(
        mount=mount,
        own=own_dir,
        parent=chosen,
        move_self=move_self,
        controllers=wanted,
        reason=reason,
        fix=fix,
    )


def delegated(directory: Path) -> bool:
    """Whether ``directory`` (a cgroup) was delegated to this process's user.

    systemd marks a unit's cgroup with ``Delegate=yes`` by the extended
    attribute ``trusted.delegate`` (``user.delegate`` in a user manager) and
    hands an unprivileged ``User=`` the directory itself.
    """
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(directory, attr) == b"1":
                return True
    try:
        owner = directory.stat().st_uid
    except OSError:
        return False
    return owner == os.geteuid() != 0


def _under_own(mount: Path, own_dir: Path, pid: int) -> tuple[Path, bool] | CgroupSupport:
    """Where VM cgroups go under this process's own cgroup, and whether it must move first."""
    if own_dir == mount:
        # The root of the hierarchy (or of a cgroup namespace): no internal-process rule.
        return own_dir / VMS_CHILD, False
    if own_dir.name == DAEMON_LEAF and delegated(own_dir.parent):
        # Already in the leaf (moved earlier, or systemd's DelegateSubgroup=daemon).
        return own_dir.parent / VMS_CHILD, False
    if not delegated(own_dir):
        return CgroupSupport(
            mount=mount,
            own=own_dir,
            reason=f"this process's cgroup {own_dir.relative_to(mount)} is not delegated to it "
            "(systemd manages it: stoker does not rearrange it)",
            fix=_DELEGATE_FIX,
        )
    procs = _read(own_dir / "cgroup.procs").split()
    if procs != [str(pid)]:
        others = len([p for p in procs if p != str(pid)])
        return CgroupSupport(
            mount=mount,
            own=own_dir,
            reason=f"this process shares its cgroup {own_dir.relative_to(mount)} with {others} "
            "other process(es); cgroup v2 gives child cgroups controllers only when no "
            "process is left in their parent, and stoker moves no process but itself",
            fix=_DELEGATE_FIX,
        )
    return own_dir / VMS_CHILD, True


def _bound_to_v1(controllers: Iterable[str]) -> list[str]:
    mounts = _read(Path("/proc/self/mountinfo"))
    v1 = set()
    for line in mounts.splitlines():
        _, sep, rest = line.partition(" - ")
        parts = rest.split()
        if sep and parts and parts[0] == "cgroup" and len(parts) >= 3:
            v1.update(parts[2].split(","))
    return [c for c in controllers if c in v1]


# --- preparing the parent ----------------------------------------------------------------------

_prepared: dict[Path, frozenset[str]] = {}
_prepare_lock = threading.Lock()


def _enable(directory: Path, controllers: frozenset[str]) -> None:
    """Hand ``controllers`` down from ``directory`` to its children (idempotent)."""
    have = _words(directory / "cgroup.subtree_control")
    todo = [c for c in CONTROLLERS if c in controllers and c not in have]
    if todo:
        (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in todo))


def prepare_parent(support: CgroupSupport) -> Path:
    """Make ``support.parent`` ready for VM cgroups (once per process; thread-safe).

    Raises :class:`InfrastructureError` when the host refuses.
    """
    parent = support.parent
    if parent is None:
        raise InfrastructureError(f"no cgroup for VMs: {support.reason}", hint=support.fix)
    with _prepare_lock:
        if parent in _prepared and parent.is_dir():
            return parent
        try:
            if support.move_self and support.own is not None:
                leaf = support.own / DAEMON_LEAF
                leaf.mkdir(exist_ok=True)
                # Every thread of this process moves with it ("0" means the writer).
                (leaf / "cgroup.procs").write_text("0")
                log.info("moved this process into %s (cgroup v2 delegation)", leaf)
            if parent != support.mount:
                _enable(parent.parent, support.controllers)
            parent.mkdir(exist_ok=True)
            _enable(parent, support.controllers)
        except OSError as exc:
            raise InfrastructureError(
                f"cannot prepare the VM cgroup parent {parent}: {exc.strerror or exc}",
                hint=support.fix or _DELEGATE_FIX,
            ) from exc
        _prepared[parent] = support.controllers
        swept = sweep_stale(parent)
        if swept:
            log.info("removed %d empty VM cgroups a killed stoker left in %s", len(swept), parent)
        return parent


#: The extended attribute naming the stoker process (``pid:starttime``) that
#: made a VM cgroup (cgroupfs keeps ``user.*`` attributes since Linux 5.7).
OWNER_XATTR = "user.stoker.owner"
#: An empty VM cgroup without an owner attribute older than this was left by a
#: stoker that was killed: a live one is empty only between its creation and
#: the VMM's start, or between the VMM's exit and teardown.
STALE_AFTER = 600.0


def sweep_stale(parent: Path, *, now: float | None = None) -> list[Path]:
    """Remove empty ``stoker-*`` cgroups under ``parent`` whose stoker is gone.

    Gone: the process named by :data:`OWNER_XATTR` no longer exists (a ``kill
    -9`` of stoker: its VMM died with it); without the attribute, older than
    :data:`STALE_AFTER`.  ``rmdir`` of a cgroup fails unless it is empty, so a
    VM that is running is never touched.
    """
    now = time.time() if now is None else now
    removed = []
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            if not child.name.startswith("stoker-") or not child.is_dir():
                continue
            with contextlib.suppress(OSError):
                if _read(child / "cgroup.procs").strip() or not _owner_gone(child, now):
                    continue
                child.rmdir()
                removed.append(child)
    return removed


def _owner_gone(cgroup: Path, now: float) -> bool:
    try:
        owner = os.getxattr(cgroup, OWNER_XATTR).decode()
    except OSError:
        return now - cgroup.stat().st_mtime >= STALE_AFTER
    pid = owner.split(":", 1)[0]
    return not pid.isdigit() or process_identity(int(pid)) != owner


# --- one VM's cgroup ---------------------------------------------------------------------------


@dataclass
class VMCgroup:
    """One VM's cgroup: ``async with VMCgroup(parent, name, limits, controllers) as cg``.

    Entering creates it and writes the limit files; the VMM joins it through
    :attr:`procs` before it executes.  Leaving kills whatever is left in it and
    removes it, verified (idempotent).
    """

    parent: Path
    name: str
    limits: CgroupLimits
    controllers: frozenset[str]
    _created: bool = field(default=False, init=False)

    @property
    def path(self) -> Path:
        return self.parent / self.name

    @property
    def procs(self) -> Path:
        """The file a process writes ``0`` to in order to join this cgroup."""
        return self.path / "cgroup.procs"

    def files(self) -> dict[str, str]:
        """The limit files this cgroup gets (see :func:`limit_files`)."""
        return limit_files(self.limits, self.controllers)

    def create(self) -> None:
        try:
            self.path.mkdir()
        except FileExistsError:
            raise InfrastructureError(f"cgroup {self.path} exists already") from None
        except OSError as exc:
            raise InfrastructureError(f"cannot create cgroup {self.path}: {exc}") from exc
        self._created = True
        owner = process_identity(os.getpid())
        if owner is not None:
            # Lets the next stoker remove this cgroup if this process is killed.
            with contextlib.suppress(OSError):
                os.setxattr(self.path, OWNER_XATTR, owner.encode())
        for name, value in self.files().items():
            try:
                (self.path / name).write_text(value)
            except OSError as exc:
                self.remove_empty()
                raise InfrastructureError(
                    f"cannot set {name} = {value} in {self.path}: {exc.strerror or exc}"
                ) from exc

    async def __aenter__(self) -> VMCgroup:
        self.create()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def events(self, name: str) -> dict[str, int]:
        """A flat-keyed file such as ``memory.events`` as numbers (empty if absent)."""
        out: dict[str, int] = {}
        for line in _read(self.path / name).splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    def limit_hit(self) -> str | None:
        """What limit the kernel enforced on this VM, if any (for the error message)."""
        memory = self.events("memory.events")
        if memory.get("oom_kill", 0) or memory.get("oom_group_kill", 0):
            return (
                f"the host's memory limit for this VM (memory.max = "
                f"{self.limits.memory_max_mb} MiB) was reached and the kernel killed its VMM"
            )
        if self.events("pids.events").get("max", 0):
            return f"the VM's host process limit (pids.max = {self.limits.pids_max}) was reached"
        return None

    def limit_error(self, console: str) -> HostLimitExceeded | None:
        """The error for a VMM the kernel stopped at this cgroup's limit, if it did."""
        limit = self.limit_hit()
        if limit is None:
            return None
        return HostLimitExceeded(
            f"the VM was stopped: {limit}",
            console=console,
            hint="give the VM less memory, or raise the allowance for QEMU "
            "(a pool's memory_overhead)",
        )

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.procs).split() if p.isdigit()]

    @classmethod
    def of_process(cls, pid: int, name: str, mount: Path | None = None) -> VMCgroup | None:
        """The cgroup ``name`` that process ``pid`` runs in, taken over from the stoker
        that made it (a VMM adopted after a restart: see :mod:`stoker.vmadopt`).

        None if the process is not in a VM cgroup of that name.  Its limits are
        read back from its files (for the messages); the owner tag becomes ours.
        """
        try:
            relative = own_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
            mount = mount or cgroup2_mount(Path("/proc/self/mountinfo").read_text())
        except OSError:
            return None
        if relative is None or mount is None:
            return None
        path = mount / relative.lstrip("/")
        if path.name != name:
            return None

        def number(file: str, default: int) -> int:
            word = _read(path / file).split(" ", 1)[0].strip()
            return int(word) if word.isdigit() else default

        limits = CgroupLimits(
            memory_max=number("memory.max", 0),
            swap_max=number("memory.swap.max", 0),
            pids_max=number("pids.max", 0),
            cpu_weight=number("cpu.weight", 100),
            cpu_quota_us=None,
        )
        cgroup = cls(path.parent, name, limits, _words(path.parent / "cgroup.subtree_control"))
        cgroup._created = True
        owner = process_identity(os.getpid())
        if owner is not None:
            with contextlib.suppress(OSError):
                os.setxattr(path, OWNER_XATTR, owner.encode())
        return cgroup

    async def aclose(self) -> None:
        """Kill what is left, wait for the cgroup to empty, remove it; verified."""
        if not self._created:
            return
        if not self.path.exists():
            self._created = False
            return
        deadline = time.monotonic() + EMPTY_TIMEOUT
        killed = False
        while self.pids():
            if not killed:
                self._kill()
                killed = True
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f"cgroup {self.path} still holds pids {self.pids()} after SIGKILL"
                )
            await asyncio.sleep(0.02)
        while True:
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # A cgroup whose last process just exited is busy for a moment.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise InfrastructureError(f"cannot remove cgroup {self.path}: {exc}") from exc
                await asyncio.sleep(0.02)
        self._created = False

    def _kill(self) -> None:
        kill = self.path / "cgroup.kill"
        if kill.exists():  # Linux >= 5.14: every process, atomically
            with contextlib.suppress(OSError):
                kill.write_text("1")
                return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove_empty(self) -> None:
        """Remove the cgroup when nothing ever joined it (a failed creation)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()
        self._created = self.path.exists()
