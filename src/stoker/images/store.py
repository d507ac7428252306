"""The image store: content-addressed, built once, published atomically.

Layout under ``dirs.images``::

    <digest>/rootfs.<fstype>     the filesystem, e.g. rootfs.erofs (read-only once published)
    <digest>/manifest.json       written last; its presence marks the entry complete
    names/<name>.json            {"name": ..., "digest": ...}: the newest image of a name
    .locks/<digest>.lock         fcntl lock held while <digest> is being built
    .tmp/<digest>-<random>/      a build in progress (or the remains of a killed one)

A build happens in ``.tmp`` and is moved into place with one ``rename``, so
readers see either nothing or a complete image.  Concurrent :meth:`ImageStore.ensure`
calls for the same digest (threads or processes) serialise on the lock; the
loser finds the image published and returns it.  Lock files are never deleted
(deleting them would race with other lockers).

:meth:`ImageStore.gc` deletes entries no name points to.  It only ever *tries*
a digest's lock (never waits), so it cannot deadlock with builds, and skips
whatever is locked: an image being built, or being pointed at by a build, is
never touched.  To close the race with the lock-free cache hit in
:meth:`ImageStore.ensure` (load, then point), gc moves an entry aside *before*
looking at the name pointers a last time, and ensure re-checks the entry
*after* writing its pointer: one of the two always sees the other.
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import errno
import fcntl
import json
import os
import re
import secrets
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stoker.errors import ProvisionError, StokerError, UsageError
from stoker.images.base import Image, ImageBuilder, log_line, remove_tree
from stoker.images.pack import FORMATS, rootfs_filename
from stoker.paths import Dirs

#: What a builder writes to; renamed to ``rootfs.<fstype>`` when published.
ROOTFS_NAME = "rootfs.img"
MANIFEST_NAME = "manifest.json"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[0-9a-f]{16,128}")
_PREFIX_RE = re.compile(r"[0-9a-f]{8,128}")

Progress = Callable[[str], None]


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid image name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (not starting with a symbol)",
        )


def _check_digest(digest: str) -> None:
    if not _DIGEST_RE.fullmatch(digest):
        raise ProvisionError(f"image builder returned an invalid digest {digest!r}")


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, document: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("w") as fh:
            json.dump(document, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent, directory=True)


@contextlib.contextmanager
def _lock(path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, calling ``on_wait`` first if someone else has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` if it is free; yields whether we got it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _remove_quietly(path: Path, log: Path) -> None:
    """Clean up after a failed build without hiding the failure."""
    try:
        remove_tree(path, log=log)
    except (OSError, StokerError) as exc:
        log_line(log, f"could not remove {path}: {exc}")


def _tree_bytes(path: Path) -> int:
    """Apparent size of the regular files under ``path``; symlinks are not followed."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, _dirs, files in os.walk(path, followlinks=False):
        for file in files:
            with contextlib.suppress(OSError):
                st = (Path(parent) / file).lstat()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


@dataclass(frozen=True)
class GcReport:
    """What :meth:`ImageStore.gc` removed (or, with ``dry_run``, would remove)."""

    #: Store entries (``<digest>/``) no name pointed to.
    removed_digests: tuple[str, ...]
    #: Leftovers of killed builds under ``.tmp/``.
    removed_tmp: tuple[Path, ...]
    #: Bytes of the regular files in everything listed above.
    freed_bytes: int
    #: Unreferenced entries left alone because a build held their lock.
    busy_digests: tuple[str, ...]
    dry_run: bool


class ImageStore:
    """Published images under ``dirs.images``; builds them on demand."""

    def __init__(self, dirs: Dirs) -> None:
        self.dirs = dirs
        self.root = dirs.images

    # --- reading --------------------------------------------------------------------------------

    def _load(self, digest: str, name: str | None = None) -> Image | None:
        """The published image ``digest``, or None if it is absent or incomplete."""
        entry = self.root / digest
        try:
            manifest = json.loads((entry / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
        fstype = manifest.get("fstype")
        python = manifest.get("python")
        if fstype not in FORMATS or not isinstance(python, str):
            return None
        rootfs = entry / rootfs_filename(fstype)
        if not rootfs.is_file():
            return None
        manifest_name = manifest.get("name")
        if name is None:
            name = manifest_name if isinstance(manifest_name, str) else digest[:12]
        elif manifest_name != name:
            # Content addresses the store, and the name is not content: two specs that
            # differ only in their name share one entry, whose manifest records the name
            # it was first built under.  Show the name the image was asked for, and say
            # what it was built as, rather than a stranger's name.
            manifest = {**manifest, "name": name, "built_as": manifest_name}
        return Image(
            name=name,
            digest=digest,
            rootfs=rootfs,
            fstype=fstype,
            python=python,
            manifest=manifest,
        )

    def _pointer(self, name: str) -> str | None:
        try:
            doc = json.loads((self.root / "names" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        digest = doc.get("digest") if isinstance(doc, dict) else None
        if isinstance(digest, str) and _DIGEST_RE.fullmatch(digest):
            return digest
        return None

    def _digests(self) -> list[str]:
        try:
            children = list(self.root.iterdir())
        except OSError:
            return []
        return sorted(p.name for p in children if _DIGEST_RE.fullmatch(p.name) and p.is_dir())

    def get(self, name: str) -> Image | None:
        """The newest published image called ``name``, without building anything."""
        _check_name(name)
        # Only the name pointer counts: `stoker image rm` removes exactly that.  A
        # build killed between publishing and pointing is re-pointed by the next
        # ensure() from the published data, without rebuilding.
        digest = self._pointer(name)
        return None if digest is None else self._load(digest, name)

    def list(self) -> list[Image]:
        """Every published image, once per name pointing at it, sorted by name."""
        pointed: dict[str, list[str]] = {}
        names_dir = self.root / "names"
        if names_dir.is_dir():
            for path in names_dir.glob("*.json"):
                digest = self._pointer(path.stem)
                if digest is not None:
                    pointed.setdefault(digest, []).append(path.stem)
        images: list[Image] = []
        for digest in self._digests():
            names: list[str | None] = [*pointed.get(digest, [])] or [None]
            for name in names:
                image = self._load(digest, name)
                if image is not None:
                    images.append(image)
        return sorted(images, key=lambda i: (i.name, str(i.manifest.get("built_at", ""))))

    def pointers(self) -> dict[str, str]:
        """Every name with a valid pointer, mapped to the digest it points at."""
        names_dir = self.root / "names"
        if not names_dir.is_dir():
            return {}
        found: dict[str, str] = {}
        for path in sorted(names_dir.glob("*.json")):
            if _NAME_RE.fullmatch(path.stem) and (digest := self._pointer(path.stem)) is not None:
                found[path.stem] = digest
        return found

    def inspect(self, name_or_digest: str) -> Image:
        """The image called ``name_or_digest``, or with that digest or unique digest prefix.

        Names win over digests.  A prefix needs at least 8 hex digits.  Raises
        :class:`UsageError` naming close candidates when nothing (or more than
        one image) matches.
        """
        wanted = name_or_digest
        if _NAME_RE.fullmatch(wanted):
            image = self.get(wanted)
            if image is not None:
                return image
        complete = [d for d in self._digests() if self._load(d) is not None]
        if _PREFIX_RE.fullmatch(wanted):
            matches = [d for d in complete if d.startswith(wanted)]
            if len(matches) == 1:
                image = self._load(matches[0], self._name_of(matches[0]))
                if image is not None:
                    return image
            if len(matches) > 1:
                raise UsageError(
                    f"image digest prefix {wanted!r} is ambiguous",
                    hint="it matches " + ", ".join(d[:16] for d in matches) + "; give more digits",
                )
        candidates = sorted(self.pointers()) + [d[:12] for d in complete]
        close = difflib.get_close_matches(wanted, candidates, n=5, cutoff=0.5)
        close += [c for c in candidates if c.startswith(wanted[:4]) and c not in close][:5]
        hint = "see `stoker image ls`; a digest prefix needs at least 8 hex digits"
        if close:
            hint = f"did you mean {', '.join(close)}? ({hint})"
        raise UsageError(f"no image {wanted!r} in {self.root}", hint=hint)

    def _name_of(self, digest: str) -> str | None:
        """The first name pointing at ``digest`` (None: the manifest's name)."""
        names = [name for name, d in self.pointers().items() if d == digest]
        return names[0] if names else None

    # --- removing -------------------------------------------------------------------------------

    def remove(self, name: str) -> builtins.list[Path]:
        """Drop the name ``name``; returns the files removed.

        The image itself stays until :meth:`gc` (another name may point at it).
        """
        _check_name(name)
        pointer = self.root / "names" / f"{name}.json"
        try:
            pointer.unlink()
        except FileNotFoundError:
            known = sorted(self.pointers())
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "see `stoker image ls`"
            raise UsageError(f"no image named {name!r} in {self.root}", hint=hint) from None
        with contextlib.suppress(OSError):
            _fsync_path(pointer.parent, directory=True)
        return [pointer]

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Delete store entries no name points to, and leftovers of killed builds.

        Entries whose digest lock is held (a build in progress) are skipped, as
        are symlinks and anything not named like a digest.  With ``dry_run``
        nothing is deleted; the report says what would be.
        """
        removed: list[str] = []
        busy: list[str] = []
        tmp_removed: list[Path] = []
        freed = 0
        locks = self.root / ".locks"
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            entries = []
        if entries:
            locks.mkdir(exist_ok=True)
        for entry in entries:
            digest = entry.name
            if not (_DIGEST_RE.fullmatch(digest) and entry.is_dir(follow_symlinks=False)):
                continue
            if digest in self.pointers().values():
                continue
            with _try_lock(locks / f"{digest}.lock") as got:
                if not got:
                    busy.append(digest)
                    continue
                size = self._collect(digest, dry_run=dry_run)
                if size is not None:
                    removed.append(digest)
                    freed += size
        for stale in self._stale_tmp(own_digest=None):
            freed += _tree_bytes(stale)
            tmp_removed.append(stale)
            if not dry_run:
                remove_tree(stale)
        return GcReport(
            removed_digests=tuple(removed),
            removed_tmp=tuple(tmp_removed),
            freed_bytes=freed,
            busy_digests=tuple(busy),
            dry_run=dry_run,
        )

    def _collect(self, digest: str, *, dry_run: bool) -> int | None:
        """Delete the unreferenced entry ``digest`` (we hold its lock); its size, or None."""
        entry = self.root / digest
        if dry_run:
            return None if digest in self.pointers().values() else _tree_bytes(entry)
        aside = self.root / ".tmp" / f"{digest}-gc-{secrets.token_hex(4)}"
        aside.parent.mkdir(exist_ok=True)
        entry.rename(aside)
        # A lock-free cache hit in ensure() may have pointed a name at it meanwhile:
        # looking only now (after the move) means that ensure() sees the entry gone.
        if digest in self.pointers().values():
            aside.rename(entry)
            return None
        size = _tree_bytes(aside)
        remove_tree(aside)
        return size

    # --- building -------------------------------------------------------------------------------

    def log_path(self, name: str, digest: str) -> Path:
        """Where the build log of ``name``/``digest`` goes."""
        return self.dirs.logs / f"image-{name}-{digest[:12]}.log"

    def ensure(self, builder: ImageBuilder, *, progress: Progress | None = None) -> Image:
        """The image ``builder`` describes, building and publishing it if needed.

        A published image is returned without running anything.  Raises
        :class:`ProvisionError` (with the log path in its message) when the
        build fails; nothing is published then.
        """
        name = builder.name
        _check_name(name)
        digest = builder.spec_digest()
        _check_digest(digest)
        if self._load(digest, name) is not None:
            with contextlib.suppress(OSError):  # a read-only cache still serves images
                self._point(name, digest)
            # Checked again after pointing: gc may have moved the entry away in between.
            image = self._load(digest, name)
            if image is not None:
                return image

        say = progress or (lambda _msg: None)
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock_path = locks / f"{digest}.lock"
        waiting = f"waiting for another build of image {name} ({digest[:12]})"
        with _lock(lock_path, on_wait=lambda: say(waiting)):
            image = self._load(digest, name)
            if image is None:
                image = self._build(builder, name, digest, say)
            self._point(name, digest)
            return image

    def _point(self, name: str, digest: str) -> None:
        if self._pointer(name) == digest:
            return
        names = self.root / "names"
        names.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(names / f"{name}.json", {"name": name, "digest": digest})

    def _stale_tmp(self, *, own_digest: str | None) -> Iterator[Path]:
        """Leftovers of killed builds under ``.tmp``, each yielded while its lock is held.

        With ``own_digest`` (a build holding that lock), entries of that digest
        and entries not named like a build directory are stale too; without it
        (gc), only entries ``<digest>-...`` whose lock is free are.
        """
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for entry in sorted(tmp_root.iterdir()):
            digest = entry.name.split("-", 1)[0]
            if own_digest is not None and (
                digest == own_digest or not _DIGEST_RE.fullmatch(digest)
            ):
                # ours (we hold that lock) or not a build directory at all
                yield entry
                continue
            if not _DIGEST_RE.fullmatch(digest):
                continue
            (self.root / ".locks").mkdir(exist_ok=True)
            with _try_lock(self.root / ".locks" / f"{digest}.lock") as got:
                if got:
                    yield entry

    def _clean_tmp(self, *, own_digest: str, log: Path) -> None:
        """Remove leftovers of killed builds whose lock nobody holds."""
        for entry in self._stale_tmp(own_digest=own_digest):
            log_line(log, f"removing stale {entry}")
            _remove_quietly(entry, log)

    def _build(self, builder: ImageBuilder, name: str, digest: str, say: Progress) -> Image:
        log = self.log_path(name, digest)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        self._clean_tmp(own_digest=digest, log=log)
        tmp = self.root / ".tmp" / f"{digest}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        say(f"building image {name} ({digest[:12]}); log: {log}")
        log_line(log, f"building image {name} ({digest}) with {builder!r}")
        started = time.monotonic()
        try:
            workdir = tmp / "work"
            workdir.mkdir()
            rootfs = tmp / ROOTFS_NAME
            try:
                extras = builder.build(workdir, rootfs, log)
            except Exception as exc:
                log_line(log, "build failed:\n" + traceback.format_exc())
                detail = str(exc) if isinstance(exc, StokerError) else repr(exc)
                raise ProvisionError(
                    f"building image {name!r} failed: {detail}\n  full log: {log}",
                    hint=getattr(exc, "hint", None),
                ) from exc
            remove_tree(workdir, log=log)
            if not rootfs.is_file():
                raise ProvisionError(
                    f"building image {name!r} produced no root filesystem\n  full log: {log}"
                )
            if not isinstance(extras.get("python"), str):
                raise ProvisionError(f"image builder for {name!r} did not report python's path")
            fstype = extras.get("fstype", "erofs")
            if fstype not in FORMATS:
                raise ProvisionError(f"image builder for {name!r} reported fstype {fstype!r}")
            published = tmp / rootfs_filename(fstype)
            rootfs.rename(published)
            rootfs = published
            manifest: dict[str, object] = {
                "fstype": "erofs",
                **extras,
                "name": name,
                "digest": digest,
                "rootfs_size": rootfs.stat().st_size,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "build_seconds": round(time.monotonic() - started, 3),
            }
            rootfs.chmod(0o444)
            _fsync_path(rootfs)
            manifest_path = tmp / MANIFEST_NAME
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            manifest_path.chmod(0o444)
            _fsync_path(manifest_path)
            _fsync_path(tmp, directory=True)
            self._publish(tmp, self.root / digest)
        except BaseException as exc:
            if not isinstance(exc, ProvisionError):
                log_line(log, f"build aborted: {exc!r}")
            _remove_quietly(tmp, log)
            raise
        image = self._load(digest, name)
        if image is None:
            raise ProvisionError(f"image {name!r} vanished right after publishing (see {log})")
        size_mb = image.rootfs.stat().st_size / 1e6
        log_line(log, f"published {image.rootfs} ({size_mb:.1f} MB)")
        say(f"built image {name} ({digest[:12]}) in {time.monotonic() - started:.0f}s")
        return image

    def _publish(self, tmp: Path, final: Path) -> None:
        try:
            tmp.rename(final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # An incomplete entry (no manifest) is in the way; we hold the lock,
            # so move it aside and retry once.
            aside = self.root / ".tmp" / f"{final.name}-broken-{secrets.token_hex(4)}"
            final.rename(aside)
            remove_tree(aside)
            tmp.rename(final)
        _fsync_path(final.parent, directory=True)
