"""Shared fixtures: one cache for the whole run, a private runtime dir, and a leak check.

Real-VM tests share the user's stoker cache (kernel, initramfs, default image are
built once and reused, as ``make demo`` does) but get a private runtime
directory, so the end-of-session check can find any QEMU process the tests
started and failed to reap: a leaked VM fails the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.paths import Dirs


def _processes_mentioning(needle: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline and any(v in cmdline for v in ("qemu", "firecracker", "cloud-hyperv")):
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def _remove_cgroup_parent(name: str) -> list[str]:
    """Remove the session's cgroup parent; the VM cgroups still in it (a leak)."""
    from stoker.isolation.cgroups import cgroup2_mount

    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    parent = None if mount is None else mount / name
    if parent is None or not parent.is_dir():
        return []
    left = [child.name for child in parent.iterdir() if child.is_dir()]
    if not left:
        parent.rmdir()
    return left


@pytest.fixture(scope="session")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("stoker-runtime")
    yield path


@pytest.fixture(scope="session")
def dirs(runtime_dir: Path) -> Dirs:
    """The real cache (shared with `make demo`), a private runtime directory."""
    return Dirs(cache=Dirs.from_env().cache, runtime=runtime_dir)


@pytest.fixture(scope="session")
def boot_artifacts(dirs: Dirs) -> object:
    """Kernel, initramfs and default image, fetched/built once before any VM test."""
    from stoker.artifacts import resolve_artifacts

    return resolve_artifacts(dirs, progress=lambda msg: print(f"[stoker] {msg}"))


@pytest.fixture(autouse=True)
def _vm_prerequisites(request: pytest.FixtureRequest) -> None:
    # Build the shared artifacts outside any single test's time budget (and
    # before CLI tests run stoker as a subprocess with a timeout).
    if request.node.get_closest_marker("vm") is not None:
        request.getfixturevalue("boot_artifacts")


@pytest.fixture(scope="session", autouse=True)
def no_leaked_vms(runtime_dir: Path) -> Iterator[None]:
    """Fail the session if any QEMU process started by the tests is still alive."""
    os.environ["STOKER_RUNTIME_DIR"] = str(runtime_dir)  # CLI subprocesses too
    # `stoker run` restores snapshots but starts no background snapshot makers (processes
    # no test would reap); test_snapshots.py tests the default by unsetting this.
    os.environ["STOKER_SNAPSHOT"] = "reuse"
    # Images with kernel = "auto" boot Debian's kernel throughout, also after the
    # kernel build test has put a microVM kernel in the shared cache: no test's
    # kernel depends on the order the tests ran in.  test_image_vm.py tests "auto".
    os.environ["STOKER_AUTO_KERNEL"] = "debian-cloud"
    # VM cgroups (where this host has cgroup v2) go under a parent of this session's
    # own, removed at the end: a VM cgroup left in it is a leak like a VMM process.
    cgroup_parent = f"stoker-tests-{os.getpid()}"
    os.environ["STOKER_CGROUP_PARENT"] = cgroup_parent
    yield
    cgroups = _remove_cgroup_parent(cgroup_parent)
    assert not cgroups, f"VM cgroups outlived the tests: {cgroups}"
    deadline = time.monotonic() + 5
    leaked = _processes_mentioning(str(runtime_dir))
    while leaked and time.monotonic() < deadline:
        time.sleep(0.2)
        leaked = _processes_mentioning(str(runtime_dir))
    leftovers = [p.name for p in runtime_dir.iterdir()]
    assert not leaked, "QEMU processes outlived the tests:\n" + "\n".join(leaked)
    assert not leftovers, f"VM work directories outlived the tests: {leftovers}"
