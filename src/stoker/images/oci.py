"""Container images on disk -> a root filesystem directory (the core of the ``oci`` builder).

Two on-disk formats are read, each either as a directory or as a tar file:

* an **OCI image layout** (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``),
  as written by ``skopeo copy ... oci:DIR``, ``buildah push ... oci-archive:``
  or ``docker buildx build --output type=oci``;
* a **docker save** archive (``manifest.json`` naming a config file and
  layer tars).  Docker 25+ archives are OCI layouts as well and are read as
  such.

:func:`open_image` picks one image (by platform, and by ``ref`` when a
layout holds several), checks every blob it uses against its digest and size,
and returns an :class:`OciImage`.  :func:`apply_layers` then applies the
layers in order into an empty directory with OCI whiteout semantics.

Trust: the files on disk are the user's, but the image content came from a
registry and is treated as hostile.  JSON documents are size-capped and
type-checked, digests are parsed strictly before they become paths, and
layers are applied by :class:`_LayerApplier`, a subclass of the extractor of
:mod:`stoker.archive`: it inherits that module's bounded tar header parsing
(:class:`~stoker.archive._GuardedTarInfo`), its name checks (absolute names,
``..``, NUL, length, depth) and its directory walk (every component opened
with ``O_NOFOLLOW`` from the root's fd, so nothing is ever created through a
symlink), and replaces what differs for a root filesystem:

* symlinks may point anywhere (``/bin -> usr/bin``); their targets are stored,
  never followed;
* owners (when running as root), setuid/setgid/sticky bits and mtimes are kept;
* an entry replaces whatever is at its path (OCI "changeset over existing
  files"), except that a directory over a directory only updates attributes;
* ``.wh.NAME`` removes NAME and ``.wh..wh..opq`` empties its directory, of
  lower layers only: entries of the same layer survive, whatever the order;
  other ``.wh..wh.*`` names (AUFS metadata) are skipped, and a ``.wh.`` name
  used as a directory is refused;
* hardlinks may point to files of lower layers, never outside the root;
* device nodes and FIFOs are skipped and reported (``/dev`` is devtmpfs in the
  guest); extended attributes are not applied (reported); sparse files and
  global PAX headers are refused, as by :mod:`stoker.archive`.

The uncompressed bytes of each layer are hashed while applying and checked
against the config's ``rootfs.diff_ids``, so the config digest (the image
ID, :attr:`OciImage.digest`) determines the resulting tree.
"""

from __future__ import annotations

import abc
import contextlib
import gzip
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal, Protocol, cast

from stoker.archive import (
    _CHUNK,
    _DIR_FLAGS,
    _FILE_FLAGS,
    _TAR_ERRORS,
    ExtractLimits,
    _Extractor,
    _forget_members,
    _GuardedTarInfo,
    _lstat_at,
    _mtime_ns,
    _open_guarded,
    _refuse,
    _show,
)
from stoker.errors import ProvisionError, StokerError, UnsafeArchive, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_APPLY_LIMITS",
    "ApplyReport",
    "ImageConfig",
    "Layer",
    "OciImage",
    "Platform",
    "apply_layers",
    "oci_builder_digest_inputs",
    "open_image",
    "write_layout",
]

# --------------------------------------------------------------------------- media types

MEDIA_OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"

_INDEX_TYPES: Final = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
_MANIFEST_TYPES: Final = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
_CONFIG_TYPES: Final = frozenset({MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG})

Compression = Literal["none", "gzip", "zstd"]

#: Layer media types this module applies, and how their blobs are compressed.
LAYER_MEDIA_TYPES: Final[Mapping[str, Compression]] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    # Deprecated, but existing images must still be readable (the blob has to be local).
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

# --------------------------------------------------------------------------- limits

#: Largest JSON document (index, manifest, config, manifest.json) read.
_MAX_JSON: Final = 16 << 20
#: Most layers in one image (Docker stops at 127 with overlayfs).
_MAX_LAYERS: Final = 1000
#: How deep image indexes may nest.
_MAX_INDEX_DEPTH: Final = 4
#: Most members scanned in a tar file holding an image (not a layer).
_MAX_OUTER_MEMBERS: Final = 1_000_000
#: Symlinks followed inside a docker-save tar (it links repeated layers).
_MAX_LINK_HOPS: Final = 16
#: Bytes accepted after a layer's end-of-archive marker (record padding).
_MAX_TRAILER: Final = 16 << 20

#: Caps for :func:`apply_layers`: total regular-file payload, members over all
#: layers, name and link-target length, path depth.
DEFAULT_APPLY_LIMITS: Final = ExtractLimits(
    max_bytes=64 << 30, max_members=5_000_000, max_name_len=4096, max_depth=256
)

#: The zstd program, used for ``+zstd`` layers (Python 3.11 has no zstd module).
_ZSTD: str = "zstd"

_DIGEST_RE: Final = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_OPAQUE: Final = ".wh..wh..opq"
_WHITEOUT: Final = ".wh."
_AUFS_META: Final = ".wh..wh."
_REF_ANNOTATIONS: Final = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
_ARCH_ALIASES: Final = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, e.g. ``linux/amd64`` or ``linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``; raises :class:`UsageError` when malformed."""
        parts = text.strip().lower().split("/")
        if not 2 <= len(parts) <= 3 or not all(
            re.fullmatch(r"[a-z0-9][a-z0-9._-]*", p) for p in parts
        ):
            raise UsageError(
                f"invalid platform {text!r}", hint="use os/architecture[/variant], e.g. linux/amd64"
            )
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    def matches(self, os_name: str, architecture: str, variant: str | None) -> bool:
        """Whether an image for ``os_name/architecture[/variant]`` runs here.

        A platform without variant accepts every variant; ``arm64`` images
        without one are ``v8``.
        """
        if os_name != self.os or architecture != self.architecture:
            return False
        if self.variant is None:
            return True
        if variant is None and architecture == "arm64":
            variant = "v8"
        return variant == self.variant

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True)
class ImageConfig:
    """The runtime defaults of an image (the ``config`` object of its config blob)."""

    #: ``KEY=value`` strings, in order.
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    #: ``user``, ``user:group``, ``uid`` or ``uid:gid``; empty means root.
    user: str = ""
    #: Absolute working directory; empty means ``/``.
    workdir: str = ""
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        """What the image runs by default: entrypoint followed by cmd."""
        return self.entrypoint + self.cmd

    def environment(self) -> dict[str, str]:
        """:attr:`env` as a mapping (later entries win, as in Docker)."""
        result: dict[str, str] = {}
        for entry in self.env:
            key, _, value = entry.partition("=")
            result[key] = value
        return result


@dataclass(frozen=True)
class Layer:
    """One layer blob, as the image describes it."""

    #: Digest of the blob as stored (compressed), e.g. ``"sha256:..."``.
    digest: str
    #: Digest of the uncompressed tar, from the config's ``rootfs.diff_ids``.
    diff_id: str
    #: Size of the blob in bytes.
    size: int
    media_type: str
    compression: Compression
    #: Where the blob is inside the image's directory or tar file.
    location: str


@dataclass(frozen=True)
class OciImage:
    """One image of a layout or archive, its blobs checked against their digests."""

    #: The directory or tar file it was read from.
    source: Path
    format: Literal["oci", "docker"]
    #: The config's digest (Docker's image ID).  It covers ``rootfs.diff_ids``,
    #: which :func:`apply_layers` verifies, so it determines the root filesystem.
    digest: str
    #: Digest of the manifest; ``None`` for a docker-save manifest.json entry.
    manifest_digest: str | None
    #: The image's platform as its config states it, e.g. ``"linux/amd64"``.
    platform: str
    config: ImageConfig
    #: Bottom layer first.
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class ApplyReport:
    """What :func:`apply_layers` did."""

    #: Layers applied.
    layers: int
    #: Entries created or updated (files, directories, symlinks, hardlinks).
    entries: int
    #: Regular-file payload written, in bytes.
    bytes: int
    #: Whiteout entries processed (``.wh.NAME`` and opaque markers).
    whiteouts: int
    #: Entries left out, as ``"<layer digest>: <name> (<why>)"``: device
    #: nodes, FIFOs, AUFS metadata.
    skipped: tuple[str, ...]
    #: False when not running as root: everything then belongs to the caller.
    ownership_kept: bool
    #: Anything else the caller should know (xattrs dropped, ownership lost).
    notes: tuple[str, ...]


# --------------------------------------------------------------------------- reading


def open_image(
    path: Path,
    *,
    platform: str = "linux/amd64",
    ref: str | None = None,
    verify_layers: bool = True,
) -> OciImage:
    """Read the image for ``platform`` from an OCI layout or docker-save archive.

    ``path`` is a directory or a tar file (plain, gzip, bzip2 or xz) holding
    either format.  Image indexes are followed to the manifest matching
    ``platform``; ``ref`` picks an image by its reference name
    (``org.opencontainers.image.ref.name``/``io.containerd.image.name``
    annotation, or a docker-save ``RepoTags`` entry) when the file holds
    several.

    Every blob used is read once and checked against its digest and size
    (layers included, so this costs one read of the image).  With
    ``verify_layers=False`` an OCI layout's layer blobs are not read here:
    :func:`apply_layers` checks each against its digest and diff_id while
    applying it anyway, and the image's identity (the config digest, which
    covers the diff_ids) needs only the small documents.  docker-save archives
    name layers by path, so their layers are always hashed.  Raises
    :class:`UsageError` when ``path`` is missing, is neither format, or the
    ``platform``/``ref`` asked for is malformed or absent, and
    :class:`ProvisionError` for missing or mismatching blobs, malformed or
    unsupported documents, unknown layer media types, or a zstd layer without
    the ``zstd`` program.
    """
    want = Platform.parse(platform)
    with _open_source(path) as source:
        if source.exists("oci-layout") and source.exists("index.json"):
            image = _read_oci_layout(source, want, ref, verify_layers=verify_layers)
        elif source.exists("manifest.json"):
            image = _read_docker_save(source, want, ref)
        else:
            raise UsageError(
                f"{path}: neither an OCI image layout (index.json, oci-layout) "
                "nor a docker save archive (manifest.json)"
            )
    log.debug("opened %s: %s, %d layers", path, image.digest, len(image.layers))
    return image


def oci_builder_digest_inputs(image: OciImage) -> dict[str, object]:
    """What identifies the tree :func:`apply_layers` makes of ``image``, for the store's digest.

    The config digest covers the layers' uncompressed digests (checked while
    applying) and the runtime config; the platform is implied by it but kept
    for readability of manifests.  The source path and the compression of
    the layers do not matter.
    """
    return {"image_digest": image.digest, "platform": image.platform}


def _read_oci_layout(
    source: _Source, want: Platform, ref: str | None, *, verify_layers: bool = True
) -> OciImage:
    layout = _json_object(source.read_small("oci-layout", "oci-layout"), "oci-layout")
    version = layout.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ProvisionError(f"{source.where}: unsupported imageLayoutVersion {version!r}")
    index = _json_object(source.read_small("index.json", "index.json"), "index.json")
    descriptors = _descriptor_list(index, "manifests", "index.json")
    if ref is not None:
        descriptors = _select_ref(descriptors, ref, source.where)
    manifest_desc = _choose_manifest(source, descriptors, want)
    manifest = _json_object(_read_blob(source, manifest_desc, "manifest"), "manifest")
    if manifest.get("schemaVersion") != 2:
        raise ProvisionError(f"manifest {manifest_desc.digest} is not schemaVersion 2")
    declared = manifest.get("mediaType")
    if declared is not None and declared != manifest_desc.media_type:
        raise ProvisionError(
            f"manifest {manifest_desc.digest} says it is {declared!r}, "
            f"its descriptor says {manifest_desc.media_type!r}"
        )
    config_desc = _descriptor(manifest.get("config"), "manifest config")
    if config_desc.media_type not in _CONFIG_TYPES:
        raise ProvisionError(
            f"manifest {manifest_desc.digest} is not a container image "
            f"(config media type {config_desc.media_type!r})"
        )
    config_doc = _json_object(_read_blob(source, config_desc, "config"), "config")
    config, diff_ids = _parse_config(config_doc, config_desc.digest)
    _check_platform(config, want, source.where)
    layer_descs = _descriptor_list(manifest, "layers", f"manifest {manifest_desc.digest}")
    if len(layer_descs) != len(diff_ids):
        raise ProvisionError(
            f"manifest {manifest_desc.digest} lists {len(layer_descs)} layers, "
            f"its config {len(diff_ids)} diff_ids"
        )
    layers = []
    for number, (desc, diff_id) in enumerate(zip(layer_descs, diff_ids, strict=True), 1):
        what = f"layer {number} ({desc.digest})"
        compression = LAYER_MEDIA_TYPES.get(desc.media_type)
        if compression is None:
            raise ProvisionError(
                f"{what} has the unsupported media type {desc.media_type!r}",
                hint="supported: " + ", ".join(sorted(LAYER_MEDIA_TYPES)),
            )
        if compression == "none" and desc.digest != diff_id:
            raise ProvisionError(
                f"{what} is an uncompressed tar, but its config says its digest is {diff_id}"
            )
        if compression == "zstd":
            _require_zstd(what)
        if verify_layers:
            _verify_blob(source, desc, what)
        elif not source.exists(desc.location):
            raise source._missing(desc.location, what)
        layers.append(
            Layer(desc.digest, diff_id, desc.size, desc.media_type, compression, desc.location)
        )
    return OciImage(
        source=source.path,
        format="oci",
        digest=config_desc.digest,
        manifest_digest=manifest_desc.digest,
        platform=_platform_text(config),
        config=config,
        layers=tuple(layers),
    )


def _read_docker_save(source: _Source, want: Platform, ref: str | None) -> OciImage:
    doc = _json(source.read_small("manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise ProvisionError(f"{source.where}: manifest.json is not a list of images")
    entries: list[dict[str, object]] = doc
    if ref is not None:
        entries = [e for e in entries if ref in _str_list(e.get("RepoTags"), "RepoTags")]
        if not entries:
            tags = sorted({t for e in doc for t in _str_list(e.get("RepoTags"), "RepoTags")})
            raise UsageError(
                f"{source.where}: no image tagged {ref!r}",
                hint=f"tags present: {', '.join(tags) or '(none)'}",
            )
    if len(entries) > 1:
        tags = sorted({t for e in entries for t in _str_list(e.get("RepoTags"), "RepoTags")})
        raise UsageError(
            f"{source.where} holds {len(entries)} images; choose one by its tag",
            hint=f"tags present: {', '.join(tags) or '(none)'}",
        )
    entry = entries[0]
    config_name = entry.get("Config")
    if not isinstance(config_name, str):
        raise ProvisionError(f"{source.where}: manifest.json entry without a Config file name")
    config_bytes = source.read_small(config_name, "config")
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    _check_named_digest(config_name, config_digest, "config")
    config, diff_ids = _parse_config(_json_object(config_bytes, "config"), config_digest)
    _check_platform(config, want, source.where)
    names = _str_list(entry.get("Layers"), "Layers")
    if len(names) != len(diff_ids):
        raise ProvisionError(
            f"{source.where}: manifest.json lists {len(names)} layers, "
            f"the config {len(diff_ids)} diff_ids"
        )
    layers = []
    for number, (name, diff_id) in enumerate(zip(names, diff_ids, strict=True), 1):
        what = f"layer {number} ({name})"
        digest, size, compression = _hash_blob(source, name, what)
        _check_named_digest(name, digest, what)
        if compression == "zstd":
            _require_zstd(what)
        if compression == "none" and digest != diff_id:
            raise ProvisionError(
                f"{what} does not match its config: its digest is {digest}, "
                f"the config says {diff_id}"
            )
        media_type = {
            "none": "application/vnd.docker.image.rootfs.diff.tar",
            "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "zstd": "application/vnd.docker.image.rootfs.diff.tar.zstd",
        }[compression]
        layers.append(Layer(digest, diff_id, size, media_type, compression, name))
    return OciImage(
        source=source.path,
        format="docker",
        digest=config_digest,
        manifest_digest=None,
        platform=_platform_text(config),
        config=config,
        layers=tuple(layers),
    )


def _require_zstd(what: str) -> None:
    if shutil.which(_ZSTD) is None:
        raise ProvisionError(
            f"{what} is zstd-compressed and {_ZSTD} is not installed",
            hint="install zstd (apt-get install zstd)",
        )


# -- descriptors and documents


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    platform: tuple[str, str, str | None] | None
    annotations: Mapping[str, str]

    @property
    def location(self) -> str:
        algorithm, hexdigest = self.digest.split(":", 1)
        return f"blobs/{algorithm}/{hexdigest}"


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProvisionError(f"{what} is not valid JSON: {exc}") from None


def _json_object(data: bytes, what: str) -> dict[str, object]:
    doc = _json(data, what)
    if not isinstance(doc, dict):
        raise ProvisionError(f"{what} is not a JSON object")
    return doc


def _str_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProvisionError(f"{what} must be a list of strings")
    return list(value)


def _check_digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise ProvisionError(
            f"{what}: invalid or unsupported digest {_show(str(value))}",
            hint="digests must be sha256:<64 hex> or sha512:<128 hex>",
        )
    return value


def _check_named_digest(name: str, digest: str, what: str) -> None:
    """A docker-save file named after a digest (``blobs/sha256/<hex>``, ``<hex>.json``)."""
    base = posixpath.basename(name)
    in_blobs = posixpath.basename(posixpath.dirname(name)) == "sha256"
    match = re.fullmatch(r"([0-9a-f]{64})(\.json)?", base)
    if match is None or in_blobs == bool(match[2]):
        return  # not named after its digest (docker's <id>/layer.tar): nothing to compare
    if f"sha256:{match[1]}" != digest:
        raise ProvisionError(f"{what} {name} does not match its name: its digest is {digest}")


def _descriptor(value: object, what: str) -> _Descriptor:
    if not isinstance(value, dict):
        raise ProvisionError(f"{what} is not a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str):
        raise ProvisionError(f"{what} has no mediaType")
    digest = _check_digest(value.get("digest"), what)
    size = value.get("size")
    if type(size) is not int or size < 0:
        raise ProvisionError(f"{what} {digest} has an invalid size {size!r}")
    plat = value.get("platform")
    platform = None
    if isinstance(plat, dict):
        os_name, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
        if isinstance(os_name, str) and isinstance(arch, str):
            platform = (os_name, arch, variant if isinstance(variant, str) else None)
    raw_annotations = value.get("annotations")
    annotations = (
        {k: v for k, v in raw_annotations.items() if isinstance(v, str)}
        if isinstance(raw_annotations, dict)
        else {}
    )
    return _Descriptor(media_type, digest, size, platform, annotations)


def _descriptor_list(doc: Mapping[str, object], key: str, what: str) -> list[_Descriptor]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise ProvisionError(f"{what} has no {key} list")
    if len(value) > _MAX_LAYERS:
        raise ProvisionError(f"{what} lists more than {_MAX_LAYERS} {key}")
    return [_descriptor(v, f"{what} {key}[{i}]") for i, v in enumerate(value)]


def _select_ref(descriptors: list[_Descriptor], ref: str, where: str) -> list[_Descriptor]:
    chosen = [d for d in descriptors if any(d.annotations.get(k) == ref for k in _REF_ANNOTATIONS)]
    if not chosen:
        names = sorted(
            {d.annotations[k] for d in descriptors for k in _REF_ANNOTATIONS if k in d.annotations}
        )
        raise UsageError(
            f"{where}: no image named {ref!r}",
            hint=f"names present: {', '.join(names) or '(none)'}",
        )
    return chosen


def _choose_manifest(
    source: _Source, descriptors: Sequence[_Descriptor], want: Platform
) -> _Descriptor:
    """The one manifest for ``want`` below ``descriptors``, following image indexes."""
    matching: dict[str, _Descriptor] = {}  # platform stated and matching
    unstated: dict[str, _Descriptor] = {}  # no platform in the descriptor
    seen: set[str] = set()

    def visit(descs: Sequence[_Descriptor], depth: int) -> None:
        for desc in descs:
            if desc.platform is not None:
                if desc.platform[0] != "unknown":  # attestation manifests
                    seen.add("/".join(p for p in desc.platform if p))
                if not want.matches(*desc.platform):
                    continue
            if desc.media_type in _INDEX_TYPES:
                if depth >= _MAX_INDEX_DEPTH:
                    raise ProvisionError(f"image indexes nested deeper than {_MAX_INDEX_DEPTH}")
                nested = _json_object(_read_blob(source, desc, "image index"), "image index")
                visit(_descriptor_list(nested, "manifests", f"index {desc.digest}"), depth + 1)
            elif desc.media_type in _MANIFEST_TYPES:
                (matching if desc.platform is not None else unstated)[desc.digest] = desc
            # Anything else (artifact manifests, attestations) is not an image.

    visit(descriptors, 0)
    found = matching or unstated
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        present = ", ".join(sorted(seen)) or "no container images"
        raise UsageError(
            f"{source.where}: no image for {want} (it has: {present})",
            hint="choose another platform",
        )
    names = sorted(
        {d.annotations[k] for d in found.values() for k in _REF_ANNOTATIONS if k in d.annotations}
    )
    raise UsageError(
        f"{source.where} holds {len(found)} images for {want}; choose one by its name",
        hint=f"names present: {', '.join(names) or '(none)'}",
    )


def _parse_config(doc: Mapping[str, object], digest: str) -> tuple[ImageConfig, list[str]]:
    """The runtime config and the diff_ids of an image config document."""
    what = f"config {digest}"
    os_name, arch, variant = doc.get("os"), doc.get("architecture"), doc.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        raise ProvisionError(f"{what} has no os/architecture")
    if variant is not None and not isinstance(variant, str):
        raise ProvisionError(f"{what}: variant must be a string")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ProvisionError(f"{what} has no rootfs of type 'layers'")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list) or len(raw_ids) > _MAX_LAYERS:
        raise ProvisionError(f"{what}: rootfs.diff_ids must be a list of digests")
    diff_ids = [_check_digest(d, f"{what} rootfs.diff_ids") for d in raw_ids]
    runtime = doc.get("config")
    if runtime is None:
        runtime = {}
    if not isinstance(runtime, dict):
        raise ProvisionError(f"{what}: config must be an object")

    def text(key: str) -> str:
        value = runtime.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ProvisionError(f"{what}: config.{key} must be a string")
        return value

    def strings(key: str) -> tuple[str, ...]:
        return tuple(_str_list(runtime.get(key), f"{what}: config.{key}"))

    config = ImageConfig(
        env=strings("Env"),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        user=text("User"),
        workdir=text("WorkingDir"),
        os=os_name,
        architecture=arch,
        variant=variant,
    )
    return config, diff_ids


def _check_platform(config: ImageConfig, want: Platform, where: str) -> None:
    if not want.matches(
        config.os, _ARCH_ALIASES.get(config.architecture, config.architecture), config.variant
    ):
        raise UsageError(
            f"{where}: the image is for {_platform_text(config)}, not {want}",
            hint="choose another platform or image",
        )


def _platform_text(config: ImageConfig) -> str:
    return str(Platform(config.os, config.architecture, config.variant))


# -- blobs


def _read_blob(source: _Source, desc: _Descriptor, what: str) -> bytes:
    """A small (JSON) blob, checked against its descriptor."""
    label = f"{what} {desc.digest}"
    if desc.size > _MAX_JSON:
        raise ProvisionError(f"{label} is {desc.size} bytes (limit {_MAX_JSON})")
    data = source.read_small(desc.location, label, limit=desc.size)
    _check_content(label, desc.digest, desc.size, len(data), _hash(desc.digest, data))
    return data


def _verify_blob(source: _Source, desc: _Descriptor, what: str) -> None:
    """Stream a (large) blob through its hash; refuse it unless digest and size match."""
    with source.open(desc.location, what) as fh:
        reader = _HashingReader(fh, desc.digest, limit=desc.size, what=what)
        while reader.read(_CHUNK):
            pass
        reader.check()


def _hash_blob(source: _Source, name: str, what: str) -> tuple[str, int, Compression]:
    """Digest, size and compression (by magic number) of a docker-save layer."""
    hasher = hashlib.sha256()
    size = 0
    head = b""
    with source.open(name, what) as fh:
        while chunk := fh.read(_CHUNK):
            if len(head) < 4:
                head += chunk[:4]
            hasher.update(chunk)
            size += len(chunk)
    compression: Compression = "none"
    if head.startswith(_GZIP_MAGIC):
        compression = "gzip"
    elif head.startswith(_ZSTD_MAGIC):
        compression = "zstd"
    return f"sha256:{hasher.hexdigest()}", size, compression


def _hash(digest: str, data: bytes) -> str:
    algorithm = digest.split(":", 1)[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _check_content(label: str, digest: str, size: int | None, got_size: int, got: str) -> None:
    if size is not None and got_size != size:
        raise ProvisionError(
            f"{label}: blob is {'larger' if got_size > size else 'smaller'} than the "
            f"{size} bytes its descriptor says",
            hint="the image is corrupt or was modified; fetch it again",
        )
    if got != digest:
        raise ProvisionError(
            f"{label}: content does not match its digest (it hashes to {got})",
            hint="the image is corrupt or was modified; fetch it again",
        )


class _HashingReader:
    """Reads a stream while hashing and counting it; refuses more than ``limit`` bytes.

    ``check`` compares what was read with the expected digest (and with
    ``limit`` as the exact size when ``exact``).
    """

    def __init__(
        self, fh: _Readable, digest: str, *, limit: int, what: str, exact: bool = True
    ) -> None:
        self._fh = fh
        self._digest = digest
        self._hasher = hashlib.new(digest.split(":", 1)[0])
        self._limit = limit
        self._exact = exact
        self._what = what
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        """At most ``n`` bytes (a chunk when ``n`` is negative); ``b""`` at the end."""
        data = self._fh.read(min(_CHUNK if n < 0 else n, self._limit + 1 - self.count))
        self.count += len(data)
        if self.count > self._limit:
            if self._exact:
                raise ProvisionError(
                    f"{self._what}: blob is larger than the {self._limit} bytes "
                    "its descriptor says",
                    hint="the image is corrupt or was modified; fetch it again",
                )
            raise UnsafeArchive(  # apply_layers adds the layer's name
                f"uncompressed data exceeds {self._limit} bytes",
                hint="raise the apply limits if the image is really that large",
            )
        self._hasher.update(data)
        return data

    def check(self) -> None:
        got = f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
        size = self._limit if self._exact else None
        _check_content(self._what, self._digest, size, self.count, got)


class _Readable(Protocol):
    """What the readers here need of a stream: ``read`` only (tarfile's stream mode agrees)."""

    def read(self, n: int = -1, /) -> bytes: ...


class _ErrorMapping:
    """``read`` of a stream, with the exceptions in ``catch`` turned into ours."""

    def __init__(
        self,
        fh: _Readable,
        catch: tuple[type[BaseException], ...],
        wrap: Callable[[BaseException], StokerError],
    ) -> None:
        self._fh = fh
        self._catch = catch
        self._wrap = wrap

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._fh.read(n)
        except self._catch as exc:
            raise self._wrap(exc) from exc


# -- sources: a directory or a tar file


class _Source(abc.ABC):
    """Named files of an image on disk; names are relative, ``/``-separated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` is there (of any type)."""

    @abc.abstractmethod
    def open(self, name: str, what: str) -> contextlib.AbstractContextManager[_Readable]:
        """Open regular file ``name``; missing files and read errors raise ProvisionError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the underlying directory or file."""

    def read_small(self, name: str, what: str, *, limit: int = _MAX_JSON) -> bytes:
        """The whole of a small file; refuses files larger than ``limit``."""
        with self.open(name, what) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise ProvisionError(f"{what}: {name} is larger than {limit} bytes")
        return data

    def _missing(self, name: str, what: str) -> ProvisionError:
        return ProvisionError(
            f"{what} is missing: {name} is not in {self.where}",
            hint="the image is incomplete; export it again (with all its blobs)",
        )

    def _read_error(self, name: str) -> Callable[[BaseException], StokerError]:
        def wrap(exc: BaseException) -> StokerError:
            return ProvisionError(f"cannot read {name} from {self.where}: {exc}")

        return wrap


def _normalise_name(name: str, what: str) -> str:
    """A relative, normalised file name from an image document; refuses escapes."""
    if not name or "\0" in name or name.startswith("/"):
        raise ProvisionError(f"{what}: invalid file name {_show(name)}")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ProvisionError(f"{what}: file name {_show(name)} leaves the image")
    return norm


class _DirSource(_Source):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open {path}: {exc.strerror}") from exc

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._fd)
        except OSError:
            return False
        return True

    @contextlib.contextmanager
    def open(self, name: str, what: str) -> Iterator[_Readable]:
        rel = _normalise_name(name, what)
        try:
            # Symlinks are followed (tools do link blobs); content is verified anyway.
            fd = os.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._fd)
        except FileNotFoundError:
            raise self._missing(name, what) from None
        except OSError as exc:
            raise ProvisionError(f"cannot open {name} in {self.where}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ProvisionError(f"{what}: {name} in {self.where} is not a regular file")
            yield _ErrorMapping(fh, (OSError,), self._read_error(name))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _TarSource(_Source):
    """A tar file (``docker save`` output or an OCI archive), read with random access.

    Headers are parsed by :class:`~stoker.archive._GuardedTarInfo` (bounded,
    strict); member symlinks and hardlinks are resolved by name inside the
    archive (``docker save`` links repeated layers).
    """

    def __init__(self, path: Path, mode: Literal["r:", "r:gz", "r:bz2", "r:xz"]) -> None:
        super().__init__(path)
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            self._tf = tarfile.open(path, mode, tarinfo=_GuardedTarInfo)  # noqa: SIM115 - see close
        except (UnsafeArchive, *_TAR_ERRORS, OSError) as exc:
            raise UsageError(f"{path}: not a directory or a readable tar file: {exc}") from exc
        try:
            self._scan()
        except BaseException:
            self._tf.close()
            raise

    def _scan(self) -> None:
        try:
            while (info := self._tf.next()) is not None:
                _forget_members(self._tf)
                if len(self._members) >= _MAX_OUTER_MEMBERS:
                    raise ProvisionError(f"{self.where}: more than {_MAX_OUTER_MEMBERS} files")
                name = posixpath.normpath(info.name.lstrip("/"))
                self._members[name] = info  # a later member replaces an earlier one, as in tar
        except (UnsafeArchive, *_TAR_ERRORS, OSError) as exc:
            raise ProvisionError(f"{self.where}: not a readable tar file: {exc}") from exc

    def exists(self, name: str) -> bool:
        return name in self._members

    def _resolve(self, name: str, what: str) -> tarfile.TarInfo:
        current = _normalise_name(name, what)
        for _ in range(_MAX_LINK_HOPS):
            info = self._members.get(current)
            if info is None:
                raise self._missing(name, what)
            if info.isreg():
                return info
            if info.issym():
                target = posixpath.join(posixpath.dirname(current), info.linkname)
            elif info.islnk():
                target = info.linkname
            else:
                raise ProvisionError(f"{what}: {name} in {self.where} is not a regular file")
            current = _normalise_name(target, f"{what} (link {current})")
        raise ProvisionError(f"{what}: too many links resolving {name} in {self.where}")

    @contextlib.contextmanager
    def open(self, name: str, what: str) -> Iterator[_Readable]:
        info = self._resolve(name, what)
        try:
            fh = self._tf.extractfile(info)
        except (*_TAR_ERRORS, OSError) as exc:
            raise ProvisionError(f"cannot read {name} from {self.where}: {exc}") from exc
        if fh is None:  # pragma: no cover - regular members always have data
            raise ProvisionError(f"{what}: {name} in {self.where} has no data")
        with fh:
            yield _ErrorMapping(fh, (OSError, *_TAR_ERRORS), self._read_error(name))

    def close(self) -> None:
        self._tf.close()


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[_Source]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    source: _Source
    if stat.S_ISDIR(st.st_mode):
        source = _DirSource(path)
    elif stat.S_ISREG(st.st_mode):
        try:
            with path.open("rb") as fh:
                head = fh.read(6)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
        if head.startswith(_ZSTD_MAGIC):
            raise UsageError(
                f"{path}: zstd-compressed archives are not supported",
                hint=f"decompress it first: zstd -d {path}",
            )
        mode: Literal["r:", "r:gz", "r:bz2", "r:xz"] = "r:"
        if head.startswith(_GZIP_MAGIC):
            mode = "r:gz"
        elif head.startswith(b"BZh"):
            mode = "r:bz2"
        elif head.startswith(b"\xfd7zXZ\x00"):
            mode = "r:xz"
        source = _TarSource(path, mode)
    else:
        raise UsageError(f"{path}: not a directory or a tar file")
    try:
        yield source
    finally:
        source.close()


# --------------------------------------------------------------------------- applying


def apply_layers(
    image: OciImage, rootfs: Path, *, limits: ExtractLimits = DEFAULT_APPLY_LIMITS
) -> ApplyReport:
    """Apply ``image``'s layers, bottom first, into the empty directory ``rootfs``.

    Layer content is hostile: see the module docstring for what is kept,
    skipped and refused.  The first refusal raises :class:`UnsafeArchive`
    naming the layer (number and digest) and the member; a layer whose bytes
    no longer match its digest or diff_id raises :class:`ProvisionError`;
    exceeding ``limits`` raises :class:`UnsafeArchive`.  On any error
    ``rootfs`` holds a partial tree and must be discarded, but nothing outside
    it has been created or changed.

    Files are created with their image owners only when running as root (see
    :attr:`ApplyReport.ownership_kept`).  The tree holds the image's setuid
    binaries: keep a directory above ``rootfs`` private (mode 0700).
    """
    root_fd = _open_empty_dir(rootfs)
    applier = _LayerApplier(root_fd, limits, keep_owners=os.geteuid() == 0)
    try:
        with _open_source(image.source) as source:
            for number, layer in enumerate(image.layers, 1):
                label = f"layer {number}/{len(image.layers)} ({layer.digest})"
                try:
                    with _layer_stream(source, layer, label, limits) as stream:
                        applier.apply(stream, layer.digest)
                        stream.finish()
                except UnsafeArchive as exc:
                    raise UnsafeArchive(f"{label}: {exc}", hint=exc.hint) from exc
                log.debug("applied %s", label)
        applier.finish()
    finally:
        applier.close()
    return applier.summary(len(image.layers))


def _open_empty_dir(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{path}: root filesystem directory does not exist") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot open as a directory: {exc.strerror}") from exc
    if os.listdir(fd):  # noqa: PTH208 - a directory fd
        os.close(fd)
        raise UsageError(f"{path}: root filesystem directory is not empty")
    return fd


class _LayerStream:
    """The uncompressed tar of one layer, hashed twice while it is read.

    The raw blob is checked against the layer digest and size, the
    uncompressed tar against its diff_id; :meth:`finish` drains what the tar
    reader left (end-of-archive padding) and compares both.
    """

    def __init__(self, raw: _HashingReader, tar: _HashingReader, zstd: _Zstd | None) -> None:
        self._raw = raw
        self._tar = tar
        self._zstd = zstd

    def read(self, n: int = -1, /) -> bytes:
        return self._tar.read(n)

    def finish(self) -> None:
        trailer = 0
        while chunk := self._tar.read(_CHUNK):
            trailer += len(chunk)
            if trailer > _MAX_TRAILER:
                raise UnsafeArchive(f"more than {_MAX_TRAILER} bytes after the end of the tar")
        if self._zstd is not None:
            self._zstd.wait()
        while self._raw.read(_CHUNK):
            pass
        self._raw.check()
        if self._tar is not self._raw:
            self._tar.check()


@contextlib.contextmanager
def _layer_stream(
    source: _Source, layer: Layer, label: str, limits: ExtractLimits
) -> Iterator[_LayerStream]:
    with source.open(layer.location, label) as fh:
        raw = _HashingReader(fh, layer.digest, limit=layer.size, what=label)
        # A tar of max_bytes payload has headers too; the cap is for bombs, not precision.
        tar_limit = limits.max_bytes + limits.max_members * 3 * tarfile.BLOCKSIZE + _MAX_TRAILER
        if layer.compression == "none":
            yield _LayerStream(raw, raw, None)
        elif layer.compression == "gzip":
            # GzipFile only seeks to rewind, which reading front to back never does.
            gz = gzip.GzipFile(fileobj=cast(BinaryIO, raw), mode="rb")
            decoded = _ErrorMapping(gz, (OSError, EOFError, zlib.error), _corrupt("gzip"))
            tar = _HashingReader(decoded, layer.diff_id, limit=tar_limit, what=label, exact=False)
            yield _LayerStream(raw, tar, None)
        else:
            with _Zstd(raw) as zstd:
                tar = _HashingReader(zstd, layer.diff_id, limit=tar_limit, what=label, exact=False)
                yield _LayerStream(raw, tar, zstd)


def _corrupt(kind: str) -> Callable[[BaseException], StokerError]:
    def wrap(exc: BaseException) -> StokerError:
        return UnsafeArchive(f"corrupt {kind} data: {exc}")

    return wrap


class _Zstd:
    """``zstd -d`` as a stream filter: a thread feeds it, :meth:`read` returns its output.

    The feeding thread reads (and so hashes) the raw blob; its exceptions are
    re-raised by :meth:`wait`.  Leaving the context kills zstd and joins the
    thread, whatever happened.
    """

    def __init__(self, src: _Readable) -> None:
        self._src = src
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        try:
            self._proc = subprocess.Popen(
                [_ZSTD, "-d", "-c", "-q"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except FileNotFoundError:
            self._stderr.close()
            raise ProvisionError(
                f"a layer is zstd-compressed and {_ZSTD} is not installed",
                hint="install zstd (apt-get install zstd)",
            ) from None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name="zstd-feed", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while chunk := self._src.read(_CHUNK):
                stdin.write(chunk)
        except BrokenPipeError:
            pass  # zstd stopped reading: it failed, or we killed it; wait() tells which
        except BaseException as exc:  # re-raised in the main thread by wait()
            self._error = exc
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def read(self, n: int = -1, /) -> bytes:
        stdout = self._proc.stdout
        assert stdout is not None
        return stdout.read(n)

    def wait(self) -> None:
        """After end of output: raise what went wrong feeding or decompressing."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._proc.wait() != 0:
            self._stderr.seek(0)
            message = self._stderr.read(4096).decode(errors="replace").strip()
            raise UnsafeArchive(f"corrupt zstd data: {message or f'exit {self._proc.returncode}'}")

    def __enter__(self) -> _Zstd:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._thread.join()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


_ROOT_DESC: Final = "the root directory"


class _LayerApplier(_Extractor):
    """Applies layer tars one after another into one root (see the module docstring).

    Inherited from :class:`~stoker.archive._Extractor` and used unchanged:
    ``_split`` (name checks), ``_dir``/``_parent`` (the ``O_NOFOLLOW`` walk
    from the root fd, creating missing parents 0755), the directory-fd cache,
    ``_copy`` and ``_finish_directories``.  That cache assumes directories
    are never replaced; here they are (whiteouts, a file over a directory),
    so every removal of a directory goes through :meth:`_remove`, which drops
    the cached fds and pending attributes below it.
    """

    def __init__(self, root_fd: int, limits: ExtractLimits, *, keep_owners: bool) -> None:
        super().__init__(root_fd, limits)
        self._keep_owners = keep_owners
        # Paths written by the current layer, with their ancestors: whiteouts spare them.
        self._layer_paths: set[tuple[str, ...]] = set()
        self._layer = ""
        self._entries = 0
        self._bytes = 0
        self._whiteouts = 0
        self._skipped: list[str] = []
        self._xattr_members: list[str] = []
        self._xattr_count = 0

    # -- driving

    def apply(self, stream: _Readable, layer: str) -> None:
        """Apply one layer's tar stream (read sequentially)."""
        self._layer = layer
        self._layer_paths = set()
        with _open_guarded(cast(BinaryIO, stream)) as tf:
            while (member := self._next(tf)) is not None:
                self._members += 1
                if self._members > self._limits.max_members:
                    raise UnsafeArchive(
                        f"the image has more than {self._limits.max_members} entries",
                        hint="raise the apply limits if the image is really that large",
                    )
                self._extract(tf, member)

    def finish(self) -> None:
        """Give directories their final mode and mtime, deepest first (after all layers)."""
        self._finish_directories()

    def summary(self, layers: int) -> ApplyReport:
        notes = []
        if not self._keep_owners:
            notes.append(
                f"ownership not kept: not running as root, every file belongs to uid {os.geteuid()}"
            )
        if self._xattr_count:
            examples = ", ".join(self._xattr_members)
            notes.append(
                f"extended attributes (file capabilities, ACLs, SELinux labels) of "
                f"{self._xattr_count} entries were not applied, e.g. {examples}"
            )
        return ApplyReport(
            layers=layers,
            entries=self._entries,
            bytes=self._bytes,
            whiteouts=self._whiteouts,
            skipped=tuple(self._skipped),
            ownership_kept=self._keep_owners,
            notes=tuple(notes),
        )

    # -- members

    def _extract(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = self._split(name, "name", name)
        if any(p.startswith(_WHITEOUT) for p in parts[:-1]):
            # No file system made of layers can hold such a name: only whiteouts have it.
            raise _refuse(name, "a '.wh.' name is a whiteout, not a directory")
        try:
            if parts and parts[-1].startswith(_WHITEOUT):
                self._whiteout(parts, name)
                return
            if any(k.startswith("SCHILY.xattr.") for k in member.pax_headers):
                self._xattr_count += 1
                if len(self._xattr_members) < 5:
                    self._xattr_members.append(name)
            if member.isreg():
                self._file(tf, member, parts)
            elif member.isdir():
                self._directory(member, parts)
            elif member.issym():
                self._symlink(member, parts)
            elif member.islnk():
                self._hardlink(member, parts)
            elif member.ischr() or member.isblk():
                self._skip(name, "device node")
            elif member.isfifo():
                self._skip(name, "FIFO")
            else:
                raise _refuse(name, f"unsupported member type {member.type!r}")
        except OSError as exc:
            raise _refuse(name, f"cannot apply: {exc.strerror or exc}") from exc

    def _file(self, tf: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name = member.name
        if not parts:
            raise _refuse(name, f"a file cannot replace {_ROOT_DESC}")
        if self._bytes + member.size > self._limits.max_bytes:
            raise UnsafeArchive(
                f"member {_show(name)}: the image's files exceed {self._limits.max_bytes} bytes",
                hint="raise the apply limits if the image is really that large",
            )
        mtime = _mtime_ns(member)
        uid, gid = self._owner(member)
        parent = self._parent(parts, name)
        try:
            self._clear(parent, parts, keep_directory=False)
            fd = os.open(parts[-1], _FILE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            self._copy(tf, member, fd)
            if self._keep_owners:
                os.fchown(fd, uid, gid)  # before fchmod: chown clears setuid/setgid
            os.fchmod(fd, member.mode & 0o7777)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        self._bytes += member.size
        self._done(parts)

    def _directory(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name = member.name
        mode, mtime = member.mode & 0o7777, _mtime_ns(member)
        uid, gid = self._owner(member)
        if parts:
            parent = self._parent(parts, name)
            try:
                if not self._clear(parent, parts, keep_directory=True):
                    os.mkdir(parts[-1], 0o700, dir_fd=parent)
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
            self._cache_put(parts, fd)  # the cache owns fd now
        else:
            fd = self._root
        if self._keep_owners:
            os.fchown(fd, uid, gid)
        # Mode and mtime at the very end: later layers still write in here.
        self._dirs[parts] = (mode, mtime)
        self._done(parts)

    def _symlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name, target = member.name, member.linkname
        if not parts:
            raise _refuse(name, f"a symlink cannot replace {_ROOT_DESC}")
        # Absolute and '..' targets are fine: the target is stored, never followed.
        if not target or "\0" in target:
            raise _refuse(name, f"invalid symlink target {_show(target)}")
        if len(os.fsencode(target)) > self._limits.max_name_len:
            raise _refuse(name, f"symlink target longer than {self._limits.max_name_len} bytes")
        mtime = _mtime_ns(member)
        uid, gid = self._owner(member)
        parent = self._parent(parts, name)
        try:
            base = parts[-1]
            self._clear(parent, parts, keep_directory=False)
            os.symlink(target, base, dir_fd=parent)
            if self._keep_owners:
                os.chown(base, uid, gid, dir_fd=parent, follow_symlinks=False)
            os.utime(base, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        self._done(parts)

    def _hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name, target = member.name, member.linkname
        if not parts:
            raise _refuse(name, f"a hardlink cannot replace {_ROOT_DESC}")
        tparts = self._split(target, "hardlink target", name)
        if not tparts:
            raise _refuse(name, f"hardlink to {_ROOT_DESC}")
        if tparts == parts:
            raise _refuse(name, "hardlink to itself")
        if parts[: len(tparts)] == tparts or tparts[: len(parts)] == parts:
            raise _refuse(name, f"hardlink to {_show(target)}, which contains it or is below it")
        tdir = self._find_dir(tparts[:-1], name)
        if tdir is None:
            raise _refuse(name, f"hardlink to {_show(target)}, which does not exist (yet)")
        try:
            st = _lstat_at(tdir, tparts[-1])
            if st is None:
                raise _refuse(name, f"hardlink to {_show(target)}, which does not exist (yet)")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise _refuse(name, f"hardlink to {_show(target)}, which is not a file")
            parent = self._parent(parts, name)
            try:
                self._clear(parent, parts, keep_directory=False)
                os.link(
                    tparts[-1], parts[-1], src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False
                )
            finally:
                os.close(parent)
        finally:
            os.close(tdir)
        self._done(parts)

    def _skip(self, name: str, why: str) -> None:
        self._skipped.append(f"{self._layer}: {name} ({why})")

    # -- whiteouts

    def _whiteout(self, parts: tuple[str, ...], name: str) -> None:
        base, where = parts[-1], parts[:-1]
        if base != _OPAQUE and base.startswith(_AUFS_META):
            self._skip(name, "AUFS metadata")
            return
        victim = base[len(_WHITEOUT) :]
        if base != _OPAQUE and victim in ("", ".", ".."):
            raise _refuse(name, f"whiteout of {_show(victim)}")
        self._whiteouts += 1
        fd = self._find_dir(where, name)
        if fd is None:
            return  # nothing below to hide
        try:
            if base == _OPAQUE:
                self._remove_lower_children(fd, where)
            else:
                self._remove_lower(fd, (*where, victim))
        finally:
            os.close(fd)

    def _remove_lower(self, parent: int, parts: tuple[str, ...]) -> None:
        """Remove ``parts`` except what the current layer wrote there."""
        st = _lstat_at(parent, parts[-1])
        if st is None:
            return
        if parts not in self._layer_paths:
            self._remove(parent, parts, st)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            try:
                self._remove_lower_children(fd, parts)
            finally:
                os.close(fd)

    def _remove_lower_children(self, fd: int, parts: tuple[str, ...]) -> None:
        for child in sorted(os.listdir(fd)):
            self._remove_lower(fd, (*parts, child))

    # -- helpers

    def _clear(self, parent: int, parts: tuple[str, ...], *, keep_directory: bool) -> bool:
        """Make room for a new entry at ``parts``; True if a directory is kept there."""
        st = _lstat_at(parent, parts[-1])
        if st is None:
            return False
        if keep_directory and stat.S_ISDIR(st.st_mode):
            return True
        self._remove(parent, parts, st)
        return False

    def _remove(self, parent: int, parts: tuple[str, ...], st: os.stat_result) -> None:
        """Delete ``parts`` (a whole tree if a directory), never following symlinks."""
        if stat.S_ISDIR(st.st_mode):
            n = len(parts)
            for key in [k for k in self._cache if k[:n] == parts]:
                os.close(self._cache.pop(key))
            for key in [k for k in self._dirs if k[:n] == parts]:
                del self._dirs[key]
            # rmtree with dir_fd works on fds throughout and refuses to follow symlinks.
            shutil.rmtree(parts[-1], dir_fd=parent)
        else:
            os.unlink(parts[-1], dir_fd=parent)

    def _find_dir(self, parts: tuple[str, ...], member: str) -> int | None:
        """An fd of existing directory ``parts`` (caller closes), None if it is not there.

        Unlike ``_dir`` this never creates anything; a symlink on the way is
        still refused.
        """
        fd = os.dup(self._root)
        try:
            for i, comp in enumerate(parts):
                st = _lstat_at(fd, comp)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise _refuse(
                        member, f"path goes through the symlink {_show('/'.join(parts[: i + 1]))}"
                    )
                if st is None or not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    return None
                child = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _done(self, parts: tuple[str, ...]) -> None:
        self._entries += 1
        for i in range(len(parts), 0, -1):
            if parts[:i] in self._layer_paths:
                break
            self._layer_paths.add(parts[:i])

    @staticmethod
    def _owner(member: tarfile.TarInfo) -> tuple[int, int]:
        ids = []
        for key, value in (("uid", member.uid), ("gid", member.gid)):
            raw = member.pax_headers.get(key)
            if raw is not None:
                if not raw.isdigit() or len(raw) > 10:
                    raise _refuse(member.name, f"invalid PAX {key} {_show(raw)}")
                value = int(raw)
            if not 0 <= value < 0xFFFFFFFF:  # (uid_t)-1 would mean "unchanged"
                raise _refuse(member.name, f"{key} {value} is out of range")
            ids.append(value)
        return ids[0], ids[1]


# --------------------------------------------------------------------------- writing


def write_layout(tree: Path, layout: Path, *, env: Sequence[str] = ("PATH=/usr/bin:/bin",)) -> Path:
    """Write ``tree`` as a one-layer OCI image layout in the new directory ``layout``.

    The inverse of :func:`apply_layers` for a single layer: an extracted stoker
    image becomes a container image (and the tests and benchmarks get OCI bases
    of real size).  GNU tar writes the layer, sorted, with numeric owners and
    xattrs, so the same tree gives the same digests.
    """
    import hashlib
    import json

    from stoker.procs import run_checked

    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer = layout / "layer.tar"
    # fmt: off
    run_checked(
        ["tar", "-C", str(tree), "--sort=name", "--numeric-owner", "--xattrs",
         # xattrs make it a pax archive, which would record access times
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
         "--mtime=@0", "-cf", str(layer), "."],
        timeout=3600,
    )
    # fmt: on
    with layer.open("rb") as fh:
        layer_digest = hashlib.file_digest(fh, "sha256").hexdigest()
    layer_size = layer.stat().st_size
    layer.rename(blobs / layer_digest)

    def blob(doc: dict[str, object], media_type: str) -> dict[str, object]:
        data = json.dumps(doc, sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    config = blob(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": list(env)},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        },
        MEDIA_OCI_CONFIG,
    )
    manifest = blob(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": config,
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{layer_digest}",
                    "size": layer_size,
                }
            ],
        },
        MEDIA_OCI_MANIFEST,
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [manifest]}
    (layout / "index.json").write_text(json.dumps(index))
    return layout
