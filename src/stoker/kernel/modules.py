"""Kernel modules: reading their metadata and computing what to load, in order.

Debian's kernel package ships no ``modules.dep`` (``depmod`` generates it at
install time, and we never install), so dependencies come from each module's
own ``.modinfo`` ELF section (``depends=`` and ``softdep=``), parsed here with
:mod:`struct` alone.  Modules may be compressed (``.ko.xz``, ``.ko.zst``,
``.ko.gz``, as trixie kernels ship them); :func:`read_module` returns the plain
ELF either way, because busybox ``insmod`` in the guest wants it uncompressed.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import subprocess
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from stoker.errors import LaunchError, ProvisionError

#: Modules the guest needs: virtio transport and devices, the read-only root
#: (erofs), the writable overlay, and vsock for backends that talk over it.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "erofs",
    # for images packed as squashfs (ext4, the third format, is built in)
    "squashfs",
    "overlay",
    "vmw_vsock_virtio_transport",
)

#: Loaded only with ``stoker.pci=1``: VMMs whose virtio devices sit on PCI
#: (Cloud Hypervisor); QEMU microvm and Firecracker use virtio-mmio.
PCI_MODULES: tuple[str, ...] = ("virtio_pci",)

#: Loaded only with ``stoker.nic=1``: the network device of ``nat``-mode VMs
#: (``egress`` and ``none`` VMs have none, and skip the load time).
NIC_MODULES: tuple[str, ...] = ("virtio_net",)

MODULE_SUFFIXES: tuple[str, ...] = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"

_SHT_NOBITS = 8
_PT_INTERP = 3


def module_name(path: str | Path) -> str:
    """The kernel's name for a module file: ``virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = Path(path).name
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def normalize_name(name: str) -> str:
    """Normalise a module name as the kernel does (``-`` and ``_`` are equivalent)."""
    return name.strip().replace("-", "_")


def read_module(path: Path) -> bytes:
    """Return the uncompressed ELF image of a module file, whatever its compression."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProvisionError(f"cannot read kernel module {path}: {exc}") from exc
    try:
        if data.startswith(_XZ_MAGIC):
            return lzma.decompress(data)
        if data.startswith(_GZIP_MAGIC):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as exc:
        raise ProvisionError(f"cannot decompress kernel module {path}: {exc}") from exc
    if data.startswith(_ZSTD_MAGIC):
        return _unzstd(data, path)
    return data


def _unzstd(data: bytes, path: Path) -> bytes:
    # Python 3.11 has no zstd in the standard library; the CLI is everywhere.
    argv = ["zstd", "-d", "-c", "-q"]
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, check=False, timeout=60)
    except FileNotFoundError as exc:
        raise LaunchError(
            f"zstd is needed to decompress {path.name}",
            argv=argv,
            hint="apt-get install zstd",
        ) from exc
    if proc.returncode != 0:
        raise LaunchError(
            f"zstd could not decompress {path}",
            argv=argv,
            returncode=proc.returncode,
            output=proc.stderr.decode(errors="replace"),
        )
    return proc.stdout


# --- ELF -------------------------------------------------------------------


class _Elf64:
    """Just enough of an ELF64 reader to find sections and program headers.

    Every offset is bounds-checked: the input may be any file at all.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what
        if len(data) < 64 or not data.startswith(b"\x7fELF"):
            self.fail("not an ELF file")
        if data[4] != 2:
            self.fail("not a 64-bit ELF file")
        if data[5] == 1:
            self.endian = "<"
        elif data[5] == 2:
            self.endian = ">"
        else:
            self.fail("ELF header has an invalid byte order")
        (
            self.phoff,
            self.shoff,
            _flags,
            _ehsize,
            self.phentsize,
            self.phnum,
            self.shentsize,
            self.shnum,
            self.shstrndx,
        ) = struct.unpack_from(self.endian + "QQIHHHHHH", data, 0x20)

    def fail(self, why: str) -> NoReturn:
        raise ProvisionError(f"{self.what}: {why}")

    def _unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        fmt = self.endian + fmt
        if offset < 0 or offset + struct.calcsize(fmt) > len(self.data):
            self.fail("truncated ELF file (header points past the end)")
        return struct.unpack_from(fmt, self.data, offset)

    def sections(self) -> list[tuple[str, int, int, int]]:
        """``(name, type, offset, size)`` of every section."""
        if self.shoff == 0:
            return []
        if self.shentsize != 64:
            self.fail(f"unexpected ELF section header size {self.shentsize}")
        shnum, shstrndx = self.shnum, self.shstrndx
        if shnum == 0 or shstrndx == 0xFFFF:
            # Extended numbering: the real values live in section header 0.
            size0, link0 = self._unpack("QI", self.shoff + 0x20)
            shnum = shnum or size0
            if shstrndx == 0xFFFF:
                shstrndx = link0
        if shnum > (len(self.data) - self.shoff) // 64:
            self.fail("truncated ELF file (section table)")
        raw = [self._unpack("IIQQQQ", self.shoff + i * 64)[:6] for i in range(shnum)]
        if shstrndx >= shnum:
            self.fail("ELF section name table index out of range")
        _, _, _, _, str_off, str_size = raw[shstrndx]
        strtab = self._slice(str_off, str_size)
        out = []
        for name_off, sh_type, _fl, _addr, off, size in raw:
            if name_off >= len(strtab):
                self.fail("ELF section name out of range")
            end = strtab.find(b"\0", name_off)
            name = strtab[name_off : end if end >= 0 else len(strtab)].decode(errors="replace")
            out.append((name, sh_type, off, size))
        return out

    def section_data(self, name: str) -> bytes | None:
        for sec_name, sh_type, off, size in self.sections():
            if sec_name == name:
                return b"" if sh_type == _SHT_NOBITS else self._slice(off, size)
        return None

    def program_types(self) -> list[int]:
        if self.phoff == 0 or self.phnum == 0:
            return []
        if self.phentsize != 56:
            self.fail(f"unexpected ELF program header size {self.phentsize}")
        return [self._unpack("I", self.phoff + i * 56)[0] for i in range(self.phnum)]

    def _slice(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.data):
            self.fail("truncated ELF file (section data past the end)")
        return self.data[offset : offset + size]


def is_static_elf(data: bytes, what: str) -> bool:
    """True when ``data`` is an ELF64 executable without a program interpreter."""
    return _PT_INTERP not in _Elf64(data, what).program_types()


def parse_modinfo(data: bytes, what: str = "kernel module") -> dict[str, list[str]]:
    """Parse the ``.modinfo`` section of an uncompressed module image."""
    section = _Elf64(data, what).section_data(".modinfo")
    if section is None:
        raise ProvisionError(f"{what}: no .modinfo section (not a kernel module)")
    info: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        if not raw:
            continue  # padding between entries
        key, sep, value = raw.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """Read a module file's ``.modinfo`` as ``key -> [values]`` (keys may repeat)."""
    return parse_modinfo(read_module(path), str(path))


# --- the module tree --------------------------------------------------------


def builtin_modules(modules_dir: Path) -> set[str]:
    """Names of the modules compiled into the kernel, from ``modules.builtin``."""
    listing = modules_dir / "modules.builtin"
    try:
        text = listing.read_text()
    except OSError as exc:
        raise ProvisionError(f"kernel module tree is incomplete: cannot read {listing}") from exc
    return {module_name(line) for line in text.split() if line}


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map every loadable module under ``modules_dir/kernel`` to its file.

    Scans the whole tree (about a thousand files), so keep it off hot paths.
    """
    top = modules_dir / "kernel"
    if not top.is_dir():
        raise ProvisionError(f"kernel module tree is incomplete: {top} is missing")
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()  # deterministic choice if two files share a name
        for filename in sorted(filenames):
            if filename.endswith(MODULE_SUFFIXES):
                index.setdefault(module_name(filename), Path(dirpath) / filename)
    return index


def _soft_pre(values: list[str]) -> list[str]:
    """The ``pre:`` names of ``softdep=`` values such as ``pre: crc32c post: foo``."""
    out: list[str] = []
    for value in values:
        collecting = False
        for word in value.split():
            if word.endswith(":"):
                collecting = word == "pre:"
            elif collecting:
                out.append(normalize_name(word))
    return out


def resolve_closure(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The module files to load for ``wanted``, every dependency before its users.

    Built-in names are skipped.  ``depends=`` entries must exist; ``softdep``
    ``pre:`` entries are honoured when a module by that name exists (they often
    name an alias, such as ``crc32c``, that a built-in already provides).
    """
    index = index_modules(modules_dir)
    builtin = builtin_modules(modules_dir)
    order: list[Path] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str, required_by: str | None, soft: bool) -> None:
        if name in done or name in builtin:
            return
        if name in active:
            if soft:
                return  # a soft ordering hint that loops back: drop it
            cycle = " -> ".join([*active[active.index(name) :], name])
            raise ProvisionError(f"kernel module dependency cycle: {cycle}")
        path = index.get(name)
        if path is None:
            if soft:
                return
            if required_by is None:
                raise ProvisionError(
                    f"kernel module {name!r} is neither built into the kernel "
                    f"nor present under {modules_dir}"
                )
            raise ProvisionError(
                f"kernel module {required_by!r} depends on {name!r}, "
                f"which is missing from {modules_dir}"
            )
        info = read_modinfo(path)
        active.append(name)
        for dep in _soft_pre(info.get("softdep", [])):
            visit(dep, name, soft=True)
        for value in info.get("depends", []):
            for dep in value.split(","):
                if dep.strip():
                    visit(normalize_name(dep), name, soft=False)
        active.pop()
        done.add(name)
        order.append(path)

    for name in wanted:
        visit(normalize_name(name), None, soft=False)
    return order
