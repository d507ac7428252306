"""Moving file trees in and out of a VM as tar streams.

Two directions, two trust levels:

* :func:`pack_tree` (host -> guest) archives the user's own project, which is
  trusted.  It writes a deterministic PAX stream: entries sorted, owners
  root, modes, symlinks, hardlinks and nanosecond mtimes kept, sockets/FIFOs/
  devices skipped and reported.
* :func:`safe_extract` (guest -> host) unpacks a stream that a *hostile* guest
  produced.  It never uses tarfile's own extraction: every file is created by
  this module, relative to directory file descriptors opened with
  ``O_NOFOLLOW`` from the destination down, so nothing outside the
  destination can be created, written, chmod'ed or utime'd whatever the
  archive says.  Anything dubious stops the extraction with
  :class:`~stoker.errors.UnsafeArchive` (or
  :class:`~stoker.errors.OutputLimitExceeded` for the size/count caps).

tarfile is still used to read the stream, but header decoding goes through
:class:`_GuardedTarInfo`, which handles the extension headers (PAX, GNU long
names) itself instead of tarfile's private ``_proc_*`` methods: those buffer
extension headers of any size, read sparse maps of any length and (in Pythons
without the CVE-2024-6232 fix, such as 3.11.7) run backtracking regular
expressions on guest-supplied bytes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal, Self

from stoker.errors import OutputLimitExceeded, UnsafeArchive, UsageError

log = logging.getLogger(__name__)

__all__ = ["ExtractLimits", "ExtractReport", "PackReport", "pack_tree", "safe_extract"]

#: Size of the blocks file data is copied in (both directions).
_CHUNK: Final = 1 << 20
#: Size of tarfile's stream buffer (how much it asks ``read``/``write`` for at a time).
_STREAM_BUFSIZE: Final = 1 << 16
#: Largest PAX / GNU long-name extension header accepted from the guest.
_MAX_EXT_HEADER: Final = 1 << 16
#: Most extension headers accepted in front of one member.
_MAX_EXT_CHAIN: Final = 8
#: Directory fds kept open while extracting (archives are sorted, so few are needed).
_DIR_CACHE: Final = 32
#: Largest mtime accepted, in nanoseconds either side of the epoch (what utimensat takes).
_MAX_MTIME_NS: Final = (1 << 63) - 1

_NS: Final = 1_000_000_000
_MTIME_RE: Final = re.compile(r"(-?)(\d{1,19})(?:\.(\d{0,64}))?")
_SIZE_RE: Final = re.compile(r"\d{1,20}")

_EXTENSION_TYPES: Final = (
    tarfile.XHDTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_TYPE_NAMES: Final = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
    tarfile.XGLTYPE: "global PAX header",
}
# Exceptions tarfile may raise on bad input; all become "malformed tar stream".
_TAR_ERRORS: Final = (tarfile.TarError, EOFError, ValueError, UnicodeError, OverflowError)


# --------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackReport:
    """What :func:`pack_tree` wrote.

    ``files`` counts archive members of every kind (files, directories,
    symlinks, hardlinks); ``bytes`` is the regular-file payload; ``skipped``
    lists the archive names of sockets, FIFOs and device nodes left out.
    """

    files: int
    bytes: int
    skipped: list[str]


def pack_tree(src: Path, out: BinaryIO, *, arcname: str = ".") -> PackReport:
    """Write ``src`` (a directory, or a single file) to ``out`` as a PAX tar stream.

    With the default ``arcname="."`` a directory's *contents* are at the root
    of the archive (no entry for the directory itself) and a single file is
    stored under its own name; any other ``arcname`` is the name the directory
    or file gets in the archive.  A symlink given as ``src`` is followed;
    symlinks inside the tree are stored as symlinks.

    The output is deterministic (entries sorted by name, owners ``0``/``root``)
    and streamed: ``out`` only needs ``write``, and files are copied in
    chunks.  Raises :class:`UsageError` when ``src`` is missing or unreadable
    (the stream written so far must then be discarded).  Errors writing to
    ``out`` propagate unchanged.
    """
    try:
        st = src.stat()
    except FileNotFoundError:
        raise UsageError(f"{src}: no such file or directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {src}: {exc.strerror}") from exc
    root = _pack_root_name(arcname)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UsageError(f"{src}: not a regular file or directory")

    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_STREAM_BUFSIZE
    ) as tf:
        packer = _Packer(tf)
        if stat.S_ISDIR(st.st_mode):
            packer.add_tree(src, st, root)
        else:
            packer.add_file(str(src), root or src.name, follow=True)
    log.debug(
        "packed %s: %d members, %d bytes, skipped %s",
        src,
        packer.files,
        packer.bytes,
        packer.skipped,
    )
    return PackReport(files=packer.files, bytes=packer.bytes, skipped=packer.skipped)


def _pack_root_name(arcname: str) -> str:
    """Normalise ``arcname``; ``""`` stands for the root of the archive."""
    if arcname.startswith("/") or "\0" in arcname:
        raise UsageError(f"arcname must be a relative path, not {arcname!r}")
    parts = [p for p in arcname.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"arcname must not contain '..': {arcname!r}")
    return "/".join(parts)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _format_ns(ns: int) -> str:
    """An exact decimal PAX time, e.g. ``1700000000.123456789``."""
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), _NS)
    return f"{sign}{sec}.{frac:09d}".rstrip("0").rstrip(".")


_USTAR_MAGIC: Final = b"ustar\x0000"


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar_block(
    name: bytes, mode: int, size: int, mtime: int, kind: bytes, linkname: bytes, owner: bytes
) -> bytes:
    """One ustar header block, laid out exactly as ``TarInfo._create_header`` does."""
    block = b"".join(
        (
            name.ljust(100, b"\0"),
            _octal(mode & 0o7777, 8),
            _octal(0, 8),  # uid
            _octal(0, 8),  # gid
            _octal(size, 12),
            _octal(mtime, 12),
            b"        ",  # checksum, counted as spaces
            kind,
            linkname.ljust(100, b"\0"),
            _USTAR_MAGIC,
            owner.ljust(32, b"\0"),  # uname
            owner.ljust(32, b"\0"),  # gname
        )
    ).ljust(tarfile.BLOCKSIZE, b"\0")
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


class _PackTarInfo(tarfile.TarInfo):
    """TarInfo with a fast ``tobuf`` for the members pack_tree writes most.

    tarfile's generic header code costs ~100 us per member (two headers with
    PAX mtimes), most of the time for 10,000 small files.  Plain members
    (ASCII names of at most 100 characters, root owner, in-range numbers, no
    PAX header but ``mtime``) are encoded here, byte-for-byte as tarfile
    would (a test compares both); everything else goes to tarfile.
    """

    __slots__ = ()

    def tobuf(
        self,
        format: Literal[0, 1, 2] | None = tarfile.PAX_FORMAT,
        encoding: str | None = tarfile.ENCODING,
        errors: str = "surrogateescape",
    ) -> bytes:
        name = (
            self.name + "/" if self.type == tarfile.DIRTYPE and self.name[-1:] != "/" else self.name
        )
        mtime_pax = self.pax_headers.get("mtime")
        if not (
            format == tarfile.PAX_FORMAT
            and self.type not in (tarfile.CHRTYPE, tarfile.BLKTYPE)
            and name.isascii()
            and len(name) <= 100
            and self.linkname.isascii()
            and len(self.linkname) <= 100
            and self.uname == self.gname == "root"
            and self.uid == self.gid == 0
            and type(self.size) is int
            and 0 <= self.size < 8**11
            and type(self.mtime) is int
            and 0 <= self.mtime < 8**11
            and len(self.pax_headers) == (mtime_pax is not None)
            and (mtime_pax is None or mtime_pax.isascii())
        ):
            return super().tobuf(format, encoding, errors)
        header = _ustar_block(
            name.encode("ascii"),
            self.mode,
            self.size,
            self.mtime,
            self.type,
            self.linkname.encode("ascii"),
            b"root",
        )
        if mtime_pax is None:
            return header
        record = _pax_record(b"mtime", mtime_pax.encode("ascii"))
        pax = _ustar_block(b"././@PaxHeader", 0, len(record), 0, tarfile.XHDTYPE, b"", b"")
        padding = b"\0" * (-len(record) % tarfile.BLOCKSIZE)
        return pax + record + padding + header


def _pax_record(key: bytes, value: bytes) -> bytes:
    """``"%d %s=%s\\n"`` where the length counts its own digits (as tarfile computes it)."""
    payload = len(key) + len(value) + 3
    length = prev = 0
    while True:
        length = payload + len(str(prev))
        if length == prev:
            break
        prev = length
    return b"%d %s=%s\n" % (length, key, value)


class _SourceReader:
    """Gives ``TarFile.addfile`` exactly the bytes it asks for from a source file.

    Read failures and files that shrank are the user's problem
    (:class:`UsageError`), unlike failures writing the stream, which
    propagate unchanged.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            raise ValueError("_SourceReader reads sized blocks only")
        chunks: list[bytes] = [b""]
        got = 0
        while got < n:
            try:
                data = os.read(self._fd, min(n - got, _CHUNK))
            except OSError as exc:
                raise UsageError(f"cannot read {self._path}: {exc.strerror}") from exc
            if not data:
                raise UsageError(f"{self._path} shrank while it was being packed")
            chunks.append(data)
            got += len(data)
        return chunks[1] if len(chunks) == 2 else b"".join(chunks)


class _Packer:
    """Adds a tree to a tar stream in sorted, depth-first order."""

    def __init__(self, tf: tarfile.TarFile) -> None:
        self._tf = tf
        self._inodes: dict[tuple[int, int], str] = {}  # (dev, ino) -> first archive name
        self.files = 0
        self.bytes = 0
        self.skipped: list[str] = []

    def add_tree(self, root: Path, st: os.stat_result, name: str) -> None:
        if name:
            self._add(self._info(name, st, tarfile.DIRTYPE))
        # An explicit stack of directory listings: no recursion limit on deep trees.
        stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(self._listdir(str(root)), name)]
        while stack:
            entries, prefix = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            child = _join(prefix, entry.name)
            if entry.is_file(follow_symlinks=False):
                self.add_file(entry.path, child)
                continue
            est = self._lstat(entry.path)
            if stat.S_ISDIR(est.st_mode):
                self._add(self._info(child, est, tarfile.DIRTYPE))
                stack.append((self._listdir(entry.path), child))
            elif stat.S_ISLNK(est.st_mode):
                info = self._info(child, est, tarfile.SYMTYPE)
                with _reading(entry.path):
                    # Not Path.readlink(): Path would normalise the target ("./x" -> "x").
                    info.linkname = os.readlink(entry.path)  # noqa: PTH115
                self._add(info)
            elif stat.S_ISREG(est.st_mode):  # d_type was unknown
                self.add_file(entry.path, child)
            else:
                log.debug("not packing special file %s", entry.path)
                self.skipped.append(child)

    def add_file(self, path: str, name: str, *, follow: bool = False) -> None:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        with _reading(path):
            fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced since it was listed
                self.skipped.append(name)
                return
            if st.st_nlink > 1:
                first = self._inodes.setdefault((st.st_dev, st.st_ino), name)
                if first != name:
                    info = self._info(name, st, tarfile.LNKTYPE)
                    info.linkname = first
                    self._add(info)
                    return
            info = self._info(name, st, tarfile.REGTYPE)
            info.size = st.st_size
            self._add(info, _SourceReader(fd, path))
            self.bytes += st.st_size
        finally:
            os.close(fd)

    def _add(self, info: tarfile.TarInfo, data: _SourceReader | None = None) -> None:
        self._tf.addfile(info, data)
        _forget_members(self._tf)
        self.files += 1

    @staticmethod
    def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        info = _PackTarInfo(name)
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        sec, frac = divmod(st.st_mtime_ns, _NS)
        info.mtime = sec
        if frac:
            # tarfile would write str(float): only microseconds survive.
            info.pax_headers = {"mtime": _format_ns(st.st_mtime_ns)}
        return info

    @staticmethod
    def _listdir(path: str) -> Iterator[os.DirEntry[str]]:
        with _reading(path), os.scandir(path) as it:
            return iter(sorted(it, key=lambda e: e.name))

    @staticmethod
    def _lstat(path: str) -> os.stat_result:
        with _reading(path):
            return os.lstat(path)


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn an OSError on the (trusted) source tree into a UsageError naming the file."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else path
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from exc


def _forget_members(tf: tarfile.TarFile) -> None:
    """Drop the TarInfo list TarFile keeps of every member (unbounded in stream mode)."""
    members = getattr(tf, "members", None)
    if isinstance(members, list):
        members.clear()


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what a guest may send back through :func:`safe_extract`."""

    max_bytes: int = 1 << 30  # total regular-file payload
    max_members: int = 100_000
    max_name_len: int = 4096  # bytes, for member names and link targets
    max_depth: int = 64  # path components


@dataclass
class ExtractReport:
    """What :func:`safe_extract` wrote.

    ``files`` holds the members written (regular files, directories, symlinks
    and hardlinks) as paths relative to the destination, in archive order;
    ``bytes`` is the regular-file payload.  Parent directories created
    implicitly and a ``.`` entry for the destination itself are not listed.
    """

    files: list[str]
    bytes: int


_DEFAULT_LIMITS: Final = ExtractLimits()


def safe_extract(
    stream: BinaryIO, dest: Path, limits: ExtractLimits = _DEFAULT_LIMITS
) -> ExtractReport:
    """Extract the tar stream a (hostile) guest sent into the existing directory ``dest``.

    The stream is read sequentially with ``stream.read(n)`` only.  Regular
    files, directories, symlinks and hardlinks are extracted; modes are kept
    without setuid/setgid/sticky bits, mtimes are kept (to the nanosecond for
    PAX times), owners are not.  Directories get their final mode and mtime
    once everything else is written.

    Raises :class:`UsageError` if ``dest`` is not an existing directory,
    :class:`OutputLimitExceeded` when ``limits`` are exceeded and
    :class:`UnsafeArchive` on anything else the archive should not do:
    absolute, ``..``, empty, NUL-containing, too long or too deep names;
    symlinks that are absolute or leave ``dest``; hardlinks to anything but a
    regular file extracted earlier by this call; devices, FIFOs, sparse files
    and other special members; paths through a symlink; replacing a directory
    by a non-directory or the reverse, or replacing a symlink; malformed or
    truncated tar data.  It stops at the first problem; members already
    written stay, but nothing outside ``dest`` is ever touched.

    Existing regular files are overwritten in place (``O_TRUNC``), except ones
    with several links, which are unlinked first so the other names keep
    their content.  Operating-system errors while writing (for instance a
    component longer than the file system allows, or a full disk) are
    reported as :class:`UnsafeArchive` naming the member.
    """
    root_fd = _open_destination(dest)
    extractor = _Extractor(root_fd, limits)
    try:
        extractor.run(stream)
    finally:
        extractor.close()
    log.debug(
        "extracted %d members, %d bytes into %s",
        len(extractor.report.files),
        extractor.report.bytes,
        dest,
    )
    return extractor.report


def _open_destination(dest: Path) -> int:
    try:
        return os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{dest}: destination directory does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"{dest}: destination is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot open destination {dest}: {exc.strerror}") from exc


def _show(text: str) -> str:
    return repr(text) if len(text) <= 200 else repr(text[:200]) + "..."


def _refuse(member: str, reason: str) -> UnsafeArchive:
    return UnsafeArchive(f"member {_show(member)}: {reason}")


def _malformed(reason: str) -> UnsafeArchive:
    return UnsafeArchive(f"malformed tar stream: {reason}")


def _round_block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _data_size(info: tarfile.TarInfo) -> int:
    """Bytes of data following ``info``'s header (tarfile's rule: files and unknown types)."""
    if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES:
        return _round_block(info.size)
    return 0


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse PAX records (``"%d %s=%s\\n"``) in linear time, strictly."""
    records: dict[str, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):  # padding after the last record
            break
        space = data.find(b" ", pos, min(end, pos + 21))
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise _malformed(f"bad PAX record length at byte {pos} of an extended header")
        record_end = pos + int(digits)
        equals = data.find(b"=", space + 1, max(space + 1, record_end - 1))
        if record_end > end or equals <= space + 1 or data[record_end - 1 : record_end] != b"\n":
            raise _malformed(f"bad PAX record at byte {pos} of an extended header")
        try:
            key = data[space + 1 : equals].decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("undecodable PAX keyword") from None
        records[key] = data[equals + 1 : record_end - 1]
        pos = record_end
    return records


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo whose header parsing is bounded and strict.

    ``fromtarfile`` is the documented hook tarfile calls for every header.
    Plain headers are still decoded by ``frombuf``; extension headers (PAX
    ``x``, GNU long names) are limited in size and number and parsed here.
    Global PAX headers and sparse files are refused outright.  Truncated,
    empty or corrupt headers raise :class:`UnsafeArchive` (tarfile itself
    would quietly treat them as the end of the archive).
    """

    __slots__ = ()

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> Self:
        return cls._read_header(tarfile, depth=0)

    @classmethod
    def _read_header(cls, tf: tarfile.TarFile, depth: int) -> Self:
        start = tf.fileobj.tell()
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)
        if not buf:
            raise _malformed(
                "empty stream" if start == 0 else "stream ends without an end-of-archive marker"
            )
        if len(buf) != tarfile.BLOCKSIZE:
            raise _malformed(f"truncated header at offset {start}")
        if not buf.strip(b"\0"):
            if depth > 0:
                raise _malformed("extension header not followed by a member")
            # The end-of-archive marker: frombuf raises EOFHeaderError, on which
            # TarFile.next() returns None.
            return cls.frombuf(buf, tf.encoding, tf.errors)
        try:
            info = cls.frombuf(buf, tf.encoding, tf.errors)
        except tarfile.HeaderError as exc:
            raise _malformed(f"{exc} at offset {start}") from None
        info.offset = start
        if info.size < 0:
            raise _malformed(f"negative size at offset {start}")
        if info.type in _EXTENSION_TYPES:
            return cls._extended(tf, info, depth)
        if info.type in (tarfile.GNUTYPE_SPARSE, tarfile.XGLTYPE):
            raise _refuse(info.name, f"{_TYPE_NAMES[info.type]}s are not supported")
        # What TarInfo._proc_builtin does for a plain member.
        info.offset_data = tf.fileobj.tell()
        tf.offset = info.offset_data + _data_size(info)
        return info

    @classmethod
    def _extended(cls, tf: tarfile.TarFile, ext: Self, depth: int) -> Self:
        if depth >= _MAX_EXT_CHAIN:
            raise _malformed(f"more than {_MAX_EXT_CHAIN} extension headers in a row")
        if ext.size > _MAX_EXT_HEADER:
            raise _malformed(f"extension header of {ext.size} bytes (limit {_MAX_EXT_HEADER})")
        padded = _round_block(ext.size)
        data = tf.fileobj.read(padded)
        if len(data) != padded:
            raise _malformed("truncated extension header")
        data = data[: ext.size]
        info = cls._read_header(tf, depth + 1)
        info.offset = ext.offset
        if ext.type == tarfile.GNUTYPE_LONGNAME:
            info.name = data.split(b"\0", 1)[0].decode(tf.encoding, tf.errors)
            if info.isdir():
                info.name = info.name.rstrip("/")
        elif ext.type == tarfile.GNUTYPE_LONGLINK:
            info.linkname = data.split(b"\0", 1)[0].decode(tf.encoding, tf.errors)
        else:
            cls._apply_pax(tf, info, _parse_pax(data))
        return info

    @staticmethod
    def _apply_pax(tf: tarfile.TarFile, info: tarfile.TarInfo, records: dict[str, bytes]) -> None:
        headers = dict(info.pax_headers)
        for key, raw in records.items():
            if key.startswith("GNU.sparse."):
                raise _refuse(info.name, "sparse files are not supported")
            if key in ("path", "linkpath", "uname", "gname"):
                headers[key] = raw.decode(tf.encoding, "surrogateescape")
            else:
                headers[key] = raw.decode("utf-8", "replace")
        if "path" in records:
            info.name = headers["path"].rstrip("/")
        if "linkpath" in records:
            info.linkname = headers["linkpath"]
        if "size" in records:
            if not _SIZE_RE.fullmatch(headers["size"]):
                raise _malformed(f"bad PAX size {_show(headers['size'])}")
            info.size = int(headers["size"])
            tf.offset = info.offset_data + _data_size(info)
        if "mtime" in records:
            try:
                info.mtime = float(headers["mtime"])
            except ValueError:
                raise _malformed(f"bad PAX mtime {_show(headers['mtime'])}") from None
        info.pax_headers = headers


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, exact when a PAX header gives it in decimal."""
    raw = info.pax_headers.get("mtime")
    match = _MTIME_RE.fullmatch(raw) if raw is not None else None
    if match is not None:
        sign, sec, frac = match.groups()
        ns = int(sec) * _NS + int((frac or "")[:9].ljust(9, "0"))
        ns = -ns if sign else ns
    elif isinstance(info.mtime, float):
        if not math.isfinite(info.mtime) or abs(info.mtime) > _MAX_MTIME_NS / _NS:
            raise _refuse(info.name, f"mtime {info.mtime} is out of range")
        ns = round(info.mtime * _NS)
    else:
        ns = info.mtime * _NS
    if abs(ns) > _MAX_MTIME_NS:
        raise _refuse(info.name, f"mtime {ns / _NS:.0f} is out of range")
    return ns


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_guarded(stream: BinaryIO) -> tarfile.TarFile:
    """Open ``stream`` for sequential reading (this already reads the first header)."""
    try:
        return tarfile.open(
            fileobj=stream, mode="r|", tarinfo=_GuardedTarInfo, bufsize=_STREAM_BUFSIZE
        )
    except _TAR_ERRORS as exc:
        raise _malformed(str(exc) or type(exc).__name__) from exc


_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _Extractor:
    """One :func:`safe_extract` call.

    Every path is resolved component by component from the destination's
    fd: each component is lstat'ed (symlinks refused) and opened with
    ``O_DIRECTORY | O_NOFOLLOW``, and the member is then created relative to
    its parent's fd.  A small LRU of directory fds keeps sorted archives
    cheap; since directories are never replaced, cached fds stay valid.
    """

    def __init__(self, root_fd: int, limits: ExtractLimits) -> None:
        self._root = root_fd
        self._limits = limits
        self._cache: OrderedDict[tuple[str, ...], int] = OrderedDict()
        # Regular files written by this call (hardlink targets): path -> (st_dev, st_ino).
        self._regular: dict[tuple[str, ...], tuple[int, int]] = {}
        # Directory members: path -> (mode, mtime_ns), applied at the end.
        self._dirs: dict[tuple[str, ...], tuple[int, int]] = {}
        self._members = 0
        self.report = ExtractReport(files=[], bytes=0)

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def run(self, stream: BinaryIO) -> None:
        with _open_guarded(stream) as tf:
            while (member := self._next(tf)) is not None:
                self._members += 1
                if self._members > self._limits.max_members:
                    raise OutputLimitExceeded(
                        f"archive has more than {self._limits.max_members} members"
                    )
                self._extract(tf, member)
        self._finish_directories()

    @staticmethod
    def _next(tf: tarfile.TarFile) -> tarfile.TarInfo | None:
        try:
            member = tf.next()
        except _TAR_ERRORS as exc:
            raise _malformed(str(exc) or type(exc).__name__) from exc
        _forget_members(tf)
        return member

    # -- members

    def _extract(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = self._split(name, "name", name)
        try:
            if member.isreg():
                self._file(tf, member, parts)
            elif member.isdir():
                self._directory(member, parts)
            elif member.issym():
                self._symlink(member, parts)
            elif member.islnk():
                self._hardlink(member, parts)
            elif member.type in _TYPE_NAMES:
                raise _refuse(name, f"{_TYPE_NAMES[member.type]}s are not allowed")
            else:
                raise _refuse(name, f"unsupported member type {member.type!r}")
        except OSError as exc:
            raise _refuse(name, f"cannot extract: {exc.strerror or exc}") from exc

    def _file(self, tf: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name = member.name
        if not parts:
            raise _refuse(name, "a file cannot replace the destination directory")
        if self.report.bytes + member.size > self._limits.max_bytes:
            raise OutputLimitExceeded(
                f"member {_show(name)}: {member.size} bytes would take the archive past "
                f"its limit of {self._limits.max_bytes} bytes"
            )
        mtime = _mtime_ns(member)
        parent = self._parent(parts, name)
        try:
            fd = self._open_for_writing(parent, parts[-1], name)
        finally:
            os.close(parent)
        try:
            self._copy(tf, member, fd)
            os.fchmod(fd, member.mode & 0o777)
            os.utime(fd, ns=(mtime, mtime))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._regular[parts] = (st.st_dev, st.st_ino)
        self._written(parts, member.size)

    def _open_for_writing(self, parent: int, base: str, member: str) -> int:
        st = _lstat_at(parent, base)
        flags = _FILE_FLAGS | os.O_CREAT | os.O_EXCL
        if st is not None:
            self._check_replaceable(st, member, "a file")
            if st.st_nlink > 1:
                # Writing in place would change every other name of the inode too.
                os.unlink(base, dir_fd=parent)
            else:
                flags = _FILE_FLAGS | os.O_TRUNC
        fd = os.open(base, flags, 0o600, dir_fd=parent)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # only if something raced us
            os.close(fd)
            raise _refuse(member, "is not a regular file on disk")
        return fd

    @staticmethod
    def _copy(tf: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        remaining = member.size
        try:
            src = tf.extractfile(member)
            if src is None:
                raise _malformed(f"member {_show(member.name)} has no data")
            while remaining:
                chunk = src.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                _write_all(fd, chunk)
                remaining -= len(chunk)
        except _TAR_ERRORS as exc:
            raise _malformed(f"member {_show(member.name)}: {exc}") from exc
        if remaining:
            raise _malformed(
                f"member {_show(member.name)}: data ends {remaining} bytes short of its size"
            )

    def _directory(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        if not parts:
            return  # "." is the destination itself, which the guest may not chmod or utime
        name = member.name
        mode, mtime = member.mode & 0o777, _mtime_ns(member)
        parent = self._parent(parts, name)
        try:
            base = parts[-1]
            st = _lstat_at(parent, base)
            if st is None:
                os.mkdir(base, 0o700, dir_fd=parent)
                st = _lstat_at(parent, base)
            if st is None or stat.S_ISLNK(st.st_mode):
                raise _refuse(name, "would replace an existing symlink with a directory")
            if not stat.S_ISDIR(st.st_mode):
                raise _refuse(name, "would replace a file with a directory")
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
        finally:
            os.close(parent)
        self._cache_put(parts, fd)
        os.fchmod(fd, mode | 0o700)  # keep it usable until _finish_directories
        self._dirs[parts] = (mode, mtime)
        self._written(parts, 0)

    def _symlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name, target = member.name, member.linkname
        if not parts:
            raise _refuse(name, "a symlink cannot replace the destination directory")
        self._check_symlink_target(parts, target, name)
        mtime = _mtime_ns(member)
        parent = self._parent(parts, name)
        try:
            base = parts[-1]
            st = _lstat_at(parent, base)
            if st is not None:
                self._check_replaceable(st, name, "a symlink")
                os.unlink(base, dir_fd=parent)
                self._regular.pop(parts, None)
            os.symlink(target, base, dir_fd=parent)
            os.utime(base, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        self._written(parts, 0)

    def _hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name, target = member.name, member.linkname
        if not parts:
            raise _refuse(name, "a hardlink cannot replace the destination directory")
        tparts = self._split(target, "hardlink target", name)
        inode = self._regular.get(tparts)
        if inode is None:
            raise _refuse(
                name,
                f"hardlink to {_show(target)}, which is not a regular file "
                "extracted earlier from this archive",
            )
        if tparts == parts:
            raise _refuse(name, "hardlink to itself")
        tdir = self._dir(tparts[:-1], name, create=False)
        try:
            st = _lstat_at(tdir, tparts[-1])
            if st is None or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != inode:
                raise _refuse(name, f"hardlink target {_show(target)} changed on disk")
            parent = self._parent(parts, name)
            try:
                base = parts[-1]
                old = _lstat_at(parent, base)
                if old is not None:
                    self._check_replaceable(old, name, "a hardlink")
                    os.unlink(base, dir_fd=parent)
                os.link(tparts[-1], base, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
        finally:
            os.close(tdir)
        self._regular[parts] = inode
        self._written(parts, 0)

    def _written(self, parts: tuple[str, ...], size: int) -> None:
        self.report.files.append("/".join(parts))
        self.report.bytes += size

    def _finish_directories(self) -> None:
        """Give directories their own mode and mtime, deepest first."""
        for parts in sorted(self._dirs, key=len, reverse=True):
            mode, mtime = self._dirs[parts]
            name = "/".join(parts)
            try:
                fd = self._dir(parts, name, create=False)
                try:
                    os.fchmod(fd, mode)
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
            except OSError as exc:
                raise _refuse(name, f"cannot set directory attributes: {exc.strerror}") from exc

    # -- checks

    def _split(self, path: str, what: str, member: str) -> tuple[str, ...]:
        """Split a member name or hardlink target into safe components."""
        if not path:
            raise _refuse(member, f"empty {what}")
        if "\0" in path:
            raise _refuse(member, f"NUL byte in {what} {_show(path)}")
        try:
            size = len(os.fsencode(path))
        except UnicodeEncodeError:
            raise _refuse(member, f"undecodable {what} {_show(path)}") from None
        if size > self._limits.max_name_len:
            raise _refuse(
                member, f"{what} is {size} bytes long (limit {self._limits.max_name_len})"
            )
        if path.startswith("/"):
            raise _refuse(member, f"{what} {_show(path)} is absolute")
        parts = tuple(p for p in path.split("/") if p not in ("", "."))
        if ".." in parts:
            raise _refuse(member, f"{what} {_show(path)} contains '..'")
        if len(parts) > self._limits.max_depth:
            raise _refuse(
                member, f"{what} is {len(parts)} levels deep (limit {self._limits.max_depth})"
            )
        return parts

    def _check_symlink_target(self, parts: tuple[str, ...], target: str, member: str) -> None:
        """Refuse targets that are absolute or climb out of the destination.

        ``..`` is only accepted before any name: ``a/../..`` resolved on disk
        depends on whether ``a`` is itself a symlink, so lexical checking
        would not be enough for it.
        """
        if not target:
            raise _refuse(member, "empty symlink target")
        if "\0" in target:
            raise _refuse(member, f"NUL byte in symlink target {_show(target)}")
        if len(os.fsencode(target)) > self._limits.max_name_len:
            raise _refuse(member, f"symlink target longer than {self._limits.max_name_len} bytes")
        if target.startswith("/"):
            raise _refuse(member, f"symlink target {_show(target)} is absolute")
        depth = len(parts) - 1  # of the link's directory below dest
        named = False
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            if comp != "..":
                named = True
            elif named:
                raise _refuse(member, f"symlink target {_show(target)} has '..' after a name")
            else:
                depth -= 1
                if depth < 0:
                    raise _refuse(
                        member, f"symlink target {_show(target)} points outside the destination"
                    )

    @staticmethod
    def _check_replaceable(st: os.stat_result, member: str, what: str) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(member, f"would replace an existing symlink with {what}")
        if stat.S_ISDIR(st.st_mode):
            raise _refuse(member, f"would replace a directory with {what}")
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(member, f"would replace a special file with {what}")

    # -- directory fds

    def _parent(self, parts: tuple[str, ...], member: str) -> int:
        return self._dir(parts[:-1], member, create=True)

    def _dir(self, parts: tuple[str, ...], member: str, *, create: bool) -> int:
        """Open directory ``parts`` below dest without following symlinks; caller closes it."""
        fd, start = self._root, 0
        for i in range(len(parts), 0, -1):
            cached = self._cache.get(parts[:i])
            if cached is not None:
                self._cache.move_to_end(parts[:i])
                fd, start = cached, i
                break
        for i in range(start, len(parts)):
            here, comp = parts[: i + 1], parts[i]
            st = _lstat_at(fd, comp)
            created = False
            if st is None:
                if not create:
                    raise _refuse(member, f"{_show('/'.join(here))} does not exist")
                os.mkdir(comp, 0o700, dir_fd=fd)
                created = True
                st = _lstat_at(fd, comp)
            if st is None or stat.S_ISLNK(st.st_mode):
                raise _refuse(member, f"path goes through the symlink {_show('/'.join(here))}")
            if not stat.S_ISDIR(st.st_mode):
                raise _refuse(member, f"{_show('/'.join(here))} is not a directory")
            fd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            self._cache_put(here, fd)
            if created:
                os.fchmod(fd, 0o755)  # implicit parent: fixed mode, independent of the umask
        return os.dup(fd)

    def _cache_put(self, key: tuple[str, ...], fd: int) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            os.close(old)
        self._cache[key] = fd
        while len(self._cache) > _DIR_CACHE:
            os.close(self._cache.popitem(last=False)[1])
