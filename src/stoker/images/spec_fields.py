"""Field types and validators of image specs (:mod:`stoker.images.spec`).

The ``Annotated`` types a spec's keys are declared with (``ImageName``,
``PackageName``, ``GuestPath``, ``MemoryMB``, ...), the ``_check_*`` functions
behind them, their regular expressions, the kernel names, and the resolution of
host paths against the spec file's directory.  The service configuration and
the CI configurations reuse some of these types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ValidationInfo

from stoker.errors import UsageError
from stoker.images.debian import _PACKAGE_RE as DEBIAN_PACKAGE_RE
from stoker.units import parse_size_mb

#: Kernels known by name; anything else in ``kernel`` is a path.
KERNELS: tuple[str, ...] = ("debian-cloud", "stoker-microvm", "auto")
DEFAULT_KERNEL = "debian-cloud"
#: The microVM kernel when it has been built on the host, else the default.
AUTO_KERNEL = "auto"

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
