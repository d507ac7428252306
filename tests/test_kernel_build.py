"""``stoker kernel build``: the stoker-microvm kernel built from Debian's linux-source.

Unit tests (always run) cover the fragment and the ``.config`` check, the
digest, the make command lines, the cache record, publishing and locking (with
the real functions on files created here) and make's progress and failure
handling (with the real ``make`` on tiny Makefiles).

The real build (marked ``vm``) builds the kernel into the shared cache and boots
the default image with it under TCG.  A cold build took 5.5 minutes on a quiet
2-core host and 6.7 to 7.5 minutes on a busy one, under the 10 minutes that
would keep it out of the default run; later runs reuse the cached kernel.
``STOKER_TEST_KERNEL_BUILD=0`` skips it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from stoker.boottimes import record_boot
from stoker.doctor import microvm_check
from stoker.errors import LaunchError, ProvisionError
from stoker.kernel import GUEST_MODULES, Kernel, build_initramfs, cached_kernel
from stoker.kernel import build as kb
from stoker.kernel.build import (
    BUILDER_VERSION,
    KERNEL_NAME,
    MAKE_VARIABLES,
    BuiltKernel,
    MakeProgress,
    Mismatch,
    SourcePackage,
    build_argv,
    cached_microvm_kernel,
    check_config,
    config_argv,
    entry_name,
    fragment_sha256,
    fragment_text,
    kernel_digest,
    load_entry,
    locked,
    parse_config,
    publish,
    run_make,
    source_dependency,
    write_pointer,
)
from stoker.paths import Dirs

SOURCE = SourcePackage("linux-source-6.1", "6.1.192-2")
BUSYBOX = Path("/bin/busybox")
AGENT = {"stoker/__init__.py": b"", "stoker/agent/__main__.py": b"print('agent')\n"}
REAL_BUILD = os.environ.get("STOKER_TEST_KERNEL_BUILD", "1") != "0"


# --- the fragment ----------------------------------------------------------------


def test_parse_config_reads_set_unset_and_strings() -> None:
    text = (
        "#\n# Automatically generated file; DO NOT EDIT.\n#\n"
        "CONFIG_64BIT=y\n"
        "# CONFIG_MODULES is not set\n"
        "CONFIG_VIRTIO_MMIO=m\n"
        'CONFIG_LOCALVERSION=""\n'
        "CONFIG_NR_CPUS=64\n"
        "CONFIG_SWAP=n\n"
        "\n"
        "# a comment that is not an option\n"
    )
    assert parse_config(text) == {
        "CONFIG_64BIT": "y",
        "CONFIG_MODULES": "n",
        "CONFIG_VIRTIO_MMIO": "m",
        "CONFIG_LOCALVERSION": '""',
        "CONFIG_NR_CPUS": "64",
        "CONFIG_SWAP": "n",
    }


@pytest.mark.parametrize("line", ["VIRTIO_MMIO=y", "CONFIG_VIRTIO_MMIO y", "CONFIG_=y"])
def test_parse_config_rejects_typos(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_config(f"CONFIG_64BIT=y\n{line}\n")


def test_shipped_fragment_names_what_the_guest_needs() -> None:
    text = fragment_text()
    options = parse_config(text)
    lines = [ln for ln in text.splitlines() if ln.startswith("CONFIG_")]
    assert len(lines) == len(options), "an option appears twice in microvm.config"
    for option in (
        "64BIT",
        "PVH",
        "KVM_GUEST",
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        "VIRTIO_PCI",
        "VIRTIO_BLK",
        "VIRTIO_CONSOLE",
        "VIRTIO_NET",
        "VIRTIO_VSOCKETS",
        "HW_RANDOM_VIRTIO",
        "EROFS_FS",
        "EROFS_FS_ZIP",
        "SQUASHFS",
        "OVERLAY_FS",
        "EXT4_FS",
        "TMPFS",
        "DEVTMPFS",
        "BLK_DEV_INITRD",
        "RD_GZIP",
        "SERIAL_8250_CONSOLE",
        "UNIX98_PTYS",
        "PRINTK_TIME",
    ):
        assert options[f"CONFIG_{option}"] == "y", option
    for option in ("MODULES", "VT", "INPUT", "SERIO"):
        assert options[f"CONFIG_{option}"] == "n", option


def test_check_config_lists_dropped_and_changed_options() -> None:
    fragment = parse_config(
        "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\nCONFIG_D=n\nCONFIG_E=n\nCONFIG_F=64\nCONFIG_G=n\n"
    )
    config = parse_config(
        "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n# CONFIG_D is not set\nCONFIG_F=32\n"
        "CONFIG_G=y\n"
    )
    assert check_config(fragment, config) == [
        Mismatch("CONFIG_B", "y", "n"),
        Mismatch("CONFIG_C", "y", "m"),
        Mismatch("CONFIG_F", "64", "32"),
        Mismatch("CONFIG_G", "n", "y"),
    ]
    # Absent from .config (dependencies unmet) counts as dropped for y, as off for n.
    assert check_config({"CONFIG_X": "y", "CONFIG_Y": "n"}, {}) == [Mismatch("CONFIG_X", "y", None)]
    assert str(Mismatch("CONFIG_X", "y", None)) == (
        "CONFIG_X: wanted 'y', got absent (unmet dependencies)"
    )
    assert check_config(fragment, fragment) == []


# --- identity and command lines -------------------------------------------------------


def test_digest_is_stable() -> None:
    # Golden: a change here renames every cached kernel; bump BUILDER_VERSION
    # deliberately instead of changing kernel_digest() by accident.
    assert kernel_digest("CONFIG_64BIT=y\n", SOURCE, builder_version=1) == (
        "faa503ab1a584bbd887301463d945ba9c98a5811a974ccbbb0eb1e504a534b75"
    )
    assert kernel_digest(fragment_text(), SOURCE) == kernel_digest(fragment_text(), SOURCE)


def test_digest_depends_on_every_input() -> None:
    base = kernel_digest("CONFIG_64BIT=y\n", SOURCE)
    variants = {
        kernel_digest("CONFIG_64BIT=y\nCONFIG_SMP=y\n", SOURCE),
        kernel_digest("CONFIG_64BIT=y\n", SourcePackage("linux-source-6.1", "6.1.192-3")),
        kernel_digest("CONFIG_64BIT=y\n", SourcePackage("linux-source-6.12", "6.1.192-2")),
        kernel_digest("CONFIG_64BIT=y\n", SOURCE, builder_version=BUILDER_VERSION + 1),
        kernel_digest("CONFIG_64BIT=y\n", SOURCE, make_variables=(*MAKE_VARIABLES, "LLVM=1")),
        kernel_digest("CONFIG_64BIT=y\n", SOURCE, targets=("bzImage",)),
    }
    assert base not in variants and len(variants) == 6
    # Length-prefixed fields: moving bytes between inputs changes the digest.
    assert kernel_digest("a", SourcePackage("bc", "1")) != kernel_digest(
        "ab", SourcePackage("c", "1")
    )


def test_config_argv_golden() -> None:
    assert config_argv(Path("/c/src/linux"), Path("/c/.build/x/obj"), Path("/c/frag")) == [
        "make",
        "-C", "/c/src/linux",
        "O=/c/.build/x/obj",
        "ARCH=x86_64",
        "KBUILD_BUILD_USER=stoker",
        "KBUILD_BUILD_HOST=stoker",
        "KBUILD_BUILD_TIMESTAMP=1970-01-01",
        "KBUILD_BUILD_VERSION=1",
        "KCONFIG_ALLCONFIG=/c/frag",
        "allnoconfig",
    ]  # fmt: skip


def test_build_argv_golden() -> None:
    assert build_argv(Path("/c/src/linux"), Path("/c/obj"), jobs=2) == [
        "nice", "-n", "19",
        "make",
        "-C", "/c/src/linux",
        "O=/c/obj",
        "-j2",
        "ARCH=x86_64",
        "KBUILD_BUILD_USER=stoker",
        "KBUILD_BUILD_HOST=stoker",
        "KBUILD_BUILD_TIMESTAMP=1970-01-01",
        "KBUILD_BUILD_VERSION=1",
        "bzImage",
        "vmlinux",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        build_argv(Path("/s"), Path("/o"), jobs=0)


@pytest.mark.parametrize(
    ("depends", "expected"),
    [
        ("linux-source-6.1 (= 6.1.192-2)", SOURCE),
        ("a, linux-source-6.12 (= 6.12.9-1) | b", SourcePackage("linux-source-6.12", "6.12.9-1")),
        ("linux-source-6.1:all (= 1:6.1-2)", SourcePackage("linux-source-6.1", "1:6.1-2")),
        ("linux-source-6.1", None),  # unversioned: we could not name the build
        ("binutils, xz-utils", None),
        ("", None),
    ],
)
def test_source_dependency(depends: str, expected: SourcePackage | None) -> None:
    assert source_dependency(depends) == expected


def test_source_dir_name_has_no_colon() -> None:
    assert SourcePackage("linux-source-6.1", "1:6.1-2").dir_name == "linux-source-6.1_1%3a6.1-2"


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs apt-cache")
def test_resolve_source_with_the_hosts_apt_lists() -> None:
    try:
        found = kb.resolve_source()
    except LaunchError:
        pytest.skip("linux-source is not in this host's apt lists")
    assert found.package.startswith("linux-source-") and found.version


# --- the record and the cache -----------------------------------------------------------


def _record(root: Path, **changes: object) -> BuiltKernel:
    kernel = BuiltKernel(
        digest="ab" * 32,
        source=SOURCE,
        release="6.1.192",
        root=root,
        fragment_sha256=fragment_sha256(fragment_text()),
        builder_version=BUILDER_VERSION,
        build_seconds=1234.5,
        compiler="gcc (Debian 12.2.0-14) 12.2.0",
    )
    return replace(kernel, **changes)  # type: ignore[arg-type]


def _make_entry(root: Path, kernel: BuiltKernel, builtin: str = "") -> None:
    """The files a finished build leaves in ``root`` (contents are placeholders)."""
    root.mkdir(parents=True)
    (root / "bzImage").write_bytes(b"MZ placeholder")
    (root / "vmlinux").write_bytes(b"\x7fELF placeholder")
    (root / "config").write_text("CONFIG_64BIT=y\n")
    (root / "build.log").write_text("")
    modules = root / "lib" / "modules" / kernel.release
    (modules / "kernel").mkdir(parents=True)
    (modules / "modules.builtin").write_text(builtin)
    (root / "kernel.json").write_text(json.dumps(kernel.to_json()))


def test_record_json_round_trip_and_kernel_compatibility(tmp_path: Path) -> None:
    kernel = _record(tmp_path / "k")
    doc = json.loads(json.dumps(kernel.to_json()))
    assert BuiltKernel.from_json(doc) == kernel
    # The same document reads as a stoker.kernel.Kernel (the initramfs builder's input).
    as_kernel = Kernel.from_json(doc)
    assert as_kernel == kernel.as_kernel()
    assert as_kernel.package == KERNEL_NAME and as_kernel.version == kernel.digest
    assert as_kernel.vmlinuz == kernel.bzimage
    assert kernel.as_kernel(boot="vmlinux") == replace(as_kernel, vmlinuz=kernel.vmlinux)
    assert as_kernel.modules_dir == tmp_path / "k" / "lib" / "modules" / "6.1.192"


@pytest.mark.parametrize(
    "change",
    [
        {"digest": None},
        {"builder_version": "1"},
        {"builder_version": True},
        {"build_seconds": "fast"},
        {"release": "../x"},
        {"root": ""},
    ],
)
def test_record_from_json_rejects_malformed(tmp_path: Path, change: dict[str, object]) -> None:
    doc = {**_record(tmp_path).to_json(), **change}
    with pytest.raises(ValueError):
        BuiltKernel.from_json(doc)


def test_cached_kernel_follows_the_pointer(tmp_path: Path) -> None:
    dirs = Dirs(cache=tmp_path, runtime=tmp_path / "run")
    assert cached_microvm_kernel(dirs) is None
    kernel = _record(dirs.kernels / entry_name("ab" * 32))
    _make_entry(kernel.root, kernel)
    assert load_entry(kernel.root) == kernel
    write_pointer(dirs, kernel)
    assert cached_microvm_kernel(dirs) == kernel
    # The Debian kernel's lookup reads the same pointer (same keys).
    assert cached_kernel(dirs, KERNEL_NAME) == kernel.as_kernel()
    # Built from another fragment: not the kernel the current one asks for.
    assert cached_microvm_kernel(dirs, fragment="CONFIG_64BIT=y\n") is None
    (kernel.root / "vmlinux").unlink()
    assert cached_microvm_kernel(dirs) is None
    (kernel.root / "vmlinux").write_bytes(b"")
    (dirs.kernels / f"{KERNEL_NAME}.json").write_text("{not json")
    assert cached_microvm_kernel(dirs) is None


def test_doctor_says_whether_it_is_built_and_what_it_saves(tmp_path: Path) -> None:
    dirs = Dirs(cache=tmp_path, runtime=tmp_path / "run")
    check = microvm_check(dirs, accel="tcg")
    assert check.status == "warn" and check.detail.startswith("not built; ")
    assert "`stoker kernel build`" in check.detail and "reference machine" in check.detail
    kernel = _record(dirs.kernels / entry_name("ab" * 32))
    _make_entry(kernel.root, kernel)
    write_pointer(dirs, kernel)
    record_boot(dirs, kernel="debian-cloud", accel="tcg", seconds=2.0)
    record_boot(dirs, kernel="stoker-microvm", accel="tcg", seconds=1.0)
    check = microvm_check(dirs, accel="tcg")
    assert check.status == "ok" and check.detail.startswith(f"{kernel.release} built (")
    assert "1.00 s with it, 2.00 s with Debian's kernel (50% less" in check.detail


def test_cached_kernel_refuses_an_old_builder(tmp_path: Path) -> None:
    dirs = Dirs(cache=tmp_path, runtime=tmp_path / "run")
    kernel = _record(dirs.kernels / "old", builder_version=BUILDER_VERSION - 1)
    _make_entry(kernel.root, kernel)
    write_pointer(dirs, kernel)
    assert load_entry(kernel.root) == kernel
    assert cached_microvm_kernel(dirs) is None


def test_load_entry_refuses_a_moved_entry(tmp_path: Path) -> None:
    kernel = _record(tmp_path / "a")
    _make_entry(kernel.root, kernel)
    kernel.root.rename(tmp_path / "b")
    assert load_entry(tmp_path / "b") is None


# --- publishing and locking -------------------------------------------------------


def _complete(path: Path) -> bool:
    return (path / "done").is_file()


def _staged(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "done").write_text(marker)
    return path


def test_publish_renames_into_place(tmp_path: Path) -> None:
    staged = _staged(tmp_path / "work" / "out", "new")
    assert publish(staged, tmp_path / "entry", complete=_complete)
    assert (tmp_path / "entry" / "done").read_text() == "new" and not staged.exists()


def test_publish_keeps_a_complete_entry(tmp_path: Path) -> None:
    _staged(tmp_path / "entry", "first")
    staged = _staged(tmp_path / "work" / "out", "second")
    assert not publish(staged, tmp_path / "entry", complete=_complete)
    assert (tmp_path / "entry" / "done").read_text() == "first" and not staged.exists()


def test_publish_replaces_a_broken_leftover(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "half").write_text("")
    staged = _staged(tmp_path / "work" / "out", "new")
    assert publish(staged, tmp_path / "entry", complete=_complete)
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["done"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []


def test_lock_serialises_builders(tmp_path: Path) -> None:
    lock = tmp_path / ".locks" / "k.lock"
    events: list[str] = []
    holding = threading.Event()

    def second() -> None:
        holding.wait()
        with locked(lock, on_wait=lambda: events.append("waiting")):
            events.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with locked(lock):
        events.append("first")
        holding.set()
        time.sleep(0.3)
        events.append("first done")
    thread.join(10)
    assert events == ["first", "waiting", "first done", "second"]
    with locked(lock, on_wait=lambda: events.append("unexpected wait")):
        pass
    assert events[-1] == "second"


def test_stale_build_dirs_are_removed_by_exact_name(tmp_path: Path) -> None:
    for name in ("k-0123abcd", "k-0123abcd.x", "k-1-0123abcd", "kk-0123abcd", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "k-deadbeef").write_text("")
    kb._remove_stale(tmp_path, "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "k-0123abcd.x",
        "k-1-0123abcd",
        "kk-0123abcd",
        "other",
    ]


# --- the initramfs for a kernel without modules -------------------------------------------


@pytest.mark.skipif(not BUSYBOX.is_file(), reason="needs a static /bin/busybox")
@pytest.mark.parametrize("modules", [(), GUEST_MODULES])
def test_initramfs_for_the_built_kernel_loads_nothing(
    tmp_path: Path, modules: tuple[str, ...]
) -> None:
    dirs = Dirs(cache=tmp_path, runtime=tmp_path / "run")
    kernel = _record(dirs.kernels / "k")
    # What kbuild writes for these drivers when they are built in.
    builtin = "".join(
        f"kernel/drivers/x/{name}.ko\n"
        for name in (
            *GUEST_MODULES,
            "virtio_pci",
            "virtio_net",
            "ext4",
            "vmw_vsock_virtio_transport_common",
        )
    )
    _make_entry(kernel.root, kernel, builtin=builtin)
    initramfs = build_initramfs(dirs, kernel.as_kernel(), agent_files=AGENT, modules=modules)
    assert initramfs.modules == ()
    listing = _cpio_names(gzip.decompress(initramfs.path.read_bytes()))
    assert "lib/modules/load.order" in listing
    assert not [n for n in listing if n.endswith(".ko")]
    other = _record(dirs.kernels / "k2", digest="cd" * 32)
    _make_entry(other.root, other, builtin=builtin)
    second = build_initramfs(dirs, other.as_kernel(), agent_files=AGENT, modules=modules)
    assert second.digest != initramfs.digest  # the kernel's digest is part of the key


def _cpio_names(data: bytes) -> list[str]:
    names: list[str] = []
    offset = 0
    while True:
        header = data[offset : offset + 110]
        namesize = int(header[94:102], 16)
        filesize = int(header[54:62], 16)
        name = data[offset + 110 : offset + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.append(name)
        offset = (offset + 110 + namesize + 3) & ~3
        offset = (offset + filesize + 3) & ~3


# --- make: progress, logging, failure, timeout --------------------------------------------


def test_progress_counts_compiles_and_announces_phases() -> None:
    said: list[str] = []
    progress = MakeProgress(said.append, interval=3600)
    for line in (
        "  CC      init/main.o",
        "  CC      kernel/fork.o",
        "  AR      kernel/built-in.a",
        "  LD      vmlinux.o",
        "  CC      arch/x86/boot/a20.o",
        "  LD      vmlinux",
        "  LD      vmlinux",
        "  BUILD   arch/x86/boot/bzImage",
        "Kernel: arch/x86/boot/bzImage is ready  (#1)",
    ):
        progress.line(line)
    assert progress.compiled == 3
    assert said == ["linking vmlinux (2 files compiled)", "building bzImage (3 files compiled)"]


def test_progress_heartbeat() -> None:
    said: list[str] = []
    progress = MakeProgress(said.append, interval=0)
    progress.line("  CC      init/main.o")
    assert said == ["compiling: 1 files, 0:00 elapsed"]


@pytest.fixture
def makefile_dir(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    yield tmp_path


def test_run_make_logs_and_reports(makefile_dir: Path) -> None:
    (makefile_dir / "Makefile").write_text(
        "all:\n\t@echo '  CC      a.o'\n\t@echo '  CC      b.o'\n\t@echo '  LD      vmlinux'\n"
    )
    log = makefile_dir / "build.log"
    said: list[str] = []
    run_make(["make", "-C", str(makefile_dir)], log=log, say=said.append, timeout=60)
    text = log.read_text()
    assert text.startswith(f"$ make -C {makefile_dir}\n") and "  CC      b.o" in text
    assert said == ["linking vmlinux (2 files compiled)"]


def test_run_make_failure_carries_the_tail(makefile_dir: Path) -> None:
    (makefile_dir / "Makefile").write_text("all:\n\t@echo 'super.c:1: error: boom'\n\t@false\n")
    log = makefile_dir / "build.log"
    with pytest.raises(LaunchError) as info:
        run_make(["make", "-C", str(makefile_dir)], log=log, say=lambda _m: None, timeout=60)
    assert info.value.returncode == 2
    assert "error: boom" in info.value.output and str(log) in (info.value.hint or "")


def test_run_make_timeout_kills_the_whole_group(makefile_dir: Path) -> None:
    marker = makefile_dir / "pid"
    recipe = f"@sh -c 'echo $$$$ > {marker}; exec sleep 60'"
    (makefile_dir / "Makefile").write_text(f"all:\n\t{recipe}\n")
    started = time.monotonic()
    with pytest.raises(LaunchError, match="timed out"):
        run_make(
            ["make", "-C", str(makefile_dir)],
            log=makefile_dir / "log",
            say=lambda _m: None,
            timeout=1.5,
        )
    assert time.monotonic() - started < 30
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "make's child survived the timeout"


def test_missing_tools() -> None:
    assert kb.missing_tools(("sh", "stoker-no-such-tool")) == ["stoker-no-such-tool"]


def test_build_without_tools_explains_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    with pytest.raises(ProvisionError, match="needs apt-cache, apt-get") as info:
        kb.build_microvm_kernel(dirs)
    assert "flex bison" in (info.value.hint or "")
    assert not (tmp_path / "cache").exists()  # nothing downloaded or created


def test_cache_hit_needs_no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    kernel = _record(dirs.kernels / entry_name("ab" * 32))
    _make_entry(kernel.root, kernel)
    write_pointer(dirs, kernel)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert kb.build_microvm_kernel(dirs) == kernel


# --- the real build -------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.timeout(4 * 3600)
@pytest.mark.skipif(not REAL_BUILD, reason="STOKER_TEST_KERNEL_BUILD=0: no kernel build")
def test_real_build(dirs: Dirs) -> None:
    kernel = kb.build_microvm_kernel(dirs, progress=lambda msg: print(f"[stoker] {msg}"))
    assert kernel.is_complete() and cached_microvm_kernel(dirs) == kernel
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert kernel.bzimage.read_bytes()[0x202:0x206] == b"HdrS"  # Linux boot protocol
    config = parse_config(kernel.config.read_text())
    assert check_config(parse_config(fragment_text()), config) == []
    assert list((kernel.modules_dir / "kernel").iterdir()) == []  # no modules
    out = subprocess.run(
        ["readelf", "-n", str(kernel.vmlinux)], capture_output=True, text=True, check=False
    )
    if out.returncode == 0:
        assert "Xen" in out.stdout  # the PVH entry point is a XEN_ELFNOTE_PHYS32_ENTRY note
    # A second call is a cache hit: a pointer read, no apt, no make.
    started = time.monotonic()
    assert kb.build_microvm_kernel(dirs) == kernel
    assert time.monotonic() - started < 1


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(4 * 3600)
@pytest.mark.skipif(not REAL_BUILD, reason="STOKER_TEST_KERNEL_BUILD=0: no kernel build")
async def test_real_build_boots_the_default_image(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import stoker.vm
    from stoker.agent.bundle import agent_files
    from stoker.artifacts import BootArtifacts, resolve_artifacts

    kernel = await asyncio.to_thread(kb.build_microvm_kernel, dirs)
    initramfs = build_initramfs(
        dirs,
        kernel.as_kernel(),
        agent_files=agent_files(),
        modules=(),
        pci_modules=(),
        nic_modules=(),
    )

    # The default image with this kernel and its initramfs (until images built
    # with kernel = "stoker-microvm" boot it through resolve_artifacts itself).
    def with_microvm_kernel(*args: object, **kwargs: object) -> BootArtifacts:
        found = resolve_artifacts(*args, **kwargs)  # type: ignore[arg-type]
        return BootArtifacts(kernel=kernel.as_kernel(), initrd=initramfs.path, image=found.image)

    monkeypatch.setattr(stoker.vm, "resolve_artifacts", with_microvm_kernel)
    async with stoker.vm.VM(accel="tcg", dirs=dirs, cpus=2, memory="1G") as vm:
        shell = "uname -r; nproc; ls /sys/bus/virtio/devices | wc -l"
        res = await vm.exec(["sh", "-c", shell], check=True)
        release, cpus, devices = res.stdout.decode().split()
        py = (
            "import os, socket; os.urandom(16); socket.socket(socket.AF_VSOCK).close(); print('ok')"
        )
        res = await vm.exec(["python3", "-c", py], check=True)
        assert res.stdout == b"ok\n"
        assert release == kernel.release and cpus == "2" and int(devices) >= 3


@pytest.mark.vm
@pytest.mark.timeout(4 * 3600)
@pytest.mark.skipif(not REAL_BUILD, reason="STOKER_TEST_KERNEL_BUILD=0: no kernel build")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
@pytest.mark.parametrize("image", ["bzImage", "vmlinux"])
def test_probe_boot_powers_off(dirs: Dirs, image: str) -> None:
    """init.sh's probe mode ends with poweroff: QEMU must exit by itself (ACPI sleep)."""
    from stoker.agent.bundle import agent_files
    from stoker.backends.qemu import host_tsc_khz

    kernel = kb.build_microvm_kernel(dirs)
    initramfs = build_initramfs(
        dirs,
        kernel.as_kernel(),
        agent_files=agent_files(),
        modules=(),
        pci_modules=(),
        nic_modules=(),
    )
    tsc = host_tsc_khz()
    cmdline = "console=ttyS0 panic=-1 quiet stoker.probe=1" + (
        f" tsc_early_khz={tsc}" if tsc else ""
    )
    argv = [
        "qemu-system-x86_64",
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "256",
        "-smp", "2",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(kernel.bzimage if image == "bzImage" else kernel.vmlinux),
        "-initrd", str(initramfs.path),
        "-append", cmdline,
        "-serial", "stdio",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console = out.decode(errors="replace")
    assert proc.returncode == 0, console
    assert "STOKER-PROBE-OK" in console.splitlines(), console
    assert "stoker-init: error" not in console, console
