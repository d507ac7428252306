"""Chaos with real microVMs: two ``stoker serve`` hosts on one PostgreSQL, SIGKILLed at random.

100 jobs (each prints its attempt number, sleeps a random 0.5-3 s in its
VM, prints ``done``), at least 10 SIGKILLs of either daemon at random moments,
each daemon restarted after a random pause: sometimes within its VMs' orphan
timeout (the restarted daemon takes its running jobs over), sometimes later
(the VMs have ended; the jobs run again, after the lease on the other host).
Checks that every job ended exactly once as ``succeeded``, that no attempt ran
twice and that no VMM or VM work directory is left, and prints the README's
reliability rows (``tests/service/chaos_harness.py`` does the work;
``tests/service/test_chaos.py`` runs it with the fake backend in CI).

Starts its own throw-away PostgreSQL on 127.0.0.1 (``scripts/ci-postgres.sh``,
port 5441) unless ``STOKER_TEST_PG_URL`` names one.  The jobs have no network.

Usage: ``python bench/chaos.py [--jobs N] [--kills N] [--max-vms N] [--seed N] [--backend fake]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "service"))

from chaos_harness import ChaosPlan, run_chaos  # noqa: E402

PG_ENV = {"STOKER_CI_PG_PORT": "5441", "STOKER_CI_PG_DIR": "/var/tmp/stoker-bench-chaos-pg"}


def _postgres(action: list[str]) -> str:
    env = {**os.environ, **PG_ENV}
    script = str(REPO / "scripts" / "ci-postgres.sh")
    proc = subprocess.run(["bash", script, *action], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ci-postgres.sh {' '.join(action)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--max-vms", type=int, default=2, help="VMs per host at once")
    parser.add_argument("--backend", choices=("qemu", "fake"), default="qemu")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.backend == "fake":
        os.environ["STOKER_ALLOW_FAKE_BACKEND"] = "1"
    plan = ChaosPlan(
        jobs=args.jobs,
        kills=args.kills,
        hosts=args.hosts,
        backend=args.backend,
        job_seconds=(0.5, 3.0),
        kill_gap=(4.0, 12.0) if args.backend == "qemu" else (1.0, 4.0),
        # Sometimes back within the VMs' orphan timeout (lease - heartbeat - 1 = 13 s:
        # the jobs are taken over), sometimes not (their VMs end, the jobs run again).
        restart_gap=(0.0, 20.0),
        max_vms=args.max_vms,
        memory_mb=512 if args.backend == "qemu" else 256,
        lease_seconds=15.0,
        seed=args.seed,
        settle_timeout=1800.0,
    )
    url = os.environ.get("STOKER_TEST_PG_URL")
    ours = url is None
    if ours:
        url = _postgres([]).replace("postgresql://", "postgresql+psycopg://", 1)
    assert url is not None
    try:
        with tempfile.TemporaryDirectory(prefix="stoker-chaos-") as tmp:
            report = asyncio.run(run_chaos(plan, Path(tmp), url))
            print(report.table())
            if report.problems:
                print("\nPROBLEMS:")
                print("\n".join(f"- {p}" for p in report.problems))
                for log in sorted(Path(tmp).glob("*.log")):
                    print(f"\n--- {log.name} (tail)")
                    print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))
                raise SystemExit(1)
    finally:
        if ours:
            _postgres(["stop"])


if __name__ == "__main__":
    main()
