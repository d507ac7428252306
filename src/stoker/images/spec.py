"""Declarative image specs: TOML files parsed into frozen, validated models.

A spec describes *what* goes into an image; builders (:mod:`stoker.images.debian`
and later ones) decide *how*.  Everything here is pure: parsing, validation, the
digest and the mapping onto :class:`~stoker.images.debian.DebianSpec`.  Nothing
is downloaded or built, but every mistake a spec can contain is reported here,
before any work starts.

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

naming the file, the line (tomllib reports no positions, so :class:`_Locator`
re-scans the text), the image, the key path (array indices count from 0) and
what was expected.  TOML syntax errors keep tomllib's line and column.

Digest
------
:func:`spec_digest` hashes the normalised spec (canonical JSON, defaults filled
in, without the image name and host paths), the builder version and the digests
of the inputs the spec only points at (file contents, the kernel, an OCI or NixOS
base); artifacts are covered by their pinned ``sha256``.
"""

from __future__ import annotations

import bisect
import difflib
import hashlib
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from stoker.errors import UsageError
from stoker.images.base import canonical_digest
from stoker.images.debian import _PACKAGE_RE as DEBIAN_PACKAGE_RE
from stoker.images.debian import DEFAULT_PACKAGES, DebianSpec
from stoker.images.pack import COMPRESSORS
from stoker.net.policy import NetworkPolicy
from stoker.units import parse_size_mb

#: Bump when the digest document changes shape (every image is rebuilt then).
SPEC_FORMAT_VERSION = 1

DEBIAN_SUITES: tuple[str, ...] = ("bookworm", "trixie")
UBUNTU_SUITES: tuple[str, ...] = ("noble",)
BASE_KINDS: tuple[str, ...] = ("debian", "ubuntu", "oci", "nixos", "nix")
#: The Debian suite under a ``nix:`` base's closure.
NIX_BASE_SUITE = "bookworm"
#: Kernels known by name; anything else in ``kernel`` is a path.
KERNELS: tuple[str, ...] = ("debian-cloud", "stoker-microvm", "auto")
DEFAULT_KERNEL = "debian-cloud"
#: The microVM kernel when it has been built on the host, else the default.
AUTO_KERNEL = "auto"
ARTIFACT_ENV_PREFIX = "STOKER_ARTIFACT_"
#: What example specs carry until a real checksum is filled in; it matches no file.
PLACEHOLDER_SHA256 = "0" * 64

# The store's rule for image names (not imported: the store may come to import this module).
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# useradd's default NAME_REGEX on Debian, without the trailing '$' of machine accounts.
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ARTIFACT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_MODE_RE = re.compile(r"[0-7]{3,4}")
_NIX_ATTR_RE = re.compile(r"[A-Za-z0-9_.+\"'-]+")

T = TypeVar("T")


# --- field types --------------------------------------------------------------------------------


def _as_tuple(value: object) -> object:
    # Strict mode accepts only tuples for tuple fields; TOML and JSON give lists.
    return tuple(value) if isinstance(value, list) else value


#: An immutable list: a TOML/JSON array, stored as a tuple.
Items = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]


def _check_image_name(value: str) -> str:
    if not IMAGE_NAME_RE.fullmatch(value):
        raise ValueError(
            f"expected an image name of letters, digits, '.', '_' and '-' "
            f"(not starting with a symbol), got {value!r}"
        )
    return value


def _check_package(value: str) -> str:
    if not DEBIAN_PACKAGE_RE.fullmatch(value):
        raise ValueError(
            "expected a Debian package name (lower-case letters, digits, '+', '-', '.', "
            f"at least two characters, optionally :arch and =version), got {value!r}"
        )
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise ValueError(
            f"expected a variable name of letters, digits and '_' "
            f"(not starting with a digit), got {value!r}"
        )
    return value


def _check_env_value(value: str) -> str:
    if "\0" in value:
        raise ValueError("environment values cannot contain NUL characters")
    return value


def _check_user_name(value: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise ValueError(
            "expected a user or group name of lower-case letters, digits, '_' and '-' "
            f"(not starting with a digit or '-', at most 32 characters), got {value!r}"
        )
    return value


def _check_guest_path(value: str) -> str:
    if not value.startswith("/") or value.startswith("//"):
        raise ValueError(f'expected an absolute guest path like "/etc/motd", got {value!r}')
    if "\0" in value:
        raise ValueError("guest paths cannot contain NUL characters")
    path = PurePosixPath(value)
    if ".." in path.parts:
        raise ValueError(f"guest path {value!r} must not contain '..'")
    if path == PurePosixPath("/"):
        raise ValueError("guest path must name something below '/', not '/' itself")
    return str(path)


def _reject_numeric_mode(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f'expected the mode as a quoted octal string like "0644", got {value}')
    return value


def _check_mode(value: str) -> str:
    if not _MODE_RE.fullmatch(value):
        raise ValueError(f'expected an octal file mode like "0644" or "0755", got {value!r}')
    return value.rjust(4, "0")


def _check_artifact_name(value: str) -> str:
    if not _ARTIFACT_NAME_RE.fullmatch(value):
        raise ValueError(
            "expected an artifact name of letters, digits, '.', '_' and '-' "
            f"(not starting with a symbol, at most 64 characters), got {value!r}"
        )
    return value


def _check_sha256(value: str) -> str:
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"expected a SHA-256 of exactly 64 hex digits, got {value!r}")
    return value.lower()


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def _check_run_step(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a shell command, got an empty string")
    if "\0" in value:
        raise ValueError("commands cannot contain NUL characters")
    return value


def _size(what: str, minimum: int) -> BeforeValidator:
    def parse(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, str | int):
            return value  # the strict int check reports the type
        try:
            return parse_size_mb(value, what=what, minimum=minimum)
        except UsageError as exc:
            # The error message names the key already.
            raise ValueError(str(exc).removeprefix(f"{what}: ")) from None

    return BeforeValidator(parse)


ImageName = Annotated[str, AfterValidator(_check_image_name)]
PackageName = Annotated[str, AfterValidator(_check_package)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
EnvValue = Annotated[str, AfterValidator(_check_env_value)]
UserName = Annotated[str, AfterValidator(_check_user_name)]
GuestPath = Annotated[str, AfterValidator(_check_guest_path)]
Mode = Annotated[str, BeforeValidator(_reject_numeric_mode), AfterValidator(_check_mode)]
Sha256 = Annotated[str, AfterValidator(_check_sha256)]
Url = Annotated[str, AfterValidator(_check_url)]
RunStep = Annotated[str, AfterValidator(_check_run_step)]
MemoryMB = Annotated[int, _size("memory", 128)]
DiskMB = Annotated[int, _size("disk", 64)]
SizeLimitMB = Annotated[int, _size("size_limit", 1)]
JobMemoryMB = Annotated[int, _size("job_memory_limit", 16)]


# --- host paths ---------------------------------------------------------------------------------


def _base_dir(info: ValidationInfo) -> Path | None:
    """The directory relative host paths are resolved against (the spec file's)."""
    context = info.context
    if isinstance(context, Mapping):
        base = context.get("base_dir")
        if isinstance(base, Path):
            return base
    return None


def _host_path(value: str, info: ValidationInfo, *, inside: bool = False) -> Path:
    """``value`` resolved against the spec file's directory.

    With ``inside``, a spec file may only name paths inside its own directory.
    Without a spec file (validating a model directly, e.g. a JSON round-trip)
    only absolute paths are accepted.
    """
    if not value or "\0" in value:
        raise ValueError(f"expected a host path, got {value!r}")
    base = _base_dir(info)
    path = Path(value)
    if base is None:
        if not path.is_absolute():
            raise ValueError(f"relative path {value!r} needs a spec file to be relative to")
        return path
    if inside and path.is_absolute():
        raise ValueError(f"expected a path relative to the spec file, got {value!r}")
    resolved = (base / path).resolve()
    if inside and not resolved.is_relative_to(base.resolve()):
        raise ValueError(f"{value!r} leads outside the spec file's directory ({base})")
    return resolved


def _is_local_flake(ref: str) -> bool:
    return ref.startswith(("/", "./", "../")) or ref in (".", "..")


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


# --- locating keys in the TOML text -------------------------------------------------------------

KeyPath = tuple[str | int, ...]
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = frozenset(",]}#\r\n")


class _Locator:
    """Line numbers of the keys, tables and array elements of a TOML text.

    tomllib reports no positions, so the (already parsed, hence valid) text is
    scanned again by a small tokenizer that only tracks paths: table headers,
    arrays of tables (their element index), dotted keys, inline tables and the
    elements of arrays.  The first line a path appears on wins.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._aot_counts: dict[KeyPath, int] = {}
        self.lines: dict[KeyPath, int] = {}
        self._scan()

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its nearest ancestor that appears in the text."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    # scanning

    def _peek(self, length: int = 1) -> str:
        return self._text[self._pos : self._pos + length]

    def _record(self, path: KeyPath, pos: int) -> None:
        line = bisect.bisect_right(self._line_starts, pos)
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def _skip(self, *, newlines: bool) -> None:
        text = self._text
        while self._pos < len(text):
            char = text[self._pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self._pos += 1
            elif char == "#":
                end = text.find("\n", self._pos)
                self._pos = len(text) if end < 0 else end
            else:
                return

    def _skip_past(self, token: str) -> None:
        found = self._text.find(token, self._pos)
        self._pos = len(self._text) if found < 0 else found + len(token)

    def _resolve(self, keys: list[str]) -> KeyPath:
        # A header below an array of tables refers to its latest element.
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            count = self._aot_counts.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            start = self._pos
            if self._peek(2) == "[[":
                self._pos += 2
                keys = self._key()
                self._skip_past("]]")
                if not keys:
                    continue
                array = (*self._resolve(keys[:-1]), keys[-1])
                index = self._aot_counts.get(array, 0)
                self._aot_counts[array] = index + 1
                table = (*array, index)
                self._record(table, start)
            elif self._peek() == "[":
                self._pos += 1
                keys = self._key()
                self._skip_past("]")
                table = self._resolve(keys)
                self._record(table, start)
            else:
                keys = self._key()
                if not keys:
                    self._pos += 1  # not valid TOML; tomllib would have refused it
                    continue
                self._assignment((*table, *keys), start)

    def _assignment(self, path: KeyPath, start: int) -> None:
        self._record(path, start)
        self._skip(newlines=False)
        if self._peek() == "=":
            self._pos += 1
        self._skip(newlines=False)
        self._value(path)

    def _key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self._skip(newlines=False)
            char = self._peek()
            if char in ('"', "'"):
                start = self._pos
                self._string()
                keys.append(_decode_key(self._text[start : self._pos]))
            else:
                match = _BARE_KEY_RE.match(self._text, self._pos)
                if match is None:
                    return keys
                keys.append(match.group())
                self._pos = match.end()
            self._skip(newlines=False)
            if self._peek() != ".":
                return keys
            self._pos += 1

    def _string(self) -> None:
        text = self._text
        quote = text[self._pos]
        triple = self._peek(3) == quote * 3
        self._pos += 3 if triple else 1
        while self._pos < len(text):
            char = text[self._pos]
            if char == "\\" and quote == '"':
                self._pos += 2
            elif triple and self._peek(3) == quote * 3:
                self._pos += 3
                while self._peek() == quote:  # up to two quotes may end the content
                    self._pos += 1
                return
            elif not triple and char == quote:
                self._pos += 1
                return
            else:
                self._pos += 1

    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            self._string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            while self._pos < len(self._text) and self._text[self._pos] not in _SCALAR_END:
                self._pos += 1

    def _array(self, path: KeyPath) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip(newlines=True)
            char = self._peek()
            if char in ("]", ""):
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                index += 1
                continue
            element = (*path, index)
            self._record(element, self._pos)
            before = self._pos
            self._value(element)
            if self._pos == before:
                self._pos += 1

    def _inline_table(self, path: KeyPath) -> None:
        self._pos += 1
        while True:
            self._skip(newlines=True)
            char = self._peek()
            if char in ("}", ""):
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                continue
            start = self._pos
            keys = self._key()
            if not keys:
                self._pos += 1
                continue
            self._assignment((*path, *keys), start)


def _decode_key(raw: str) -> str:
    try:
        value = tomllib.loads(f"k = {raw}")["k"]
    except tomllib.TOMLDecodeError:
        return raw[1:-1]
    return value if isinstance(value, str) else raw[1:-1]


# --- error reporting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    path: KeyPath
    line: int | None
    image: str | None
    message: str


def _key_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY_RE.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{text}" if out else text
    return out


_TOML_TYPES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    tuple: "an array",
    dict: "a table",
}
_EXPECTED: dict[str, str] = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "tuple_type": "an array",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _toml_type(value: object) -> str:
    for kind, name in _TOML_TYPES.items():
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def _model_at(path: KeyPath) -> type[BaseModel]:
    """The model class whose keys live at ``path`` (relative to an image)."""
    model: type[BaseModel] = ImageSpec
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = _find_model(field.annotation) if field is not None else None
        if nested is None:
            break
        model = nested
    return model


def _find_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _describe(error: ErrorDetails, path: KeyPath) -> str:
    kind = error["type"]
    value = error.get("input")
    if kind == "missing":
        if path == ("name",):
            return (
                'required key is missing: a file with one image names it with name = "..." '
                "(a project file uses [image.NAME] tables instead)"
            )
        return "required key is missing"
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        allowed = sorted(_model_at(path[:-1]).model_fields)
        close = difflib.get_close_matches(key, allowed, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{guess}; expected one of: {', '.join(allowed)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_toml_type(value)}"
    if kind == "value_error":
        ctx = error.get("ctx") or {}
        return str(ctx.get("error", error["msg"]))
    ctx = error.get("ctx") or {}
    bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"expected a number {bounds[kind]} {limit}, got {value!r}"
    return f"{error['msg']} (got {value!r})"


def _problem(
    error: ErrorDetails, prefix: KeyPath, image: str | None, locator: _Locator
) -> _Problem:
    loc = tuple(error["loc"])
    if loc and loc[-1] == "[key]":  # a bad key of a table (env): point at the key
        loc = loc[:-1]
    path: KeyPath = (*prefix, *loc)
    return _Problem(path, locator.line_of(path), image, _describe(error, loc))


def _format_problem(origin: Path, problem: _Problem) -> str:
    where = f"{origin}:{problem.line}" if problem.line is not None else f"{origin}"
    who = f"image {problem.image!r}: " if problem.image else ""
    key = f"{_key_path(problem.path)}: " if problem.path else ""
    return f"{where}: {who}{key}{problem.message}"


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
            problems += [_problem(err, prefix, name, locator) for err in exc.errors()]
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


# --- digests and builders -----------------------------------------------------------------------


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
