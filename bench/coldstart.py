"""Cold-start benchmark: `stoker run SRC -- true` against a conventional VM, same machine, same run.

Prints a markdown table (paste it into the README's performance section):

* stoker cold start, split into prepare -> VMM launch -> agent ready -> command done
  -> teardown, measured through the library (``run_job``) and as wall time of the CLI;
* QEMU's peak RSS (VmHWM) for a default-shaped VM;
* copy-in throughput for a 100 MB tree;
* the conventional VM: QEMU ``-M q35`` + SeaBIOS + Debian with systemd and its
  initramfs-tools initrd, same kernel package, to a oneshot unit after
  multi-user.target (see bench/conventional.py);
* the ratio of the two.

Usage: ``python bench/coldstart.py [--runs N] [--conventional-runs N] [--accel tcg|auto]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conventional import boot_conventional, build_conventional_image  # noqa: E402

from stoker.paths import Dirs  # noqa: E402
from stoker.run import RunRequest, run_job  # noqa: E402
from stoker.vm import VM  # noqa: E402


def _null(_: bytes) -> None:
    return None


async def stoker_once(src: Path, accel: str) -> dict[str, float]:
    # snapshot="never": this measures a boot, even where a snapshot exists
    req = RunRequest(src=src, argv=("true",), accel=accel, snapshot="never")  # type: ignore[arg-type]
    summary = await run_job(req, stdout=_null, stderr=_null)
    assert summary.returncode == 0, summary
    return summary.timings


def cli_wall(src: Path, accel: str) -> float:
    t0 = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stoker.cli",
            "run",
            "--accel",
            accel,
            "--snapshot",
            "never",
            str(src),
            "--",
            "true",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - t0


async def rss_and_copy(accel: str, tree: Path) -> tuple[float, float, float, float]:
    """(QEMU peak RSS MiB, seed-disk copy-in MB/s, channel copy-in MB/s, tree MB)."""
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / 1e6
    async with VM(accel=accel, seed=(tree, "/work/seeded")) as vm:  # type: ignore[arg-type]
        seed_mbps = size / vm.timings.seed
        t0 = time.monotonic()
        await vm.put(tree, "/work/streamed")
        put_mbps = size / (time.monotonic() - t0)
        res = await vm.exec(["du", "-sm", "/work/seeded", "/work/streamed"])
        assert res.ok, res
        pid = vm.vmm_pid
        assert pid is not None
        status = Path(f"/proc/{pid}/status").read_text()
        hwm_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
        )
    return hwm_kb / 1024, seed_mbps, put_mbps, size


def make_tree(root: Path, total_mb: int = 100) -> Path:
    """A project of ``total_mb`` random 1 MiB files in 10 directories."""
    tree = root / f"tree-{total_mb}"
    for d in range(10):
        sub = tree / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(max(total_mb // 10, 1)):
            (sub / f"f{f}.bin").write_bytes(os.urandom(1 << 20))
    return tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--conventional-runs", type=int, default=3)
    parser.add_argument("--accel", default="tcg", choices=["tcg", "auto", "kvm"])
    args = parser.parse_args()

    dirs = Dirs.from_env()
    print(f"# preparing (cache: {dirs.cache})", file=sys.stderr)
    conv_image = build_conventional_image(dirs.cache / "bench")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "empty-project"
        src.mkdir()
        asyncio.run(stoker_once(src, args.accel))  # warm caches (kernel, initramfs, image)

        runs = [asyncio.run(stoker_once(src, args.accel)) for _ in range(args.runs)]
        walls = [cli_wall(src, args.accel) for _ in range(args.runs)]
        tree = make_tree(Path(tmp))
        rss_mb, seed_mbps, put_mbps, tree_mb = asyncio.run(rss_and_copy(args.accel, tree))

    conv = [boot_conventional(conv_image) for _ in range(args.conventional_runs)]

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs)

    cli = statistics.median(walls)
    conv_med = statistics.median(conv)
    rows = [
        ("stoker: prepare (cache lookups, scratch disk)", f"{med('prepare'):.3f} s"),
        ("stoker: VMM launch (QEMU up, QMP connected)", f"{med('launch'):.3f} s"),
        ("stoker: launch -> agent ready", f"{med('agent_ready') - med('launch'):.3f} s"),
        ("stoker: agent ready -> copy-in + `true` done", f"{med('seed') + med('command'):.3f} s"),
        ("stoker: teardown", f"{med('teardown'):.3f} s"),
        ("stoker: total, library (`run_job`)", f"{med('total'):.3f} s"),
        ("stoker: total, CLI wall (`stoker run SRC -- true`)", f"{cli:.3f} s"),
        ("QEMU peak RSS (1 GiB guest, after 2 x 100 MB copy-in)", f"{rss_mb:.0f} MiB"),
        (
            f"copy-in, seed disk as `stoker run` does ({tree_mb:.0f} MB, 100 files)",
            f"{seed_mbps:.1f} MB/s",
        ),
        (f"copy-in, `vm.put` over the agent channel ({tree_mb:.0f} MB)", f"{put_mbps:.1f} MB/s"),
        ("conventional VM (q35 + SeaBIOS + initramfs-tools + systemd)", f"{conv_med:.3f} s"),
        ("**speed-up (conventional / stoker CLI wall)**", f"**{conv_med / cli:.1f}x**"),
        ("target: >= 10x faster than conventional", "met" if conv_med / cli >= 10 else "NOT met"),
        ("target: CLI wall < 2.5 s", "met" if cli < 2.5 else "NOT met"),
    ]
    print(
        f"\nAccelerator: {args.accel}; medians of {args.runs} stoker runs and "
        f"{args.conventional_runs} conventional boots; {os.cpu_count()} host CPUs.\n"
    )
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\nstoker wall times:", " ".join(f"{w:.2f}" for w in walls))
    print("conventional boots:", " ".join(f"{c:.2f}" for c in conv))


if __name__ == "__main__":
    main()
