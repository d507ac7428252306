"""The default path against a conventional VM, same machine, same run (issue: fast by default).

Everything through the CLI with default options unless said otherwise:

* ``stoker run SRC -- true``, second and later runs (the first run of the
  default image and shape starts a background snapshot maker; it is waited
  for, then every run restores): median wall time, and the ratio to the
  conventional VM (target: at least 20x);
* the same with ``--snapshot never`` (a cold boot; target: at least 8x);
* the CLI's own start-up (interpreter, imports, arguments: ``timings.startup``
  of ``--json``);
* copy-in of a 100 MB and a 1 GB tree into a restored VM against a booted one
  (``timings.seed``: the project unpacked in the guest; target: restored no
  slower than booted);
* QEMU's resident memory per idle clone beside the memory the guest touched
  (``MemTotal - MemFree`` inside it), split into pages of the template's
  memory file (file-backed: shared by every clone of the template through the
  page cache) and QEMU's own anonymous memory (the clone's writes, the TCG
  translation cache, allocator arenas);
* the conventional VM: QEMU ``-M q35`` + SeaBIOS + Debian with systemd and its
  initramfs-tools initrd to a oneshot unit (``bench/conventional.py``).

Usage: ``python bench/fastpath.py [--runs N] [--conventional-runs N] [--no-1g]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from coldstart import make_tree  # noqa: E402
from conventional import boot_conventional, build_conventional_image  # noqa: E402

from stoker.kernel.build import cached_microvm_kernel  # noqa: E402
from stoker.paths import Dirs  # noqa: E402
from stoker.vm import VM  # noqa: E402


def stoker_run(src: Path, *extra: str, kernel: str | None = None) -> tuple[float, dict[str, Any]]:
    """Wall time and ``--json`` summary of ``stoker run [extra] SRC -- true``.

    ``kernel``: what images with ``kernel = "auto"`` boot (``STOKER_AUTO_KERNEL``);
    None: stoker's own choice.
    """
    env = {
        k: v for k, v in os.environ.items() if k not in ("STOKER_SNAPSHOT", "STOKER_AUTO_KERNEL")
    }
    if kernel is not None:
        env["STOKER_AUTO_KERNEL"] = kernel
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stoker.cli", "run", "--json", *extra, str(src), "--", "true"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stoker run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def wait_gone(pid: int | None, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    if pid is not None:
        raise SystemExit(f"the snapshot maker {pid} did not finish")


def copy_in(tree: Path, pairs: int = 3) -> dict[str, float]:
    """Seconds to unpack ``tree`` in the guest, restored (default) and booted: medians.

    The two alternate (restored first, then booted first, ...) so that neither
    always meets the host's caches in the same state.
    """
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / 1e6
    times: dict[str, list[float]] = {"restored": [], "booted": []}
    for i in range(pairs):
        for kind in ("restored", "booted") if i % 2 == 0 else ("booted", "restored"):
            extra = ("--snapshot", "never") if kind == "booted" else ()
            _, summary = stoker_run(tree, *extra)
            assert summary["started"] == kind, summary
            times[kind].append(summary["timings"]["seed"])
    return {
        "mb": size,
        "restored": statistics.median(times["restored"]),
        "booted": statistics.median(times["booted"]),
    }


async def clone_memory() -> dict[str, float]:
    """Where an idle clone's QEMU resident memory is (MiB), beside what the guest touched.

    From ``/proc/PID/smaps``: the mapping of the snapshot's memory file is the
    guest's RAM (its pages read from the template are file pages, shared by
    every clone through the page cache; those it wrote are private copies);
    everything else is QEMU's own (code, heap, the TCG translation cache).
    """
    async with VM(snapshot="auto") as vm:
        assert vm.restored_from is not None, "no snapshot of the default shape"
        await vm.exec(["true"], check=True)
        await asyncio.sleep(1)
        pid = vm.vmm_pid
        assert pid is not None
        memory_file = str(vm.restored_from.memory)
        rss = {"guest": 0, "qemu": 0}
        anon = {"guest": 0, "qemu": 0}
        owner = "qemu"
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":"):
                owner = "guest" if len(parts) >= 6 and parts[-1] == memory_file else "qemu"
            elif parts[0] == "Rss:":
                rss[owner] += int(parts[1])
            elif parts[0] == "Anonymous:":
                anon[owner] += int(parts[1])
        meminfo = (await vm.exec(["cat", "/proc/meminfo"], check=True)).stdout.decode()
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in meminfo.splitlines() if ":" in ln}
    return {
        "rss": (rss["guest"] + rss["qemu"]) / 1024,
        "guest_ram": rss["guest"] / 1024,
        "guest_shared": (rss["guest"] - anon["guest"]) / 1024,
        "guest_private": anon["guest"] / 1024,
        "qemu_anon": anon["qemu"] / 1024,
        "qemu_file": (rss["qemu"] - anon["qemu"]) / 1024,
        "guest_touched": (info["MemTotal"] - info["MemFree"]) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--conventional-runs", type=int, default=3)
    parser.add_argument("--no-1g", action="store_true", help="Skip the 1 GB copy-in.")
    args = parser.parse_args()

    dirs = Dirs.from_env()
    print(f"# preparing (cache: {dirs.cache})", file=sys.stderr)
    conv_image = build_conventional_image(dirs.cache / "bench")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "empty-project"
        src.mkdir()
        # The first run of the default image and shape: it boots, and a maker makes the
        # snapshot beside it (or it restores already when one exists).
        _, first = stoker_run(src)
        wait_gone(first.get("snapshot_maker_pid"))
        warm = [stoker_run(src) for _ in range(args.runs)]
        assert all(s["started"] == "restored" for _, s in warm), [s for _, s in warm]
        cold = [stoker_run(src, "--snapshot", "never") for _ in range(args.runs)]
        # The default image says kernel = "auto": the microVM kernel once it is built.
        microvm = cached_microvm_kernel(dirs) is not None
        cold_debian = (
            [
                stoker_run(src, "--snapshot", "never", kernel="debian-cloud")
                for _ in range(args.runs)
            ]
            if microvm
            else cold
        )
        copies = [copy_in(make_tree(Path(tmp), 100))]
        if not args.no_1g:
            copies.append(copy_in(make_tree(Path(tmp), 1000)))
        memory = asyncio.run(clone_memory())
    conv = [boot_conventional(conv_image) for _ in range(args.conventional_runs)]

    warm_wall = statistics.median(w for w, _ in warm)
    cold_wall = statistics.median(w for w, _ in cold)
    cold_debian_wall = statistics.median(w for w, _ in cold_debian)
    kernel = (
        "stoker-microvm kernel" if microvm else "Debian's cloud kernel (no microVM kernel built)"
    )
    startup = statistics.median(s["timings"]["startup"] for _, s in warm + cold)
    conv_med = statistics.median(conv)
    rows = [
        ("conventional VM (q35 + SeaBIOS + initramfs-tools + systemd)", f"{conv_med:.2f} s"),
        ("`stoker run SRC -- true`, default options, second and later runs", f"{warm_wall:.2f} s"),
        ("**speed-up, default (target >= 20x)**", f"**{conv_med / warm_wall:.1f}x**"),
        (f"`stoker run --snapshot never SRC -- true` (cold boot; {kernel})", f"{cold_wall:.2f} s"),
        ("**speed-up, cold boot (target >= 8x)**", f"**{conv_med / cold_wall:.1f}x**"),
        ("CLI start-up before it asks for the VM (target <= 0.15 s)", f"{startup:.3f} s"),
    ]
    for c in copies:
        rows.append(
            (
                f"copy-in {c['mb']:.0f} MB: restored / booted (guest unpack, medians of 3)",
                f"{c['restored']:.2f} s / {c['booted']:.2f} s "
                f"({c['mb'] / c['restored']:.0f} / {c['mb'] / c['booted']:.0f} MB/s; "
                f"ratio {c['restored'] / c['booted']:.2f})",
            )
        )
    if microvm:
        rows.insert(
            5,
            (
                "the same cold boot with Debian's cloud kernel (through PVH)",
                f"{cold_debian_wall:.2f} s ({conv_med / cold_debian_wall:.1f}x)",
            ),
        )
    rows.append(
        (
            "idle clone: QEMU resident / guest touched (in the guest: MemTotal - MemFree)",
            f"{memory['rss']:.0f} MiB / {memory['guest_touched']:.0f} MiB",
        )
    )
    rows.append(
        (
            "idle clone: guest RAM resident (shared with the template + private)",
            f"{memory['guest_ram']:.0f} MiB ({memory['guest_shared']:.0f} + "
            f"{memory['guest_private']:.0f})",
        )
    )
    rows.append(
        (
            "idle clone: QEMU's own, anonymous (heap, TCG translations) + its binary and "
            "libraries (shared by every QEMU)",
            f"{memory['qemu_anon']:.0f} MiB + {memory['qemu_file']:.0f} MiB",
        )
    )
    print(
        f"\nMedians of {args.runs} runs each and {args.conventional_runs} conventional boots; "
        f"{os.cpu_count()} host CPUs.\n"
    )
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\ndefault runs:", " ".join(f"{w:.2f}" for w, _ in warm))
    print("cold runs:", " ".join(f"{w:.2f}" for w, _ in cold))
    if microvm:
        print("cold runs, Debian's kernel:", " ".join(f"{w:.2f}" for w, _ in cold_debian))
    print("conventional boots:", " ".join(f"{c:.2f}" for c in conv))


if __name__ == "__main__":
    main()
