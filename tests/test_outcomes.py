"""How a command ended: the agent's evidence, the host's cause, its wording, the limits.

Pure tests: the classification and the messages are golden (``stoker run``, the
service's ``reason`` and the metrics all use them), the agent's limit arithmetic
and its fork-bomb watch run against a cgroup tree of plain files.  The real
thing (a guest kernel's OOM killer, pids.max, a full disk, a panic) is in
``test_hostile_jobs_vm.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stoker.agent import limits
from stoker.outcomes import CAUSES, INFRA_CAUSES, Cause, describe, exec_cause
from stoker.protocol import messages as m
from stoker.protocol.common import ExecResult, JobLimits, default_pids_limit

MiB = 1 << 20


def result(code: int | None = None, sig: int | None = None, **evidence: Any) -> ExecResult:
    ev = m.Evidence(**evidence) if evidence else None
    return ExecResult(code, sig, evidence=ev)


LIMITED = {"cgroup": True, "memory_max": 845 * MiB, "pids_max": 1024}
DISK = {"disk_path": "/", "disk_size": 238 * MiB}

#: (result, cause, message): the golden table.
CASES: list[tuple[ExecResult, Cause, str]] = [
    (result(0, **LIMITED), "exit", "exit status 0"),
    (result(3, **LIMITED), "exit", "exit status 3"),
    (result(None, 15, **LIMITED), "signal", "killed by signal 15 (SIGTERM)"),
    (result(1), "exit", "exit status 1"),  # an old agent: no evidence, no guess
    (
        result(None, 9, oom_kills=3, **LIMITED),
        "oom",
        "the command was killed by the guest's out-of-memory killer (memory limit 845 MiB)",
    ),
    (
        result(None, 9, cgroup=False, oom_kills=1, note="the guest kernel has no cgroup v2"),
        "oom",
        "the command was killed by the guest's out-of-memory killer "
        "(no memory limit: the guest kernel has no cgroup v2)",
    ),
    (
        result(None, 9, killed_for="pids_limit", pids_max_hits=639, **LIMITED),
        "pids_limit",
        "the command kept hitting the guest's process limit (1024 processes; a fork bomb?) "
        "and was killed",
    ),
    (  # a fork bomb whose first shell exited 0: still the agent's kill decides
        result(0, killed_for="pids_limit", pids_max_hits=5, **LIMITED),
        "pids_limit",
        "the command kept hitting the guest's process limit (1024 processes; a fork bomb?) "
        "and was killed",
    ),
    (
        result(2, pids_max_hits=4, **LIMITED),
        "pids_limit",
        "the command failed with exit status 2 after hitting its process limit (1024 processes)",
    ),
    (result(0, pids_max_hits=4, **LIMITED), "exit", "exit status 0"),  # it coped
    (
        result(1, disk_free=2048, **DISK, **LIMITED),
        "disk_full",
        "the command failed with exit status 1 while the guest's disk was full "
        "(/: 0 MiB free of 238 MiB)",
    ),
    (result(0, disk_free=0, **DISK, **LIMITED), "exit", "exit status 0"),  # full, but it succeeded
    (result(1, disk_free=2 * MiB, **DISK, **LIMITED), "exit", "exit status 1"),
    (  # the OOM kill is what ended it, even on a full disk
        result(None, 9, oom_kills=1, disk_free=0, **DISK, **LIMITED),
        "oom",
        "the command was killed by the guest's out-of-memory killer (memory limit 845 MiB)",
    ),
]


@pytest.mark.parametrize(("res", "cause", "message"), CASES)
def test_cause_and_message(res: ExecResult, cause: Cause, message: str) -> None:
    assert exec_cause(res) == cause
    assert describe(cause, res) == message


def test_a_command_that_could_not_start() -> None:
    res = ExecResult(127, None, spawn_error="cannot start nope: No such file or directory")
    assert exec_cause(res) == "spawn_error"
    assert describe("spawn_error", res) == (
        "cannot start the command: cannot start nope: No such file or directory"
    )


def test_only_a_vmm_crash_is_the_infrastructure() -> None:
    assert {"vmm_crash"} == INFRA_CAUSES and set(CAUSES) > INFRA_CAUSES
    assert len(CAUSES) == len(set(CAUSES)) and all(len(c) <= 16 for c in CAUSES)  # the DB column


# --- the evidence on the wire: strict and bounded ----------------------------------------------


def test_exit_carries_evidence() -> None:
    raw = {
        "type": "exit",
        "signal": 9,
        "evidence": {"cgroup": True, "oom_kills": 2, "memory_max": 900 * MiB, "pids_max": 64},
    }
    msg = m.parse(raw)
    assert isinstance(msg, m.Exit) and msg.evidence is not None and msg.evidence.oom_kills == 2


@pytest.mark.parametrize(
    ("evidence", "problem"),
    [
        ({"oom_kills": -1}, "oom_kills"),
        ({"oom_kills": "1"}, "oom_kills"),
        ({"killed_for": "boredom"}, "killed_for"),
        ({"disk_path": "x" * 300}, "disk_path"),
        ({"note": "x" * 300}, "note"),
        ({"pids_max": 0}, "pids_max"),
        ({"memory_max": 1 << 63}, "memory_max"),
        ({"cgroup": 1}, "cgroup"),
        ({"verdict": "oom"}, "verdict"),  # the guest reports, the host decides
    ],
)
def test_bad_evidence_is_refused(evidence: dict[str, Any], problem: str) -> None:
    with pytest.raises(m.InvalidMessage, match=problem):
        m.parse({"type": "exit", "code": 1, "evidence": evidence})


# --- limits: what the host asks for, what the agent applies ------------------------------------


def test_default_limits() -> None:
    assert default_pids_limit(1024) == 1024
    assert default_pids_limit(256) == 512 and default_pids_limit(8192) == 8192
    assert JobLimits().request(1024) == {"memory_mb": None, "memory_reserve_mb": 128, "pids": 1024}
    assert JobLimits(memory_mb=300, pids=50).request(1024)["pids"] == 50


def test_image_defaults_fill_only_what_is_unset() -> None:
    image = {"job_pids_limit": 99, "job_memory_limit": 400}
    assert JobLimits().or_image_defaults(image) == JobLimits(memory_mb=400, pids=99)
    assert JobLimits(pids=7).or_image_defaults(image) == JobLimits(memory_mb=400, pids=7)
    # a hand-edited manifest does not crash the VM
    assert JobLimits().or_image_defaults({"job_pids_limit": True, "job_memory_limit": -1}) == (
        JobLimits()
    )


@pytest.mark.parametrize(
    ("requested", "reserve", "total", "expected"),
    [
        (None, None, 973, 845),  # a 1 GiB guest: its memory minus 128 MiB
        (None, 0, 973, 973),
        (400, None, 973, 400),
        (4000, None, 973, 845),  # never more than the guest minus the reserve
        (None, None, 200, 100),  # a small guest keeps at most half for the agent
        (None, None, 0, 1),
    ],
)
def test_memory_limit_arithmetic(
    requested: int | None, reserve: int | None, total: int, expected: int
) -> None:
    assert limits.memory_limit_mb(requested, reserve, total) == expected


@pytest.fixture
def fake_cgroup_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cgroup v2 root as plain files (the agent reads and writes nothing else).

    Like the kernel, a new cgroup directory comes with its ``cgroup.procs``.
    """
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        Path(path, "cgroup.procs").write_text("")

    monkeypatch.setattr(limits.os, "mkdir", mkdir)
    return root


def never_mount(source: str, target: str, fstype: str) -> None:
    raise AssertionError("cgroup2 is mounted already")


def test_cgroup_with_limits(fake_cgroup_root: Path) -> None:
    root = fake_cgroup_root
    groups = limits.Cgroups(str(root))
    assert groups.setup(never_mount) and groups.note is None
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"
    group = groups.create(300, 64)
    path = Path(group.path)
    assert path.parent == root and path.name.startswith(limits.PREFIX)
    assert (path / "memory.max").read_text() == str(300 * MiB)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "memory.oom.group").read_text() == "1"
    assert (path / "pids.max").read_text() == "64"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 2\n")
    (path / "pids.events").write_text("max 0\n")
    watch = limits.Watch(group, None)
    evidence = watch.evidence()
    assert evidence["cgroup"] and evidence["oom_kills"] == 2
    assert evidence["memory_max"] == 300 * MiB and evidence["pids_max"] == 64
    assert msgspec.convert(evidence, m.Evidence, strict=True).oom_kills == 2  # valid on the wire
    group.close()
    groups.release(group)  # not empty (plain files): kept for later, then swept
    assert groups.leftovers == [str(path)]


def test_a_kernel_without_cgroup_v2_runs_commands_unlimited(tmp_path: Path) -> None:
    def no_cgroup2(source: str, target: str, fstype: str) -> None:
        raise OSError(19, "No such device")

    groups = limits.Cgroups(str(tmp_path / "missing"))
    assert not groups.setup(no_cgroup2)
    assert groups.note == "the guest kernel has no cgroup v2 (No such device)"
    evidence = limits.Watch(None, groups.note).evidence()
    assert evidence["cgroup"] is False and evidence["note"] == groups.note


def test_the_watch_kills_a_command_that_keeps_hitting_its_process_limit(
    fake_cgroup_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = limits.Cgroups(str(fake_cgroup_root))
    groups.setup(never_mount)
    group = groups.create(None, 16)
    events = Path(group.path) / "pids.events"
    clock = [100.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    watch = limits.Watch(group, None)

    def tick(hits: int) -> None:
        events.write_text(f"max {hits}\n")
        watch.sample()
        clock[0] += limits.SAMPLE

    # a build touching the limit for a moment, then backing off: left alone
    for hits in (1, 2, 2, 2, 2, 2, 2):
        tick(hits)
    assert watch.killed_for is None
    # a fork bomb: hits every sample for longer than the grace period
    for hits in range(3, 3 + int(limits.PIDS_GRACE / limits.SAMPLE) + 2):
        tick(hits)
    assert watch.killed_for == "pids_limit"
    assert (Path(group.path) / "cgroup.kill").read_text() == "1"
    assert watch.evidence()["killed_for"] == "pids_limit"


@pytest.mark.parametrize(("hits", "left", "killed"), [(3, 5, True), (0, 5, False), (3, 0, False)])
def test_what_a_command_leaves_behind_is_killed_only_if_it_hit_the_limit(
    fake_cgroup_root: Path, hits: int, left: int, killed: bool
) -> None:
    # A fork bomb that detached from its shell (which exited 0) against a daemon started
    # in the background, or a command whose processes all ended.
    groups = limits.Cgroups(str(fake_cgroup_root))
    groups.setup(never_mount)
    group = groups.create(None, 16)
    (Path(group.path) / "pids.events").write_text(f"max {hits}\n")
    (Path(group.path) / "pids.current").write_text(f"{left}\n")
    watch = limits.Watch(group, None).start()
    watch.finish()
    assert (watch.killed_for == "pids_limit") is killed
    assert (Path(group.path) / "cgroup.kill").exists() is killed


def test_the_watch_records_the_fullest_disk() -> None:
    watch = limits.Watch(None, None)
    watch.sample()
    st = os.statvfs("/")
    evidence = watch.evidence()
    assert evidence["disk_path"] in limits.WATCHED
    assert 0 <= evidence["disk_free"] <= max(st.f_blocks * st.f_frsize, evidence["disk_size"])
