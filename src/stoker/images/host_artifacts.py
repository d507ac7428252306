"""Artifacts the spec does not pin: resolved before the image's digest is computed.

An artifact without a ``sha256`` (``gitlab-runner`` in the shipped spec) gets
its bytes, in this order, from:

1. a local file the user named (``--artifact NAME=PATH`` or the artifact's
   environment variable): its SHA-256 is computed and recorded;
2. ``host_binary`` found on this host's ``PATH`` (for the GitLab helper: the
   same version as the host's gitlab-runner, the manager); likewise recorded;
3. nothing: an ``optional`` artifact is left out, with a note saying what the
   image lacks and how to pin a release (``--pin NAME=VERSION:SHA256``, which
   sets ``sha256`` before this runs, so it never gets here).

The resolved checksum is part of the spec that is hashed, so a different host
binary means a different image, never a stale cache hit.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stoker.errors import UsageError
from stoker.images.spec import Artifact, ImageSpec


@dataclass(frozen=True)
class Resolution:
    """The spec with every artifact pinned, and what resolving it decided."""

    spec: ImageSpec
    #: Artifact name -> where its bytes come from (``host:PATH``, ``override:PATH``).
    sources: dict[str, Path] = field(default_factory=dict)
    #: Lines for the build's progress output (missing optional artifacts).
    notes: tuple[str, ...] = ()


def file_digest(path: Path) -> str:
    """The SHA-256 of ``path`` (:class:`UsageError` when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def resolve_artifacts(
    spec: ImageSpec,
    *,
    overrides: Mapping[str, Path],
    environ: Mapping[str, str],
    which: Callable[[str], str | None] = shutil.which,
) -> Resolution:
    """Pin every artifact of ``spec`` that has no ``sha256`` (see the module docstring)."""
    kept: list[Artifact] = []
    sources: dict[str, Path] = {}
    notes: list[str] = []
    for artifact in spec.artifacts:
        if artifact.sha256 is not None:
            kept.append(artifact)
            continue
        local = overrides.get(artifact.name) or artifact.local_override(environ)
        if local is None and artifact.host_binary is not None:
            found = which(artifact.host_binary)
            local = Path(found).resolve() if found else None
        if local is not None:
            sha = file_digest(local)
            kept.append(artifact.model_copy(update={"sha256": sha}))
            sources[artifact.name] = local
            continue
        if not artifact.optional:
            raise UsageError(
                f"artifact {artifact.name!r} of image {spec.name!r} pins no release and "
                + (
                    f"no {artifact.host_binary} is on this host's PATH"
                    if artifact.host_binary
                    else "no local file was given"
                ),
                hint=f"stoker image build {spec.name} --pin {artifact.name}=VERSION:SHA256",
            )
        where = (
            f"no {artifact.host_binary} on this host's PATH and " if artifact.host_binary else ""
        )
        notes.append(
            f"image {spec.name}: built without {artifact.name} ({where}no release pinned: "
            f"--pin {artifact.name}=VERSION:SHA256)"
        )
    if len(kept) == len(spec.artifacts) and not sources:
        return Resolution(spec)
    return Resolution(spec.model_copy(update={"artifacts": tuple(kept)}), sources, tuple(notes))
