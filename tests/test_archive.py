"""Tests for stoker.archive: packing the user's tree, extracting a hostile guest's tar."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import socket
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from stoker.archive import (
    ExtractLimits,
    ExtractReport,
    PackReport,
    _PackTarInfo,
    pack_tree,
    safe_extract,
)
from stoker.errors import OutputLimitExceeded, UnsafeArchive, UsageError

T0 = 1_600_000_000  # a fixed mtime for hand-made members

# --------------------------------------------------------------------------- helpers


class ReadOnlyStream:
    """Only ``read``: proves safe_extract never seeks, tells or peeks."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.reads = 0

    def read(self, n: int) -> bytes:
        self.reads += 1
        return self._buf.read(n)


class WriteOnlySink:
    """Only ``write``, like a pipe; keeps a hash and the byte count."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        self.digest.update(data)
        return len(data)


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    linkname: str = "",
    mode: int = 0o644,
    mtime: float = T0,
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.linkname = linkname
    info.size = len(data) if info.isreg() else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if pax:
        info.pax_headers = pax
    return info, data


def build(
    *members: tuple[tarfile.TarInfo, bytes],
    fmt: int = tarfile.PAX_FORMAT,
    global_pax: dict[str, str] | None = None,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def end_of_archive() -> bytes:
    return b"\0" * 1024


def header(info: tarfile.TarInfo, fmt: Literal[0, 1, 2] = tarfile.PAX_FORMAT) -> bytes:
    return info.tobuf(fmt)


def patch_block(block: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite a header field and fix the checksum."""
    raw = bytearray(block[:512])
    raw[offset : offset + len(value)] = value
    raw[148:156] = b" " * 8
    raw[148:155] = b"%06o\0" % sum(raw)
    return bytes(raw) + block[512:]


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``root`` except the ``exclude`` subtree (link counts and ctimes
    left out: removing a name inside dest may legitimately change those)."""
    result: dict[str, tuple[object, ...]] = {}
    top = os.lstat(root)
    result["."] = (top.st_mode, top.st_mtime_ns, sorted(os.listdir(root)))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            if path == exclude:
                result[str(path.relative_to(root))] = ("dest", stat.S_IFMT(st_.st_mode))
                continue
            item: tuple[object, ...] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_uid)
            if stat.S_ISREG(st_.st_mode):
                item += (path.read_bytes(),)
            elif stat.S_ISLNK(st_.st_mode):
                item += (os.readlink(path),)
            elif stat.S_ISDIR(st_.st_mode):
                item += (sorted(os.listdir(path)),)
            result[str(path.relative_to(root))] = item
        if Path(dirpath) == exclude.parent and exclude.name in dirnames:
            dirnames.remove(exclude.name)
    return result


def host_state() -> tuple[object, ...]:
    etc_passwd = Path("/etc/passwd").read_bytes()
    return (etc_passwd, Path("/etc/evil").exists(), Path("/evil").exists())


@dataclass
class Arena:
    """``root/out`` is the destination; ``root`` holds canaries that must never change."""

    root: Path
    dest: Path

    def __post_init__(self) -> None:
        self.before = (snapshot(self.root, self.dest), host_state())

    def assert_outside_unchanged(self) -> None:
        assert (snapshot(self.root, self.dest), host_state()) == self.before
        assert self.dest.is_dir() and not self.dest.is_symlink()

    def extract(self, data: bytes, limits: ExtractLimits | None = None) -> ExtractReport:
        stream = ReadOnlyStream(data)
        if limits is None:
            return safe_extract(stream, self.dest)  # type: ignore[arg-type]
        return safe_extract(stream, self.dest, limits)  # type: ignore[arg-type]

    def refuses(
        self,
        data: bytes,
        match: str,
        exc: type[Exception] = UnsafeArchive,
        limits: ExtractLimits | None = None,
    ) -> None:
        with pytest.raises(exc, match=match):
            self.extract(data, limits)
        self.assert_outside_unchanged()


def make_arena(root: Path, *, pre_link: bool = False) -> Arena:
    """Canaries around (and one hardlinked into) the destination."""
    (root / "canary.txt").write_bytes(b"canary\n")
    (root / "canary_dir").mkdir()
    (root / "canary_dir" / "inner.txt").write_bytes(b"inner\n")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    dest = root / "out"
    dest.mkdir()
    (dest / "existing.txt").write_bytes(b"existing\n")
    os.link(root / "canary.txt", dest / "hl")  # a pre-existing hardlink to outside
    if pre_link:
        (dest / "pre").symlink_to(root / "canary_dir")
    return Arena(root, dest)


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    return make_arena(tmp_path)


def tree_listing(root: Path) -> dict[str, tuple[object, ...]]:
    """Relative path -> (type, mode, mtime_ns, content or link target)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            kind = stat.S_IFMT(st_.st_mode)
            if stat.S_ISREG(st_.st_mode):
                extra: object = path.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(path)
            else:
                extra = None
            rel = str(path.relative_to(root))
            out[rel] = (kind, stat.S_IMODE(st_.st_mode), st_.st_mtime_ns, extra)
    return out


# --------------------------------------------------------------------------- packing


def make_tree(root: Path) -> None:
    """A tree exercising everything pack_tree keeps, with sub-second mtimes."""
    root.mkdir()
    (root / "plain.txt").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))  # several chunks
    (root / "script.sh").write_bytes(b"#!/bin/sh\n")
    (root / "script.sh").chmod(0o755)
    (root / "secret").write_bytes(b"s")
    (root / "secret").chmod(0o600)
    (root / "readonly").write_bytes(b"r")
    (root / "readonly").chmod(0o444)
    (root / "héllo wörld.txt").write_bytes(b"unicode")
    (root / os.fsdecode(b"latin1-\xe9.txt")).write_bytes(b"not utf-8")
    long_dir = root / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 150)).write_bytes(b"long name")
    (root / "emptydir").mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "file").write_bytes(b"deep")
    (root / "sub" / "private").mkdir(mode=0o700)
    (root / "sub" / "private").chmod(0o700)
    (root / "ro_dir").mkdir()
    (root / "ro_dir" / "inside").write_bytes(b"in a read-only dir")
    os.link(root / "plain.txt", root / "sub" / "hardlink.txt")
    os.link(root / "plain.txt", root / "zz_second_link")
    (root / "link_rel").symlink_to("plain.txt")
    (root / "sub" / "link_up").symlink_to("../plain.txt")
    (root / "dangling").symlink_to("does-not-exist")
    (root / "link_dir").symlink_to("sub")
    (root / "link_dot").symlink_to("./sub/deeper")
    # mtimes last, deepest first, so creating children does not change them
    ns = 1_500_000_000_123_456_789
    paths = sorted(
        (Path(d) / n for d, ds, fs in os.walk(root) for n in ds + fs),
        key=lambda p: len(p.parts),
        reverse=True,
    )
    for i, path in enumerate(paths):
        os.utime(path, ns=(ns + i * 1_000_001, ns + i * 1_000_001), follow_symlinks=False)
    (root / "ro_dir").chmod(0o555)
    os.utime(root / "ro_dir", ns=(ns, ns))


def test_round_trip_preserves_everything(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    buf = io.BytesIO()
    packed = pack_tree(src, buf)
    dest = tmp_path / "dest"
    dest.mkdir()
    report = safe_extract(io.BytesIO(buf.getvalue()), dest)

    expected = tree_listing(src)
    assert tree_listing(dest) == expected
    assert sorted(report.files) == sorted(expected)
    assert report.bytes == packed.bytes
    assert packed.files == len(expected)
    assert packed.skipped == []
    # hardlinks are one inode on both sides
    ino = os.lstat(dest / "plain.txt").st_ino
    assert os.lstat(dest / "sub" / "hardlink.txt").st_ino == ino
    assert os.lstat(dest / "zz_second_link").st_ino == ino
    # sub-second times survive exactly, on files, directories and symlinks
    for rel in ("plain.txt", "emptydir", "link_rel", "ro_dir"):
        assert os.lstat(dest / rel).st_mtime_ns == os.lstat(src / rel).st_mtime_ns
    assert os.lstat(dest / "plain.txt").st_mtime_ns % 1_000_000_000 != 0


def test_setuid_bits_are_packed_but_stripped_on_extraction(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "suid").write_bytes(b"x")
    (src / "suid").chmod(0o6755)
    (src / "sticky").mkdir()
    (src / "sticky").chmod(0o3777)
    buf = io.BytesIO()
    pack_tree(src, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        modes = {m.name: m.mode for m in tf}
    assert modes == {"suid": 0o6755, "sticky": 0o3777}
    dest = tmp_path / "dest"
    dest.mkdir()
    safe_extract(io.BytesIO(buf.getvalue()), dest)
    assert stat.S_IMODE(os.lstat(dest / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "sticky").st_mode) == 0o777


def test_pax_headers_carry_exact_nanoseconds_and_root_owner(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    if os.geteuid() == 0:
        os.chown(src / "f", 1234, 5678)
    os.utime(src / "f", ns=(0, 1_700_000_000_000_000_001))
    (src / "whole").write_bytes(b"y")
    os.utime(src / "whole", ns=(0, 1_700_000_000_000_000_000))
    (src / "old").write_bytes(b"z")
    os.utime(src / "old", ns=(0, -1_500_000_000))  # 1969-12-31T23:59:58.5
    buf = io.BytesIO()
    pack_tree(src, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        members = {m.name: m for m in tf}
    f = members["f"]
    assert f.pax_headers["mtime"] == "1700000000.000000001"
    assert (f.uid, f.gid, f.uname, f.gname) == (0, 0, "root", "root")
    assert "mtime" not in members["whole"].pax_headers
    assert members["whole"].mtime == 1_700_000_000
    assert members["old"].pax_headers["mtime"] == "-1.5"
    dest = tmp_path / "dest"
    dest.mkdir()
    safe_extract(io.BytesIO(buf.getvalue()), dest)
    for name in ("f", "whole", "old"):
        assert os.lstat(dest / name).st_mtime_ns == os.lstat(src / name).st_mtime_ns


def test_pack_is_deterministic_and_write_only(tmp_path: Path) -> None:
    # Two trees with the same content and metadata, created in opposite orders.
    names = [f"n{i:02d}" for i in range(30)]
    outputs = []
    for label, order in (("one", names), ("two", list(reversed(names)))):
        root = tmp_path / label
        root.mkdir()
        for name in order:
            (root / name).write_bytes(name.encode() * 3)
            os.utime(root / name, ns=(0, 1_600_000_000_500_000_000))
        (root / "dir").mkdir()
        os.link(root / "n05", root / "dir" / "link")
        os.utime(root / "dir", ns=(0, 1_600_000_000_000_000_007))
        sink = WriteOnlySink()
        report = pack_tree(root, sink)  # type: ignore[arg-type]
        assert report.files == 32
        buf = io.BytesIO()
        pack_tree(root, buf)
        assert hashlib.sha256(buf.getvalue()).digest() == sink.digest.digest()
        outputs.append(buf.getvalue())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) % tarfile.RECORDSIZE == 0


def test_pack_order_is_sorted_depth_first(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in ("b/y", "a/z", "a/b/c", "c"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"")
    buf = io.BytesIO()
    pack_tree(src, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert tf.getnames() == ["a", "a/b", "a/b/c", "a/z", "b", "b/y", "c"]


def test_pack_skips_sockets_fifos_and_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"k")
    os.mkfifo(src / "fifo")
    monkeypatch.chdir(src)  # a relative socket path cannot be too long
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    expected = ["fifo", "sock"]
    try:
        os.mknod(src / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected.insert(1, "null")
    except PermissionError:
        pass
    try:
        buf = io.BytesIO()
        report = pack_tree(src, buf)
    finally:
        sock.close()
    assert report.skipped == expected
    assert report.files == 1
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert tf.getnames() == ["keep"]


def test_pack_missing_source_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="nope"):
        pack_tree(missing, io.BytesIO())


def test_pack_rejects_bad_arcname_and_special_source(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for bad in ("../x", "/abs", "a/../../b"):
        with pytest.raises(UsageError, match="arcname"):
            pack_tree(tmp_path / "d", io.BytesIO(), arcname=bad)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="not a regular file or directory"):
        pack_tree(tmp_path / "fifo", io.BytesIO())


def test_pack_single_file_and_arcname(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_bytes(b"1")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"x")
    for src, arcname, names in (
        (tmp_path / "one.txt", ".", ["one.txt"]),
        (tmp_path / "one.txt", "renamed/two.txt", ["renamed/two.txt"]),
        (tmp_path / "d", "proj", ["proj", "proj/x"]),
        (tmp_path / "d", "./proj/", ["proj", "proj/x"]),
    ):
        buf = io.BytesIO()
        pack_tree(src, buf, arcname=arcname)
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
            assert tf.getnames() == names


def test_pack_follows_a_symlinked_source_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"f")
    (tmp_path / "alias").symlink_to("real")
    (tmp_path / "file_alias").symlink_to("real/f")
    buf = io.BytesIO()
    assert pack_tree(tmp_path / "alias", buf) == PackReport(files=1, bytes=1, skipped=[])
    buf = io.BytesIO()
    assert pack_tree(tmp_path / "file_alias", buf) == PackReport(files=1, bytes=1, skipped=[])
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert [(m.name, m.isreg()) for m in tf] == [("file_alias", True)]


_names = st.one_of(
    st.text(alphabet="ab/._-", min_size=1, max_size=130),
    st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
)


@settings(max_examples=300, deadline=None)
@given(
    name=_names,
    linkname=_names | st.just(""),
    kind=st.sampled_from(
        [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
    ),
    mode=st.integers(0, 0o7777),
    size=st.integers(0, 8**11 + 5),
    mtime_ns=st.integers(-(10**18), 9 * 10**19),
    owner=st.sampled_from([("root", 0), ("other", 0), ("root", 7)]),
)
def test_fast_headers_match_tarfile(
    name: str,
    linkname: str,
    kind: bytes,
    mode: int,
    size: int,
    mtime_ns: int,
    owner: tuple[str, int],
) -> None:
    """_PackTarInfo.tobuf must produce exactly what tarfile's generic code does."""
    infos = []
    for cls in (_PackTarInfo, tarfile.TarInfo):
        info = cls(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
        info.uname = info.gname = owner[0]
        info.uid = info.gid = owner[1]
        sec, frac = divmod(mtime_ns, 1_000_000_000)
        info.mtime = sec
        if frac:
            info.pax_headers = {"mtime": f"{sec}.{frac:09d}".rstrip("0")}
        infos.append(info)
    assert infos[0].tobuf(tarfile.PAX_FORMAT) == infos[1].tobuf(tarfile.PAX_FORMAT)


def test_ten_thousand_files_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(100):
        d = src / f"dir{i:03d}"
        d.mkdir(parents=True)
        for j in range(100):
            (d / f"file{j:03d}.txt").write_bytes(b"%d-%d\n" % (i, j) * (j % 7))
    dest = tmp_path / "dest"
    dest.mkdir()
    t0 = time.perf_counter()
    buf = io.BytesIO()
    packed = pack_tree(src, buf)
    t1 = time.perf_counter()
    report = safe_extract(io.BytesIO(buf.getvalue()), dest)
    t2 = time.perf_counter()
    print(f"\n10,000 files: pack {t1 - t0:.2f}s, extract {t2 - t1:.2f}s")
    assert packed.files == len(report.files) == 10_100
    assert tree_listing(dest) == tree_listing(src)
    assert t2 - t0 < 120  # generous: this is about not being quadratic


def test_pack_throughput_100mb(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    block = os.urandom(1 << 20)
    with (src / "data").open("wb") as fh:
        for _ in range(100):
            fh.write(block)
    sink = WriteOnlySink()
    t0 = time.perf_counter()
    report = pack_tree(src, sink)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - t0
    print(f"\n100 MB pack: {elapsed:.2f}s ({100 / elapsed:.0f} MB/s)")
    assert report.bytes == 100 << 20
    assert sink.size >= 100 << 20


# --------------------------------------------------------------------------- extraction: accepted


def test_extract_reports_members_in_order(arena: Arena) -> None:
    data = build(
        entry("d", tarfile.DIRTYPE, mode=0o750),
        entry("d/f", data=b"abc", mode=0o640),
        entry("d/l", tarfile.SYMTYPE, linkname="f"),
        entry("d/h", tarfile.LNKTYPE, linkname="d/f"),
        entry("top/implicit/g", data=b"12345"),
        entry("existing.txt", data=b"replaced"),
    )
    report = arena.extract(data)
    assert report == ExtractReport(
        files=["d", "d/f", "d/l", "d/h", "top/implicit/g", "existing.txt"], bytes=16
    )
    assert (arena.dest / "d" / "l").readlink() == Path("f")
    assert (arena.dest / "existing.txt").read_bytes() == b"replaced"
    assert stat.S_IMODE(os.lstat(arena.dest / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(arena.dest / "top" / "implicit").st_mode) == 0o755
    assert os.lstat(arena.dest / "d" / "f").st_mtime_ns == T0 * 10**9
    arena.assert_outside_unchanged()


def test_extract_into_read_only_directory_and_later_attributes(arena: Arena) -> None:
    data = build(
        entry("ro", tarfile.DIRTYPE, mode=0o500, mtime=T0 + 0.25),
        entry("ro/sub", tarfile.DIRTYPE, mode=0o000, mtime=T0),
        entry("ro/sub/f", data=b"x"),
        entry("ro/g", data=b"y"),
    )
    arena.extract(data)
    ro = os.lstat(arena.dest / "ro")
    assert stat.S_IMODE(ro.st_mode) == 0o500
    assert ro.st_mtime_ns == T0 * 10**9 + 250_000_000
    assert stat.S_IMODE(os.lstat(arena.dest / "ro" / "sub").st_mode) == 0o000
    assert (arena.dest / "ro" / "sub" / "f").read_bytes() == b"x"
    arena.assert_outside_unchanged()
    os.chmod(arena.dest / "ro" / "sub", 0o700)
    os.chmod(arena.dest / "ro", 0o700)


def test_dot_entry_leaves_destination_alone(arena: Arena) -> None:
    os.chmod(arena.dest, 0o751)
    before = os.lstat(arena.dest).st_mtime_ns
    data = build(entry(".", tarfile.DIRTYPE, mode=0o777, mtime=1), entry("./f", data=b"f"))
    assert arena.extract(data).files == ["f"]
    st_ = os.lstat(arena.dest)
    assert stat.S_IMODE(st_.st_mode) == 0o751
    assert st_.st_mtime_ns != 1_000_000_000 or before == 1_000_000_000


def test_overwriting_a_prehardlinked_file_does_not_touch_its_other_name(arena: Arena) -> None:
    arena.extract(build(entry("hl", data=b"new content")))
    assert (arena.dest / "hl").read_bytes() == b"new content"
    assert (arena.root / "canary.txt").read_bytes() == b"canary\n"
    arena.assert_outside_unchanged()


def test_symlink_and_hardlink_may_replace_regular_files(arena: Arena) -> None:
    data = build(
        entry("f", data=b"1"),
        entry("g", data=b"2"),
        entry("f", tarfile.SYMTYPE, linkname="g"),
        entry("h", data=b"3"),
        entry("g", tarfile.LNKTYPE, linkname="h"),
    )
    arena.extract(data)
    assert (arena.dest / "f").readlink() == Path("g")
    assert (arena.dest / "g").read_bytes() == b"3"
    assert os.lstat(arena.dest / "g").st_ino == os.lstat(arena.dest / "h").st_ino
    arena.assert_outside_unchanged()


def test_gnu_long_names_and_links(arena: Arena) -> None:
    long_dir = "x" * 120
    data = build(
        entry(f"{long_dir}/{'y' * 130}", data=b"long"),
        entry("short", tarfile.SYMTYPE, linkname=f"{long_dir}/{'y' * 130}"),
        fmt=tarfile.GNU_FORMAT,
    )
    arena.extract(data)
    assert (arena.dest / "short").read_bytes() == b"long"
    arena.assert_outside_unchanged()


def test_ustar_and_pax_mtimes(arena: Arena) -> None:
    data = build(
        entry("ustar", data=b"u", mtime=T0),
        entry("pax", data=b"p", pax={"mtime": "1600000000.5"}),
        entry("neg", data=b"n", pax={"mtime": "-2.25"}),
        entry("float", data=b"f", mtime=T0 + 0.5),
    )
    arena.extract(data)
    ns = {n: os.lstat(arena.dest / n).st_mtime_ns for n in ("ustar", "pax", "neg", "float")}
    assert ns == {
        "ustar": T0 * 10**9,
        "pax": T0 * 10**9 + 500_000_000,
        "neg": -2_250_000_000,
        "float": T0 * 10**9 + 500_000_000,
    }


def test_legit_relative_symlinks_are_kept(arena: Arena) -> None:
    data = build(
        entry("a/b/c", tarfile.DIRTYPE),
        entry("a/b/c/up2", tarfile.SYMTYPE, linkname="../../x"),
        entry("a/b/c/up3", tarfile.SYMTYPE, linkname="../../../existing.txt"),
        entry("a/dot", tarfile.SYMTYPE, linkname="./b/./c/"),
        entry("a/self", tarfile.SYMTYPE, linkname="."),
    )
    arena.extract(data)
    assert (arena.dest / "a" / "b" / "c" / "up3").read_bytes() == b"existing\n"
    arena.assert_outside_unchanged()


# --------------------------------------------------------------------------- extraction: refused


def test_destination_must_be_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        safe_extract(io.BytesIO(build()), tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="not a directory"):
        safe_extract(io.BytesIO(build()), tmp_path / "file")


@pytest.mark.parametrize("name", ["/etc/evil", "/evil", "//evil"])
def test_absolute_names(arena: Arena, name: str) -> None:
    arena.refuses(build(entry(name, data=b"pwned")), "is absolute")


def test_absolute_name_pointing_into_the_arena(arena: Arena) -> None:
    target = str(arena.root / "canary.txt")
    arena.refuses(build(entry(target, data=b"pwned")), "is absolute")


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/../b", "..", "./../evil"])
def test_dotdot_names(arena: Arena, name: str) -> None:
    arena.refuses(build(entry(name, data=b"pwned")), "contains '..'")
    assert not (arena.root / "evil").exists()


def test_empty_name(arena: Arena) -> None:
    arena.refuses(build(entry("", data=b"x")), "empty name")


def test_nul_in_name(arena: Arena) -> None:
    data = build(entry("innocent", data=b"x", pax={"path": "a\0/../../evil"}))
    arena.refuses(data, "NUL byte")


def test_name_too_long_and_too_deep(arena: Arena) -> None:
    arena.refuses(build(entry("n" * 5000, data=b"x")), "bytes long")
    arena.refuses(build(entry("/".join(["d"] * 65), data=b"x")), "levels deep")
    small = ExtractLimits(max_name_len=10, max_depth=2)
    arena.refuses(build(entry("a/b/c", data=b"x")), "levels deep", limits=small)
    arena.refuses(build(entry("abcdefghijk", data=b"x")), "bytes long", limits=small)
    arena.refuses(
        build(entry("l", tarfile.SYMTYPE, linkname="t" * 11)), "symlink target", limits=small
    )


def test_pax_path_override_is_checked(arena: Arena) -> None:
    data = build(entry("benign", data=b"x", pax={"path": "../evil"}))
    arena.refuses(data, "'..'")
    assert not (arena.root / "evil").exists()


def test_gnu_longname_is_checked(arena: Arena) -> None:
    data = build(entry("../" + "e" * 120, data=b"x"), fmt=tarfile.GNU_FORMAT)
    assert b"././@LongLink" in data
    arena.refuses(data, "'..'")


def test_symlink_to_root_then_write_through_it(arena: Arena) -> None:
    data = build(
        entry("link", tarfile.SYMTYPE, linkname="/"),
        entry("link/etc/passwd", data=b"root::0:0::/:/bin/sh\n"),
    )
    arena.refuses(data, "symlink target '/' is absolute")
    assert not (arena.dest / "link").exists()


def test_symlink_to_parent_then_write_through_it(arena: Arena) -> None:
    data = build(entry("a", tarfile.SYMTYPE, linkname=".."), entry("a/evil", data=b"x"))
    arena.refuses(data, "points outside the destination")
    assert not os.path.lexists(arena.dest / "a")


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("d/l", "../../canary.txt"),
        ("l", "../out/../canary.txt"),
        ("l", str(Path("/etc/passwd"))),
        ("d/e/l", "../../../x"),
    ],
)
def test_symlinks_escaping_the_destination(arena: Arena, name: str, target: str) -> None:
    arena.refuses(build(entry(name, tarfile.SYMTYPE, linkname=target)), "symlink target")
    assert not os.path.lexists(arena.dest / name)


def test_symlink_with_dotdot_after_a_name(arena: Arena) -> None:
    # "a/.." looks harmless lexically but escapes if "a" is itself a symlink to "..".
    data = build(
        entry("x", tarfile.DIRTYPE),
        entry("x/a", tarfile.SYMTYPE, linkname=".."),
        entry("b", tarfile.SYMTYPE, linkname="x/a/.."),
    )
    arena.refuses(data, "'..' after a name")


def test_empty_and_nul_symlink_targets(arena: Arena) -> None:
    arena.refuses(build(entry("l", tarfile.SYMTYPE, linkname="")), "empty symlink target")
    data = build(entry("l", tarfile.SYMTYPE, linkname="x", pax={"linkpath": "a\0b"}))
    arena.refuses(data, "NUL byte in symlink target")


def test_path_through_a_symlink_inside_dest(arena: Arena) -> None:
    data = build(
        entry("d", tarfile.DIRTYPE),
        entry("s", tarfile.SYMTYPE, linkname="d"),
        entry("s/x", data=b"x"),
    )
    arena.refuses(data, "goes through the symlink 's'")
    assert not (arena.dest / "d" / "x").exists()


def test_path_through_a_preexisting_symlink_to_outside(tmp_path: Path) -> None:
    arena = make_arena(tmp_path, pre_link=True)
    arena.refuses(build(entry("pre/evil", data=b"x")), "goes through the symlink 'pre'")
    arena.refuses(build(entry("pre/sub/evil", tarfile.DIRTYPE)), "goes through the symlink")
    arena.refuses(build(entry("pre", data=b"x")), "would replace an existing symlink")
    arena.refuses(build(entry("pre", tarfile.DIRTYPE)), "would replace an existing symlink")
    arena.refuses(
        build(entry("pre", tarfile.SYMTYPE, linkname="existing.txt")),
        "would replace an existing symlink",
    )
    arena.refuses(
        build(entry("f", data=b"x"), entry("pre", tarfile.LNKTYPE, linkname="f")),
        "would replace an existing symlink",
    )
    assert sorted(os.listdir(tmp_path / "canary_dir")) == ["inner.txt"]


def test_file_replacing_a_symlink_to_an_outside_file(tmp_path: Path) -> None:
    arena = make_arena(tmp_path)
    (arena.dest / "f").symlink_to(tmp_path / "canary.txt")
    arena.before = (snapshot(arena.root, arena.dest), host_state())
    arena.refuses(build(entry("f", data=b"pwned")), "would replace an existing symlink")
    assert (tmp_path / "canary.txt").read_bytes() == b"canary\n"


def test_dir_replacing_a_symlink_from_the_archive(arena: Arena) -> None:
    data = build(
        entry("l", tarfile.SYMTYPE, linkname="existing.txt"),
        entry("l", tarfile.DIRTYPE),
    )
    arena.refuses(data, "would replace an existing symlink with a directory")


def test_file_and_directory_do_not_replace_each_other(arena: Arena) -> None:
    arena.refuses(build(entry("d", tarfile.DIRTYPE), entry("d", data=b"x")), "replace a directory")
    arena.refuses(
        build(entry("f", data=b"x"), entry("f", tarfile.DIRTYPE)), "replace a file with a dir"
    )
    arena.refuses(build(entry("existing.txt/x", data=b"x")), "is not a directory")
    arena.refuses(
        build(entry("d2", tarfile.DIRTYPE), entry("d2", tarfile.SYMTYPE, linkname="x")),
        "replace a directory",
    )


def test_a_member_cannot_replace_the_destination(arena: Arena) -> None:
    arena.refuses(build(entry(".", data=b"x")), "destination directory")
    arena.refuses(build(entry("./", tarfile.SYMTYPE, linkname="x")), "destination directory")


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("/etc/passwd", "is absolute"),
        ("../canary.txt", "contains '..'"),
        ("later", "not a regular file extracted earlier"),
        ("nonexistent", "not a regular file extracted earlier"),
        ("existing.txt", "not a regular file extracted earlier"),
        ("dir", "not a regular file extracted earlier"),
        ("sym", "not a regular file extracted earlier"),
        ("", "empty hardlink target"),
        ("h", "hardlink to itself"),
    ],
)
def test_bad_hardlinks(arena: Arena, target: str, match: str) -> None:
    data = build(
        entry("dir", tarfile.DIRTYPE),
        entry("sym", tarfile.SYMTYPE, linkname="dir"),
        entry("self", data=b"s") if target != "h" else entry("h", data=b"h"),
        entry("h", tarfile.LNKTYPE, linkname=target),
        entry("later", data=b"later"),
    )
    arena.refuses(data, match)
    assert os.lstat(arena.root / "canary.txt").st_nlink == 2  # only the pre-made "out/hl"


def test_hardlink_to_a_file_later_replaced_by_a_symlink(arena: Arena) -> None:
    data = build(
        entry("f", data=b"x"),
        entry("f", tarfile.SYMTYPE, linkname="existing.txt"),
        entry("h", tarfile.LNKTYPE, linkname="f"),
    )
    arena.refuses(data, "not a regular file extracted earlier")


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (tarfile.CHRTYPE, "character devices are not allowed"),
        (tarfile.BLKTYPE, "block devices are not allowed"),
        (tarfile.FIFOTYPE, "FIFOs are not allowed"),
        (b"Z", "unsupported member type"),
        (tarfile.GNUTYPE_SPARSE, "sparse files are not supported"),
    ],
)
def test_special_members(arena: Arena, kind: bytes, match: str) -> None:
    arena.refuses(build(entry("special", kind)), match)
    assert not os.path.lexists(arena.dest / "special")


def test_global_pax_header_is_refused(arena: Arena) -> None:
    data = build(entry("f", data=b"x"), global_pax={"path": "../evil"})
    arena.refuses(data, "global PAX header")


def test_pax_sparse_is_refused(arena: Arena) -> None:
    # GNU sparse 1.0 would make tarfile read a sparse map of any length.
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"}
    data = build(entry("f", data=b"99999999\n" * 100, pax=pax))
    arena.refuses(data, "sparse files are not supported")


def test_too_many_members(arena: Arena) -> None:
    data = build(*(entry(f"f{i:02d}", data=b"x") for i in range(20)))
    arena.refuses(data, "more than 10 members", OutputLimitExceeded, ExtractLimits(max_members=10))
    assert sorted(os.listdir(arena.dest)) == sorted(
        ["existing.txt", "hl", *(f"f{i:02d}" for i in range(10))]
    )


class EndlessMembers:
    """An endless stream of tiny members, produced lazily."""

    def __init__(self) -> None:
        self._buf = b""
        self._count = 0

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            info = tarfile.TarInfo(f"m{self._count}")
            info.type = tarfile.DIRTYPE
            self._buf += info.tobuf(tarfile.USTAR_FORMAT)
            self._count += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def test_endless_member_stream_stops_at_the_limit(arena: Arena) -> None:
    stream = EndlessMembers()
    with pytest.raises(OutputLimitExceeded, match="more than 500 members"):
        safe_extract(stream, arena.dest, ExtractLimits(max_members=500))  # type: ignore[arg-type]
    assert stream._count < 1000
    arena.assert_outside_unchanged()


def test_declared_size_beyond_max_bytes_is_refused_before_reading(arena: Arena) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 2 << 30  # only the header is sent: we must not try to read 2 GiB
    arena.refuses(header(info), "past its limit", OutputLimitExceeded)
    assert not (arena.dest / "huge").exists()


def test_total_bytes_limit(arena: Arena) -> None:
    data = build(entry("a", data=b"a" * 600), entry("b", data=b"b" * 600))
    arena.refuses(data, "'b'.*past its limit of 1000", OutputLimitExceeded, ExtractLimits(1000))
    assert (arena.dest / "a").read_bytes() == b"a" * 600
    assert not (arena.dest / "b").exists()


def _sample_archive() -> bytes:
    return build(
        entry("dir", tarfile.DIRTYPE),
        entry("dir/file", data=b"0123456789" * 100),
        entry("dir/long" + "n" * 120, data=b"pax path"),
        entry("tail", data=b"end"),
    )


def test_sample_archive_is_valid(arena: Arena) -> None:
    assert len(arena.extract(_sample_archive()).files) == 4


def _cut_points() -> dict[str, int]:
    data = _sample_archive()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        d, f, long, tail = tf.getmembers()
    return {
        "inside the first header": 100,
        "where the second header should be": f.offset,
        "inside the second header": f.offset + 300,
        "in the middle of file data": f.offset_data + 400,
        "inside a PAX header": long.offset + 200,
        "inside a PAX record": long.offset + 512 + 20,
        "between PAX header and its member": long.offset_data - 512,
        "inside the last padding": tail.offset_data + 100,
        "before the end-of-archive marker": tail.offset_data + 512,
    }


@pytest.mark.parametrize("where", list(_cut_points()))
def test_truncated_streams(arena: Arena, where: str) -> None:
    cut = _cut_points()[where]
    arena.refuses(_sample_archive()[:cut], "malformed tar stream")


def test_empty_stream_and_garbage(arena: Arena) -> None:
    arena.refuses(b"", "malformed tar stream: empty stream")
    arena.refuses(os.urandom(10_000), "malformed tar stream")
    arena.refuses(b"x" * 512 * 4, "malformed tar stream")
    valid = _sample_archive()
    with tarfile.open(fileobj=io.BytesIO(valid)) as tf:
        at = tf.getmembers()[2].offset  # a header in the middle
    garbage = b"\x17" * 512
    arena.refuses(valid[:at] + garbage + valid[at + 512 :], "malformed tar stream: invalid header")


def test_end_marker_alone_is_an_empty_archive(arena: Arena) -> None:
    assert arena.extract(end_of_archive()) == ExtractReport(files=[], bytes=0)


def test_bad_extension_headers(arena: Arena) -> None:
    long_ext = tarfile.TarInfo("././@PaxHeader")
    long_ext.type = tarfile.XHDTYPE
    long_ext.size = 1 << 30
    arena.refuses(header(long_ext), "extension header of 1073741824 bytes")

    longname = tarfile.TarInfo("././@LongLink")
    longname.type = tarfile.GNUTYPE_LONGNAME
    longname.size = 1 << 40
    arena.refuses(header(longname, tarfile.GNU_FORMAT), "extension header of")

    chain = b""
    for _ in range(20):
        chain += tarfile.TarInfo("x")._create_pax_generic_header(  # type: ignore[attr-defined]
            {"comment": "x"}, tarfile.XHDTYPE, "utf-8"
        )
    arena.refuses(chain + build(entry("f", data=b"x")), "extension headers in a row")

    good = header(entry("f", pax={"mtime": "1.5"})[0])
    bad_record = good[:512] + b"99 mtime=1.5\n" + good[525:]
    arena.refuses(bad_record + end_of_archive(), "bad PAX record")

    pax_then_end = tarfile.TarInfo("x")._create_pax_generic_header(  # type: ignore[attr-defined]
        {"path": "f"}, tarfile.XHDTYPE, "utf-8"
    )
    arena.refuses(pax_then_end + end_of_archive(), "not followed by a member")

    arena.refuses(build(entry("f", data=b"x", pax={"size": "-5"})), "bad PAX size")
    arena.refuses(build(entry("f", data=b"x", pax={"mtime": "soon"})), "bad PAX mtime")


def test_pax_header_cannot_trigger_regex_backtracking(arena: Arena) -> None:
    # tarfile's own PAX parser (Python 3.11.7) is quadratic on this: ~10 s for 64 KiB.
    ext = tarfile.TarInfo("././@PaxHeader")
    ext.type = tarfile.XHDTYPE
    ext.size = 60_000
    payload = b"1" * ext.size
    data = header(ext) + payload + b"\0" * (-len(payload) % 512) + build(entry("f"))
    t0 = time.perf_counter()
    arena.refuses(data, "bad PAX record")
    assert time.perf_counter() - t0 < 1


def test_negative_size_and_bad_checksum(arena: Arena) -> None:
    block = header(entry("f")[0], tarfile.USTAR_FORMAT)
    negative = patch_block(block, 124, b"\xff" * 12)
    arena.refuses(negative + end_of_archive(), "negative size")
    bad_sum = bytearray(block)
    bad_sum[0] ^= 1
    arena.refuses(bytes(bad_sum) + end_of_archive(), "bad checksum")


@pytest.mark.parametrize("mtime", ["9" * 19, "1e300", "-1e300", "nan", "inf", "1e19"])
def test_out_of_range_mtime(arena: Arena, mtime: str) -> None:
    arena.refuses(build(entry("f", data=b"x", pax={"mtime": mtime})), "out of range")


def test_os_errors_are_reported_as_unsafe_archive(arena: Arena) -> None:
    arena.refuses(build(entry("n" * 300, data=b"x")), "cannot extract: File name too long")


# --------------------------------------------------------------------------- fuzzing

# Mostly plausible names, so that archives get deep enough to meet earlier members;
# "..", "" and absolute paths often enough to attack every step.
_COMPONENTS = [*"aaaaaaaabbbbbbbbcccc....", "canary.txt", "canary_dir", "out", "etc", "pre", "hl"]
_COMPONENTS += [*_COMPONENTS[-6:], "..", ""]
_ABSOLUTE = ["/", "/etc/passwd", "/evil", "@ROOT@", "@ROOT@/canary.txt", "@ROOT@/canary_dir"]
_relative = st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=4).map("/".join)
_paths = st.integers(0, 15).flatmap(lambda i: st.sampled_from(_ABSOLUTE) if i == 0 else _relative)
_kinds = st.sampled_from(
    [tarfile.REGTYPE] * 4
    + [tarfile.AREGTYPE, tarfile.CONTTYPE]
    + [tarfile.DIRTYPE] * 4
    + [tarfile.SYMTYPE] * 3
    + [tarfile.LNKTYPE] * 3
    + [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, b"Z"]
)
_Member = tuple[str, bytes, str, int, int]  # name, type, link target, size, mode


@st.composite
def _archives(draw: st.DrawFn) -> list[_Member]:
    """Members whose link targets are often other members' names."""
    names = draw(st.lists(_paths, max_size=10))
    targets = _paths | st.sampled_from(names) if names else _paths
    return [
        (
            name,
            draw(_kinds),
            draw(targets),
            draw(st.sampled_from([0, 1, 511, 512, 513, 3000])),
            draw(st.sampled_from([0o644, 0o755, 0o4755, 0o2777, 0o000, 0o1777])),
        )
        for name in names
    ]


def _walk_no_follow(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def _inside(path: str, dest: Path) -> bool:
    return path == str(dest) or path.startswith(str(dest) + os.sep)


def _is_loop(path: Path) -> bool:
    """os.path.realpath gives nonsense (e.g. "/a") for symlink loops before Python 3.13."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _check_dest(arena: Arena, preexisting: set[Path], physical: bool) -> None:
    for path in _walk_no_follow(arena.dest):
        st_ = os.lstat(path)
        assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode) or stat.S_ISLNK(st_.st_mode)
        if path in preexisting:
            continue
        if stat.S_ISLNK(st_.st_mode):
            target = os.readlink(path)
            assert not target.startswith("/")
            assert _inside(os.path.normpath(os.path.join(path.parent, target)), arena.dest)
            if physical and not _is_loop(path):
                assert _inside(os.path.realpath(path), arena.dest)
        else:
            assert not st_.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)


def _fuzz_archive(members: list[_Member], root: Path, cut: int | None) -> bytes:
    def fix(path: str) -> str:
        return path.replace("@ROOT@", str(root))

    built = []
    for name, kind, target, size, mode in members:
        data = b"d" * size
        built.append(entry(fix(name), kind, data, linkname=fix(target), mode=mode))
    try:
        raw = build(*built)
    except (ValueError, UnicodeError):
        reject()
    return raw if cut is None else raw[: len(raw) * cut // 10_000]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    members=_archives(),
    # where to truncate the stream, in ten-thousandths of its length (an eighth of the time)
    cut=st.integers(0, 7).flatmap(
        lambda i: st.sampled_from(range(1, 10_000, 7)) if i == 0 else st.none()
    ),
    tight=st.booleans(),
    pre_link=st.booleans(),
)
def test_fuzz_random_archives(
    members: list[_Member],
    cut: int | None,
    tight: bool,
    pre_link: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Deep enough that any ".." chain in the names stays inside the snapshot.
        root = Path(tmp) / "l1" / "l2" / "l3" / "l4"
        root.mkdir(parents=True)
        arena = make_arena(root, pre_link=pre_link)
        arena.before = (snapshot(Path(tmp), arena.dest), host_state())
        preexisting = set(_walk_no_follow(arena.dest))
        limits = ExtractLimits(max_bytes=2000, max_members=6) if tight else ExtractLimits()
        data = _fuzz_archive(members, root, cut)
        try:
            report = safe_extract(io.BytesIO(data), arena.dest, limits)
            event(f"extracted {min(len(report.files), 3)}+ members")
        except (UnsafeArchive, OutputLimitExceeded) as exc:
            event(f"{type(exc).__name__}: {_reason(str(exc))}")
        assert (snapshot(Path(tmp), arena.dest), host_state()) == arena.before
        _check_dest(arena, preexisting, physical=not pre_link)
        _make_removable(arena.dest)


def _reason(message: str) -> str:
    """The kind of refusal, without member names: for hypothesis' statistics."""
    reason = message.split(": ", 1)[-1] if message.startswith("member ") else message
    return re.sub(r"'[^']*'", "'…'", reason)[:60]


def _make_removable(root: Path) -> None:
    for path in [root, *_walk_no_follow(root)]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o700)


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_corrupted_headers(flips: list[tuple[int, int]]) -> None:
    base = _sample_archive()
    data = bytearray(base)
    for pos, value in flips:
        data[pos] = value
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "l1" / "l2"
        root.mkdir(parents=True)
        arena = make_arena(root)
        arena.before = (snapshot(Path(tmp), arena.dest), host_state())
        preexisting = set(_walk_no_follow(arena.dest))
        with contextlib.suppress(UnsafeArchive, OutputLimitExceeded):
            safe_extract(io.BytesIO(bytes(data)), arena.dest)
        assert (snapshot(Path(tmp), arena.dest), host_state()) == arena.before
        _check_dest(arena, preexisting, physical=True)
        _make_removable(arena.dest)


def test_no_file_descriptors_leak(arena: Arena) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    deep = "/".join(f"d{i}" for i in range(40))  # more directories than the fd cache holds
    arena.extract(build(entry(f"{deep}/f", data=b"x"), entry("g", data=b"y")))
    with pytest.raises(UnsafeArchive):
        arena.extract(build(entry(f"{deep}/h", data=b"x"), entry("../evil", data=b"y")))
    with pytest.raises(UnsafeArchive):
        arena.extract(_sample_archive()[:3000])
    assert open_fds() == before


_FIELDS = [(0, 100), (100, 8), (108, 8), (124, 12), (136, 12), (156, 1), (157, 100), (345, 155)]


def _header_offsets() -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(_sample_archive())) as tf:
        d, f, long, tail = tf.getmembers()
    return [d.offset, f.offset, long.offset, long.offset_data - 512, tail.offset]


def _extract_hostile(data: bytes, *, limits: ExtractLimits | None = None) -> None:
    """Extract into a fresh arena; only our errors may escape; nothing outside changes."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "l1" / "l2"
        root.mkdir(parents=True)
        arena = make_arena(root)
        arena.before = (snapshot(Path(tmp), arena.dest), host_state())
        preexisting = set(_walk_no_follow(arena.dest))
        try:
            safe_extract(io.BytesIO(data), arena.dest, limits or ExtractLimits())
            event("extracted")
        except (UnsafeArchive, OutputLimitExceeded) as exc:
            event(f"{type(exc).__name__}: {_reason(str(exc))}")
        assert (snapshot(Path(tmp), arena.dest), host_state()) == arena.before
        _check_dest(arena, preexisting, physical=True)
        _make_removable(arena.dest)


@settings(max_examples=300, deadline=None)
@given(
    patches=st.lists(
        st.tuples(
            st.sampled_from(range(5)),
            st.sampled_from(_FIELDS),
            st.one_of(
                st.binary(max_size=12),
                st.sampled_from([b"../evil\0", b"/etc/x\0", b"\xff" * 12, b"\x80" + b"\xff" * 11]),
                st.integers(0, 8**11 - 1).map(lambda n: b"%011o\0" % n),
                st.sampled_from([*b"0123456LKSxgXZ"]).map(lambda c: bytes([c])),
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_header_fields(patches: list[tuple[int, tuple[int, int], bytes]]) -> None:
    """Rewrite header fields with valid checksums, so that the parser sees them."""
    data = _sample_archive()
    offsets = _header_offsets()
    for which, (start, width), value in patches:
        at = offsets[which]
        field = value[:width].ljust(min(width, len(value)), b"\0")
        data = data[:at] + patch_block(data[at : at + 512], start, field) + data[at + 512 :]
    _extract_hostile(data)


_pax_keys = st.sampled_from(
    ["path", "linkpath", "size", "mtime", "uname", "hdrcharset", "comment", "GNU.sparse.map"]
)
_pax_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["../evil", "/etc/passwd", "", "-1", "1e400", "nan", "99999999999999999999"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True).map(str),
)


@settings(max_examples=300, deadline=None)
@given(
    pax=st.dictionaries(_pax_keys, _pax_values, max_size=4),
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    size=st.sampled_from([0, 1, 700]),
)
def test_fuzz_pax_records(pax: dict[str, str], kind: bytes, size: int) -> None:
    members = [entry("first", data=b"f"), entry("m", kind, b"x" * size, linkname="first", pax=pax)]
    try:
        data = build(*members, entry("last", data=b"l"))
    except (ValueError, UnicodeError):
        reject()
    _extract_hostile(data, limits=ExtractLimits(max_bytes=10_000))
