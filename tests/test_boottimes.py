"""Cold-boot times kept per kernel, and what ``stoker doctor`` says of the microVM kernel."""

from __future__ import annotations

import json
from pathlib import Path

from stoker import boottimes
from stoker.paths import Dirs


def _dirs(tmp_path: Path) -> Dirs:
    return Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")


def test_boots_are_recorded_per_kernel_and_accel_and_bounded(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path)
    for i in range(boottimes.KEEP + 5):
        boottimes.record_boot(dirs, kernel="debian-cloud", accel="tcg", seconds=2.0 + i / 100)
    boottimes.record_boot(dirs, kernel="stoker-microvm", accel="tcg", seconds=1.5)
    boottimes.record_boot(dirs, kernel="debian-cloud", accel="kvm", seconds=0.4)
    stats = boottimes.boot_stats(dirs)
    debian = stats[("debian-cloud", "tcg")]
    assert debian.count == boottimes.KEEP  # the oldest five were dropped
    assert debian.median == 2.0 + (5 + 24) / 2 / 100
    assert stats[("stoker-microvm", "tcg")].median == 1.5
    assert stats[("debian-cloud", "kvm")].count == 1


def test_only_qemu_boots_of_the_two_named_kernels_count(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path)
    record = boottimes.record_cold_boot
    record(dirs, backend="qemu", package="linux-image-6.1.0-57-cloud-amd64", accel="tcg", seconds=2)
    record(dirs, backend="qemu", package="stoker-microvm", accel="tcg", seconds=1)
    record(dirs, backend="firecracker", package="stoker-microvm", accel="kvm", seconds=0.1)
    record(dirs, backend="qemu", package="linux-image-6.1.0-57-amd64", accel="tcg", seconds=9)
    assert set(boottimes.boot_stats(dirs)) == {("debian-cloud", "tcg"), ("stoker-microvm", "tcg")}


def test_a_damaged_record_is_ignored_and_replaced(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path)
    path = dirs.cache / "stats" / boottimes.RECORD
    path.parent.mkdir(parents=True)
    for junk in ("not json", "[1, 2]", json.dumps({"debian-cloud/tcg": ["x", -1, 1e9, True]})):
        path.write_text(junk)
        assert boottimes.boot_stats(dirs) == {}
    boottimes.record_boot(dirs, kernel="debian-cloud", accel="tcg", seconds=2.5)
    assert boottimes.boot_stats(dirs)[("debian-cloud", "tcg")].median == 2.5
    assert not list(path.parent.glob(f".{boottimes.RECORD}.*[!k]"))  # no temporary left


def test_recording_never_fails_the_boot(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    boottimes.record_boot(_dirs(tmp_path), kernel="debian-cloud", accel="tcg", seconds=2)


def test_advice_uses_this_hosts_boots_then_the_reference(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path)
    reference = boottimes.microvm_advice(dirs, built=False, accel="tcg")
    assert "stoker kernel build" in reference and "reference machine" in reference
    assert f"{boottimes.REFERENCE_TCG['stoker-microvm']:.2f} s" in reference
    for _ in range(3):
        boottimes.record_boot(dirs, kernel="debian-cloud", accel="tcg", seconds=3.0)
    scaled = boottimes.microvm_advice(dirs, built=False, accel="tcg")
    ratio = boottimes.REFERENCE_TCG["stoker-microvm"] / boottimes.REFERENCE_TCG["debian-cloud"]
    assert f"about {3.0 * ratio:.2f} s instead of 3.00 s (median of 3 boots here)" in scaled
    boottimes.record_boot(dirs, kernel="stoker-microvm", accel="tcg", seconds=1.5)
    measured = boottimes.microvm_advice(dirs, built=True, accel="tcg")
    assert "1.50 s with it, 3.00 s with Debian's kernel (50% less" in measured
