"""The uncompressed kernel: an ELF ``vmlinux`` extracted from a bzImage, and its PVH entry.

Firecracker loads only an ELF ``vmlinux`` on x86_64.  QEMU and Cloud Hypervisor
also boot one directly through its PVH entry (a Xen ELF note naming a 32-bit
entry point): the guest then skips the bzImage's real-mode setup and its
self-decompression, which under TCG costs about a tenth of a cold boot
(``bench/levers.py``).  The extraction follows ``scripts/extract-vmlinux``: find
the compressed payload (from the boot header, else by its magic), decompress it,
keep it if it is an ELF64 of the recorded size.
"""

from __future__ import annotations

import bz2
import contextlib
import logging
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from stoker.errors import ProvisionError

log = logging.getLogger(__name__)

_ELF_MAGIC = b"\x7fELF"
#: Compressed-kernel magics, as ``scripts/extract-vmlinux`` looks for them.
_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)
#: Formats without a standard-library decompressor: the tool, and its Debian package.
_TOOLS: dict[str, tuple[list[str], str]] = {
    "lz4": (["lz4", "-dc"], "lz4"),
    "zstd": (["zstd", "-dcq"], "zstd"),
    "lzo": (["lzop", "-dc"], "lzop"),
}
MAX_VMLINUX = 1 << 30
#: Decompression attempts when scanning for magics (most hits are false).
MAX_CANDIDATES = 32


def is_elf64(data: bytes) -> bool:
    """An ELF64 image (``EI_CLASS`` = 2): what Firecracker loads on x86_64."""
    return data[:4] == _ELF_MAGIC and len(data) > 4 and data[4] == 2


def bzimage_payload(data: bytes) -> tuple[int, int] | None:
    """(offset, length) of the compressed kernel from the x86 boot header, if any.

    Boot protocol >= 2.08 records the payload's place after the real-mode setup
    code (``setup_sects`` 512-byte sectors plus the boot sector).
    """
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    begin = (setup_sects + 1) * 512 + offset
    if length < 8 or begin + length > len(data):
        return None
    return begin, length


def _format_at(data: bytes, pos: int) -> str | None:
    for fmt, magic in _MAGICS:
        if data.startswith(magic, pos) and (
            fmt != "bzip2" or data[pos + 4 : pos + 10] == b"1AY&SY"
        ):
            return fmt
    return None


def _candidates(data: bytes) -> Iterator[tuple[str, int, int | None]]:
    """(format, offset, length or None) of possible payloads, most likely first."""
    header = bzimage_payload(data)
    if header is not None:
        fmt = _format_at(data, header[0])
        if fmt is not None:
            yield fmt, header[0], header[1]
    hits: list[int] = []
    for _, magic in _MAGICS:
        pos = data.find(magic)
        while pos != -1:
            hits.append(pos)
            pos = data.find(magic, pos + 1)
    for pos in sorted(set(hits))[:MAX_CANDIDATES]:
        fmt = _format_at(data, pos)
        if fmt is not None and (header is None or pos != header[0]):
            yield fmt, pos, None


class _MissingTool(Exception):
    pass


def _decompress(fmt: str, blob: bytes) -> bytes | None:
    """Decompress one stream (trailing data is ignored); None if it is not one."""
    try:
        if fmt == "gzip":
            return zlib.decompressobj(wbits=31).decompress(blob, MAX_VMLINUX)
        if fmt in ("xz", "lzma"):
            kind = lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE
            return lzma.LZMADecompressor(format=kind).decompress(blob, MAX_VMLINUX)
        if fmt == "bzip2":
            return bz2.BZ2Decompressor().decompress(blob, MAX_VMLINUX)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
        return None
    argv, package = _TOOLS[fmt]
    if shutil.which(argv[0]) is None:
        raise _MissingTool(f"{argv[0]} (apt-get install {package})")
    try:
        # The exit status is ignored: tools complain about data after the stream
        # (the kernel's appended size, or the rest of the file), and the ELF check
        # decides instead -- as scripts/extract-vmlinux does.
        proc = subprocess.run(argv, input=blob, capture_output=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout


def decompress_kernel(data: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (or any file embedding a compressed one)."""
    missing: list[str] = []
    for fmt, begin, length in _candidates(data):
        blob = data[begin : begin + length] if length is not None else data[begin:]
        expected = None
        if length is not None:
            # The payload ends with the uncompressed size (gzip's own ISIZE field;
            # the kernel appends it for the other formats, which must not see it).
            (expected,) = struct.unpack("<I", blob[-4:])
            if fmt != "gzip":
                blob = blob[:-4]
        try:
            out = _decompress(fmt, blob)
        except _MissingTool as exc:
            missing.append(str(exc))
            continue
        if out and is_elf64(out) and (expected is None or len(out) == expected):
            return out
    hint = f"install {', '.join(missing)}" if missing else None
    raise ProvisionError(
        "no compressed ELF kernel found in the kernel image"
        + (f" (needs {', '.join(missing)})" if missing else ""),
        hint=hint,
    )


def default_vmlinux_path(bzimage: Path) -> Path:
    """Where the extracted kernel is cached: next to the bzImage, ``vmlinuz-X`` -> ``vmlinux-X``."""
    name = bzimage.name
    return bzimage.with_name(
        name.replace("vmlinuz", "vmlinux") if "vmlinuz" in name else f"{name}.vmlinux"
    )


def extract_vmlinux(bzimage: Path, dest: Path | None = None) -> Path:
    """An uncompressed ELF kernel for ``bzimage``, extracted once and cached at ``dest``.

    A kernel that is already ELF is returned as it is.  The cache is reused while
    it is newer than the bzImage; it is written atomically (concurrent VMs may
    extract at the same time).
    """
    with bzimage.open("rb") as fh:
        if is_elf64(fh.read(8)):
            return bzimage
    dest = dest or default_vmlinux_path(bzimage)
    with contextlib.suppress(OSError):
        if dest.stat().st_mtime >= bzimage.stat().st_mtime:
            with dest.open("rb") as fh:
                if is_elf64(fh.read(8)):
                    return dest
    image = decompress_kernel(bzimage.read_bytes())
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(image)
        Path(tmp).replace(dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("extracted %s (%d bytes) from %s", dest, len(image), bzimage)
    return dest


#: ``XEN_ELFNOTE_PHYS32_ENTRY``: the note by which a kernel offers its PVH entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4
#: Bytes of program headers and notes read when looking for the PVH note.
_MAX_NOTES = 1 << 20


def has_pvh_entry(path: Path) -> bool:
    """Whether the ELF kernel at ``path`` has a PVH entry (a ``Xen`` note of type 18).

    Reads only the ELF header, the program headers and the ``PT_NOTE``
    segments; a file that is not a well-formed ELF64 has none.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
            if not is_elf64(head) or len(head) < 64:
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            if phentsize < 56 or phnum == 0 or phentsize * phnum > _MAX_NOTES:
                return False
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
            for i in range(len(table) // phentsize):
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
                    "<IIQQQQ", table, i * phentsize
                )
                if p_type != _PT_NOTE or p_filesz > _MAX_NOTES:
                    continue
                fh.seek(p_offset)
                if _xen_entry_note(fh.read(p_filesz)):
                    return True
    except OSError:
        return False
    return False


def _xen_entry_note(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + namesz
        name = notes[pos + 12 : name_end].rstrip(b"\0")
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        # Name and descriptor are each padded to 4 bytes.
        pos = pos + 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_kernel(kernel: Path, dest: Path | None = None) -> Path:
    """What QEMU should boot for ``kernel``: its ``vmlinux`` when that has a PVH entry.

    Otherwise, or when the ``vmlinux`` cannot be extracted here (a decompressor
    is missing), ``kernel`` itself, booted the usual way: slower, not wrong.
    """
    try:
        vmlinux = extract_vmlinux(kernel, dest)
    except (ProvisionError, OSError) as exc:
        log.warning("booting %s without PVH: %s", kernel, exc)
        return kernel
    return vmlinux if has_pvh_entry(vmlinux) else kernel
