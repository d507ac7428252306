"""Field types of stoker's TOML configurations (``stoker.toml`` and its integrations).

Sizes take K/M/G suffixes, durations s/m/h, paths are relative to the
configuration file; each type raises a ``ValueError`` whose text the config
loader shows next to the file, line and key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from stoker.errors import UsageError
from stoker.units import parse_duration

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
Scope = Literal["submit", "read", "admin"]


# --- field types --------------------------------------------------------------------------------


def _parse_bytes(value: object) -> object:
    """``"64M"`` -> bytes; plain integers are bytes."""
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"expected a size like 64M or 1G, got {value!r}")
    number, unit = match.groups()
    return int(number) * 1024 ** " KMGT".index(unit.upper() or " ")


def _parse_duration(value: object) -> object:
    """``"30m"`` -> seconds; plain numbers are seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    try:
        return parse_duration(value)
    except UsageError:
        raise ValueError(f"expected a duration like 90, 30s, 10m or 2h, got {value!r}") from None


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            "expected a name of letters, digits, '.', '_' and '-' "
            f"(not starting with a symbol, at most 64 characters), got {value!r}"
        )
    return value


def _check_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"expected the SHA-256 of the token as 64 hex digits, got {value!r}")
    return value.lower()


def _to_path(value: object, info: ValidationInfo) -> object:
    """A host path; relative ones are relative to the configuration file."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        return value
    if not value or "\0" in value:
        raise ValueError(f"expected a path, got {value!r}")
    path = Path(value)
    if not path.is_absolute():
        base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
        if not isinstance(base, Path):
            raise ValueError(f"expected an absolute path, got {value!r}")
        path = base / path
    # Strict validation takes Path objects from Python but strings from JSON.
    return path if info.mode == "python" else str(path)


Bytes = Annotated[int, BeforeValidator(_parse_bytes), Field(ge=1)]
Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
Name = Annotated[str, AfterValidator(_check_name)]
HostPath = Annotated[Path, BeforeValidator(_to_path)]
