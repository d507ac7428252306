"""Limits on a command's processes inside the guest, and the evidence of how it ended.

Copied into every guest with the agent: standard library only, Python 3.9+.

Each command the host runs gets a cgroup v2 child of its own, created by the
agent (PID 1) under the guest's root cgroup::

    /sys/fs/cgroup/stoker-exec-<n>/   pids.max, memory.max, memory.swap.max = 0,
                                      memory.oom.group = 1 (an OOM kill ends the
                                      whole command, never half of it)

The command enters it between fork and exec (it writes ``0`` to the
``cgroup.procs`` descriptor the agent opened as root: cgroup v2 checks the
opener's credentials, so a command that runs as another user enters too), so
nothing it starts can run outside it.  The agent itself stays in the root
cgroup: a command that exhausts its memory is killed by the guest's OOM killer
within its own cgroup while the agent keeps serving.

A :class:`Watch` follows the command while it runs (a thread, four samples a
second): a command that keeps hitting ``pids.max`` for :data:`PIDS_GRACE`
seconds (a fork bomb) is killed at once instead of at its timeout, and the
least free space of the writable file systems is recorded.  When it ends,
:meth:`Watch.evidence` reports what the host needs to name the cause: OOM kills,
process-limit hits, the limits in force, the least free disk space seen.  The
host decides the cause; the agent only reports what it measured.

A kernel without cgroup v2 (or without the memory and pids controllers) runs
commands unlimited; the evidence then says why (``note``), and OOM kills are
counted from ``/proc/vmstat``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = "/sys/fs/cgroup"
PREFIX = "stoker-exec-"
#: Seconds between two samples of a running command's cgroup and disks.
SAMPLE = 0.25
#: A command that keeps hitting its process limit this long is killed (a fork
#: bomb); a build that touches the limit for a moment and backs off is not.
PIDS_GRACE = 1.0
#: Memory left to the agent and the guest kernel when the host asks for no
#: explicit memory limit (and at least this much is always left).
DEFAULT_RESERVE_MB = 128
#: Writable file systems whose free space is watched (deduplicated by device).
WATCHED = ("/", "/tmp", "/dev/shm")
MB = 1 << 20


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read(4096)


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _counters(path: str) -> Dict[str, int]:
    """A flat-keyed cgroup file (``memory.events``): ``{key: count}``; {} if unreadable."""
    out: Dict[str, int] = {}
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def _number(path: str) -> Optional[int]:
    try:
        text = _read(path).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def mem_total_mb() -> int:
    """The guest's MemTotal in MiB (0 if unknown)."""
    try:
        for line in _read("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def vmstat_oom_kills() -> int:
    """The guest kernel's count of OOM kills since boot (0 if unknown)."""
    try:
        with open("/proc/vmstat") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_limit_mb(requested: Optional[int], reserve: Optional[int], total: int) -> int:
    """The memory.max (MiB) of a command: the request, at most the guest's memory minus the reserve.

    The reserve keeps the agent and the kernel alive whatever the command
    allocates; it is at most half the guest's memory (a small guest still runs
    commands).
    """
    keep = DEFAULT_RESERVE_MB if reserve is None else max(0, reserve)
    keep = min(keep, total // 2)
    ceiling = max(1, total - keep)
    return ceiling if requested is None else max(1, min(requested, ceiling))


class Cgroups:
    """The guest's cgroup v2 hierarchy as the agent uses it (set up on first use)."""

    def __init__(self, root: str = ROOT) -> None:
        self.root = root
        self.ready = False
        #: Why commands run unlimited (None: they do not).
        self.note: Optional[str] = None
        self.controllers: List[str] = []
        self.serial = 0
        self.lock = threading.Lock()
        #: Cgroups whose command left processes behind: removed once empty.
        self.leftovers: List[str] = []

    def setup(self, mount: Callable[[str, str, str], None]) -> bool:
        """Mount cgroup2 if needed and enable memory and pids for children; idempotent."""
        with self.lock:
            if self.ready or self.note is not None:
                return self.ready
            try:
                if not os.path.exists(os.path.join(self.root, "cgroup.controllers")):
                    mount("cgroup2", self.root, "cgroup2")
                available = _read(os.path.join(self.root, "cgroup.controllers")).split()
            except OSError as exc:
                self.note = "the guest kernel has no cgroup v2 (%s)" % (exc.strerror or exc)
                return False
            wanted: List[str] = [c for c in ("memory", "pids") if c in available]
            if not wanted:
                self.note = "the guest kernel has neither the memory nor the pids cgroup controller"
                return False
            try:
                _write(
                    os.path.join(self.root, "cgroup.subtree_control"),
                    " ".join("+" + c for c in wanted),
                )
            except OSError as exc:
                self.note = "cannot enable cgroup controllers: %s" % (exc.strerror or exc)
                return False
            missing = [c for c in ("memory", "pids") if c not in wanted]
            if missing:
                self.note = "the guest kernel has no %s cgroup controller" % missing[0]
            self.controllers = wanted
            self.ready = True
            return True

    def for_command(
        self,
        asked: Dict[str, Any],
        mount: Callable[[str, str, str], None],
        log: Callable[[str], None],
    ) -> "Tuple[Optional[JobCgroup], Optional[str]]":
        """A cgroup with the limits the host ``asked`` for (None: run unlimited), and a note."""
        if not self.setup(mount):
            log("commands run without limits: %s" % self.note)
            return None, self.note
        memory, reserve, pids = (asked.get(k) for k in ("memory_mb", "memory_reserve_mb", "pids"))
        memory_mb = memory_limit_mb(
            int(memory) if memory is not None else None,
            int(reserve) if reserve is not None else None,
            mem_total_mb(),
        )
        try:
            return self.create(memory_mb, int(pids) if pids is not None else None), self.note
        except OSError as exc:
            log("cannot create a cgroup: %s" % exc)
            return None, "cannot create the command's cgroup: %s" % (exc.strerror or exc)

    def create(self, memory_mb: Optional[int], pids: Optional[int]) -> "JobCgroup":
        """A fresh cgroup with the given limits (None: that limit is not set)."""
        with self.lock:
            self.serial += 1
            path = os.path.join(self.root, "%s%d" % (PREFIX, self.serial))
            self._sweep()
        os.mkdir(path)
        group = JobCgroup(path)
        try:
            if "memory" in self.controllers and memory_mb is not None:
                _write(os.path.join(path, "memory.max"), str(memory_mb * MB))
                group.memory_max = memory_mb * MB
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    with contextlib.suppress(OSError):  # no swap accounting: nothing to swap
                        _write(os.path.join(path, name), value)
            if "pids" in self.controllers and pids is not None:
                _write(os.path.join(path, "pids.max"), str(pids))
                group.pids_max = pids
            group.procs_fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            group.close()
            self.release(group)
            raise
        return group

    def release(self, group: "JobCgroup") -> None:
        """Remove ``group`` now if its processes are gone, else once they are."""
        group.close()
        try:
            os.rmdir(group.path)
        except OSError:
            with self.lock:
                self.leftovers.append(group.path)

    def _sweep(self) -> None:
        kept = []
        for path in self.leftovers:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(path)
        self.leftovers = kept


class JobCgroup:
    """One command's cgroup."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.procs_fd = -1
        self.memory_max: Optional[int] = None
        self.pids_max: Optional[int] = None

    def enter(self) -> None:
        """Move the calling process in (runs in the child between fork and exec)."""
        os.write(self.procs_fd, b"0")

    def close(self) -> None:
        if self.procs_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.procs_fd)
            self.procs_fd = -1

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, also those that left the process group."""
        try:
            _write(os.path.join(self.path, "cgroup.kill"), "1")
            return
        except OSError:
            pass  # before Linux 5.14: one by one (a fork bomb may need a few rounds)
        for _ in range(20):
            try:
                pids = [int(p) for p in _read(os.path.join(self.path, "cgroup.procs")).split()]
            except (OSError, ValueError):
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def events(self, name: str) -> Dict[str, int]:
        return _counters(os.path.join(self.path, name))

    def number(self, name: str) -> Optional[int]:
        return _number(os.path.join(self.path, name))


class Watch:
    """Follows one running command: kills a fork bomb, samples free disk space."""

    def __init__(self, group: Optional[JobCgroup], note: Optional[str]) -> None:
        self.group = group
        self.note = note
        self.killed_for: Optional[str] = None
        self.oom_before = vmstat_oom_kills()
        self.disk: Optional[List[Any]] = None  # [path, free, size, free inodes] of the fullest
        self.done = threading.Event()
        self._streak_since: Optional[float] = None
        self._pids_hits = 0
        self._devices = self._watched()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Watch":
        self.thread.start()
        return self

    def _watched(self) -> List[str]:
        seen, paths = set(), []
        for path in WATCHED:
            try:
                dev = os.stat(path).st_dev
            except OSError:
                continue
            if dev not in seen:
                seen.add(dev)
                paths.append(path)
        return paths

    def _run(self) -> None:
        while not self.done.wait(SAMPLE):
            self.sample()
        self.sample()

    def sample(self) -> None:
        """One look at the command's cgroup and the disks (also called at the end)."""
        for path in self._devices:
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            # f_bavail: what allocations may still take (the host makes the scratch
            # disk without reserved blocks, so root gets no more); no free inode
            # is as full as no free block.
            free = st.f_bavail * st.f_frsize if st.f_favail or not st.f_files else 0
            if self.disk is None or free < self.disk[1]:
                self.disk = [path, free, st.f_blocks * st.f_frsize, st.f_favail]
        group = self.group
        if group is None or group.pids_max is None or self.killed_for is not None:
            return
        hits = group.events("pids.events").get("max", 0)
        now = time.monotonic()
        if hits > self._pids_hits:
            if self._streak_since is None:
                self._streak_since = now
            elif now - self._streak_since >= PIDS_GRACE:
                self.killed_for = "pids_limit"
                group.kill()
        else:
            self._streak_since = None
        self._pids_hits = hits

    def finish(self) -> None:
        """The command ended: stop watching (after one last sample).

        What it left behind that has been hitting the process limit is a fork
        bomb that detached from its first shell (``f(){ f|f& }; f`` exits at
        once): it is killed rather than left to slow the guest down.
        Background processes that never met the limit keep running.
        """
        self.done.set()
        self.thread.join()
        group = self.group
        if group is None or self.killed_for is not None:
            return
        if group.events("pids.events").get("max", 0) > 0 and group.number("pids.current"):
            self.killed_for = "pids_limit"
            group.kill()

    def evidence(self) -> Dict[str, Any]:
        """What the host needs to name how the command ended (bounded, JSON-ready)."""
        out: Dict[str, Any] = {"cgroup": self.group is not None}
        group = self.group
        if group is not None:
            memory = group.events("memory.events")
            # oom_kill counts processes killed; oom_group_kill (Linux 5.16+) whole-group kills.
            out["oom_kills"] = max(memory.get("oom_kill", 0), memory.get("oom_group_kill", 0))
            out["pids_max_hits"] = group.events("pids.events").get("max", 0)
            if group.memory_max is not None:
                out["memory_max"] = group.memory_max
            if group.pids_max is not None:
                out["pids_max"] = group.pids_max
            peak = group.number("memory.peak")
            if peak is not None:
                out["memory_peak"] = peak
        else:
            out["oom_kills"] = max(0, vmstat_oom_kills() - self.oom_before)
        if self.killed_for is not None:
            out["killed_for"] = self.killed_for
        if self.disk is not None:
            out["disk_path"], out["disk_free"], out["disk_size"], out["disk_inodes_free"] = (
                self.disk
            )
        if self.note is not None:
            out["note"] = self.note[:256]
        return out
