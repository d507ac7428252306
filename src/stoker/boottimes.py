"""Cold-boot times measured on this host, per kernel and accelerator.

Every cold boot records how long its guest took from launch to agent-ready,
keeping the last :data:`KEEP` per kernel kind and accelerator.  ``stoker
doctor`` uses them to say what the microVM kernel would save here.  Recording
is best-effort: a boot never fails because its time could not be written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stoker.paths import Dirs

log = logging.getLogger(__name__)

RECORD = "boot-times.json"
#: Boots kept per (kernel, accelerator).
KEEP = 20
#: Bound on the file read back (it is ours, but the cache is shared).
MAX_RECORD_BYTES = 64 * 1024
#: Launch -> agent ready of the default image, cold, under TCG (medians of 7 and 5,
#: ``bench/levers.py``, 2-core development machine, 2026-12-05): what doctor
#: quotes until this host has booted both kernels itself.
REFERENCE_TCG = {"debian-cloud": 2.32, "stoker-microvm": 1.56}


@dataclass(frozen=True)
class BootStats:
    """The median of the recent cold boots of one kernel under one accelerator."""

    kernel: str
    accel: str
    median: float
    count: int


def _path(dirs: Dirs) -> Path:
    return dirs.cache / "stats" / RECORD


def _load(path: Path) -> dict[str, list[float]]:
    try:
        with path.open("rb") as fh:
            doc = json.loads(fh.read(MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    out: dict[str, list[float]] = {}
    for key, values in doc.items():
        if isinstance(key, str) and isinstance(values, list):
            kept = [
                float(v)
                for v in values
                if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 3600
            ]
            if kept:
                out[key] = kept[-KEEP:]
    return out


def record_boot(dirs: Dirs, *, kernel: str, accel: str, seconds: float) -> None:
    """Add one cold boot (launch -> agent ready) of ``kernel`` under ``accel``."""
    path = _path(dirs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with (path.parent / f".{RECORD}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = _load(path)
            key = f"{kernel}/{accel}"
            doc[key] = [*doc.get(key, []), round(seconds, 3)][-KEEP:]
            fd, tmp = tempfile.mkstemp(prefix=f".{RECORD}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(doc, fh, sort_keys=True)
                Path(tmp).replace(path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as exc:
        log.debug("boot time not recorded: %s", exc)


def record_cold_boot(dirs: Dirs, *, backend: str, package: str, accel: str, seconds: float) -> None:
    """Record a QEMU cold boot of Debian's cloud kernel or the microVM kernel."""
    if backend != "qemu":
        return
    if package == "stoker-microvm":
        record_boot(dirs, kernel="stoker-microvm", accel=accel, seconds=seconds)
    elif package.startswith("linux-image-") and package.endswith("-cloud-amd64"):
        record_boot(dirs, kernel="debian-cloud", accel=accel, seconds=seconds)


def boot_stats(dirs: Dirs) -> dict[tuple[str, str], BootStats]:
    """What this host measured, by (kernel, accelerator)."""
    import statistics  # not at import: this module is on every VM's start path

    out: dict[tuple[str, str], BootStats] = {}
    for key, values in _load(_path(dirs)).items():
        kernel, _, accel = key.partition("/")
        out[(kernel, accel)] = BootStats(kernel, accel, statistics.median(values), len(values))
    return out


def microvm_advice(dirs: Dirs, *, built: bool, accel: str) -> str:
    """What the microVM kernel does (or would do) for cold boots on this host.

    From this host's own boots where it has both; else this host's Debian
    boots scaled by the reference ratio; else the reference figures.
    """
    stats = boot_stats(dirs)
    debian = stats.get(("debian-cloud", accel))
    micro = stats.get(("stoker-microvm", accel))
    if debian and micro:
        saved = 1 - micro.median / debian.median
        return (
            f"cold boot to agent-ready here ({accel}): {micro.median:.2f} s with it, "
            f"{debian.median:.2f} s with Debian's kernel ({saved:.0%} less; "
            f"medians of {micro.count} and {debian.count} boots)"
        )
    ratio = REFERENCE_TCG["stoker-microvm"] / REFERENCE_TCG["debian-cloud"]
    if debian:
        estimate = (
            f"about {debian.median * ratio:.2f} s instead of {debian.median:.2f} s "
            f"(median of {debian.count} boots here), {1 - ratio:.0%} less"
        )
    else:
        estimate = (
            f"{REFERENCE_TCG['stoker-microvm']:.2f} s instead of "
            f"{REFERENCE_TCG['debian-cloud']:.2f} s on the reference machine (TCG)"
        )
    if built:
        return f"cold boot to agent-ready with it: {estimate}"
    return (
        f'images with kernel = "auto" would cold-boot to agent-ready in {estimate}; '
        "build it once with `stoker kernel build` (5-10 minutes)"
    )
