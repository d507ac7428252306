"""Parsing sizes and durations the way users write them (``512M``, ``2G``, ``30s``, ``10m``)."""

from __future__ import annotations

import re

from stoker.errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1 / (1024 * 1024), "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size_mb(value: str | int, *, what: str, minimum: int = 1) -> int:
    """Return ``value`` in MiB.  Plain integers are MiB; strings may carry K/M/G/T suffixes."""
    if isinstance(value, int):
        mb = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise UsageError(f"{what}: cannot read size {value!r} (expected e.g. 512M, 2G)")
        number, unit = match.groups()
        if not unit and "." not in number:
            mb = int(number)  # bare numbers are MiB, like QEMU's -m
        else:
            mb = int(float(number) * _FACTORS[unit.upper()])
    if mb < minimum:
        raise UsageError(f"{what} must be at least {minimum} MiB, got {value!r}")
    return mb


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h``, ``2d`` -> seconds (plain numbers are seconds)."""
    match = _DURATION_RE.match(text)
    if not match:
        raise UsageError(f"cannot read duration {text!r} (expected e.g. 90, 30s, 10m, 1h)")
    return float(match.group(1)) * _SECONDS[match.group(2) or "s"]
