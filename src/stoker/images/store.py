"""The image store: content-addressed, built once, published atomically.

Layout under ``dirs.images``::

    <digest>/rootfs.erofs        the filesystem (read-only once published)
    <digest>/manifest.json       written last; its presence marks the entry complete
    names/<name>.json            {"name": ..., "digest": ...}: the newest image of a name
    .locks/<digest>.lock         fcntl lock held while <digest> is being built
    .tmp/<digest>-<random>/      a build in progress (or the remains of a killed one)

A build happens in ``.tmp`` and is moved into place with one ``rename``, so
readers see either nothing or a complete image.  Concurrent :meth:`ImageStore.ensure`
calls for the same digest (threads or processes) serialise on the lock; the
loser finds the image published and returns it.  Lock files are never deleted
(deleting them would race with other lockers).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from stoker.errors import ProvisionError, StokerError, UsageError
from stoker.images.base import Image, ImageBuilder, log_line, remove_tree
from stoker.images.debian import DebianBuilder, DebianSpec
from stoker.paths import Dirs

ROOTFS_NAME = "rootfs.erofs"
MANIFEST_NAME = "manifest.json"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[0-9a-f]{16,128}")

Progress = Callable[[str], None]


def default_builder() -> ImageBuilder:
    """The builder of the embedded default image, ``"default"``."""
    return DebianBuilder(DebianSpec(), "default")


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
        rootfs = entry / ROOTFS_NAME
        fstype = manifest.get("fstype")
        python = manifest.get("python")
        if not (isinstance(fstype, str) and isinstance(python, str) and rootfs.is_file()):
            return None
        manifest_name = manifest.get("name")
        if name is None:
            name = manifest_name if isinstance(manifest_name, str) else digest[:12]
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
        digest = self._pointer(name)
        if digest is not None:
            image = self._load(digest, name)
            if image is not None:
                return image
        # No usable pointer (e.g. killed between publishing and pointing):
        # fall back to the newest manifest carrying that name.
        candidates = [
            image
            for digest in self._digests()
            if (image := self._load(digest)) is not None and image.manifest.get("name") == name
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda image: str(image.manifest.get("built_at", "")))

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
        image = self._load(digest, name)
        if image is not None:
            with contextlib.suppress(OSError):  # a read-only cache still serves images
                self._point(name, digest)
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

    def _clean_tmp(self, *, own_digest: str, log: Path) -> None:
        """Remove leftovers of killed builds whose lock nobody holds."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for entry in sorted(tmp_root.iterdir()):
            digest = entry.name.split("-", 1)[0]
            if digest == own_digest or not _DIGEST_RE.fullmatch(digest):
                # ours (we hold that lock) or not a build directory at all
                log_line(log, f"removing stale {entry}")
                _remove_quietly(entry, log)
                continue
            with _try_lock(self.root / ".locks" / f"{digest}.lock") as got:
                if got:
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
