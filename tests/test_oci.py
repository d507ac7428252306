"""Tests for stoker.images.oci: reading OCI layouts and docker-save archives, applying layers.

Every image here is made by the test (tarfile + hashlib + json): no network, no Docker.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stoker.archive import ExtractLimits
from stoker.errors import ProvisionError, UnsafeArchive, UsageError
from stoker.images import oci
from stoker.images.oci import (
    ApplyReport,
    OciImage,
    Platform,
    apply_layers,
    oci_builder_digest_inputs,
    open_image,
)

T0 = 1_600_000_000  # a fixed mtime for hand-made members
IS_ROOT = os.geteuid() == 0
HAVE_ZSTD = shutil.which("zstd") is not None

Kind = Literal["file", "dir", "symlink", "hardlink", "chr", "blk", "fifo"]
Compression = Literal["none", "gzip", "zstd"]

# --------------------------------------------------------------------------- building images


@dataclass
class M:
    """One member of a layer tar."""

    name: str
    kind: Kind = "file"
    data: bytes = b""
    target: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = T0
    pax: dict[str, str] = field(default_factory=dict)


_TYPES: dict[Kind, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer_tar(members: Sequence[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.linkname = m.target
            info.pax_headers = dict(m.pax)
            if m.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3
            if m.kind == "file":
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return subprocess.run(
            ["zstd", "-q", "-c"], input=data, capture_output=True, check=True
        ).stdout
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_LAYER_TYPES: dict[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def image_config(
    diff_ids: Sequence[str], *, os_name: str = "linux", arch: str = "amd64", **runtime: object
) -> dict[str, object]:
    return {
        "architecture": arch,
        "os": os_name,
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
            "Entrypoint": ["/bin/entry"],
            "Cmd": ["--serve"],
            "User": "1000:1000",
            "WorkingDir": "/srv",
            **runtime,
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": "test"}],
    }


class Layout:
    """An OCI image layout being written by a test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def path_of(self, desc: dict[str, object]) -> Path:
        return self.root / "blobs" / "sha256" / str(desc["digest"]).split(":")[1]

    def image(
        self,
        layers: Sequence[bytes],
        *,
        compression: Compression = "gzip",
        arch: str = "amd64",
        diff_ids: Sequence[str] | None = None,
        layer_media_type: str | None = None,
        platform: bool = False,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, object]:
        """Write config, layers and manifest; return the manifest's descriptor."""
        descs = [
            self.blob(compress(t, compression), layer_media_type or _LAYER_TYPES[compression])
            for t in layers
        ]
        ids = list(diff_ids) if diff_ids is not None else [sha256(t) for t in layers]
        config = self.blob(
            json.dumps(image_config(ids, arch=arch)).encode(),
            "application/vnd.oci.image.config.v1+json",
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": descs,
        }
        desc = self.blob(
            json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        if platform:
            desc["platform"] = {"os": "linux", "architecture": arch}
        if annotations:
            desc["annotations"] = annotations
        return desc

    def index(self, manifests: Sequence[dict[str, object]]) -> dict[str, object]:
        """Write an image index blob (multi-arch); return its descriptor."""
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": list(manifests),
        }
        return self.blob(json.dumps(doc).encode(), "application/vnd.oci.image.index.v1+json")

    def top(self, manifests: Sequence[dict[str, object]]) -> Path:
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": list(manifests),
        }
        (self.root / "index.json").write_text(json.dumps(doc))
        return self.root


def oci_layout(path: Path, layers: Sequence[Sequence[M]], **kwargs: object) -> Path:
    """A one-image OCI layout of ``layers`` (lists of members)."""
    layout = Layout(path)
    desc = layout.image([layer_tar(ms) for ms in layers], **kwargs)  # type: ignore[arg-type]
    return layout.top([desc])


def docker_save(path: Path, layers: Sequence[bytes], *, tags: Sequence[str] = ("app:1",)) -> Path:
    """A docker-save (pre-25) archive: <config>.json, <id>/layer.tar, manifest.json.

    Repeated layers are stored once and linked by a symlink, as Docker does.
    """
    ids = [sha256(t) for t in layers]
    config = json.dumps(image_config(ids)).encode()
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, data: bytes | None = None, *, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, link
        elif data is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.size = len(data)
        members.append((info, data))

    config_name = hashlib.sha256(config).hexdigest() + ".json"
    add(config_name, config)
    names, first_of = [], {}
    for i, tar in enumerate(layers):
        layer_id = hashlib.sha256(f"v1-id-{i}".encode()).hexdigest()
        add(layer_id)
        name = f"{layer_id}/layer.tar"
        if tar in first_of:
            add(name, link=f"../{first_of[tar]}")
        else:
            add(name, tar)
            first_of[tar] = name
        names.append(name)
    manifest = [{"Config": config_name, "RepoTags": list(tags), "Layers": names}]
    add("manifest.json", json.dumps(manifest).encode())
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() and data is not None else None)
    return path


def apply_into(image: OciImage, base: Path, **kwargs: ExtractLimits) -> tuple[Path, ApplyReport]:
    rootfs = base / "rootfs"
    rootfs.mkdir()
    return rootfs, apply_layers(image, rootfs, **kwargs)


def snapshot(top: Path, *, skip: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Everything under ``top`` (except ``skip``): type, mode, owner, content, link target."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            s = p.lstat()
            extra: object = None
            if stat.S_ISLNK(s.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                extra = p.read_bytes()
            key = str(p.relative_to(top))
            result[key] = (s.st_mode, s.st_uid, s.st_gid, s.st_nlink, s.st_mtime_ns, extra)
    return result


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory symlinks in hostile layers point at; it must never change."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "passwd").write_text("host secret\n")
    return d


# --------------------------------------------------------------------------- reading


def test_open_oci_layout_reads_config_layers_and_digest(tmp_path: Path) -> None:
    path = oci_layout(tmp_path / "img", [[M("a", data=b"1")], [M("b", data=b"2")]])
    image = open_image(path)
    assert image.format == "oci"
    assert image.platform == "linux/amd64"
    assert len(image.layers) == 2
    assert [layer.compression for layer in image.layers] == ["gzip", "gzip"]
    assert image.layers[0].diff_id == sha256(layer_tar([M("a", data=b"1")]))
    assert image.digest.startswith("sha256:") and image.manifest_digest is not None
    cfg = image.config
    assert cfg.entrypoint == ("/bin/entry",) and cfg.cmd == ("--serve",)
    assert cfg.argv == ("/bin/entry", "--serve")
    assert cfg.environment() == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert cfg.user == "1000:1000" and cfg.workdir == "/srv"
    assert oci_builder_digest_inputs(image) == {
        "image_digest": image.digest,
        "platform": "linux/amd64",
    }


def test_platform_parsing() -> None:
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    assert str(Platform.parse("Linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("linux/arm64/v8").matches("linux", "arm64", None)
    assert not Platform.parse("linux/arm/v7").matches("linux", "arm", "v6")
    for bad in ("linux", "linux/amd64/v1/x", "linux/../amd64", ""):
        with pytest.raises(UsageError):
            Platform.parse(bad)


def multi_arch(path: Path) -> Path:
    layout = Layout(path)
    amd = layout.image([layer_tar([M("arch", data=b"amd64")])], platform=True)
    arm = layout.image([layer_tar([M("arch", data=b"arm64")])], arch="arm64", platform=True)
    attestation = layout.blob(b'{"schemaVersion": 2}', "application/vnd.oci.image.manifest.v1+json")
    attestation["platform"] = {"os": "unknown", "architecture": "unknown"}
    index = layout.index([amd, arm, attestation])
    index["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    return layout.top([index])


@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64", "linux/aarch64"])
def test_platform_selection_in_an_index(tmp_path: Path, platform: str) -> None:
    image = open_image(multi_arch(tmp_path / "img"), platform=platform)
    rootfs, _ = apply_into(image, tmp_path)
    arch = "amd64" if platform.endswith("amd64") else "arm64"
    assert (rootfs / "arch").read_bytes() == arch.encode()
    assert image.platform == f"linux/{arch}"


def test_platform_missing_from_index_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no image for linux/s390x.*linux/amd64, linux/arm64"):
        open_image(multi_arch(tmp_path / "img"), platform="linux/s390x")


def test_single_arch_image_for_another_platform_is_refused(tmp_path: Path) -> None:
    path = oci_layout(tmp_path / "img", [[M("a")]], arch="arm64")
    with pytest.raises(UsageError, match="is for linux/arm64, not linux/amd64"):
        open_image(path)


def test_ref_selects_among_several_images(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    one = layout.image(
        [layer_tar([M("v", data=b"1")])], annotations={"org.opencontainers.image.ref.name": "one"}
    )
    two = layout.image(
        [layer_tar([M("v", data=b"2")])], annotations={"org.opencontainers.image.ref.name": "two"}
    )
    path = layout.top([one, two])
    with pytest.raises(UsageError, match="holds 2 images") as info:
        open_image(path)
    assert info.value.hint is not None and "one, two" in info.value.hint
    image = open_image(path, ref="two")
    rootfs, _ = apply_into(image, tmp_path)
    assert (rootfs / "v").read_bytes() == b"2"
    with pytest.raises(UsageError, match="no image named 'three'"):
        open_image(path, ref="three")


def test_layer_digest_mismatch_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a", data=b"hello")])])
    path = layout.top([desc])
    manifest = json.loads(layout.path_of(desc).read_bytes())
    blob = layout.path_of(manifest["layers"][0])
    data = bytearray(blob.read_bytes())
    data[-9] ^= 0xFF  # same size, other content
    blob.write_bytes(bytes(data))
    with pytest.raises(ProvisionError, match=r"layer 1 \(sha256:[0-9a-f]{64}\).*does not match"):
        open_image(path)


def test_unverified_open_still_refuses_a_bad_layer_when_applying(tmp_path: Path) -> None:
    """verify_layers=False (the builder's cheap identity) defers the check, never skips it."""
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a", data=b"hello")])], compression="none")
    path = layout.top([desc])
    good = open_image(path)
    manifest = json.loads(layout.path_of(desc).read_bytes())
    blob = layout.path_of(manifest["layers"][0])
    data = bytearray(blob.read_bytes())
    data[-9] ^= 0xFF
    blob.write_bytes(bytes(data))
    image = open_image(path, verify_layers=False)
    assert image.digest == good.digest
    with pytest.raises(ProvisionError, match="does not match"):
        apply_into(image, tmp_path)
    blob.unlink()
    with pytest.raises(ProvisionError, match="is missing"):
        open_image(path, verify_layers=False)


def test_blob_size_mismatch_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a")])])
    path = layout.top([desc])
    config = json.loads(layout.path_of(desc).read_bytes())["config"]
    with layout.path_of(config).open("ab") as fh:
        fh.write(b" ")
    with pytest.raises(ProvisionError, match=r"config sha256:.*is larger than"):
        open_image(path)


def test_manifest_digest_mismatch_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a")])])
    path = layout.top([desc])
    blob = layout.path_of(desc)
    blob.write_bytes(blob.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))
    with pytest.raises(ProvisionError, match=r"manifest sha256:.*does not match its digest"):
        open_image(path)


def test_missing_blob_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a")]), layer_tar([M("b")])])
    path = layout.top([desc])
    layer = json.loads(layout.path_of(desc).read_bytes())["layers"][1]
    layout.path_of(layer).unlink()
    with pytest.raises(ProvisionError, match=r"layer 2 .* is missing: blobs/sha256/"):
        open_image(path)


def test_unknown_layer_media_type_is_refused(tmp_path: Path) -> None:
    path = oci_layout(
        tmp_path / "img", [[M("a")]], layer_media_type="application/vnd.example.layer.v1.squashfs"
    )
    with pytest.raises(ProvisionError, match="unsupported media type") as info:
        open_image(path)
    assert info.value.hint is not None and "tar+gzip" in info.value.hint


def test_invalid_digests_never_become_paths(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a")])])
    desc["digest"] = "sha256:../../../../etc/passwd"
    path = layout.top([desc])
    with pytest.raises(ProvisionError, match="invalid or unsupported digest"):
        open_image(path)


def test_uncompressed_layer_must_match_its_diff_id(tmp_path: Path) -> None:
    path = oci_layout(tmp_path / "img", [[M("a")]], compression="none", diff_ids=[sha256(b"x")])
    with pytest.raises(ProvisionError, match="uncompressed tar, but its config says"):
        open_image(path)


def test_compressed_layer_is_checked_against_its_diff_id_while_applying(tmp_path: Path) -> None:
    path = oci_layout(tmp_path / "img", [[M("a", data=b"x")]], diff_ids=[sha256(b"other")])
    image = open_image(path)  # the compressed blob itself is fine
    with pytest.raises(ProvisionError, match="does not match its digest"):
        apply_into(image, tmp_path)


def test_blob_changed_after_open_is_refused_while_applying(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    desc = layout.image([layer_tar([M("a", data=b"hello")])], compression="none")
    image = open_image(layout.top([desc]))
    blob = layout.path_of(json.loads(layout.path_of(desc).read_bytes())["layers"][0])
    data = bytearray(blob.read_bytes())
    data[512] ^= 0x01  # the file's content: still a valid tar
    blob.write_bytes(bytes(data))
    with pytest.raises(ProvisionError, match="does not match its digest"):
        apply_into(image, tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither an OCI image layout"):
        open_image(tmp_path / "empty")
    (tmp_path / "junk").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(UsageError, match="not a directory or a readable tar file"):
        open_image(tmp_path / "junk")
    with pytest.raises(UsageError, match="no such file"):
        open_image(tmp_path / "absent")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layer_compressions(tmp_path: Path, compression: Compression) -> None:
    if compression == "zstd" and not HAVE_ZSTD:
        pytest.skip("zstd is not installed")
    payload = os.urandom(300_000)  # several chunks, incompressible
    path = oci_layout(
        tmp_path / "img",
        [[M("big", data=payload)], [M("small", data=b"s")]],
        compression=compression,
    )
    image = open_image(path)
    assert {layer.compression for layer in image.layers} == {compression}
    rootfs, report = apply_into(image, tmp_path)
    assert (rootfs / "big").read_bytes() == payload
    assert report.bytes == len(payload) + 1


@pytest.mark.skipif(not HAVE_ZSTD, reason="zstd is not installed")
def test_corrupt_zstd_layer(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    tar = layer_tar([M("a", data=os.urandom(5000))])
    good = compress(tar, "zstd")
    bad = good[:-20] + bytes(20)
    desc = layout.blob(bad, _LAYER_TYPES["zstd"])
    config = layout.blob(
        json.dumps(image_config([sha256(tar)])).encode(), "application/vnd.oci.image.config.v1+json"
    )
    manifest = {"schemaVersion": 2, "config": config, "layers": [desc]}
    mdesc = layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    image = open_image(layout.top([mdesc]))
    with pytest.raises((UnsafeArchive, ProvisionError), match=r"layer 1/1|zstd|digest"):
        apply_into(image, tmp_path)


def test_zstd_layers_need_the_zstd_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "img")
    tar = layer_tar([M("a")])
    # Any bytes will do: the check comes before any decompression.
    desc = layout.blob(b"\x28\xb5\x2f\xfd-not-really", _LAYER_TYPES["zstd"])
    config = layout.blob(
        json.dumps(image_config([sha256(tar)])).encode(), "application/vnd.oci.image.config.v1+json"
    )
    manifest = {"schemaVersion": 2, "config": config, "layers": [desc]}
    mdesc = layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    monkeypatch.setattr(oci, "_ZSTD", "zstd-is-not-installed-here")
    with pytest.raises(ProvisionError, match=r"layer 1 \(sha256:.*\) is zstd-compressed") as info:
        open_image(layout.top([mdesc]))
    assert info.value.hint is not None and "install zstd" in info.value.hint


def test_docker_save_archive(tmp_path: Path) -> None:
    base = layer_tar([M("etc", "dir"), M("etc/os-release", data=b"ID=test\n")])
    same = layer_tar([M("repeated", data=b"r")])
    archive = docker_save(tmp_path / "app.tar", [base, same, same])
    image = open_image(archive)
    assert image.format == "docker" and image.manifest_digest is None
    assert [layer.diff_id for layer in image.layers] == [sha256(base), sha256(same), sha256(same)]
    assert image.config.entrypoint == ("/bin/entry",)
    rootfs, report = apply_into(image, tmp_path)
    assert (rootfs / "etc/os-release").read_bytes() == b"ID=test\n"
    assert (rootfs / "repeated").read_bytes() == b"r"
    assert report.layers == 3
    # The same config read from an OCI layout gives the same store digest.
    layout = Layout(tmp_path / "layout")
    desc = layout.image([base, same, same])
    assert oci_builder_digest_inputs(open_image(layout.top([desc]))) == oci_builder_digest_inputs(
        image
    )


def test_docker_save_gzipped_and_tag_selection(tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "app.tar", [layer_tar([M("a")])], tags=["app:1", "app:2"])
    gz = tmp_path / "app.tar.gz"
    gz.write_bytes(gzip.compress(archive.read_bytes()))
    image = open_image(gz, ref="app:2")
    assert len(image.layers) == 1
    with pytest.raises(UsageError, match="no image tagged 'app:3'"):
        open_image(gz, ref="app:3")


def test_docker_save_layer_must_match_diff_id(tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "app.tar", [layer_tar([M("a", data=b"1")])])
    # Rewrite the archive with a different layer but the same config.
    with tarfile.open(archive) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf]  # type: ignore[union-attr]
    evil = layer_tar([M("a", data=b"2")])
    with tarfile.open(archive, "w") as tf:
        for info, data in members:
            if info.name.endswith("layer.tar"):
                data, info.size = evil, len(evil)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ProvisionError, match="does not match its config"):
        open_image(archive)


@pytest.mark.parametrize("layer_name", ["../../etc/passwd", "/etc/passwd", "a/../../x"])
def test_docker_save_names_cannot_leave_the_archive(tmp_path: Path, layer_name: str) -> None:
    tar = layer_tar([M("a")])
    config = json.dumps(image_config([sha256(tar)])).encode()
    manifest = [{"Config": "c.json", "RepoTags": None, "Layers": [layer_name]}]
    path = tmp_path / "img"
    path.mkdir()
    (path / "c.json").write_bytes(config)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProvisionError, match=r"invalid file name|leaves the image"):
        open_image(path)


def test_docker_save_link_cannot_leave_the_archive(tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "app.tar", [layer_tar([M("a")])])
    with tarfile.open(archive) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf]  # type: ignore[union-attr]
    with tarfile.open(archive, "w") as tf:
        for info, data in members:
            if info.name.endswith("layer.tar"):
                info.type, info.linkname, info.size, data = tarfile.SYMTYPE, "../../x", 0, None
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ProvisionError, match="leaves the image"):
        open_image(archive)


def test_artifacts_are_not_images(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    config = layout.blob(b"{}", "application/vnd.cncf.helm.config.v1+json")
    chart = layout.blob(b"chart", "application/vnd.cncf.helm.chart.content.v1.tar+gzip")
    manifest = {"schemaVersion": 2, "config": config, "layers": [chart]}
    desc = layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    with pytest.raises(ProvisionError, match="is not a container image"):
        open_image(layout.top([desc]))


def test_oci_archive_tar(tmp_path: Path) -> None:
    path = oci_layout(tmp_path / "img", [[M("a", data=b"from the tar")]])
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(path, arcname=".")
    rootfs, _ = apply_into(open_image(archive), tmp_path)
    assert (rootfs / "a").read_bytes() == b"from the tar"


# --------------------------------------------------------------------------- applying


def apply_stack(
    tmp_path: Path, layers: Sequence[Sequence[M]], **kw: object
) -> tuple[Path, ApplyReport]:
    image = open_image(oci_layout(tmp_path / "img", layers, **kw))  # type: ignore[arg-type]
    return apply_into(image, tmp_path)


def test_layers_apply_in_order_with_attributes(tmp_path: Path) -> None:
    rootfs, report = apply_stack(
        tmp_path,
        [
            [
                M(".", "dir", mode=0o755),
                M("etc", "dir", mode=0o755),
                M("etc/motd", data=b"one"),
                M("etc/keep", data=b"keep", mode=0o600, uid=1000, gid=1001),
                M("tmp", "dir", mode=0o1777),
                M("usr/bin/su", data=b"#!", mode=0o4755),
                M("srv", "dir", mode=0o2750, uid=33, gid=33, mtime=T0 + 5),
            ],
            [M("etc/motd", data=b"two", mtime=T0 + 1), M("srv/app", data=b"x")],
        ],
    )
    assert (rootfs / "etc/motd").read_bytes() == b"two"
    assert (rootfs / "etc/motd").stat().st_mtime_ns == (T0 + 1) * 10**9
    assert (rootfs / "etc/keep").read_bytes() == b"keep"
    assert stat.S_IMODE((rootfs / "etc/keep").stat().st_mode) == 0o600
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((rootfs / "usr/bin/su").stat().st_mode) == 0o4755
    srv = (rootfs / "srv").stat()
    assert stat.S_IMODE(srv.st_mode) == 0o2750
    # Written into by layer 2, still carries its own mtime.
    assert srv.st_mtime_ns == (T0 + 5) * 10**9
    assert stat.S_IMODE((rootfs / "usr").stat().st_mode) == 0o755  # implicit parent
    assert report.layers == 2 and report.entries == 9 and report.bytes == 3 + 4 + 2 + 3 + 1
    if IS_ROOT:
        assert report.ownership_kept
        keep = (rootfs / "etc/keep").stat()
        assert (keep.st_uid, keep.st_gid) == (1000, 1001)
        assert (srv.st_uid, srv.st_gid) == (33, 33)


def test_without_root_ownership_is_reported_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    _, report = apply_stack(tmp_path, [[M("f", uid=1000)]])
    assert not report.ownership_kept
    assert any("ownership not kept" in note for note in report.notes)


def test_whiteouts_remove_lower_entries(tmp_path: Path) -> None:
    rootfs, report = apply_stack(
        tmp_path,
        [
            [
                M("a/x", data=b"x"),
                M("a/y", data=b"y"),
                M("b/c/d", data=b"d"),
                M("link", "symlink", target="/b"),
            ],
            [M("a/.wh.x"), M(".wh.b"), M(".wh.link"), M("a/.wh.never-existed"), M("nowhere/.wh.z")],
        ],
    )
    assert sorted(p.name for p in rootfs.iterdir()) == ["a"]
    assert sorted(p.name for p in (rootfs / "a").iterdir()) == ["y"]
    assert report.whiteouts == 5


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_hides_lower_children_only(tmp_path: Path, marker_first: bool) -> None:
    upper = [M("d", "dir"), M("d/new", data=b"n"), M("d/sub/fresh", data=b"f")]
    marker = M("d/.wh..wh..opq")
    upper = [upper[0], marker, *upper[1:]] if marker_first else [*upper, marker]
    rootfs, _ = apply_stack(
        tmp_path,
        [
            [M("d/old", data=b"o"), M("d/sub/old2", data=b"o"), M("e/stay", data=b"s")],
            upper,
        ],
    )
    found = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    assert found == ["d", "d/new", "d/sub", "d/sub/fresh", "e", "e/stay"]


def test_whiteout_spares_entries_of_its_own_layer(tmp_path: Path) -> None:
    rootfs, _ = apply_stack(
        tmp_path,
        [
            [M("a/x", data=b"old"), M("a/y", data=b"old")],
            [M("a/x", data=b"new"), M("a/.wh.x"), M("dir/keep", data=b"k"), M(".wh.dir")],
        ],
    )
    assert (rootfs / "a/x").read_bytes() == b"new"
    assert (rootfs / "dir/keep").read_bytes() == b"k"


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    rootfs, report = apply_stack(tmp_path, [[M(".wh..wh.plnk", "dir"), M(".wh..wh.aufs")]])
    assert list(rootfs.iterdir()) == []
    assert len(report.skipped) == 2 and "AUFS" in report.skipped[0]


def test_entries_replace_what_lower_layers_had(tmp_path: Path) -> None:
    rootfs, _ = apply_stack(
        tmp_path,
        [
            [M("d/inner", data=b"i"), M("f", data=b"file"), M("s", "symlink", target="/x")],
            [M("d", data=b"now a file"), M("f", "dir"), M("f/child", data=b"c"), M("s", "dir")],
        ],
    )
    assert (rootfs / "d").read_bytes() == b"now a file"
    assert (rootfs / "f/child").read_bytes() == b"c"
    assert (rootfs / "s").is_dir() and not (rootfs / "s").is_symlink()


def test_absolute_symlinks_are_stored_not_followed(tmp_path: Path, outside: Path) -> None:
    before = snapshot(outside)
    rootfs, _ = apply_stack(
        tmp_path,
        [
            [
                M("usr/bin", "dir"),
                M("bin", "symlink", target="usr/bin"),
                M("etc/alternatives/editor", "symlink", target="/usr/bin/vi"),
                M("host", "symlink", target=str(outside)),
                M("up", "symlink", target="../../.."),
            ],
            [M("usr/bin/tool", data=b"t")],
        ],
    )
    assert os.readlink(rootfs / "bin") == "usr/bin"
    assert os.readlink(rootfs / "etc/alternatives/editor") == "/usr/bin/vi"
    assert os.readlink(rootfs / "host") == str(outside)
    assert os.readlink(rootfs / "up") == "../../.."
    assert (rootfs / "bin").lstat().st_mtime_ns == T0 * 10**9
    assert (rootfs / "usr/bin/tool").read_bytes() == b"t"
    assert snapshot(outside) == before


def test_a_directory_entry_replaces_a_planted_symlink(tmp_path: Path, outside: Path) -> None:
    before = snapshot(outside)
    rootfs, _ = apply_stack(
        tmp_path,
        [[M("etc", "symlink", target=str(outside))], [M("etc", "dir"), M("etc/passwd", data=b"x")]],
    )
    assert (rootfs / "etc").is_dir() and not (rootfs / "etc").is_symlink()
    assert (rootfs / "etc/passwd").read_bytes() == b"x"
    assert snapshot(outside) == before


def test_hardlinks_within_and_across_layers(tmp_path: Path) -> None:
    rootfs, _ = apply_stack(
        tmp_path,
        [
            [
                M("usr/bin/perl", data=b"perl"),
                M("usr/bin/perl5", "hardlink", target="usr/bin/perl"),
            ],
            [
                M("usr/bin/perl6", "hardlink", target="./usr/bin/perl"),
                M("usr/bin/perl", data=b"new"),
            ],
        ],
    )
    # Replacing a hardlinked file recreates it: its other names keep the old content.
    assert (rootfs / "usr/bin/perl").read_bytes() == b"new"
    assert (rootfs / "usr/bin/perl5").read_bytes() == b"perl"
    assert (rootfs / "usr/bin/perl6").stat().st_ino == (rootfs / "usr/bin/perl5").stat().st_ino


def test_device_nodes_and_fifos_are_skipped(tmp_path: Path) -> None:
    rootfs, report = apply_stack(
        tmp_path,
        [[M("dev", "dir"), M("dev/null", "chr"), M("dev/sda", "blk"), M("run/pipe", "fifo")]],
    )
    assert list((rootfs / "dev").iterdir()) == []
    assert not (rootfs / "run/pipe").exists()
    assert len(report.skipped) == 3
    assert "dev/null (device node)" in report.skipped[0]
    assert report.skipped[0].startswith("sha256:")
    assert "run/pipe (FIFO)" in report.skipped[2]


def test_xattrs_are_reported_not_applied(tmp_path: Path) -> None:
    _, report = apply_stack(
        tmp_path, [[M("usr/bin/ping", pax={"SCHILY.xattr.security.capability": "x"})]]
    )
    assert any("usr/bin/ping" in note and "extended attributes" in note for note in report.notes)


def test_rootfs_must_be_an_empty_directory(tmp_path: Path) -> None:
    image = open_image(oci_layout(tmp_path / "img", [[M("a")]]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(UsageError, match="not empty"):
        apply_layers(image, tmp_path / "full")
    with pytest.raises(UsageError, match="does not exist"):
        apply_layers(image, tmp_path / "absent")


def test_limits(tmp_path: Path) -> None:
    image = open_image(oci_layout(tmp_path / "img", [[M("a", data=b"12345")], [M("b", data=b"6")]]))
    with pytest.raises(UnsafeArchive, match=r"layer 2/2 .*exceed 5 bytes"):
        apply_into(image, tmp_path, limits=ExtractLimits(max_bytes=5))


# -- refusals


def planted(outside: Path) -> list[M]:
    return [M("etc", "symlink", target=str(outside))]


REFUSALS: dict[str, tuple[list[list[M]], str]] = {
    "dotdot": ([[M("../evil", data=b"x")]], "contains '..'"),
    "dotdot-inside": ([[M("a/../../evil", data=b"x")]], "contains '..'"),
    "absolute": ([[M("/evil", data=b"x")]], "is absolute"),
    "through-planted-symlink": (
        [[M("etc", "symlink", target="@OUT")], [M("etc/passwd", data=b"pwned")]],
        "path goes through the symlink 'etc'",
    ),
    "through-symlink-same-layer": (
        [[M("etc", "symlink", target="@OUT"), M("etc/passwd", data=b"pwned")]],
        "path goes through the symlink 'etc'",
    ),
    "dir-through-symlink": (
        [[M("etc", "symlink", target="@OUT")], [M("etc/sub", "dir")]],
        "path goes through the symlink 'etc'",
    ),
    "symlink-through-symlink": (
        [[M("etc", "symlink", target="@OUT")], [M("etc/passwd", "symlink", target="/x")]],
        "path goes through the symlink 'etc'",
    ),
    "whiteout-through-symlink": (
        [[M("etc", "symlink", target="@OUT")], [M("etc/.wh.passwd")]],
        "path goes through the symlink 'etc'",
    ),
    "opaque-through-symlink": (
        [[M("etc", "symlink", target="@OUT")], [M("etc/.wh..wh..opq")]],
        "path goes through the symlink 'etc'",
    ),
    "hardlink-through-symlink": (
        [[M("etc", "symlink", target="@OUT")], [M("stolen", "hardlink", target="etc/passwd")]],
        "path goes through the symlink 'etc'",
    ),
    "hardlink-absolute": ([[M("stolen", "hardlink", target="@OUT/passwd")]], "is absolute"),
    "hardlink-dotdot": ([[M("stolen", "hardlink", target="../outside/passwd")]], "contains '..'"),
    "hardlink-not-yet": (
        [[M("early", "hardlink", target="late"), M("late", data=b"x")]],
        "does not exist",
    ),
    "hardlink-to-directory": ([[M("d", "dir"), M("l", "hardlink", target="d")]], "not a file"),
    "whiteout-dotdot": ([[M("a/.wh...")]], "whiteout of '..'"),
    "whiteout-dot": ([[M("a/.wh..")]], "whiteout of '.'"),
    "whiteout-as-directory": ([[M(".wh.a/x", data=b"x")]], "is a whiteout, not a directory"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_layer_and_member(tmp_path: Path, outside: Path, case: str) -> None:
    layers, reason = REFUSALS[case]
    layers = [
        [
            M(
                m.name.replace("@OUT", str(outside)),
                m.kind,
                m.data,
                m.target.replace("@OUT", str(outside)),
            )
            for m in layer
        ]
        for layer in layers
    ]
    image = open_image(oci_layout(tmp_path / "img", layers))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    before = snapshot(tmp_path, skip=rootfs)
    with pytest.raises(UnsafeArchive) as info:
        apply_layers(image, rootfs)
    message = str(info.value)
    assert reason in message
    failing = len(layers)  # every case fails in its last layer
    assert f"layer {failing}/{len(layers)} ({image.layers[failing - 1].digest})" in message
    assert "member '" in message
    assert snapshot(tmp_path, skip=rootfs) == before
    assert (outside / "passwd").read_text() == "host secret\n"


def test_refusal_of_a_gzip_bomb_like_trailer(tmp_path: Path) -> None:
    tar = layer_tar([M("a")]) + bytes(2 * oci._MAX_TRAILER)
    layout = Layout(tmp_path / "img")
    desc = layout.image([tar])
    image = open_image(layout.top([desc]))
    with pytest.raises(UnsafeArchive, match="after the end of the tar"):
        apply_into(image, tmp_path)


def test_corrupt_gzip_layer(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "img")
    tar = layer_tar([M("a", data=os.urandom(4000))])
    blob = gzip.compress(tar, mtime=0)[:-30]  # truncated stream
    desc = layout.blob(blob, _LAYER_TYPES["gzip"])
    config = layout.blob(
        json.dumps(image_config([sha256(tar)])).encode(), "application/vnd.oci.image.config.v1+json"
    )
    manifest = {"schemaVersion": 2, "config": config, "layers": [desc]}
    mdesc = layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    image = open_image(layout.top([mdesc]))
    with pytest.raises(UnsafeArchive, match=r"layer 1/1 .*(corrupt gzip|malformed)"):
        apply_into(image, tmp_path)


# --------------------------------------------------------------------------- property


# No "/" or host paths: a bug would then write to the host (as root).  "@OUT" is
# the sentinel directory outside the rootfs; following any link shows up there.
_LINK_TARGETS = ["@OUT", "@OUT/passwd", "@OUT/new", "..", "../..", "a", "etc/passwd"]


def _join(parts: list[str]) -> str:
    return "/".join(parts)


_benign = st.lists(st.sampled_from(["a", "b", "etc"]), min_size=1, max_size=3).map(_join)
_whiteouts = st.builds(
    lambda parts, last: _join([*parts, last]),
    st.lists(st.sampled_from(["a", "b", "etc"]), max_size=2),
    st.sampled_from([".wh.a", ".wh.b", ".wh.etc", ".wh..wh..opq"]),
)
_hostile = st.one_of(
    st.lists(st.sampled_from(["a", "etc", "..", ".", ".wh.a", ""]), min_size=1, max_size=3).map(
        _join
    ),
    _benign.map(lambda name: "/" + name),
)
# Mostly plausible names, so that stacks get far enough to plant and use symlinks.
member_names = st.integers(0, 11).flatmap(
    lambda i: _benign if i < 8 else _whiteouts if i < 11 else _hostile
)
members = st.builds(
    M,
    name=member_names,
    kind=st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "chr"]),
    data=st.sampled_from([b"", b"pwned"]),
    target=st.sampled_from(_LINK_TARGETS) | member_names,
    mode=st.sampled_from([None, 0o4755, 0o000, 0o1777]),
)


def _refusal_kind(message: str) -> str:
    """The reason of a refusal without names, for hypothesis' statistics."""
    return re.sub(r"'[^']*'|\([^)]*\)|\d+", "_", message.split(": member ", 1)[-1])[:60]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stack=st.lists(st.lists(members, min_size=1, max_size=6), min_size=1, max_size=3))
def test_random_layer_stacks_never_write_outside_the_rootfs(
    tmp_path_factory: pytest.TempPathFactory, stack: list[list[M]]
) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        # Deep enough that no '..' chain in a target can climb out of base.
        work = base / "w1" / "w2" / "w3" / "w4"
        work.mkdir(parents=True)
        out = base / "outside"
        out.mkdir()
        (out / "passwd").write_text("host secret\n")
        layers = [
            [
                M(
                    m.name.replace("@OUT", str(out)),
                    m.kind,
                    m.data,
                    m.target.replace("@OUT", str(out)),
                )
                for m in layer
            ]
            for layer in stack
        ]
        image = open_image(oci_layout(work / "img", layers, compression="none"))
        rootfs = work / "rootfs"
        rootfs.mkdir()
        before = snapshot(base, skip=rootfs)
        try:
            apply_layers(image, rootfs)
            event("applied")
        except UnsafeArchive as exc:
            event("refused: " + _refusal_kind(str(exc)))
        assert snapshot(base, skip=rootfs) == before
        for dirpath, dirnames, filenames in os.walk(rootfs):
            for name in dirnames + filenames:
                assert not name.startswith(".wh."), "a whiteout was materialised"
                mode = os.lstat(Path(dirpath, name)).st_mode
                assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), "a device node was made"
    finally:
        shutil.rmtree(base)
