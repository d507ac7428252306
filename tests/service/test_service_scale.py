"""2,000 jobs on the FAKE backend: capacity, pool caps, fairness and priorities hold at scale."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select

from stoker.service.config import ServiceConfig
from stoker.service.fake_backend import FakeBackend
from stoker.service.jobs import JobRequest, JobState
from stoker.service.models import Job, JobEvent
from stoker.service.service import Service

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]

POOLS = {
    "tiny": {"cpus": 1, "memory": 512, "min_idle": 2, "max": 10},
    "medium": {"cpus": 2, "memory": 1024, "min_idle": 1, "max": 6},
    "large": {"cpus": 4, "memory": 4096, "max": 3},
}
LIMIT = 6


async def test_two_thousand_jobs(
    fake_service: ServiceFactory, make_config: ConfigFactory, observer: Any
) -> None:
    config = make_config(
        host={"cpus": 16, "memory_mb": 16384},
        pools=POOLS,
        submitters={"max_concurrent": LIMIT, "overrides": {"urgent": {"priority": 5}}},
        limits={"max_queued_per_submitter": 5000},
    )
    # The whole backlog is queued first, the burst ahead of everyone else (FIFO would
    # run all of it before anyone else's first job).
    client = Service(config)
    await client.open()
    submitted: dict[str, list[str]] = defaultdict(list)
    pools = list(POOLS)

    async def submit(submitter: str, n: int, **kw: Any) -> None:
        for i in range(n):
            request = JobRequest(command=("true",), pool=pools[i % 3], **kw)
            submitted[submitter].append((await client.submit(request, submitter)).id)

    await submit("burst", 1400)
    await submit("steady1", 250)
    await submit("steady2", 250)
    await submit("urgent", 100, priority=5)
    await client.stop()
    backend = FakeBackend()
    t0 = time.monotonic()
    service = await fake_service(config, backend=backend, observer=observer)
    sup = service.supervisor
    assert sup is not None
    violations: list[str] = []
    done = asyncio.Event()

    async def watch() -> None:
        # Pool caps and the host budget, sampled while everything runs.
        while not done.is_set():
            for name, pool in sup.pools.items():
                if pool.total > POOLS[name]["max"]:
                    violations.append(f"{name}: {pool.total} VMs")
            if sup.used.cpus > 16 or sup.used.memory_mb > 16384:
                violations.append(f"ledger {sup.used}")
            await asyncio.sleep(0.005)

    watcher = asyncio.get_running_loop().create_task(watch())
    ids = [i for group in submitted.values() for i in group]
    assert len(ids) == 2000
    deadline = time.monotonic() + 240
    while True:
        jobs = service.db.call(lambda s: s.execute(select(Job.id, Job.state)).all(), write=False)
        if all(JobState(state).terminal for _, state in jobs):
            break
        assert time.monotonic() < deadline, "jobs did not all finish"
        await asyncio.sleep(0.25)
    elapsed = time.monotonic() - t0
    done.set()
    await watcher

    # Every job ended, and well.
    assert {JobState(state) for _, state in jobs} == {JobState.SUCCEEDED}
    # Capacity and pool caps were never exceeded.
    assert not violations, violations[:5]
    assert backend.peak_cpus <= 16 and backend.peak_memory_mb <= 16384
    assert max(c for c, _ in observer.capacity_samples) <= 16
    events = service.db.call(
        lambda s: s.execute(
            select(JobEvent.job_id, JobEvent.to_state, JobEvent.at, Job.submitter)
            .join(Job, Job.id == JobEvent.job_id)
            .order_by(JobEvent.at, JobEvent.seq)
        ).all(),
        write=False,
    )
    # Per-submitter concurrency: claimed (assigned .. end) never above the limit.
    active: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for _, state, _, submitter in sorted(
        events, key=lambda e: (e.at, 0 if JobState(e.to_state).terminal else 1)
    ):
        if state == JobState.ASSIGNED:
            active[submitter] += 1
            peak[submitter] = max(peak[submitter], active[submitter])
        elif JobState(state).terminal:
            active[submitter] -= 1
    assert max(peak.values()) <= LIMIT, dict(peak)
    # Fairness: the steady submitters, queued behind the whole burst, were not made to
    # wait for it: they finished long before it did ...
    finished = {e.job_id: e.at for e in events if JobState(e.to_state).terminal}
    assigned = [e.submitter for e in events if e.to_state == JobState.ASSIGNED]
    burst_done = sorted(finished[i] for i in submitted["burst"])
    for name in ("steady1", "steady2", "urgent"):
        last = max(finished[i] for i in submitted[name])
        assert last < burst_done[len(burst_done) // 2], name
    # ... because from the start each got a fair share of the assignments (about a
    # third of what the higher-priority urgent jobs leave).
    start = assigned[100:400]
    assert all(start.count(name) >= 60 for name in ("burst", "steady1", "steady2")), {
        name: start.count(name) for name in submitted
    }

    # Priority: the urgent jobs, queued last, waited less than the steady ones.
    def waits(name: str) -> list[float]:
        first_assign = {}
        for e in events:
            if e.to_state == JobState.ASSIGNED and e.job_id not in first_assign:
                first_assign[e.job_id] = e.at
        created = {e.job_id: e.at for e in events if e.to_state == JobState.QUEUED}
        return sorted((first_assign[i] - created[i]).total_seconds() for i in submitted[name])

    urgent, steady = waits("urgent"), waits("steady1")
    assert urgent[len(urgent) // 2] < steady[len(steady) // 2]
    print(
        f"\n2000 jobs in {elapsed:.1f}s ({2000 / elapsed:.0f} jobs/s); "
        f"peak {backend.peak_cpus} vCPUs, {backend.peak_vms} VMs"
    )
