"""Accelerator choice: KVM only where a guest really boots under it, else TCG with a warning."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stoker.backends.accel import ProbeVerdict, probe_key, probe_kvm, resolve_accel, store_verdict
from stoker.backends.qemu import QemuBackend
from stoker.errors import AccelError
from stoker.paths import Dirs


@pytest.fixture
def fake_boot(tmp_path: Path) -> tuple[Dirs, Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run"), kernel, initrd


async def _resolve(request: str, boot: tuple[Dirs, Path, Path]) -> tuple[str, str | None]:
    dirs, kernel, initrd = boot
    return await resolve_accel(
        request,  # type: ignore[arg-type]
        dirs=dirs,
        backend=QemuBackend(),
        kernel=kernel,
        initrd=initrd,
        workdir=dirs.runtime,
    )


async def test_tcg_request_never_probes(fake_boot: tuple[Dirs, Path, Path]) -> None:
    assert await _resolve("tcg", fake_boot) == ("tcg", None)
    assert not (fake_boot[0].cache / "kvm-probe.json").exists()


@pytest.mark.parametrize("usable", [True, False])
async def test_cached_verdict_decides(fake_boot: tuple[Dirs, Path, Path], usable: bool) -> None:
    dirs, kernel, initrd = fake_boot
    store_verdict(dirs, ProbeVerdict(usable, "guest hung at boot", 15.0, probe_key(kernel, initrd)))
    accel, warning = await _resolve("auto", fake_boot)
    if usable:
        assert (accel, warning) == ("kvm", None)
    else:
        assert accel == "tcg" and warning is not None and "guest hung at boot" in warning
        assert "\n" not in warning  # one line
        with pytest.raises(AccelError, match="KVM was requested"):
            await _resolve("kvm", fake_boot)


async def test_stale_verdict_is_ignored(fake_boot: tuple[Dirs, Path, Path]) -> None:
    dirs, kernel, initrd = fake_boot
    store_verdict(dirs, ProbeVerdict(True, "old host", 1.0, "some-other-key"))
    kernel.write_bytes(b"a different kernel")
    from stoker.backends.accel import cached_verdict

    assert cached_verdict(dirs, kernel, initrd) is None


@pytest.mark.vm
async def test_real_probe_is_bounded(dirs: Dirs, tmp_path: Path) -> None:
    """Whatever this host's KVM does, the probe answers within its bound."""
    from stoker.artifacts import resolve_artifacts

    art = resolve_artifacts(dirs)
    started = time.monotonic()
    verdict = await probe_kvm(QemuBackend(), art.kernel.vmlinuz, art.initrd, tmp_path, timeout=15)
    assert time.monotonic() - started < 15 + 40  # probe timeout plus a verified kill
    assert verdict.reason
    assert verdict.key == probe_key(art.kernel.vmlinuz, art.initrd)
