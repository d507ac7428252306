"""Cold-boot levers under TCG, each measured before it is kept (fast-by-default issue).

Boots the default image cold (``snapshot="never"``) to agent-ready with one
change at a time to QEMU's command line or the guest agent, interleaved (in a
new order each round) so that drift and a place in the round hit every variant
alike, and prints the median agent-ready time and QEMU's peak resident memory
per variant.

The variants rewrite the argv that :func:`stoker.backends.qemu.qemu_argv`
returns (this script only: what is kept goes into ``qemu_argv`` itself and its
golden tests).  ``baseline`` is what stoker does today with Debian's cloud
kernel (its vmlinux, entered through PVH); ``stoker-microvm kernel`` boots the
kernel ``stoker kernel build`` makes, which images with ``kernel = "auto"`` use
once it is built (the variant is left out until then).

Usage: ``python bench/levers.py [--runs N] [VARIANT ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import statistics
from pathlib import Path
from typing import Any

import stoker.agent.bundle as bundle
import stoker.artifacts as artifacts
import stoker.backends.qemu as qemu
from stoker.kernel.build import cached_microvm_kernel
from stoker.paths import Dirs
from stoker.vm import VM

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "bzImage (no PVH)": {"bzimage": True},
    "no agent bytecode": {"no_pyc": True},
    "-cpu max": {"cpu": "max"},
    "-cpu Nehalem": {"cpu": "Nehalem"},
    "mitigations=off": {"append": "mitigations=off"},
    "tb-size=128": {"tb_size": 128},
    "tb-size=64": {"tb_size": 64},
    "tb-size=32": {"tb_size": 32},
    "uncompressed initramfs": {"raw_initrd": True},
    "kdf108 self-test kept": {"drop": "initcall_blacklist=crypto_kdf108_init"},
    "kprobe trace initcall skipped too": {"append": "initcall_blacklist=init_kprobe_trace"},
    "stoker-microvm kernel": {"kernel": "stoker-microvm"},
}

_argv = qemu.qemu_argv
_build_initramfs = artifacts.build_initramfs
_current: dict[str, Any] = {}


def _patched_argv(spec: Any, fds: Any, *, binary: str = qemu.QEMU_BINARY) -> list[str]:
    argv = _argv(spec, fds, binary=binary)
    if "append" in _current:
        i = argv.index("-append")
        argv[i + 1] += " " + _current["append"]
    if "drop" in _current:
        i = argv.index("-append")
        argv[i + 1] = argv[i + 1].replace(" " + _current["drop"], "")
    if "cpu" in _current:
        argv[argv.index("-cpu") + 1] = _current["cpu"]
    if _current.get("bzimage"):
        i = argv.index("-kernel")
        argv[i + 1] = argv[i + 1].replace("vmlinux-", "vmlinuz-")
    if _current.get("raw_initrd"):
        i = argv.index("-initrd")
        argv[i + 1] = str(_raw_initrd(Path(argv[i + 1])))
    if "tb_size" in _current:
        i = argv.index("-accel")
        argv[i + 1] += f",tb-size={_current['tb_size']}"
    return argv


def _without_bytecode(*args: Any, **kwargs: Any) -> Any:
    return _build_initramfs(*args, **{**kwargs, "agent_bytecode": False})


def _raw_initrd(path: Path) -> Path:
    """The initramfs decompressed, beside the compressed one (cached)."""
    out = path.with_name(path.name.removesuffix(".gz") + ".raw")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(gzip.decompress(path.read_bytes()))
        tmp.replace(out)
    return out


async def boot_once() -> tuple[float, float]:
    """(launch -> agent ready seconds, QEMU peak RSS MiB) of one cold boot."""
    no_pyc = bool(_current.get("no_pyc"))
    artifacts.build_initramfs = _without_bytecode if no_pyc else _build_initramfs  # type: ignore[assignment]
    os.environ["STOKER_AUTO_KERNEL"] = _current.get("kernel", "debian-cloud")
    async with VM(snapshot="never", accel="tcg", agent_files=bundle.agent_files()) as vm:
        ready = vm.timings.agent_ready - vm.timings.launch
        await vm.exec(["true"], check=True)
        status = Path(f"/proc/{vm.vmm_pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return ready, hwm / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("variants", nargs="*", choices=[[], *VARIANTS], default=[])
    args = parser.parse_args()
    names = args.variants or list(VARIANTS)
    if "stoker-microvm kernel" in names and cached_microvm_kernel(Dirs.from_env()) is None:
        print("(no stoker-microvm kernel built: `stoker kernel build` adds that variant)\n")
        names.remove("stoker-microvm kernel")
    qemu.qemu_argv = _patched_argv  # type: ignore[assignment]
    asyncio.run(boot_once())  # caches (kernel, initramfs, image) and page cache warm
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(args.runs):
        # A new order each round: a variant's place in the round must not bias it.
        for name in random.Random(round_).sample(names, len(names)):
            _current.clear()
            _current.update(VARIANTS[name])
            results[name].append(asyncio.run(boot_once()))
    print(f"Cold boots under TCG, medians of {args.runs}, interleaved in shuffled order\n")
    print("| variant | launch -> agent ready | QEMU peak RSS | runs |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        ready = statistics.median(r for r, _ in runs)
        rss = statistics.median(m for _, m in runs)
        each = " ".join(f"{r:.2f}" for r, _ in runs)
        print(f"| {name} | {ready:.2f} s | {rss:.0f} MiB | {each} |")


if __name__ == "__main__":
    main()
