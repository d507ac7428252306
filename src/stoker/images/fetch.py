"""Remote artifacts of an image spec: downloaded once, accepted only by checksum.

Every artifact is pinned by SHA-256.  Its bytes come either from its ``url``
or, on hosts that cannot reach it, from a local file named by an environment
variable or ``--artifact NAME=PATH``; both go through the same check, so an
override changes where the bytes come from, never which bytes are accepted.

Accepted files are kept under ``<cache>/downloads/<sha256>`` (content
addressed, published with a rename), so a rebuild does not download again.
A download is streamed to a temporary file while being hashed; a mismatch
deletes it and raises before anything is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stoker.errors import ProvisionError, UsageError
from stoker.images.base import log_line
from stoker.images.spec import Artifact

#: Called with (artifact name, bytes so far, total bytes or None).
DownloadProgress = Callable[[str, int, int | None], None]

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 60.0
#: Refuse artifacts bigger than this (a hostile server could send forever).
MAX_ARTIFACT_BYTES = 4 << 30


@dataclass(frozen=True)
class FetchedArtifact:
    """An artifact whose bytes matched its pinned SHA-256."""

    artifact: Artifact
    #: The verified file (in the download cache).
    path: Path
    #: Where the bytes came from: the URL, ``"cache"`` or ``"override:PATH"``.
    source: str


def parse_overrides(items: list[str]) -> dict[str, Path]:
    """``--artifact NAME=PATH`` options as a mapping; raises :class:`UsageError`."""
    result: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--artifact {item!r}: expected NAME=PATH")
        if name in result:
            raise UsageError(f"--artifact {name} given twice")
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"--artifact {item!r}: {file} is not a file")
        result[name] = file.absolute()
    return result


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def _copy_hashing(
    src: _Readable, dest: Path, *, name: str, total: int | None, progress: DownloadProgress | None
) -> str:
    digest = hashlib.sha256()
    done = 0
    with dest.open("wb") as out:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            done += len(chunk)
            if done > MAX_ARTIFACT_BYTES:
                raise ProvisionError(
                    f"artifact {name!r} is larger than {MAX_ARTIFACT_BYTES >> 30} GiB; refusing it"
                )
            digest.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(name, done, total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def fetch_artifact(
    artifact: Artifact,
    *,
    cache: Path,
    log: Path,
    override: Path | None = None,
    environ: Mapping[str, str] | None = None,
    progress: DownloadProgress | None = None,
) -> FetchedArtifact:
    """The verified local file for ``artifact``, downloading it if needed.

    ``override`` (``--artifact``) wins over the artifact's environment
    variable, which wins over the URL.  Raises :class:`UsageError` for a
    placeholder checksum or a missing override file, and
    :class:`ProvisionError` when the download fails or the bytes do not
    match the pinned SHA-256 (nothing is kept then).
    """
    if artifact.sha256 is None:
        raise UsageError(
            f"artifact {artifact.name!r} pins no sha256 and none was resolved",
            hint=f"pin a release: stoker image build --pin {artifact.name}=VERSION:SHA256",
        )
    if artifact.is_placeholder:
        raise UsageError(
            f"artifact {artifact.name!r} has a placeholder sha256 (all zeros)",
            hint="put the real SHA-256 of the file into the spec",
        )
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / artifact.sha256
    local = override or artifact.local_override(os.environ if environ is None else environ)
    if local is None and final.is_file():
        log_line(log, f"artifact {artifact.name}: {final} (cached, sha256 {artifact.sha256})")
        return FetchedArtifact(artifact, final, "cache")

    tmp = downloads / f".{artifact.sha256}.{secrets.token_hex(4)}.part"
    try:
        if local is not None:
            source = f"override:{local}"
            log_line(log, f"artifact {artifact.name}: reading local copy {local}")
            try:
                with local.open("rb") as fh:
                    total = local.stat().st_size
                    got = _copy_hashing(fh, tmp, name=artifact.name, total=total, progress=progress)
            except OSError as exc:
                raise UsageError(
                    f"artifact {artifact.name!r}: cannot read {local}: {exc}"
                ) from None
        else:
            source = artifact.url
            log_line(log, f"artifact {artifact.name}: downloading {artifact.url}")
            got = _download(artifact, tmp, progress)
        if got != artifact.sha256:
            where = f"the local file {local}" if local is not None else artifact.url
            raise ProvisionError(
                f"artifact {artifact.name!r}: SHA-256 mismatch for {where}: "
                f"expected {artifact.sha256}, got {got}",
                hint="the file is not the one the spec pins; nothing was built or published",
            )
        tmp.chmod(0o444)
        tmp.replace(final)
        log_line(log, f"artifact {artifact.name}: verified sha256 {got}")
        return FetchedArtifact(artifact, final, source)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _download(artifact: Artifact, dest: Path, progress: DownloadProgress | None) -> str:
    request = urllib.request.Request(artifact.url, headers={"User-Agent": "stoker"})  # noqa: S310 - http(s) only, checked by the spec
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:  # noqa: S310
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            return _copy_hashing(response, dest, name=artifact.name, total=total, progress=progress)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProvisionError(
            f"artifact {artifact.name!r}: cannot download {artifact.url}: {reason}",
            hint=f"download it elsewhere and pass --artifact {artifact.name}=PATH "
            f"or set {artifact.env_var}=PATH (its SHA-256 is still checked)",
        ) from None
