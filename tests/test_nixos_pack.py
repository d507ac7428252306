"""Packing a Nix store closure as an erofs (stoker.images.nixos).

A stand-in store closure that the tests make themselves is packed with the
real mkfs.erofs and checked with fsck.erofs and dump.erofs: its layout,
reproducibility, and the refusal of paths outside the store and special files.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from stoker.errors import ProvisionError
from stoker.images.nixos import (
    pack_store_closure,
)
from test_nixos import needs_erofs, store_hash

# --- packing a stand-in closure -----------------------------------------------------------------


class StandIn:
    """A small store made by the test: a few paths that refer to each other, and one outsider."""

    def __init__(self, root: Path) -> None:
        self.store = root / "nix" / "store"
        self.store.mkdir(parents=True)
        s = self.store
        self.hello = s / f"{store_hash(1)}-hello-2.12"
        self.bash = s / f"{store_hash(2)}-bash-5.2"
        self.glibc = s / f"{store_hash(3)}-glibc-2.39"
        self.script = s / f"{store_hash(4)}-builder.sh"
        self.alias = s / f"{store_hash(5)}-hello-link"
        self.outsider = s / f"{store_hash(6)}-not-in-the-closure"

        (self.bash / "bin").mkdir(parents=True)
        write(self.bash / "bin" / "sh", b"#!/bin/false\n" + b"sh" * 3000, 0o555)

        (self.glibc / "lib").mkdir(parents=True)
        # Incompressible-looking but deterministic content, bigger than a block.
        blob = bytes((i * 7919 + i // 251) % 256 for i in range(100_000))
        write(self.glibc / "lib" / "libc.so.6", blob, 0o444)

        for sub in ("bin", "lib", "share/doc/hello", "empty"):
            (self.hello / sub).mkdir(parents=True)
        write(self.hello / "bin" / "hello", f"#!{self.bash}/bin/sh\necho hello\n".encode(), 0o555)
        (self.hello / "bin" / "hi").symlink_to("hello")
        (self.hello / "lib" / "libc.so.6").symlink_to(self.glibc / "lib" / "libc.so.6")
        write(self.hello / "share" / "doc" / "hello" / "README", b"hello\n" * 1000, 0o444)
        write(self.hello / "share" / "doc" / "hello" / "setuid", b"x", 0o4755)

        write(self.script, f"source {self.hello}/bin/hello\n".encode(), 0o444)
        self.alias.symlink_to(self.hello / "bin" / "hello")

        (self.outsider / "secret").parent.mkdir(parents=True)
        write(self.outsider / "secret", b"must not be packed", 0o444)

        # --all-root must hide the builder's ownership (only root can give files away).
        with contextlib.suppress(PermissionError):
            os.lchown(self.hello / "bin" / "hello", 1234, 5678)
        # Read-only directories, as a Nix store has them.
        for top in (self.hello, self.bash, self.glibc):
            for parent, dirs, _files in os.walk(top, topdown=False):
                for name in dirs:
                    (Path(parent) / name).chmod(0o555)
            top.chmod(0o555)

    @property
    def closure(self) -> list[Path]:
        return [self.hello, self.bash, self.glibc, self.script, self.alias]


def write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def describe(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry below ``root``: kind, permission bits, content or link target."""
    found: dict[str, tuple[str, int, bytes]] = {}

    def visit(path: Path, rel: str) -> None:
        st_ = path.lstat()
        if stat.S_ISLNK(st_.st_mode):
            found[rel] = ("link", 0, os.readlink(path).encode())
        elif stat.S_ISREG(st_.st_mode):
            found[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())
        else:
            found[rel] = ("dir", stat.S_IMODE(st_.st_mode), b"")
            for child in sorted(os.listdir(path)):
                visit(path / child, f"{rel}/{child}")

    for top in sorted(os.listdir(root)):
        visit(root / top, top)
    return found


@pytest.fixture
def stand_in(tmp_path: Path) -> StandIn:
    return StandIn(tmp_path / "host")


def pack(
    stand_in: StandIn, out: Path, *, uuid_: str = "12345678-1234-4234-8234-123456789abc"
) -> int:
    return pack_store_closure(
        [str(p) for p in stand_in.closure],
        out,
        store_dir=stand_in.store,
        source_date_epoch=1,
        fs_uuid=uuid_,
        log=out.parent / "build.log",
    )


def dump(image: Path, path: str) -> str:
    return subprocess.run(
        ["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True, check=True
    ).stdout


@needs_erofs
def test_pack_store_closure_layout(stand_in: StandIn, tmp_path: Path) -> None:
    image = tmp_path / "out" / "store.erofs"
    image.parent.mkdir()
    size = pack(stand_in, image)

    extracted = tmp_path / "extracted"
    subprocess.run(
        ["fsck.erofs", f"--extract={extracted}", "--preserve-perms", str(image)],
        check=True,
        capture_output=True,
    )
    # The image's root is the store: exactly the closure's <hash>-<name> entries.
    assert sorted(os.listdir(extracted)) == sorted(p.name for p in stand_in.closure)
    expected = describe(stand_in.store)
    for name in list(expected):
        if name.split("/")[0] == stand_in.outsider.name:
            del expected[name]
    # Permission bits only: the store holds no setuid files.
    setuid = f"{stand_in.hello.name}/share/doc/hello/setuid"
    assert expected[setuid][1] == 0o4755
    expected[setuid] = ("file", 0o755, b"x")
    assert describe(extracted) == expected
    # References to other store paths are kept verbatim (absolute, into the store).
    libc = describe(extracted)[f"{stand_in.hello.name}/lib/libc.so.6"]
    assert libc == ("link", 0, str(stand_in.glibc / "lib" / "libc.so.6").encode())

    assert size == sum(len(v[2]) for v in expected.values() if v[0] == "file")

    root = dump(image, "/")
    assert "Access: 0755" in root
    hello = dump(image, f"/{stand_in.hello.name}/bin/hello")
    assert re.search(r"Uid: 0\s+Gid: 0", hello)
    assert "1970-01-01 00:00:01" in hello
    # The staging copy is gone.
    assert {p.name for p in image.parent.iterdir()} == {"store.erofs", "build.log"}


@needs_erofs
def test_pack_store_closure_is_reproducible(stand_in: StandIn, tmp_path: Path) -> None:
    first = tmp_path / "one" / "store.erofs"
    second = tmp_path / "two" / "store.erofs"
    first.parent.mkdir()
    second.parent.mkdir()
    pack(stand_in, first)
    # What a rebuild on another day would see: other mtimes, other staging directory.
    for root, _dirs, files in os.walk(stand_in.store):
        for name in files:
            os.utime(Path(root) / name, (2_000_000_000, 2_000_000_000))
    pack(stand_in, second)
    assert first.read_bytes() == second.read_bytes()

    third = tmp_path / "three" / "store.erofs"
    third.parent.mkdir()
    pack(stand_in, third, uuid_="87654321-4321-4321-8321-cba987654321")
    assert third.read_bytes() != first.read_bytes()


def test_pack_refuses_paths_outside_the_store(stand_in: StandIn, tmp_path: Path) -> None:
    out = tmp_path / "out.erofs"
    cases = [
        (tmp_path / "host", "not a store path"),  # the store's parent
        (stand_in.hello / "bin", "not a store path"),  # inside a store path
        (tmp_path / f"{store_hash(7)}-elsewhere", "not a store path"),
        (stand_in.store / "not-a-store-name", "not a store path"),
        (stand_in.store / f"{store_hash(8)}-missing", "cannot be read"),
        (Path(f"/nix/store/{store_hash(9)}-real-store"), "not a store path"),
    ]
    for path, message in cases:
        with pytest.raises(ProvisionError, match=message):
            pack_store_closure(
                [stand_in.bash, path],
                out,
                store_dir=stand_in.store,
                fs_uuid="12345678-1234-4234-8234-123456789abc",
                log=tmp_path / "log",
            )
    with pytest.raises(ProvisionError, match="empty"):
        pack_store_closure(
            [], out, store_dir=stand_in.store, fs_uuid="0" * 32, log=tmp_path / "log"
        )
    assert not out.exists()


def test_pack_refuses_special_files(stand_in: StandIn, tmp_path: Path) -> None:
    odd = stand_in.store / f"{store_hash(10)}-odd"
    odd.mkdir()
    os.mkfifo(odd / "fifo")
    with pytest.raises(ProvisionError, match="not a file, directory or symlink"):
        pack_store_closure(
            [odd],
            tmp_path / "out.erofs",
            store_dir=stand_in.store,
            fs_uuid="12345678-1234-4234-8234-123456789abc",
            log=tmp_path / "log",
        )
    # The staging directory is gone even after a failure.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".stoker-store-")] == []
