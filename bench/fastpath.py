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

from stoker.paths import Dirs  # noqa: E402
from stoker.vm import VM  # noqa: E402


def stoker_run(src: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    """Wall time and ``--json`` summary of ``stoker run [extra] SRC -- true``."""
    env = {k: v for k, v in os.environ.items() if k != "STOKER_SNAPSHOT"}
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


def copy_in(tree: Path) -> dict[str, float]:
    """Seconds to unpack ``tree`` in the guest: restored (default) and booted."""
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / 1e6
    _, restored = stoker_run(tree)
    assert restored["started"] == "restored", restored
    _, booted = stoker_run(tree, "--snapshot", "never")
    return {
        "mb": size,
        "restored": restored["timings"]["seed"],
        "booted": booted["timings"]["seed"],
    }


async def clone_memory() -> dict[str, float]:
    """QEMU's resident memory of an idle clone, and what the guest touched (MiB)."""
    async with VM(snapshot="auto") as vm:
        assert vm.restored_from is not None, "no snapshot of the default shape"
        await asyncio.sleep(1)
        pid = vm.vmm_pid
        assert pid is not None
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
        meminfo = (await vm.exec(["cat", "/proc/meminfo"], check=True)).stdout.decode()
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in meminfo.splitlines() if ":" in ln}
    return {
        "rss": fields["Rss"] / 1024,
        "anonymous": fields["Anonymous"] / 1024,
        "file": (fields["Rss"] - fields["Anonymous"]) / 1024,
        "guest_touched": (info["MemTotal"] - info["MemFree"]) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
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
        copies = [copy_in(make_tree(Path(tmp), 100))]
        if not args.no_1g:
            copies.append(copy_in(make_tree(Path(tmp), 1000)))
        memory = asyncio.run(clone_memory())
    conv = [boot_conventional(conv_image) for _ in range(args.conventional_runs)]

    warm_wall = statistics.median(w for w, _ in warm)
    cold_wall = statistics.median(w for w, _ in cold)
    startup = statistics.median(s["timings"]["startup"] for _, s in warm + cold)
    conv_med = statistics.median(conv)
    rows = [
        ("conventional VM (q35 + SeaBIOS + initramfs-tools + systemd)", f"{conv_med:.2f} s"),
        ("`stoker run SRC -- true`, default options, second and later runs", f"{warm_wall:.2f} s"),
        ("**speed-up, default (target >= 20x)**", f"**{conv_med / warm_wall:.1f}x**"),
        ("`stoker run --snapshot never SRC -- true` (cold boot)", f"{cold_wall:.2f} s"),
        ("**speed-up, cold boot (target >= 8x)**", f"**{conv_med / cold_wall:.1f}x**"),
        ("CLI start-up before it asks for the VM (target <= 0.15 s)", f"{startup:.3f} s"),
    ]
    for c in copies:
        rows.append(
            (
                f"copy-in {c['mb']:.0f} MB: restored / booted (guest unpack)",
                f"{c['restored']:.2f} s / {c['booted']:.2f} s "
                f"({c['mb'] / c['restored']:.0f} / {c['mb'] / c['booted']:.0f} MB/s; "
                f"ratio {c['restored'] / c['booted']:.2f})",
            )
        )
    rows.append(
        (
            "idle clone: QEMU resident / guest touched",
            f"{memory['rss']:.0f} MiB / {memory['guest_touched']:.0f} MiB "
            f"(template file pages {memory['file']:.0f}, anonymous {memory['anonymous']:.0f})",
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
    print("conventional boots:", " ".join(f"{c:.2f}" for c in conv))


if __name__ == "__main__":
    main()
