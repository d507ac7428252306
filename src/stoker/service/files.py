"""A job's files on the host: its source (uploaded or fetched with git) and its artifacts.

Everything here works on the storage directory shared by all hosts
(``storage_dir/jobs/ID/{source,artifacts}``) and is blocking unless ``async``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from stoker.archive import ExtractLimits, ExtractReport, safe_extract
from stoker.errors import (
    InfrastructureError,
    OutputLimitExceeded,
    StokerError,
    UnsafeArchive,
    UsageError,
)
from stoker.procs import DIE_WITH_PARENT
from stoker.service.config import ServiceConfig, _redact_url
from stoker.service.jobs import git_ref_of
from stoker.service.models import Job

#: Upload and job directories this old with no job row are leftovers of a crash.
ORPHAN_AGE = 3600.0


class JobInputError(StokerError):
    """The job's own input is unusable (a git ref that does not exist): the job fails."""


@dataclass(frozen=True)
class JobFiles:
    """A job's directory in the storage directory: its source and its artifacts."""

    root: Path

    @classmethod
    def of(cls, jobs_dir: Path, job_id: str) -> JobFiles:
        return cls(jobs_dir / job_id)

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def reset_artifacts(self) -> None:
        """Start an attempt with an empty artifact directory."""
        shutil.rmtree(self.artifacts, ignore_errors=True)
        self.artifacts.mkdir(parents=True)

    def ready_source(self, job: Job, empty: Path) -> Path | None:
        """The host directory copied to the guest, if it needs no fetching (None: git).

        ``empty`` stands for a job without a source.
        """
        if job.source_kind == "upload":
            if not self.source.is_dir():
                # Not the job's fault: this host does not see the shared storage directory.
                raise InfrastructureError(
                    f"the uploaded source of job {job.id} is missing from {self.source}",
                    hint="every host needs the same storage_dir",
                )
            return self.source
        if job.source_kind == "git":
            return self.source if self.source.is_dir() else None
        return empty


def unpack_upload(archive: Path | IO[bytes], dest: Path, *, max_bytes: int) -> ExtractReport:
    """Extract an uploaded tar (optionally gzip-compressed) into the new directory ``dest``.

    ``archive`` is a file or a seekable stream.  The tar is checked by
    :func:`stoker.archive.safe_extract` (nothing may land outside ``dest``; at
    most ``max_bytes`` of file content).  Raises :class:`UsageError` for an
    archive that is not acceptable, and leaves no ``dest`` behind then.
    """
    dest.mkdir(parents=True)
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(archive.open("rb")) if isinstance(archive, Path) else archive
            raw.seek(0)
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw)) if compressed else raw
            return safe_extract(cast(Any, stream), dest, ExtractLimits(max_bytes=max_bytes))
    except OutputLimitExceeded as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UsageError(f"the source archive unpacks to too much: {exc}") from None
    except (UnsafeArchive, gzip.BadGzipFile, EOFError, OSError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UsageError(f"the source archive is not acceptable: {exc}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _tree_size(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.lstat().st_size
    return total


async def fetch_git(
    url: str,
    ref: str,
    dest: Path,
    *,
    timeout: float,
    max_bytes: int,
    protocols: Iterable[str],
) -> None:
    """Shallow-fetch ``ref`` of ``url`` and check it out into ``dest`` (host side).

    git runs without the user's or the system's configuration, without
    prompts, and only over ``protocols``.  Raises :class:`JobInputError` when
    the repository or ref cannot be fetched or the checkout exceeds
    ``max_bytes``.
    """
    tmp = dest.with_name(f"{dest.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ALLOW_PROTOCOL": ":".join(protocols),
        "GIT_LFS_SKIP_SMUDGE": "1",
    }
    file_allowed = "always" if "file" in protocols else "never"
    steps = [
        ("init", ["git", "init", "-q", str(tmp)]),
        (
            "fetch",
            [
                "git",
                "-C",
                str(tmp),
                "-c",
                f"protocol.file.allow={file_allowed}",
                "fetch",
                "-q",
                "--depth",
                "1",
                "--no-tags",
                "--",
                url,
                ref,
            ],
        ),
        ("checkout", ["git", "-C", str(tmp), "checkout", "-q", "--detach", "FETCH_HEAD"]),
    ]
    try:
        async with asyncio.timeout(timeout):
            for what, argv in steps:
                await _run_git(what, argv, env, url)
        size = await asyncio.to_thread(_tree_size, tmp)
        if size > max_bytes:
            raise JobInputError(
                f"the git checkout holds {size} bytes, more than the limit of {max_bytes}"
            )
        tmp.rename(dest)
    except TimeoutError:
        raise JobInputError(f"fetching {_redact_url(url)} took longer than {timeout:g}s") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _run_git(what: str, argv: list[str], env: dict[str, str], url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=DIE_WITH_PARENT,
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip().splitlines()
        raise JobInputError(f"git {what} of {_redact_url(url)} failed: {(text or ['?'])[-1][:500]}")


@dataclass(frozen=True)
class ArtifactFile:
    """An artifact as stored on the host."""

    name: str
    size: int
    sha256: str
    path: str


def hash_artifacts(root: Path, names: Iterable[str]) -> list[ArtifactFile]:
    found = []
    seen: set[str] = set()
    for name in names:
        # Overlapping patterns ("out/**" matches a directory and its files) make
        # the guest's tar carry a file twice: one artifact per path.
        name = os.path.normpath(name)
        if name in seen:
            continue
        seen.add(name)
        path = root / name
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_file() or path.is_symlink():
            continue
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        found.append(ArtifactFile(name, st.st_size, digest.hexdigest(), str(path)))
    return found


def sweep_orphan_files(
    jobs_dir: Path, existing: Callable[[list[str]], set[str]], *, age: float = ORPHAN_AGE
) -> None:
    """Remove uploads and job directories a crash left without a job row.

    ``existing`` returns which of the given job ids have a row; only entries
    older than ``age`` seconds are removed (a job being submitted has none yet).
    """
    if not jobs_dir.is_dir():
        return
    cutoff = time.time() - age
    incoming = jobs_dir / ".incoming"
    candidates = [p for p in incoming.iterdir()] if incoming.is_dir() else []
    directories = [p for p in jobs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    known = existing([p.name for p in directories]) if directories else set()
    for path in candidates + [p for p in directories if p.name not in known]:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


async def fetch_source(job: Job, files: JobFiles, config: ServiceConfig) -> Path:
    """Fetch a git job's source into ``files.source`` (see :func:`fetch_git`); return it."""
    git = git_ref_of(job)
    await fetch_git(
        git.url,
        git.ref,
        files.source,
        timeout=config.git.timeout,
        max_bytes=config.limits.max_source_bytes,
        protocols=config.git.allow_protocols,
    )
    return files.source
