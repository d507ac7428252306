"""Guest kernel provisioning, module closure, cpio writer, initramfs and init.sh.

Unit tests use synthetic ELF modules and fake kernel trees.  Tests marked ``vm``
download Debian's cloud kernel with apt (once per session, into a temporary
cache) and boot it under TCG in probe mode and through the whole init path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.errors import LaunchError, ProvisionError
from stoker.kernel import (
    GUEST_MODULES,
    CpioWriter,
    Initramfs,
    Kernel,
    build_initramfs,
    builtin_modules,
    cached_kernel,
    index_modules,
    init_script,
    module_name,
    provision_kernel,
    read_modinfo,
    read_module,
    resolve_closure,
)
from stoker.kernel import debian as debian_mod
from stoker.kernel import initramfs as initramfs_mod
from stoker.kernel.modules import is_static_elf, parse_modinfo
from stoker.paths import Dirs

BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
AGENT = {
    "stoker/__init__.py": b"",
    "stoker/agent/__init__.py": b"",
    "stoker/agent/__main__.py": b"print('agent')\n",
}


# --- helpers ------------------------------------------------------------------


def make_elf(sections: dict[str, bytes], *, interp: bool = False) -> bytes:
    """A minimal little-endian ELF64 file with the given sections (and maybe PT_INTERP)."""
    names = [*sections, ".shstrtab"]
    shstrtab = b"\0"
    name_off = {}
    for n in names:
        name_off[n] = len(shstrtab)
        shstrtab += n.encode() + b"\0"
    data = {**sections, ".shstrtab": shstrtab}
    phnum = 1 if interp else 0
    body = b""
    pos = 64 + 56 * phnum
    offsets = {}
    for n in names:
        offsets[n] = pos + len(body)
        body += data[n]
    body += b"\0" * (-(pos + len(body)) % 8)
    shoff = pos + len(body)
    phdrs = b""
    if interp:
        phdrs = struct.pack("<IIQQQQQQ", 3, 4, 0, 0, 0, 0, 0, 1)
    shdrs = bytes(64)
    for n in names:
        sh_type = 3 if n == ".shstrtab" else 1
        shdrs += struct.pack(
            "<IIQQQQIIQQ", name_off[n], sh_type, 0, 0, offsets[n], len(data[n]), 0, 0, 1, 0
        )
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack(
        "<HHIQQQIHHHHHH",
        1,  # ET_REL
        62,  # x86-64
        1,
        0,
        64 if interp else 0,
        shoff,
        0,
        64,
        56,
        phnum,
        64,
        len(names) + 1,
        len(names),
    )
    return ehdr + phdrs + body + shdrs


def make_module(name: str, depends: Sequence[str] = (), softdep: str | None = None) -> bytes:
    info = [f"name={name}", f"depends={','.join(depends)}", "license=GPL", "alias=a1", "alias=a2"]
    if softdep is not None:
        info.append(f"softdep={softdep}")
    modinfo = b"".join(e.encode() + b"\0" for e in info) + b"\0\0"
    return make_elf({".text": b"\x90" * 16, ".modinfo": modinfo})


RELEASE = "9.9.9-test"


def make_tree(root: Path) -> Path:
    """A fake module tree exercising depends, softdeps, built-ins and compression."""
    mods = root / "lib" / "modules" / RELEASE
    kdir = mods / "kernel"

    def put(rel: str, data: bytes) -> None:
        path = kdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    put("drivers/a.ko", make_module("a", ["b", "c"]))
    put("drivers/b.ko", make_module("b", ["c"]))
    put("drivers/c.ko", make_module("c"))
    put("drivers/d-e.ko", make_module("d_e", ["c"]))
    put("fs/f.ko", make_module("f", [], softdep="pre: g crc32c-alias post: h"))
    put("fs/g.ko", make_module("g"))
    put("fs/h.ko", make_module("h"))
    put("fs/usesbuiltin.ko", make_module("usesbuiltin", ["bi"]))
    put("fs/cyc1.ko", make_module("cyc1", ["cyc2"]))
    put("fs/cyc2.ko", make_module("cyc2", ["cyc1"]))
    put("fs/soft1.ko", make_module("soft1", [], softdep="pre: soft2"))
    put("fs/soft2.ko", make_module("soft2", [], softdep="pre: soft1"))
    put("fs/broken.ko", make_module("broken", ["nothere"]))
    put("comp/xzmod.ko.xz", lzma.compress(make_module("xzmod", ["c"]), format=lzma.FORMAT_XZ))
    put("comp/gzmod.ko.gz", gzip.compress(make_module("gzmod", ["xzmod"])))
    if shutil.which("zstd"):
        zst = subprocess.run(
            ["zstd", "-q", "-c"], input=make_module("zstmod", ["gzmod"]), capture_output=True
        ).stdout
        put("comp/zstmod.ko.zst", zst)
    (mods / "modules.builtin").write_text("kernel/lib/bi.ko\nkernel/crypto/crc32c-generic.ko\n")
    (mods / "modules.order").write_text("")
    boot = root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / f"vmlinuz-{RELEASE}").write_bytes(b"not a kernel")
    (boot / f"config-{RELEASE}").write_text("CONFIG_EROFS_FS=m\nCONFIG_EXT4_FS=y\n")
    return mods


def fake_kernel(root: Path) -> Kernel:
    mods = make_tree(root)
    return Kernel(
        package=f"linux-image-{RELEASE}",
        version="1.0-1",
        release=RELEASE,
        root=root,
        vmlinuz=root / "boot" / f"vmlinuz-{RELEASE}",
        modules_dir=mods,
        config=root / "boot" / f"config-{RELEASE}",
    )


def cpio_extract(archive: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        # dev/console would need mknod; everything else is compared.
        ["cpio", "-idm", "--no-absolute-filenames", "--quiet", "-f", "dev/console"],
        input=archive,
        cwd=dest,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr.decode()


def cpio_list(archive: bytes) -> dict[str, str]:
    """name -> `ls -l`-style mode string, from `cpio -tv`."""
    proc = subprocess.run(["cpio", "-tv", "--quiet"], input=archive, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    out = {}
    for line in proc.stdout.decode().splitlines():
        fields = line.split()
        # mode links user group size-or-"major, minor" Jan 1 1970 name [-> target]
        name = fields[fields.index("1970") + 1]
        out[name] = fields[0]
    return out


def parse_newc(data: bytes) -> list[tuple[str, dict[str, int], bytes]]:
    """An independent newc reader: (name, header fields, data) per entry, trailer included."""
    keys = "ino mode uid gid nlink mtime size devmajor devminor rdevmajor rdevminor namesize check"
    entries = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        fields = dict(
            zip(
                keys.split(),
                (int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)),
                strict=True,
            )
        )
        pos += 110
        name = data[pos : pos + fields["namesize"] - 1].decode()
        assert data[pos + fields["namesize"] - 1] == 0
        pos += fields["namesize"]
        pos += -pos % 4
        body = data[pos : pos + fields["size"]]
        pos += fields["size"]
        pos += -pos % 4
        entries.append((name, fields, body))
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries


# --- cpio ---------------------------------------------------------------------


def _sample_archive() -> bytes:
    import io

    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("bin")
    w.add_dir("etc", mode=0o700)
    w.add_dir("etc/deep")
    for n in range(6):  # every padding remainder
        w.add_file(f"etc/deep/f{n}", b"x" * n, mode=0o600 + n)
    w.add_file("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755)
    w.add_symlink("bin/sh", "tool")
    w.add_symlink("abs", "/etc/deep/f1")
    w.add_file("/leading-slash", b"stripped")
    w.add_chardev("console", 5, 1)
    w.close()
    w.close()  # idempotent
    return buf.getvalue()


def test_cpio_round_trip_through_gnu_cpio(tmp_path: Path) -> None:
    archive = _sample_archive()
    cpio_extract(archive, tmp_path)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "etc").stat().st_mode & 0o7777 == 0o700
    for n in range(6):
        f = tmp_path / f"etc/deep/f{n}"
        assert f.read_bytes() == b"x" * n
        assert f.stat().st_mode & 0o7777 == 0o600 + n
        assert f.stat().st_mtime == 0
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert os.readlink(tmp_path / "abs") == "/etc/deep/f1"
    assert (tmp_path / "leading-slash").read_bytes() == b"stripped"
    listing = cpio_list(archive)
    assert listing["console"].startswith("crw-------")
    assert listing["bin"].startswith("drwxr-xr-x")


def test_cpio_is_deterministic_and_well_formed() -> None:
    archive = _sample_archive()
    assert archive == _sample_archive()
    entries = parse_newc(archive)
    assert [e[0] for e in entries][:3] == ["bin", "etc", "etc/deep"]
    assert [e[1]["ino"] for e in entries[:-1]] == list(range(1, len(entries)))
    for _name, fields, _body in entries:
        assert fields["uid"] == fields["gid"] == fields["mtime"] == 0
    console = next(f for n, f, _ in entries if n == "console")
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert len(archive) % 4 == 0


@settings(max_examples=50, deadline=None)
@given(
    files=st.dictionaries(
        st.text(alphabet="abcdefgh_.-", min_size=1, max_size=12).filter(
            lambda s: s not in (".", "..")
        ),
        st.binary(max_size=300),
        max_size=8,
    )
)
def test_cpio_files_survive_any_contents(files: dict[str, bytes]) -> None:
    import io

    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("d")
    for name, data in files.items():
        w.add_file(f"d/{name}", data)
    w.close()
    entries = parse_newc(buf.getvalue())
    assert {n: b for n, _, b in entries[1:-1]} == {f"d/{k}": v for k, v in files.items()}


@pytest.mark.parametrize(
    "path", ["", "/", "a/../b", "./a", "a//b", "TRAILER!!!", "x\0y", "missing/child"]
)
def test_cpio_rejects_bad_paths(path: str) -> None:
    import io

    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add_file(path, b"")


def test_cpio_requires_parents_first_and_unique_paths() -> None:
    import io

    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError, match="parent directory 'a'"):
        w.add_dir("a/b")
    w.add_dir("a")
    w.add_file("a/f", b"")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_file("a/f", b"")
    with pytest.raises(ValueError, match="parent directory 'a/f'"):
        w.add_file("a/f/g", b"")  # a file is not a directory
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add_dir("b")


# --- modinfo / ELF --------------------------------------------------------------


def test_parse_modinfo_of_synthetic_module() -> None:
    info = parse_modinfo(make_module("virtio_blk", ["virtio", "virtio_ring"], "pre: x"))
    assert info["name"] == ["virtio_blk"]
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["alias"] == ["a1", "a2"]
    assert info["softdep"] == ["pre: x"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF"),
        (b"garbage" * 20, "not an ELF"),
        (b"\x7fELF\x01\x01\x01" + bytes(80), "not a 64-bit"),
        (b"\x7fELF\x02\x07\x01" + bytes(80), "byte order"),
        (make_elf({".text": b"\x90"}), "no .modinfo"),
        (make_module("x")[:-40], "truncated"),
        (make_module("x")[:100], "truncated"),
    ],
)
def test_parse_modinfo_rejects_garbage(data: bytes, message: str) -> None:
    with pytest.raises(ProvisionError, match=message):
        parse_modinfo(data, "bad.ko")


def test_parse_modinfo_rejects_out_of_range_section_table() -> None:
    data = bytearray(make_module("x"))
    struct.pack_into("<Q", data, 0x28, 2**40)  # e_shoff far past the end
    with pytest.raises(ProvisionError, match="truncated"):
        parse_modinfo(bytes(data))
    data = bytearray(make_module("x"))
    struct.pack_into("<H", data, 0x3E, 99)  # e_shstrndx out of range
    with pytest.raises(ProvisionError, match="out of range"):
        parse_modinfo(bytes(data))


def test_read_modinfo_handles_compressed_modules(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    assert read_modinfo(mods / "kernel/comp/xzmod.ko.xz")["depends"] == ["c"]
    assert read_modinfo(mods / "kernel/comp/gzmod.ko.gz")["depends"] == ["xzmod"]
    assert read_module(mods / "kernel/comp/xzmod.ko.xz").startswith(b"\x7fELF")
    if shutil.which("zstd"):
        assert read_modinfo(mods / "kernel/comp/zstmod.ko.zst")["name"] == ["zstmod"]
    (tmp_path / "bad.ko.xz").write_bytes(b"\xfd7zXZ\x00corrupt")
    with pytest.raises(ProvisionError, match="decompress"):
        read_module(tmp_path / "bad.ko.xz")


def test_is_static_elf() -> None:
    assert is_static_elf(make_elf({".text": b""}), "x")
    assert not is_static_elf(make_elf({".text": b""}, interp=True), "x")
    assert not is_static_elf(Path("/bin/ls").read_bytes(), "/bin/ls")
    if BUSYBOX.exists():
        assert is_static_elf(BUSYBOX.read_bytes(), str(BUSYBOX))


# --- module tree and closure ------------------------------------------------------


def test_module_names_are_normalised() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("x/erofs.ko.zst") == "erofs"
    assert module_name("y/lz4.ko.xz") == "lz4"


def test_builtin_and_index(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    assert builtin_modules(mods) == {"bi", "crc32c_generic"}
    index = index_modules(mods)
    assert index["d_e"].name == "d-e.ko"
    assert index["xzmod"].name == "xzmod.ko.xz"
    assert "bi" not in index


def _names(paths: list[Path]) -> list[str]:
    return [module_name(p) for p in paths]


def _assert_deps_first(paths: list[Path]) -> None:
    seen: set[str] = set()
    for p in paths:
        for dep in read_modinfo(p)["depends"][0].split(","):
            assert not dep or dep.replace("-", "_") in seen, f"{p.name} before its dep {dep}"
        seen.add(module_name(p))


def test_closure_puts_dependencies_first(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    order = resolve_closure(mods, ["a", "d-e"])
    assert _names(order) == ["c", "b", "a", "d_e"]
    _assert_deps_first(order)


def test_closure_has_no_duplicates_and_is_deterministic(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    wanted = ["d_e", "a", "b", "c", "a"]
    order = resolve_closure(mods, wanted)
    assert len(_names(order)) == len(set(_names(order))) == 4
    assert order == resolve_closure(mods, wanted)


def test_closure_honours_softdep_pre_when_the_module_exists(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    # g is a pre softdep; crc32c-alias does not exist; h is "post" and not pulled in.
    assert _names(resolve_closure(mods, ["f"])) == ["g", "f"]
    # Soft cycles are broken instead of failing.
    assert sorted(_names(resolve_closure(mods, ["soft1"]))) == ["soft1", "soft2"]


def test_closure_skips_builtins(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    assert resolve_closure(mods, ["bi", "crc32c-generic"]) == []
    assert _names(resolve_closure(mods, ["usesbuiltin"])) == ["usesbuiltin"]


def test_closure_follows_compressed_modules(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    top = "zstmod" if shutil.which("zstd") else "gzmod"
    names = _names(resolve_closure(mods, [top]))
    assert names[:3] == ["c", "xzmod", "gzmod"]


def test_closure_errors(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    with pytest.raises(ProvisionError, match="'no_such_module' is neither built into"):
        resolve_closure(mods, ["no-such-module"])
    with pytest.raises(ProvisionError, match="'broken' depends on 'nothere'"):
        resolve_closure(mods, ["broken"])
    with pytest.raises(ProvisionError, match="cycle: cyc1 -> cyc2 -> cyc1"):
        resolve_closure(mods, ["cyc1"])
    with pytest.raises(ProvisionError, match="incomplete"):
        resolve_closure(tmp_path / "nowhere", ["a"])


# --- Kernel record and the cache -----------------------------------------------------


def test_kernel_json_round_trip(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path)
    assert Kernel.from_json(json.loads(json.dumps(k.to_json()))) == k
    assert k.is_complete()
    assert k.config_value("EROFS_FS") == "m"
    assert k.config_value("CONFIG_EXT4_FS") == "y"
    assert k.config_value("NOPE") is None
    with pytest.raises(ValueError, match="version"):
        Kernel.from_json({**k.to_json(), "version": 3})


def test_cached_kernel_is_a_pointer_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    assert cached_kernel(dirs) is None
    k = fake_kernel(tmp_path / "tree")
    dirs.kernels.mkdir(parents=True)
    pointer = dirs.kernels / "linux-image-cloud-amd64.json"
    pointer.write_text(json.dumps(k.to_json()))

    def no_apt(*_a: object, **_k: object) -> str:
        raise AssertionError("the fast path ran a program")

    monkeypatch.setattr(debian_mod, "run_checked", no_apt)
    start = time.perf_counter()
    assert cached_kernel(dirs) == k
    assert provision_kernel(dirs) == k
    assert time.perf_counter() - start < 0.05
    # Garbage or dangling pointers are a cache miss, never an exception.
    pointer.write_text("{not json")
    assert cached_kernel(dirs) is None
    pointer.write_text("[]")
    assert cached_kernel(dirs) is None
    k.vmlinuz.unlink()
    pointer.write_text(json.dumps(k.to_json()))
    assert cached_kernel(dirs) is None


IMG = "linux-image-6.1.0-56-cloud-amd64"
IMG12 = "linux-image-6.12.9-cloud-amd64"


@pytest.mark.parametrize(
    ("depends", "expected"),
    [
        (f"{IMG} (= 6.1.192-2)", (IMG, "6.1.192-2")),
        (f"foo, {IMG12} (= 1:6.12.9-1) | bar", (IMG12, "1:6.12.9-1")),
        (IMG, (IMG, None)),
        ("kmod, linux-base (>= 4.3~)", None),
        ("linux-image-cloud-amd64 (= 1)", None),
    ],
)
def test_image_dependency(depends: str, expected: tuple[str, str | None] | None) -> None:
    assert debian_mod._image_dependency("linux-image-cloud-amd64", depends) == expected


def test_publish_tolerates_an_existing_target(tmp_path: Path) -> None:
    def tree(name: str, complete: bool) -> Path:
        root = tmp_path / name
        (root / "lib" / "modules").mkdir(parents=True)
        if complete:
            (root / "boot").mkdir()
        (root / "marker").write_text(name)
        return root

    target = tree("target", complete=True)
    ours = tree("ours", complete=True)
    debian_mod._publish(ours, target)
    assert (target / "marker").read_text() == "target" and not ours.exists()
    broken = tree("broken", complete=False)
    ours = tree("ours", complete=True)
    debian_mod._publish(ours, broken)
    assert (broken / "marker").read_text() == "ours" and not ours.exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_provision_rejects_bad_package_names(tmp_path: Path) -> None:
    dirs = Dirs(cache=tmp_path, runtime=tmp_path)
    with pytest.raises(ProvisionError, match="invalid Debian package name"):
        provision_kernel(dirs, meta_package="-o=Dir::Etc=/evil")


@pytest.mark.vm
def test_apt_failure_hints_at_apt_get_update(tmp_path: Path) -> None:
    dirs = Dirs(cache=tmp_path, runtime=tmp_path)
    with pytest.raises(LaunchError) as info:
        provision_kernel(dirs, meta_package="stoker-no-such-package-xyz")
    assert info.value.hint is not None and "apt-get update" in info.value.hint
    assert "apt-get" in str(info.value)
    assert not list(dirs.kernels.glob(".tmp-*"))


# --- initramfs (fake kernel) ------------------------------------------------------------

needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static not installed")


@needs_busybox
def test_initramfs_layout(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    ir = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["a", "f", "bi"], pci_modules=(), nic_modules=()
    )
    assert ir.modules == ("c", "b", "a", "g", "f")
    assert ir.path == dirs.initramfs / f"{ir.digest}.cpio.gz"
    archive = gzip.decompress(ir.path.read_bytes())
    out = tmp_path / "x"
    cpio_extract(archive, out)
    assert (out / "init").read_text() == init_script()
    assert (out / "init").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    assert os.readlink(out / "bin/insmod") == "busybox"
    assert os.readlink(out / "bin/switch_root") == "busybox"
    assert (out / "lib/modules/load.order").read_text().split() == [f"{m}.ko" for m in ir.modules]
    for m in ir.modules:
        assert (out / f"lib/modules/{m}.ko").read_bytes().startswith(b"\x7fELF")
    for rel, data in AGENT.items():
        assert (out / "stoker-agent" / rel).read_bytes() == data
    for d in ("dev", "proc", "sys", "newroot", "lower", "rw", "tmp"):
        assert (out / d).is_dir()
    assert cpio_list(archive)["dev/console"].startswith("crw")


@needs_busybox
def test_the_agent_ships_with_bytecode_it_can_use(tmp_path: Path) -> None:
    import subprocess
    import sys

    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    agent = {**AGENT, "stoker/agent/broken.py": b"def (:\n"}
    ir = build_initramfs(
        dirs,
        k,
        agent_files=agent,
        modules=[],
        pci_modules=(),
        nic_modules=(),
        agent_bytecode=True,
    )
    out = tmp_path / "x"
    cpio_extract(gzip.decompress(ir.path.read_bytes()), out)
    cache = out / "stoker-agent/stoker/agent/__pycache__"
    tag = sys.implementation.cache_tag
    assert sorted(p.name for p in cache.iterdir()) == [
        f"__init__.{tag}.pyc",
        f"__main__.{tag}.pyc",
    ]  # none for a source that does not compile
    # This Python takes it (hash-checked against the source) instead of compiling.
    proc = subprocess.run(
        [sys.executable, "-B", "-S", "-v", "-c", "import stoker.agent.__main__"],
        env={"PYTHONPATH": str(out / "stoker-agent")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"__main__.{tag}.pyc matches" in proc.stderr and proc.stdout == "agent\n"


@needs_busybox
def test_pci_modules_are_listed_apart(tmp_path: Path) -> None:
    """virtio-pci (Cloud Hypervisor) loads only with stoker.pci=1: its own list."""
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    ir = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["a"], pci_modules=["f"], nic_modules=()
    )
    out = tmp_path / "x"
    cpio_extract(gzip.decompress(ir.path.read_bytes()), out)
    main = (out / "lib/modules/load.order").read_text().split()
    pci = (out / "lib/modules/load.pci").read_text().split()
    assert main == [f"{m}.ko" for m in ir.modules]
    # f's own dependencies that a already brought are not loaded twice.
    assert pci and pci[-1] == "f.ko" and not set(pci) & set(main)
    for name in pci:
        assert (out / "lib/modules" / name).read_bytes().startswith(b"\x7fELF")
    assert "stoker.pci=*) PCI=" in init_script()
    without = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["a"], pci_modules=(), nic_modules=()
    )
    assert without.digest != ir.digest


@needs_busybox
def test_nic_modules_are_listed_apart(tmp_path: Path) -> None:
    """virtio-net loads only with stoker.nic=1 (nat mode): its own list."""
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    ir = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["a"], pci_modules=["f"], nic_modules=["f"]
    )
    out = tmp_path / "x"
    cpio_extract(gzip.decompress(ir.path.read_bytes()), out)
    main = (out / "lib/modules/load.order").read_text().split()
    nic = (out / "lib/modules/load.nic").read_text().split()
    assert nic == (out / "lib/modules/load.pci").read_text().split()  # stored once, listed twice
    assert nic and nic[-1] == "f.ko" and not set(nic) & set(main)
    assert "stoker.nic=*) NIC=" in init_script()
    without = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["a"], pci_modules=["f"], nic_modules=()
    )
    assert without.digest != ir.digest


@needs_busybox
def test_initramfs_decompresses_modules(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    ir = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["gzmod"], pci_modules=(), nic_modules=()
    )
    assert ir.modules == ("c", "xzmod", "gzmod")
    entries = {n: b for n, _, b in parse_newc(gzip.decompress(ir.path.read_bytes()))}
    assert entries["lib/modules/xzmod.ko"] == read_module(k.modules_dir / "kernel/comp/xzmod.ko.xz")
    assert entries["lib/modules/gzmod.ko"].startswith(b"\x7fELF")


@needs_busybox
def test_initramfs_is_reproducible_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = fake_kernel(tmp_path / "k")
    d1 = Dirs(cache=tmp_path / "c1", runtime=tmp_path / "run")
    d2 = Dirs(cache=tmp_path / "c2", runtime=tmp_path / "run")
    first = build_initramfs(d1, k, agent_files=AGENT, modules=["a"], pci_modules=(), nic_modules=())
    second = build_initramfs(
        d2,
        k,
        agent_files=dict(reversed(AGENT.items())),
        modules=["a"],
        pci_modules=(),
        nic_modules=(),
    )
    assert first.digest == second.digest
    assert first.path.read_bytes() == second.path.read_bytes()

    # A cache hit neither scans the module tree nor rebuilds the archive.
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("hot path did expensive work")

    monkeypatch.setattr(initramfs_mod, "resolve_closure", boom)
    monkeypatch.setattr(initramfs_mod, "_write_archive", boom)
    start = time.perf_counter()
    again = build_initramfs(d1, k, agent_files=AGENT, modules=["a"], pci_modules=(), nic_modules=())
    assert time.perf_counter() - start < 0.2
    assert again == first
    assert not list(d1.initramfs.glob(".tmp-*"))


@needs_busybox
def test_initramfs_digest_covers_its_inputs(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "c", runtime=tmp_path / "run")
    base = build_initramfs(
        dirs, k, agent_files=AGENT, modules=["a"], pci_modules=(), nic_modules=()
    ).digest
    changed_agent = {**AGENT, "stoker/agent/__main__.py": b"print('v2')\n"}
    assert (
        build_initramfs(
            dirs, k, agent_files=changed_agent, modules=["a"], pci_modules=(), nic_modules=()
        ).digest
        != base
    )
    assert (
        build_initramfs(
            dirs, k, agent_files=AGENT, modules=["b"], pci_modules=(), nic_modules=()
        ).digest
        != base
    )
    (k.modules_dir / "kernel/drivers/c.ko").write_bytes(make_module("c") + b"\0" * 8)
    assert (
        build_initramfs(
            dirs, k, agent_files=AGENT, modules=["a"], pci_modules=(), nic_modules=()
        ).digest
        != base
    )
    newer = Kernel.from_json({**k.to_json(), "version": "1.0-2"})
    assert (
        build_initramfs(
            dirs, newer, agent_files=AGENT, modules=["a"], pci_modules=(), nic_modules=()
        ).digest
        != base
    )


def test_initramfs_busybox_errors(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "c", runtime=tmp_path / "run")
    with pytest.raises(ProvisionError, match="not found") as info:
        build_initramfs(dirs, k, agent_files=AGENT, busybox=tmp_path / "nope")
    assert info.value.hint == "apt-get install busybox-static"
    with pytest.raises(ProvisionError, match="dynamically linked") as info:
        build_initramfs(dirs, k, agent_files=AGENT, busybox=Path("/bin/ls"))
    assert info.value.hint == "apt-get install busybox-static"


@needs_busybox
@pytest.mark.parametrize(
    "agent", [{"../evil": b""}, {"/abs": b""}, {"a//b": b""}, {"a": b"", "a/b": b""}]
)
def test_initramfs_rejects_bad_agent_paths(tmp_path: Path, agent: dict[str, bytes]) -> None:
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "c", runtime=tmp_path / "run")
    with pytest.raises(ProvisionError, match="agent file"):
        build_initramfs(dirs, k, agent_files=agent, modules=["c"])


@needs_busybox
def test_initramfs_unknown_module(tmp_path: Path) -> None:
    k = fake_kernel(tmp_path / "k")
    dirs = Dirs(cache=tmp_path / "c", runtime=tmp_path / "run")
    with pytest.raises(ProvisionError, match="'nonexistent'"):
        build_initramfs(
            dirs, k, agent_files=AGENT, modules=["nonexistent"], pci_modules=(), nic_modules=()
        )


@needs_busybox
def test_init_script_parses() -> None:
    text = init_script()
    assert text.startswith("#!/bin/sh\n")
    proc = subprocess.run(
        [str(BUSYBOX), "sh", "-n", "-c", text], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for needle in (
        "STOKER-PROBE-OK",
        "stoker-init: error:",
        "switch_root",
        "-B -S -m stoker.agent",
    ):
        assert needle in text


# --- real kernel (apt) --------------------------------------------------------------


@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    root = tmp_path_factory.mktemp("stoker-kernel")
    return Dirs(cache=root / "cache", runtime=root / "run")


@pytest.fixture(scope="session")
def real_kernel(kernel_dirs: Dirs) -> Kernel:
    if not shutil.which("apt-get"):
        pytest.skip("apt-get not available")
    messages: list[str] = []
    kernel = provision_kernel(kernel_dirs, progress=messages.append)
    assert any("downloading" in m for m in messages)
    return kernel


@pytest.fixture(scope="session")
def real_initrd(kernel_dirs: Dirs, real_kernel: Kernel) -> Initramfs:
    return build_initramfs(kernel_dirs, real_kernel, agent_files=AGENT)


@pytest.mark.vm
def test_provisioned_kernel(kernel_dirs: Dirs, real_kernel: Kernel) -> None:
    k = real_kernel
    assert k.package == f"linux-image-{k.release}"
    assert k.root == kernel_dirs.kernels / f"{k.package}_{k.version}"
    assert k.vmlinuz == k.root / "boot" / f"vmlinuz-{k.release}"
    assert k.modules_dir == k.root / "lib" / "modules" / k.release
    assert k.vmlinuz.stat().st_size > 1_000_000
    assert k.config_value("VIRTIO_MMIO") in ("y", "m")
    assert k.config_value("EXT4_FS") == "y"
    # Only what a guest needs was kept; nothing temporary is left.
    assert sorted(p.name for p in k.root.iterdir()) == ["boot", "lib"]
    assert not list(kernel_dirs.kernels.rglob("*.deb"))
    assert not list(kernel_dirs.kernels.glob(".tmp-*"))
    pointer = json.loads((kernel_dirs.kernels / "linux-image-cloud-amd64.json").read_text())
    assert Kernel.from_json(pointer) == k
    # The hot path: no apt, milliseconds.
    start = time.perf_counter()
    for _ in range(10):
        assert provision_kernel(kernel_dirs) == k
    assert (time.perf_counter() - start) / 10 < 0.01


@pytest.mark.vm
def test_concurrent_refresh_reuses_the_unpacked_tree(
    kernel_dirs: Dirs, real_kernel: Kernel
) -> None:
    before = real_kernel.vmlinuz.stat().st_ino
    results: list[Kernel | BaseException] = []

    def refresh() -> None:
        try:
            results.append(provision_kernel(kernel_dirs, refresh=True))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [real_kernel] * 3
    assert real_kernel.vmlinuz.stat().st_ino == before  # not unpacked again
    assert not list(kernel_dirs.kernels.glob(".tmp-*"))


@pytest.mark.vm
def test_real_modinfo_matches_modinfo_tool(real_kernel: Kernel) -> None:
    path = index_modules(real_kernel.modules_dir)["virtio_blk"]
    info = read_modinfo(path)
    assert info["name"] == ["virtio_blk"]
    assert set(info["depends"][0].split(",")) >= {"virtio", "virtio_ring"}
    assert info["vermagic"][0].startswith(real_kernel.release + " ")
    if shutil.which("modinfo") or Path("/usr/sbin/modinfo").exists():
        tool = shutil.which("modinfo") or "/usr/sbin/modinfo"
        for field in ("depends", "alias", "license"):
            out = subprocess.run(
                [tool, "-F", field, str(path)], capture_output=True, text=True, check=True
            ).stdout.split("\n")
            assert [v for v in out if v] == [v for v in info.get(field, []) if v], field


@pytest.mark.vm
def test_real_guest_closure(real_kernel: Kernel) -> None:
    mods = real_kernel.modules_dir
    order = resolve_closure(mods, GUEST_MODULES)
    names = _names(order)
    builtin = builtin_modules(mods)
    _assert_deps_first(order)
    assert len(names) == len(set(names))
    for wanted in GUEST_MODULES:
        assert wanted in names or wanted in builtin
    assert names.index("virtio") < names.index("virtio_mmio")
    assert names.index("virtio_ring") < names.index("virtio_blk")
    assert names.index("vsock") < names.index("vmw_vsock_virtio_transport")
    # erofs needs LZ4 decompression; on this kernel it may be built in.
    assert "lz4_decompress" in names or "lz4_decompress" in builtin
    assert not set(names) & builtin


# --- booting it -----------------------------------------------------------------------


def host_tsc_khz() -> int | None:
    """The host CPU clock, for ``tsc_early_khz`` (TCG's guest TSC is the host's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Boot:
    argv: list[str]
    returncode: int | None
    console: str
    elapsed: float
    timed_out: bool

    def __str__(self) -> str:
        return (
            f"rc={self.returncode} timed_out={self.timed_out} {self.elapsed:.1f}s\n"
            f"argv: {' '.join(self.argv)}\n--- console ---\n{self.console[-4000:]}"
        )


def boot(
    kernel: Kernel,
    initrd: Path,
    append: str,
    drives: Sequence[tuple[Path, bool]] = (),
    timeout: float = 60,
) -> Boot:
    """Boot under TCG until QEMU exits by itself (or kill it at the timeout)."""
    # Under TCG the kernel's PIT calibration of the TSC fails at random and the
    # boot then hangs; giving it the frequency avoids the calibration.
    tsc = host_tsc_khz()
    cmdline = f"console=ttyS0 panic=-1 quiet {append}" + (f" tsc_early_khz={tsc}" if tsc else "")
    argv = [
        QEMU,
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "256",
        "-smp", "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        "-append", cmdline,
        "-serial", "stdio",
    ]  # fmt: skip
    for n, (path, read_only) in enumerate(drives):
        opts = f"id=d{n},file={path},format=raw,if=none" + (",read-only=on" if read_only else "")
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive=d{n}"]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    timed_out = False
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Boot(
        argv=argv,
        returncode=proc.returncode,
        console=out.decode(errors="replace").replace("\r\n", "\n"),
        elapsed=time.monotonic() - start,
        timed_out=timed_out,
    )


FAKE_PYTHON = """\
#!/bin/busybox sh
bb=/bin/busybox
echo "STOKER-ROOT-OK pid=$$ args=$*"
echo "PYTHONPATH=$PYTHONPATH"
echo "AGENT-FILES: $($bb find /usr/lib/stoker-agent -type f | $bb sort | $bb tr '\\n' ' ')"
echo "AGENT-MAIN: $($bb cat /usr/lib/stoker-agent/stoker/agent/__main__.py)"
while read -r dev mnt fstype opts rest; do
    case "$mnt" in /|/dev|/proc|/sys) echo "MOUNT $mnt $fstype $opts" ;; esac
done </proc/mounts
echo written >/marker && echo "ROOT-WRITABLE $($bb cat /marker)"
$bb poweroff -f
"""


@pytest.fixture
def erofs_root(tmp_path: Path) -> Path:
    if not shutil.which("mkfs.erofs"):
        pytest.skip("mkfs.erofs not installed (apt-get install erofs-utils)")
    src = tmp_path / "rootsrc"
    (src / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, src / "bin" / "busybox")
    fake = src / "bin" / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (src / "etc").mkdir()
    (src / "etc" / "hostname").write_text("stoker-test\n")
    image = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "-zlz4hc", str(image), str(src)], check=True, capture_output=True)
    return image


@pytest.mark.vm
def test_probe_boot(real_kernel: Kernel, real_initrd: Initramfs) -> None:
    result = boot(real_kernel, real_initrd.path, "stoker.probe=1")
    assert not result.timed_out, str(result)
    assert result.returncode == 0, str(result)
    assert "STOKER-PROBE-OK" in result.console.splitlines(), str(result)
    assert "stoker-init: error" not in result.console, str(result)
    print(f"probe boot: {result.elapsed:.2f}s, initramfs {real_initrd.path.stat().st_size} bytes")


@pytest.mark.vm
def test_full_boot_with_tmpfs_layer(
    real_kernel: Kernel, real_initrd: Initramfs, erofs_root: Path
) -> None:
    result = boot(
        real_kernel,
        real_initrd.path,
        "stoker.python=/bin/fakepython",
        drives=[(erofs_root, True)],
    )
    assert not result.timed_out, str(result)
    console = result.console
    assert "STOKER-ROOT-OK pid=1 args=-B -S -m stoker.agent" in console, str(result)
    assert "PYTHONPATH=/usr/lib/stoker-agent" in console, str(result)
    expected = " ".join(f"/usr/lib/stoker-agent/{p}" for p in sorted(AGENT))
    assert f"AGENT-FILES: {expected}" in console, str(result)
    assert "AGENT-MAIN: print('agent')" in console, str(result)
    assert "MOUNT / overlay" in console and "lowerdir=/lower" in console, str(result)
    assert "upperdir=/rw/upper" in console, str(result)
    for fs in ("/proc proc", "/sys sysfs", "/dev devtmpfs"):
        assert f"MOUNT {fs}" in console, str(result)
    assert "ROOT-WRITABLE written" in console, str(result)
    assert "stoker-init: error" not in console, str(result)
    assert result.returncode == 0, str(result)


@pytest.mark.vm
def test_full_boot_with_scratch_disk(
    real_kernel: Kernel, real_initrd: Initramfs, erofs_root: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch.img"
    with scratch.open("wb") as fh:
        fh.truncate(64 * 1024 * 1024)  # sparse
    subprocess.run(["mkfs.ext4", "-q", "-F", str(scratch)], check=True, capture_output=True)
    result = boot(
        real_kernel,
        real_initrd.path,
        "stoker.python=/bin/fakepython stoker.scratch=/dev/vdb",
        drives=[(erofs_root, True), (scratch, False)],
    )
    assert not result.timed_out, str(result)
    assert "STOKER-ROOT-OK pid=1" in result.console, str(result)
    assert "ROOT-WRITABLE written" in result.console, str(result)
    assert result.returncode == 0, str(result)
    # The guest's write landed in the upper layer on the ext4 disk.
    if shutil.which("debugfs"):
        out = subprocess.run(
            ["debugfs", "-R", "cat /upper/marker", str(scratch)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == "written"


@pytest.mark.vm
def test_missing_root_device_is_reported(real_kernel: Kernel, real_initrd: Initramfs) -> None:
    result = boot(real_kernel, real_initrd.path, "stoker.root=/dev/vdz")
    assert not result.timed_out, str(result)
    assert (
        "stoker-init: error: root device /dev/vdz did not appear within 10 s" in result.console
    ), str(result)
    assert result.returncode == 0, str(result)


@pytest.mark.vm
def test_missing_python_is_reported(
    real_kernel: Kernel, real_initrd: Initramfs, erofs_root: Path
) -> None:
    result = boot(real_kernel, real_initrd.path, "", drives=[(erofs_root, True)])
    assert not result.timed_out, str(result)
    assert (
        "stoker-init: error: /usr/bin/python3 does not exist in the root file system"
        in result.console
    ), str(result)


@pytest.mark.vm
def test_bad_root_filesystem_is_reported(
    real_kernel: Kernel, real_initrd: Initramfs, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(hashlib.sha256(b"x").digest() * 4096)
    result = boot(real_kernel, real_initrd.path, "", drives=[(junk, True)])
    assert not result.timed_out, str(result)
    assert "stoker-init: error: cannot mount /dev/vda (erofs) on /lower" in result.console, str(
        result
    )


@pytest.fixture(autouse=True)
def _no_stray_qemu() -> Iterator[None]:
    # boot() reaps its QEMU in a finally; this double-checks no child survived.
    yield
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and "qemu" in stat:
                raise AssertionError(f"QEMU child {pid} still running")
