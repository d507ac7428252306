"""From an :class:`~stoker.images.spec.ImageSpec` to a published image.

:class:`SpecBuilder` is the one :class:`~stoker.images.base.ImageBuilder` for
``debian:``, ``ubuntu:``, ``oci:`` and ``nix:`` bases; NixOS bases go to
:class:`stoker.images.nixos.NixosBuilder`.  :func:`builder_for` picks one.

A build runs these steps, each logged, the long ones reported through
``progress``:

1. fetch and verify every artifact (before anything slow: a wrong checksum
   fails in seconds, and publishes nothing);
2. the base: ``mmdebstrap`` (:mod:`~stoker.images.debian`), the OCI layers
   (:mod:`~stoker.images.oci`), or a Nix closure over ``mmdebstrap``'s tree
   (:mod:`~stoker.images.nix`: built first, so a failing flake costs no bootstrap);
3. ``users``, ``files``, ``artifacts``, ``env``, ``run``
   (:mod:`~stoker.images.customize`);
4. mount points, host name, python check (:mod:`~stoker.images.tree`);
5. the size limit, then packing (:mod:`~stoker.images.pack`).

The image digest covers the normalised spec, :data:`BUILDER_VERSION` and the
digests of what the spec points at: the kernel, each file's content, the
OCI base's config digest and a Nix base's flake identity and output path
(:func:`stoker.images.spec.spec_digest`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stoker.errors import ProvisionError, UsageError
from stoker.images import debian
from stoker.images.base import ImageBuilder, log_line, remove_tree
from stoker.images.customize import (
    apply_artifacts,
    apply_files,
    apply_users,
    check_size_limit,
    run_steps,
    write_env,
)
from stoker.images.fetch import DownloadProgress, FetchedArtifact, fetch_artifact
from stoker.images.host_artifacts import resolve_artifacts
from stoker.images.pack import DEFAULT_COMPRESSION, PackOptions, pack_tree
from stoker.images.spec import (
    AUTO_KERNEL,
    DEFAULT_KERNEL,
    ImageSpec,
    collect_input_digests,
    file_sha256,
    spec_digest,
    to_debian_spec,
)
from stoker.images.tree import installed_packages, prepare_tree, resolve_in_tree
from stoker.paths import Dirs

if TYPE_CHECKING:
    from stoker.images.nix import NixOutput

#: Bump whenever a change in the build pipeline alters the image for the same spec.
BUILDER_VERSION = f"spec-1+debian-{debian.BUILDER_VERSION}"
#: Every file in every image gets this timestamp (Debian 12's release date).
SOURCE_DATE_EPOCH = debian.BOOKWORM_RELEASE_EPOCH

Say = Callable[[str], None]


@dataclass(frozen=True)
class KernelRef:
    """The kernel an image is made for, as recorded in its manifest."""

    #: ``"debian-cloud"``, ``"stoker-microvm"``, ``"auto"`` or ``"path"``.
    kind: str
    #: Identity entering the image digest.
    digest: str
    #: For ``"path"``: the kernel image file.
    path: Path | None = None
    #: Human-readable detail (package and version, or the file).
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"kind": self.kind, "digest": self.digest, "detail": self.detail}
        if self.path is not None:
            doc["path"] = str(self.path)
        return doc


def resolve_kernel(spec: ImageSpec, dirs: Dirs, *, progress: Say | None = None) -> KernelRef:
    """Find (provisioning it if needed) the kernel ``spec`` names.

    ``stoker-microvm`` is built on first use (minutes; cached afterwards).
    Raises :class:`ProvisionError` for a kernel file that cannot be read.
    """
    if spec.kernel == DEFAULT_KERNEL:
        from stoker.kernel import provision_kernel

        kernel = provision_kernel(dirs, progress=progress)
        return KernelRef(
            kind=DEFAULT_KERNEL,
            digest=f"{kernel.package}={kernel.version}",
            detail=f"{kernel.package} {kernel.version}",
        )
    if spec.kernel == AUTO_KERNEL:
        # Chosen at each boot (see stoker.artifacts): the image's content does not
        # depend on it, and snapshots are keyed by the kernel actually booted.
        return KernelRef(
            kind=AUTO_KERNEL,
            digest=AUTO_KERNEL,
            detail="stoker-microvm once built (stoker kernel build), else debian-cloud",
        )
    if spec.kernel == "stoker-microvm":
        from stoker.kernel.build import KERNEL_NAME, build_microvm_kernel

        built = build_microvm_kernel(dirs, progress=progress)
        return KernelRef(
            kind=KERNEL_NAME,
            digest=f"{KERNEL_NAME}={built.digest}",
            detail=f"{KERNEL_NAME} {built.release} ({built.source.package} {built.source.version})",
        )
    path = Path(spec.kernel)
    try:
        digest = file_sha256(path)
    except UsageError as exc:
        raise ProvisionError(str(exc)) from None
    return KernelRef(kind="path", digest=f"sha256:{digest}", path=path, detail=str(path))


def pack_options(spec: ImageSpec) -> PackOptions:
    """How ``spec``'s tree is packed (format, compression, fixed timestamps)."""
    return PackOptions(
        format=spec.format,
        compression=spec.compression or DEFAULT_COMPRESSION[spec.format],
        source_date_epoch=SOURCE_DATE_EPOCH,
    )


class SpecBuilder:
    """Builds an image from a spec with a ``debian:``, ``ubuntu:``, ``oci:`` or ``nix:`` base."""

    def __init__(
        self,
        spec: ImageSpec,
        *,
        kernel: KernelRef,
        overrides: Mapping[str, Path] | None = None,
        environ: Mapping[str, str] | None = None,
        progress: Say | None = None,
        download_progress: DownloadProgress | None = None,
        dirs: Dirs | None = None,
        etc_apt: Path = Path("/etc/apt"),
    ) -> None:
        if spec.base_kind == "nixos":
            raise UsageError(f"image {spec.name!r}: nixos bases are built by NixosBuilder")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {a.name for a in spec.artifacts})
        if unknown:
            names = ", ".join(a.name for a in spec.artifacts) or "none"
            raise UsageError(
                f"--artifact {unknown[0]}: image {spec.name!r} has no artifact of that name",
                hint=f"its artifacts: {names}",
            )
        self._environ = dict(os.environ if environ is None else environ)
        # Artifacts the spec does not pin are pinned now: their bytes enter the digest.
        resolution = resolve_artifacts(spec, overrides=overrides, environ=self._environ)
        spec = resolution.spec
        self._resolved = resolution.sources
        self._notes = resolution.notes
        self.spec = spec
        self.name = spec.name
        self.kernel = kernel
        self.dirs = dirs or Dirs.from_env()
        self._overrides = overrides
        self._say: Say = progress or (lambda _msg: None)
        self._download_progress = download_progress
        self._etc_apt = etc_apt
        self._pack = pack_options(spec)
        self._oci = None
        self._nix: NixOutput | None = None
        base_digest = None
        if spec.base_kind == "oci":
            from stoker.images.oci import open_image

            # Layers are checked while they are applied; a cache hit needs only
            # the config digest, not a read of the whole image.
            self._oci = open_image(Path(spec.base_ref), verify_layers=False)
            base_digest = self._oci.digest
        elif spec.base_kind == "nix":
            from stoker.images.nix import describe_nix_base

            # An evaluation, not a build: a cache hit costs no `nix build`.
            self._nix = describe_nix_base(spec.base_ref, environ=self._environ)
            base_digest = self._nix.digest()
        inputs = collect_input_digests(spec, kernel=kernel.digest, base=base_digest)
        self._digest = spec_digest(spec, input_digests=inputs, builder_version=BUILDER_VERSION)

    def __repr__(self) -> str:
        return f"SpecBuilder({self.spec.name!r}, base={self.spec.base!r})"

    def spec_digest(self) -> str:
        return self._digest

    def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
        spec = self.spec
        say = self._say
        started = time.monotonic()
        steps: dict[str, float] = {}

        def step(name: str, t0: float) -> None:
            steps[name] = round(time.monotonic() - t0, 3)

        # 1. artifacts first: a bad checksum must not cost a bootstrap.
        t = time.monotonic()
        fetched: list[FetchedArtifact] = []
        for note in self._notes:
            say(note)
            log_line(log, note)
        for artifact in spec.artifacts:
            say(f"fetching artifact {artifact.name}")
            local = self._overrides.get(artifact.name) or self._resolved.get(artifact.name)
            got = fetch_artifact(
                artifact,
                cache=self.dirs.cache,
                log=log,
                override=local,
                environ=self._environ,
                progress=self._download_progress,
            )
            if artifact.name in self._resolved and artifact.name not in self._overrides:
                got = dataclasses.replace(got, source=f"host:{self._resolved[artifact.name]}")
            fetched.append(got)
        step("artifacts", t)

        tree = workdir / "tree"
        try:
            # 2. the base
            t = time.monotonic()
            base_info = self._base(tree, workdir, log)
            step("base", t)
            # 3. the spec's customisations, in the documented order
            t = time.monotonic()
            if spec.users:
                say(f"creating {len(spec.users)} user(s)")
            apply_users(tree, spec.users, log=log, epoch=SOURCE_DATE_EPOCH)
            apply_files(tree, spec.files, log=log)
            apply_artifacts(tree, fetched, log=log)
            write_env(tree, spec.env)
            step("customise", t)
            t = time.monotonic()
            run_steps(tree, spec, log=log, epoch=SOURCE_DATE_EPOCH, say=say)
            step("run", t)
            # 4. fit to boot
            prepare_tree(tree, spec.agent.python)
            status = resolve_in_tree(tree, "/var/lib/dpkg/status")
            packages = (
                installed_packages(status.read_text(errors="replace"))
                if status is not None and status.is_file()
                else []
            )
            # 5. size limit, then pack
            t = time.monotonic()
            say(f"packing the root filesystem as {self._pack.format}")
            from stoker.images.pack import tree_stats

            check_size_limit(spec, tree_stats(tree).bytes)
            stats = pack_tree(self._pack, tree, rootfs_out, digest=self._digest, log=log)
            step("pack", t)
        finally:
            remove_tree(tree, log=log)
        log_line(log, f"built in {time.monotonic() - started:.1f}s: {steps}")
        return {
            "builder": "spec",
            "builder_version": BUILDER_VERSION,
            "spec": spec.model_dump(mode="json"),
            "base": base_info,
            "fstype": self._pack.format,
            "pack": self._pack.to_json(),
            "python": spec.agent.python,
            "packages": packages,
            "uncompressed_size": stats.bytes,
            "entries": stats.entries,
            "source_date_epoch": SOURCE_DATE_EPOCH,
            "kernel": self.kernel.to_json(),
            "env": dict(spec.env),
            # Limits an image does not set are left out, as from its digest.
            "defaults": spec.defaults.model_dump(mode="json", exclude_none=True),
            **({"network": spec.network.model_dump(mode="json")} if spec.network else {}),
            "artifacts": [
                {
                    "name": f.artifact.name,
                    "sha256": f.artifact.sha256,
                    "source": f.source,
                    **({"version": f.artifact.version} if f.artifact.version else {}),
                }
                for f in fetched
            ],
            "step_seconds": steps,
        }

    def _base(self, tree: Path, workdir: Path, log: Path) -> dict[str, object]:
        spec = self.spec
        if self._oci is not None:
            from stoker.images.oci import apply_layers

            self._say(f"applying {len(self._oci.layers)} OCI layer(s)")
            tree.mkdir(mode=0o755)
            report = apply_layers(self._oci, tree)
            log_line(
                log,
                f"applied {report.layers} layers: {report.entries} entries, {report.bytes} bytes,"
                f" {report.whiteouts} whiteouts; skipped: {list(report.skipped)}",
            )
            return {
                "kind": "oci",
                "source": str(self._oci.source),
                "image_digest": self._oci.digest,
                "platform": self._oci.platform,
                "layers": report.layers,
                "skipped": list(report.skipped),
            }
        closure: list[str] = []
        if self._nix is not None:
            from stoker.images.nix import build_output, check_closure_size

            self._say(f"building {self._nix.attr} with nix build")
            closure = build_output(self._nix, workdir=workdir, environ=self._environ, log=log)
            check_closure_size(closure, image=spec.name, limit_mb=spec.size_limit)
        deb = to_debian_spec(spec)
        self._say(f"installing {len(deb.packages)} packages with mmdebstrap ({spec.base})")
        sources = debian.bootstrap(
            deb,
            tree,
            workdir,
            log,
            distribution="debian" if self._nix is not None else spec.base_kind,
            etc_apt=self._etc_apt,
        )
        info: dict[str, object] = {
            "kind": spec.base_kind,
            "suite": deb.suite,
            "apt_sources": sources,
        }
        if self._nix is not None:
            from stoker.images.nix import install_closure

            self._say(f"copying {len(closure)} store paths into /nix/store")
            commands = install_closure(tree, closure, self._nix.out_path)
            log_line(log, f"nix closure: {len(closure)} paths; commands: {commands}")
            info.update(self._nix.to_json(), store_paths=closure, commands=commands)
        return info


def builder_for(
    spec: ImageSpec,
    *,
    dirs: Dirs,
    overrides: Mapping[str, Path] | None = None,
    environ: Mapping[str, str] | None = None,
    progress: Say | None = None,
    download_progress: DownloadProgress | None = None,
) -> ImageBuilder:
    """The builder for ``spec``: resolves its kernel and base, computes its digest.

    Cheap on a warm cache (hashes the spec's files and reads the kernel record),
    so building an image that is already stored returns in well under a second.
    """
    if spec.base_kind == "nixos":
        from stoker.images.nixos import (
            NixosBuilder,
            check_nixos_spec,
            nixos_base_digest,
            nixos_builder_version,
        )

        check_nixos_spec(spec)
        # The configuration brings its own kernel: it is covered by the base digest.
        inputs = collect_input_digests(
            spec, kernel="nixos-configuration", base=nixos_base_digest(spec.base_ref)
        )
        digest = spec_digest(spec, input_digests=inputs, builder_version=nixos_builder_version())
        return NixosBuilder(spec, name=spec.name, digest=digest, environ=environ)
    kernel = resolve_kernel(spec, dirs, progress=progress)
    return SpecBuilder(
        spec,
        kernel=kernel,
        overrides=overrides,
        environ=environ,
        progress=progress,
        download_progress=download_progress,
        dirs=dirs,
    )


def default_builder(dirs: Dirs, *, progress: Say | None = None) -> ImageBuilder:
    """The builder of the embedded default image (the shipped ``default`` spec)."""
    from stoker.images.catalog import load_specs

    spec = load_specs("default")["default"]
    return builder_for(spec, dirs=dirs, progress=progress)
