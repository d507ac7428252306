"""Snapshot benchmark: cold boot vs restore from a template, on this machine's accelerator.

Prints a markdown table (paste it into the README):

* cold boot -> agent ready (median of N boots) and restore -> agent ready
  (median of N clones), and their ratio (target: restore <= 15 % of cold);
* creating the snapshot: time (template boot + save) and disk space used;
* host memory per clone, with K clones running at once: total RSS, and how
  much of the guest-RAM mapping is shared with the template's memory file
  (page cache, counted once for all clones) versus private copies.

The snapshot is made for a VM shape nobody else uses (disk 4000M) and removed
at the end, so the user's snapshots are neither used nor touched.

Usage: ``python bench/snapshots.py [--runs N] [--clones K] [--accel tcg|auto]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path

from stoker.paths import Dirs
from stoker.snapshots import SnapshotStore
from stoker.vm import VM

SHAPE = {"cpus": 2, "memory": "1G", "disk": "4000M"}


def smaps_of(pid: int, mapping: Path) -> dict[str, int]:
    """kB figures for the process's mapping of ``mapping`` (the template memory file)."""
    totals = {
        "Rss": 0,
        "Shared_Clean": 0,
        "Shared_Dirty": 0,
        "Private_Clean": 0,
        "Private_Dirty": 0,
    }
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping header line
            current = len(fields) >= 6 and fields[5] == str(mapping)
        elif current and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1])
    return totals


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def microvm_image(dirs: Dirs) -> str:
    """The default spec on the stoker-microvm kernel, built (and the kernel too) if needed."""
    from stoker.images import ImageStore, builder_for
    from stoker.images.catalog import load_specs

    spec = load_specs("default")["default"].model_copy(
        update={"name": "default-microvm", "kernel": "stoker-microvm"}
    )
    ImageStore(dirs).ensure(builder_for(spec, dirs=dirs, progress=print), progress=print)
    return "default-microvm"


async def measure(image: str, args: argparse.Namespace, dirs: Dirs) -> dict[str, object]:
    """Cold boots, snapshot creation, restores and clone memory for one image."""
    store = SnapshotStore(dirs)
    shape = {"accel": args.accel, **SHAPE}
    cold = []
    for _ in range(args.runs):
        async with VM(image, snapshot="never", **shape) as vm:  # type: ignore[arg-type]
            await vm.exec(["true"], check=True)
            cold.append(vm.timings.agent_ready)

    t = time.monotonic()
    async with VM(image, snapshot="create", **shape) as first:  # type: ignore[arg-type]
        snap = first.restored_from
        assert snap is not None
        accel = first.accel
    create_wall = time.monotonic() - t
    snapshot_bytes = snap.size_bytes
    try:
        restores = []
        for _ in range(args.runs):
            async with VM(image, snapshot="auto", **shape) as vm:  # type: ignore[arg-type]
                assert vm.restored_from is not None
                await vm.exec(["true"], check=True)
                restores.append(vm.timings.agent_ready)

        # K clones at once: how much memory does each cost the host?
        memory = []
        async with contextlib.AsyncExitStack() as stack:
            clones = [
                await stack.enter_async_context(VM(image, snapshot="auto", **shape))  # type: ignore[arg-type]
                for _ in range(args.clones)
            ]
            for vm in clones:
                # Typical first activity of a job: a shell, python, the toolchain.
                await vm.exec(["sh", "-c", "python3 -c 'import json, ssl'; gcc --version"])
            for vm in clones:
                assert vm.vmm_pid is not None
                ram = smaps_of(vm.vmm_pid, snap.memory)
                memory.append({"rss": rss_of(vm.vmm_pid), **ram})
        async with VM(image, snapshot="never", **shape) as booted:  # type: ignore[arg-type]
            await booted.exec(["sh", "-c", "python3 -c 'import json, ssl'; gcc --version"])
            assert booted.vmm_pid is not None
            booted_rss = rss_of(booted.vmm_pid)
    finally:
        store.remove(snap.path.name)
    return {
        "image": image,
        "accel": accel,
        "cold": cold,
        "restore": restores,
        "create_wall": create_wall,
        "save_seconds": snap.meta.get("save_seconds", 0),
        "snapshot_bytes": snapshot_bytes,
        "clone_memory_kb": memory,
        "booted_rss_kb": booted_rss,
    }


def rows_for(result: dict[str, object], clones: int) -> list[tuple[str, str]]:
    cold: list[float] = result["cold"]  # type: ignore[assignment]
    restores: list[float] = result["restore"]  # type: ignore[assignment]
    memory: list[dict[str, int]] = result["clone_memory_kb"]  # type: ignore[assignment]
    cold_med, restore_med = statistics.median(cold), statistics.median(restores)
    mean = {k: statistics.mean(m[k] for m in memory) for k in memory[0]}
    shared = mean["Shared_Clean"] + mean["Shared_Dirty"]
    private = mean["Private_Clean"] + mean["Private_Dirty"]
    return [
        (f"cold boot -> agent ready (median of {len(cold)})", f"{cold_med:.2f} s"),
        (f"restore -> agent ready (median of {len(restores)})", f"{restore_med:.2f} s"),
        ("restore / cold (target <= 15%)", f"{restore_med / cold_med:.0%}"),
        (
            "snapshot create (template boot + save)",
            f"{result['create_wall']:.1f} s (save {result['save_seconds']:.2f} s)",
        ),
        ("snapshot size on disk", f"{int(result['snapshot_bytes']) / 1e6:.0f} MB"),  # type: ignore[call-overload]
        (f"QEMU RSS per clone ({clones} running)", f"{mean['rss'] / 1024:.0f} MiB"),
        ("guest RAM shared with the template", f"{shared / 1024:.0f} MiB"),
        ("guest RAM private to the clone", f"{private / 1024:.0f} MiB"),
        (
            "QEMU RSS of a booted VM doing the same",
            f"{int(result['booted_rss_kb']) / 1024:.0f} MiB",
        ),  # type: ignore[call-overload]
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clones", type=int, default=3)
    parser.add_argument("--accel", default="auto", choices=("auto", "tcg", "kvm"))
    parser.add_argument(
        "--kernels",
        default="debian-cloud,stoker-microvm",
        help="comma-separated: debian-cloud, stoker-microvm (built if needed)",
    )
    args = parser.parse_args()
    dirs = Dirs.from_env()
    results = {}
    for kernel in args.kernels.split(","):
        image = "default" if kernel == "debian-cloud" else microvm_image(dirs)
        results[kernel] = await measure(image, args, dirs)
    tables = {k: rows_for(r, args.clones) for k, r in results.items()}
    kernels = list(tables)
    accel = next(iter(results.values()))["accel"]
    print(f"Accelerator: {accel}; VM shape 2 vCPU, 1 GiB; image `default`.\n")
    print("| What | " + " | ".join(kernels) + " |")
    print("|---|" + "---|" * len(kernels))
    for i, (what, _) in enumerate(tables[kernels[0]]):
        print(f"| {what} | " + " | ".join(tables[k][i][1] for k in kernels) + " |")
    out = dirs.cache / "bench" / "snapshots.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
