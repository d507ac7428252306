"""Host-side isolation: limit files (golden), cgroup detection on a stand-in tree, the VMM user.

The stand-in tree (``fake_tree``) is a directory shaped like a cgroup2 mount,
for the cases this host cannot show (a delegated systemd unit, a shared
login scope, a host with every controller on v2).  Tests on the host's real
cgroup v2 are in ``tests/test_isolation_host.py``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.errors import UsageError
from stoker.isolation import Isolation, check_mode
from stoker.isolation.cgroups import (
    DAEMON_LEAF,
    VMS_CHILD,
    VMCgroup,
    cgroup2_mount,
    own_cgroup,
    prepare_parent,
    probe,
)
from stoker.isolation.limits import (
    CgroupLimits,
    LimitPolicy,
    describe,
    limit_files,
    limits_for,
    tb_cache_mb,
)
from stoker.isolation.vmmuser import RunAs, resolve_user, unreadable

GOLDEN = Path(__file__).parent / "golden" / "cgroup-limits.json"
ALL = frozenset({"memory", "pids", "cpu"})

CASES: dict[str, tuple[CgroupLimits, frozenset[str]]] = {
    "tcg-2cpu-1G-default": (
        limits_for(LimitPolicy(), cpus=2, memory_mb=1024, accel="tcg", host_memory_mb=24_000),
        ALL,
    ),
    "kvm-4cpu-2G-quota": (
        limits_for(
            LimitPolicy(overhead_mb=96, pids=512, cpu_weight=300, cpu_quota=1.5),
            cpus=4,
            memory_mb=2048,
            accel="kvm",
            host_memory_mb=64_000,
        ),
        ALL,
    ),
    "tcg-small-host-swap": (
        limits_for(
            LimitPolicy(swap_mb=256), cpus=1, memory_mb=512, accel="tcg", host_memory_mb=1536
        ),
        ALL,
    ),
    "memory-only": (
        limits_for(LimitPolicy(), cpus=2, memory_mb=1024, accel="kvm", host_memory_mb=8192),
        frozenset({"memory"}),
    ),
    "no-controllers": (
        limits_for(LimitPolicy(), cpus=2, memory_mb=1024, accel="kvm", host_memory_mb=8192),
        frozenset(),
    ),
}


def test_golden_limit_files() -> None:
    got = {name: limit_files(*case) for name, case in sorted(CASES.items())}
    if os.environ.get("STOKER_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(GOLDEN.read_text()), (
        f"regenerate with STOKER_UPDATE_GOLDEN=1 if intended ({GOLDEN})"
    )


def test_memory_budget_covers_qemu_and_its_tcg_cache() -> None:
    tcg = limits_for(LimitPolicy(), cpus=2, memory_mb=1024, accel="tcg", host_memory_mb=24_000)
    kvm = limits_for(LimitPolicy(), cpus=2, memory_mb=1024, accel="kvm", host_memory_mb=24_000)
    assert kvm.memory_max_mb == 1024 + 256
    assert tcg.memory_max_mb == 1024 + 256 + 1024  # QEMU 7.2's default tb-size
    assert tb_cache_mb(24_000) == 1024
    assert tb_cache_mb(1024) == 128  # hosts under 2 GiB: an eighth of their RAM
    assert tcg.cpu_weight == 200 and tcg.cpu_quota_us is None
    assert describe(tcg, ALL) == ("memory.max 2304 MiB, pids.max 256, cpu.weight 200, no quota")
    assert describe(tcg, frozenset()) == "no limits (no controller delegated)"


MOUNTINFO_HYBRID = """\
25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
MOUNTINFO_UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n"


def test_parse_mountinfo_and_proc_cgroup() -> None:
    assert cgroup2_mount(MOUNTINFO_HYBRID) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount(MOUNTINFO_UNIFIED) == Path("/sys/fs/cgroup")
    assert cgroup2_mount(MOUNTINFO_HYBRID.splitlines()[1]) is None
    assert own_cgroup("4:memory:/x\n0::/system.slice/stoker.service\n") == (
        "/system.slice/stoker.service"
    )
    assert own_cgroup("0::/\n") == "/"
    assert own_cgroup("4:memory:/x\n") is None


# --- detection on a stand-in tree ---------------------------------------------------------------

PID = 4242
UNIT = "system.slice/stoker.service"


def _cgroup(path: Path, *, controllers: str = "", procs: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.controllers").write_text(controllers + "\n")
    (path / "cgroup.subtree_control").write_text("\n")
    (path / "cgroup.procs").write_text(procs)
    return path


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    """A stand-in cgroup2 mount: root, system.slice, and a delegated stoker.service."""
    mount = _cgroup(tmp_path / "cgroup", controllers="cpuset cpu io memory hugetlb pids")
    _cgroup(mount / "system.slice", controllers="cpu io memory pids")
    unit = _cgroup(mount / UNIT, controllers="cpu io memory pids", procs=f"{PID}\n")
    os.setxattr(unit, "user.delegate", b"1")  # what systemd's Delegate=yes marks
    return mount


def test_delegated_unit_alone_moves_into_a_leaf(fake_tree: Path) -> None:
    support = probe(mount=fake_tree, own=f"/{UNIT}", pid=PID)
    assert support.usable and support.move_self and not support.reason
    assert support.parent == fake_tree / UNIT / VMS_CHILD
    assert support.controllers == ALL

    assert prepare_parent(support) == support.parent
    unit = fake_tree / UNIT
    # The writer moved itself ("0") into the leaf before controllers were enabled.
    assert (unit / DAEMON_LEAF / "cgroup.procs").read_text() == "0"
    assert (unit / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (unit / VMS_CHILD / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_already_in_the_daemon_leaf(fake_tree: Path) -> None:
    _cgroup(fake_tree / UNIT / DAEMON_LEAF, controllers="cpu memory pids", procs=f"{PID}\n")
    (fake_tree / UNIT / "cgroup.procs").write_text("")
    support = probe(mount=fake_tree, own=f"/{UNIT}/{DAEMON_LEAF}", pid=PID)
    assert support.parent == fake_tree / UNIT / VMS_CHILD and not support.move_self


def test_shared_cgroup_is_not_rearranged(fake_tree: Path) -> None:
    (fake_tree / UNIT / "cgroup.procs").write_text(f"{PID}\n77\n78\n")
    support = probe(mount=fake_tree, own=f"/{UNIT}", pid=PID)
    assert not support.usable
    assert "shares its cgroup system.slice/stoker.service with 2 other" in support.reason
    assert "Delegate=yes" in support.fix


def test_undelegated_cgroup_is_left_alone(fake_tree: Path) -> None:
    scope = _cgroup(fake_tree / "user.slice/session-3.scope", procs=f"{PID}\n")
    support = probe(mount=fake_tree, own="/user.slice/session-3.scope", pid=PID)
    assert not support.usable
    assert "not delegated" in support.reason and scope.exists()


def test_root_of_the_hierarchy(fake_tree: Path) -> None:
    (fake_tree / "cgroup.procs").write_text(f"1\n{PID}\n")
    support = probe(mount=fake_tree, own="/", pid=PID)
    assert support.parent == fake_tree / VMS_CHILD and not support.move_self
    assert support.controllers == ALL


def test_configured_parent(fake_tree: Path) -> None:
    support = probe(parent=Path("stoker.slice"), mount=fake_tree, own=f"/{UNIT}", pid=PID)
    assert support.parent == fake_tree / "stoker.slice" and not support.move_self
    outside = probe(parent=Path("/tmp/elsewhere"), mount=fake_tree, own="/", pid=PID)
    assert not outside.usable and "is not under" in outside.reason


def test_missing_controllers_named(fake_tree: Path) -> None:
    (fake_tree / UNIT / "cgroup.controllers").write_text("memory\n")
    support = probe(mount=fake_tree, own=f"/{UNIT}", pid=PID)
    assert support.usable and support.controllers == {"memory"}
    assert support.missing == ("pids", "cpu")
    assert support.reason.startswith("pids, cpu not offered to")


def test_no_cgroup2(tmp_path: Path) -> None:
    support = probe(mount=tmp_path, own="/", pid=PID)
    assert not support.usable and support.reason == "no cgroup v2 file system is mounted"


def test_required_fails_where_unavailable(fake_tree: Path) -> None:
    """``required`` refuses with the reason; ``auto`` carries on (checked on the real host)."""
    assert check_mode("required") == "required"
    with pytest.raises(UsageError, match="--cgroups must be auto, required or off, not 'on'"):
        check_mode("on", what="--cgroups")
    iso = Isolation.from_env({"STOKER_CGROUPS": "off", "STOKER_CGROUP_PARENT": "a/b"})
    assert iso.cgroups == "off" and iso.parent == Path("a/b")
    assert Isolation.from_env({}, cgroups="required").cgroups == "required"


# --- the VMM user --------------------------------------------------------------------------------


def test_unknown_or_root_vmm_user_refused() -> None:
    with pytest.raises(UsageError, match="vmm_user 'no-such-user-x' does not exist") as info:
        resolve_user("no-such-user-x")
    assert info.value.hint is not None and "useradd --system" in info.value.hint
    with pytest.raises(UsageError, match="is root"):
        resolve_user("root")
    nobody = resolve_user("nobody")
    assert nobody.uid == pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is under a private 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="stoker-isolation-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_unreadable_names_the_file(open_dir: Path) -> None:
    user = RunAs(name="vmm", uid=54321, gid=54321, groups=())
    cache = open_dir / "cache"
    cache.mkdir(mode=0o755)
    image = cache / "rootfs.erofs"
    image.write_bytes(b"x")
    image.chmod(0o600)
    assert unreadable(user, [image]) == f"vmm cannot read {image} (mode -rw-------)"
    os.chown(image, -1, 54321)
    image.chmod(0o640)
    assert unreadable(user, [image]) is None
    assert unreadable(user, [image], write=True) is not None
    cache.chmod(0o700)
    assert unreadable(user, [image]) == f"vmm cannot enter {cache} (mode drwx------)"


def test_limit_hit_reads_the_kernels_counters(tmp_path: Path) -> None:
    """What :class:`VMCgroup` reports once the kernel enforced a limit (stand-in files)."""
    limits = limits_for(LimitPolicy(), cpus=1, memory_mb=512, accel="kvm", host_memory_mb=8192)
    cgroup = VMCgroup(tmp_path, "vm", limits, ALL)
    cgroup.path.mkdir()
    assert cgroup.limit_hit() is None  # no counters at all (no controllers)
    (cgroup.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    (cgroup.path / "pids.events").write_text("max 0\n")
    assert cgroup.limit_hit() is None  # reclaim at memory.max, nobody killed
    (cgroup.path / "pids.events").write_text("max 2\n")
    assert cgroup.limit_hit() == "the VM's host process limit (pids.max = 256) was reached"
    (cgroup.path / "memory.events").write_text("oom 1\noom_kill 1\noom_group_kill 1\n")
    assert cgroup.limit_hit() == (
        "the host's memory limit for this VM (memory.max = 768 MiB) was reached and the "
        "kernel killed its VMM"
    )
