"""Scheduler benchmark: ``stoker serve`` with 2,000 queued jobs, and warm vs cold VMs.

Prints markdown tables (paste them into the README's performance section):

1. **fake backend** (the agent in threads, commands on this host; no VMs), for
   SQLite and, when a URL is given, PostgreSQL.  2,000 jobs (``true``) from four
   submitters over three pools are queued before the service starts:

   * *claim rate*: jobs/s the scheduler alone assigns (``db.claim_jobs`` with
     the real placement policy, unlimited capacity, no VMs started);
   * *end to end*: jobs/s the service takes from queued to succeeded on a
     16-vCPU budget, and the queued -> assigned latency (p50/p99) of every job,
     which at this backlog is mostly time spent waiting in the queue.

2. **real VMs** (this machine's accelerator; TCG here): queued -> command
   running (the ``running`` transition, committed just before the command
   starts) for a job served by a warm pool VM vs a job that boots its VM.

Results are also written to ``<cache>/bench/scheduler.json``.

Usage: ``python bench/scheduler.py [--jobs N] [--pg URL] [--vm-runs N] [--no-vm]``
(``--pg`` defaults to ``$STOKER_TEST_PG_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from stoker.paths import Dirs
from stoker.service.config import ServiceConfig
from stoker.service.db import Database, claim_jobs
from stoker.service.fake_backend import FakeBackend
from stoker.service.jobs import JobRequest, JobState
from stoker.service.models import Job, JobEvent
from stoker.service.scheduler import Candidate, Capacity, PoolState, plan
from stoker.service.service import Service

POOLS = {
    "tiny": {"cpus": 1, "memory": 512, "max": 16},
    "medium": {"cpus": 2, "memory": 1024, "max": 8},
    "large": {"cpus": 4, "memory": 2048, "max": 4},
}
SUBMITTERS = ("alice", "bob", "carol", "dave")


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def fake_config(workdir: Path, url: str | None) -> ServiceConfig:
    data: dict[str, Any] = {
        "state_dir": str(workdir / "state"),
        "runtime_dir": str(workdir / "run"),
        "backend": "fake",
        "host": {"name": "bench", "cpus": 16, "memory_mb": 16384},
        "heartbeat_seconds": 1,
        "lease_seconds": 10,
        "poll_seconds": 0.5,
        "pools": POOLS,
        "submitters": {"max_concurrent": 8},
        "limits": {"max_queued_per_submitter": 100_000},
    }
    if url:
        data["database_url"] = url
    return ServiceConfig.model_validate(data)


async def queue_jobs(config: ServiceConfig, n: int) -> list[str]:
    client = Service(config)
    await client.open()
    ids = []
    pools = list(POOLS)
    for i in range(n):
        request = JobRequest(command=("true",), pool=pools[i % len(pools)])
        ids.append((await client.submit(request, SUBMITTERS[i % len(SUBMITTERS)])).id)
    await client.stop()
    return ids


def claim_rate(config: ServiceConfig) -> float:
    """Jobs/s the claim (placement + database) assigns with unlimited capacity."""
    db = Database(config.database_url)
    pools = {
        name: PoolState(cpus=p.cpus, memory_mb=p.memory, max=1_000_000)
        for name, p in config.pools.items()
    }

    def choose(candidates: Sequence[Candidate], running: dict[str, int]) -> list[str]:
        result = plan(
            candidates,
            running=running,
            limit_of=lambda _: 1_000_000,
            pools=pools,
            free=Capacity(1e9, 1e12),
        )
        return [a.job_id for a in result.assignments]

    total = db.call(
        lambda s: s.scalar(select(func.count()).where(Job.state == JobState.QUEUED.value)) or 0
    )
    t0 = time.perf_counter()
    claimed = 0
    while claimed < total:
        jobs = db.call(
            lambda s: claim_jobs(
                s, host="bench", pools=list(pools), choose=choose, lease_seconds=60
            )
        )
        if not jobs:
            break
        claimed += len(jobs)
    elapsed = time.perf_counter() - t0
    db.close()
    return claimed / elapsed


async def end_to_end(config: ServiceConfig, ids: list[str]) -> dict[str, float]:
    service = Service(config, backend=FakeBackend())
    t0 = time.monotonic()
    await service.start()
    for job_id in ids:
        await service.wait(job_id, timeout=1800)
    elapsed = time.monotonic() - t0
    rows = service.db.call(
        lambda s: s.execute(
            select(JobEvent.job_id, JobEvent.to_state, JobEvent.at).where(
                JobEvent.to_state.in_(["queued", "assigned"])
            )
        ).all(),
        write=False,
    )
    await service.stop()
    queued: dict[str, Any] = {}
    assigned: dict[str, Any] = {}
    for job_id, state, at in rows:
        (queued if state == "queued" else assigned).setdefault(job_id, at)
    waits = [(assigned[i] - queued[i]).total_seconds() for i in ids]
    return {
        "jobs_per_s": len(ids) / elapsed,
        "wait_p50_s": percentile(waits, 50),
        "wait_p99_s": percentile(waits, 99),
        "seconds": elapsed,
    }


async def fake_bench(n: int, label: str, url: str | None) -> dict[str, Any]:
    os.environ["STOKER_ALLOW_FAKE_BACKEND"] = "1"
    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        if url:
            reset_postgres(url)
        config = fake_config(Path(tmp), url)
        await queue_jobs(config, n)
        rate = await asyncio.to_thread(claim_rate, config)
        if url:
            reset_postgres(url)
        else:
            Path(config.database_url.removeprefix("sqlite:///")).unlink()
            for suffix in ("-wal", "-shm"):
                Path(config.database_url.removeprefix("sqlite:///") + suffix).unlink(
                    missing_ok=True
                )
        ids = await queue_jobs(config, n)
        result = await end_to_end(config, ids)
    result["claim_jobs_per_s"] = rate
    result["database"] = label
    print(
        f"  {label}: claim {rate:.0f} jobs/s; end to end {result['jobs_per_s']:.1f} jobs/s, "
        f"wait p50 {result['wait_p50_s']:.2f}s p99 {result['wait_p99_s']:.2f}s",
        flush=True,
    )
    return result


async def vm_bench(runs: int) -> dict[str, Any]:
    """queued -> command running: warm pool VM vs cold boot (real VMs)."""
    with tempfile.TemporaryDirectory(prefix="stoker-bench-vm-") as tmp:
        shape = {"cpus": 1, "memory": 512, "disk": 1024, "snapshot": "never"}
        config = ServiceConfig.model_validate(
            {
                "state_dir": tmp,
                "host": {"name": "bench-vm", "cpus": 2, "memory_mb": 2048},
                "pools": {
                    "warm": {**shape, "min_idle": 1, "max": 1},
                    "cold": {**shape, "max": 1},
                },
            }
        )
        service = Service(config)
        await service.start()
        sup = service.supervisor
        assert sup is not None
        latency: dict[str, list[float]] = {"warm": [], "cold": []}
        accel = "?"
        warm = sup.pools["warm"]
        try:
            for _ in range(runs):
                for pool in ("warm", "cold"):
                    # Warm: a VM is idle.  Cold: nothing else boots, the boot has the machine.
                    await settle(lambda: bool(warm.idle) and not warm.warming)
                    accel = warm.idle[0].accel or accel
                    job = await service.submit(JobRequest(command=("true",), pool=pool), "bench")
                    done = await service.wait(job.id, timeout=300)
                    assert done.state is JobState.SUCCEEDED, done.reason
                    running = next(e.at for e in done.events if e.to_state is JobState.RUNNING)
                    latency[pool].append((running - done.queued_at).total_seconds())
        finally:
            await service.stop()
    result = {k: statistics.median(v) for k, v in latency.items()}
    print(
        f"  queued -> running: warm {result['warm']:.2f}s, cold {result['cold']:.2f}s "
        f"(median of {runs}, accel {accel})",
        flush=True,
    )
    return {"median_s": result, "samples_s": latency, "accel": accel, "runs": runs}


async def settle(condition: Callable[[], bool], timeout: float = 300) -> None:
    """Wait until ``condition()`` holds (the bench observes the pool; it does not drive it)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the warm pool did not settle")
        await asyncio.sleep(0.1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--pg", default=os.environ.get("STOKER_TEST_PG_URL"))
    parser.add_argument("--vm-runs", type=int, default=3)
    parser.add_argument("--no-vm", action="store_true")
    args = parser.parse_args()
    pg = args.pg.replace("postgresql://", "postgresql+psycopg://", 1) if args.pg else None
    results: dict[str, Any] = {"jobs": args.jobs, "fake": []}
    print(f"fake backend, {args.jobs} queued jobs:", flush=True)
    results["fake"].append(await fake_bench(args.jobs, "sqlite", None))
    if pg:
        results["fake"].append(await fake_bench(args.jobs, "postgresql", pg))
    if not args.no_vm:
        print("real VMs:", flush=True)
        results["vm"] = await vm_bench(args.vm_runs)
    print()
    print("| database | claim (jobs/s) | end to end (jobs/s) | queued->assigned p50 | p99 |")
    print("|---|---|---|---|---|")
    for r in results["fake"]:
        print(
            f"| {r['database']} | {r['claim_jobs_per_s']:.0f} | {r['jobs_per_s']:.1f} | "
            f"{r['wait_p50_s']:.2f} s | {r['wait_p99_s']:.2f} s |"
        )
    if "vm" in results:
        med = results["vm"]["median_s"]
        print()
        print(f"| VM ({results['vm']['accel']}) | queued -> command running (median) |")
        print("|---|---|")
        print(f"| warm pool | {med['warm']:.2f} s |")
        print(f"| cold boot | {med['cold']:.2f} s |")
    out = Dirs.from_env().cache / "bench" / "scheduler.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    asyncio.run(main())
