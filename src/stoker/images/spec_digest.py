"""Digests of image specs: what identifies the image a spec builds.

:func:`spec_digest` hashes :func:`digest_document` (the normalised spec), the
builder version and the digests of the inputs the spec only points at
(:func:`required_inputs`, computed by :func:`collect_input_digests`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.errors import UsageError
from stoker.images.base import canonical_digest
from stoker.images.spec_fields import KERNELS, _is_local_flake

if TYPE_CHECKING:
    # Only for annotations: stoker.images.spec imports this module.
    from stoker.images.spec import ImageSpec

#: Bump when the digest document changes shape (every image is rebuilt then).
SPEC_FORMAT_VERSION = 1


def required_inputs(spec: ImageSpec) -> frozenset[str]:
    """The keys :func:`spec_digest` needs in ``input_digests`` for ``spec``.

    ``kernel`` always; ``files[i]`` for every file (its content); ``base`` for
    OCI and Nix bases (the archive or layout, the flake and its output).
    """
    keys = {"kernel", *(f"files[{i}]" for i in range(len(spec.files)))}
    if spec.base_kind in ("oci", "nixos", "nix"):
        keys.add("base")
    return frozenset(keys)


def digest_document(spec: ImageSpec) -> dict[str, Any]:
    """The normalised spec that :func:`spec_digest` hashes.

    Defaults are filled in, packages and groups are sorted, and what does not
    change the image is left out: the name, host paths (their contents enter
    through the input digests) and artifact override variables.
    """
    data = spec.model_dump(mode="json", exclude={"name"})
    if data["network"] is None:
        # Images that say nothing about networking keep the digests they had.
        del data["network"]
    for key in ("job_pids_limit", "job_memory_limit"):
        if data["defaults"][key] is None:
            del data["defaults"][key]  # images that set no limits keep their digests
    for file in data["files"]:
        del file["src"]
    for artifact in data["artifacts"]:
        del artifact["override_env"]
        if artifact["version"] is None:
            # Specs that name no version keep the digests they had.
            del artifact["version"]
    if spec.kernel not in KERNELS:
        data["kernel"] = "path"
    if spec.base_kind == "oci":
        data["base"] = "oci:"
    elif spec.base_kind in ("nixos", "nix"):
        # A checkout's location is no part of the image: its content enters as the base digest.
        flake, _, attr = spec.base_ref.partition("#")
        if _is_local_flake(flake):
            data["base"] = f"{spec.base_kind}:#{attr}"
    return data


def spec_digest(spec: ImageSpec, *, input_digests: Mapping[str, str], builder_version: str) -> str:
    """Hex sha256 identifying the image ``spec`` builds.

    ``input_digests`` must have exactly the keys of :func:`required_inputs`
    (a missing one would let a changed file go unnoticed; an unknown one is a
    typo); :func:`collect_input_digests` computes them.  Raises ``ValueError``
    otherwise: that is a bug in the caller, not bad user input.
    """
    expected = required_inputs(spec)
    missing = sorted(expected - input_digests.keys())
    unknown = sorted(input_digests.keys() - expected)
    if missing or unknown:
        raise ValueError(
            f"input digests for image {spec.name!r}: missing {missing}, unexpected {unknown}"
        )
    for key, value in input_digests.items():
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"input digest {key!r} is not a digest: {value!r}")
    if not builder_version:
        raise ValueError("builder_version must not be empty")
    return canonical_digest(
        {
            "format": SPEC_FORMAT_VERSION,
            "builder_version": builder_version,
            "spec": digest_document(spec),
            "inputs": dict(input_digests),
        }
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's contents; raises :class:`UsageError` if it cannot be read."""
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def collect_input_digests(
    spec: ImageSpec, *, kernel: str, base: str | None = None
) -> dict[str, str]:
    """The ``input_digests`` of :func:`spec_digest`: hashes the files, adds the rest.

    ``kernel`` is the digest of the kernel the image is made for; ``base`` that
    of an OCI or NixOS base (required for those).
    """
    digests = {"kernel": kernel}
    for index, file in enumerate(spec.files):
        digests[f"files[{index}]"] = file_sha256(Path(file.src))
    if "base" in required_inputs(spec):
        if base is None:
            raise ValueError(f"image {spec.name!r} has a {spec.base_kind} base: pass its digest")
        digests["base"] = base
    return digests
