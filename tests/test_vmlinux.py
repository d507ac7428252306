"""Extracting an ELF ``vmlinux`` from a bzImage, and finding its PVH entry."""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from stoker.errors import ProvisionError
from stoker.kernel import vmlinux as vml


def _elf(size: int = 200_000) -> bytes:
    """A stand-in ELF64 x86_64 image (compressible, not trivially so)."""
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 62)
    body = b"".join(i.to_bytes(4, "little") for i in range(size // 4))
    return header + body[: size - len(header)]


def _bzimage(payload: bytes, *, decoy: bytes = b"", setup_sects: int = 3) -> bytes:
    """A file laid out like an x86 bzImage: boot sector + setup, then the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x300 : 0x300 + len(decoy)] = decoy  # something that looks compressed, but is not it
    offset = 0x40  # the decompressor stub comes first in the protected-mode part
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"\xcc" * 100


def _with_size(compressed: bytes, size: int) -> bytes:
    """What the kernel build does for every format but gzip: append the size."""
    return compressed + struct.pack("<I", size)


def test_extract_gzip_bzimage(tmp_path: Path) -> None:
    image = _elf()
    decoy = gzip.compress(b"not a kernel")
    path = tmp_path / "vmlinuz-6.1"
    path.write_bytes(_bzimage(gzip.compress(image), decoy=decoy))
    out = vml.extract_vmlinux(path)
    assert out == tmp_path / "vmlinux-6.1"
    assert out.read_bytes() == image


def test_extract_xz_bzimage_and_cache(tmp_path: Path) -> None:
    image = _elf()
    path = tmp_path / "vmlinuz"
    path.write_bytes(_bzimage(_with_size(lzma.compress(image), len(image))))
    out = vml.extract_vmlinux(path, tmp_path / "out.elf")
    assert out.read_bytes() == image
    before = out.stat()
    assert vml.extract_vmlinux(path, out) == out
    assert out.stat().st_ino == before.st_ino  # reused, not rewritten
    os.utime(path)  # a newer bzImage: extracted again
    os.utime(out, (before.st_atime - 10, before.st_mtime - 10))
    vml.extract_vmlinux(path, out)
    assert out.stat().st_ino != before.st_ino


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 tool is not installed")
def test_extract_lz4_bzimage_through_the_tool(tmp_path: Path) -> None:
    image = _elf()
    legacy = subprocess.run(["lz4", "-l", "-c"], input=image, capture_output=True, check=True)
    path = tmp_path / "vmlinuz"
    path.write_bytes(_bzimage(_with_size(legacy.stdout, len(image))))
    assert vml.extract_vmlinux(path).read_bytes() == image


def test_extract_by_magic_scan_without_a_header(tmp_path: Path) -> None:
    image = _elf()
    junk = b"\x1f\x8b\x08 not really gzip " * 3
    path = tmp_path / "kernel.bin"
    path.write_bytes(junk + lzma.compress(image) + b"trailing")
    out = vml.extract_vmlinux(path)
    assert out == tmp_path / "kernel.bin.vmlinux"
    assert out.read_bytes() == image


def test_extract_missing_tool_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n: None if n == "zstd" else real_which(n))
    path = tmp_path / "vmlinuz"
    path.write_bytes(_bzimage(_with_size(b"\x28\xb5\x2f\xfd" + bytes(32), 100)))
    with pytest.raises(ProvisionError, match="zstd") as caught:
        vml.extract_vmlinux(path)
    assert caught.value.hint == "install zstd (apt-get install zstd)"


def test_extract_refuses_what_is_not_a_kernel(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(_bzimage(gzip.compress(b"#!/bin/sh\necho not elf\n")))
    with pytest.raises(ProvisionError, match="no compressed ELF kernel"):
        vml.extract_vmlinux(path)
    assert not list(tmp_path.glob(".vmlinux*"))  # no temporary file left


def test_an_elf_kernel_is_used_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf())
    assert vml.extract_vmlinux(path) == path


REAL_KERNELS = sorted(glob.glob(os.path.expanduser("~/.cache/stoker/kernels/*/boot/vmlinuz-*")))


@pytest.mark.skipif(not REAL_KERNELS, reason="no kernel in ~/.cache/stoker/kernels (stoker run)")
def test_extract_the_real_cached_kernel(tmp_path: Path) -> None:
    bzimage = Path(REAL_KERNELS[-1])
    header = vml.bzimage_payload(bzimage.read_bytes())
    assert header is not None
    fmt = vml._format_at(bzimage.read_bytes(), header[0])
    if fmt in ("lz4", "zstd", "lzo") and shutil.which({"lzo": "lzop"}.get(fmt, fmt)) is None:
        pytest.skip(f"the kernel is {fmt}-compressed and the {fmt} tool is not installed")
    out = vml.extract_vmlinux(bzimage, tmp_path / "vmlinux")
    data = out.read_bytes()
    assert vml.is_elf64(data)
    (e_machine,) = struct.unpack_from("<H", data, 18)
    assert e_machine == 62  # EM_X86_64
    (entry,) = struct.unpack_from("<Q", data, 24)
    assert entry != 0
    payload = bzimage.read_bytes()[header[0] : header[0] + header[1]]
    assert len(data) == struct.unpack("<I", payload[-4:])[0]
    # Debian's cloud kernel is built with CONFIG_PVH: QEMU boots it through PVH.
    assert vml.has_pvh_entry(out)
    assert vml.pvh_kernel(bzimage, tmp_path / "vmlinux") == out


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    namez = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(namez), len(desc), kind) + pad(namez) + pad(desc)


def _elf_with_notes(notes: bytes, *, phnum_extra: int = 1) -> bytes:
    """An ELF64 with a PT_LOAD program header and one PT_NOTE segment holding ``notes``."""
    phoff = 64
    count = 1 + phnum_extra
    notes_at = phoff + 56 * count
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HH", header, 16, 2, 62)
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, count)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + load * phnum_extra + note + notes


def test_pvh_entry_is_found_among_other_notes(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    notes = (
        _note(b"GNU", 3, bytes(20))  # a build id
        + _note(b"Xen", 6, b"linux\0")  # XEN_ELFNOTE_GUEST_OS
        + _note(b"Xen", vml.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000))
    )
    path.write_bytes(_elf_with_notes(notes))
    assert vml.has_pvh_entry(path)


def test_no_pvh_entry_without_the_note(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf_with_notes(_note(b"Xen", 6, b"linux\0") + _note(b"GNU", 18, bytes(4))))
    assert not vml.has_pvh_entry(path)  # type 18 only counts in a Xen note
    path.write_bytes(_elf())  # no program headers at all
    assert not vml.has_pvh_entry(path)


def test_pvh_check_survives_hostile_headers(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    good = _elf_with_notes(_note(b"Xen", vml.XEN_ELFNOTE_PHYS32_ENTRY, bytes(4)))
    for broken in (
        good[:70],  # cut inside the program headers
        good[:-6],  # cut inside the note
        good[:0x36] + struct.pack("<HH", 56, 0xFFFF) + good[0x3A:],  # absurd count
        good[:0x20] + struct.pack("<Q", 1 << 40) + good[0x28:],  # table beyond the file
        b"\x7fELF\x01" + good[5:],  # ELF32
        b"",
    ):
        path.write_bytes(broken)
        assert not vml.has_pvh_entry(path)
    assert not vml.has_pvh_entry(tmp_path / "missing")


def test_pvh_kernel_falls_back_to_the_bzimage(tmp_path: Path) -> None:
    # An ELF without the note is returned as it is (it was the kernel asked for).
    elf = tmp_path / "plain"
    elf.write_bytes(_elf())
    assert vml.pvh_kernel(elf) == elf
    # A bzImage whose payload holds a PVH ELF: its extraction is booted.
    pvh = _elf_with_notes(_note(b"Xen", vml.XEN_ELFNOTE_PHYS32_ENTRY, bytes(4)))
    bz = tmp_path / "vmlinuz-x"
    bz.write_bytes(_bzimage(gzip.compress(pvh)))
    assert vml.pvh_kernel(bz) == tmp_path / "vmlinux-x"
    # A bzImage that cannot be extracted: booted the usual way, no error.
    bad = tmp_path / "vmlinuz-bad"
    bad.write_bytes(_bzimage(gzip.compress(b"not elf")))
    assert vml.pvh_kernel(bad) == bad
