"""Tests for stoker.images: specs, apt sources, command lines, the store.

The store tests use ``FakeImageBuilder``, a stand-in that packs a three-file
tree with mkfs.erofs in a fraction of a second.  The real Debian build is one
slow test marked ``vm``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from stoker.artifacts import BootArtifacts
from stoker.errors import ProvisionError, UsageError
from stoker.images import (
    DebianSpec,
    Image,
    ImageBuilder,
    ImageSpec,
    ImageStore,
    SpecBuilder,
    pack,
    tree,
)
from stoker.images import builder as builder_module
from stoker.images import debian as deb
from stoker.images.base import canonical_digest, mounts_under, remove_tree
from stoker.images.builder import KernelRef
from stoker.images.catalog import load_specs
from stoker.images.spec import load_spec_file
from stoker.paths import Dirs
from stoker.procs import run_checked

HAVE_MKFS_EROFS = shutil.which("mkfs.erofs") is not None
needs_mkfs = pytest.mark.skipif(not HAVE_MKFS_EROFS, reason="mkfs.erofs (erofs-utils) missing")
is_root = os.geteuid() == 0
DEFAULT_DIGEST = "13fa169c1a1b9db9c7413f4a2d5b3195b4bca9d7e2e9e19acf57489fa920fd36"


# --- spec and digest ----------------------------------------------------------------------------

KERNEL = KernelRef(kind="debian-cloud", digest="linux-image-6.1.0-56-cloud-amd64=6.1.192-2")


def _spec(tmp_path: Path, text: str, name: str = "t") -> ImageSpec:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return load_spec_file(path)[name]


def _builder(tmp_path: Path, text: str, **kwargs: object) -> SpecBuilder:
    return SpecBuilder(
        _spec(tmp_path, text),
        kernel=KERNEL,
        dirs=_dirs(tmp_path),
        **kwargs,  # type: ignore[arg-type]
    )


def test_spec_digest_is_stable_and_golden(tmp_path: Path) -> None:
    default = load_specs("default")["default"]
    a = SpecBuilder(default, kernel=KERNEL, dirs=_dirs(tmp_path)).spec_digest()
    b = SpecBuilder(default, kernel=KERNEL, dirs=_dirs(tmp_path)).spec_digest()
    assert a == b
    # Golden value: if this changes, every cached default image is rebuilt.
    # Update it together with a deliberate change (and bump BUILDER_VERSION if
    # the produced filesystem changes).
    assert a == DEFAULT_DIGEST


def test_spec_digest_ignores_package_order_duplicates_and_name(tmp_path: Path) -> None:
    a = _builder(tmp_path, '[image.t]\nbase = "debian:bookworm"\npackages = ["git", "make"]\n')
    b = _builder(
        tmp_path, '[image.t]\nbase = "debian:bookworm"\npackages = ["make", "git", "make"]\n'
    )
    assert a.spec_digest() == b.spec_digest()


@pytest.mark.parametrize(
    "extra",
    [
        'packages = ["curl"]',
        'format = "squashfs"',
        'compression = "lz4"',
        'run = ["true"]',
        "env.A = '1'",
        "size_limit = '1G'",
        "defaults.cpus = 4",
        '[[image.t.users]]\nname = "ci"',
    ],
)
def test_spec_digest_changes_with_content(tmp_path: Path, extra: str) -> None:
    base = '[image.t]\nbase = "debian:bookworm"\n'
    assert _builder(tmp_path, base).spec_digest() != _builder(tmp_path, base + extra).spec_digest()


def test_spec_digest_changes_with_kernel_and_builder_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '[image.t]\nbase = "debian:bookworm"\n'
    before = _builder(tmp_path, text).spec_digest()
    other = KernelRef(kind="debian-cloud", digest="linux-image-6.1.0-57-cloud-amd64=6.1.200-1")
    assert SpecBuilder(_spec(tmp_path, text), kernel=other).spec_digest() != before
    monkeypatch.setattr(builder_module, "BUILDER_VERSION", "spec-test")
    assert _builder(tmp_path, text).spec_digest() != before


def test_spec_digest_follows_file_contents(tmp_path: Path) -> None:
    (tmp_path / "motd").write_text("one\n")
    text = (
        '[image.t]\nbase = "debian:bookworm"\n[[image.t.files]]\nsrc = "motd"\ndest = "/etc/motd"\n'
    )
    before = _builder(tmp_path, text).spec_digest()
    (tmp_path / "motd").write_text("two\n")
    assert _builder(tmp_path, text).spec_digest() != before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"packages": ("git", "make; rm -rf /")},
        {"packages": ("--allow-unauthenticated",)},
        {"packages": "git"},
        {"suite": "../etc"},
        {"suite": "Bookworm"},
        {"variant": "everything"},
        {"source_date_epoch": -1},
    ],
)
def test_debian_spec_rejects_bad_input(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        DebianSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_normalises_packages() -> None:
    assert DebianSpec(packages=("make", "git", "make")).packages == ("git", "make")
    assert DebianSpec(packages=("python3=3.11.2-1+b1", "libc6:amd64")).packages == (
        "libc6:amd64",
        "python3=3.11.2-1+b1",
    )


def test_unknown_artifact_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no artifact of that name"):
        _builder(tmp_path, '[image.t]\nbase = "debian:bookworm"\n', overrides={"x": tmp_path})


def test_kernel_path_is_identified_by_content(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"kernel bytes")
    spec = _spec(tmp_path, '[image.t]\nbase = "debian:bookworm"\nkernel = "./bzImage"\n')
    ref = builder_module.resolve_kernel(spec, _dirs(tmp_path))
    assert ref.kind == "path" and ref.path == tmp_path / "bzImage"
    assert ref.digest == "sha256:" + hashlib.sha256(b"kernel bytes").hexdigest()


# --- apt sources --------------------------------------------------------------------------------

ONE_LINE = """\
# main archive
deb [arch=amd64,i386 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
http://ftp.de.debian.org/debian bookworm main contrib
deb-src http://ftp.de.debian.org/debian bookworm main
deb http://ftp.de.debian.org/debian bookworm-updates main  # trailing comment
deb http://security.debian.org/debian-security bookworm-security main
deb http://ftp.de.debian.org/debian bookworm-backports main
deb http://ftp.de.debian.org/debian trixie main
deb [ arch=amd64 signed-by=/etc/apt/keyrings/docker.asc ] \
https://download.docker.com/linux/debian bookworm stable
deb https://packages.example.com/vendor/12/prod bookworm main
#deb http://ftp.de.debian.org/debian bookworm-proposed-updates main
deb [broken http://nowhere bookworm main
"""

DEB822 = """\
Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-proposed-updates
Components: main
Enabled: no

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/nodesource.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Enabled: no
"""


def test_parse_one_line_sources() -> None:
    entries = deb.parse_one_line_sources(ONE_LINE)
    first = entries[0]
    assert first.types == ("deb",)
    assert first.uris == ("http://ftp.de.debian.org/debian",)
    assert first.suites == ("bookworm",)
    assert first.components == ("main", "contrib")
    assert first.options == (
        ("Architectures", "amd64 i386"),
        ("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg"),
    )
    assert entries[2].components == ("main",)  # comment stripped
    assert len(entries) == 8  # the commented-out and malformed lines are skipped


def test_filter_one_line_sources_keeps_suite_updates_security() -> None:
    kept = deb.filter_sources(deb.parse_one_line_sources(ONE_LINE), "bookworm")
    assert [(e.uris[0], e.suites) for e in kept] == [
        ("http://ftp.de.debian.org/debian", ("bookworm",)),
        ("http://ftp.de.debian.org/debian", ("bookworm-updates",)),
        ("http://security.debian.org/debian-security", ("bookworm-security",)),
    ]


def test_filter_deb822_sources() -> None:
    kept = deb.filter_sources(deb.parse_deb822_sources(DEB822), "bookworm")
    assert kept == [
        deb.SourceEntry(
            types=("deb",),
            uris=("http://deb.debian.org/debian",),
            suites=("bookworm", "bookworm-updates"),
            components=("main",),
            options=(("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg"),),
        ),
        deb.SourceEntry(
            types=("deb",),
            uris=("http://deb.debian.org/debian-security",),
            suites=("bookworm-security",),
            components=("main",),
            options=(("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg"),),
        ),
    ]
    assert deb.filter_sources(deb.parse_deb822_sources(DEB822), "trixie") == []


def test_deb822_embedded_key_round_trips() -> None:
    text = (
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"
        " -----END PGP PUBLIC KEY BLOCK-----\n"
    )
    (entry,) = deb.parse_deb822_sources(text)
    assert deb.render_deb822([entry]) == text


def test_render_deb822() -> None:
    kept = deb.filter_sources(deb.parse_one_line_sources(ONE_LINE), "bookworm")
    assert deb.render_deb822(kept[:2]) == (
        "Types: deb\n"
        "URIs: http://ftp.de.debian.org/debian\n"
        "Suites: bookworm\n"
        "Components: main contrib\n"
        "Architectures: amd64 i386\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://ftp.de.debian.org/debian\n"
        "Suites: bookworm-updates\n"
        "Components: main\n"
    )


def test_select_sources_reads_host_files_and_falls_back(tmp_path: Path) -> None:
    etc_apt = tmp_path / "apt"
    (etc_apt / "sources.list.d").mkdir(parents=True)
    (etc_apt / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc_apt / "sources.list.d" / "old.list").write_text(ONE_LINE)
    (etc_apt / "sources.list.d" / "ignored.list.disabled").write_text(ONE_LINE)
    entries, from_host = deb.select_sources("bookworm", etc_apt)
    assert from_host
    assert len(entries) == 5  # 2 from debian.sources + 3 from old.list

    entries, from_host = deb.select_sources("forky", etc_apt)
    assert not from_host
    assert entries == deb.default_sources("forky")
    assert deb.render_deb822(entries) == (
        "Types: deb\nURIs: http://deb.debian.org/debian\n"
        "Suites: forky forky-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\n"
        "Suites: forky-security\nComponents: main\n"
    )
    assert [e.suites for e in deb.default_sources("sid")] == [("sid",)]


def test_proxy_env() -> None:
    dump = (
        'Acquire::http::Proxy "http://cache.lan:3142";\n'
        'Acquire::http::Proxy::deb.example.org "DIRECT";\n'
        'Acquire::https::Proxy "DIRECT";\n'
        'Acquire::ftp::Proxy "";\n'
    )
    assert deb.proxy_env(dump) == {"http_proxy": "http://cache.lan:3142"}
    assert deb.proxy_env("") == {}


# --- command lines ------------------------------------------------------------------------------


def test_mmdebstrap_argv_golden() -> None:
    argv = deb.mmdebstrap_argv(DebianSpec(), Path("/w/tree"), Path("/w/mirror.sources"))
    assert argv == [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        "--include=build-essential,ca-certificates,git,gzip,make,procps,python3,tar,xz-utils",
        '--aptopt=APT::Install-Recommends "false"',
        '--aptopt=APT::Install-Suggests "false"',
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        "bookworm",
        "/w/tree",
        "/w/mirror.sources",
    ]


def test_mmdebstrap_runs_isolated() -> None:
    assert deb.isolated_argv(["mmdebstrap", "x"]) == [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--",
        "mmdebstrap",
        "x",
    ]


def test_mmdebstrap_argv_without_packages() -> None:
    argv = deb.mmdebstrap_argv(
        DebianSpec(packages=(), variant="essential", suite="trixie"), Path("t"), Path("m")
    )
    assert "--variant=essential" in argv
    assert not any(a.startswith("--include") for a in argv)
    assert argv[-3:] == ["trixie", "t", "m"]


def test_mkfs_erofs_argv_golden() -> None:
    fs_uuid = pack.filesystem_uuid(
        "b0ee3ea29c3b99d046f83584f68fe847c7d70dac81d476f1b1250546e013b0d5"
    )
    assert fs_uuid == "b0ee3ea2-9c3b-49d0-86f8-3584f68fe847"
    assert uuid.UUID(fs_uuid).version == 4
    opts = pack.PackOptions(source_date_epoch=1686355200)
    argv = pack.mkfs_erofs_argv(opts, Path("/o/rootfs.erofs"), Path("/w/tree"), fs_uuid=fs_uuid)
    assert argv == [
        "mkfs.erofs",
        "--quiet",
        "-zlz4hc",
        "-C65536",
        "-Eztailpacking",
        "-T1686355200",
        "-Ub0ee3ea2-9c3b-49d0-86f8-3584f68fe847",
        "/o/rootfs.erofs",
        "/w/tree",
    ]
    plain = pack.mkfs_erofs_argv(
        pack.PackOptions(compression="none", source_date_epoch=1686355200),
        Path("o"),
        Path("t"),
        fs_uuid="u",
    )
    assert plain == ["mkfs.erofs", "--quiet", "-T1686355200", "-Uu", "o", "t"]


# --- tree helpers -------------------------------------------------------------------------------

DPKG_STATUS = """\
Package: make
Status: install ok installed
Priority: optional
Version: 4.3-4.1
Description: utility
 continuation: line

Package: python3
Status: install ok installed
Version: 3.11.2-1+b1

Package: gone
Status: deinstall ok config-files
Version: 1.0
"""


def test_installed_packages() -> None:
    assert tree.installed_packages(DPKG_STATUS) == ["make 4.3-4.1", "python3 3.11.2-1+b1"]


def _fake_tree(tree: Path, *, python: bool = True) -> None:
    for d in ("etc", "usr/bin", "var/tmp"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "bin").symlink_to("usr/bin")
    if python:
        exe = tree / "usr/bin/python3.11"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        (tree / "usr/bin/python3").symlink_to("python3.11")
    (tree / "etc/resolv.conf").write_text("nameserver 10.0.0.1\n")


def test_resolve_in_tree(tmp_path: Path) -> None:
    _fake_tree(tmp_path)
    (tmp_path / "usr/bin/abs").symlink_to("/bin/python3")
    (tmp_path / "usr/bin/loop").symlink_to("loop")
    (tmp_path / "usr/bin/escape").symlink_to("../../../../../etc/passwd")
    real = tmp_path / "usr/bin/python3.11"
    assert tree.resolve_in_tree(tmp_path, "/usr/bin/python3") == real
    assert tree.resolve_in_tree(tmp_path, "/bin/python3") == real
    assert tree.resolve_in_tree(tmp_path, "/usr/bin/abs") == real
    assert tree.resolve_in_tree(tmp_path, "/usr/bin/loop") is None
    assert tree.resolve_in_tree(tmp_path, "/usr/bin/nothing") is None
    # ".." stops at the tree's root, like in a chroot
    assert tree.resolve_in_tree(tmp_path, "/usr/bin/escape") is None


@pytest.mark.skipif(not is_root, reason="prepare_tree chowns (builds run as root)")
def test_prepare_tree(tmp_path: Path) -> None:
    _fake_tree(tmp_path)
    (tmp_path / "etc/hosts").symlink_to("/etc/outside-the-tree")
    partial = tmp_path / "var/lib/apt/lists/partial"
    partial.mkdir(parents=True, mode=0o755)
    os.chown(partial, 42, 42)
    tree.prepare_tree(tmp_path, "/usr/bin/python3")
    for d in ("proc", "sys", "dev", "run", "tmp"):
        assert (tmp_path / d).is_dir()
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777
    assert (tmp_path / "etc/hostname").read_text() == "stoker\n"
    hosts = tmp_path / "etc/hosts"
    assert not hosts.is_symlink()
    assert "127.0.0.1\tlocalhost" in hosts.read_text()
    assert not (tmp_path / "etc/resolv.conf").exists()
    st = partial.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)


def test_prepare_tree_requires_python(tmp_path: Path) -> None:
    _fake_tree(tmp_path, python=False)
    with pytest.raises(ProvisionError, match="no python3 at /usr/bin/python3"):
        tree.prepare_tree(tmp_path, "/usr/bin/python3")


def test_tree_size_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "b").hardlink_to(tmp_path / "a")
    (tmp_path / "c").symlink_to("a")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/e").write_bytes(b"y" * 10)
    assert pack.tree_stats(tmp_path) == pack.TreeStats(bytes=110, entries=5)


def test_mounts_under_parses_mountinfo(tmp_path: Path) -> None:
    root = tmp_path / "my tree"
    root.mkdir()
    escaped = str(root).replace(" ", "\\040")
    info = (
        "22 1 8:1 / / rw - ext4 /dev/vda rw\n"
        f"30 22 0:5 / {escaped}/proc rw - proc proc rw\n"
        f"31 22 0:6 / {escaped}/dev/null rw - devtmpfs udev rw\n"
        f"32 22 0:6 / {escaped}x/other rw - tmpfs t rw\n"
    )
    assert mounts_under(root, info) == [root / "dev/null", root / "proc"]


@pytest.mark.skipif(not is_root, reason="bind mounts need root")
def test_remove_tree_unmounts_instead_of_deleting_through_mounts(tmp_path: Path) -> None:
    precious = tmp_path / "host-dir"
    precious.mkdir()
    (precious / "keep-me").write_text("host data")
    tree = tmp_path / "tree"
    (tree / "dev").mkdir(parents=True)
    try:
        subprocess.run(["mount", "--bind", str(precious), str(tree / "dev")], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot bind mount here")
    remove_tree(tree)
    assert not tree.exists()
    assert (precious / "keep-me").read_text() == "host data"


# --- the store, with a fake builder -------------------------------------------------------------


class FakeImageBuilder:
    """A fake ImageBuilder: packs a tiny tree with mkfs.erofs, counts its builds in ``marks``."""

    def __init__(
        self,
        marks: Path,
        *,
        name: str = "fake",
        tag: str = "v1",
        delay: float = 0.0,
        error: BaseException | None = None,
    ) -> None:
        self.name = name
        self.tag = tag
        self.marks = marks
        self.delay = delay
        self.error = error
        marks.mkdir(parents=True, exist_ok=True)

    def spec_digest(self) -> str:
        return canonical_digest({"builder": "fake", "tag": self.tag})

    def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
        (self.marks / f"build-{os.getpid()}-{threading.get_ident()}-{time.time_ns()}").touch()
        tree = workdir / "tree"
        (tree / "usr/bin").mkdir(parents=True)
        (tree / "usr/bin/python3").write_text("#!/bin/sh\n")
        (tree / "etc").mkdir()
        (tree / "etc/hostname").write_text(f"{self.tag}\n")
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        run_checked(["mkfs.erofs", "--quiet", "-T0", str(rootfs_out), str(tree)], log=log)
        return {"builder": "fake", "python": "/usr/bin/python3", "spec": {"tag": self.tag}}

    def builds(self) -> int:
        return len(list(self.marks.iterdir()))


def _dirs(tmp_path: Path) -> Dirs:
    return Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")


def _published(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))


def test_fake_builder_satisfies_protocol(tmp_path: Path) -> None:
    builder: ImageBuilder = FakeImageBuilder(tmp_path / "marks")
    assert builder.name == "fake"


@needs_mkfs
def test_ensure_builds_once_then_hits_cache(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    builder = FakeImageBuilder(tmp_path / "marks")
    messages: list[str] = []
    image = store.ensure(builder, progress=messages.append)
    assert builder.builds() == 1
    assert any("building image fake" in m for m in messages)
    assert image.name == "fake"
    assert image.digest == builder.spec_digest()
    assert image.rootfs == store.root / image.digest / "rootfs.erofs"
    assert image.rootfs.read_bytes()[1024:1028] == b"\xe2\xe1\xf5\xe0"  # erofs magic
    assert image.fstype == "erofs"
    assert image.python == "/usr/bin/python3"

    manifest = json.loads((store.root / image.digest / "manifest.json").read_text())
    assert manifest == image.manifest
    assert manifest["name"] == "fake"
    assert manifest["digest"] == image.digest
    assert manifest["builder"] == "fake"
    assert manifest["rootfs_size"] == image.rootfs.stat().st_size
    assert isinstance(manifest["built_at"], str)
    assert isinstance(manifest["build_seconds"], float)
    assert json.loads((store.root / "names/fake.json").read_text())["digest"] == image.digest
    assert stat.S_IMODE(image.rootfs.stat().st_mode) == 0o444
    assert list((store.root / ".tmp").iterdir()) == []
    log = tmp_path / "cache/logs" / f"image-fake-{image.digest[:12]}.log"
    assert "mkfs.erofs" in log.read_text()

    started = time.monotonic()
    again = store.ensure(builder, progress=messages.append)
    assert time.monotonic() - started < 0.05
    assert builder.builds() == 1
    assert again == image

    assert store.get("fake") == image
    assert store.get("other") is None
    assert store.list() == [image]


@needs_mkfs
def test_name_points_at_newest_spec(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    v1 = store.ensure(FakeImageBuilder(tmp_path / "m1", tag="v1"))
    v2 = store.ensure(FakeImageBuilder(tmp_path / "m2", tag="v2"))
    assert v1.digest != v2.digest
    assert store.get("fake") == v2
    assert sorted(i.digest for i in store.list()) == sorted([v1.digest, v2.digest])
    # going back to v1 is a cache hit that moves the pointer back
    marks = tmp_path / "m3"
    assert store.ensure(FakeImageBuilder(marks, tag="v1")) == v1
    assert not any(marks.iterdir())
    assert store.get("fake") == v1


@needs_mkfs
def test_only_the_pointer_names_an_image(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    builder = FakeImageBuilder(tmp_path / "marks")
    image = store.ensure(builder)
    (store.root / "names/fake.json").unlink()  # as `stoker image rm` or a killed publish
    assert store.get("fake") is None
    builds = builder.builds()
    assert store.ensure(builder) == image  # re-pointed from the published data
    assert builder.builds() == builds
    assert store.get("fake") == image


@needs_mkfs
def test_names_sharing_one_entry_each_see_their_own_name(tmp_path: Path) -> None:
    # Two specs that differ only in their name share one store entry (content
    # addresses it).  Asked for by the second name, the image must not call itself by
    # the first: that once made `stoker image inspect default` say "erofs-plain".
    store = ImageStore(_dirs(tmp_path))
    first = store.ensure(FakeImageBuilder(tmp_path / "m1", name="first"))
    marks = tmp_path / "m2"
    second = store.ensure(FakeImageBuilder(marks, name="second"))
    assert not any(marks.iterdir())  # a cache hit
    assert second.digest == first.digest
    assert second.name == "second"
    assert second.manifest["name"] == "second"
    assert second.manifest["built_as"] == "first"
    assert store.inspect("second").manifest["name"] == "second"
    assert store.inspect("first").manifest["name"] == "first"
    assert "built_as" not in store.inspect("first").manifest
    on_disk = json.loads((store.root / first.digest / "manifest.json").read_text())
    assert on_disk["name"] == "first"  # the build's record is left as written


def test_get_rejects_bad_names(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    with pytest.raises(UsageError):
        store.get("../etc")
    with pytest.raises(UsageError):
        store.ensure(FakeImageBuilder(tmp_path / "marks", name="a/b"))


@needs_mkfs
def test_concurrent_ensure_threads_build_once(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    builder = FakeImageBuilder(tmp_path / "marks", delay=0.5)
    results: list[Image] = []
    errors: list[BaseException] = []
    messages: list[str] = []

    def worker() -> None:
        try:
            results.append(ImageStore(_dirs(tmp_path)).ensure(builder, progress=messages.append))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert builder.builds() == 1
    assert len(results) == 3
    assert len({r.digest for r in results}) == 1
    assert any(m.startswith("waiting for another build") for m in messages)
    assert _published(store) == [results[0].digest, "names"]


def _ensure_in_child(tmp_path: Path, marks: Path) -> None:
    ImageStore(_dirs(tmp_path)).ensure(FakeImageBuilder(marks, delay=0.5))


@needs_mkfs
def test_concurrent_ensure_processes_build_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    marks = tmp_path / "marks"
    procs = [ctx.Process(target=_ensure_in_child, args=(tmp_path, marks)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(list(marks.iterdir())) == 1
    assert ImageStore(_dirs(tmp_path)).get("fake") is not None


@needs_mkfs
def test_failed_build_publishes_nothing_and_next_ensure_succeeds(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    failing = FakeImageBuilder(tmp_path / "marks", error=RuntimeError("mirror exploded"))
    with pytest.raises(ProvisionError) as info:
        store.ensure(failing)
    log = tmp_path / "cache/logs" / f"image-fake-{failing.spec_digest()[:12]}.log"
    assert str(log) in str(info.value)
    assert "mirror exploded" in str(info.value)
    assert "mirror exploded" in log.read_text()
    assert _published(store) == []
    assert list((store.root / ".tmp").iterdir()) == []
    assert store.get("fake") is None

    image = store.ensure(FakeImageBuilder(tmp_path / "marks"))
    assert store.get("fake") == image


@needs_mkfs
def test_failing_helper_program_reports_log(tmp_path: Path) -> None:
    class BrokenMkfs(FakeImageBuilder):
        def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
            run_checked(["mkfs.erofs", str(rootfs_out), str(workdir / "missing")], log=log)
            return {}

    store = ImageStore(_dirs(tmp_path))
    with pytest.raises(ProvisionError, match=r"full log: .*image-fake-.*\.log"):
        store.ensure(BrokenMkfs(tmp_path / "marks"))
    assert _published(store) == []


def test_interrupted_build_cleans_up(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        store.ensure(FakeImageBuilder(tmp_path / "marks", error=KeyboardInterrupt()))
    assert list((store.root / ".tmp").iterdir()) == []
    assert _published(store) == []


def test_builder_without_rootfs_or_python_is_rejected(tmp_path: Path) -> None:
    class NoOutput(FakeImageBuilder):
        def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
            return {"python": "/usr/bin/python3"}

    store = ImageStore(_dirs(tmp_path))
    with pytest.raises(ProvisionError, match="produced no root filesystem"):
        store.ensure(NoOutput(tmp_path / "marks"))
    assert _published(store) == []


@needs_mkfs
def test_stale_tmp_entries_are_removed_unless_locked(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    tmp_root = store.root / ".tmp"
    locks = store.root / ".locks"
    tmp_root.mkdir(parents=True)
    locks.mkdir()
    stale = tmp_root / f"{'a' * 64}-dead"
    (stale / "work/tree/usr").mkdir(parents=True)
    busy = tmp_root / f"{'b' * 64}-live"
    busy.mkdir()
    own = FakeImageBuilder(tmp_path / "marks")
    own_stale = tmp_root / f"{own.spec_digest()}-killed"
    own_stale.mkdir()
    garbage = tmp_root / "not-a-digest"
    garbage.mkdir()

    fd = os.open(locks / f"{'b' * 64}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # someone is building b...
        store.ensure(own)
    finally:
        os.close(fd)
    assert not stale.exists()
    assert not own_stale.exists()
    assert not garbage.exists()
    assert busy.exists()


@needs_mkfs
def test_incomplete_entry_is_rebuilt(tmp_path: Path) -> None:
    store = ImageStore(_dirs(tmp_path))
    builder = FakeImageBuilder(tmp_path / "marks")
    half = store.root / builder.spec_digest()
    half.mkdir(parents=True)
    (half / "rootfs.erofs").write_bytes(b"truncated")  # no manifest: never finished
    assert store.get("fake") is None
    image = store.ensure(builder)
    assert builder.builds() == 1
    assert image.rootfs.read_bytes() != b"truncated"
    assert (half / "manifest.json").is_file()


def test_debian_builder_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    store = ImageStore(_dirs(tmp_path))
    default = load_specs("default")["default"]
    with pytest.raises(ProvisionError, match="needs root") as info:
        store.ensure(SpecBuilder(default, kernel=KERNEL, dirs=_dirs(tmp_path)))
    assert "image-default-" in str(info.value)
    assert _published(store) == []


# --- the real thing -----------------------------------------------------------------------------


def _erofs_has(image: Path, path: str) -> bool:
    proc = subprocess.run(
        ["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and f"File : {path}" in proc.stdout


@pytest.mark.vm
@pytest.mark.skipif(not HAVE_MKFS_EROFS, reason="erofs-utils missing")
def test_real_default_image_is_complete(boot_artifacts: BootArtifacts, tmp_path: Path) -> None:
    # Reproducibility of real builds is tested on a spec using every key, in
    # test_image_builds.py; this checks what the shared default image contains.
    _check_default_image(boot_artifacts.image, tmp_path / "extracted")


def _check_default_image(first: Image, extracted: Path) -> None:
    manifest = first.manifest
    assert first.name == manifest["name"] == "default"
    assert manifest["builder"] == "spec"
    assert isinstance(manifest["base"], dict) and manifest["base"]["kind"] == "debian"
    # The microVM kernel once built, else Debian's: chosen at each boot.
    assert manifest["kernel"]["kind"] == "auto"  # type: ignore[index]
    assert manifest["fstype"] == "erofs" == first.fstype
    assert manifest["python"] == "/usr/bin/python3" == first.python
    assert manifest["source_date_epoch"] == deb.BOOKWORM_RELEASE_EPOCH
    assert manifest["defaults"] == {"cpus": 2, "memory": 1024, "disk": 4096}
    packages = manifest["packages"]
    assert isinstance(packages, list)
    names = {p.split()[0] for p in packages}
    assert {"python3", "git", "make", "gcc", "libc6-dev", "ca-certificates"} <= names
    rootfs_size = manifest["rootfs_size"]
    uncompressed = manifest["uncompressed_size"]
    assert isinstance(rootfs_size, int)
    assert isinstance(uncompressed, int)
    assert rootfs_size == first.rootfs.stat().st_size
    # Uncompressed (see the spec): the filesystem is the tree plus erofs metadata.
    assert manifest["pack"]["compression"] == "none"  # type: ignore[index]
    assert 50e6 < uncompressed <= rootfs_size < uncompressed * 1.1 < 1e9
    print(f"erofs {rootfs_size / 1e6:.1f} MB, uncompressed {uncompressed / 1e6:.1f} MB")

    for path in ("/usr/bin/python3", "/usr/bin/make", "/usr/bin/gcc", "/usr/bin/git"):
        assert _erofs_has(first.rootfs, path), path
    assert not _erofs_has(first.rootfs, "/etc/resolv.conf")
    assert not _erofs_has(first.rootfs, "/usr/share/man/man1")

    # The files decode, and the toolchain runs.
    subprocess.run(["fsck.erofs", f"--extract={extracted}", str(first.rootfs)], check=True)
    assert (extracted / "etc/hostname").read_text() == "stoker\n"
    for argv in (
        ["/usr/bin/python3", "-c", "import ssl, json, sqlite3; print('ok')"],
        ["/usr/bin/gcc", "--version"],
        ["/usr/bin/make", "--version"],
        ["/usr/bin/git", "--version"],
    ):
        subprocess.run(["chroot", str(extracted), *argv], check=True, capture_output=True)


def test_ubuntu_needs_the_archive_keyring(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="Ubuntu archive keyring") as info:
        deb.check_ubuntu_host(tmp_path / "missing.gpg")
    assert info.value.hint == "apt-get install ubuntu-keyring"


def test_ubuntu_needs_the_archive_reachable(tmp_path: Path) -> None:
    keyring = tmp_path / "ubuntu-archive-keyring.gpg"
    keyring.write_bytes(b"key")
    with pytest.raises(ProvisionError, match="cannot reach the Ubuntu archive"):
        deb.check_ubuntu_host(keyring, mirror="http://127.0.0.1:9/ubuntu", probe_timeout=5)


def test_ubuntu_sources() -> None:
    (entry,) = deb.ubuntu_sources("noble")
    assert entry.uris == ("http://archive.ubuntu.com/ubuntu",)
    assert entry.suites == ("noble", "noble-updates", "noble-security")
    assert entry.components == ("main", "universe")
    assert entry.option("Signed-By") == str(deb.UBUNTU_KEYRING)
