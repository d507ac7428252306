"""A deterministic writer for the ``newc`` cpio format the Linux kernel unpacks.

Every entry gets uid/gid 0, mtime 0 and a sequential inode number, so the same
calls always produce the same bytes (the initramfs cache is keyed by a digest of
its inputs, and reproducible images are easier to debug).  Paths are relative
(no leading slash) and a directory must be added before anything inside it:
that is the order the kernel needs to create them.
"""

from __future__ import annotations

import stat
from typing import Protocol


class Writable(Protocol):
    """Anything with ``write(bytes)``: a file, a ``GzipFile``, a ``BytesIO``."""

    def write(self, data: bytes, /) -> object: ...


_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Write a ``newc`` archive to ``fileobj`` (which the caller owns and closes)."""

    def __init__(self, fileobj: Writable) -> None:
        self._out = fileobj
        self._next_ino = 1
        self._dirs: set[str] = set()
        self._paths: set[str] = set()
        self._closed = False

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (``mode`` holds permission bits only)."""
        name = self._claim(path)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with contents ``data``."""
        name = self._claim(path)
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path -> target`` (the target is stored verbatim)."""
        if not target:
            raise ValueError(f"cpio: empty symlink target for {path!r}")
        name = self._claim(path)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. ``dev/console`` 5:1 for the kernel's init)."""
        name = self._claim(path)
        self._entry(name, stat.S_IFCHR | (mode & 0o7777), b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer.  Idempotent; the file object itself stays open."""
        if self._closed:
            return
        self._closed = True
        self._header(_TRAILER, ino=0, mode=0, nlink=1, size=0, rdev=(0, 0))

    def _claim(self, path: str) -> str:
        if self._closed:
            raise ValueError("cpio: archive already closed")
        name = path.lstrip("/")
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"cpio: invalid path {path!r}")
        if "\0" in name or name == _TRAILER:
            raise ValueError(f"cpio: invalid path {path!r}")
        if name in self._paths:
            raise ValueError(f"cpio: duplicate path {name!r}")
        parent = "/".join(parts[:-1])
        if parent and parent not in self._dirs:
            raise ValueError(f"cpio: parent directory {parent!r} of {name!r} was not added first")
        self._paths.add(name)
        return name

    def _entry(
        self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if len(data) > 0xFFFFFFFF:
            raise ValueError(f"cpio: {name!r} is too large for the newc format")
        ino = self._next_ino
        self._next_ino += 1
        self._header(name, ino=ino, mode=mode, nlink=nlink, size=len(data), rdev=rdev)
        self._out.write(data)
        self._out.write(_pad(len(data)))

    def _header(
        self, name: str, *, ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int]
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            size,
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check (only used by the "crc" variant)
        )
        header = _MAGIC + b"".join(b"%08x" % f for f in fields)
        self._out.write(header)
        self._out.write(encoded)
        self._out.write(_pad(len(header) + len(encoded)))
