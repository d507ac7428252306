"""The image store's inspect / remove / gc, and the `stoker image` commands on top.

Images come from ``FakeErofsBuilder``, which packs a two-file tree with
mkfs.erofs in milliseconds; nothing here runs mmdebstrap or a VM.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stoker.cli import app
from stoker.errors import UsageError
from stoker.images import Image, ImageStore
from stoker.images.base import canonical_digest
from stoker.paths import Dirs
from stoker.procs import run_checked

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.erofs") is None, reason="mkfs.erofs (erofs-utils) missing"
)


class FakeErofsBuilder:
    """A fake ImageBuilder: a tiny tree packed with mkfs.erofs; ``digest`` overrides the spec's."""

    def __init__(self, name: str = "fake", *, tag: str = "v1", digest: str | None = None) -> None:
        self.name = name
        self.tag = tag
        self.digest = digest

    def spec_digest(self) -> str:
        return self.digest or canonical_digest({"builder": "fake-erofs", "tag": self.tag})

    def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
        tree = workdir / "tree"
        (tree / "usr/bin").mkdir(parents=True)
        (tree / "usr/bin/python3").write_text("#!/bin/sh\n")
        (tree / "etc").mkdir()
        (tree / "etc/hostname").write_text(f"{self.tag}\n")
        run_checked(["mkfs.erofs", "--quiet", "-T0", str(rootfs_out), str(tree)], log=log)
        return {"builder": "fake-erofs", "python": "/usr/bin/python3", "spec": {"tag": self.tag}}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run"))


def _entries(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))


@pytest.fixture
def held_lock(store: ImageStore) -> Iterator[Callable[[str], None]]:
    """Call it with a digest to hold that digest's build lock, as a running build does."""
    fds: list[int] = []

    def hold(digest: str) -> None:
        locks = store.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fds.append(fd)

    yield hold
    for fd in fds:
        os.close(fd)


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_by_name_digest_and_prefix(store: ImageStore) -> None:
    image = store.ensure(FakeErofsBuilder())
    assert store.inspect("fake") == image
    assert store.inspect(image.digest) == image
    assert store.inspect(image.digest[:8]) == image
    assert store.inspect(image.digest[:12]).rootfs == image.rootfs


def test_inspect_by_digest_of_unnamed_image(store: ImageStore) -> None:
    image = store.ensure(FakeErofsBuilder())
    store.remove("fake")
    found = store.inspect(image.digest[:10])
    assert found.digest == image.digest
    assert found.rootfs == image.rootfs


def test_inspect_ambiguous_prefix_lists_candidates(store: ImageStore) -> None:
    one = store.ensure(FakeErofsBuilder("one", digest="abcdef01" + "0" * 56))
    two = store.ensure(FakeErofsBuilder("two", digest="abcdef01" + "1" * 56))
    with pytest.raises(UsageError, match="'abcdef01' is ambiguous") as info:
        store.inspect("abcdef01")
    assert info.value.hint is not None
    assert one.digest[:16] in info.value.hint
    assert two.digest[:16] in info.value.hint
    assert store.inspect("abcdef010") == store.inspect("one")


@pytest.mark.parametrize("wanted", ["fak", "nope", "abcdef", "0123456789abcdef", "no/such"])
def test_inspect_unknown_names_what_was_asked(store: ImageStore, wanted: str) -> None:
    store.ensure(FakeErofsBuilder())
    with pytest.raises(UsageError, match=f"no image {wanted!r}") as info:
        store.inspect(wanted)
    assert info.value.hint is not None


def test_inspect_suggests_close_names(store: ImageStore) -> None:
    store.ensure(FakeErofsBuilder())
    with pytest.raises(UsageError) as info:
        store.inspect("fak")
    assert "did you mean fake" in str(info.value.hint)


# --- remove and gc --------------------------------------------------------------------------------


def test_remove_then_gc_frees_the_data(store: ImageStore) -> None:
    image = store.ensure(FakeErofsBuilder())
    size = image.rootfs.stat().st_size
    assert store.remove("fake") == [store.root / "names/fake.json"]
    assert store.pointers() == {}
    assert image.rootfs.is_file()  # the data stays until gc
    report = store.gc()
    assert report.removed_digests == (image.digest,)
    assert report.freed_bytes >= size
    assert not report.dry_run
    assert _entries(store) == ["names"]
    assert list((store.root / ".tmp").iterdir()) == []
    with pytest.raises(UsageError):
        store.inspect(image.digest)


def test_remove_unknown_name(store: ImageStore) -> None:
    store.ensure(FakeErofsBuilder())
    with pytest.raises(UsageError, match="no image named 'fak'") as info:
        store.remove("fak")
    assert "fake" in str(info.value.hint)
    with pytest.raises(UsageError, match="invalid image name"):
        store.remove("../names/fake")


def test_gc_keeps_images_any_name_points_at(store: ImageStore) -> None:
    kept = store.ensure(FakeErofsBuilder())
    store.ensure(FakeErofsBuilder("alias"))  # same digest, second name
    gone = store.ensure(FakeErofsBuilder("old", tag="v2"))
    store.remove("fake")
    store.remove("old")
    report = store.gc()
    assert report.removed_digests == (gone.digest,)
    assert store.inspect("alias").rootfs == kept.rootfs
    assert kept.rootfs.is_file()
    assert store.gc().removed_digests == ()


def test_gc_dry_run_deletes_nothing(store: ImageStore) -> None:
    image = store.ensure(FakeErofsBuilder())
    store.remove("fake")
    stale = store.root / ".tmp" / f"{'a' * 64}-killed"
    (stale / "work").mkdir(parents=True)
    (stale / "work/junk").write_bytes(b"x" * 1000)
    before = sorted(str(p) for p in store.root.rglob("*"))
    report = store.gc(dry_run=True)
    assert report.dry_run
    assert report.removed_digests == (image.digest,)
    assert report.removed_tmp == (stale,)
    assert report.freed_bytes >= image.rootfs.stat().st_size + 1000
    after = sorted(str(p) for p in store.root.rglob("*") if ".locks" not in p.parts)
    assert after == [p for p in before if ".locks" not in Path(p).parts]
    assert store.gc().freed_bytes == report.freed_bytes


def test_gc_spares_what_a_concurrent_build_holds(
    store: ImageStore, held_lock: Callable[[str], None]
) -> None:
    image = store.ensure(FakeErofsBuilder())
    store.remove("fake")  # unreferenced, but a build of it is (re-)pointing it right now
    held_lock(image.digest)
    building = store.root / ".tmp" / f"{'b' * 64}-live"
    (building / "work").mkdir(parents=True)
    held_lock("b" * 64)
    stale = store.root / ".tmp" / f"{'c' * 64}-dead"
    stale.mkdir()
    garbage = store.root / ".tmp" / "not-a-digest"
    garbage.mkdir()

    report = store.gc()
    assert report.busy_digests == (image.digest,)
    assert report.removed_digests == ()
    assert report.removed_tmp == (stale,)
    assert image.rootfs.is_file()
    assert building.is_dir()
    assert not stale.exists()
    assert garbage.is_dir()  # not named like a build: not gc's to delete


def test_gc_never_follows_symlinks(store: ImageStore, tmp_path: Path) -> None:
    store.ensure(FakeErofsBuilder())
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    (store.root / ("d" * 64)).symlink_to(victim)
    (store.root / ".tmp" / f"{'e' * 64}-link").symlink_to(victim)
    (store.root / "not-a-digest").mkdir()
    store.gc()
    assert (victim / "precious").read_text() == "keep me"
    assert (store.root / "not-a-digest").is_dir()
    assert (store.root / ("d" * 64)).is_symlink()


def test_cache_hit_racing_gc_rebuilds_instead_of_returning_a_deleted_image(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = FakeErofsBuilder()
    store.ensure(builder)
    store.remove("fake")
    real_point = ImageStore._point
    raced: list[bool] = []

    def gc_then_point(self: ImageStore, name: str, digest: str) -> None:
        if not raced:  # gc runs between the lock-free load and the pointer write
            raced.append(True)
            assert self.gc().removed_digests == (digest,)
        real_point(self, name, digest)

    monkeypatch.setattr(ImageStore, "_point", gc_then_point)
    image = store.ensure(builder)
    assert raced
    assert image.rootfs.is_file()
    assert store.pointers() == {"fake": image.digest}


# --- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cli(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("STOKER_CACHE_DIR", str(store.dirs.cache))
    monkeypatch.setenv("STOKER_RUNTIME_DIR", str(store.dirs.runtime))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def _built(store: ImageStore) -> tuple[Image, Image]:
    named = store.ensure(FakeErofsBuilder())
    unnamed = store.ensure(FakeErofsBuilder("old", tag="v2"))
    store.remove("old")
    return named, unnamed


def test_cli_ls_marks_unnamed_entries(store: ImageStore, cli: CliRunner) -> None:
    named, unnamed = _built(store)
    result = cli.invoke(app, ["image", "ls"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("fake" in line and named.digest[:12] in line and "MB" in line for line in lines)
    assert any("<none>" in line and unnamed.digest[:12] in line for line in lines)
    assert str(named.manifest["built_at"]) in result.stdout


def test_cli_ls_json(store: ImageStore, cli: CliRunner) -> None:
    named, unnamed = _built(store)
    result = cli.invoke(app, ["image", "ls", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["digest"]: row for row in json.loads(result.stdout)}
    assert rows[named.digest]["name"] == "fake"
    assert rows[unnamed.digest]["name"] is None
    assert rows[named.digest]["size"] == named.rootfs.stat().st_size
    assert rows[named.digest]["path"] == str(named.rootfs)
    assert rows[named.digest]["built_at"] == named.manifest["built_at"]


def test_cli_ls_empty_store(cli: CliRunner) -> None:
    result = cli.invoke(app, ["image", "ls", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_cli_inspect(store: ImageStore, cli: CliRunner) -> None:
    named, _ = _built(store)
    for wanted in ("fake", named.digest, named.digest[:9]):
        result = cli.invoke(app, ["image", "inspect", wanted])
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        assert document["digest"] == named.digest
        assert document["name"] == "fake"
        assert document["path"] == str(named.rootfs)
        assert document["size"] == named.rootfs.stat().st_size


def test_cli_inspect_unknown_is_a_usage_error(store: ImageStore, cli: CliRunner) -> None:
    _built(store)
    result = cli.invoke(app, ["image", "inspect", "fak"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "no image 'fak'" in result.stderr
    assert "did you mean fake" in result.stderr


def test_cli_rm_then_gc(store: ImageStore, cli: CliRunner) -> None:
    named, unnamed = _built(store)
    result = cli.invoke(app, ["image", "rm", "fake"])
    assert result.exit_code == 0, result.output
    assert f"removed {store.root / 'names/fake.json'}" in result.stdout
    assert "image gc" in result.stderr

    result = cli.invoke(app, ["image", "rm", "fake"])
    assert result.exit_code == 2
    assert "no image named 'fake'" in result.stderr

    result = cli.invoke(app, ["image", "gc", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would free" in result.stdout
    assert named.digest in result.stdout and unnamed.digest in result.stdout
    assert named.rootfs.is_file()

    result = cli.invoke(app, ["image", "gc"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("freed ")
    assert " MB\n" in result.stdout
    assert f"removed {named.digest}" in result.stdout
    assert f"removed {unnamed.digest}" in result.stdout
    assert not named.rootfs.exists()
    assert _entries(store) == ["names"]
