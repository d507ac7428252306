"""Declarative image specs: TOML files parsed into frozen, validated models.

A spec describes *what* goes into an image; builders (:mod:`stoker.images.debian`
and later ones) decide *how*.  Everything here is pure: parsing, validation, the
digest and the mapping onto :class:`~stoker.images.debian.DebianSpec`.  Nothing
is downloaded or built, but every mistake a spec can contain is reported here,
before any work starts.

This module holds the models and the loading; the field types and validators
are in :mod:`stoker.images.spec_fields`, the location and wording of errors in
:mod:`stoker.images.spec_errors` and the digests in :mod:`stoker.images.spec_digest`
(their public names are importable from here too).

File format
-----------
A spec file holds either **one image**, with its keys at the top level::

    name = "python"                 # required in this form
    base = "debian:bookworm"
    packages = ["python3-pip", "python3-venv"]

or **several images** in a project file, one ``[image.NAME]`` table each (the
name comes from the table header; a ``name`` key inside is an error)::

    [image.ci]
    base = "debian:bookworm"
    packages = ["git"]

    [[image.ci.files]]
    src = "ci/gitconfig"
    dest = "/etc/gitconfig"

    [image.docs]
    base = "debian:trixie"

Keys of an image (all but ``base`` are optional):

``base``
    ``"debian:bookworm"``, ``"debian:trixie"``, ``"ubuntu:noble"``,
    ``"oci:PATH"`` (an OCI image layout directory or a ``docker save`` archive on
    disk), ``"nixos:FLAKEREF#ATTR"`` (a ``nixosConfiguration``) or
    ``"nix:FLAKEREF#ATTR"`` (a derivation whose closure is layered into a Debian
    bookworm userland as ``/nix/store``, its ``bin/`` on ``PATH``; see
    :mod:`stoker.images.nix`).  A local flake reference starts with ``.`` or ``/``.
``packages``
    Debian package names (policy 5.6.1 syntax, optionally ``:arch`` and
    ``=version``).  Order and duplicates do not matter: the list is sorted and
    de-duplicated.  Debian bases always get :data:`~stoker.images.debian.DEFAULT_PACKAGES`
    too (the guest agent needs python3).
``files``
    Tables ``{src = "host/path", dest = "/guest/path", mode = "0644"}``.  ``src``
    is relative to the spec file, must be a regular file and must stay inside the
    spec file's directory (a spec from an untrusted checkout cannot copy your
    ``~/.ssh`` into an image).  ``dest`` is absolute without ``..``; ``mode`` is a
    quoted octal string (default ``"0644"``).  After loading, ``src`` holds the
    resolved absolute path.
``env``
    A table of variable name -> string, set in VMs made from the image and
    exported to ``run`` steps.
``users``
    Tables ``{name, uid, groups = [], shell = "/bin/bash"}``; ``uid`` is optional
    (next free one).
``run``
    Shell commands executed in the new root at build time, in order.
``size_limit``
    Maximum uncompressed size of the root filesystem, e.g. ``"2G"``.
``kernel``
    ``"debian-cloud"`` (default: the provisioned Debian cloud kernel),
    ``"stoker-microvm"`` (a kernel built by stoker, built on first use),
    ``"auto"`` (stoker-microvm once ``stoker kernel build`` has built it on this
    host, else debian-cloud: for images that need nothing the microVM kernel
    leaves out, such as modules, netfilter or Docker) or a path to a kernel
    image (relative to the spec file).
``format``
    The root filesystem: ``"erofs"`` (default), ``"squashfs"`` or ``"ext4"``.
``compression``
    ``"lz4hc"`` (erofs default, optionally ``"lz4hc,12"``), ``"lz4"``, ``"lzma"``,
    ``"none"``; ``"zstd"`` (squashfs default), ``"xz"``, ``"gzip"``, ``"lzo"``,
    ``"lz4"``; ext4 is uncompressed.
``[defaults]``
    ``cpus`` (default 2), ``memory`` (default ``"1G"``), ``disk`` (the writable
    layer, default ``"4G"``) for VMs made from the image.  Sizes are strings with
    a K/M/G/T suffix or integers in MiB and are stored as MiB.  Limits of each
    command's processes inside the guest: ``job_pids_limit`` (processes; a
    command that keeps hitting it, a fork bomb, is killed) and
    ``job_memory_limit`` (beyond it the guest's OOM killer ends the command);
    unset, stoker's defaults apply (1 process per MiB of guest memory, at least
    512; the guest's memory minus 128 MiB kept for the agent).
``[network]``
    The network VMs made from the image get unless the run says otherwise:
    ``mode`` (``"none"``, ``"egress"`` or ``"nat"``), ``allow`` (allowlist
    entries for egress: ``"HOST[:PORT]"``, ``"IP[/BITS][:PORT]"``, presets
    ``"@NAME"``) and ``[network.limits]`` (see :class:`stoker.net.policy.Limits`).
``[agent]``
    ``python``: absolute path of python3 in the image (default ``/usr/bin/python3``).
``[[artifacts]]``
    Remote downloads: ``{name, url, sha256, dest, extract = false, override_env}``.
    ``url`` (http or https) and a 64-hex-digit ``sha256`` are both required.
    ``extract = true`` unpacks a tar archive into the directory ``dest``.  Hosts
    that cannot reach the URL supply the bytes from a local file named by the
    environment variable ``override_env`` (default ``STOKER_ARTIFACT_<NAME>``, the
    name upper-cased with other characters turned into ``_``); the local file is
    still checked against ``sha256``: an override changes where the bytes come
    from, never which bytes are accepted.

A builder applies the keys in this order: base and ``packages``, ``users``,
``files``, ``artifacts``, ``env``, ``run``.

Errors
------
Every problem becomes one line of a :class:`~stoker.errors.UsageError`::

    project.toml:14: image 'ci': image.ci.files[2].mode: expected an octal file mode ...

naming the file, the line (tomllib reports no positions, so
:class:`~stoker.images.spec_errors._Locator` re-scans the text), the image, the
key path (array indices count from 0) and what was expected.  TOML syntax errors
keep tomllib's line and column.

Digest
------
:func:`spec_digest` hashes the normalised spec (canonical JSON, defaults filled
in, without the image name and host paths), the builder version and the digests
of the inputs the spec only points at (file contents, the kernel, an OCI or NixOS
base); artifacts are covered by their pinned ``sha256``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stoker.errors import UsageError
from stoker.images.debian import DEFAULT_PACKAGES, DebianSpec
from stoker.images.pack import COMPRESSORS
from stoker.images.spec_digest import (
    SPEC_FORMAT_VERSION,
    collect_input_digests,
    digest_document,
    file_sha256,
    required_inputs,
    spec_digest,
)
from stoker.images.spec_errors import (
    KeyPath,
    _format_problem,
    _key_path,
    _Locator,
    _Problem,
    _problem,
    _toml_type,
)
from stoker.images.spec_fields import (
    _ARTIFACT_NAME_RE,
    _NIX_ATTR_RE,
    AUTO_KERNEL,
    DEFAULT_KERNEL,
    IMAGE_NAME_RE,
    KERNELS,
    DiskMB,
    EnvName,
    EnvValue,
    GuestPath,
    ImageName,
    Items,
    JobMemoryMB,
    MemoryMB,
    Mode,
    PackageName,
    RunStep,
    Sha256,
    SizeLimitMB,
    Url,
    UserName,
    _check_artifact_name,
    _host_path,
    _is_local_flake,
)
from stoker.net.policy import NetworkPolicy

# The field types (stoker.images.spec_fields) and the digests (stoker.images.spec_digest)
# live in their own modules; their public names are re-exported here, so that
# ``stoker.images.spec`` stays the one place to import the spec format from.
__all__ = [
    "ARTIFACT_ENV_PREFIX",
    "AUTO_KERNEL",
    "BASE_KINDS",
    "DEBIAN_SUITES",
    "DEFAULT_KERNEL",
    "IMAGE_NAME_RE",
    "KERNELS",
    "NIX_BASE_SUITE",
    "PLACEHOLDER_SHA256",
    "SPEC_FORMAT_VERSION",
    "UBUNTU_SUITES",
    "AgentOptions",
    "Artifact",
    "DiskMB",
    "EnvName",
    "EnvValue",
    "FileSpec",
    "GuestPath",
    "ImageName",
    "ImageSpec",
    "Items",
    "JobMemoryMB",
    "KeyPath",
    "MemoryMB",
    "Mode",
    "PackageName",
    "RunStep",
    "Sha256",
    "SizeLimitMB",
    "Url",
    "UserName",
    "UserSpec",
    "VMDefaults",
    "artifact_env_var",
    "collect_input_digests",
    "digest_document",
    "file_sha256",
    "load_spec_file",
    "parse_spec_text",
    "required_inputs",
    "spec_digest",
    "to_debian_spec",
]

DEBIAN_SUITES: tuple[str, ...] = ("bookworm", "trixie")
UBUNTU_SUITES: tuple[str, ...] = ("noble",)
BASE_KINDS: tuple[str, ...] = ("debian", "ubuntu", "oci", "nixos", "nix")
#: The Debian suite under a ``nix:`` base's closure.
NIX_BASE_SUITE = "bookworm"
ARTIFACT_ENV_PREFIX = "STOKER_ARTIFACT_"
#: What example specs carry until a real checksum is filled in; it matches no file.
PLACEHOLDER_SHA256 = "0" * 64


# --- models -------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileSpec(_Model):
    """A host file copied into the image."""

    #: Absolute host path (a spec file gives it relative to itself).
    src: str
    #: Absolute path in the image.
    dest: GuestPath
    #: Octal permission bits, normalised to four digits.
    mode: Mode = "0644"

    @field_validator("src")
    @classmethod
    def _src_exists(cls, value: str, info: ValidationInfo) -> str:
        path = _host_path(value, info, inside=True)
        if not path.exists():
            raise ValueError(f"{value!r} does not exist (looked for {path})")
        if not path.is_file():
            raise ValueError(f"{value!r} is not a regular file ({path})")
        return str(path)


class UserSpec(_Model):
    """A user account created in the image."""

    name: UserName
    #: ``None``: the next free uid.
    uid: int | None = Field(default=None, ge=1, le=65533)
    #: Supplementary groups (sorted, without duplicates).
    groups: Items[UserName] = ()
    shell: GuestPath = "/bin/bash"

    @field_validator("groups")
    @classmethod
    def _normalise_groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(value)))


def artifact_env_var(name: str) -> str:
    """The default override variable of the artifact called ``name``."""
    return ARTIFACT_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", name.upper())


class Artifact(_Model):
    """A remote download, pinned by its SHA-256 (or taken from this host, see ``host_binary``)."""

    name: Annotated[str, AfterValidator(_check_artifact_name)]
    url: Url
    #: A program on the building host's PATH with the bytes to use when nothing is
    #: pinned (the same version as the host's own; its SHA-256 goes into the manifest).
    host_binary: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")] | None = None
    #: Build without it (saying so) when no source is available.
    optional: bool = False
    #: None: no release is pinned in the spec; the bytes come from ``--pin``, a local
    #: file given by the user, or ``host_binary`` (see :mod:`stoker.images.host_artifacts`).
    sha256: Annotated[Sha256 | None, Field(validate_default=True)] = None
    #: Where it goes in the image: the file, or with ``extract`` the directory.
    dest: GuestPath
    #: Unpack a tar archive (any compression) into ``dest``.
    extract: bool = False
    #: Environment variable naming a local file with the same bytes.
    override_env: EnvName | None = None
    #: The release the URL names (``2.321.0``): ``stoker image build --pin NAME=VERSION:SHA256``
    #: swaps it, in the URL too, for another release.
    version: Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")] | None = None

    @field_validator("sha256")
    @classmethod
    def _pinned_or_optional(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and not (info.data.get("optional") or info.data.get("host_binary")):
            raise ValueError(
                "required key is missing (unless the artifact is optional or has a host_binary)"
            )
        return value

    @model_validator(mode="after")
    def _version_in_url(self) -> Artifact:
        if self.version is not None and self.version not in self.url:
            raise ValueError(f"version {self.version!r} does not appear in the url")
        return self

    def pinned(self, version: str, sha256: str) -> Artifact:
        """This artifact at another release: the URL's version swapped, the new checksum."""
        if self.version is None:
            raise UsageError(
                f"artifact {self.name!r} has no version in its spec, so it cannot be pinned",
                hint="give --artifact NAME=PATH with a file matching its sha256 instead",
            )
        return Artifact.model_validate(
            {
                **self.model_dump(),
                "url": self.url.replace(self.version, version),
                "version": version,
                "sha256": sha256,
            }
        )

    @model_validator(mode="before")
    @classmethod
    def _default_override_env(cls, data: Any) -> Any:
        if isinstance(data, dict) and "override_env" not in data:
            name = data.get("name")
            if isinstance(name, str) and _ARTIFACT_NAME_RE.fullmatch(name):
                return {**data, "override_env": artifact_env_var(name)}
        return data

    @property
    def is_placeholder(self) -> bool:
        """Whether :attr:`sha256` is :data:`PLACEHOLDER_SHA256` (a builder should say so)."""
        return self.sha256 == PLACEHOLDER_SHA256

    @property
    def env_var(self) -> str:
        """The environment variable that overrides the download with a local file."""
        return self.override_env or artifact_env_var(self.name)

    def local_override(self, environ: Mapping[str, str]) -> Path | None:
        """The local file to use instead of downloading, or None.

        Its bytes must still match :attr:`sha256`; checking that is the builder's job.
        """
        value = environ.get(self.env_var, "")
        if not value:
            return None
        path = Path(value)
        if not path.is_file():
            raise UsageError(
                f"{self.env_var}={value}: no such file (local copy of artifact {self.name!r})",
                hint=f"download {self.url} there, or unset {self.env_var}",
            )
        return path


class VMDefaults(_Model):
    """Defaults for VMs made from the image (command-line options override them)."""

    cpus: int = Field(default=2, ge=1, le=256)
    #: MiB.
    memory: MemoryMB = 1024
    #: Size of the writable layer, MiB.
    disk: DiskMB = 4096
    #: Most processes of one command in the guest (None: stoker's default).
    job_pids_limit: int | None = Field(default=None, ge=1, le=1 << 22)
    #: Most memory of one command in the guest, MiB (None: the guest's minus a reserve).
    job_memory_limit: JobMemoryMB | None = None


class AgentOptions(_Model):
    """How the guest agent runs inside the image."""

    #: Absolute path of python3 inside the image.
    python: GuestPath = "/usr/bin/python3"


class ImageSpec(_Model):
    """One image, as described by a spec file; the format is in the module docstring."""

    name: ImageName
    base: str
    packages: Items[PackageName] = ()
    files: Items[FileSpec] = ()
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    users: Items[UserSpec] = ()
    run: Items[RunStep] = ()
    #: MiB; ``None`` for no limit.
    size_limit: SizeLimitMB | None = None
    #: A name from :data:`KERNELS` or an absolute host path.
    kernel: str = DEFAULT_KERNEL
    defaults: VMDefaults = Field(default_factory=VMDefaults)
    agent: AgentOptions = Field(default_factory=AgentOptions)
    artifacts: Items[Artifact] = ()
    #: The network of VMs made from the image (None: no network unless asked for).
    network: NetworkPolicy | None = None
    #: Root filesystem format: ``"erofs"``, ``"squashfs"`` or ``"ext4"``.
    format: Literal["erofs", "squashfs", "ext4"] = "erofs"
    #: Compressor; ``None``: the format's default (lz4hc for erofs, zstd for squashfs).
    compression: str | None = None

    @field_validator("base")
    @classmethod
    def _check_base(cls, value: str, info: ValidationInfo) -> str:
        kind, sep, ref = value.partition(":")
        expected = (
            'expected "debian:bookworm", "debian:trixie", "ubuntu:noble", '
            '"oci:PATH", "nixos:FLAKEREF#ATTR" or "nix:FLAKEREF#ATTR"'
        )
        if not sep or kind not in BASE_KINDS:
            raise ValueError(f"unknown base {value!r}; {expected}")
        if kind == "debian" and ref not in DEBIAN_SUITES:
            raise ValueError(
                f"unknown Debian suite {ref!r}; expected one of: {', '.join(DEBIAN_SUITES)}"
            )
        if kind == "ubuntu" and ref not in UBUNTU_SUITES:
            raise ValueError(
                f"unknown Ubuntu suite {ref!r}; expected one of: {', '.join(UBUNTU_SUITES)}"
            )
        if kind == "oci":
            path = _host_path(ref, info)
            if not path.exists():
                raise ValueError(
                    f"OCI base {ref!r} does not exist (looked for {path}); expected an OCI "
                    "image layout directory or a docker-save archive"
                )
            return f"oci:{path}"
        if kind in ("nixos", "nix"):
            flake, hash_sign, attr = ref.partition("#")
            if not flake or not hash_sign or not _NIX_ATTR_RE.fullmatch(attr):
                raise ValueError(
                    f'expected "{kind}:FLAKEREF#ATTR", e.g. "{kind}:./flake#ci", got {value!r}'
                )
            if any(c.isspace() for c in flake):
                raise ValueError(f"flake reference {flake!r} contains whitespace")
            if _is_local_flake(flake):
                path = _host_path(flake, info)
                if not path.is_dir():
                    raise ValueError(f"flake directory {flake!r} does not exist ({path})")
                return f"{kind}:{path}#{attr}"
        return value

    @model_validator(mode="after")
    def _check_compression(self) -> ImageSpec:
        if self.compression is not None:
            algo, _, level = self.compression.partition(",")
            allowed = COMPRESSORS[self.format]
            if algo not in allowed or (level and not (self.format == "erofs" and level.isdigit())):
                raise ValueError(
                    f"compression {self.compression!r} does not fit format {self.format!r}; "
                    f"expected one of: {', '.join(allowed)}"
                    + (" (erofs takes a level as 'lz4hc,12')" if self.format == "erofs" else "")
                )
        return self

    @field_validator("kernel")
    @classmethod
    def _check_kernel(cls, value: str, info: ValidationInfo) -> str:
        if value in KERNELS:
            return value
        if "/" not in value and not value.startswith("."):
            raise ValueError(
                f"unknown kernel {value!r}; expected {', '.join(repr(k) for k in KERNELS)} "
                "or a path to a kernel image"
            )
        path = _host_path(value, info)
        if not path.is_file():
            raise ValueError(f"kernel {value!r} is not a file (looked for {path})")
        return str(path)

    @field_validator("packages")
    @classmethod
    def _normalise_packages(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        kind = str(info.data.get("base", "")).partition(":")[0]
        if value and kind in ("oci", "nixos"):
            raise ValueError(
                f"packages are installed with apt on debian: and ubuntu: bases; for an "
                f"{kind} base, put them into the {kind} image instead"
            )
        # Order and duplicates do not change what apt installs.
        return tuple(sorted(set(value)))

    @field_validator("files")
    @classmethod
    def _unique_file_dests(cls, value: tuple[FileSpec, ...]) -> tuple[FileSpec, ...]:
        _reject_duplicates("files", "dest", [f.dest for f in value])
        return value

    @field_validator("users")
    @classmethod
    def _unique_users(cls, value: tuple[UserSpec, ...]) -> tuple[UserSpec, ...]:
        _reject_duplicates("users", "name", [u.name for u in value])
        _reject_duplicates("users", "uid", [u.uid for u in value if u.uid is not None])
        return value

    @field_validator("artifacts")
    @classmethod
    def _unique_artifacts(cls, value: tuple[Artifact, ...]) -> tuple[Artifact, ...]:
        _reject_duplicates("artifacts", "name", [a.name for a in value])
        _reject_duplicates("artifacts", "dest", [a.dest for a in value])
        _reject_duplicates("artifacts", "override_env", [a.env_var for a in value])
        return value

    @property
    def base_kind(self) -> str:
        """``"debian"``, ``"ubuntu"``, ``"oci"``, ``"nixos"`` or ``"nix"``."""
        return self.base.partition(":")[0]

    @property
    def base_ref(self) -> str:
        """What follows the kind in :attr:`base`: a suite, a path or a flake reference."""
        return self.base.partition(":")[2]

    def pin(self, artifact: str, version: str, sha256: str) -> ImageSpec:
        """This spec with ``artifact`` at another release (``--pin NAME=VERSION:SHA256``).

        Raises :class:`UsageError` for an unknown artifact, one whose spec names
        no version, or a malformed version or checksum.
        """
        names = [a.name for a in self.artifacts]
        if artifact not in names:
            raise UsageError(
                f"--pin {artifact}: image {self.name!r} has no artifact of that name",
                hint=f"artifacts: {', '.join(names) or 'none'}",
            )
        try:
            artifacts = tuple(
                a.pinned(version, sha256) if a.name == artifact else a for a in self.artifacts
            )
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise UsageError(f"--pin {artifact}={version}: {where}: {problem['msg']}") from None
        return self.model_copy(update={"artifacts": artifacts})


def _reject_duplicates(field: str, key: str, values: Iterable[object]) -> None:
    seen: dict[object, int] = {}
    for index, item in enumerate(values):
        if item in seen:
            raise ValueError(
                f"{field}[{seen[item]}] and {field}[{index}] have the same {key} {item!r}"
            )
        seen[item] = index


# --- loading ------------------------------------------------------------------------------------


def load_spec_file(path: Path) -> dict[str, ImageSpec]:
    """The images described by the spec file ``path``, by name.

    Raises :class:`UsageError` naming the file, line, image and key of every
    problem (see the module docstring for the format).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"image spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read image spec {path}: {exc}") from None
    return parse_spec_text(text, origin=path)


def parse_spec_text(text: str, *, origin: Path) -> dict[str, ImageSpec]:
    """Parse the text of a spec file; ``origin`` is where it came from.

    Relative host paths in the spec are resolved against ``origin``'s directory.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(
            f"{origin}: invalid TOML: {exc}",
            hint="see https://toml.io for the syntax",
        ) from None
    locator = _Locator(text)
    base_dir = origin.parent.absolute()
    problems: list[_Problem] = []
    specs: dict[str, ImageSpec] = {}
    for prefix, name, data in _split_images(document, locator, problems):
        try:
            spec = ImageSpec.model_validate(data, context={"base_dir": base_dir})
        except ValidationError as exc:
            problems += [_problem(err, prefix, name, locator, ImageSpec) for err in exc.errors()]
            continue
        specs[spec.name] = spec
    if problems:
        problems.sort(key=lambda p: (p.line or 0, _key_path(p.path)))
        lines = [_format_problem(origin, p) for p in problems]
        message = (
            lines[0]
            if len(lines) == 1
            else f"{origin}: {len(lines)} problems\n  " + ("\n  ".join(lines))
        )
        raise UsageError(
            message,
            hint="the format is described in stoker.images.spec; "
            "examples: src/stoker/images/specs/",
        )
    return specs


def _split_images(
    document: dict[str, Any], locator: _Locator, problems: list[_Problem]
) -> list[tuple[KeyPath, str | None, dict[str, Any]]]:
    """The images of a document: (key-path prefix, image name, its table)."""

    def problem(path: KeyPath, message: str, image: str | None = None) -> None:
        problems.append(_Problem(path, locator.line_of(path), image, message))

    if "image" not in document:
        name = document.get("name")
        return [((), name if isinstance(name, str) else None, document)]
    images = document["image"]
    for key in document:
        if key != "image":
            problem(
                (key,),
                f"unexpected top-level key {key!r}: a project file holds only "
                "[image.NAME] tables (or write one image per file, without [image])",
            )
    if not isinstance(images, dict):
        problem(("image",), f"expected [image.NAME] tables, got {_toml_type(images)}")
        return []
    if not images:
        problem(("image",), "no images defined; expected at least one [image.NAME] table")
    found: list[tuple[KeyPath, str | None, dict[str, Any]]] = []
    for name, table in images.items():
        path: KeyPath = ("image", name)
        if not isinstance(table, dict):
            problem(path, f"expected a table, got {_toml_type(table)}", name)
        elif "name" in table:
            problem(
                (*path, "name"),
                f"the name of this image is {name!r}, given by its table header [image.{name}]; "
                "remove this key",
                name,
            )
        else:
            found.append((path, name, {"name": name, **table}))
    return found


# --- builders -------------------------------------------------------------------------------------


def _bare_package(package: str) -> str:
    return re.split(r"[:=]", package, maxsplit=1)[0]


def to_debian_spec(spec: ImageSpec) -> DebianSpec:
    """The :class:`DebianSpec` for the suite and packages of a ``debian:*`` spec.

    :data:`DEFAULT_PACKAGES` are always included (the guest agent needs
    python3), unless the spec pins one of them (``git=...``).  Only the suite,
    the packages and the python path are mapped: files, users, artifacts, env,
    run steps and the size limit are the builder's to apply.
    """
    if spec.base_kind not in ("debian", "ubuntu", "nix"):
        raise UsageError(f"image {spec.name!r}: base {spec.base!r} is not a Debian or Ubuntu base")
    pinned = {_bare_package(p) for p in spec.packages}
    defaults = tuple(p for p in DEFAULT_PACKAGES if p not in pinned)
    # A nix: base is its closure over Debian's userland (the agent needs python3).
    suite = NIX_BASE_SUITE if spec.base_kind == "nix" else spec.base_ref
    return DebianSpec(suite=suite, packages=(*defaults, *spec.packages))
